//! The warehouse seam: what the sync, content, audit and daemon code may ask of the warehouse
//! ([`Backend`], [`WriteTx`]), the record types they pass, the single [`Writer`] thread every
//! write of the sync goes through (group commit), and [`StoreError`], the classified error every
//! entry point answers with. The implementations are [`sqlite`] (connection setup, migrations,
//! SQL) and [`postgres`] (migrations and SQL on a connection it is handed; the connection itself
//! from [`postgres::connect`]), chosen by [`DatabaseTarget`]; nothing outside them names a
//! database library but `transfer`, where `copy` moves a warehouse from one to the other. The
//! store never does network I/O of its own: a PostgreSQL warehouse's only traffic is its
//! database connection.

mod backend;
mod error;
mod json;
pub mod postgres;
mod records;
pub mod sqlite;
mod transfer;
mod writer;

use std::path::Path;

pub use backend::{Backend, GroupEnd, Reader, StateTime, TableCounts, WriteTx};
pub use error::{StoreError, StoreErrorKind};
pub use json::{same_content, stored_json_and_hash};
/// What `check` and the writer lock need of a PostgreSQL server, past the seam.
pub use postgres::connect::{
    ServerReport, Transport, WriterLease, describe as describe_postgres, drop_schema as drop_postgres_schema,
    try_writer_lock as try_postgres_writer_lock,
};
pub use records::{
    Audit, AuditTally, Backfill, DetailOutcome, DocumentRecord, EncounterRecord, IdCollision, IdKind,
    PageCounts, PatientRecord, PurgeCounts, RecordingRecord, Removal, RunCounts, RunEnd, RunOutcome,
    TranscriptRecord, TurnRecord, WebhookEvent, WebhookState, WindowCompletion, Work, WorkItem,
};
pub(crate) use records::{NotReady, dead_letter_retry_at};
pub use sqlite::lock_path as sqlite_lock_path;
pub use transfer::{CopyRefused, CopyReport, TableCopied, sqlite_to_postgres};
pub use writer::{Pending, Writer};

use crate::config::{DatabaseConfig, DatabaseTarget};

/// The `application_name` of the process's PostgreSQL connections (`pg_stat_activity`).
pub const APPLICATION_NAME: &str = "charthero-sync";

/// Opens (creating if needed) the warehouse for writing and applies pending migrations; the
/// caller holds the writer lock. Errors are classified ([`StoreError`]).
pub fn open(database: &DatabaseConfig) -> Result<Box<dyn Backend>, StoreError> {
    match &database.target {
        DatabaseTarget::Sqlite { path } => Ok(Box::new(sqlite::open_writer(path, database.busy_timeout)?)),
        DatabaseTarget::Postgres(pg) => {
            let location = pg.to_string();
            let fail = |e| StoreError::new(&location, e);
            // The session that migrates and writes holds the write lock for its whole life.
            let client = postgres::connect::connect_writer(pg, APPLICATION_NAME).map_err(fail)?;
            Ok(Box::new(
                postgres::open_writer(client, location.clone())
                    .map_err(fail)?
                    .reconnecting((**pg).clone()),
            ))
        }
    }
}

/// The schema version this release's migrations give a warehouse of `target`'s kind.
pub fn release_version(target: &DatabaseTarget) -> i64 {
    match target {
        DatabaseTarget::Sqlite { .. } => sqlite::latest_version(),
        DatabaseTarget::Postgres(_) => postgres::latest_version(),
    }
}

/// The schema version the warehouse has applied; 0 when it is not created yet (no file, an empty
/// one, or no schema on the server). Creates nothing.
pub fn applied_version(database: &DatabaseConfig) -> anyhow::Result<i64> {
    match &database.target {
        DatabaseTarget::Sqlite { path } => {
            if std::fs::metadata(path).map_or(true, |m| m.len() == 0) {
                return Ok(0);
            }
            sqlite::applied_version(&sqlite::open_reader(path, database.busy_timeout)?)
        }
        DatabaseTarget::Postgres(pg) => Ok(describe_postgres(pg)?.schema_version.map_or(0, i64::from)),
    }
}

