//! Reading one `created_at` window `[start, end)` completely, although the list route offers no
//! snapshot: the algorithm of ARCHITECTURE.md ("Why no record is missed").
//!
//! A pass pages the window by *re-anchoring*: each request asks for `start_at = created_at of
//! the last record seen` at offset 0, so every response is an atomic view of everything not yet
//! passed, and records removed or inserted behind the cursor cannot shift what is ahead of it.
//! Only when a whole page shares one `created_at` instant does a pass fall back to offset paging
//! inside that instant, with one record of overlap between pages. A pass is accepted when its
//! observations agree (the window's total at the start equals the distinct IDs seen equals the
//! total at the end, and every overlap matched); otherwise the window is re-scanned. The last
//! page, the removals it implies and the window's ledger entry commit in one transaction.

use std::collections::HashSet;

use sha2::{Digest, Sha256};
use time::{Duration, OffsetDateTime};
use tokio_util::sync::CancellationToken;

use super::{CycleError, SyncContext, to_record};
use crate::api::wire::{Encounter, EncounterPage};
use crate::api::{ErrorClass, ListQuery, MAX_OFFSET, SortOrder};
use crate::store::{self, EncounterRecord, Removal, RunCounts, WindowCompletion};

/// Aim for windows of about this many records: the ledger and crash recovery work in windows,
/// so a crash re-reads at most about this much; each window boundary costs about half a page.
const TARGET_RECORDS: u64 = 5_000;

/// A window whose first page reports more records than this is narrowed before paging.
const SPLIT_ABOVE: u64 = 8_000;

/// A window whose observations keep disagreeing is given up for this cycle after this many
/// passes (its rows are kept; the next cycle scans it again).
const MAX_PASSES: u64 = 5;

/// The API's timestamps go down to nanoseconds; so do our windows.
const ONE_NS: Duration = Duration::nanoseconds(1);

/// What kind of scan a window belongs to; stored in the ledger.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WindowKind {
    /// New time: advances `complete_through`.
    Live,
    /// Re-listing recent history to pick up changes and late-visible records.
    Revisit,
    /// An explicit range requested by an operator; never touches `complete_through`.
    Backfill { backfill_id: i64 },
}

impl WindowKind {
    fn as_str(self) -> &'static str {
        match self {
            WindowKind::Live => "live",
            WindowKind::Revisit => "revisit",
            WindowKind::Backfill { .. } => "backfill",
        }
    }
}

/// The result of scanning one window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WindowScan {
    /// Read completely and committed with its ledger entry.
    Completed { total: u64 },
    /// The first page showed more records than one window should hold; nothing was written.
    TooDense { total: u64 },
    /// Upstream kept changing through every pass: rows were kept but the window is not
    /// recorded as complete.
    Unsettled,
}

/// Chooses window widths from the density observed so far.
pub(super) struct Planner {
    horizon: OffsetDateTime,
    width: Duration,
}

impl Planner {
    /// The first window spans everything up to the horizon: when the range holds few records
    /// this reads it in the fewest requests, and when it holds many the first page's `total`
    /// says how to narrow it.
    pub fn new(cursor: OffsetDateTime, horizon: OffsetDateTime) -> Planner {
        Planner {
            horizon,
            width: (horizon - cursor).max(ONE_NS),
        }
    }

    pub fn next_end(&self, cursor: OffsetDateTime) -> Option<OffsetDateTime> {
        (cursor < self.horizon).then(|| (cursor + self.width).min(self.horizon))
    }

    /// After a completed window: size the next one for about [`TARGET_RECORDS`].
    pub fn observe(&mut self, start: OffsetDateTime, end: OffsetDateTime, total: u64) {
        self.width = scale(end - start, TARGET_RECORDS, total.max(1));
    }

    /// After a window that was too dense: retry a narrower one, at most half as wide.
    pub fn shrink(&mut self, start: OffsetDateTime, end: OffsetDateTime, total: u64) {
        let span = end - start;
        self.width = scale(span, TARGET_RECORDS, total.max(1))
            .min(span / 2)
            .max(ONE_NS);
    }
}

