//! charthero-sync replicates a clinic's ChartHero encounters, notes and transcripts into a local
//! SQLite warehouse. The binary (`main.rs`) only parses arguments, sets up logging and maps
//! errors to exit codes; everything else lives here so tests drive it without a process.
//!
//! Module map: [`config`] (TOML → validated config, API key sources), [`api`] (HTTP client and
//! wire types), [`sync`] (windows, paging, change detection), [`store`] (SQLite, migrations,
//! upserts, the writer thread), [`demo`] (the built-in simulator walkthrough), [`simulate`] (the
//! simulator served for the real commands to be pointed at), [`generate`] (man pages and shell
//! completions from the clap definition, for the Debian package).

// `print!`/`println!` and their stderr twins panic when the stream is closed (EPIPE, e.g.
// `charthero-sync status 2>&1 | head -1`); output goes through `writeln!` with the error ignored.
#![deny(clippy::print_stdout, clippy::print_stderr)]

pub mod api;
pub mod check;
pub mod config;
pub mod daemon;
pub mod demo;
pub mod exit;
pub mod generate;
pub mod metrics;
pub mod plan;
pub mod secret;
pub mod simulate;
pub mod status;
pub mod store;
pub mod sync;
pub mod telemetry;
pub mod timefmt;

use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::secret::ApiKey;
use crate::sync::{CycleError, CycleReport, SyncContext};

/// Opens (and migrates) the warehouse and builds the context a cycle needs. Opening and
/// migrating block, so they run on a blocking thread, never on the async runtime's workers.
pub async fn connect(config: &Config, key: &ApiKey) -> anyhow::Result<SyncContext> {
    let (path, busy, wal_limit) = (
        config.database.path.clone(),
        config.database.busy_timeout,
        config.database.wal_size_limit,
    );
    let conn = store::blocking(move || {
        let conn = store::open_writer(&path, busy)?;
        store::set_wal_size_limit(&conn, wal_limit)?;
        Ok(conn)
    })
    .await?;
    Ok(SyncContext {
        client: api::Client::new(&config.api, &config.limits, key)?,
        writer: store::Writer::spawn(conn),
        sync: config.sync.clone(),
        content: config.content,
        privacy: config.privacy,
        audio: config.audio.clone(),
        max_in_flight: config.limits.max_in_flight.get(),
    })
}

/// `charthero-sync sync [--backfill-from ..] [--audit]`: one complete sync cycle now.
pub async fn sync_once(
    config: &Config,
    key: &ApiKey,
    trigger: &'static str,
    plan: sync::CyclePlan,
    cancel: &CancellationToken,
) -> Result<CycleReport, CycleError> {
    let ctx = connect(config, key).await?;
    sync::run_cycle(&ctx, trigger, plan, cancel).await
}
