//! The performance envelope, measured against the in-process simulator over loopback with the
//! real sync and real SQLite files (and, in `backends`, a real PostgreSQL server). Prints
//! numbers; asserts only correctness (equal row counts, zero rate violations), never time.
//!
//! `cargo bench --bench envelope -- [scenario...]` runs at full size; with no scenario, all run.
//! Scenarios: `list` (list-only backfills of 100k and 1M, as a child process whose peak RSS is
//! read from /proc; `CHARTHERO_BENCH_LIST_SIZES=100000` picks sizes), `bound` (the same rows
//! written again without HTTP; runs `list` first, and `list` named alone skips it), `transcripts`
//! (full content at a rate limit), `backends` (SQLite and PostgreSQL side by side: a list-only
//! backfill of 100k and the full content one of `transcripts`, into each backend in turn, as a
//! child process; PostgreSQL on a throwaway cluster from `charthero_sim::pgcluster`, skipped
//! with the reason printed when there is no server unless `CHARTHERO_REQUIRE_POSTGRES=1`),
//! `latency` (50 ms injected per request), `idle` (a quiet incremental cycle), `churn` (a
//! backfill while upstream mutates), `audit` (the history audit of a 1M warehouse with 0, 10 and
//! 100 changes), `plan` (the estimate against the full-content backfill of 20,000 encounters it
//! predicts), `queries` (every documented query and view of docs/schema.md on a full-content
//! warehouse of 100,000 encounters, timed by benches/analyst_queries.py with Python's sqlite3),
//! `fairness` (two organizations in one daemon: one backfilling 100k with full content while
//! the other's new encounters arrive; the second's creation-to-warehouse latency, against the
//! same organization alone), `dlt` (the peer, if `CHARTHERO_BENCH_PYTHON` names a Python with
//! dlt and duckdb; see benches/run.sh).
//! `cargo test --bench envelope` runs every scenario small, as a smoke test.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use charthero_sim::pgcluster::{PgCluster, PgDatabase};
use charthero_sim::{Fault, FaultRule, ListRequest, NewEncounter, RateLimit, Route, SimOptions, Simulator};
use charthero_sync::config::RawConfig;
use charthero_sync::secret::ApiKey;
use charthero_sync::sync::CyclePlan;
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

/// `cargo bench` passes `--bench`; `cargo test --bench` does not: then run small.
fn full_size() -> bool {
    std::env::args().any(|a| a == "--bench")
}

fn size(full: usize, smoke: usize) -> usize {
    if full_size() { full } else { smoke }
}

fn wanted(name: &str) -> bool {
    let named: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    named.is_empty() || named.iter().any(|n| n == name)
}

async fn start_sim(encounters: usize) -> Simulator {
    let now = OffsetDateTime::now_utc();
    Simulator::start(SimOptions {
        seed: 7,
        encounters,
        start: now - time::Duration::days(30),
        end: now - time::Duration::hours(1),
        ..SimOptions::default()
    })
    .await
    .expect("simulator starts")
}

fn config(sim: &Simulator, db: &Path, rps: f64, burst: u32, in_flight: u32) -> RawConfig {
    let mut raw = RawConfig::default();
    raw.api.base_url = sim.base_url();
    raw.api.api_key_file = None;
    raw.database.path = Some(db.to_owned());
    raw.sync.start_at =
        charthero_sync::timefmt::format_utc(OffsetDateTime::now_utc() - time::Duration::days(31));
    raw.sync.settle_lag = "0s".into();
    raw.limits.requests_per_second = rps;
    raw.limits.burst = i64::from(burst);
    raw.limits.max_in_flight = i64::from(in_flight);
    raw
}

fn list_only(mut raw: RawConfig) -> RawConfig {
    raw.content.details = false;
    raw.content.transcripts = false;
    raw
}

/// One cycle of `plan`; the benchmark stops on a failed cycle.
async fn sync(
    sim: &Simulator,
    cfg: &charthero_sync::config::Config,
    plan: CyclePlan,
) -> charthero_sync::sync::CycleReport {
    charthero_sync::sync_once(cfg, &key(sim), "bench", plan, &CancellationToken::new())
        .await
        .expect("the cycle completes")
}

fn key(sim: &Simulator) -> ApiKey {
    ApiKey::new(&sim.api_key()).unwrap()
}

fn count(db: &Path, table: &str) -> i64 {
    charthero_sync::store::sqlite::open_reader(db, Duration::from_secs(5))
        .unwrap()
        .query_row(&format!("SELECT count(*) FROM {table}"), [], |r| r.get(0))
        .unwrap()
}

/// Writes `raw` as a TOML file the binary can read (only the keys the benchmarks change), the
/// warehouse being the SQLite file `raw.database.path`.
fn write_config(raw: &RawConfig, dir: &Path, key: &str) -> PathBuf {
    let path = raw.database.path.as_deref().expect("a SQLite file");
    let database = format!("path = \"{}\"\n", path.display());
    write_config_for(raw, dir, key, &database)
}

/// [`write_config`] with `database` as the lines of the `[database]` section.
fn write_config_for(raw: &RawConfig, dir: &Path, key: &str, database: &str) -> PathBuf {
    let key_path = dir.join("api-key");
    write_secret(&key_path, key);
    let path = dir.join("config.toml");
    let text = format!(
        "[api]\nbase_url = \"{}\"\napi_key_file = \"{}\"\n[database]\n{database}\
         [sync]\nstart_at = \"{}\"\nsettle_lag = \"0s\"\n\
         [limits]\nrequests_per_second = {:.1}\nburst = {}\nmax_in_flight = {}\n\
         [content]\ndetails = {}\ntranscripts = {}\n",
        raw.api.base_url,
        key_path.display(),
        raw.sync.start_at,
        raw.limits.requests_per_second,
        raw.limits.burst,
        raw.limits.max_in_flight,
        raw.content.details,
        raw.content.transcripts,
    );
    std::fs::write(&path, text).unwrap();
    path
}

