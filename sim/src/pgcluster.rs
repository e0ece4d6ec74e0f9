//! A throwaway PostgreSQL cluster for tests and benchmarks: `initdb` in a temporary directory,
//! a server on a free loopback port (and a unix socket in that directory), one database and
//! login role per test ([`PgCluster::create_database`]), and SQL as the superuser
//! ([`PgCluster::psql`]).
//!
//! The server binaries are found in `CHARTHERO_PG_BINDIR`, else the newest
//! `/usr/lib/postgresql/*/bin`, else `PATH`; without them [`PgCluster::start`] answers why, and
//! tests skip ([`shared`], [`require_or_skip`]) unless `CHARTHERO_REQUIRE_POSTGRES=1` (CI) makes a
//! missing server a failure. PostgreSQL refuses to run as root: run as root, the server runs as
//! the system user `charthero-pgtest` (created if missing, and left in place: it owns nothing
//! once the cluster is gone). Authentication is real for everyone but the superuser: `postgres`
//! is trusted (on the socket and 127.0.0.1 only), every other role needs its SCRAM password.
//!
//! Nothing outlives the test process: dropping a cluster stops the server (`-m immediate`) and
//! removes its directory, and a watchdog shell started next to it does the same as soon as the
//! process that started it is gone — which is how the [`shared`] cluster, a `static` never
//! dropped, is cleaned up. It does not tune the server for speed (fsync stays on), so benchmarks
//! measure what a real server does.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};

/// The unprivileged system user the server runs as when the tests run as root.
const SERVER_USER: &str = "charthero-pgtest";

/// The superuser `initdb` creates (trusted on loopback and the socket).
const SUPERUSER: &str = "postgres";

/// A running throwaway cluster; dropping it stops the server and removes its directory.
pub struct PgCluster {
    dir: PathBuf,
    bindir: PathBuf,
    port: u16,
    /// `Some` when the server runs as [`SERVER_USER`] (the tests run as root).
    run_as: Option<String>,
    watchdog: Option<Child>,
}

/// A database and its owner role in a [`PgCluster`]; the role may log in with `password` only.
#[derive(Clone)]
pub struct PgDatabase {
    /// `postgresql://user@127.0.0.1:port/name`: no password in it.
    pub url: String,
    /// The owner role (it may log in, and create roles).
    pub user: String,
    /// The role's password (never shown by `Debug`).
    pub password: String,
    /// The database (the role's name too).
    pub name: String,
}

impl std::fmt::Debug for PgDatabase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgDatabase")
            .field("url", &self.url)
            .field("user", &self.user)
            .field("password", &"<redacted>")
            .field("name", &self.name)
            .finish()
    }
}

impl std::fmt::Debug for PgCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgCluster")
            .field("dir", &self.dir)
            .field("port", &self.port)
            .finish_non_exhaustive()
    }
}

/// The cluster this test process shares (one server, a database per test), started at the first
/// call. `None` (with the reason printed) when there is no PostgreSQL server to run; a panic
/// instead when `CHARTHERO_REQUIRE_POSTGRES=1`.
pub fn shared() -> Option<&'static PgCluster> {
    static SHARED: OnceLock<Result<PgCluster, String>> = OnceLock::new();
    skip_unless_required(
        SHARED
            .get_or_init(PgCluster::start)
            .as_ref()
            .map_err(Clone::clone),
    )
}

/// A cluster of the caller's own (a test that restarts or breaks the server), under the same
/// policy as [`shared`]: `None` with the reason printed, or a panic when PostgreSQL is required.
pub fn require_or_skip() -> Option<PgCluster> {
    skip_unless_required(PgCluster::start())
}

fn skip_unless_required<T>(started: Result<T, String>) -> Option<T> {
    match started {
        Ok(cluster) => Some(cluster),
        Err(reason) if std::env::var("CHARTHERO_REQUIRE_POSTGRES").is_ok_and(|v| v == "1") => {
            panic!("CHARTHERO_REQUIRE_POSTGRES=1 but no PostgreSQL server could be started: {reason}")
        }
        Err(reason) => {
            eprintln!("skipped: no PostgreSQL server for this test ({reason})");
            None
        }
    }
}

