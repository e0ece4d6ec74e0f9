//! The `charthero-sync` binary: parses the command line, loads configuration, sets up logging,
//! calls into the library, and maps errors to the documented exit codes.

// `print!`/`println!` and their stderr twins panic when the stream is closed (EPIPE, e.g.
// `charthero-sync status 2>&1 | head -1`); output goes through `writeln!` with the error ignored.
#![deny(clippy::print_stdout, clippy::print_stderr)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::parser::ValueSource;
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

use charthero_sync::config::{self, Config, ConfigError};
use charthero_sync::daemon::lock::WriterLock;
use charthero_sync::daemon::notify::Notifier;
use charthero_sync::secret::WebhookSecret;
use charthero_sync::sync::{BackfillRange, CycleError};
use charthero_sync::{demo, exit, simulate, store, timefmt};

#[derive(Parser)]
#[command(
    name = "charthero-sync",
    // The git revision from build.rs: `charthero-sync 0.1.0 (1a2b3c4)`.
    version = concat!(env!("CARGO_PKG_VERSION"), " (", env!("CHARTHERO_GIT_REV"), ")"),
    about = "Replicate ChartHero encounters into a SQLite warehouse",
    after_help = "Timestamps are RFC 3339 with an offset, e.g. 2026-01-01T00:00:00Z; durations are an integer \
                  and a unit (ms, s, m, h, d), e.g. 90s, 24h, 365d. Exit codes: 0 ok, 1 failed or work left \
                  undone (a full disk included), 2 bad usage or configuration, 3 API key refused, 4 another process \
                  writes the warehouse, 5 the warehouse is corrupt."
)]
struct Cli {
    /// Configuration file (TOML); see config.example.toml. Not read by `demo` and `simulate`.
    #[arg(long, global = true, value_name = "PATH", env = "CHARTHERO_SYNC_CONFIG", default_value = config::DEFAULT_CONFIG_PATH)]
    config: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run as a daemon: apply migrations, then sync on the configured schedule until SIGTERM.
    Run {
        /// Queue a backfill of encounters created from this instant at start (RFC 3339, e.g.
        /// 2026-01-01T00:00:00Z).
        #[arg(long, value_name = "RFC3339", value_parser = parse_timestamp)]
        backfill_from: Option<OffsetDateTime>,
        /// End of that backfill, exclusive (RFC 3339); default: now.
        #[arg(long, value_name = "RFC3339", value_parser = parse_timestamp, requires = "backfill_from")]
        backfill_to: Option<OffsetDateTime>,
        /// Only this organization (its `[[organizations]]` name; repeat for several). Default:
        /// every configured organization.
        #[arg(long = "organization", value_name = "NAME")]
        organizations: Vec<String>,
    },
    /// Run one complete sync cycle now, queued backfills included, then exit (0 only if nothing
    /// was left undone).
    Sync {
        /// Also re-scan encounters created from this instant completely (RFC 3339, e.g.
        /// 2026-01-01T00:00:00Z).
        #[arg(long, value_name = "RFC3339", value_parser = parse_timestamp)]
        backfill_from: Option<OffsetDateTime>,
        /// End of that re-scan, exclusive (RFC 3339); default: now.
        #[arg(long, value_name = "RFC3339", value_parser = parse_timestamp, requires = "backfill_from")]
        backfill_to: Option<OffsetDateTime>,
        /// Also re-check the totals of all completed history against the warehouse and
        /// re-scan only the ranges that differ (resumes an unfinished audit).
        #[arg(long)]
        audit: bool,
        /// Also fetch again the notes and finished transcripts of stored encounters created in
        /// the --backfill-from range (without one: all of them), whatever the list shows: for a
        /// server whose list does not change when a document's text does. One request each.
        #[arg(long)]
        refresh_content: bool,
        /// Only this organization (its `[[organizations]]` name; repeat for several). Default:
        /// every configured organization.
        #[arg(long = "organization", value_name = "NAME")]
        organizations: Vec<String>,
    },
    /// Queue a backfill for `run` (or the next `sync`) to work; prints its id.
    Backfill {
        /// Re-scan encounters created from this instant (RFC 3339, e.g. 2026-01-01T00:00:00Z).
        #[arg(long, value_name = "RFC3339", value_parser = parse_timestamp)]
        from: OffsetDateTime,
        /// Up to this instant, exclusive (RFC 3339); default: now.
        #[arg(long, value_name = "RFC3339", value_parser = parse_timestamp)]
        to: Option<OffsetDateTime>,
        /// Only this organization (its `[[organizations]]` name; repeat for several). Default:
        /// every configured organization.
        #[arg(long = "organization", value_name = "NAME")]
        organizations: Vec<String>,
    },
    /// Show recent runs, watermarks, lag, row counts, backfills and the last error.
    Status {
        /// Print one JSON object instead of text (for scripts and monitoring).
        #[arg(long)]
        json: bool,
    },
    /// Validate the configuration and the database location, reach the API, and probe which
    /// routes and scopes work, for each organization's key.
    Check {
        /// Only this organization (its `[[organizations]]` name; repeat for several). Default:
        /// every configured organization.
        #[arg(long = "organization", value_name = "NAME")]
        organizations: Vec<String>,
    },
    /// Estimate the first backfill — encounters, requests and hours at the configured rate —
    /// from one `limit=1` request per month of the range and three sample pages, for each
    /// organization's key.
    Plan {
        /// Print the estimate as JSON: one object with one organization configured, else an
        /// array of them (each names its `organization`).
        #[arg(long)]
        json: bool,
        /// Only this organization (its `[[organizations]]` name; repeat for several). Default:
        /// every configured organization.
        #[arg(long = "organization", value_name = "NAME")]
        organizations: Vec<String>,
    },
    /// Apply database migrations and exit.
    Migrate,
    /// Copy a SQLite warehouse into the PostgreSQL warehouse `database.url` names, bookkeeping
    /// included (watermark, ledger, content queue, dead letters, history), so the next `sync`
    /// lists only what is new. The destination is migrated and must hold no data; everything
    /// commits in one transaction (a copy that stops leaves it empty), then every table's row
    /// count is verified. Stop the daemon first: both warehouses' writer locks are taken.
    Copy {
        /// The SQLite warehouse to copy. It is only read, and must be of this release's schema:
        /// an older one is refused (run `migrate` with its SQLite configuration first).
        #[arg(long, value_name = "PATH")]
        from: PathBuf,
    },
    /// Remove encounters completely (rows, search entries, history, recordings): those older
    /// than --older-than (default: privacy.retention), or created in --from .. --to.
    Purge {
        /// Age of the encounters to remove, by created_at: an integer and a unit (ms, s, m, h, d),
        /// e.g. 365d.
        #[arg(long, value_name = "DURATION", value_parser = parse_age, conflicts_with_all = ["from", "to"])]
        older_than: Option<std::time::Duration>,
        /// Remove encounters created from this instant (RFC 3339, e.g. 2026-01-01T00:00:00Z).
        #[arg(long, value_name = "RFC3339", value_parser = parse_timestamp)]
        from: Option<OffsetDateTime>,
        /// Up to this instant, exclusive (RFC 3339); default: now.
        #[arg(long, value_name = "RFC3339", value_parser = parse_timestamp, requires = "from")]
        to: Option<OffsetDateTime>,
    },
    /// Rebuild the full-text search indexes over transcript turns and note text.
    Reindex,
    /// Start the built-in ChartHero simulator and sync it into a local demo database.
    Demo {
        /// Where to write the demo warehouse: a file (one an earlier `demo` created is replaced),
        /// or a PostgreSQL URL without a password (postgresql://user@host/db; schema charthero,
        /// which an earlier `demo` created is replaced; the password comes from
        /// CHARTHERO_DATABASE_PASSWORD).
        #[arg(long, value_name = "PATH|URL", default_value = "charthero-demo.db")]
        database: String,
        /// How many encounters the simulator generates (1 to 1000000).
        #[arg(long, value_name = "N", default_value_t = 3_000, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
        encounters: u32,
        /// Over how many days before now they were created (1 to 3650).
        #[arg(long, value_name = "DAYS", default_value_t = 60, value_parser = clap::value_parser!(u32).range(1..=3650))]
        days: u32,
        /// Seed of the synthetic dataset (any unsigned 64-bit integer).
        #[arg(long, value_name = "N", default_value_t = 42)]
        seed: u64,
    },
    /// Serve the built-in ChartHero simulator on loopback until Ctrl-C, with an API key file and
    /// a ready configuration file, to try `check`, `sync`, `run` and `status` against.
    Simulate {
        /// Directory for the key file (api-key), the configuration (config.toml) and the
        /// warehouse (warehouse.db); created if missing.
        #[arg(long, value_name = "DIR", default_value = "charthero-simulator")]
        dir: PathBuf,
        /// How many encounters the simulator starts with (0 to 1000000).
        #[arg(long, value_name = "N", default_value_t = 1_000, value_parser = clap::value_parser!(u32).range(0..=1_000_000))]
        encounters: u32,
        /// Over how many days before now they were created (1 to 3650).
        #[arg(long, value_name = "DAYS", default_value_t = 30, value_parser = clap::value_parser!(u32).range(1..=3650))]
        days: u32,
        /// Seed of the synthetic dataset (any unsigned 64-bit integer).
        #[arg(long, value_name = "N", default_value_t = 42)]
        seed: u64,
        /// Add a new encounter this often while serving: an integer and a unit (ms, s, m, h, d),
        /// e.g. 30s; 0s adds none.
        #[arg(long, value_name = "DURATION", default_value = "1m", value_parser = parse_interval)]
        new_every: std::time::Duration,
        /// Refuse requests beyond this many a second (burst 2) with 429 and `Retry-After: 1`, as
        /// a ChartHero limit below the configured rate would (1 to 10000).
        #[arg(long, value_name = "RPS", value_parser = clap::value_parser!(u32).range(1..=10_000))]
        rate_limit: Option<u32>,
        /// Send every response with its keys and documents in a changing order and varying
        /// whitespace, as a server built on unordered maps does.
        #[arg(long)]
        unordered: bool,
        /// Embed a signed link to each finished recording in its document's summary, signed
        /// anew for every response, as a server backed by object storage may.
        #[arg(long)]
        signed_links: bool,
        /// Answer a document's routes (a note's detail, a transcript, a recording) with 404 for a
        /// document created less than this long ago although the list shows it, as routes
        /// served from a lagging replica do: an integer and a unit (ms, s, m, h, d), e.g. 30s;
        /// 0s, the default, lags nothing.
        #[arg(long, value_name = "DURATION", default_value = "0s", value_parser = parse_interval)]
        document_lag: std::time::Duration,
        /// Announce transcripts by webhook to `run` on this loopback port (1024 to 65535): the
        /// configuration gets `[webhook]` and a signing secret (webhook-secret), and each new
        /// encounter's transcript is processing at first, finalized and announced 20 s later.
        #[arg(long, value_name = "PORT", value_parser = clap::value_parser!(u16).range(1024..))]
        webhook_port: Option<u16>,
        /// The clinic's `organization_id` every encounter carries (1 to 64 letters, digits, `_`
        /// or `-`), so that several simulators can stand for several clinics of one warehouse.
        #[arg(long, value_name = "ID", default_value = "org_sim", value_parser = parse_organization_id)]
        organization_id: String,
    },
    /// Write the man pages and the bash, zsh and fish completions into a directory (used by
    /// packaging/build-deb).
    #[command(hide = true)]
    Generate {
        /// Directory to write into; created if missing.
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// Date printed in the man pages (YYYY-MM-DD); the package passes its commit's date.
        #[arg(long, value_name = "YYYY-MM-DD", default_value = "")]
        date: String,
    },
}

