//! Notes, transcripts and recordings: fetched completely, byte for byte, politely (never above
//! the configured rate, retries included), through every fault the upstream can throw. Every
//! test runs on SQLite and on PostgreSQL.

use std::time::Duration;

use charthero_sim::{
    DocKind, Fault, FaultRule, KeyState, NewEncounter, RateLimit, Route as SimRoute, SimOptions,
};
use charthero_sync::sync::CyclePlan;
use time::OffsetDateTime;

use crate::support::{Backend, TestEnv, both_backends, compare, compare_content, holds, sim_options};

fn assert_content_equal(env: &TestEnv) {
    compare(&env.sim, &env.warehouse).assert_empty();
    let bad = compare_content(&env.sim, &env.warehouse);
    assert!(
        bad.is_empty(),
        "{} documents differ, e.g. {:?}",
        bad.len(),
        bad.first()
    );
}

/// Observes (without enforcing) the same limit the client is configured with.
fn watch_rate(env: &TestEnv, rps: f64, burst: u32) {
    env.sim.set_rate_limit(Some(RateLimit {
        requests_per_second: rps,
        burst,
        enforce: false,
    }));
}

both_backends!(
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    unicode_and_a_two_megabyte_transcript_round_trip_byte_for_byte
);
async fn unicode_and_a_two_megabyte_transcript_round_trip_byte_for_byte(backend: Backend) {
    let env = TestEnv::start_on(
        backend,
        SimOptions {
            large_transcript_every: 25,
            unicode_every: 2,
            ..sim_options(21, 300)
        },
    )
    .await;
    let report = env.sync(&env.config(), CyclePlan::full(None, false)).await;
    assert!(report.is_complete(), "{report:?}");
    assert_content_equal(&env);
    let db = &env.warehouse;
    let (largest, exotic): (i64, i64) = db.row(
        db.pick(
            "SELECT (SELECT max(total) FROM (SELECT sum(octet_length(text)) AS total
                                             FROM transcript_turns GROUP BY document_id)),
                    (SELECT count(*) FROM transcript_turns
                     WHERE text LIKE '%👩‍⚕️%' OR text GLOB '*[一-龥]*' OR text LIKE '%é%')",
            "SELECT (SELECT max(total) FROM (SELECT sum(octet_length(text)) AS total
                                             FROM transcript_turns GROUP BY document_id) t),
                    (SELECT count(*) FROM transcript_turns
                     WHERE text LIKE '%👩‍⚕️%' OR text ~ '[一-龥]' OR text LIKE '%é%')",
        ),
        &[],
    );
    assert!(
        largest > 1_900_000,
        "the largest transcript has only {largest} bytes"
    );
    assert!(
        exotic > 0,
        "no emoji, CJK or combining marks reached the warehouse"
    );
    let unsupported: i64 = db.scalar(
        "SELECT count(*) FROM documents WHERE detail_state = 'unsupported'",
        &[],
    );
    assert!(
        unsupported > 0,
        "the dataset should hold unsupported document types"
    );
}

both_backends!(
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    the_fault_matrix_ends_equal_with_no_rate_violations
);
/// Each fault, at several positions of each route, during one full content sync.
async fn the_fault_matrix_ends_equal_with_no_rate_violations(backend: Backend) {
    let env = TestEnv::with_encounters_on(backend, 22, 400).await;
    let mut raw = env.raw_config();
    raw.limits.requests_per_second = 300.0;
    raw.limits.burst = 10;
    raw.limits.max_in_flight = 4;
    // Small pages give the list route enough requests for every fault position.
    raw.sync.page_size = 20;
    raw.api.read_timeout = "1s".into();
    raw.api.request_timeout = "2s".into();
    let config = raw.validate().unwrap();
    watch_rate(&env, 300.0, 10);
    let http_date = httpdate::fmt_http_date(std::time::SystemTime::now() + Duration::from_secs(2));
    let faults = [
        Fault::status(500, "internal_error"),
        Fault::HtmlStatus(502),
        Fault::status(503, "digest_key_unavailable"),
        Fault::Status {
            status: 429,
            reason_code: Some("rate_limited".into()),
            retry_after: Some("1".into()),
        },
        Fault::Status {
            status: 503,
            reason_code: None,
            retry_after: Some(http_date),
        },
        Fault::DropBeforeResponse,
        Fault::DropMidBody,
        Fault::TruncatedJson,
        Fault::Delay(Duration::from_millis(300)),
        Fault::Hang,
    ];
    for route in [SimRoute::List, SimRoute::Document, SimRoute::Transcript] {
        for (i, fault) in faults.iter().enumerate() {
            env.sim.push_fault(FaultRule {
                route: Some(route),
                // A skipping rule counts only requests no earlier rule faulted, so list faults
                // land on every other list request; the busier routes get them spread out.
                skip: if route == SimRoute::List {
                    i as u64
                } else {
                    (i as u64 * 7) % 23
                },
                times: 1,
                fault: fault.clone(),
            });
        }
    }
    let report = env.sync(&config, CyclePlan::full(None, false)).await;
    let stats = env.sim.stats();
    assert_eq!(stats.faults_injected, 30, "every fault fired: {stats:?}");
    assert!(report.counts.retries >= 20, "{:?}", report.counts);
    let dead: Vec<(String, String, Option<String>, String)> = env.warehouse.rows(
        "SELECT work, document_id, reason_code, last_error FROM dead_letters",
        &[],
    );
    assert!(report.is_complete(), "{report:?}; dead letters: {dead:?}");
    assert_content_equal(&env);
    assert_eq!(
        stats.rate_violations, 0,
        "the client exceeded its own rate limit: {stats:?}"
    );
}

both_backends!(
    #[tokio::test]
    fatal_errors_fail_fast_without_a_retry_storm
);
async fn fatal_errors_fail_fast_without_a_retry_storm(backend: Backend) {
    let env = TestEnv::with_encounters_on(backend, 23, 200).await;
    env.sim.push_fault(FaultRule {
        route: Some(SimRoute::List),
        skip: 0,
        times: 100,
        fault: Fault::status(400, "unsupported_filter"),
    });
    let err = env.sync_error(&env.config(), CyclePlan::full(None, false)).await;
    assert!(err.to_string().contains("unsupported_filter"), "{err}");
    assert_eq!(
        env.sim.stats().route(SimRoute::List),
        1,
        "a bug in our request is not retried"
    );
}

both_backends!(
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    a_list_error_stays_the_cycles_error_when_content_cannot_stop_within_the_grace
);
/// Paging fails for good while every content request hangs for 30 s: the content half is
/// abandoned after the stop grace, and the cycle still fails with paging's error (it used to
/// fail as "cancelled", hiding a revoked key behind exit 1).
async fn a_list_error_stays_the_cycles_error_when_content_cannot_stop_within_the_grace(backend: Backend) {
    let env = TestEnv::with_encounters_on(backend, 25, 600).await;
    env.sim.push_fault(FaultRule {
        route: Some(SimRoute::Document),
        skip: 0,
        times: 1_000,
        fault: Fault::Delay(Duration::from_secs(30)),
    });
    // The third list request takes a second (content is in flight by then); from the fifth on,
    // the key is refused.
    env.sim.push_fault(FaultRule {
        route: Some(SimRoute::List),
        skip: 2,
        times: 1,
        fault: Fault::Delay(Duration::from_secs(1)),
    });
    env.sim.push_fault(FaultRule {
        route: Some(SimRoute::List),
        skip: 3,
        times: 100,
        fault: Fault::status(401, "revoked_key"),
    });
    let started = std::time::Instant::now();
    let err = env.sync_error(&env.config(), CyclePlan::full(None, false)).await;
    assert_eq!(err.reason_code(), Some("revoked_key"), "{err}");
    assert!(
        env.sim.stats().route(SimRoute::Document) >= 1,
        "content was in flight"
    );
    assert!(
        started.elapsed() < Duration::from_secs(25),
        "abandoned after the grace, not after the hung requests: {:?}",
        started.elapsed()
    );
}

