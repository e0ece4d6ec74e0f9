//! The SQLite implementation of the store seam: connection setup (pragmas on every
//! connection), embedded refinery migrations, the SQL of every [`Backend`] and [`WriteTx`]
//! operation (`upsert`, `ledger`, `audit`, `content`, `privacy`), the read-only connection
//! `status` and tests use, and `export`, every table read back for `charthero-sync copy`. The only module that names rusqlite; it runs on the writer thread or
//! in `store::blocking`, never on an async worker. Functions here keep `anyhow` contexts; the
//! seam's entry points classify them into a [`StoreError`] naming the database path.

mod audit;
mod content;
mod error;
pub(crate) mod export;
mod ledger;
mod privacy;
pub(crate) mod staging;
mod status;
mod upsert;
mod webhook;

use std::collections::HashSet;
use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use rusqlite::{Connection, OpenFlags, OptionalExtension};
use time::OffsetDateTime;

pub use audit::{
    advance_audit, audit_due, audit_failed, block_agrees, finish_audit, live_count_in_range,
    nth_live_created_ns, open_audit,
};
pub use content::{
    claim_work, dead_letter, mark_unavailable, not_ready, queue_missing_audio, save_detail, save_recording,
    save_transcript,
};
pub use ledger::{
    abort_stale_runs, claim_organization_id, complete_through, finish_backfill, finish_run,
    known_organization_id, live_ids_in_range, next_backfill, open_backfill, queue_backfill, recorded_clinics,
    set_state_time, start_run, state_time, write_counts,
};
pub use privacy::{apply_privacy, last_retention_purge, purge, purged_ranges};
pub use upsert::commit_page;

use super::{
    Audit, AuditTally, Backend, Backfill, DetailOutcome, EncounterRecord, GroupEnd, PageCounts, PurgeCounts,
    Reader, RecordingRecord, Removal, RunCounts, RunEnd, RunOutcome, StateTime, StoreError, TableCounts,
    TranscriptRecord, WebhookEvent, WebhookState, WindowCompletion, Work, WorkItem, WriteTx,
};
use crate::config::PrivacyConfig;
use crate::status::Status;
pub(crate) use error::classify;

mod embedded {
    refinery::embed_migrations!("migrations/sqlite");
}

/// Opens (creating if needed) the warehouse for writing, applies pending migrations, and
/// returns the connection. Parent directories must exist: creating them is the operator's (or
/// systemd's `StateDirectory=`) decision.
///
/// The database and its `-wal`/`-shm` files are given the group of their directory (as a setgid
/// directory would) and no access for others, so analysts in that group (`charthero-readers`)
/// can read them whoever started the writer; and the WAL is *persistent*: closing the last
/// connection leaves `-wal` (empty after the checkpoint) and `-shm` in place, because a reader
/// who may not create files in the directory cannot open a WAL database without them.
///
/// Errors are classified ([`StoreError`]): a file that is not a database or is damaged is
/// `Corrupt`, a full disk `DiskFull`, and so on.
pub fn open_writer(path: &Path, busy_timeout: Duration) -> Result<Connection, StoreError> {
    let fail = |e: anyhow::Error| StoreError::new(path.display(), e);
    let mut conn = Connection::open(path)
        .with_context(|| format!("cannot open database {}", path.display()))
        .map_err(fail)?;
    configure(&conn, busy_timeout)
        .with_context(|| format!("cannot configure database {}", path.display()))
        .map_err(fail)?;
    keep_temporary_files_beside(&conn, path);
    // All pending migrations in one transaction with their history rows: a reader (`status`
    // beside the first `sync`) sees no warehouse or a whole one, never a half-made schema, and
    // a crash leaves the schema where it was.
    embedded::migrations::runner()
        .set_grouped(true)
        .run(&mut conn)
        .with_context(|| format!("cannot apply migrations to {}", path.display()))
        .map_err(fail)?;
    share_with_directory_group(path);
    Ok(conn)
}

/// Opens an existing warehouse to add a row next to a running daemon (`charthero-sync backfill`
/// queues one), without migrating it — migrations belong to the one writer that holds the lock —
/// and only if its schema is exactly the one this release knows: an older one needs `migrate`
/// (or a daemon start) first, a newer one was written by a newer release.
pub fn open_current(path: &Path, busy_timeout: Duration) -> anyhow::Result<Connection> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .with_context(|| {
        format!(
            "cannot open the warehouse {} (does it exist? `charthero-sync migrate` creates it)",
            path.display()
        )
    })?;
    set_busy_timeout(&conn, busy_timeout)?;
    // A busy or damaged database is reported as such, not as a schema to migrate.
    let applied = applied_version(&conn)?;
    let known = latest_version();
    match applied.cmp(&known) {
        std::cmp::Ordering::Equal => Ok(conn),
        std::cmp::Ordering::Less => anyhow::bail!(
            "the warehouse {} has schema version {applied}; this release needs {known}: run \
             `charthero-sync migrate` (or start the daemon once) first",
            path.display()
        ),
        std::cmp::Ordering::Greater => anyhow::bail!(
            "the warehouse {} has schema version {applied}, newer than this release knows ({known}): \
             use the release that wrote it",
            path.display()
        ),
    }
}

/// The newest migration applied to the warehouse `conn` is open on (0 for none: a new file).
pub fn applied_version(conn: &Connection) -> anyhow::Result<i64> {
    let has_history: bool = conn.query_row(
        "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'refinery_schema_history')",
        [],
        |r| r.get(0),
    )?;
    if !has_history {
        return Ok(0);
    }
    Ok(conn.query_row(
        "SELECT coalesce(max(version), 0) FROM refinery_schema_history",
        [],
        |r| r.get(0),
    )?)
}

/// The newest migration this release embeds: the schema version of a current warehouse.
pub fn latest_version() -> i64 {
    super::newest_migration(&embedded::migrations::runner())
}

