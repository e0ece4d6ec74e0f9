//! The PostgreSQL warehouse's operations against a real server: verified TLS to a private CA
//! (`database.ca_file`) and its refusal with another CA, the password from its file and the
//! message of a wrong one (naming the sources, never the password), the schema a role may not
//! create, and the one-writer advisory lock per schema. The server is a throwaway cluster of
//! the distribution's PostgreSQL with `ssl = on` and SCRAM passwords over TCP, its CA and
//! certificate made by `openssl` in a temp dir, on loopback port 55442. Without PostgreSQL or
//! openssl the tests skip, unless `CHARTHERO_REQUIRE_POSTGRES=1` (CI), where they fail.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use charthero_sync::config::{Config, DatabaseTarget, PostgresConfig};
use charthero_sync::daemon::lock::{LockError, WriterLock};
use charthero_sync::store::{self, Transport};

const PORT: u16 = 55442;
/// The password of role `warehouse_writer`; no error or log may show it.
const PASSWORD: &str = "pw_canary_right_4711";

/// The throwaway cluster; stopped (immediate mode) and deleted when dropped.
struct TlsCluster {
    dir: tempfile::TempDir,
    bin: PathBuf,
}

impl TlsCluster {
    fn ca(&self) -> PathBuf {
        self.dir.path().join("ca.crt")
    }

    fn other_ca(&self) -> PathBuf {
        self.dir.path().join("other-ca.crt")
    }

    fn psql(&self, sql: &str) {
        let out = Command::new("runuser")
            .args(["-u", "pgtest", "--"])
            .arg(self.bin.join("psql"))
            .args([
                "-h",
                &self.dir.path().display().to_string(),
                "-p",
                &PORT.to_string(),
            ])
            .args([
                "-U",
                "postgres",
                "-d",
                "postgres",
                "-v",
                "ON_ERROR_STOP=1",
                "-c",
                sql,
            ])
            .output()
            .expect("psql runs");
        assert!(
            out.status.success(),
            "psql {sql}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for TlsCluster {
    fn drop(&mut self) {
        let _ = Command::new("runuser")
            .args(["-u", "pgtest", "--"])
            .arg(self.bin.join("pg_ctl"))
            .args([
                "-D",
                &self.dir.path().join("data").display().to_string(),
                "-m",
                "immediate",
                "stop",
            ])
            .output();
    }
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A self-signed CA in `dir/<name>.crt` (key `<name>.key`).
fn make_ca(dir: &Path, name: &str) {
    run(Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
        ])
        .arg(format!("/CN=charthero test {name}"))
        .args([
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign",
        ])
        .arg("-keyout")
        .arg(dir.join(format!("{name}.key")))
        .arg("-out")
        .arg(dir.join(format!("{name}.crt"))));
}

/// The server's key and certificate for 127.0.0.1 and localhost, issued by `ca`.
fn make_server_cert(dir: &Path) {
    let (key, csr, crt) = (
        dir.join("server.key"),
        dir.join("server.csr"),
        dir.join("server.crt"),
    );
    run(Command::new("openssl")
        .args([
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=127.0.0.1",
            "-keyout",
        ])
        .arg(&key)
        .arg("-out")
        .arg(&csr));
    let ext = dir.join("server.ext");
    std::fs::write(
        &ext,
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n",
    )
    .unwrap();
    run(Command::new("openssl")
        .args(["x509", "-req", "-days", "2", "-CAcreateserial", "-in"])
        .arg(&csr)
        .arg("-CA")
        .arg(dir.join("ca.crt"))
        .arg("-CAkey")
        .arg(dir.join("ca.key"))
        .arg("-extfile")
        .arg(&ext)
        .arg("-out")
        .arg(&crt));
}

fn postgres_bin() -> Option<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|bin| bin.join("initdb").exists())
        .collect();
    found.sort();
    found.pop()
}

/// A new cluster, or `None` (with the reason printed) where this machine cannot run one and
/// PostgreSQL is not required. It stops when dropped.
fn cluster() -> Option<TlsCluster> {
    let required = std::env::var_os("CHARTHERO_REQUIRE_POSTGRES").is_some_and(|v| v == "1");
    let missing = match postgres_bin() {
        None => Some("no PostgreSQL server (/usr/lib/postgresql/*/bin/initdb)"),
        Some(_) if Command::new("openssl").arg("version").output().is_err() => Some("no openssl"),
        Some(_) if !rustix::process::geteuid().is_root() => {
            Some("not root (the cluster runs as the unprivileged user pgtest)")
        }
        Some(bin) => return Some(start_cluster(bin)),
    };
    let why = missing.unwrap_or_default();
    assert!(!required, "CHARTHERO_REQUIRE_POSTGRES=1 but {why}");
    eprintln!("skipped: {why}");
    None
}

/// One cluster for every check (initdb and two CAs take seconds; the port is fixed).
#[test]
fn tls_passwords_schemas_and_the_writer_lock_work_against_a_real_server() {
    let Some(cluster) = cluster() else { return };
    tls_is_verified_against_ca_file_and_another_ca_is_refused_naming_ca_file(&cluster);
    a_wrong_password_names_its_sources_and_never_the_password();
    a_schema_the_role_may_not_create_is_a_clear_error();
    one_writer_per_schema_the_second_is_refused_naming_the_holder();
    check_reports_tls_the_server_the_schema_and_the_readers_role(&cluster);
}

