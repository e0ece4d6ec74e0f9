//! Connections to a PostgreSQL warehouse from its configuration: the password from its sources
//! (never from the URL), TLS with certificate verification (rustls; the public roots plus
//! `database.ca_file`) unless every host is loopback or a unix socket, the session's
//! `search_path` (the schema, created if missing and allowed), `application_name` and
//! `statement_timeout`. Errors name the warehouse (never its password) and what to do. Also the
//! one-writer lock ([`WriterLease`]) and what `check` reports of the server ([`describe`]). It
//! does not migrate or query the warehouse's tables: that is `store::postgres`'s.

use std::sync::{Arc, mpsc};

use anyhow::Context;
use postgres::config::SslMode;
use postgres::{Client, NoTls};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

use crate::config::{self, PostgresConfig};

/// How the connection to the server is protected, for `check`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// TLS, the server's certificate verified against the public roots and `database.ca_file`.
    VerifiedTls,
    /// No TLS: every host is loopback or a unix socket and the URL does not ask for TLS.
    Local,
}

impl std::fmt::Display for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Transport::VerifiedTls => "TLS, certificate verified",
            Transport::Local => "no TLS (loopback or unix socket)",
        })
    }
}

/// What the schema must be for this connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SchemaUse {
    /// The writer's: created when missing (if the role may).
    CreateIfMissing,
    /// A reader's, `backfill`'s, `check`'s: must exist; nothing is created.
    MustExist,
}

/// Connects a writer (`run`, `sync`, `migrate`, `purge`, `reindex`): its `search_path` is the
/// schema, created when missing if the role may create it; no `statement_timeout` (a large
/// group commit or purge takes as long as it takes); and `synchronous_commit = off`, SQLite's
/// `synchronous = NORMAL`: a commit does not wait for its WAL flush, so a server crash can lose
/// the last few commits — never part of one, and never out of order, so the watermark and the
/// content queue fall back together and the next cycle fetches again what they lost. Each
/// fetched note or transcript commits on its own (the content worker waits for it), and at
/// ~11 ms per flushed commit the content sync could not keep 200 requests/s (BENCHMARKS.md).
pub fn connect(pg: &PostgresConfig, application_name: &str) -> anyhow::Result<Client> {
    let (mut client, _) = open_session(pg, application_name)?;
    set_schema(&mut client, pg, SchemaUse::CreateIfMissing)?;
    client
        .batch_execute("SET statement_timeout = 0; SET synchronous_commit = off")
        .with_context(|| format!("PostgreSQL warehouse {pg}: cannot configure the writer's session"))?;
    Ok(client)
}

/// Connects to an existing warehouse without creating anything (`status`, `backfill`, the
/// demo's summary): an absent schema is an error that says to run `charthero-sync migrate`.
pub fn connect_existing(pg: &PostgresConfig, application_name: &str) -> anyhow::Result<Client> {
    let (mut client, _) = open_session(pg, application_name)?;
    set_schema(&mut client, pg, SchemaUse::MustExist)?;
    Ok(client)
}

/// The transport policy: verified TLS unless every host is local and the URL did not ask for
/// TLS. `sslmode=disable` to a remote host never gets here (the configuration refuses it); it
/// is refused again so that no caller can build such a connection.
fn transport(pg: &PostgresConfig) -> anyhow::Result<Transport> {
    let mode = pg.connection.get_ssl_mode();
    if pg.is_local() {
        return Ok(if mode == SslMode::Require {
            Transport::VerifiedTls
        } else {
            Transport::Local
        });
    }
    if mode == SslMode::Disable {
        anyhow::bail!(
            "PostgreSQL warehouse {pg}: sslmode=disable is refused for a host that is not loopback or a \
             unix socket; TLS with a verified certificate is required"
        );
    }
    Ok(Transport::VerifiedTls)
}

