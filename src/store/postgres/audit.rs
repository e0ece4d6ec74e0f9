//! The history audit's bookkeeping (the `audits` table) and the warehouse side of its comparison
//! on PostgreSQL (mirrors `store::sqlite::audit`, with the same semantics). The range reads are
//! served by the index `encounters_by_organization (organization_id, created_at_ns, removed_at)`:
//! each is one index range scan of the organization's `[start_ns, end_ns)`, never a table scan.
//! Audit times are `timestamptz` (microseconds): `sync::audit` moves the cursor in whole
//! microseconds and reads the range back only through `Micros::floor`, which the truncation to
//! microseconds does not change (for instants after 2000-01-01, from which the driver truncates).

use std::collections::BTreeSet;

use postgres::GenericClient;
use time::OffsetDateTime;

use crate::store::{Audit, AuditTally};

/// Resumes the unfinished audit, or starts one of `[start, end)`.
pub fn open_audit(
    db: &mut impl GenericClient,
    organization: &str,
    start: OffsetDateTime,
    end: OffsetDateTime,
    requested_by: &str,
    now: OffsetDateTime,
) -> anyhow::Result<Audit> {
    let running = db.query_opt(
        "SELECT audit_id, range_start, range_end, cursor FROM audits
         WHERE status = 'running' AND organization = $1
         ORDER BY audit_id LIMIT 1",
        &[&organization],
    )?;
    if let Some(r) = running {
        return Ok(Audit {
            audit_id: r.try_get(0)?,
            start: r.try_get(1)?,
            end: r.try_get(2)?,
            cursor: r.try_get(3)?,
        });
    }
    let row = db.query_one(
        "INSERT INTO audits (range_start, range_end, cursor, status, requested_by, started_at, organization)
         VALUES ($1, $2, $1, 'running', $3, $4, $5)
         RETURNING audit_id",
        &[&start, &end, &requested_by, &now, &organization],
    )?;
    Ok(Audit {
        audit_id: row.try_get(0)?,
        start,
        end,
        cursor: start,
    })
}

/// Whether the daemon should work on an audit: one is unfinished, or the last one completed
/// `every` ago — or, before the first audit, `every` after the first window was completed (the
/// first cycle has just listed all history).
pub fn audit_due(
    db: &mut impl GenericClient,
    organization: &str,
    every: time::Duration,
    now: OffsetDateTime,
) -> anyhow::Result<bool> {
    // The first window ever completed: window_id order is completion order (the primary key's
    // index, no sort).
    let r = db.query_one(
        "SELECT EXISTS (SELECT 1 FROM audits WHERE status = 'running' AND organization = $1),
                (SELECT max(finished_at) FROM audits WHERE status = 'completed' AND organization = $1),
                (SELECT completed_at FROM sync_windows WHERE organization = $1 ORDER BY window_id LIMIT 1)",
        &[&organization],
    )?;
    if r.try_get::<_, bool>(0)? {
        return Ok(true);
    }
    let last: Option<OffsetDateTime> = r.try_get(1)?;
    let first_window: Option<OffsetDateTime> = r.try_get(2)?;
    Ok(match last.or(first_window) {
        None => false,
        Some(t) => t + every <= now,
    })
}

/// Records progress: everything before `cursor` is audited; `tally` is added to the row.
pub fn advance_audit(
    db: &mut impl GenericClient,
    audit_id: i64,
    cursor: OffsetDateTime,
    tally: &AuditTally,
) -> anyhow::Result<()> {
    db.execute(
        "UPDATE audits SET cursor = $2, ranges = ranges + $3, probes = probes + $4,
             differing = differing + $5, rescanned = rescanned + $6, list_requests = list_requests + $7
         WHERE audit_id = $1",
        &[
            &audit_id,
            &cursor,
            &(tally.ranges as i64),
            &(tally.probes as i64),
            &(tally.differing as i64),
            &(tally.rescanned as i64),
            &(tally.list_requests as i64),
        ],
    )?;
    Ok(())
}

/// Ends an audit that reached the end of its range.
pub fn finish_audit(db: &mut impl GenericClient, audit_id: i64, now: OffsetDateTime) -> anyhow::Result<()> {
    db.execute(
        "UPDATE audits SET status = 'completed', finished_at = $2, error = NULL WHERE audit_id = $1",
        &[&audit_id, &now],
    )?;
    Ok(())
}

