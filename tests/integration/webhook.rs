//! ChartHero's webhooks received by the daemon (`[webhook]`): the real binary's receiver, fed by
//! the simulator's signed deliveries and by hand-made ones, on both backends. What an event is
//! worth is counted in requests against the simulator: a transcript announced by a webhook costs
//! the one request that fetches it (and the encounter's detail when the warehouse does not hold
//! the document yet), no list request, and arrives without waiting for the schedule.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use charthero_sim::webhook::{WebhookTarget, headers, post, transcript_ready_body};
use charthero_sim::{DocKind, Fault, FaultRule, NewEncounter, Route};
use charthero_sync::store::{self, WebhookEvent};
use charthero_sync::sync::CyclePlan;
use time::OffsetDateTime;

use crate::support::{
    Backend, KillOnDrop, TestEnv, both_backends, charthero_sync, free_port, run, text, wait_exit, wait_for,
    write_secret,
};

const SECRET: &str = "whsec_canary_5e1f";

/// A delivery's headers, as `charthero_sim::webhook::headers` makes them.
type Headers = Vec<(&'static str, String)>;

/// A configuration with the receiver on `port`, the signing secret in a 0600 file, and a
/// schedule that does not fire during the test (hourly, at a minute that is never next).
fn webhook_config(env: &TestEnv, port: u16) -> PathBuf {
    let secret = env.dir.path().join("webhook-secret");
    write_secret(&secret, SECRET);
    env.write_key_file(&env.sim.api_key());
    let minute = (OffsetDateTime::now_utc().minute() + 30) % 60;
    let path = env.write_config_file(&format!(
        "\n[webhook]\nlisten = \"127.0.0.1:{port}\"\nsecret_file = \"{}\"\n",
        secret.display()
    ));
    let text = std::fs::read_to_string(&path).unwrap().replacen(
        "settle_lag = \"0s\"\n",
        &format!("settle_lag = \"0s\"\nschedule = \"0 {minute} * * * *\"\n"),
        1,
    );
    std::fs::write(&path, text).unwrap();
    path
}

/// `run` with its log (debug level) in `log`.
fn daemon(config: &Path, log: &Path) -> KillOnDrop {
    let mut cmd: Command = charthero_sync();
    cmd.arg("--config")
        .arg(config)
        .arg("run")
        .env("RUST_LOG", "debug")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap());
    KillOnDrop(cmd.spawn().unwrap())
}

/// `run` with [`webhook_config`] on a free port, after its first cycle: (port, configuration,
/// log, process).
async fn start_daemon(env: &TestEnv) -> (u16, PathBuf, PathBuf, KillOnDrop) {
    let port = free_port();
    let config = webhook_config(env, port);
    let log = env.dir.path().join("daemon.log");
    let child = daemon(&config, &log);
    wait_for("the first cycle", Duration::from_secs(60), || {
        runs_done(env, "run") == 1
    })
    .await;
    (port, config, log, child)
}

/// Stops the daemon (it must exit 0) and answers its log, which must not hold the secret.
async fn stop_daemon(child: &mut KillOnDrop, log: &Path) -> String {
    crate::daemon::signal(child, "-TERM");
    assert_eq!(
        wait_exit("the daemon after SIGTERM", child, Duration::from_secs(15)).await,
        Some(0)
    );
    let logged = std::fs::read_to_string(log).unwrap();
    assert!(
        !logged.contains("canary"),
        "the signing secret leaked into the log"
    );
    logged
}

fn runs_done(env: &TestEnv, trigger: &str) -> i64 {
    // The last migration's table: the schema is complete.
    if !env.warehouse.has_table("webhook_events") {
        return 0;
    }
    env.warehouse.scalar(
        "SELECT count(*) FROM sync_runs WHERE trigger = ?1 AND outcome = 'succeeded'",
        &[&trigger],
    )
}

fn transcript_stored(env: &TestEnv, document_id: &str) -> bool {
    env.warehouse.scalar::<i64>(
        "SELECT count(*) FROM transcripts WHERE document_id = ?1",
        &[&document_id],
    ) == 1
}