both_backends!(
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    a_key_revoked_mid_run_stops_within_one_request_with_exit_code_3
);
async fn a_key_revoked_mid_run_stops_within_one_request_with_exit_code_3(backend: Backend) {
    let env = TestEnv::with_encounters_on(backend, 24, 3_000).await;
    env.write_key_file(&env.sim.api_key());
    let config = env.write_config_file("");
    let key = env.sim.api_key();
    env.sim.set_list_hook(Some(std::sync::Arc::new(move |sim, req| {
        if req.seq == 3 {
            sim.set_key_state(&key, KeyState::Revoked);
        }
    })));
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_charthero-sync"));
    cmd.arg("--config")
        .arg(&config)
        .arg("sync")
        .env_remove("RUST_LOG");
    let out = tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(3), "{text}");
    assert!(text.contains("revoked_key"), "{text}");
    let refused = env.sim.stats().status(401);
    // Requests already in flight when the first 401 arrived may also be refused; no new one is sent.
    assert!((1..=8).contains(&refused), "{refused} requests were refused");
    let (outcome, reason): (String, String) = env
        .warehouse
        .row("SELECT outcome, reason_code FROM sync_runs", &[]);
    assert_eq!((outcome.as_str(), reason.as_str()), ("failed", "revoked_key"));
    if let Some(path) = env.warehouse.sqlite_path() {
        let integrity: String = crate::support::reader(path)
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))
            .unwrap();
        assert_eq!(integrity, "ok");
    }
}

both_backends!(
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    without_recordings_read_audio_is_disabled_and_everything_else_syncs
);
async fn without_recordings_read_audio_is_disabled_and_everything_else_syncs(backend: Backend) {
    let env = TestEnv::with_encounters_on(backend, 25, 150).await;
    env.sim.add_key(
        "ch_sk_no_audio",
        &["encounters:read", "patients:read", "documents:read"],
    );
    env.write_key_file("ch_sk_no_audio");
    let audio_dir = env.dir.path().join("audio");
    let config = env.write_config_file(&format!(
        "\n[audio]\nenabled = true\ndirectory = \"{}\"\n",
        audio_dir.display()
    ));
    let run = |args: &[&str]| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_charthero-sync"));
        cmd.arg("--config").arg(&config).args(args).env_remove("RUST_LOG");
        cmd
    };
    let mut sync = run(&["sync"]);
    let out = tokio::task::spawn_blocking(move || sync.output().unwrap())
        .await
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        out.status.code(),
        Some(1),
        "audio was asked for and could not be done: {text}"
    );
    assert!(text.contains("audio:missing_scope"), "{text}");
    assert_content_equal(&env);
    let asked = env.sim.stats().route(SimRoute::Audio);
    assert!(
        (1..=8).contains(&asked),
        "a closed route is asked by at most one wave of in-flight requests, not once per document: {asked} {:?}",
        env.sim.stats()
    );

    let mut status = run(&["status", "--json"]);
    let out = tokio::task::spawn_blocking(move || status.output().unwrap())
        .await
        .unwrap();
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        json["disabled_routes"],
        serde_json::json!(["audio:missing_scope"]),
        "{json}"
    );
    assert_eq!(json["runs"][0]["outcome"], "partial");
}

both_backends!(
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    a_transcript_route_closed_to_the_organization_is_reported_and_fetched_once_enabled
);
async fn a_transcript_route_closed_to_the_organization_is_reported_and_fetched_once_enabled(
    backend: Backend,
) {
    let env = TestEnv::with_encounters_on(backend, 29, 150).await;
    let config = env.raw_config().validate().unwrap();
    for reason in ["route_not_allowed", "organization_not_allowlisted"] {
        env.sim.disable_route(SimRoute::Transcript, reason);
        let report = env.sync(&config, CyclePlan::full(None, false)).await;
        assert_eq!(
            report.disabled_routes.as_deref(),
            Some(format!("transcript:{reason}").as_str()),
            "{report:?}"
        );
        assert_eq!(report.counts.transcripts_fetched, 0);
        // Waiting for the vendor is not "unavailable": nothing is given up for good.
        let given_up: i64 = env.warehouse.scalar(
            "SELECT count(*) FROM documents WHERE transcript_state = 'unavailable'",
            &[],
        );
        assert_eq!(given_up, 0, "{reason}");
    }
    env.sim.enable_route(SimRoute::Transcript);
    let report = env.sync(&config, CyclePlan::full(None, false)).await;
    assert!(report.is_complete(), "{report:?}");
    assert!(report.counts.transcripts_fetched > 0);
    assert_content_equal(&env);
}

both_backends!(
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    recordings_are_stored_by_content_hash_and_the_signed_url_never_is
);
async fn recordings_are_stored_by_content_hash_and_the_signed_url_never_is(backend: Backend) {
    let env = TestEnv::with_encounters_on(backend, 26, 60).await;
    let mut raw = env.raw_config();
    raw.audio.enabled = true;
    raw.audio.directory = env.dir.path().join("audio");
    let config = raw.validate().unwrap();
    let audio_dir = config.audio.directory.clone();
    let report = env.sync(&config, CyclePlan::full(None, false)).await;
    assert!(report.is_complete(), "{report:?}");
    assert!(report.counts.recordings_fetched > 0);
    let rows: Vec<(String, i64, String, Option<f64>)> = env.warehouse.rows(
        "SELECT path, size_bytes, sha256, duration_seconds FROM recordings",
        &[],
    );
    assert_eq!(rows.len() as u64, report.counts.recordings_fetched);
    for (path, size, sha, duration) in &rows {
        let bytes = std::fs::read(audio_dir.join(path)).unwrap();
        assert_eq!(bytes.len() as i64, *size);
        use sha2::Digest;
        let digest: String = sha2::Sha256::digest(&bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(&digest, sha);
        assert_eq!(path, &format!("{sha}.wav"));
        assert!(duration.is_some_and(|d| d > 0.0));
    }
    let image = env.warehouse.disk_image();
    for needle in ["token=", "/media/"] {
        assert!(
            !holds(&image, needle),
            "a signed URL was stored: {:?}",
            env.warehouse.rows_holding(needle)
        );
    }
    let leftovers = std::fs::read_dir(&audio_dir)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with(".partial")
        })
        .count();
    assert_eq!(leftovers, 0);
}

both_backends!(
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    transcripts_alone_are_fetched_however_many_notes_wait_with_details_off
);
/// `[content] details = false` with transcripts on: the notes' detail work stays queued (for
/// when details are turned on), and must not hide the transcripts behind it from the claims.
async fn transcripts_alone_are_fetched_however_many_notes_wait_with_details_off(backend: Backend) {
    let env = TestEnv::with_encounters_on(backend, 61, 600).await;
    let mut raw = env.raw_config();
    raw.content.details = false;
    raw.content.transcripts = true;
    let config = raw.validate().unwrap();
    let report = env.sync(&config, CyclePlan::full(None, false)).await;
    assert!(report.is_complete());
    let snapshot = env.sim.snapshot();
    let notes = snapshot
        .iter()
        .flat_map(|e| &e.documents)
        .filter(|d| d.schema_type == "document")
        .count();
    assert!(
        notes > 300,
        "enough notes waiting to fill several claims: {notes}"
    );
    let finalized = snapshot
        .iter()
        .flat_map(|e| e.documents.iter().map(move |d| (e, d)))
        .filter(|(e, d)| env.sim.transcript(&e.encounter_id, &d.document_id).is_some())
        .count();
    assert!(finalized > 0);
    let stored: i64 = env.warehouse.scalar("SELECT count(*) FROM transcripts", &[]);
    assert_eq!(
        stored as usize, finalized,
        "every finalized transcript is fetched"
    );
    assert_eq!(env.sim.stats().route(SimRoute::Document), 0, "details are off");
}

both_backends!(
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    transcripts_wait_for_finalization_and_changed_notes_are_fetched_again
);
async fn transcripts_wait_for_finalization_and_changed_notes_are_fetched_again(backend: Backend) {
    let env = TestEnv::with_encounters_on(backend, 27, 0).await;
    let config = env.config();
    let id = env.sim.insert(NewEncounter {
        docs: vec![DocKind::Ambient, DocKind::Note],
        ..NewEncounter::at(OffsetDateTime::now_utc() - time::Duration::hours(5))
    });
    let docs: Vec<String> = env
        .sim
        .encounter(&id)
        .unwrap()
        .documents
        .into_iter()
        .map(|d| d.document_id)
        .collect();
    env.sync(&config, CyclePlan::full(None, false)).await;
    assert_eq!(
        env.sim.stats().route(SimRoute::Transcript),
        0,
        "an unfinished transcript is not asked for"
    );
    let state: String = env.warehouse.scalar(
        "SELECT transcript_state FROM documents WHERE document_id = ?1",
        &[&docs[0]],
    );
    assert_eq!(state, "waiting");

    env.sim.finalize_transcript(&id, &docs[0]);
    env.sim
        .edit_note(&id, &docs[1], "Addendum: follow up in 2 weeks. Ça va ✅");
    env.sim.reset_stats();
    let report = env.sync(&config, CyclePlan::full(None, false)).await;
    assert_eq!(report.counts.transcripts_fetched, 1);
    assert_eq!(
        env.sim.stats().route(SimRoute::Document),
        1,
        "only the changed encounter's note: the finished transcript is queued from its summary"
    );
    assert_content_equal(&env);

    // Nothing changed: the transcript is never fetched twice.
    env.sim.reset_stats();
    env.sync(&config, CyclePlan::full(None, false)).await;
    let stats = env.sim.stats();
    assert_eq!(
        stats.route(SimRoute::Transcript) + stats.route(SimRoute::Document),
        0,
        "{stats:?}"
    );
}

