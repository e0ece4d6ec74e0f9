//! The reads of `charthero-sync status` on a read-only SQLite connection: the whole
//! warehouse's counts, one entry per organization, runs, backfills, dead letters, the last
//! audit and error. The report's types and text are `crate::status`'s; only the queries are here.

use rusqlite::{Connection, OptionalExtension};
use time::OffsetDateTime;

use crate::status::{
    Audit, Backfill, Database, DeadLetter, LastError, OrganizationStatus, Queue, Rows, Run, RunningCycle,
    Status,
};
use crate::timefmt::{format_stored, from_unix_nanos};

/// How many completed backfills `status` lists (newest), besides every unfinished one.
const COMPLETED_BACKFILLS_SHOWN: i64 = 5;

fn count(conn: &Connection, sql: &str) -> rusqlite::Result<i64> {
    conn.query_row(sql, [], |r| r.get(0))
}

/// The content queue, from `crate::store::queue_sql!`.
fn queue(conn: &Connection, sql: &str, params: impl rusqlite::Params) -> rusqlite::Result<Queue> {
    conn.query_row(sql, params, |r| {
        Ok(Queue::from_counts([
            r.get(0)?,
            r.get(1)?,
            r.get(2)?,
            r.get(3)?,
            r.get(4)?,
            r.get(5)?,
        ]))
    })
}

const RUN_COLUMNS: &str = "run_id, trigger, started_at, finished_at, outcome, list_requests, encounters_new,
    encounters_changed, encounters_removed, documents_fetched, transcripts_fetched, recordings_fetched,
    retries, dead_letters, organization";

/// Whether the warehouse has staging tables: not one an older release wrote (before V7), which
/// `status` may read before `migrate` ran.
fn has_staging(conn: &Connection) -> rusqlite::Result<bool> {
    conn.query_row(
        "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'staged_encounters')",
        [],
        |r| r.get(0),
    )
}

/// Encounters staged for the next merge.
fn staged_encounters(conn: &Connection) -> rusqlite::Result<i64> {
    if has_staging(conn)? {
        count(conn, "SELECT count(*) FROM staged_encounters")
    } else {
        Ok(0)
    }
}

/// Encounters of the organization created in `[start_ns, end_ns)` that are staged and not
/// merged yet: what a read-only connection, which cannot merge them, adds to the stored ones.
pub fn staged_in_range(
    conn: &Connection,
    organization_id: Option<&str>,
    start_ns: i64,
    end_ns: i64,
) -> rusqlite::Result<u64> {
    if !has_staging(conn)? {
        return Ok(0);
    }
    conn.prepare_cached(
        "SELECT count(DISTINCT encounter_id) FROM staged_encounters
          WHERE organization_id = ?3 AND created_at_ns >= ?1 AND created_at_ns < ?2",
    )?
    .query_row(rusqlite::params![start_ns, end_ns, organization_id], |r| {
        r.get::<_, i64>(0)
    })
    .map(|n| n as u64)
}

fn run_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Run> {
    Ok(Run {
        run_id: r.get(0)?,
        trigger: r.get(1)?,
        started_at: r.get(2)?,
        finished_at: r.get(3)?,
        outcome: r.get(4)?,
        list_requests: r.get(5)?,
        encounters_new: r.get(6)?,
        encounters_changed: r.get(7)?,
        encounters_removed: r.get(8)?,
        documents_fetched: r.get(9)?,
        transcripts_fetched: r.get(10)?,
        recordings_fetched: r.get(11)?,
        retries: r.get(12)?,
        dead_letters: r.get(13)?,
        organization: r.get(14)?,
    })
}