/// Opens the warehouse read-only, for `status` and for tests; works while the daemon writes.
pub fn open_reader(path: &Path, busy_timeout: Duration) -> anyhow::Result<Connection> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .with_context(|| format!("cannot open database {} read-only", path.display()))?;
    set_busy_timeout(&conn, busy_timeout)?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    Ok(conn)
}

/// `PRAGMA busy_timeout` in milliseconds, saturating: rusqlite's `busy_timeout` panics above
/// `i32::MAX` ms (banned in clippy.toml); `database.busy_timeout` is bounded far below anyway.
pub fn set_busy_timeout(conn: &Connection, timeout: Duration) -> rusqlite::Result<()> {
    let ms = i64::try_from(timeout.as_millis())
        .unwrap_or(i64::MAX)
        .min(i64::from(i32::MAX));
    conn.pragma_update(None, "busy_timeout", ms)
}

/// The pragmas every writing connection gets. WAL lets analysts read while we write;
/// `synchronous=NORMAL` is durable across application crashes in WAL mode (a power loss can
/// only roll back the last transactions, never corrupt).
fn configure(conn: &Connection, busy_timeout: Duration) -> anyhow::Result<()> {
    set_busy_timeout(conn, busy_timeout)?;
    let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        anyhow::bail!("the database refused WAL mode (got {mode}); is it on a network filesystem?");
    }
    // Keep -wal and -shm when the last connection closes: SQLite can open a WAL database on a
    // read-only connection without write access to the directory only if both exist (SQLite
    // 3.22+). The -wal is still checkpointed and cut back to journal_size_limit on close.
    let mut persist: std::os::raw::c_int = 1;
    conn.file_control(
        Some(rusqlite::MAIN_DB),
        rusqlite::FileControl::PersistWal(&mut persist),
    )?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    // PHI that is overwritten or deleted (a re-fetched transcript, a changed privacy policy, a
    // purge) is zeroed on the spot instead of lingering in free space until a VACUUM.
    conn.pragma_update(None, "secure_delete", "ON")?;
    conn.pragma_update(None, "wal_autocheckpoint", WAL_AUTOCHECKPOINT_PAGES)?;
    conn.pragma_update(None, "cache_size", -WRITER_CACHE_KIB)?;
    Ok(())
}

/// Has SQLite make the writer process's temporary files (the statement journals, sorters and
/// temporary tables that outgrow memory) in the warehouse's own directory rather than in
/// `$TMPDIR` or `/var/tmp`: they hold images of the warehouse's pages (note text, transcript
/// turns, names), so they belong on the warehouse's filesystem under its directory's
/// permissions, like its `-wal` (docs/operations.md, "Memory and temporary files"); SQLite makes
/// them unnamed (`O_TMPFILE`) or unlinks them at once.
///
/// The setting is SQLite's, for the whole process, and is set once, by the first writer opened
/// (a process writes one warehouse): SQLite reads it unguarded when it makes an `O_TMPFILE`, so
/// replacing it while another connection spills would free the string under that read. Best
/// effort: a directory SQLite cannot write or name is logged, and one that disappears later
/// (a test's) sends temporary files back to SQLite's defaults.
fn keep_temporary_files_beside(conn: &Connection, path: &Path) {
    static SET: std::sync::Once = std::sync::Once::new();
    SET.call_once(|| {
        let dir = std::fs::canonicalize(path)
            .map_err(anyhow::Error::from)
            .and_then(|p| {
                p.parent()
                    .and_then(Path::to_str)
                    .map(str::to_owned)
                    .ok_or_else(|| anyhow::anyhow!("its directory is not a UTF-8 path"))
            });
        if let Err(e) = dir.and_then(|dir| Ok(conn.pragma_update(None, "temp_store_directory", dir)?)) {
            tracing::warn!(
                database = %path.display(),
                "SQLite's temporary files stay in the system's temporary directory: {e:#}"
            );
        }
    });
}

/// Gives the database files (and the writer lock beside them) the group of their directory and
/// takes every permission away from others, where this process owns them; run as root, it also
/// hands them to the directory's owner, so that a `sync` an operator ran as root does not leave
/// files the service can no longer write. Best effort: a failure is logged, never fatal (the
/// writer can still use the files; only readers would be affected).
fn share_with_directory_group(path: &Path) {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let Ok(dir_meta) = std::fs::metadata(dir) else {
        return;
    };
    let group = rustix::fs::Gid::from_raw(dir_meta.gid());
    let dir_owner = rustix::fs::Uid::from_raw(dir_meta.uid());
    let me = rustix::process::geteuid();
    for suffix in ["", "-wal", "-shm", ".lock"] {
        let mut name = path.as_os_str().to_owned();
        name.push(suffix);
        let file = std::path::PathBuf::from(name);
        let Ok(meta) = std::fs::symlink_metadata(&file) else {
            continue;
        };
        if !meta.is_file() || (meta.uid() != me.as_raw() && !me.is_root()) {
            continue;
        }
        let owner = (me.is_root() && meta.uid() != dir_owner.as_raw()).then_some(dir_owner);
        if (owner.is_some() || meta.gid() != group.as_raw())
            && let Err(e) = rustix::fs::chown(&file, owner, Some(group))
        {
            tracing::warn!(
                file = %file.display(),
                "cannot give the database file its directory's owner and group ({e}); readers in that group may not open it"
            );
        }
        let mode = meta.permissions().mode() & 0o7777;
        // Readers need the group's read on the database and its logs; the lock file is the
        // writer's alone (`daemon::lock`).
        let wanted = if suffix == ".lock" {
            mode & 0o700
        } else {
            mode & !0o007
        };
        if mode != wanted
            && let Err(e) = std::fs::set_permissions(&file, std::fs::Permissions::from_mode(wanted))
        {
            tracing::warn!(file = %file.display(), "cannot remove others' access to the database file ({e})");
        }
    }
}

