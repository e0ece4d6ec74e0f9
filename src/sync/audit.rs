//! The history audit (`sync --audit`; the daemon every `[sync] audit_every`): finds what changed
//! in completed history — backdated records made visible late, removals weeks back — at a cost
//! that grows with the number of changes, not with the size of history.
//!
//! Completed history `[start_at, complete_through)` is cut into ranges of about
//! [`RANGE_RECORDS`] stored live encounters (the first range's size varies from audit to audit,
//! so boundaries move). For each range one request asks the list route for its total and the
//! [`BLOCK`] records around its middle: the total is compared with the live rows stored for the
//! range, and the block with the stored records at the same positions — which also catches an
//! insertion and a deletion that cancel in the total when they lie on either side of the middle
//! or inside the block. Agreeing ranges cost nothing more. A range whose records differ but
//! whose total agrees is re-scanned; one whose total differs is narrowed: split at the stored
//! median, one `limit=1` probe for the older half (the newer half's total is the difference),
//! recursing into the halves that differ, until a range holds at most [`LEAF_RECORDS`] or is
//! mostly changes; that range is re-scanned as a reconcile (late records added, removals
//! confirmed and marked). Purged ranges are skipped: they are never synced again.
//!
//! A server whose totals count encounters the key cannot see makes nearly every range differ;
//! known to do so, a differing range of audit size is re-scanned whole rather than narrowed.
//!
//! What it cannot see: an insertion and a deletion that cancel inside one range on the same
//! side of its middle block (a later audit, with other boundaries, likely does), and edits of
//! records that stay (a status, a document) — the deep revisit and a reconcile see those.

use std::time::Instant;

use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

use super::{CycleError, Finished, RangeScan, Scope, SyncContext, history_start, scan_range};
use crate::api::wire::EncounterPage;
use crate::api::{MAX_OFFSET, SortOrder};
use crate::store::{AuditTally, RunCounts};
use crate::timefmt::{Micros, from_unix_nanos, unix_nanos};

/// Each top-level range holds about this many stored encounters and costs one request when
/// nothing changed in it: 2,000 requests audit a million encounters (a reconcile takes about
/// 10,300). Larger ranges would be cheaper but let more insertions and deletions cancel out
/// inside one range.
const RANGE_RECORDS: u64 = 500;

/// Records compared directly per range, around its middle: a page costs one request whatever
/// its size, so the probe that asks for a range's total brings a full page along.
const BLOCK: u32 = 100;

/// A differing range this small (one page) is re-scanned rather than narrowed further.
const LEAF_RECORDS: u64 = 100;

/// Audits completed history, resuming an unfinished audit; stops at a range boundary once
/// `deadline` has passed (the audit resumes from its cursor next time).
pub(super) async fn run(
    ctx: &SyncContext,
    run_id: i64,
    requested_by: &'static str,
    deadline: Option<Instant>,
    counts: &mut RunCounts,
    cancel: &CancellationToken,
) -> Result<Finished, CycleError> {
    let now = OffsetDateTime::now_utc();
    let org = ctx.org.name.clone();
    let Some(watermark) = ctx.writer.call(move |c| c.complete_through(&org)).await? else {
        tracing::info!("no completed history to audit yet");
        return Ok(Finished::Yes);
    };
    let start = history_start(ctx.sync.start_at, ctx.privacy.retention, now);
    if start >= watermark {
        return Ok(Finished::Yes);
    }
    let audit = ctx
        .writer
        .call({
            let org = ctx.org.name.clone();
            move |c| c.open_audit(&org, start, watermark, requested_by, now)
        })
        .await?;
    let (from, to) = (Micros::floor(audit.cursor), Micros::floor(audit.end));
    tracing::info!(audit_id = audit.audit_id, from = %from, to = %to, "auditing history");
    let auditor = Auditor {
        ctx,
        scan: RangeScan {
            run_id,
            scope: Scope::Audit,
            reconcile: true,
            deadline: None,
        },
        audit_id: audit.audit_id,
        purged: ctx.writer.call(|c| c.purged_ranges()).await?,
    };
    let result = auditor.audit(from, to, deadline, counts, cancel).await;
    let audit_id = audit.audit_id;
    match &result {
        Ok(Finished::Yes) => {
            ctx.writer
                .call(move |c| c.finish_audit(audit_id, OffsetDateTime::now_utc()))
                .await?;
        }
        Ok(Finished::Paused) | Err(CycleError::Cancelled) => {}
        Err(e) => {
            let error = format!("{e:#}");
            ctx.writer.call(move |c| c.audit_failed(audit_id, &error)).await?;
        }
    }
    result
}

