//! Sync bookkeeping: the `sync_runs` row of every cycle, the window ledger, backfill progress,
//! and the `complete_through` watermark (everything created before it is known complete).

use rusqlite::{Connection, OptionalExtension, params};
use time::OffsetDateTime;

use crate::store::{Backfill, RunCounts, RunEnd, StateTime, WindowCompletion};
use crate::timefmt::{format_stored, parse_rfc3339, unix_nanos};

const COMPLETE_THROUGH: &str = "complete_through";

pub(super) fn record_window(
    tx: &Connection,
    w: &WindowCompletion,
    now: OffsetDateTime,
) -> anyhow::Result<()> {
    tx.prepare_cached(
        "INSERT INTO sync_windows (run_id, kind, backfill_id, start_at, end_at, start_at_ns, end_at_ns,
             records_seen, total, pages, passes, removed, id_set_hash, completed_at, organization)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)",
    )?
    .execute(params![
        w.run_id,
        w.kind,
        w.backfill_id,
        format_stored(w.start_at),
        format_stored(w.end_at),
        unix_nanos(w.start_at),
        unix_nanos(w.end_at),
        w.records_seen as i64,
        w.total as i64,
        w.pages as i64,
        w.passes as i64,
        w.removed as i64,
        w.id_set_hash,
        format_stored(now),
        &*w.organization,
    ])?;
    if w.advances_watermark && complete_through(tx, &w.organization)?.is_none_or(|t| t < w.end_at) {
        set_state(tx, &w.organization, COMPLETE_THROUGH, w.end_at)?;
    }
    if let Some(id) = w.backfill_id {
        tx.prepare_cached(
            "UPDATE backfills SET cursor = ?2, windows = windows + 1,
                 encounters_seen = encounters_seen + ?3, encounters_removed = encounters_removed + ?4
             WHERE backfill_id = ?1",
        )?
        .execute(params![
            id,
            format_stored(w.end_at),
            w.records_seen as i64,
            w.removed as i64
        ])?;
    }
    Ok(())
}

fn get_state(conn: &Connection, organization: &str, name: &str) -> anyhow::Result<Option<OffsetDateTime>> {
    let text: Option<String> = conn
        .prepare_cached("SELECT value FROM organization_state WHERE organization = ?1 AND name = ?2")?
        .query_row([organization, name], |r| r.get(0))
        .optional()?;
    text.map(|t| {
        parse_rfc3339(&t).map_err(|e| {
            anyhow::anyhow!("corrupt {name} of organization {organization} in organization_state: {e}")
        })
    })
    .transpose()
}

fn set_state(
    conn: &Connection,
    organization: &str,
    name: &str,
    value: OffsetDateTime,
) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "INSERT INTO organization_state (organization, name, value) VALUES (?1, ?2, ?3)
         ON CONFLICT (organization, name) DO UPDATE SET value = excluded.value",
    )?
    .execute(params![organization, name, format_stored(value)])?;
    Ok(())
}

/// Everything `organization` created before this instant has been listed completely (assuming
/// records become visible within the settle lag; see ARCHITECTURE.md).
pub fn complete_through(conn: &Connection, organization: &str) -> anyhow::Result<Option<OffsetDateTime>> {
    get_state(conn, organization, COMPLETE_THROUGH)
}

/// An instant kept for `organization`.
pub fn state_time(
    conn: &Connection,
    organization: &str,
    which: StateTime,
) -> anyhow::Result<Option<OffsetDateTime>> {
    get_state(conn, organization, which.name())
}

pub fn set_state_time(
    conn: &Connection,
    organization: &str,
    which: StateTime,
    at: OffsetDateTime,
) -> anyhow::Result<()> {
    Ok(set_state(conn, organization, which.name(), at)?)
}

/// The ChartHero `organization_id` the configured `organization` reads, once known.
pub fn known_organization_id(conn: &Connection, organization: &str) -> anyhow::Result<Option<String>> {
    Ok(conn
        .prepare_cached("SELECT organization_id FROM organizations WHERE organization = ?1")?
        .query_row([organization], |r| r.get::<_, Option<String>>(0))
        .optional()?
        .flatten())
}

