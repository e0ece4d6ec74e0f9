//! A fresh install, exactly as `docs/operations.md` describes it, run as the service user the
//! way `systemd/charthero-sync.service` runs it (its `User=`, `Group=`, `UMask=` and
//! `LoadCredential=`), against the simulator: `check`, `sync` and `status` succeed, and an
//! analyst who is only in the readers group reads the warehouse with `sqlite3 -readonly` while
//! `run` writes and after it stopped.
//!
//! It creates real users and groups, so it needs root (CI runs as root); elsewhere it prints why
//! it was skipped. Names are unique per run and removed by a drop guard, even on failure.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use charthero_sim::NewEncounter;
use time::OffsetDateTime;

use crate::support::{TestEnv, run_within, text};

/// The runbook's install lines, verbatim: each must appear in docs/operations.md, and the test
/// runs them with its own names and paths substituted.
const RUNBOOK_INSTALL: &[&str] = &[
    "install -m 0755 target/release/charthero-sync /usr/local/bin/charthero-sync",
    "groupadd --system charthero-readers",
    "useradd --system --gid charthero-readers --home-dir /var/lib/charthero-sync --shell /usr/sbin/nologin charthero-sync",
    "install -d -o charthero-sync -g charthero-readers -m 0750 /var/lib/charthero-sync",
    "usermod -aG charthero-readers alice",
    "install -d -m 0755 /etc/charthero-sync",
    "install -m 0644 config.example.toml /etc/charthero-sync/config.toml",
    "install -m 0600 /dev/null /etc/charthero-sync/api-key",
    "printf '%s\\n' 'ch_sk_...' > /etc/charthero-sync/api-key",
];

/// The runbook's pre-flight check, verbatim.
const RUNBOOK_CHECK: &str = "CHARTHERO_API_KEY=\"$(cat /etc/charthero-sync/api-key)\" runuser -u charthero-sync -- \\\n    charthero-sync --config /etc/charthero-sync/config.toml check";

/// Removes the users and groups (and stops the daemon) whatever happens to the test.
#[derive(Default)]
struct Cleanup {
    users: Vec<String>,
    groups: Vec<String>,
    daemon: Option<Child>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Some(mut child) = self.daemon.take() {
            child.kill().ok();
            child.wait().ok();
        }
        for user in &self.users {
            Command::new("userdel").arg(user).output().ok();
        }
        for group in &self.groups {
            Command::new("groupdel").arg(group).output().ok();
        }
    }
}

/// This run's names and paths in place of the runbook's.
struct Install {
    service_user: String,
    readers: String,
    analyst: String,
    /// Stands for `/`: `etc`, `state` (/var/lib/charthero-sync), `bin` (/usr/local/bin) below it.
    root: PathBuf,
    key: String,
}

impl Install {
    fn etc(&self) -> PathBuf {
        self.root.join("etc")
    }
    fn state(&self) -> PathBuf {
        self.root.join("state")
    }
    fn bin(&self) -> PathBuf {
        self.root.join("bin").join("charthero-sync")
    }
    fn db(&self) -> PathBuf {
        self.state().join("warehouse.db")
    }

    /// A runbook line with this run's names and paths.
    fn localize(&self, line: &str) -> String {
        let repo = env!("CARGO_MANIFEST_DIR");
        // Paths first, through placeholders, so that the user name inside them survives.
        line.replace("/var/lib/charthero-sync", "\u{1}STATE\u{1}")
            .replace("/etc/charthero-sync", "\u{1}ETC\u{1}")
            .replace("/usr/local/bin/charthero-sync", "\u{1}BIN\u{1}")
            .replace("target/release/charthero-sync", "\u{1}BUILT\u{1}")
            .replace("charthero-sync --config", "\u{1}BIN\u{1} --config")
            .replace("config.example.toml", &format!("{repo}/config.example.toml"))
            .replace("charthero-readers", &self.readers)
            .replace("charthero-sync", &self.service_user)
            .replace("alice", &self.analyst)
            .replace("'ch_sk_...'", &format!("'{}'", self.key))
            .replace("\u{1}STATE\u{1}", &self.state().display().to_string())
            .replace("\u{1}ETC\u{1}", &self.etc().display().to_string())
            .replace("\u{1}BIN\u{1}", &self.bin().display().to_string())
            .replace("\u{1}BUILT\u{1}", env!("CARGO_BIN_EXE_charthero-sync"))
    }
}

