//! One sync cycle: plan `created_at` windows from the live watermark to now minus the settle lag,
//! page each window in ascending order, and commit every page (and the window's completion with
//! its last page) through the writer. Window sizes adapt to the observed density so a window
//! stays well inside the API's offset cap. This module owns the replication algorithm; it does
//! no SQL itself (that is `store`) and no HTTP itself (that is `api`).

mod window;

use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

use crate::api::wire::Encounter;
use crate::api::{ApiError, Client};
use crate::store::{self, DocumentRecord, EncounterRecord, PatientRecord, RunCounts, RunOutcome, Writer};

pub use window::WindowScan;

/// Everything a cycle needs, passed explicitly.
pub struct SyncContext {
    pub client: Client,
    pub writer: Writer,
    pub start_at: OffsetDateTime,
    pub settle_lag: Duration,
    pub page_limit: u32,
}

/// What a completed cycle did.
#[derive(Debug, Clone)]
pub struct CycleReport {
    pub run_id: i64,
    pub counts: RunCounts,
    pub watermark: OffsetDateTime,
    pub elapsed: Duration,
}

/// Why a cycle did not complete.
#[derive(Debug, thiserror::Error)]
pub enum CycleError {
    #[error(transparent)]
    Api(#[from] ApiError),
    #[error("the cycle was cancelled")]
    Cancelled,
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

/// Runs one cycle and records it in `sync_runs`, whatever its outcome.
pub async fn run_cycle(ctx: &SyncContext, trigger: &'static str, cancel: &CancellationToken) -> Result<CycleReport, CycleError> {
    let started = Instant::now();
    let run_id = ctx
        .writer
        .call(move |c| {
            let now = OffsetDateTime::now_utc();
            let aborted = store::abort_stale_runs(c, now)?;
            if aborted > 0 {
                tracing::warn!(aborted, "marked runs left running by an earlier process as aborted");
            }
            store::start_run(c, trigger, now)
        })
        .await?;
    let span = tracing::info_span!("cycle", run_id, trigger);
    let _enter = span.enter();
    let mut counts = RunCounts::default();
    let result = sync_live(ctx, run_id, &mut counts, cancel).await;
    let (outcome, error) = match &result {
        Ok(_) => (RunOutcome::Succeeded, None),
        Err(CycleError::Cancelled) => (RunOutcome::Aborted, Some((result_message(&result), None))),
        Err(e) => (
            RunOutcome::Failed,
            Some((result_message(&result), e.reason_code().map(str::to_owned))),
        ),
    };
    ctx.writer
        .call(move |c| {
            let error = error.as_ref().map(|(m, r)| (m.as_str(), r.as_deref()));
            store::finish_run(c, run_id, outcome, &counts, error, OffsetDateTime::now_utc())
        })
        .await?;
    let watermark = result?;
    let report = CycleReport {
        run_id,
        counts,
        watermark,
        elapsed: started.elapsed(),
    };
    tracing::info!(
        list_requests = counts.list_requests,
        windows = counts.windows,
        new = counts.encounters_new,
        changed = counts.encounters_changed,
        unchanged = counts.encounters_unchanged,
        elapsed_ms = report.elapsed.as_millis() as u64,
        "cycle complete"
    );
    Ok(report)
}

fn result_message<T>(r: &Result<T, CycleError>) -> String {
    r.as_ref().err().map(|e| format!("{e:#}")).unwrap_or_default()
}

/// Walks live windows from the watermark to the settle horizon; returns the new watermark:
/// everything created before it has been read completely.
async fn sync_live(
    ctx: &SyncContext,
    run_id: i64,
    counts: &mut RunCounts,
    cancel: &CancellationToken,
) -> Result<OffsetDateTime, CycleError> {
    let stored = ctx.writer.call(|c| store::live_watermark(c)).await?;
    let mut cursor = stored.unwrap_or(ctx.start_at).max(ctx.start_at);
    let horizon = OffsetDateTime::now_utc() - ctx.settle_lag;
    let mut planner = window::Planner::new(cursor, horizon);
    while let Some(end) = planner.next_end(cursor) {
        if cancel.is_cancelled() {
            return Err(CycleError::Cancelled);
        }
        let scan = window::scan(ctx, run_id, "live", cursor, end, true, counts, cancel).await?;
        match scan {
            WindowScan::Completed { total } => {
                counts.windows += 1;
                planner.observe(cursor, end, total);
                cursor = end;
            }
            WindowScan::TooDense { total } => {
                counts.splits += 1;
                planner.shrink(cursor, end, total);
            }
        }
    }
    Ok(cursor)
}

/// Maps a wire encounter to the warehouse record.
fn to_record(e: Encounter) -> EncounterRecord {
    let content_hash = hex_sha256(e.raw.as_bytes());
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

fn hex_sha256(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::with_capacity(bytes.len() * 2), |mut out, b| {
        let _ = write!(out, "{b:02x}");
        out
    })
}
