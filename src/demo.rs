//! `charthero-sync demo`: the built-in walkthrough. Starts the ChartHero simulator on a random
//! loopback port with a realistic dataset, syncs it into a local demo database with the real
//! sync code, and reports what happened. It refuses to touch a database it did not create.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, bail};
use charthero_sim::{SimOptions, Simulator};
use rusqlite::OptionalExtension;
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

    let (database, busy) = (opts.database.clone(), config.database.busy_timeout);
    let [encounters, patients, documents, notes, transcripts, turns] = store::blocking(move || {
        let conn = store::sqlite::open_reader(&database, busy)?;
        let count = |table: &str| -> anyhow::Result<i64> {
            Ok(conn.query_row(&format!("SELECT count(*) FROM {table}"), [], |r| r.get(0))?)
        };
        Ok([
            count("encounters")?,
            count("patients")?,
            count("documents")?,
            count("documents WHERE content_text IS NOT NULL")?,
            count("transcripts")?,
            count("transcript_turns")?,
        ])
    })
    .await?;
    Ok(DemoSummary {
        database: opts.database.clone(),
        simulator_encounters: opts.encounters,
        report,
        encounters,
        patients,
        documents,
        notes,
        transcripts,
        turns,
        elapsed: started.elapsed(),
    })
}

/// Removes a previous demo database; refuses any other existing file.
fn prepare_database(path: &Path) -> anyhow::Result<()> {
    if !path.exists() {
        return Ok(());
    }
    let conn = rusqlite::Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .with_context(|| format!("cannot open existing {}", path.display()))?;
    let marker: Option<String> = conn
        .query_row(
            "SELECT value FROM sync_state WHERE name = ?1",
            [DEMO_MARKER],
            |r| r.get(0),
        )
        .optional()
        .unwrap_or(None);
    drop(conn);
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
