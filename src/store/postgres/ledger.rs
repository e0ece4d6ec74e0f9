//! Sync bookkeeping on PostgreSQL: the `sync_runs` row of every cycle, the window ledger,
//! backfill progress, and the `complete_through` watermark (mirrors `store::sqlite::ledger`;
//! the rules are the same, only the SQL and the types differ: timestamps bind as `timestamptz`,
//! the per-organization state stays RFC 3339 text as in SQLite).

use postgres::GenericClient;
use time::OffsetDateTime;

use crate::store::{Backfill, RunCounts, RunEnd, StateTime, WindowCompletion};
use crate::timefmt::{format_stored, parse_rfc3339, unix_nanos};

const COMPLETE_THROUGH: &str = "complete_through";

/// Records a completed window, and moves the watermark or the backfill's cursor, in the caller's
/// transaction (the page that completed it commits with it).
pub(super) fn record_window(
    tx: &mut impl GenericClient,
    w: &WindowCompletion,
    now: OffsetDateTime,
) -> anyhow::Result<()> {
    tx.execute(
        "INSERT INTO sync_windows (run_id, kind, backfill_id, start_at, end_at, start_at_ns, end_at_ns,
             records_seen, total, pages, passes, removed, id_set_hash, completed_at, organization)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)",
        &[
            &w.run_id,
            &w.kind,
            &w.backfill_id,
            &w.start_at,
            &w.end_at,
            &unix_nanos(w.start_at),
            &unix_nanos(w.end_at),
            &(w.records_seen as i64),
            &(w.total as i64),
            &(w.pages as i64),
            &(w.passes as i64),
            &(w.removed as i64),
            &w.id_set_hash,
            &now,
            &&*w.organization,
        ],
    )?;
    if w.advances_watermark && complete_through(tx, &w.organization)?.is_none_or(|t| t < w.end_at) {
        set_state(tx, &w.organization, COMPLETE_THROUGH, w.end_at)?;
    }
    if let Some(id) = w.backfill_id {
        tx.execute(
            "UPDATE backfills SET cursor = $2, windows = windows + 1,
                 encounters_seen = encounters_seen + $3, encounters_removed = encounters_removed + $4
             WHERE backfill_id = $1",
            &[&id, &w.end_at, &(w.records_seen as i64), &(w.removed as i64)],
        )?;
    }
    Ok(())
}

fn get_state(
    db: &mut impl GenericClient,
    organization: &str,
    name: &str,
) -> anyhow::Result<Option<OffsetDateTime>> {
    let row = db.query_opt(
        "SELECT value FROM organization_state WHERE organization = $1 AND name = $2",
        &[&organization, &name],
    )?;
    let Some(row) = row else {
        return Ok(None);
    };
    let text: String = row.try_get(0)?;
    parse_rfc3339(&text).map(Some).map_err(|e| {
        anyhow::anyhow!("corrupt {name} of organization {organization} in organization_state: {e}")
    })
}

fn set_state(
    db: &mut impl GenericClient,
    organization: &str,
    name: &str,
    value: OffsetDateTime,
) -> anyhow::Result<()> {
    db.execute(
        "INSERT INTO organization_state (organization, name, value) VALUES ($1, $2, $3)
         ON CONFLICT (organization, name) DO UPDATE SET value = EXCLUDED.value",
        &[&organization, &name, &format_stored(value)],
    )?;
    Ok(())
}

/// Everything `organization` created before this instant has been listed completely (assuming
/// records become visible within the settle lag; see ARCHITECTURE.md).
pub fn complete_through(
    db: &mut impl GenericClient,
    organization: &str,
) -> anyhow::Result<Option<OffsetDateTime>> {
    get_state(db, organization, COMPLETE_THROUGH)
}

/// An instant kept for `organization`.
pub fn state_time(
    db: &mut impl GenericClient,
    organization: &str,
    which: StateTime,
) -> anyhow::Result<Option<OffsetDateTime>> {
    get_state(db, organization, which.name())
}

pub fn set_state_time(
    db: &mut impl GenericClient,
    organization: &str,
    which: StateTime,
    at: OffsetDateTime,
) -> anyhow::Result<()> {
    set_state(db, organization, which.name(), at)
}

