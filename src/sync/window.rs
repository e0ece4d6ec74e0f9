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
//!
//! Windows are cut by observed density: the first pass closes the window at a page boundary once
//! it has seen about [`TARGET_RECORDS`], so no window ever needs offsets, and a crash re-reads at
//! most one window.

use std::collections::{HashMap, HashSet, VecDeque};

use sha2::{Digest, Sha256};
use time::{Duration, OffsetDateTime};
use tokio_util::sync::CancellationToken;

use super::{CycleError, SyncContext, encounter_record};
use crate::api::wire::{Encounter, EncounterPage};
use crate::api::{ErrorClass, ListQuery, MAX_OFFSET, SortOrder};
use crate::store::{self, EncounterRecord, PageCounts, Pending, Removal, RunCounts, WindowCompletion};

/// Close a window at the first page boundary after this many records: the ledger and crash
/// recovery work in windows, so a crash re-reads at most about this much; each window costs one
/// extra request to verify it.
const TARGET_RECORDS: usize = 5_000;

/// A window whose observations keep disagreeing is given up for this cycle after this many
/// passes (its rows are kept; the next cycle scans it again). Each failed pass halves the
/// window, and a window of one page is a single atomic response, so under any churn that
/// leaves single responses consistent a window of 5,000 records settles within about seven.
const MAX_PASSES: u64 = 12;

/// How many pages a pass may have queued for the writer without having seen them committed:
/// paging goes on while the writer commits, and the writer commits what queued up in one
/// transaction (see `store::Writer::write`).
const MAX_UNCOMMITTED_PAGES: usize = 8;

/// The API's timestamps go down to nanoseconds; so do our windows.
const ONE_NS: Duration = Duration::nanoseconds(1);

/// Which scan a window belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// New time and the revisit horizons; completing a window moves `complete_through` up to
    /// its end. Windows ending at or before `watermark` are recorded as revisits.
    Recent { watermark: Option<OffsetDateTime> },
    /// An explicit range requested by an operator; never touches `complete_through`.
    Backfill { backfill_id: i64 },
}

impl Scope {
    fn ledger_kind(self, end: OffsetDateTime) -> &'static str {
        match self {
            Scope::Recent { watermark: Some(wm) } if end <= wm => "revisit",
            Scope::Recent { .. } => "live",
            Scope::Backfill { .. } => "backfill",
        }
    }
}

/// The result of scanning one window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WindowScan {
    /// `[start, end)` was read completely and committed with its ledger entry; `end` is the
    /// range end, or where the window was cut by density.
    Completed { end: OffsetDateTime },
    /// Upstream kept changing through every pass over `[start, end)`: rows were kept but the
    /// window is not recorded as complete.
    Unsettled { end: OffsetDateTime },
}

/// One window to scan: from `start` up to at most `end`.
#[derive(Debug, Clone, Copy)]
pub(super) struct Window {
    pub run_id: i64,
    pub scope: Scope,
    pub start: OffsetDateTime,
    pub end: OffsetDateTime,
    /// An explicit reconcile: encounters missing from the listing are marked removed even
    /// when the detail route cannot be asked (then as `absent_on_reconcile`).
    pub reconcile: bool,
}

/// What one pass over a window observed.
struct Pass {
    /// Distinct IDs listed, with their created_at.
    seen: HashMap<String, OffsetDateTime>,
    /// Where this pass ended the window.
    end: OffsetDateTime,
    /// The window's total as the list route last reported it.
    total: u64,
    /// Every observation agreed (see the module docs).
    consistent: bool,
    /// The final page, held back to commit with the window's completion.
    last_page: Vec<EncounterRecord>,
    pages: u64,
    /// Pages queued for the writer, oldest first, whose commit has not been awaited yet.
    uncommitted: VecDeque<Pending<PageCounts>>,
}