fn sh(script: &str) -> Output {
    let out = Command::new("sh").args(["-c", script]).output().unwrap();
    assert!(out.status.success(), "`{script}` failed: {}", text(&out));
    out
}

/// `Key=value` of the unit file (the last one wins, as in systemd).
fn unit_setting(unit: &str, key: &str) -> Option<String> {
    unit.lines()
        .filter_map(|l| l.trim().strip_prefix(&format!("{key}=")))
        .next_back()
        .map(str::to_owned)
}

fn gid_of(group: &str) -> u32 {
    let out = sh(&format!("getent group {group}"));
    String::from_utf8_lossy(&out.stdout)
        .split(':')
        .nth(2)
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// What the service runs as, read from the unit and mapped to this run's names.
struct ServiceIdentity {
    user: String,
    group: String,
    umask: String,
    credential_name: String,
    credential_source: PathBuf,
}

impl ServiceIdentity {
    fn from_unit(install: &Install) -> ServiceIdentity {
        let unit = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/systemd/charthero-sync.service"
        ))
        .unwrap();
        let setting = |k: &str| unit_setting(&unit, k).unwrap_or_else(|| panic!("the unit sets no {k}="));
        assert_eq!(setting("User"), "charthero-sync");
        assert!(
            unit_setting(&unit, "SupplementaryGroups").is_none_or(|g| g.trim().is_empty()),
            "the test maps Group= only; extend it for SupplementaryGroups="
        );
        let (name, source) = setting("LoadCredential")
            .split_once(':')
            .map(|(n, s)| (n.to_owned(), s.to_owned()))
            .unwrap();
        ServiceIdentity {
            user: install.localize(&setting("User")),
            group: install.localize(&setting("Group")),
            umask: setting("UMask"),
            credential_name: name,
            credential_source: PathBuf::from(install.localize(&source)),
        }
    }

    /// A command run as the service: its user, group and umask, and (like LoadCredential=)
    /// the key in a credentials directory only it can read.
    fn command(&self, credentials: &Path, bin: &Path, args: &[&str]) -> Command {
        let mut cmd = Command::new("setpriv");
        cmd.args([
            "--reuid",
            &self.user,
            "--regid",
            &self.group,
            "--init-groups",
            "--",
        ])
        .args(["sh", "-c", &format!("umask {} && exec \"$0\" \"$@\"", self.umask)])
        .arg(bin)
        .args(args)
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("CREDENTIALS_DIRECTORY", credentials)
        .env("RUST_LOG", "warn");
        cmd
    }
}

/// A command run as the analyst (only in the readers group), with a bare environment.
fn as_analyst(install: &Install, program: &str) -> Command {
    let mut cmd = Command::new("setpriv");
    cmd.args([
        "--reuid",
        &install.analyst,
        "--regid",
        "users",
        "--init-groups",
        "--",
        program,
    ])
    .env_clear()
    .env("PATH", "/usr/bin:/bin");
    cmd
}

/// The analyst reading, as the runbook tells analysts to.
fn analyst_reads(install: &Install, sql: &str) -> Output {
    as_analyst(install, "sqlite3")
        .args(["-readonly", "-cmd", ".timeout 5000"])
        .arg(install.db())
        .arg(sql)
        .output()
        .unwrap()
}

fn analyst_count(install: &Install) -> Result<i64, String> {
    let out = analyst_reads(install, "SELECT count(*) FROM encounters;");
    if !out.status.success() {
        return Err(text(&out));
    }
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .map_err(|e| format!("{e}: {}", text(&out)))
}

