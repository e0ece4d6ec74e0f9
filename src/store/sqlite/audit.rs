//! The history audit's bookkeeping (the `audits` table) and the warehouse side of its
//! comparison: how many live encounters are stored for a `created_at` range, and where ranges of
//! a given size begin. The audit's algorithm lives in `sync::audit`; this module does no I/O
//! other than SQLite.

use rusqlite::{Connection, OptionalExtension, params};
use time::OffsetDateTime;

use crate::store::{Audit, AuditTally};
use crate::timefmt::{format_stored, parse_rfc3339};

fn parse(text: &str, what: &str) -> anyhow::Result<OffsetDateTime> {
    parse_rfc3339(text).map_err(|e| anyhow::anyhow!("corrupt audit {what}: {e}"))
}

/// Resumes the unfinished audit, or starts one of `[start, end)`.
pub fn open_audit(
    conn: &Connection,
    organization: &str,
    start: OffsetDateTime,
    end: OffsetDateTime,
    requested_by: &str,
    now: OffsetDateTime,
) -> anyhow::Result<Audit> {
    let running: Option<(i64, String, String, String)> = conn
        .query_row(
            "SELECT audit_id, range_start, range_end, cursor FROM audits
             WHERE status = 'running' AND organization = ?1
             ORDER BY audit_id LIMIT 1",
            [organization],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
        )
        .optional()?;
    if let Some((audit_id, s, e, c)) = running {
        return Ok(Audit {
            audit_id,
            start: parse(&s, "range")?,
            end: parse(&e, "range")?,
            cursor: parse(&c, "cursor")?,
        });
    }
    let start_text = format_stored(start);
    conn.execute(
        "INSERT INTO audits (range_start, range_end, cursor, status, requested_by, started_at, organization)
         VALUES (?1, ?2, ?1, 'running', ?3, ?4, ?5)",
        params![
            start_text,
            format_stored(end),
            requested_by,
            format_stored(now),
            organization
        ],
    )?;
    Ok(Audit {
        audit_id: conn.last_insert_rowid(),
        start,
        end,
        cursor: start,
    })
}

/// Whether the daemon should work on an audit: one is unfinished, or the last one completed
/// `every` ago — or, before the first audit, `every` after the first window was completed (the
/// first cycle has just listed all history).
pub fn audit_due(
    conn: &Connection,
    organization: &str,
    every: time::Duration,
    now: OffsetDateTime,
) -> anyhow::Result<bool> {
    let running: bool = conn.query_row(
        "SELECT EXISTS (SELECT 1 FROM audits WHERE status = 'running' AND organization = ?1)",
        [organization],
        |r| r.get(0),
    )?;
    if running {
        return Ok(true);
    }
    let last: Option<String> = conn
        .query_row(
            "SELECT max(finished_at) FROM audits WHERE status = 'completed' AND organization = ?1",
            [organization],
            |r| r.get(0),
        )
        .optional()?
        .flatten();
    let since = match last {
        Some(t) => Some(t),
        // The first window ever completed (rowid order is completion order; no scan).
        None => conn
            .query_row(
                "SELECT completed_at FROM sync_windows WHERE organization = ?1 ORDER BY window_id LIMIT 1",
                [organization],
                |r| r.get(0),
            )
            .optional()?,
    };
    Ok(match since {
        None => false,
        Some(t) => parse(&t, "time")? + every <= now,
    })
}

/// Records progress: everything before `cursor` is audited; `tally` is added to the row.
pub fn advance_audit(
    conn: &Connection,
    audit_id: i64,
    cursor: OffsetDateTime,
    tally: &AuditTally,
) -> anyhow::Result<()> {
    conn.execute(
        "UPDATE audits SET cursor = ?2, ranges = ranges + ?3, probes = probes + ?4,
             differing = differing + ?5, rescanned = rescanned + ?6, list_requests = list_requests + ?7
         WHERE audit_id = ?1",
        params![
            audit_id,
            format_stored(cursor),
            tally.ranges as i64,
            tally.probes as i64,
            tally.differing as i64,
            tally.rescanned as i64,
            tally.list_requests as i64
        ],
    )?;
    Ok(())
}