/// The file beside the database whose `flock` the one writer holds (`daemon::lock`).
pub fn lock_path(database: &Path) -> std::path::PathBuf {
    let mut p = database.as_os_str().to_owned();
    p.push(".lock");
    std::path::PathBuf::from(p)
}

/// Whether the process holding the writer's lock of the database at `database` is alive: it
/// touches the lock file every 2 s (`daemon::lock`), so a modification within `grace` of `now`
/// says so. `None` when the lock file cannot be seen (a reader that may not search the
/// directory, a database opened through a symbolic link, whose lock is beside the link).
fn writer_alive(database: &Path, now: OffsetDateTime, grace: time::Duration) -> Option<bool> {
    let touched = std::fs::metadata(lock_path(database)).ok()?.modified().ok()?;
    Some(now - OffsetDateTime::from(touched) <= grace)
}

/// Rebuilds both full-text indexes from the text they index.
pub fn rebuild_search(conn: &Connection) -> anyhow::Result<()> {
    conn.execute(
        "INSERT INTO transcript_turns_fts (transcript_turns_fts) VALUES ('rebuild')",
        [],
    )?;
    conn.execute("INSERT INTO notes_fts (notes_fts) VALUES ('rebuild')", [])?;
    Ok(())
}

/// Sets how far the WAL is cut back after a checkpoint.
pub fn set_wal_size_limit(conn: &Connection, bytes: u64) -> anyhow::Result<()> {
    conn.pragma_update(
        None,
        "journal_size_limit",
        i64::try_from(bytes).unwrap_or(i64::MAX),
    )?;
    Ok(())
}

/// Moves the WAL into the database and truncates it if no reader is in the way; readers that
/// are keep their snapshot and the next checkpoint catches up.
pub fn checkpoint(conn: &Connection) -> anyhow::Result<()> {
    // TRUNCATE waits (busy_timeout) for readers to move to the newest snapshot; readers that
    // keep starting can still win, so try a few times before settling for a passive copy.
    for _ in 0..5 {
        let busy: i64 = conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| r.get(0))?;
        if busy == 0 {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    tracing::warn!("readers kept the WAL from being truncated; it is cut back at the next checkpoint");
    conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))?;
    Ok(())
}

/// Every row `sql` answers, each value as text (`None` for NULL, numbers as Rust renders them),
/// for tests that compare this backend's rows with another backend's.
#[cfg(test)]
pub(crate) fn rows_as_text(conn: &Connection, sql: &str) -> anyhow::Result<Vec<Vec<Option<String>>>> {
    use rusqlite::types::ValueRef;
    let mut stmt = conn.prepare(sql)?;
    let width = stmt.column_count();
    let mut rows = stmt.query([])?;
    let mut out = Vec::new();
    while let Some(row) = rows.next()? {
        let values = (0..width)
            .map(|i| {
                Ok(match row.get_ref(i)? {
                    ValueRef::Null => None,
                    ValueRef::Integer(n) => Some(n.to_string()),
                    ValueRef::Real(x) => Some(x.to_string()),
                    ValueRef::Text(t) => Some(String::from_utf8(t.to_vec())?),
                    ValueRef::Blob(_) => anyhow::bail!("column {i} of {sql:?} is a blob"),
                })
            })
            .collect::<anyhow::Result<_>>()?;
        out.push(values);
    }
    Ok(out)
}

/// WAL pages after which a commit copies the WAL into the database. SQLite's default (1,000
/// pages, 4 MB) makes a bulk load spend much of its time checkpointing (and fsyncing); 16 MB
/// checkpoints a fourth as often. `database.wal_size_limit` still bounds what is kept afterwards.
const WAL_AUTOCHECKPOINT_PAGES: i64 = 4_096;

/// Page cache of the writing connection, in KiB (SQLite's default is 2 MiB). Random
/// 16-character keys touch index pages all over the file; with 16 MiB the hot index pages stay
/// cached instead of being re-read through the kernel, which halved the writer's system time in
/// a 100,000-encounter backfill. It is most of the process's memory (see BENCHMARKS.md).
const WRITER_CACHE_KIB: i64 = 16 * 1024;