/// Opens the warehouse read-only (`status`, the demo's summary); works while the daemon writes.
pub fn open_reader(database: &DatabaseConfig) -> anyhow::Result<Box<dyn Reader>> {
    match &database.target {
        DatabaseTarget::Sqlite { path } => Ok(Box::new(sqlite::open_reader(path, database.busy_timeout)?)),
        DatabaseTarget::Postgres(pg) => {
            let client = postgres::connect::connect_existing(pg, APPLICATION_NAME)?;
            Ok(Box::new(postgres::open_reader(client, pg.to_string())))
        }
    }
}

/// Opens an existing warehouse of exactly this release's schema without migrating it, to add a
/// row next to a running daemon (`charthero-sync backfill`).
pub fn open_current(database: &DatabaseConfig) -> anyhow::Result<Box<dyn Backend>> {
    match &database.target {
        DatabaseTarget::Sqlite { path } => Ok(Box::new(sqlite::open_current(path, database.busy_timeout)?)),
        DatabaseTarget::Postgres(pg) => {
            let client = postgres::connect::connect_existing(pg, APPLICATION_NAME)?;
            Ok(Box::new(postgres::open_current(client, pg.to_string())?))
        }
    }
}

/// Why the warehouse's location cannot work; a configuration error naming its key
/// (`database.path`, `database.ca_file`).
#[derive(Debug, thiserror::Error)]
#[error("invalid value for `{key}`: {reason}")]
pub struct LocationError {
    key: &'static str,
    reason: String,
}

impl LocationError {
    fn path(reason: String) -> LocationError {
        LocationError {
            key: "database.path",
            reason,
        }
    }

    /// The configuration key at fault.
    pub fn key(&self) -> &'static str {
        self.key
    }

    /// What is wrong, without the key's prefix (for `check`'s table).
    pub fn reason(&self) -> &str {
        &self.reason
    }
}

/// Checks, without creating anything or connecting, what can be checked of the warehouse's
/// location on this host: for SQLite ([`check_file_location`]) the file and its directory; for
/// PostgreSQL that `database.ca_file`, if set, is a file this user can read (the server itself
/// is reached by `check` and at start).
pub fn check_location(target: &DatabaseTarget) -> Result<(), LocationError> {
    match target {
        DatabaseTarget::Sqlite { path } => check_file_location(path),
        DatabaseTarget::Postgres(pg) => match &pg.ca_file {
            Some(ca) => std::fs::File::open(ca).map(drop).map_err(|e| LocationError {
                key: "database.ca_file",
                reason: format!("cannot read {}: {e}", ca.display()),
            }),
            None => Ok(()),
        },
    }
}

/// Checks, without creating anything, that a writer can use `path`: its directory exists and
/// this user may create files in it, and the database (if it exists) is a regular file this user
/// may read and write. `check` reports the answer; `run`, `sync` and `migrate` refuse to start
/// (exit 2) instead of failing later on the lock file, in a restart loop.
fn check_file_location(path: &Path) -> Result<(), LocationError> {
    use rustix::fs::{Access, access};
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let shown = |p: &Path| p.display().to_string();
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => {
            return Err(LocationError::path(format!("{} is not a directory", shown(dir))));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(LocationError::path(format!(
                "the directory {} does not exist; create it (the runbook's `install -d`, or systemd's StateDirectory=)",
                shown(dir)
            )));
        }
        Err(e) => {
            return Err(LocationError::path(format!(
                "cannot reach the directory {}: {e}",
                shown(dir)
            )));
        }
    }
    if let Err(e) = access(dir, Access::WRITE_OK | Access::EXEC_OK) {
        return Err(LocationError::path(format!(
            "this user cannot create files in {} ({e}); the database, its -wal/-shm and lock files live there",
            shown(dir)
        )));
    }
    match std::fs::metadata(path) {
        Ok(m) if !m.is_file() => Err(LocationError::path(format!(
            "{} is not a regular file",
            shown(path)
        ))),
        Ok(_) => access(path, Access::READ_OK | Access::WRITE_OK).map_err(|e| {
            LocationError::path(format!("this user cannot read and write {} ({e})", shown(path)))
        }),
        Err(_) => Ok(()),
    }
}

/// The statuses of an ambient transcript document that say its transcript is not final yet,
/// as SQL literals. The contract shows only `completed` and leaves the enum undocumented (the
/// vendor's overview speaks of "finalized transcript data"): a document in any other state —
/// another word for final, or none at all — may be final, so its transcript is asked for, and a
/// "not yet" answer is retried on the not-ready schedule (docs/content.md). The same list as
/// [`UNFINISHED_DOCUMENT_STATUSES`].
macro_rules! unfinished_document_statuses {
    () => {
        "'processing', 'in_progress', 'pending', 'queued', 'recording', 'uploading', 'transcribing', 'draft'"
    };
}

