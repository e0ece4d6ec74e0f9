//! The PostgreSQL warehouse's operations against a real server: verified TLS to a private CA
//! (`database.ca_file`) and its refusal with another CA, the password from its file and the
//! message of a wrong one (naming the sources, never the password), the schema a role may not
//! create, the one-writer advisory lock per schema, and `check`'s report. The server is a
//! throwaway cluster of its own (`charthero_sim::pgcluster`), switched to `ssl = on` with a CA
//! and certificate made by `openssl` in a temp dir. Without PostgreSQL or openssl the test
//! skips, unless `CHARTHERO_REQUIRE_POSTGRES=1` (CI), where it fails.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use charthero_sim::pgcluster::{self, PgCluster, PgDatabase};
use charthero_sync::config::{Config, DatabaseTarget, PostgresConfig};
use charthero_sync::daemon::lock::{LockError, WriterLock};
use charthero_sync::store::{self, Transport};

/// The password of role `pgops_no_create`; no error or log may show it (nor the cluster's
/// own random password of the database's owner).
const PASSWORD: &str = "pw_canary_right_4711";

/// A cluster serving TLS with a certificate for 127.0.0.1 from a private CA.
struct TlsCluster {
    cluster: PgCluster,
    /// The warehouse's database and its owner role.
    db: PgDatabase,
    certs: tempfile::TempDir,
}

impl TlsCluster {
    fn ca(&self) -> PathBuf {
        self.certs.path().join("ca.crt")
    }

    fn other_ca(&self) -> PathBuf {
        self.certs.path().join("other-ca.crt")
    }