fn scale(width: Duration, num: u64, den: u64) -> Duration {
    let nanos = width.whole_nanoseconds() * num as i128 / den as i128;
    Duration::nanoseconds(nanos.clamp(1, i64::MAX as i128) as i64)
}

/// One window to scan.
#[derive(Debug, Clone, Copy)]
pub(super) struct Window {
    pub run_id: i64,
    pub kind: WindowKind,
    pub start: OffsetDateTime,
    pub end: OffsetDateTime,
    /// An explicit reconcile: encounters missing from the listing are marked removed even
    /// when the detail route cannot be asked (then as `absent_on_reconcile`).
    pub reconcile: bool,
}

/// What one pass over a window observed.
struct Pass {
    seen: HashSet<String>,
    first_total: u64,
    /// Every observation agreed (see the module docs).
    consistent: bool,
    /// The final page, held back to commit with the window's completion.
    last_page: Vec<EncounterRecord>,
    pages: u64,
}

/// Scans a window until one pass is consistent, then commits its completion.
pub(super) async fn scan(
    ctx: &SyncContext,
    w: Window,
    counts: &mut RunCounts,
    cancel: &CancellationToken,
) -> Result<WindowScan, CycleError> {
    let mut pages = 0;
    for pass_no in 1..=MAX_PASSES {
        let pass = match run_pass(ctx, &w, pass_no == 1, counts, cancel).await? {
            Ok(pass) => pass,
            Err(total) => return Ok(WindowScan::TooDense { total }),
        };
        pages += pass.pages;
        if !pass.consistent {
            counts.rescans += 1;
            tracing::debug!(
                pass = pass_no,
                "upstream changed while paging; re-scanning the window"
            );
            commit(ctx, pass.last_page, Vec::new(), None, counts).await?;
            continue;
        }
        let removals = find_removals(ctx, &w, &pass.seen, counts).await?;
        let completion = WindowCompletion {
            run_id: w.run_id,
            kind: w.kind.as_str(),
            backfill_id: match w.kind {
                WindowKind::Backfill { backfill_id } => Some(backfill_id),
                _ => None,
            },
            start_at: w.start,
            end_at: w.end,
            records_seen: pass.seen.len() as u64,
            total: pass.first_total,
            pages,
            passes: pass_no,
            removed: removals.len() as u64,
            id_set_hash: id_set_hash(&pass.seen),
            advances_watermark: w.kind == WindowKind::Live,
        };
        commit(ctx, pass.last_page, removals, Some(completion), counts).await?;
        counts.windows += 1;
        return Ok(WindowScan::Completed {
            total: pass.first_total,
        });
    }
    tracing::warn!(
        start = %crate::timefmt::format_utc(w.start),
        end = %crate::timefmt::format_utc(w.end),
        passes = MAX_PASSES,
        "upstream kept changing in this window on every pass; it will be scanned again next cycle"
    );
    Ok(WindowScan::Unsettled)
}

async fn list(
    ctx: &SyncContext,
    start: OffsetDateTime,
    end: OffsetDateTime,
    offset: u32,
    limit: u32,
    counts: &mut RunCounts,
) -> Result<EncounterPage, CycleError> {
    let query = ListQuery {
        start_at: Some(start),
        end_at: Some(end),
        offset,
        limit,
        sort: SortOrder::Asc,
    };
    let page = ctx.client.list_encounters(&query).await?;
    counts.list_requests += 1;
    Ok(page)
}

