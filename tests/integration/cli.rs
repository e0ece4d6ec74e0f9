//! The binary as operators run it: exit codes, error messages that name the problem, and output
//! that never contains the API key.

use std::process::Command;

use charthero_sim::ALL_SCOPES;

use crate::support::{TestEnv, compare, reader, run, text};

fn bin() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_charthero-sync"));
    cmd.env_remove("CHARTHERO_API_KEY")
        .env_remove("CREDENTIALS_DIRECTORY")
        .env_remove("CHARTHERO_SYNC_CONFIG")
        .env_remove("RUST_LOG");
    cmd
}

#[tokio::test]
async fn bad_configuration_exits_2_with_a_message_naming_the_key() {
    let env = TestEnv::with_encounters(1, 1).await;
    env.write_key_file(&env.sim.api_key());
    // Each message names the key and the problem, and never repeats a secret ("canary").
    let cases: [(&str, &[&str]); 9] = [
        ("[sync]\nschedul = \"0 * * * * *\"\n", &["schedul"]),
        ("[sync]\nschedule = \"every now and then\"\n", &["sync.schedule"]),
        ("[sync]\nstart_at = \"2026-01-01T00:00:00\"\n", &["sync.start_at"]),
        (
            "[api]\nbase_url = \"http://api.example.test\"\n",
            &["api.base_url"],
        ),
        (
            "[api]\napi_key = \"ch_sk_inline_canary\"\n",
            &[
                "line 2, column 1",
                "api_key",
                "never written",
                "CHARTHERO_API_KEY",
            ],
        ),
        (
            "[[organizations]]\nname = \"north\"\napi_key = \"ch_sk_inline_canary\"\n",
            &[
                "line 3, column 1",
                "api_key",
                "CHARTHERO_API_KEY_NORTH",
                "charthero-api-key.north",
            ],
        ),
        (
            "[api]\napi_key_file = \"ch_sk_pasted_canary_999\"\n",
            &["api.api_key_file", "looks like the API key itself"],
        ),
        (
            "[sync]\nschedule = \"0 0 0 31 2 *\"\n",
            &["sync.schedule", "never fires"],
        ),
        (
            "[sync]\nstart_at = 2026-01-01T00:00:00\n",
            &["sync.start_at", "no timezone offset"],
        ),
    ];
    for (toml, wanted) in cases {
        let path = env.dir.path().join("bad.toml");
        std::fs::write(&path, toml).unwrap();
        let out = run({
            let mut c = bin();
            c.arg("--config").arg(&path).arg("sync");
            c
        })
        .await;
        let all = text(&out);
        assert_eq!(out.status.code(), Some(2), "{toml}: {all}");
        for w in wanted {
            assert!(all.contains(w), "{toml}: {w:?} missing from {all}");
        }
        assert!(!all.contains("canary"), "{toml}: a secret in {all}");
    }

    // No key anywhere.
    let config = env.write_config_file("");
    let key_path = env.dir.path().join("api-key");
    std::fs::remove_file(&key_path).unwrap();
    let out = run({
        let mut c = bin();
        c.arg("--config").arg(&config).arg("sync");
        c
    })
    .await;
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("no API key found"), "{}", text(&out));

    // A key file of two lines: refused before any request, naming the file, not the key.
    env.write_key_file("ch_sk_two_line_canary\nextra\n");
    let out = run({
        let mut c = bin();
        c.arg("--config").arg(&config).arg("check");
        c
    })
    .await;
    let all = text(&out);
    assert_eq!(out.status.code(), Some(2), "{all}");
    assert!(
        all.contains(&key_path.display().to_string()) && all.contains("more than one line"),
        "{all}"
    );
    assert!(!all.contains("canary") && !all.contains("extra"), "{all}");

    // A directory where the key file belongs.
    std::fs::remove_file(&key_path).unwrap();
    std::fs::create_dir(&key_path).unwrap();
    let out = run({
        let mut c = bin();
        c.arg("--config").arg(&config).arg("sync");
        c
    })
    .await;
    let all = text(&out);
    assert_eq!(out.status.code(), Some(2), "{all}");
    assert!(
        all.contains(&key_path.display().to_string()) && all.contains("is a directory"),
        "{all}"
    );
}