/// Every configured name whose clinic is recorded, with ChartHero's `organization_id`.
pub fn recorded_clinics(conn: &Connection) -> anyhow::Result<Vec<(String, String)>> {
    let mut stmt = conn.prepare_cached(
        "SELECT organization, organization_id FROM organizations
         WHERE organization_id IS NOT NULL ORDER BY organization",
    )?;
    let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Records that `organization` reads ChartHero's `organization_id`. Refused (`Err` naming the
/// other name) when another configured organization already reads it: two keys of one clinic,
/// or keys mixed up between clinics. Idempotent for the same pair.
pub fn claim_organization_id(
    conn: &Connection,
    organization: &str,
    organization_id: &str,
    now: OffsetDateTime,
) -> anyhow::Result<Result<(), String>> {
    let holder: Option<String> = conn
        .query_row(
            "SELECT organization FROM organizations WHERE organization_id = ?1",
            [organization_id],
            |r| r.get(0),
        )
        .optional()?;
    match holder {
        Some(h) if h == organization => Ok(Ok(())),
        Some(h) => Ok(Err(h)),
        None => {
            conn.execute(
                "INSERT INTO organizations (organization, organization_id, first_seen_at) VALUES (?1, ?2, ?3)
                 ON CONFLICT (organization) DO UPDATE SET organization_id = excluded.organization_id
                 WHERE organization_id IS NULL",
                params![organization, organization_id, format_stored(now)],
            )?;
            Ok(Ok(()))
        }
    }
}

/// IDs of `organization_id`'s live (not removed) encounters created in `[start, end)`: the
/// candidates for removal when a complete listing of that window does not show them. Another
/// organization's rows are never candidates. Staged encounters (`staging`) count as stored: they
/// were listed, and will be merged live.
pub fn live_ids_in_range(
    conn: &Connection,
    organization_id: &str,
    start: OffsetDateTime,
    end: OffsetDateTime,
) -> anyhow::Result<Vec<String>> {
    let mut stmt = conn.prepare_cached(
        "SELECT encounter_id FROM encounters
         WHERE organization_id = ?3 AND created_at_ns >= ?1 AND created_at_ns < ?2 AND removed_at IS NULL
         UNION
         SELECT encounter_id FROM staged_encounters
         WHERE organization_id = ?3 AND created_at_ns >= ?1 AND created_at_ns < ?2",
    )?;
    let ids = stmt
        .query_map(
            params![unix_nanos(start), unix_nanos(end), organization_id],
            |r| r.get(0),
        )?
        .collect::<rusqlite::Result<_>>()?;
    Ok(ids)
}

/// Starts a backfill of `[start, end)`, or resumes the unfinished one with exactly that range.
pub fn open_backfill(
    conn: &Connection,
    organization: &str,
    start: OffsetDateTime,
    end: OffsetDateTime,
    requested_by: &str,
    now: OffsetDateTime,
) -> anyhow::Result<Backfill> {
    let (start_text, end_text) = (format_stored(start), format_stored(end));
    let existing: Option<(i64, Option<String>)> = conn
        .query_row(
            "SELECT backfill_id, cursor FROM backfills
             WHERE range_start = ?1 AND range_end = ?2 AND status IN ('queued', 'running')
               AND organization = ?3
             ORDER BY backfill_id LIMIT 1",
            params![start_text, end_text, organization],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?;
    let now_text = format_stored(now);
    let (backfill_id, cursor) = match existing {
        Some((id, cursor)) => {
            conn.execute(
                "UPDATE backfills SET status = 'running', started_at = coalesce(started_at, ?2)
                 WHERE backfill_id = ?1",
                params![id, now_text],
            )?;
            let cursor = cursor
                .map(|c| parse_rfc3339(&c).map_err(|e| anyhow::anyhow!("corrupt backfill cursor: {e}")))
                .transpose()?;
            (id, cursor.unwrap_or(start))
        }
        None => {
            conn.execute(
                "INSERT INTO backfills (range_start, range_end, status, requested_by, requested_at, started_at,
                     organization)
                 VALUES (?1, ?2, 'running', ?3, ?4, ?4, ?5)",
                params![start_text, end_text, requested_by, now_text, organization],
            )?;
            (conn.last_insert_rowid(), start)
        }
    };
    Ok(Backfill {
        backfill_id,
        start,
        end,
        cursor,
    })
}

/// Queues a backfill of `[start, end)` of `organization` for a running daemon; returns its id.
pub fn queue_backfill(
    conn: &Connection,
    organization: &str,
    start: OffsetDateTime,
    end: OffsetDateTime,
    requested_by: &str,
    now: OffsetDateTime,
) -> anyhow::Result<i64> {
    conn.execute(
        "INSERT INTO backfills (range_start, range_end, status, requested_by, requested_at, organization)
         VALUES (?1, ?2, 'queued', ?3, ?4, ?5)",
        params![
            format_stored(start),
            format_stored(end),
            requested_by,
            format_stored(now),
            organization
        ],
    )?;
    Ok(conn.last_insert_rowid())
}

/// The oldest backfill of `organization` not yet completed, if any.
pub fn next_backfill(
    conn: &Connection,
    organization: &str,
) -> anyhow::Result<Option<(OffsetDateTime, OffsetDateTime)>> {
    let row: Option<(String, String)> = conn
        .query_row(
            "SELECT range_start, range_end FROM backfills
             WHERE status IN ('queued', 'running') AND organization = ?1
             ORDER BY backfill_id LIMIT 1",
            [organization],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?;
    row.map(|(s, e)| {
        let parse = |t: &str| parse_rfc3339(t).map_err(|e| anyhow::anyhow!("corrupt backfill range: {e}"));
        Ok((parse(&s)?, parse(&e)?))
    })
    .transpose()
}

/// Marks a backfill completed, or records the error that interrupted it; an interrupted
/// backfill stays 'running' so that the next request for the same range resumes it.
pub fn finish_backfill(
    conn: &Connection,
    backfill_id: i64,
    error: Option<&str>,
    now: OffsetDateTime,
) -> anyhow::Result<()> {
    match error {
        None => conn.execute(
            "UPDATE backfills SET status = 'completed', finished_at = ?2, error = NULL WHERE backfill_id = ?1",
            params![backfill_id, format_stored(now)],
        )?,
        Some(e) => conn.execute("UPDATE backfills SET error = ?2 WHERE backfill_id = ?1", params![backfill_id, e])?,
    };
    Ok(())
}

/// Marks `organization`'s runs left 'running' by a process that died as 'aborted'; returns how
/// many. (Only one process writes the warehouse, and it runs one cycle per organization at a
/// time, so a 'running' row of this organization at the start of its cycle is stale; another
/// organization's running cycle is not.)
pub fn abort_stale_runs(conn: &Connection, organization: &str, now: OffsetDateTime) -> anyhow::Result<usize> {
    Ok(conn.execute(
        "UPDATE sync_runs SET outcome = 'aborted', finished_at = ?1,
             error = coalesce(error, 'the process stopped before the cycle finished')
         WHERE outcome = 'running' AND organization = ?2",
        params![format_stored(now), organization],
    )?)
}

pub fn start_run(
    conn: &Connection,
    organization: &str,
    trigger: &str,
    now: OffsetDateTime,
) -> anyhow::Result<i64> {
    conn.execute(
        "INSERT INTO sync_runs (started_at, outcome, trigger, organization) VALUES (?1, 'running', ?2, ?3)",
        params![format_stored(now), trigger, organization],
    )?;
    Ok(conn.last_insert_rowid())
}

/// Writes a run's counters, while it runs ([`crate::store::Backend::record_progress`]) and
/// when it ends.
pub fn write_counts(conn: &Connection, run_id: i64, counts: &RunCounts) -> anyhow::Result<()> {
    let columns = counts.columns();
    let set = columns
        .iter()
        .enumerate()
        .map(|(i, (name, _))| format!("{name} = ?{}", i + 2))
        .collect::<Vec<_>>()
        .join(", ");
    conn.prepare_cached(&format!("UPDATE sync_runs SET {set} WHERE run_id = ?1"))?
        .execute(rusqlite::params_from_iter(
            std::iter::once(run_id).chain(columns.iter().map(|(_, v)| *v)),
        ))?;
    Ok(())
}

pub fn finish_run(conn: &Connection, run_id: i64, end: &RunEnd, now: OffsetDateTime) -> anyhow::Result<()> {
    let tx = conn.unchecked_transaction()?;
    write_counts(&tx, run_id, &end.counts)?;
    tx.execute(
        "UPDATE sync_runs SET finished_at = ?2, outcome = ?3, error = ?4, reason_code = ?5, disabled_routes = ?6
         WHERE run_id = ?1",
        params![
            run_id,
            format_stored(now),
            end.outcome.as_str(),
            end.error,
            end.reason_code,
            end.disabled_routes,
        ],
    )?;
    tx.commit()?;
    Ok(())
}