/// The TLS client: rustls with the webpki roots and every certificate of `database.ca_file`.
fn tls_connector(pg: &PostgresConfig) -> anyhow::Result<tokio_postgres_rustls::MakeRustlsConnect> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = &pg.ca_file {
        let shown = path.display();
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
            .with_context(|| format!("cannot read database.ca_file {shown}"))?
            .collect::<Result<_, _>>()
            .with_context(|| format!("database.ca_file {shown} is not a PEM bundle"))?;
        if certs.is_empty() {
            anyhow::bail!("database.ca_file {shown} contains no certificate");
        }
        for cert in certs {
            roots
                .add(cert)
                .with_context(|| format!("database.ca_file {shown} holds a certificate that is not a CA"))?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("rustls has no protocol version in common with its own provider")?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(tls))
}

/// Connects and authenticates; errors say what to check.
fn open_session(pg: &PostgresConfig, application_name: &str) -> anyhow::Result<(Client, Transport)> {
    let mut connection = pg.connection.clone();
    connection.application_name(application_name);
    let password = config::load_database_password(pg)?;
    if let Ok((secret, _)) = &password {
        connection.password(secret.expose());
    }
    let transport = transport(pg)?;
    let result = match transport {
        Transport::Local => connection.connect(NoTls),
        Transport::VerifiedTls => {
            connection.ssl_mode(SslMode::Require);
            connection.connect(tls_connector(pg)?)
        }
    };
    match result {
        Ok(client) => Ok((client, transport)),
        Err(e) => {
            let advice = advise(pg, &e, &password);
            Err(anyhow::Error::new(e).context(advice))
        }
    }
}

/// What a failed connection means and what to do, naming the warehouse and, when it was
/// refused, the password's sources; never the password.
fn advise(
    pg: &PostgresConfig,
    e: &postgres::Error,
    password: &config::SecretLookup<crate::secret::DatabasePasswordKind>,
) -> String {
    let credentials = || match password {
        Ok((_, source)) => format!("the password came from the {source}"),
        Err(looked) => format!(
            "no password was found (looked in {}); put it in database.password_file, \
             ${} or $CREDENTIALS_DIRECTORY/{}",
            looked.join(", "),
            config::DATABASE_PASSWORD_ENV,
            config::DATABASE_PASSWORD_CREDENTIAL
        ),
    };
    let user = pg.connection.get_user().unwrap_or_default();
    if let Some(code) = e.code() {
        let code = code.code();
        return match code {
            "28P01" | "28000" => format!(
                "PostgreSQL warehouse {pg}: the server refused role {user}'s credentials; {}",
                credentials()
            ),
            "3D000" => format!(
                "PostgreSQL warehouse {pg}: the database does not exist; create it (createdb -O {user} …) \
                 or fix database.url"
            ),
            _ => format!("PostgreSQL warehouse {pg}: the server refused the connection (SQLSTATE {code})"),
        };
    }
    let text = e.to_string();
    if text.contains("password missing") {
        return format!(
            "PostgreSQL warehouse {pg}: the server asks role {user} for a password; {}",
            credentials()
        );
    }
    if text.starts_with("error performing TLS handshake") {
        let ca = match &pg.ca_file {
            Some(path) => format!(
                "check that database.ca_file {} holds the CA that issued the server's certificate",
                path.display()
            ),
            None => "if the server's certificate comes from a private CA, set database.ca_file to \
                     that CA's PEM bundle"
                .to_owned(),
        };
        return format!(
            "PostgreSQL warehouse {pg}: TLS failed (the server must offer TLS with a certificate \
             valid for the host name in database.url); {ca}"
        );
    }
    if text.starts_with("timeout") {
        return format!(
            "PostgreSQL warehouse {pg}: no answer within connect_timeout; check database.url's host \
             and port, and any firewall between"
        );
    }
    format!(
        "PostgreSQL warehouse {pg}: cannot connect; check database.url's host and port and that the \
         server listens there"
    )
}

