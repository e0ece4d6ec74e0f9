//! One sync cycle: decide which `created_at` ranges to (re-)list — new time up to now minus the
//! settle lag, the overlap and revisit horizons, an explicit backfill — cut them into windows of
//! a few thousand records, and scan each window completely (see `window`). This module owns the
//! replication algorithm; it does no SQL itself (that is `store`) and no HTTP itself (`api`).

mod window;

use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

use crate::api::wire::Encounter;
use crate::api::{ApiError, Client};
use crate::config::SyncConfig;
use crate::store::{self, DocumentRecord, EncounterRecord, PatientRecord, RunCounts, RunOutcome, Writer};
use crate::timefmt::format_utc;

use window::{Scope, Window, WindowScan};

/// Everything a cycle needs, passed explicitly.
pub struct SyncContext {
    pub client: Client,
    pub writer: Writer,
    pub sync: SyncConfig,
}

/// A `created_at` range to re-scan completely: `[start, end)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackfillRange {
    pub start: OffsetDateTime,
    pub end: OffsetDateTime,
}

/// What a completed cycle did.
#[derive(Debug, Clone)]
pub struct CycleReport {
    pub run_id: i64,
    pub counts: RunCounts,
    /// Everything created before this instant is known to be complete.
    pub complete_through: Option<OffsetDateTime>,
    pub elapsed: Duration,
}

/// Why a cycle did not complete.
#[derive(Debug, thiserror::Error)]
pub enum CycleError {
    #[error(transparent)]
    Api(#[from] ApiError),
    #[error("the cycle was cancelled")]
    Cancelled,
    #[error(
        "upstream kept changing in the window {start} .. {end} on every pass; it stays unfinished \
         and is scanned again next cycle"
    )]
    Unsettled { start: String, end: String },
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

impl CycleError {
    pub fn reason_code(&self) -> Option<&str> {
        match self {
            CycleError::Api(e) => e.reason_code(),
            _ => None,
        }
    }
}

/// Runs one cycle — the live and revisit ranges, then `backfill` if given — and records it in
/// `sync_runs`, whatever its outcome.
pub async fn run_cycle(
    ctx: &SyncContext,
    trigger: &'static str,
    backfill: Option<BackfillRange>,
    cancel: &CancellationToken,
) -> Result<CycleReport, CycleError> {
    let started = Instant::now();
    let run_id = ctx
        .writer
        .call(move |c| {
            let now = OffsetDateTime::now_utc();
            let aborted = store::abort_stale_runs(c, now)?;
            if aborted > 0 {
                tracing::warn!(
                    aborted,
                    "marked runs left running by an earlier process as aborted"
                );
            }
            store::start_run(c, trigger, now)
        })
        .await?;
    let span = tracing::info_span!("cycle", run_id, trigger);
    let _enter = span.enter();
    let mut counts = RunCounts::default();
    let mut result = sync_recent(ctx, run_id, &mut counts, cancel).await;
    if let (Ok(_), Some(range)) = (&result, backfill) {
        result = run_backfill(ctx, run_id, range, trigger, &mut counts, cancel).await;
    }
    let (outcome, error) = match &result {
        Ok(_) => (RunOutcome::Succeeded, None),
        Err(e) => (
            if matches!(e, CycleError::Cancelled) {
                RunOutcome::Aborted
            } else {
                RunOutcome::Failed
            },
            Some((format!("{e:#}"), e.reason_code().map(str::to_owned))),
        ),
    };
    let complete_through = ctx
        .writer
        .call(move |c| {
            let error = error.as_ref().map(|(m, r)| (m.as_str(), r.as_deref()));
            store::finish_run(c, run_id, outcome, &counts, error, OffsetDateTime::now_utc())?;
            store::complete_through(c)
        })
        .await?;
    result?;
    let report = CycleReport {
        run_id,
        counts,
        complete_through,
        elapsed: started.elapsed(),
    };
    tracing::info!(
        list_requests = counts.list_requests,
        detail_requests = counts.detail_requests,
        windows = counts.windows,
        new = counts.encounters_new,
        changed = counts.encounters_changed,
        unchanged = counts.encounters_unchanged,
        removed = counts.encounters_removed,
        rescans = counts.rescans,
        elapsed_ms = report.elapsed.as_millis() as u64,
        "cycle complete"
    );
    Ok(report)
}

