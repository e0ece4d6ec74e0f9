//! The `charthero-sync` binary: parses the command line, loads configuration, sets up logging,
//! calls into the library, and maps errors to the documented exit codes.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

use charthero_sync::config::{self, Config, ConfigError};
use charthero_sync::daemon::lock::WriterLock;
use charthero_sync::daemon::notify::Notifier;
use charthero_sync::sync::{BackfillRange, CycleError};
use charthero_sync::{demo, exit, store, timefmt};

#[derive(Parser)]
#[command(
    name = "charthero-sync",
    version,
    about = "Replicate ChartHero encounters into a SQLite warehouse"
)]
struct Cli {
    /// Configuration file (TOML).
    #[arg(long, global = true, env = "CHARTHERO_SYNC_CONFIG", default_value = config::DEFAULT_CONFIG_PATH)]
    config: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run as a daemon: apply migrations, then sync on the configured schedule until SIGTERM.
    Run {
        /// Queue a backfill of this created_at range at start (RFC 3339).
        #[arg(long, value_parser = parse_timestamp)]
        backfill_from: Option<OffsetDateTime>,
        #[arg(long, value_parser = parse_timestamp, requires = "backfill_from")]
        backfill_to: Option<OffsetDateTime>,
    },
    /// Run one complete sync cycle now, then exit.
    Sync {
        /// Also re-scan this created_at range completely (RFC 3339).
        #[arg(long, value_parser = parse_timestamp)]
        backfill_from: Option<OffsetDateTime>,
        #[arg(long, value_parser = parse_timestamp, requires = "backfill_from")]
        backfill_to: Option<OffsetDateTime>,
        /// Also re-check the totals of all completed history against the warehouse and
        /// re-scan only the ranges that differ (resumes an unfinished audit).
        #[arg(long)]
        audit: bool,
    },
    /// Queue a backfill for a running daemon to pick up.
    Backfill {
        #[arg(long, value_parser = parse_timestamp)]
        from: OffsetDateTime,
        #[arg(long, value_parser = parse_timestamp)]
        to: Option<OffsetDateTime>,
    },
    /// Show recent runs, watermarks, lag and row counts.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Validate the configuration, reach the API, and probe which routes and scopes work.
    Check,
    /// Apply database migrations and exit.
    Migrate,
    /// Remove encounters completely (rows, search entries, history, recordings): those older
    /// than --older-than (default: privacy.retention), or created in --from .. --to.
    Purge {
        #[arg(long, value_parser = parse_age, conflicts_with_all = ["from", "to"])]
        older_than: Option<std::time::Duration>,
        #[arg(long, value_parser = parse_timestamp)]
        from: Option<OffsetDateTime>,
        #[arg(long, value_parser = parse_timestamp, requires = "from")]
        to: Option<OffsetDateTime>,
    },
    /// Rebuild the full-text search indexes over transcript turns and note text.
    Reindex,
    /// Start the built-in ChartHero simulator and sync it into a local demo database.
    Demo {
        /// Where to write the demo warehouse.
        #[arg(long, default_value = "charthero-demo.db")]
        database: PathBuf,
        /// How many encounters the simulator generates.
        #[arg(long, default_value_t = 3_000)]
        encounters: usize,
        /// Over how many days before now they were created.
        #[arg(long, default_value_t = 60)]
        days: i64,
        /// Seed of the synthetic dataset.
        #[arg(long, default_value_t = 42)]
        seed: u64,
    },
}

fn parse_timestamp(text: &str) -> Result<OffsetDateTime, String> {
    timefmt::parse_rfc3339(text)
}

fn parse_age(text: &str) -> Result<std::time::Duration, String> {
    config::parse_duration("--older-than", text).map_err(|e| e.to_string())
}

/// An error on its way to an exit code.
struct Failure {
    code: u8,
    error: anyhow::Error,
}

impl From<charthero_sync::daemon::lock::LockError> for Failure {
    fn from(e: charthero_sync::daemon::lock::LockError) -> Self {
        let code = match e {
            charthero_sync::daemon::lock::LockError::Held { .. } => exit::LOCKED,
            charthero_sync::daemon::lock::LockError::Io { .. } => exit::CYCLE_FAILED,
        };
        Failure {
            code,
            error: e.into(),
        }
    }
}

