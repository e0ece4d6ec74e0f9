//! The SQLite warehouse: connection setup (pragmas on every connection), embedded refinery
//! migrations, and the single writer thread through which every write goes. The store never does
//! network I/O, and async tasks never call rusqlite directly: they send closures to [`Writer`].
//! Errors leave the store's entry points ([`open_writer`], [`Writer`]'s answers) as a classified
//! [`StoreError`] naming the database path; functions a closure calls keep `anyhow` contexts.

mod audit;
mod content;
mod error;
mod ledger;
mod privacy;
mod upsert;

use std::path::Path;
use std::sync::{Arc, mpsc};
use std::thread;
use std::time::Duration;

use anyhow::Context;
use rusqlite::{Connection, OpenFlags, Transaction};

pub use audit::{
    Audit, AuditTally, advance_audit, audit_due, audit_failed, block_agrees, finish_audit,
    live_count_in_range, nth_live_created_ns, open_audit,
};
pub use content::{
    DetailOutcome, RecordingRecord, TranscriptRecord, Work, WorkItem, claim_work, dead_letter,
    mark_unavailable, queue_missing_audio, save_detail, save_recording, save_transcript,
    transcript_not_ready,
};
pub use error::{StoreError, StoreErrorKind};
pub use ledger::{
    Backfill, RunCounts, RunEnd, RunOutcome, WindowCompletion, abort_stale_runs, claim_organization_id,
    complete_through, deep_revisit_at, finish_backfill, finish_run, known_organization_id, live_ids_in_range,
    next_backfill, open_backfill, queue_backfill, set_deep_revisit_at, start_run,
};
pub use privacy::{PurgeCounts, apply_privacy, last_retention_purge, purge, purged_ranges};
pub use upsert::{DocumentRecord, EncounterRecord, PageCounts, PatientRecord, Removal, commit_page};

mod embedded {
    refinery::embed_migrations!("migrations");
}

/// Why the warehouse's location cannot work; a configuration error naming `database.path`.
#[derive(Debug, thiserror::Error)]
#[error("invalid value for `database.path`: {0}")]
pub struct LocationError(String);

impl LocationError {
    /// What is wrong, without the `database.path` prefix (for `check`'s table).
    pub fn reason(&self) -> &str {
        &self.0
    }
}

/// Checks, without creating anything, that a writer can use `path`: its directory exists and
/// this user may create files in it, and the database (if it exists) is a regular file this user
/// may read and write. `check` reports the answer; `run`, `sync` and `migrate` refuse to start
/// (exit 2) instead of failing later on the lock file, in a restart loop.
pub fn check_location(path: &Path) -> Result<(), LocationError> {
    use rustix::fs::{Access, access};
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let shown = |p: &Path| p.display().to_string();
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => {
            return Err(LocationError(format!("{} is not a directory", shown(dir))));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(LocationError(format!(
                "the directory {} does not exist; create it (the runbook's `install -d`, or systemd's StateDirectory=)",
                shown(dir)
            )));
        }
        Err(e) => {
            return Err(LocationError(format!(
                "cannot reach the directory {}: {e}",
                shown(dir)
            )));
        }
    }
    if let Err(e) = access(dir, Access::WRITE_OK | Access::EXEC_OK) {
        return Err(LocationError(format!(
            "this user cannot create files in {} ({e}); the database, its -wal/-shm and lock files live there",
            shown(dir)
        )));
    }
    match std::fs::metadata(path) {
        Ok(m) if !m.is_file() => Err(LocationError(format!("{} is not a regular file", shown(path)))),
        Ok(_) => access(path, Access::READ_OK | Access::WRITE_OK)
            .map_err(|e| LocationError(format!("this user cannot read and write {} ({e})", shown(path)))),
        Err(_) => Ok(()),
    }
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
    let fail = |e: anyhow::Error| StoreError::new(path, e);
    let mut conn = Connection::open(path)
        .with_context(|| format!("cannot open database {}", path.display()))
        .map_err(fail)?;
    configure(&conn, busy_timeout)
        .with_context(|| format!("cannot configure database {}", path.display()))
        .map_err(fail)?;
    embedded::migrations::runner()
        .run(&mut conn)
        .with_context(|| format!("cannot apply migrations to {}", path.display()))
        .map_err(fail)?;
    share_with_directory_group(path);
    Ok(conn)
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

