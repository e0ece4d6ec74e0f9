//! Configuration: TOML text → [`RawConfig`] (serde, every default in one place, unknown keys
//! rejected) → validated [`Config`] of parsed types, the warehouse a [`DatabaseTarget`] (a SQLite
//! file or a PostgreSQL server). Also resolves the secrets from their three sources each: the API
//! keys and the database password. This module never opens the database or the network, and its
//! errors never quote a secret: no TOML source line, no string value serde would quote, no
//! `ch_sk_…` key, no secret's text.

use std::fmt;
use std::net::IpAddr;
use std::num::{NonZeroU32, NonZeroUsize};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::Deserialize;
use time::OffsetDateTime;
use url::Url;

use crate::secret::{ApiKey, DatabasePasswordKind, Secret, SecretKind, SecretProblem, WebhookSecret};
use crate::timefmt;

/// Where the daemon looks for its configuration when neither `--config` nor
/// `CHARTHERO_SYNC_CONFIG` says otherwise.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/charthero-sync/config.toml";

/// The environment variable that carries the API key when no key file is configured.
pub const API_KEY_ENV: &str = "CHARTHERO_API_KEY";

/// File name systemd's `LoadCredential=` places under `$CREDENTIALS_DIRECTORY`.
pub const CREDENTIAL_NAME: &str = "charthero-api-key";

/// The environment variable that carries the PostgreSQL password when no password file is
/// configured.
pub const DATABASE_PASSWORD_ENV: &str = "CHARTHERO_DATABASE_PASSWORD";

/// The database password's file name under `$CREDENTIALS_DIRECTORY`.
pub const DATABASE_PASSWORD_CREDENTIAL: &str = "charthero-database-password";

/// The environment variable that carries the webhook signing secret when no secret file is
/// configured (`CHARTHERO_WEBHOOK_SECRET_<NAME>` for an organization of `[[organizations]]`).
pub const WEBHOOK_SECRET_ENV: &str = "CHARTHERO_WEBHOOK_SECRET";

/// The webhook signing secret's file name under `$CREDENTIALS_DIRECTORY` (`….<name>` for an
/// organization of `[[organizations]]`).
pub const WEBHOOK_SECRET_CREDENTIAL: &str = "charthero-webhook-secret";

/// The PostgreSQL schema the warehouse lives in unless `database.schema` says otherwise.
pub const DEFAULT_SCHEMA: &str = "charthero";

/// How long connecting to PostgreSQL may take unless the URL's `connect_timeout` says otherwise.
pub const DEFAULT_PG_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A configuration problem, always naming the key (or file) at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The OS error is the `source`, printed once by the `{:#}` chain, not also in this message.
    #[error("cannot read config file {path}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config file {path} is not valid: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid value for `{key}`: {message}")]
    Invalid { key: &'static str, message: String },
    /// A key of one `[[organizations]]` entry: `key` is `organizations.<name>.<key>`.
    #[error("invalid value for `{key}`: {message}")]
    InOrganization { key: String, message: String },
    #[error("{0}")]
    ApiKey(String),
    /// The database password's file is unsafe or unreadable, or its variable is empty.
    #[error("{0}")]
    DatabasePassword(String),
    /// An organization's webhook signing secret is missing, unsafe or unreadable.
    #[error("{0}")]
    WebhookSecret(String),
}

fn invalid(key: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        message: redact_keys(&message.into()),
    }
}

/// The prefix of every ChartHero API key.
const API_KEY_PREFIX: &str = "ch_sk_";

/// `text` with every API key in it (a `ch_sk_…` word) cut to its prefix: messages quote some
/// values to help the operator (`"5 parsecs" is not a duration`), and a key pasted into the
/// wrong key must not reach the journal that way.
fn redact_keys(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    // In any case (`CH_SK_…` too); ASCII lowercasing keeps every byte offset.
    while let Some(at) = rest.to_ascii_lowercase().find(API_KEY_PREFIX) {
        let after = &rest[at + API_KEY_PREFIX.len()..];
        let end = after
            .find(|c: char| c.is_whitespace() || matches!(c, '"' | '`' | '\'' | ',' | ')'))
            .unwrap_or(after.len());
        out.push_str(&rest[..at]);
        out.push_str(API_KEY_PREFIX);
        out.push_str("<redacted>");
        rest = &after[end..];
    }
    out.push_str(rest);
    out
}

/// A secret file key (`api.api_key_file`, `database.password_file`) that holds the secret
/// itself, as happens when a key is pasted into the wrong line: refused without quoting it. A
/// key is recognised by its prefix anywhere in the value, in any case (` ch_sk_…`, `Bearer
/// ch_sk_…`, `CH_SK_…`, a path ending in one: every such value would otherwise be printed in the
/// list of places looked in); a password has no shape to recognise, so only the API key's is
/// caught here.
/// `env` and `credential` name the secret's other sources, which the refusal suggests.
fn refuse_pasted_key(
    key: &'static str,
    path: Option<&Path>,
    env: &str,
    credential: &str,
) -> Result<(), ConfigError> {
    let pasted = path.is_some_and(|p| {
        p.as_os_str()
            .to_string_lossy()
            .to_ascii_lowercase()
            .contains(API_KEY_PREFIX)
    });
    if pasted {
        return Err(ConfigError::Invalid {
            key,
            message: format!(
                "holds what looks like the API key itself (it contains {API_KEY_PREFIX}), not the \
                 path of a file; write the key into a file (chmod 600) and give that file's path here, \
                 or use the environment variable {env} or $CREDENTIALS_DIRECTORY/{credential}"
            ),
        });
    }
    Ok(())
}

/// The environment variable and the credential an organization's key may come from:
/// `CHARTHERO_API_KEY_<NAME>` (upper-cased, `-` becomes `_`) and `charthero-api-key.<name>`.
fn organization_key_names(name: &str) -> (String, String) {
    organization_secret_names(name, API_KEY_ENV, CREDENTIAL_NAME)
}

/// A secret's environment variable and credential for one organization of `[[organizations]]`:
/// `<ENV>_<NAME>` (upper-cased, `-` becomes `_`) and `<credential>.<name>`.
fn organization_secret_names(name: &str, env: &str, credential: &str) -> (String, String) {
    (
        format!("{env}_{}", name.to_ascii_uppercase().replace('-', "_")),
        format!("{credential}.{name}"),
    )
}

/// The TOML document as written. Defaults live in the `Default` impls below and nowhere else.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawConfig {
    pub api: RawApi,
    pub database: RawDatabase,
    pub sync: RawSync,
    pub limits: RawLimits,
    pub content: RawContent,
    pub audio: RawAudio,
    pub metrics: RawMetrics,
    pub privacy: RawPrivacy,
    pub webhook: RawWebhook,
    /// Several organizations, each with its own key; empty: the `[api]` key is the one
    /// organization `default`.
    pub organizations: Vec<RawOrganization>,
}

/// One `[[organizations]]` entry as written. Absent keys take the value of `[api]`, `[sync]`
/// or `[limits]` (the budget of a key defaults to the whole process's ceiling).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawOrganization {
    pub name: String,
    pub organization_id: Option<String>,
    pub api_key_file: Option<PathBuf>,
    #[serde(deserialize_with = "some_instant_text")]
    pub start_at: Option<String>,
    pub base_url: Option<String>,
    pub requests_per_second: Option<f64>,
    pub burst: Option<i64>,
    pub max_in_flight: Option<i64>,
    pub webhook_secret_file: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawPrivacy {
    pub patient_names: bool,
    pub date_of_birth: String,
    pub note_text: bool,
    pub transcript_text: bool,
    pub retention: String,
}