fn parse_timestamp(text: &str) -> Result<OffsetDateTime, String> {
    timefmt::parse_operator_instant(text)
}

/// An `organization_id` for `simulate`: 1 to 64 ASCII letters, digits, `_` or `-`.
fn parse_organization_id(text: &str) -> Result<String, String> {
    let fits = (1..=64).contains(&text.len())
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if fits {
        Ok(text.to_owned())
    } else {
        Err("an organization_id is 1 to 64 ASCII letters, digits, `_` or `-`".into())
    }
}

fn parse_age(text: &str) -> Result<std::time::Duration, String> {
    config::parse_age("--older-than", text).map_err(|e| e.to_string())
}

fn parse_interval(text: &str) -> Result<std::time::Duration, String> {
    // clap names the flag; the message says only what is wrong with the value.
    let d = config::parse_duration("", text).map_err(|e| match e {
        config::ConfigError::Invalid { message, .. } => message,
        other => other.to_string(),
    })?;
    if d > std::time::Duration::from_secs(86_400) {
        return Err("must be at most 1d".to_owned());
    }
    Ok(d)
}

/// Writes a line to stdout. A closed stdout (`charthero-sync status | head -1`) must not panic
/// the way `println!` does on EPIPE: the output is dropped and the command finishes normally.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout().lock(), $($arg)*);
    }};
}

