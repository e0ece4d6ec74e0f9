//! Input the binary does not control: every numeric configuration key at and beyond its bounds,
//! closed stdout/stderr, a missing database directory. None of it may panic (exit 101) or hang;
//! bad values are configuration errors (exit 2) that name the key. Also the two newcomer paths:
//! `simulate`, and a backfill queued without a daemon. The closed-output and queued-backfill
//! tests run on SQLite and on PostgreSQL.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use charthero_sync::timefmt::format_utc;
use time::OffsetDateTime;

use crate::support::{Backend, TestEnv, both_backends, charthero_sync, reader, run_within, text, wait_exit};

/// Exit status of a panicking Rust program.
const PANICKED: i32 = 101;

/// A whole configuration file, section by section, so a test can set any key to anything.
struct Toml(BTreeMap<&'static str, BTreeMap<&'static str, String>>);

impl Toml {
    /// A working configuration for `env`'s simulator, encounters only, with `db` as warehouse.
    fn for_env(env: &TestEnv, db: &Path) -> Toml {
        let mut t = Toml(BTreeMap::new());
        let q = |s: &str| format!("\"{s}\"");
        t.set("api", "base_url", q(&env.sim.base_url()));
        t.set(
            "api",
            "api_key_file",
            q(&env.dir.path().join("api-key").display().to_string()),
        );
        t.set("api", "request_timeout", q("10s"));
        t.set("database", "path", q(&db.display().to_string()));
        t.set(
            "sync",
            "start_at",
            q(&format_utc(OffsetDateTime::now_utc() - time::Duration::days(61))),
        );
        t.set("sync", "settle_lag", q("0s"));
        t.set("limits", "requests_per_second", "2000.0".into());
        t.set("limits", "burst", "100".into());
        t.set("content", "details", "false".into());
        t.set("content", "transcripts", "false".into());
        t
    }

    fn set(&mut self, section: &'static str, key: &'static str, value: String) {
        self.0.entry(section).or_default().insert(key, value);
    }

    fn write(&self, path: &Path) {
        let mut out = String::new();
        for (section, keys) in &self.0 {
            out.push_str(&format!("[{section}]\n"));
            for (k, v) in keys {
                out.push_str(&format!("{k} = {v}\n"));
            }
        }
        std::fs::write(path, out).unwrap();
    }
}

/// Whether a value must be refused (exit 2, naming the key) or accepted (then the command runs:
/// exit 0, or 1 if the value makes the work fail, e.g. a 1 ms connect timeout).
#[derive(Clone, Copy, PartialEq, Debug)]
enum Expect {
    Refused,
    Accepted,
}

use Expect::{Accepted, Refused};