/// Sets `search_path` to the schema, creating it when missing if `schema_use` allows.
fn set_schema(client: &mut Client, pg: &PostgresConfig, schema_use: SchemaUse) -> anyhow::Result<()> {
    let schema = &pg.schema;
    let exists: bool = client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)",
            &[schema],
        )
        .with_context(|| format!("PostgreSQL warehouse {pg}: cannot look up the schema"))?
        .try_get(0)?;
    if !exists {
        let user: String = client
            .query_one("SELECT current_user::text", &[])
            .with_context(|| format!("PostgreSQL warehouse {pg}: cannot read current_user"))?
            .try_get(0)?;
        if schema_use == SchemaUse::MustExist {
            anyhow::bail!(
                "PostgreSQL warehouse {pg}: schema {schema} does not exist (or role {user} may not see \
                 it); run `charthero-sync migrate` first"
            );
        }
        // The schema is an identifier checked by the configuration ([a-z_][a-z0-9_]*), quoted
        // anyway.
        if let Err(e) = client.batch_execute(&format!("CREATE SCHEMA IF NOT EXISTS \"{schema}\"")) {
            let denied = e.code().is_some_and(|c| c.code() == "42501");
            let e = anyhow::Error::new(e);
            return Err(if denied {
                e.context(format!(
                    "PostgreSQL warehouse {pg}: schema {schema} does not exist and role {user} may not \
                     create it; as its owner run CREATE SCHEMA {schema} AUTHORIZATION {user}"
                ))
            } else {
                e.context(format!(
                    "PostgreSQL warehouse {pg}: cannot create schema {schema}"
                ))
            });
        }
    }
    client
        .batch_execute(&format!("SET search_path TO \"{schema}\""))
        .with_context(|| format!("PostgreSQL warehouse {pg}: cannot set search_path"))?;
    Ok(())
}

/// The advisory-lock key of a schema's one writer: the first 8 bytes of
/// SHA-256(`charthero-sync:` + schema), big-endian. Stable across releases and hosts, so two
/// processes on different machines writing one schema exclude each other.
pub fn writer_lock_key(schema: &str) -> i64 {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(format!("charthero-sync:{schema}").as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    i64::from_be_bytes(first)
}

/// The one-writer lock of a PostgreSQL warehouse: a session advisory lock on a dedicated
/// connection, held until this value is dropped or the process dies (the server releases a
/// session lock when its connection closes, however it closes). The connection lives on its
/// own thread: the `postgres` client runs its own runtime, which may neither block nor be
/// dropped on an async worker, and the lock is held by `main`'s async code.
pub struct WriterLease {
    release: Option<mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for WriterLease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WriterLease")
    }
}