/// The writes of a group, on the connection inside its open transaction.
impl WriteTx for Connection {
    fn commit_page(
        &self,
        records: &[EncounterRecord],
        removals: &[Removal],
        completion: Option<&WindowCompletion>,
        now: OffsetDateTime,
    ) -> anyhow::Result<PageCounts> {
        commit_page(self, records, removals, completion, now)
    }
    fn save_detail(
        &self,
        item: &WorkItem,
        outcome: &DetailOutcome,
        audio: bool,
        now: OffsetDateTime,
    ) -> anyhow::Result<()> {
        staging::merge_before(self)?;
        save_detail(self, item, outcome, audio, now)
    }
    fn save_transcript(
        &self,
        item: &WorkItem,
        t: &TranscriptRecord,
        now: OffsetDateTime,
    ) -> anyhow::Result<()> {
        staging::merge_before(self)?;
        save_transcript(self, item, t, now)
    }
    fn not_ready(&self, item: &WorkItem, schedule: &[Duration], now: OffsetDateTime) -> anyhow::Result<()> {
        staging::merge_before(self)?;
        not_ready(self, item, schedule, now)
    }
    fn mark_unavailable(&self, item: &WorkItem) -> anyhow::Result<()> {
        staging::merge_before(self)?;
        mark_unavailable(self, item)
    }
    fn requeue_content(&self, organization_id: &str, start_ns: i64, end_ns: i64) -> anyhow::Result<u64> {
        staging::merge_before(self)?;
        content::requeue_content(self, organization_id, start_ns, end_ns)
    }
    fn save_recording(
        &self,
        encounter_id: &str,
        document_id: &str,
        r: &RecordingRecord,
        now: OffsetDateTime,
    ) -> anyhow::Result<()> {
        staging::merge_before(self)?;
        save_recording(self, encounter_id, document_id, r, now)
    }
    fn dead_letter(
        &self,
        organization: &str,
        item: &WorkItem,
        run_id: i64,
        reason_code: Option<&str>,
        error: &str,
        now: OffsetDateTime,
    ) -> anyhow::Result<()> {
        staging::merge_before(self)?;
        dead_letter(self, organization, item, run_id, reason_code, error, now)
    }
    #[cfg(test)]
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

/// The warehouse's reads, on any connection: the writer's, or [`open_reader`]'s read-only one.
impl Reader for Connection {
    fn writer_present(&self, now: OffsetDateTime, grace: time::Duration) -> Option<bool> {
        self.path()
            .filter(|p| !p.is_empty())
            .and_then(|p| writer_alive(Path::new(p), now, grace))
    }
    fn complete_through(&self, organization: &str) -> anyhow::Result<Option<OffsetDateTime>> {
        complete_through(self, organization)
    }
    fn state_time(&self, organization: &str, which: StateTime) -> anyhow::Result<Option<OffsetDateTime>> {
        state_time(self, organization, which)
    }
    fn known_organization_id(&self, organization: &str) -> anyhow::Result<Option<String>> {
        known_organization_id(self, organization)
    }
    fn recorded_clinics(&self) -> anyhow::Result<Vec<(String, String)>> {
        recorded_clinics(self)
    }
    fn live_count_in_range(
        &self,
        organization_id: Option<&str>,
        start_ns: i64,
        end_ns: i64,
    ) -> anyhow::Result<u64> {
        staging::merge_before(self)?;
        let stored = live_count_in_range(self, organization_id, start_ns, end_ns)?;
        // The writer merged what was staged; on a read-only connection (`status`) staged
        // encounters stay staged: count them too.
        if !self.is_readonly(rusqlite::MAIN_DB)? {
            return Ok(stored);
        }
        Ok(stored + status::staged_in_range(self, organization_id, start_ns, end_ns)?)
    }
    fn status(&self, now: OffsetDateTime, configured: &[String]) -> anyhow::Result<Status> {
        staging::merge_before(self)?;
        status::read_status(self, now, configured)
    }
    fn live_content_counts(&self) -> anyhow::Result<[i64; 4]> {
        staging::merge_before(self)?;
        status::live_content_counts(self)
    }
    fn table_counts(&self) -> anyhow::Result<TableCounts> {
        staging::merge_before(self)?;
        let count = |table: &str| -> anyhow::Result<i64> {
            Ok(self.query_row(&format!("SELECT count(*) FROM {table}"), [], |r| r.get(0))?)
        };
        Ok(TableCounts {
            encounters: count("encounters")?,
            patients: count("patients")?,
            documents: count("documents")?,
            notes: count("documents WHERE content_text IS NOT NULL")?,
            transcripts: count("transcripts")?,
            turns: count("transcript_turns")?,
        })
    }
    fn marker(&self, name: &str) -> anyhow::Result<Option<String>> {
        Ok(self
            .query_row("SELECT value FROM sync_state WHERE name = ?1", [name], |r| {
                r.get(0)
            })
            .optional()?)
    }
}

/// The warehouse on one connection: the writer's ([`open_writer`]) or `backfill`'s
/// ([`open_current`]).
impl Backend for Connection {
    fn location(&self) -> String {
        // SQLite's own name for the main database: absolute, whatever the configuration said.
        Connection::path(self)
            .filter(|p| !p.is_empty())
            .unwrap_or(":memory:")
            .to_owned()
    }

    fn write_group(&mut self, body: &mut dyn FnMut(&dyn WriteTx) -> bool) -> GroupEnd {
        let tx = match self.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate) {
            Ok(tx) => tx,
            Err(e) => return GroupEnd::CannotBegin(e.into()),
        };
        if !body(&*tx) {
            // Dropping the transaction rolls it back.
            return GroupEnd::RolledBack;
        }
        // A failed COMMIT is rolled back by the transaction's drop (the ROLLBACK that SQLite
        // asks for after SQLITE_FULL or SQLITE_IOERR).
        match tx.commit() {
            Ok(()) => GroupEnd::Committed,
            Err(e) => GroupEnd::CannotCommit(e.into()),
        }
    }