/// [`say!`] for stderr: a closed stderr (`... 2>&1 | head -1`) is ignored, never a panic.
macro_rules! complain {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr().lock(), $($arg)*);
    }};
}

/// An error on its way to an exit code.
struct Failure {
    code: u8,
    error: anyhow::Error,
}

impl From<charthero_sync::daemon::lock::LockError> for Failure {
    fn from(e: charthero_sync::daemon::lock::LockError) -> Self {
        use std::io::ErrorKind;
        let code = match &e {
            charthero_sync::daemon::lock::LockError::Held { .. } => exit::LOCKED,
            // Where the database may not live is the configuration's fault: a restart cannot
            // fix it. Anything else (a full disk, an I/O error) may pass.
            charthero_sync::daemon::lock::LockError::Io { source, .. }
                if matches!(
                    source.kind(),
                    ErrorKind::NotFound
                        | ErrorKind::PermissionDenied
                        | ErrorKind::ReadOnlyFilesystem
                        | ErrorKind::NotADirectory
                        | ErrorKind::IsADirectory
                ) =>
            {
                exit::USAGE
            }
            // A password file that cannot be used is the configuration's too.
            charthero_sync::daemon::lock::LockError::Server(e) if is_configuration(e) => exit::USAGE,
            // An unreachable or restarting server may come back; a refused role is in its
            // message, which says what to set.
            charthero_sync::daemon::lock::LockError::Io { .. }
            | charthero_sync::daemon::lock::LockError::Server(_) => exit::CYCLE_FAILED,
        };
        Failure {
            code,
            error: e.into(),
        }
    }
}