/// Every numeric key (and the instants and durations that feed time arithmetic) at its bounds,
/// just past them, and at absurd values, as TOML literals.
/// A TOML literal and what must happen to it.
type Case = (&'static str, Expect);

const BOUNDARIES: &[(&str, &str, &[Case])] = &[
    (
        "api",
        "connect_timeout",
        &[
            ("\"0s\"", Refused),
            ("\"1ms\"", Accepted),
            ("\"10m\"", Accepted),
            ("\"11m\"", Refused),
            ("\"18446744073709551615s\"", Refused),
            ("\"99999999999999999999d\"", Refused),
        ],
    ),
    (
        "api",
        "read_timeout",
        &[("\"0s\"", Refused), ("\"1h\"", Accepted), ("\"61m\"", Refused)],
    ),
    (
        "api",
        "request_timeout",
        &[
            ("\"0s\"", Refused),
            ("\"24h\"", Accepted),
            ("\"25h\"", Refused),
            ("\"213503982334601d\"", Refused),
        ],
    ),
    (
        "api",
        "max_response_bytes",
        &[
            ("-1", Refused),
            ("0", Refused),
            ("65535", Refused),
            ("65536", Accepted),
            ("1073741824", Accepted),
            ("1073741825", Refused),
            ("9223372036854775807", Refused),
        ],
    ),
    (
        "database",
        "busy_timeout",
        &[
            ("\"0s\"", Refused),
            ("\"1ms\"", Accepted),
            ("\"1h\"", Accepted),
            ("\"25d\"", Refused),
        ],
    ),
    (
        "database",
        "wal_size_limit",
        &[
            ("-1", Refused),
            ("0", Accepted),
            ("1099511627776", Accepted),
            ("9223372036854775807", Refused),
        ],
    ),
    (
        "sync",
        "page_size",
        &[
            ("-1", Refused),
            ("0", Refused),
            ("1", Accepted),
            ("100", Accepted),
            ("101", Refused),
            ("4294967297", Refused),
        ],
    ),
    (
        "sync",
        "settle_lag",
        &[("\"0s\"", Accepted), ("\"7d\"", Accepted), ("\"8d\"", Refused)],
    ),
    (
        "sync",
        "overlap",
        &[
            ("\"0s\"", Accepted),
            ("\"365d\"", Accepted),
            ("\"366d\"", Refused),
        ],
    ),
    (
        "sync",
        "revisit_recent",
        &[
            ("\"0s\"", Accepted),
            ("\"3650d\"", Accepted),
            ("\"3651d\"", Refused),
            ("\"106751991167300d\"", Refused),
        ],
    ),
    (
        "sync",
        "revisit_deep",
        &[
            ("\"0s\"", Accepted),
            ("\"3650d\"", Accepted),
            ("\"3651d\"", Refused),
            ("\"106751991167300d\"", Refused),
        ],
    ),
    (
        "sync",
        "revisit_deep_every",
        &[
            ("\"0s\"", Refused),
            ("\"59s\"", Refused),
            ("\"1m\"", Accepted),
            ("\"3650d\"", Accepted),
            ("\"3651d\"", Refused),
        ],
    ),
    (
        "sync",
        "start_at",
        &[
            ("\"0001-01-01T00:00:00Z\"", Refused),
            ("\"1969-12-31T23:59:59Z\"", Refused),
            ("\"1970-01-01T00:00:00Z\"", Accepted),
            ("\"2199-12-31T00:00:00Z\"", Accepted),
            ("\"9999-12-31T23:59:59Z\"", Refused),
        ],
    ),
    (
        "limits",
        "requests_per_second",
        &[
            ("1e-30", Refused),
            ("1e-19", Refused),
            ("1e-10", Refused),
            ("0.0", Refused),
            ("-1.0", Refused),
            ("nan", Refused),
            ("inf", Refused),
            ("1e10", Refused),
            ("1.7976931348623157e308", Refused),
            ("0.01", Accepted),
            ("10000.0", Accepted),
            ("5", Accepted),
        ],
    ),
    (
        "limits",
        "burst",
        &[
            ("-1", Refused),
            ("0", Refused),
            ("1", Accepted),
            ("1000", Accepted),
            ("1001", Refused),
            ("4294967296", Refused),
        ],
    ),
    (
        "limits",
        "max_in_flight",
        &[("0", Refused), ("1", Accepted), ("64", Accepted), ("65", Refused)],
    ),
    (
        "limits",
        "max_attempts",
        &[("0", Refused), ("1", Accepted), ("20", Accepted), ("21", Refused)],
    ),
    (
        "limits",
        "retries_per_cycle",
        &[
            ("-1", Refused),
            ("0", Accepted),
            ("1000000", Accepted),
            ("1000001", Refused),
        ],
    ),
    (
        "audio",
        "max_bytes",
        &[
            ("0", Refused),
            ("1", Accepted),
            ("68719476736", Accepted),
            ("68719476737", Refused),
        ],
    ),
    (
        "privacy",
        "retention",
        &[
            ("\"0s\"", Refused),
            ("\"1d\"", Accepted),
            ("\"36500d\"", Accepted),
            ("\"36501d\"", Refused),
            ("\"213503982334601d\"", Refused),
        ],
    ),
    (
        "metrics",
        "listen",
        &[
            ("\"127.0.0.1:65536\"", Refused),
            ("\"127.0.0.1:99999999999\"", Refused),
        ],
    ),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_numeric_key_at_and_past_its_bounds_is_refused_by_name_or_works_and_never_panics_or_hangs() {
    let env = TestEnv::with_encounters(61, 20).await;
    env.write_key_file(&env.sim.api_key());
    let mut case = 0;
    for (section, key, values) in BOUNDARIES {
        for (value, expect) in *values {
            case += 1;
            let db = env.dir.path().join(format!("case-{case}.db"));
            let mut toml = Toml::for_env(&env, &db);
            toml.set(section, key, (*value).to_owned());
            if *section == "limits" && *key == "requests_per_second" {
                // A slow rate with the default burst still lets this tiny sync through at once.
                toml.set("limits", "burst", "100".into());
            }
            let path = env.dir.path().join(format!("case-{case}.toml"));
            toml.write(&path);
            for command in ["check", "sync"] {
                let mut cmd = charthero_sync();
                cmd.arg("--config").arg(&path).arg(command);
                let out = run_within(cmd, Duration::from_secs(60)).await;
                let all = text(&out);
                let code = out.status.code();
                let what = format!("{section}.{key} = {value} ({command})");
                assert_ne!(code, Some(PANICKED), "{what} panicked: {all}");
                assert!(code.is_some(), "{what} was killed by a signal: {all}");
                assert!(!all.contains("panicked"), "{what}: {all}");
                match expect {
                    Refused => {
                        assert_eq!(code, Some(2), "{what} was not refused: {all}");
                        assert!(
                            all.contains(&format!("{section}.{key}")),
                            "{what}: the error does not name the key: {all}"
                        );
                    }
                    Accepted => assert!(
                        matches!(code, Some(0 | 1)),
                        "{what} was refused or failed oddly: {all}"
                    ),
                }
            }
        }
    }
}

/// A pipe whose reading end is already closed: every write to it fails with EPIPE.
fn closed_pipe() -> std::io::PipeWriter {
    let (read, write) = std::io::pipe().unwrap();
    drop(read);
    write
}

/// Runs `cmd` with stdout and stderr both a closed pipe; returns its exit code.
async fn exit_code_with_closed_output(mut cmd: Command, limit: Duration) -> Option<i32> {
    let pipe = closed_pipe();
    cmd.stdin(Stdio::null())
        .stdout(pipe.try_clone().unwrap())
        .stderr(pipe);
    let described = format!("{cmd:?} with a closed stdout/stderr");
    let mut child = cmd.spawn().unwrap();
    wait_exit(&described, &mut child, limit).await
}

both_backends!(
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    a_closed_stdout_and_stderr_never_panic_any_command
);
async fn a_closed_stdout_and_stderr_never_panic_any_command(backend: Backend) {
    let env = TestEnv::with_encounters_on(backend, 62, 50).await;
    env.write_key_file(&env.sim.api_key());
    let config = env.write_config_file(crate::support::ENCOUNTERS_ONLY);
    let from = format_utc(OffsetDateTime::now_utc() - time::Duration::days(3));
    let cases: &[(&[&str], i32)] = &[
        (&["sync"], 0),
        (&["status"], 0),
        (&["status", "--json"], 0),
        (&["check"], 0),
        (&["migrate"], 0),
        (&["backfill", "--from", &from], 0),
        (&["reindex"], 0),
        (&["--help"], 0),
        (&["status", "--no-such-flag"], 2),
        (&["sync", "--backfill-from", "yesterday"], 2),
    ];
    // Several rounds: the original panic depended on timing.
    for round in 0..3 {
        for (args, expected) in cases {
            let mut cmd = charthero_sync();
            cmd.arg("--config")
                .arg(&config)
                .args(*args)
                .env("RUST_LOG", "debug");
            let code = exit_code_with_closed_output(cmd, Duration::from_secs(60)).await;
            assert_eq!(
                code,
                Some(*expected),
                "round {round}: {args:?} with closed output"
            );
        }
    }
}

#[tokio::test]
async fn a_missing_database_directory_fails_check_and_stops_run_sync_and_migrate_with_exit_2() {
    let env = TestEnv::with_encounters(63, 10).await;
    env.write_key_file(&env.sim.api_key());
    let db = env.dir.path().join("no-such-dir").join("warehouse.db");
    let config = env.dir.path().join("missing-dir.toml");
    Toml::for_env(&env, &db).write(&config);
    for command in ["check", "run", "sync", "migrate", "backfill", "purge", "reindex"] {
        let mut cmd = charthero_sync();
        cmd.arg("--config").arg(&config).arg(command);
        if command == "backfill" {
            cmd.args(["--from", "2026-01-01T00:00:00Z"]);
        }
        if command == "purge" {
            cmd.args(["--older-than", "365d"]);
        }
        let out = run_within(cmd, Duration::from_secs(30)).await;
        let all = text(&out);
        assert_eq!(out.status.code(), Some(2), "{command}: {all}");
        assert!(all.contains("database.path"), "{command}: {all}");
        assert!(all.contains("no-such-dir"), "{command}: {all}");
        assert!(!all.contains("lock file"), "{command}: {all}");
    }
    assert!(!db.parent().unwrap().exists(), "nothing created the directory");
}

#[tokio::test]
async fn an_audio_directory_that_cannot_be_used_fails_check_and_stops_run_and_sync_with_exit_2() {
    let env = TestEnv::with_encounters(64, 10).await;
    env.write_key_file(&env.sim.api_key());
    let db = env.dir.path().join("warehouse.db");
    let file = env.dir.path().join("a-file");
    std::fs::write(&file, "not a directory").unwrap();
    let config = env.dir.path().join("audio.toml");
    // The directory is a file; then it is under a file, where it can never be created.
    for (directory, why) in [
        (file.clone(), "is not a directory"),
        (file.join("recordings"), "Not a directory"),
    ] {
        let mut toml = Toml::for_env(&env, &db);
        toml.set("audio", "enabled", "true".into());
        toml.set("audio", "directory", format!("\"{}\"", directory.display()));
        toml.write(&config);
        for command in ["check", "run", "sync"] {
            let mut cmd = charthero_sync();
            cmd.arg("--config").arg(&config).arg(command);
            let out = run_within(cmd, Duration::from_secs(30)).await;
            let all = text(&out);
            assert_eq!(out.status.code(), Some(2), "{command}: {all}");
            assert!(
                all.contains("audio.directory") && all.contains(why),
                "{command}: {all}"
            );
        }
        assert!(!db.exists(), "nothing synced");
    }
}

#[tokio::test]
async fn check_against_a_host_that_refuses_connections_probes_once_and_names_the_host() {
    let env = TestEnv::with_encounters(66, 10).await;
    env.write_key_file(&env.sim.api_key());
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let base_url = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let db = env.dir.path().join("warehouse.db");
    let config = env.dir.path().join("closed.toml");
    let mut toml = Toml::for_env(&env, &db);
    toml.set("api", "base_url", format!("\"{base_url}\""));
    toml.write(&config);
    let mut cmd = charthero_sync();
    cmd.arg("--config").arg(&config).arg("check");
    let out = run_within(cmd, Duration::from_secs(60)).await;
    let all = text(&out);
    assert_eq!(out.status.code(), Some(1), "{all}");
    assert!(
        all.contains(&format!(
            "list_encounters (ChartHero at {base_url}/ could not be reached)"
        )),
        "{all}"
    );
    // The other routes and the clinic are not probed: each would wait out the same retries.
    for line in ["encounter ", "document ", "transcript ", "organization_id "] {
        assert!(
            !all.lines().any(|l| l.starts_with(line)),
            "{line:?} probed: {all}"
        );
    }
}

#[tokio::test]
async fn check_against_a_host_that_never_answers_says_it_is_waiting_and_gives_up_after_three_attempts() {
    let env = TestEnv::with_encounters(67, 10).await;
    env.write_key_file(&env.sim.api_key());
    // Accepts every connection and never sends a byte, like a host behind a stuck proxy.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base_url = format!("http://{}", silent.local_addr().unwrap());
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let holder = tokio::spawn({
        let accepted = accepted.clone();
        async move {
            let mut held = Vec::new();
            while let Ok((socket, _)) = silent.accept().await {
                accepted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                held.push(socket);
            }
        }
    });
    let db = env.dir.path().join("warehouse.db");
    let config = env.dir.path().join("silent.toml");
    let mut toml = Toml::for_env(&env, &db);
    toml.set("api", "base_url", format!("\"{base_url}\""));
    toml.set("api", "read_timeout", "\"1s\"".into());
    toml.write(&config);
    let mut cmd = charthero_sync();
    cmd.arg("--config").arg(&config).arg("check");
    let out = run_within(cmd, Duration::from_secs(60)).await;
    holder.abort();
    let all = text(&out);
    assert_eq!(out.status.code(), Some(1), "{all}");
    assert!(
        all.contains(&format!(
            "no answer from {base_url}/ yet; waiting up to 1s per attempt, 3 attempts"
        )),
        "{all}"
    );
    assert!(all.contains("list_encounters"), "{all}");
    // The sync's six attempts (with backoff) would be what an operator sat through before.
    let attempts = accepted.load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(attempts, 3, "{attempts} connections: {all}");
}

#[tokio::test]
async fn an_unknown_log_format_exits_2_naming_the_variable() {
    let mut cmd = charthero_sync();
    cmd.env("CHARTHERO_LOG_FORMAT", "xml")
        .args(["--config", "/nonexistent.toml", "status"]);
    let out = run_within(cmd, Duration::from_secs(30)).await;
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        text(&out).contains("CHARTHERO_LOG_FORMAT=\"xml\" is not a log format: use text, journald or json"),
        "{}",
        text(&out)
    );
}

#[tokio::test]
async fn status_before_any_sync_exits_0_and_migrate_says_whether_it_created_migrated_or_found_the_schema_current()
 {
    let env = TestEnv::with_encounters(65, 10).await;
    env.write_key_file(&env.sim.api_key());
    let db = env.dir.path().join("warehouse.db");
    let config = env.dir.path().join("migrate.toml");
    Toml::for_env(&env, &db).write(&config);
    let migrate = || {
        let mut cmd = charthero_sync();
        cmd.arg("--config").arg(&config).arg("migrate");
        run_within(cmd, Duration::from_secs(30))
    };
    let latest = charthero_sync::store::release_version(&charthero_sync::config::DatabaseTarget::Sqlite {
        path: db.clone(),
    });
    let wal = PathBuf::from(format!("{}-wal", db.display()));
    // Before anything: `status` reports nothing synced (exit 0, the usual JSON shape) and creates
    // nothing.
    let mut status = charthero_sync();
    status.arg("--config").arg(&config).arg("status");
    let out = run_within(status, Duration::from_secs(30)).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(text(&out).contains("no warehouse at"), "{}", text(&out));
    let mut status = charthero_sync();
    status.arg("--config").arg(&config).args(["status", "--json"]);
    let out = run_within(status, Duration::from_secs(30)).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["organizations"][0]["state"], "never_synced", "{json:#}");
    assert_eq!(json["rows"]["encounters"], 0, "{json:#}");
    assert!(!db.exists(), "status created the warehouse");
    for expected in [
        format!("created at schema version {latest}"),
        format!("is up to date (schema version {latest})"),
    ] {
        let out = migrate().await;
        assert_eq!(out.status.code(), Some(0), "{}", text(&out));
        assert!(text(&out).contains(&expected), "{}", text(&out));
        // The migrations' writes are in the file, not left in its log.
        let log = std::fs::metadata(&wal).map_or(0, |m| m.len());
        assert_eq!(log, 0, "{} bytes left in {}", log, wal.display());
    }
    // The previous release's warehouse is migrated, and says from which version.
    std::fs::remove_file(&db).unwrap();
    std::fs::remove_file(&wal).ok();
    std::fs::copy(
        concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/v4-warehouse.db"),
        &db,
    )
    .unwrap();
    let out = migrate().await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(
        text(&out).contains(&format!("migrated from schema version 4 to {latest}")),
        "{}",
        text(&out)
    );
}

