//! Reading one `created_at` window `[start, end)` completely, although the list route offers no
//! snapshot: the algorithm of `docs/replication.md` ("Why nothing is missed").
//!
//! Every bound sent is a [`Micros`]: at most six fractional digits, so a server that parses
//! datetimes to microseconds (and rejects or truncates more digits) sees exactly the ranges we
//! mean, and no range is ever narrower than one microsecond.
//!
//! A pass pages the window by *re-anchoring*: each request asks for `start_at = the microsecond
//! of the last record seen` at offset 0, so records removed or inserted behind the cursor cannot
//! shift what is ahead of it. When a page's last microsecond holds half a page or more, that
//! microsecond is offset-paged instead (ascending, then descending from the other end, so up to
//! 20,200 records can share one instant). Re-anchoring trusts the rendered `created_at`; a
//! response that shows rendering coarser than filtering (a record outside the requested range,
//! or out of order) switches the window to *offset paging* of the whole range, narrowed by
//! totals until the offset cap reaches every record. A pass is accepted when its observations
//! agree; otherwise the window is re-scanned, narrower. Every pass has a request bound
//! proportional to the records it saw, so no upstream can make a window spin. The last page,
//! the removals it implies and the window's ledger entry commit in one transaction.
//!
//! Windows are cut by observed density: the first pass closes the window at a page boundary once
//! it has seen the window's target number of records — [`TARGET_RECORDS`] while upstream is
//! quiet, fewer while it churns (see [`WindowTarget`]) — so the ledger and crash recovery work in
//! windows of a few thousand records, and a window that must be verified again is small.

use std::collections::{HashMap, HashSet, VecDeque};

use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

use super::record::encounter_record;
use super::{CycleError, SyncContext};
use crate::api::wire::{Encounter, EncounterPage};
use crate::api::{ErrorClass, ListQuery, MAX_OFFSET, SortOrder};
use crate::store::hex;
use crate::store::{EncounterRecord, PageCounts, Pending, Removal, RunCounts, WindowCompletion};
use crate::timefmt::Micros;

/// Close a window at the first page boundary after this many records: the ledger and crash
/// recovery work in windows, so a crash re-reads at most about this much; each window costs one
/// extra request to verify it.
const TARGET_RECORDS: usize = 5_000;

/// The smallest window target under churn: two pages, so verification stays below half the
/// requests even when upstream changes on every request.
const MIN_TARGET_RECORDS: usize = 200;

/// How many records the next window aims at. A window read without seeing upstream change
/// doubles it (up to [`TARGET_RECORDS`]); one that saw upstream change halves it (down to
/// [`MIN_TARGET_RECORDS`]). Under churn a pass over a large window almost never agrees with the
/// totals, and every disagreement re-reads part of it: smaller windows are verified before
/// upstream changes them, so re-reads stay rare and short. A pass re-read for another reason
/// (records counted but never listed, shown again by the next pass; rendering found coarse)
/// is no sign of churn, and smaller windows would only cost more requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct WindowTarget(usize);

impl WindowTarget {
    pub(super) fn new() -> WindowTarget {
        WindowTarget(TARGET_RECORDS)
    }

    fn records(self) -> usize {
        self.0
    }

    /// Adjusts the target after a window that did (or did not) see upstream change.
    pub(super) fn after(self, changed: bool) -> WindowTarget {
        if !changed {
            WindowTarget((self.0 * 2).min(TARGET_RECORDS))
        } else {
            WindowTarget((self.0 / 2).max(MIN_TARGET_RECORDS))
        }
    }
}

/// A window read completely: where it ended, and whether upstream was seen changing under it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Completed {
    pub end: Micros,
    pub changed: bool,
}

/// A window whose observations keep disagreeing is given up for this cycle after this many
/// passes (its rows are kept; the cycle fails naming the window and the next one scans it
/// again). Each failed pass halves the window, and a window of one page is a single atomic
/// response, so under any churn that leaves single responses consistent a window of 5,000
/// records settles within about seven.
const MAX_PASSES: u64 = 12;

/// After this many consecutive re-anchored passes that disagreed, the window is read by offset
/// paging instead: a server that rounds `created_at` *up* when rendering makes every re-anchored
/// pass disagree (the anchor lies after records not yet read), and offset paging does not use
/// rendered instants at all.
const ANCHORED_FAILURES_BEFORE_OFFSETS: u64 = 4;

/// A disagreeing pass over at least this many pages, whose total differs from the records it
/// saw by at most [`REPAIR_MAX_DIFFERENCE`], is repaired: the disagreement is narrowed by totals
/// and only the sub-ranges that disagree are read again. Smaller windows are cheaper to re-scan.
const REPAIR_MIN_PAGES: u64 = 8;
const REPAIR_MAX_DIFFERENCE: u64 = 3;

/// A repair gives up (and the window is re-scanned narrower) past this many disagreeing
/// sub-ranges or this many probes.
const REPAIR_MAX_LEAVES: usize = 4;
const REPAIR_MAX_PROBES: u64 = 48;

/// How many pages a pass may have queued for the writer without having seen them committed:
/// paging goes on while the writer commits, and the writer commits what queued up in one
/// transaction (see `store::Writer::write`).
const MAX_UNCOMMITTED_PAGES: usize = 8;

/// Records one offset-paged range can reach from one end: offsets stop at 10,000.
const OFFSET_REACH: u64 = MAX_OFFSET as u64 + 100;

/// Which scan a window belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// New time and the revisit horizons; completing a window moves `complete_through` up to
    /// its end. Windows ending at or before `watermark` are recorded as revisits.
    Recent { watermark: Option<OffsetDateTime> },
    /// An explicit range requested by an operator; never touches `complete_through`.
    Backfill { backfill_id: i64 },
    /// A range of completed history whose totals disagreed with the warehouse in an audit.
    Audit,
}

impl Scope {
    fn ledger_kind(self, end: Micros) -> &'static str {
        match self {
            Scope::Recent { watermark: Some(wm) } if end.instant() <= wm => "revisit",
            Scope::Recent { .. } => "live",
            Scope::Backfill { .. } => "backfill",
            Scope::Audit => "audit",
        }
    }
}

/// One window to scan: from `start` up to at most `end`.
#[derive(Debug, Clone, Copy)]
pub(super) struct Window {
    pub run_id: i64,
    pub scope: Scope,
    pub start: Micros,
    pub end: Micros,
    /// An explicit reconcile: encounters missing from the listing are marked removed even
    /// when the detail route cannot be asked (then as `absent_on_reconcile`).
    pub reconcile: bool,
    /// How many records the first pass reads before it closes the window.
    pub target: WindowTarget,
}