/// One pass over the window. `Err(total)` when the first page shows the window is too dense
/// to be one window (only checked on the first pass, before anything is written).
async fn run_pass(
    ctx: &SyncContext,
    w: &Window,
    may_split: bool,
    counts: &mut RunCounts,
    cancel: &CancellationToken,
) -> Result<Result<Pass, u64>, CycleError> {
    let limit = ctx.sync.page_size.get();
    let mut pass = Pass {
        seen: HashSet::new(),
        first_total: 0,
        consistent: true,
        last_page: Vec::new(),
        pages: 0,
    };
    let mut cursor = w.start;
    // IDs of the records at `cursor` that the previous page ended with: the next page, anchored
    // at `cursor`, must start with them (in order) unless upstream changed.
    let mut expected_prefix: Vec<String> = Vec::new();
    loop {
        if cancel.is_cancelled() {
            return Err(CycleError::Cancelled);
        }
        let page = list(ctx, cursor, w.end, 0, limit, counts).await?;
        pass.pages += 1;
        if pass.pages == 1 {
            pass.first_total = page.total;
            if may_split && page.total > SPLIT_ABOVE && w.end - w.start > ONE_NS {
                return Ok(Err(page.total));
            }
        }
        let at_cursor: Vec<&str> = page
            .items
            .iter()
            .take_while(|e| e.created_at.0 == cursor)
            .map(|e| e.encounter_id.as_str())
            .collect();
        if !expected_prefix.is_empty()
            && at_cursor
                .get(..expected_prefix.len())
                .is_none_or(|p| p != expected_prefix)
        {
            pass.consistent = false;
        }
        let received = page.items.len() as u64;
        let done = received < limit as u64 || received >= page.total;
        let last_instant = page.items.last().map(|e| e.created_at.0);
        let whole_page_at_cursor = !done && last_instant == Some(cursor);
        if done {
            pass.seen
                .extend(page.items.iter().map(|e| e.encounter_id.clone()));
            pass.last_page = page.items.into_iter().map(to_record).collect();
            break;
        }
        if whole_page_at_cursor {
            // More than a page of records share one instant: re-anchoring cannot move past it.
            absorb(ctx, &mut pass, page.items, counts).await?;
            page_instant(ctx, &mut pass, cursor, limit, counts, cancel).await?;
            cursor += ONE_NS;
            expected_prefix.clear();
            if cursor >= w.end {
                break;
            }
            continue;
        }
        let next = last_instant.expect("a page that is not done has items");
        expected_prefix = page
            .items
            .iter()
            .filter(|e| e.created_at.0 == next)
            .map(|e| e.encounter_id.clone())
            .collect();
        cursor = next;
        absorb(ctx, &mut pass, page.items, counts).await?;
    }
    if pass.pages > 1 {
        // One cheap request closes the observation: if the window's total still equals what
        // we saw and what it was at the start, nothing was added or removed behind us.
        let end_total = list(ctx, w.start, w.end, 0, 1, counts).await?.total;
        pass.pages += 1;
        let seen = pass.seen.len() as u64;
        if pass.first_total != seen || end_total != seen {
            pass.consistent = false;
        }
    }
    Ok(Ok(pass))
}

/// Offset-pages the records sharing the instant `at`, the first page of which (at offset 0)
/// has been seen. Pages overlap by one record, which must match.
async fn page_instant(
    ctx: &SyncContext,
    pass: &mut Pass,
    at: OffsetDateTime,
    limit: u32,
    counts: &mut RunCounts,
    cancel: &CancellationToken,
) -> Result<(), CycleError> {
    let step = limit.saturating_sub(1).max(1);
    let mut offset = 0u32;
    let mut instant_total = None;
    let mut overlap: Option<String> = None;
    loop {
        if cancel.is_cancelled() {
            return Err(CycleError::Cancelled);
        }
        let page = list(ctx, at, at + ONE_NS, offset, limit, counts).await?;
        pass.pages += 1;
        if *instant_total.get_or_insert(page.total) != page.total {
            pass.consistent = false;
        }
        if overlap.is_some() && overlap.as_deref() != page.items.first().map(|e| e.encounter_id.as_str()) {
            pass.consistent = false;
        }
        overlap = page.items.last().map(|e| e.encounter_id.clone());
        let received = page.items.len() as u32;
        let last = received < limit;
        absorb(ctx, pass, page.items, counts).await?;
        if last {
            return Ok(());
        }
        if offset as u64 + step as u64 > MAX_OFFSET as u64 {
            return Err(CycleError::Other(anyhow::anyhow!(
                "more than {} encounters share the created_at instant {}; the API's offset cap \
                 (10000) makes the rest unreachable",
                MAX_OFFSET + limit,
                crate::timefmt::format_utc(at)
            )));
        }
        offset += step;
    }
}

