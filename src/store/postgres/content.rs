//! The content work queue on PostgreSQL (the rules of `store::sqlite::content`, statement for
//! statement): claiming the documents whose detail, transcript or recording is due, saving what
//! was fetched, and the dead letters of work that exhausted its retries. The queue lives in the
//! `documents` rows themselves, so it survives crashes and costs no memory whatever the backlog.
//!
//! Claiming does not mark rows: as on SQLite, the caller's `exclude` set names the items still
//! being worked on, and a dead letter of this run (`dead_letters.last_run_id`) keeps an item out
//! until the next cycle. Unlike SQLite's loop, `skip` and `exclude` are applied in the query, so
//! `limit` items come back whenever that many are due.
//!
//! `WorkItem::detail_updated_at` is text in the seam (SQLite's stored form); here it is the
//! `timestamptz` read at the claim, formatted as `timefmt::format_stored` does, and parsed back
//! when a transcript records what it was fetched for. Comparisons of `updated_at` values happen
//! in SQL, between values that both went through PostgreSQL's microsecond precision.

use std::collections::HashSet;

use anyhow::Context;
use postgres::GenericClient;
use time::OffsetDateTime;

use crate::store::{DetailOutcome, RecordingRecord, TranscriptRecord, Work, WorkItem};
use crate::timefmt::{format_stored, parse_rfc3339, unix_nanos};

/// Up to `limit` items of `organization_id`'s documents due now (none while the organization is
/// not known yet), leaving out kinds in `skip` (routes disabled this cycle), the items in
/// `exclude` (claimed earlier and still being worked on) and items that already failed in this
/// run. Documents of removed encounters are never worked on.
pub fn claim_work(
    db: &mut impl GenericClient,
    organization_id: Option<&str>,
    run_id: i64,
    skip: &[Work],
    exclude: &HashSet<(Work, String)>,
    limit: usize,
    now: OffsetDateTime,
) -> anyhow::Result<Vec<WorkItem>> {
    let skip: Vec<&str> = skip.iter().map(|w| w.as_str()).collect();
    let (busy_work, busy_documents): (Vec<&str>, Vec<&str>) = exclude
        .iter()
        .map(|(work, document_id)| (work.as_str(), document_id.as_str()))
        .unzip();
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let rows = db.query(
        "SELECT w.work, d.encounter_id, d.document_id, d.audio_duration_seconds, d.content_seq,
                d.detail_updated_at
         FROM (
             SELECT 'document' AS work, document_id FROM documents WHERE detail_state = 'pending'
             UNION ALL
             SELECT 'transcript', document_id FROM documents
              WHERE transcript_state = 'pending'
                 OR (transcript_state = 'not_ready' AND transcript_next_at_ns <= $2)
             UNION ALL
             SELECT 'audio', document_id FROM documents WHERE audio_state = 'pending'
         ) w
         JOIN documents d ON d.document_id = w.document_id
         JOIN encounters e ON e.encounter_id = d.encounter_id
         WHERE d.removed_at IS NULL AND e.removed_at IS NULL AND e.organization_id = $4
           AND w.work <> ALL($5::text[])
           AND NOT EXISTS (SELECT 1 FROM unnest($6::text[], $7::text[]) AS busy(work, document_id)
                           WHERE busy.work = w.work AND busy.document_id = w.document_id)
           AND NOT EXISTS (SELECT 1 FROM dead_letters x
                           WHERE x.work = w.work AND x.document_id = w.document_id AND x.last_run_id = $1)
         LIMIT $3",
        &[
            &run_id,
            &unix_nanos(now),
            &limit,
            &organization_id,
            &skip,
            &busy_work,
            &busy_documents,
        ],
    )?;
    rows.iter()
        .map(|r| {
            let work: &str = r.try_get(0)?;
            let work = match work {
                "document" => Work::Document,
                "transcript" => Work::Transcript,
                _ => Work::Audio,
            };
            let detail_updated_at: Option<OffsetDateTime> = r.try_get(5)?;
            Ok(WorkItem {
                work,
                encounter_id: r.try_get(1)?,
                document_id: r.try_get(2)?,
                audio_duration_seconds: r.try_get(3)?,
                content_seq: r.try_get(4)?,
                detail_updated_at: detail_updated_at.map(format_stored),
            })
        })
        .collect()
}

/// Queues a recording for every finished ambient document that has none (audio was just
/// enabled, or a recording was purged), among `organization_id`'s documents. Returns how many
/// were queued.
pub fn queue_missing_audio(
    db: &mut impl GenericClient,
    organization_id: Option<&str>,
) -> anyhow::Result<usize> {
    let queued = db.execute(
        "UPDATE documents SET audio_state = 'pending'
         WHERE schema_type = 'ambient_transcript' AND status = 'completed' AND removed_at IS NULL
           AND organization_id = $1
           AND (audio_state IS NULL OR (audio_state = 'done'
                AND NOT EXISTS (SELECT 1 FROM recordings r WHERE r.document_id = documents.document_id)))",
        &[&organization_id],
    )?;
    Ok(usize::try_from(queued)?)
}

