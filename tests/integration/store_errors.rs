//! The warehouse failing underneath a sync: a full disk (a small tmpfs) fails the cycle with an
//! error naming the database and the free bytes, `sync` exits 1, the daemon keeps retrying, and
//! once space returns the next cycle ends equal to the simulator; a corrupt warehouse stops
//! `sync`, `run` and `migrate` with exit 5, and a running daemon with STOPPING=1 and exit 5.
//!
//! The disk-full tests mount a tmpfs, so they need root (CI runs as root); elsewhere they print
//! why they were skipped, and in CI (`CI` set) they fail instead. Every mount is undone by a drop
//! guard, even when the test fails.

use std::io::{BufRead, BufReader, Seek, SeekFrom, Write};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use charthero_sync::store::StoreErrorKind;
use charthero_sync::sync::{CyclePlan, run_cycle};
use tokio_util::sync::CancellationToken;

use crate::support::{
    ENCOUNTERS_ONLY, KillOnDrop, TestEnv, charthero_sync, compare, compare_content, reader, run_within, text,
    wait_exit, wait_for,
};

/// A tmpfs mounted on a fresh directory; unmounted when dropped, whatever happened to the test
/// (lazily if a process the test failed to stop still holds a file on it). The directory is
/// removed after the unmount, by the `TempDir` dropped after this guard's own `drop`.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Tmpfs {
        let dir = tempfile::Builder::new()
            .prefix("charthero-tmpfs-")
            .tempdir()
            .unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0755"), "tmpfs"])
            .arg(dir.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "cannot mount a tmpfs on {} (root without CAP_SYS_ADMIN?): {}",
            dir.path().display(),
            text(&out)
        );
        Tmpfs { dir }
    }

    /// Frees space the way an operator might: the filesystem grows (contents are kept).
    fn resize(&self, size: &str) {
        let out = Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(self.dir.path())
            .output()
            .unwrap();
        assert!(out.status.success(), "remount: {}", text(&out));
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let unmounted = Command::new("umount")
            .arg(self.dir.path())
            .status()
            .is_ok_and(|s| s.success());
        if !unmounted {
            Command::new("umount")
                .arg("-l")
                .arg(self.dir.path())
                .status()
                .ok();
        }
    }
}

/// Why this machine cannot mount a tmpfs, if it cannot; in CI that is a failure, not a skip.
fn cannot_mount() -> Option<String> {
    let why = if !rustix::process::geteuid().is_root() {
        Some("not running as root (it mounts a tmpfs)".to_owned())
    } else {
        ["mount", "umount"].into_iter().find_map(|tool| {
            let found = Command::new("sh")
                .args(["-c", &format!("command -v {tool}")])
                .stdout(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            (!found).then(|| format!("{tool} is not installed"))
        })
    };
    if let Some(why) = &why {
        // CI runs as root: there, skipping would hide a failure.
        assert!(
            std::env::var_os("CI").is_none(),
            "cannot run the disk-full test in CI: {why}"
        );
        println!("skipped: {why}");
    }
    why
}

/// `env`'s config file, with the warehouse at `db` and `sync_extra` added to `[sync]`.
fn config_file(env: &TestEnv, db: &Path, sync_extra: &str, extra: &str) -> PathBuf {
    let path = env.write_config_file(extra);
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace(&env.db_path().display().to_string(), &db.display().to_string())
        .replace(
            "settle_lag = \"0s\"\n",
            &format!("settle_lag = \"0s\"\n{sync_extra}"),
        );
    std::fs::write(&path, text).unwrap();
    path
}

/// Content on (notes and transcripts make the warehouse large quickly): 600 encounters need
/// about 5 MB, far more than the 3 MB tmpfs.
const ENCOUNTERS: usize = 600;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_fails_the_cycle_naming_the_path_and_free_bytes_and_after_space_returns_the_next_cycle_ends_equal()
 {
    if cannot_mount().is_some() {
        return;
    }
    let env = TestEnv::with_encounters(81, ENCOUNTERS).await;
    env.write_key_file(&env.sim.api_key());
    let disk = Tmpfs::mount("3m");
    let db = disk.path().join("warehouse.db");
    let shown = db.display().to_string();

    // `sync` fills the disk: exit 1, naming the database and the free bytes.
    let config = config_file(&env, &db, "", "");
    let mut sync = charthero_sync();
    sync.arg("--config").arg(&config).arg("sync");
    let out = run_within(sync, Duration::from_secs(120)).await;
    let said = text(&out);
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(
        said.contains(&format!("the disk holding database {shown} is full ("))
            && said.contains(" bytes free"),
        "{said}"
    );

    // The same through the library, as the daemon sees it: a classified, retryable error.
    let mut raw = env.raw_config();
    raw.database.path = Some(db.clone());
    let ctx = charthero_sync::connect(&raw.validate().unwrap(), &env.key())
        .await
        .unwrap();
    let cancel = CancellationToken::new();
    let err = run_cycle(&ctx, "sync", CyclePlan::full(None, false), &cancel)
        .await
        .expect_err("the disk is still full");
    let store = err
        .store_error()
        .unwrap_or_else(|| panic!("not a store error: {err:#}"));
    let StoreErrorKind::DiskFull {
        free_bytes: Some(free),
    } = store.kind()
    else {
        panic!("{err:#} is {:?}", store.kind());
    };
    assert!(store.is_retryable() && !store.is_fatal(), "{err:#}");
    assert_eq!(store.location(), db.display().to_string());
    let message = format!("{err:#}");
    assert!(
        message.contains(&shown) && message.contains(&format!("({free} bytes free")),
        "{message}"
    );
    assert_eq!(err.reason_code(), Some("disk_full"));
    assert!(free < 1024 * 1024, "{free} bytes free on a full 3 MB tmpfs?");

    // Space returns; the next cycle of the same writer (its connection saw SQLITE_FULL) ends
    // equal to the simulator.
    disk.resize("64m");
    let report = run_cycle(&ctx, "sync", CyclePlan::full(None, false), &cancel)
        .await
        .unwrap_or_else(|e| panic!("after space returned: {e:#}"));
    assert!(report.is_complete(), "{report:?}");
    compare(&env.sim, &db).assert_empty();
    assert_eq!(compare_content(&env.sim, &db), Vec::<String>::new());
    drop(ctx);

    // The failed cycles are on record: as failed with their reason when the run's row found
    // room (in the WAL the rolled-back transaction had filled), else marked aborted by the next
    // cycle; or (when not even the cycle's first row fitted) not at all.
    let runs: Vec<(String, Option<String>)> = reader(&db)
        .prepare("SELECT outcome, reason_code FROM sync_runs ORDER BY run_id")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let (last, failed) = runs.split_last().unwrap();
    assert_eq!(last.0, "succeeded", "{runs:?}");
    assert!(
        !failed.is_empty()
            && failed.iter().all(|(outcome, reason)| match outcome.as_str() {
                "failed" => reason.as_deref() == Some("disk_full"),
                outcome => outcome == "aborted",
            }),
        "{runs:?}"
    );

    // And `sync` is content again.
    let mut sync = charthero_sync();
    sync.arg("--config").arg(&config).arg("sync");
    let out = run_within(sync, Duration::from_secs(120)).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    drop(disk);
}

/// A child's stderr, line by line, collected on a thread.
fn collect_stderr(child: &mut Child) -> Arc<Mutex<Vec<String>>> {
    let lines = Arc::new(Mutex::new(Vec::new()));
    let stderr = child.stderr.take().unwrap();
    let sink = lines.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            sink.lock().unwrap().push(line);
        }
    });
    lines
}