/// Runs SQLite work on a blocking thread: rusqlite blocks, and no async task calls it (the
/// sync goes through [`Writer`]; one-shot work such as opening, migrating or a command's few
/// queries comes here).
pub async fn blocking<T, F>(f: F) -> anyhow::Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> anyhow::Result<T> + Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| anyhow::anyhow!("the database work was interrupted: {e}"))?
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
    let has_history: bool = conn.query_row(
        "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'refinery_schema_history')",
        [],
        |r| r.get(0),
    )?;
    let applied: i64 = if has_history {
        conn.query_row(
            "SELECT coalesce(max(version), 0) FROM refinery_schema_history",
            [],
            |r| r.get(0),
        )?
    } else {
        0
    };
    let known = embedded::migrations::runner()
        .get_migrations()
        .iter()
        .map(|m| i64::from(m.version()))
        .max()
        .unwrap_or(0);
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
        if mode & 0o007 != 0
            && let Err(e) = std::fs::set_permissions(&file, std::fs::Permissions::from_mode(mode & !0o007))
        {
            tracing::warn!(file = %file.display(), "cannot remove others' access to the database file ({e})");
        }
    }
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

/// Most writes one shared transaction takes before it commits, and how long it may keep taking
/// them: enough to write each hot index page once per group instead of once per page of
/// encounters, little enough that readers see progress within a fraction of a second.
const MAX_GROUP_WRITES: usize = 64;
const MAX_GROUP_TIME: Duration = Duration::from_millis(250);

/// WAL pages after which a commit copies the WAL into the database. SQLite's default (1,000
/// pages, 4 MB) makes a bulk load spend much of its time checkpointing (and fsyncing); 16 MB
/// checkpoints a fourth as often. `database.wal_size_limit` still bounds what is kept afterwards.
const WAL_AUTOCHECKPOINT_PAGES: i64 = 4_096;

/// Page cache of the writing connection, in KiB (SQLite's default is 2 MiB). Random
/// 16-character keys touch index pages all over the file; with 16 MiB the hot index pages stay
/// cached instead of being re-read through the kernel, which halved the writer's system time in
/// a 100,000-encounter backfill. It is most of the process's memory (see BENCHMARKS.md).
const WRITER_CACHE_KIB: i64 = 16 * 1024;

/// Why a group's transaction did not commit, for every write in it: the message, and the kind
/// of the error that caused it (writes rolled back because the disk was full fail as
/// `DiskFull` too).
#[derive(Debug, Clone)]
struct Abort {
    why: String,
    kind: StoreErrorKind,
}

impl Abort {
    /// `what` happened because of `e`; the message is `e`'s cause (the headline naming the
    /// database is added once, by the `StoreError` each write is answered with).
    fn new(what: &str, e: &StoreError) -> Abort {
        Abort {
            why: format!("{what}: {:#}", e.cause()),
            kind: e.kind(),
        }
    }
}

/// A grouped write after it ran (or could not run): whether it failed, and how to answer its
/// caller once the transaction has ended.
struct Ran {
    error: Option<Abort>,
    /// Given why the transaction did not commit, if it did not.
    answer: Answer,
}

type Answer = Box<dyn FnOnce(Option<&Abort>, &Path) + Send>;