#[tokio::test]
async fn a_database_password_file_that_cannot_be_used_exits_2_naming_it_never_the_password() {
    let env = TestEnv::with_encounters(2, 1).await;
    env.write_key_file(&env.sim.api_key());
    let password = env.dir.path().join("database-password");
    std::fs::write(&password, "canary-first\ncanary-second\n").unwrap();
    std::fs::set_permissions(&password, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    // The password is read before any connection: no server needs to listen on port 1.
    let config = env.dir.path().join("pg.toml");
    std::fs::write(
        &config,
        format!(
            "[api]\nbase_url = \"{}\"\napi_key_file = \"{}\"\n[database]\n\
             url = \"postgresql://charthero@127.0.0.1:1/warehouse\"\npassword_file = \"{}\"\n",
            env.sim.base_url(),
            env.dir.path().join("api-key").display(),
            password.display()
        ),
    )
    .unwrap();
    for command in ["migrate", "sync", "status", "check"] {
        let out = run({
            let mut c = bin();
            c.arg("--config").arg(&config).arg(command);
            c
        })
        .await;
        let said = text(&out);
        assert_eq!(out.status.code(), Some(2), "{command}: {said}");
        assert!(
            said.contains(&format!(
                "database password file {} holds more than one line",
                password.display()
            )),
            "{command}: {said}"
        );
        assert!(!said.contains("canary"), "{command}: {said}");
    }
}

#[tokio::test]
async fn sync_at_trace_level_succeeds_and_never_prints_the_key() {
    let env = TestEnv::with_encounters(8, 300).await;
    let canary = "ch_sk_canary_5f2e9d1c";
    env.sim.add_key(canary, &ALL_SCOPES);
    env.write_key_file(canary);
    let config = env.write_config_file("");
    let out = run({
        let mut c = bin();
        c.arg("--config")
            .arg(&config)
            .arg("sync")
            .env("RUST_LOG", "trace");
        c
    })
    .await;
    let all = text(&out);
    assert_eq!(out.status.code(), Some(0), "{all}");
    assert!(all.contains("sync complete"), "{all}");
    assert!(!all.contains("canary"), "the key leaked into the output");
    compare(&env.sim, &env.db_path()).assert_empty();

    let help = run({
        let mut c = bin();
        c.arg("--help").env("CHARTHERO_API_KEY", canary);
        c
    })
    .await;
    assert!(!text(&help).contains("canary"));
}

#[tokio::test]
async fn a_revoked_key_exits_3_and_the_run_records_the_reason_code() {
    let env = TestEnv::with_encounters(9, 50).await;
    env.sim.add_key(
        "ch_sk_to_revoke",
        &["encounters:read", "patients:read", "documents:read"],
    );
    env.sim
        .set_key_state("ch_sk_to_revoke", charthero_sim::KeyState::Revoked);
    env.write_key_file("ch_sk_to_revoke");
    let config = env.write_config_file("");
    let out = run({
        let mut c = bin();
        c.arg("--config").arg(&config).arg("sync");
        c
    })
    .await;
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    assert!(text(&out).contains("revoked_key"), "{}", text(&out));
    assert!(
        !text(&out).contains("ch_sk_to_revoke"),
        "the key leaked into an error"
    );
    let (outcome, reason): (String, String) = reader(&env.db_path())
        .query_row("SELECT outcome, reason_code FROM sync_runs", [], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .unwrap();
    assert_eq!((outcome.as_str(), reason.as_str()), ("failed", "revoked_key"));
}

#[tokio::test]
async fn migrate_and_demo_work_from_the_command_line() {
    let env = TestEnv::with_encounters(1, 1).await;
    let config = env.write_config_file("");
    let out = run({
        let mut c = bin();
        c.arg("--config").arg(&config).arg("migrate");
        c
    })
    .await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(env.db_path().exists());

    let demo_db = env.dir.path().join("demo.db");
    for _ in 0..2 {
        // The second run replaces the first demo database.
        let out = run({
            let mut c = bin();
            c.args(["demo", "--encounters", "400", "--database"])
                .arg(&demo_db);
            c
        })
        .await;
        let all = text(&out);
        assert_eq!(out.status.code(), Some(0), "{all}");
        assert!(all.contains("Synced 400 simulated ChartHero encounters"), "{all}");
        assert!(all.contains("sqlite3"), "{all}");
    }
    let n: i64 = reader(&demo_db)
        .query_row("SELECT count(*) FROM encounters", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 400);

    // demo refuses to overwrite a database it did not create.
    let out = run({
        let mut c = bin();
        c.args(["demo", "--encounters", "10", "--database"])
            .arg(env.db_path());
        c
    })
    .await;
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        text(&out).contains("not created by `charthero-sync demo`"),
        "{}",
        text(&out)
    );

    // Nor a place it cannot write (here under a file): a usage error, before the simulator starts.
    let under_a_file = env.db_path().join("demo.db");
    let out = run({
        let mut c = bin();
        c.args(["demo", "--encounters", "10", "--database"])
            .arg(&under_a_file);
        c
    })
    .await;
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        text(&out).contains(&format!("--database {}", under_a_file.display()))
            && !text(&out).contains("simulator listening"),
        "{}",
        text(&out)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_and_reindex_work_from_the_command_line() {
    let env = TestEnv::with_encounters(13, 200).await;
    env.write_key_file(&env.sim.api_key());
    let config = env.write_config_file("");
    let out = run({
        let mut c = bin();
        c.arg("--config").arg(&config).arg("sync");
        c
    })
    .await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let before: i64 = reader(&env.db_path())
        .query_row(
            "SELECT count(*) FROM transcript_turns_fts WHERE transcript_turns_fts MATCH 'the'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    let out = run({
        let mut c = bin();
        c.arg("--config").arg(&config).arg("reindex");
        c
    })
    .await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let after: i64 = reader(&env.db_path())
        .query_row(
            "SELECT count(*) FROM transcript_turns_fts WHERE transcript_turns_fts MATCH 'the'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert!(before > 0);
    assert_eq!(before, after);

    let out = run({
        let mut c = bin();
        c.arg("--config").arg(&config).arg("purge");
        c
    })
    .await;
    assert_eq!(
        out.status.code(),
        Some(2),
        "nothing to purge was named: {}",
        text(&out)
    );
    let out = run({
        let mut c = bin();
        c.arg("--config")
            .arg(&config)
            .args(["purge", "--older-than", "30d"]);
        c
    })
    .await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(text(&out).contains("purged encounters created"), "{}", text(&out));
    let (left, purges): (i64, i64) = reader(&env.db_path())
        .query_row(
            "SELECT (SELECT count(*) FROM encounters WHERE created_at_ns < unixepoch('now', '-30 days') * 1000000000),
                    (SELECT count(*) FROM purges)",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!((left, purges), (0, 1));
}

#[tokio::test]
async fn backfill_only_queues_and_refuses_a_schema_it_does_not_know() {
    let env = TestEnv::with_encounters(2, 10).await;
    env.write_key_file(&env.sim.api_key());
    let config = env.write_config_file("");
    let cmd = |args: &[&str]| {
        let mut c = bin();
        c.arg("--config").arg(&config).args(args);
        c
    };
    // No warehouse yet: backfill does not create one.
    let out = run(cmd(&["backfill", "--from", "2026-01-01T00:00:00Z"])).await;
    assert_ne!(out.status.code(), Some(0), "{}", text(&out));
    assert!(text(&out).contains("migrate"), "{}", text(&out));
    assert!(!env.db_path().exists());

    assert_eq!(run(cmd(&["migrate"])).await.status.code(), Some(0));
    let out = run(cmd(&["backfill", "--from", "2026-01-01T00:00:00Z"])).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(text(&out).contains("queued backfill 1"), "{}", text(&out));

    // A warehouse one migration behind: backfill does not migrate it (the daemon owns that).
    let latest: i64 = reader(&env.db_path())
        .query_row("SELECT max(version) FROM refinery_schema_history", [], |r| {
            r.get(0)
        })
        .unwrap();
    let writer = rusqlite::Connection::open(env.db_path()).unwrap();
    writer
        .execute("DELETE FROM refinery_schema_history WHERE version = ?1", [latest])
        .unwrap();
    let out = run(cmd(&["backfill", "--from", "2026-01-01T00:00:00Z"])).await;
    assert_ne!(out.status.code(), Some(0), "{}", text(&out));
    assert!(text(&out).contains("charthero-sync migrate"), "{}", text(&out));
    // One written by a newer release.
    writer
        .execute(
            "INSERT INTO refinery_schema_history (version, name, applied_on, checksum)
             VALUES (?1, 'future', '2030-01-01T00:00:00Z', '0'), (?2, 'restored', '2030-01-01T00:00:00Z', '0')",
            [latest + 1, latest],
        )
        .unwrap();
    let out = run(cmd(&["backfill", "--from", "2026-01-01T00:00:00Z"])).await;
    assert_ne!(out.status.code(), Some(0), "{}", text(&out));
    assert!(text(&out).contains("newer than this release"), "{}", text(&out));
    let queued: i64 = reader(&env.db_path())
        .query_row("SELECT count(*) FROM backfills", [], |r| r.get(0))
        .unwrap();
    assert_eq!(queued, 1, "refused backfills queue nothing");
}
