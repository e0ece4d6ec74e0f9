//! Shared test plumbing: a simulator on a random loopback port, a temporary warehouse, a config
//! pointing one at the other, and an entity-by-entity comparison of warehouse and simulator.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use charthero_sim::{SimOptions, Simulator};
use charthero_sync::config::{Config, RawConfig};
use charthero_sync::secret::ApiKey;
use charthero_sync::sync::{BackfillRange, CyclePlan, CycleReport};
use charthero_sync::timefmt::{format_stored, format_utc};
use time::OffsetDateTime;

/// A running simulator and a temporary directory holding the warehouse.
pub struct TestEnv {
    pub sim: Simulator,
    pub dir: tempfile::TempDir,
}

impl TestEnv {
    pub async fn start(opts: SimOptions) -> TestEnv {
        let sim = Simulator::start(opts).await.expect("simulator starts");
        TestEnv {
            sim,
            dir: tempfile::tempdir().expect("temp dir"),
        }
    }

    /// `encounters` over the 60 days before now, with a given seed.
    pub async fn with_encounters(seed: u64, encounters: usize) -> TestEnv {
        TestEnv::start(sim_options(seed, encounters)).await
    }

    pub fn db_path(&self) -> PathBuf {
        self.dir.path().join("warehouse.db")
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
        raw.database.path = Some(self.db_path());
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

    /// One cycle of `plan` against this simulator; a failure panics with its whole chain.
    pub async fn sync(&self, config: &Config, plan: CyclePlan) -> CycleReport {
        charthero_sync::sync_once(
            config,
            &self.key(),
            "test",
            plan,
            &tokio_util::sync::CancellationToken::new(),
        )
        .await
        .unwrap_or_else(|e| panic!("the cycle failed: {e:#}"))
    }

    /// A reconcile of everything from `sync.start_at` to now, after which the warehouse must
    /// equal the simulator entity by entity.
    pub async fn reconcile_and_compare(&self, config: &Config) {
        let range = BackfillRange {
            start: config.sync.start_at,
            end: OffsetDateTime::now_utc(),
        };
        self.sync(config, CyclePlan::full(Some(range), false)).await;
        compare(&self.sim, &self.db_path()).assert_empty();
    }

    /// Writes the config as TOML into the temp dir, for tests that run the binary.
    pub fn write_config_file(&self, extra: &str) -> PathBuf {
        let path = self.dir.path().join("config.toml");
        let text = format!(
            "[api]\nbase_url = \"{}\"\napi_key_file = \"{}\"\n\n[database]\npath = \"{}\"\n\n\
             [sync]\nstart_at = \"{}\"\nsettle_lag = \"0s\"\n\n[limits]\nrequests_per_second = 2000.0\nburst = 100\n\
             max_in_flight = 8\n{extra}",
            self.sim.base_url(),
            self.dir.path().join("api-key").display(),
            self.db_path().display(),
            format_utc(OffsetDateTime::now_utc() - time::Duration::days(61)),
        );
        std::fs::write(&path, text).unwrap();
        path
    }

    /// Writes the simulator's key into `api-key` with mode 0600.
    pub fn write_key_file(&self, key: &str) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let path = self.dir.path().join("api-key");
        std::fs::write(&path, key).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        path
    }
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
pub fn compare(sim: &Simulator, db: &Path) -> Diff {
    compare_where(sim, db, None)
}

/// [`compare`] for one organization of a host: the warehouse's encounters of the simulator's
/// `organization_id` against that organization's data set (another organization's rows are
/// neither missing nor ghosts here).
pub fn compare_organization(sim: &Simulator, db: &Path) -> Diff {
    compare_where(sim, db, Some(&sim.organization_id()))
}

fn compare_where(sim: &Simulator, db: &Path, organization_id: Option<&str>) -> Diff {
    let conn = reader(db);
    let mut docs: BTreeMap<String, Vec<DocRow>> = BTreeMap::new();
    let mut stmt = conn
        .prepare(
            "SELECT encounter_id, document_id, schema_type, title, status, workflow_variant,
                    audio_duration_seconds
             FROM documents WHERE removed_at IS NULL ORDER BY encounter_id, position",
        )
        .unwrap();
    let rows = stmt
        .query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                (r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?, r.get(6)?),
            ))
        })
        .unwrap();
    for row in rows {
        let (enc, doc) = row.unwrap();
        docs.entry(enc).or_default().push(doc);
    }
    let mut stmt = conn
        .prepare(
            "SELECT e.encounter_id, e.organization_id, e.encounter_type, e.status, e.created_at,
                    e.updated_at, e.date_of_service, p.patient_id, p.first_name, p.last_name,
                    p.date_of_birth
             FROM encounters e LEFT JOIN patients p USING (patient_id)
             WHERE e.removed_at IS NULL AND (?1 IS NULL OR e.organization_id = ?1)",
        )
        .unwrap();
    let mut stored: BTreeMap<String, Row> = stmt
        .query_map([organization_id], |r| {
            let id: String = r.get(0)?;
            Ok((
                id,
                Row {
                    organization_id: r.get(1)?,
                    encounter_type: r.get(2)?,
                    status: r.get(3)?,
                    created_at: r.get(4)?,
                    updated_at: r.get(5)?,
                    date_of_service: r.get(6)?,
                    patient: (r.get(7)?, r.get(8)?, r.get(9)?, r.get(10)?),
                    documents: Vec::new(),
                },
            ))
        })
        .unwrap()
        .map(Result::unwrap)
        .collect();
    for (id, row) in stored.iter_mut() {
        row.documents = docs.remove(id).unwrap_or_default();
    }
    let mut diff = Diff::default();
    let mut upstream_ids = BTreeSet::new();
    for e in sim.snapshot() {
        upstream_ids.insert(e.encounter_id.clone());
        let expected = Row {
            organization_id: e.organization_id.clone(),
            encounter_type: Some(e.encounter_type.clone()),
            status: Some(e.status.clone()),
            created_at: format_stored(sim.rendered_created_at(e.created_at)),
            updated_at: format_stored(e.updated_at),
            date_of_service: Some(format_stored(e.date_of_service)),
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
pub fn count(db: &Path, table: &str) -> i64 {
    reader(db)
        .query_row(&format!("SELECT count(*) FROM {table}"), [], |r| r.get(0))
        .unwrap()
}

/// The `[content]` table that turns document and transcript fetching off, for config files.
pub const ENCOUNTERS_ONLY: &str = "\n[content]\ndetails = false\ntranscripts = false\n";

/// Compares note text and transcripts, byte for byte, for every live document upstream.
/// Returns the IDs of documents whose content differs or is missing.
pub fn compare_content(sim: &Simulator, db: &Path) -> Vec<String> {
    let conn = reader(db);
    let mut bad = Vec::new();
    for e in sim.snapshot() {
        for d in &e.documents {
            let ok = match d.schema_type.as_str() {
                "document" => {
                    let stored: Option<String> = conn
                        .query_row(
                            "SELECT content_text FROM documents WHERE document_id = ?1",
                            [&d.document_id],
                            |r| r.get(0),
                        )
                        .unwrap_or(None);
                    stored == sim.note_text(&e.encounter_id, &d.document_id)
                }
                "ambient_transcript" => {
                    let expected = sim.transcript(&e.encounter_id, &d.document_id);
                    let mut stmt = conn
                        .prepare(
                            "SELECT speaker, start_seconds, end_seconds, text FROM transcript_turns
                             WHERE document_id = ?1 ORDER BY turn_index",
                        )
                        .unwrap();
                    let turns: Vec<(Option<String>, f64, f64, String)> = stmt
                        .query_map([&d.document_id], |r| {
                            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
                        })
                        .unwrap()
                        .map(Result::unwrap)
                        .collect();
                    match expected {
                        Some(t) => {
                            let want: Vec<_> = t
                                .turns
                                .into_iter()
                                .map(|t| (Some(t.speaker), t.start, t.end, t.text))
                                .collect();
                            turns == want
                        }
                        None => turns.is_empty(),
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
pub fn charthero_sync() -> std::process::Command {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_charthero-sync"));
    cmd.env_remove("CHARTHERO_API_KEY")
        .env_remove("CREDENTIALS_DIRECTORY")
        .env_remove("CHARTHERO_SYNC_CONFIG")
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
