//! The daemon as systemd runs it: the real binary, signals, the writer lock, the backfill
//! queue, `status --json`, `check`, sd_notify, and logs searched for secrets and PHI. The
//! backfill, resume and audit tests run on SQLite and on PostgreSQL.

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use charthero_sim::{ALL_SCOPES, Route as SimRoute};
use charthero_sync::timefmt::format_utc;
use time::OffsetDateTime;

use crate::support::{
    Backend, ENCOUNTERS_ONLY, TestEnv, Warehouse, both_backends, compare, reader, run, text, wait_exit,
    wait_for,
};

fn bin(config: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_charthero-sync"));
    cmd.arg("--config")
        .arg(config)
        .env_remove("CHARTHERO_API_KEY")
        .env_remove("CREDENTIALS_DIRECTORY")
        .env_remove("NOTIFY_SOCKET")
        .env_remove("WATCHDOG_USEC")
        .env("RUST_LOG", "warn");
    cmd
}

fn spawn(mut cmd: Command) -> Child {
    cmd.stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap()
}

pub(crate) fn signal(child: &Child, sig: &str) {
    let status = Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

fn backfill_state(db: &Warehouse) -> Option<(String, Option<String>)> {
    if !db.has_table("backfills") {
        return None;
    }
    db.rows(
        "SELECT status, cursor FROM backfills ORDER BY backfill_id DESC LIMIT 1",
        &[],
    )
    .pop()
}

/// Whether the daemon has finished at least `n` cycles.
fn succeeded_runs(db: &Warehouse, n: i64) -> bool {
    db.has_table("sync_runs")
        && db.scalar::<i64>("SELECT count(*) FROM sync_runs WHERE outcome = 'succeeded'", &[]) >= n
}

/// A config whose live range is empty (start_at = now), so the work is the backfill, at a rate
/// that makes a 20,000-encounter backfill last several seconds.
fn backfill_config(env: &TestEnv, rps: u32) -> std::path::PathBuf {
    let path = env.write_config_file(ENCOUNTERS_ONLY);
    let text = std::fs::read_to_string(&path).unwrap();
    let start_line = text
        .lines()
        .find(|l| l.starts_with("start_at"))
        .unwrap()
        .to_owned();
    let text = text
        .replace(
            &start_line,
            &format!("start_at = \"{}\"", format_utc(OffsetDateTime::now_utc())),
        )
        .replace(
            "requests_per_second = 2000.0",
            &format!("requests_per_second = {rps}.0"),
        );
    std::fs::write(&path, text).unwrap();
    path
}

both_backends!(
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    sigterm_mid_backfill_exits_promptly_and_a_restart_resumes_to_equality
);
async fn sigterm_mid_backfill_exits_promptly_and_a_restart_resumes_to_equality(backend: Backend) {
    let env = TestEnv::with_encounters_on(backend, 51, 20_000).await;
    env.write_key_file(&env.sim.api_key());
    let config = backfill_config(&env, 100);
    let from = format_utc(OffsetDateTime::now_utc() - time::Duration::days(61));
    let db = &env.warehouse;
    let mut daemon = bin(&config);
    daemon.args(["run", "--backfill-from", &from]);
    let mut child = spawn(daemon);
    wait_for("the backfill's first cursor", Duration::from_secs(60), || {
        backfill_state(db).is_some_and(|(_, cursor)| cursor.is_some())
    })
    .await;

    // While it runs, a second writer is refused, naming the holder.
    let mut second = bin(&config);
    second.arg("sync");
    let out = run(second).await;
    assert_eq!(out.status.code(), Some(4), "{}", text(&out));
    assert!(text(&out).contains("charthero-sync run"), "{}", text(&out));

    signal(&child, "-TERM");
    let stopping = Instant::now();
    let code = wait_exit("the daemon after SIGTERM", &mut child, Duration::from_secs(10)).await;
    let took = stopping.elapsed();
    assert_eq!(code, Some(0));
    assert!(took < Duration::from_secs(10), "{took:?}");
    if let Some(path) = db.sqlite_path() {
        let integrity: String = reader(path)
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))
            .unwrap();
        assert_eq!(integrity, "ok");
    }
    let (status, _) = backfill_state(db).unwrap();
    assert_eq!(
        status, "running",
        "an interrupted backfill stays queued to resume"
    );
    let mut status = bin(&config);
    status.args(["status", "--json"]);
    let out = run(status).await;
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        json["organizations"][0]["state"], "interrupted",
        "a run stopped by SIGTERM is no failure: {json:#}"
    );

    let mut again = bin(&config);
    again.arg("run");
    let mut child = spawn(again);
    wait_for(
        "the resumed backfill's completion",
        Duration::from_secs(120),
        || backfill_state(db).is_some_and(|(s, _)| s == "completed"),
    )
    .await;
    signal(&child, "-TERM");
    let code = wait_exit("the daemon after SIGTERM", &mut child, Duration::from_secs(10)).await;
    assert_eq!(code, Some(0));
    compare(&env.sim, db).assert_empty();
    let backfills: i64 = db.scalar("SELECT count(*) FROM backfills", &[]);
    assert_eq!(backfills, 1, "the restart resumed the same backfill");
}