/// 40 encounters whose transcript route answers 500 until the faults are cleared, and a
/// configuration that tries each request twice.
async fn failing_transcripts(backend: Backend, seed: u64) -> (TestEnv, charthero_sync::config::Config) {
    let env = TestEnv::with_encounters_on(backend, seed, 40).await;
    let mut raw = env.raw_config();
    raw.limits.max_attempts = 2;
    env.sim.push_fault(FaultRule {
        route: Some(SimRoute::Transcript),
        skip: 0,
        times: 100_000,
        fault: Fault::status(500, "internal_error"),
    });
    (env, raw.validate().unwrap())
}

both_backends!(
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    work_that_exhausts_its_retries_is_dead_lettered_and_done_next_cycle
);
async fn work_that_exhausts_its_retries_is_dead_lettered_and_done_next_cycle(backend: Backend) {
    let (env, config) = failing_transcripts(backend, 28).await;
    let report = env.sync(&config, CyclePlan::full(None, false)).await;
    assert!(!report.is_complete());
    assert!(report.counts.dead_letters > 0);
    let dead: i64 = env
        .warehouse
        .scalar("SELECT count(*) FROM dead_letters WHERE work = 'transcript'", &[]);
    assert_eq!(dead as u64, report.counts.dead_letters);

    // With transcripts turned off, their dead letters are no work left undone (and are kept,
    // for when they are turned on again).
    let mut raw = env.raw_config();
    raw.limits.max_attempts = 2;
    raw.content.transcripts = false;
    let without = env
        .sync(&raw.validate().unwrap(), CyclePlan::full(None, false))
        .await;
    assert!(without.is_complete(), "{without:?}");
    assert_eq!(
        env.warehouse.row_count("SELECT * FROM dead_letters"),
        dead as usize
    );

    env.sim.clear_faults();
    let report = env.sync(&config, CyclePlan::full(None, false)).await;
    assert!(report.is_complete(), "{report:?}");
    assert_eq!(report.counts.transcripts_fetched as i64, dead);
    let left: i64 = env.warehouse.scalar("SELECT count(*) FROM dead_letters", &[]);
    assert_eq!(left, 0);
    assert_content_equal(&env);
}

both_backends!(
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    a_dead_letter_waits_longer_after_each_failed_cycle_and_costs_nothing_meanwhile
);
/// Work that keeps failing is not asked by every cycle: after its first failure the next cycle
/// asks again, after a later one it waits half the time it has been failing (a moment after a
/// short outage, 15 minutes after 30), at most an hour, and a cycle within the wait sends it
/// nothing.
async fn a_dead_letter_waits_longer_after_each_failed_cycle_and_costs_nothing_meanwhile(backend: Backend) {
    let (env, config) = failing_transcripts(backend, 29).await;
    // (transcript requests, dead letters of the cycle, the dead letters' waits in seconds from
    // now) of a cycle that lists what is new, or all history.
    let (env, config) = (&env, &config);
    let listing = |all: bool| async move {
        env.sim.reset_stats();
        let plan = CyclePlan::full(all.then(|| all_history(config)), false);
        let report = env.sync(config, plan).await;
        assert_eq!(report.is_complete(), report.dead_letters_left == 0, "{report:?}");
        let now = charthero_sync::timefmt::unix_nanos(OffsetDateTime::now_utc());
        let waits: Vec<Option<i64>> = env.warehouse.column(
            "SELECT next_attempt_at_ns FROM dead_letters ORDER BY document_id",
            &[],
        );
        let waits: Vec<Option<i64>> = waits
            .into_iter()
            .map(|at| at.map(|at| (at - now) / 1_000_000_000))
            .collect();
        (
            env.sim.stats().route(SimRoute::Transcript),
            report.counts.dead_letters,
            waits,
        )
    };
    let cycle = || listing(false);
    // Makes every dead letter look failing since this long ago.
    let failing_for = |ago: time::Duration| {
        let since = charthero_sync::timefmt::format_utc(OffsetDateTime::now_utc() - ago);
        env.warehouse.execute(&format!(
            "UPDATE dead_letters SET first_failed_at = {}",
            env.warehouse
                .pick(&format!("'{since}'"), &format!("'{since}'::timestamptz"))
        ));
    };
    let (requests, dead, waits) = cycle().await;
    assert!(dead > 5, "{dead} dead letters");
    assert_eq!(requests, 2 * dead, "two attempts each");
    assert_eq!(waits, vec![None; dead as usize], "the next cycle asks again");

    // Failing for a moment only (a short outage, a clinic synced every few seconds): the wait
    // is half that moment, and the next cycle asks again.
    let (requests, again, waits) = cycle().await;
    assert_eq!((requests, again), (2 * dead, dead));
    assert!(waits.iter().all(|w| w.is_some_and(|s| s <= 1)), "{waits:?}");
    // Under two seconds, then: past it, the next cycle asks.
    tokio::time::sleep(Duration::from_secs(2)).await;

    // Failing for 30 minutes: it waits 15.
    failing_for(time::Duration::minutes(30));
    let (requests, again, waits) = cycle().await;
    assert_eq!((requests, again), (2 * dead, dead));
    assert!(
        waits
            .iter()
            .all(|w| w.is_some_and(|s| (15 * 60 - 60..=15 * 60 + 5).contains(&s))),
        "{waits:?}"
    );
    // `status` shows the oldest 20.
    let (_, report) = queue_now(config);
    assert_eq!(
        report.matches("; asked again from ").count(),
        dead.min(20) as usize,
        "{report}"
    );

    // A cycle within the wait asks nothing, and is not complete: work waits.
    let (requests, none, waits) = cycle().await;
    assert_eq!((requests, none), (0, 0), "a waiting dead letter was asked");
    assert_eq!(waits.len() as u64, dead);
    assert_eq!(
        env.sync(config, CyclePlan::full(None, false))
            .await
            .dead_letters_left,
        dead as i64
    );

    // A change of the encounter ends its dead letters' wait.
    let (changed, of_changed): (String, i64) = env.warehouse.row(
        "SELECT encounter_id, count(*) FROM dead_letters GROUP BY encounter_id ORDER BY encounter_id LIMIT 1",
        &[],
    );
    env.sim.update_status(&changed, "amended");
    let (requests, again, _) = listing(true).await;
    assert_eq!((requests, again), (2 * of_changed as u64, of_changed as u64));

    // An encounter removed upstream takes its dead letters along: no claim would pick them up,
    // and they are no work left undone.
    env.sim.remove(&changed);
    env.sim.reset_stats();
    let report = env
        .sync(config, CyclePlan::full(Some(all_history(config)), false))
        .await;
    assert_eq!(report.counts.encounters_removed, 1);
    assert_eq!(env.sim.stats().route(SimRoute::Transcript), 0);
    let dead = dead - of_changed as u64;
    assert_eq!(report.dead_letters_left, dead as i64);
    assert_eq!(
        env.warehouse.row_count("SELECT * FROM dead_letters"),
        dead as usize
    );

    // Failing for three hours: it waits an hour, no more.
    failing_for(time::Duration::hours(3));
    env.warehouse
        .execute("UPDATE dead_letters SET next_attempt_at_ns = 0");
    let (requests, again, waits) = cycle().await;
    assert_eq!((requests, again), (2 * dead, dead));
    assert!(
        waits
            .iter()
            .all(|w| w.is_some_and(|s| (3600 - 60..=3600).contains(&s))),
        "{waits:?}"
    );

    env.sim.clear_faults();
    env.warehouse
        .execute("UPDATE dead_letters SET next_attempt_at_ns = 0");
    let (requests, none, waits) = cycle().await;
    assert_eq!((requests, none, waits), (dead, 0, vec![]));
    assert_content_equal(env);
}