/// Sends `sig` (if any) to the daemon and waits for its exit code, at most `limit`.
async fn stop_daemon(daemon: &mut KillOnDrop, sig: Option<&str>, limit: Duration) -> Option<i32> {
    if let Some(sig) = sig {
        let pid = daemon.id().to_string();
        assert!(Command::new("kill").args([sig, &pid]).status().unwrap().success());
    }
    wait_exit("the daemon", daemon, limit).await
}

/// Runs recorded as succeeded (0 while the warehouse cannot be read yet).
fn succeeded_runs(db: &Path) -> i64 {
    if !db.exists() {
        return 0;
    }
    charthero_sync::store::sqlite::open_reader(db, Duration::from_secs(5))
        .and_then(|conn| {
            Ok(conn.query_row(
                "SELECT count(*) FROM sync_runs WHERE outcome = 'succeeded'",
                [],
                |r| r.get(0),
            )?)
        })
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_keeps_retrying_on_a_full_disk_and_resumes_to_equality_when_space_returns() {
    if cannot_mount().is_some() {
        return;
    }
    let env = TestEnv::with_encounters(82, ENCOUNTERS).await;
    env.write_key_file(&env.sim.api_key());
    let disk = Tmpfs::mount("3m");
    let db = disk.path().join("warehouse.db");
    // A cycle every second: a failed cycle is retried at the next fire (sooner than the backoff).
    let config = config_file(&env, &db, "schedule = \"* * * * * *\"\n", "");
    let mut run = charthero_sync();
    run.arg("--config")
        .arg(&config)
        .arg("run")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut daemon = KillOnDrop(run.spawn().unwrap());
    let log = collect_stderr(&mut daemon);
    let full = format!("the disk holding database {} is full (", db.display());
    let failures = || {
        log.lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains("cycle failed") && l.contains(&full) && l.contains("bytes free"))
            .count()
    };
    // Failed cycles, one after the other, and the daemon is still running.
    wait_for(
        "two failed cycles on the full disk",
        Duration::from_secs(120),
        || failures() >= 2,
    )
    .await;
    assert!(daemon.try_wait().unwrap().is_none(), "{:?}", log.lock().unwrap());
    assert!(
        log.lock().unwrap().iter().any(|l| l.contains("disk_full")),
        "the log names the reason_code: {:?}",
        log.lock().unwrap()
    );

    disk.resize("64m");
    wait_for(
        "a successful cycle after space returned",
        Duration::from_secs(120),
        || succeeded_runs(&db) > 0,
    )
    .await;
    compare(&env.sim, &db).assert_empty();
    assert_eq!(compare_content(&env.sim, &db), Vec::<String>::new());
    assert_eq!(
        stop_daemon(&mut daemon, Some("-TERM"), Duration::from_secs(30)).await,
        Some(0),
        "{:?}",
        log.lock().unwrap()
    );
    drop(disk);
}