/// One organization's entry.
fn read_organization(conn: &Connection, name: &str) -> anyhow::Result<OrganizationStatus> {
    let complete_through = super::complete_through(conn, name)?;
    let organization_id = super::known_organization_id(conn, name)?;
    let last_run = conn
        .query_row(
            &format!(
                "SELECT {RUN_COLUMNS} FROM sync_runs WHERE organization = ?1 AND outcome <> 'running'
                 ORDER BY run_id DESC LIMIT 1"
            ),
            [name],
            run_row,
        )
        .optional()?;
    let (last_error, disabled_routes) = match &last_run {
        Some(run) => conn.query_row(
            "SELECT error, reason_code, disabled_routes FROM sync_runs WHERE run_id = ?1",
            [run.run_id],
            |r| {
                Ok((
                    LastError {
                        run_id: run.run_id,
                        outcome: run.outcome.clone(),
                        error: r.get(0)?,
                        reason_code: r.get(1)?,
                    },
                    super::super::split_routes(r.get(2)?),
                ))
            },
        )?,
        None => (
            LastError {
                run_id: 0,
                outcome: String::new(),
                error: None,
                reason_code: None,
            },
            Vec::new(),
        ),
    };
    let last_error = (last_run.is_some() && last_error.outcome != "succeeded").then_some(last_error);
    let reason_code = last_error.as_ref().and_then(|e| e.reason_code.clone());
    let per_org = |sql: &str| -> rusqlite::Result<i64> {
        conn.query_row(sql, [organization_id.as_deref()], |r| r.get(0))
    };
    let per_name = |sql: &str| -> rusqlite::Result<i64> { conn.query_row(sql, [name], |r| r.get(0)) };
    let running_cycle = conn
        .query_row(
            "SELECT run_id, trigger, started_at FROM sync_runs WHERE organization = ?1 AND outcome = 'running'
             ORDER BY run_id DESC LIMIT 1",
            [name],
            |r| {
                Ok(RunningCycle {
                    run_id: r.get(0)?,
                    trigger: r.get(1)?,
                    started_at: r.get(2)?,
                    // Decided with the heartbeat by `status::read`.
                    progress_at: None,
                    stalled: false,
                })
            },
        )
        .optional()?;
    Ok(OrganizationStatus {
        name: name.to_owned(),
        // Rendered, with its lag, by `status::read`.
        complete_through: complete_through.map(format_stored),
        lag_seconds: None,
        // Decided from the facts above by `status::read`.
        state: String::new(),
        reason_code,
        last_run,
        last_error,
        disabled_routes,
        // Read by `status::read`, as the same instant kept on every backend.
        paused_until: None,
        encounters: per_org(
            "SELECT count(*) FROM encounters WHERE organization_id = ?1 AND removed_at IS NULL",
        )?,
        encounters_removed: per_org(
            "SELECT count(*) FROM encounters WHERE organization_id = ?1 AND removed_at IS NOT NULL",
        )?,
        documents: per_org(
            "SELECT count(*) FROM documents WHERE organization_id = ?1 AND removed_at IS NULL",
        )?,
        transcripts: per_org("SELECT count(*) FROM transcripts WHERE organization_id = ?1")?,
        dead_letters: per_name("SELECT count(*) FROM dead_letters WHERE organization = ?1")?,
        backfills_pending: per_name(
            "SELECT count(*) FROM backfills WHERE organization = ?1 AND status IN ('queued', 'running')",
        )?,
        running_cycle,
        queue: queue(
            conn,
            crate::store::queue_sql!(" AND d.organization_id = ?1"),
            [organization_id.as_deref()],
        )?,
        // Filled in by `Status::estimate`, which knows the configuration.
        content_requests_pending: 0,
        encounters_unlisted_estimate: 0,
        eta_seconds: None,
        webhooks: super::webhook::webhook_summary(conn, name)?,
        organization_id,
    })
}