impl From<ConfigError> for Failure {
    fn from(e: ConfigError) -> Self {
        Failure {
            code: exit::USAGE,
            error: e.into(),
        }
    }
}

impl From<anyhow::Error> for Failure {
    fn from(error: anyhow::Error) -> Self {
        Failure {
            code: exit::CYCLE_FAILED,
            error,
        }
    }
}

impl From<CycleError> for Failure {
    fn from(e: CycleError) -> Self {
        let code = match &e {
            CycleError::Api(api) if api.is_auth() => exit::AUTH_REFUSED,
            _ => exit::CYCLE_FAILED,
        };
        if let CycleError::Api(api) = &e {
            tracing::error!(reason_code = api.reason_code().unwrap_or("none"), "{api}");
        }
        Failure {
            code,
            error: e.into(),
        }
    }
}

/// What a command that syncs needs first: the validated config, the API key (its source is
/// logged, never the key), and the warehouse's writer lock.
fn prepare_writer(
    path: &std::path::Path,
    what: &str,
) -> Result<(Config, charthero_sync::secret::ApiKey, WriterLock), Failure> {
    let config = Config::load(path)?;
    let (key, source) = config::load_api_key(&config.api)?;
    tracing::info!(%source, "API key loaded");
    let lock = WriterLock::acquire(&config.database.path, what)?;
    Ok((config, key, lock))
}

/// The backfill range of `--backfill-from/--backfill-to` (or `--from/--to`); the end defaults
/// to now and must be after the start.
fn backfill_range(
    from: Option<OffsetDateTime>,
    to: Option<OffsetDateTime>,
) -> Result<Option<BackfillRange>, Failure> {
    let Some(start) = from else { return Ok(None) };
    let end = to.unwrap_or_else(OffsetDateTime::now_utc);
    if start >= end {
        return Err(Failure {
            code: exit::USAGE,
            error: anyhow::anyhow!(
                "the backfill start ({}) must be before its end ({})",
                timefmt::format_utc(start),
                timefmt::format_utc(end)
            ),
        });
    }
    Ok(Some(BackfillRange { start, end }))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    charthero_sync::telemetry::init();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(exit::CYCLE_FAILED);
        }
    };
    match runtime.block_on(dispatch(cli)) {
        Ok(()) => ExitCode::from(exit::OK),
        Err(f) => {
            eprintln!("error: {:#}", f.error);
            ExitCode::from(f.code)
        }
    }
}