impl Default for RawPrivacy {
    fn default() -> Self {
        RawPrivacy {
            patient_names: true,
            date_of_birth: "full".into(),
            note_text: true,
            transcript_text: true,
            retention: String::new(),
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawMetrics {
    /// Empty: no endpoint.
    pub listen: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawWebhook {
    /// Empty: no receiver.
    pub listen: String,
    /// The signing secret's file of the one organization of a configuration without
    /// `[[organizations]]` (each of those has `webhook_secret_file`).
    pub secret_file: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawContent {
    pub details: bool,
    pub transcripts: bool,
}

impl Default for RawContent {
    fn default() -> Self {
        RawContent {
            details: true,
            transcripts: true,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawApi {
    pub base_url: String,
    pub api_key_file: Option<PathBuf>,
    pub connect_timeout: String,
    pub read_timeout: String,
    pub request_timeout: String,
    pub max_response_bytes: i64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawDatabase {
    /// A SQLite file; absent with `url` unset: the default file.
    pub path: Option<PathBuf>,
    /// A PostgreSQL connection string (`postgresql://…` or libpq `key=value`), instead of `path`.
    pub url: String,
    /// The PostgreSQL schema; absent: [`DEFAULT_SCHEMA`].
    pub schema: Option<String>,
    pub password_file: Option<PathBuf>,
    /// A PEM bundle of the CAs a PostgreSQL server's certificate may chain to, besides the
    /// public roots.
    pub ca_file: Option<PathBuf>,
    pub busy_timeout: String,
    pub wal_size_limit: i64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawSync {
    pub schedule: String,
    /// Quoted or a TOML datetime: see [`instant_text`].
    #[serde(deserialize_with = "instant_text")]
    pub start_at: String,
    pub page_size: i64,
    pub settle_lag: String,
    pub overlap: String,
    pub revisit_recent: String,
    pub revisit_deep: String,
    pub revisit_deep_every: String,
    pub audit_every: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawLimits {
    pub requests_per_second: f64,
    pub burst: i64,
    pub max_in_flight: i64,
    pub max_attempts: i64,
    pub retries_per_cycle: i64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawAudio {
    pub enabled: bool,
    pub directory: PathBuf,
    pub max_bytes: i64,
}

impl Default for RawAudio {
    fn default() -> Self {
        RawAudio {
            enabled: false,
            directory: PathBuf::from("/var/lib/charthero-sync/audio"),
            max_bytes: 1024 * 1024 * 1024,
        }
    }
}

impl Default for RawApi {
    fn default() -> Self {
        RawApi {
            base_url: "https://api.example.test".into(),
            api_key_file: Some(PathBuf::from("/etc/charthero-sync/api-key")),
            connect_timeout: "10s".into(),
            read_timeout: "30s".into(),
            request_timeout: "120s".into(),
            // A 2 MB transcript is the largest body seen; 32 MiB leaves room without letting a
            // misbehaving upstream exhaust memory.
            max_response_bytes: 32 * 1024 * 1024,
        }
    }
}

impl Default for RawDatabase {
    fn default() -> Self {
        RawDatabase {
            path: None,
            url: String::new(),
            schema: None,
            password_file: None,
            ca_file: None,
            busy_timeout: "5s".into(),
            // Long-lived readers can hold the WAL open; after each checkpoint it is cut back to
            // this size.
            wal_size_limit: 64 * 1024 * 1024,
        }
    }
}

impl Default for RawSync {
    fn default() -> Self {
        RawSync {
            schedule: "0 */5 * * * *".into(),
            start_at: "2026-01-01T00:00:00Z".into(),
            page_size: 100,
            // Records become visible a little after their created_at; windows never reach
            // closer to now than this, so the live watermark only passes settled time.
            settle_lag: "2m".into(),
            // Each cycle re-reads this much before the watermark even when the revisit
            // horizon is turned off, so a record that became visible just after its window
            // was read is caught by the very next cycle.
            overlap: "10m".into(),
            // Encounters keep changing for a day or two (transcripts finalize, notes are
            // signed): every cycle re-lists this much recent history. Unchanged records cost
            // only their share of a list page.
            revisit_recent: "48h".into(),
            // Late edits and addenda: once per revisit_deep_every, re-list this much.
            revisit_deep: "30d".into(),
            revisit_deep_every: "24h".into(),
            // Backdated imports and removals weeks or months back: the daemon re-checks all
            // completed history by totals this often (one request per 500 stored encounters
            // when nothing changed). "0s" turns it off.
            audit_every: "24h".into(),
        }
    }
}

impl Default for RawLimits {
    fn default() -> Self {
        RawLimits {
            requests_per_second: 5.0,
            burst: 5,
            max_in_flight: 4,
            // Six attempts with doubling backoff span about half a minute of upstream trouble.
            max_attempts: 6,
            // A cycle that needs more retries than this is talking to a broken upstream; it
            // stops adding load and reports instead.
            retries_per_cycle: 500,
        }
    }
}

/// A timestamp key's text, written quoted (`"2026-01-01T00:00:00Z"`) or as a TOML datetime
/// (`2026-01-01T00:00:00Z`, which TOML hands over as a map of its own): both become the same
/// text, so validation parses them alike and a TOML local date or date-time (no offset) gets
/// the same "no timezone offset" message as its quoted form.
fn instant_text<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<String, D::Error> {
    struct InstantText;
    impl<'de> serde::de::Visitor<'de> for InstantText {
        type Value = String;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("an RFC 3339 timestamp with an offset, e.g. 2026-01-01T00:00:00Z")
        }

        fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<String, E> {
            Ok(text.to_owned())
        }

        fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<String, A::Error> {
            // A TOML datetime arrives as a map of one private field; any other map is a table.
            let datetime =
                toml::value::Datetime::deserialize(serde::de::value::MapAccessDeserializer::new(map))
                    .map_err(|_| serde::de::Error::invalid_type(serde::de::Unexpected::Map, &self))?;
            Ok(datetime.to_string())
        }
    }
    deserializer.deserialize_any(InstantText)
}

/// [`instant_text`] of an optional key (absent keys never reach it: the table's default does).
fn some_instant_text<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Option<String>, D::Error> {
    instant_text(deserializer).map(Some)
}

/// Validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub api: ApiConfig,
    pub database: DatabaseConfig,
    pub sync: SyncConfig,
    pub limits: Limits,
    pub content: ContentConfig,
    pub audio: AudioConfig,
    /// Where `run` serves Prometheus metrics (loopback only), if anywhere.
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Where `run` receives ChartHero's webhook deliveries, if anywhere (`[webhook] listen`).
    pub webhook_listen: Option<std::net::SocketAddr>,
    pub privacy: PrivacyConfig,
    /// Never empty: without `[[organizations]]`, the one organization `default` of `[api]`.
    pub organizations: Vec<Organization>,
}

/// The name of the one organization a configuration without `[[organizations]]` defines.
pub const DEFAULT_ORGANIZATION: &str = "default";

/// One clinic organization: its name, its key's sources and budget, where its history starts.
#[derive(Debug, Clone)]
pub struct Organization {
    /// `[a-z0-9_-]{1,32}`: in logs, status, metrics, the CLI and the warehouse's bookkeeping.
    pub name: String,
    /// ChartHero's id the key must read, when configured; a key listing another is refused.
    pub organization_id: Option<String>,
    pub base_url: Url,
    pub start_at: OffsetDateTime,
    pub key: KeySources,
    /// This key's own budget; `[limits]` caps the whole process on top of it.
    pub budget: Budget,
    /// Where the signing secret of this organization's webhook endpoint is looked for, in
    /// order (read only when `[webhook] listen` is set).
    pub webhook_secret: KeySources,
}

/// Where one organization's API key is looked for, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeySources {
    pub file: Option<PathBuf>,
    /// `CHARTHERO_API_KEY`, or `CHARTHERO_API_KEY_<NAME>` (upper-cased, `-` → `_`).
    pub env: String,
    /// Under `$CREDENTIALS_DIRECTORY`: `charthero-api-key`, or `charthero-api-key.<name>`.
    pub credential: String,
}

/// A rate and concurrency budget: of one key, or of the whole process (`[limits]`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Budget {
    pub requests_per_second: f64,
    pub burst: NonZeroU32,
    pub max_in_flight: NonZeroUsize,
}

impl Limits {
    /// The process-wide ceiling every request passes besides its key's budget.
    pub fn ceiling(&self) -> Budget {
        Budget {
            requests_per_second: self.requests_per_second,
            burst: self.burst,
            max_in_flight: self.max_in_flight,
        }
    }
}

impl Config {
    /// The organizations `--organization` names (all when `names` is empty), in configuration
    /// order; an unknown name is an error that lists the configured ones.
    pub fn select_organizations(&self, names: &[String]) -> Result<Vec<Organization>, ConfigError> {
        if names.is_empty() {
            return Ok(self.organizations.clone());
        }
        for n in names {
            if !self.organizations.iter().any(|o| &o.name == n) {
                let known: Vec<&str> = self.organizations.iter().map(|o| o.name.as_str()).collect();
                return Err(ConfigError::InOrganization {
                    key: "--organization".into(),
                    message: format!(
                        "no organization named {n:?} is configured (configured: {})",
                        known.join(", ")
                    ),
                });
            }
        }
        Ok(self
            .organizations
            .iter()
            .filter(|o| names.contains(&o.name))
            .cloned()
            .collect())
    }
}

/// How much of a patient's date of birth the warehouse keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BirthDate {
    Full,
    YearOnly,
    Omit,
}

/// Which PHI the partner decided to keep.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PrivacyConfig {
    pub patient_names: bool,
    pub date_of_birth: BirthDate,
    pub note_text: bool,
    pub transcript_text: bool,
    /// Encounters created longer ago than this are purged (and never synced).
    pub retention: Option<Duration>,
}

impl PrivacyConfig {
    /// A stable description, stored so that a change of policy is applied to existing rows once.
    pub fn fingerprint(&self) -> String {
        format!(
            "names={} dob={:?} notes={} transcripts={}",
            self.patient_names, self.date_of_birth, self.note_text, self.transcript_text
        )
    }
}

/// Which per-document routes to fetch beyond the encounter list.
#[derive(Debug, Clone, Copy)]
pub struct ContentConfig {
    /// Document detail: note text and ambient metadata.
    pub details: bool,
    /// Finalized transcripts (the list's document summary says when one is final).
    pub transcripts: bool,
}

#[derive(Debug, Clone)]
pub struct AudioConfig {
    pub enabled: bool,
    pub directory: PathBuf,
    pub max_bytes: u64,
}

#[derive(Debug, Clone)]
pub struct ApiConfig {
    /// The host root as configured, without a trailing slash; the client appends `/external/v1`.
    pub base_url: Url,
    pub api_key_file: Option<PathBuf>,
    pub connect_timeout: Duration,
    pub read_timeout: Duration,
    pub request_timeout: Duration,
    pub max_response_bytes: usize,
}

/// Where the SQLite warehouse lives unless `database.path` or `database.url` says otherwise.
pub const DEFAULT_DATABASE_PATH: &str = "/var/lib/charthero-sync/warehouse.db";

#[derive(Debug, Clone)]
pub struct DatabaseConfig {
    pub target: DatabaseTarget,
    /// SQLite only: how long a statement waits for another connection's lock.
    pub busy_timeout: Duration,
    /// SQLite only: the size the WAL is cut back to after a checkpoint.
    pub wal_size_limit: u64,
}

impl DatabaseConfig {
    /// The SQLite file, when the warehouse is one.
    pub fn sqlite_path(&self) -> Option<&Path> {
        match &self.target {
            DatabaseTarget::Sqlite { path } => Some(path),
            DatabaseTarget::Postgres(_) => None,
        }
    }

    /// A SQLite warehouse at `path` with the default settings (the demo, tests).
    pub fn sqlite(path: PathBuf) -> DatabaseConfig {
        validate_database(RawDatabase {
            path: Some(path),
            ..RawDatabase::default()
        })
        .expect("the default database settings are valid")
    }
}

/// The warehouse: a SQLite file or a schema on a PostgreSQL server.
#[derive(Debug, Clone)]
pub enum DatabaseTarget {
    Sqlite {
        path: PathBuf,
    },
    /// Boxed: the parsed connection settings are large, and a target is passed around often.
    Postgres(Box<PostgresConfig>),
}

/// The file path, or `postgresql://user@host:port/db (schema charthero)`: what messages,
/// errors and `check` name the warehouse by. Never a password.
impl fmt::Display for DatabaseTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DatabaseTarget::Sqlite { path } => write!(f, "{}", path.display()),
            DatabaseTarget::Postgres(pg) => write!(f, "{pg}"),
        }
    }
}

/// A PostgreSQL warehouse: `database.url` parsed (never carrying a password), its schema, and
/// where its password and private CA come from.
#[derive(Debug, Clone)]
pub struct PostgresConfig {
    /// Hosts, port, user, database, `sslmode`, `connect_timeout` (default
    /// [`DEFAULT_PG_CONNECT_TIMEOUT`]); no password.
    pub connection: postgres::Config,
    /// `[a-z_][a-z0-9_]{0,62}`, not `pg_*`: every statement runs with it as `search_path`.
    pub schema: String,
    /// `database.password_file`, `CHARTHERO_DATABASE_PASSWORD`, the systemd credential.
    pub password: KeySources,
    pub ca_file: Option<PathBuf>,
}

impl PostgresConfig {
    /// Whether every host is a unix socket or a loopback address: only then may the connection
    /// go without TLS (verified TLS is required to any other host).
    pub fn is_local(&self) -> bool {
        let c = &self.connection;
        c.get_hosts().iter().all(|h| match h {
            postgres::config::Host::Tcp(name) => is_loopback_name(name),
            postgres::config::Host::Unix(_) => true,
        }) && c.get_hostaddrs().iter().all(IpAddr::is_loopback)
    }
}

impl fmt::Display for PostgresConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = &self.connection;
        let user = c.get_user().unwrap_or_default();
        let hosts: Vec<String> = c
            .get_hosts()
            .iter()
            .enumerate()
            .map(|(i, h)| {
                let host = match h {
                    postgres::config::Host::Tcp(name) if name.contains(':') => format!("[{name}]"),
                    postgres::config::Host::Tcp(name) => name.clone(),
                    postgres::config::Host::Unix(dir) => dir.display().to_string(),
                };
                let ports = c.get_ports();
                let port = ports.get(i).or(ports.first()).copied().unwrap_or(5432);
                format!("{host}:{port}")
            })
            .collect();
        let db = c.get_dbname().unwrap_or(user);
        write!(
            f,
            "postgresql://{user}@{}/{db} (schema {})",
            hosts.join(","),
            self.schema
        )
    }
}

#[derive(Debug, Clone)]
pub struct SyncConfig {
    pub schedule: cron::Schedule,
    pub start_at: OffsetDateTime,
    pub page_size: NonZeroU32,
    pub settle_lag: Duration,
    pub overlap: Duration,
    pub revisit_recent: Duration,
    /// Zero disables the deep revisit.
    pub revisit_deep: Duration,
    pub revisit_deep_every: Duration,
    /// How often the daemon audits completed history; zero disables it.
    pub audit_every: Duration,
}

#[derive(Debug, Clone)]
pub struct Limits {
    pub requests_per_second: f64,
    pub burst: NonZeroU32,
    pub max_in_flight: NonZeroUsize,
    pub max_attempts: NonZeroU32,
    pub retries_per_cycle: u32,
}

impl Config {
    /// Reads and validates the file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::parse(&text, path)
    }

    /// Parses and validates TOML text; `origin` only names the source in errors.
    pub fn parse(text: &str, origin: &Path) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: origin.to_owned(),
            message: describe_toml_error(text, &e),
        })?;
        raw.validate()
    }
}

/// A TOML error as `line 3, column 1: <the parser's message>`, never with the source line the
/// parser's `Display` would quote: that line may be `api_key = "ch_sk_…"`, and this message goes
/// to the journal. String values serde quotes (`invalid type: string "…"`) are left out too, and
/// an unknown key that looks like a secret gets told where secrets go instead.
fn describe_toml_error(text: &str, e: &toml::de::Error) -> String {
    let mut message = redact_keys(&redact_quoted_strings(e.message().trim_end()));
    let at = e.span().map(|span| line_and_column(text, span.start));
    if let Some(name) = unknown_field(e.message())
        && looks_like_a_secret_name(name)
    {
        message.push_str("; ");
        message.push_str(&secret_sources_hint(
            name,
            text,
            at.map_or(usize::MAX, |(line, _)| line),
        ));
    }
    match at {
        Some((line, column)) => match key_at_line(text, line) {
            Some(key) => format!("line {line}, column {column} (at `{key}`): {message}"),
            None => format!("line {line}, column {column}: {message}"),
        },
        None => message,
    }
}

/// The dotted name of the key the 1-based `line` sets (`sync.schedule`), prefixed by the table
/// it is in, or the table a header line opens; `None` when the line holds neither, or its name
/// looks like a pasted key (a name is never a secret, a value may be, and only names are shown).
fn key_at_line(text: &str, line: usize) -> Option<String> {
    let is_name = |name: &str| {
        !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
            && !name.to_ascii_lowercase().contains("ch_sk_")
    };
    let header = |l: &str| {
        let l = l.trim();
        l.strip_prefix("[[")
            .and_then(|r| r.strip_suffix("]]"))
            .or_else(|| l.strip_prefix('[').and_then(|r| r.strip_suffix(']')))
            .map(str::trim)
            .map(str::to_owned)
    };
    let lines: Vec<&str> = text.lines().collect();
    let this = lines.get(line.checked_sub(1)?)?;
    if let Some(table) = header(this) {
        return is_name(&table).then_some(table);
    }
    let key = this.split_once('=')?.0.trim();
    if !is_name(key) {
        return None;
    }
    let table = lines[..line - 1].iter().rev().find_map(|l| header(l));
    match table {
        Some(table) if is_name(&table) => Some(format!("{table}.{key}")),
        Some(_) => None,
        None => Some(key.to_owned()),
    }
}