/// Reads the status from the warehouse: the whole warehouse, and one entry per organization —
/// those named in `configured` first (in that order), then any other the warehouse holds
/// bookkeeping for. Whatever depends on the time (watermarks, lags) is `status::read`'s.
pub fn read_status(conn: &Connection, _now: OffsetDateTime, configured: &[String]) -> anyhow::Result<Status> {
    let mut names: Vec<String> = configured.to_vec();
    let stored: Vec<String> = conn
        .prepare(
            "SELECT organization FROM organizations
             UNION SELECT DISTINCT organization FROM sync_runs
             ORDER BY 1",
        )?
        .query_map([], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    for n in stored {
        if !names.contains(&n) {
            names.push(n);
        }
    }
    let organizations = names
        .iter()
        .map(|n| read_organization(conn, n))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let rows = Rows {
        encounters: count(conn, "SELECT count(*) FROM encounters WHERE removed_at IS NULL")?,
        encounters_removed: count(
            conn,
            "SELECT count(*) FROM encounters WHERE removed_at IS NOT NULL",
        )?,
        encounters_staged: staged_encounters(conn)?,
        patients: count(conn, "SELECT count(*) FROM patients")?,
        documents: count(conn, "SELECT count(*) FROM documents WHERE removed_at IS NULL")?,
        notes_with_text: count(
            conn,
            "SELECT count(*) FROM documents WHERE content_text IS NOT NULL",
        )?,
        transcripts: count(conn, "SELECT count(*) FROM transcripts")?,
        transcript_turns: count(conn, "SELECT count(*) FROM transcript_turns")?,
        recordings: count(conn, "SELECT count(*) FROM recordings")?,
    };
    let queue = queue(conn, crate::store::queue_sql!(""), [])?;
    let runs = conn
        .prepare(&format!(
            "SELECT {RUN_COLUMNS} FROM sync_runs ORDER BY run_id DESC LIMIT 10"
        ))?
        .query_map([], run_row)?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    let backfills = conn
        .prepare(
            "SELECT backfill_id, range_start, range_end, cursor, status, windows, encounters_seen,
                    encounters_removed, error, requested_by, requested_at, finished_at, organization
             FROM backfills
             WHERE status <> 'completed'
                OR backfill_id IN (SELECT backfill_id FROM backfills WHERE status = 'completed'
                                   ORDER BY backfill_id DESC LIMIT ?1)
             ORDER BY backfill_id",
        )?
        .query_map([COMPLETED_BACKFILLS_SHOWN], |r| {
            Ok(Backfill {
                backfill_id: r.get(0)?,
                organization: r.get(12)?,
                range_start: r.get(1)?,
                range_end: r.get(2)?,
                cursor: r.get(3)?,
                status: r.get(4)?,
                requested_by: r.get(9)?,
                requested_at: r.get(10)?,
                finished_at: r.get(11)?,
                // Derived from the range and cursor by `status::read`.
                progress: 0.0,
                eta_seconds: None,
                windows: r.get(5)?,
                encounters_seen: r.get(6)?,
                encounters_removed: r.get(7)?,
                error: r.get(8)?,
            })
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    // A warehouse before V12 (read before `migrate`) has no waits: every dead letter is asked
    // by the next cycle.
    let waits: bool = conn.query_row(
        "SELECT EXISTS (SELECT 1 FROM pragma_table_info('dead_letters') WHERE name = 'next_attempt_at_ns')",
        [],
        |r| r.get(0),
    )?;
    let dead_letters = conn
        .prepare(&format!(
            "SELECT work, encounter_id, document_id, attempts, last_failed_at, reason_code, last_error,
                    organization, {}
             FROM dead_letters ORDER BY first_failed_at LIMIT 20",
            if waits { "next_attempt_at_ns" } else { "NULL" }
        ))?
        .query_map([], |r| {
            Ok(DeadLetter {
                organization: r.get(7)?,
                work: r.get(0)?,
                encounter_id: r.get(1)?,
                document_id: r.get(2)?,
                attempts: r.get(3)?,
                last_failed_at: r.get(4)?,
                reason_code: r.get(5)?,
                last_error: r.get(6)?,
                next_attempt_at: r
                    .get::<_, Option<i64>>(8)?
                    .map(|ns| format_stored(from_unix_nanos(ns))),
            })
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    let disabled_routes: Vec<String> = conn
        .query_row(
            "SELECT disabled_routes FROM sync_runs WHERE outcome <> 'running' ORDER BY run_id DESC LIMIT 1",
            [],
            |r| r.get(0),
        )
        .optional()?
        .flatten()
        .map(|d: String| {
            d.split(',')
                .map(str::trim)
                .filter(|r| !r.is_empty())
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default();
    let last_error = conn
        .query_row(
            "SELECT run_id, outcome, error, reason_code FROM sync_runs
             WHERE outcome <> 'running' ORDER BY run_id DESC LIMIT 1",
            [],
            |r| {
                Ok(LastError {
                    run_id: r.get(0)?,
                    outcome: r.get(1)?,
                    error: r.get(2)?,
                    reason_code: r.get(3)?,
                })
            },
        )
        .optional()?
        .filter(|e| e.outcome != "succeeded");
    let audit = conn
        .query_row(
            "SELECT audit_id, status, range_start, range_end, cursor, started_at, finished_at, ranges,
                 probes, differing, rescanned, list_requests, error, organization
             FROM audits ORDER BY audit_id DESC LIMIT 1",
            [],
            |r| {
                Ok(Audit {
                    audit_id: r.get(0)?,
                    organization: r.get(13)?,
                    status: r.get(1)?,
                    range_start: r.get(2)?,
                    range_end: r.get(3)?,
                    cursor: r.get(4)?,
                    started_at: r.get(5)?,
                    finished_at: r.get(6)?,
                    ranges: r.get(7)?,
                    probes: r.get(8)?,
                    differing: r.get(9)?,
                    rescanned: r.get(10)?,
                    list_requests: r.get(11)?,
                    error: r.get(12)?,
                })
            },
        )
        .optional()?;
    Ok(Status {
        database: Database {
            backend: "sqlite",
            // The main database's file (empty for a temporary one).
            location: conn.path().unwrap_or_default().to_owned(),
        },
        // The organization furthest behind: decided by `status::read`.
        complete_through: None,
        lag_seconds: None,
        organizations,
        rows,
        queue,
        runs,
        backfills,
        audit,
        dead_letter_count: count(conn, "SELECT count(*) FROM dead_letters")?,
        dead_letters,
        disabled_routes,
        last_error,
    })
}

/// Live encounters, and the live documents that are notes, finished transcripts and anything
/// else: the content mix `status` estimates a backfill's requests with.
pub fn live_content_counts(conn: &Connection) -> anyhow::Result<[i64; 4]> {
    let (encounters, notes, finished, other) = conn.query_row(
        concat!(
            "SELECT (SELECT count(*) FROM encounters WHERE removed_at IS NULL),
                count(*) FILTER (WHERE schema_type = 'document'),
                count(*) FILTER (WHERE schema_type = 'ambient_transcript' AND ",
            crate::store::may_be_final_sql!("status"),
            "),
                count(*) FILTER (WHERE schema_type NOT IN ('document', 'ambient_transcript'))
         FROM documents WHERE removed_at IS NULL"
        ),
        [],
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
    )?;
    Ok([encounters, notes, finished, other])
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use time::OffsetDateTime;

    use super::*;

    /// `status` of the new release reads a warehouse an older one wrote, before `migrate` (the
    /// package is upgraded while the old daemon still runs): V6 has no staging tables.
    #[test]
    fn status_reads_a_warehouse_written_before_the_staging_tables() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.db");
        let mut conn = Connection::open(&path).unwrap();
        super::super::embedded::migrations::runner()
            .set_target(refinery::Target::Version(6))
            .run(&mut conn)
            .unwrap();
        drop(conn);
        let reader = super::super::open_reader(&path, Duration::from_secs(1)).unwrap();
        let status = read_status(&reader, OffsetDateTime::now_utc(), &[]).unwrap();
        assert_eq!((status.rows.encounters, status.rows.encounters_staged), (0, 0));
    }
}