    fn set_state_time(&self, organization: &str, which: StateTime, at: OffsetDateTime) -> anyhow::Result<()> {
        set_state_time(self, organization, which, at)
    }
    fn claim_organization_id(
        &self,
        organization: &str,
        organization_id: &str,
        now: OffsetDateTime,
    ) -> anyhow::Result<Result<(), String>> {
        claim_organization_id(self, organization, organization_id, now)
    }
    fn live_ids_in_range(
        &self,
        organization_id: &str,
        start: OffsetDateTime,
        end: OffsetDateTime,
    ) -> anyhow::Result<Vec<String>> {
        live_ids_in_range(self, organization_id, start, end)
    }
    fn open_backfill(
        &self,
        organization: &str,
        start: OffsetDateTime,
        end: OffsetDateTime,
        requested_by: &str,
        now: OffsetDateTime,
    ) -> anyhow::Result<Backfill> {
        open_backfill(self, organization, start, end, requested_by, now)
    }
    fn queue_backfill(
        &self,
        organization: &str,
        start: OffsetDateTime,
        end: OffsetDateTime,
        requested_by: &str,
        now: OffsetDateTime,
    ) -> anyhow::Result<i64> {
        // Only the queue row: `backfill` calls this next to a running writer, whose staged
        // rows are its own to merge.
        queue_backfill(self, organization, start, end, requested_by, now)
    }
    fn record_webhook_event(
        &self,
        organization: &str,
        event: &WebhookEvent,
        delivery_id: &str,
        now: OffsetDateTime,
    ) -> anyhow::Result<bool> {
        // Only the event's row: the receiver answers a delivery without waiting for a merge.
        webhook::record_webhook_event(self, organization, event, delivery_id, now)
    }
    fn pending_webhook_events(&self, organization: &str, limit: usize) -> anyhow::Result<Vec<WebhookEvent>> {
        webhook::pending_webhook_events(self, organization, limit)
    }
    fn settle_webhook_event(
        &self,
        organization: &str,
        event_id: &str,
        state: WebhookState,
        now: OffsetDateTime,
    ) -> anyhow::Result<()> {
        webhook::settle_webhook_event(self, organization, event_id, state, now)
    }
    fn dead_letters_left(&self, organization: &str) -> anyhow::Result<Vec<(Work, i64)>> {
        staging::merge_before(self)?;
        content::dead_letters_left(self, organization)
    }
    fn prune_webhook_events(&self, organization: &str, before: OffsetDateTime) -> anyhow::Result<u64> {
        webhook::prune_webhook_events(self, organization, before)
    }
    fn webhook_event_failed(
        &self,
        organization: &str,
        event_id: &str,
        max_attempts: u32,
        now: OffsetDateTime,
    ) -> anyhow::Result<bool> {
        webhook::webhook_event_failed(self, organization, event_id, max_attempts, now)
    }
    fn transcript_state(
        &self,
        organization_id: &str,
        encounter_id: &str,
        document_id: &str,
        occurred_at: OffsetDateTime,
    ) -> anyhow::Result<Option<String>> {
        staging::merge_before(self)?;
        webhook::transcript_state(self, organization_id, encounter_id, document_id, occurred_at)
    }
    fn queue_transcript_now(
        &self,
        organization_id: &str,
        encounter_id: &str,
        document_id: &str,
        occurred_at: OffsetDateTime,
    ) -> anyhow::Result<bool> {
        staging::merge_before(self)?;
        webhook::queue_transcript_now(self, organization_id, encounter_id, document_id, occurred_at)
    }
    fn next_backfill(&self, organization: &str) -> anyhow::Result<Option<(OffsetDateTime, OffsetDateTime)>> {
        next_backfill(self, organization)
    }
    fn finish_backfill(
        &self,
        backfill_id: i64,
        error: Option<&str>,
        now: OffsetDateTime,
    ) -> anyhow::Result<()> {
        finish_backfill(self, backfill_id, error, now)
    }
    fn abort_stale_runs(&self, organization: &str, now: OffsetDateTime) -> anyhow::Result<usize> {
        abort_stale_runs(self, organization, now)
    }
    fn start_run(&self, organization: &str, trigger: &str, now: OffsetDateTime) -> anyhow::Result<i64> {
        start_run(self, organization, trigger, now)
    }
    fn record_progress(
        &self,
        organization: &str,
        run_id: i64,
        counts: &RunCounts,
        now: OffsetDateTime,
    ) -> anyhow::Result<()> {
        let tx = self.unchecked_transaction()?;
        write_counts(&tx, run_id, counts)?;
        set_state_time(&tx, organization, StateTime::Heartbeat, now)?;
        Ok(tx.commit()?)
    }
    fn finish_run(&self, run_id: i64, end: &RunEnd, now: OffsetDateTime) -> anyhow::Result<()> {
        // Every cycle leaves the rows it read visible to analysts. If the merge cannot run (a
        // full disk), the run still ends — as failed, with the merge's error, if it had not
        // failed already — and the next cycle's first read of the warehouse merges.
        let Err(merge) = staging::merge_before(self) else {
            return finish_run(self, run_id, end, now);
        };
        let failed = match end.outcome {
            RunOutcome::Succeeded | RunOutcome::Partial => RunEnd {
                outcome: RunOutcome::Failed,
                error: Some(format!("cannot merge the staged rows: {merge:#}")),
                ..end.clone()
            },
            RunOutcome::Failed | RunOutcome::Aborted => end.clone(),
        };
        finish_run(self, run_id, &failed, now)?;
        Err(merge)
    }

    fn open_audit(
        &self,
        organization: &str,
        start: OffsetDateTime,
        end: OffsetDateTime,
        requested_by: &str,
        now: OffsetDateTime,
    ) -> anyhow::Result<Audit> {
        open_audit(self, organization, start, end, requested_by, now)
    }
    fn audit_due(
        &self,
        organization: &str,
        every: time::Duration,
        now: OffsetDateTime,
    ) -> anyhow::Result<bool> {
        audit_due(self, organization, every, now)
    }
    fn advance_audit(&self, audit_id: i64, cursor: OffsetDateTime, tally: &AuditTally) -> anyhow::Result<()> {
        advance_audit(self, audit_id, cursor, tally)
    }
    fn finish_audit(&self, audit_id: i64, now: OffsetDateTime) -> anyhow::Result<()> {
        finish_audit(self, audit_id, now)
    }
    fn audit_failed(&self, audit_id: i64, error: &str) -> anyhow::Result<()> {
        audit_failed(self, audit_id, error)
    }
    fn nth_live_created_ns(
        &self,
        organization_id: Option<&str>,
        start_ns: i64,
        end_ns: i64,
        n: u64,
    ) -> anyhow::Result<Option<i64>> {
        staging::merge_before(self)?;
        nth_live_created_ns(self, organization_id, start_ns, end_ns, n)
    }
    fn block_agrees(
        &self,
        organization_id: Option<&str>,
        start_ns: i64,
        end_ns: i64,
        offset: u64,
        block: &[(String, i64)],
    ) -> anyhow::Result<bool> {
        staging::merge_before(self)?;
        block_agrees(self, organization_id, start_ns, end_ns, offset, block)
    }

    fn claim_work(
        &self,
        organization_id: Option<&str>,
        run_id: i64,
        skip: &[Work],
        exclude: &HashSet<(Work, String)>,
        limit: usize,
        now: OffsetDateTime,
    ) -> anyhow::Result<Vec<WorkItem>> {
        // A list-only cycle still asks (with every kind skipped): nothing to claim, so nothing
        // to merge for, and a backfill's staged pages keep growing to a full merge.
        if Work::all_skipped(skip) {
            return Ok(Vec::new());
        }
        staging::merge_before(self)?;
        claim_work(self, organization_id, run_id, skip, exclude, limit, now)
    }
    fn queue_missing_audio(&self, organization_id: Option<&str>) -> anyhow::Result<usize> {
        staging::merge_before(self)?;
        queue_missing_audio(self, organization_id)
    }