fn event_state(env: &TestEnv, event_id: &str) -> Option<(String, i64)> {
    env.warehouse.optional_row(
        "SELECT state, deliveries FROM webhook_events WHERE event_id = ?1",
        &[&event_id],
    )
}

/// The ambient document of an encounter the simulator holds.
fn ambient_document(env: &TestEnv, encounter_id: &str) -> String {
    env.sim
        .encounter(encounter_id)
        .unwrap()
        .documents
        .iter()
        .find(|d| d.schema_type == "ambient_transcript")
        .unwrap()
        .document_id
        .clone()
}

/// The (list, encounter detail, transcript) requests the simulator answered.
fn requests(stats: &charthero_sim::Stats) -> (u64, u64, u64) {
    (
        stats.route(Route::List),
        stats.route(Route::Encounter),
        stats.route(Route::Transcript),
    )
}

/// Finalizes a transcript in the simulator (which announces it), waits until it is stored and
/// the `cycles`-th webhook cycle ended, and answers the requests made since.
async fn finalize_and_wait(
    env: &TestEnv,
    encounter: &str,
    document: &str,
    cycles: i64,
) -> charthero_sim::Stats {
    env.sim.reset_stats();
    env.sim.finalize_transcript(encounter, document);
    wait_for("the announced transcript", Duration::from_secs(20), || {
        transcript_stored(env, document)
    })
    .await;
    wait_for("the webhook cycle's end", Duration::from_secs(20), || {
        runs_done(env, "webhook") == cycles
    })
    .await;
    env.sim.stats()
}