/// Saves a document detail. The detail is marked done unless paging observed a newer change
/// of the document while it was fetched (then it is asked again).
///
/// Paging never queues an ambient document's detail (its summary decides, see `upsert`); one
/// arrives only when the route describes as ambient a document the list typed otherwise, or
/// from a queue an earlier version left. Then its transcript is queued again unless it was
/// fetched after a detail with this same `updated_at` (`transcripts.fetched_for_updated_at`);
/// an unfinished document waits; with `audio`, a finished one queues its recording.
pub fn save_detail(
    db: &mut impl GenericClient,
    item: &WorkItem,
    outcome: &DetailOutcome,
    audio: bool,
    now: OffsetDateTime,
) -> anyhow::Result<()> {
    let document_id = item.document_id.as_str();
    match outcome {
        DetailOutcome::Note {
            format,
            text,
            created_at,
            updated_at,
        } => {
            db.execute(
                "UPDATE documents SET content_format = $2, content_text = $3, detail_created_at = $4,
                     detail_updated_at = $5, changed_at = $6,
                     detail_state = CASE WHEN content_seq = $7 THEN 'done' ELSE detail_state END
                 WHERE document_id = $1",
                &[
                    &document_id,
                    format,
                    text,
                    created_at,
                    updated_at,
                    &now,
                    &item.content_seq,
                ],
            )?;
        }
        DetailOutcome::Ambient {
            status,
            audio_duration_seconds,
            created_at,
            updated_at,
        } => {
            // Equality, never order: `updated_at` is data, not a version, but any change of the
            // document changes it. A transcript fetched without a detail before it (NULL) is of
            // unknown age, so it is fetched again.
            let current: bool = db
                .query_opt(
                    "SELECT fetched_for_updated_at = $2 FROM transcripts WHERE document_id = $1",
                    &[&document_id, updated_at],
                )?
                .map(|r| r.try_get::<_, Option<bool>>(0))
                .transpose()?
                .flatten()
                .unwrap_or(false);
            let requeue = status.as_deref() == Some("completed") && !current;
            // Re-queueing bumps `content_seq`, so that a transcript fetch already in flight (sent
            // before this detail was known) does not count as current.
            db.execute(
                "UPDATE documents SET status = $2, audio_duration_seconds = $3, detail_created_at = $4,
                     detail_updated_at = $5, changed_at = $6,
                     detail_state = CASE WHEN content_seq = $9 THEN 'done' ELSE detail_state END,
                     transcript_state = CASE WHEN $2 IS DISTINCT FROM 'completed' THEN 'waiting'
                                             WHEN $7 THEN 'pending'
                                             WHEN coalesce(transcript_state, 'waiting') = 'waiting' THEN 'done'
                                             ELSE transcript_state END,
                     transcript_attempts = CASE WHEN $7 THEN 0 ELSE transcript_attempts END,
                     transcript_next_at_ns = CASE WHEN $7 THEN NULL ELSE transcript_next_at_ns END,
                     content_seq = content_seq + CASE WHEN $7 THEN 1 ELSE 0 END,
                     audio_state = CASE WHEN $8 AND $2 = 'completed' AND coalesce(audio_state, '') <> 'done'
                                        THEN 'pending' ELSE audio_state END
                 WHERE document_id = $1",
                &[
                    &document_id,
                    status,
                    audio_duration_seconds,
                    created_at,
                    updated_at,
                    &now,
                    &requeue,
                    &audio,
                    &item.content_seq,
                ],
            )?;
        }
        DetailOutcome::Unsupported => set_detail_outcome(db, item, "unsupported")?,
        DetailOutcome::Unavailable => set_detail_outcome(db, item, "unavailable")?,
    }
    clear_dead_letter(db, Work::Document, document_id)
}

/// A detail answered with an outcome instead of a document: recorded, unless the document
/// changed meanwhile (then it is asked again).
fn set_detail_outcome(db: &mut impl GenericClient, item: &WorkItem, state: &str) -> anyhow::Result<()> {
    db.execute(
        "UPDATE documents SET detail_state = $2 WHERE document_id = $1 AND content_seq = $3",
        &[&item.document_id, &state, &item.content_seq],
    )?;
    Ok(())
}

/// A recording's outcome. Paging never re-queues a recording, so it always stands.
fn set_audio_state(db: &mut impl GenericClient, document_id: &str, state: &str) -> anyhow::Result<()> {
    db.execute(
        "UPDATE documents SET audio_state = $2 WHERE document_id = $1",
        &[&document_id, &state],
    )?;
    Ok(())
}