/// How a pass reads its window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Method {
    /// Offset 0 always, `start_at` moved to the last record's microsecond.
    Anchored,
    /// Offsets over the whole window (narrowed until they reach every record), for servers
    /// whose rendered `created_at` cannot be used as an anchor.
    Offsets,
}

/// What one pass over a window observed.
struct Pass {
    start: Micros,
    /// Where this pass ended the window.
    end: Micros,
    /// Distinct IDs listed, with their created_at as rendered.
    seen: HashMap<String, OffsetDateTime>,
    /// The window's total as the list route last reported it.
    total: u64,
    /// Every observation agreed (see the module docs).
    consistent: bool,
    /// Upstream changed between two responses of this pass (a page did not start where the
    /// one before it ended, or the total moved between offset pages), as opposed to the
    /// final total alone disagreeing with the records seen.
    shifted: bool,
    /// Evidence that the server renders `created_at` coarser than it filters and sorts.
    coarse: Option<String>,
    /// The final page, held back to commit with the window's completion.
    last_page: Vec<EncounterRecord>,
    pages: u64,
    /// The most records one page of this pass held: the server's page size when it holds
    /// pages to fewer records than `limit` asks for.
    largest_page: u32,
    /// Pages queued for the writer, oldest first, whose commit has not been awaited yet.
    uncommitted: VecDeque<Pending<PageCounts>>,
    /// The content hashes of the last page read, by ID: re-anchoring reads its last records
    /// again, and an identical copy is not sent to the writer twice (nor counted as unchanged).
    previous: HashMap<String, String>,
}

impl Pass {
    fn new(start: Micros, end: Micros) -> Pass {
        Pass {
            start,
            end,
            seen: HashMap::new(),
            total: 0,
            consistent: true,
            shifted: false,
            coarse: None,
            last_page: Vec::new(),
            pages: 0,
            largest_page: 0,
            uncommitted: VecDeque::new(),
            previous: HashMap::new(),
        }
    }

    /// Maps a page to warehouse records, leaving out records identical to their copy on the
    /// previous page, and remembers this page's.
    fn records(&mut self, ctx: &SyncContext, items: Vec<Encounter>) -> Vec<EncounterRecord> {
        self.note_seen(&items);
        let records: Vec<EncounterRecord> = items
            .into_iter()
            .map(|e| encounter_record(e, &ctx.privacy))
            .collect();
        let previous = std::mem::replace(
            &mut self.previous,
            records
                .iter()
                .map(|r| (r.encounter_id.clone(), r.content_hash.clone()))
                .collect(),
        );
        records
            .into_iter()
            .filter(|r| previous.get(&r.encounter_id) != Some(&r.content_hash))
            .collect()
    }

    /// The most list requests this pass may make, given what it has read so far: a few for
    /// the verification and the narrowing of an offset-paged window, plus a small multiple of
    /// the pages its records fill. Every request that adds no record uses up the fixed part, so
    /// a server that never lets the cursor advance ends the pass instead of spinning.
    fn request_bound(&self, limit: u32) -> u64 {
        72 + 6 * (self.seen.len() as u64).div_ceil(step(self.page_size(limit)))
    }

    /// Records a full page holds: `limit`, or the largest page the server returned in this
    /// pass when its pages are smaller.
    fn page_size(&self, limit: u32) -> u32 {
        match self.largest_page {
            0 => limit,
            served => limit.min(served),
        }
    }

    /// One list request of this pass: counted, bounded, cancellable.
    #[allow(clippy::too_many_arguments)]
    async fn list(
        &mut self,
        ctx: &SyncContext,
        from: Micros,
        to: Micros,
        offset: u32,
        limit: u32,
        sort: SortOrder,
        counts: &mut RunCounts,
        cancel: &CancellationToken,
    ) -> Result<EncounterPage, CycleError> {
        if cancel.is_cancelled() {
            return Err(CycleError::Cancelled);
        }
        let bound = self.request_bound(ctx.sync.page_size.get());
        if self.pages >= bound {
            return Err(CycleError::RequestBound {
                start: self.start.to_string(),
                end: self.end.to_string(),
                requests: self.pages,
                records: self.seen.len() as u64,
            });
        }
        let page = list_range(ctx, from, to, offset, limit, sort).await?;
        counts.list_requests += 1;
        self.pages += 1;
        self.largest_page = self
            .largest_page
            .max(u32::try_from(page.items.len()).unwrap_or(u32::MAX));
        super::admit(ctx, &page.items).await?;
        Ok(page)
    }

    fn saw_a_shift(&mut self) {
        self.consistent = false;
        self.shifted = true;
    }

    fn note_seen(&mut self, items: &[Encounter]) {
        self.seen
            .extend(items.iter().map(|e| (e.encounter_id.clone(), e.created_at.0)));
    }

    /// Records the IDs of a page and queues its rows for the writer, first waiting for the
    /// oldest queued page if [`MAX_UNCOMMITTED_PAGES`] are.
    async fn absorb(
        &mut self,
        ctx: &SyncContext,
        items: Vec<Encounter>,
        counts: &mut RunCounts,
    ) -> Result<(), CycleError> {
        let records = self.records(ctx, items);
        if self.uncommitted.len() >= MAX_UNCOMMITTED_PAGES
            && let Some(oldest) = self.uncommitted.pop_front()
        {
            add_counts(counts, oldest.await?)?;
        }
        self.uncommitted
            .push_back(queue_commit(ctx, records, Vec::new(), None));
        Ok(())
    }

    /// Holds a page back to commit with the window's completion.
    fn keep_last(&mut self, ctx: &SyncContext, items: Vec<Encounter>) {
        self.last_page = self.records(ctx, items);
    }

    /// Waits until every page this pass queued is stored: what a pass saw is stored before
    /// anyone judges or records the window.
    async fn settle(&mut self, counts: &mut RunCounts) -> Result<(), CycleError> {
        while let Some(page) = self.uncommitted.pop_front() {
            add_counts(counts, page.await?)?;
        }
        Ok(())
    }
}

/// A pass whose final total exceeded the records it saw, kept to judge the next pass by: a
/// server whose totals count records it never lists (encounters the key may not see) shows the
/// same total over the same listed records every time, while a record that appeared behind the
/// cursor is listed by the next pass.
struct Disagreement {
    /// The end of the range the next pass re-scans (the pass's own, or the older part of it).
    end: Micros,
    /// That range's total, asked right after the pass (the pass's own total for its whole range).
    total: u64,
    /// How many of the pass's records lie in that range: all of them for its whole range; for
    /// its older part, those whose rendered `created_at` is before `end`, unless rendered
    /// instants cannot be trusted to place records (then unknown, and nothing can repeat it).
    listed: Option<u64>,
    /// Every record the pass listed.
    seen: HashMap<String, OffsetDateTime>,
}

