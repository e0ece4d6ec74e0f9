//! Shared test plumbing: a simulator on a random loopback port, a temporary warehouse — a SQLite
//! file, or a database of this process's throwaway PostgreSQL cluster
//! (`charthero_sim::pgcluster::shared`) — a config pointing one at the other, queries that read
//! either warehouse the same way ([`Warehouse::query`] and friends), an entity-by-entity
//! comparison of warehouse and simulator, and [`both_backends!`], which runs one test body on
//! each backend.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use charthero_sim::pgcluster::{self, PgDatabase};
use charthero_sim::{Fault, FaultRule, Route as SimRoute, SimOptions, Simulator};
use charthero_sync::config::{Config, RawConfig, RawDatabase};
use charthero_sync::secret::ApiKey;
use charthero_sync::sync::{BackfillRange, CyclePlan, CycleReport};
use charthero_sync::timefmt::{Micros, format_stored, format_utc, from_unix_nanos, parse_rfc3339};
use time::OffsetDateTime;

/// The warehouse a test runs against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    /// Whether a test on this backend can run here: SQLite always; PostgreSQL when this
    /// process's throwaway cluster runs. Where it cannot, the reason is printed (the test then
    /// skips), or, under `CHARTHERO_REQUIRE_POSTGRES=1` (CI), the test fails.
    pub fn available(self) -> bool {
        match self {
            Backend::Sqlite => true,
            Backend::Postgres => pgcluster::shared().is_some(),
        }
    }
}