fn clear_dead_letter(db: &mut impl GenericClient, work: Work, document_id: &str) -> anyhow::Result<()> {
    db.execute(
        "DELETE FROM dead_letters WHERE work = $1 AND document_id = $2",
        &[&work.as_str(), &document_id],
    )?;
    Ok(())
}

/// Replaces a document's transcript and turns, and marks it done unless paging observed a newer
/// change of the document while it was fetched (then it stays queued). It is recorded as
/// fetched for the detail `updated_at` known when the item was claimed, which the transcript is
/// at least as new as (NULL when no detail had been fetched). A transcript identical to the
/// stored one (same digest) is not rewritten: its turns keep their row versions.
pub fn save_transcript(
    db: &mut impl GenericClient,
    item: &WorkItem,
    t: &TranscriptRecord,
    now: OffsetDateTime,
) -> anyhow::Result<()> {
    let document_id = item.document_id.as_str();
    let fetched_for = item
        .detail_updated_at
        .as_deref()
        .map(parse_rfc3339)
        .transpose()
        .map_err(|e| anyhow::anyhow!("the claimed work item's detail time: {e}"))?;
    let stored: Option<String> = db
        .query_opt(
            "SELECT content_sha256 FROM transcripts WHERE document_id = $1",
            &[&document_id],
        )?
        .map(|r| r.try_get::<_, Option<String>>(0))
        .transpose()?
        .flatten();
    if stored.as_deref() == Some(t.content_sha256.as_str()) {
        // Fetched again (its encounter changed) and identical: only when it was seen changes.
        db.execute(
            "UPDATE transcripts SET fetched_at = $2, fetched_for_updated_at = $3 WHERE document_id = $1",
            &[&document_id, &now, &fetched_for],
        )?;
    } else {
        replace_transcript(db, document_id, t, fetched_for, now)?;
    }
    db.execute(
        "UPDATE documents SET transcript_state = 'done', transcript_attempts = 0, transcript_next_at_ns = NULL
         WHERE document_id = $1 AND content_seq = $2",
        &[&document_id, &item.content_seq],
    )?;
    clear_dead_letter(db, Work::Transcript, document_id)
}

/// The transcript row upserted and its turns replaced: one delete, one insert of every turn
/// from arrays (`unnest`), in the caller's transaction.
fn replace_transcript(
    db: &mut impl GenericClient,
    document_id: &str,
    t: &TranscriptRecord,
    fetched_for: Option<OffsetDateTime>,
    now: OffsetDateTime,
) -> anyhow::Result<()> {
    db.execute(
        "DELETE FROM transcript_turns WHERE document_id = $1",
        &[&document_id],
    )?;
    let turn_count = i64::try_from(t.turns.len())?;
    // The document's encounter and organization as stored now: paging may have moved it since
    // the claim (the documents_moved trigger keeps the two in step from then on).
    let upserted = db.execute(
        "INSERT INTO transcripts AS t (document_id, encounter_id, provider, audio_duration_seconds, turn_count,
             fetched_at, fetched_for_updated_at, content_sha256, organization_id)
         SELECT d.document_id, d.encounter_id, $2, $3, $4, $5, $6, $7, d.organization_id
           FROM documents d WHERE d.document_id = $1
         ON CONFLICT (document_id) DO UPDATE SET encounter_id = EXCLUDED.encounter_id,
             provider = EXCLUDED.provider, audio_duration_seconds = EXCLUDED.audio_duration_seconds,
             turn_count = EXCLUDED.turn_count, fetched_at = EXCLUDED.fetched_at,
             fetched_for_updated_at = EXCLUDED.fetched_for_updated_at,
             content_sha256 = EXCLUDED.content_sha256",
        &[
            &document_id,
            &t.provider,
            &t.audio_duration_seconds,
            &turn_count,
            &now,
            &fetched_for,
            &t.content_sha256,
        ],
    )?;
    if upserted == 0 {
        anyhow::bail!("cannot store the transcript of document {document_id}: the document is not stored");
    }
    let mut indexes = Vec::with_capacity(t.turns.len());
    let mut speakers = Vec::with_capacity(t.turns.len());
    let mut starts = Vec::with_capacity(t.turns.len());
    let mut ends = Vec::with_capacity(t.turns.len());
    let mut texts = Vec::with_capacity(t.turns.len());
    for (i, (speaker, start, end, text)) in t.turns.iter().enumerate() {
        indexes.push(i64::try_from(i)?);
        speakers.push(speaker.as_deref());
        starts.push(*start);
        ends.push(*end);
        texts.push(text.as_deref());
    }
    db.execute(
        "INSERT INTO transcript_turns (document_id, turn_index, speaker, start_seconds, end_seconds, text,
             organization_id)
         SELECT $1, u.turn_index, u.speaker, u.start_seconds, u.end_seconds, u.text,
                (SELECT organization_id FROM documents WHERE document_id = $1)
           FROM unnest($2::bigint[], $3::text[], $4::float8[], $5::float8[], $6::text[])
                AS u(turn_index, speaker, start_seconds, end_seconds, text)",
        &[&document_id, &indexes, &speakers, &starts, &ends, &texts],
    )
    .with_context(|| format!("cannot store the turns of document {document_id}"))?;
    Ok(())
}

