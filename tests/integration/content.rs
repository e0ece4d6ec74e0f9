//! Notes, transcripts and recordings: fetched completely, byte for byte, politely (never above
//! the configured rate, retries included), through every fault the upstream can throw.

use std::time::Duration;

use charthero_sim::{
    DocKind, Fault, FaultRule, KeyState, NewEncounter, RateLimit, Route as SimRoute, SimOptions,
};
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

use crate::support::{TestEnv, compare, compare_content, reader, sim_options};

fn assert_content_equal(env: &TestEnv) {
    compare(&env.sim, &env.db_path()).assert_empty();
    let bad = compare_content(&env.sim, &env.db_path());
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unicode_and_a_two_megabyte_transcript_round_trip_byte_for_byte() {
    let env = TestEnv::start(SimOptions {
        large_transcript_every: 25,
        unicode_every: 2,
        ..sim_options(21, 300)
    })
    .await;
    let report =
        charthero_sync::sync_once(&env.config(), &env.key(), "test", None, &CancellationToken::new())
            .await
            .unwrap();
    assert!(report.is_complete(), "{report:?}");
    assert_content_equal(&env);
    let conn = reader(&env.db_path());
    let (largest, exotic): (i64, i64) = conn
        .query_row(
            "SELECT (SELECT max(total) FROM (SELECT sum(length(CAST(text AS BLOB))) AS total
                                             FROM transcript_turns GROUP BY document_id)),
                    (SELECT count(*) FROM transcript_turns
                     WHERE text LIKE '%👩‍⚕️%' OR text GLOB '*[一-龥]*' OR text LIKE '%é%')",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert!(
        largest > 1_900_000,
        "the largest transcript has only {largest} bytes"
    );
    assert!(
        exotic > 0,
        "no emoji, CJK or combining marks reached the warehouse"
    );
    let unsupported: i64 = conn
        .query_row(
            "SELECT count(*) FROM documents WHERE detail_state = 'unsupported'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert!(
        unsupported > 0,
        "the dataset should hold unsupported document types"
    );
}

/// Each fault, at several positions of each route, during one full content sync.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fault_matrix_ends_equal_with_no_rate_violations() {
    let env = TestEnv::with_encounters(22, 400).await;
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
    let report = charthero_sync::sync_once(&config, &env.key(), "test", None, &CancellationToken::new())
        .await
        .unwrap();
    let stats = env.sim.stats();
    assert_eq!(stats.faults_injected, 30, "every fault fired: {stats:?}");
    assert!(report.counts.retries >= 20, "{:?}", report.counts);
    assert!(report.is_complete(), "{report:?}");
    assert_content_equal(&env);
    assert_eq!(
        stats.rate_violations, 0,
        "the client exceeded its own rate limit: {stats:?}"
    );
}