/// Runs a test body on both backends: `both_backends!(#[tokio::test…] name);` next to
/// `async fn name(backend: Backend)` defines a module `name` holding the tests `name::sqlite`
/// and `name::postgres`, which call the function with their [`Backend`] (it builds its
/// [`TestEnv`]s with [`TestEnv::start_on`]). The PostgreSQL test skips, printing why, where no
/// PostgreSQL server can run, and fails instead under `CHARTHERO_REQUIRE_POSTGRES=1`.
///
/// ```ignore
/// both_backends!(#[tokio::test(flavor = "multi_thread", worker_threads = 2)] a_sync_equals_upstream);
///
/// async fn a_sync_equals_upstream(backend: Backend) {
///     let env = TestEnv::with_encounters_on(backend, 1, 100).await;
///     …
/// }
/// ```
macro_rules! both_backends {
    ($(#[$attr:meta])* $name:ident) => {
        mod $name {
            $(#[$attr])*
            async fn sqlite() {
                super::$name($crate::support::Backend::Sqlite).await;
            }

            $(#[$attr])*
            async fn postgres() {
                if $crate::support::Backend::Postgres.available() {
                    super::$name($crate::support::Backend::Postgres).await;
                }
            }
        }
    };
}
pub(crate) use both_backends;

/// A running simulator, a temporary directory, and the warehouse (in that directory, or a
/// database of the shared PostgreSQL cluster, dropped with the environment).
pub struct TestEnv {
    pub sim: Simulator,
    pub dir: tempfile::TempDir,
    pub warehouse: Warehouse,
}

impl TestEnv {
    /// A SQLite warehouse.
    pub async fn start(opts: SimOptions) -> TestEnv {
        TestEnv::start_on(Backend::Sqlite, opts).await
    }

    /// A warehouse on `backend`; for PostgreSQL, a new database (the caller checked
    /// [`Backend::available`], as [`both_backends!`] does).
    pub async fn start_on(backend: Backend, opts: SimOptions) -> TestEnv {
        let sim = Simulator::start(opts).await.expect("simulator starts");
        let dir = tempfile::tempdir().expect("temp dir");
        let warehouse = Warehouse::create(backend, dir.path());
        TestEnv { sim, dir, warehouse }
    }

    /// `encounters` over the 60 days before now, with a given seed, into a SQLite warehouse.
    pub async fn with_encounters(seed: u64, encounters: usize) -> TestEnv {
        TestEnv::start(sim_options(seed, encounters)).await
    }

    /// [`TestEnv::with_encounters`] on `backend`.
    pub async fn with_encounters_on(backend: Backend, seed: u64, encounters: usize) -> TestEnv {
        TestEnv::start_on(backend, sim_options(seed, encounters)).await
    }

    /// The SQLite file; panics on PostgreSQL (a step that reads the file is SQLite-only).
    pub fn db_path(&self) -> PathBuf {
        self.warehouse.path().to_owned()
    }

    pub fn key(&self) -> ApiKey {
        ApiKey::new(&self.sim.api_key()).unwrap()
    }

    /// A config aimed at this simulator with a generous rate limit (tests measure correctness,
    /// the benchmark harness measures politeness).
    pub fn config(&self) -> Config {
        self.raw_config().validate().expect("test config is valid")
    }

    pub fn raw_config(&self) -> RawConfig {
        let mut raw = RawConfig::default();
        raw.api.base_url = self.sim.base_url();
        raw.api.api_key_file = None;
        raw.api.request_timeout = "10s".into();
        raw.database = self.warehouse.raw_database();
        raw.sync.start_at = format_utc(OffsetDateTime::now_utc() - time::Duration::days(61));
        raw.sync.settle_lag = "0s".into();
        raw.limits.requests_per_second = 5_000.0;
        raw.limits.burst = 200;
        raw.limits.max_in_flight = 8;
        raw
    }

    /// A config that replicates encounters only (no document, transcript or audio requests),
    /// for tests about the encounter list.
    pub fn encounters_only_config(&self) -> Config {
        let mut raw = self.raw_config();
        raw.content.details = false;
        raw.content.transcripts = false;
        raw.validate().expect("test config is valid")
    }

    /// One cycle of `plan` against this simulator.
    async fn cycle(
        &self,
        config: &Config,
        plan: CyclePlan,
    ) -> Result<CycleReport, charthero_sync::sync::CycleError> {
        charthero_sync::sync_once(
            config,
            &self.key(),
            "test",
            plan,
            &tokio_util::sync::CancellationToken::new(),
        )
        .await
    }

    /// One cycle of `plan` against this simulator; a failure panics with its whole chain.
    pub async fn sync(&self, config: &Config, plan: CyclePlan) -> CycleReport {
        self.cycle(config, plan)
            .await
            .unwrap_or_else(|e| panic!("the cycle failed: {e:#}"))
    }

    /// One cycle of `plan` that must fail: its error.
    pub async fn sync_error(&self, config: &Config, plan: CyclePlan) -> charthero_sync::sync::CycleError {
        match self.cycle(config, plan).await {
            Ok(report) => panic!("the cycle succeeded: {report:?}"),
            Err(e) => e,
        }
    }

    /// A reconcile of everything from `sync.start_at` to now, after which the warehouse must
    /// equal the simulator entity by entity.
    pub async fn reconcile_and_compare(&self, config: &Config) {
        let range = BackfillRange {
            start: config.sync.start_at,
            end: OffsetDateTime::now_utc(),
        };
        self.sync(config, CyclePlan::full(Some(range), false)).await;
        compare(&self.sim, &self.warehouse).assert_empty();
    }

    /// Writes the config as TOML into the temp dir, for tests that run the binary.
    pub fn write_config_file(&self, extra: &str) -> PathBuf {
        let path = self.dir.path().join("config.toml");
        let text = format!(
            "[api]\nbase_url = \"{}\"\napi_key_file = \"{}\"\n\n[database]\n{}\n\
             [sync]\nstart_at = \"{}\"\nsettle_lag = \"0s\"\n\n[limits]\nrequests_per_second = 2000.0\nburst = 100\n\
             max_in_flight = 8\n{extra}",
            self.sim.base_url(),
            self.dir.path().join("api-key").display(),
            self.warehouse.database_toml(),
            format_utc(OffsetDateTime::now_utc() - time::Duration::days(61)),
        );
        std::fs::write(&path, text).unwrap();
        path
    }

    /// Writes the simulator's key into `api-key` with mode 0600.
    pub fn write_key_file(&self, key: &str) -> PathBuf {
        let path = self.dir.path().join("api-key");
        write_secret(&path, key);
        path
    }
}

/// Writes `text` into a new file of mode 0600 (the key and password files).
pub fn write_secret(path: &Path, text: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

/// Has the simulator answer the next list request 429 with `Retry-After: 600` (an hourly quota,
/// say): longer than a request waits, so the key is paused for ten minutes.
pub fn quota_on_the_next_list_request(sim: &Simulator) {
    sim.push_fault(FaultRule::once(
        Some(SimRoute::List),
        Fault::Status {
            status: 429,
            reason_code: None,
            retry_after: Some("600".to_owned()),
        },
    ));
}

pub fn sim_options(seed: u64, encounters: usize) -> SimOptions {
    let now = OffsetDateTime::now_utc();
    SimOptions {
        seed,
        encounters,
        start: now - time::Duration::days(60),
        end: now - time::Duration::hours(1),
        ..SimOptions::default()
    }
}

pub fn reader(path: &Path) -> rusqlite::Connection {
    charthero_sync::store::sqlite::open_reader(path, Duration::from_secs(5)).unwrap()
}

/// A test's warehouse: a SQLite file, or a PostgreSQL database of the shared cluster.
pub enum Warehouse {
    Sqlite(PathBuf),
    Postgres(Box<PgWarehouse>),
}

/// A database of the shared throwaway cluster, owned by its own login role, holding the
/// warehouse in `schema`; dropped (database and role) with the value.
pub struct PgWarehouse {
    pub database: PgDatabase,
    pub schema: String,
    /// The role's password, in a file of mode 0600 (`database.password_file`).
    pub password_file: PathBuf,
    /// The connection [`Warehouse::query`] reuses.
    client: Mutex<Option<::postgres::Client>>,
}

impl Warehouse {
    /// `warehouse.db` in `dir`, or a new database (its password file in `dir`).
    fn create(backend: Backend, dir: &Path) -> Warehouse {
        match backend {
            Backend::Sqlite => Warehouse::Sqlite(dir.join("warehouse.db")),
            Backend::Postgres => {
                static NEXT: AtomicU32 = AtomicU32::new(0);
                let cluster = pgcluster::shared().expect("the test checked that PostgreSQL is available");
                let name = format!("warehouse_{}", NEXT.fetch_add(1, Ordering::Relaxed));
                let database = cluster
                    .create_database(&name)
                    .unwrap_or_else(|e| panic!("cannot create the test database {name}: {e}"));
                let password_file = dir.join("database-password");
                write_secret(&password_file, &database.password);
                Warehouse::Postgres(Box::new(PgWarehouse {
                    database,
                    schema: "charthero".to_owned(),
                    password_file,
                    client: Mutex::new(None),
                }))
            }
        }
    }

    pub fn backend(&self) -> Backend {
        match self {
            Warehouse::Sqlite(_) => Backend::Sqlite,
            Warehouse::Postgres(_) => Backend::Postgres,
        }
    }

    /// The SQLite file, if the warehouse is one.
    pub fn sqlite_path(&self) -> Option<&Path> {
        match self {
            Warehouse::Sqlite(path) => Some(path),
            Warehouse::Postgres(_) => None,
        }
    }

    /// The SQLite file; panics on PostgreSQL (a step that reads the file is SQLite-only).
    pub fn path(&self) -> &Path {
        self.sqlite_path()
            .expect("this step reads the SQLite file; on PostgreSQL query through the Warehouse")
    }

    /// The PostgreSQL database, if the warehouse is one.
    pub fn postgres(&self) -> Option<&PgWarehouse> {
        match self {
            Warehouse::Sqlite(_) => None,
            Warehouse::Postgres(pg) => Some(pg),
        }
    }

    /// `sqlite` or `postgres`: the SQL text for this backend where the dialects differ.
    pub fn pick<'a>(&self, sqlite: &'a str, postgres: &'a str) -> &'a str {
        match self {
            Warehouse::Sqlite(_) => sqlite,
            Warehouse::Postgres(_) => postgres,
        }
    }

    /// The keys of a `[database]` table naming this warehouse (a PostgreSQL one with its schema
    /// and password file).
    pub fn database_toml(&self) -> String {
        match self {
            Warehouse::Sqlite(path) => format!("path = \"{}\"\n", path.display()),
            Warehouse::Postgres(pg) => format!(
                "url = \"{}\"\nschema = \"{}\"\npassword_file = \"{}\"\n",
                pg.database.url,
                pg.schema,
                pg.password_file.display()
            ),
        }
    }

    /// [`Warehouse::database_toml`] as the config's `[database]`, everything else default.
    pub fn raw_database(&self) -> RawDatabase {
        toml::from_str(&self.database_toml()).expect("the test's [database] table parses")
    }

    /// The rows of `sql` (parameters `?1`, `?2`… in order of appearance, for both backends) as
    /// [`Value`]s. PostgreSQL's `timestamptz` reads as the stored text form (microseconds, in
    /// the fixed nine-digit width), booleans as 0 or 1; `numeric` (e.g. `sum` of a bigint) must
    /// be cast (`CAST(sum(x) AS bigint)`, which SQLite reads too).
    pub fn query(&self, sql: &str, params: &[&dyn Param]) -> Vec<Vec<Value>> {
        let params: Vec<Value> = params.iter().map(|p| p.value()).collect();
        match self {
            Warehouse::Sqlite(path) => sqlite_query(path, sql, &params),
            Warehouse::Postgres(pg) => pg.with_client(|client| pg_query(client, sql, &params)),
        }
    }

    /// Every row of `sql`, each converted to `T` (a tuple).
    pub fn rows<T: FromRow>(&self, sql: &str, params: &[&dyn Param]) -> Vec<T> {
        self.query(sql, params)
            .into_iter()
            .map(|row| T::from_row(row).unwrap_or_else(|e| panic!("{sql}: {e}")))
            .collect()
    }

    /// The first column of every row.
    pub fn column<T: FromValue>(&self, sql: &str, params: &[&dyn Param]) -> Vec<T> {
        self.rows::<(T,)>(sql, params).into_iter().map(|(v,)| v).collect()
    }

    /// The only row of `sql`, if any (more than one is a test bug and panics).
    pub fn optional_row<T: FromRow>(&self, sql: &str, params: &[&dyn Param]) -> Option<T> {
        let mut rows = self.rows(sql, params);
        assert!(
            rows.len() <= 1,
            "{sql}: {} rows, expected at most one",
            rows.len()
        );
        rows.pop()
    }

    /// The only row of `sql`.
    pub fn row<T: FromRow>(&self, sql: &str, params: &[&dyn Param]) -> T {
        self.optional_row(sql, params)
            .unwrap_or_else(|| panic!("{sql}: no row"))
    }

    /// The first column of the only row of `sql`.
    pub fn scalar<T: FromValue>(&self, sql: &str, params: &[&dyn Param]) -> T {
        self.row::<(T,)>(sql, params).0
    }

    /// Whether the warehouse exists and holds the table `name` (a daemon may not have created
    /// it yet).
    pub fn has_table(&self, name: &str) -> bool {
        match self {
            Warehouse::Sqlite(path) => {
                path.exists()
                    && self.scalar::<i64>(
                        "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = ?1",
                        &[&name],
                    ) > 0
            }
            Warehouse::Postgres(_) => self.scalar("SELECT to_regclass(?1) IS NOT NULL", &[&name]),
        }
    }

    /// What PostgreSQL's autovacuum does on its own within a minute of a sync: `ANALYZE`, which
    /// keeps a sample of each column's values (most common values, histogram bounds) in the
    /// catalog `pg_statistic`, readable through the view `pg_stats` by everyone who may read the
    /// column. SQLite gathers no statistics on its own: nothing to do there.
    pub fn gather_statistics(&self) {
        if let Warehouse::Postgres(pg) = self {
            pg.with_client(|client| client.batch_execute("ANALYZE"))
                .expect("ANALYZE");
        }
    }

    /// Runs `sql` (statements without parameters) on a writing connection: what an earlier
    /// release, or an operator, left in a warehouse.
    pub fn execute(&self, sql: &str) {
        match self {
            Warehouse::Sqlite(path) => rusqlite::Connection::open(path)
                .and_then(|c| c.execute_batch(sql))
                .unwrap_or_else(|e| panic!("{sql}: {e}")),
            Warehouse::Postgres(pg) => pg
                .with_client(|client| client.batch_execute(sql))
                .unwrap_or_else(|e| panic!("{sql}: {e}")),
        }
    }

    /// Runs `sql` (no parameters) to its end without reading its values; answers how many
    /// rows it returned (for queries whose columns need no checking, of any type).
    pub fn row_count(&self, sql: &str) -> usize {
        match self {
            Warehouse::Sqlite(path) => {
                let conn = reader(path);
                let mut stmt = conn.prepare(sql).unwrap_or_else(|e| panic!("{sql}: {e}"));
                let mut rows = stmt.query([]).unwrap_or_else(|e| panic!("{sql}: {e}"));
                let mut n = 0;
                while rows.next().unwrap_or_else(|e| panic!("{sql}: {e}")).is_some() {
                    n += 1;
                }
                n
            }
            Warehouse::Postgres(pg) => pg.with_client(|client| {
                client
                    .query(sql, &[])
                    .unwrap_or_else(|e| panic!("{sql}: {e}"))
                    .len()
            }),
        }
    }

    /// Every byte the warehouse keeps on disk, deleted data included: the SQLite file and its
    /// WAL; PostgreSQL's files of this database (tables, TOAST, indexes, free space) after a
    /// checkpoint has written every change to them. PostgreSQL's own WAL (`pg_wal`) is not
    /// included: the server recycles it on its own schedule, and it is the server's, shared by
    /// every database, as is its backup.
    pub fn disk_image(&self) -> Vec<u8> {
        let files: Vec<PathBuf> = match self {
            Warehouse::Sqlite(path) => {
                let mut wal = path.as_os_str().to_owned();
                wal.push("-wal");
                vec![path.clone(), wal.into()]
            }
            Warehouse::Postgres(pg) => {
                let cluster = pgcluster::shared().expect("the warehouse's cluster runs");
                let found = cluster
                    .psql(&format!(
                        "CHECKPOINT;\nSELECT current_setting('data_directory') || '/base/' || oid FROM pg_database \
                         WHERE datname = '{}';",
                        pg.database.name
                    ))
                    .expect("the database's directory");
                std::fs::read_dir(found.trim())
                    .expect("the database's directory is readable")
                    .map(|e| e.expect("a file of the database").path())
                    .collect()
            }
        };
        files
            .iter()
            .flat_map(|f| std::fs::read(f).unwrap_or_default())
            .collect()
    }

    /// The places whose live rows hold `needle` as text: `table.column` on SQLite, the tables on
    /// PostgreSQL (each row read whole, as text).
    pub fn rows_holding(&self, needle: &str) -> Vec<String> {
        match self {
            Warehouse::Sqlite(_) => {
                let tables: Vec<String> = self.column(
                    "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'",
                    &[],
                );
                let mut found = Vec::new();
                for t in tables {
                    let columns: Vec<String> =
                        self.column(&format!("SELECT name FROM pragma_table_info('{t}')"), &[]);
                    for c in columns {
                        let n: i64 = self.scalar(
                            &format!(
                                "SELECT count(*) FROM \"{t}\" WHERE instr(CAST(\"{c}\" AS TEXT), ?1) > 0"
                            ),
                            &[&needle],
                        );
                        if n > 0 {
                            found.push(format!("{t}.{c}"));
                        }
                    }
                }
                found
            }
            Warehouse::Postgres(_) => {
                let tables: Vec<String> = self.column(
                    "SELECT table_name::text FROM information_schema.tables
                     WHERE table_schema = current_schema() AND table_type = 'BASE TABLE'",
                    &[],
                );
                tables
                    .into_iter()
                    .filter(|t| {
                        self.scalar::<i64>(
                            &format!("SELECT count(*) FROM \"{t}\" r WHERE strpos(r::text, ?1) > 0"),
                            &[&needle],
                        ) > 0
                    })
                    .collect()
            }
        }
    }
}

/// The analysts' queries of docs/schema.md in PostgreSQL's dialect
/// (tests/fixtures/postgres-queries.sql, which the docs cite), one statement each.
pub fn postgres_queries() -> Vec<String> {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/postgres-queries.sql"
    ))
    .expect("tests/fixtures/postgres-queries.sql");
    let code: Vec<&str> = text
        .lines()
        .filter(|l| !l.trim_start().starts_with("--"))
        .collect();
    code.join("\n")
        .split(";\n")
        .map(str::trim)
        .filter(|q| !q.is_empty())
        .map(|q| q.trim_end_matches(';').to_owned())
        .collect()
}

/// Whether `haystack` holds `needle` anywhere.
pub fn holds(haystack: &[u8], needle: &str) -> bool {
    let needle = needle.as_bytes();
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

impl PgWarehouse {
    /// How to connect as `user` with the warehouse's schema on the search_path (connect off the
    /// test's runtime: see [`off_runtime`]).
    pub fn config_as(&self, user: &str, password: &str) -> ::postgres::Config {
        let mut config: ::postgres::Config = self.database.url.parse().expect("the test database's URL");
        config
            .user(user)
            .password(password)
            .options(&format!("-c search_path={}", self.schema));
        config
    }

    /// Runs `f` with this warehouse's connection (opened, as the database's owner, at first use
    /// or after it closed), [`off_runtime`].
    pub fn with_client<T: Send>(&self, f: impl FnOnce(&mut ::postgres::Client) -> T + Send) -> T {
        off_runtime(|| {
            let mut client = self
                .client
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if client.as_ref().is_none_or(::postgres::Client::is_closed) {
                let config = self.config_as(&self.database.user, &self.database.password);
                *client = Some(
                    config
                        .connect(::postgres::NoTls)
                        .expect("a connection to the test database"),
                );
            }
            f(client.as_mut().expect("connected above"))
        })
    }

    /// The columns (`table.column`) whose planner statistics (`pg_stats`: most common values and
    /// elements, histogram bounds) hold `needle`: what every reader of the column may see.
    pub fn statistics_holding(&self, needle: &str) -> Vec<String> {
        self.with_client(|client| {
            client
                .query(
                    "SELECT tablename::text || '.' || attname::text FROM pg_stats
                     WHERE schemaname = current_schema()
                       AND strpos(concat_ws(' ', most_common_vals::text, histogram_bounds::text,
                                            most_common_elems::text), $1) > 0",
                    &[&needle],
                )
                .expect("pg_stats")
                .iter()
                .map(|r| r.try_get(0).expect("a column's name"))
                .collect()
        })
    }
}

/// Runs `f` on a thread of its own and waits for it: the synchronous PostgreSQL client runs a
/// runtime of its own, which may not be started (nor dropped) on a test's runtime thread.
pub fn off_runtime<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        s.spawn(f)
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

impl Drop for PgWarehouse {
    fn drop(&mut self) {
        // The client's runtime may not be dropped on a test's runtime thread.
        let client = self
            .client
            .get_mut()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(client) = client {
            off_runtime(move || drop(client));
        }
        let name = &self.database.name;
        if let Some(cluster) = pgcluster::shared()
            && let Err(e) = cluster.psql(&format!(
                "DROP DATABASE IF EXISTS {name} WITH (FORCE);\nDROP ROLE IF EXISTS {name};"
            ))
        {
            eprintln!("could not drop the test database {name}: {e}");
        }
    }
}

/// A value read from either warehouse, or a parameter given to one.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Null,
    Int(i64),
    Real(f64),
    Text(String),
    /// A parameter only: stored text on SQLite, `timestamptz` on PostgreSQL.
    Time(OffsetDateTime),
}

/// What a query parameter may be: text, an integer, an instant, or an `Option` of one.
pub trait Param {
    fn value(&self) -> Value;
}

impl Param for str {
    fn value(&self) -> Value {
        Value::Text(self.to_owned())
    }
}

impl Param for String {
    fn value(&self) -> Value {
        Value::Text(self.clone())
    }
}

impl Param for i64 {
    fn value(&self) -> Value {
        Value::Int(*self)
    }
}

impl Param for OffsetDateTime {
    fn value(&self) -> Value {
        Value::Time(*self)
    }
}

impl<T: Param> Param for Option<T> {
    fn value(&self) -> Value {
        self.as_ref().map_or(Value::Null, Param::value)
    }
}

impl<T: Param + ?Sized> Param for &T {
    fn value(&self) -> Value {
        (**self).value()
    }
}

/// A Rust value a [`Value`] converts to.
pub trait FromValue: Sized {
    fn from_value(value: Value) -> Result<Self, String>;
}

impl FromValue for i64 {
    fn from_value(value: Value) -> Result<Self, String> {
        match value {
            Value::Int(i) => Ok(i),
            other => Err(format!("{other:?} is not an integer")),
        }
    }
}

impl FromValue for f64 {
    fn from_value(value: Value) -> Result<Self, String> {
        match value {
            Value::Real(f) => Ok(f),
            // Both backends answer a whole number for some real expressions (SQLite's sum of
            // reals that happen to be integral stays real, but round() and literals do not).
            #[allow(clippy::cast_precision_loss)]
            Value::Int(i) => Ok(i as f64),
            other => Err(format!("{other:?} is not a number")),
        }
    }
}

impl FromValue for String {
    fn from_value(value: Value) -> Result<Self, String> {
        match value {
            Value::Text(s) => Ok(s),
            other => Err(format!("{other:?} is not text")),
        }
    }
}

impl FromValue for bool {
    fn from_value(value: Value) -> Result<Self, String> {
        match value {
            Value::Int(i) => Ok(i != 0),
            other => Err(format!("{other:?} is not a boolean")),
        }
    }
}

impl<T: FromValue> FromValue for Option<T> {
    fn from_value(value: Value) -> Result<Self, String> {
        match value {
            Value::Null => Ok(None),
            other => T::from_value(other).map(Some),
        }
    }
}

/// A row converted to a tuple of [`FromValue`]s.
pub trait FromRow: Sized {
    fn from_row(row: Vec<Value>) -> Result<Self, String>;
}

macro_rules! tuple_from_row {
    ($n:literal: $($t:ident),+) => {
        impl<$($t: FromValue),+> FromRow for ($($t,)+) {
            fn from_row(row: Vec<Value>) -> Result<Self, String> {
                if row.len() != $n {
                    return Err(format!("{} columns, expected {}", row.len(), $n));
                }
                let mut values = row.into_iter();
                Ok(($($t::from_value(values.next().expect("the length was checked"))?,)+))
            }
        }
    };
}

tuple_from_row!(1: A);
tuple_from_row!(2: A, B);
tuple_from_row!(3: A, B, C);
tuple_from_row!(4: A, B, C, D);
tuple_from_row!(5: A, B, C, D, E);
tuple_from_row!(6: A, B, C, D, E, F);
tuple_from_row!(7: A, B, C, D, E, F, G);

fn sqlite_query(path: &Path, sql: &str, params: &[Value]) -> Vec<Vec<Value>> {
    use rusqlite::types::{Value as Sql, ValueRef};
    let conn = reader(path);
    let mut stmt = conn.prepare(sql).unwrap_or_else(|e| panic!("{sql}: {e}"));
    let bound = params.iter().map(|p| match p {
        Value::Null => Sql::Null,
        Value::Int(i) => Sql::Integer(*i),
        Value::Real(f) => Sql::Real(*f),
        Value::Text(s) => Sql::Text(s.clone()),
        Value::Time(t) => Sql::Text(format_stored(*t)),
    });
    let width = stmt.column_count();
    let mut rows = stmt
        .query(rusqlite::params_from_iter(bound))
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    let mut out = Vec::new();
    while let Some(row) = rows.next().unwrap_or_else(|e| panic!("{sql}: {e}")) {
        out.push(
            (0..width)
                .map(|i| match row.get_ref(i).expect("a column of the row") {
                    ValueRef::Null => Value::Null,
                    ValueRef::Integer(i) => Value::Int(i),
                    ValueRef::Real(f) => Value::Real(f),
                    ValueRef::Text(t) => Value::Text(String::from_utf8_lossy(t).into_owned()),
                    ValueRef::Blob(_) => panic!("{sql}: column {i} is a blob"),
                })
                .collect(),
        );
    }
    out
}

/// `?1`, `?2`… as PostgreSQL's `$1`, `$2`… (the tests' SQL has no `?` elsewhere).
fn pg_placeholders(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len());
    let mut chars = sql.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '?' && chars.peek().is_some_and(char::is_ascii_digit) {
            out.push('$');
        } else {
            out.push(c);
        }
    }
    out
}