/// Why this machine cannot run the test, if it cannot.
fn missing_prerequisite() -> Option<String> {
    if !rustix::process::geteuid().is_root() {
        return Some("not running as root (it creates users and groups)".into());
    }
    for tool in [
        "useradd", "groupadd", "usermod", "userdel", "setpriv", "runuser", "sqlite3", "getent",
    ] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !found {
            return Some(format!("{tool} is not installed"));
        }
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_runbook_install_runs_as_the_service_user_and_readers_can_read_while_run_writes_and_after() {
    if let Some(why) = missing_prerequisite() {
        // CI runs as root with the tools .ci/run installs: there, skipping would hide a failure.
        assert!(
            std::env::var_os("CI").is_none(),
            "cannot run the install test in CI: {why}"
        );
        println!("skipped: {why}");
        return;
    }
    let docs = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/operations.md")).unwrap();
    for line in RUNBOOK_INSTALL.iter().chain([&RUNBOOK_CHECK]) {
        assert!(docs.contains(line), "docs/operations.md no longer says:\n{line}");
    }

    let env = TestEnv::with_encounters(71, 120).await;
    let tag = format!(
        "{:05x}",
        (std::process::id() ^ OffsetDateTime::now_utc().nanosecond()) & 0xfffff
    );
    let root = tempfile::Builder::new()
        .prefix("charthero-install-")
        .tempdir()
        .unwrap();
    std::fs::set_permissions(root.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let install = Install {
        service_user: format!("chsvc-{tag}"),
        readers: format!("chread-{tag}"),
        analyst: format!("chana-{tag}"),
        root: root.path().to_owned(),
        key: env.sim.api_key(),
    };
    let mut cleanup = Cleanup {
        users: vec![install.service_user.clone(), install.analyst.clone()],
        groups: vec![install.readers.clone()],
        daemon: None,
    };
    std::fs::create_dir(root.path().join("bin")).unwrap();
    // alice exists before the runbook adds her to the readers; her own group is `users`.
    sh(&format!(
        "useradd --no-create-home --no-user-group --shell /bin/sh {}",
        install.analyst
    ));
    for line in RUNBOOK_INSTALL {
        sh(&install.localize(line));
    }

    // "Edit /etc/charthero-sync/config.toml": the host, where to start, a faster rate for a
    // simulator, the schedule; every line replaced must exist in the shipped example.
    let config_path = install.etc().join("config.toml");
    let mut config = std::fs::read_to_string(&config_path).unwrap();
    let start_at = charthero_sync::timefmt::format_utc(OffsetDateTime::now_utc() - time::Duration::days(61));
    for (from, to) in [
        (
            "base_url = \"https://api.example.test\"".to_owned(),
            format!("base_url = \"{}\"", env.sim.base_url()),
        ),
        (
            "start_at = \"2026-01-01T00:00:00Z\"".to_owned(),
            format!("start_at = \"{start_at}\""),
        ),
        (
            "schedule = \"0 */5 * * * *\"".to_owned(),
            "schedule = \"*/2 * * * * *\"".to_owned(),
        ),
        (
            "requests_per_second = 5.0".to_owned(),
            "requests_per_second = 2000.0".to_owned(),
        ),
        ("burst = 5".to_owned(), "burst = 100".to_owned()),
        ("settle_lag = \"2m\"".to_owned(), "settle_lag = \"0s\"".to_owned()),
    ] {
        assert!(config.contains(&from), "config.example.toml no longer has {from}");
        config = config.replace(&from, &to);
    }
    // The shipped paths, moved under this test's root like everything else.
    config = install.localize(&config);
    std::fs::write(&config_path, config).unwrap();

    // The pre-flight check, as the runbook runs it (the key from the environment).
    let out = sh(&install.localize(RUNBOOK_CHECK));
    assert!(
        text(&out).contains("everything this configuration needs works"),
        "{}",
        text(&out)
    );

    // LoadCredential=: a directory only the service can read, holding a copy of the key file.
    let service = ServiceIdentity::from_unit(&install);
    let credentials = root.path().join("credentials");
    std::fs::create_dir(&credentials).unwrap();
    let credential = credentials.join(&service.credential_name);
    std::fs::copy(&service.credential_source, &credential).unwrap();
    sh(&format!(
        "chown -R {user} {dir} && chmod 0400 {file} && chmod 0500 {dir}",
        user = install.service_user,
        dir = credentials.display(),
        file = credential.display()
    ));
    let config_arg = config_path.display().to_string();
    let as_service = |args: &[&str]| {
        let mut all = vec!["--config", &config_arg];
        all.extend_from_slice(args);
        service.command(&credentials, &install.bin(), &all)
    };

    // check, sync, status as the service (the shipped api_key_file is root's: skipped).
    for args in [&["check"][..], &["sync"], &["status"]] {
        let out = run_within(as_service(args), Duration::from_secs(120)).await;
        assert_eq!(
            out.status.code(),
            Some(0),
            "{args:?} as the service: {}",
            text(&out)
        );
    }
    assert_eq!(analyst_count(&install), Ok(120), "the analyst reads after sync");

    // Every file of the warehouse belongs to the readers and is closed to others.
    let readers_gid = gid_of(&install.readers);
    for name in ["warehouse.db", "warehouse.db-wal", "warehouse.db-shm"] {
        let meta = std::fs::metadata(install.state().join(name))
            .unwrap_or_else(|e| panic!("{name} is missing after sync: {e}"));
        assert_eq!(meta.gid(), readers_gid, "{name} is not in the readers group");
        assert_eq!(
            meta.mode() & 0o047,
            0o040,
            "{name}: group may read, others nothing ({:o})",
            meta.mode()
        );
    }
    // Read-only means read-only.
    let out = analyst_reads(&install, "DELETE FROM encounters;");
    assert!(!out.status.success(), "the analyst could write: {}", text(&out));

    // An operator runs a writing command as root (reading the key file directly): the files
    // stay the service's, so the daemon can still write them afterwards.
    let mut as_root = Command::new(install.bin());
    as_root
        .args(["--config", &config_arg, "sync"])
        .env_remove("CHARTHERO_API_KEY")
        .env_remove("CREDENTIALS_DIRECTORY");
    let out = run_within(as_root, Duration::from_secs(120)).await;
    assert_eq!(out.status.code(), Some(0), "sync as root: {}", text(&out));
    let service_uid: u32 = String::from_utf8_lossy(&sh(&format!("id -u {}", install.service_user)).stdout)
        .trim()
        .parse()
        .unwrap();
    for name in [
        "warehouse.db",
        "warehouse.db-wal",
        "warehouse.db-shm",
        "warehouse.db.lock",
    ] {
        let meta = std::fs::metadata(install.state().join(name)).unwrap();
        assert_eq!(
            (meta.uid(), meta.gid()),
            (service_uid, readers_gid),
            "{name} after a sync as root"
        );
    }
    // The lock file is the service's alone: a reader who could open it could lock it and keep
    // the service from starting.
    let lock = install.state().join("warehouse.db.lock");
    assert_eq!(std::fs::metadata(&lock).unwrap().mode() & 0o777, 0o600);
    let out = as_analyst(&install, "flock")
        .args(["--shared", "--nonblock"])
        .arg(&lock)
        .arg("true")
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "the analyst locked {}: {}",
        lock.display(),
        text(&out)
    );

    // While `run` writes: new encounters arrive, cycles run every 2 s, the analyst keeps reading.
    let mut daemon = as_service(&["run"]);
    daemon.stdout(Stdio::null()).stderr(Stdio::piped());
    cleanup.daemon = Some(daemon.spawn().unwrap());
    let started = Instant::now();
    let mut reads = 0;
    let mut grew = false;
    while started.elapsed() < Duration::from_secs(12) {
        env.sim.insert(NewEncounter::at(
            OffsetDateTime::now_utc() - time::Duration::seconds(1),
        ));
        match analyst_count(&install) {
            Ok(n) => {
                reads += 1;
                grew |= n > 120;
            }
            Err(e) => panic!("the analyst could not read while run writes: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert!(reads > 10 && grew, "{reads} reads; saw new rows: {grew}");

    let mut daemon = cleanup.daemon.take().unwrap();
    assert!(
        Command::new("kill")
            .args(["-TERM", &daemon.id().to_string()])
            .status()
            .unwrap()
            .success()
    );
    let status = tokio::task::spawn_blocking(move || {
        let status = daemon.wait().unwrap();
        let mut err = String::new();
        std::io::Read::read_to_string(&mut daemon.stderr.take().unwrap(), &mut err).ok();
        (status, err)
    });
    let (status, stderr) = tokio::time::timeout(Duration::from_secs(30), status)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(0), "run did not stop cleanly: {stderr}");

    // After it stopped: the -wal and -shm files are still there, and the analyst still reads.
    for name in ["warehouse.db-wal", "warehouse.db-shm"] {
        assert!(
            install.state().join(name).exists(),
            "{name} was removed when run stopped"
        );
    }
    let after = analyst_count(&install).expect("the analyst reads after run stopped");
    assert!(after > 120, "{after}");
    let status = run_within(as_service(&["status", "--json"]), Duration::from_secs(30)).await;
    assert_eq!(status.status.code(), Some(0), "{}", text(&status));
    drop(cleanup);
}
