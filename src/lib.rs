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
pub mod copy;
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
pub mod webhook;

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::config::{Config, Organization};
use crate::secret::ApiKey;
use crate::sync::{CycleError, CycleReport, OrgScope, SyncContext};

/// Opens (and migrates) the warehouse and builds the context a cycle of the configuration's
/// first organization needs (a configuration without `[[organizations]]` has exactly one,
/// `default`). Opening and migrating block, so they run on a blocking thread, never on the
/// async runtime's workers.
pub async fn connect(config: &Config, key: &ApiKey) -> anyhow::Result<SyncContext> {
    let org = config.organizations[0].clone();
    let mut contexts = connect_organizations(config, vec![(org, key.clone())]).await?;
    Ok(contexts.remove(0))
}

/// Opens (and migrates) the warehouse once and builds one context per organization: each with
/// its own client (key, base URL, budget, 401 latch, metrics) under one shared ceiling
/// (`[limits]`), all writing through the one writer thread.
pub async fn connect_organizations(
    config: &Config,
    keys: Vec<(Organization, ApiKey)>,
) -> anyhow::Result<Vec<SyncContext>> {
    let database = config.database.clone();
    let backend = store::blocking(move || {
        let backend = store::open(&database)?;
        backend.set_wal_size_limit(database.wal_size_limit)?;
        Ok(backend)
    })
    .await?;
    let writer = Arc::new(store::Writer::spawn(backend));
    // A configuration of several keys confirms each key's clinic before its first write.
    let verify =
        config.organizations.len() > 1 || config.organizations[0].name != crate::config::DEFAULT_ORGANIZATION;
    let ceiling = api::Ceiling::new(&config.limits.ceiling())?;
    keys.into_iter()
        .map(|(org, key)| {
            let client = api::Client::for_organization(
                &config.api,
                &org,
                &config.limits,
                ceiling.clone(),
                &key,
                Arc::default(),
            )?;
            let mut sync = config.sync.clone();
            sync.start_at = org.start_at;
            Ok(SyncContext {
                org: OrgScope::new(&org.name, org.organization_id.clone(), verify),
                client,
                writer: writer.clone(),
                sync,
                content: config.content,
                privacy: config.privacy,
                audio: config.audio.clone(),
                max_in_flight: org.budget.max_in_flight.get(),
                live: Default::default(),
                webhook_events: Default::default(),
            })
        })
        .collect()
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

/// One organization's cycle of [`sync_organizations`].
pub struct OrganizationCycle {
    pub organization: String,
    pub result: Result<CycleReport, CycleError>,
}

/// One complete cycle of every organization in `keys`, all at once: each under its own key and
/// budget, the process under `[limits]`. One organization's failure (a refused key, a closed
/// route) never stops the others. Fails as a whole only when the warehouse cannot be opened.
pub async fn sync_organizations(
    config: &Config,
    keys: Vec<(Organization, ApiKey)>,
    trigger: &'static str,
    plan: sync::CyclePlan,
    cancel: &CancellationToken,
) -> Result<Vec<OrganizationCycle>, CycleError> {
    let contexts = connect_organizations(config, keys).await?;
    let cycles = contexts.iter().map(|ctx| async move {
        OrganizationCycle {
            organization: ctx.org.name.to_string(),
            result: sync::run_cycle(ctx, trigger, plan, cancel).await,
        }
    });
    Ok(futures_util::future::join_all(cycles).await)
}