impl Disagreement {
    /// Whether a pass's counts disagree in the way records counted but never listed make them:
    /// its total exceeds the records it listed, and nothing moved while it paged.
    fn possible(pass: &Pass) -> bool {
        pass.total > pass.seen.len() as u64 && !pass.shifted && pass.coarse.is_none()
    }

    /// The disagreement of a [`Disagreement::possible`] pass within `[start, end)`, the range
    /// the next pass re-reads, whose `total` was asked for it; `instants_place_records` says
    /// whether rendered instants may count the pass's records in an older part.
    fn of(pass: &mut Pass, end: Micros, total: u64, instants_place_records: bool) -> Disagreement {
        let listed = if end >= pass.end {
            Some(pass.seen.len() as u64)
        } else {
            instants_place_records.then(|| pass.seen.values().filter(|t| **t < end.instant()).count() as u64)
        };
        Disagreement {
            end,
            total,
            listed,
            seen: std::mem::take(&mut pass.seen),
        }
    }

    /// Whether this disagreement can be repeated: how many records it listed in the range the
    /// next pass reads is known.
    fn comparable(&self) -> bool {
        self.listed.is_some()
    }

    /// Whether `pass`, over exactly the range this one expects, changed nothing in it: no
    /// response moved under it, its total is the one asked before it began, and it listed the
    /// same records (none the earlier pass had not, and as many as the earlier pass listed
    /// there). A record removed before the second pass read it and another inserted behind its
    /// cursor leave the total as it was, but not the records listed.
    fn repeats_in(&self, pass: &Pass) -> bool {
        self.listed == Some(pass.seen.len() as u64)
            && pass.total == self.total
            && !pass.shifted
            && pass.coarse.is_none()
            && pass.end == self.end
            && pass.seen.keys().all(|id| self.seen.contains_key(id))
    }
}

/// One list request for `[from, to)` of any sync path (passes, repairs, audits), its bounds
/// widened to the organization's query unit (`OrgScope::query_unit`: `from` down, `to` up, which
/// only ever admits more records). A server that reads the bounds coarser than microseconds
/// (to the millisecond, as JavaScript's `Date` does, or to the second) collapses a range within
/// one of its units to nothing and refuses it (422 `invalid_query` on `start_at`/`end_at`): the
/// unit is then coarsened, once per organization and process, and the request asked again at
/// it. A refusal of a range no coarser unit would widen is returned as it is.
pub(super) async fn list_range(
    ctx: &SyncContext,
    from: Micros,
    to: Micros,
    offset: u32,
    limit: u32,
    sort: SortOrder,
) -> Result<EncounterPage, CycleError> {
    loop {
        let unit = ctx.org.query_unit();
        let query = ListQuery {
            start_at: Some(from.floor_to(unit)),
            end_at: Some(to.ceil_to(unit)),
            offset,
            limit,
            sort,
        };
        match ctx.client.list_encounters(&query).await {
            Err(e) if e.refuses_a_bound() => {
                // Only a range within one coarser unit collapses at it; another refusal is not
                // about precision.
                let Some(coarser) = super::coarser_query_unit(unit).filter(|next| to <= from.step(*next))
                else {
                    return Err(e.into());
                };
                ctx.org.coarsen_query_unit(coarser);
                tracing::warn!(
                    organization = %ctx.org.name,
                    unit_micros = ctx.org.query_unit(),
                    "the list route refused a range narrower than its precision; list bounds are \
                     widened to whole units of it from now on"
                );
            }
            other => return Ok(other?),
        }
    }
}

/// Offset step between pages: one record of overlap, which must match.
fn step(limit: u32) -> u64 {
    u64::from(limit.saturating_sub(1).max(1))
}