/// Records the error that interrupted an audit; it stays 'running' and resumes at its cursor.
pub fn audit_failed(db: &mut impl GenericClient, audit_id: i64, error: &str) -> anyhow::Result<()> {
    db.execute(
        "UPDATE audits SET error = $2 WHERE audit_id = $1",
        &[&audit_id, &error],
    )?;
    Ok(())
}

/// Live (not removed) encounters of `organization_id` stored with
/// `start_ns <= created_at_ns < end_ns` (none while the organization is not known yet).
pub fn live_count_in_range(
    db: &mut impl GenericClient,
    organization_id: Option<&str>,
    start_ns: i64,
    end_ns: i64,
) -> anyhow::Result<u64> {
    let n: i64 = db
        .query_one(
            "SELECT count(*) FROM encounters
             WHERE organization_id = $3 AND created_at_ns >= $1 AND created_at_ns < $2 AND removed_at IS NULL",
            &[&start_ns, &end_ns, &organization_id],
        )?
        .try_get(0)?;
    Ok(u64::try_from(n)?)
}

/// The `created_at_ns` of the `n`-th (0-based) live encounter at or after `start_ns` and before
/// `end_ns`, in time order; `None` when there are not that many.
pub fn nth_live_created_ns(
    db: &mut impl GenericClient,
    organization_id: Option<&str>,
    start_ns: i64,
    end_ns: i64,
    n: u64,
) -> anyhow::Result<Option<i64>> {
    // No table holds more than i64::MAX rows.
    let Ok(offset) = i64::try_from(n) else {
        return Ok(None);
    };
    let row = db.query_opt(
        "SELECT created_at_ns FROM encounters
         WHERE organization_id = $4 AND created_at_ns >= $1 AND created_at_ns < $2 AND removed_at IS NULL
         ORDER BY created_at_ns LIMIT 1 OFFSET $3",
        &[&start_ns, &end_ns, &offset, &organization_id],
    )?;
    Ok(row.map(|r| r.try_get(0)).transpose()?)
}

/// Whether a block of upstream records, listed at `offset` of `[start_ns, end_ns)` in time
/// order, agrees with the warehouse: every record is stored live in the range, and the first and
/// last sit at their positions among the stored ones. Ties in `created_at` may be ordered
/// differently upstream, so a position agrees when it lies between the stored records strictly
/// before that instant and those at or before it.
///
/// Two statements whatever the block's size: one looks every record up by primary key, one
/// counts the four positions in a single scan of the range.
pub fn block_agrees(
    db: &mut impl GenericClient,
    organization_id: Option<&str>,
    start_ns: i64,
    end_ns: i64,
    offset: u64,
    block: &[(String, i64)],
) -> anyhow::Result<bool> {
    let (Some(first), Some(last)) = (block.first(), block.last()) else {
        return Ok(true);
    };
    let ids: Vec<&str> = block
        .iter()
        .map(|(id, _)| id.as_str())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let stored: i64 = db
        .query_one(
            "SELECT count(*) FROM encounters
             WHERE encounter_id = ANY($1) AND removed_at IS NULL AND created_at_ns >= $2 AND created_at_ns < $3
               AND organization_id = $4",
            &[&ids, &start_ns, &end_ns, &organization_id],
        )?
        .try_get(0)?;
    if usize::try_from(stored)? != ids.len() {
        return Ok(false);
    }
    // Every record lies in the range, so every bound below lies in (start_ns, end_ns].
    let bounds = [
        first.1,
        first.1.saturating_add(1),
        last.1,
        last.1.saturating_add(1),
    ];
    let upto = first.1.max(last.1).saturating_add(1);
    let r = db.query_one(
        "SELECT count(*) FILTER (WHERE created_at_ns < $4), count(*) FILTER (WHERE created_at_ns < $5),
                count(*) FILTER (WHERE created_at_ns < $6), count(*) FILTER (WHERE created_at_ns < $7)
         FROM encounters
         WHERE organization_id = $1 AND created_at_ns >= $2 AND created_at_ns < $3 AND removed_at IS NULL",
        &[
            &organization_id,
            &start_ns,
            &upto,
            &bounds[0],
            &bounds[1],
            &bounds[2],
            &bounds[3],
        ],
    )?;
    let count = |i: usize| -> anyhow::Result<u64> { Ok(u64::try_from(r.try_get::<_, i64>(i)?)?) };
    let agrees = |position: u64, strictly: u64, through: u64| strictly <= position && position < through;
    Ok(agrees(offset, count(0)?, count(1)?)
        && agrees(
            offset.saturating_add(block.len() as u64 - 1),
            count(2)?,
            count(3)?,
        ))
}