struct Auditor<'a> {
    ctx: &'a SyncContext,
    /// How differing ranges are re-scanned: as a reconcile, recorded as `audit` windows.
    scan: RangeScan,
    audit_id: i64,
    /// Purged `created_at_ns` ranges, skipped.
    purged: Vec<(i64, i64)>,
}

impl Auditor<'_> {
    async fn audit(
        &self,
        from: Micros,
        to: Micros,
        deadline: Option<Instant>,
        counts: &mut RunCounts,
        cancel: &CancellationToken,
    ) -> Result<Finished, CycleError> {
        let mut cursor = from;
        // The first range's size varies with the audit, so the boundaries (and with them what
        // can cancel out inside one range) differ from one audit to the next.
        let mut size = 1 + ((self.audit_id as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 32) % RANGE_RECORDS;
        while cursor < to {
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Ok(Finished::Paused);
            }
            if cancel.is_cancelled() {
                return Err(CycleError::Cancelled);
            }
            let at = cursor.as_nanos();
            if let Some(&(_, purged_end)) = self.purged.iter().find(|(s, e)| *s <= at && at < *e) {
                cursor = Micros::ceil(from_unix_nanos(purged_end)).min(to);
                continue;
            }
            let stop = self
                .purged
                .iter()
                .map(|&(s, _)| s)
                .filter(|&s| s > at)
                .min()
                .map_or(to, |s| Micros::floor(from_unix_nanos(s)).min(to));
            let nth = self
                .ctx
                .writer
                .call({
                    let org_id = self.ctx.org.id();
                    move |c| c.nth_live_created_ns(org_id.as_deref(), at, stop.as_nanos(), size)
                })
                .await?;
            size = RANGE_RECORDS;
            let end = match nth.map(|ns| Micros::floor(from_unix_nanos(ns))) {
                Some(m) if m > cursor => m,
                // More than a range's worth of records in one microsecond (one unit of the
                // list route's precision).
                Some(_) => cursor.step(self.ctx.org.query_unit()),
                None => stop,
            };
            let mut tally = AuditTally {
                ranges: 1,
                ..AuditTally::default()
            };
            self.check(cursor, end, &mut tally, counts, cancel).await?;
            self.ctx.live.paging(counts);
            let audit_id = self.audit_id;
            self.ctx
                .writer
                .call(move |c| c.advance_audit(audit_id, end.instant(), &tally))
                .await?;
            cursor = end;
        }
        Ok(Finished::Yes)
    }

    /// Compares the range `[a, b)` with upstream: its total and the block of records around
    /// its middle. Re-scans or narrows what differs.
    async fn check(
        &self,
        a: Micros,
        b: Micros,
        tally: &mut AuditTally,
        counts: &mut RunCounts,
        cancel: &CancellationToken,
    ) -> Result<(), CycleError> {
        let local = self.local_count(a, b).await?;
        let offset = (local / 2)
            .saturating_sub(u64::from(BLOCK / 2))
            .min(u64::from(MAX_OFFSET));
        let page = self
            .probe(a, b, offset as u32, BLOCK, tally, counts, cancel)
            .await?;
        if page.total != local {
            return self.narrow(a, b, page.total, tally, counts, cancel).await;
        }
        let block: Vec<(String, i64)> = page
            .items
            .into_iter()
            .map(|e| (e.encounter_id, unix_nanos(e.created_at.0)))
            .collect();
        let (a_ns, b_ns) = (a.as_nanos(), b.as_nanos());
        let agrees = self
            .ctx
            .writer
            .call({
                let org_id = self.ctx.org.id();
                move |c| c.block_agrees(org_id.as_deref(), a_ns, b_ns, offset, &block)
            })
            .await?;
        if !agrees {
            // The total agrees but the records do not: changes that cancel in the count.
            tally.differing += 1;
            self.rescan(a, b, tally, counts, cancel).await?;
        }
        Ok(())
    }

    /// Narrows `[a, b)`, whose upstream total differs from the stored count, by totals,
    /// re-scanning the small or mostly changed ranges that differ.
    async fn narrow(
        &self,
        a: Micros,
        b: Micros,
        upstream: u64,
        tally: &mut AuditTally,
        counts: &mut RunCounts,
        cancel: &CancellationToken,
    ) -> Result<(), CycleError> {
        let mut pending: Vec<(Micros, Micros, Option<u64>)> = vec![(a, b, Some(upstream))];
        while let Some((a, b, known)) = pending.pop() {
            let local = self.local_count(a, b).await?;
            let upstream = match known {
                Some(n) => n,
                None => self.probe(a, b, 0, 1, tally, counts, cancel).await?.total,
            };
            if upstream == local {
                continue;
            }
            tally.differing += 1;
            let larger = upstream.max(local);
            // A range that is mostly changes costs no more to re-scan than to narrow. Where the
            // totals are known to count records the list never shows (`window::scan`), nearly
            // every range differs by them, and narrowing one only ends in re-scanning its
            // parts: a range of audit size is re-scanned whole.
            let unit = self.ctx.org.query_unit();
            let unlisted_everywhere =
                self.ctx.org.totals_count_unlisted.is_known() && larger <= 2 * RANGE_RECORDS;
            if larger <= LEAF_RECORDS
                || 2 * upstream.abs_diff(local) >= larger
                || unlisted_everywhere
                || b <= a.step(unit)
            {
                self.rescan(a, b, tally, counts, cancel).await?;
                continue;
            }
            let (a_ns, b_ns) = (a.as_nanos(), b.as_nanos());
            let median = self
                .ctx
                .writer
                .call({
                    let org_id = self.ctx.org.id();
                    move |c| c.nth_live_created_ns(org_id.as_deref(), a_ns, b_ns, local / 2)
                })
                .await?
                .map(|ns| Micros::floor(from_unix_nanos(ns)).floor_to(unit))
                .filter(|m| *m > a && *m < b);
            let mid = median.unwrap_or_else(|| a.midpoint(b).floor_to(unit));
            if mid <= a {
                self.rescan(a, b, tally, counts, cancel).await?;
                continue;
            }
            let older = self.probe(a, mid, 0, 1, tally, counts, cancel).await?.total;
            // The newer half's total follows from the two probes; if upstream changed between
            // them it is asked for again.
            pending.push((mid, b, upstream.checked_sub(older)));
            pending.push((a, mid, Some(older)));
        }
        Ok(())
    }

    async fn local_count(&self, a: Micros, b: Micros) -> Result<u64, CycleError> {
        let (a_ns, b_ns) = (a.as_nanos(), b.as_nanos());
        Ok(self
            .ctx
            .writer
            .call({
                let org_id = self.ctx.org.id();
                move |c| c.live_count_in_range(org_id.as_deref(), a_ns, b_ns)
            })
            .await?)
    }

    /// One list request for `[a, b)`: its total, and `limit` records from `offset`.
    #[allow(clippy::too_many_arguments)]
    async fn probe(
        &self,
        a: Micros,
        b: Micros,
        offset: u32,
        limit: u32,
        tally: &mut AuditTally,
        counts: &mut RunCounts,
        cancel: &CancellationToken,
    ) -> Result<EncounterPage, CycleError> {
        if cancel.is_cancelled() {
            return Err(CycleError::Cancelled);
        }
        let page = super::window::list_range(self.ctx, a, b, offset, limit, SortOrder::Asc).await?;
        counts.list_requests += 1;
        tally.probes += 1;
        tally.list_requests += 1;
        Ok(page)
    }

    async fn rescan(
        &self,
        a: Micros,
        b: Micros,
        tally: &mut AuditTally,
        counts: &mut RunCounts,
        cancel: &CancellationToken,
    ) -> Result<(), CycleError> {
        tracing::debug!(start = %a, end = %b, "audit: totals differ; re-scanning the range");
        let before = counts.list_requests;
        scan_range(self.ctx, &self.scan, a, b, counts, cancel).await?;
        tally.rescanned += 1;
        tally.list_requests += counts.list_requests - before;
        Ok(())
    }
}