/// `simulate` in the background: its printed lines, and a guard that stops it.
struct Simulate {
    child: std::process::Child,
    lines: Vec<String>,
}

impl Simulate {
    /// Starts `simulate` with `args` serving from `dir`, and waits for its instructions.
    async fn start(dir: &Path, args: &[&str]) -> Simulate {
        let mut cmd = charthero_sync();
        cmd.arg("simulate")
            .args(args)
            .arg("--dir")
            .arg(dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        let mut child = cmd.spawn().unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut sim = Simulate {
            child,
            lines: Vec::new(),
        };
        let lines = tokio::task::spawn_blocking(move || {
            let mut lines = Vec::new();
            for line in BufReader::new(stdout).lines() {
                let line = line.unwrap();
                let done = line.contains("Serving until Ctrl-C");
                lines.push(line);
                if done {
                    break;
                }
            }
            lines
        });
        sim.lines = tokio::time::timeout(Duration::from_secs(30), lines)
            .await
            .expect("simulate printed its instructions")
            .unwrap();
        sim
    }
}

impl Drop for Simulate {
    fn drop(&mut self) {
        self.child.kill().ok();
        self.child.wait().ok();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulate_serves_a_simulator_that_check_sync_and_status_work_against_until_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let sim_dir = dir.path().join("sim");
    let mut sim = Simulate::start(
        &sim_dir,
        &[
            "--encounters",
            "150",
            "--days",
            "5",
            "--new-every",
            "0s",
            "--organization-id",
            "org_trial-1",
        ],
    )
    .await;
    let printed = sim.lines.join("\n");
    assert!(printed.contains("listening at http://127.0.0.1:"), "{printed}");
    let config = sim_dir.join("config.toml");
    let key = sim_dir.join("api-key");
    assert!(
        printed.contains(&config.canonicalize().unwrap().display().to_string()),
        "{printed}"
    );
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let key_text = std::fs::read_to_string(&key).unwrap();
    assert!(!printed.contains(key_text.trim()), "the key was printed");

    for command in ["check", "sync", "status"] {
        let mut cmd = charthero_sync();
        cmd.arg("--config").arg(&config).arg(command);
        let out = run_within(cmd, Duration::from_secs(60)).await;
        assert_eq!(out.status.code(), Some(0), "{command}: {}", text(&out));
    }
    let db: PathBuf = sim_dir.join("warehouse.db");
    let n: i64 = reader(&db)
        .query_row(
            "SELECT count(*) FROM encounters WHERE organization_id = 'org_trial-1'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(n, 150);

    let pid = sim.child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let started = Instant::now();
    loop {
        if let Some(status) = sim.child.try_wait().unwrap() {
            assert_eq!(status.code(), Some(0));
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "simulate ignored SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // demo and simulate refuse a --config they would ignore.
    let mut cmd = charthero_sync();
    cmd.arg("--config")
        .arg(&config)
        .args(["simulate", "--dir"])
        .arg(&sim_dir);
    let out = run_within(cmd, Duration::from_secs(30)).await;
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("drop --config"), "{}", text(&out));
    // An organization_id no clinic could have is refused by name before anything starts.
    let mut cmd = charthero_sync();
    cmd.args(["simulate", "--organization-id", "org sim", "--dir"])
        .arg(dir.path().join("other"));
    let out = run_within(cmd, Duration::from_secs(30)).await;
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("--organization-id"), "{}", text(&out));
    assert!(!dir.path().join("other").exists());
}

both_backends!(
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    a_backfill_queued_without_a_daemon_is_worked_by_the_next_sync_once_and_status_lists_it
);
async fn a_backfill_queued_without_a_daemon_is_worked_by_the_next_sync_once_and_status_lists_it(
    backend: Backend,
) {
    let env = TestEnv::with_encounters_on(backend, 64, 300).await;
    env.write_key_file(&env.sim.api_key());
    let config = env.write_config_file(crate::support::ENCOUNTERS_ONLY);
    let sync = || {
        let mut cmd = charthero_sync();
        cmd.arg("--config").arg(&config).arg("sync");
        cmd
    };
    let out = run_within(sync(), Duration::from_secs(60)).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));