fn start_cluster(bin: PathBuf) -> TlsCluster {
    if Command::new("id")
        .arg("pgtest")
        .output()
        .is_ok_and(|o| !o.status.success())
    {
        run(Command::new("useradd").args(["-r", "-M", "pgtest"]));
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    make_ca(dir.path(), "ca");
    make_ca(dir.path(), "other-ca");
    make_server_cert(dir.path());
    let data = dir.path().join("data");
    run(Command::new("chown").arg("pgtest").arg(dir.path()));
    run(Command::new("runuser")
        .args(["-u", "pgtest", "--"])
        .arg(bin.join("initdb"))
        .args(["-A", "trust", "-U", "postgres", "-D"])
        .arg(&data));
    for f in ["server.key", "server.crt"] {
        let to = data.join(f);
        std::fs::copy(dir.path().join(f), &to).unwrap();
        run(Command::new("chown").arg("pgtest").arg(&to));
        std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    // Passwords over TCP (TLS or not); the unix socket, the test's own psql, trusts.
    std::fs::write(
        data.join("pg_hba.conf"),
        "local all all trust\nhost all all 127.0.0.1/32 scram-sha-256\n",
    )
    .unwrap();
    let log = dir.path().join("log");
    run(Command::new("runuser")
        .args(["-u", "pgtest", "--"])
        .arg(bin.join("pg_ctl"))
        .arg("-D")
        .arg(&data)
        .arg("-l")
        .arg(&log)
        .arg("-o")
        .arg(format!(
            "-p {PORT} -k {} -c listen_addresses=127.0.0.1 -c ssl=on -c password_encryption=scram-sha-256",
            dir.path().display()
        ))
        .args(["-w", "start"]));
    let cluster = TlsCluster { dir, bin };
    cluster.psql(&format!(
        "CREATE ROLE warehouse_writer LOGIN PASSWORD '{PASSWORD}'; \
         CREATE ROLE no_create LOGIN PASSWORD '{PASSWORD}'"
    ));
    cluster.psql("CREATE DATABASE warehouse OWNER warehouse_writer");
    cluster
}

/// A validated PostgreSQL configuration for this cluster: `url` query options appended, the
/// password in a 0600 file holding `password`.
fn pg_config(
    dir: &Path,
    user: &str,
    options: &str,
    schema: &str,
    password: &str,
    ca: Option<&Path>,
) -> PostgresConfig {
    let password_file = dir.join(format!("password-{user}-{schema}"));
    std::fs::write(&password_file, format!("{password}\n")).unwrap();
    std::fs::set_permissions(&password_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let mut text = format!(
        "[database]\nurl = \"postgresql://{user}@127.0.0.1:{PORT}/warehouse{options}\"\nschema = \"{schema}\"\n\
         password_file = \"{}\"\n",
        password_file.display()
    );
    if let Some(ca) = ca {
        text.push_str(&format!("ca_file = \"{}\"\n", ca.display()));
    }
    let config = Config::parse(&text, Path::new("test.toml")).unwrap();
    match config.database.target {
        DatabaseTarget::Postgres(pg) => pg,
        DatabaseTarget::Sqlite { .. } => unreachable!("a url is a PostgreSQL target"),
    }
}

fn tls_is_verified_against_ca_file_and_another_ca_is_refused_naming_ca_file(cluster: &TlsCluster) {
    let dir = tempfile::tempdir().unwrap();

    let pg = pg_config(
        dir.path(),
        "warehouse_writer",
        "?sslmode=require",
        "tls_ok",
        PASSWORD,
        Some(&cluster.ca()),
    );
    let report = store::describe_postgres(&pg).expect("verified TLS to the private CA");
    assert_eq!(report.transport, Transport::VerifiedTls);
    assert!(report.server_version.starts_with(char::is_numeric), "{report:?}");
    assert_eq!(report.schema_version, None);

    let wrong = cluster.other_ca();
    let pg = pg_config(
        dir.path(),
        "warehouse_writer",
        "?sslmode=require",
        "tls_ok",
        PASSWORD,
        Some(&wrong),
    );
    let err = format!("{:#}", store::describe_postgres(&pg).unwrap_err());
    assert!(err.contains("TLS failed"), "{err}");
    assert!(
        err.contains(&format!("database.ca_file {}", wrong.display())),
        "{err}"
    );

    // Without ca_file only the public roots are trusted: the private CA is not among them.
    let pg = pg_config(
        dir.path(),
        "warehouse_writer",
        "?sslmode=require",
        "tls_ok",
        PASSWORD,
        None,
    );
    let err = format!("{:#}", store::describe_postgres(&pg).unwrap_err());
    assert!(err.contains("set database.ca_file"), "{err}");

    // Loopback without sslmode=require goes without TLS.
    let pg = pg_config(dir.path(), "warehouse_writer", "", "tls_ok", PASSWORD, None);
    assert_eq!(store::describe_postgres(&pg).unwrap().transport, Transport::Local);
}

fn a_wrong_password_names_its_sources_and_never_the_password() {
    let dir = tempfile::tempdir().unwrap();
    let pg = pg_config(
        dir.path(),
        "warehouse_writer",
        "",
        "pw",
        "pw_canary_wrong_0815",
        None,
    );
    let err = store::open(&charthero_sync::config::DatabaseConfig {
        target: DatabaseTarget::Postgres(pg.clone()),
        ..charthero_sync::config::DatabaseConfig::sqlite(dir.path().join("unused.db"))
    })
    .map(drop)
    .unwrap_err();
    let text = format!("{err:#} {err:?}");
    assert!(
        text.contains("refused role warehouse_writer's credentials"),
        "{text}"
    );
    assert!(
        text.contains("the password came from the database.password_file"),
        "{text}"
    );
    assert!(!text.contains("canary"), "{text}");
    assert!(
        err.location()
            .starts_with("postgresql://warehouse_writer@127.0.0.1:55442/warehouse")
    );
}

fn a_schema_the_role_may_not_create_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let pg = pg_config(dir.path(), "no_create", "", "not_mine", PASSWORD, None);
    let err = format!(
        "{:#}",
        store::postgres::connect::connect(&pg, "charthero-sync test")
            .map(drop)
            .unwrap_err()
    );
    assert!(
        err.contains("schema not_mine does not exist and role no_create may not create it"),
        "{err}"
    );
    let err = format!(
        "{:#}",
        store::postgres::connect::connect_existing(&pg, "charthero-sync test")
            .map(drop)
            .unwrap_err()
    );
    assert!(err.contains("run `charthero-sync migrate` first"), "{err}");
    // The writer may create its schema; then it exists for readers too.
    let pg = pg_config(dir.path(), "warehouse_writer", "", "created_here", PASSWORD, None);
    store::postgres::connect::connect(&pg, "charthero-sync test").unwrap();
    store::postgres::connect::connect_existing(&pg, "charthero-sync test").unwrap();
}

fn one_writer_per_schema_the_second_is_refused_naming_the_holder() {
    let dir = tempfile::tempdir().unwrap();
    let target = |schema: &str| {
        DatabaseTarget::Postgres(pg_config(
            dir.path(),
            "warehouse_writer",
            "",
            schema,
            PASSWORD,
            None,
        ))
    };
    let first = WriterLock::acquire(&target("lock_a"), "charthero-sync run").unwrap();
    let err = WriterLock::acquire(&target("lock_a"), "charthero-sync sync").unwrap_err();
    let LockError::Held { database, holder } = &err else {
        panic!("{err:#}")
    };
    assert!(database.ends_with("(schema lock_a)"), "{database}");
    assert!(
        holder.contains(&format!("charthero-sync run (pid {})", std::process::id())),
        "{holder}"
    );
    assert!(
        err.to_string().contains("only one `run` or `sync` may write it"),
        "{err}"
    );
    // Another schema has its own writer.
    let other = WriterLock::acquire(&target("lock_b"), "charthero-sync run").unwrap();
    drop(first);
    let again = WriterLock::acquire(&target("lock_a"), "charthero-sync sync").unwrap();
    drop((other, again));
}

fn check_reports_tls_the_server_the_schema_and_the_readers_role(cluster: &TlsCluster) {
    let dir = tempfile::tempdir().unwrap();
    let pg = pg_config(
        dir.path(),
        "warehouse_writer",
        "?sslmode=require",
        "checked",
        PASSWORD,
        Some(&cluster.ca()),
    );
    let database = charthero_sync::config::DatabaseConfig {
        target: DatabaseTarget::Postgres(pg),
        ..charthero_sync::config::DatabaseConfig::sqlite(dir.path().join("unused.db"))
    };
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (lines, outcome) = runtime.block_on(charthero_sync::check::check_database(&database));
    let text = lines.join("\n");
    assert!(outcome.is_ok(), "{text}");
    assert!(
        text.contains("database.url     ok      postgresql://warehouse_writer@127.0.0.1:55442/warehouse (schema checked)"),
        "{text}"
    );
    assert!(
        text.contains("database.tls     ok      TLS, certificate verified"),
        "{text}"
    );
    assert!(text.contains("database.server  ok      PostgreSQL 1"), "{text}");
    assert!(
        text.contains("database.schema  note    not created yet"),
        "{text}"
    );
    assert!(text.contains("database.readers"), "{text}");
    assert!(!text.contains(PASSWORD), "{text}");
    // A server that does not answer fails the check, naming the target and what to check.
    let unreachable = Config::parse(
        "[database]\nurl = \"postgresql://warehouse_writer@127.0.0.1:1/warehouse\"\n",
        Path::new("test.toml"),
    )
    .unwrap()
    .database;
    let (lines, outcome) = runtime.block_on(charthero_sync::check::check_database(&unreachable));
    assert!(outcome.is_err());
    let text = lines.join("\n");
    assert!(
        text.contains("database.url     FAILED") && text.contains("host and port"),
        "{text}"
    );
}