impl PgCluster {
    /// Creates and starts a cluster; `Err` says why it cannot (no binaries, `initdb` or the
    /// server failed).
    pub fn start() -> Result<PgCluster, String> {
        let bindir = find_bindir()?;
        let run_as = if rustix::process::geteuid().is_root() {
            ensure_server_user()?;
            Some(SERVER_USER.to_owned())
        } else {
            None
        };
        let dir = make_dir(run_as.as_deref())?;
        let mut cluster = PgCluster {
            dir,
            bindir,
            port: 0,
            run_as,
            watchdog: None,
        };
        // From here on, dropping `cluster` removes the directory (and stops a started server).
        cluster.watchdog = Some(cluster.spawn_watchdog()?);
        cluster.init()?;
        // Another process may take the port between our probe and the server's bind: try again.
        let mut last = String::new();
        for _ in 0..3 {
            cluster.port = free_port()?;
            match cluster.start_server() {
                Ok(()) => return Ok(cluster),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    /// The TCP port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The directory holding the server's unix socket.
    pub fn socket_dir(&self) -> &Path {
        &self.dir
    }

    /// A URL for the superuser (trusted, no password) and `database`.
    pub fn superuser_url(&self, database: &str) -> String {
        format!("postgresql://{SUPERUSER}@127.0.0.1:{}/{database}", self.port)
    }

    /// Creates a login role `name` (with a random password, and CREATEROLE so a migration can
    /// create `charthero_readers`), a database `name` it owns, and in it the schema `charthero`
    /// it owns (the warehouse's default schema). `name` is lower-case letters, digits and `_`.
    pub fn create_database(&self, name: &str) -> Result<PgDatabase, String> {
        let valid = !name.is_empty()
            && name.len() <= 63
            && name.starts_with(|c: char| c.is_ascii_lowercase())
            && name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if !valid {
            return Err(format!(
                "database name {name:?}: use 1 to 63 lower-case letters, digits and `_`, starting with a letter"
            ));
        }
        let password: String = std::iter::repeat_with(fastrand::alphanumeric).take(24).collect();
        self.psql(&format!(
            "CREATE ROLE {name} LOGIN CREATEROLE PASSWORD '{password}';\nCREATE DATABASE {name} OWNER {name};"
        ))?;
        self.psql_in(name, &format!("CREATE SCHEMA charthero AUTHORIZATION {name};"))?;
        Ok(PgDatabase {
            url: format!("postgresql://{name}@127.0.0.1:{}/{name}", self.port),
            user: name.to_owned(),
            password,
            name: name.to_owned(),
        })
    }

    /// Runs `sql` as the superuser in the database `postgres`; answers what psql printed
    /// (unaligned, tuples only), or its error.
    pub fn psql(&self, sql: &str) -> Result<String, String> {
        self.psql_in("postgres", sql)
    }

    /// Runs `sql` as the superuser in `database` (the SQL goes through stdin, never the command
    /// line, so a password in it is not visible to other processes).
    pub fn psql_in(&self, database: &str, sql: &str) -> Result<String, String> {
        use std::io::Write;
        let psql = self.tool("psql");
        let mut child = Command::new(&psql)
            .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h"])
            .arg(&self.dir)
            .args(["-p", &self.port.to_string(), "-U", SUPERUSER, "-d", database])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot run {}: {e}", psql.display()))?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin
                .write_all(sql.as_bytes())
                .map_err(|e| format!("cannot write to psql: {e}"))?;
        }
        let out = child
            .wait_with_output()
            .map_err(|e| format!("psql failed: {e}"))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(format!(
                "psql failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }

    /// The cluster's data directory (`base/` holds the databases' files), for tests that look
    /// at what the server keeps on disk.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// A binary of the server's installation, or the one on PATH (Debian's psql is a wrapper in
    /// /usr/bin).
    fn tool(&self, name: &str) -> PathBuf {
        let own = self.bindir.join(name);
        if own.is_file() { own } else { PathBuf::from(name) }
    }

    /// `program args…`, as the server user when the tests run as root, in the cluster directory
    /// (the server user may not be able to read the caller's working directory).
    fn server_command(&self, program: &Path) -> Command {
        let mut cmd = match &self.run_as {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.args(["-u", user, "--"]).arg(program);
                c
            }
            None => Command::new(program),
        };
        cmd.current_dir(&self.dir).stdin(Stdio::null());
        cmd
    }

    fn init(&self) -> Result<(), String> {
        let initdb = self.bindir.join("initdb");
        run(self.server_command(&initdb).arg("-D").arg(self.data_dir()).args([
            "-U",
            SUPERUSER,
            "-E",
            "UTF8",
            "--no-locale",
            "--no-instructions",
            "-A",
            "trust",
        ]))?;
        // Trust for the superuser on the socket and loopback only; a password for everyone else.
        let hba = format!(
            "local all {SUPERUSER} trust\n\
             host all {SUPERUSER} 127.0.0.1/32 trust\n\
             local all all scram-sha-256\n\
             host all all 127.0.0.1/32 scram-sha-256\n"
        );
        std::fs::write(self.data_dir().join("pg_hba.conf"), hba)
            .map_err(|e| format!("cannot write pg_hba.conf: {e}"))
    }

    /// Restarts the server on the same port (`pg_ctl restart -m fast`): every session is ended
    /// (open transactions roll back), and the server accepts connections again when this
    /// returns. For tests of clients that must survive a server restart.
    pub fn restart(&self) -> Result<(), String> {
        self.pg_ctl(&["-m", "fast"], "restart")
    }

    fn start_server(&self) -> Result<(), String> {
        self.pg_ctl(&[], "start")
    }

    /// `pg_ctl <args> <action>` with the server's options, waiting for it to be up.
    fn pg_ctl(&self, args: &[&str], action: &str) -> Result<(), String> {
        let options = format!(
            "-p {} -k '{}' -c listen_addresses=127.0.0.1 -c password_encryption=scram-sha-256",
            self.port,
            self.dir.display()
        );
        run(self
            .server_command(&self.bindir.join("pg_ctl"))
            .arg("-D")
            .arg(self.data_dir())
            .arg("-l")
            .arg(self.dir.join("server.log"))
            .args(args)
            .args(["-o", &options, "-w", "-t", "60", action]))
        .map_err(|e| {
            let log = std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default();
            format!("{e}; server log: {}", log.trim())
        })
    }

    /// A shell that waits for this process to end, then stops the server and removes the
    /// directory; in its own process group, so a Ctrl-C to the tests does not stop it first.
    fn spawn_watchdog(&self) -> Result<Child, String> {
        use std::os::unix::process::CommandExt;
        let script = r#"while kill -0 "$1" 2>/dev/null; do sleep 1; done
if [ -n "$5" ]; then runuser -u "$5" -- "$2" -D "$3" stop -m immediate; else "$2" -D "$3" stop -m immediate; fi
rm -rf "$4""#;
        Command::new("sh")
            .args(["-c", script, "pg-watchdog"])
            .arg(std::process::id().to_string())
            .arg(self.bindir.join("pg_ctl"))
            .arg(self.data_dir())
            .arg(&self.dir)
            .arg(self.run_as.as_deref().unwrap_or(""))
            .current_dir("/")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .map_err(|e| format!("cannot start the cluster's watchdog: {e}"))
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        if let Some(mut watchdog) = self.watchdog.take() {
            // Best effort: the watchdog would do the same after this process ends.
            let _ = watchdog.kill();
            let _ = watchdog.wait();
        }
        if self.data_dir().join("postmaster.pid").exists() {
            let _ = self
                .server_command(&self.bindir.join("pg_ctl"))
                .arg("-D")
                .arg(self.data_dir())
                .args(["stop", "-m", "immediate"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Runs a command to completion; `Err` carries its stderr.
fn run(cmd: &mut Command) -> Result<(), String> {
    let out = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .map_err(|e| format!("cannot run {:?}: {e}", cmd.get_program()))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{:?} failed ({}): {}",
            cmd.get_program(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// `CHARTHERO_PG_BINDIR`, else the newest `/usr/lib/postgresql/<version>/bin`, else the
/// directory on PATH that holds `initdb`.
fn find_bindir() -> Result<PathBuf, String> {
    let has_server = |d: &Path| d.join("initdb").is_file() && d.join("pg_ctl").is_file();
    if let Some(dir) = std::env::var_os("CHARTHERO_PG_BINDIR") {
        let dir = PathBuf::from(dir);
        return if has_server(&dir) {
            Ok(dir)
        } else {
            Err(format!(
                "CHARTHERO_PG_BINDIR={} has no initdb and pg_ctl",
                dir.display()
            ))
        };
    }
    let newest = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            has_server(&bin).then_some((version, bin))
        })
        .max_by_key(|(version, _)| *version);
    if let Some((_, bin)) = newest {
        return Ok(bin);
    }
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .find(|d| has_server(d))
        .ok_or_else(|| {
            "no PostgreSQL server binaries (initdb, pg_ctl) in CHARTHERO_PG_BINDIR, /usr/lib/postgresql/*/bin or PATH".to_owned()
        })
}

/// Creates [`SERVER_USER`] if it does not exist yet (another test process may be creating it at
/// the same moment: it is looked up again after a failed `useradd`).
fn ensure_server_user() -> Result<(), String> {
    let exists = || {
        Command::new("id")
            .arg(SERVER_USER)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if exists() {
        return Ok(());
    }
    let created = run(Command::new("useradd")
        .args(["--system", "--no-create-home", "--shell", "/usr/sbin/nologin"])
        .arg(SERVER_USER));
    match created {
        Ok(()) => Ok(()),
        Err(_) if exists() => Ok(()),
        Err(e) => Err(format!(
            "cannot create the user {SERVER_USER} to run PostgreSQL as: {e}"
        )),
    }
}

/// A new directory under the system's temporary directory, owned by `owner` when given.
fn make_dir(owner: Option<&str>) -> Result<PathBuf, String> {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "charthero-pg-{}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed),
        fastrand::u32(..)
    ));
    std::fs::create_dir(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    if let Some(user) = owner {
        let ids = |flag: &str| -> Result<u32, String> {
            let out = Command::new("id")
                .args([flag, user])
                .output()
                .map_err(|e| format!("cannot run id: {e}"))?;
            String::from_utf8_lossy(&out.stdout)
                .trim()
                .parse()
                .map_err(|_| format!("cannot find the user {user}"))
        };
        let owned = ids("-u").and_then(|uid| {
            let gid = ids("-g")?;
            std::os::unix::fs::chown(&dir, Some(uid), Some(gid))
                .map_err(|e| format!("cannot give {} to {user}: {e}", dir.display()))
        });
        if let Err(e) = owned {
            let _ = std::fs::remove_dir(&dir);
            return Err(e);
        }
    }
    Ok(dir)
}

/// A port on 127.0.0.1 nobody listens on right now.
fn free_port() -> Result<u16, String> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("cannot find a free port: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cluster_serves_password_logins_and_leaves_nothing_behind() {
        let Some(cluster) = require_or_skip() else {
            return;
        };
        let db = cluster.create_database("smoke").unwrap();
        assert!(!db.url.contains(&db.password));
        assert!(!format!("{db:?}").contains(&db.password));
        assert_eq!(cluster.psql("SELECT 1 + 1").unwrap().trim(), "2");
        let owner = cluster
            .psql_in(
                "smoke",
                "SELECT schema_owner FROM information_schema.schemata WHERE schema_name = 'charthero'",
            )
            .unwrap();
        assert_eq!(owner.trim(), "smoke");
        assert!(cluster.create_database("Robert'); DROP").is_err());
        let dir = cluster.socket_dir().to_owned();
        drop(cluster);
        assert!(!dir.exists(), "the cluster's directory outlived it");
    }
}