/// The 1-based line and column (in characters) of byte `offset` of `text`.
fn line_and_column(text: &str, offset: usize) -> (usize, usize) {
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().unwrap_or("").chars().count() + 1;
    (line, column)
}

/// Serde's `string "…"` (its description of an unexpected string value) without the value:
/// the value may be a secret typed into the wrong key.
fn redact_quoted_strings(message: &str) -> String {
    const QUOTED: &str = "string \"";
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    while let Some(at) = rest.find(QUOTED) {
        out.push_str(&rest[..at]);
        out.push_str("a string (value not shown)");
        // The value is written with `{:?}`: it ends at the first `"` not escaped by a `\`.
        let value = &rest[at + QUOTED.len()..];
        let mut escaped = false;
        let end = value
            .char_indices()
            .find(|&(_, c)| {
                let closes = c == '"' && !escaped;
                escaped = c == '\\' && !escaped;
                closes
            })
            .map_or(value.len(), |(i, _)| i + 1);
        rest = &value[end..];
    }
    out.push_str(rest);
    out
}

/// The key of serde's "unknown field `name`, expected …".
fn unknown_field(message: &str) -> Option<&str> {
    let rest = message.strip_prefix("unknown field `")?;
    rest.split_once('`').map(|(name, _)| name)
}

/// Whether an unknown key's name says it holds a secret (`api_key`, `token`, `password`,
/// `webhook_secret`…, or is a key itself); `…_file` keys hold paths and are not meant.
fn looks_like_a_secret_name(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    let secret_word = ["key", "passw", "secret", "token", "credential", "bearer", "auth"]
        .iter()
        .any(|word| name.contains(word));
    name.starts_with(API_KEY_PREFIX) || (secret_word && !name.ends_with("_file"))
}

/// "Secrets are never written here" and where this one goes: the database password's sources
/// for a password or anything in `[database]`, an organization's own sources inside
/// `[[organizations]]`, else the API key's.
fn secret_sources_hint(name: &str, text: &str, line: usize) -> String {
    let table = table_at_line(text, line);
    let never = "secrets are never written in the configuration file";
    if table.as_deref() == Some("database") || name.to_ascii_lowercase().contains("passw") {
        return format!(
            "{never}: put the database password in the file named by database.password_file \
             (chmod 600), the environment variable {DATABASE_PASSWORD_ENV} or \
             $CREDENTIALS_DIRECTORY/{DATABASE_PASSWORD_CREDENTIAL} (systemd LoadCredential=)"
        );
    }
    if table.as_deref() == Some("organizations") {
        let (env, credential) = match organization_name_at_line(text, line) {
            Some(org) => organization_key_names(&org),
            None => (
                format!("{API_KEY_ENV}_<NAME>"),
                format!("{CREDENTIAL_NAME}.<name>"),
            ),
        };
        return format!(
            "{never}: put this organization's API key in the file named by its api_key_file \
             (chmod 600), the environment variable {env} or $CREDENTIALS_DIRECTORY/{credential} \
             (systemd LoadCredential=)"
        );
    }
    format!(
        "{never}: put the API key in the file named by api.api_key_file (chmod 600), the \
         environment variable {API_KEY_ENV} or $CREDENTIALS_DIRECTORY/{CREDENTIAL_NAME} \
         (systemd LoadCredential=)"
    )
}

/// The first part of the name of the table header (`[database]`, `[[organizations]]`) last
/// opened at or before `line` (1-based), if any.
fn table_at_line(text: &str, line: usize) -> Option<String> {
    text.lines()
        .take(line)
        .filter_map(table_header)
        .last()
        .map(|header| {
            header
                .split('.')
                .next()
                .unwrap_or("")
                .trim()
                .trim_matches('"')
                .to_owned()
        })
}

/// `database` of a line `[database]`, `organizations` of `[[organizations]]`.
fn table_header(line: &str) -> Option<&str> {
    let line = line.trim_start();
    let inner = line.strip_prefix("[[").or_else(|| line.strip_prefix('['))?;
    Some(inner.split(']').next().unwrap_or("").trim())
}

/// The `name` of the `[[organizations]]` entry that `line` (1-based) lies in, when the document
/// parses as TOML (it does: this is a deserialization error, not a syntax error) and the name is
/// a valid one (an invalid one is not repeated here).
fn organization_name_at_line(text: &str, line: usize) -> Option<String> {
    let index = text
        .lines()
        .take(line)
        .filter(|l| l.trim_start().starts_with("[[") && table_header(l) == Some("organizations"))
        .count()
        .checked_sub(1)?;
    let table: toml::Table = text.parse().ok()?;
    let name = table.get("organizations")?.get(index)?.get("name")?.as_str()?;
    is_organization_name(name).then(|| name.to_owned())
}

/// `[a-z0-9_-]{1,32}`.
fn is_organization_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 32
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

/// The range every numeric key must fall in. Values outside are configuration errors that name
/// the key, never a panic, an overflow or a limiter that waits for centuries later on. The bounds
/// are generous: anything outside them is a typo or a misunderstanding, not a use case.
pub mod bounds {
    use std::time::Duration;

    const MINUTE: u64 = 60;
    const HOUR: u64 = 60 * MINUTE;
    const DAY: u64 = 24 * HOUR;

    /// One request every 100 s at the slowest (slower would make a cycle last days); a million
    /// per second at the fastest: in effect no limit (the benchmarks measure ingest with it),
    /// still a period of 1 µs that the limiter can pace.
    pub const REQUESTS_PER_SECOND: (f64, f64) = (0.01, 1_000_000.0);
    pub const BURST: (i64, i64) = (1, 1_000);
    pub const MAX_IN_FLIGHT: (i64, i64) = (1, 64);
    pub const MAX_ATTEMPTS: (i64, i64) = (1, 20);
    pub const RETRIES_PER_CYCLE: (i64, i64) = (0, 1_000_000);
    /// The API's own `limit` range.
    pub const PAGE_SIZE: (i64, i64) = (1, 100);
    pub const MAX_RESPONSE_BYTES: (i64, i64) = (64 * 1024, 1 << 30);
    pub const WAL_SIZE_LIMIT: (i64, i64) = (0, 1 << 40);
    pub const AUDIO_MAX_BYTES: (i64, i64) = (1, 1 << 36);

    pub const CONNECT_TIMEOUT: (Duration, Duration) =
        (Duration::from_millis(1), Duration::from_secs(10 * MINUTE));
    pub const READ_TIMEOUT: (Duration, Duration) = (Duration::from_millis(1), Duration::from_secs(HOUR));
    /// A recording download is one request: a day is enough for a gigabyte on a slow line.
    pub const REQUEST_TIMEOUT: (Duration, Duration) = (Duration::from_millis(1), Duration::from_secs(DAY));
    /// SQLite takes the busy timeout in milliseconds as a C int; an hour is far below that.
    pub const BUSY_TIMEOUT: (Duration, Duration) = (Duration::from_millis(1), Duration::from_secs(HOUR));
    pub const SETTLE_LAG: (Duration, Duration) = (Duration::ZERO, Duration::from_secs(7 * DAY));
    pub const OVERLAP: (Duration, Duration) = (Duration::ZERO, Duration::from_secs(365 * DAY));
    /// Ten years: every instant computed as `now - horizon` stays a valid timestamp.
    pub const HORIZON: (Duration, Duration) = (Duration::ZERO, Duration::from_secs(3_650 * DAY));
    pub const REVISIT_DEEP_EVERY: (Duration, Duration) =
        (Duration::from_secs(MINUTE), Duration::from_secs(3_650 * DAY));
    /// A retention (and `purge --older-than`) of a century at most keeps `now - retention` valid.
    pub const RETENTION: (Duration, Duration) = (Duration::from_secs(DAY), Duration::from_secs(36_500 * DAY));
}

/// `value` if it lies in `lo..=hi`, else an error naming `key` and the range.
fn int_in(key: &'static str, value: i64, (lo, hi): (i64, i64)) -> Result<i64, ConfigError> {
    if (lo..=hi).contains(&value) {
        Ok(value)
    } else {
        Err(invalid(
            key,
            format!("must be between {lo} and {hi} (got {value})"),
        ))
    }
}

/// An integer key converted to the type the program uses, after its range check.
fn int_as<T: TryFrom<i64>>(key: &'static str, value: i64, range: (i64, i64)) -> Result<T, ConfigError> {
    T::try_from(int_in(key, value, range)?)
        .map_err(|_| invalid(key, format!("{value} does not fit this platform")))
}

/// A duration key parsed and checked against its range.
fn duration_in(
    key: &'static str,
    text: &str,
    (lo, hi): (Duration, Duration),
) -> Result<Duration, ConfigError> {
    let d = parse_duration(key, text)?;
    if d < lo || d > hi {
        return Err(invalid(
            key,
            format!(
                "must be between {} and {} (got {:?})",
                format_duration(lo),
                format_duration(hi),
                text.trim()
            ),
        ));
    }
    Ok(d)
}

/// A duration in the config's own notation, in its largest exact unit: `0s`, `250ms`, `7d`.
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms == 0 {
        return "0s".to_owned();
    }
    if !ms.is_multiple_of(1000) {
        return format!("{ms}ms");
    }
    let s = ms / 1000;
    for (unit, secs) in [("d", 86_400), ("h", 3_600), ("m", 60)] {
        if s.is_multiple_of(secs) {
            return format!("{}{unit}", s / secs);
        }
    }
    format!("{s}s")
}

impl RawConfig {
    /// Turns the raw document into typed values, naming the key of the first problem found.
    pub fn validate(self) -> Result<Config, ConfigError> {
        refuse_pasted_key(
            "api.api_key_file",
            self.api.api_key_file.as_deref(),
            API_KEY_ENV,
            CREDENTIAL_NAME,
        )?;
        let api = ApiConfig {
            base_url: validate_base_url(&self.api.base_url)?,
            api_key_file: self.api.api_key_file.filter(|p| !p.as_os_str().is_empty()),
            connect_timeout: duration_in(
                "api.connect_timeout",
                &self.api.connect_timeout,
                bounds::CONNECT_TIMEOUT,
            )?,
            read_timeout: duration_in("api.read_timeout", &self.api.read_timeout, bounds::READ_TIMEOUT)?,
            request_timeout: duration_in(
                "api.request_timeout",
                &self.api.request_timeout,
                bounds::REQUEST_TIMEOUT,
            )?,
            max_response_bytes: int_as(
                "api.max_response_bytes",
                self.api.max_response_bytes,
                bounds::MAX_RESPONSE_BYTES,
            )?,
        };
        let database = validate_database(self.database)?;
        let sync = SyncConfig {
            schedule: validate_schedule(&self.sync.schedule, chrono::Utc::now())?,
            start_at: timefmt::parse_operator_instant(&self.sync.start_at)
                .map_err(|e| invalid("sync.start_at", e))?,
            page_size: NonZeroU32::new(int_as("sync.page_size", self.sync.page_size, bounds::PAGE_SIZE)?)
                .ok_or_else(|| invalid("sync.page_size", "must not be 0"))?,
            settle_lag: duration_in("sync.settle_lag", &self.sync.settle_lag, bounds::SETTLE_LAG)?,
            overlap: duration_in("sync.overlap", &self.sync.overlap, bounds::OVERLAP)?,
            revisit_recent: duration_in("sync.revisit_recent", &self.sync.revisit_recent, bounds::HORIZON)?,
            revisit_deep: duration_in("sync.revisit_deep", &self.sync.revisit_deep, bounds::HORIZON)?,
            revisit_deep_every: duration_in(
                "sync.revisit_deep_every",
                &self.sync.revisit_deep_every,
                bounds::REVISIT_DEEP_EVERY,
            )?,
            audit_every: duration_in("sync.audit_every", &self.sync.audit_every, bounds::HORIZON)?,
        };
        let rps = self.limits.requests_per_second;
        let (lo, hi) = bounds::REQUESTS_PER_SECOND;
        // `contains` is false for NaN, so NaN and the infinities are refused here too.
        if !(lo..=hi).contains(&rps) {
            return Err(invalid(
                "limits.requests_per_second",
                format!("must be between {lo} and {hi} (got {rps:?})"),
            ));
        }
        let nonzero_u32 =
            |key: &'static str, value: i64, range: (i64, i64)| -> Result<NonZeroU32, ConfigError> {
                NonZeroU32::new(int_as(key, value, range)?).ok_or_else(|| invalid(key, "must not be 0"))
            };
        let limits = Limits {
            requests_per_second: rps,
            burst: nonzero_u32("limits.burst", self.limits.burst, bounds::BURST)?,
            max_in_flight: NonZeroUsize::new(int_as(
                "limits.max_in_flight",
                self.limits.max_in_flight,
                bounds::MAX_IN_FLIGHT,
            )?)
            .ok_or_else(|| invalid("limits.max_in_flight", "must not be 0"))?,
            max_attempts: nonzero_u32(
                "limits.max_attempts",
                self.limits.max_attempts,
                bounds::MAX_ATTEMPTS,
            )?,
            retries_per_cycle: int_as(
                "limits.retries_per_cycle",
                self.limits.retries_per_cycle,
                bounds::RETRIES_PER_CYCLE,
            )?,
        };
        let content = ContentConfig {
            details: self.content.details,
            transcripts: self.content.transcripts,
        };
        if self.audio.enabled && self.audio.directory.as_os_str().is_empty() {
            return Err(invalid(
                "audio.directory",
                "must be set when audio.enabled = true",
            ));
        }
        let audio = AudioConfig {
            enabled: self.audio.enabled,
            directory: self.audio.directory,
            max_bytes: int_as("audio.max_bytes", self.audio.max_bytes, bounds::AUDIO_MAX_BYTES)?,
        };
        let privacy = PrivacyConfig {
            patient_names: self.privacy.patient_names,
            date_of_birth: match self.privacy.date_of_birth.as_str() {
                "full" => BirthDate::Full,
                "year" => BirthDate::YearOnly,
                "none" => BirthDate::Omit,
                other => {
                    return Err(invalid(
                        "privacy.date_of_birth",
                        format!("{other:?} is not one of \"full\", \"year\", \"none\""),
                    ));
                }
            },
            note_text: self.privacy.note_text,
            transcript_text: self.privacy.transcript_text,
            retention: match self.privacy.retention.trim() {
                "" => None,
                text => Some(duration_in("privacy.retention", text, bounds::RETENTION)?),
            },
        };
        let organizations =
            validate_organizations(self.organizations, self.webhook.secret_file, &api, &sync, &limits)?;
        Ok(Config {
            api,
            database,
            sync,
            limits,
            content,
            audio,
            privacy,
            organizations,
            metrics_listen: match self.metrics.listen.trim() {
                "" => None,
                text => Some(crate::metrics::parse_listen(text).map_err(|e| invalid("metrics.listen", e))?),
            },
            webhook_listen: match self.webhook.listen.trim() {
                "" => None,
                text => Some(text.parse().map_err(|_| {
                    invalid(
                        "webhook.listen",
                        format!("{text:?} is not an address like \"127.0.0.1:8787\""),
                    )
                })?),
            },
        })
    }
}