    fn apply_privacy(&mut self, privacy: &PrivacyConfig) -> anyhow::Result<bool> {
        // Merges first only when the policy changed (a cycle's start calls this every time).
        apply_privacy(self, privacy)
    }
    fn purge(
        &mut self,
        audio_dir: &Path,
        start: OffsetDateTime,
        end: OffsetDateTime,
        reason: &str,
        now: OffsetDateTime,
    ) -> anyhow::Result<PurgeCounts> {
        staging::merge_before(self)?;
        purge(self, audio_dir, start, end, reason, now)
    }
    fn purged_ranges(&self) -> anyhow::Result<Vec<(i64, i64)>> {
        Ok(purged_ranges(self)?)
    }
    fn last_retention_purge(&self) -> anyhow::Result<Option<OffsetDateTime>> {
        last_retention_purge(self)
    }

    fn checkpoint(&self) -> anyhow::Result<()> {
        checkpoint(self)
    }
    fn set_wal_size_limit(&self, bytes: u64) -> anyhow::Result<()> {
        set_wal_size_limit(self, bytes)
    }
    fn rebuild_search(&self) -> anyhow::Result<()> {
        staging::merge_before(self)?;
        rebuild_search(self)
    }
    fn set_marker(&self, name: &str) -> anyhow::Result<()> {
        self.execute(
            "INSERT INTO sync_state (name, value) VALUES (?1, 'yes') ON CONFLICT DO NOTHING",
            [name],
        )?;
        Ok(())
    }

    #[cfg(test)]
    fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
        self
    }
}

#[cfg(test)]
mod tests {
    use std::future::IntoFuture;

    use futures_util::FutureExt;

    use super::*;