/// What the simulator says a full-content sync must fetch: one document request per note, one
/// transcript request per finalized ambient transcript, and (asked once, answered 400) one per
/// document of an unsupported type.
struct Floor {
    notes: u64,
    finalized: u64,
    unsupported: u64,
}

fn content_floor(env: &TestEnv) -> Floor {
    let mut floor = Floor {
        notes: 0,
        finalized: 0,
        unsupported: 0,
    };
    for e in env.sim.snapshot() {
        for d in &e.documents {
            match d.schema_type.as_str() {
                "document" => floor.notes += 1,
                "ambient_transcript" => {
                    if env.sim.transcript(&e.encounter_id, &d.document_id).is_some() {
                        floor.finalized += 1;
                    }
                }
                _ => floor.unsupported += 1,
            }
        }
    }
    floor
}

/// A simulator whose final documents say `finalized`, not `completed`, and the ID of one more
/// encounter with `docs`, created two hours ago (within the revisit horizon) and still
/// `processing`, to be finished later.
async fn finalized_elsewhere(backend: Backend, options: SimOptions, docs: Vec<DocKind>) -> (TestEnv, String) {
    let env = TestEnv::start_on(
        backend,
        SimOptions {
            final_document_status: "finalized".to_owned(),
            ..options
        },
    )
    .await;
    let recent = env.sim.insert(NewEncounter {
        docs,
        ..NewEncounter::at(OffsetDateTime::now_utc() - time::Duration::hours(2))
    });
    (env, recent)
}

both_backends!(
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    transcripts_final_under_another_status_word_are_fetched_and_unfinished_ones_are_not_asked
);
async fn transcripts_final_under_another_status_word_are_fetched_and_unfinished_ones_are_not_asked(
    backend: Backend,
) {
    let (env, recent) = finalized_elsewhere(
        backend,
        sim_options(31, 600),
        vec![DocKind::Ambient, DocKind::Note],
    )
    .await;
    let config = env.config();
    let report = env.sync(&config, CyclePlan::full(None, false)).await;
    assert!(report.is_complete(), "{report:?}");
    assert_content_equal(&env);
    let floor = content_floor(&env);
    assert!(floor.finalized > 100, "{}", floor.finalized);
    // Each final transcript once; the `processing` ones are not asked.
    assert_eq!(env.sim.stats().route(SimRoute::Transcript), floor.finalized);
    let document = env
        .sim
        .snapshot()
        .into_iter()
        .find(|e| e.encounter_id == recent)
        .and_then(|e| {
            e.documents
                .into_iter()
                .find(|d| d.schema_type == "ambient_transcript")
        })
        .expect("the recent encounter's ambient document");
    assert_eq!(document.status.as_deref(), Some("processing"));
    env.sim.finalize_transcript(&recent, &document.document_id);
    env.sim.reset_stats();
    let report = env.sync(&config, CyclePlan::full(None, false)).await;
    assert!(report.counts.transcripts_fetched >= 1, "{report:?}");
    assert_content_equal(&env);
}

both_backends!(
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    recordings_of_documents_final_under_another_status_word_arrive_with_their_transcripts
);
async fn recordings_of_documents_final_under_another_status_word_arrive_with_their_transcripts(
    backend: Backend,
) {
    let (env, recent) = finalized_elsewhere(backend, sim_options(32, 300), vec![DocKind::Ambient]).await;
    let mut raw = env.raw_config();
    raw.audio.enabled = true;
    raw.audio.directory = env.dir.path().join("audio");
    let config = raw.validate().unwrap();
    let recordings_of_transcripts = || -> (i64, i64) {
        let row: Vec<(i64, i64)> = env.warehouse.rows(
            "SELECT (SELECT count(*) FROM transcripts),
                    (SELECT count(*) FROM recordings r JOIN transcripts t ON t.document_id = r.document_id)",
            &[],
        );
        row[0]
    };
    let report = env.sync(&config, CyclePlan::full(None, false)).await;
    assert!(report.is_complete(), "{report:?}");
    // No document says `completed`; every one whose transcript was fetched gets its recording
    // in the same cycle, with one audio request each, and the unfinished one none.
    let (transcripts, recorded) = recordings_of_transcripts();
    assert!(transcripts > 50, "{transcripts}");
    assert_eq!(recorded, transcripts);
    assert_eq!(report.counts.recordings_fetched, transcripts as u64);
    assert_eq!(env.sim.stats().route(SimRoute::Audio), transcripts as u64);
    let (document_id, status): (String, Option<String>) = env
        .warehouse
        .rows(
            "SELECT d.document_id, d.status FROM documents d
              WHERE d.encounter_id = ?1 AND d.schema_type = 'ambient_transcript'",
            &[&recent],
        )
        .pop()
        .expect("the recent ambient document");
    assert_eq!(status.as_deref(), Some("processing"));
    let recorded_recent: i64 = env.warehouse.scalar(
        "SELECT count(*) FROM recordings WHERE document_id = ?1",
        &[&document_id],
    );
    assert_eq!(recorded_recent, 0);
    // Once it is final (and its transcript fetched), its recording follows.
    env.sim.finalize_transcript(&recent, &document_id);
    env.sim.reset_stats();
    let report = env.sync(&config, CyclePlan::full(None, false)).await;
    assert!(report.is_complete(), "{report:?}");
    let recorded_recent: i64 = env.warehouse.scalar(
        "SELECT count(*) FROM recordings WHERE document_id = ?1",
        &[&document_id],
    );
    assert_eq!(recorded_recent, 1);
    assert_eq!(env.sim.stats().route(SimRoute::Audio), 1);
}