/// A schedule fires at least once a year at most this far apart; see [`validate_schedule`].
const SCHEDULE_MAX_GAP: chrono::TimeDelta = chrono::TimeDelta::days(366);

/// `sync.schedule`: a cron expression that fires within a year of `now`. One that never fires
/// (`0 0 0 31 2 *`, or a year field that is past) would leave `run` idle after its start-up cycle,
/// silently. One whose next fire is more than a year away (`0 0 0 29 2 *`, a future year) is
/// refused too: it lets the warehouse go stale for years and is a typo far more often than a
/// plan; yearly schedules (`0 0 0 1 1 *`) still pass.
fn validate_schedule(text: &str, now: chrono::DateTime<chrono::Utc>) -> Result<cron::Schedule, ConfigError> {
    let key = "sync.schedule";
    let schedule = cron::Schedule::from_str(text).map_err(|e| {
        invalid(
            key,
            format!(
                "{text:?} is not a cron expression with a seconds field first (e.g. \"0 */5 * * * *\"): {e}"
            ),
        )
    })?;
    match schedule.after(&now).next() {
        None => Err(invalid(
            key,
            format!(
                "{text:?} never fires (no date matches it from now on, e.g. 31 February or a past \
                 year), so `run` would never sync after its first cycle"
            ),
        )),
        Some(next) if next - now > SCHEDULE_MAX_GAP => Err(invalid(
            key,
            format!(
                "{text:?} next fires at {}, more than a year from now; a schedule must fire at least \
                 once a year",
                next.format("%Y-%m-%dT%H:%M:%SZ")
            ),
        )),
        Some(_) => Ok(schedule),
    }
}

/// `[database]`: a SQLite `path` (the default) or a PostgreSQL `url`, never both.
fn validate_database(raw: RawDatabase) -> Result<DatabaseConfig, ConfigError> {
    let busy_timeout = duration_in("database.busy_timeout", &raw.busy_timeout, bounds::BUSY_TIMEOUT)?;
    let wal_size_limit = int_as(
        "database.wal_size_limit",
        raw.wal_size_limit,
        bounds::WAL_SIZE_LIMIT,
    )?;
    let url = raw.url.trim();
    let target = if url.is_empty() {
        for (key, set) in [
            ("database.schema", raw.schema.is_some()),
            ("database.password_file", raw.password_file.is_some()),
            ("database.ca_file", raw.ca_file.is_some()),
        ] {
            if set {
                return Err(invalid(
                    key,
                    "applies only to a PostgreSQL warehouse (database.url); a SQLite warehouse has none",
                ));
            }
        }
        let path = raw.path.unwrap_or_else(|| PathBuf::from(DEFAULT_DATABASE_PATH));
        if path.as_os_str().is_empty() {
            return Err(invalid("database.path", "must not be empty"));
        }
        DatabaseTarget::Sqlite { path }
    } else {
        if raw.path.is_some() {
            return Err(invalid(
                "database.url",
                "database.path and database.url are mutually exclusive: set path for a SQLite \
                 warehouse or url for a PostgreSQL one, not both",
            ));
        }
        DatabaseTarget::Postgres(Box::new(validate_postgres(
            url,
            raw.schema,
            raw.password_file,
            raw.ca_file,
        )?))
    };
    Ok(DatabaseConfig {
        target,
        busy_timeout,
        wal_size_limit,
    })
}

/// `database.url` and the keys that go with it. No message quotes the URL: a password typed
/// into it by mistake must not end up in a log.
fn validate_postgres(
    url: &str,
    schema: Option<String>,
    password_file: Option<PathBuf>,
    ca_file: Option<PathBuf>,
) -> Result<PostgresConfig, ConfigError> {
    use postgres::config::SslMode;
    let key = "database.url";
    let is_url = url.starts_with("postgresql://") || url.starts_with("postgres://");
    if url.contains("://") && !is_url {
        return Err(invalid(
            key,
            "must be a postgresql:// or postgres:// URL, or a libpq key=value string",
        ));
    }
    // tokio-postgres's parse errors name the option at fault, never its value.
    let mut connection = postgres::Config::from_str(url)
        .map_err(|e| invalid(key, format!("is not a PostgreSQL connection string: {e}")))?;
    if connection.get_password().is_some() {
        return Err(invalid(
            key,
            "must not carry a password; put it in database.password_file, the environment \
             variable CHARTHERO_DATABASE_PASSWORD or the systemd credential charthero-database-password",
        ));
    }
    if connection.get_hosts().is_empty() {
        return Err(invalid(
            key,
            "names no host; e.g. postgresql://charthero@db.example.internal:5432/warehouse, or \
             host=/run/postgresql for the local socket",
        ));
    }
    if connection.get_user().is_none_or(str::is_empty) {
        return Err(invalid(
            key,
            "names no user; e.g. postgresql://charthero@db.example.internal:5432/warehouse",
        ));
    }
    if connection.get_connect_timeout().is_none() {
        connection.connect_timeout(DEFAULT_PG_CONNECT_TIMEOUT);
    }
    let schema = schema.unwrap_or_else(|| DEFAULT_SCHEMA.to_owned());
    let valid_schema = !schema.is_empty()
        && schema.len() <= 63
        && !schema.starts_with(|c: char| c.is_ascii_digit())
        && !schema.starts_with("pg_")
        && schema
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if !valid_schema {
        return Err(invalid(
            "database.schema",
            format!("{schema:?} must be 1 to 63 of a-z, 0-9 and _, not starting with a digit or pg_"),
        ));
    }
    refuse_pasted_key(
        "database.password_file",
        password_file.as_deref(),
        DATABASE_PASSWORD_ENV,
        DATABASE_PASSWORD_CREDENTIAL,
    )?;
    let pg = PostgresConfig {
        connection,
        schema,
        password: KeySources {
            file: password_file.filter(|p| !p.as_os_str().is_empty()),
            env: DATABASE_PASSWORD_ENV.to_owned(),
            credential: DATABASE_PASSWORD_CREDENTIAL.to_owned(),
        },
        ca_file: ca_file.filter(|p| !p.as_os_str().is_empty()),
    };
    if !pg.is_local() && pg.connection.get_ssl_mode() == SslMode::Disable {
        return Err(invalid(
            key,
            "sslmode=disable is refused for a host that is not loopback or a unix socket: the \
             password and patient data would cross the network in clear; use TLS (sslmode=require, \
             and database.ca_file for a private CA)",
        ));
    }
    Ok(pg)
}

/// The organizations of `[[organizations]]`, or the one `default` organization of `[api]`.
/// Errors name the organization and the key (`organizations.northside.burst`).
fn validate_organizations(
    raw: Vec<RawOrganization>,
    webhook_secret_file: Option<PathBuf>,
    api: &ApiConfig,
    sync: &SyncConfig,
    limits: &Limits,
) -> Result<Vec<Organization>, ConfigError> {
    refuse_pasted_key(
        "webhook.secret_file",
        webhook_secret_file.as_deref(),
        WEBHOOK_SECRET_ENV,
        WEBHOOK_SECRET_CREDENTIAL,
    )?;
    let webhook_secret_file = webhook_secret_file.filter(|p| !p.as_os_str().is_empty());
    if raw.is_empty() {
        return Ok(vec![Organization {
            webhook_secret: KeySources {
                file: webhook_secret_file,
                env: WEBHOOK_SECRET_ENV.to_owned(),
                credential: WEBHOOK_SECRET_CREDENTIAL.to_owned(),
            },
            name: DEFAULT_ORGANIZATION.to_owned(),
            organization_id: None,
            base_url: api.base_url.clone(),
            start_at: sync.start_at,
            key: KeySources {
                file: api.api_key_file.clone(),
                env: API_KEY_ENV.to_owned(),
                credential: CREDENTIAL_NAME.to_owned(),
            },
            budget: limits.ceiling(),
        }]);
    }
    if webhook_secret_file.is_some() {
        return Err(invalid(
            "webhook.secret_file",
            "applies only without [[organizations]]; each organization's endpoint has its own \
             signing secret: set webhook_secret_file in its [[organizations]] entry",
        ));
    }
    let mut out: Vec<Organization> = Vec::with_capacity(raw.len());
    for (i, o) in raw.into_iter().enumerate() {
        if !is_organization_name(&o.name) {
            return Err(ConfigError::InOrganization {
                key: format!("organizations[{i}].name"),
                message: redact_keys(&format!("{:?} must be 1 to 32 of a-z, 0-9, _ and -", o.name)),
            });
        }
        let name = o.name;
        let at = |e: ConfigError| match e {
            ConfigError::Invalid { key, message } => ConfigError::InOrganization {
                key: format!("organizations.{name}.{key}"),
                message,
            },
            other => other,
        };
        if out.iter().any(|p| p.name == name) {
            return Err(ConfigError::InOrganization {
                key: format!("organizations.{name}.name"),
                message: "is used by two organizations; names must be unique".into(),
            });
        }
        let organization_id = o.organization_id.map(|id| id.trim().to_owned());
        if let Some(id) = &organization_id {
            if id.is_empty() {
                return Err(at(invalid("organization_id", "must not be empty when given")));
            }
            if let Some(p) = out
                .iter()
                .find(|p| p.organization_id.as_deref() == Some(id.as_str()))
            {
                return Err(at(invalid(
                    "organization_id",
                    format!(
                        "{id:?} is already the organization_id of {}; one clinic, one key",
                        p.name
                    ),
                )));
            }
        }
        let base_url = match o.base_url {
            Some(text) => validate_url("base_url", &text).map_err(at)?,
            None => api.base_url.clone(),
        };
        let start_at = match o.start_at {
            Some(text) => timefmt::parse_operator_instant(&text).map_err(|e| at(invalid("start_at", e)))?,
            None => sync.start_at,
        };
        let requests_per_second = match o.requests_per_second {
            Some(rps) => rate_in("requests_per_second", rps).map_err(at)?,
            None => limits.requests_per_second,
        };
        let burst = match o.burst {
            Some(b) => NonZeroU32::new(int_as("burst", b, bounds::BURST).map_err(at)?)
                .ok_or_else(|| at(invalid("burst", "must not be 0")))?,
            None => limits.burst,
        };
        let max_in_flight = match o.max_in_flight {
            Some(m) => NonZeroUsize::new(int_as("max_in_flight", m, bounds::MAX_IN_FLIGHT).map_err(at)?)
                .ok_or_else(|| at(invalid("max_in_flight", "must not be 0")))?,
            None => limits.max_in_flight,
        };
        let (env, credential) = organization_key_names(&name);
        refuse_pasted_key("api_key_file", o.api_key_file.as_deref(), &env, &credential).map_err(at)?;
        let (webhook_env, webhook_credential) =
            organization_secret_names(&name, WEBHOOK_SECRET_ENV, WEBHOOK_SECRET_CREDENTIAL);
        refuse_pasted_key(
            "webhook_secret_file",
            o.webhook_secret_file.as_deref(),
            &webhook_env,
            &webhook_credential,
        )
        .map_err(at)?;
        out.push(Organization {
            webhook_secret: KeySources {
                file: o.webhook_secret_file.filter(|p| !p.as_os_str().is_empty()),
                env: webhook_env,
                credential: webhook_credential,
            },
            organization_id,
            base_url,
            start_at,
            key: KeySources {
                file: o.api_key_file.filter(|p| !p.as_os_str().is_empty()),
                env,
                credential,
            },
            budget: Budget {
                requests_per_second,
                burst,
                max_in_flight,
            },
            name,
        });
    }
    Ok(out)
}