/// Writes a secret file the binary accepts: readable by its owner only.
fn write_secret(path: &Path, secret: &str) {
    std::fs::write(path, secret).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

/// Runs `charthero-sync sync` as a child process; returns its wall time and peak RSS (KiB),
/// the high-water mark read from /proc while it runs.
async fn run_child(config: &Path) -> (Duration, u64) {
    let started = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_charthero-sync"))
        .arg("--config")
        .arg(config)
        .arg("sync")
        .env("RUST_LOG", "warn")
        .spawn()
        .unwrap();
    let status_path = format!("/proc/{}/status", child.id());
    let mut peak_kib = 0;
    loop {
        if let Ok(status) = std::fs::read_to_string(&status_path)
            && let Some(kib) = status
                .lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
        {
            peak_kib = peak_kib.max(kib);
        }
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "the sync failed");
            return (started.elapsed(), peak_kib);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// List-only backfills of two sizes in a child process: throughput, list requests against the
/// ceil(N/100) minimum, peak RSS and its growth with N.
async fn list() -> Vec<(usize, f64, tempfile::TempDir)> {
    let mut results = Vec::new();
    let mut rss = Vec::new();
    // CHARTHERO_BENCH_LIST_SIZES=100000 runs only the 100k backfill (the 1M one takes minutes).
    let sizes: Vec<usize> = std::env::var("CHARTHERO_BENCH_LIST_SIZES")
        .ok()
        .map(|v| v.split(',').filter_map(|n| n.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![size(100_000, 2_000), size(1_000_000, 20_000)]);
    for n in sizes {
        let sim = start_sim(n).await;
        let dir = tempfile::tempdir().unwrap();
        let raw = list_only(config(&sim, &dir.path().join("w.db"), 1_000_000.0, 1_000, 4));
        let cfg = write_config(&raw, dir.path(), &sim.api_key());
        let (elapsed, peak_kib) = run_child(&cfg).await;
        let stats = sim.stats();
        assert_eq!(
            count(raw.database.path.as_deref().expect("a SQLite file"), "encounters") as usize,
            n
        );
        let minimum = n.div_ceil(100) as f64;
        let rate = n as f64 / elapsed.as_secs_f64();
        println!(
            "list: {n} encounters in {:.2} s = {rate:.0} encounters/s; {} list requests ({:.3} x the minimum {minimum}); \
             peak RSS {:.1} MiB; {:.0} rows/s written",
            elapsed.as_secs_f64(),
            stats.route(Route::List),
            stats.route(Route::List) as f64 / minimum,
            peak_kib as f64 / 1024.0,
            rate,
        );
        rss.push(peak_kib as f64);
        sim.shutdown();
        results.push((n, rate, dir));
    }
    if let [small, .., large] = rss[..] {
        println!("list: peak RSS ratio large/small = {:.3}", large / small);
    }
    results
}

/// The physical bound: the rows a list-only sync stored in `source`, parsed again from their
/// JSON and written through `store::commit_page` into a fresh database, eight pages of 100 per
/// transaction — no HTTP, no paging, no rate limit.
fn bound(source: &Path) -> f64 {
    let conn = charthero_sync::store::sqlite::open_reader(source, Duration::from_secs(5)).unwrap();
    let raws: Vec<String> = conn
        .prepare("SELECT raw_json FROM encounters ORDER BY created_at_ns")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let privacy = RawConfig::default().validate().unwrap().privacy;
    let records: Vec<charthero_sync::store::EncounterRecord> = raws
        .iter()
        .map(|raw| {
            let e = charthero_sync::api::wire::Encounter::parse(raw).unwrap();
            charthero_sync::sync::encounter_record(e, &privacy)
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let mut conn =
        charthero_sync::store::sqlite::open_writer(&dir.path().join("b.db"), Duration::from_secs(5)).unwrap();
    let started = Instant::now();
    let mut rows = 0;
    // Pages of 100, eight to a transaction: what the sync's writer commits when it is the
    // bottleneck (the pager keeps up to eight pages queued, and the writer groups them).
    for group in records.chunks(800) {
        let tx = conn.transaction().unwrap();
        for page in group.chunks(100) {
            rows +=
                charthero_sync::store::sqlite::commit_page(&tx, page, &[], None, OffsetDateTime::now_utc())
                    .unwrap()
                    .new;
        }
        tx.commit().unwrap();
    }
    let rate = rows as f64 / started.elapsed().as_secs_f64();
    println!("bound: bare rusqlite batched upsert of {rows} encounters: {rate:.0} rows/s");
    rate
}

/// The size and rate limit (requests per second) of the full content backfill that
/// `transcripts` and `backends` run.
fn content_load() -> (usize, f64) {
    if full_size() { (2_000, 200.0) } else { (150, 100.0) }
}

/// A full content backfill (notes and transcripts) under a rate limit: the achieved request
/// rate against the configured one, and the violations the server counted.
async fn transcripts() {
    let (encounters, rps) = content_load();
    let sim = start_sim(encounters).await;
    sim.set_rate_limit(Some(RateLimit {
        requests_per_second: rps,
        burst: 5,
        enforce: false,
    }));
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(&sim, &dir.path().join("w.db"), rps, 5, 4)
        .validate()
        .unwrap();
    let started = Instant::now();
    let report = sync(&sim, &cfg, CyclePlan::full(None, false)).await;
    let elapsed = started.elapsed().as_secs_f64();
    let stats = sim.stats();
    let achieved = stats.requests as f64 / elapsed;
    // The floor the data needs: list pages + one request per note + one per finalized transcript.
    let (mut notes, mut finalized) = (0u64, 0u64);
    for e in sim.snapshot() {
        for d in &e.documents {
            if d.schema_type == "document" {
                notes += 1;
            } else if sim.transcript(&e.encounter_id, &d.document_id).is_some() {
                finalized += 1;
            }
        }
    }
    let floor = stats.route(Route::List) + notes + finalized;
    println!(
        "transcripts: {encounters} encounters, {} requests (list {}, document {}, transcript {}) in {elapsed:.2} s; \
         {:.3} requests per encounter, {:.3} x the floor of {floor} (list + {notes} notes + {finalized} finalized \
         transcripts); achieved {achieved:.1} req/s of {rps} configured ({:.1} %); {} rate violations; \
         {} documents, {} transcripts fetched",
        stats.requests,
        stats.route(Route::List),
        stats.route(Route::Document),
        stats.route(Route::Transcript),
        stats.requests as f64 / encounters as f64,
        stats.requests as f64 / floor as f64,
        100.0 * achieved / rps,
        stats.rate_violations,
        report.counts.documents_fetched,
        report.counts.transcripts_fetched,
    );
    assert_eq!(
        stats.rate_violations, 0,
        "the client exceeded its configured rate"
    );
}

/// The warehouse a `backends` run writes: a SQLite file, or a database of its own on the
/// scenario's throwaway PostgreSQL cluster (its password in a 0600 file named by
/// `password_file`).
enum Warehouse<'a> {
    Sqlite(PathBuf),
    Postgres {
        cluster: &'a PgCluster,
        db: PgDatabase,
        password_file: PathBuf,
    },
}

impl Warehouse<'_> {
    fn name(&self) -> &'static str {
        match self {
            Warehouse::Sqlite(_) => "sqlite",
            Warehouse::Postgres { .. } => "postgresql",
        }
    }

    /// The lines of the configuration's `[database]` section.
    fn database_toml(&self) -> String {
        match self {
            Warehouse::Sqlite(path) => format!("path = \"{}\"\n", path.display()),
            Warehouse::Postgres {
                db, password_file, ..
            } => format!(
                "url = \"{}\"\nschema = \"charthero\"\npassword_file = \"{}\"\n",
                db.url,
                password_file.display()
            ),
        }
    }

    /// Runs `sql` in the PostgreSQL warehouse as the superuser; its rows, `|` between columns.
    fn psql(cluster: &PgCluster, db: &PgDatabase, sql: &str) -> String {
        cluster
            .psql_in(&db.name, sql)
            .unwrap_or_else(|e| panic!("{e}"))
            .trim()
            .to_owned()
    }

    fn count(&self, table: &str) -> i64 {
        match self {
            Warehouse::Sqlite(path) => count(path, table),
            Warehouse::Postgres { cluster, db, .. } => {
                Self::psql(cluster, db, &format!("SELECT count(*) FROM charthero.{table}"))
                    .parse()
                    .unwrap()
            }
        }
    }

    /// Waits until no session but ours is connected to the PostgreSQL warehouse: the sync's
    /// end after it exits, and flush their statistics as they end.
    fn quiesce(cluster: &PgCluster, db: &PgDatabase) {
        let others = "SELECT count(*) FROM pg_stat_activity \
                      WHERE datname = current_database() AND backend_type = 'client backend' \
                      AND pid <> pg_backend_pid()";
        let deadline = Instant::now() + Duration::from_secs(30);
        while Self::psql(cluster, db, others) != "0" {
            assert!(
                Instant::now() < deadline,
                "the sync's sessions outlived it by 30 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Zeroes the server's counters a run reports (WAL, the database's transactions); answers
    /// the server's CPU time so far (0 for SQLite).
    fn reset_counters(&self) -> Duration {
        match self {
            Warehouse::Sqlite(_) => Duration::ZERO,
            Warehouse::Postgres { cluster, db, .. } => {
                Self::quiesce(cluster, db);
                Self::psql(
                    cluster,
                    db,
                    "SELECT pg_stat_reset(); SELECT pg_stat_reset_shared('wal');",
                );
                server_cpu(cluster)
            }
        }
    }

    /// The warehouse's size on disk, and for PostgreSQL what the run cost the server since
    /// [`Warehouse::reset_counters`] answered `cpu_before`.
    fn footprint(&self, cpu_before: Duration) -> String {
        let mib = |bytes: f64| bytes / (1024.0 * 1024.0);
        match self {
            Warehouse::Sqlite(path) => {
                let wal = PathBuf::from(format!("{}-wal", path.display()));
                let size = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0) as f64;
                format!(
                    "file {:.1} MiB (+ WAL {:.1} MiB)",
                    mib(size(path)),
                    mib(size(&wal))
                )
            }
            Warehouse::Postgres { cluster, db, .. } => {
                Self::quiesce(cluster, db);
                let cpu = server_cpu(cluster) - cpu_before;
                let row = Self::psql(
                    cluster,
                    db,
                    "SELECT pg_database_size(current_database()), \
                     (SELECT sum(pg_total_relation_size(c.oid)) FROM pg_class c \
                      WHERE c.relnamespace = 'charthero'::regnamespace AND c.relkind IN ('r', 'm')), \
                     wal_bytes, wal_records, wal_sync, \
                     (SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()) \
                     FROM pg_stat_wal",
                );
                let v: Vec<f64> = row.split('|').map(|f| f.parse().unwrap()).collect();
                format!(
                    "pg_database_size {:.1} MiB (the schema's tables and indexes {:.1} MiB); \
                     WAL {:.1} MiB in {:.0} records, {:.0} WAL syncs; {:.0} transactions committed; \
                     server CPU {:.2} s",
                    mib(v[0]),
                    mib(v[1]),
                    mib(v[2]),
                    v[3],
                    v[4],
                    v[5],
                    cpu.as_secs_f64()
                )
            }
        }
    }
}

/// The CPU time the cluster's server has used: the postmaster's, its running processes' and
/// that of the sessions it has reaped (from /proc, in USER_HZ ticks of 10 ms).
fn server_cpu(cluster: &PgCluster) -> Duration {
    let pidfile = std::fs::read_to_string(cluster.socket_dir().join("data/postmaster.pid")).unwrap();
    let postmaster = pidfile.lines().next().unwrap().trim().to_owned();
    // utime, stime, cutime, cstime: fields 14 to 17 of /proc/PID/stat, counted after the
    // parenthesized command name (field 2, which may hold spaces).
    let ticks = |pid: &str| -> u64 {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let Some((_, fields)) = stat.rsplit_once(')') else {
            return 0;
        };
        fields
            .split_whitespace()
            .skip(11)
            .take(4)
            .filter_map(|f| f.parse::<u64>().ok())
            .sum()
    };
    let children =
        std::fs::read_to_string(format!("/proc/{postmaster}/task/{postmaster}/children")).unwrap_or_default();
    let total = ticks(&postmaster) + children.split_whitespace().map(ticks).sum::<u64>();
    Duration::from_millis(total * 10)
}

/// SQLite and PostgreSQL side by side in one run: a list-only backfill, then a full content one
/// at the rate limit `transcripts` uses, into each backend in turn, the sync a child process;
/// the same simulated data for both. PostgreSQL is a throwaway cluster (server defaults, fsync
/// on, data directory on the same disk as the SQLite file), skipped when there is none unless
/// `CHARTHERO_REQUIRE_POSTGRES=1`.
async fn backends() {
    let cluster = charthero_sim::pgcluster::require_or_skip();
    match &cluster {
        Some(cluster) => println!(
            "backends: postgresql server {}",
            cluster
                .psql(
                    "SELECT format('%s; fsync %s, synchronous_commit %s, shared_buffers %s, \
                     max_wal_size %s, wal_level %s', version(), current_setting('fsync'), \
                     current_setting('synchronous_commit'), current_setting('shared_buffers'), \
                     current_setting('max_wal_size'), current_setting('wal_level'))"
                )
                .unwrap()
                .trim()
        ),
        None => println!(
            "backends: postgresql skipped: no PostgreSQL server could be started (the reason is on stderr)"
        ),
    }
    for content in [false, true] {
        let (case, n, rps, burst) = if content {
            let (n, rps) = content_load();
            ("content", n, rps, 5)
        } else {
            ("list", size(100_000, 2_000), 1_000_000.0, 1_000)
        };
        let sim = start_sim(n).await;
        // What a complete warehouse holds: every document, each note's detail, a transcript for
        // each finished recording.
        let snapshot = sim.snapshot();
        let documents: Vec<_> = snapshot
            .iter()
            .flat_map(|e| e.documents.iter().map(move |d| (e, d)))
            .collect();
        let notes = documents
            .iter()
            .filter(|(_, d)| d.schema_type == "document")
            .count();
        let finished = documents
            .iter()
            .filter(|(e, d)| {
                d.schema_type != "document" && sim.transcript(&e.encounter_id, &d.document_id).is_some()
            })
            .count();
        // SQLite, then PostgreSQL when there is a server.
        for server in [None].into_iter().chain(cluster.as_ref().map(Some)) {
            let dir = tempfile::tempdir().unwrap();
            let warehouse = match server {
                Some(cluster) => {
                    let db = cluster.create_database(&format!("bench_{case}")).unwrap();
                    let password_file = dir.path().join("database-password");
                    write_secret(&password_file, &db.password);
                    Warehouse::Postgres {
                        cluster,
                        db,
                        password_file,
                    }
                }
                None => Warehouse::Sqlite(dir.path().join("w.db")),
            };
            let mut raw = config(&sim, &dir.path().join("w.db"), rps, burst, 4);
            if content {
                sim.set_rate_limit(Some(RateLimit {
                    requests_per_second: rps,
                    burst,
                    enforce: false,
                }));
            } else {
                raw = list_only(raw);
            }
            let cfg = write_config_for(&raw, dir.path(), &sim.api_key(), &warehouse.database_toml());
            // The schema is created before the timed sync, so neither the time nor the WAL
            // counts it.
            let migrated = Command::new(env!("CARGO_BIN_EXE_charthero-sync"))
                .arg("--config")
                .arg(&cfg)
                .arg("migrate")
                .env("RUST_LOG", "warn")
                .stdout(std::process::Stdio::null())
                .status()
                .unwrap();
            assert!(migrated.success(), "the migration failed");
            sim.reset_stats();
            let cpu_before = warehouse.reset_counters();
            let (elapsed, peak_kib) = run_child(&cfg).await;
            let stats = sim.stats();
            assert_eq!(
                warehouse.count("encounters") as usize,
                n,
                "{} {case}",
                warehouse.name()
            );
            if content {
                let stored = |table: &str| warehouse.count(table) as usize;
                assert_eq!(
                    stored("documents"),
                    documents.len(),
                    "{} {case}",
                    warehouse.name()
                );
                assert_eq!(
                    stored("documents WHERE schema_type = 'document' AND detail_state = 'done'"),
                    notes,
                    "{} {case}",
                    warehouse.name()
                );
                assert_eq!(stored("transcripts"), finished, "{} {case}", warehouse.name());
            }
            // Rate violations are reported, not asserted: `transcripts` asserts them; here one
            // counted on a loaded machine would cost the comparison the other backend's numbers.
            println!(
                "backends: {case} {}: {n} encounters in {:.2} s = {:.0} encounters/s; peak RSS {:.1} MiB; \
                 {:.3} requests per encounter ({} requests, {} list; {:.1} req/s, {} rate violations); {}",
                warehouse.name(),
                elapsed.as_secs_f64(),
                n as f64 / elapsed.as_secs_f64(),
                peak_kib as f64 / 1024.0,
                stats.requests as f64 / n as f64,
                stats.requests,
                stats.route(Route::List),
                stats.requests as f64 / elapsed.as_secs_f64(),
                stats.rate_violations,
                warehouse.footprint(cpu_before),
            );
        }
        sim.shutdown();
    }
}

/// 50 ms added to every response: throughput against min(rps, max_in_flight / RTT).
async fn latency() {
    let encounters = size(1_000, 100);
    let sim = start_sim(encounters).await;
    sim.push_fault(FaultRule {
        route: None,
        skip: 0,
        times: u64::MAX,
        fault: Fault::Delay(Duration::from_millis(50)),
    });
    let (rps, in_flight) = (200.0, 8);
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(&sim, &dir.path().join("w.db"), rps, 5, in_flight)
        .validate()
        .unwrap();
    let started = Instant::now();
    sync(&sim, &cfg, CyclePlan::full(None, false)).await;
    let elapsed = started.elapsed().as_secs_f64();
    let requests = sim.stats().requests as f64;
    let ceiling = rps.min(f64::from(in_flight) / 0.050);
    println!(
        "latency: 50 ms per response, {requests} requests in {elapsed:.2} s = {:.1} req/s; \
         ceiling min(rps {rps}, max_in_flight {in_flight} / 50 ms) = {ceiling:.0}; ratio {:.3}",
        requests / elapsed,
        requests / elapsed / ceiling
    );
}

/// A second cycle with nothing changed upstream: only the revisit horizon's list requests.
async fn idle() {
    let encounters = size(20_000, 500);
    let sim = start_sim(encounters).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(&sim, &dir.path().join("w.db"), 100_000.0, 1_000, 8)
        .validate()
        .unwrap();
    sync(&sim, &cfg, CyclePlan::full(None, false)).await;
    sim.reset_stats();
    let started = Instant::now();
    let report = sync(&sim, &cfg, CyclePlan::full(None, false)).await;
    let stats = sim.stats();
    println!(
        "idle: quiet incremental cycle over {encounters} encounters in {:.3} s: {} list, {} document, {} transcript \
         requests; {} rows changed",
        started.elapsed().as_secs_f64(),
        stats.route(Route::List),
        stats.route(Route::Document),
        stats.route(Route::Transcript),
        report.counts.encounters_new + report.counts.encounters_changed,
    );
    assert_eq!(stats.route(Route::Document) + stats.route(Route::Transcript), 0);
}

/// A list-only backfill while upstream changes on 40 % of list requests: list requests per
/// encounter, and equality after a reconcile.
async fn churn() {
    let n = size(100_000, 3_000);
    let sim = start_sim(n).await;
    let rng = Mutex::new(fastrand::Rng::with_seed(9));
    let mutations = Arc::new(Mutex::new(0u64));
    let counter = mutations.clone();
    sim.set_list_hook(Some(Arc::new(move |sim: &Simulator, req: &ListRequest| {
        let mut rng = rng.lock().unwrap();
        if rng.u32(0..10) >= 4 {
            return;
        }
        let cursor = req.start_at.unwrap_or_else(OffsetDateTime::now_utc);
        *counter.lock().unwrap() += 1;
        let first = cursor - time::Duration::days(1);
        match rng.u32(0..3) {
            0 => {
                let at = first + time::Duration::seconds(rng.i64(0..86_400));
                sim.insert(NewEncounter::at(at));
            }
            _ => {
                sim.insert(NewEncounter::at(OffsetDateTime::now_utc()));
            }
        }
    })));
    let dir = tempfile::tempdir().unwrap();
    let cfg = list_only(config(&sim, &dir.path().join("w.db"), 100_000.0, 1_000, 4))
        .validate()
        .unwrap();
    let cancel = CancellationToken::new();
    let report =
        charthero_sync::sync_once(&cfg, &key(&sim), "bench", CyclePlan::full(None, false), &cancel).await;
    sim.set_list_hook(None);
    let list = sim.stats().route(Route::List);
    let range = charthero_sync::sync::BackfillRange {
        start: cfg.sync.start_at,
        end: OffsetDateTime::now_utc(),
    };
    sync(&sim, &cfg, CyclePlan::full(Some(range), false)).await;
    // Mutations may insert just before sync.start_at, which is outside what is replicated.
    let expected = sim
        .snapshot()
        .iter()
        .filter(|e| e.created_at >= cfg.sync.start_at)
        .count() as i64;
    let missing = expected
        - count(
            cfg.database.sqlite_path().expect("a SQLite file"),
            "encounters WHERE removed_at IS NULL",
        );
    println!(
        "churn: {n} encounters, {} mutations during the backfill, {list} list requests = {:.3} x the minimum {}; \
         re-scans {}; missing after a reconcile: {missing}",
        mutations.lock().unwrap(),
        list as f64 / n.div_ceil(100) as f64,
        n.div_ceil(100),
        report.map(|r| r.counts.rescans).unwrap_or_default(),
    );
}

/// Syncs the last of `orgs` (name, simulator, key budget) once, then runs the daemon over all of
/// them for `run_for`, while one new encounter a second arrives in `watched` (the last); returns each new encounter's creation-to-warehouse
/// latency in seconds (`first_seen_at` minus its `created_at`), sorted, the host's requests
/// while the daemon ran, and its ceiling violations (all along).
async fn daemon_latency(
    orgs: &[(&str, &Simulator, f64)],
    watched: &Simulator,
    ceiling: (f64, u32),
    interval: u64,
    run_for: Duration,
) -> (Vec<f64>, u64, u64) {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("w.db");
    let mut raw = config(orgs[0].1, &db, ceiling.0, ceiling.1, 8);
    raw.sync.schedule = format!("*/{interval} * * * * *");
    raw.sync.audit_every = "0s".into();
    for (name, sim, rps) in orgs {
        raw.organizations.push(charthero_sync::config::RawOrganization {
            name: (*name).to_owned(),
            organization_id: Some(sim.organization_id()),
            requests_per_second: Some(*rps),
            burst: Some(10),
            max_in_flight: Some(8),
            ..Default::default()
        });
    }
    let cfg = raw.validate().unwrap();
    let keys: Vec<_> = orgs
        .iter()
        .zip(&cfg.organizations)
        .map(|((_, sim, _), org)| (org.clone(), key(sim)))
        .collect();
    // The watched organization (the last) is already in sync when the measurement starts.
    let watched_key = keys.last().cloned().into_iter().collect();
    let first = charthero_sync::sync_organizations(
        &cfg,
        watched_key,
        "bench",
        CyclePlan::full(None, false),
        &CancellationToken::new(),
    )
    .await
    .unwrap();
    assert!(
        first.iter().all(|c| c.result.is_ok()),
        "the first sync of the watched organization failed"
    );
    let (requests_before, _) = orgs[0].1.host_stats();
    let shutdown = CancellationToken::new();
    let daemon = {
        let (cfg, shutdown) = (cfg.clone(), shutdown.clone());
        tokio::spawn(async move {
            charthero_sync::daemon::serve_organizations(
                &cfg,
                keys,
                Vec::new(),
                None,
                &charthero_sync::daemon::notify::Notifier::silent(),
                &shutdown,
            )
            .await
        })
    };
    let mut created = Vec::new();
    let started = Instant::now();
    while started.elapsed() < run_for {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let at = OffsetDateTime::now_utc();
        created.push((watched.insert(NewEncounter::at(at)), at));
    }
    // The last ones get one more schedule interval (and a cycle) to arrive.
    tokio::time::sleep(Duration::from_secs(interval + 2)).await;
    shutdown.cancel();
    daemon.await.unwrap().expect("the daemon stops cleanly");
    let conn = charthero_sync::store::sqlite::open_reader(&db, Duration::from_secs(5)).unwrap();
    let mut latencies: Vec<f64> = created
        .iter()
        .map(|(id, at)| {
            let seen: String = conn
                .query_row(
                    "SELECT first_seen_at FROM encounters WHERE encounter_id = ?1",
                    [id],
                    |r| r.get(0),
                )
                .unwrap_or_else(|_| {
                    let runs: Vec<(String, String, Option<String>)> = conn
                        .prepare("SELECT organization, outcome, error FROM sync_runs")
                        .unwrap()
                        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                        .unwrap()
                        .map(Result::unwrap)
                        .collect();
                    panic!("{id} created {at} never reached the warehouse; runs: {runs:?}")
                });
            (charthero_sync::timefmt::parse_rfc3339(&seen).unwrap() - *at).as_seconds_f64()
        })
        .collect();
    latencies.sort_by(f64::total_cmp);
    let (requests, violations) = orgs[0].1.host_stats();
    (latencies, requests - requests_before, violations)
}

/// Fairness: organization A backfills 100k encounters with full content (its first cycle lists
/// all history and fetches every note and transcript) at the whole process ceiling, while one
/// new encounter a second arrives in organization B; B's creation-to-warehouse latency, against
/// B alone in the same daemon setup. The schedule is every 10 s (2 s in the smoke test).
async fn fairness() {
    let a_size = size(100_000, 2_000);
    let run_for = Duration::from_secs(size(90, 6) as u64);
    let interval = size(10, 2) as u64;
    let now = OffsetDateTime::now_utc();
    let opts = |seed: u64, encounters: usize, id: &str| SimOptions {
        seed,
        encounters,
        start: now - time::Duration::days(30),
        end: now - time::Duration::hours(1),
        organization_id: id.to_owned(),
        ..SimOptions::default()
    };
    let ceiling = (200.0, 20);
    let percentile = |l: &[f64], p: f64| l[((l.len() - 1) as f64 * p).round() as usize];

    let alone = Simulator::start_organizations(vec![opts(32, 200, "org_b")])
        .await
        .unwrap();
    let (base, _, _) = daemon_latency(&[("b", &alone[0], 50.0)], &alone[0], ceiling, interval, run_for).await;
    alone[0].shutdown();

    let sims = Simulator::start_organizations(vec![opts(31, a_size, "org_a"), opts(32, 200, "org_b")])
        .await
        .unwrap();
    sims[0].set_host_rate_limit(Some(RateLimit {
        requests_per_second: ceiling.0,
        burst: ceiling.1,
        enforce: false,
    }));
    let (shared, requests, violations) = daemon_latency(
        &[("a", &sims[0], ceiling.0), ("b", &sims[1], 50.0)],
        &sims[1],
        ceiling,
        interval,
        run_for,
    )
    .await;
    let a_requests = sims[0].stats().requests;
    println!(
        "fairness: B's creation-to-warehouse latency while A backfills {a_size} with full content ({a_requests} \
         requests in {:.0} s, the host at {:.0} req/s of a {} req/s ceiling, {violations} ceiling violations): \
         median {:.1} s, p95 {:.1} s, max {:.1} s over {} encounters; B alone: median {:.1} s, max {:.1} s; \
         schedule every {interval} s",
        run_for.as_secs_f64() + interval as f64 + 2.0,
        requests as f64 / (run_for.as_secs_f64() + interval as f64 + 2.0),
        ceiling.0,
        percentile(&shared, 0.5),
        percentile(&shared, 0.95),
        shared[shared.len() - 1],
        shared.len(),
        percentile(&base, 0.5),
        base[base.len() - 1],
    );
    assert_eq!(violations, 0, "the process exceeded its ceiling");
    sims[0].shutdown();
}

/// `charthero-sync plan` against the backfill it predicts: full content, 20,000 encounters.
async fn plan() {
    let encounters = size(20_000, 500);
    let sim = start_sim(encounters).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(&sim, &dir.path().join("w.db"), 100_000.0, 1_000, 8)
        .validate()
        .unwrap();
    let client = charthero_sync::api::Client::new(&cfg.api, &cfg.limits, &key(&sim)).unwrap();
    let estimate =
        charthero_sync::plan::estimate(&cfg, &cfg.organizations[0], &client, OffsetDateTime::now_utc())
            .await
            .unwrap();
    let probes = sim.stats().requests;
    sim.reset_stats();
    sync(&sim, &cfg, CyclePlan::full(None, false)).await;
    let stats = sim.stats();
    println!(
        "plan: {encounters} encounters; estimated {} encounters and {} requests ({} list + {} content) from {probes} \
         requests; actual {} requests (list {}, document {}, transcript {}): error {:+.1} %",
        estimate.encounters,
        estimate.total_requests,
        estimate.list_requests,
        estimate.content_requests,
        stats.requests,
        stats.route(Route::List),
        stats.route(Route::Document),
        stats.route(Route::Transcript),
        100.0 * (estimate.total_requests as f64 / stats.requests as f64 - 1.0)
    );
}

/// The history audit on a list-only warehouse: its list requests with 0, 10 and 100 changes
/// (half backdated inserts, half removals, 3–28 days old), each followed by an equality check.
async fn audit() {
    let n = size(1_000_000, 5_000);
    let sim = start_sim(n).await;
    let dir = tempfile::tempdir().unwrap();
    let mut raw = list_only(config(&sim, &dir.path().join("w.db"), 100_000.0, 1_000, 4));
    raw.sync.revisit_deep = "0s".into();
    let cfg = raw.validate().unwrap();
    sync(&sim, &cfg, CyclePlan::full(None, false)).await;
    let mut rng = fastrand::Rng::with_seed(11);
    for changes in [0, 10, 100] {
        let now = OffsetDateTime::now_utc();
        let old: Vec<String> = sim
            .snapshot()
            .into_iter()
            .filter(|e| {
                e.created_at < now - time::Duration::days(3) && e.created_at > now - time::Duration::days(28)
            })
            .map(|e| e.encounter_id)
            .collect();
        for i in 0..changes {
            if i % 2 == 0 {
                sim.insert(NewEncounter::at(
                    now - time::Duration::seconds(rng.i64(3 * 86_400..28 * 86_400)),
                ));
            } else {
                sim.remove(&old[rng.usize(..old.len())]);
            }
        }
        let started = Instant::now();
        sync(&sim, &cfg, CyclePlan::full(None, true)).await;
        let elapsed = started.elapsed().as_secs_f64();
        let conn = charthero_sync::store::sqlite::open_reader(
            cfg.database.sqlite_path().expect("a SQLite file"),
            Duration::from_secs(5),
        )
        .unwrap();
        let (probes, requests, rescanned): (i64, i64, i64) = conn
            .query_row(
                "SELECT probes, list_requests, rescanned FROM audits ORDER BY audit_id DESC LIMIT 1",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .unwrap();
        let expected = sim
            .snapshot()
            .iter()
            .filter(|e| e.created_at >= cfg.sync.start_at)
            .count() as i64;
        let missing = expected
            - count(
                cfg.database.sqlite_path().expect("a SQLite file"),
                "encounters WHERE removed_at IS NULL",
            );
        println!(
            "audit: {n} encounters, {changes} changes: {requests} list requests ({probes} probes, {rescanned} ranges \
             re-scanned) = {:.2} % of a full reconcile's minimum {}; {elapsed:.1} s; difference after: {missing}",
            100.0 * requests as f64 / n.div_ceil(100) as f64,
            n.div_ceil(100)
        );
        assert_eq!(missing, 0);
    }
}

/// Removes, on 30 % of list requests, one encounter the requester has already paged past:
/// before its `start_at`, or among the first `offset` records of its window. That is the
/// shift that makes plain offset paging skip records.
fn shifting_hook(seed: u64, removed: Arc<Mutex<Vec<String>>>) -> charthero_sim::ListHook {
    let rng = Mutex::new(fastrand::Rng::with_seed(seed));
    Arc::new(move |sim: &Simulator, req: &ListRequest| {
        let mut rng = rng.lock().unwrap();
        if rng.u32(0..10) >= 3 {
            return;
        }
        let snapshot = sim.snapshot();
        let from = req.start_at.unwrap_or(OffsetDateTime::UNIX_EPOCH);
        let before = snapshot.iter().take_while(|e| e.created_at < from).count();
        let behind = before + req.offset as usize;
        if behind == 0 {
            return;
        }
        let victim = snapshot[rng.usize(..behind.min(snapshot.len()))]
            .encounter_id
            .clone();
        sim.remove(&victim);
        removed.lock().unwrap().push(victim);
    })
}

/// Runs the dlt peer against the simulator; returns (seconds, IDs loaded).
async fn run_dlt(
    python: &str,
    sim: &Simulator,
    start_at: OffsetDateTime,
) -> (f64, std::collections::HashSet<String>) {
    let dir = tempfile::tempdir().unwrap();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/dlt_peer.py");
    let mut cmd = Command::new(python);
    cmd.arg(script)
        .arg(sim.base_url())
        .arg(sim.api_key())
        .arg(charthero_sync::timefmt::format_utc(start_at))
        .arg(dir.path())
        .env("RUNTIME__LOG_LEVEL", "WARNING");
    let out = tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "dlt failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .unwrap_or_default()
        .to_owned();
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    let ids = std::fs::read_to_string(v["ids"].as_str().unwrap()).unwrap();
    (
        v["elapsed"].as_f64().unwrap(),
        ids.lines().map(str::to_owned).collect(),
    )
}

/// The peer: dlt's rest_api source with the offset paginator on the same dataset, quiet and
/// with offsets shifting under it; throughput ratio and records missed by each.
async fn dlt() {
    let Ok(python) = std::env::var("CHARTHERO_BENCH_PYTHON") else {
        println!(
            "dlt: skipped (set CHARTHERO_BENCH_PYTHON to a Python with dlt[duckdb]; benches/run.sh does)"
        );
        return;
    };
    // Within the offset cap, so that dlt can read the whole range at all.
    let n = size(10_000, 500);
    for shifting in [false, true] {
        let mut results = Vec::new();
        for tool in ["charthero-sync", "dlt"] {
            let sim = start_sim(n).await;
            let start_at = OffsetDateTime::now_utc() - time::Duration::days(31);
            let before: std::collections::HashSet<String> =
                sim.snapshot().into_iter().map(|e| e.encounter_id).collect();
            let removed = Arc::new(Mutex::new(Vec::new()));
            if shifting {
                sim.set_list_hook(Some(shifting_hook(11, removed.clone())));
            }
            let started = Instant::now();
            let (elapsed, loaded): (f64, std::collections::HashSet<String>) = if tool == "dlt" {
                run_dlt(&python, &sim, start_at).await
            } else {
                let dir = tempfile::tempdir().unwrap();
                let raw = list_only(config(&sim, &dir.path().join("w.db"), 1_000_000.0, 1_000, 4));
                let cfg = write_config(&raw, dir.path(), &sim.api_key());
                run_child(&cfg).await;
                let conn = charthero_sync::store::sqlite::open_reader(
                    raw.database.path.as_deref().expect("a SQLite file"),
                    Duration::from_secs(5),
                )
                .unwrap();
                let ids = conn
                    .prepare("SELECT encounter_id FROM encounters WHERE removed_at IS NULL")
                    .unwrap()
                    .query_map([], |r| r.get(0))
                    .unwrap()
                    .map(Result::unwrap)
                    .collect();
                (started.elapsed().as_secs_f64(), ids)
            };
            sim.set_list_hook(None);
            let removed: std::collections::HashSet<String> =
                removed.lock().unwrap().iter().cloned().collect();
            // Records that existed before and after the run: any tool must have them.
            let stable: Vec<&String> = before.iter().filter(|id| !removed.contains(*id)).collect();
            let missing = stable.iter().filter(|id| !loaded.contains(**id)).count();
            println!(
                "dlt: {} {tool}: {n} encounters in {elapsed:.2} s = {:.0} encounters/s; {} removed during the run; \
                 missing {missing} of {} that stayed",
                if shifting { "shifting" } else { "quiet" },
                n as f64 / elapsed,
                removed.len(),
                stable.len()
            );
            results.push(elapsed);
            sim.shutdown();
        }
        println!(
            "dlt: {} charthero-sync is {:.1}x faster",
            if shifting { "shifting" } else { "quiet" },
            results[1] / results[0]
        );
    }
}

/// The analysts' queries: a full-content warehouse of 100,000 encounters over a year (the shape
/// `demo` builds), then benches/analyst_queries.py runs every SQL block of docs/schema.md and
/// reads every view five times each with Python's sqlite3 (3.40.1 on Debian 12, the oldest
/// SQLite the schema serves), and fails on a plan that scans a table in a per-row subquery.
async fn queries() {
    let encounters = size(100_000, 1_500);
    let now = OffsetDateTime::now_utc();
    let sim = Simulator::start(SimOptions {
        seed: 42,
        encounters,
        start: now - time::Duration::days(365),
        end: now - time::Duration::hours(1),
        ..SimOptions::default()
    })
    .await
    .expect("simulator starts");
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("w.db");
    let mut raw = config(&sim, &db, 5_000.0, 200, 8);
    raw.sync.start_at = charthero_sync::timefmt::format_utc(now - time::Duration::days(366));
    let cfg = raw.validate().unwrap();
    let started = Instant::now();
    sync(&sim, &cfg, CyclePlan::full(None, false)).await;
    let size_mib = std::fs::metadata(&db).map(|m| m.len()).unwrap_or(0) as f64 / (1024.0 * 1024.0);
    println!(
        "queries: warehouse of {encounters} encounters, {} documents, {} turns, {size_mib:.0} MiB, synced in {:.0} s",
        count(&db, "documents"),
        count(&db, "transcript_turns"),
        started.elapsed().as_secs_f64()
    );
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/analyst_queries.py");
    let out = match Command::new("python3").arg(script).arg(&db).arg("5").output() {
        Ok(out) => out,
        Err(e) => {
            println!("queries: skipped, python3 cannot be started ({e})");
            return;
        }
    };
    print!("{}", String::from_utf8_lossy(&out.stdout));
    assert!(
        out.status.success(),
        "analyst_queries.py failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    sim.shutdown();
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        if wanted("list") || wanted("bound") {
            let runs = list().await;
            // `list` alone skips the bound (over 1M rows it takes minutes of its own).
            if wanted("bound") {
                let (n, rate, dir) = &runs[0];
                let bound = bound(&dir.path().join("w.db"));
                println!(
                    "bound: end-to-end list-only ingest of {n} is {:.1} % of the bare upsert loop",
                    100.0 * rate / bound
                );
            }
        }
        if wanted("transcripts") {
            transcripts().await;
        }
        if wanted("backends") {
            backends().await;
        }
        if wanted("latency") {
            latency().await;
        }
        if wanted("idle") {
            idle().await;
        }
        if wanted("churn") {
            churn().await;
        }
        if wanted("dlt") {
            dlt().await;
        }
        if wanted("audit") {
            audit().await;
        }
        if wanted("plan") {
            plan().await;
        }
        if wanted("queries") {
            queries().await;
        }
        if wanted("fairness") {
            fairness().await;
        }
    });
}