impl Drop for WriterLease {
    fn drop(&mut self) {
        // Closing the channel ends the thread, which closes the connection: the lock is free
        // once `join` returns.
        drop(self.release.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Takes the schema's writer lock, or (inner `Err`) describes who holds it. `holder` describes
/// this process (`charthero-sync run`); with the pid it becomes the lock connection's
/// `application_name`, which is how a refused process names the holder.
pub fn try_writer_lock(pg: &PostgresConfig, holder: &str) -> anyhow::Result<Result<WriterLease, String>> {
    let name = format!("{holder} (pid {})", std::process::id());
    let pg = pg.clone();
    let (answer, answered) = mpsc::channel();
    let (release, released) = mpsc::channel::<()>();
    let thread = std::thread::Builder::new()
        .name("pg-writer-lock".into())
        .spawn(move || match take_writer_lock(&pg, &name) {
            Ok(Ok(client)) => {
                let _ = answer.send(Ok(Ok(())));
                // Blocks until the lease is dropped (or the process ends).
                let _ = released.recv();
                drop(client);
            }
            Ok(Err(holder)) => {
                let _ = answer.send(Ok(Err(holder)));
            }
            Err(e) => {
                let _ = answer.send(Err(e));
            }
        })
        .context("cannot start the writer lock's thread")?;
    let outcome = answered
        .recv()
        .map_err(|_| anyhow::anyhow!("the writer lock's thread stopped"))?;
    Ok(match outcome? {
        Ok(()) => Ok(WriterLease {
            release: Some(release),
            thread: Some(thread),
        }),
        Err(holder) => {
            let _ = thread.join();
            Err(holder)
        }
    })
}

fn take_writer_lock(pg: &PostgresConfig, name: &str) -> anyhow::Result<Result<Client, String>> {
    let (mut client, _) = open_session(pg, name)?;
    let key = writer_lock_key(&pg.schema);
    if take_or_wait(&mut client, key)
        .with_context(|| format!("PostgreSQL warehouse {pg}: cannot take the writer lock"))?
    {
        return Ok(Ok(client));
    }
    Ok(Err(lock_holder(&mut client, pg, key)?))
}

/// Takes the session-level advisory lock `key` on `client`, waiting up to [`LOCK_WAIT`] if
/// another session holds it; answers whether it was taken. The wait is for a session that is
/// ending: the server releases a session's locks only once its backend has exited, a moment
/// after the process before this one closed it (or after a terminated session), so a writer
/// started right after another must not take that moment for a second writer.
fn take_or_wait(client: &mut Client, key: i64) -> Result<bool, postgres::Error> {
    if client
        .query_one("SELECT pg_try_advisory_lock($1)", &[&key])?
        .try_get(0)?
    {
        return Ok(true);
    }
    client.batch_execute(&format!("SET lock_timeout = '{}ms'", LOCK_WAIT.as_millis()))?;
    let waited = client.query_one("SELECT pg_advisory_lock($1)", &[&key]);
    client.batch_execute("RESET lock_timeout")?;
    match waited {
        Ok(_) => Ok(true),
        Err(e) if e.code() == Some(&postgres::error::SqlState::LOCK_NOT_AVAILABLE) => Ok(false),
        Err(e) => Err(e),
    }
}

/// How long [`take_or_wait`] waits for a lock another session holds.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_millis(500);

/// Who holds the advisory lock `key`: the `application_name`, address, server pid and start of
/// the session holding it, or `holder unknown` when it was released meanwhile.
fn lock_holder(client: &mut Client, pg: &PostgresConfig, key: i64) -> anyhow::Result<String> {
    let (high, low) = lock_halves(key);
    let holders = client
        .query(
            "SELECT coalesce(a.application_name, ''), coalesce(host(a.client_addr), 'local socket'), \
                    l.pid, coalesce(to_char(a.backend_start AT TIME ZONE 'UTC', \
                    'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'), '?') \
             FROM pg_locks l LEFT JOIN pg_stat_activity a ON a.pid = l.pid \
             WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 \
               AND l.classid::text::bigint = $1 AND l.objid::text::bigint = $2 \
               AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())",
            &[&high, &low],
        )
        .with_context(|| format!("PostgreSQL warehouse {pg}: cannot read who holds the writer lock"))?;
    Ok(holders
        .first()
        .map(|row| {
            let (app, addr, pid, since): (String, String, i32, String) =
                (row.try_get(0)?, row.try_get(1)?, row.try_get(2)?, row.try_get(3)?);
            Ok::<_, postgres::Error>(format!("{app} from {addr}, server pid {pid}, since {since}"))
        })
        .transpose()?
        .unwrap_or_else(|| "holder unknown".to_owned()))
}

/// Whether a session holds the writer lock of the schema `client`'s search_path selects: a
/// `run` or `sync` writing it is alive (`pg_locks` is readable by every role).
pub fn writer_present(client: &mut Client) -> anyhow::Result<bool> {
    let schema: String = client.query_one("SELECT current_schema()", &[])?.try_get(0)?;
    let (high, low) = lock_halves(writer_lock_key(&schema));
    Ok(client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted AND objsubid = 1
                AND classid::text::bigint = $1 AND objid::text::bigint = $2
                AND database = (SELECT oid FROM pg_database WHERE datname = current_database()))",
            &[&high, &low],
        )?
        .try_get(0)?)
}

/// A bigint advisory lock is listed in `pg_locks` with its high half as `classid` and its low
/// half as `objid` (`objsubid` 1).
fn lock_halves(key: i64) -> (i64, i64) {
    (i64::from((key >> 32) as u32), i64::from(key as u32))
}

/// The advisory-lock key the writing session itself holds (see [`connect_writer`]): distinct
/// from [`writer_lock_key`], which the process's [`WriterLease`] holds on its own session. A
/// schema name never contains `/`, so no schema's lock key is another's write key.
pub fn write_lock_key(schema: &str) -> i64 {
    writer_lock_key(&format!("{schema}/writes"))
}

/// Connects the session that writes ([`connect`]) and takes the schema's write lock on it
/// ([`write_lock_key`]), which it then holds for its whole life: every write of this process
/// goes through a session holding that lock, so no two processes ever write one schema, even
/// when a lease's session or the writer's own session was terminated and another process
/// started meanwhile. When another session holds the write lock, the error is a
/// [`WriteLockHeld`](super::error::WriteLockHeld) naming it (classified `LockLost`).
pub fn connect_writer(pg: &PostgresConfig, application_name: &str) -> anyhow::Result<Client> {
    let mut client = connect(pg, application_name)?;
    let key = write_lock_key(&pg.schema);
    if take_or_wait(&mut client, key)
        .with_context(|| format!("PostgreSQL warehouse {pg}: cannot take the write lock"))?
    {
        return Ok(client);
    }
    let holder = lock_holder(&mut client, pg, key)?;
    Err(anyhow::Error::new(super::error::WriteLockHeld { holder }))
}

/// Whether the session of `db` holds the schema's write lock (it took it when it connected, and
/// a session lock is released only with the session: a `false` here means a bug, or an
/// `pg_advisory_unlock_all` someone ran on this very session).
pub fn holds_write_lock(db: &mut impl postgres::GenericClient, schema: &str) -> anyhow::Result<bool> {
    let (high, low) = lock_halves(write_lock_key(schema));
    Ok(db
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted \
                 AND pid = pg_backend_pid() AND objsubid = 1 \
                 AND classid::text::bigint = $1 AND objid::text::bigint = $2)",
            &[&high, &low],
        )?
        .try_get(0)?)
}