/// A requests-per-second value inside [`bounds::REQUESTS_PER_SECOND`].
fn rate_in(key: &'static str, rps: f64) -> Result<f64, ConfigError> {
    let (lo, hi) = bounds::REQUESTS_PER_SECOND;
    // `contains` is false for NaN, so NaN and the infinities are refused here too.
    if !(lo..=hi).contains(&rps) {
        return Err(invalid(
            key,
            format!("must be between {lo} and {hi} (got {rps:?})"),
        ));
    }
    Ok(rps)
}

fn validate_base_url(text: &str) -> Result<Url, ConfigError> {
    validate_url("api.base_url", text)
}

fn validate_url(key: &'static str, text: &str) -> Result<Url, ConfigError> {
    let mut url = Url::parse(text).map_err(|e| invalid(key, format!("{text:?} is not a URL: {e}")))?;
    if !url.username().is_empty() || url.password().is_some() {
        return Err(invalid(
            key,
            "must not carry credentials; the key comes from api_key_file",
        ));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(invalid(key, "must not have a query or fragment"));
    }
    match url.scheme() {
        "https" => {}
        "http" if url.host().is_some_and(|h| is_loopback_host(&h)) => {}
        "http" => {
            return Err(invalid(
                key,
                "must use https:// (plain http:// is only allowed for a loopback host such as 127.0.0.1)",
            ));
        }
        other => {
            return Err(invalid(
                key,
                format!("unsupported scheme {other:?}; use https://"),
            ));
        }
    }
    let trimmed = url.path().trim_end_matches('/').to_owned();
    url.set_path(&trimmed);
    Ok(url)
}

fn is_loopback_host(host: &url::Host<&str>) -> bool {
    match host {
        url::Host::Domain(d) => is_loopback_name(d),
        url::Host::Ipv4(ip) => IpAddr::V4(*ip).is_loopback(),
        url::Host::Ipv6(ip) => IpAddr::V6(*ip).is_loopback(),
    }
}

/// `localhost` or a loopback address (127.0.0.0/8, ::1, bracketed or not).
fn is_loopback_name(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Parses durations written as an integer and a unit: `250ms`, `10s`, `5m`, `48h`, `30d`.
pub fn parse_duration(key: &'static str, text: &str) -> Result<Duration, ConfigError> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let n: u64 = digits.parse().map_err(|_| {
        invalid(
            key,
            format!("{text:?} is not a duration like \"30s\", \"5m\", \"48h\" or \"30d\""),
        )
    })?;
    let unit_secs = match unit {
        "ms" => return Ok(Duration::from_millis(n)),
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => {
            return Err(invalid(
                key,
                format!("{text:?} has no known unit; use ms, s, m, h or d (e.g. \"30s\")"),
            ));
        }
    };
    n.checked_mul(unit_secs)
        .map(Duration::from_secs)
        .ok_or_else(|| invalid(key, format!("{text:?} is too large")))
}

/// `purge --older-than`: a duration in the range of `privacy.retention`.
pub fn parse_age(key: &'static str, text: &str) -> Result<Duration, ConfigError> {
    duration_in(key, text, bounds::RETENTION)
}

/// Where a secret was found; reported in logs so operators can tell which source won.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// The configured file; `key` is its TOML key (`api_key_file`, `database.password_file`).
    File {
        key: &'static str,
        path: PathBuf,
    },
    /// The environment variable's name.
    Env(String),
    Credential(PathBuf),
}

impl fmt::Display for KeySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeySource::File { key, path } => write!(f, "{key} {}", path.display()),
            KeySource::Env(name) => write!(f, "environment variable {name}"),
            KeySource::Credential(p) => write!(f, "systemd credential {}", p.display()),
        }
    }
}

/// A secret and where it was found, or (`Err`) why each source did not yield it.
pub type SecretLookup<K> = Result<(Secret<K>, KeySource), Vec<String>>;

/// What a secret is called in messages, and the error its problems become.
struct SecretLabel {
    /// "API key", "database password".
    noun: &'static str,
    /// The TOML key of its file.
    file_key: &'static str,
    error: fn(String) -> ConfigError,
}

const API_KEY: SecretLabel = SecretLabel {
    noun: "API key",
    file_key: "api_key_file",
    error: ConfigError::ApiKey,
};

const DATABASE_PASSWORD: SecretLabel = SecretLabel {
    noun: "database password",
    file_key: "database.password_file",
    error: ConfigError::DatabasePassword,
};

/// Resolves the API key: `api_key_file`, then `CHARTHERO_API_KEY`, then
/// `$CREDENTIALS_DIRECTORY/charthero-api-key`; the first source that yields a key wins.
///
/// A configured file that does not exist, or that this user may not read, is skipped: under
/// systemd the key file is root's (`/etc/charthero-sync/api-key`, mode 0600) and reaches the
/// service as a credential, so the shipped configuration works both for root (who reads the file)
/// and for the service (which reads the credential). A file this user *can* read but that is
/// accessible by group or others is refused. When no source yields a key, the error says why
/// each one did not.
pub fn load_api_key(api: &ApiConfig) -> Result<(ApiKey, KeySource), ConfigError> {
    load_key(&KeySources {
        file: api.api_key_file.clone(),
        env: API_KEY_ENV.to_owned(),
        credential: CREDENTIAL_NAME.to_owned(),
    })
}

/// Resolves one organization's key from its sources (see [`load_api_key`] for the rules); an
/// error names the organization.
pub fn load_organization_key(org: &Organization) -> Result<(ApiKey, KeySource), ConfigError> {
    load_key(&org.key).map_err(|e| match e {
        ConfigError::ApiKey(message) => ConfigError::ApiKey(format!("organization {}: {message}", org.name)),
        other => other,
    })
}

fn load_key(sources: &KeySources) -> Result<(ApiKey, KeySource), ConfigError> {
    load_api_key_from(
        sources,
        std::env::var(&sources.env).ok(),
        std::env::var_os("CREDENTIALS_DIRECTORY").map(PathBuf::from),
    )
}

fn load_api_key_from(
    sources: &KeySources,
    env_key: Option<String>,
    credentials_dir: Option<PathBuf>,
) -> Result<(ApiKey, KeySource), ConfigError> {
    find_secret(&API_KEY, sources, env_key, credentials_dir)?
        .map_err(|looked| ConfigError::ApiKey(format!("no API key found: looked in {}", looked.join(", "))))
}

/// Resolves the signing secret of `org`'s webhook endpoint by the API key's rules (see
/// [`load_api_key`]): `[webhook] secret_file` (an organization's `webhook_secret_file`), then
/// `CHARTHERO_WEBHOOK_SECRET` (`…_<NAME>`), then
/// `$CREDENTIALS_DIRECTORY/charthero-webhook-secret` (`….<name>`). Needed only when
/// `[webhook] listen` is set; an error names the organization and every source looked in.
pub fn load_webhook_secret(org: &Organization) -> Result<(WebhookSecret, KeySource), ConfigError> {
    let sources = &org.webhook_secret;
    let label = SecretLabel {
        noun: "webhook signing secret",
        file_key: if org.name == DEFAULT_ORGANIZATION && sources.env == WEBHOOK_SECRET_ENV {
            "webhook.secret_file"
        } else {
            "webhook_secret_file"
        },
        error: ConfigError::WebhookSecret,
    };
    find_secret(
        &label,
        sources,
        std::env::var(&sources.env).ok(),
        std::env::var_os("CREDENTIALS_DIRECTORY").map(PathBuf::from),
    )
    .map_err(|e| match e {
        ConfigError::WebhookSecret(message) => {
            ConfigError::WebhookSecret(format!("organization {}: {message}", org.name))
        }
        other => other,
    })?
    .map_err(|looked| {
        ConfigError::WebhookSecret(format!(
            "organization {}: [webhook] listen is set, but no webhook signing secret was found: looked in {}",
            org.name,
            looked.join(", ")
        ))
    })
}

/// Resolves the PostgreSQL password by the API key's rules (see [`load_api_key`]):
/// `database.password_file`, then `CHARTHERO_DATABASE_PASSWORD`, then
/// `$CREDENTIALS_DIRECTORY/charthero-database-password`. Finding none is not an error: the server
/// may authenticate by trust, peer or certificate; the sources looked in are returned so that an
/// authentication failure can name them.
pub fn load_database_password(
    pg: &PostgresConfig,
) -> Result<SecretLookup<DatabasePasswordKind>, ConfigError> {
    find_secret(
        &DATABASE_PASSWORD,
        &pg.password,
        std::env::var(&pg.password.env).ok(),
        std::env::var_os("CREDENTIALS_DIRECTORY").map(PathBuf::from),
    )
}

/// The first of `sources` that yields a secret, or (inner `Err`) why each one did not. A file
/// that exists but is unsafe or broken is an error, not skipped.
fn find_secret<K: SecretKind>(
    label: &SecretLabel,
    sources: &KeySources,
    env_value: Option<String>,
    credentials_dir: Option<PathBuf>,
) -> Result<SecretLookup<K>, ConfigError> {
    let env_name = sources.env.as_str();
    let credential_name = sources.credential.as_str();
    let file_key = label.file_key;
    let mut skipped = Vec::new();
    let mut unreadable_file = None;
    match &sources.file {
        None => skipped.push(format!("{file_key} (not set)")),
        Some(path) => match read_secret_file(label, path)? {
            SecretFile::Found(secret) => {
                return Ok(Ok((
                    secret,
                    KeySource::File {
                        key: file_key,
                        path: path.clone(),
                    },
                )));
            }
            SecretFile::Missing => skipped.push(format!("{file_key} {} (does not exist)", path.display())),
            SecretFile::Unreadable(e) => {
                skipped.push(format!(
                    "{file_key} {} (not readable by this user: {e})",
                    path.display()
                ));
                unreadable_file = Some(path);
            }
        },
    }
    let found = if let Some(text) = env_value {
        let secret = Secret::parse(&text).map_err(|problem| match problem {
            SecretProblem::Empty => (label.error)(format!("{env_name} is set but empty")),
            problem => (label.error)(format!(
                "the {} in the environment variable {env_name} {problem}",
                label.noun
            )),
        })?;
        Some((secret, KeySource::Env(env_name.to_owned())))
    } else {
        skipped.push(format!("${env_name} (not set)"));
        match credentials_dir {
            None => {
                skipped.push(format!(
                    "$CREDENTIALS_DIRECTORY/{credential_name} (CREDENTIALS_DIRECTORY not set)"
                ));
                None
            }
            Some(dir) => {
                let path = dir.join(credential_name);
                match read_secret_file(label, &path)? {
                    SecretFile::Found(secret) => Some((secret, KeySource::Credential(path))),
                    SecretFile::Missing => {
                        skipped.push(format!("{} (does not exist)", path.display()));
                        None
                    }
                    SecretFile::Unreadable(e) => {
                        skipped.push(format!("{} (not readable by this user: {e})", path.display()));
                        None
                    }
                }
            }
        }
    };
    Ok(match found {
        Some((secret, source)) => {
            if let Some(path) = unreadable_file {
                tracing::info!(
                    "{file_key} {} is not readable by this user; using the {source} instead",
                    path.display()
                );
            }
            Ok((secret, source))
        }
        None => Err(skipped),
    })
}