/// The transcript route said "not yet": try again after the next delay of `schedule`, or, once
/// the schedule is exhausted, only after the document changes (at once when it changed while
/// the request was under way).
pub fn transcript_not_ready(
    db: &mut impl GenericClient,
    item: &WorkItem,
    schedule: &[std::time::Duration],
    now: OffsetDateTime,
) -> anyhow::Result<()> {
    let document_id = item.document_id.as_str();
    let attempts: i64 = db
        .query_one(
            "SELECT transcript_attempts FROM documents WHERE document_id = $1",
            &[&document_id],
        )?
        .try_get(0)?;
    let next_at = usize::try_from(attempts)
        .ok()
        .and_then(|a| schedule.get(a))
        .map(|d| unix_nanos(now + *d));
    db.execute(
        "UPDATE documents SET transcript_state = 'not_ready', transcript_attempts = transcript_attempts + 1,
             transcript_next_at_ns = $2
         WHERE document_id = $1 AND content_seq = $3",
        &[&document_id, &next_at, &item.content_seq],
    )?;
    Ok(())
}

/// Marks a transcript or recording as unavailable for this record (403/404/unsupported). A
/// document or transcript that changed while it was asked for stays queued instead.
pub fn mark_unavailable(db: &mut impl GenericClient, item: &WorkItem) -> anyhow::Result<()> {
    let document_id = item.document_id.as_str();
    match item.work {
        Work::Document => set_detail_outcome(db, item, "unavailable")?,
        Work::Transcript => {
            db.execute(
                "UPDATE documents SET transcript_state = 'unavailable'
                 WHERE document_id = $1 AND content_seq = $2",
                &[&document_id, &item.content_seq],
            )?;
        }
        Work::Audio => set_audio_state(db, document_id, "unavailable")?,
    }
    clear_dead_letter(db, item.work, document_id)
}

/// Records a downloaded recording (its file is already in place) and settles its work item.
pub fn save_recording(
    db: &mut impl GenericClient,
    encounter_id: &str,
    document_id: &str,
    r: &RecordingRecord,
    now: OffsetDateTime,
) -> anyhow::Result<()> {
    let size_bytes =
        i64::try_from(r.size_bytes).with_context(|| format!("recording of {} bytes", r.size_bytes))?;
    db.execute(
        "INSERT INTO recordings (document_id, encounter_id, path, size_bytes, sha256, duration_seconds, fetched_at,
             organization_id)
         VALUES ($1, $2, $3, $4, $5, $6, $7, (SELECT organization_id FROM documents WHERE document_id = $1))
         ON CONFLICT (document_id) DO UPDATE SET path = EXCLUDED.path, size_bytes = EXCLUDED.size_bytes,
             sha256 = EXCLUDED.sha256, duration_seconds = EXCLUDED.duration_seconds,
             fetched_at = EXCLUDED.fetched_at",
        &[
            &document_id,
            &encounter_id,
            &r.path,
            &size_bytes,
            &r.sha256,
            &r.duration_seconds,
            &now,
        ],
    )?;
    set_audio_state(db, document_id, "done")?;
    clear_dead_letter(db, Work::Audio, document_id)
}

/// Records work that exhausted its retries in this run; it stays queued for the next cycle.
pub fn dead_letter(
    db: &mut impl GenericClient,
    organization: &str,
    item: &WorkItem,
    run_id: i64,
    reason_code: Option<&str>,
    error: &str,
    now: OffsetDateTime,
) -> anyhow::Result<()> {
    db.execute(
        "INSERT INTO dead_letters AS x (work, document_id, encounter_id, attempts, first_failed_at, last_failed_at,
             last_run_id, reason_code, last_error, organization)
         VALUES ($1, $2, $3, 1, $4, $4, $5, $6, $7, $8)
         ON CONFLICT (work, document_id) DO UPDATE SET attempts = x.attempts + 1,
             last_failed_at = EXCLUDED.last_failed_at, last_run_id = EXCLUDED.last_run_id,
             reason_code = EXCLUDED.reason_code, last_error = EXCLUDED.last_error",
        &[
            &item.work.as_str(),
            &item.document_id,
            &item.encounter_id,
            &now,
            &run_id,
            &reason_code,
            &error,
            &organization,
        ],
    )?;
    Ok(())
}