    /// `status` tells a killed writer from a live one by when its lock file was last touched.
    #[test]
    fn the_writer_is_alive_while_its_lock_file_was_touched_within_the_grace() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("w.db");
        let now = OffsetDateTime::now_utc();
        let grace = time::Duration::seconds(10);
        assert_eq!(writer_alive(&db, now, grace), None, "no lock file: cannot tell");
        let file = std::fs::File::create(lock_path(&db)).unwrap();
        assert_eq!(writer_alive(&db, now, grace), Some(true));
        let touched = std::time::SystemTime::from(now - time::Duration::seconds(11));
        file.set_modified(touched).unwrap();
        assert_eq!(writer_alive(&db, now, grace), Some(false));
        assert_eq!(
            writer_alive(&db, now - time::Duration::seconds(2), grace),
            Some(true)
        );
    }
    use crate::store::{StoreErrorKind, Writer};

    /// The connection behind the writer's backend, for statements of these tests' own.
    fn sql(backend: &mut dyn Backend) -> &Connection {
        backend
            .as_any_mut()
            .downcast_mut::<Connection>()
            .expect("the SQLite backend")
    }

    /// The connection inside a group's transaction.
    fn sql_in(tx: &dyn WriteTx) -> &Connection {
        tx.as_any()
            .downcast_ref::<Connection>()
            .expect("the SQLite backend")
    }

    #[test]
    fn migrations_apply_twice_without_change_and_pragmas_hold() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.db");
        drop(open_writer(&path, Duration::from_secs(1)).unwrap());
        let conn = open_writer(&path, Duration::from_secs(1)).unwrap();
        let mode: String = conn.query_row("PRAGMA journal_mode", [], |r| r.get(0)).unwrap();
        let fk: i64 = conn.query_row("PRAGMA foreign_keys", [], |r| r.get(0)).unwrap();
        let sync: i64 = conn.query_row("PRAGMA synchronous", [], |r| r.get(0)).unwrap();
        assert_eq!((mode.as_str(), fk, sync), ("wal", 1, 1));
        let tables: i64 = conn
            .query_row(
                "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name IN
                 ('encounters','patients','documents','transcripts','transcript_turns','sync_runs')",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(tables, 6);
    }

    /// Pending migrations apply together or not at all: one that fails leaves the warehouse at
    /// the version it had, not half-upgraded (nor does a reader ever see a half-made schema).
    #[test]
    fn a_failed_upgrade_leaves_the_warehouse_at_its_version() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.db");
        let mut conn = Connection::open(&path).unwrap();
        embedded::migrations::runner()
            .set_target(refinery::Target::Version(10))
            .run(&mut conn)
            .unwrap();
        // What V12 creates already exists: V11 applies, V12 fails.
        conn.execute_batch("CREATE TABLE dead_letters_waiting (x)")
            .unwrap();
        drop(conn);
        let err = open_writer(&path, Duration::from_secs(1)).unwrap_err();
        assert!(format!("{err:#}").contains("dead_letters_waiting"), "{err:#}");
        let conn = Connection::open(&path).unwrap();
        assert_eq!(applied_version(&conn).unwrap(), 10);
        let webhook_events: bool = conn
            .query_row(
                "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE name = 'webhook_events')",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert!(!webhook_events, "V11 stayed applied");
    }

    /// A warehouse written by the release before V5: timestamps of every precision, and search
    /// indexes that FTS5's secure-delete has already turned into file format 5.
    fn v4_warehouse(path: &Path) {
        let mut conn = Connection::open(path).unwrap();
        embedded::migrations::runner()
            .set_target(refinery::Target::Version(4))
            .run(&mut conn)
            .unwrap();
        conn.execute_batch(
            "INSERT INTO patients VALUES ('p1', 'Ada', 'Lovelace', '1815-12-10', '2026-05-25T14:00:00Z', '2026-05-25T14:00:00.5Z');
             INSERT INTO encounters VALUES ('e1', 'o', 'ambient', 'completed', '2026-05-25T14:00:00.123456789Z',
                 '2026-05-25T15:00:00Z', '2026-05-25T14:00:00.1Z', 'p1', NULL, NULL, 0, 0, 'h', '{}',
                 '2026-05-25T14:00:00.000001Z', '2026-05-25T14:00:00.12Z');
             INSERT INTO documents (document_id, encounter_id, position, schema_type, content_text,
                                    first_seen_at, changed_at, detail_updated_at)
                 VALUES ('d1', 'e1', 0, 'document', 'metformin twice daily', '2026-05-25T14:00:00Z',
                         '2026-05-25T14:00:00Z', 'not a timestamp');
             INSERT INTO documents (document_id, encounter_id, position, schema_type, content_text,
                                    first_seen_at, changed_at)
                 VALUES ('d2', 'e1', 1, 'document', 'lisinopril', '2026-05-25T14:00:00Z', '2026-05-25T14:00:00Z');
             DELETE FROM documents WHERE document_id = 'd2';
             INSERT INTO sync_state VALUES ('complete_through', '2026-05-25T16:00:00.25Z'),
                                           ('privacy_policy', 'names=true');",
        )
        .unwrap();
        let version: i64 = conn
            .query_row("SELECT v FROM notes_fts_config WHERE k = 'version'", [], |r| {
                r.get(0)
            })
            .unwrap();
        assert_eq!(version, 5, "the old schema's secure-delete wrote format 5");
    }

    #[test]
    fn v5_pads_every_timestamp_to_one_width_keeps_the_instants_and_rewrites_search_to_format_4() {
        use crate::timefmt::{STORED_WIDTH, format_stored, parse_rfc3339};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.db");
        v4_warehouse(&path);
        let conn = open_writer(&path, Duration::from_secs(1)).unwrap();
        let row: Vec<String> = conn
            .query_row(
                "SELECT created_at, updated_at, date_of_service, first_seen_at, changed_at FROM encounters",
                [],
                |r| (0..5).map(|i| r.get(i)).collect(),
            )
            .unwrap();
        let before = [
            "2026-05-25T14:00:00.123456789Z",
            "2026-05-25T15:00:00Z",
            "2026-05-25T14:00:00.1Z",
            "2026-05-25T14:00:00.000001Z",
            "2026-05-25T14:00:00.12Z",
        ];
        for (old, new) in before.iter().zip(&row) {
            assert_eq!(new.len(), STORED_WIDTH, "{new}");
            assert_eq!(*new, format_stored(parse_rfc3339(old).unwrap()));
        }
        assert_eq!(row[1], "2026-05-25T15:00:00.000000000Z");
        let (complete, policy): (String, String) = conn
            .query_row(
                // V6 moved the watermark to organization `default`, as V5 padded it.
                "SELECT (SELECT value FROM organization_state
                          WHERE organization = 'default' AND name = 'complete_through'),
                        (SELECT value FROM sync_state WHERE name = 'privacy_policy')",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        assert_eq!(complete, "2026-05-25T16:00:00.250000000Z");
        assert_eq!(policy, "names=true");
        // What is not a timestamp is left alone; padding is not a change of the encounter.
        let odd: String = conn
            .query_row("SELECT detail_updated_at FROM documents", [], |r| r.get(0))
            .unwrap();
        assert_eq!(odd, "not a timestamp");
        let history: i64 = conn
            .query_row("SELECT count(*) FROM encounter_history", [], |r| r.get(0))
            .unwrap();
        assert_eq!(history, 1, "only the insert's 'created'");
        // Both indexes: format 4, no secure-delete, still finding what they index.
        for table in ["notes_fts", "transcript_turns_fts"] {
            let config: Vec<(String, i64)> = conn
                .prepare(&format!("SELECT k, v FROM {table}_config ORDER BY k"))
                .unwrap()
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
                .unwrap()
                .map(Result::unwrap)
                .collect();
            assert_eq!(config, vec![("version".to_owned(), 4)], "{table}");
        }
        let hits: i64 = conn
            .query_row(
                "SELECT count(*) FROM notes_fts WHERE notes_fts MATCH 'metformin'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        let gone: i64 = conn
            .query_row(
                "SELECT count(*) FROM notes_fts WHERE notes_fts MATCH 'lisinopril'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!((hits, gone), (1, 0));
        let sql: String = conn
            .query_row(
                "SELECT sql FROM sqlite_master WHERE name = 'notes_fts'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert!(sql.contains(r#"content="documents""#), "{sql}");
    }

    #[test]
    fn deletes_keep_the_search_index_in_the_format_sqlite_3_40_reads() {
        let dir = tempfile::tempdir().unwrap();
        let conn = open_writer(&dir.path().join("w.db"), Duration::from_secs(1)).unwrap();
        conn.execute_batch(
            "INSERT INTO encounters VALUES ('e1', 'o', NULL, NULL, 't', 't', NULL, NULL, NULL, NULL, 0, 0, 'h', '{}', 't', 't');
             INSERT INTO documents (document_id, encounter_id, position, schema_type, first_seen_at, changed_at)
                 VALUES ('d1', 'e1', 0, 'document', 't', 't');
             UPDATE documents SET content_text = 'metformin';
             UPDATE documents SET content_text = 'insulin';
             DELETE FROM documents;",
        )
        .unwrap();
        privacy::compact_search(&conn).unwrap();
        let version: i64 = conn
            .query_row("SELECT v FROM notes_fts_config WHERE k = 'version'", [], |r| {
                r.get(0)
            })
            .unwrap();
        assert_eq!(version, 4);
        let left: i64 = conn
            .query_row("SELECT count(*) FROM notes_fts_data", [], |r| r.get(0))
            .unwrap();
        // After the merge only the structure and averages records remain: no segment holds a
        // term of the deleted rows.
        assert!(left <= 2, "{left} records left in notes_fts_data");
    }

    #[test]
    fn the_wal_files_outlive_the_writer_and_belong_to_the_directory_owner_and_group() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        // Run as root (as CI is), hand the directory to `nobody` first: the files must follow it.
        let root = rustix::process::geteuid().is_root();
        let nobody = rustix::fs::Uid::from_raw(65_534);
        let nogroup = rustix::fs::Gid::from_raw(65_534);
        if root {
            rustix::fs::chown(dir.path(), Some(nobody), Some(nogroup)).unwrap();
        }
        let path = dir.path().join("w.db");
        drop(open_writer(&path, Duration::from_secs(1)).unwrap());
        let dir_meta = std::fs::metadata(dir.path()).unwrap();
        for suffix in ["", "-wal", "-shm"] {
            let file = dir.path().join(format!("w.db{suffix}"));
            let meta = std::fs::metadata(&file).unwrap_or_else(|e| panic!("w.db{suffix} is gone: {e}"));
            assert_eq!(meta.gid(), dir_meta.gid(), "w.db{suffix}");
            if root {
                assert_eq!(meta.uid(), nobody.as_raw(), "w.db{suffix}");
            }
            assert_eq!(meta.mode() & 0o007, 0, "w.db{suffix} is open to others");
        }
    }

    #[tokio::test]
    async fn the_writer_runs_jobs_in_order_and_reports_errors() {
        let dir = tempfile::tempdir().unwrap();
        let writer = Writer::spawn(Box::new(
            open_writer(&dir.path().join("w.db"), Duration::from_secs(1)).unwrap(),
        ));
        writer
            .call(|c| Ok(sql(c).execute("INSERT INTO sync_state VALUES ('a', '1')", [])?))
            .await
            .unwrap();
        let v: String = writer
            .call(
                |c| Ok(sql(c).query_row("SELECT value FROM sync_state WHERE name = 'a'", [], |r| r.get(0))?),
            )
            .await
            .unwrap();
        assert_eq!(v, "1");
        let err = writer
            .call(|c| Ok(sql(c).execute("INSERT INTO nope VALUES (1)", [])?))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("nope"), "{err}");
        assert_eq!(err.kind(), StoreErrorKind::Other);
    }

    /// Holds the writer thread until the returned sender is dropped, so that writes queue up.
    fn hold(writer: &Writer) -> std::sync::mpsc::Sender<()> {
        let (release, held) = std::sync::mpsc::channel::<()>();
        // The first poll queues the job; nobody waits for its answer.
        let queued = writer
            .call(move |_| {
                let _ = held.recv();
                Ok(())
            })
            .now_or_never();
        assert!(queued.is_none());
        release
    }

    fn scratch_writer() -> (tempfile::TempDir, std::path::PathBuf, Writer) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.db");
        let writer = Writer::spawn(Box::new(open_writer(&path, Duration::from_secs(1)).unwrap()));
        (dir, path, writer)
    }

    fn state(path: &Path, name: &str) -> Option<String> {
        open_reader(path, Duration::from_secs(1))
            .unwrap()
            .query_row("SELECT value FROM sync_state WHERE name = ?1", [name], |r| {
                r.get(0)
            })
            .optional()
            .unwrap()
    }

    fn set(name: &'static str) -> impl FnOnce(&dyn WriteTx) -> anyhow::Result<i64> + Send + 'static {
        move |tx| {
            let tx = sql_in(tx);
            tx.execute("INSERT INTO sync_state VALUES (?1, 'x')", [name])?;
            Ok(tx.query_row("SELECT count(*) FROM sync_state", [], |r| r.get(0))?)
        }
    }

    #[tokio::test]
    async fn queued_writes_run_in_order_and_are_answered_after_they_commit() {
        let (_dir, path, writer) = scratch_writer();
        let release = hold(&writer);
        let a = writer.write(set("a"));
        let b = writer.write(set("b"));
        let c = writer.write(set("c"));
        // Queued, not yet run: a reader sees nothing.
        assert_eq!(state(&path, "a"), None);
        drop(release);
        assert_eq!((a.await.unwrap(), b.await.unwrap(), c.await.unwrap()), (1, 2, 3));
        for name in ["a", "b", "c"] {
            assert_eq!(state(&path, name).as_deref(), Some("x"), "{name}");
        }
    }

    #[tokio::test]
    async fn a_failed_write_rolls_back_its_whole_group_and_later_writes_proceed() {
        let (_dir, path, writer) = scratch_writer();
        let release = hold(&writer);
        let a = writer.write(set("a"));
        let bad = writer.write(|tx| Ok(sql_in(tx).execute("INSERT INTO nope VALUES (1)", [])?));
        let c = writer.write(set("c"));
        drop(release);
        let a = a.await.unwrap_err().to_string();
        assert!(a.contains("not committed") && a.contains("nope"), "{a}");
        assert!(bad.await.unwrap_err().to_string().contains("nope"));
        // The failure ended the group; the next write runs in a new transaction.
        assert_eq!(c.await.unwrap(), 1);
        assert_eq!(state(&path, "a"), None);
        assert_eq!(state(&path, "c").as_deref(), Some("x"));
    }

    #[tokio::test]
    async fn calls_between_writes_end_the_group_and_keep_the_order() {
        let dir = tempfile::tempdir().unwrap();
        let writer = Writer::spawn(Box::new(
            open_writer(&dir.path().join("w.db"), Duration::from_secs(1)).unwrap(),
        ));
        let release = hold(&writer);
        let a = writer.write(set("a"));
        let between = writer.call(|c| {
            // Outside any transaction, after `a` committed.
            let c = sql(c);
            assert!(c.is_autocommit());
            Ok(c.query_row("SELECT count(*) FROM sync_state", [], |r| r.get::<_, i64>(0))?)
        });
        drop(release);
        let (a, between) = tokio::join!(a.into_future(), between);
        assert_eq!((a.unwrap(), between.unwrap()), (1, 1));
        assert_eq!(writer.write(set("b")).await.unwrap(), 2);
    }
}
