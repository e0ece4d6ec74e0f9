//! Windows over `created_at`: how wide the next one should be, and how one is paged and
//! committed. A window is the unit of completion: its last page and its ledger entry commit
//! together, so a crash mid-window re-scans that window and nothing else.

use std::collections::HashSet;

use sha2::{Digest, Sha256};
use time::{Duration, OffsetDateTime};
use tokio_util::sync::CancellationToken;

use super::{CycleError, SyncContext, to_record};
use crate::api::{ListQuery, MAX_OFFSET, SortOrder};
use crate::store::{self, RunCounts, WindowCompletion};

/// Aim for windows of about this many records: big enough that the request count stays near
/// the ceil(N/limit) minimum, small enough that a crash re-reads little and that offsets stay
/// far from the API's cap of 10000.
const TARGET_RECORDS: u64 = 5_000;

/// A window whose first page reports more records than this is split before paging. The margin
/// to the last reachable record (offset 10000 + limit) absorbs growth while we page.
const SPLIT_ABOVE: u64 = 8_000;

/// The narrowest window the planner will propose; the API's timestamps go down to nanoseconds.
const MIN_WIDTH: Duration = Duration::nanoseconds(1);

/// The result of scanning one window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WindowScan {
    /// Every page was read and committed together with the window's ledger entry.
    Completed { total: u64 },
    /// The first page showed more records than one window should hold; nothing was written.
    TooDense { total: u64 },
}

/// Chooses window widths from the density observed so far.
pub(super) struct Planner {
    horizon: OffsetDateTime,
    width: Duration,
}

impl Planner {
    /// The first window spans everything up to the horizon: when history is small this reads it
    /// in the fewest requests, and when it is large the first page's `total` tells how to split.
    pub fn new(cursor: OffsetDateTime, horizon: OffsetDateTime) -> Planner {
        Planner {
            horizon,
            width: (horizon - cursor).max(MIN_WIDTH),
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
        self.width = scale(span, TARGET_RECORDS, total.max(1)).min(span / 2).max(MIN_WIDTH);
    }
}

fn scale(width: Duration, num: u64, den: u64) -> Duration {
    let nanos = width.whole_nanoseconds() * num as i128 / den as i128;
    Duration::nanoseconds(nanos.clamp(MIN_WIDTH.whole_nanoseconds(), i64::MAX as i128) as i64)
}

/// Pages `[start, end)` in ascending order, committing each page; the last page commits with the
/// window's ledger entry (and the watermark, for live windows).
#[allow(clippy::too_many_arguments)]
pub(super) async fn scan(
    ctx: &SyncContext,
    run_id: i64,
    kind: &'static str,
    start: OffsetDateTime,
    end: OffsetDateTime,
    advances_watermark: bool,
    counts: &mut RunCounts,
    cancel: &CancellationToken,
) -> Result<WindowScan, CycleError> {
    let limit = ctx.page_limit;
    let mut offset = 0u32;
    let mut pages = 0u64;
    let mut ids: HashSet<String> = HashSet::new();
    loop {
        if cancel.is_cancelled() {
            return Err(CycleError::Cancelled);
        }
        let query = ListQuery {
            start_at: Some(start),
            end_at: Some(end),
            offset,
            limit,
            sort: SortOrder::Asc,
        };
        let page = ctx.client.list_encounters(&query).await?;
        counts.list_requests += 1;
        pages += 1;
        let total = page.total;
        if offset == 0 && total > SPLIT_ABOVE && end - start > MIN_WIDTH {
            tracing::debug!(total, "window too dense; splitting");
            return Ok(WindowScan::TooDense { total });
        }
        let received = page.items.len() as u64;
        let next_offset = offset as u64 + limit as u64;
        let cap_reached = next_offset > MAX_OFFSET as u64;
        let last = received < limit as u64 || next_offset >= total || cap_reached;
        if last && cap_reached && next_offset < total {
            tracing::error!(
                total,
                start = %crate::timefmt::format_utc(start),
                "more records share one created_at instant than the API can page (offset cap 10000)"
            );
        }
        ids.extend(page.items.iter().map(|e| e.encounter_id.clone()));
        let records: Vec<_> = page.items.into_iter().map(to_record).collect();
        let completion = last.then(|| WindowCompletion {
            run_id,
            kind,
            start_at: start,
            end_at: end,
            records_seen: ids.len() as u64,
            total,
            pages,
            id_set_hash: id_set_hash(&ids),
            advances_watermark,
        });
        let pc = ctx
            .writer
            .call(move |c| store::commit_page(c, &records, completion.as_ref(), OffsetDateTime::now_utc()))
            .await?;
        counts.encounters_new += pc.new;
        counts.encounters_changed += pc.changed;
        counts.encounters_unchanged += pc.unchanged + pc.stale;
        if last {
            tracing::debug!(
                start = %crate::timefmt::format_utc(start),
                end = %crate::timefmt::format_utc(end),
                records = ids.len(),
                pages,
                "window complete"
            );
            return Ok(WindowScan::Completed { total });
        }
        offset = next_offset as u32;
    }
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
        let mut p = Planner::new(start, start + MIN_WIDTH);
        p.shrink(start, start + MIN_WIDTH, 1_000_000);
        assert_eq!(p.next_end(start), Some(start + MIN_WIDTH));
    }
}
