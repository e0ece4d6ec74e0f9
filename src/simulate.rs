//! `charthero-sync simulate`: the built-in ChartHero simulator as a server to point the real
//! commands at. Starts it on a random loopback port with a synthetic data set, writes the
//! simulator's API key (mode 0600) and a ready configuration file into a directory, and keeps
//! adding new encounters while it serves, so `check`, `sync`, `run` and `status` can be tried
//! without a ChartHero account. It never touches a configuration or warehouse it did not write;
//! serving until a signal is the caller's (`main`'s) business.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use charthero_sim::{DocKind, NewEncounter, SimOptions, Simulator};
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

use crate::timefmt::format_utc;

/// What `simulate` starts.
#[derive(Debug, Clone)]
pub struct SimulateOptions {
    /// Where the key file, the configuration file and (by that configuration) the warehouse go.
    pub dir: PathBuf,
    pub encounters: usize,
    pub days: u32,
    pub seed: u64,
    /// A new encounter every this long while serving; zero: none.
    pub new_every: Duration,
    /// Requests a second beyond which the simulator answers 429 (`Retry-After: 1`, burst 2).
    pub rate_limit: Option<u32>,
    /// `SimOptions::unordered_rendering`.
    pub unordered: bool,
    /// `SimOptions::signed_recording_links`.
    pub signed_links: bool,
    /// `SimOptions::document_lag`.
    pub document_lag: Duration,
    /// The loopback port `run` receives webhooks on: new encounters then carry a transcript
    /// still processing, finalized [`TRANSCRIBE_TIME`] later and announced by a signed webhook.
    pub webhook_port: Option<u16>,
    /// `SimOptions::organization_id`.
    pub organization_id: String,
}

/// How long a new encounter's transcript stays processing when webhooks announce it.
pub const TRANSCRIBE_TIME: Duration = Duration::from_secs(20);

/// The running simulator and the files written for it.
pub struct Simulation {
    pub sim: Simulator,
    pub base_url: String,
    pub key_file: PathBuf,
    pub config_file: PathBuf,
    pub database: PathBuf,
    /// The webhook signing secret's file, when webhooks are announced.
    pub webhook_secret_file: Option<PathBuf>,
}

/// Marks a configuration file as written by `simulate`, so a later `simulate` may replace it.
const CONFIG_MARKER: &str = "# Written by `charthero-sync simulate`";

/// Starts the simulator and writes `api-key` and `config.toml` into `opts.dir` (created if
/// needed, mode 0700). Refuses a directory whose `config.toml` it did not write.
pub async fn start(opts: &SimulateOptions) -> anyhow::Result<Simulation> {
    // Only its owner may read the key, the configuration and the synthetic "patients".
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&opts.dir)
        .with_context(|| format!("cannot create the directory {}", opts.dir.display()))?;
    let dir = std::fs::canonicalize(&opts.dir)
        .with_context(|| format!("cannot resolve the directory {}", opts.dir.display()))?;
    let config_file = dir.join("config.toml");
    if let Ok(existing) = std::fs::read_to_string(&config_file)
        && !existing.starts_with(CONFIG_MARKER)
    {
        bail!(
            "{} exists and was not written by `charthero-sync simulate`; choose another --dir",
            config_file.display()
        );
    }
    let now = OffsetDateTime::now_utc();
    let sim = Simulator::start(SimOptions {
        seed: opts.seed,
        encounters: opts.encounters,
        start: now - time::Duration::days(i64::from(opts.days)),
        end: now - time::Duration::minutes(5),
        unordered_rendering: opts.unordered,
        signed_recording_links: opts.signed_links,
        document_lag: opts.document_lag,
        organization_id: opts.organization_id.clone(),
        ..SimOptions::default()
    })
    .await
    .context("cannot start the built-in ChartHero simulator")?;
    sim.set_rate_limit(opts.rate_limit.map(|rps| charthero_sim::RateLimit {
        requests_per_second: f64::from(rps),
        burst: 2,
        enforce: true,
    }));
    let key_file = dir.join("api-key");
    write_private(&key_file, &format!("{}\n", sim.api_key()))?;
    let database = dir.join("warehouse.db");
    let base_url = sim.base_url();
    let mut config = config_text(
        &base_url,
        &key_file,
        &database,
        now - time::Duration::days(i64::from(opts.days) + 1),
    );
    let webhook_secret_file = match opts.webhook_port {
        None => None,
        Some(port) => {
            let path = dir.join("webhook-secret");
            let secret: String = std::iter::repeat_with(fastrand::alphanumeric).take(32).collect();
            let secret = format!("whsec_{secret}");
            write_private(&path, &format!("{secret}\n"))?;
            sim.set_webhook(Some(charthero_sim::webhook::WebhookTarget {
                url: format!("http://127.0.0.1:{port}{}", crate::webhook::PATH),
                secret,
            }));
            config.push_str(&format!(
                "\n[webhook]\n\
                 # The simulator announces each new encounter's transcript here when it is ready.\n\
                 listen = \"127.0.0.1:{port}\"\n\
                 secret_file = {}\n",
                toml_string(&path)
            ));
            Some(path)
        }
    };
    write_private(&config_file, &config)?;
    Ok(Simulation {
        sim,
        base_url,
        key_file,
        config_file,
        database,
        webhook_secret_file,
    })
}