    fn port(&self) -> u16 {
        self.cluster.port()
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

/// The server's key and certificate for 127.0.0.1 and localhost, issued by `dir/ca.crt`.
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

/// A cluster of its own (its TLS settings change), or `None` where there is no PostgreSQL or no
/// openssl and neither is required.
fn tls_cluster() -> Option<TlsCluster> {
    if Command::new("openssl").arg("version").output().is_err() {
        let required = std::env::var("CHARTHERO_REQUIRE_POSTGRES").is_ok_and(|v| v == "1");
        assert!(!required, "CHARTHERO_REQUIRE_POSTGRES=1 but openssl is missing");
        eprintln!("skipped: no openssl to make the test CA");
        return None;
    }
    let cluster = pgcluster::require_or_skip()?;
    let certs = tempfile::tempdir().unwrap();
    make_ca(certs.path(), "ca");
    make_ca(certs.path(), "other-ca");
    make_server_cert(certs.path());
    // The server reads its key and certificate from its own directory, owned by its user; it
    // refuses a key others may read.
    let server_dir = cluster.socket_dir();
    for f in ["server.key", "server.crt"] {
        let to = server_dir.join(format!("tls-{f}"));
        std::fs::copy(certs.path().join(f), &to).unwrap();
        std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o600)).unwrap();
        run(Command::new("chown").arg("--reference").arg(server_dir).arg(&to));
    }
    cluster
        .psql(&format!(
            "ALTER SYSTEM SET ssl_cert_file = '{}';\nALTER SYSTEM SET ssl_key_file = '{}';\n\
             ALTER SYSTEM SET ssl = on;\nSELECT pg_reload_conf();",
            server_dir.join("tls-server.crt").display(),
            server_dir.join("tls-server.key").display()
        ))
        .unwrap();
    // The reload is asynchronous: wait until new sessions see it.
    for _ in 0..50 {
        if cluster.psql("SHOW ssl").unwrap().trim() == "on" {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert_eq!(cluster.psql("SHOW ssl").unwrap().trim(), "on");
    let db = cluster.create_database("pgops").unwrap();
    cluster
        .psql(&format!(
            "CREATE ROLE pgops_no_create LOGIN PASSWORD '{PASSWORD}';"
        ))
        .unwrap();
    Some(TlsCluster { cluster, db, certs })
}

/// One cluster for every check (initdb and the CAs take seconds).
#[test]
fn tls_passwords_schemas_and_the_writer_lock_work_against_a_real_server() {
    let Some(cluster) = tls_cluster() else { return };
    tls_is_verified_against_ca_file_and_another_ca_is_refused_naming_ca_file(&cluster);
    a_wrong_password_names_its_sources_and_never_the_password(&cluster);
    a_schema_the_role_may_not_create_is_a_clear_error(&cluster);
    one_writer_per_schema_the_second_is_refused_naming_the_holder(&cluster);
    check_reports_tls_the_server_the_schema_and_the_readers_role(&cluster);
}

/// A validated PostgreSQL configuration for `user` on the cluster's database, query `options`
/// appended to the URL, the password in a 0600 file holding `password`.
fn pg_config(
    c: &TlsCluster,
    dir: &Path,
    (user, password): (&str, &str),
    options: &str,
    schema: &str,
    ca: Option<&Path>,
) -> PostgresConfig {
    let password_file = dir.join(format!("password-{user}-{schema}"));
    std::fs::write(&password_file, format!("{password}\n")).unwrap();
    std::fs::set_permissions(&password_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let mut text = format!(
        "[database]\nurl = \"postgresql://{user}@127.0.0.1:{}/{}{options}\"\nschema = \"{schema}\"\n\
         password_file = \"{}\"\n",
        c.port(),
        c.db.name,
        password_file.display()
    );
    if let Some(ca) = ca {
        text.push_str(&format!("ca_file = \"{}\"\n", ca.display()));
    }
    let config = Config::parse(&text, Path::new("test.toml")).unwrap();
    match config.database.target {
        DatabaseTarget::Postgres(pg) => *pg,
        DatabaseTarget::Sqlite { .. } => unreachable!("a url is a PostgreSQL target"),
    }
}

impl TlsCluster {
    /// The database's owner and its password.
    fn owner(&self) -> (&str, &str) {
        (&self.db.user, &self.db.password)
    }

    /// `postgresql://owner@127.0.0.1:port/db (schema s)`.
    fn shown(&self, schema: &str) -> String {
        format!(
            "postgresql://{}@127.0.0.1:{}/{} (schema {schema})",
            self.db.user,
            self.port(),
            self.db.name
        )
    }
}

fn tls_is_verified_against_ca_file_and_another_ca_is_refused_naming_ca_file(c: &TlsCluster) {
    let dir = tempfile::tempdir().unwrap();
    let require = "?sslmode=require";
    let pg = pg_config(c, dir.path(), c.owner(), require, "tls_ok", Some(&c.ca()));
    let report = store::describe_postgres(&pg).expect("verified TLS to the private CA");
    assert_eq!(report.transport, Transport::VerifiedTls);
    assert!(report.server_version.starts_with(char::is_numeric), "{report:?}");
    assert_eq!(report.schema_version, None);

    let wrong = c.other_ca();
    let pg = pg_config(c, dir.path(), c.owner(), require, "tls_ok", Some(&wrong));
    let err = format!("{:#}", store::describe_postgres(&pg).unwrap_err());
    assert!(err.contains("TLS failed"), "{err}");
    assert!(
        err.contains(&format!("database.ca_file {}", wrong.display())),
        "{err}"
    );

    // Without ca_file only the public roots are trusted: the private CA is not among them.
    let pg = pg_config(c, dir.path(), c.owner(), require, "tls_ok", None);
    let err = format!("{:#}", store::describe_postgres(&pg).unwrap_err());
    assert!(err.contains("set database.ca_file"), "{err}");

    // Loopback without sslmode=require goes without TLS.
    let pg = pg_config(c, dir.path(), c.owner(), "", "tls_ok", None);
    assert_eq!(store::describe_postgres(&pg).unwrap().transport, Transport::Local);
}

fn a_wrong_password_names_its_sources_and_never_the_password(c: &TlsCluster) {
    let dir = tempfile::tempdir().unwrap();
    let pg = pg_config(
        c,
        dir.path(),
        (&c.db.user, "pw_canary_wrong_0815"),
        "",
        "pw",
        None,
    );
    let err = store::open(&charthero_sync::config::DatabaseConfig {
        target: DatabaseTarget::Postgres(Box::new(pg.clone())),
        ..charthero_sync::config::DatabaseConfig::sqlite(dir.path().join("unused.db"))
    })
    .map(drop)
    .unwrap_err();
    let text = format!("{err:#} {err:?}");
    assert!(
        text.contains(&format!("refused role {}'s credentials", c.db.user)),
        "{text}"
    );
    assert!(
        text.contains("the password came from the database.password_file"),
        "{text}"
    );
    assert!(
        !text.contains("canary") && !text.contains(&c.db.password),
        "{text}"
    );
    assert_eq!(err.location(), c.shown("pw"));
}

fn a_schema_the_role_may_not_create_is_a_clear_error(c: &TlsCluster) {
    let dir = tempfile::tempdir().unwrap();
    let pg = pg_config(c, dir.path(), ("pgops_no_create", PASSWORD), "", "not_mine", None);
    let connect =
        |pg: &PostgresConfig| store::postgres::connect::connect(pg, "charthero-sync test").map(drop);
    let existing =
        |pg: &PostgresConfig| store::postgres::connect::connect_existing(pg, "charthero-sync test").map(drop);
    let err = format!("{:#}", connect(&pg).unwrap_err());
    assert!(
        err.contains("schema not_mine does not exist and role pgops_no_create may not create it"),
        "{err}"
    );
    assert!(!err.contains(PASSWORD), "{err}");
    let err = format!("{:#}", existing(&pg).unwrap_err());
    assert!(err.contains("run `charthero-sync migrate` first"), "{err}");
    // The database's owner may create its schema; then it exists for readers too.
    let pg = pg_config(c, dir.path(), c.owner(), "", "created_here", None);
    connect(&pg).unwrap();
    existing(&pg).unwrap();
}

fn one_writer_per_schema_the_second_is_refused_naming_the_holder(c: &TlsCluster) {
    let dir = tempfile::tempdir().unwrap();
    let target = |schema: &str| {
        DatabaseTarget::Postgres(Box::new(pg_config(c, dir.path(), c.owner(), "", schema, None)))
    };
    let first = WriterLock::acquire(&target("lock_a"), "charthero-sync run").unwrap();
    let err = WriterLock::acquire(&target("lock_a"), "charthero-sync sync").unwrap_err();
    let LockError::Held { database, holder } = &err else {
        panic!("{err:#}")
    };
    assert_eq!(*database, c.shown("lock_a"));
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

fn check_reports_tls_the_server_the_schema_and_the_readers_role(c: &TlsCluster) {
    let dir = tempfile::tempdir().unwrap();
    let pg = pg_config(
        c,
        dir.path(),
        c.owner(),
        "?sslmode=require",
        "checked",
        Some(&c.ca()),
    );
    let database = charthero_sync::config::DatabaseConfig {
        target: DatabaseTarget::Postgres(Box::new(pg)),
        ..charthero_sync::config::DatabaseConfig::sqlite(dir.path().join("unused.db"))
    };
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (lines, outcome) = runtime.block_on(charthero_sync::check::check_database(&database));
    let text = lines.join("\n");
    assert!(outcome.is_ok(), "{text}");
    assert!(
        text.contains(&format!("database.url     ok      {}", c.shown("checked"))),
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
    assert!(
        text.contains(&format!(
            "database.owner   ok      role {} may rewrite pg_statistic in database {}",
            c.db.user, c.db.name
        )),
        "{text}"
    );
    assert!(!text.contains(&c.db.password), "{text}");
    // A role that does not own the database is told what a purge then cannot reach.
    let other = pg_config(c, dir.path(), ("pgops_no_create", PASSWORD), "", "not_mine", None);
    let not_owner = charthero_sync::config::DatabaseConfig {
        target: DatabaseTarget::Postgres(Box::new(other)),
        ..database.clone()
    };
    let (lines, outcome) = runtime.block_on(charthero_sync::check::check_database(&not_owner));
    let text = lines.join("\n");
    assert!(outcome.is_ok(), "{text}");
    assert!(
        text.contains(&format!(
            "database.owner   note    role pgops_no_create neither owns database {} nor is a superuser \
             (nor, on PostgreSQL 17, in pg_maintain): a purge cannot rewrite pg_statistic",
            c.db.name
        )),
        "{text}"
    );
    assert!(!text.contains(PASSWORD), "{text}");
    // Migrated: the schema is this release's and the readers' role exists.
    store::open(&database).unwrap();
    let (lines, outcome) = runtime.block_on(charthero_sync::check::check_database(&database));
    let text = lines.join("\n");
    assert!(outcome.is_ok(), "{text}");
    assert!(text.contains("this release's"), "{text}");
    assert!(
        text.contains("database.readers ok      role charthero_readers exists"),
        "{text}"
    );
    // A server that does not answer fails the check, naming the target and what to check.
    let unreachable = Config::parse(
        "[database]\nurl = \"postgresql://nobody@127.0.0.1:1/warehouse\"\n",
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