both_backends!(#[tokio::test(flavor = "multi_thread", worker_threads = 2)] a_first_full_content_sync_stays_within_five_percent_of_the_request_floor_and_an_idle_cycle_asks_for_no_content);
async fn a_first_full_content_sync_stays_within_five_percent_of_the_request_floor_and_an_idle_cycle_asks_for_no_content(
    backend: Backend,
) {
    let env = TestEnv::with_encounters_on(backend, 29, 3_000).await;
    let config = env.config();
    let report = env.sync(&config, CyclePlan::full(None, false)).await;
    assert!(report.is_complete(), "{report:?}");
    assert_content_equal(&env);
    let stats = env.sim.stats();
    let floor = content_floor(&env);
    let list = stats.route(SimRoute::List);
    let minimum = list + floor.notes + floor.finalized;
    eprintln!(
        "first full-content sync: {} requests (list {list}, encounter {}, document {}, transcript {}, \
         audio {}); floor {minimum} (list {list} + notes {} + finalized transcripts {}); \
         {} unsupported documents; ratio {:.3}",
        stats.requests,
        stats.route(SimRoute::Encounter),
        stats.route(SimRoute::Document),
        stats.route(SimRoute::Transcript),
        stats.route(SimRoute::Audio),
        floor.notes,
        floor.finalized,
        floor.unsupported,
        stats.requests as f64 / minimum as f64,
    );
    assert!(
        stats.requests * 100 <= minimum * 105,
        "{} requests for a floor of {minimum}: {stats:?}",
        stats.requests
    );
    // Exactly: each note and each unsupported document asked once, each finalized transcript
    // fetched once, and nothing else.
    assert_eq!(
        stats.route(SimRoute::Document),
        floor.notes + floor.unsupported,
        "{stats:?}"
    );
    assert_eq!(stats.route(SimRoute::Transcript), floor.finalized, "{stats:?}");
    assert_eq!(stats.route(SimRoute::Encounter), 0, "{stats:?}");

    env.sim.reset_stats();
    env.sync(&config, CyclePlan::full(None, false)).await;
    let stats = env.sim.stats();
    assert_eq!(
        stats.requests,
        stats.route(SimRoute::List),
        "an idle cycle makes list requests only: {stats:?}"
    );
}

/// What re-listing a changed encounter must cost: one document request per note (its text can
/// change without its summary saying so) and one transcript request per finished transcript
/// (likewise; the transcript route answers for the one request a detail would have cost just to
/// say whether it changed). Nothing for unfinished transcripts or unsupported documents.
fn changed_encounter_cost(env: &TestEnv, encounter_id: &str) -> (u64, u64) {
    let e = env.sim.encounter(encounter_id).unwrap();
    let notes = e.documents.iter().filter(|d| d.schema_type == "document").count();
    let finished = e
        .documents
        .iter()
        .filter(|d| env.sim.transcript(encounter_id, &d.document_id).is_some())
        .count();
    (notes as u64, finished as u64)
}

/// (document, transcript) requests since the last `reset_stats`, after checking that no other
/// content route was asked.
fn content_requests(env: &TestEnv) -> (u64, u64) {
    let stats = env.sim.stats();
    assert_eq!(
        stats.route(SimRoute::Encounter) + stats.route(SimRoute::Audio),
        0,
        "{stats:?}"
    );
    (stats.route(SimRoute::Document), stats.route(SimRoute::Transcript))
}

/// The stored versions of a transcript's turns. On SQLite the first and last rowids: a rewrite
/// gives its turns new rowids when transcripts were inserted after it (new rows take rowids
/// above the table's largest). On PostgreSQL each turn's writing transaction and place (`xmin`,
/// `ctid`), which any rewrite changes.
fn turn_rowids(env: &TestEnv, document_id: &str) -> String {
    let db = &env.warehouse;
    db.scalar(
        db.pick(
            "SELECT min(rowid) || '..' || max(rowid) FROM transcript_turns WHERE document_id = ?1",
            "SELECT string_agg(xmin::text || '@' || ctid::text, ',' ORDER BY turn_index)
             FROM transcript_turns WHERE document_id = ?1",
        ),
        &[&document_id],
    )
}

both_backends!(
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    each_change_is_fetched_again_with_one_request_per_note_and_finished_transcript_of_its_encounter
);
async fn each_change_is_fetched_again_with_one_request_per_note_and_finished_transcript_of_its_encounter(
    backend: Backend,
) {
    let env = TestEnv::with_encounters_on(backend, 30, 0).await;
    let config = env.config();
    let now = OffsetDateTime::now_utc();
    let insert = |hours: i64, docs: Vec<DocKind>| -> (String, Vec<String>) {
        let id = env.sim.insert(NewEncounter {
            docs,
            ..NewEncounter::at(now - time::Duration::hours(hours))
        });
        let docs = env
            .sim
            .encounter(&id)
            .unwrap()
            .documents
            .into_iter()
            .map(|d| d.document_id)
            .collect();
        (id, docs)
    };
    let (finalized_later, fl_docs) = insert(9, vec![DocKind::Ambient, DocKind::Note]);
    let (retranscribed, rt_docs) = insert(8, vec![DocKind::AmbientFinal, DocKind::Note]);
    let (edited, ed_docs) = insert(7, vec![DocKind::AmbientFinal, DocKind::Note]);
    let (grown, _) = insert(6, vec![DocKind::AmbientFinal]);
    // Never changed: costs nothing after the first sync.
    insert(
        5,
        vec![
            DocKind::Ambient,
            DocKind::AmbientFinal,
            DocKind::Note,
            DocKind::Unsupported,
        ],
    );
    let sync = || async {
        env.sim.reset_stats();
        let report = env.sync(&config, CyclePlan::full(None, false)).await;
        assert!(report.is_complete(), "{report:?}");
        assert_content_equal(&env);
        content_requests(&env)
    };

    // First sight: each note and unsupported document asked once, each finished transcript
    // fetched once, no ambient detail.
    let floor = content_floor(&env);
    assert_eq!(
        sync().await,
        (floor.notes + floor.unsupported, floor.finalized),
        "first sync"
    );
    assert_eq!((floor.notes, floor.unsupported, floor.finalized), (4, 1, 4));
    let (ambient_details, notes_without_detail): (i64, i64) = env.warehouse.row(
        "SELECT count(*) FILTER (WHERE schema_type = 'ambient_transcript' AND detail_updated_at IS NOT NULL),
                count(*) FILTER (WHERE schema_type = 'document' AND detail_updated_at IS NULL)
         FROM documents",
        &[],
    );
    assert_eq!(
        (ambient_details, notes_without_detail),
        (0, 0),
        "document timestamps are filled exactly when a detail was fetched"
    );

    // A transcript finalized later: its summary changes; the note of the same encounter is
    // asked again, the transcript fetched.
    env.sim.finalize_transcript(&finalized_later, &fl_docs[0]);
    assert_eq!(sync().await, changed_encounter_cost(&env, &finalized_later));
    assert_eq!(sync().await, (0, 0), "idle after the finalization");

    // A transcript that changes with the same summary (re-finalized upstream: the document's
    // updated_at moves, status and duration do not): fetched again. The simulator serves the
    // same turns, so the stored copy is not rewritten (transcripts were stored after it, so a
    // rewrite would show in its rowids).
    let before = turn_rowids(&env, &rt_docs[0]);
    env.sim.finalize_transcript(&retranscribed, &rt_docs[0]);
    assert_eq!(sync().await, changed_encounter_cost(&env, &retranscribed));
    assert_eq!(
        turn_rowids(&env, &rt_docs[0]),
        before,
        "an identical transcript is not rewritten"
    );

    // A note edited: the note and the encounter's finished transcript.
    env.sim.edit_note(
        &edited,
        &ed_docs[1],
        "Edited: recheck BP in 1 week. Größe 1,80 m ✅",
    );
    assert_eq!(sync().await, changed_encounter_cost(&env, &edited));

    // Documents added: the new note, the new finished transcript and the old one; nothing for
    // the unfinished one.
    env.sim.add_document(&grown, DocKind::Note);
    env.sim.add_document(&grown, DocKind::AmbientFinal);
    env.sim.add_document(&grown, DocKind::Ambient);
    assert_eq!(changed_encounter_cost(&env, &grown), (1, 2));
    assert_eq!(sync().await, changed_encounter_cost(&env, &grown));

    assert_eq!(sync().await, (0, 0), "idle at the end");
}

both_backends!(
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    a_retry_after_longer_than_a_request_waits_pauses_the_key_until_it_is_over
);
/// A `Retry-After` longer than a request waits (an hourly quota, say) pauses every request of
/// the key until it has passed: the cycle ends at once naming the time, the next cycle of the
/// same process sends nothing, nothing is retried meanwhile, and a new process (`sync` from a
/// timer, a restarted daemon) sends nothing either, since the pause is kept in the warehouse;
/// `status` shows it. Once it is over, the next process syncs.
async fn a_retry_after_longer_than_a_request_waits_pauses_the_key_until_it_is_over(backend: Backend) {
    let env = TestEnv::with_encounters_on(backend, 32, 300).await;
    let config = env.encounters_only_config();
    let ctx = charthero_sync::connect(&config, &env.key()).await.unwrap();
    crate::support::quota_on_the_next_list_request(&env.sim);
    let cancel = tokio_util::sync::CancellationToken::new();
    let started = std::time::Instant::now();
    for _ in 0..2 {
        let cycle = charthero_sync::sync::run_cycle(&ctx, "test", CyclePlan::full(None, false), &cancel);
        let text = match cycle.await {
            Ok(report) => panic!("the cycle succeeded: {report:?}"),
            Err(e) => format!("{:#}", anyhow::Error::from(e)),
        };
        assert!(
            text.contains("no requests until") && text.contains("Retry-After"),
            "{text}"
        );
        // Only the request that was answered 429: no retry, and nothing in the second cycle.
        assert_eq!(env.sim.stats().route(SimRoute::List), 1, "{text}");
    }
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    drop(ctx);

    // New processes, as a timer's `sync` would start them: nothing is sent until the pause is
    // over, and `status` says until when.
    env.write_key_file(&env.sim.api_key());
    let file = env.write_config_file("\n[content]\ndetails = false\ntranscripts = false\n");
    let run = |args: &[&str]| {
        let mut cmd = crate::support::charthero_sync();
        cmd.arg("--config").arg(&file).args(args);
        cmd
    };
    let out = crate::support::run_within(run(&["sync"]), Duration::from_secs(30)).await;
    let text = crate::support::text(&out);
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("no requests until"), "{text}");
    assert_eq!(env.sim.stats().route(SimRoute::List), 1, "{text}");
    let paused_until = || {
        let out = run(&["status", "--json"]).output().unwrap();
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        json["organizations"][0]["paused_until"].clone()
    };
    let paused = paused_until();
    let until = charthero_sync::timefmt::parse_rfc3339(paused.as_str().expect("a pause in status")).unwrap();
    let left = until - OffsetDateTime::now_utc();
    assert!(
        // Kept to the nearest second, as `Retry-After` counts.
        left > time::Duration::seconds(500) && left <= time::Duration::seconds(601),
        "{paused}"
    );
    let human = crate::support::text(&run(&["status"]).output().unwrap());
    assert!(
        human.contains(&format!(
            "paused by ChartHero (Retry-After) until {}",
            paused.as_str().unwrap()
        )),
        "{human}"
    );

    // `check` and `plan` honour the kept pause too: nothing is sent, and both say until when.
    let requests = || {
        let stats = env.sim.stats();
        stats.by_route.values().sum::<u64>() + stats.unrouted
    };
    let before = requests();
    let out = crate::support::run_within(run(&["check"]), Duration::from_secs(30)).await;
    let text = crate::support::text(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains(&format!(
            "api              paused  ChartHero asked this key to wait (Retry-After) until {}",
            paused.as_str().unwrap()
        )) && text.contains("check again after then"),
        "{text}"
    );
    let out = crate::support::run_within(run(&["plan"]), Duration::from_secs(30)).await;
    let text = crate::support::text(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("no requests until") && text.contains("Retry-After"),
        "{text}"
    );
    assert_eq!(
        requests(),
        before,
        "check and plan sent requests during the pause"
    );

    // The pause over (its end moved into the past, as time would move it), the next process
    // asks again and syncs.
    let database = config.database.clone();
    charthero_sync::store::blocking(move || {
        let backend = charthero_sync::store::open(&database)?;
        backend.set_state_time(
            "default",
            charthero_sync::store::StateTime::PausedUntil,
            OffsetDateTime::now_utc() - time::Duration::seconds(1),
        )
    })
    .await
    .unwrap();
    let out = crate::support::run_within(run(&["sync"]), Duration::from_secs(60)).await;
    assert!(out.status.success(), "{}", crate::support::text(&out));
    compare(&env.sim, &env.warehouse).assert_empty();
    assert_eq!(paused_until(), serde_json::Value::Null);
    let out = crate::support::run_within(run(&["check"]), Duration::from_secs(30)).await;
    let text = crate::support::text(&out);
    assert!(out.status.success() && !text.contains("paused"), "{text}");
}