both_backends!(
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    a_queued_backfill_is_picked_up_by_the_running_daemon_and_shows_progress
);
async fn a_queued_backfill_is_picked_up_by_the_running_daemon_and_shows_progress(backend: Backend) {
    let env = TestEnv::with_encounters_on(backend, 52, 15_000).await;
    env.write_key_file(&env.sim.api_key());
    let config = backfill_config(&env, 25);
    let db = &env.warehouse;
    let mut daemon = bin(&config);
    daemon.arg("run");
    let mut child = spawn(daemon);
    wait_for("the first cycle", Duration::from_secs(30), || {
        succeeded_runs(db, 1)
    })
    .await;

    let mut queue = bin(&config);
    queue.args([
        "backfill",
        "--from",
        &format_utc(OffsetDateTime::now_utc() - time::Duration::days(61)),
    ]);
    let out = run(queue).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(text(&out).contains("queued backfill 1"), "{}", text(&out));

    let mut seen_progress = false;
    let started = Instant::now();
    loop {
        let mut status = bin(&config);
        status.args(["status", "--json"]);
        let out = run(status).await;
        assert_eq!(out.status.code(), Some(0), "{}", text(&out));
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let b = &json["backfills"][0];
        let progress = b["progress"].as_f64().unwrap_or(0.0);
        if b["status"] == "running" && progress > 0.0 && progress < 1.0 {
            seen_progress = true;
            // 15,000 list-only encounters at 25 req/s take about 6 s in all.
            let eta = b["eta_seconds"].as_f64().unwrap_or(f64::NAN);
            assert!((0.0..=20.0).contains(&eta), "ETA {eta} s: {b}");
        }
        if b["status"] == "completed" {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(90),
            "the backfill did not complete: {json}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        seen_progress,
        "status --json never showed the backfill in progress"
    );
    signal(&child, "-TERM");
    wait_exit("the daemon after SIGTERM", &mut child, Duration::from_secs(10)).await;
    compare(&env.sim, db).assert_empty();
}

both_backends!(
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    a_daemon_paused_by_charthero_starts_no_cycle_until_the_pause_is_over
);
/// A `Retry-After` longer than a request waits (an hourly quota, say) holds the daemon's cycles
/// until it is over: on an every-second schedule, one request answered 429 and one failed cycle,
/// not one per tick; one warning naming the time; `status` shows the pause; SIGTERM still stops
/// the daemon at once.
async fn a_daemon_paused_by_charthero_starts_no_cycle_until_the_pause_is_over(backend: Backend) {
    let env = TestEnv::with_encounters_on(backend, 54, 300).await;
    env.write_key_file(&env.sim.api_key());
    let config = env.write_config_file(ENCOUNTERS_ONLY);
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        text.replace(
            "settle_lag = \"0s\"\n",
            "settle_lag = \"0s\"\nschedule = \"* * * * * *\"\n",
        ),
    )
    .unwrap();
    crate::support::quota_on_the_next_list_request(&env.sim);
    let db = &env.warehouse;
    let mut daemon = bin(&config);
    daemon.arg("run");
    let mut child = spawn(daemon);
    wait_for("the paused cycle", Duration::from_secs(30), || {
        db.has_table("sync_runs")
            && db.scalar::<i64>("SELECT count(*) FROM sync_runs WHERE outcome = 'failed'", &[]) == 1
    })
    .await;
    // Four ticks of the schedule.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(env.sim.stats().route(SimRoute::List), 1);
    assert_eq!(db.scalar::<i64>("SELECT count(*) FROM sync_runs", &[]), 1);
    let mut status = bin(&config);
    status.args(["status", "--json"]);
    let out = run(status).await;
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(json["organizations"][0]["paused_until"].is_string(), "{json}");
    signal(&child, "-TERM");
    wait_exit(
        "the paused daemon after SIGTERM",
        &mut child,
        Duration::from_secs(10),
    )
    .await;
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert_eq!(
        stderr.matches("the next cycle starts then").count(),
        1,
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sd_notify_says_ready_then_watchdog_then_stopping_and_metrics_are_served() {
    let env = TestEnv::with_encounters(53, 200).await;
    env.write_key_file(&env.sim.api_key());
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = env.write_config_file(&format!("\n[metrics]\nlisten = \"127.0.0.1:{port}\"\n"));
    let socket_path = env.dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut daemon = bin(&config);
    daemon
        .arg("run")
        .env("NOTIFY_SOCKET", &socket_path)
        .env("WATCHDOG_USEC", "600000");
    let mut child = spawn(daemon);
    let mut messages = Vec::new();
    let mut buf = [0u8; 4096];
    let started = Instant::now();
    while !messages.iter().any(|m: &String| m.contains("WATCHDOG=1")) {
        let n = socket.recv(&mut buf).expect("a notification");
        messages.push(String::from_utf8_lossy(&buf[..n]).to_string());
        assert!(started.elapsed() < Duration::from_secs(20));
    }
    assert!(messages[0].starts_with("READY=1"), "{messages:?}");
    let db = env.db_path();
    wait_for("a succeeded run", Duration::from_secs(20), || {
        reader(&db)
            .query_row(
                "SELECT count(*) FROM sync_runs WHERE outcome = 'succeeded'",
                [],
                |r| r.get::<_, i64>(0),
            )
            .is_ok_and(|n| n > 0)
    })
    .await;
    let scrape = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await
        .unwrap();
    assert_eq!(scrape.status(), 200);
    let metrics = String::from_utf8(scrape.bytes().await.unwrap().to_vec()).unwrap();
    for needle in [
        "charthero_sync_requests_total{organization=\"default\",route=\"list_encounters\",status=\"200\"}",
        "charthero_sync_cycles_total{organization=\"default\",outcome=\"succeeded\"} 1",
        "charthero_sync_lag_seconds{organization=\"default\"} ",
        "charthero_sync_dead_letters{organization=\"default\"} 0\n",
        "charthero_sync_rate_limiter_wait_seconds_total{organization=\"default\"} ",
    ] {
        assert!(metrics.contains(needle), "{needle} missing from:\n{metrics}");
    }
    signal(&child, "-TERM");
    let code = wait_exit("the daemon after SIGTERM", &mut child, Duration::from_secs(10)).await;
    assert_eq!(code, Some(0));
    let mut stopping = false;
    socket.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
    while let Ok(n) = socket.recv(&mut buf) {
        stopping |= String::from_utf8_lossy(&buf[..n]).contains("STOPPING=1");
    }
    assert!(stopping, "no STOPPING=1 after SIGTERM");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_passes_with_a_full_key_and_names_a_missing_recordings_scope() {
    let env = TestEnv::with_encounters(54, 20).await;
    env.write_key_file(&env.sim.api_key());
    let audio = format!(
        "\n[audio]\nenabled = true\ndirectory = \"{}\"\n",
        env.dir.path().join("audio").display()
    );
    let config = env.write_config_file(&audio);
    let mut check = bin(&config);
    check.arg("check");
    let out = run(check).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(
        text(&out).contains("everything this configuration needs works"),
        "{}",
        text(&out)
    );
    assert_eq!(env.sim.stats().route(charthero_sim::Route::Audio), 1);
    assert_eq!(env.sim.stats().media, 0, "check never downloads anything");

    env.sim.add_key(
        "ch_sk_no_recordings",
        &["encounters:read", "patients:read", "documents:read"],
    );
    env.write_key_file("ch_sk_no_recordings");
    let mut check = bin(&config);
    check.arg("check");
    let out = run(check).await;
    let all = text(&out);
    assert_eq!(out.status.code(), Some(1), "{all}");
    let audio_line = all.lines().find(|l| l.starts_with("audio ")).unwrap();
    assert!(
        audio_line.contains("FAILED") && audio_line.contains("missing_scope"),
        "{all}"
    );
    assert!(audio_line.contains("recordings:read"), "{all}");
    for route in ["list_encounters", "encounter", "document", "transcript"] {
        let line = all.lines().find(|l| l.starts_with(route)).unwrap();
        assert!(line.contains(" ok "), "{all}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_sync_at_trace_level_logs_no_key_names_transcript_text_or_signed_urls() {
    let env = TestEnv::with_encounters(55, 120).await;
    let canary_key = "ch_sk_canary_4b1d";
    env.sim.add_key(canary_key, &ALL_SCOPES);
    env.write_key_file(canary_key);
    let audio = format!(
        "\n[audio]\nenabled = true\ndirectory = \"{}\"\n",
        env.dir.path().join("audio").display()
    );
    let config = env.write_config_file(&audio);
    for format in ["text", "json"] {
        // Each format gets a full sync from an empty warehouse.
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", env.db_path().display()));
        }
        let mut sync = bin(&config);
        sync.arg("sync")
            .env("RUST_LOG", "trace")
            .env("CHARTHERO_LOG_FORMAT", format);
        let out = run(sync).await;
        let all = text(&out);
        assert_eq!(out.status.code(), Some(0), "{all}");
        assert!(all.len() > 10_000, "trace logging produced almost nothing: {all}");
        assert!(!all.contains("canary"), "the API key leaked");
        assert!(
            !all.contains("/media/") && !all.contains("token="),
            "a signed URL leaked"
        );
        let snapshot = env.sim.snapshot();
        for e in &snapshot {
            if let (Some(first), Some(last)) = (&e.patient.first_name, &e.patient.last_name) {
                assert!(!all.contains(&format!("{first} {last}")), "a patient name leaked");
            }
            for d in &e.documents {
                if let Some(t) = env.sim.transcript(&e.encounter_id, &d.document_id) {
                    let sentence = t.turns.iter().map(|t| t.text.as_str()).find(|s| s.len() > 30);
                    if let Some(s) = sentence {
                        assert!(!all.contains(s), "transcript text leaked");
                    }
                }
                if let Some(note) = env.sim.note_text(&e.encounter_id, &d.document_id) {
                    let line = note.lines().find(|l| l.len() > 30).unwrap_or("");
                    assert!(line.is_empty() || !all.contains(line), "note text leaked");
                }
            }
        }
    }
}

both_backends!(
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    the_daemon_audits_history_between_live_cycles_and_finds_changes_weeks_back
);
async fn the_daemon_audits_history_between_live_cycles_and_finds_changes_weeks_back(backend: Backend) {
    let env = TestEnv::with_encounters_on(backend, 53, 3_000).await;
    env.write_key_file(&env.sim.api_key());
    // Deep revisit off and a long schedule: only the audit can see changes 10 days back.
    let config = env.write_config_file(ENCOUNTERS_ONLY);
    let text = std::fs::read_to_string(&config).unwrap().replacen(
        "[sync]\n",
        "[sync]\nschedule = \"0 0 0 1 1 *\"\nrevisit_deep = \"0s\"\naudit_every = \"2s\"\n",
        1,
    );
    std::fs::write(&config, text).unwrap();
    let db = &env.warehouse;
    let mut daemon = bin(&config);
    daemon.arg("run");
    let mut child = spawn(daemon);
    wait_for("the first cycle", Duration::from_secs(60), || {
        succeeded_runs(db, 1)
    })
    .await;
    let now = OffsetDateTime::now_utc();
    let backdated = env
        .sim
        .insert(charthero_sim::NewEncounter::at(now - time::Duration::days(10)));
    let old = env
        .sim
        .snapshot()
        .into_iter()
        .find(|e| e.created_at < now - time::Duration::days(12))
        .unwrap()
        .encounter_id;
    env.sim.remove(&old);
    wait_for(
        "the audit's repair of a backdated and a removed encounter",
        Duration::from_secs(60),
        || {
            let (added, removed, audited): (i64, i64, i64) = db.row(
                "SELECT (SELECT count(*) FROM encounters WHERE encounter_id = ?1),
                    (SELECT count(*) FROM encounters WHERE encounter_id = ?2 AND removed_at IS NOT NULL),
                    (SELECT count(*) FROM audits WHERE status = 'completed')",
                &[&backdated, &old],
            );
            added == 1 && removed == 1 && audited >= 1
        },
    )
    .await;
    signal(&child, "-TERM");
    let code = wait_exit("the daemon after SIGTERM", &mut child, Duration::from_secs(10)).await;
    assert_eq!(code, Some(0));
    compare(&env.sim, db).assert_empty();
    // status reports the audit.
    let mut status = bin(&config);
    status.args(["status", "--json"]);
    let out = run(status).await;
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(json["audit"]["audit_id"].as_i64().is_some(), "{json}");
}

both_backends!(
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    a_first_sync_shows_in_status_while_it_runs_and_as_interrupted_once_its_process_is_gone
);
/// An operator watching a clinic's first sync: `status` says `syncing`, the running cycle's
/// counters grow, and what is left (the content queue here) comes with an ETA at the configured
/// rate. Killed with SIGKILL (no chance to record anything), the cycle reads as running while
/// its progress is fresh, then, its writer lock no longer renewed, as `interrupted` after
/// `GONE_AFTER`; the next `sync` marks it aborted and completes the warehouse.
async fn a_first_sync_shows_in_status_while_it_runs_and_as_interrupted_once_its_process_is_gone(
    backend: Backend,
) {
    let env = TestEnv::with_encounters_on(backend, 57, 200).await;
    env.write_key_file(&env.sim.api_key());
    let path = env.write_config_file("");
    let fast = std::fs::read_to_string(&path).unwrap();
    // About 500 content requests: some 8 s at 60 requests a second.
    let slow = fast.replace("requests_per_second = 2000.0", "requests_per_second = 60.0");
    std::fs::write(&path, &slow).unwrap();
    let status_json = || async {
        let mut status = bin(&path);
        status.args(["status", "--json"]);
        let out = run(status).await;
        assert_eq!(out.status.code(), Some(0), "{}", text(&out));
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    let mut sync = bin(&path);
    sync.arg("sync");
    let mut child = spawn(sync);

    let started = Instant::now();
    let json = loop {
        let json = status_json().await;
        let o = &json["organizations"][0];
        if o["running_cycle"]["progress_at"].is_string()
            && json["runs"][0]["documents_fetched"].as_i64() > Some(0)
        {
            break json;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "status never showed the first cycle's progress: {json:#}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let o = &json["organizations"][0];
    assert_eq!(o["state"], "syncing", "{o:#}");
    assert_eq!(o["last_run"], serde_json::Value::Null, "{o:#}");
    assert_eq!(o["running_cycle"]["stalled"], false, "{o:#}");
    assert_eq!(json["runs"][0]["outcome"], "running");
    assert_eq!(json["runs"][0]["encounters_new"], 200, "{:#}", json["runs"][0]);
    let pending = o["content_requests_pending"].as_i64().unwrap();
    assert_eq!(
        pending,
        o["queue"]["documents_pending"].as_i64().unwrap()
            + o["queue"]["transcripts_pending"].as_i64().unwrap(),
        "{o:#}"
    );
    assert!(pending > 100, "the content had barely started: {o:#}");
    // Listing is done (the live range ends at the first cycle's start); the rest is the queue.
    assert_eq!(o["encounters_unlisted_estimate"], 0, "{o:#}");
    let eta = o["eta_seconds"].as_f64().unwrap();
    assert!(
        (eta - pending as f64 / 60.0).abs() < 1e-6,
        "ETA {eta} s for {pending} requests"
    );

    signal(&child, "-KILL");
    wait_exit("the killed sync", &mut child, Duration::from_secs(10)).await;
    let json = status_json().await;
    let o = &json["organizations"][0];
    assert_eq!(
        (&o["state"], &o["running_cycle"]["stalled"]),
        (&serde_json::json!("syncing"), &serde_json::json!(false)),
        "a cycle that wrote its progress seconds ago is taken to be at work: {o:#}"
    );
    // Once its last progress is GONE_AFTER old, a holder of the writer lock that no longer
    // renews it (SQLite: the lock file untouched; PostgreSQL: no session holds the lock) is gone.
    let gone_after = Duration::from_secs(charthero_sync::status::GONE_AFTER.whole_seconds().unsigned_abs());
    tokio::time::sleep(gone_after + Duration::from_secs(1)).await;
    let json = status_json().await;
    let o = &json["organizations"][0];
    assert_eq!(
        (&o["state"], &o["running_cycle"]["stalled"]),
        (&serde_json::json!("interrupted"), &serde_json::json!(true)),
        "{o:#}"
    );
    let mut text_status = bin(&path);
    text_status.arg("status");
    let report = text(&run(text_status).await);
    assert!(report.contains("no progress since"), "{report}");

    std::fs::write(&path, &fast).unwrap();
    let mut again = bin(&path);
    again.arg("sync");
    let out = run(again).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let json = status_json().await;
    let o = &json["organizations"][0];
    assert_eq!(o["state"], "ok", "{o:#}");
    assert_eq!(o["running_cycle"], serde_json::Value::Null, "{o:#}");
    assert_eq!(o["eta_seconds"], serde_json::Value::Null, "{o:#}");
    let outcomes: Vec<&str> = json["runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["outcome"].as_str().unwrap())
        .collect();
    assert_eq!(outcomes, ["succeeded", "aborted"]);
    compare(&env.sim, &env.warehouse).assert_empty();
    assert_eq!(
        crate::support::compare_content(&env.sim, &env.warehouse),
        Vec::<String>::new()
    );
}