/// A grouped write: given the shared transaction, or why none could be started, and the
/// database's path (for its errors).
type GroupedWrite = Box<dyn FnOnce(Result<&Transaction<'_>, &Abort>, &Path) -> Ran + Send>;

/// A write on its own: given the connection and the database's path.
type AloneWrite = Box<dyn FnOnce(&mut Connection, &Path) + Send>;

enum Job {
    /// Runs on its own, outside any transaction (it may open its own).
    Alone(AloneWrite),
    /// Runs inside a write transaction shared with the grouped writes queued behind it; given
    /// the error instead when no transaction could be started.
    Grouped(GroupedWrite),
}

/// The one thread that owns the writing connection. Work arrives as closures, runs in order,
/// and answers through a oneshot channel, so async code awaits writes without blocking a worker.
///
/// Writes submitted with [`Writer::write`] are *group-committed*: while the thread is busy,
/// such writes queue up, and the next transaction takes all of them and commits once. Every
/// write is answered only after its transaction ended, so "answered Ok" means committed. If one
/// write of a group fails, the whole transaction rolls back and every write in it fails.
///
/// Every answer's error is a [`StoreError`] naming the database and classified by the first
/// rusqlite error in the closure's error chain (or, for a write rolled back with its group, by
/// the error that rolled the group back).
pub struct Writer {
    jobs: Option<mpsc::Sender<Job>>,
    thread: Option<thread::JoinHandle<()>>,
    /// The database file, for errors raised on this side of the channel.
    path: Arc<Path>,
}

/// A write queued with [`Writer::write`]; resolves once it has committed (or failed).
pub struct Pending<T> {
    answer: Result<tokio::sync::oneshot::Receiver<Result<T, StoreError>>, StoreError>,
    path: Arc<Path>,
}

impl<T> std::future::IntoFuture for Pending<T>
where
    T: Send + 'static,
{
    type Output = Result<T, StoreError>;
    type IntoFuture = std::pin::Pin<Box<dyn std::future::Future<Output = Result<T, StoreError>> + Send>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(async move {
            self.answer?.await.map_err(|_| {
                StoreError::new(
                    &self.path,
                    anyhow::anyhow!("the database writer thread stopped during a write"),
                )
            })?
        })
    }
}

impl Writer {
    pub fn spawn(mut conn: Connection) -> Writer {
        // SQLite's own name for the main database: absolute, whatever the configuration said.
        let path: Arc<Path> = Path::new(conn.path().filter(|p| !p.is_empty()).unwrap_or(":memory:")).into();
        let (tx, rx) = mpsc::channel::<Job>();
        let thread_path = path.clone();
        let thread = thread::Builder::new()
            .name("sqlite-writer".into())
            .spawn(move || {
                let mut next = rx.recv().ok();
                while let Some(job) = next {
                    let held = match job {
                        Job::Alone(f) => {
                            f(&mut conn, &thread_path);
                            None
                        }
                        Job::Grouped(f) => run_group(&mut conn, &thread_path, f, &rx),
                    };
                    next = held.or_else(|| rx.recv().ok());
                }
            })
            .expect("spawning the writer thread");
        Writer {
            jobs: Some(tx),
            thread: Some(thread),
            path,
        }
    }

    fn send(&self, job: Job) -> Result<(), StoreError> {
        self.jobs
            .as_ref()
            .expect("jobs is only taken in drop")
            .send(job)
            .map_err(|_| self.stopped("the database writer thread has stopped"))
    }

    fn stopped(&self, what: &'static str) -> StoreError {
        StoreError::new(&self.path, anyhow::anyhow!(what))
    }

    /// Runs `f` on the writer thread, outside any transaction, and returns its result.
    pub async fn call<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> anyhow::Result<T> + Send + 'static,
    {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.send(Job::Alone(Box::new(move |conn, path| {
            // The receiver is gone only if the caller was cancelled; the work is done either way.
            let _ = tx.send(f(conn).map_err(|e| StoreError::new(path, e)));
        })))?;
        rx.await
            .map_err(|_| self.stopped("the database writer thread stopped during a write"))?
    }