fn pg_query(client: &mut ::postgres::Client, sql: &str, params: &[Value]) -> Vec<Vec<Value>> {
    use ::postgres::types::{ToSql, Type};
    let text = pg_placeholders(sql);
    let stmt = client.prepare(&text).unwrap_or_else(|e| panic!("{text}: {e}"));
    let bound: Vec<Box<dyn ToSql + Sync>> = params
        .iter()
        .zip(stmt.params())
        .map(|(value, ty)| -> Box<dyn ToSql + Sync> {
            let int = || match value {
                Value::Null => None,
                Value::Int(i) => Some(*i),
                other => panic!("{text}: {other:?} for a {ty} parameter"),
            };
            if *ty == Type::TIMESTAMPTZ {
                Box::new(match value {
                    Value::Null => None,
                    Value::Time(t) => Some(*t),
                    Value::Text(s) => Some(parse_rfc3339(s).unwrap_or_else(|e| panic!("{text}: {s}: {e}"))),
                    other => panic!("{text}: {other:?} for a timestamptz parameter"),
                })
            } else if *ty == Type::INT8 {
                Box::new(int())
            } else if *ty == Type::INT4 {
                Box::new(int().map(|i| i32::try_from(i).expect("an int4 parameter fits")))
            } else if *ty == Type::FLOAT8 {
                Box::new(match value {
                    Value::Null => None,
                    Value::Real(f) => Some(*f),
                    other => panic!("{text}: {other:?} for a float8 parameter"),
                })
            } else {
                Box::new(match value {
                    Value::Null => None,
                    Value::Text(s) => Some(s.clone()),
                    Value::Time(t) => Some(format_stored(*t)),
                    other => panic!("{text}: {other:?} for a {ty} parameter"),
                })
            }
        })
        .collect();
    let refs: Vec<&(dyn ToSql + Sync)> = bound.iter().map(|b| b.as_ref()).collect();
    let rows = client
        .query(&stmt, &refs)
        .unwrap_or_else(|e| panic!("{text}: {e}"));
    rows.iter()
        .map(|row| {
            (0..row.len())
                .map(|i| pg_value(row, i).unwrap_or_else(|e| panic!("{text}: column {i}: {e}")))
                .collect()
        })
        .collect()
}