both_backends!(
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    a_note_edited_without_its_encounter_changing_is_fetched_again_only_by_refresh_content
);
/// A server whose list does not show document edits: a note's text changes, its encounter's
/// record does not. A sync cannot see it (and makes no content request); `sync
/// --refresh-content` fetches the notes and finished transcripts of the range again, one request
/// each, and stores the new text.
async fn a_note_edited_without_its_encounter_changing_is_fetched_again_only_by_refresh_content(
    backend: Backend,
) {
    let env = TestEnv::start_on(
        backend,
        SimOptions {
            unsupported_doc_every: 0,
            ..sim_options(91, 120)
        },
    )
    .await;
    let config = env.config();
    env.sync(&config, CyclePlan::full(None, false)).await;
    assert_content_equal(&env);
    let snapshot = env.sim.snapshot();
    let note_of = |e: &charthero_sim::Encounter| {
        e.documents
            .iter()
            .find(|d| d.schema_type == "document")
            .map(|d| d.document_id.clone())
    };
    // Two encounters with a note, one early in history and one late.
    let with_note: Vec<&charthero_sim::Encounter> =
        snapshot.iter().filter(|e| note_of(e).is_some()).collect();
    assert!(with_note.len() > 20, "{} encounters with a note", with_note.len());
    let (old, new) = (with_note[5], with_note[with_note.len() - 5]);
    let (old_note, new_note) = (note_of(old).expect("a note"), note_of(new).expect("a note"));
    env.sim
        .edit_note_quietly(&old.encounter_id, &old_note, "Addendum (old): reviewed.");
    env.sim
        .edit_note_quietly(&new.encounter_id, &new_note, "Addendum (new): reviewed.");
    let text = |document_id: &str| -> Option<String> {
        env.warehouse.scalar(
            "SELECT content_text FROM documents WHERE document_id = ?1",
            &[&document_id],
        )
    };
    // The list shows nothing new: no content request, the old text stays.
    env.sim.reset_stats();
    env.sync(&config, CyclePlan::full(None, false)).await;
    let stats = env.sim.stats();
    assert_eq!(
        stats.route(SimRoute::Document) + stats.route(SimRoute::Transcript),
        0,
        "{stats:?}"
    );
    assert_ne!(text(&new_note).as_deref(), Some("Addendum (new): reviewed."));
    // Refreshing the newer half of history fetches its content again, and only its.
    let halfway = new.created_at - time::Duration::seconds(1);
    let range = charthero_sync::sync::BackfillRange {
        start: halfway,
        end: OffsetDateTime::now_utc(),
    };
    let in_range: Vec<&charthero_sim::Encounter> =
        snapshot.iter().filter(|e| e.created_at >= halfway).collect();
    let notes = in_range
        .iter()
        .flat_map(|e| &e.documents)
        .filter(|d| d.schema_type == "document")
        .count() as u64;
    let transcripts = in_range
        .iter()
        .flat_map(|e| &e.documents)
        .filter(|d| d.schema_type == "ambient_transcript" && d.status.as_deref() == Some("completed"))
        .count() as u64;
    env.sim.reset_stats();
    let report = env
        .sync(
            &config,
            CyclePlan {
                refresh_content: true,
                ..CyclePlan::full(Some(range), false)
            },
        )
        .await;
    assert!(report.is_complete(), "{report:?}");
    let stats = env.sim.stats();
    assert_eq!(stats.route(SimRoute::Document), notes, "{stats:?}");
    assert_eq!(stats.route(SimRoute::Transcript), transcripts, "{stats:?}");
    assert_eq!(text(&new_note).as_deref(), Some("Addendum (new): reviewed."));
    assert_ne!(text(&old_note).as_deref(), Some("Addendum (old): reviewed."));
    // Without a range, everything: the older note too, and then the warehouse equals upstream.
    let report = env
        .sync(
            &config,
            CyclePlan {
                refresh_content: true,
                ..CyclePlan::full(None, false)
            },
        )
        .await;
    assert!(report.is_complete(), "{report:?}");
    assert_eq!(text(&old_note).as_deref(), Some("Addendum (old): reviewed."));
    assert_content_equal(&env);
}

both_backends!(
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    decimals_sent_as_strings_are_read_as_the_numbers_they_hold
);
/// An API that keeps decimals exact sends `audio_duration_seconds` and transcript turns'
/// `start`/`end` as strings (`"842.4"`). Summaries, details and transcripts are read as the
/// numbers they hold: the warehouse equals upstream, content included.
async fn decimals_sent_as_strings_are_read_as_the_numbers_they_hold(backend: Backend) {
    let env = TestEnv::start_on(
        backend,
        SimOptions {
            decimals_as_strings: true,
            ..sim_options(92, 150)
        },
    )
    .await;
    let report = env.sync(&env.config(), CyclePlan::full(None, false)).await;
    assert!(report.is_complete(), "{report:?}");
    assert!(report.counts.transcripts_fetched > 20, "{report:?}");
    assert_content_equal(&env);
    let durations: i64 = env.warehouse.scalar(
        "SELECT count(*) FROM documents WHERE audio_duration_seconds > 0",
        &[],
    );
    assert!(durations > 20, "{durations} durations stored");
}

both_backends!(
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    records_rendered_differently_each_time_are_not_changes_and_cost_no_content_request
);
/// A server built on unordered maps sends the same encounter with its keys, its documents and
/// its whitespace in another order on every response. Listed again (a reconcile of all
/// history, as the revisits and the deep revisit list it every cycle), nothing has changed: no
/// row is written and no note or transcript is fetched again. A hash an earlier release stored
/// (of the bytes as received) is brought up to date the same way, once, without a request;
/// a real change is still one.
async fn records_rendered_differently_each_time_are_not_changes_and_cost_no_content_request(
    backend: Backend,
) {
    let env = TestEnv::start_on(
        backend,
        SimOptions {
            unordered_rendering: true,
            extra_fields: true,
            ..sim_options(93, 300)
        },
    )
    .await;
    let config = env.config();
    let first = env.sync(&config, CyclePlan::full(None, false)).await;
    assert!(first.is_complete(), "{first:?}");
    assert_content_equal(&env);
    let all = all_history(&config);
    let written = |env: &TestEnv| -> (String, i64) {
        env.warehouse.row(
            "SELECT max(e.changed_at), (SELECT count(*) FROM encounter_history) FROM encounters e",
            &[],
        )
    };
    let before = written(&env);
    assert_eq!(listed_again(&env, &config, all).await, (0, 300, 0));
    assert_eq!(written(&env), before, "rows were written for unchanged records");

    env.warehouse
        .execute("UPDATE encounters SET content_hash = 'a hash of an earlier release'");
    assert_eq!(listed_again(&env, &config, all).await, (0, 300, 0));
    assert_eq!(written(&env), before);
    let left: i64 = env.warehouse.scalar(
        "SELECT count(*) FROM encounters WHERE content_hash = 'a hash of an earlier release'",
        &[],
    );
    assert_eq!(left, 0, "the hashes were not brought up to date");

    let changed = env.sim.snapshot()[17].encounter_id.clone();
    env.sim.update_status(&changed, "amended");
    let (changed_count, _, _) = listed_again(&env, &config, all).await;
    assert_eq!(changed_count, 1);
    assert_content_equal(&env);
}

