//! The content work queue on PostgreSQL: claiming due work, storing note details, transcripts
//! and recordings, and dead letters (mirrors `store::sqlite::content`).

use std::collections::HashSet;

use postgres::GenericClient;
use time::OffsetDateTime;

use crate::store::{DetailOutcome, RecordingRecord, TranscriptRecord, Work, WorkItem};

#[allow(clippy::too_many_arguments)]
pub fn claim_work(
    _db: &mut impl GenericClient,
    _organization_id: Option<&str>,
    _run_id: i64,
    _skip: &[Work],
    _exclude: &HashSet<(Work, String)>,
    _limit: usize,
    _now: OffsetDateTime,
) -> anyhow::Result<Vec<WorkItem>> {
    anyhow::bail!("the PostgreSQL backend does not support content work yet")
}

pub fn queue_missing_audio(
    _db: &mut impl GenericClient,
    _organization_id: Option<&str>,
) -> anyhow::Result<usize> {
    anyhow::bail!("the PostgreSQL backend does not support recordings yet")
}

pub fn save_detail(
    _db: &mut impl GenericClient,
    _item: &WorkItem,
    _outcome: &DetailOutcome,
    _audio: bool,
    _now: OffsetDateTime,
) -> anyhow::Result<()> {
    anyhow::bail!("the PostgreSQL backend does not support note details yet")
}

pub fn save_transcript(
    _db: &mut impl GenericClient,
    _item: &WorkItem,
    _t: &TranscriptRecord,
    _now: OffsetDateTime,
) -> anyhow::Result<()> {
    anyhow::bail!("the PostgreSQL backend does not support transcripts yet")
}

pub fn transcript_not_ready(
    _db: &mut impl GenericClient,
    _item: &WorkItem,
    _schedule: &[std::time::Duration],
    _now: OffsetDateTime,
) -> anyhow::Result<()> {
    anyhow::bail!("the PostgreSQL backend does not support transcripts yet")
}

pub fn mark_unavailable(_db: &mut impl GenericClient, _item: &WorkItem) -> anyhow::Result<()> {
    anyhow::bail!("the PostgreSQL backend does not support content work yet")
}

pub fn save_recording(
    _db: &mut impl GenericClient,
    _encounter_id: &str,
    _document_id: &str,
    _r: &RecordingRecord,
    _now: OffsetDateTime,
) -> anyhow::Result<()> {
    anyhow::bail!("the PostgreSQL backend does not support recordings yet")
}

#[allow(clippy::too_many_arguments)]
pub fn dead_letter(
    _db: &mut impl GenericClient,
    _organization: &str,
    _item: &WorkItem,
    _run_id: i64,
    _reason_code: Option<&str>,
    _error: &str,
    _now: OffsetDateTime,
) -> anyhow::Result<()> {
    anyhow::bail!("the PostgreSQL backend does not support dead letters yet")
}