    let from = format_utc(OffsetDateTime::now_utc() - time::Duration::days(20));
    let to = format_utc(OffsetDateTime::now_utc() - time::Duration::days(10));
    let mut queue = charthero_sync();
    queue
        .arg("--config")
        .arg(&config)
        .args(["backfill", "--from", &from, "--to", &to]);
    let out = run_within(queue, Duration::from_secs(30)).await;
    let printed = text(&out);
    assert_eq!(out.status.code(), Some(0), "{printed}");
    assert!(printed.contains("queued backfill 1"), "{printed}");
    // The hint names a command that works the queued backfill, not one that makes another.
    assert!(
        printed.contains("`charthero-sync sync` works it now"),
        "{printed}"
    );
    assert!(!printed.contains("--backfill-from"), "{printed}");

    let status = || {
        let mut cmd = charthero_sync();
        cmd.arg("--config").arg(&config).args(["status", "--json"]);
        cmd
    };
    let out = run_within(status(), Duration::from_secs(30)).await;
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["backfills"][0]["status"], "queued", "{json}");
    assert_eq!(json["disabled_routes"], serde_json::json!([]), "{json}");

    let out = run_within(sync(), Duration::from_secs(60)).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let rows: Vec<(i64, String)> = env.warehouse.rows(
        "SELECT backfill_id, status FROM backfills ORDER BY backfill_id",
        &[],
    );
    assert_eq!(
        rows,
        vec![(1, "completed".to_owned())],
        "one backfill, worked by sync"
    );