/// Drops the schema and everything in it (`demo`, replacing a warehouse it created).
pub fn drop_schema(pg: &PostgresConfig) -> anyhow::Result<()> {
    let (mut client, _) = open_session(pg, "charthero-sync demo")?;
    client
        .batch_execute(&format!("DROP SCHEMA IF EXISTS \"{}\" CASCADE", pg.schema))
        .with_context(|| format!("PostgreSQL warehouse {pg}: cannot drop the demo's schema"))
}

/// What `check` reports of a PostgreSQL warehouse.
#[derive(Debug, Clone)]
pub struct ServerReport {
    pub transport: Transport,
    /// `SHOW server_version`.
    pub server_version: String,
    /// The highest migration applied in the schema, if the schema and its history exist.
    pub schema_version: Option<i32>,
    /// Whether the read-only role `charthero_readers` exists.
    pub readers_role: bool,
    /// The login role and the database it is in.
    pub role: String,
    pub database: String,
    /// Whether the role may rewrite `pg_statistic` (a superuser, the database's owner, or on
    /// PostgreSQL 17 and later a member of `pg_maintain`): what a purge does last, so that
    /// the statistics it replaced keep no purged ID.
    pub rewrites_statistics: bool,
}

/// Connects without creating anything and reads what `check` reports.
pub fn describe(pg: &PostgresConfig) -> anyhow::Result<ServerReport> {
    let (mut client, transport) = open_session(pg, "charthero-sync check")?;
    let fail = || format!("PostgreSQL warehouse {pg}: cannot read the server's state");
    let server_version: String = client
        .query_one("SHOW server_version", &[])
        .with_context(fail)?
        .try_get(0)?;
    let history = format!("{}.refinery_schema_history", pg.schema);
    let has_history: bool = client
        .query_one("SELECT to_regclass($1) IS NOT NULL", &[&history])
        .with_context(fail)?
        .try_get(0)?;
    let schema_version = if has_history {
        client
            .query_one(
                &format!(
                    "SELECT max(version) FROM \"{}\".refinery_schema_history",
                    pg.schema
                ),
                &[],
            )
            .with_context(fail)?
            .try_get(0)?
    } else {
        None
    };
    let readers_role: bool = client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'charthero_readers')",
            &[],
        )
        .with_context(fail)?
        .try_get(0)?;
    let row = client
        .query_one("SELECT current_user::text, current_database()::text", &[])
        .with_context(fail)?;
    let rewrites_statistics: bool = client
        .query_one(super::privacy::MAY_REWRITE_STATISTICS, &[])
        .with_context(fail)?
        .try_get(0)?;
    Ok(ServerReport {
        transport,
        server_version,
        schema_version,
        readers_role,
        role: row.try_get(0)?,
        database: row.try_get(1)?,
        rewrites_statistics,
    })
}