/// Overwrites every page of `db` but the first (the header and the schema's root) with bytes
/// no b-tree page can start with.
fn damage_pages(db: &Path) {
    let conn = rusqlite::Connection::open(db).unwrap();
    let page: i64 = conn.query_row("PRAGMA page_size", [], |r| r.get(0)).unwrap();
    let page = u64::try_from(page).unwrap();
    drop(conn);
    // In place, never truncated: a reader must not see a short file, only damaged pages.
    let mut file = std::fs::OpenOptions::new().write(true).open(db).unwrap();
    let len = file.metadata().unwrap().len();
    assert!(len > 4 * page, "{len} bytes");
    file.seek(SeekFrom::Start(page)).unwrap();
    file.write_all(&vec![0xa5_u8; usize::try_from(len - page).unwrap()])
        .unwrap();
    file.sync_all().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_warehouse_stops_sync_run_migrate_check_and_status_with_exit_5_naming_the_path() {
    let env = TestEnv::with_encounters(83, 20).await;
    env.write_key_file(&env.sim.api_key());
    let config = env.write_config_file(ENCOUNTERS_ONLY);
    let db = env.db_path();
    let all_say_corrupt = |commands: &'static [&'static str]| {
        let (config, db) = (config.clone(), db.clone());
        async move {
            for command in commands {
                let mut cmd = charthero_sync();
                cmd.arg("--config").arg(&config).arg(command);
                let out = run_within(cmd, Duration::from_secs(30)).await;
                let said = text(&out);
                assert_eq!(out.status.code(), Some(5), "{command}: {said}");
                assert!(
                    said.contains(&format!("database {} is corrupt", db.display())),
                    "{command}: {said}"
                );
            }
        }
    };
    // Not a database at all.
    std::fs::write(&db, vec![0x5a_u8; 16 * 1024]).unwrap();
    all_say_corrupt(&["sync", "run", "migrate", "check", "status"]).await;
    // A synced warehouse whose pages were damaged: `migrate`, `check` and `status` said it was
    // up to date, ok, or printed SQLite's message without the file.
    std::fs::remove_file(&db).unwrap();
    let mut sync = charthero_sync();
    sync.arg("--config").arg(&config).arg("sync");
    let out = run_within(sync, Duration::from_secs(30)).await;
    assert!(out.status.success(), "{}", text(&out));
    damage_pages(&db);
    all_say_corrupt(&["migrate", "check", "status"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_whose_warehouse_turns_corrupt_says_stopping_and_exits_5() {
    let env = TestEnv::with_encounters(84, 300).await;
    env.write_key_file(&env.sim.api_key());
    // One live cycle a year: after the first, the daemon only polls the backfill queue.
    let db = env.db_path();
    let config = config_file(&env, &db, "schedule = \"0 0 0 1 1 *\"\n", ENCOUNTERS_ONLY);
    let socket_path = env.dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    let mut run = charthero_sync();
    run.arg("--config")
        .arg(&config)
        .arg("run")
        .env("NOTIFY_SOCKET", &socket_path)
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut daemon = KillOnDrop(run.spawn().unwrap());
    let log = collect_stderr(&mut daemon);
    wait_for("the first cycle", Duration::from_secs(60), || {
        succeeded_runs(&db) > 0
    })
    .await;

    // Everything into the database file, then one write of ours into the WAL, which makes the
    // daemon drop its page cache and read the (then damaged) file again.
    let conn = rusqlite::Connection::open(&db).unwrap();
    conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
        .unwrap();
    conn.execute(
        "INSERT INTO sync_state (name, value) VALUES ('test_marker', 'x')",
        [],
    )
    .unwrap();
    drop(conn);
    damage_pages(&db);

    let code = stop_daemon(&mut daemon, None, Duration::from_secs(30)).await;
    let said = log.lock().unwrap().join("\n");
    assert_eq!(code, Some(5), "{said}");
    assert!(
        said.contains(&format!("database {} is corrupt", db.display())),
        "{said}"
    );
    socket.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
    let mut buf = [0u8; 4096];
    let mut stopping = false;
    while let Ok(n) = socket.recv(&mut buf) {
        stopping |= String::from_utf8_lossy(&buf[..n]).contains("STOPPING=1");
    }
    assert!(stopping, "no STOPPING=1 before exit 5");
}

#[test]
fn the_corrupt_exit_code_is_documented_and_systemd_does_not_restart_on_it() {
    let code = charthero_sync::exit::STORE_CORRUPT;
    let read =
        |file: &str| std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(file)).unwrap();
    assert!(read("README.md").contains(&format!("| {code} | the warehouse is corrupt")));
    assert!(read("docs/operations.md").contains(&format!("exits **{code}**")));
    let prevented = crate::support::restart_prevented("charthero-sync.service");
    assert!(prevented.contains(&code.to_string()), "{prevented:?}");
}
