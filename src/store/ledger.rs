//! Sync bookkeeping: the `sync_runs` row of every cycle, the window ledger, and the live
//! watermark (the end of the last completed live window: everything created before it is known
//! to be complete).

use rusqlite::{Connection, OptionalExtension, Transaction, params};
use time::OffsetDateTime;

use crate::timefmt::{format_utc, parse_rfc3339, unix_nanos};

const LIVE_WATERMARK: &str = "live_watermark";

/// A window whose every page has been read; recorded in the same transaction as its last page.
#[derive(Debug, Clone)]
pub struct WindowCompletion {
    pub run_id: i64,
    pub kind: &'static str,
    pub start_at: OffsetDateTime,
    pub end_at: OffsetDateTime,
    pub records_seen: u64,
    pub total: u64,
    pub pages: u64,
    pub id_set_hash: String,
    /// Advance the live watermark to `end_at`.
    pub advances_watermark: bool,
}

pub(super) fn record_window(tx: &Transaction, w: &WindowCompletion, now: OffsetDateTime) -> rusqlite::Result<()> {
    tx.prepare_cached(
        "INSERT INTO sync_windows (run_id, kind, start_at, end_at, start_at_ns, end_at_ns,
             records_seen, total, pages, id_set_hash, completed_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
    )?
    .execute(params![
        w.run_id,
        w.kind,
        format_utc(w.start_at),
        format_utc(w.end_at),
        unix_nanos(w.start_at),
        unix_nanos(w.end_at),
        w.records_seen as i64,
        w.total as i64,
        w.pages as i64,
        w.id_set_hash,
        format_utc(now),
    ])?;
    if w.advances_watermark {
        tx.prepare_cached(
            "INSERT INTO sync_state (name, value) VALUES (?1, ?2)
             ON CONFLICT (name) DO UPDATE SET value = excluded.value",
        )?
        .execute(params![LIVE_WATERMARK, format_utc(w.end_at)])?;
    }
    Ok(())
}

/// The end of the last completed live window, if any.
pub fn live_watermark(conn: &Connection) -> anyhow::Result<Option<OffsetDateTime>> {
    let text: Option<String> = conn
        .query_row("SELECT value FROM sync_state WHERE name = ?1", [LIVE_WATERMARK], |r| r.get(0))
        .optional()?;
    text.map(|t| parse_rfc3339(&t).map_err(|e| anyhow::anyhow!("corrupt live watermark in sync_state: {e}")))
        .transpose()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunOutcome {
    Succeeded,
    Failed,
    /// Stopped on request (a signal) before finishing.
    Aborted,
}

/// Counters of one cycle, written to its `sync_runs` row.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RunCounts {
    pub list_requests: u64,
    pub windows: u64,
    pub encounters_new: u64,
    pub encounters_changed: u64,
    pub encounters_unchanged: u64,
    pub encounters_removed: u64,
    pub rescans: u64,
    pub splits: u64,
}

/// Marks runs left 'running' by a process that died as 'aborted'; returns how many.
pub fn abort_stale_runs(conn: &Connection, now: OffsetDateTime) -> anyhow::Result<usize> {
    Ok(conn.execute(
        "UPDATE sync_runs SET outcome = 'aborted', finished_at = ?1,
             error = coalesce(error, 'the process stopped before the cycle finished')
         WHERE outcome = 'running'",
        [format_utc(now)],
    )?)
}

pub fn start_run(conn: &Connection, trigger: &str, now: OffsetDateTime) -> anyhow::Result<i64> {
    conn.execute(
        "INSERT INTO sync_runs (started_at, outcome, trigger) VALUES (?1, 'running', ?2)",
        params![format_utc(now), trigger],
    )?;
    Ok(conn.last_insert_rowid())
}

pub fn finish_run(
    conn: &Connection,
    run_id: i64,
    outcome: RunOutcome,
    counts: &RunCounts,
    error: Option<(&str, Option<&str>)>,
    now: OffsetDateTime,
) -> anyhow::Result<()> {
    let outcome = match outcome {
        RunOutcome::Succeeded => "succeeded",
        RunOutcome::Failed => "failed",
        RunOutcome::Aborted => "aborted",
    };
    conn.execute(
        "UPDATE sync_runs SET finished_at = ?2, outcome = ?3, list_requests = ?4, windows = ?5,
             encounters_new = ?6, encounters_changed = ?7, encounters_unchanged = ?8,
             encounters_removed = ?9, rescans = ?10, splits = ?11, error = ?12, reason_code = ?13
         WHERE run_id = ?1",
        params![
            run_id,
            format_utc(now),
            outcome,
            counts.list_requests as i64,
            counts.windows as i64,
            counts.encounters_new as i64,
            counts.encounters_changed as i64,
            counts.encounters_unchanged as i64,
            counts.encounters_removed as i64,
            counts.rescans as i64,
            counts.splits as i64,
            error.map(|e| e.0),
            error.and_then(|e| e.1),
        ],
    )?;
    Ok(())
}