both_backends!(
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    a_transcript_announced_by_webhook_arrives_at_once_for_the_requests_it_needs
);
async fn a_transcript_announced_by_webhook_arrives_at_once_for_the_requests_it_needs(backend: Backend) {
    let env = TestEnv::with_encounters_on(backend, 71, 40).await;
    // A recording still being transcribed when the daemon starts: listed as processing.
    let known = env.sim.insert(NewEncounter {
        docs: vec![DocKind::Note, DocKind::Ambient],
        ..NewEncounter::at(OffsetDateTime::now_utc() - time::Duration::days(2))
    });
    let known_doc = ambient_document(&env, &known);
    let (port, config, log, mut child) = start_daemon(&env).await;
    assert!(!transcript_stored(&env, &known_doc), "not final yet");

    // Finalized: the simulator delivers the event; the transcript arrives long before the
    // schedule's next cycle, for no list request: the encounter's detail (which brings the
    // stored record up to date, so that no later listing finds it changed), the transcript,
    // and the note, which a changed encounter's notes are asked again for as ever.
    env.sim.set_webhook(Some(WebhookTarget {
        url: format!("http://127.0.0.1:{port}/webhooks/charthero"),
        secret: SECRET.to_owned(),
    }));
    let stats = finalize_and_wait(&env, &known, &known_doc, 1).await;
    assert_eq!(requests(&stats), (0, 1, 1), "{stats:?}");
    assert_eq!(stats.route(Route::Document), 1, "{stats:?}");
    let deliveries = env.sim.webhook_deliveries();
    assert_eq!(deliveries.len(), 1, "{deliveries:?}");
    assert_eq!(deliveries[0].status, Some(202));
    let first_event = deliveries[0].event_id.clone();
    assert_eq!(event_state(&env, &first_event), Some(("queued".to_owned(), 1)));

    // An encounter created after that cycle: the warehouse does not hold its document, so the
    // event first reads the encounter's detail (and stores the encounter), then the transcript.
    let new = env.sim.insert(NewEncounter {
        docs: vec![DocKind::Ambient],
        ..NewEncounter::at(OffsetDateTime::now_utc())
    });
    let new_doc = ambient_document(&env, &new);
    let stats = finalize_and_wait(&env, &new, &new_doc, 2).await;
    assert_eq!(requests(&stats), (0, 1, 1), "{stats:?}");
    let stored: i64 = env.warehouse.scalar(
        "SELECT count(*) FROM encounters WHERE encounter_id = ?1 AND removed_at IS NULL",
        &[&new],
    );
    assert_eq!(stored, 1);

    // The same event delivered again (a retry, a replay inside the tolerance): acknowledged as a
    // duplicate, counted, and it costs nothing.
    env.sim.reset_stats();
    let body = transcript_ready_body(
        &first_event,
        &env.sim.organization_id(),
        &known,
        &known_doc,
        OffsetDateTime::now_utc(),
    );
    let now = OffsetDateTime::now_utc().unix_timestamp();
    let url = format!("http://127.0.0.1:{port}/webhooks/charthero");
    let status = post(
        &url,
        &headers(SECRET, &first_event, "dlv_again", now, body.as_bytes()),
        body.as_bytes(),
    )
    .await
    .unwrap();
    assert_eq!(status, 200);
    assert_eq!(event_state(&env, &first_event), Some(("queued".to_owned(), 2)));

    // An event about an encounter that is not there for this key: one detail request, recorded.
    let body = transcript_ready_body(
        "evt_gone",
        &env.sim.organization_id(),
        "enc_not_there",
        "doc_not_there",
        OffsetDateTime::now_utc(),
    );
    let status = post(
        &url,
        &headers(SECRET, "evt_gone", "dlv_gone", now, body.as_bytes()),
        body.as_bytes(),
    )
    .await
    .unwrap();
    assert_eq!(status, 202);
    wait_for("the event about nothing", Duration::from_secs(20), || {
        event_state(&env, "evt_gone").is_some_and(|(state, _)| state == "not_found")
    })
    .await;
    let stats = env.sim.stats();
    assert_eq!(requests(&stats), (0, 1, 0), "{stats:?}");

    // `status` counts the events, `check` names the receiver (its port held by the daemon) and
    // where the secret comes from.
    let mut status = charthero_sync();
    status.arg("--config").arg(&config).args(["status", "--json"]);
    let out = run(status).await;
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let webhooks = &json["organizations"][0]["webhooks"];
    assert_eq!(
        (webhooks["events"].as_i64(), webhooks["pending"].as_i64()),
        (Some(3), Some(0)),
        "{json:#}"
    );
    assert!(webhooks["last_received_at"].is_string(), "{json:#}");
    let mut check = charthero_sync();
    check.arg("--config").arg(&config).arg("check");
    let out = run(check).await;
    let said = text(&out);
    assert_eq!(out.status.code(), Some(0), "{said}");
    assert!(
        said.contains(&format!("webhook.listen   note    127.0.0.1:{port} is in use")),
        "{said}"
    );
    assert!(
        said.contains("webhook secret   ok      from webhook.secret_file"),
        "{said}"
    );

    stop_daemon(&mut child, &log).await;

    // The next listing finds everything the events fetched current: list requests only.
    env.sim.reset_stats();
    let mut sync = charthero_sync();
    sync.arg("--config").arg(&config).arg("sync");
    let out = run(sync).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let stats = env.sim.stats();
    assert!(stats.route(Route::List) > 0, "{stats:?}");
    assert_eq!(stats.requests, stats.route(Route::List), "{stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_that_fail_verification_are_refused_with_their_reason_and_change_nothing() {
    let env = TestEnv::with_encounters(72, 20).await;
    let (port, _, log, mut child) = start_daemon(&env).await;
    let e = env.sim.snapshot()[0].clone();
    let doc = e.documents[0].document_id.clone();
    let url = format!("http://127.0.0.1:{port}/webhooks/charthero");
    let body = transcript_ready_body(
        "evt_x",
        &env.sim.organization_id(),
        &e.encounter_id,
        &doc,
        OffsetDateTime::now_utc(),
    );
    let b = body.as_bytes();
    let now = OffsetDateTime::now_utc().unix_timestamp();
    let good = headers(SECRET, "evt_x", "dlv_x", now, b);
    let with = |name: &str, value: &str| -> Headers {
        good.iter()
            .map(|(k, v)| (*k, if *k == name { value.to_owned() } else { v.clone() }))
            .collect()
    };
    let without = |name: &str| -> Headers { good.iter().filter(|(k, _)| *k != name).cloned().collect() };
    env.sim.reset_stats();
    let other_org = transcript_ready_body(
        "evt_x",
        "org_someone_else",
        &e.encounter_id,
        &doc,
        OffsetDateTime::now_utc(),
    );
    let big = vec![b' '; 70_000];
    let tampered = body.replace("evt_x", "evt_y").into_bytes();
    let cases: Vec<(&str, Headers, &[u8], u16)> = vec![
        ("no signature", without("ChartHero-Signature"), b, 400),
        ("no delivery id", without("ChartHero-Delivery-Id"), b, 400),
        (
            "a timestamp that is not seconds",
            with("ChartHero-Timestamp", "yesterday"),
            b,
            400,
        ),
        (
            "an old timestamp",
            headers(SECRET, "evt_x", "dlv_x", now - 600, b),
            b,
            400,
        ),
        (
            "a signature of another version",
            with("ChartHero-Signature", &good[3].1.replace("v1=", "v0=")),
            b,
            400,
        ),
        (
            "another secret",
            headers("whsec_wrong", "evt_x", "dlv_x", now, b),
            b,
            401,
        ),
        ("a tampered body", good.clone(), &tampered, 401),
        (
            "an event id the body does not carry",
            headers(SECRET, "evt_other", "dlv_x", now, b),
            b,
            400,
        ),
        (
            "another organization's event",
            headers(SECRET, "evt_x", "dlv_x", now, other_org.as_bytes()),
            other_org.as_bytes(),
            422,
        ),
        (
            "a body over the limit",
            headers(SECRET, "evt_x", "dlv_x", now, &big),
            &big,
            413,
        ),
    ];
    for (what, h, body, expected) in cases {
        let status = post(&url, &h, body).await.unwrap();
        assert_eq!(status, expected, "{what}");
    }
    let elsewhere = post(
        &format!("http://127.0.0.1:{port}/webhooks/charthero/nobody"),
        &good,
        b,
    )
    .await
    .unwrap();
    assert_eq!(elsewhere, 404);
    let stats = env.sim.stats();
    assert_eq!(stats.requests, 0, "{stats:?}");
    let stored: i64 = env.warehouse.scalar("SELECT count(*) FROM webhook_events", &[]);
    assert_eq!(stored, 0);
    // A good delivery after all that is taken.
    assert_eq!(post(&url, &good, b).await.unwrap(), 202);

    let logged = stop_daemon(&mut child, &log).await;
    for reason in [
        "missing_header",
        "malformed_timestamp",
        "timestamp_outside_tolerance",
        "unsupported_signature_version",
        "invalid_signature",
        "header_mismatch",
        "organization_mismatch",
    ] {
        assert!(logged.contains(reason), "{reason} not logged:\n{logged}");
    }
    assert!(
        !logged.contains("canary"),
        "the signing secret leaked into the log"
    );
    let name = e.patient.last_name.clone().unwrap_or_default();
    assert!(
        name.is_empty() || !logged.contains(&name),
        "a patient name in the log"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_without_its_signing_secret_or_with_a_bad_address_is_a_configuration_error() {
    let env = TestEnv::with_encounters(73, 1).await;
    env.write_key_file(&env.sim.api_key());
    let cases = [
        (
            "[webhook]\nlisten = \"127.0.0.1:1\"\n".to_owned(),
            "no webhook signing secret was found: looked in webhook.secret_file (not set), $CHARTHERO_WEBHOOK_SECRET (not set)",
        ),
        ("[webhook]\nlisten = \"localhost\"\n".to_owned(), "webhook.listen"),
        (
            "[webhook]\nlisten = \"\"\nsecrets = \"x\"\n".to_owned(),
            "secrets",
        ),
        (
            format!(
                "[webhook]\nsecret_file = \"/x\"\n\n[[organizations]]\nname = \"north\"\napi_key_file = \"{}\"\n",
                env.dir.path().join("api-key").display()
            ),
            "webhook.secret_file",
        ),
    ];
    for (extra, expected) in cases {
        let config = env.write_config_file(&extra);
        let mut cmd = charthero_sync();
        cmd.arg("--config").arg(&config).arg("run");
        let out = run(cmd).await;
        assert_eq!(out.status.code(), Some(2), "{extra}: {}", text(&out));
        assert!(text(&out).contains(expected), "{extra}: {}", text(&out));
    }
}

/// Stores an event as the receiver would, received at `at`.
async fn store_event(config: &charthero_sync::config::Config, event: WebhookEvent, at: OffsetDateTime) {
    let database = config.database.clone();
    store::blocking(move || {
        let backend = store::open(&database)?;
        backend.record_webhook_event("default", &event, "dlv_stored", at)?;
        Ok(())
    })
    .await
    .expect("the event is stored");
}

fn transcript_ready(
    event_id: &str,
    organization_id: &str,
    encounter_id: &str,
    document_id: &str,
) -> WebhookEvent {
    WebhookEvent {
        event_id: event_id.to_owned(),
        event_type: "recording.transcript_ready".to_owned(),
        api_version: "2026-05-01".to_owned(),
        occurred_at: OffsetDateTime::now_utc(),
        organization_id: organization_id.to_owned(),
        encounter_id: Some(encounter_id.to_owned()),
        document_id: Some(document_id.to_owned()),
    }
}

both_backends!(
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    events_are_handled_by_the_first_cycle_once_it_knows_the_clinic_and_a_failing_one_never_fails_a_cycle
);
async fn events_are_handled_by_the_first_cycle_once_it_knows_the_clinic_and_a_failing_one_never_fails_a_cycle(
    backend: Backend,
) {
    let env = TestEnv::with_encounters_on(backend, 74, 30).await;
    let mut raw = env.raw_config();
    raw.limits.max_attempts = 2;
    let config = raw.validate().unwrap();
    let org = env.sim.organization_id();
    // Stored while no cycle had run: the warehouse does not know the clinic yet.
    let announced = env.sim.insert(NewEncounter {
        docs: vec![DocKind::Ambient],
        ..NewEncounter::at(OffsetDateTime::now_utc() - time::Duration::days(3))
    });
    let announced_doc = ambient_document(&env, &announced);
    env.sim.finalize_transcript(&announced, &announced_doc);
    let old = env.sim.insert(NewEncounter::at(
        OffsetDateTime::now_utc() - time::Duration::days(90),
    ));
    let old_doc = ambient_document(&env, &old);
    // Still processing as listed, so the event is the only news of its transcript.
    let failing = env.sim.insert(NewEncounter {
        docs: vec![DocKind::Ambient],
        ..NewEncounter::at(OffsetDateTime::now_utc() - time::Duration::days(1))
    });
    let failing_doc = ambient_document(&env, &failing);
    let t0 = OffsetDateTime::now_utc();
    store_event(
        &config,
        transcript_ready("evt_a", &org, &announced, &announced_doc),
        t0,
    )
    .await;
    store_event(
        &config,
        transcript_ready("evt_b", &org, &old, &old_doc),
        t0 + time::Duration::milliseconds(1),
    )
    .await;
    store_event(
        &config,
        transcript_ready("evt_c", &org, &failing, &failing_doc),
        t0 + time::Duration::milliseconds(2),
    )
    .await;
    // The third event's detail never answers: the cycle still succeeds, five times over, and the
    // event is then given up.
    env.sim.push_fault(FaultRule {
        route: Some(Route::Encounter),
        skip: 2,
        times: 1_000,
        fault: Fault::status(503, "digest_key_unavailable"),
    });
    let report = env.sync(&config, CyclePlan::full(None, false)).await;
    assert_eq!(report.counts.dead_letters, 0);
    // The first event was handled by this first cycle, before it listed (one page told the
    // clinic first), not left for the next; and its transcript was fetched once, like every
    // other; the encounter before start_at was neither written nor fetched.
    assert_eq!(event_state(&env, "evt_a"), Some(("queued".to_owned(), 1)));
    assert!(transcript_stored(&env, &announced_doc));
    let stats = env.sim.stats();
    assert_eq!(
        stats.route(Route::Transcript) as i64,
        env.warehouse
            .scalar::<i64>("SELECT count(*) FROM transcripts", &[]),
        "{stats:?}"
    );
    assert_eq!(event_state(&env, "evt_b"), Some(("ignored".to_owned(), 1)));
    let old_rows: i64 = env
        .warehouse
        .scalar("SELECT count(*) FROM encounters WHERE encounter_id = ?1", &[&old]);
    assert_eq!(old_rows, 0);
    assert_eq!(event_state(&env, "evt_c"), Some(("pending".to_owned(), 1)));
    for _ in 1..charthero_sync::sync::webhook::MAX_ATTEMPTS {
        env.sync(&config, CyclePlan::full(None, false)).await;
    }
    assert_eq!(event_state(&env, "evt_c"), Some(("failed".to_owned(), 1)));
    let attempts: i64 = env.warehouse.scalar(
        "SELECT attempts FROM webhook_events WHERE event_id = 'evt_c'",
        &[],
    );
    assert_eq!(attempts, 5);
    // Given up, it costs nothing more.
    env.sim.reset_stats();
    env.sync(&config, CyclePlan::full(None, false)).await;
    assert_eq!(env.sim.stats().route(Route::Encounter), 0);

    // An event about a transcript fetched after it occurred (a late delivery) costs nothing; one
    // that occurred after the fetch (a transcript made again) costs the detail and the
    // transcript.
    let mut late = transcript_ready("evt_late", &org, &announced, &announced_doc);
    late.occurred_at = t0 - time::Duration::minutes(5);
    store_event(&config, late, OffsetDateTime::now_utc()).await;
    let again = transcript_ready("evt_again", &org, &announced, &announced_doc);
    store_event(&config, again, OffsetDateTime::now_utc()).await;
    env.sim.clear_faults();
    env.sim.reset_stats();
    env.sync(&config, CyclePlan::full(None, false)).await;
    let stats = env.sim.stats();
    assert_eq!(
        (stats.route(Route::Encounter), stats.route(Route::Transcript)),
        (1, 1),
        "{stats:?}"
    );
    assert_eq!(event_state(&env, "evt_late"), Some(("queued".to_owned(), 1)));
    assert_eq!(event_state(&env, "evt_again"), Some(("queued".to_owned(), 1)));

    // Handled events are kept 30 days; one still pending is handled whatever its age.
    let month_ago = OffsetDateTime::now_utc() - time::Duration::days(31);
    for id in ["evt_month_handled", "evt_month_pending"] {
        let event = transcript_ready(id, &org, &announced, &announced_doc);
        store_event(&config, event, month_ago).await;
    }
    let database = config.database.clone();
    store::blocking(move || {
        store::open(&database)?.settle_webhook_event(
            "default",
            "evt_month_handled",
            store::WebhookState::Queued,
            month_ago,
        )
    })
    .await
    .unwrap();
    env.sync(&config, CyclePlan::full(None, false)).await;
    assert_eq!(event_state(&env, "evt_month_handled"), None);
    assert_eq!(
        event_state(&env, "evt_month_pending"),
        Some(("queued".to_owned(), 1))
    );
    assert_eq!(event_state(&env, "evt_again"), Some(("queued".to_owned(), 1)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_organization_receives_at_its_own_path_with_its_own_secret() {
    let sims = charthero_sim::Simulator::start_organizations(
        [(75, "org_alpha"), (76, "org_beta")]
            .into_iter()
            .map(|(seed, id)| charthero_sim::SimOptions {
                organization_id: id.to_owned(),
                ..crate::support::sim_options(seed, 20)
            })
            .collect(),
    )
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut text = format!(
        "[api]\nbase_url = \"{}\"\n\n[database]\npath = \"{}\"\n\n[sync]\nstart_at = \"{}\"\nsettle_lag = \"0s\"\n\
         schedule = \"0 {} * * * *\"\n\n[limits]\nrequests_per_second = 1000.0\nburst = 100\n\n\
         [webhook]\nlisten = \"127.0.0.1:{port}\"\n",
        sims[0].base_url(),
        dir.path().join("warehouse.db").display(),
        charthero_sync::timefmt::format_utc(OffsetDateTime::now_utc() - time::Duration::days(61)),
        (OffsetDateTime::now_utc().minute() + 30) % 60,
    );
    for (name, sim) in ["alpha", "beta"].iter().zip(&sims) {
        let key = dir.path().join(format!("{name}-key"));
        write_secret(&key, &sim.api_key());
        text.push_str(&format!(
            "\n[[organizations]]\nname = \"{name}\"\napi_key_file = \"{}\"\n",
            key.display()
        ));
    }
    // beta's secret in its file, alpha's in its own environment variable.
    let beta_secret = dir.path().join("beta-webhook");
    write_secret(&beta_secret, "whsec_beta");
    text.push_str(&format!("webhook_secret_file = \"{}\"\n", beta_secret.display()));
    let config = dir.path().join("config.toml");
    std::fs::write(&config, text).unwrap();
    let log = dir.path().join("daemon.log");
    let mut cmd = charthero_sync();
    cmd.arg("--config")
        .arg(&config)
        .arg("run")
        .env("CHARTHERO_WEBHOOK_SECRET_ALPHA", "whsec_alpha")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap());
    let mut child = KillOnDrop(cmd.spawn().unwrap());
    let db = crate::support::Warehouse::Sqlite(dir.path().join("warehouse.db"));
    let runs = |org: &str, trigger: &str| -> i64 {
        // The last migration's table: the schema is complete.
        if !db.has_table("webhook_events") {
            return 0;
        }
        db.scalar(
            "SELECT count(*) FROM sync_runs WHERE organization = ?1 AND trigger = ?2 AND outcome = 'succeeded'",
            &[&org, &trigger],
        )
    };
    wait_for("both first cycles", Duration::from_secs(60), || {
        runs("alpha", "run") == 1 && runs("beta", "run") == 1
    })
    .await;
    let mut documents = Vec::new();
    for ((name, secret), sim) in [("alpha", "whsec_alpha"), ("beta", "whsec_beta")]
        .into_iter()
        .zip(&sims)
    {
        sim.set_webhook(Some(WebhookTarget {
            url: format!("http://127.0.0.1:{port}/webhooks/charthero/{name}"),
            secret: secret.to_owned(),
        }));
        let encounter = sim.insert(NewEncounter {
            docs: vec![DocKind::Ambient],
            ..NewEncounter::at(OffsetDateTime::now_utc() - time::Duration::hours(2))
        });
        let document = sim
            .encounter(&encounter)
            .unwrap()
            .documents
            .iter()
            .find(|d| d.schema_type == "ambient_transcript")
            .unwrap()
            .document_id
            .clone();
        sim.finalize_transcript(&encounter, &document);
        documents.push((name, encounter, document));
    }
    for (name, _, document) in &documents {
        wait_for(
            "each organization's announced transcript",
            Duration::from_secs(20),
            || {
                db.scalar::<i64>(
                "SELECT count(*) FROM transcripts t JOIN webhook_events w ON w.document_id = t.document_id
                 WHERE t.document_id = ?1 AND w.organization = ?2 AND w.state = 'queued'",
                &[document, name],
            ) == 1
            },
        )
        .await;
    }
    // Several organizations: the bare path serves none; one's delivery at the other's path
    // does not verify under the other's secret.
    let (_, encounter, document) = &documents[0];
    let body = transcript_ready_body(
        "evt_cross",
        "org_alpha",
        encounter,
        document,
        OffsetDateTime::now_utc(),
    );
    let now = OffsetDateTime::now_utc().unix_timestamp();
    let signed = headers("whsec_alpha", "evt_cross", "dlv_cross", now, body.as_bytes());
    let at = |path: &str| format!("http://127.0.0.1:{port}{path}");
    assert_eq!(
        post(&at("/webhooks/charthero"), &signed, body.as_bytes())
            .await
            .unwrap(),
        404
    );
    assert_eq!(
        post(&at("/webhooks/charthero/beta"), &signed, body.as_bytes())
            .await
            .unwrap(),
        401
    );
    assert_eq!(
        post(&at("/webhooks/charthero/gamma"), &signed, body.as_bytes())
            .await
            .unwrap(),
        404
    );
    let logged = stop_daemon(&mut child, &log).await;
    assert!(!logged.contains("whsec_"), "a signing secret leaked into the log");
}