fn pg_value(row: &::postgres::Row, i: usize) -> Result<Value, String> {
    use ::postgres::types::{FromSql, Type};
    fn get<'a, T: FromSql<'a>>(row: &'a ::postgres::Row, i: usize) -> Result<Option<T>, String> {
        row.try_get::<_, Option<T>>(i).map_err(|e| e.to_string())
    }
    let ty = row.columns()[i].type_();
    let value = if *ty == Type::BOOL {
        get::<bool>(row, i)?.map(|b| Value::Int(i64::from(b)))
    } else if *ty == Type::INT8 {
        get::<i64>(row, i)?.map(Value::Int)
    } else if *ty == Type::INT4 {
        get::<i32>(row, i)?.map(|v| Value::Int(v.into()))
    } else if *ty == Type::INT2 {
        get::<i16>(row, i)?.map(|v| Value::Int(v.into()))
    } else if *ty == Type::FLOAT8 {
        get::<f64>(row, i)?.map(Value::Real)
    } else if *ty == Type::FLOAT4 {
        get::<f32>(row, i)?.map(|v| Value::Real(v.into()))
    } else if *ty == Type::TIMESTAMPTZ {
        get::<OffsetDateTime>(row, i)?.map(|t| Value::Text(format_stored(t)))
    } else if [Type::TEXT, Type::VARCHAR, Type::BPCHAR, Type::NAME].contains(ty) {
        get::<String>(row, i)?.map(Value::Text)
    } else {
        return Err(format!(
            "type {ty}: cast it to bigint, double precision or text in the query"
        ));
    };
    Ok(value.unwrap_or(Value::Null))
}

