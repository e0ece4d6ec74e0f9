//! `charthero-sync demo`: the built-in walkthrough. Starts the ChartHero simulator on a random
//! loopback port with a realistic dataset, syncs it into a demo warehouse (a local file, or a
//! schema on a PostgreSQL server: `--database postgresql://…`) with the real sync code, and
//! reports what happened. It refuses to touch a warehouse it did not create.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use charthero_sim::{SimOptions, Simulator};
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

use crate::config::{DatabaseConfig, DatabaseTarget, RawConfig};
use crate::secret::ApiKey;
use crate::store;
use crate::sync::CycleReport;

/// Marks a database as created by `demo`, so a later demo may replace it.
const DEMO_MARKER: &str = "demo_database";

/// Where the demo writes: `--database PATH` or `--database postgresql://…`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DemoDatabase {
    File(PathBuf),
    /// A PostgreSQL connection string (no password: it comes from the usual sources); the
    /// warehouse goes to the default schema.
    Postgres(String),
}

impl DemoDatabase {
    /// `postgresql://…` or `postgres://…` is a server; anything else a file path.
    pub fn parse(text: &str) -> DemoDatabase {
        if text.starts_with("postgresql://") || text.starts_with("postgres://") {
            DemoDatabase::Postgres(text.to_owned())
        } else {
            DemoDatabase::File(PathBuf::from(text))
        }
    }
}

#[derive(Debug, Clone)]
pub struct DemoOptions {
    pub database: DemoDatabase,
    pub encounters: usize,
    pub days: i64,
    pub seed: u64,
}

impl Default for DemoOptions {
    fn default() -> Self {
        DemoOptions {
            database: DemoDatabase::File(PathBuf::from("charthero-demo.db")),
            encounters: 3_000,
            days: 60,
            seed: 42,
        }
    }
}

/// What the demo did, for the summary it prints.
#[derive(Debug, Clone)]
pub struct DemoSummary {
    /// The file's path, or `postgresql://user@host:port/db (schema charthero)`.
    pub database: String,
    /// `--database postgresql://…` as given (it never carries a password), for `psql`.
    pub postgres_url: Option<String>,
    pub simulator_encounters: usize,
    pub report: CycleReport,
    pub encounters: i64,
    pub patients: i64,
    pub documents: i64,
    pub notes: i64,
    pub transcripts: i64,
    pub turns: i64,
    pub elapsed: std::time::Duration,
}

pub async fn run(opts: &DemoOptions, cancel: &CancellationToken) -> anyhow::Result<DemoSummary> {
    let started = Instant::now();
    if let DemoDatabase::File(path) = &opts.database {
        store::check_location(&crate::config::DatabaseTarget::Sqlite { path: path.clone() })
            .map_err(|e| DemoRefused(format!("--database {}: {}", path.display(), e.reason())))?;
    }
    let mut raw_database = crate::config::RawDatabase::default();
    match &opts.database {
        DemoDatabase::File(path) => raw_database.path = Some(path.clone()),
        DemoDatabase::Postgres(url) => raw_database.url = url.clone(),
    }
    let now = OffsetDateTime::now_utc();
    let sim = Simulator::start(SimOptions {
        seed: opts.seed,
        encounters: opts.encounters,
        start: now - time::Duration::days(opts.days),
        end: now - time::Duration::hours(1),
        ..SimOptions::default()
    })
    .await
    .context("cannot start the built-in ChartHero simulator")?;
    tracing::info!(
        encounters = opts.encounters,
        "simulator listening on {}",
        sim.base_url()
    );

    let mut raw = RawConfig::default();
    raw.api.base_url = sim.base_url();
    raw.api.api_key_file = None;
    raw.database = raw_database;
    raw.sync.start_at = crate::timefmt::format_utc(now - time::Duration::days(opts.days + 1));
    // The simulator is local; a brisk but still bounded rate keeps the demo short while
    // exercising the same limiter a production sync uses.
    raw.limits.requests_per_second = 2_000.0;
    raw.limits.burst = 50;
    raw.limits.max_in_flight = 8;
    let config = raw.validate()?;
    let database = config.database.clone();
    store::blocking(move || prepare_database(&database)).await?;
    let key = ApiKey::new(&sim.api_key()).context("the simulator produced an empty key")?;

    let ctx = crate::connect(&config, &key).await?;
    ctx.writer.call(|c| c.set_marker(DEMO_MARKER)).await?;
    let report =
        crate::sync::run_cycle(&ctx, "demo", crate::sync::CyclePlan::full(None, false), cancel).await?;
    drop(ctx);
    sim.shutdown();

    let database = config.database.clone();
    let counts = store::blocking(move || store::open_reader(&database)?.table_counts()).await?;
    Ok(DemoSummary {
        database: config.database.target.to_string(),
        postgres_url: match &opts.database {
            DemoDatabase::Postgres(url) => Some(url.clone()),
            DemoDatabase::File(_) => None,
        },
        simulator_encounters: opts.encounters,
        report,
        encounters: counts.encounters,
        patients: counts.patients,
        documents: counts.documents,
        notes: counts.notes,
        transcripts: counts.transcripts,
        turns: counts.turns,
        elapsed: started.elapsed(),
    })
}

