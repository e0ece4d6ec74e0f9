//! The SQLite warehouse: connection setup (pragmas on every connection), embedded refinery
//! migrations, and the single writer thread through which every write goes. The store never does
//! network I/O, and async tasks never call rusqlite directly: they send closures to [`Writer`].

mod content;
mod ledger;
mod privacy;
mod upsert;

use std::path::Path;
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use anyhow::Context;
use rusqlite::{Connection, OpenFlags};

pub use content::{
    DetailOutcome, RecordingRecord, TranscriptRecord, Work, WorkItem, claim_work, dead_letter,
    mark_unavailable, queue_missing_audio, save_detail, save_recording, save_transcript,
    transcript_not_ready,
};
pub use ledger::{
    Backfill, RunCounts, RunEnd, RunOutcome, WindowCompletion, abort_stale_runs, complete_through,
    deep_revisit_at, finish_backfill, finish_run, live_ids_in_range, next_backfill, open_backfill,
    queue_backfill, set_deep_revisit_at, start_run,
};
pub use privacy::{PurgeCounts, apply_privacy, last_retention_purge, purge};
pub use upsert::{DocumentRecord, EncounterRecord, PageCounts, PatientRecord, Removal, commit_page};

mod embedded {
    refinery::embed_migrations!("migrations");
}

/// Opens (creating if needed) the warehouse for writing, applies pending migrations, and
/// returns the connection. Parent directories must exist: creating them is the operator's (or
/// systemd's `StateDirectory=`) decision.
pub fn open_writer(path: &Path, busy_timeout: Duration) -> anyhow::Result<Connection> {
    let mut conn =
        Connection::open(path).with_context(|| format!("cannot open database {}", path.display()))?;
    configure(&conn, busy_timeout)
        .with_context(|| format!("cannot configure database {}", path.display()))?;
    embedded::migrations::runner()
        .run(&mut conn)
        .with_context(|| format!("cannot apply migrations to {}", path.display()))?;
    Ok(conn)
}

/// Opens the warehouse read-only, for `status` and for tests; works while the daemon writes.
pub fn open_reader(path: &Path, busy_timeout: Duration) -> anyhow::Result<Connection> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .with_context(|| format!("cannot open database {} read-only", path.display()))?;
    conn.busy_timeout(busy_timeout)?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    Ok(conn)
}

/// The pragmas every writing connection gets. WAL lets analysts read while we write;
/// `synchronous=NORMAL` is durable across application crashes in WAL mode (a power loss can
/// only roll back the last transactions, never corrupt).
fn configure(conn: &Connection, busy_timeout: Duration) -> anyhow::Result<()> {
    conn.busy_timeout(busy_timeout)?;
    let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        anyhow::bail!("the database refused WAL mode (got {mode}); is it on a network filesystem?");
    }
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    // PHI that is overwritten or deleted (a re-fetched transcript, a changed privacy policy, a
    // purge) is zeroed on the spot instead of lingering in free space until a VACUUM.
    conn.pragma_update(None, "secure_delete", "ON")?;
    Ok(())
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
    conn.pragma_update(None, "journal_size_limit", bytes as i64)?;
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

type Job = Box<dyn FnOnce(&mut Connection) + Send>;

/// The one thread that owns the writing connection. Work arrives as closures, runs in order,
/// and answers through a oneshot channel, so async code awaits writes without blocking a worker.
pub struct Writer {
    jobs: Option<mpsc::Sender<Job>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Writer {
    pub fn spawn(mut conn: Connection) -> Writer {
        let (tx, rx) = mpsc::channel::<Job>();
        let thread = thread::Builder::new()
            .name("sqlite-writer".into())
            .spawn(move || {
                for job in rx {
                    job(&mut conn);
                }
            })
            .expect("spawning the writer thread");
        Writer {
            jobs: Some(tx),
            thread: Some(thread),
        }
    }

    /// Runs `f` on the writer thread and returns its result.
    pub async fn call<T, F>(&self, f: F) -> anyhow::Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> anyhow::Result<T> + Send + 'static,
    {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move |conn| {
            // The receiver is gone only if the caller was cancelled; the work is done either way.
            let _ = tx.send(f(conn));
        });
        self.jobs
            .as_ref()
            .expect("jobs is only taken in drop")
            .send(job)
            .map_err(|_| anyhow::anyhow!("the database writer thread has stopped"))?;
        rx.await
            .map_err(|_| anyhow::anyhow!("the database writer thread stopped during a write"))?
    }
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
    }
}