/// A warehouse to compare: a test's [`Warehouse`], or a SQLite file by its path.
pub enum Db<'a> {
    Warehouse(&'a Warehouse),
    Path(&'a Path),
}

impl<'a> From<&'a Warehouse> for Db<'a> {
    fn from(w: &'a Warehouse) -> Db<'a> {
        Db::Warehouse(w)
    }
}

impl<'a> From<&'a Path> for Db<'a> {
    fn from(p: &'a Path) -> Db<'a> {
        Db::Path(p)
    }
}

impl<'a> From<&'a PathBuf> for Db<'a> {
    fn from(p: &'a PathBuf) -> Db<'a> {
        Db::Path(p)
    }
}

impl Db<'_> {
    fn with<T>(self, f: impl FnOnce(&Warehouse) -> T) -> T {
        match self {
            Db::Warehouse(w) => f(w),
            Db::Path(p) => f(&Warehouse::Sqlite(p.to_owned())),
        }
    }
}

/// Differences between the warehouse and the simulator's visible state.
#[derive(Debug, Default)]
pub struct Diff {
    /// Live upstream, absent (or marked removed) in the warehouse.
    pub missing: Vec<String>,
    /// Present in both but with different values.
    pub stale: Vec<String>,
    /// Live in the warehouse but not upstream.
    pub ghosts: Vec<String>,
}