use unfinished_document_statuses;

/// `SELECT count(*)` of the content work in `$state` (e.g. `"detail_state = 'pending'"`) that a
/// cycle may still claim: of a live document of a live encounter (`claim_work`'s rule), so that
/// `status`'s queue and ETA leave out what a removal ended; `$and` adds a condition on `d`.
macro_rules! queued_work_sql {
    ($state:literal, $and:literal) => {
        concat!(
            "SELECT count(*) FROM documents d WHERE d.",
            $state,
            " AND d.removed_at IS NULL AND EXISTS (SELECT 1 FROM encounters e
                WHERE e.encounter_id = d.encounter_id AND e.removed_at IS NULL)",
            $and
        )
    };
}
use queued_work_sql;

/// `status`'s content queue as one row: the counts of [`crate::status::Queue::from_counts`], in
/// its order, each a [`queued_work_sql`]; `$and` adds a condition on `d`.
macro_rules! queue_sql {
    ($and:literal) => {
        concat!(
            "SELECT (",
            $crate::store::queued_work_sql!("detail_state = 'pending'", $and),
            "), (",
            $crate::store::queued_work_sql!("detail_state = 'not_ready'", $and),
            "), (",
            $crate::store::queued_work_sql!("transcript_state = 'pending'", $and),
            "), (",
            $crate::store::queued_work_sql!("transcript_state = 'not_ready'", $and),
            "), (",
            $crate::store::queued_work_sql!("audio_state = 'pending'", $and),
            "), (",
            $crate::store::queued_work_sql!("audio_state = 'not_ready'", $and),
            ")"
        )
    };
}
use queue_sql;

/// [`may_be_final`] as SQL over the status column (or expression) `$status`, a literal.
macro_rules! may_be_final_sql {
    ($status:literal) => {
        concat!(
            "lower(coalesce(",
            $status,
            ", '')) NOT IN (",
            $crate::store::unfinished_document_statuses!(),
            ")"
        )
    };
}
use may_be_final_sql;

/// [`unfinished_document_statuses!`] for Rust code.
const UNFINISHED_DOCUMENT_STATUSES: [&str; 8] = [
    "processing",
    "in_progress",
    "pending",
    "queued",
    "recording",
    "uploading",
    "transcribing",
    "draft",
];

/// Whether an ambient transcript document with this `status` may have a final transcript.
pub(crate) fn may_be_final(status: Option<&str>) -> bool {
    let status = status.unwrap_or_default().to_lowercase();
    !UNFINISHED_DOCUMENT_STATUSES.contains(&status.as_str())
}

/// The SET clause of the UPDATE that re-queues a changed encounter's live documents, the same
/// rule on every backend (docs/content.md): a note is asked again (unsupported types excepted),
/// and so is the transcript of an ambient document that may be final ([`may_be_final`]) — a
/// detail could only say whether the transcript changed, at the price of the one request that
/// fetches it (`save_transcript` skips the write when it did not); an unfinished ambient
/// document needs nothing, its summary says when it finishes. A recording the audio route did
/// not find is forgotten, so that `queue_missing_audio` asks for it again if it is final.
/// `content_seq` tells work fetched before the change from work after.
macro_rules! requeue_changed_documents {
    () => {
        concat!(
            "content_seq = content_seq + 1,
         detail_state = CASE
             WHEN schema_type <> 'ambient_transcript' AND detail_state IN ('done', 'unavailable', 'not_ready')
             THEN 'pending' ELSE detail_state END,
         detail_attempts = CASE WHEN schema_type <> 'ambient_transcript' THEN 0 ELSE detail_attempts END,
         detail_next_at_ns = CASE WHEN schema_type <> 'ambient_transcript' THEN NULL ELSE detail_next_at_ns END,
         transcript_state = CASE
             WHEN schema_type = 'ambient_transcript' AND ",
            $crate::store::may_be_final_sql!("status"),
            " THEN 'pending'
             ELSE transcript_state END,
         transcript_attempts = CASE
             WHEN schema_type = 'ambient_transcript' AND ",
            $crate::store::may_be_final_sql!("status"),
            " THEN 0
             ELSE transcript_attempts END,
         transcript_next_at_ns = CASE
             WHEN schema_type = 'ambient_transcript' AND ",
            $crate::store::may_be_final_sql!("status"),
            " THEN NULL
             ELSE transcript_next_at_ns END,
         audio_state = CASE WHEN audio_state IN ('unavailable', 'not_ready') THEN NULL ELSE audio_state END,
         audio_attempts = CASE WHEN audio_state IN ('unavailable', 'not_ready') THEN 0 ELSE audio_attempts END,
         audio_next_at_ns = CASE WHEN audio_state IN ('unavailable', 'not_ready') THEN NULL
             ELSE audio_next_at_ns END"
        )
    };
}
use requeue_changed_documents;