#[cfg(test)]
mod tests {
    use time::macros::datetime;

    use super::*;
    use crate::store::Removal;
    use crate::store::postgres::status::tests::{Pair, encounter, pair, window};
    use crate::timefmt::unix_nanos;

    /// The audit's row, as both backends store it (status, counts and error).
    fn audit_row(w: &mut Pair, audit_id: i64) -> String {
        w.value(&format!(
            "SELECT status || ' ' || ranges || ' ' || probes || ' ' || differing || ' ' || rescanned
                    || ' ' || list_requests || ' ' || coalesce(error, '-')
             FROM audits WHERE audit_id = {audit_id}"
        ))
    }

    #[test]
    fn audits_are_due_opened_resumed_and_finished_as_on_sqlite() {
        let Some(mut w) = pair("audit_bookkeeping") else {
            return;
        };
        let t0 = datetime!(2026-05-25 14:00:00 UTC);
        let hour = time::Duration::hours(1);
        let micro = time::Duration::microseconds(1);
        // Never due before the first window completes; then `every` after it.
        assert!(!w.both(|b| b.audit_due("default", hour, t0 + 100 * hour)));
        assert_eq!(w.both(|b| b.start_run("default", "run", t0)), 1);
        w.commit(&[], &[], Some(&window("default", 1, None, t0 - hour, t0)), t0);
        w.commit(
            &[],
            &[],
            Some(&window("default", 1, None, t0, t0 + hour)),
            t0 + hour,
        );
        assert!(!w.both(|b| b.audit_due("default", hour, t0 + hour - micro)));
        assert!(w.both(|b| b.audit_due("default", hour, t0 + hour)));
        assert!(!w.both(|b| b.audit_due("other", hour, t0 + 100 * hour)));

        let start = t0 - 10 * hour;
        let opened = w.both(|b| b.open_audit("default", start, t0, "daemon", t0 + hour));
        assert_eq!(
            opened,
            Audit {
                audit_id: 1,
                start,
                end: t0,
                cursor: start,
            }
        );
        // An unfinished audit is due at once; another organization's audit is its own.
        assert!(w.both(|b| b.audit_due("default", 1000 * hour, t0 + hour)));
        let other = w.both(|b| b.open_audit("other", start, t0, "cli", t0 + hour));
        assert_eq!(other.audit_id, 2);

        let tally = AuditTally {
            ranges: 1,
            probes: 2,
            differing: 3,
            rescanned: 4,
            list_requests: 5,
        };
        let cursor = start + 3 * hour + 250 * micro;
        w.both(|b| b.advance_audit(1, start + hour, &tally));
        w.both(|b| b.advance_audit(1, cursor, &tally));
        w.both(|b| b.audit_failed(1, "the list route timed out"));
        assert_eq!(
            audit_row(&mut w, 1),
            "running 2 4 6 8 10 the list route timed out"
        );
        // Resumed at its cursor, whatever range is asked for now.
        let resumed = w.both(|b| b.open_audit("default", start + hour, t0 + hour, "daemon", t0 + 2 * hour));
        assert_eq!(
            resumed,
            Audit {
                cursor,
                ..opened.clone()
            }
        );
        w.both(|b| b.finish_audit(1, t0 + 3 * hour));
        assert_eq!(audit_row(&mut w, 1), "completed 2 4 6 8 10 -");
        assert!(!w.both(|b| b.audit_due("default", hour, t0 + 4 * hour - micro)));
        assert!(w.both(|b| b.audit_due("default", hour, t0 + 4 * hour)));
        assert_eq!(audit_row(&mut w, 2), "running 0 0 0 0 0 -");
        // A new audit once the last one completed.
        let next = w.both(|b| b.open_audit("default", t0, t0 + hour, "daemon", t0 + 5 * hour));
        assert_eq!(next.audit_id, 3);
        assert_eq!(next.cursor, t0);
    }