impl Diff {
    /// For a warehouse whose privacy policy drops patient fields (so every record differs from
    /// upstream in its patient by design): nothing missing, no ghosts.
    pub fn assert_empty_except_patients(&self) {
        assert!(self.missing.is_empty() && self.ghosts.is_empty(), "{self:?}");
    }

    pub fn assert_empty(&self) {
        assert!(
            self.missing.is_empty() && self.stale.is_empty() && self.ghosts.is_empty(),
            "warehouse differs from simulator: {} missing (e.g. {:?}), {} stale (e.g. {:?}), {} ghosts (e.g. {:?})",
            self.missing.len(),
            self.missing.first(),
            self.stale.len(),
            self.stale.first(),
            self.ghosts.len(),
            self.ghosts.first(),
        );
    }
}

#[derive(Debug, PartialEq)]
struct Row {
    organization_id: String,
    encounter_type: Option<String>,
    status: Option<String>,
    created_at: String,
    updated_at: String,
    date_of_service: Option<String>,
    patient: (String, Option<String>, Option<String>, Option<String>),
    documents: Vec<DocRow>,
}

type DocRow = (
    String,
    String,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<f64>,
);

/// Compares every live encounter, its patient and its document summaries.
pub fn compare<'a>(sim: &Simulator, db: impl Into<Db<'a>>) -> Diff {
    db.into().with(|w| compare_where(sim, w, None))
}

/// [`compare`] for one organization of a host: the warehouse's encounters of the simulator's
/// `organization_id` against that organization's data set (another organization's rows are
/// neither missing nor ghosts here).
pub fn compare_organization<'a>(sim: &Simulator, db: impl Into<Db<'a>>) -> Diff {
    db.into()
        .with(|w| compare_where(sim, w, Some(&sim.organization_id())))
}

/// An instant as the warehouse stores it: exactly on SQLite; on PostgreSQL, whose
/// `timestamptz` keeps microseconds, truncated to the microsecond as the backend binds it.
fn stored_instant(w: &Warehouse, t: OffsetDateTime) -> String {
    match w.backend() {
        Backend::Sqlite => format_stored(t),
        Backend::Postgres => format_stored(Micros::floor(t).instant()),
    }
}