/// Scans a window until one pass is consistent, then commits its completion. The first pass
/// may cut the window short by density; later passes re-read exactly the cut window.
pub(super) async fn scan(
    ctx: &SyncContext,
    w: Window,
    counts: &mut RunCounts,
    cancel: &CancellationToken,
) -> Result<WindowScan, CycleError> {
    let mut pages = 0;
    let mut end = w.end;
    for pass_no in 1..=MAX_PASSES {
        let pass = run_pass(ctx, w.start, end, pass_no == 1, counts, cancel).await?;
        pages += pass.pages;
        if pass.end < end {
            counts.splits += 1;
            end = pass.end;
        }
        if !pass.consistent {
            counts.rescans += 1;
            // Upstream changed behind the cursor. A narrower window takes fewer requests, so
            // fewer changes can land during it: re-scan the older half.
            if let Some(mid) = median_instant(&pass.seen).filter(|m| *m > w.start && *m < end) {
                counts.splits += 1;
                end = mid;
            }
            tracing::debug!(
                pass = pass_no,
                "upstream changed while paging; re-scanning the window"
            );
            commit(ctx, pass.last_page, Vec::new(), None, counts).await?;
            continue;
        }
        let window = Window { end, ..w };
        let seen: HashSet<&str> = pass.seen.keys().map(String::as_str).collect();
        let removals = find_removals(ctx, &window, &seen, counts).await?;
        let completion = WindowCompletion {
            run_id: w.run_id,
            kind: w.scope.ledger_kind(end),
            backfill_id: match w.scope {
                Scope::Backfill { backfill_id } => Some(backfill_id),
                Scope::Recent { .. } => None,
            },
            start_at: w.start,
            end_at: end,
            records_seen: seen.len() as u64,
            total: pass.total,
            pages,
            passes: pass_no,
            removed: removals.len() as u64,
            id_set_hash: id_set_hash(&seen),
            advances_watermark: matches!(w.scope, Scope::Recent { .. }),
        };
        commit(ctx, pass.last_page, removals, Some(completion), counts).await?;
        counts.windows += 1;
        return Ok(WindowScan::Completed { end });
    }
    tracing::warn!(
        start = %crate::timefmt::format_utc(w.start),
        end = %crate::timefmt::format_utc(end),
        passes = MAX_PASSES,
        "upstream kept changing in this window on every pass; it will be scanned again next cycle"
    );
    Ok(WindowScan::Unsettled { end })
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

/// One pass over `[start, end)`. With `may_cut`, the pass ends the window at the first page
/// boundary after [`TARGET_RECORDS`] (at the instant of that page's last record, which then
/// belongs to the next window).
async fn run_pass(
    ctx: &SyncContext,
    start: OffsetDateTime,
    end: OffsetDateTime,
    may_cut: bool,
    counts: &mut RunCounts,
    cancel: &CancellationToken,
) -> Result<Pass, CycleError> {
    let limit = ctx.sync.page_size.get();
    let mut pass = Pass {
        seen: HashMap::new(),
        end,
        total: 0,
        consistent: true,
        last_page: Vec::new(),
        pages: 0,
        uncommitted: VecDeque::new(),
    };
    let mut cursor = start;
    // IDs of the records at `cursor` that the previous page ended with: the next page, anchored
    // at `cursor`, must start with them (in order) unless upstream changed.
    let mut expected_prefix: Vec<String> = Vec::new();
    loop {
        if cancel.is_cancelled() {
            return Err(CycleError::Cancelled);
        }
        let page = list(ctx, cursor, end, 0, limit, counts).await?;
        pass.pages += 1;
        if pass.pages == 1 {
            pass.total = page.total;
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
        if done {
            note_seen(&mut pass, &page.items);
            pass.last_page = page
                .items
                .into_iter()
                .map(|e| encounter_record(e, &ctx.privacy))
                .collect();
            break;
        }
        let next = last_instant.expect("a page that is not done has items");
        if next == cursor {
            // More than a page of records share one instant: re-anchoring cannot move past it.
            absorb(ctx, &mut pass, page.items, counts).await?;
            page_instant(ctx, &mut pass, cursor, limit, counts, cancel).await?;
            cursor += ONE_NS;
            expected_prefix.clear();
            if cursor >= end {
                break;
            }
            continue;
        }
        if may_cut && pass.seen.len() + page.items.len() >= TARGET_RECORDS {
            // Close the window before `next`; its records there are read again by the next one.
            note_seen(&mut pass, &page.items);
            pass.seen.retain(|_, t| *t < next);
            pass.end = next;
            pass.last_page = page
                .items
                .into_iter()
                .map(|e| encounter_record(e, &ctx.privacy))
                .collect();
            break;
        }
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
        // One cheap request closes the observation: if the window's total now equals the
        // records we saw, nothing was added or removed behind the cursor while we paged.
        let end_total = list(ctx, start, pass.end, 0, 1, counts).await?.total;
        pass.pages += 1;
        if end_total != pass.seen.len() as u64 {
            pass.consistent = false;
        }
        pass.total = end_total;
    }
    // What the pass saw is stored before anyone judges or records the window.
    while let Some(page) = pass.uncommitted.pop_front() {
        add_counts(counts, page.await?);
    }
    Ok(pass)
}

/// The created_at at which half of the seen records lie before.
fn median_instant(seen: &HashMap<String, OffsetDateTime>) -> Option<OffsetDateTime> {
    let mut instants: Vec<OffsetDateTime> = seen.values().copied().collect();
    if instants.len() < 2 {
        return None;
    }
    let mid = instants.len() / 2;
    Some(*instants.select_nth_unstable(mid).1)
}

fn note_seen(pass: &mut Pass, items: &[Encounter]) {
    pass.seen
        .extend(items.iter().map(|e| (e.encounter_id.clone(), e.created_at.0)));
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

/// Records the IDs of a page and queues its rows for the writer, first waiting for the oldest
/// queued page if [`MAX_UNCOMMITTED_PAGES`] are.
async fn absorb(
    ctx: &SyncContext,
    pass: &mut Pass,
    items: Vec<Encounter>,
    counts: &mut RunCounts,
) -> Result<(), CycleError> {
    note_seen(pass, &items);
    let records = items
        .into_iter()
        .map(|e| encounter_record(e, &ctx.privacy))
        .collect();
    if pass.uncommitted.len() >= MAX_UNCOMMITTED_PAGES
        && let Some(oldest) = pass.uncommitted.pop_front()
    {
        add_counts(counts, oldest.await?);
    }
    pass.uncommitted
        .push_back(queue_commit(ctx, records, Vec::new(), None));
    Ok(())
}

fn queue_commit(
    ctx: &SyncContext,
    records: Vec<EncounterRecord>,
    removals: Vec<Removal>,
    completion: Option<WindowCompletion>,
) -> Pending<PageCounts> {
    ctx.writer.write(move |tx| {
        store::commit_page(
            tx,
            &records,
            &removals,
            completion.as_ref(),
            time::OffsetDateTime::now_utc(),
        )
    })
}

/// Commits rows (and a window's removals and completion) and waits until they are stored.
async fn commit(
    ctx: &SyncContext,
    records: Vec<EncounterRecord>,
    removals: Vec<Removal>,
    completion: Option<WindowCompletion>,
    counts: &mut RunCounts,
) -> Result<(), CycleError> {
    add_counts(counts, queue_commit(ctx, records, removals, completion).await?);
    Ok(())
}

fn add_counts(counts: &mut RunCounts, pc: PageCounts) {
    counts.encounters_new += pc.new;
    counts.encounters_changed += pc.changed;
    counts.encounters_unchanged += pc.unchanged + pc.stale;
    counts.encounters_removed += pc.removed;
}

/// Encounters stored as live in the window but absent from a complete listing of it: asks the
/// detail route about each. Gone (404) or unavailable (403 for this encounter) → a removal;
/// still there → it is upserted from the detail (it was only briefly invisible).
async fn find_removals(
    ctx: &SyncContext,
    w: &Window,
    seen: &HashSet<&str>,
    counts: &mut RunCounts,
) -> Result<Vec<Removal>, CycleError> {
    let (start, end) = (w.start, w.end);
    let stored = ctx
        .writer
        .call(move |c| store::live_ids_in_range(c, start, end))
        .await?;
    let mut removals = Vec::new();
    let mut still_there = Vec::new();
    for encounter_id in stored.into_iter().filter(|id| !seen.contains(id.as_str())) {
        counts.detail_requests += 1;
        match ctx.client.encounter(&encounter_id).await {
            Ok(e) => still_there.push(encounter_record(e, &ctx.privacy)),
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
fn id_set_hash(ids: &HashSet<&str>) -> String {
    let mut sorted: Vec<&str> = ids.iter().copied().collect();
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
    fn windows_ending_before_the_watermark_are_revisits() {
        let wm = datetime!(2026-03-01 0:00 UTC);
        let recent = Scope::Recent { watermark: Some(wm) };
        assert_eq!(recent.ledger_kind(wm), "revisit");
        assert_eq!(recent.ledger_kind(wm + ONE_NS), "live");
        assert_eq!(Scope::Recent { watermark: None }.ledger_kind(wm), "live");
        assert_eq!(Scope::Backfill { backfill_id: 1 }.ledger_kind(wm), "backfill");
    }

    #[test]
    fn id_set_hashes_do_not_depend_on_order() {
        let a: HashSet<&str> = ["enc_b", "enc_a"].into_iter().collect();
        let b: HashSet<&str> = ["enc_a", "enc_b"].into_iter().collect();
        assert_eq!(id_set_hash(&a), id_set_hash(&b));
        let c: HashSet<&str> = ["enc_a"].into_iter().collect();
        assert_ne!(id_set_hash(&a), id_set_hash(&c));
    }
}