async fn dispatch(cli: Cli) -> Result<(), Failure> {
    match cli.command {
        Command::Demo {
            database,
            encounters,
            days,
            seed,
        } => {
            let opts = demo::DemoOptions {
                database,
                encounters,
                days,
                seed,
            };
            let cancel = cancel_on_signal();
            let summary = demo::run(&opts, &cancel).await?;
            print_demo_summary(&summary);
            Ok(())
        }
        Command::Migrate => {
            let config = Config::load(&cli.config)?;
            let _lock = WriterLock::acquire(&config.database.path, "charthero-sync migrate")?;
            store::open_writer(&config.database.path, config.database.busy_timeout)?;
            println!("database {} is up to date", config.database.path.display());
            Ok(())
        }
        Command::Sync {
            backfill_from,
            backfill_to,
            audit,
        } => {
            let backfill = backfill_range(backfill_from, backfill_to)?;
            let (config, key, _lock) = prepare_writer(&cli.config, "charthero-sync sync")?;
            let cancel = cancel_on_signal();
            let report = charthero_sync::sync_once(
                &config,
                &key,
                "sync",
                charthero_sync::sync::CyclePlan::full(backfill, audit),
                &cancel,
            )
            .await?;
            let c = report.counts;
            println!(
                "sync {}: {} new, {} changed, {} unchanged, {} removed encounters; {} documents, {} transcripts, \
                 {} recordings fetched; {} list requests, {} retries; complete through {}",
                if report.is_complete() {
                    "complete"
                } else {
                    "incomplete"
                },
                c.encounters_new,
                c.encounters_changed,
                c.encounters_unchanged,
                c.encounters_removed,
                c.documents_fetched,
                c.transcripts_fetched,
                c.recordings_fetched,
                c.list_requests,
                c.retries,
                report
                    .complete_through
                    .map_or_else(|| "(nothing yet)".to_owned(), timefmt::format_utc)
            );
            if !report.is_complete() {
                return Err(Failure {
                    code: exit::CYCLE_FAILED,
                    error: anyhow::anyhow!(
                        "the cycle left work undone: {} item(s) dead-lettered (retried next cycle){}",
                        c.dead_letters,
                        report
                            .disabled_routes
                            .map_or_else(String::new, |d| format!("; routes closed to this key: {d}"))
                    ),
                });
            }
            Ok(())
        }
        Command::Run {
            backfill_from,
            backfill_to,
        } => {
            let backfill = backfill_range(backfill_from, backfill_to)?;
            let (config, key, _lock) = prepare_writer(&cli.config, "charthero-sync run")?;
            let ctx = charthero_sync::connect(&config, &key)?;
            if let Some(r) = backfill {
                let id = ctx
                    .writer
                    .call(move |c| store::queue_backfill(c, r.start, r.end, "run", OffsetDateTime::now_utc()))
                    .await?;
                tracing::info!(backfill_id = id, "backfill queued");
            }
            let shutdown = cancel_on_signal();
            if let Some(addr) = config.metrics_listen {
                let listener = tokio::net::TcpListener::bind(addr)
                    .await
                    .map_err(|e| anyhow::anyhow!("cannot listen on metrics.listen {addr}: {e}"))?;
                tracing::info!(%addr, "serving Prometheus metrics at /metrics");
                tokio::spawn(charthero_sync::metrics::serve(
                    listener,
                    ctx.client.metrics().clone(),
                    shutdown.clone(),
                ));
            }
            let notifier = Notifier::from_env();
            charthero_sync::daemon::run(&ctx, &config.sync.schedule, &shutdown, &notifier).await?;
            tracing::info!("stopped");
            Ok(())
        }
        Command::Backfill { from, to } => {
            let range = backfill_range(Some(from), to)?.expect("from is given");
            let config = Config::load(&cli.config)?;
            let conn = store::open_writer(&config.database.path, config.database.busy_timeout)?;
            let id = store::queue_backfill(
                &conn,
                range.start,
                range.end,
                "backfill",
                OffsetDateTime::now_utc(),
            )?;
            println!(
                "queued backfill {id}: {} .. {}",
                timefmt::format_utc(range.start),
                timefmt::format_utc(range.end)
            );
            if WriterLock::acquire(&config.database.path, "charthero-sync backfill (probe)").is_ok() {
                println!(
                    "note: no daemon is running on this warehouse; `charthero-sync run` will pick the backfill up, \
                     or run `charthero-sync sync --backfill-from ...` now"
                );
            }
            Ok(())
        }
        Command::Status { json } => {
            let config = Config::load(&cli.config)?;
            let path = &config.database.path;
            if !path.exists() {
                return Err(anyhow::anyhow!(
                    "no warehouse at {}: run `charthero-sync migrate` or `sync` first",
                    path.display()
                )
                .into());
            }
            let conn = store::open_reader(path, config.database.busy_timeout)?;
            let status = charthero_sync::status::read(&conn, OffsetDateTime::now_utc())?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&status).map_err(anyhow::Error::from)?
                );
            } else {
                print!("{}", status.render());
            }
            Ok(())
        }
        Command::Purge { older_than, from, to } => {
            let config = Config::load(&cli.config)?;
            let (range, reason) = match (from, older_than.or(config.privacy.retention)) {
                (Some(_), _) => (backfill_range(from, to)?.expect("from is given"), "range"),
                (None, Some(age)) => (
                    BackfillRange {
                        start: OffsetDateTime::UNIX_EPOCH,
                        end: OffsetDateTime::now_utc() - age,
                    },
                    "retention",
                ),
                (None, None) => {
                    return Err(Failure {
                        code: exit::USAGE,
                        error: anyhow::anyhow!(
                            "say what to purge: --older-than 365d, --from T [--to T], or set privacy.retention"
                        ),
                    });
                }
            };
            let _lock = WriterLock::acquire(&config.database.path, "charthero-sync purge")?;
            let mut conn = store::open_writer(&config.database.path, config.database.busy_timeout)?;
            let c = charthero_sync::purge(&mut conn, &config.audio.directory, range, reason)?;
            println!(
                "purged encounters created {} .. {}: {} encounters, {} documents, {} transcripts ({} turns), \
                 {} recordings, {} history rows",
                timefmt::format_utc(range.start),
                timefmt::format_utc(range.end),
                c.encounters,
                c.documents,
                c.transcripts,
                c.turns,
                c.recordings,
                c.history_rows
            );
            Ok(())
        }
        Command::Reindex => {
            let config = Config::load(&cli.config)?;
            let _lock = WriterLock::acquire(&config.database.path, "charthero-sync reindex")?;
            let conn = store::open_writer(&config.database.path, config.database.busy_timeout)?;
            store::rebuild_search(&conn)?;
            println!("search indexes rebuilt");
            Ok(())
        }
        Command::Check => {
            let config = Config::load(&cli.config)?;
            println!("config           ok      {}", cli.config.display());
            let (key, source) = config::load_api_key(&config.api)?;
            println!("api key          ok      from {source}");
            let client = charthero_sync::api::Client::new(&config.api, &config.limits, &key)?;
            let probes = charthero_sync::check::probe_routes(&config, &client).await;
            for p in &probes {
                println!("{}", p.describe());
            }
            let refused = probes
                .iter()
                .find_map(|p| p.result.as_ref().err().filter(|e| e.is_auth()));
            if let Some(e) = refused {
                return Err(Failure {
                    code: exit::AUTH_REFUSED,
                    error: anyhow::anyhow!("ChartHero refused the API key: {}", e.kind),
                });
            }
            let failed: Vec<&str> = probes
                .iter()
                .filter(|p| p.needed && !p.works())
                .map(|p| p.route.as_str())
                .collect();
            if !failed.is_empty() {
                return Err(anyhow::anyhow!(
                    "routes this configuration needs do not work: {}",
                    failed.join(", ")
                )
                .into());
            }
            println!("everything this configuration needs works");
            Ok(())
        }
    }
}