/// Ends an audit that reached the end of its range.
pub fn finish_audit(conn: &Connection, audit_id: i64, now: OffsetDateTime) -> anyhow::Result<()> {
    conn.execute(
        "UPDATE audits SET status = 'completed', finished_at = ?2, error = NULL WHERE audit_id = ?1",
        params![audit_id, format_stored(now)],
    )?;
    Ok(())
}

/// Records the error that interrupted an audit; it stays 'running' and resumes at its cursor.
pub fn audit_failed(conn: &Connection, audit_id: i64, error: &str) -> anyhow::Result<()> {
    conn.execute(
        "UPDATE audits SET error = ?2 WHERE audit_id = ?1",
        params![audit_id, error],
    )?;
    Ok(())
}

/// Live (not removed) encounters of `organization_id` stored with
/// `start_ns <= created_at_ns < end_ns` (none while the organization is not known yet).
pub fn live_count_in_range(
    conn: &Connection,
    organization_id: Option<&str>,
    start_ns: i64,
    end_ns: i64,
) -> anyhow::Result<u64> {
    let n: i64 = conn
        .prepare_cached(
            "SELECT count(*) FROM encounters
             WHERE organization_id = ?3 AND created_at_ns >= ?1 AND created_at_ns < ?2 AND removed_at IS NULL",
        )?
        .query_row(params![start_ns, end_ns, organization_id], |r| r.get(0))?;
    Ok(n as u64)
}

/// The `created_at_ns` of the `n`-th (0-based) live encounter at or after `start_ns` and before
/// `end_ns`, in time order; `None` when there are not that many.
pub fn nth_live_created_ns(
    conn: &Connection,
    organization_id: Option<&str>,
    start_ns: i64,
    end_ns: i64,
    n: u64,
) -> anyhow::Result<Option<i64>> {
    Ok(conn
        .prepare_cached(
            "SELECT created_at_ns FROM encounters
             WHERE organization_id = ?4 AND created_at_ns >= ?1 AND created_at_ns < ?2 AND removed_at IS NULL
             ORDER BY created_at_ns LIMIT 1 OFFSET ?3",
        )?
        .query_row(params![start_ns, end_ns, n as i64, organization_id], |r| r.get(0))
        .optional()?)
}

/// Whether a block of upstream records, listed at `offset` of `[start_ns, end_ns)` in time
/// order, agrees with the warehouse: every record is stored live in the range, and the first and
/// last sit at their positions among the stored ones. Ties in `created_at` may be ordered
/// differently upstream, so a position agrees when it lies between the stored records strictly
/// before that instant and those at or before it.
pub fn block_agrees(
    conn: &Connection,
    organization_id: Option<&str>,
    start_ns: i64,
    end_ns: i64,
    offset: u64,
    block: &[(String, i64)],
) -> anyhow::Result<bool> {
    let mut live = conn.prepare_cached(
        "SELECT count(*) FROM encounters
         WHERE encounter_id = ?1 AND removed_at IS NULL AND created_at_ns >= ?2 AND created_at_ns < ?3
           AND organization_id = ?4",
    )?;
    for (id, _) in block {
        let n: i64 = live.query_row(params![id, start_ns, end_ns, organization_id], |r| r.get(0))?;
        if n == 0 {
            return Ok(false);
        }
    }
    let position_agrees = |position: u64, at_ns: i64| -> anyhow::Result<bool> {
        let strictly = live_count_in_range(conn, organization_id, start_ns, at_ns)?;
        let through = live_count_in_range(conn, organization_id, start_ns, at_ns.saturating_add(1))?;
        Ok(strictly <= position && position < through)
    };
    let (Some(first), Some(last)) = (block.first(), block.last()) else {
        return Ok(true);
    };
    Ok(position_agrees(offset, first.1)? && position_agrees(offset + block.len() as u64 - 1, last.1)?)
}