/// Lists new time (from the watermark minus the overlap to now minus the settle lag) together
/// with the revisit horizons, as one ascending range.
async fn sync_recent(
    ctx: &SyncContext,
    run_id: i64,
    counts: &mut RunCounts,
    cancel: &CancellationToken,
) -> Result<(), CycleError> {
    let (watermark, deep_at) = ctx
        .writer
        .call(|c| Ok((store::complete_through(c)?, store::deep_revisit_at(c)?)))
        .await?;
    let s = &ctx.sync;
    let now = OffsetDateTime::now_utc();
    let horizon = now - s.settle_lag;
    let deep_due = !s.revisit_deep.is_zero() && deep_at.is_none_or(|t| t + s.revisit_deep_every <= now);
    let from = match watermark {
        None => s.start_at,
        Some(wm) => {
            let mut from = (wm - s.overlap).min(now - s.revisit_recent);
            if deep_due {
                from = from.min(now - s.revisit_deep);
            }
            from.max(s.start_at)
        }
    };
    tracing::debug!(from = %format_utc(from), to = %format_utc(horizon), deep_due, "planning");
    let scope = Scope::Recent { watermark };
    scan_range(ctx, run_id, from, horizon, scope, false, counts, cancel).await?;
    // The first cycle reads all history, which covers the deep horizon too.
    if deep_due && from <= now - s.revisit_deep {
        ctx.writer
            .call(move |c| store::set_deep_revisit_at(c, now))
            .await?;
    }
    Ok(())
}

/// Re-scans an explicit range completely, resuming an interrupted backfill of the same range.
async fn run_backfill(
    ctx: &SyncContext,
    run_id: i64,
    range: BackfillRange,
    requested_by: &'static str,
    counts: &mut RunCounts,
    cancel: &CancellationToken,
) -> Result<(), CycleError> {
    let bf = ctx
        .writer
        .call(move |c| {
            store::open_backfill(c, range.start, range.end, requested_by, OffsetDateTime::now_utc())
        })
        .await?;
    tracing::info!(
        backfill_id = bf.backfill_id,
        from = %format_utc(bf.start),
        to = %format_utc(bf.end),
        resume_at = %format_utc(bf.cursor),
        "backfill"
    );
    let scope = Scope::Backfill {
        backfill_id: bf.backfill_id,
    };
    let result = scan_range(ctx, run_id, bf.cursor, bf.end, scope, true, counts, cancel).await;
    let error = result.as_ref().err().map(|e| format!("{e:#}"));
    ctx.writer
        .call(move |c| store::finish_backfill(c, bf.backfill_id, error.as_deref(), OffsetDateTime::now_utc()))
        .await?;
    result
}

/// Scans `[from, to)` window by window in ascending order.
#[allow(clippy::too_many_arguments)]
async fn scan_range(
    ctx: &SyncContext,
    run_id: i64,
    from: OffsetDateTime,
    to: OffsetDateTime,
    scope: Scope,
    reconcile: bool,
    counts: &mut RunCounts,
    cancel: &CancellationToken,
) -> Result<(), CycleError> {
    let mut cursor = from;
    while cursor < to {
        let w = Window {
            run_id,
            scope,
            start: cursor,
            end: to,
            reconcile,
        };
        match window::scan(ctx, w, counts, cancel).await? {
            WindowScan::Completed { end } => cursor = end,
            WindowScan::Unsettled { end } => {
                return Err(CycleError::Unsettled {
                    start: format_utc(cursor),
                    end: format_utc(end),
                });
            }
        }
    }
    Ok(())
}

/// Maps a wire encounter to the warehouse record.
fn to_record(e: Encounter) -> EncounterRecord {
    let content_hash = hex(&Sha256::digest(e.raw.as_bytes()));
    EncounterRecord {
        encounter_id: e.encounter_id,
        organization_id: e.organization_id,
        encounter_type: e.encounter_type,
        status: e.status,
        created_at: e.created_at.0,
        updated_at: e.updated_at.0,
        date_of_service: e.date_of_service.map(|t| t.0),
        patient: e.patient.map(|p| PatientRecord {
            patient_id: p.patient_id,
            first_name: p.first_name,
            last_name: p.last_name,
            date_of_birth: p.date_of_birth.map(|d| d.to_string()),
        }),
        documents: e
            .documents
            .into_iter()
            .map(|d| DocumentRecord {
                document_id: d.document_id,
                schema_type: d.schema_type,
                title: d.title,
                status: d.status,
                workflow_variant: d.workflow_variant,
                audio_duration_seconds: d.audio_duration_seconds,
            })
            .collect(),
        content_hash,
        raw_json: e.raw,
    }
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut out, b| {
            let _ = write!(out, "{b:02x}");
            out
        })
}