/// A token cancelled by the first SIGINT or SIGTERM; a second signal exits at once.
fn cancel_on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let child = token.clone();
    tokio::spawn(async move {
        let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) else {
            return;
        };
        for n in 0.. {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            if n > 0 {
                eprintln!("second signal: exiting now");
                std::process::exit(i32::from(exit::CYCLE_FAILED));
            }
            tracing::warn!(
                "signal received: finishing the current page, then stopping (signal again to exit now)"
            );
            child.cancel();
        }
    });
    token
}

fn print_demo_summary(s: &demo::DemoSummary) {
    let c = s.report.counts;
    println!();
    println!(
        "Synced {} simulated ChartHero encounters into {} in {:.1} s.",
        s.simulator_encounters,
        s.database.display(),
        s.elapsed.as_secs_f64()
    );
    println!(
        "  warehouse: {} encounters, {} patients, {} documents ({} notes with text), {} transcripts with {} turns",
        s.encounters, s.patients, s.documents, s.notes, s.transcripts, s.turns
    );
    println!(
        "  requests: {} list pages over {} windows, {} document details, {} transcripts; complete through {}",
        c.list_requests,
        c.windows,
        c.documents_fetched,
        c.transcripts_fetched,
        s.report
            .complete_through
            .map_or_else(|| "(nothing yet)".to_owned(), timefmt::format_utc)
    );
    println!();
    println!("Try it:");
    for (title, sql) in demo::EXAMPLE_QUERIES {
        println!("  -- {title}");
        println!("  sqlite3 {} \"{sql}\"", s.database.display());
    }
}
