//! `charthero-sync demo`: the built-in walkthrough. Starts the ChartHero simulator on a random
//! loopback port with a realistic dataset, syncs it into a local demo database with the real
//! sync code, and reports what happened. It refuses to touch a database it did not create.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, bail};
use charthero_sim::{SimOptions, Simulator};
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

use crate::config::RawConfig;
use crate::secret::ApiKey;
use crate::store;
use crate::sync::CycleReport;

/// Marks a database as created by `demo`, so a later demo may replace it.
const DEMO_MARKER: &str = "demo_database";

#[derive(Debug, Clone)]
pub struct DemoOptions {
    pub database: PathBuf,
    pub encounters: usize,
    pub days: i64,
    pub seed: u64,
}

impl Default for DemoOptions {
    fn default() -> Self {
        DemoOptions {
            database: PathBuf::from("charthero-demo.db"),
            encounters: 3_000,
            days: 60,
            seed: 42,
        }
    }
}

/// What the demo did, for the summary it prints.
#[derive(Debug, Clone)]
pub struct DemoSummary {
    pub database: PathBuf,
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
    let database = opts.database.clone();
    store::blocking(move || prepare_database(&database)).await?;
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
    raw.database.path = opts.database.clone();
    raw.sync.start_at = crate::timefmt::format_utc(now - time::Duration::days(opts.days + 1));
    // The simulator is local; a brisk but still bounded rate keeps the demo short while
    // exercising the same limiter a production sync uses.
    raw.limits.requests_per_second = 2_000.0;
    raw.limits.burst = 50;
    raw.limits.max_in_flight = 8;
    let config = raw.validate()?;
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
        database: opts.database.clone(),
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

/// How long the check of an existing file waits for a lock (the default of a new SQLite connection).
const DEMO_BUSY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Removes a previous demo database; refuses any other existing file.
fn prepare_database(path: &Path) -> anyhow::Result<()> {
    if !path.exists() {
        return Ok(());
    }
    let existing = store::open_reader(&crate::config::DatabaseConfig {
        path: path.to_owned(),
        busy_timeout: DEMO_BUSY_TIMEOUT,
        wal_size_limit: 0,
    })
    .with_context(|| format!("cannot open existing {}", path.display()))?;
    // Anything that cannot be read as a warehouse with the marker is not the demo's.
    let marker = existing.marker(DEMO_MARKER).unwrap_or(None);
    drop(existing);
    if marker.is_none() {
        bail!(
            "{} exists and was not created by `charthero-sync demo`; choose another path with --database",
            path.display()
        );
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

/// Example queries printed after the demo, each a one-liner for `sqlite3`.
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