/// `WriteTx::requeue_content`'s statement, given each backend's placeholders for the
/// organization, the start and the end: [`requeue_changed_documents`] for the documents it
/// queues work for (notes and other non-ambient types fetched or found unavailable, ambient
/// documents that may be final) of the live encounters created in the range.
macro_rules! requeue_content_sql {
    ($organization:literal, $start:literal, $end:literal) => {
        concat!(
            "UPDATE documents SET ",
            $crate::store::requeue_changed_documents!(),
            " WHERE removed_at IS NULL
                AND ((schema_type <> 'ambient_transcript' AND detail_state IN ('done', 'unavailable', 'not_ready'))
                     OR (schema_type = 'ambient_transcript' AND ",
            $crate::store::may_be_final_sql!("status"),
            "))
                AND encounter_id IN (SELECT encounter_id FROM encounters
                    WHERE organization_id = ",
            $organization,
            " AND created_at_ns >= ",
            $start,
            " AND created_at_ns < ",
            $end,
            " AND removed_at IS NULL)"
        )
    };
}
use requeue_content_sql;

/// What `WriteTx::requeue_content` also does, given each backend's placeholders for the
/// organization, the start and the end: the dead letters of the encounters created in the range
/// need not wait for their next attempt either.
macro_rules! requeue_dead_letters_sql {
    ($organization:literal, $start:literal, $end:literal) => {
        concat!(
            "UPDATE dead_letters SET next_attempt_at_ns = NULL
              WHERE next_attempt_at_ns IS NOT NULL
                AND EXISTS (SELECT 1 FROM encounters e
                             WHERE e.encounter_id = dead_letters.encounter_id AND e.organization_id = ",
            $organization,
            " AND e.created_at_ns >= ",
            $start,
            " AND e.created_at_ns < ",
            $end,
            ")"
        )
    };
}
use requeue_dead_letters_sql;

/// `Backend::dead_letters_left`'s first statement, given each backend's placeholder for the
/// organization's name: the dead letters no claim can pick up any more — their document or its
/// encounter removed (or gone), or the work no longer queued (a dead letter leaves its work
/// `pending`; a change can make a transcript wait for its recording to finish, say, or turn the
/// document into another type).
macro_rules! orphaned_dead_letters_sql {
    ($organization:literal) => {
        concat!(
            "DELETE FROM dead_letters WHERE organization = ",
            $organization,
            " AND NOT EXISTS (SELECT 1 FROM documents d JOIN encounters e ON e.encounter_id = d.encounter_id
                              WHERE d.document_id = dead_letters.document_id
                                AND d.removed_at IS NULL AND e.removed_at IS NULL
                                AND CASE dead_letters.work WHEN 'document' THEN d.detail_state
                                                           WHEN 'transcript' THEN d.transcript_state
                                                           ELSE d.audio_state END IN ('pending', 'not_ready'))"
        )
    };
}
use orphaned_dead_letters_sql;

/// Which `documents` row a webhook event points to, given each backend's placeholders for the
/// organization, the encounter and the document: that live ambient document of a live
/// encounter of the organization.
macro_rules! webhook_document_sql {
    ($organization:literal, $encounter:literal, $document:literal) => {
        concat!(
            "document_id = ",
            $document,
            " AND encounter_id = ",
            $encounter,
            " AND schema_type = 'ambient_transcript' AND removed_at IS NULL
               AND EXISTS (SELECT 1 FROM encounters e WHERE e.encounter_id = documents.encounter_id
                           AND e.organization_id = ",
            $organization,
            " AND e.removed_at IS NULL)"
        )
    };
}
use webhook_document_sql;

/// Whether a document's transcript is current for an event that occurred at `$occurred`: queued
/// (by the listing, or by the detail just written, whose change requeued it), or fetched at or
/// after the event. Its fetch, in flight or done, is then the one the event asks for.
macro_rules! transcript_current_sql {
    ($occurred:literal) => {
        concat!(
            "(coalesce(transcript_state, 'none') = 'pending' OR (coalesce(transcript_state, 'none') = 'done' AND EXISTS (
                 SELECT 1 FROM transcripts t WHERE t.document_id = documents.document_id
                   AND t.fetched_at >= ",
            $occurred,
            ")))"
        )
    };
}
use transcript_current_sql;

/// `Backend::transcript_state` and `Backend::queue_transcript_now`, given each backend's
/// placeholders (see [`webhook_document_sql`]; `$occurred`, the event's instant): the
/// document's transcript state (`current`, see [`transcript_current_sql`], else the stored
/// state, `none` for NULL), and the update that makes a transcript that is not current due at
/// once, its not-ready schedule forgotten and a recording the audio route did not find
/// forgotten as [`requeue_changed_documents`] does.
macro_rules! queue_transcript_now_sql {
    (state, $organization:literal, $encounter:literal, $document:literal, $occurred:literal) => {
        concat!(
            "SELECT CASE WHEN ",
            $crate::store::transcript_current_sql!($occurred),
            " THEN 'current' ELSE coalesce(transcript_state, 'none') END FROM documents WHERE ",
            $crate::store::webhook_document_sql!($organization, $encounter, $document)
        )
    };
    (update, $organization:literal, $encounter:literal, $document:literal, $occurred:literal) => {
        concat!(
            "UPDATE documents SET
                 transcript_state = 'pending', transcript_attempts = 0, transcript_next_at_ns = NULL,
                 audio_state = CASE WHEN audio_state IN ('unavailable', 'not_ready') THEN NULL ELSE audio_state END,
                 audio_attempts = CASE WHEN audio_state IN ('unavailable', 'not_ready') THEN 0 ELSE audio_attempts END,
                 audio_next_at_ns = CASE WHEN audio_state IN ('unavailable', 'not_ready') THEN NULL
                     ELSE audio_next_at_ns END
             WHERE ",
            $crate::store::webhook_document_sql!($organization, $encounter, $document),
            " AND NOT ",
            $crate::store::transcript_current_sql!($occurred)
        )
    };
}
use queue_transcript_now_sql;

/// The routes a run disabled, stored as one comma-separated text (`sync_runs.disabled_routes`).
fn split_routes(stored: Option<String>) -> Vec<String> {
    stored
        .map(|d| {
            d.split(',')
                .map(str::trim)
                .filter(|r| !r.is_empty())
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

/// Lowercase hex of a digest: content hashes, transcript digests, recording file names.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut out, b| {
            let _ = write!(out, "{b:02x}");
            out
        })
}

/// Runs warehouse work on a blocking thread: every backend blocks, and no async task calls one
/// (the sync goes through [`Writer`]; one-shot work such as opening, migrating or a command's
/// few queries comes here).
pub async fn blocking<T, F>(f: F) -> anyhow::Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> anyhow::Result<T> + Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| anyhow::anyhow!("the database work was interrupted: {e}"))?
}

/// The newest migration a backend's embedded `runner` holds: the schema version of a current
/// warehouse (0 for none).
fn newest_migration(runner: &refinery::Runner) -> i64 {
    runner
        .get_migrations()
        .iter()
        .map(|m| i64::from(m.version()))
        .max()
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_sql_list_of_unfinished_statuses_is_the_rust_one_and_anything_else_may_be_final() {
        let quoted: Vec<String> = super::UNFINISHED_DOCUMENT_STATUSES
            .iter()
            .map(|s| format!("'{s}'"))
            .collect();
        assert_eq!(unfinished_document_statuses!(), quoted.join(", "));
        assert_eq!(
            may_be_final_sql!("d.status"),
            format!("lower(coalesce(d.status, '')) NOT IN ({})", quoted.join(", "))
        );
        for status in [Some("completed"), Some("Finalized"), Some("signed"), None] {
            assert!(super::may_be_final(status), "{status:?}");
        }
        for status in ["processing", "Processing", "in_progress", "draft"] {
            assert!(!super::may_be_final(Some(status)), "{status}");
        }
    }
}