/// The `date_of_service` the warehouse holds for what the API sent (docs/schema.md): an RFC 3339
/// timestamp as an instant, a plain `YYYY-MM-DD` date as that day's 00:00 UTC, anything else as
/// NULL.
fn stored_date_of_service(w: &Warehouse, sent: &serde_json::Value) -> Option<String> {
    let text = sent.as_str()?;
    let day = time::macros::format_description!("[year]-[month]-[day]");
    parse_rfc3339(text)
        .ok()
        .or_else(|| Some(time::Date::parse(text, day).ok()?.midnight().assume_utc()))
        .map(|at| stored_instant(w, at))
}

/// A stored `created_at`/`updated_at` with its `*_ns` twin: the exact instant when the two
/// agree (PostgreSQL's column holds it to the microsecond), else a text that matches nothing.
fn exact_instant(w: &Warehouse, column: String, ns: i64) -> String {
    let exact = from_unix_nanos(ns);
    if column == stored_instant(w, exact) {
        format_stored(exact)
    } else {
        format!("{column} disagrees with its _ns column {ns}")
    }
}

/// The next value of a row, converted (the row has as many columns as the query names).
fn take<T: FromValue>(values: impl IntoIterator<Item = Value>) -> T {
    let value = values.into_iter().next().expect("the query names this column");
    T::from_value(value).unwrap_or_else(|e| panic!("a compared column: {e}"))
}

fn compare_where(sim: &Simulator, w: &Warehouse, organization_id: Option<&str>) -> Diff {
    let mut docs: BTreeMap<String, Vec<DocRow>> = BTreeMap::new();
    let stored_docs: Vec<(String, DocRow)> = w
        .query(
            "SELECT encounter_id, document_id, schema_type, title, status, workflow_variant,
                    audio_duration_seconds
             FROM documents WHERE removed_at IS NULL ORDER BY encounter_id, position",
            &[],
        )
        .into_iter()
        .map(|mut row| {
            let doc = row.split_off(1);
            (take(row), DocRow::from_row(doc).expect("a document summary"))
        })
        .collect();
    for (enc, doc) in stored_docs {
        docs.entry(enc).or_default().push(doc);
    }
    let sql = format!(
        "SELECT e.encounter_id, e.organization_id, e.encounter_type, e.status, e.created_at,
                e.updated_at, e.date_of_service, e.created_at_ns, e.updated_at_ns, p.patient_id,
                p.first_name, p.last_name, p.date_of_birth
         FROM encounters e LEFT JOIN patients p USING (patient_id)
         WHERE e.removed_at IS NULL {}",
        if organization_id.is_some() {
            "AND e.organization_id = ?1"
        } else {
            ""
        }
    );
    let params: Vec<&dyn Param> = organization_id.iter().map(|o| o as &dyn Param).collect();
    let mut stored: BTreeMap<String, Row> = BTreeMap::new();
    for row in w.query(&sql, &params) {
        let mut v = row.into_iter();
        let id: String = take(&mut v);
        let organization_id = take(&mut v);
        let encounter_type = take(&mut v);
        let status = take(&mut v);
        let (created, updated): (String, String) = (take(&mut v), take(&mut v));
        let date_of_service = take(&mut v);
        let (created_ns, updated_ns): (i64, i64) = (take(&mut v), take(&mut v));
        let patient = (take(&mut v), take(&mut v), take(&mut v), take(&mut v));
        let mut documents = docs.remove(&id).unwrap_or_default();
        if sim.renders_unordered() {
            // The order a shuffled array happened to have when the record was written.
            documents.sort_by(|a, b| a.0.cmp(&b.0));
        }
        stored.insert(
            id,
            Row {
                organization_id,
                encounter_type,
                status,
                created_at: exact_instant(w, created, created_ns),
                updated_at: exact_instant(w, updated, updated_ns),
                date_of_service,
                patient,
                documents,
            },
        );
    }
    let mut diff = Diff::default();
    let mut upstream_ids = BTreeSet::new();
    for mut e in sim.snapshot() {
        upstream_ids.insert(e.encounter_id.clone());
        if sim.renders_unordered() {
            e.documents.sort_by(|a, b| a.document_id.cmp(&b.document_id));
        }
        let expected = Row {
            organization_id: e.organization_id.clone(),
            encounter_type: Some(e.encounter_type.clone()),
            status: Some(e.status.clone()),
            created_at: format_stored(sim.rendered_created_at(e.created_at)),
            updated_at: format_stored(e.updated_at),
            date_of_service: stored_date_of_service(w, &sim.rendered_date_of_service(&e)),
            patient: (
                e.patient.patient_id.clone(),
                e.patient.first_name.clone(),
                e.patient.last_name.clone(),
                e.patient.date_of_birth.map(|d| d.to_string()),
            ),
            documents: e
                .documents
                .iter()
                .map(|d| {
                    (
                        d.document_id.clone(),
                        d.schema_type.clone(),
                        d.title.clone(),
                        d.status.clone(),
                        d.workflow_variant.clone(),
                        d.audio_duration_seconds,
                    )
                })
                .collect(),
        };
        match stored.get(&e.encounter_id) {
            None => diff.missing.push(e.encounter_id),
            Some(row) if *row != expected => diff.stale.push(e.encounter_id),
            Some(_) => {}
        }
    }
    diff.ghosts = stored
        .keys()
        .filter(|id| !upstream_ids.contains(*id))
        .cloned()
        .collect();
    diff
}

/// Counts rows of a table.
pub fn count<'a>(db: impl Into<Db<'a>>, table: &str) -> i64 {
    db.into()
        .with(|w| w.scalar(&format!("SELECT count(*) FROM {table}"), &[]))
}

/// The `[content]` table that turns document and transcript fetching off, for config files.
pub const ENCOUNTERS_ONLY: &str = "\n[content]\ndetails = false\ntranscripts = false\n";

/// A stored transcript turn: speaker, start, end, text.
type Turn = (Option<String>, f64, f64, Option<String>);