/// Adds a new encounter (created now, with a finalized transcript and a note) every `every`
/// until `stop`; with `announce` (webhooks), its transcript is processing at first and finalized
/// [`TRANSCRIBE_TIME`] later, which the simulator announces to the receiver.
pub async fn keep_adding(sim: &Simulator, every: Duration, announce: bool, stop: &CancellationToken) {
    if every.is_zero() {
        stop.cancelled().await;
        return;
    }
    let mut tick = tokio::time::interval(every);
    tick.tick().await;
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {
                if !announce {
                    let id = sim.insert(NewEncounter {
                        docs: vec![DocKind::AmbientFinal, DocKind::Note],
                        ..NewEncounter::at(OffsetDateTime::now_utc())
                    });
                    tracing::info!(encounter_id = %id, "simulator: new encounter");
                    continue;
                }
                let id = sim.insert(NewEncounter {
                    docs: vec![DocKind::Ambient, DocKind::Note],
                    ..NewEncounter::at(OffsetDateTime::now_utc())
                });
                tracing::info!(encounter_id = %id, "simulator: new encounter, its transcript processing");
                let sim = sim.clone();
                let stop = stop.clone();
                tokio::spawn(async move {
                    tokio::select! {
                        () = stop.cancelled() => {}
                        () = tokio::time::sleep(TRANSCRIBE_TIME) => {
                            let document = sim.encounter(&id).and_then(|e| {
                                e.documents
                                    .into_iter()
                                    .find(|d| d.schema_type == "ambient_transcript")
                                    .map(|d| d.document_id)
                            });
                            if let Some(document) = document {
                                sim.finalize_transcript(&id, &document);
                                tracing::info!(encounter_id = %id, document_id = %document, "simulator: transcript ready, announced by webhook");
                            }
                        }
                    }
                });
            }
        }
    }
}

/// Creates or replaces `path` with `text`, readable by its owner only.
fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    // An existing file keeps its mode on open: tighten it before the key goes in.
    file.set_permissions(std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("cannot restrict {}", path.display()))?;
    file.write_all(text.as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

/// A complete configuration for the simulator: every other key keeps its default.
fn toml_string(p: &Path) -> String {
    let text = p.display().to_string();
    format!("\"{}\"", text.replace('\\', "\\\\").replace('"', "\\\""))
}

fn config_text(base_url: &str, key_file: &Path, database: &Path, start_at: OffsetDateTime) -> String {
    format!(
        "{CONFIG_MARKER} for the simulator at {base_url}.\n\
         # It is replaced by the next `simulate` with this directory (the port changes each time).\n\
         \n\
         [api]\n\
         base_url = \"{base_url}\"\n\
         api_key_file = {key}\n\
         \n\
         [database]\n\
         path = {db}\n\
         \n\
         [sync]\n\
         # Every 30 seconds, so that `run` shows a few cycles quickly.\n\
         schedule = \"*/30 * * * * *\"\n\
         start_at = \"{start}\"\n\
         # The simulator shows new encounters at once; a real API needs the default 2m.\n\
         settle_lag = \"5s\"\n\
         \n\
         [limits]\n\
         # Far above what ChartHero grants: the simulator is local.\n\
         requests_per_second = 500.0\n\
         burst = 50\n\
         max_in_flight = 8\n",
        key = toml_string(key_file),
        db = toml_string(database),
        start = format_utc(start_at),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_written_configuration_is_valid_and_the_key_private() {
        let dir = tempfile::tempdir().unwrap();
        let opts = SimulateOptions {
            dir: dir.path().join("sim"),
            encounters: 10,
            days: 3,
            seed: 5,
            new_every: Duration::ZERO,
            rate_limit: None,
            unordered: false,
            signed_links: false,
            document_lag: Duration::ZERO,
            webhook_port: Some(18787),
            organization_id: "org_north".into(),
        };
        let s = start(&opts).await.unwrap();
        let config = crate::config::Config::load(&s.config_file).unwrap();
        assert!(
            matches!(&config.database.target, crate::config::DatabaseTarget::Sqlite { path } if *path == s.database)
        );
        assert_eq!(config.api.api_key_file.as_deref(), Some(s.key_file.as_path()));
        let mode = std::fs::metadata(&s.key_file).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let (key, _) = crate::config::load_api_key(&config.api).unwrap();
        assert_eq!(key.expose(), s.sim.api_key());
        assert_eq!(s.sim.organization_id(), "org_north");
        assert_eq!(config.webhook_listen, Some("127.0.0.1:18787".parse().unwrap()));
        let (secret, _) = crate::config::load_webhook_secret(&config.organizations[0]).unwrap();
        let file = s.webhook_secret_file.as_deref().unwrap();
        assert_eq!(
            std::fs::metadata(file).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert!(secret.expose().starts_with("whsec_"));
        s.sim.shutdown();
        // A second start replaces its own files; a foreign config.toml is refused.
        start(&opts).await.unwrap().sim.shutdown();
        std::fs::write(&s.config_file, "[api]\n").unwrap();
        let err = start(&opts).await.err().unwrap().to_string();
        assert!(err.contains("not written by `charthero-sync simulate`"), "{err}");
    }
}