    /// Counts, positions and block comparisons over encounters of two organizations sharing
    /// instants (ties in threes), some removed: every answer is SQLite's.
    #[test]
    fn range_reads_answer_as_on_sqlite() {
        let Some(mut w) = pair("audit_ranges") else {
            return;
        };
        let base = unix_nanos(datetime!(2026-05-01 00:00:00 UTC)) + 123;
        let at = |i: i64| base + (i / 3) * 1_000;
        let mut records: Vec<_> = (0..45)
            .map(|i| encounter(&format!("enc_{i:02}"), "org_1", at(i), vec![]))
            .collect();
        records.extend((0..9).map(|i| encounter(&format!("oth_{i}"), "org_2", at(i * 5), vec![])));
        let now = datetime!(2026-05-25 14:00:00 UTC);
        w.commit(&records, &[], None, now);
        let removed = ["enc_07", "enc_20", "enc_21"];
        let removals: Vec<Removal> = removed
            .iter()
            .map(|id| Removal {
                encounter_id: (*id).to_owned(),
                reason: "encounter_not_found".to_owned(),
            })
            .collect();
        w.commit(&[], &removals, None, now);
        // What ChartHero lists for org_1, in time order.
        let upstream: Vec<(String, i64)> = records
            .iter()
            .filter(|r| r.organization_id == "org_1" && !removed.contains(&r.encounter_id.as_str()))
            .map(|r| (r.encounter_id.clone(), unix_nanos(r.created_at)))
            .collect();
        let live = upstream.len() as u64;

        let bounds: Vec<i64> = [
            base - 1,
            base,
            at(7),
            at(7) + 1,
            at(20),
            at(30) - 1,
            at(44),
            at(44) + 1,
            i64::MAX,
        ]
        .into();
        for org in [Some("org_1"), Some("org_2"), Some("org_x"), None] {
            for &s in &bounds {
                for &e in &bounds {
                    w.both(|b| b.live_count_in_range(org, s, e));
                }
                for n in [0, 1, 2, 13, live - 1, live, live + 1] {
                    w.both(|b| b.nth_live_created_ns(org, s, at(44) + 1, n));
                }
            }
        }
        assert_eq!(
            w.both(|b| b.live_count_in_range(Some("org_1"), base, i64::MAX)),
            live
        );
        assert_eq!(
            w.both(|b| b.nth_live_created_ns(Some("org_1"), base, i64::MAX, live - 1)),
            Some(at(44))
        );
        assert_eq!(
            w.both(|b| b.nth_live_created_ns(Some("org_1"), base, i64::MAX, live)),
            None
        );
        // Past any table's size (SQLite would read u64::MAX as OFFSET -1, i.e. 0).
        assert_eq!(
            nth_live_created_ns(&mut *w.pg.db().unwrap(), Some("org_1"), base, i64::MAX, u64::MAX).unwrap(),
            None
        );

        let (start, end) = (base, at(44) + 1);
        let agrees = |w: &mut Pair, offset: u64, block: &[(String, i64)]| {
            w.both(|b| b.block_agrees(Some("org_1"), start, end, offset, block))
        };
        // Every block of the true listing agrees, at its offset only (or one where ties allow).
        for size in [1, 2, 5, 40] {
            for offset in 0..=(upstream.len() - size) {
                let block = &upstream[offset..offset + size];
                assert!(agrees(&mut w, offset as u64, block), "{size} at {offset}");
                agrees(&mut w, offset as u64 + 1, block);
                agrees(&mut w, (offset as u64).saturating_sub(1), block);
            }
        }
        // Ties listed in another order agree; a block shifted past its ties does not.
        let mut tied = upstream[3..8].to_vec();
        tied.swap(0, 2);
        tied.swap(3, 4);
        assert!(agrees(&mut w, 3, &tied));
        assert!(!agrees(&mut w, 6, &upstream[0..3]));
        // A removed record, another organization's, one outside the range, an unknown one.
        let mut with = |id: &str, ns: i64| {
            let mut block = upstream[5..10].to_vec();
            block[2] = (id.to_owned(), ns);
            agrees(&mut w, 5, &block)
        };
        assert!(!with("enc_07", at(7)));
        assert!(!with("oth_1", at(5)));
        assert!(!with("enc_nope", at(7)));
        assert!(!w.both(|b| b.block_agrees(Some("org_1"), start, at(5), 0, &upstream[0..8])));
        // Duplicates, an empty block, an unknown organization.
        let dup = vec![upstream[0].clone(), upstream[0].clone(), upstream[1].clone()];
        agrees(&mut w, 0, &dup);
        assert!(agrees(&mut w, 0, &[]));
        assert!(!w.both(|b| b.block_agrees(None, start, end, 0, &upstream[0..2])));
        assert!(!w.both(|b| b.block_agrees(Some("org_x"), start, end, 0, &upstream[0..2])));
    }
}