/// Compares note text and transcripts, byte for byte, for every live document upstream.
/// Returns the IDs of documents whose content differs or is missing.
pub fn compare_content<'a>(sim: &Simulator, db: impl Into<Db<'a>>) -> Vec<String> {
    db.into().with(|w| {
        let notes: BTreeMap<String, Option<String>> = w
            .rows("SELECT document_id, content_text FROM documents", &[])
            .into_iter()
            .collect();
        let mut turns: BTreeMap<String, Vec<Turn>> = BTreeMap::new();
        let stored = w.rows::<(String, Option<String>, f64, f64, Option<String>)>(
            "SELECT document_id, speaker, start_seconds, end_seconds, text FROM transcript_turns
             ORDER BY document_id, turn_index",
            &[],
        );
        for (document_id, speaker, start, end, text) in stored {
            turns
                .entry(document_id)
                .or_default()
                .push((speaker, start, end, text));
        }
        let mut bad = Vec::new();
        for e in sim.snapshot() {
            for d in &e.documents {
                let ok = match d.schema_type.as_str() {
                    "document" => {
                        notes.get(&d.document_id).cloned().flatten()
                            == sim.note_text(&e.encounter_id, &d.document_id)
                    }
                    "ambient_transcript" => {
                        let stored = turns.remove(&d.document_id).unwrap_or_default();
                        match sim.transcript(&e.encounter_id, &d.document_id) {
                            Some(t) => {
                                let want: Vec<Turn> = t
                                    .turns
                                    .into_iter()
                                    .map(|t| (Some(t.speaker), t.start, t.end, Some(t.text)))
                                    .collect();
                                stored == want
                            }
                            None => stored.is_empty(),
                        }
                    }
                    _ => true,
                };
                if !ok {
                    bad.push(d.document_id.clone());
                }
            }
        }
        bad
    })
}

/// A finished command's stdout and stderr, as one text.
pub fn text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs a blocking command without stalling the runtime that serves the simulator.
pub async fn run(mut cmd: std::process::Command) -> std::process::Output {
    tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap()
}

/// The binary with none of the environment that would change what it reads.
/// The exit codes the shipped unit `systemd/<unit>` is not restarted on
/// (`RestartPreventExitStatus=`).
pub fn restart_prevented(unit: &str) -> Vec<String> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("systemd")
        .join(unit);
    std::fs::read_to_string(&path)
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("RestartPreventExitStatus="))
        .unwrap_or_else(|| panic!("{} sets no RestartPreventExitStatus=", path.display()))
        .split_whitespace()
        .map(str::to_owned)
        .collect()
}

pub fn charthero_sync() -> std::process::Command {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_charthero-sync"));
    cmd.env_remove("CHARTHERO_API_KEY")
        .env_remove("CREDENTIALS_DIRECTORY")
        .env_remove("CHARTHERO_SYNC_CONFIG")
        .env_remove("CHARTHERO_DATABASE_PASSWORD")
        .env_remove("CHARTHERO_WEBHOOK_SECRET")
        .env_remove("NOTIFY_SOCKET")
        .env_remove("WATCHDOG_USEC")
        .env("RUST_LOG", "warn");
    cmd
}

/// Runs a command to completion like [`run`], but kills it and fails the test if it takes longer
/// than `limit`: a hang is a bug, not a slow test.
pub async fn run_within(mut cmd: std::process::Command, limit: Duration) -> std::process::Output {
    use std::process::Stdio;
    let described = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let waited = tokio::task::spawn_blocking(move || {
        // Drain both pipes on their own threads so a chatty child never blocks on a full pipe.
        let mut out = child.stdout.take().unwrap();
        let mut err = child.stderr.take().unwrap();
        let out = std::thread::spawn(move || {
            let mut b = Vec::new();
            std::io::Read::read_to_end(&mut out, &mut b).ok();
            b
        });
        let err = std::thread::spawn(move || {
            let mut b = Vec::new();
            std::io::Read::read_to_end(&mut err, &mut b).ok();
            b
        });
        let status = child.wait().unwrap();
        std::process::Output {
            status,
            stdout: out.join().unwrap(),
            stderr: err.join().unwrap(),
        }
    });
    match tokio::time::timeout(limit, waited).await {
        Ok(out) => out.unwrap(),
        Err(_) => {
            std::process::Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status()
                .ok();
            panic!("{described} did not finish within {limit:?}");
        }
    }
}

/// A loopback port nobody listens on right now (bound and released: the caller's server binds
/// it next).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Polls `check` until it holds, and fails the test naming `what` if it has not within `limit`.
/// The first polls come quickly, so a test that acts on the event (a kill point) acts soon
/// after it; later ones every 100 ms at most, since some checks compare a whole warehouse.
pub async fn wait_for(what: &str, limit: Duration, mut check: impl FnMut() -> bool) {
    let started = std::time::Instant::now();
    let mut pause = Duration::from_millis(10);
    while !check() {
        assert!(started.elapsed() < limit, "{what}: not within {limit:?}");
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}

/// Waits for `child` to exit and returns its exit code; if it has not within `limit`, kills it
/// and fails the test naming `what` (a hang is a bug, not a slow test).
pub async fn wait_exit(what: &str, child: &mut std::process::Child, limit: Duration) -> Option<i32> {
    let started = std::time::Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status.code();
        }
        if started.elapsed() > limit {
            child.kill().ok();
            child.wait().ok();
            panic!("{what} did not exit within {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A spawned process that is killed and reaped when dropped, so a test that fails midway
/// leaves nothing running.
pub struct KillOnDrop(pub std::process::Child);

impl std::ops::Deref for KillOnDrop {
    type Target = std::process::Child;
    fn deref(&self) -> &std::process::Child {
        &self.0
    }
}

impl std::ops::DerefMut for KillOnDrop {
    fn deref_mut(&mut self) -> &mut std::process::Child {
        &mut self.0
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        // Both fail harmlessly on a process already waited for.
        self.0.kill().ok();
        self.0.wait().ok();
    }
}