/// The ChartHero `organization_id` the configured `organization` reads, once known.
pub fn known_organization_id(
    db: &mut impl GenericClient,
    organization: &str,
) -> anyhow::Result<Option<String>> {
    let row = db.query_opt(
        "SELECT organization_id FROM organizations WHERE organization = $1",
        &[&organization],
    )?;
    Ok(row
        .map(|r| r.try_get::<_, Option<String>>(0))
        .transpose()?
        .flatten())
}

/// Every configured name whose clinic is recorded, with ChartHero's `organization_id`.
pub fn recorded_clinics(db: &mut impl GenericClient) -> anyhow::Result<Vec<(String, String)>> {
    db.query(
        "SELECT organization, organization_id FROM organizations
         WHERE organization_id IS NOT NULL ORDER BY organization",
        &[],
    )?
    .iter()
    .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
    .collect()
}

/// Records that `organization` reads ChartHero's `organization_id`. Refused (`Err` naming the
/// other name) when another configured organization already reads it. Idempotent for the same
/// pair.
pub fn claim_organization_id(
    db: &mut impl GenericClient,
    organization: &str,
    organization_id: &str,
    now: OffsetDateTime,
) -> anyhow::Result<Result<(), String>> {
    let holder: Option<String> = db
        .query_opt(
            "SELECT organization FROM organizations WHERE organization_id = $1",
            &[&organization_id],
        )?
        .map(|r| r.try_get(0))
        .transpose()?;
    match holder {
        Some(h) if h == organization => Ok(Ok(())),
        Some(h) => Ok(Err(h)),
        None => {
            db.execute(
                "INSERT INTO organizations (organization, organization_id, first_seen_at) VALUES ($1, $2, $3)
                 ON CONFLICT (organization) DO UPDATE SET organization_id = EXCLUDED.organization_id
                 WHERE organizations.organization_id IS NULL",
                &[&organization, &organization_id, &now],
            )?;
            Ok(Ok(()))
        }
    }
}

/// IDs of `organization_id`'s live (not removed) encounters created in `[start, end)`: the
/// candidates for removal when a complete listing of that window does not show them.
pub fn live_ids_in_range(
    db: &mut impl GenericClient,
    organization_id: &str,
    start: OffsetDateTime,
    end: OffsetDateTime,
) -> anyhow::Result<Vec<String>> {
    let rows = db.query(
        "SELECT encounter_id FROM encounters
         WHERE organization_id = $3 AND created_at_ns >= $1 AND created_at_ns < $2 AND removed_at IS NULL",
        &[&unix_nanos(start), &unix_nanos(end), &organization_id],
    )?;
    Ok(rows
        .iter()
        .map(|r| r.try_get(0))
        .collect::<Result<_, postgres::Error>>()?)
}