/// (changed, unchanged at least once, content requests) of a reconcile of all history: what
/// listing `encounters` encounters again costs.
async fn listed_again(
    env: &TestEnv,
    config: &charthero_sync::config::Config,
    all: charthero_sync::sync::BackfillRange,
) -> (u64, u64, u64) {
    env.sim.reset_stats();
    let report = env.sync(config, CyclePlan::full(Some(all), false)).await;
    let stats = env.sim.stats();
    (
        report.counts.encounters_changed,
        report
            .counts
            .encounters_unchanged
            .min(env.sim.encounter_count() as u64),
        stats.route(SimRoute::Document) + stats.route(SimRoute::Transcript),
    )
}

both_backends!(
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    signed_links_in_the_list_are_never_stored_and_listing_them_again_costs_no_content_request
);
/// A server may embed a finished recording's signed link in each document summary, signed anew
/// for every response. The contract forbids storing signed URLs, and a link that differs on
/// every listing must not make the record look changed (which would fetch its notes and
/// transcripts again on every reconcile and revisit).
async fn signed_links_in_the_list_are_never_stored_and_listing_them_again_costs_no_content_request(
    backend: Backend,
) {
    let env = TestEnv::start_on(
        backend,
        SimOptions {
            signed_recording_links: true,
            ..sim_options(95, 300)
        },
    )
    .await;
    let config = env.config();
    let first = env.sync(&config, CyclePlan::full(None, false)).await;
    assert!(first.is_complete(), "{first:?}");
    assert_content_equal(&env);
    // Every finished recording's summary carried a link.
    let finished: i64 = env.warehouse.scalar("SELECT count(*) FROM transcripts", &[]);
    assert!(finished > 50, "{finished} finished recordings");
    let image = env.warehouse.disk_image();
    for link in ["media.charthero.test", "?token="] {
        assert!(!holds(&image, link), "{link} is on the warehouse's disk");
        assert_eq!(env.warehouse.rows_holding(link), Vec::<String>::new());
    }

    let all = all_history(&config);
    assert_eq!(listed_again(&env, &config, all).await, (0, 300, 0));

    // A warehouse an earlier release wrote holds the links: listing the records again takes
    // them out, and nothing is fetched again.
    let stored_by_an_earlier_release = "https://media.charthero.test/earlier.wav?token=0ff1ce";
    env.warehouse.execute(&format!(
        "UPDATE encounters SET content_hash = 'an earlier release', raw_json = {}",
        env.warehouse.pick(
            &format!("json_set(raw_json, '$.audio_url', '{stored_by_an_earlier_release}')"),
            &format!(
                "(raw_json::jsonb || jsonb_build_object('audio_url', '{stored_by_an_earlier_release}'))::text"
            ),
        )
    ));
    assert_eq!(env.warehouse.rows_holding("0ff1ce").len(), 1);
    assert_eq!(listed_again(&env, &config, all).await, (0, 300, 0));
    assert_eq!(env.warehouse.rows_holding("0ff1ce"), Vec::<String>::new());

    let changed = env.sim.snapshot()[11].encounter_id.clone();
    env.sim.update_status(&changed, "amended");
    assert_eq!(listed_again(&env, &config, all).await.0, 1);
    assert_content_equal(&env);
}

both_backends!(
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    a_server_limit_below_the_configured_rate_costs_few_rejected_requests
);
/// ChartHero does not document its rate limit, so an operator may configure more than the
/// server grants. Every request it answers 429 is a request spent for nothing: the key's rate
/// comes down to what the server takes after the first ones, and the sync still completes.
async fn a_server_limit_below_the_configured_rate_costs_few_rejected_requests(backend: Backend) {
    let env = TestEnv::start_on(backend, sim_options(94, 150)).await;
    env.sim.set_rate_limit(Some(RateLimit {
        requests_per_second: 40.0,
        burst: 2,
        enforce: true,
    }));
    let mut raw = env.raw_config();
    raw.limits.requests_per_second = 120.0;
    raw.limits.burst = 5;
    raw.limits.max_in_flight = 4;
    let config = raw.validate().unwrap();
    let report = env.sync(&config, CyclePlan::full(None, false)).await;
    assert!(report.is_complete(), "{report:?}");
    assert_content_equal(&env);
    let stats = env.sim.stats();
    // Without the key's rate following the refusals, 15 % of the requests were refused (at 20
    // a second with 60 configured; 3.6 % with it, 2.1 % here).
    let rejected = stats.status(429);
    assert!(
        rejected * 20 <= stats.requests,
        "{rejected} of {} requests answered 429",
        stats.requests
    );
}

/// A backfill of everything since `sync.start_at`: a reconcile that lists every record again.
fn all_history(config: &charthero_sync::config::Config) -> charthero_sync::sync::BackfillRange {
    charthero_sync::sync::BackfillRange {
        start: config.sync.start_at,
        end: OffsetDateTime::now_utc(),
    }
}

/// The default organization's content queue and the text report, as `status` shows them now.
fn queue_now(config: &charthero_sync::config::Config) -> (charthero_sync::status::Queue, String) {
    crate::support::off_runtime(|| {
        let warehouse = charthero_sync::store::open_reader(&config.database).unwrap();
        let now = OffsetDateTime::now_utc();
        let mut status =
            charthero_sync::status::read(warehouse.as_ref(), now, &["default".to_owned()]).unwrap();
        let report = status.render();
        (status.organizations.swap_remove(0).queue, report)
    })
}