/// Scans a window until one pass is consistent, then commits its completion and returns where
/// the window ended. The first pass may cut the window short by density; later passes re-read
/// exactly the cut window (or a narrower one after a disagreement).
pub(super) async fn scan(
    ctx: &SyncContext,
    w: Window,
    counts: &mut RunCounts,
    cancel: &CancellationToken,
) -> Result<Completed, CycleError> {
    let mut pages = 0;
    let mut end = w.end;
    // A server seen rendering `created_at` coarser than it filters does so for every window:
    // re-anchoring cannot work there, and a first anchored pass would only find that out again.
    let mut method = if ctx.org.renders_coarse.is_known() {
        Method::Offsets
    } else {
        Method::Anchored
    };
    let mut anchored_failures = 0;
    let mut disagreement: Option<Disagreement> = None;
    // Whether a response moved under a pass, or a pass disagreed in a way records counted but
    // never listed do not explain: the next window is then made smaller (`WindowTarget`).
    let mut changed = false;
    for pass_no in 1..=MAX_PASSES {
        let mut pass = match method {
            Method::Anchored => {
                let cut = (pass_no == 1).then_some(w.target.records());
                anchored_pass(ctx, w.start, end, cut, counts, cancel).await?
            }
            Method::Offsets => offset_pass(ctx, w.start, end, counts, cancel).await?,
        };
        pages += pass.pages;
        changed |= pass.shifted;
        if pass.end < end {
            counts.splits += 1;
            end = pass.end;
        }
        if let Some(evidence) = &pass.coarse {
            counts.rescans += 1;
            if ctx.org.renders_coarse.learn() {
                tracing::warn!(
                    start = %w.start,
                    end = %end,
                    evidence = evidence.as_str(),
                    "the server renders created_at coarser than it filters; reading every window by offsets from now on"
                );
            }
            method = Method::Offsets;
            commit(ctx, pass.last_page, Vec::new(), None, counts).await?;
            continue;
        }
        if !pass.consistent
            && method == Method::Anchored
            && pass.pages >= REPAIR_MIN_PAGES
            && pass.total.abs_diff(pass.seen.len() as u64) <= REPAIR_MAX_DIFFERENCE
        {
            commit(ctx, std::mem::take(&mut pass.last_page), Vec::new(), None, counts).await?;
            if let Some(repaired) = repair(ctx, &pass, w.start, end, counts, cancel).await? {
                counts.rescans += 1;
                pages += repaired.requests;
                pass.total = repaired.seen.len() as u64 + repaired.unlisted;
                pass.seen = repaired.seen;
                pass.consistent = true;
            }
        }
        let repeated = !pass.consistent && disagreement.as_ref().is_some_and(|d| d.repeats_in(&pass));
        if repeated {
            let unlisted = pass.total - pass.seen.len() as u64;
            let (start, end) = (w.start.to_string(), end.to_string());
            let message = "the list's total counts records it does not list, the same ones on two \
                           passes (encounters this key may not see); the window is complete";
            // Once per organization and process as a warning; the ledger keeps every window's
            // total beside the records seen.
            if ctx.org.totals_count_unlisted.learn() {
                tracing::warn!(start, end, unlisted, "{message}");
            } else {
                tracing::debug!(start, end, unlisted, "{message}");
            }
            pass.consistent = true;
        }
        if !pass.consistent {
            counts.rescans += 1;
            let possible = Disagreement::possible(&pass);
            let comparable = disagreement.as_ref().is_some_and(Disagreement::comparable);
            // A disagreement that could have repeated and did not, or one of another kind:
            // upstream changed.
            changed |= comparable || !possible;
            if method == Method::Anchored {
                anchored_failures += 1;
                if anchored_failures >= ANCHORED_FAILURES_BEFORE_OFFSETS {
                    method = Method::Offsets;
                }
            }
            // Upstream changed while we paged, or the total counts records it never lists. A
            // narrower window takes fewer requests, so fewer changes can land during it:
            // re-scan the older half — unless the last disagreement could not be compared (its
            // half was placed by rendered instants the server rounds: only a second read of the
            // same half can show it), or nothing moved in this window yet and this server was
            // seen counting records it never lists: then the same range is read again, which
            // shows the same records again. Halving again after a half that could not be
            // compared would never compare one.
            let again = possible
                && !comparable
                && (disagreement.is_some() || (!changed && ctx.org.totals_count_unlisted.is_known()));
            let unit = ctx.org.query_unit();
            let mid = median_instant(&pass.seen)
                .map(|m| m.floor_to(unit))
                .filter(|m| *m > w.start && *m < end)
                .or_else(|| Some(w.start.midpoint(end).floor_to(unit)).filter(|m| *m > w.start))
                .filter(|_| !again);
            if let Some(mid) = mid {
                counts.splits += 1;
                end = mid;
            }
            tracing::debug!(
                pass = pass_no,
                ?method,
                "upstream changed while paging; re-scanning the window"
            );
            // Records counted but never listed show as the same excess on every pass over the
            // same range; the older half holds only some of them, so its own total is asked
            // now to know which excess the next pass must show again.
            disagreement = if possible {
                let total = if end < pass.end {
                    if cancel.is_cancelled() {
                        return Err(CycleError::Cancelled);
                    }
                    pages += 1;
                    counts.list_requests += 1;
                    list_range(ctx, w.start, end, 0, 1, SortOrder::Asc).await?.total
                } else {
                    pass.total
                };
                let instants_place_records = method == Method::Anchored && !ctx.org.renders_coarse.is_known();
                Some(Disagreement::of(&mut pass, end, total, instants_place_records))
            } else {
                None
            };
            commit(ctx, pass.last_page, Vec::new(), None, counts).await?;
            continue;
        }
        // A pass that agreed after a disagreement listed what had changed: upstream churns.
        changed |= disagreement.is_some() && !repeated;
        let window = Window { end, ..w };
        let seen: HashSet<&str> = pass.seen.keys().map(String::as_str).collect();
        let removals = find_removals(ctx, &window, &seen, counts).await?;
        let completion = WindowCompletion {
            organization: ctx.org.name.clone(),
            run_id: w.run_id,
            kind: w.scope.ledger_kind(end),
            backfill_id: match w.scope {
                Scope::Backfill { backfill_id } => Some(backfill_id),
                Scope::Recent { .. } | Scope::Audit => None,
            },
            start_at: w.start.instant(),
            end_at: end.instant(),
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
        return Ok(Completed { end, changed });
    }
    Err(CycleError::Unsettled {
        start: w.start.to_string(),
        end: end.to_string(),
        passes: MAX_PASSES,
    })
}

/// A window's records after a repair, the records its totals count but the list does not
/// show, and the list requests the repair made.
struct Repaired {
    seen: HashMap<String, OffsetDateTime>,
    unlisted: u64,
    requests: u64,
}

/// Narrows a pass's disagreement by totals — each part split at the median of the records the
/// pass saw there, both halves probed with `limit=1`, halves whose total equals what the pass saw
/// in them accepted — and reads again only the small parts that disagree. The window's records
/// are then the pass's, with each re-read part replaced by what its re-read saw. Every part is
/// verified by its own observation, as a whole window is by its final total — or, when its
/// total still exceeds what it lists, by listing exactly the records the pass saw there under
/// the same total as its probe: records the server counts and never lists (see
/// [`Disagreement`]). `None` when the disagreement is spread too wide (the caller re-scans a
/// narrower window instead).
async fn repair(
    ctx: &SyncContext,
    pass: &Pass,
    start: Micros,
    end: Micros,
    counts: &mut RunCounts,
    cancel: &CancellationToken,
) -> Result<Option<Repaired>, CycleError> {
    let leaf_records = ctx.sync.page_size.get() as usize;
    let mut instants: Vec<OffsetDateTime> = pass.seen.values().copied().collect();
    instants.sort_unstable();
    let seen_in = |lo: Micros, hi: Micros| {
        let below = |t: Micros| instants.partition_point(|x| *x < t.instant());
        below(hi) - below(lo)
    };
    let mut requests = 0u64;
    // Each part with the total its probe reported.
    let mut leaves: Vec<(Micros, Micros, u64)> = Vec::new();
    let mut disagreeing = vec![(start, end, pass.total)];
    while let Some((lo, hi, total)) = disagreeing.pop() {
        let unit = ctx.org.query_unit();
        if seen_in(lo, hi) <= leaf_records || hi <= lo.step(unit) {
            leaves.push((lo, hi, total));
        } else {
            let lower = instants.partition_point(|x| *x < lo.instant());
            let upper = instants.partition_point(|x| *x < hi.instant());
            let mid = Some(Micros::floor(instants[(lower + upper) / 2]).floor_to(unit))
                .filter(|m| *m > lo && *m < hi)
                .unwrap_or_else(|| lo.midpoint(hi).floor_to(unit).max(lo.step(unit)));
            // Older half last on the stack, so parts are handled oldest first.
            for (a, b) in [(mid, hi), (lo, mid)] {
                if requests >= REPAIR_MAX_PROBES {
                    return Ok(None);
                }
                if cancel.is_cancelled() {
                    return Err(CycleError::Cancelled);
                }
                let total = list_range(ctx, a, b, 0, 1, SortOrder::Asc).await?.total;
                counts.list_requests += 1;
                requests += 1;
                if total != seen_in(a, b) as u64 {
                    disagreeing.push((a, b, total));
                }
            }
        }
        if leaves.len() + disagreeing.len() > REPAIR_MAX_LEAVES {
            return Ok(None);
        }
    }
    let in_leaf = |t: &OffsetDateTime| {
        leaves
            .iter()
            .any(|(lo, hi, _)| *t >= lo.instant() && *t < hi.instant())
    };
    let mut seen: HashMap<String, OffsetDateTime> = pass
        .seen
        .iter()
        .filter(|(_, t)| !in_leaf(t))
        .map(|(id, t)| (id.clone(), *t))
        .collect();
    let mut unlisted = 0;
    for (lo, hi, probed) in leaves {
        let leaf = anchored_pass(ctx, lo, hi, None, counts, cancel).await?;
        requests += leaf.pages;
        if leaf.coarse.is_some() || leaf.end != hi {
            return Ok(None);
        }
        if !leaf.consistent {
            let excess = leaf.total.saturating_sub(leaf.seen.len() as u64);
            let same_records =
                leaf.seen.len() == seen_in(lo, hi) && leaf.seen.keys().all(|id| pass.seen.contains_key(id));
            if leaf.shifted || excess == 0 || leaf.total != probed || !same_records {
                return Ok(None);
            }
            tracing::warn!(
                start = %lo,
                end = %hi,
                unlisted = excess,
                "the list's total counts records it does not list, the same ones twice \
                 (encounters this key may not see); the range is complete"
            );
            unlisted += excess;
        }
        commit(ctx, leaf.last_page, Vec::new(), None, counts).await?;
        seen.extend(leaf.seen);
    }
    tracing::debug!(
        requests,
        "repaired a disagreeing window by re-reading only what disagreed"
    );
    Ok(Some(Repaired {
        seen,
        unlisted,
        requests,
    }))
}

/// A response's records must lie inside the requested range, in ascending order, or the
/// rendered `created_at` cannot be used to anchor the next request.
fn rendering_evidence(items: &[Encounter], from: Micros, to: Micros) -> Option<String> {
    let (lo, hi) = (from.instant(), to.instant());
    if let Some(e) = items.iter().find(|e| e.created_at.0 < lo || e.created_at.0 >= hi) {
        return Some(format!(
            "encounter {} was listed for [{from}, {to}) with created_at {}",
            e.encounter_id,
            crate::timefmt::format_utc(e.created_at.0)
        ));
    }
    items
        .windows(2)
        .find(|p| p[1].created_at.0 < p[0].created_at.0)
        .map(|p| {
            format!(
                "encounter {} (created_at {}) was listed after {} (created_at {}) in ascending order",
                p[1].encounter_id,
                crate::timefmt::format_utc(p[1].created_at.0),
                p[0].encounter_id,
                crate::timefmt::format_utc(p[0].created_at.0)
            )
        })
}

/// One re-anchored pass over `[start, end)`. With `cut_after`, the pass ends the window at the
/// first page boundary after that many records (at the microsecond of that page's last record,
/// whose records then belong to the next window).
async fn anchored_pass(
    ctx: &SyncContext,
    start: Micros,
    end: Micros,
    cut_after: Option<usize>,
    counts: &mut RunCounts,
    cancel: &CancellationToken,
) -> Result<Pass, CycleError> {
    let limit = ctx.sync.page_size.get();
    let mut pass = Pass::new(start, end);
    let mut cursor = start;
    // IDs of the records at or after `cursor` that the previous page ended with: the next page,
    // anchored at `cursor`, must start with them (in order) unless upstream changed.
    let mut expected_prefix: Vec<String> = Vec::new();
    loop {
        let page = pass
            .list(ctx, cursor, end, 0, limit, SortOrder::Asc, counts, cancel)
            .await?;
        if pass.pages == 1 {
            pass.total = page.total;
        }
        let (page, skipped) = past_unlisted(ctx, &mut pass, cursor, end, page, counts, cancel).await?;
        // What the server was asked for: the bounds widened to its query unit.
        let unit = ctx.org.query_unit();
        if let Some(evidence) = rendering_evidence(&page.items, cursor.floor_to(unit), end.ceil_to(unit)) {
            pass.coarse = Some(evidence);
            pass.absorb(ctx, page.items, counts).await?;
            break;
        }
        // A page the server held to fewer records than the prefix must hold its start; a record
        // removed from the prefix's end shows in the end-of-pass total check.
        let starts_as_expected = page
            .items
            .iter()
            .zip(&expected_prefix)
            .all(|(e, id)| &e.encounter_id == id);
        if !starts_as_expected {
            pass.saw_a_shift();
        }
        let received = page.items.len();
        // The pass ends on a page that holds every record left in `[cursor, end)`, or on an
        // empty one past every position the total counts ([`past_unlisted`]: a server whose
        // total counts records it does not show; the end-of-pass total check then disagrees). A short page that does not hold the rest (the server's
        // pages are smaller than `limit`, or it filters after its LIMIT) is read on from its
        // last record like a full one: ending there lost every later record. Every page
        // that does not end the pass moves the cursor forward (below), so this terminates.
        if received as u64 + skipped >= page.total || received == 0 {
            pass.keep_last(ctx, page.items);
            break;
        }
        let Some(last) = page.items.last().map(|e| e.created_at.0) else {
            // A full page has items; an empty one ended the pass above.
            break;
        };
        // The last record's microsecond — or the unit holding it, when the server reads bounds
        // coarser (`list_range` asks from the unit's start, so the re-anchored page starts
        // with every record of that unit).
        let anchor = Micros::floor(last).floor_to(ctx.org.query_unit());
        let tail = page
            .items
            .iter()
            .filter(|e| e.created_at.0 >= anchor.instant())
            .count();
        // Every record is at or after `cursor`, so `anchor == cursor` means the whole page is
        // one microsecond: re-anchoring could not move. Half a page or more in the last
        // microsecond would make re-anchoring crawl, so that microsecond is offset-paged. A
        // page is what the server holds: `limit`, or less if its pages are smaller.
        let page_size = pass.page_size(limit) as usize;
        if tail == received || (page_size >= 4 && 2 * tail >= page_size) {
            pass.absorb(ctx, page.items, counts).await?;
            cursor = page_instant(ctx, &mut pass, anchor, counts, cancel).await?;
            expected_prefix.clear();
            if cursor >= end {
                break;
            }
            continue;
        }
        if cut_after.is_some_and(|n| pass.seen.len() + received >= n) && anchor > start {
            // Close the window before `anchor`; its records there are read again by the next one.
            pass.keep_last(ctx, page.items);
            pass.seen.retain(|_, t| *t < anchor.instant());
            pass.end = anchor;
            break;
        }
        expected_prefix = page
            .items
            .iter()
            .filter(|e| e.created_at.0 >= anchor.instant())
            .map(|e| e.encounter_id.clone())
            .collect();
        cursor = anchor;
        pass.absorb(ctx, page.items, counts).await?;
    }
    if pass.pages == 1 && pass.end == end && (pass.seen.len() as u64) < pass.total {
        // One page, and it held fewer records than the window's total (an empty page).
        pass.consistent = false;
    }
    if pass.pages > 1 && pass.coarse.is_none() {
        // One cheap request closes the observation: if the window's total now equals the
        // records we saw, nothing was added or removed behind the cursor while we paged.
        let window_end = pass.end;
        let end_total = pass
            .list(ctx, start, window_end, 0, 1, SortOrder::Asc, counts, cancel)
            .await?
            .total;
        if end_total != pass.seen.len() as u64 {
            pass.consistent = false;
        }
        pass.total = end_total;
    }
    pass.settle(counts).await?;
    Ok(pass)
}

/// One offset-paged pass: `[start, end)` is narrowed (by halving its time span, judged by the
/// totals the server reports, never by rendered instants) until offsets reach every record, then
/// read by offsets from both ends. The pass ends the window where the narrowing left it.
async fn offset_pass(
    ctx: &SyncContext,
    start: Micros,
    end: Micros,
    counts: &mut RunCounts,
    cancel: &CancellationToken,
) -> Result<Pass, CycleError> {
    let limit = ctx.sync.page_size.get();
    let mut pass = Pass::new(start, end);
    let first = loop {
        let window_end = pass.end;
        let page = pass
            .list(ctx, start, window_end, 0, limit, SortOrder::Asc, counts, cancel)
            .await?;
        let unit = ctx.org.query_unit();
        if page.total <= OFFSET_REACH || start.step(unit) >= window_end {
            break page;
        }
        counts.splits += 1;
        pass.end = start.midpoint(window_end).floor_to(unit).max(start.step(unit));
    };
    let window_end = pass.end;
    page_offsets(ctx, &mut pass, start, window_end, first, counts, cancel).await?;
    if pass.total != pass.seen.len() as u64 {
        pass.consistent = false;
    }
    pass.settle(counts).await?;
    Ok(pass)
}

/// Reads on past an empty page read at offset 0 from `cursor` whose total says records remain:
/// a server that applies its LIMIT and OFFSET before an access filter answers a page of hidden
/// encounters (counted in its total, never listed) empty although listed ones follow. The pages
/// after it at the same cursor, a server page apart, are read until one lists something, or
/// they pass the total or the offset cap. Returns that page (else the last empty one) and the
/// positions skipped before it. A server that pages over listed records only answers the same
/// empty pages: it costs a request per page of unlisted records counted past the first page.
async fn past_unlisted(
    ctx: &SyncContext,
    pass: &mut Pass,
    cursor: Micros,
    end: Micros,
    mut page: EncounterPage,
    counts: &mut RunCounts,
    cancel: &CancellationToken,
) -> Result<(EncounterPage, u64), CycleError> {
    let limit = ctx.sync.page_size.get();
    let mut offset = 0;
    loop {
        // The positions this page covered: the server's own page size, as it echoed it (never
        // 0, so that the offsets move; a server whose page size varies echoes each page's).
        let next = offset + u64::from(page.limit.clamp(1, limit));
        if !page.items.is_empty() || next >= page.total || next > u64::from(MAX_OFFSET) {
            break;
        }
        offset = next;
        page = pass
            .list(
                ctx,
                cursor,
                end,
                offset as u32,
                limit,
                SortOrder::Asc,
                counts,
                cancel,
            )
            .await?;
    }
    Ok((page, offset))
}

/// Offset-pages the records created in the microsecond `at` — in the unit of the query unit
/// holding it, when the list route reads its bounds coarser (learnt, if so, by the first request
/// here) — and returns the end of the range it read.
async fn page_instant(
    ctx: &SyncContext,
    pass: &mut Pass,
    at: Micros,
    counts: &mut RunCounts,
    cancel: &CancellationToken,
) -> Result<Micros, CycleError> {
    let limit = ctx.sync.page_size.get();
    let first = pass
        .list(ctx, at, at.next(), 0, limit, SortOrder::Asc, counts, cancel)
        .await?;
    let unit = ctx.org.query_unit();
    let (from, to) = (at.floor_to(unit), at.step(unit));
    page_offsets(ctx, pass, from, to, first, counts, cancel).await?;
    Ok(to)
}

/// Reads `[from, to)` by offsets, given its first ascending page. Consecutive pages overlap by
/// at least one record, which must be where the previous page put it, and every response must
/// report the same total. Ascending offsets reach [`OFFSET_REACH`] records; the rest is read
/// descending from the other end, so up to twice that many are reachable. A record both ends
/// read must sit at mirrored positions: a server whose descending order is not the reverse of its
/// ascending one (ties kept in ascending ID order) lists the front's records again from the back,
/// and only the front's [`OFFSET_REACH`] are reachable. More than can be reached in one
/// microsecond is an error naming the instant, the count and the reach (the rows read are kept);
/// in a wider range the caller narrows first.
async fn page_offsets(
    ctx: &SyncContext,
    pass: &mut Pass,
    from: Micros,
    to: Micros,
    first: EncounterPage,
    counts: &mut RunCounts,
    cancel: &CancellationToken,
) -> Result<(), CycleError> {
    let limit = ctx.sync.page_size.get();
    let total = first.total;
    pass.total = total;
    // Only a range past the offset cap is read from the back, against the front's positions.
    let mut front = Chain::new(total, limit, total > u64::from(MAX_OFFSET));
    let mut full = front.take(pass, 0, &first);
    pass.absorb(ctx, first.items, counts).await?;
    // Ascending from the front.
    while full && front.reached < total {
        let Some(offset) = front.next_offset() else { break };
        let page = pass
            .list(ctx, from, to, offset, limit, SortOrder::Asc, counts, cancel)
            .await?;
        full = front.take(pass, offset, &page);
        pass.absorb(ctx, page.items, counts).await?;
    }
    if !full || front.reached >= total {
        return Ok(());
    }
    // Descending from the back, until the two ends meet.
    let instant = (to <= from.step(ctx.org.query_unit())).then_some(from);
    let mut back = Chain::new(total, limit, false);
    let mut meeting = None;
    while let Some(offset) = back.next_offset() {
        let page = pass
            .list(ctx, from, to, offset, limit, SortOrder::Desc, counts, cancel)
            .await?;
        let full = back.take(pass, offset, &page);
        // A moved total or overlap already marked a shift, and shifted positions prove nothing.
        let mirrored = pass.shifted || front.mirrors(&page.items, offset, &mut meeting);
        pass.absorb(ctx, page.items, counts).await?;
        if !mirrored {
            return overfull(pass, instant, total, front.reached, false, counts).await;
        }
        if !full || front.reached + back.reached >= total {
            return Ok(());
        }
    }
    overfull(pass, instant, total, OFFSET_REACH * 2, true, counts).await
}

/// Ends [`page_offsets`] when offsets did not reach every record: in one instant (`instant`,
/// when the range is one unit of the query's precision) that is [`CycleError::InstantOverfull`]
/// (what was read is stored first); a wider range grew past what offsets reach while it was
/// paged, and is re-scanned narrower.
async fn overfull(
    pass: &mut Pass,
    instant: Option<Micros>,
    total: u64,
    reachable: u64,
    descending_reverses: bool,
    counts: &mut RunCounts,
) -> Result<(), CycleError> {
    let Some(instant) = instant else {
        pass.saw_a_shift();
        return Ok(());
    };
    pass.settle(counts).await?;
    Err(CycleError::InstantOverfull {
        instant: instant.to_string(),
        count: total,
        reachable,
        descending_reverses,
    })
}

/// Offset pages read in one direction: how far they reached, and the last record read with its
/// position, which the next page must repeat.
struct Chain {
    total: u64,
    limit: u32,
    /// Positions `[0, reached)`, counted from this chain's end, have been read.
    reached: u64,
    last: Option<(u64, String)>,
    offset: Option<u32>,
    /// The position at which this chain read each record, when kept.
    positions: Option<HashMap<String, u64>>,
}

impl Chain {
    /// `keep_positions`: whether to remember where each record was read ([`Chain::mirrors`]).
    fn new(total: u64, limit: u32, keep_positions: bool) -> Chain {
        Chain {
            total,
            limit,
            reached: 0,
            last: None,
            offset: None,
            positions: keep_positions.then(HashMap::new),
        }
    }

    /// The next page's offset: one record of overlap (none for pages of one record, or after
    /// a page the server held to one record), the last page placed exactly at the offset cap so
    /// that [`OFFSET_REACH`] records are reachable; `None` once past the cap.
    fn next_offset(&self) -> Option<u32> {
        let Some(previous) = self.offset else {
            return Some(0);
        };
        let overlap = u64::from(self.limit >= 2);
        let mut next = self.reached.saturating_sub(overlap);
        if next <= u64::from(previous) {
            next = self.reached;
        }
        let next = next.min(u64::from(MAX_OFFSET)) as u32;
        (next > previous).then_some(next)
    }

    /// Checks a page read at `offset` against the pages before it (same total; the previous
    /// last record at its position) and records it. Returns whether more records may follow:
    /// the page was full, or short but not at the end (a server whose pages are smaller than
    /// `limit`).
    fn take(&mut self, pass: &mut Pass, offset: u32, page: &EncounterPage) -> bool {
        self.offset = Some(offset);
        if page.total != self.total {
            pass.saw_a_shift();
        }
        if let Some((position, id)) = &self.last
            && *position >= u64::from(offset)
        {
            let repeated = page.items.get((*position - u64::from(offset)) as usize);
            if repeated.map(|e| &e.encounter_id) != Some(id) {
                pass.saw_a_shift();
            }
        }
        let received = page.items.len() as u64;
        if let Some(positions) = &mut self.positions {
            for (position, e) in (u64::from(offset)..).zip(&page.items) {
                positions.insert(e.encounter_id.clone(), position);
            }
        }
        if let Some(last) = page.items.last() {
            let position = u64::from(offset) + received - 1;
            self.last = Some((position, last.encounter_id.clone()));
            self.reached = self.reached.max(position + 1);
        }
        received > 0 && (received == u64::from(self.limit) || self.reached < self.total)
    }

    /// Whether the records of a page read from the other end at `offset`, where this chain read
    /// them too, sit at mirrored positions, as they do when one end's order is the exact reverse
    /// of the other's: the same `front + back` for every record both read (`meeting`, set by the
    /// first), which is less than the total. The sum is the number of records listed less one,
    /// not `total - 1`: a total may count records the list never shows.
    fn mirrors(&self, items: &[Encounter], offset: u32, meeting: &mut Option<u64>) -> bool {
        (u64::from(offset)..).zip(items).all(|(back, e)| {
            let Some(front) = self.positions.as_ref().and_then(|p| p.get(&e.encounter_id)) else {
                return true;
            };
            let sum = front + back;
            sum < self.total && *meeting.get_or_insert(sum) == sum
        })
    }
}

/// The microsecond at which half of the seen records lie before.
fn median_instant(seen: &HashMap<String, OffsetDateTime>) -> Option<Micros> {
    let mut instants: Vec<OffsetDateTime> = seen.values().copied().collect();
    if instants.len() < 2 {
        return None;
    }
    let mid = instants.len() / 2;
    Some(Micros::floor(*instants.select_nth_unstable(mid).1))
}

fn queue_commit(
    ctx: &SyncContext,
    records: Vec<EncounterRecord>,
    removals: Vec<Removal>,
    completion: Option<WindowCompletion>,
) -> Pending<PageCounts> {
    ctx.writer.write(move |tx| {
        tx.commit_page(
            &records,
            &removals,
            completion.as_ref(),
            time::OffsetDateTime::now_utc(),
        )
    })
}

/// Commits rows (and a window's removals and completion) and waits until they are stored.
pub(super) async fn commit(
    ctx: &SyncContext,
    records: Vec<EncounterRecord>,
    removals: Vec<Removal>,
    completion: Option<WindowCompletion>,
    counts: &mut RunCounts,
) -> Result<(), CycleError> {
    add_counts(counts, queue_commit(ctx, records, removals, completion).await?)
}

/// Adds what a page did to the run's counts, or fails with why the warehouse refused it.
fn add_counts(counts: &mut RunCounts, pc: PageCounts) -> Result<(), CycleError> {
    if let Some(collision) = pc.refused {
        return Err(CycleError::IdCollision(collision));
    }
    counts.encounters_new += pc.new;
    counts.encounters_changed += pc.changed;
    counts.encounters_unchanged += pc.unchanged + pc.purged;
    counts.encounters_removed += pc.removed;
    Ok(())
}

/// How many encounters the removal check of a window listed empty asks for by ID, all found
/// still there inside the window (or answered with nothing documented) and none gone or moved,
/// before it takes the empty listing for the fault: a list route answering an outage with an
/// empty 200 would otherwise cost one request per stored encounter of every window it empties
/// (a million for a reconcile of a large clinic), to learn that nothing was removed. A listing
/// that lists something is trusted as before: what it leaves out is asked for one by one.
const OUTAGE_PROBES: u64 = 20;

/// Encounters stored as live in the window but absent from a complete listing of it: asks the
/// detail route about each. Gone (404) or unavailable (403 for this encounter) → a removal;
/// still there → it is upserted from the detail (it was only briefly invisible, or its rendered
/// `created_at` placed it in this window while the server files it in a neighbouring one).
async fn find_removals(
    ctx: &SyncContext,
    w: &Window,
    seen: &HashSet<&str>,
    counts: &mut RunCounts,
) -> Result<Vec<Removal>, CycleError> {
    let (start, end) = (w.start.instant(), w.end.instant());
    // Only this organization's rows are candidates; before it is known it has none.
    let Some(org_id) = ctx.org.id() else {
        return Ok(Vec::new());
    };
    let stored = ctx
        .writer
        .call(move |c| c.live_ids_in_range(&org_id, start, end))
        .await?;
    let unlisted: Vec<String> = stored
        .into_iter()
        .filter(|id| !seen.contains(id.as_str()))
        .collect();
    let unlisted_count = unlisted.len() as u64;
    let mut removals = Vec::new();
    let mut still_there = Vec::new();
    // Probes that found the encounter still there inside the window (or proved nothing), while
    // no probe found one gone or moved: past [`OUTAGE_PROBES`] of them the listing, not the
    // data, is what changed.
    let mut not_gone = 0;
    let mut anything_else = false;
    for encounter_id in unlisted {
        // Rendered instants a server rounds may place a neighbour's records inside a window
        // listed truly empty: only a server that renders them exactly is judged so.
        if seen.is_empty()
            && !anything_else
            && not_gone >= OUTAGE_PROBES
            && !ctx.org.renders_coarse.is_known()
        {
            return Err(CycleError::ListOmits {
                start: w.start.to_string(),
                end: w.end.to_string(),
                unlisted: unlisted_count,
                probed: not_gone,
            });
        }
        counts.detail_requests += 1;
        match ctx.client.encounter(&encounter_id).await {
            Ok(e) => {
                if (start..end).contains(&e.created_at.0) {
                    not_gone += 1;
                } else {
                    anything_else = true;
                }
                super::admit(ctx, std::slice::from_ref(&e)).await?;
                still_there.push(encounter_record(e, &ctx.privacy));
            }
            Err(e) if e.class() == ErrorClass::ResourceUnavailable => match e.reason_code() {
                // Only the contract's answers prove the encounter gone for this key; a 404 from
                // a gateway (an HTML page, no reason code) or a 409/410 the contract does not
                // list proves nothing: the encounter stays live, and the next pass over this
                // window asks again.
                Some(
                    reason @ ("encounter_not_found" | "cross_organization_denied" | "demo_training_denied"),
                ) => {
                    tracing::debug!(encounter_id, reason, "encounter gone upstream");
                    anything_else = true;
                    removals.push(Removal {
                        encounter_id,
                        reason: reason.to_owned(),
                    });
                }
                reason => {
                    not_gone += 1;
                    tracing::warn!(
                        encounter_id,
                        status = e.status(),
                        reason,
                        "the encounter route answered with no documented reason; not marking the encounter removed"
                    );
                }
            },
            Err(e) if e.class() == ErrorClass::OperatorMustAct && !e.is_auth() && w.reconcile => {
                // The detail route is closed to this key, but a reconcile's listing is complete:
                // absence is the evidence — unless the listing was empty where many are stored,
                // which an outage answers as well as a mass removal.
                if seen.is_empty() && unlisted_count >= OUTAGE_PROBES {
                    return Err(CycleError::ListOmits {
                        start: w.start.to_string(),
                        end: w.end.to_string(),
                        unlisted: unlisted_count,
                        probed: 0,
                    });
                }
                anything_else = true;
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
    hex(&h.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    #[test]
    fn windows_ending_before_the_watermark_are_revisits() {
        let wm = datetime!(2026-03-01 0:00 UTC);
        let recent = Scope::Recent { watermark: Some(wm) };
        assert_eq!(recent.ledger_kind(Micros::floor(wm)), "revisit");
        assert_eq!(recent.ledger_kind(Micros::floor(wm).next()), "live");
        assert_eq!(
            Scope::Recent { watermark: None }.ledger_kind(Micros::floor(wm)),
            "live"
        );
        assert_eq!(
            Scope::Backfill { backfill_id: 1 }.ledger_kind(Micros::floor(wm)),
            "backfill"
        );
        assert_eq!(Scope::Audit.ledger_kind(Micros::floor(wm)), "audit");
    }

    #[test]
    fn id_set_hashes_do_not_depend_on_order() {
        let a: HashSet<&str> = ["enc_b", "enc_a"].into_iter().collect();
        let b: HashSet<&str> = ["enc_a", "enc_b"].into_iter().collect();
        assert_eq!(id_set_hash(&a), id_set_hash(&b));
        let c: HashSet<&str> = ["enc_a"].into_iter().collect();
        assert_ne!(id_set_hash(&a), id_set_hash(&c));
    }

    #[test]
    fn the_window_target_halves_under_churn_and_recovers_when_quiet() {
        let t = WindowTarget::new();
        assert_eq!(t.records(), TARGET_RECORDS);
        assert_eq!(t.after(false), t, "never above the quiet target");
        let churned = (0..7).fold(t, |t, _| t.after(true));
        assert_eq!(churned.records(), MIN_TARGET_RECORDS);
        assert_eq!(churned.after(false).records(), 2 * MIN_TARGET_RECORDS);
    }

    #[test]
    fn a_pass_that_adds_no_records_runs_out_of_requests() {
        let mut pass = Pass::new(
            Micros::floor(datetime!(2026-03-01 0:00 UTC)),
            Micros::floor(datetime!(2026-03-02 0:00 UTC)),
        );
        assert_eq!(pass.request_bound(100), 72);
        pass.seen
            .extend((0..990).map(|i| (format!("enc_{i}"), datetime!(2026-03-01 1:00 UTC))));
        // 990 records fill ten pages of 99 new records each: the bound allows six times that.
        assert_eq!(pass.request_bound(100), 72 + 60);
    }
}