    let out = run_within(status(), Duration::from_secs(30)).await;
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let b = &json["backfills"][0];
    assert_eq!(
        (b["status"].as_str(), b["requested_by"].as_str()),
        (Some("completed"), Some("backfill")),
        "{json}"
    );
    assert!(b["finished_at"].is_string(), "{json}");
    crate::support::compare(&env.sim, &env.warehouse).assert_empty();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
/// Harsher servers `simulate` offers by hand: a rate limit below the configured rate (the sync
/// completes, says once that ChartHero refused requests, and few are refused), and responses in
/// a changing order with links signed anew each time (a second sync changes nothing and fetches
/// no content, and no link is stored).
async fn simulate_serves_a_lower_rate_limit_and_unordered_responses_that_a_sync_takes_in_stride() {
    let dir = tempfile::tempdir().unwrap();
    let sim_dir = dir.path().join("sim");
    let _sim = Simulate::start(
        &sim_dir,
        &[
            "--encounters",
            "100",
            "--days",
            "5",
            "--new-every",
            "0s",
            "--rate-limit",
            "40",
            "--unordered",
            "--signed-links",
        ],
    )
    .await;
    let config = sim_dir.join("config.toml");
    let sync = || {
        let mut cmd = charthero_sync();
        cmd.arg("--config").arg(&config).arg("sync");
        run_within(cmd, Duration::from_secs(120))
    };
    let first = sync().await;
    assert_eq!(first.status.code(), Some(0), "{}", text(&first));
    let warned = text(&first).matches("ChartHero refused a request (429)").count();
    assert_eq!(warned, 1, "{}", text(&first));
    let second = sync().await;
    assert_eq!(second.status.code(), Some(0), "{}", text(&second));
    assert!(
        text(&second).contains("0 new, 0 changed") && text(&second).contains("0 documents, 0 transcripts"),
        "{}",
        text(&second)
    );
    let db: PathBuf = sim_dir.join("warehouse.db");
    let (runs, retries): (i64, i64) = reader(&db)
        .query_row("SELECT count(*), sum(retries) FROM sync_runs", [], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .unwrap();
    assert_eq!(runs, 2);
    let links: i64 = reader(&db)
        .query_row(
            "SELECT count(*) FROM encounters WHERE instr(raw_json, 'media.charthero.test') > 0",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(links, 0, "signed links were stored");
    // The server did refuse some of the requests at 500 configured, and each was retried.
    assert!(retries >= 1, "{retries} requests retried");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
/// `simulate --document-lag`: routes that do not find the notes and transcripts the list
/// already shows (of the new encounters it adds each second) until they are 30 seconds old.
/// The sync completes, every older note arrives, and the new ones wait on the not-ready
/// schedule, as `status` says, instead of being given up.
async fn simulate_serves_a_lagging_document_route_whose_new_notes_a_sync_waits_for() {
    let dir = tempfile::tempdir().unwrap();
    let sim_dir = dir.path().join("sim");
    let _sim = Simulate::start(
        &sim_dir,
        &[
            "--encounters",
            "60",
            "--days",
            "3",
            "--new-every",
            "1s",
            "--document-lag",
            "30s",
        ],
    )
    .await;
    // New encounters are listed once older than the settle lag `simulate` configures (5 s).
    tokio::time::sleep(Duration::from_secs(8)).await;
    let config = sim_dir.join("config.toml");
    let command = |name: &str| {
        let mut cmd = charthero_sync();
        cmd.arg("--config").arg(&config).arg(name);
        run_within(cmd, Duration::from_secs(120))
    };
    let sync = command("sync").await;
    assert_eq!(sync.status.code(), Some(0), "{}", text(&sync));
    let db: PathBuf = sim_dir.join("warehouse.db");
    let (waiting, unavailable, without_text, transcripts_waiting): (i64, i64, i64, i64) = reader(&db)
        .query_row(
            "SELECT count(*) FILTER (WHERE schema_type = 'document' AND detail_state = 'not_ready'),
                    count(*) FILTER (WHERE schema_type = 'document' AND detail_state = 'unavailable'),
                    count(*) FILTER (WHERE schema_type = 'document' AND content_text IS NULL),
                    count(*) FILTER (WHERE transcript_state = 'not_ready')
             FROM documents",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
        )
        .unwrap();
    assert!(waiting >= 1, "no new note was listed");
    // Each new encounter has one note and one finished transcript, both not found yet.
    assert_eq!(
        (unavailable, without_text, transcripts_waiting),
        (0, waiting, waiting)
    );
    let status = command("status").await;
    assert!(
        text(&status).contains(&format!(
            "documents ({waiting} not found yet), 0 transcripts ({waiting} not ready yet)"
        )),
        "{}",
        text(&status)
    );
}