impl From<store::LocationError> for Failure {
    fn from(e: store::LocationError) -> Self {
        Failure {
            code: exit::USAGE,
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

/// The exit code of a failure that may be the warehouse's: a corrupt one has its own (a lost
/// writer lock, also fatal, is a failed cycle: a restart takes the lock again when it is free).
fn store_failure_code(e: Option<&store::StoreError>) -> u8 {
    if e.is_some_and(|e| e.kind() == store::StoreErrorKind::Corrupt) {
        exit::STORE_CORRUPT
    } else {
        exit::CYCLE_FAILED
    }
}

/// Whether a failure is the configuration's (exit 2) although it surfaced late: a secret read
/// only when the server is reached (the database password), anywhere among its causes, also
/// inside a warehouse error.
fn is_configuration(error: &anyhow::Error) -> bool {
    error.chain().any(|c| {
        c.is::<ConfigError>()
            || c.downcast_ref::<store::StoreError>()
                .is_some_and(store::StoreError::is_configuration)
    })
}

impl From<anyhow::Error> for Failure {
    fn from(error: anyhow::Error) -> Self {
        let code = if is_configuration(&error) {
            exit::USAGE
        } else {
            store_failure_code(error.chain().find_map(|c| c.downcast_ref()))
        };
        Failure { code, error }
    }
}

impl From<store::StoreError> for Failure {
    fn from(e: store::StoreError) -> Self {
        anyhow::Error::from(e).into()
    }
}

impl From<CycleError> for Failure {
    fn from(e: CycleError) -> Self {
        let code = match &e {
            CycleError::Api(api) if api.is_auth() => exit::AUTH_REFUSED,
            CycleError::WrongOrganization { .. } => exit::AUTH_REFUSED,
            CycleError::IdCollision(_) => exit::ID_COLLISION,
            _ => store_failure_code(e.store_error()),
        };
        Failure {
            code,
            error: e.into(),
        }
    }
}

/// The selected organizations and their keys (each key's source is logged, never the key).
type OrganizationKeys = Vec<(config::Organization, charthero_sync::secret::ApiKey)>;

/// What a command that syncs needs first: the validated config, the selected organizations'
/// API keys, and the warehouse's writer lock.
fn prepare_writer(
    path: &std::path::Path,
    what: &str,
    organizations: &[String],
) -> Result<(Config, OrganizationKeys, WriterLock), Failure> {
    let config = Config::load(path)?;
    store::check_location(&config.database.target)?;
    charthero_sync::check::audio_directory(&config.audio).map_err(audio_directory_refused)?;
    let keys = load_keys(&config, organizations)?;
    let lock = WriterLock::acquire(&config.database.target, what)?;
    Ok((config, keys, lock))
}

/// Why [`charthero_sync::check::audio_directory`] refused, as a configuration error (exit 2).
fn audio_directory_refused(why: String) -> Failure {
    Failure {
        code: exit::USAGE,
        error: anyhow::anyhow!("invalid value for `audio.directory`: {why}"),
    }
}

fn load_keys(config: &Config, organizations: &[String]) -> Result<OrganizationKeys, Failure> {
    config
        .select_organizations(organizations)?
        .into_iter()
        .map(|org| {
            let (key, source) = config::load_organization_key(&org)?;
            tracing::info!(organization = %org.name, %source, "API key loaded");
            Ok((org, key))
        })
        .collect()
}

/// Each organization's webhook signing secret, in the order of `keys`, when `[webhook] listen`
/// is set (none otherwise): a missing one is a configuration error naming where it was looked for.
fn load_webhook_secrets(config: &Config, keys: &OrganizationKeys) -> Result<Vec<WebhookSecret>, Failure> {
    if config.webhook_listen.is_none() {
        return Ok(Vec::new());
    }
    keys.iter()
        .map(|(org, _)| {
            let (secret, source) = config::load_webhook_secret(org)?;
            tracing::info!(organization = %org.name, %source, "webhook signing secret loaded");
            Ok(secret)
        })
        .collect()
}

/// The range of `--backfill-from/--backfill-to` (or `--from/--to`); the end defaults to now and
/// must be after the start. `what` names the range in the error ("backfill", "purge").
fn created_range(
    what: &str,
    from: Option<OffsetDateTime>,
    to: Option<OffsetDateTime>,
) -> Result<Option<BackfillRange>, Failure> {
    let Some(start) = from else { return Ok(None) };
    let end = to.unwrap_or_else(OffsetDateTime::now_utc);
    if start >= end {
        return Err(Failure {
            code: exit::USAGE,
            error: anyhow::anyhow!(
                "the {what} start ({}) must be before its end ({})",
                timefmt::format_utc(start),
                timefmt::format_utc(end)
            ),
        });
    }
    Ok(Some(BackfillRange { start, end }))
}

/// `demo` and `simulate` make their own configuration; a `--config` given to them on the command
/// line would be silently ignored, so it is refused instead. (`CHARTHERO_SYNC_CONFIG` in the
/// environment is meant for the other commands and is ignored.)
fn refuse_config_flag(command: &str, given: bool) -> Result<(), Failure> {
    if given {
        return Err(Failure {
            code: exit::USAGE,
            error: anyhow::anyhow!(
                "`{command}` does not read a configuration file (it runs the built-in simulator with its own); drop --config"
            ),
        });
    }
    Ok(())
}

fn main() -> ExitCode {
    let matches = Cli::command().get_matches();
    let config_flag_given = matches.value_source("config") == Some(ValueSource::CommandLine);
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    if let Err(e) = charthero_sync::telemetry::init() {
        complain!("error: {e}");
        return ExitCode::from(exit::USAGE);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            complain!("error: cannot start the async runtime: {e}");
            return ExitCode::from(exit::CYCLE_FAILED);
        }
    };
    match runtime.block_on(dispatch(cli, config_flag_given)) {
        Ok(()) => ExitCode::from(exit::OK),
        Err(f) => {
            complain!("error: {:#}", f.error);
            ExitCode::from(f.code)
        }
    }
}

async fn dispatch(cli: Cli, config_flag_given: bool) -> Result<(), Failure> {
    match cli.command {
        Command::Demo {
            database,
            encounters,
            days,
            seed,
        } => {
            refuse_config_flag("demo", config_flag_given)?;
            let opts = demo::DemoOptions {
                database: demo::DemoDatabase::parse(&database),
                encounters: encounters as usize,
                days: i64::from(days),
                seed,
            };
            let cancel = cancel_on_signal();
            let summary = demo::run(&opts, &cancel).await.map_err(|error| {
                if error.chain().any(|c| c.is::<demo::DemoRefused>()) {
                    Failure {
                        code: exit::USAGE,
                        error,
                    }
                } else {
                    error.into()
                }
            })?;
            print_demo_summary(&summary);
            Ok(())
        }
        Command::Simulate {
            dir,
            encounters,
            days,
            seed,
            new_every,
            rate_limit,
            unordered,
            signed_links,
            document_lag,
            webhook_port,
            organization_id,
        } => {
            refuse_config_flag("simulate", config_flag_given)?;
            let opts = simulate::SimulateOptions {
                dir,
                encounters: encounters as usize,
                days,
                seed,
                new_every,
                rate_limit,
                unordered,
                signed_links,
                document_lag,
                webhook_port,
                organization_id,
            };
            let s = simulate::start(&opts).await?;
            let config = s.config_file.display();
            say!(
                "ChartHero simulator listening at {} ({} encounters)",
                s.base_url,
                encounters
            );
            say!("  API key file:  {} (mode 0600)", s.key_file.display());
            say!("  configuration: {config}");
            say!("  warehouse:     {} (kept between runs)", s.database.display());
            if let (Some(port), Some(secret)) = (webhook_port, &s.webhook_secret_file) {
                say!(
                    "  webhooks:      to http://127.0.0.1:{port}{} (`run` receives them), signed with the secret in {}",
                    charthero_sync::webhook::PATH,
                    secret.display()
                );
            }
            say!("Try, in another terminal:");
            for command in ["check", "sync", "status", "run"] {
                say!("  charthero-sync --config {config} {command}");
            }
            say!("Serving until Ctrl-C.");
            let stop = cancel_on_signal_saying("signal received: stopping the simulator");
            simulate::keep_adding(&s.sim, opts.new_every, opts.webhook_port.is_some(), &stop).await;
            s.sim.shutdown();
            say!("simulator stopped");
            Ok(())
        }
        Command::Generate { dir, date } => {
            let written =
                charthero_sync::generate::write_all(Cli::command(), &dir, &date).map_err(|e| Failure {
                    code: exit::CYCLE_FAILED,
                    error: anyhow::anyhow!("cannot write into {}: {e}", dir.display()),
                })?;
            for path in written {
                say!("{}", path.display());
            }
            Ok(())
        }
        Command::Migrate => {
            let config = Config::load(&cli.config)?;
            store::check_location(&config.database.target)?;
            let _lock = WriterLock::acquire(&config.database.target, "charthero-sync migrate")?;
            let database = config.database.clone();
            let (before, after) = store::blocking(move || {
                let before = store::applied_version(&database)?;
                // Moves what the migrations wrote into the file and cuts the log back, as a
                // sync's end does.
                store::open(&database)?.checkpoint()?;
                Ok((before, store::applied_version(&database)?))
            })
            .await
            .map_err(|e| store::StoreError::new(&config.database.target, e))?;
            let target = &config.database.target;
            match before {
                0 => say!("database {target} created at schema version {after}"),
                v if v < after => say!("database {target} migrated from schema version {v} to {after}"),
                _ => say!("database {target} is up to date (schema version {after})"),
            }
            Ok(())
        }
        Command::Copy { from } => {
            let config = Config::load(&cli.config)?;
            charthero_sync::copy::check_arguments(&from, &config.database).map_err(|e| Failure {
                code: exit::USAGE,
                error: e.into(),
            })?;
            let source = config::DatabaseTarget::Sqlite { path: from.clone() };
            let _source_lock = WriterLock::acquire(&source, "charthero-sync copy")?;
            let _lock = WriterLock::acquire(&config.database.target, "charthero-sync copy")?;
            let report = charthero_sync::copy::run(from, &config.database)
                .await
                .map_err(|error| {
                    if error.chain().any(|c| c.is::<store::CopyRefused>()) {
                        Failure {
                            code: exit::USAGE,
                            error,
                        }
                    } else {
                        Failure::from(error)
                    }
                })?;
            for line in charthero_sync::copy::summary(&report) {
                say!("{line}");
            }
            Ok(())
        }
        Command::Sync {
            backfill_from,
            backfill_to,
            audit,
            refresh_content,
            organizations,
        } => {
            let backfill = created_range("backfill", backfill_from, backfill_to)?;
            let (config, keys, _lock) = prepare_writer(&cli.config, "charthero-sync sync", &organizations)?;
            let several = keys.len() > 1 || keys[0].0.name != config::DEFAULT_ORGANIZATION;
            let cancel = cancel_on_signal();
            let cycles = charthero_sync::sync_organizations(
                &config,
                keys,
                "sync",
                charthero_sync::sync::CyclePlan {
                    refresh_content,
                    ..charthero_sync::sync::CyclePlan::full(backfill, audit)
                },
                &cancel,
            )
            .await?;
            sync_exit(cycles, several)
        }
        Command::Run {
            backfill_from,
            backfill_to,
            organizations,
        } => {
            let backfill = created_range("backfill", backfill_from, backfill_to)?;
            let (config, keys, _lock) = prepare_writer(&cli.config, "charthero-sync run", &organizations)?;
            let webhook_secrets = load_webhook_secrets(&config, &keys)?;
            let shutdown = cancel_on_signal();
            charthero_sync::daemon::serve_organizations(
                &config,
                keys,
                webhook_secrets,
                backfill,
                &Notifier::from_env(),
                &shutdown,
            )
            .await?;
            tracing::info!("stopped");
            Ok(())
        }
        Command::Backfill {
            from,
            to,
            organizations,
        } => {
            let Some(range) = created_range("backfill", Some(from), to)? else {
                unreachable!("a range with a start is always returned")
            };
            let config = Config::load(&cli.config)?;
            let names: Vec<String> = config
                .select_organizations(&organizations)?
                .into_iter()
                .map(|o| o.name)
                .collect();
            store::check_location(&config.database.target)?;
            // Only the queue rows: the daemon, which holds the writer lock, may be running.
            let database = config.database.clone();
            let queued = store::blocking(move || {
                let warehouse = store::open_current(&database)?;
                names
                    .into_iter()
                    .map(|name| {
                        let id = warehouse.queue_backfill(
                            &name,
                            range.start,
                            range.end,
                            "backfill",
                            OffsetDateTime::now_utc(),
                        )?;
                        Ok((name, id))
                    })
                    .collect::<anyhow::Result<Vec<_>>>()
            })
            .await?;
            for (name, id) in &queued {
                if name == config::DEFAULT_ORGANIZATION {
                    say!(
                        "queued backfill {id}: {} .. {}",
                        timefmt::format_utc(range.start),
                        timefmt::format_utc(range.end)
                    );
                } else {
                    say!(
                        "queued backfill {id} of organization {name}: {} .. {}",
                        timefmt::format_utc(range.start),
                        timefmt::format_utc(range.end)
                    );
                }
            }
            if WriterLock::acquire(&config.database.target, "charthero-sync backfill (probe)").is_ok() {
                let ids: Vec<String> = queued.iter().map(|(_, id)| id.to_string()).collect();
                let (them, it) = if ids.len() == 1 {
                    ("backfill", "it")
                } else {
                    ("backfills", "them")
                };
                say!(
                    "note: no daemon is running on this warehouse; `charthero-sync run` will pick {them} {} up, \
                     or `charthero-sync sync` works {it} now",
                    ids.join(", ")
                );
            }
            Ok(())
        }
        Command::Status { json } => {
            let config = Config::load(&cli.config)?;
            let target = config.database.target.clone();
            let (status, created) = {
                let config = config.clone();
                store::blocking(move || {
                    let names: Vec<String> = config.organizations.iter().map(|o| o.name.clone()).collect();
                    // Nothing synced yet is a status too (exit 0), in the usual shape.
                    if store::applied_version(&config.database)? == 0 {
                        let database = charthero_sync::status::Database {
                            backend: match config.database.target {
                                config::DatabaseTarget::Sqlite { .. } => "sqlite",
                                config::DatabaseTarget::Postgres(_) => "postgresql",
                            },
                            location: config.database.target.to_string(),
                        };
                        return Ok((
                            charthero_sync::status::Status::not_created(database, &names),
                            false,
                        ));
                    }
                    let warehouse = store::open_reader(&config.database)?;
                    let now = OffsetDateTime::now_utc();
                    let mut status = charthero_sync::status::read(warehouse.as_ref(), now, &names)?;
                    status.estimate(warehouse.as_ref(), &config, now)?;
                    Ok((status, true))
                })
                .await
                // Names the warehouse and what is wrong with it (damaged, unreadable, busy).
                .map_err(|e| store::StoreError::new(&target, e))?
            };
            if json {
                say!(
                    "{}",
                    serde_json::to_string_pretty(&status).map_err(anyhow::Error::from)?
                );
            } else {
                if !created {
                    say!(
                        "no warehouse at {} yet: `charthero-sync migrate` or the first `sync` creates it",
                        status.database.location
                    );
                }
                say!("{}", status.render().trim_end());
            }
            Ok(())
        }
        Command::Purge { older_than, from, to } => {
            let config = Config::load(&cli.config)?;
            let (range, reason) = match (from, older_than.or(config.privacy.retention)) {
                (Some(start), _) => match created_range("purge", Some(start), to)? {
                    Some(range) => (range, "range"),
                    None => unreachable!("a range with a start is always returned"),
                },
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
            store::check_location(&config.database.target)?;
            let _lock = WriterLock::acquire(&config.database.target, "charthero-sync purge")?;
            let (database, audio) = (config.database.clone(), config.audio.directory.clone());
            let c = store::blocking(move || {
                store::open(&database)?.purge(
                    &audio,
                    range.start,
                    range.end,
                    reason,
                    OffsetDateTime::now_utc(),
                )
            })
            .await?;
            say!(
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
            store::check_location(&config.database.target)?;
            let _lock = WriterLock::acquire(&config.database.target, "charthero-sync reindex")?;
            let database = config.database.clone();
            store::blocking(move || store::open(&database)?.rebuild_search()).await?;
            say!("search indexes rebuilt");
            Ok(())
        }
        Command::Plan { json, organizations } => {
            let config = Config::load(&cli.config)?;
            let ceiling = charthero_sync::api::Ceiling::new(&config.limits.ceiling())?;
            let mut plans = Vec::new();
            // An organization that cannot be estimated (its key refused, a pause ChartHero asked
            // for) does not hide the others' plans; the exit status says it failed.
            let mut failed: Vec<(u8, String)> = Vec::new();
            let selected = config.select_organizations(&organizations)?;
            let pauses = charthero_sync::check::kept(&config.database, &selected)
                .await
                .unwrap_or_else(|e| {
                    complain!("note: cannot read whether ChartHero paused a key: {e:#}");
                    Default::default()
                })
                .pauses;
            for org in selected {
                let (key, _) = config::load_organization_key(&org)?;
                let client = probing_client(&config, &org, &ceiling, &key, &pauses)?;
                match charthero_sync::plan::estimate(&config, &org, &client, OffsetDateTime::now_utc()).await
                {
                    Ok(plan) => plans.push(plan),
                    Err(e) => failed.push((
                        if e.is_auth() {
                            exit::AUTH_REFUSED
                        } else {
                            exit::CYCLE_FAILED
                        },
                        format!("cannot estimate the backfill of {}: {e}", org.name),
                    )),
                }
            }
            let several = config.organizations.len() > 1;
            // One organization that failed has nothing to print but why; several print an
            // array, empty when every one failed.
            if json && (several || !plans.is_empty()) {
                let text = match &plans[..] {
                    [one] if !several => serde_json::to_string_pretty(one),
                    all => serde_json::to_string_pretty(all),
                };
                say!("{}", text.map_err(anyhow::Error::from)?);
            } else if !json {
                for plan in &plans {
                    if several {
                        say!("organization     {}", plan.organization);
                    }
                    say!("{}", plan.render().trim_end());
                }
            }
            match failed.iter().map(|(code, _)| *code).max() {
                None => Ok(()),
                Some(code) => Err(Failure {
                    code,
                    error: anyhow::anyhow!(
                        "{}",
                        failed.into_iter().map(|(_, m)| m).collect::<Vec<_>>().join("; ")
                    ),
                }),
            }
        }
        Command::Check { organizations } => {
            let config = Config::load(&cli.config)?;
            say!("config           ok      {}", cli.config.display());
            let (lines, database) = charthero_sync::check::check_database(&config.database).await;
            for line in lines {
                say!("{line}");
            }
            let audio = charthero_sync::check::audio_directory(&config.audio);
            if config.audio.enabled {
                match &audio {
                    Ok(()) => say!("audio.directory  ok      {}", config.audio.directory.display()),
                    Err(why) => say!("audio.directory  FAILED  {why}"),
                }
            }
            let selected = config.select_organizations(&organizations)?;
            let several = selected.len() > 1 || selected[0].name != config::DEFAULT_ORGANIZATION;
            let webhook = match config.webhook_listen {
                None => Ok(()),
                Some(addr) => check_webhook_listen(addr).await,
            };
            let ceiling = charthero_sync::api::Ceiling::new(&config.limits.ceiling())?;
            let mut refused = Vec::new();
            let mut failed = Vec::new();
            let mut paused = Vec::new();
            // Not when the warehouse's location failed its check: the error below says why.
            let kept = match &database {
                Ok(()) => charthero_sync::check::kept(&config.database, &selected)
                    .await
                    .unwrap_or_else(|e| {
                        say!(
                            "warehouse        note    cannot read which clinics and pauses earlier syncs kept: {e:#}"
                        );
                        Default::default()
                    }),
                Err(_) => Default::default(),
            };
            let mut claimed = std::collections::HashMap::new();
            for org in &selected {
                if several {
                    say!("organization {}", org.name);
                }
                let (key, source) = config::load_organization_key(org)?;
                say!("api key          ok      from {source}");
                if config.webhook_listen.is_some() {
                    let (_, source) = config::load_webhook_secret(org)?;
                    say!("webhook secret   ok      from {source}");
                }
                let client = probing_client(&config, org, &ceiling, &key, &kept.pauses)?;
                if let Some(until) = client.paused_until() {
                    let until = charthero_sync::timefmt::format_utc(until);
                    say!(
                        "api              paused  ChartHero asked this key to wait (Retry-After) until {until}: \
                         no request is sent before then"
                    );
                    paused.push(format!(
                        "{}: ChartHero asked the key to wait until {until}",
                        org.name
                    ));
                    continue;
                }
                let probes = {
                    let probing = charthero_sync::check::probe_routes(&config, &client);
                    tokio::pin!(probing);
                    tokio::select! {
                        probes = &mut probing => probes,
                        () = tokio::time::sleep(PROBE_PATIENCE.min(config.api.read_timeout)) => {
                            complain!(
                                "no answer from {} yet; waiting up to {} per attempt, {} attempts \
                                 ([api] connect_timeout, read_timeout)",
                                org.base_url,
                                config::format_duration(config.api.read_timeout),
                                PROBE_ATTEMPTS.min(config.limits.max_attempts.get()),
                            );
                            probing.await
                        }
                    }
                };
                for p in &probes {
                    say!("{}", p.describe());
                }
                // Only when the list answered: otherwise its line above says why, and listing
                // again would only wait out the same retries.
                if probes.first().is_some_and(|p| p.works()) {
                    match charthero_sync::check::probe_organization(org, &client, &kept.clinics, &mut claimed)
                        .await
                    {
                        Ok(line) => say!("{line}"),
                        Err(line) => {
                            say!("{line}");
                            refused.push(format!(
                                "{}: the key reads another organization's clinic",
                                org.name
                            ));
                        }
                    }
                }
                if let Some(e) = probes
                    .iter()
                    .find_map(|p| p.result.as_ref().err().filter(|e| e.is_auth()))
                {
                    refused.push(format!("{}: ChartHero refused the API key: {}", org.name, e.kind));
                }
                failed.extend(
                    probes
                        .iter()
                        .filter(|p| p.needed && !p.works())
                        .map(|p| match &p.result {
                            Err(e) if e.is_unreachable() => format!(
                                "{} {} (ChartHero at {} could not be reached)",
                                org.name,
                                p.route.as_str(),
                                config.api.base_url
                            ),
                            _ => format!("{} {}", org.name, p.route.as_str()),
                        }),
                );
            }
            if !refused.is_empty() {
                return Err(Failure {
                    code: exit::AUTH_REFUSED,
                    error: anyhow::anyhow!("{}", organizations_message(&refused, several)),
                });
            }
            match database {
                Ok(()) => {}
                Err(charthero_sync::check::DatabaseProblem::Location(e)) => return Err(e.into()),
                Err(charthero_sync::check::DatabaseProblem::Server(e)) => return Err(e.into()),
                Err(charthero_sync::check::DatabaseProblem::File(e)) => return Err(e.into()),
            }
            audio.map_err(audio_directory_refused)?;
            let mut problems = Vec::new();
            if let Err(why) = webhook {
                problems.push(why);
            }
            if !failed.is_empty() {
                let failed: Vec<String> = if several {
                    failed
                } else {
                    failed
                        .iter()
                        .map(|f| f.split_once(' ').map_or(f.as_str(), |(_, r)| r).to_owned())
                        .collect()
                };
                problems.push(format!(
                    "routes this configuration needs do not work: {}",
                    failed.join(", ")
                ));
            }
            if !paused.is_empty() {
                problems.push(format!(
                    "{} (Retry-After); check again after then",
                    organizations_message(&paused, several)
                ));
            }
            if !problems.is_empty() {
                return Err(anyhow::anyhow!("{}", problems.join("; ")).into());
            }
            say!("everything this configuration needs works");
            Ok(())
        }
    }
}

/// `check`'s line about `[webhook] listen`: free to bind, in use (by the running daemon, most
/// likely: a note, not a failure), or not bindable by this user (`Err`, the problem).
async fn check_webhook_listen(addr: std::net::SocketAddr) -> Result<(), String> {
    let path = charthero_sync::webhook::PATH;
    match tokio::net::TcpListener::bind(addr).await {
        Ok(_) => {
            say!("webhook.listen   ok      {addr} (deliveries to {path}, or {path}/<name>)");
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            say!("webhook.listen   note    {addr} is in use: by the running daemon, or by another program");
            Ok(())
        }
        Err(e) => {
            say!("webhook.listen   FAILED  cannot listen on {addr}: {e}");
            Err(format!("webhook.listen {addr} cannot be listened on: {e}"))
        }
    }
}

/// How long `check` waits for its first probe before it says it is still waiting (at most one
/// `[api] read_timeout`).
const PROBE_PATIENCE: std::time::Duration = std::time::Duration::from_secs(10);

/// The most attempts a probe of `check` or `plan` makes: enough for a reset connection or a 503
/// on the way, not the full `[limits] max_attempts` of a sync, which an operator at a prompt
/// would sit through in silence when the host never answers.
const PROBE_ATTEMPTS: u32 = 3;

/// A client of `org`'s key for the commands that probe outside a sync cycle (`check`, `plan`),
/// held, as a cycle's start holds its client, to the pause ChartHero asked of the key and a sync
/// kept (`pauses`, from `check::kept`), making at most [`PROBE_ATTEMPTS`] attempts a request.
fn probing_client(
    config: &Config,
    org: &config::Organization,
    ceiling: &std::sync::Arc<charthero_sync::api::Ceiling>,
    key: &charthero_sync::secret::ApiKey,
    pauses: &std::collections::HashMap<String, OffsetDateTime>,
) -> anyhow::Result<charthero_sync::api::Client> {
    let mut limits = config.limits.clone();
    limits.max_attempts = limits
        .max_attempts
        .min(std::num::NonZeroU32::new(PROBE_ATTEMPTS).expect("3 is not 0"));
    let client = charthero_sync::api::Client::for_organization(
        &config.api,
        org,
        &limits,
        ceiling.clone(),
        key,
        std::sync::Arc::default(),
    )?;
    if let Some(until) = pauses.get(&org.name) {
        client.pause_until(*until);
    }
    Ok(client)
}

/// What `check` found wrong with its organizations, each `"<name>: <problem>"`, as one message:
/// every one with its name, or with one organization the first problem alone (the message it
/// always had).
fn organizations_message(problems: &[String], several: bool) -> String {
    match problems {
        [first, ..] if !several => first
            .split_once(": ")
            .map_or(first.as_str(), |(_, m)| m)
            .to_owned(),
        all => all.join("; "),
    }
}

/// What `sync` prints and exits with: one line per organization; 3 when any organization's key
/// was refused (the others were still synced), 5 for a corrupt warehouse, 6 when any
/// organization's IDs collide with another clinic's, else 1 when anything was left undone or
/// failed, else 0.
fn sync_exit(cycles: Vec<charthero_sync::OrganizationCycle>, several: bool) -> Result<(), Failure> {
    let mut refused = Vec::new();
    let mut corrupt = None;
    let mut collided = Vec::new();
    let mut undone = Vec::new();
    for cycle in cycles {
        let who = if several {
            format!("organization {}: ", cycle.organization)
        } else {
            String::new()
        };
        match cycle.result {
            Ok(report) => {
                let c = report.counts;
                say!(
                    "{who}sync {}: {} new, {} changed, {} unchanged, {} removed encounters; {} documents, {} transcripts, \
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
                    undone.push(format!(
                        "{who}the cycle left work undone: {} item(s) in dead letters, {} of them by this cycle \
                         (each asked again by the next cycle after its first failure, later after half the time \
                         it has been failing, at most an hour: see `status`){}{}",
                        report.dead_letters_left,
                        c.dead_letters,
                        report
                            .disabled_routes
                            .map_or_else(String::new, |d| format!("; routes closed to this key: {d}")),
                        if report.backfills_pending {
                            "; a backfill queued during the cycle is still waiting (see `status`)"
                        } else {
                            ""
                        }
                    ));
                }
            }
            Err(e) => {
                if let CycleError::Api(api) = &e {
                    tracing::error!(
                        organization = %cycle.organization,
                        reason_code = api.reason_code().unwrap_or("none"),
                        "{api}"
                    );
                }
                if e.key_refused() {
                    refused.push(format!("{who}{e:#}"));
                } else if matches!(e, CycleError::IdCollision(_)) {
                    collided.push(format!("{who}{e:#}"));
                } else if e.store_error().is_some_and(store::StoreError::is_fatal) {
                    corrupt.get_or_insert(Failure::from(e));
                } else if several {
                    undone.push(format!("{who}{e:#}"));
                } else {
                    return Err(Failure::from(e));
                }
            }
        }
    }
    if !refused.is_empty() {
        return Err(Failure {
            code: exit::AUTH_REFUSED,
            error: anyhow::anyhow!("{}", refused.join("; ")),
        });
    }
    if let Some(f) = corrupt {
        return Err(f);
    }
    if !collided.is_empty() {
        return Err(Failure {
            code: exit::ID_COLLISION,
            error: anyhow::anyhow!("{}", collided.join("; ")),
        });
    }
    if !undone.is_empty() {
        return Err(Failure {
            code: exit::CYCLE_FAILED,
            error: anyhow::anyhow!("{}", undone.join("; ")),
        });
    }
    Ok(())
}

/// A token cancelled by the first SIGINT or SIGTERM; a second signal exits at once.
fn cancel_on_signal() -> CancellationToken {
    cancel_on_signal_saying(
        "signal received: finishing the current page, then stopping (signal again to exit now)",
    )
}

/// [`cancel_on_signal`], logging `what` when the first signal arrives.
fn cancel_on_signal_saying(what: &'static str) -> CancellationToken {
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
                complain!("second signal: exiting now");
                std::process::exit(i32::from(exit::CYCLE_FAILED));
            }
            tracing::warn!("{what}");
            child.cancel();
        }
    });
    token
}