/// What a secret's file gave.
enum SecretFile<K: SecretKind> {
    Found(Secret<K>),
    Missing,
    /// Exists, but this user may not read it (or reach it).
    Unreadable(std::io::ErrorKind),
}

/// Reads a secret's file, refusing one that group or others may access.
fn read_secret_file<K: SecretKind>(label: &SecretLabel, path: &Path) -> Result<SecretFile<K>, ConfigError> {
    use std::io::ErrorKind;
    use std::os::unix::fs::PermissionsExt;
    let noun = label.noun;
    let fail = |message: String| (label.error)(message);
    // The io::Error's own text is not appended to messages below that already name the kind:
    // "Permission denied (os error 13)" once is enough.
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(SecretFile::Missing),
        Err(e) if e.kind() == ErrorKind::PermissionDenied => return Ok(SecretFile::Unreadable(e.kind())),
        Err(e) => return Err(fail(format!("cannot read {noun} file {}: {e}", path.display()))),
    };
    if meta.is_dir() {
        return Err(fail(format!(
            "{noun} file {} is a directory; a file that holds the {noun} is expected",
            path.display()
        )));
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(fail(format!(
            "{noun} file {} is accessible by group or others (mode {mode:04o}); run `chmod 600 {}`",
            path.display(),
            path.display()
        )));
    }
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == ErrorKind::PermissionDenied => return Ok(SecretFile::Unreadable(e.kind())),
        Err(e) => return Err(fail(format!("cannot read {noun} file {}: {e}", path.display()))),
    };
    Secret::parse(&text)
        .map(SecretFile::Found)
        .map_err(|problem| fail(format!("{noun} file {} {problem}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("test.toml"))
    }

    #[test]
    fn the_example_config_is_valid_and_matches_the_defaults() {
        let text = include_str!("../config.example.toml");
        let example = parse(text).unwrap();
        let defaults = RawConfig::default().validate().unwrap();
        assert_eq!(format!("{example:?}"), format!("{defaults:?}"));
    }

    #[test]
    fn unknown_keys_are_errors_that_name_the_key() {
        let err = parse("[sync]\nschedulee = \"0 * * * * *\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("schedulee"), "{err}");
        let err = parse("[nonsense]\n").unwrap_err().to_string();
        assert!(err.contains("nonsense"), "{err}");
    }

    #[test]
    fn bad_values_name_their_key() {
        let cases = [
            ("[sync]\nschedule = \"every five minutes\"", "sync.schedule"),
            ("[sync]\nstart_at = \"2026-01-01T00:00:00\"", "sync.start_at"),
            ("[api]\nbase_url = \"http://api.example.test\"", "api.base_url"),
            ("[api]\nbase_url = \"ftp://127.0.0.1\"", "api.base_url"),
            ("[api]\nconnect_timeout = \"10 parsecs\"", "api.connect_timeout"),
            (
                "[limits]\nrequests_per_second = 0.0",
                "limits.requests_per_second",
            ),
            ("[limits]\nburst = 0", "limits.burst"),
            ("[limits]\nmax_in_flight = 0", "limits.max_in_flight"),
            ("[sync]\npage_size = 101", "sync.page_size"),
            ("[metrics]\nlisten = \"0.0.0.0:9464\"", "metrics.listen"),
            ("[privacy]\ndate_of_birth = \"decade\"", "privacy.date_of_birth"),
            ("[privacy]\nretention = \"forever\"", "privacy.retention"),
        ];
        for (text, key) in cases {
            let err = parse(text).unwrap_err().to_string();
            assert!(err.contains(key), "{text}: {err}");
        }
    }

    #[test]
    fn toml_errors_give_line_and_column_and_never_the_source_line_or_a_string_value() {
        let cases = [
            // An unknown key that holds a secret: where the secret goes instead.
            (
                "[api]\nbase_url = \"https://api.example.test\"\napi_key = \"ch_sk_inline_secret\"\n",
                vec![
                    "test.toml",
                    "line 3, column 1",
                    "api_key",
                    "never written",
                    "api.api_key_file",
                    "CHARTHERO_API_KEY or",
                    "$CREDENTIALS_DIRECTORY/charthero-api-key",
                ],
            ),
            (
                "api_key = \"ch_sk_inline_secret\"\n",
                vec!["line 1, column 1", "api.api_key_file"],
            ),
            (
                "[[organizations]]\nname = \"north\"\n\n[[organizations]]\nname = \"river-2\"\n\
                 api_key = \"ch_sk_inline_secret\"\n",
                vec![
                    "line 6, column 1",
                    "its api_key_file",
                    "CHARTHERO_API_KEY_RIVER_2",
                    "$CREDENTIALS_DIRECTORY/charthero-api-key.river-2",
                ],
            ),
            (
                "[database]\nurl = \"postgresql://u@127.0.0.1/w\"\npassword = \"ch_sk_inline_secret\"\n",
                vec![
                    "line 3, column 1",
                    "database.password_file",
                    "CHARTHERO_DATABASE_PASSWORD",
                    "charthero-database-password",
                ],
            ),
            (
                "[api]\nwebhook_secret = \"ch_sk_inline_secret\"\n",
                vec!["webhook_secret", "never written"],
            ),
            // A string where a number belongs: the type, not the value.
            (
                "[limits]\nburst = \"ch_sk_inline_secret\"\n",
                vec!["line 2, column 9", "invalid type: a string (value not shown)"],
            ),
            // A syntax error inside the secret's line.
            ("[api]\nbase_url = \"ch_sk_inline_secret\n", vec!["line 2"]),
            ("[api]\nbase_url = ch_sk_inline_secret\n", vec!["line 2"]),
        ];
        for (text, wanted) in cases {
            let err = parse(text).unwrap_err();
            let shown = format!("{err} {err:?}");
            for w in wanted {
                assert!(shown.contains(w), "{text}: {w:?} missing from {shown}");
            }
            assert!(!shown.contains("inline_secret"), "{text}: {shown}");
            assert!(!shown.contains(" | "), "{text}: a source snippet in {shown}");
        }
        // A syntax error names the key of its line and its table, never the value.
        let err = parse("[api]\nbase_url = \"https://h.example\"\n[sync]\nschedule = 0 */5 * * * *\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("line 4, column") && err.contains("(at `sync.schedule`)"),
            "{err}"
        );
        let err = parse("[sync\nschedule = \"0 * * * * *\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("line 1, column") && !err.contains("(at"), "{err}");
        let err = parse("[api]\nch_sk_pasted = 1 2\n").unwrap_err().to_string();
        assert!(!err.contains("ch_sk_") && !err.contains("(at"), "{err}");
        // An unknown key that holds no secret gets no such advice.
        let err = parse("[sync]\nschedulee = \"0 * * * * *\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("line 2, column 1") && err.contains("schedulee"),
            "{err}"
        );
        assert!(!err.contains("never written"), "{err}");
    }

    #[test]
    fn values_quoted_in_errors_never_show_an_api_key() {
        for text in [
            "[api]\nbase_url = \"ch_sk_pasted_canary\"\n",
            "[api]\nconnect_timeout = \"ch_sk_pasted_canary\"\n",
            "[[organizations]]\nname = \"a\"\norganization_id = \"ch_sk_pasted_canary\"\n\
             [[organizations]]\nname = \"b\"\norganization_id = \"ch_sk_pasted_canary\"\n",
        ] {
            let err = parse(text).unwrap_err();
            let shown = format!("{err} {err:?}");
            assert!(!shown.contains("canary"), "{text}: {shown}");
        }
    }

    #[test]
    fn a_key_pasted_into_a_key_file_path_is_refused_without_echoing_it() {
        let cases = [
            (
                "[api]\napi_key_file = \"ch_sk_pasted_secret_999\"\n",
                "api.api_key_file",
                "CHARTHERO_API_KEY or",
            ),
            (
                "[[organizations]]\nname = \"north\"\napi_key_file = \"ch_sk_pasted_secret_999\"\n",
                "organizations.north.api_key_file",
                "CHARTHERO_API_KEY_NORTH",
            ),
            (
                "[database]\nurl = \"postgresql://u@127.0.0.1/w\"\npassword_file = \"ch_sk_pasted_secret_999\"\n",
                "database.password_file",
                "CHARTHERO_DATABASE_PASSWORD",
            ),
            // Pasted with a leading space, after "Bearer", in capitals, or at a path's end.
            (
                "[api]\napi_key_file = \" ch_sk_pasted_secret_999\"\n",
                "api.api_key_file",
                "CHARTHERO_API_KEY or",
            ),
            (
                "[api]\napi_key_file = \"Bearer ch_sk_pasted_secret_999\"\n",
                "api.api_key_file",
                "CHARTHERO_API_KEY or",
            ),
            (
                "[api]\napi_key_file = \"CH_SK_PASTED_SECRET_999\"\n",
                "api.api_key_file",
                "CHARTHERO_API_KEY or",
            ),
            (
                "[api]\napi_key_file = \"/etc/charthero-sync/ch_sk_pasted_secret_999\"\n",
                "api.api_key_file",
                "CHARTHERO_API_KEY or",
            ),
        ];
        for (text, key, source) in cases {
            let err = parse(text).unwrap_err();
            let shown = format!("{err} {err:?}");
            assert!(
                shown.contains(key)
                    && shown.contains("looks like the API key itself")
                    && shown.contains(source),
                "{text}: {shown}"
            );
            assert!(!shown.to_lowercase().contains("pasted_secret"), "{text}: {shown}");
        }
    }

    #[test]
    fn a_secret_of_more_than_one_line_is_refused_naming_its_source_never_the_secret() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("key");
        std::fs::write(&file, "ch_sk_canary\nextra\n").unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        let api = api_with_key_file(Some(file.clone()));
        let err = load_api_key_from(&api, None, None).unwrap_err();
        let shown = format!("{err} {err:?}");
        assert!(
            shown.contains(&file.display().to_string()) && shown.contains("more than one line"),
            "{shown}"
        );
        assert!(!shown.contains("canary") && !shown.contains("extra"), "{shown}");
        assert!(matches!(err, ConfigError::ApiKey(_)), "{err:?}");

        // The same from the environment and from the credential.
        let api = api_with_key_file(None);
        let err = load_api_key_from(&api, Some("ch_sk_canary extra".into()), None).unwrap_err();
        let shown = format!("{err} {err:?}");
        assert!(
            shown.contains(API_KEY_ENV) && shown.contains("whitespace"),
            "{shown}"
        );
        assert!(!shown.contains("canary"), "{shown}");
        let cred_dir = dir.path().join("creds");
        std::fs::create_dir(&cred_dir).unwrap();
        let cred = cred_dir.join(CREDENTIAL_NAME);
        std::fs::write(&cred, "ch_sk_canary\r\nextra").unwrap();
        std::fs::set_permissions(&cred, std::fs::Permissions::from_mode(0o400)).unwrap();
        let err = load_api_key_from(&api, None, Some(cred_dir)).unwrap_err();
        let shown = format!("{err} {err:?}");
        assert!(
            shown.contains(&cred.display().to_string()) && shown.contains("more than one line"),
            "{shown}"
        );
        assert!(!shown.contains("canary"), "{shown}");

        // The database password: spaces are fine, a second line is not.
        let pw = dir.path().join("pw");
        std::fs::write(&pw, "pw canary\nextra\n").unwrap();
        std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o600)).unwrap();
        let sources = KeySources {
            file: Some(pw.clone()),
            env: DATABASE_PASSWORD_ENV.into(),
            credential: DATABASE_PASSWORD_CREDENTIAL.into(),
        };
        let err = find_secret::<DatabasePasswordKind>(&DATABASE_PASSWORD, &sources, None, None).unwrap_err();
        let shown = format!("{err} {err:?}");
        assert!(
            shown.contains(&pw.display().to_string()) && shown.contains("more than one line"),
            "{shown}"
        );
        assert!(!shown.contains("canary"), "{shown}");
        std::fs::write(&pw, "pw with spaces\n").unwrap();
        let (secret, _) = find_secret::<DatabasePasswordKind>(&DATABASE_PASSWORD, &sources, None, None)
            .unwrap()
            .unwrap();
        assert_eq!(secret.expose(), "pw with spaces");
    }

    #[test]
    fn a_key_file_that_is_a_directory_is_called_one() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let api = api_with_key_file(Some(dir.path().to_owned()));
        let err = load_api_key_from(&api, None, None).unwrap_err().to_string();
        assert!(
            err.contains(&dir.path().display().to_string())
                && err.contains("is a directory")
                && err.contains("a file that holds the API key"),
            "{err}"
        );
        assert!(!err.contains("chmod"), "{err}");
    }

    #[test]
    fn a_schedule_that_never_fires_or_not_within_a_year_is_refused_by_name() {
        let now = chrono::DateTime::parse_from_rfc3339("2026-03-01T12:00:00Z")
            .unwrap()
            .to_utc();
        for never in ["0 0 0 31 2 *", "0 0 0 30 2 *", "0 0 0 1 1 * 2020"] {
            let err = validate_schedule(never, now).unwrap_err().to_string();
            assert!(
                err.contains("sync.schedule") && err.contains("never fires"),
                "{never}: {err}"
            );
        }
        for far in ["0 0 0 29 2 *", "0 0 0 1 1 * 2031"] {
            let err = validate_schedule(far, now).unwrap_err().to_string();
            assert!(
                err.contains("sync.schedule") && err.contains("more than a year from now"),
                "{far}: {err}"
            );
        }
        for ok in ["0 */5 * * * *", "0 0 0 1 1 *", "0 0 12 1 3 *"] {
            assert!(validate_schedule(ok, now).is_ok(), "{ok}");
        }
        // Through the whole configuration too.
        let err = parse("[sync]\nschedule = \"0 0 0 31 2 *\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("sync.schedule") && err.contains("never fires"),
            "{err}"
        );
    }

    #[test]
    fn timestamps_may_be_toml_datetimes_when_they_carry_an_offset() {
        let cfg = parse(
            "[sync]\nstart_at = 2026-01-01T05:30:00+05:30\n\n\
             [[organizations]]\nname = \"north\"\nstart_at = 2025-06-01T00:00:00.25Z\n\n\
             [[organizations]]\nname = \"south\"\n",
        )
        .unwrap();
        assert_eq!(
            crate::timefmt::format_utc(cfg.sync.start_at),
            "2026-01-01T00:00:00Z"
        );
        assert_eq!(
            crate::timefmt::format_utc(cfg.organizations[0].start_at),
            "2025-06-01T00:00:00.25Z"
        );
        assert_eq!(cfg.organizations[1].start_at, cfg.sync.start_at);
        // Without an offset, the same words as the quoted form.
        for naive in ["2026-01-01T00:00:00", "2026-01-01"] {
            let bare = parse(&format!("[sync]\nstart_at = {naive}\n"))
                .unwrap_err()
                .to_string();
            let quoted = parse(&format!("[sync]\nstart_at = \"{naive}\"\n"))
                .unwrap_err()
                .to_string();
            assert_eq!(bare, quoted);
            assert!(
                bare.contains("sync.start_at") && bare.contains("no timezone offset"),
                "{bare}"
            );
            let org = parse(&format!(
                "[[organizations]]\nname = \"north\"\nstart_at = {naive}\n"
            ))
            .unwrap_err()
            .to_string();
            assert!(
                org.contains("organizations.north.start_at") && org.contains("no timezone offset"),
                "{org}"
            );
        }
        let err = parse("[sync]\nstart_at = 00:00:00\n").unwrap_err().to_string();
        assert!(err.contains("sync.start_at"), "{err}");
        let err = parse("[sync]\nstart_at = { at = 1 }\n").unwrap_err().to_string();
        assert!(
            err.contains("invalid type: map") && err.contains("RFC 3339"),
            "{err}"
        );
        let err = parse("[sync]\nstart_at = 5\n").unwrap_err().to_string();
        assert!(
            err.contains("line 2, column 12") && err.contains("RFC 3339"),
            "{err}"
        );
    }

    #[test]
    fn integer_keys_accept_their_bounds_and_refuse_one_past_them_by_name() {
        let cases = [
            ("api", "max_response_bytes", bounds::MAX_RESPONSE_BYTES),
            ("database", "wal_size_limit", bounds::WAL_SIZE_LIMIT),
            ("sync", "page_size", bounds::PAGE_SIZE),
            ("limits", "burst", bounds::BURST),
            ("limits", "max_in_flight", bounds::MAX_IN_FLIGHT),
            ("limits", "max_attempts", bounds::MAX_ATTEMPTS),
            ("limits", "retries_per_cycle", bounds::RETRIES_PER_CYCLE),
            ("audio", "max_bytes", bounds::AUDIO_MAX_BYTES),
        ];
        for (section, key, (lo, hi)) in cases {
            for ok in [lo, hi] {
                let text = format!("[{section}]\n{key} = {ok}\n");
                assert!(parse(&text).is_ok(), "{text}");
            }
            for bad in [lo - 1, hi + 1, i64::MIN, i64::MAX] {
                let text = format!("[{section}]\n{key} = {bad}\n");
                let err = parse(&text).unwrap_err().to_string();
                assert!(err.contains(&format!("{section}.{key}")), "{text}: {err}");
            }
        }
    }

    #[test]
    fn requests_per_second_outside_its_range_is_refused_by_name() {
        for bad in [
            "1e-30",
            "1e-19",
            "1e-10",
            "0.0",
            "-0.0",
            "-5.0",
            "nan",
            "inf",
            "-inf",
            "1e10",
            "1000000.5",
        ] {
            let err = parse(&format!("[limits]\nrequests_per_second = {bad}\n"))
                .unwrap_err()
                .to_string();
            assert!(err.contains("limits.requests_per_second"), "{bad}: {err}");
        }
        for ok in ["0.01", "1000000", "5"] {
            assert!(
                parse(&format!("[limits]\nrequests_per_second = {ok}\n")).is_ok(),
                "{ok}"
            );
        }
    }

    #[test]
    fn durations_outside_their_range_are_refused_by_name_and_the_range_is_stated() {
        let err = parse("[sync]\nsettle_lag = \"8d\"").unwrap_err().to_string();
        assert!(
            err.contains("sync.settle_lag") && err.contains("between 0s and 7d"),
            "{err}"
        );
        let err = parse("[api]\nrequest_timeout = \"0s\"").unwrap_err().to_string();
        assert!(
            err.contains("api.request_timeout") && err.contains("1ms and 1d"),
            "{err}"
        );
        let err = parse("[privacy]\nretention = \"213503982334601d\"")
            .unwrap_err()
            .to_string();
        assert!(err.contains("privacy.retention"), "{err}");
        assert_eq!(format_duration(Duration::from_secs(90)), "90s");
        assert_eq!(format_duration(Duration::from_secs(7_200)), "2h");
    }

    #[test]
    fn plain_http_is_allowed_only_for_loopback_hosts() {
        for host in [
            "http://127.0.0.1:8080",
            "http://localhost:1",
            "http://[::1]:9",
            "http://127.3.4.5",
        ] {
            let text = format!("[api]\nbase_url = \"{host}\"");
            assert!(parse(&text).is_ok(), "{host}");
        }
        let cfg = parse("[api]\nbase_url = \"https://api.example.test/\"").unwrap();
        assert_eq!(cfg.api.base_url.as_str(), "https://api.example.test/");
    }

    #[test]
    fn durations_accept_the_documented_units() {
        assert_eq!(parse_duration("k", "250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(
            parse_duration("k", "48h").unwrap(),
            Duration::from_secs(48 * 3600)
        );
        assert_eq!(
            parse_duration("k", "30d").unwrap(),
            Duration::from_secs(30 * 86_400)
        );
        assert!(parse_duration("k", "5").is_err());
        assert!(parse_duration("k", "-5s").is_err());
    }

    fn api_with_key_file(path: Option<PathBuf>) -> KeySources {
        let mut raw = RawConfig::default();
        raw.api.api_key_file = path;
        raw.validate().unwrap().organizations.remove(0).key
    }

    #[test]
    fn the_key_file_wins_then_the_environment_then_the_credential() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("key");
        std::fs::write(&file, "ch_sk_from_file\n").unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        let cred_dir = dir.path().join("creds");
        std::fs::create_dir(&cred_dir).unwrap();
        let cred = cred_dir.join(CREDENTIAL_NAME);
        std::fs::write(&cred, "ch_sk_from_credential").unwrap();
        std::fs::set_permissions(&cred, std::fs::Permissions::from_mode(0o400)).unwrap();

        let api = api_with_key_file(Some(file.clone()));
        let (key, src) = load_api_key_from(&api, Some("ch_sk_env".into()), Some(cred_dir.clone())).unwrap();
        assert_eq!(
            (key.expose(), src),
            (
                "ch_sk_from_file",
                KeySource::File {
                    key: "api_key_file",
                    path: file
                }
            )
        );

        let api = api_with_key_file(Some(dir.path().join("missing")));
        let (key, src) = load_api_key_from(&api, Some("ch_sk_env".into()), Some(cred_dir.clone())).unwrap();
        assert_eq!(
            (key.expose(), src),
            ("ch_sk_env", KeySource::Env(API_KEY_ENV.into()))
        );

        let (key, src) = load_api_key_from(&api, None, Some(cred_dir)).unwrap();
        assert_eq!(
            (key.expose(), src),
            ("ch_sk_from_credential", KeySource::Credential(cred))
        );

        let err = load_api_key_from(&api, None, None).unwrap_err().to_string();
        assert!(err.contains("no API key found"), "{err}");
        assert!(err.contains("missing (does not exist)"), "{err}");
        assert!(err.contains("CREDENTIALS_DIRECTORY not set"), "{err}");
    }

    #[test]
    fn a_key_file_readable_by_others_is_refused_without_revealing_it() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("key");
        std::fs::write(&file, "ch_sk_canary_secret").unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        let api = api_with_key_file(Some(file.clone()));
        let err = load_api_key_from(&api, None, None).unwrap_err().to_string();
        assert!(err.contains(&file.display().to_string()), "{err}");
        assert!(err.contains("0644"), "{err}");
        assert!(!err.contains("canary"), "{err}");
    }

    #[test]
    fn without_organizations_the_api_key_is_the_one_organization_default() {
        let cfg = parse("[limits]\nrequests_per_second = 7.0\n").unwrap();
        assert_eq!(cfg.organizations.len(), 1);
        let o = &cfg.organizations[0];
        assert_eq!(o.name, DEFAULT_ORGANIZATION);
        assert_eq!(o.key.env, API_KEY_ENV);
        assert_eq!(o.key.credential, CREDENTIAL_NAME);
        assert_eq!(o.key.file, cfg.api.api_key_file);
        assert_eq!(o.budget, cfg.limits.ceiling());
        assert_eq!(o.start_at, cfg.sync.start_at);
    }

    #[test]
    fn each_organization_has_its_own_webhook_secret_sources() {
        let one = parse(
            "[webhook]\nlisten = \"127.0.0.1:8787\"\nsecret_file = \"/etc/charthero-sync/webhook-secret\"\n",
        )
        .unwrap();
        assert_eq!(one.webhook_listen, Some("127.0.0.1:8787".parse().unwrap()));
        let default = &one.organizations[0].webhook_secret;
        assert_eq!(default.env, WEBHOOK_SECRET_ENV);
        assert_eq!(default.credential, WEBHOOK_SECRET_CREDENTIAL);
        assert_eq!(
            default.file.as_deref(),
            Some(Path::new("/etc/charthero-sync/webhook-secret"))
        );
        let several = parse(
            "[webhook]\nlisten = \"[::1]:8787\"\n\n[[organizations]]\nname = \"north-side\"\n\
             webhook_secret_file = \"/etc/charthero-sync/keys/north-webhook\"\n\n\
             [[organizations]]\nname = \"river_2\"\n",
        )
        .unwrap();
        let [north, river] = [&several.organizations[0], &several.organizations[1]];
        assert_eq!(north.webhook_secret.env, "CHARTHERO_WEBHOOK_SECRET_NORTH_SIDE");
        assert_eq!(
            north.webhook_secret.credential,
            "charthero-webhook-secret.north-side"
        );
        assert_eq!(
            north.webhook_secret.file.as_deref(),
            Some(Path::new("/etc/charthero-sync/keys/north-webhook"))
        );
        assert_eq!(river.webhook_secret.file, None);
        assert_eq!(
            river.webhook_secret.credential,
            "charthero-webhook-secret.river_2"
        );
        // The [webhook] file names one endpoint's secret; with several, each has its own.
        let err = parse("[webhook]\nsecret_file = \"/x\"\n\n[[organizations]]\nname = \"north\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("webhook.secret_file") && err.contains("webhook_secret_file"),
            "{err}"
        );
        // A secret pasted where its file belongs is refused unechoed; so is a bad address.
        let err = parse("[webhook]\nsecret_file = \"ch_sk_canary\"\n")
            .unwrap_err()
            .to_string();
        assert!(!err.contains("canary"), "{err}");
        let err = parse("[webhook]\nlisten = \"8787\"\n").unwrap_err().to_string();
        assert!(err.contains("webhook.listen"), "{err}");
    }

    #[test]
    fn organizations_take_their_own_keys_and_budgets_and_default_the_rest() {
        let cfg = parse(
            "[limits]\nrequests_per_second = 10.0\nburst = 9\n\n\
             [[organizations]]\nname = \"north-side\"\norganization_id = \"org_7Df4\"\n\
             api_key_file = \"/etc/charthero-sync/keys/north\"\nrequests_per_second = 2.5\nmax_in_flight = 2\n\n\
             [[organizations]]\nname = \"river_2\"\nstart_at = \"2025-06-01T00:00:00Z\"\n\
             base_url = \"http://127.0.0.1:9\"\n",
        )
        .unwrap();
        let [north, river] = [&cfg.organizations[0], &cfg.organizations[1]];
        assert_eq!(north.name, "north-side");
        assert_eq!(north.organization_id.as_deref(), Some("org_7Df4"));
        assert_eq!(north.key.env, "CHARTHERO_API_KEY_NORTH_SIDE");
        assert_eq!(north.key.credential, "charthero-api-key.north-side");
        assert_eq!(
            north.key.file.as_deref(),
            Some(Path::new("/etc/charthero-sync/keys/north"))
        );
        assert_eq!(
            (
                north.budget.requests_per_second,
                north.budget.burst.get(),
                north.budget.max_in_flight.get()
            ),
            (2.5, 9, 2)
        );
        assert_eq!(river.key.file, None);
        assert_eq!(river.key.env, "CHARTHERO_API_KEY_RIVER_2");
        assert_eq!(river.budget, cfg.limits.ceiling());
        assert_eq!(river.base_url.as_str(), "http://127.0.0.1:9/");
        assert_eq!(crate::timefmt::format_utc(river.start_at), "2025-06-01T00:00:00Z");
        assert_eq!(north.start_at, cfg.sync.start_at);
        let one = cfg.select_organizations(&["river_2".into()]).unwrap();
        assert_eq!(one.len(), 1);
        let err = cfg
            .select_organizations(&["east".into()])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("east") && err.contains("north-side, river_2"),
            "{err}"
        );
    }

    #[test]
    fn organization_errors_name_the_organization_and_the_key() {
        let org = |body: &str| format!("[[organizations]]\nname = \"north\"\n{body}\n");
        let cases = [
            (
                "[[organizations]]\nname = \"North\"\n".to_owned(),
                "organizations[0].name",
            ),
            (
                "[[organizations]]\nname = \"\"\n".to_owned(),
                "organizations[0].name",
            ),
            (format!("{}{}", org(""), org("")), "organizations.north.name"),
            (org("burst = 0"), "organizations.north.burst"),
            (org("max_in_flight = 65"), "organizations.north.max_in_flight"),
            (
                org("requests_per_second = -1.0"),
                "organizations.north.requests_per_second",
            ),
            (
                org("base_url = \"http://api.example.test\""),
                "organizations.north.base_url",
            ),
            (org("start_at = \"yesterday\""), "organizations.north.start_at"),
            (
                org("organization_id = \" \""),
                "organizations.north.organization_id",
            ),
            (
                format!(
                    "{}[[organizations]]\nname = \"south\"\norganization_id = \"org_1\"\n",
                    org("organization_id = \"org_1\"")
                ),
                "organizations.south.organization_id",
            ),
            (org("api_key = \"ch_sk_never_here\""), "api_key"),
        ];
        for (text, key) in cases {
            let err = parse(&text).unwrap_err().to_string();
            assert!(err.contains(key), "{text}: {err}");
        }
    }

    #[test]
    fn an_organizations_key_comes_from_its_file_then_its_variable_then_its_credential() {
        let dir = tempfile::tempdir().unwrap();
        let cred_dir = dir.path().join("creds");
        std::fs::create_dir(&cred_dir).unwrap();
        let cred = cred_dir.join("charthero-api-key.north");
        std::fs::write(&cred, "ch_sk_north_credential").unwrap();
        std::fs::set_permissions(&cred, std::fs::Permissions::from_mode(0o400)).unwrap();
        let cfg = parse("[[organizations]]\nname = \"north\"\n").unwrap();
        let sources = &cfg.organizations[0].key;
        let (key, src) =
            load_api_key_from(sources, Some("ch_sk_north_env".into()), Some(cred_dir.clone())).unwrap();
        assert_eq!(
            (key.expose(), src),
            (
                "ch_sk_north_env",
                KeySource::Env("CHARTHERO_API_KEY_NORTH".into())
            )
        );
        let (key, src) = load_api_key_from(sources, None, Some(cred_dir)).unwrap();
        assert_eq!(
            (key.expose(), src),
            ("ch_sk_north_credential", KeySource::Credential(cred))
        );
        let err = load_api_key_from(sources, None, None).unwrap_err().to_string();
        assert!(err.contains("$CHARTHERO_API_KEY_NORTH (not set)"), "{err}");
    }

    fn postgres(text: &str) -> PostgresConfig {
        match parse(text).unwrap().database.target {
            DatabaseTarget::Postgres(pg) => *pg,
            DatabaseTarget::Sqlite { path } => panic!("{text}: a SQLite target {}", path.display()),
        }
    }

    #[test]
    fn path_and_url_are_mutually_exclusive_and_the_error_names_both() {
        let err = parse(
            "[database]\npath = \"/var/lib/w.db\"\nurl = \"postgresql://charthero@db.example.internal/warehouse\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("database.path") && err.contains("database.url"),
            "{err}"
        );
        // Without url the default file is the warehouse, as always.
        let cfg = parse("").unwrap();
        assert_eq!(cfg.database.sqlite_path(), Some(Path::new(DEFAULT_DATABASE_PATH)));
        assert_eq!(cfg.database.target.to_string(), DEFAULT_DATABASE_PATH);
        // The PostgreSQL keys mean nothing to a SQLite warehouse.
        for key in ["schema = \"s\"", "password_file = \"/p\"", "ca_file = \"/c\""] {
            let err = parse(&format!("[database]\n{key}\n")).unwrap_err().to_string();
            assert!(err.contains("database.url"), "{key}: {err}");
        }
    }

    #[test]
    fn a_password_in_the_url_is_refused_without_echoing_it() {
        for url in [
            "postgresql://charthero:pw_canary@db.example.internal/warehouse",
            "postgres://charthero:pw_canary@127.0.0.1:5432/warehouse?sslmode=require",
            "host=db.example.internal user=charthero password=pw_canary dbname=warehouse",
        ] {
            let err = parse(&format!("[database]\nurl = \"{url}\"\n")).unwrap_err();
            let text = format!("{err} {err:?}");
            assert!(text.contains("database.url"), "{text}");
            assert!(text.contains("password_file"), "{text}");
            assert!(
                !text.contains("canary") && !text.contains("example.internal"),
                "{text}"
            );
        }
    }

    #[test]
    fn urls_key_value_strings_and_unix_sockets_are_accepted_and_displayed_without_secrets() {
        let pg =
            postgres("[database]\nurl = \"postgresql://charthero@db.example.internal:5433/warehouse\"\n");
        assert_eq!(
            pg.to_string(),
            "postgresql://charthero@db.example.internal:5433/warehouse (schema charthero)"
        );
        assert!(!pg.is_local());
        assert_eq!(
            pg.connection.get_connect_timeout(),
            Some(&DEFAULT_PG_CONNECT_TIMEOUT)
        );
        let pg = postgres(
            "[database]\nurl = \"host=/run/postgresql user=charthero dbname=warehouse connect_timeout=3\"\n\
             schema = \"clinic_2\"\n",
        );
        assert_eq!(
            pg.to_string(),
            "postgresql://charthero@/run/postgresql:5432/warehouse (schema clinic_2)"
        );
        assert!(pg.is_local());
        assert_eq!(pg.connection.get_connect_timeout(), Some(&Duration::from_secs(3)));
        for local in ["127.0.0.2", "localhost", "[::1]"] {
            let pg = postgres(&format!(
                "[database]\nurl = \"postgres://u@{local}/w?sslmode=disable\"\n"
            ));
            assert!(pg.is_local(), "{local}");
        }
        for bad in [
            "mysql://u@h/db",
            "postgresql://@h/db",
            "postgresql:///db?user=u",
            "port=notanumber host=h user=u",
        ] {
            let err = parse(&format!("[database]\nurl = \"{bad}\"\n"))
                .unwrap_err()
                .to_string();
            assert!(err.contains("database.url"), "{bad}: {err}");
        }
    }

    #[test]
    fn a_remote_host_without_tls_is_refused_before_any_network() {
        let err =
            parse("[database]\nurl = \"postgresql://charthero@10.255.255.1/warehouse?sslmode=disable\"\n")
                .unwrap_err()
                .to_string();
        assert!(
            err.contains("database.url") && err.contains("sslmode=disable is refused"),
            "{err}"
        );
        // One remote host among loopback ones is enough to require TLS.
        let err = parse("[database]\nurl = \"host=127.0.0.1,10.255.255.1 user=u sslmode=disable\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("sslmode=disable is refused"), "{err}");
    }

    #[test]
    fn the_schema_must_be_a_plain_postgres_identifier() {
        let url = "url = \"postgresql://u@127.0.0.1/w\"";
        for ok in ["charthero", "_x", "clinic_2", &"a".repeat(63)] {
            assert_eq!(
                postgres(&format!("[database]\n{url}\nschema = \"{ok}\"\n")).schema,
                ok
            );
        }
        for bad in [
            "",
            "Charthero",
            "2x",
            "pg_catalog",
            "a-b",
            "x; DROP TABLE t",
            &"a".repeat(64),
        ] {
            let err = parse(&format!("[database]\n{url}\nschema = \"{bad}\"\n"))
                .unwrap_err()
                .to_string();
            assert!(err.contains("database.schema"), "{bad}: {err}");
        }
    }

    #[test]
    fn the_database_password_comes_from_its_file_then_its_variable_then_its_credential_or_nowhere() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pw");
        std::fs::write(&file, "pw_from_file\n").unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        let cred_dir = dir.path().join("creds");
        std::fs::create_dir(&cred_dir).unwrap();
        let cred = cred_dir.join(DATABASE_PASSWORD_CREDENTIAL);
        std::fs::write(&cred, "pw_from_credential").unwrap();
        std::fs::set_permissions(&cred, std::fs::Permissions::from_mode(0o400)).unwrap();
        let pg = postgres(&format!(
            "[database]\nurl = \"postgresql://u@127.0.0.1/w\"\npassword_file = \"{}\"\n",
            file.display()
        ));
        assert_eq!(pg.password.env, DATABASE_PASSWORD_ENV);
        let find = |sources: &KeySources, env: Option<&str>, creds: Option<&Path>| {
            find_secret::<crate::secret::DatabasePasswordKind>(
                &DATABASE_PASSWORD,
                sources,
                env.map(str::to_owned),
                creds.map(Path::to_owned),
            )
            .unwrap()
        };
        let (pw, src) = find(&pg.password, Some("pw_env"), Some(&cred_dir)).unwrap();
        assert_eq!(pw.expose(), "pw_from_file");
        assert_eq!(
            src.to_string(),
            format!("database.password_file {}", file.display())
        );
        let mut sources = pg.password.clone();
        sources.file = Some(dir.path().join("missing"));
        let (pw, src) = find(&sources, Some("pw_env"), Some(&cred_dir)).unwrap();
        assert_eq!(
            (pw.expose(), src),
            ("pw_env", KeySource::Env(DATABASE_PASSWORD_ENV.into()))
        );
        let (pw, src) = find(&sources, None, Some(&cred_dir)).unwrap();
        assert_eq!(
            (pw.expose(), src),
            ("pw_from_credential", KeySource::Credential(cred))
        );
        // None at all is fine (trust, peer or certificate authentication); the sources are
        // listed for the message of a refused connection.
        let looked = find(&sources, None, None).unwrap_err().join(", ");
        assert!(
            looked.contains("database.password_file") && looked.contains(DATABASE_PASSWORD_ENV),
            "{looked}"
        );
        // A file others may read is refused, naming it, never showing the password.
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o640)).unwrap();
        let err =
            find_secret::<crate::secret::DatabasePasswordKind>(&DATABASE_PASSWORD, &pg.password, None, None)
                .unwrap_err();
        let text = format!("{err} {err:?}");
        assert!(
            text.contains("database password file") && text.contains("0640"),
            "{text}"
        );
        assert!(!text.contains("pw_from_file"), "{text}");
        // Neither Debug of the configuration nor Display of the target shows a password.
        let shown = format!("{pg:?} {pg}");
        assert!(!shown.contains("pw_"), "{shown}");
    }
}