#[tokio::test]
async fn fatal_errors_fail_fast_without_a_retry_storm() {
    let env = TestEnv::with_encounters(23, 200).await;
    env.sim.push_fault(FaultRule {
        route: Some(SimRoute::List),
        skip: 0,
        times: 100,
        fault: Fault::status(400, "unsupported_filter"),
    });
    let err = charthero_sync::sync_once(&env.config(), &env.key(), "test", None, &CancellationToken::new())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("unsupported_filter"), "{err}");
    assert_eq!(
        env.sim.stats().route(SimRoute::List),
        1,
        "a bug in our request is not retried"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_revoked_mid_run_stops_within_one_request_with_exit_code_3() {
    let env = TestEnv::with_encounters(24, 3_000).await;
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
    let conn = reader(&env.db_path());
    let (outcome, reason): (String, String) = conn
        .query_row("SELECT outcome, reason_code FROM sync_runs", [], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .unwrap();
    assert_eq!((outcome.as_str(), reason.as_str()), ("failed", "revoked_key"));
    let integrity: String = conn
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(integrity, "ok");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_recordings_read_audio_is_disabled_and_everything_else_syncs() {
    let env = TestEnv::with_encounters(25, 150).await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recordings_are_stored_by_content_hash_and_the_signed_url_never_is() {
    let env = TestEnv::with_encounters(26, 60).await;
    let mut raw = env.raw_config();
    raw.audio.enabled = true;
    raw.audio.directory = env.dir.path().join("audio");
    let config = raw.validate().unwrap();
    let audio_dir = config.audio.directory.clone();
    let report = charthero_sync::sync_once(&config, &env.key(), "test", None, &CancellationToken::new())
        .await
        .unwrap();
    assert!(report.is_complete(), "{report:?}");
    assert!(report.counts.recordings_fetched > 0);
    let conn = reader(&env.db_path());
    let mut stmt = conn
        .prepare("SELECT path, size_bytes, sha256, duration_seconds FROM recordings")
        .unwrap();
    let rows: Vec<(String, i64, String, Option<f64>)> = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
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
    drop(stmt);
    drop(conn);
    let db = std::fs::read(env.db_path()).unwrap();
    let wal = std::fs::read(env.dir.path().join("warehouse.db-wal")).unwrap_or_default();
    for haystack in [&db, &wal] {
        let text = String::from_utf8_lossy(haystack);
        assert!(!text.contains("token="), "a signed URL was stored");
        assert!(!text.contains("/media/"), "a signed URL was stored");
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transcripts_wait_for_finalization_and_changed_notes_are_fetched_again() {
    let env = TestEnv::with_encounters(27, 0).await;
    let config = env.config();
    let cancel = CancellationToken::new();
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
    charthero_sync::sync_once(&config, &env.key(), "test", None, &cancel)
        .await
        .unwrap();
    assert_eq!(
        env.sim.stats().route(SimRoute::Transcript),
        0,
        "an unfinished transcript is not asked for"
    );
    let state: String = reader(&env.db_path())
        .query_row(
            "SELECT transcript_state FROM documents WHERE document_id = ?1",
            [&docs[0]],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(state, "waiting");

    env.sim.finalize_transcript(&id, &docs[0]);
    env.sim
        .edit_note(&id, &docs[1], "Addendum: follow up in 2 weeks. Ça va ✅");
    env.sim.reset_stats();
    let report = charthero_sync::sync_once(&config, &env.key(), "test", None, &cancel)
        .await
        .unwrap();
    assert_eq!(report.counts.transcripts_fetched, 1);
    assert_eq!(
        env.sim.stats().route(SimRoute::Document),
        2,
        "only the changed encounter's documents"
    );
    assert_content_equal(&env);

    // Nothing changed: the transcript is never fetched twice.
    env.sim.reset_stats();
    charthero_sync::sync_once(&config, &env.key(), "test", None, &cancel)
        .await
        .unwrap();
    let stats = env.sim.stats();
    assert_eq!(
        stats.route(SimRoute::Transcript) + stats.route(SimRoute::Document),
        0,
        "{stats:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn work_that_exhausts_its_retries_is_dead_lettered_and_done_next_cycle() {
    let env = TestEnv::with_encounters(28, 40).await;
    let mut raw = env.raw_config();
    raw.limits.max_attempts = 2;
    let config = raw.validate().unwrap();
    let cancel = CancellationToken::new();
    env.sim.push_fault(FaultRule {
        route: Some(SimRoute::Transcript),
        skip: 0,
        times: 10_000,
        fault: Fault::status(500, "internal_error"),
    });
    let report = charthero_sync::sync_once(&config, &env.key(), "test", None, &cancel)
        .await
        .unwrap();
    assert!(!report.is_complete());
    assert!(report.counts.dead_letters > 0);
    let dead: i64 = reader(&env.db_path())
        .query_row(
            "SELECT count(*) FROM dead_letters WHERE work = 'transcript'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(dead as u64, report.counts.dead_letters);

    env.sim.clear_faults();
    let report = charthero_sync::sync_once(&config, &env.key(), "test", None, &cancel)
        .await
        .unwrap();
    assert!(report.is_complete(), "{report:?}");
    assert_eq!(report.counts.transcripts_fetched as i64, dead);
    let left: i64 = reader(&env.db_path())
        .query_row("SELECT count(*) FROM dead_letters", [], |r| r.get(0))
        .unwrap();
    assert_eq!(left, 0);
    assert_content_equal(&env);
}