/// `--database` cannot be the demo's: a warehouse the demo did not create (never touched), or a
/// file where this user cannot write. Usage errors (exit 2), found before the simulator starts
/// where they can be.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct DemoRefused(String);

/// Removes a previous demo warehouse; refuses any other existing one.
fn prepare_database(database: &DatabaseConfig) -> anyhow::Result<()> {
    match &database.target {
        DatabaseTarget::Sqlite { path } => prepare_file(database, path),
        DatabaseTarget::Postgres(pg) => {
            // A schema without migration history holds no warehouse: the sync creates it.
            if store::describe_postgres(pg)?.schema_version.is_none() {
                return Ok(());
            }
            if !was_created_by_demo(database) {
                return Err(DemoRefused(format!(
                    "{} holds a warehouse not created by `charthero-sync demo`; choose another database \
                     or schema with --database",
                    database.target
                ))
                .into());
            }
            store::drop_postgres_schema(pg)
        }
    }
}

/// Whether the warehouse carries the demo's marker; anything that cannot be read as a
/// warehouse with the marker is not the demo's.
fn was_created_by_demo(database: &DatabaseConfig) -> bool {
    store::open_reader(database)
        .and_then(|existing| existing.marker(DEMO_MARKER))
        .is_ok_and(|marker| marker.is_some())
}

/// Removes a previous demo file with its `-wal` and `-shm`; refuses any other existing file.
fn prepare_file(database: &DatabaseConfig, path: &Path) -> anyhow::Result<()> {
    if !path.exists() {
        return Ok(());
    }
    if !was_created_by_demo(database) {
        return Err(DemoRefused(format!(
            "{} exists and was not created by `charthero-sync demo`; choose another path with --database",
            path.display()
        ))
        .into());
    }
    for suffix in ["", "-wal", "-shm"] {
        let mut p = path.as_os_str().to_owned();
        p.push(suffix);
        match std::fs::remove_file(&p) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("cannot remove {}", PathBuf::from(p).display())),
        }
    }
    Ok(())
}

/// The first example query in PostgreSQL's dialect, where `created_at` is a `timestamptz`.
pub const POSTGRES_PER_DAY_QUERY: &str = "SELECT created_at::date AS day, encounter_type, count(*) FROM encounters \
     WHERE removed_at IS NULL GROUP BY 1, 2 ORDER BY 1 DESC LIMIT 10;";

/// Example queries printed after the demo, each a one-liner for `sqlite3` (for `psql`, the
/// first is [`POSTGRES_PER_DAY_QUERY`]).
pub const EXAMPLE_QUERIES: [(&str, &str); 3] = [
    (
        "Encounters per day and type",
        "SELECT substr(created_at, 1, 10) AS day, encounter_type, count(*) FROM encounters \
         WHERE removed_at IS NULL GROUP BY 1, 2 ORDER BY 1 DESC LIMIT 10;",
    ),
    (
        "Patients with the most encounters",
        "SELECT patient_id, count(*) AS encounters FROM encounters GROUP BY patient_id \
         ORDER BY encounters DESC LIMIT 5;",
    ),
    (
        "Average recorded audio per ambient transcript, in minutes",
        "SELECT round(avg(audio_duration_seconds) / 60, 1) FROM documents \
         WHERE schema_type = 'ambient_transcript';",
    ),
];