/// Starts a backfill of `[start, end)`, or resumes the unfinished one with exactly that range.
pub fn open_backfill(
    db: &mut impl GenericClient,
    organization: &str,
    start: OffsetDateTime,
    end: OffsetDateTime,
    requested_by: &str,
    now: OffsetDateTime,
) -> anyhow::Result<Backfill> {
    let existing = db.query_opt(
        "SELECT backfill_id, cursor FROM backfills
         WHERE range_start = $1 AND range_end = $2 AND status IN ('queued', 'running')
           AND organization = $3
         ORDER BY backfill_id LIMIT 1",
        &[&start, &end, &organization],
    )?;
    let (backfill_id, cursor) = match existing {
        Some(row) => {
            let id: i64 = row.try_get(0)?;
            let cursor: Option<OffsetDateTime> = row.try_get(1)?;
            db.execute(
                "UPDATE backfills SET status = 'running', started_at = coalesce(started_at, $2)
                 WHERE backfill_id = $1",
                &[&id, &now],
            )?;
            (id, cursor.unwrap_or(start))
        }
        None => {
            let row = db.query_one(
                "INSERT INTO backfills (range_start, range_end, status, requested_by, requested_at, started_at,
                     organization)
                 VALUES ($1, $2, 'running', $3, $4, $4, $5)
                 RETURNING backfill_id",
                &[&start, &end, &requested_by, &now, &organization],
            )?;
            (row.try_get(0)?, start)
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
    db: &mut impl GenericClient,
    organization: &str,
    start: OffsetDateTime,
    end: OffsetDateTime,
    requested_by: &str,
    now: OffsetDateTime,
) -> anyhow::Result<i64> {
    let row = db.query_one(
        "INSERT INTO backfills (range_start, range_end, status, requested_by, requested_at, organization)
         VALUES ($1, $2, 'queued', $3, $4, $5)
         RETURNING backfill_id",
        &[&start, &end, &requested_by, &now, &organization],
    )?;
    Ok(row.try_get(0)?)
}

/// The oldest backfill of `organization` not yet completed, if any.
pub fn next_backfill(
    db: &mut impl GenericClient,
    organization: &str,
) -> anyhow::Result<Option<(OffsetDateTime, OffsetDateTime)>> {
    let row = db.query_opt(
        "SELECT range_start, range_end FROM backfills
         WHERE status IN ('queued', 'running') AND organization = $1
         ORDER BY backfill_id LIMIT 1",
        &[&organization],
    )?;
    Ok(row
        .map(|r| Ok::<_, postgres::Error>((r.try_get(0)?, r.try_get(1)?)))
        .transpose()?)
}

/// Marks a backfill completed, or records the error that interrupted it; an interrupted
/// backfill stays 'running' so that the next request for the same range resumes it.
pub fn finish_backfill(
    db: &mut impl GenericClient,
    backfill_id: i64,
    error: Option<&str>,
    now: OffsetDateTime,
) -> anyhow::Result<()> {
    match error {
        None => db.execute(
            "UPDATE backfills SET status = 'completed', finished_at = $2, error = NULL WHERE backfill_id = $1",
            &[&backfill_id, &now],
        )?,
        Some(e) => db.execute(
            "UPDATE backfills SET error = $2 WHERE backfill_id = $1",
            &[&backfill_id, &e],
        )?,
    };
    Ok(())
}

/// Marks `organization`'s runs left 'running' by a process that died as 'aborted'; returns how
/// many (one writer per warehouse, one cycle per organization at a time: such a row is stale).
pub fn abort_stale_runs(
    db: &mut impl GenericClient,
    organization: &str,
    now: OffsetDateTime,
) -> anyhow::Result<usize> {
    let n = db.execute(
        "UPDATE sync_runs SET outcome = 'aborted', finished_at = $1,
             error = coalesce(error, 'the process stopped before the cycle finished')
         WHERE outcome = 'running' AND organization = $2",
        &[&now, &organization],
    )?;
    Ok(usize::try_from(n)?)
}

pub fn start_run(
    db: &mut impl GenericClient,
    organization: &str,
    trigger: &str,
    now: OffsetDateTime,
) -> anyhow::Result<i64> {
    let row = db.query_one(
        "INSERT INTO sync_runs (started_at, outcome, trigger, organization) VALUES ($1, 'running', $2, $3)
         RETURNING run_id",
        &[&now, &trigger, &organization],
    )?;
    Ok(row.try_get(0)?)
}

/// Writes a run's counters, while it runs ([`crate::store::Backend::record_progress`]) and
/// when it ends.
pub fn write_counts(db: &mut impl GenericClient, run_id: i64, counts: &RunCounts) -> anyhow::Result<()> {
    let columns = counts.columns();
    let set = columns
        .iter()
        .enumerate()
        .map(|(i, (name, _))| format!("{name} = ${}", i + 2))
        .collect::<Vec<_>>()
        .join(", ");
    let mut params: Vec<&(dyn postgres::types::ToSql + Sync)> = vec![&run_id];
    params.extend(
        columns
            .iter()
            .map(|(_, v)| v as &(dyn postgres::types::ToSql + Sync)),
    );
    db.execute(&format!("UPDATE sync_runs SET {set} WHERE run_id = $1"), &params)?;
    Ok(())
}

pub fn finish_run(
    db: &mut impl GenericClient,
    run_id: i64,
    end: &RunEnd,
    now: OffsetDateTime,
) -> anyhow::Result<()> {
    let mut tx = db.transaction()?;
    write_counts(&mut tx, run_id, &end.counts)?;
    tx.execute(
        "UPDATE sync_runs SET finished_at = $2, outcome = $3, error = $4, reason_code = $5, disabled_routes = $6
         WHERE run_id = $1",
        &[
            &run_id,
            &now,
            &end.outcome.as_str(),
            &end.error,
            &end.reason_code,
            &end.disabled_routes,
        ],
    )?;
    tx.commit()?;
    Ok(())
}