/// Records the IDs of a page and commits its rows.
async fn absorb(
    ctx: &SyncContext,
    pass: &mut Pass,
    items: Vec<Encounter>,
    counts: &mut RunCounts,
) -> Result<(), CycleError> {
    pass.seen.extend(items.iter().map(|e| e.encounter_id.clone()));
    let records = items.into_iter().map(to_record).collect();
    commit(ctx, records, Vec::new(), None, counts).await
}

async fn commit(
    ctx: &SyncContext,
    records: Vec<EncounterRecord>,
    removals: Vec<Removal>,
    completion: Option<WindowCompletion>,
    counts: &mut RunCounts,
) -> Result<(), CycleError> {
    let pc = ctx
        .writer
        .call(move |c| {
            store::commit_page(
                c,
                &records,
                &removals,
                completion.as_ref(),
                time::OffsetDateTime::now_utc(),
            )
        })
        .await?;
    counts.encounters_new += pc.new;
    counts.encounters_changed += pc.changed;
    counts.encounters_unchanged += pc.unchanged + pc.stale;
    counts.encounters_removed += pc.removed;
    Ok(())
}

/// Encounters stored as live in the window but absent from a complete listing of it: asks the
/// detail route about each. Gone (404) or unavailable (403 for this encounter) → a removal;
/// still there → it is upserted from the detail (it was only briefly invisible).
async fn find_removals(
    ctx: &SyncContext,
    w: &Window,
    seen: &HashSet<String>,
    counts: &mut RunCounts,
) -> Result<Vec<Removal>, CycleError> {
    let (start, end) = (w.start, w.end);
    let stored = ctx
        .writer
        .call(move |c| store::live_ids_in_range(c, start, end))
        .await?;
    let mut removals = Vec::new();
    let mut still_there = Vec::new();
    for encounter_id in stored.into_iter().filter(|id| !seen.contains(id)) {
        counts.detail_requests += 1;
        match ctx.client.encounter(&encounter_id).await {
            Ok(e) => still_there.push(to_record(e)),
            Err(e) if e.class() == ErrorClass::ResourceUnavailable => {
                let reason = e.reason_code().unwrap_or("encounter_not_found").to_owned();
                tracing::debug!(encounter_id, reason, "encounter gone upstream");
                removals.push(Removal { encounter_id, reason });
            }
            Err(e) if e.class() == ErrorClass::OperatorMustAct && !e.is_auth() && w.reconcile => {
                // The detail route is closed to this key, but a reconcile's listing is complete:
                // absence is the evidence.
                removals.push(Removal {
                    encounter_id,
                    reason: "absent_on_reconcile".to_owned(),
                });
            }
            Err(e) => return Err(e.into()),
        }
    }
    if !still_there.is_empty() {
        commit(ctx, still_there, Vec::new(), None, counts).await?;
    }
    Ok(removals)
}

/// SHA-256 over the sorted IDs, newline-separated: equal sets give equal hashes across runs.
fn id_set_hash(ids: &HashSet<String>) -> String {
    let mut sorted: Vec<&str> = ids.iter().map(String::as_str).collect();
    sorted.sort_unstable();
    let mut h = Sha256::new();
    for id in sorted {
        h.update(id.as_bytes());
        h.update(b"\n");
    }
    super::hex(&h.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    #[test]
    fn the_planner_narrows_dense_windows_and_widens_sparse_ones() {
        let start = datetime!(2026-01-01 0:00 UTC);
        let horizon = datetime!(2026-03-01 0:00 UTC);
        let mut p = Planner::new(start, horizon);
        assert_eq!(p.next_end(start), Some(horizon));
        p.shrink(start, horizon, 50_000);
        let end = p.next_end(start).unwrap();
        assert_eq!(end - start, (horizon - start) / 10);
        p.observe(start, end, 10);
        assert_eq!(p.next_end(end), Some(horizon));
        assert_eq!(p.next_end(horizon), None);
    }

    #[test]
    fn shrinking_never_goes_below_one_nanosecond() {
        let start = datetime!(2026-01-01 0:00 UTC);
        let mut p = Planner::new(start, start + ONE_NS);
        p.shrink(start, start + ONE_NS, 1_000_000);
        assert_eq!(p.next_end(start), Some(start + ONE_NS));
    }
}