both_backends!(
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    a_note_the_document_route_does_not_find_while_its_encounter_is_listed_arrives_on_the_schedule
);
/// A document route that lags the list (a replica, a search index filled first) answers 404
/// `encounter_not_found` for notes the list already shows. Before, each such note was marked
/// unavailable and its text missing until its encounter changed; now it is asked again after
/// 1 min, 5 min, 15 min, 1 h and 6 h, one request each, and arrives. A lasting 404 ends as
/// unavailable, as the contract says, and a change of the encounter asks once more.
async fn a_note_the_document_route_does_not_find_while_its_encounter_is_listed_arrives_on_the_schedule(
    backend: Backend,
) {
    // Notes only beside ambient documents, so that every "not found" lands on a note.
    let options = charthero_sim::SimOptions {
        unsupported_doc_every: 0,
        ..sim_options(96, 80)
    };
    let env = TestEnv::start_on(backend, options).await;
    env.sim.push_fault(FaultRule {
        route: Some(SimRoute::Document),
        skip: 0,
        times: 5,
        fault: Fault::status(404, "encounter_not_found"),
    });
    let config = env.config();
    let report = env.sync(&config, CyclePlan::full(None, false)).await;
    assert!(report.is_complete(), "{report:?}");
    let notes = |env: &TestEnv, state: &str| -> i64 {
        env.warehouse.scalar(
            "SELECT count(*) FROM documents WHERE schema_type = 'document' AND detail_state = ?1",
            &[&state],
        )
    };
    assert_eq!((notes(&env, "not_ready"), notes(&env, "unavailable")), (5, 0));
    let texts_missing = |env: &TestEnv| -> i64 {
        env.warehouse.scalar(
            "SELECT count(*) FROM documents WHERE schema_type = 'document' AND content_text IS NULL",
            &[],
        )
    };
    assert_eq!(texts_missing(&env), 5);
    let (queue, report) = queue_now(&config);
    assert_eq!(queue.notes_not_ready, 5, "{report}");
    assert!(
        report.contains("queue: 0 documents (5 not found yet)"),
        "{report}"
    );
    // Not due yet: the next cycle asks nothing.
    env.sim.reset_stats();
    let early = env.sync(&config, CyclePlan::full(None, false)).await;
    assert_eq!(env.sim.stats().route(SimRoute::Document), 0, "{early:?}");
    // The first minute has passed; the route has caught up with three of them.
    env.warehouse
        .execute("UPDATE documents SET detail_next_at_ns = 0 WHERE detail_state = 'not_ready'");
    env.sim.push_fault(FaultRule {
        route: Some(SimRoute::Document),
        skip: 0,
        times: 2,
        fault: Fault::status(404, "encounter_not_found"),
    });
    env.sim.reset_stats();
    let again = env.sync(&config, CyclePlan::full(None, false)).await;
    assert_eq!(again.counts.documents_fetched, 3, "{again:?}");
    assert_eq!(env.sim.stats().route(SimRoute::Document), 5);
    assert_eq!((notes(&env, "not_ready"), texts_missing(&env)), (2, 2));
    let attempts: i64 = env.warehouse.scalar(
        "SELECT min(detail_attempts) FROM documents WHERE detail_state = 'not_ready'",
        &[],
    );
    assert_eq!(attempts, 2);
    // The schedule runs out with the route still saying "not found": unavailable, asked no more.
    for _ in 0..4 {
        env.warehouse
            .execute("UPDATE documents SET detail_next_at_ns = 0 WHERE detail_state = 'not_ready'");
        env.sim.push_fault(FaultRule {
            route: Some(SimRoute::Document),
            skip: 0,
            times: 2,
            fault: Fault::status(404, "encounter_not_found"),
        });
        env.sync(&config, CyclePlan::full(None, false)).await;
    }
    assert_eq!((notes(&env, "not_ready"), notes(&env, "unavailable")), (0, 2));
    env.sim.reset_stats();
    env.sync(&config, CyclePlan::full(None, false)).await;
    assert_eq!(env.sim.stats().route(SimRoute::Document), 0);
    // A change of the encounter asks the note again, and it arrives.
    let missing: Vec<String> = env.warehouse.column(
        "SELECT encounter_id FROM documents WHERE detail_state = 'unavailable' ORDER BY 1",
        &[],
    );
    for encounter_id in &missing {
        env.sim.update_status(encounter_id, "signed");
    }
    // One request per note of each changed encounter (docs/content.md), the two included.
    let notes_of_changed: i64 = env.warehouse.scalar(
        "SELECT count(*) FROM documents WHERE schema_type = 'document' AND removed_at IS NULL
            AND encounter_id IN (SELECT encounter_id FROM documents WHERE detail_state = 'unavailable')",
        &[],
    );
    assert!(notes_of_changed >= 2);
    let all = all_history(&config);
    env.sim.reset_stats();
    env.sync(&config, CyclePlan::full(Some(all), false)).await;
    assert_eq!(env.sim.stats().route(SimRoute::Document) as i64, notes_of_changed);
    assert_eq!(notes(&env, "unavailable"), 0);
    assert_content_equal(&env);
}

both_backends!(
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    a_recording_the_audio_route_does_not_find_yet_arrives_on_the_schedule
);
/// A recording is processed after its transcript: an audio route asked for a final document's
/// recording may answer 404 before it is stored. Before, the recording was marked unavailable
/// and never asked again; now it waits on the not-ready schedule and arrives, and one still not
/// found when the schedule ran out is asked again once its document changes.
async fn a_recording_the_audio_route_does_not_find_yet_arrives_on_the_schedule(backend: Backend) {
    let env = TestEnv::start_on(backend, sim_options(97, 60)).await;
    let mut raw = env.raw_config();
    raw.audio.enabled = true;
    raw.audio.directory = env.dir.path().join("audio");
    let config = raw.validate().unwrap();
    let not_found = |times| FaultRule {
        route: Some(SimRoute::Audio),
        skip: 0,
        times,
        fault: Fault::status(404, "encounter_not_found"),
    };
    env.sim.push_fault(not_found(4));
    let report = env.sync(&config, CyclePlan::full(None, false)).await;
    assert!(report.is_complete(), "{report:?}");
    let recordings = |env: &TestEnv, state: &str| -> i64 {
        env.warehouse
            .scalar("SELECT count(*) FROM documents WHERE audio_state = ?1", &[&state])
    };
    let transcripts: i64 = env.warehouse.scalar("SELECT count(*) FROM transcripts", &[]);
    assert!(transcripts > 4, "{transcripts}");
    assert_eq!(
        (
            recordings(&env, "not_ready"),
            recordings(&env, "unavailable"),
            recordings(&env, "done")
        ),
        (4, 0, transcripts - 4)
    );
    let (queue, report) = queue_now(&config);
    assert_eq!(queue.recordings_not_ready, 4, "{report}");
    assert!(report.contains("0 recordings (4 not found yet)"), "{report}");
    // Not due yet: nothing is asked.
    env.sim.reset_stats();
    env.sync(&config, CyclePlan::full(None, false)).await;
    assert_eq!(env.sim.stats().route(SimRoute::Audio), 0);
    // Due; three are stored by now, one is still not found, and then never found while its
    // schedule lasts.
    let due = |env: &TestEnv| {
        env.warehouse
            .execute("UPDATE documents SET audio_next_at_ns = 0 WHERE audio_state = 'not_ready'");
    };
    due(&env);
    env.sim.push_fault(not_found(1));
    env.sim.reset_stats();
    let again = env.sync(&config, CyclePlan::full(None, false)).await;
    assert_eq!(again.counts.recordings_fetched, 3, "{again:?}");
    assert_eq!(env.sim.stats().route(SimRoute::Audio), 4);
    for _ in 0..4 {
        due(&env);
        env.sim.push_fault(not_found(1));
        env.sync(&config, CyclePlan::full(None, false)).await;
    }
    assert_eq!(
        (recordings(&env, "not_ready"), recordings(&env, "unavailable")),
        (0, 1)
    );
    env.sim.reset_stats();
    env.sync(&config, CyclePlan::full(None, false)).await;
    assert_eq!(env.sim.stats().route(SimRoute::Audio), 0);
    // Its document changes (the vendor re-processed the recording): asked again, and stored.
    let (encounter_id, document_id): (String, String) = env.warehouse.row(
        "SELECT encounter_id, document_id FROM documents WHERE audio_state = 'unavailable'",
        &[],
    );
    env.sim.finalize_transcript(&encounter_id, &document_id);
    let all = all_history(&config);
    env.sim.reset_stats();
    let report = env.sync(&config, CyclePlan::full(Some(all), false)).await;
    assert!(report.is_complete(), "{report:?}");
    assert_eq!(env.sim.stats().route(SimRoute::Audio), 1);
    assert_eq!(recordings(&env, "done"), transcripts);
    let stored: i64 = env.warehouse.scalar("SELECT count(*) FROM recordings", &[]);
    assert_eq!(stored, transcripts);
}

both_backends!(
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    a_transcript_answered_encounter_not_found_while_its_encounter_is_listed_arrives_on_the_schedule
);
/// What an unfinished transcript answers is not documented, and the one 404 the contract names
/// is `encounter_not_found`: a server may answer it for a transcript not generated yet although
/// its document reads final. The encounter is live in the list, so the transcript is "not
/// ready" and asked again on the schedule, never marked unavailable (which would lose it until
/// the encounter changes).
async fn a_transcript_answered_encounter_not_found_while_its_encounter_is_listed_arrives_on_the_schedule(
    backend: Backend,
) {
    let env = TestEnv::start_on(backend, sim_options(95, 80)).await;
    env.sim.push_fault(FaultRule {
        route: Some(SimRoute::Transcript),
        skip: 0,
        times: 5,
        fault: Fault::status(404, "encounter_not_found"),
    });
    let config = env.config();
    let report = env.sync(&config, CyclePlan::full(None, false)).await;
    assert!(report.is_complete(), "{report:?}");
    let states = |env: &TestEnv| -> (i64, i64) {
        env.warehouse.row(
            "SELECT (SELECT count(*) FROM documents WHERE transcript_state = 'not_ready'),
                    (SELECT count(*) FROM documents WHERE transcript_state = 'unavailable')",
            &[],
        )
    };
    assert_eq!(states(&env), (5, 0));
    // The schedule's first minute has passed.
    env.warehouse
        .execute("UPDATE documents SET transcript_next_at_ns = 0 WHERE transcript_state = 'not_ready'");
    env.sim.reset_stats();
    let again = env.sync(&config, CyclePlan::full(None, false)).await;
    assert_eq!(again.counts.transcripts_fetched, 5, "{again:?}");
    assert_eq!(env.sim.stats().route(SimRoute::Transcript), 5);
    assert_eq!(states(&env), (0, 0));
    assert_content_equal(&env);
}