fn print_demo_summary(s: &demo::DemoSummary) {
    let c = s.report.counts;
    say!();
    say!(
        "Synced {} simulated ChartHero encounters into {} in {:.1} s.",
        s.simulator_encounters,
        s.database,
        s.elapsed.as_secs_f64()
    );
    say!(
        "  warehouse: {} encounters, {} patients, {} documents ({} notes with text), {} transcripts with {} turns",
        s.encounters,
        s.patients,
        s.documents,
        s.notes,
        s.transcripts,
        s.turns
    );
    say!(
        "  requests: {} list pages over {} windows, {} document details, {} transcripts; complete through {}",
        c.list_requests,
        c.windows,
        c.documents_fetched,
        c.transcripts_fetched,
        s.report
            .complete_through
            .map_or_else(|| "(nothing yet)".to_owned(), timefmt::format_utc)
    );
    say!();
    say!("Try it:");
    for (i, (title, sql)) in demo::EXAMPLE_QUERIES.into_iter().enumerate() {
        say!("  -- {title}");
        match &s.postgres_url {
            None => say!("  sqlite3 {} \"{sql}\"", s.database),
            Some(url) => {
                let sql = if i == 0 { demo::POSTGRES_PER_DAY_QUERY } else { sql };
                say!(
                    "  psql \"{url}\" -c \"SET search_path TO {}; {sql}\"",
                    charthero_sync::config::DEFAULT_SCHEMA
                );
            }
        }
    }
}