    /// Queues `f` to run inside a write transaction (possibly shared with other queued writes)
    /// and returns at once; the returned [`Pending`] resolves after the transaction ended.
    /// Writes run in the order they were queued, with [`Writer::call`]s in between.
    pub fn write<T, F>(&self, f: F) -> Pending<T>
    where
        T: Send + 'static,
        F: FnOnce(&Transaction<'_>) -> anyhow::Result<T> + Send + 'static,
    {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let job = Job::Grouped(Box::new(move |transaction, path| {
            let result = match transaction {
                Ok(t) => f(t).map_err(|e| StoreError::new(path, e)),
                Err(abort) => Err(StoreError::with_kind(
                    path,
                    abort.kind,
                    anyhow::anyhow!("{}", abort.why),
                )),
            };
            Ran {
                error: result
                    .as_ref()
                    .err()
                    .map(|e| Abort::new("another write in the same transaction failed", e)),
                answer: Box::new(move |aborted, path| {
                    let answer = match (result, aborted) {
                        (Ok(_), Some(abort)) => Err(StoreError::with_kind(
                            path,
                            abort.kind,
                            anyhow::anyhow!("the write was not committed: {}", abort.why),
                        )),
                        (result, _) => result,
                    };
                    let _ = tx.send(answer);
                }),
            }
        }));
        Pending {
            answer: self.send(job).map(|()| rx),
            path: self.path.clone(),
        }
    }
}

/// Runs `first` and the grouped writes queued behind it in one transaction, then answers them
/// all. Returns a job it took from the queue but could not add to the group.
fn run_group(
    conn: &mut Connection,
    path: &Path,
    first: GroupedWrite,
    rx: &mpsc::Receiver<Job>,
) -> Option<Job> {
    let tx = match conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate) {
        Ok(tx) => tx,
        Err(e) => {
            let abort = Abort::new(
                "cannot start a write transaction",
                &StoreError::new(path, e.into()),
            );
            (first(Err(&abort), path).answer)(Some(&abort), path);
            return None;
        }
    };
    let started = std::time::Instant::now();
    let mut ran = vec![first(Ok(&tx), path)];
    let mut failure = ran[0].error.clone();
    let mut held = None;
    while failure.is_none() && ran.len() < MAX_GROUP_WRITES && started.elapsed() < MAX_GROUP_TIME {
        match rx.try_recv() {
            Ok(Job::Grouped(f)) => {
                let r = f(Ok(&tx), path);
                failure = r.error.clone();
                ran.push(r);
            }
            Ok(other) => {
                held = Some(other);
                break;
            }
            Err(_) => break,
        }
    }
    // Dropping the transaction rolls it back (also when COMMIT itself failed: rusqlite's drop
    // issues the ROLLBACK that SQLite asks for after SQLITE_FULL or SQLITE_IOERR).
    let aborted = match failure {
        Some(abort) => Some(abort),
        None => tx
            .commit()
            .err()
            .map(|e| Abort::new("cannot commit", &StoreError::new(path, e.into()))),
    };
    for r in ran {
        (r.answer)(aborted.as_ref(), path);
    }
    held
}

impl Drop for Writer {
    /// Finishes queued writes and closes the connection before returning.
    fn drop(&mut self) {
        drop(self.jobs.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::future::IntoFuture;

    use futures_util::FutureExt;
    use rusqlite::OptionalExtension;

    use super::*;

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
             INSERT INTO documents (document_id, encounter_id, position, schema_type, content_text, first_seen_at, changed_at)
                 VALUES ('d1', 'e1', 0, 'document', 'metformin', 't', 't');
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
        let writer = Writer::spawn(open_writer(&dir.path().join("w.db"), Duration::from_secs(1)).unwrap());
        writer
            .call(|c| Ok(c.execute("INSERT INTO sync_state VALUES ('a', '1')", [])?))
            .await
            .unwrap();
        let v: String = writer
            .call(|c| Ok(c.query_row("SELECT value FROM sync_state WHERE name = 'a'", [], |r| r.get(0))?))
            .await
            .unwrap();
        assert_eq!(v, "1");
        let err = writer
            .call(|c| Ok(c.execute("INSERT INTO nope VALUES (1)", [])?))
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
        let writer = Writer::spawn(open_writer(&path, Duration::from_secs(1)).unwrap());
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

    fn set(name: &'static str) -> impl FnOnce(&Transaction<'_>) -> anyhow::Result<i64> + Send + 'static {
        move |tx| {
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
        let bad = writer.write(|tx| Ok(tx.execute("INSERT INTO nope VALUES (1)", [])?));
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
        let writer = Writer::spawn(open_writer(&dir.path().join("w.db"), Duration::from_secs(1)).unwrap());
        let release = hold(&writer);
        let a = writer.write(set("a"));
        let between = writer.call(|c| {
            // Outside any transaction, after `a` committed.
            assert!(c.is_autocommit());
            Ok(c.query_row("SELECT count(*) FROM sync_state", [], |r| r.get::<_, i64>(0))?)
        });
        drop(release);
        let (a, between) = tokio::join!(a.into_future(), between);
        assert_eq!((a.unwrap(), between.unwrap()), (1, 1));
        assert_eq!(writer.write(set("b")).await.unwrap(), 2);
    }
}
