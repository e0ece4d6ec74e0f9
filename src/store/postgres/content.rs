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

use crate::store::{
    DetailOutcome, NotReady, RecordingRecord, TranscriptRecord, Work, WorkItem, dead_letter_retry_at,
};
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
    // A list-only cycle still asks, with every kind skipped: nothing to claim, and no reason to
    // analyze the tables its backfill is growing.
    let Some(organization_id) = organization_id else {
        return Ok(Vec::new());
    };
    if Work::all_skipped(skip) {
        return Ok(Vec::new());
    }
    let skip: Vec<&str> = skip.iter().map(|w| w.as_str()).collect();
    let (busy_work, busy_documents): (Vec<&str>, Vec<&str>) = exclude
        .iter()
        .map(|(work, document_id)| (work.as_str(), document_id.as_str()))
        .unzip();
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    refresh_statistics(db)?;
    let rows = db.query(
        "SELECT w.work, d.encounter_id, d.document_id, d.audio_duration_seconds, d.content_seq,
                d.detail_updated_at
         FROM (
             -- Each arm in the form its partial index answers (as on SQLite).
             SELECT 'document' AS work, document_id FROM documents
              WHERE detail_state IN ('pending', 'not_ready')
                AND (detail_state = 'pending' OR detail_next_at_ns <= $2)
             UNION ALL
             SELECT 'transcript', document_id FROM documents
              WHERE transcript_state IN ('pending', 'not_ready')
                AND (transcript_state = 'pending' OR transcript_next_at_ns <= $2)
             UNION ALL
             SELECT 'audio', document_id FROM documents
              WHERE audio_state IN ('pending', 'not_ready')
                AND (audio_state = 'pending' OR audio_next_at_ns <= $2)
         ) w
         JOIN documents d ON d.document_id = w.document_id
         JOIN encounters e ON e.encounter_id = d.encounter_id
         WHERE d.removed_at IS NULL AND e.removed_at IS NULL AND e.organization_id = $4
           AND w.work <> ALL($5::text[])
           AND NOT EXISTS (SELECT 1 FROM unnest($6::text[], $7::text[]) AS busy(work, document_id)
                           WHERE busy.work = w.work AND busy.document_id = w.document_id)
           AND NOT EXISTS (SELECT 1 FROM dead_letters x
                           WHERE x.work = w.work AND x.document_id = w.document_id
                             AND (x.last_run_id = $1 OR x.next_attempt_at_ns > $2))
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
            let work = Work::from_stored(r.try_get(0)?);
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

/// Tables the claim joins whose planner statistics are stale: more than 1,000 rows changed since
/// their last ANALYZE, and more than a fifth of what they hold.
const STALE_STATISTICS: &str = "SELECT relname FROM pg_stat_user_tables
     WHERE relid IN ('documents'::regclass, 'encounters'::regclass)
       AND n_mod_since_analyze > 1000 AND n_mod_since_analyze > n_live_tup / 5";

/// Analyzes the tables the claim joins when a backfill has grown them since their statistics
/// were taken. Autovacuum's analyze comes a minute or more later; until then the planner
/// believes a freshly loaded organization has one encounter and drives the claim from it,
/// scanning every due document once per encounter: 300–490 ms a claim of 128 items at 4,000
/// due (BENCHMARKS.md, "SQLite and PostgreSQL side by side"). The check is one catalog read.
fn refresh_statistics(db: &mut impl GenericClient) -> anyhow::Result<()> {
    let stale: Vec<String> = db
        .query(STALE_STATISTICS, &[])?
        .iter()
        .map(|r| r.try_get(0))
        .collect::<Result<_, _>>()?;
    for table in stale {
        // From the catalog, not from input: `documents` or `encounters`.
        db.batch_execute(&format!("ANALYZE {table}"))
            .with_context(|| format!("cannot analyze {table}"))?;
    }
    Ok(())
}

/// Queues a recording for every finished ambient document that has none (audio was just
/// enabled, or a recording was purged), among `organization_id`'s documents: `completed`, or
/// with a fetched transcript (final under another status word). Returns how many were queued.
pub fn queue_missing_audio(
    db: &mut impl GenericClient,
    organization_id: Option<&str>,
) -> anyhow::Result<usize> {
    let queued = db.execute(
        "UPDATE documents SET audio_state = 'pending'
         WHERE schema_type = 'ambient_transcript' AND removed_at IS NULL
           AND (status = 'completed'
                OR EXISTS (SELECT 1 FROM transcripts t WHERE t.document_id = documents.document_id))
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
                     detail_state = CASE WHEN content_seq = $7 THEN 'done' ELSE detail_state END,
                     detail_attempts = 0, detail_next_at_ns = NULL
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
            let final_ = crate::store::may_be_final(status.as_deref());
            let requeue = final_ && !current;
            // Re-queueing bumps `content_seq`, so that a transcript fetch already in flight (sent
            // before this detail was known) does not count as current.
            db.execute(
                "UPDATE documents SET status = $2, audio_duration_seconds = $3, detail_created_at = $4,
                     detail_updated_at = $5, changed_at = $6,
                     detail_state = CASE WHEN content_seq = $9 THEN 'done' ELSE detail_state END,
                     detail_attempts = 0, detail_next_at_ns = NULL,
                     transcript_state = CASE WHEN NOT $10 THEN 'waiting'
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
                    &final_,
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
        "UPDATE documents SET detail_state = $2, detail_attempts = 0, detail_next_at_ns = NULL
         WHERE document_id = $1 AND content_seq = $3",
        &[&item.document_id, &state, &item.content_seq],
    )?;
    Ok(())
}

/// A recording's outcome, which ends its not-ready schedule. Recordings are queued by
/// `queue_missing_audio`, not by paging: the outcome stands.
fn set_audio_state(db: &mut impl GenericClient, document_id: &str, state: &str) -> anyhow::Result<()> {
    db.execute(
        "UPDATE documents SET audio_state = $2, audio_attempts = 0, audio_next_at_ns = NULL
         WHERE document_id = $1",
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

/// The route said "not yet" ([`NotReady`]): asked again after the next delay of `schedule`, or,
/// once the schedule is exhausted, only after the document changes (at once when it changed
/// while the request was under way).
pub fn not_ready(
    db: &mut impl GenericClient,
    item: &WorkItem,
    schedule: &[std::time::Duration],
    now: OffsetDateTime,
) -> anyhow::Result<()> {
    let document_id = item.document_id.as_str();
    let prefix = NotReady::prefix(item.work);
    let Some(row) = db.query_opt(
        &format!("SELECT {prefix}_attempts FROM documents WHERE document_id = $1"),
        &[&document_id],
    )?
    else {
        // Purged while it was asked for: nothing is left to schedule.
        return Ok(());
    };
    let outcome = NotReady::after(item.work, row.try_get(0)?, schedule, now);
    db.execute(
        &outcome.update_sql("$1", "$2", "$3", "$4"),
        &[
            &document_id,
            &outcome.state,
            &outcome.next_at_ns,
            &item.content_seq,
        ],
    )?;
    // An answer, if not the content: what once exhausted its retries is no longer failing.
    clear_dead_letter(db, item.work, document_id)?;
    Ok(())
}

/// Queues the content of live encounters created in `[start_ns, end_ns)` again
/// ([`crate::store::Backend::requeue_content`]).
pub fn requeue_content(
    db: &mut impl GenericClient,
    organization_id: &str,
    start_ns: i64,
    end_ns: i64,
) -> anyhow::Result<u64> {
    let queued = db.execute(
        crate::store::requeue_content_sql!("$1", "$2", "$3"),
        &[&organization_id, &start_ns, &end_ns],
    )?;
    db.execute(
        crate::store::requeue_dead_letters_sql!("$1", "$2", "$3"),
        &[&organization_id, &start_ns, &end_ns],
    )?;
    Ok(queued)
}

/// Marks work as unavailable for this record (403 for another organization, 400 unsupported). A
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

/// [`crate::store::Backend::dead_letters_left`].
pub fn dead_letters_left(
    db: &mut impl GenericClient,
    organization: &str,
) -> anyhow::Result<Vec<(Work, i64)>> {
    db.execute(crate::store::orphaned_dead_letters_sql!("$1"), &[&organization])?;
    db.query(
        "SELECT work, count(*) FROM dead_letters WHERE organization = $1 GROUP BY work ORDER BY work",
        &[&organization],
    )?
    .iter()
    .map(|r| Ok((Work::from_stored(r.try_get(0)?), r.try_get(1)?)))
    .collect()
}

/// Records work that exhausted its retries in this run; it stays queued, and is claimed again
/// once its wait is over ([`crate::store::dead_letter_retry_at`]).
pub fn dead_letter(
    db: &mut impl GenericClient,
    organization: &str,
    item: &WorkItem,
    run_id: i64,
    reason_code: Option<&str>,
    error: &str,
    now: OffsetDateTime,
) -> anyhow::Result<()> {
    let first_failed_at: Option<OffsetDateTime> = db
        .query_opt(
            "SELECT first_failed_at FROM dead_letters WHERE work = $1 AND document_id = $2",
            &[&item.work.as_str(), &item.document_id],
        )?
        .map(|r| r.try_get(0))
        .transpose()?;
    db.execute(
        "INSERT INTO dead_letters AS x (work, document_id, encounter_id, attempts, first_failed_at, last_failed_at,
             last_run_id, reason_code, last_error, organization, next_attempt_at_ns)
         VALUES ($1, $2, $3, 1, $4, $4, $5, $6, $7, $8, NULL)
         ON CONFLICT (work, document_id) DO UPDATE SET attempts = x.attempts + 1,
             last_failed_at = EXCLUDED.last_failed_at, last_run_id = EXCLUDED.last_run_id,
             reason_code = EXCLUDED.reason_code, last_error = EXCLUDED.last_error,
             next_attempt_at_ns = $9",
        &[
            &item.work.as_str(),
            &item.document_id,
            &item.encounter_id,
            &now,
            &run_id,
            &reason_code,
            &error,
            &organization,
            &dead_letter_retry_at(first_failed_at, now),
        ],
    )?;
    Ok(())
}

/// The queue's rules against a real server (`charthero_sim::pgcluster`), ported from SQLite's
/// tests; each skips, saying why, where no server can run. The helpers serve `privacy`'s tests
/// too.
#[cfg(test)]
pub(super) mod tests {
    use std::time::Duration;

    use charthero_sim::pgcluster::{self, PgDatabase};
    use postgres::{Client, NoTls, Transaction};

    use super::*;
    use crate::store::postgres::{open_writer, upsert};
    use crate::store::{DocumentRecord, EncounterRecord, PatientRecord};

    /// A migrated warehouse in a new database `name` of the shared cluster, and the owner's
    /// connection to it (None, reason printed, where there is no server).
    pub(in crate::store::postgres) fn warehouse(name: &str) -> Option<(PgDatabase, Client)> {
        let db = pgcluster::shared()?
            .create_database(name)
            .expect("a test database");
        let mut config: postgres::Config = db.url.parse().expect("the test database's URL");
        config.password(&db.password).options("-c search_path=charthero");
        let client = config.connect(NoTls).expect("a connection to the test database");
        let backend = open_writer(client, db.url.clone()).expect("migrations apply");
        Some((db, backend.client.into_inner()))
    }

    pub(in crate::store::postgres) fn doc(
        id: &str,
        schema_type: &str,
        status: Option<&str>,
    ) -> DocumentRecord {
        DocumentRecord {
            document_id: id.to_owned(),
            schema_type: schema_type.to_owned(),
            title: None,
            status: status.map(str::to_owned),
            workflow_variant: None,
            audio_duration_seconds: None,
        }
    }

    /// Encounter `id` of `org_1`, created at `created_at`; `hash` stands for the record's
    /// content (a different hash is a changed encounter).
    pub(in crate::store::postgres) fn encounter(
        id: &str,
        created_at: OffsetDateTime,
        hash: &str,
        patient: Option<PatientRecord>,
        docs: Vec<DocumentRecord>,
    ) -> EncounterRecord {
        EncounterRecord {
            encounter_id: id.to_owned(),
            organization_id: "org_1".to_owned(),
            encounter_type: None,
            status: None,
            created_at,
            updated_at: created_at,
            date_of_service: None,
            patient,
            documents: docs,
            content_hash: hash.to_owned(),
            // Another hash is another record: change detection also compares the JSON.
            raw_json: format!(r#"{{"hash":"{hash}"}}"#),
        }
    }

    /// Runs `f` in a transaction of its own and commits it, as a write group would.
    pub(in crate::store::postgres) fn save<T>(
        client: &mut Client,
        f: impl FnOnce(&mut Transaction<'_>) -> anyhow::Result<T>,
    ) -> T {
        let mut tx = client.transaction().unwrap();
        let out = f(&mut tx).unwrap();
        tx.commit().unwrap();
        out
    }

    /// Writes `docs` as the documents of encounter `enc_1`, as a page would.
    fn page(client: &mut Client, hash: &str, docs: Vec<DocumentRecord>) {
        let now = OffsetDateTime::now_utc();
        let record = encounter("enc_1", now, hash, None, docs);
        save(client, |tx| upsert::commit_page(tx, &[record], &[], None, now));
    }

    fn states(client: &mut Client, id: &str) -> (String, Option<String>) {
        let row = client
            .query_one(
                "SELECT detail_state, transcript_state FROM documents WHERE document_id = $1",
                &[&id],
            )
            .unwrap();
        (row.try_get(0).unwrap(), row.try_get(1).unwrap())
    }

    /// Everything organization `org_1` may claim at `now` in run 1, up to 100 items.
    fn claimable_at(client: &mut Client, now: OffsetDateTime) -> Vec<WorkItem> {
        claim_work(client, Some("org_1"), 1, &[], &HashSet::new(), 100, now).unwrap()
    }

    fn claimable(client: &mut Client) -> Vec<WorkItem> {
        claimable_at(client, OffsetDateTime::now_utc())
    }

    pub(in crate::store::postgres) fn claim(client: &mut Client, work: Work, id: &str) -> Option<WorkItem> {
        claimable(client)
            .into_iter()
            .find(|i| i.work == work && i.document_id == id)
    }

    pub(in crate::store::postgres) use crate::store::records::sample_transcript as transcript;

    /// What the planner believes `table` holds (-1: never analyzed).
    fn planner_rows(client: &mut Client, table: &str) -> f32 {
        client
            .query_one(
                "SELECT reltuples FROM pg_class WHERE oid = $1::text::regclass",
                &[&table],
            )
            .unwrap()
            .try_get(0)
            .unwrap()
    }

    #[test]
    fn a_claim_after_a_bulk_load_analyzes_the_tables_it_joins_and_only_then() {
        let Some((_db, mut client)) = warehouse("content_statistics") else {
            return;
        };
        let c = &mut client;
        let now = OffsetDateTime::now_utc();
        let records: Vec<EncounterRecord> = (0..1500)
            .map(|n| {
                encounter(
                    &format!("enc_{n:04}"),
                    now,
                    "v1",
                    None,
                    vec![doc(&format!("doc_{n:04}"), "document", None)],
                )
            })
            .collect();
        save(c, |tx| upsert::commit_page(tx, &records, &[], None, now));
        // The server counts the page's rows as changed since the (never taken) statistics once
        // this session reports them; a session reports when idle, at most once a second.
        c.batch_execute("SELECT pg_stat_force_next_flush()").unwrap();
        assert_eq!(planner_rows(c, "documents"), -1.0);
        // A list-only cycle's claim (every kind skipped) neither claims nor analyzes.
        let none = claim_work(c, Some("org_1"), 1, &Work::ALL, &HashSet::new(), 100, now).unwrap();
        assert!(none.is_empty());
        assert_eq!(planner_rows(c, "documents"), -1.0);
        assert_eq!(claimable(c).len(), 100);
        assert_eq!(planner_rows(c, "documents"), 1500.0);
        assert_eq!(planner_rows(c, "encounters"), 1500.0);
        // Fresh statistics are not taken again: a few changes do not reach the threshold.
        save(c, |tx| {
            tx.execute(
                "UPDATE documents SET title = 'x' WHERE document_id < 'doc_0010'",
                &[],
            )?;
            Ok(())
        });
        c.batch_execute("SELECT pg_stat_force_next_flush()").unwrap();
        let analyzed = |c: &mut Client| -> i64 {
            c.query_one(
                "SELECT analyze_count FROM pg_stat_user_tables WHERE relid = 'documents'::regclass",
                &[],
            )
            .unwrap()
            .try_get(0)
            .unwrap()
        };
        let before = analyzed(c);
        assert_eq!(claimable(c).len(), 100);
        assert_eq!(analyzed(c), before);
    }

    #[test]
    fn the_summary_decides_ambient_work_and_a_changed_encounter_asks_notes_and_finished_transcripts_again() {
        let Some((_db, mut client)) = warehouse("content_summary") else {
            return;
        };
        let c = &mut client;
        let first = || {
            vec![
                doc("doc_final", "ambient_transcript", Some("completed")),
                doc("doc_live", "ambient_transcript", Some("processing")),
                doc("doc_note", "document", None),
                doc("doc_form", "intake_form", None),
            ]
        };
        page(c, "h1", first());
        let pending = || (String::from("pending"), None);
        assert_eq!(states(c, "doc_final"), ("skipped".into(), Some("pending".into())));
        assert_eq!(states(c, "doc_live"), ("skipped".into(), Some("waiting".into())));
        assert_eq!(states(c, "doc_note"), pending());
        assert_eq!(states(c, "doc_form"), pending());
        for (id, state) in [
            ("doc_final", "transcript_state = 'done'"),
            ("doc_note", "detail_state = 'done'"),
            ("doc_form", "detail_state = 'unsupported'"),
        ] {
            c.execute(
                &format!("UPDATE documents SET {state} WHERE document_id = $1"),
                &[&id],
            )
            .unwrap();
        }
        // Listed again unchanged: nothing is written, nothing queued.
        page(c, "h1", first());
        assert_eq!(states(c, "doc_final").1.as_deref(), Some("done"));
        assert_eq!(states(c, "doc_note").0, "done");

        // The encounter changed elsewhere (say, a patient field): the note and the finished
        // transcript are asked again; the unfinished one and the unsupported type are not.
        page(c, "h2", first());
        assert_eq!(states(c, "doc_final"), ("skipped".into(), Some("pending".into())));
        assert_eq!(states(c, "doc_live"), ("skipped".into(), Some("waiting".into())));
        assert_eq!(states(c, "doc_note"), pending());
        assert_eq!(states(c, "doc_form").0, "unsupported");

        // The unfinished transcript finishes: queued from its summary, without a detail.
        let mut finished = first();
        finished[1].status = Some("completed".to_owned());
        page(c, "h3", finished);
        assert_eq!(states(c, "doc_live"), ("skipped".into(), Some("pending".into())));
        let documents: Vec<String> = claimable(c)
            .into_iter()
            .filter(|i| i.work == Work::Document)
            .map(|i| i.document_id)
            .collect();
        assert_eq!(documents, ["doc_note"], "no ambient detail is ever queued");
    }

    /// Each turn's row version (`xmin`) and place (`ctid`): a rewrite changes both.
    fn turn_versions(client: &mut Client) -> Vec<String> {
        client
            .query(
                "SELECT xmin::text || ctid::text FROM transcript_turns ORDER BY document_id, turn_index",
                &[],
            )
            .unwrap()
            .iter()
            .map(|r| r.try_get(0).unwrap())
            .collect()
    }

    #[test]
    fn a_transcript_fetched_again_unchanged_is_not_rewritten_and_a_changed_one_is() {
        let Some((_db, mut client)) = warehouse("content_transcript_digest") else {
            return;
        };
        let c = &mut client;
        page(
            c,
            "h1",
            vec![doc("doc_a", "ambient_transcript", Some("completed"))],
        );
        let item = claim(c, Work::Transcript, "doc_a").unwrap();
        let first = transcript("A headache.");
        save(c, |tx| {
            save_transcript(tx, &item, &first, OffsetDateTime::now_utc())
        });
        let written = turn_versions(c);
        assert_eq!(written.len(), 2);
        assert_eq!(states(c, "doc_a").1.as_deref(), Some("done"));

        assert_eq!(transcript("A headache.").content_sha256, first.content_sha256);
        save(c, |tx| {
            save_transcript(tx, &item, &transcript("A headache."), OffsetDateTime::now_utc())
        });
        assert_eq!(turn_versions(c), written, "identical: not rewritten");

        let changed = transcript("A headache since Tuesday.");
        assert_ne!(changed.content_sha256, first.content_sha256);
        save(c, |tx| {
            save_transcript(tx, &item, &changed, OffsetDateTime::now_utc())
        });
        let rewritten = turn_versions(c);
        assert_eq!(rewritten.len(), 2);
        assert!(
            rewritten.iter().all(|v| !written.contains(v)),
            "changed: rewritten"
        );
        let row = c
            .query_one(
                "SELECT (SELECT text FROM transcript_turns WHERE document_id = 'doc_a' AND turn_index = 1),
                        content_sha256, turn_count, encounter_id, organization_id
                 FROM transcripts WHERE document_id = 'doc_a'",
                &[],
            )
            .unwrap();
        assert_eq!(row.try_get::<_, String>(0).unwrap(), "A headache since Tuesday.");
        assert_eq!(row.try_get::<_, String>(1).unwrap(), changed.content_sha256);
        assert_eq!(row.try_get::<_, i64>(2).unwrap(), 2);
        assert_eq!(row.try_get::<_, String>(3).unwrap(), "enc_1");
        assert_eq!(
            row.try_get::<_, Option<String>>(4).unwrap().as_deref(),
            Some("org_1")
        );
        // The turns are searchable as soon as they are stored.
        let found: i64 = c
            .query_one(
                "SELECT count(*) FROM transcript_turns WHERE text_tsv @@ to_tsquery('simple', 'tuesday')",
                &[],
            )
            .unwrap()
            .try_get(0)
            .unwrap();
        assert_eq!(found, 1);
    }

    #[test]
    fn work_fetched_before_a_change_was_observed_is_saved_but_stays_queued() {
        let Some((_db, mut client)) = warehouse("content_in_flight") else {
            return;
        };
        let c = &mut client;
        let docs = || {
            vec![
                doc("doc_a", "ambient_transcript", Some("completed")),
                doc("doc_n", "document", None),
            ]
        };
        page(c, "h1", docs());
        let transcript_item = claim(c, Work::Transcript, "doc_a").unwrap();
        let note_item = claim(c, Work::Document, "doc_n").unwrap();
        // While both requests are under way, paging sees the encounter change.
        page(c, "h2", docs());
        let now = OffsetDateTime::now_utc();
        save(c, |tx| {
            save_transcript(tx, &transcript_item, &transcript("Old."), now)
        });
        let note = DetailOutcome::Note {
            format: "markdown".to_owned(),
            text: Some("Old note.".to_owned()),
            created_at: now,
            updated_at: now,
        };
        save(c, |tx| save_detail(tx, &note_item, &note, false, now));
        assert_eq!(
            states(c, "doc_a").1.as_deref(),
            Some("pending"),
            "the transcript may predate the change"
        );
        assert_eq!(states(c, "doc_n").0, "pending", "the note may predate the change");
        let text: Option<String> = c
            .query_one(
                "SELECT content_text FROM documents WHERE document_id = 'doc_n'",
                &[],
            )
            .unwrap()
            .try_get(0)
            .unwrap();
        assert_eq!(text.as_deref(), Some("Old note."), "saved all the same");

        // Claimed again, after the change: done.
        let transcript_item = claim(c, Work::Transcript, "doc_a").unwrap();
        let note_item = claim(c, Work::Document, "doc_n").unwrap();
        save(c, |tx| {
            save_transcript(tx, &transcript_item, &transcript("New."), now)
        });
        save(c, |tx| save_detail(tx, &note_item, &note, false, now));
        assert_eq!(states(c, "doc_a").1.as_deref(), Some("done"));
        assert_eq!(states(c, "doc_n").0, "done");
    }

    #[test]
    fn an_ambient_detail_asks_the_transcript_again_only_when_it_was_fetched_for_another_updated_at() {
        let Some((_db, mut client)) = warehouse("content_ambient_detail") else {
            return;
        };
        let c = &mut client;
        page(
            c,
            "h1",
            vec![doc("doc_a", "ambient_transcript", Some("completed"))],
        );
        // A detail queued by an earlier version, with an instant finer than PostgreSQL keeps.
        c.batch_execute("UPDATE documents SET detail_state = 'pending'")
            .unwrap();
        let updated_at = time::macros::datetime!(2026-05-25 15:00:00.123456789 UTC);
        let ambient = |status: &str, updated_at| DetailOutcome::Ambient {
            status: Some(status.to_owned()),
            audio_duration_seconds: Some(61.5),
            created_at: updated_at,
            updated_at,
        };
        let detail = claim(c, Work::Document, "doc_a").unwrap();
        let now = OffsetDateTime::now_utc();
        save(c, |tx| {
            save_detail(tx, &detail, &ambient("completed", updated_at), true, now)
        });
        assert_eq!(states(c, "doc_a"), ("done".into(), Some("pending".into())));
        // The transcript is fetched for the detail it was claimed after, and recorded so.
        let item = claim(c, Work::Transcript, "doc_a").unwrap();
        assert_eq!(
            item.detail_updated_at.as_deref(),
            Some("2026-05-25T15:00:00.123456000Z")
        );
        save(c, |tx| save_transcript(tx, &item, &transcript("Hello."), now));
        assert_eq!(states(c, "doc_a").1.as_deref(), Some("done"));

        // The same detail again: the transcript is current, and the recording was queued.
        c.batch_execute("UPDATE documents SET detail_state = 'pending'")
            .unwrap();
        let detail = claim(c, Work::Document, "doc_a").unwrap();
        save(c, |tx| {
            save_detail(tx, &detail, &ambient("completed", updated_at), true, now)
        });
        let row = c
            .query_one(
                "SELECT transcript_state, audio_state, audio_duration_seconds FROM documents",
                &[],
            )
            .unwrap();
        assert_eq!(
            row.try_get::<_, Option<String>>(0).unwrap().as_deref(),
            Some("done")
        );
        assert_eq!(
            row.try_get::<_, Option<String>>(1).unwrap().as_deref(),
            Some("pending")
        );
        assert_eq!(row.try_get::<_, Option<f64>>(2).unwrap(), Some(61.5));

        // A detail with another updated_at: the transcript is asked again, and a fetch that
        // was in flight before it no longer counts as current.
        c.batch_execute("UPDATE documents SET detail_state = 'pending'")
            .unwrap();
        let detail = claim(c, Work::Document, "doc_a").unwrap();
        let in_flight = WorkItem {
            work: Work::Transcript,
            ..detail.clone()
        };
        let later = updated_at + time::Duration::seconds(1);
        save(c, |tx| {
            save_detail(tx, &detail, &ambient("completed", later), true, now)
        });
        assert_eq!(states(c, "doc_a").1.as_deref(), Some("pending"));
        save(c, |tx| {
            save_transcript(tx, &in_flight, &transcript("Hello."), now)
        });
        assert_eq!(states(c, "doc_a").1.as_deref(), Some("pending"));

        // Not finished (any more): it waits.
        c.batch_execute("UPDATE documents SET detail_state = 'pending'")
            .unwrap();
        let detail = claim(c, Work::Document, "doc_a").unwrap();
        save(c, |tx| {
            save_detail(tx, &detail, &ambient("processing", later), true, now)
        });
        assert_eq!(states(c, "doc_a"), ("done".into(), Some("waiting".into())));
    }

    #[test]
    fn claims_leave_out_busy_items_skipped_routes_other_organizations_and_this_runs_dead_letters() {
        let Some((_db, mut client)) = warehouse("content_claims") else {
            return;
        };
        let c = &mut client;
        let now = OffsetDateTime::now_utc();
        page(
            c,
            "h",
            vec![
                doc("doc_a", "document", None),
                doc("doc_b", "document", None),
                doc("doc_t", "ambient_transcript", Some("completed")),
            ],
        );
        let mut claim_ids =
            |org: Option<&str>, run: i64, skip: &[Work], exclude: &HashSet<(Work, String)>, limit| {
                let mut ids: Vec<String> = claim_work(c, org, run, skip, exclude, limit, now)
                    .unwrap()
                    .into_iter()
                    .map(|i| i.document_id)
                    .collect();
                ids.sort();
                ids
            };
        let none = HashSet::new();
        assert_eq!(
            claim_ids(Some("org_1"), 1, &[], &none, 10),
            ["doc_a", "doc_b", "doc_t"]
        );
        assert_eq!(claim_ids(Some("org_1"), 1, &[], &none, 2).len(), 2);
        assert!(
            claim_ids(None, 1, &[], &none, 10).is_empty(),
            "organization not known yet"
        );
        assert!(claim_ids(Some("org_2"), 1, &[], &none, 10).is_empty());
        let busy = HashSet::from([(Work::Document, "doc_a".to_owned())]);
        assert_eq!(claim_ids(Some("org_1"), 1, &[], &busy, 10), ["doc_b", "doc_t"]);
        // Skipping is applied before the limit: the one transcript comes back, not nothing.
        assert_eq!(
            claim_ids(Some("org_1"), 1, &[Work::Document], &none, 1),
            ["doc_t"]
        );

        // A dead letter keeps its item out for the rest of its run, and counts the cycles;
        // failing again 30 minutes after the first, it waits 15 minutes.
        let item = claim(c, Work::Document, "doc_b").unwrap();
        for (run, at) in [(1, now - time::Duration::minutes(30)), (2, now)] {
            save(c, |tx| {
                dead_letter(tx, "default", &item, run, Some("server_error"), "HTTP 500", at)
            });
        }
        let mut claim_ids = |run: i64, at: OffsetDateTime| -> Vec<String> {
            let mut ids: Vec<String> = claim_work(c, Some("org_1"), run, &[], &none, 10, at)
                .unwrap()
                .into_iter()
                .map(|i| i.document_id)
                .collect();
            ids.sort();
            ids
        };
        assert_eq!(claim_ids(2, now), ["doc_a", "doc_t"]);
        assert_eq!(claim_ids(3, now), ["doc_a", "doc_t"]);
        assert_eq!(
            claim_ids(3, now + time::Duration::minutes(15) - time::Duration::seconds(1)),
            ["doc_a", "doc_t"]
        );
        assert_eq!(
            claim_ids(3, now + time::Duration::minutes(15) + time::Duration::seconds(1)),
            ["doc_a", "doc_b", "doc_t"]
        );
        let row = c
            .query_one(
                "SELECT attempts, last_run_id, reason_code, organization FROM dead_letters",
                &[],
            )
            .unwrap();
        assert_eq!(row.try_get::<_, i64>(0).unwrap(), 2);
        assert_eq!(row.try_get::<_, i64>(1).unwrap(), 2);
        assert_eq!(
            row.try_get::<_, Option<String>>(2).unwrap().as_deref(),
            Some("server_error")
        );
        assert_eq!(row.try_get::<_, String>(3).unwrap(), "default");
        // Settled at last: the dead letter goes.
        save(c, |tx| {
            save_detail(tx, &item, &DetailOutcome::Unsupported, false, now)
        });
        let left: i64 = c
            .query_one("SELECT count(*) FROM dead_letters", &[])
            .unwrap()
            .try_get(0)
            .unwrap();
        assert_eq!(left, 0);
        assert_eq!(states(c, "doc_b").0, "unsupported");
    }

    #[test]
    fn a_transcript_not_ready_is_asked_again_on_schedule_then_only_after_a_change() {
        let Some((_db, mut client)) = warehouse("content_not_ready") else {
            return;
        };
        let c = &mut client;
        page(
            c,
            "h1",
            vec![doc("doc_a", "ambient_transcript", Some("completed"))],
        );
        let schedule = [Duration::from_secs(60)];
        let now = OffsetDateTime::now_utc();
        let item = claim(c, Work::Transcript, "doc_a").unwrap();
        save(c, |tx| not_ready(tx, &item, &schedule, now));
        let due = |c: &mut Client, at| claimable_at(c, at).iter().any(|i| i.document_id == "doc_a");
        assert!(!due(c, now + time::Duration::seconds(59)));
        assert!(due(c, now + time::Duration::seconds(60)));
        // The schedule is exhausted: only a change of the document asks it again.
        save(c, |tx| not_ready(tx, &item, &schedule, now));
        assert!(!due(c, now + time::Duration::days(365)));
        let row = c
            .query_one(
                "SELECT transcript_state, transcript_attempts, transcript_next_at_ns FROM documents",
                &[],
            )
            .unwrap();
        assert_eq!(
            row.try_get::<_, Option<String>>(0).unwrap().as_deref(),
            Some("not_ready")
        );
        assert_eq!(row.try_get::<_, i64>(1).unwrap(), 2);
        assert_eq!(row.try_get::<_, Option<i64>>(2).unwrap(), None);
        page(
            c,
            "h2",
            vec![doc("doc_a", "ambient_transcript", Some("completed"))],
        );
        assert!(due(c, now));
        // The route then says it is gone for good.
        let item = claim(c, Work::Transcript, "doc_a").unwrap();
        save(c, |tx| mark_unavailable(tx, &item));
        assert_eq!(states(c, "doc_a").1.as_deref(), Some("unavailable"));
        assert!(claimable(c).is_empty());
    }

    #[test]
    fn recordings_are_queued_for_finished_ambient_documents_without_one_and_settled_once_saved() {
        let Some((_db, mut client)) = warehouse("content_recordings") else {
            return;
        };
        let c = &mut client;
        page(
            c,
            "h1",
            vec![
                doc("doc_a", "ambient_transcript", Some("completed")),
                doc("doc_b", "ambient_transcript", Some("completed")),
                doc("doc_live", "ambient_transcript", Some("processing")),
                doc("doc_n", "document", None),
            ],
        );
        assert_eq!(queue_missing_audio(c, Some("org_2")).unwrap(), 0);
        assert_eq!(queue_missing_audio(c, Some("org_1")).unwrap(), 2);
        assert_eq!(
            queue_missing_audio(c, Some("org_1")).unwrap(),
            0,
            "already queued"
        );
        let now = OffsetDateTime::now_utc();
        let a = claim(c, Work::Audio, "doc_a").unwrap();
        save(c, |tx| dead_letter(tx, "default", &a, 1, None, "timed out", now));
        let recording = RecordingRecord {
            path: "ab12.m4a".to_owned(),
            size_bytes: 4096,
            sha256: "ab12".to_owned(),
            duration_seconds: Some(61.5),
        };
        save(c, |tx| {
            save_recording(tx, &a.encounter_id, &a.document_id, &recording, now)
        });
        let b = claim(c, Work::Audio, "doc_b").unwrap();
        save(c, |tx| mark_unavailable(tx, &b));
        let audio: Vec<(String, Option<String>)> = c
            .query(
                "SELECT document_id, audio_state FROM documents ORDER BY document_id",
                &[],
            )
            .unwrap()
            .iter()
            .map(|r| (r.try_get(0).unwrap(), r.try_get(1).unwrap()))
            .collect();
        let expect = |id: &str, state: Option<&str>| (id.to_owned(), state.map(str::to_owned));
        assert_eq!(
            audio,
            [
                expect("doc_a", Some("done")),
                expect("doc_b", Some("unavailable")),
                expect("doc_live", None),
                expect("doc_n", None),
            ]
        );
        let row = c
            .query_one(
                "SELECT path, size_bytes, organization_id, (SELECT count(*) FROM dead_letters) FROM recordings",
                &[],
            )
            .unwrap();
        assert_eq!(row.try_get::<_, String>(0).unwrap(), "ab12.m4a");
        assert_eq!(row.try_get::<_, i64>(1).unwrap(), 4096);
        assert_eq!(
            row.try_get::<_, Option<String>>(2).unwrap().as_deref(),
            Some("org_1")
        );
        assert_eq!(row.try_get::<_, i64>(3).unwrap(), 0, "the dead letter is settled");
        // The file's row goes (a purge): queued again.
        c.batch_execute("DELETE FROM recordings").unwrap();
        assert_eq!(queue_missing_audio(c, Some("org_1")).unwrap(), 1);
    }

    /// How a column is read on both backends to compare it: as text, as a number, as an instant
    /// (to PostgreSQL's microseconds; SQLite keeps nanoseconds) or as JSON (PostgreSQL's edits
    /// normalize it through `jsonb`, SQLite's minify it).
    #[derive(Clone, Copy)]
    enum Kind {
        Text,
        Real,
        Time,
        Json,
    }

    /// A column's name and how it is compared.
    type Column<'a> = (&'a str, Kind);

    #[derive(Debug, PartialEq)]
    enum Cell {
        Null,
        Text(String),
        Real(f64),
        Json(serde_json::Value),
    }

    fn cell(kind: Kind, text: Option<String>) -> Cell {
        match (kind, text) {
            (_, None) => Cell::Null,
            (Kind::Real, Some(t)) => Cell::Real(t.parse().unwrap()),
            (Kind::Json, Some(t)) => Cell::Json(serde_json::from_str(&t).unwrap()),
            (Kind::Text | Kind::Time, Some(t)) => Cell::Text(t),
        }
    }

    /// The rows of `table` on both backends (the SQLite warehouse read on a connection of its
    /// own, as `status` reads it), `columns` read as their kinds say.
    fn both_rows(
        sqlite: &std::path::Path,
        pg: &mut Client,
        table: &str,
        order: &str,
        columns: &[Column],
    ) -> (Vec<Vec<Cell>>, Vec<Vec<Cell>>) {
        let list = |time: fn(&str) -> String, other: fn(&str) -> String| -> String {
            columns
                .iter()
                .map(|&(c, k)| match k {
                    Kind::Time => time(c),
                    _ => other(c),
                })
                .collect::<Vec<_>>()
                .join(", ")
        };
        let sql = format!(
            "SELECT {} FROM {table} ORDER BY {order}",
            list(
                |c| format!("substr({c}, 1, 26)"),
                |c| format!("CAST({c} AS TEXT)")
            )
        );
        let sqlite = crate::store::sqlite::open_reader(sqlite, Duration::from_secs(5)).unwrap();
        let mut stmt = sqlite.prepare(&sql).unwrap();
        let mut rows = stmt.query([]).unwrap();
        let mut from_sqlite = Vec::new();
        while let Some(row) = rows.next().unwrap() {
            from_sqlite.push(
                columns
                    .iter()
                    .enumerate()
                    .map(|(i, &(_, k))| cell(k, row.get(i).unwrap()))
                    .collect(),
            );
        }
        let sql = format!(
            "SELECT {} FROM {table} ORDER BY {order}",
            list(
                |c| format!("to_char({c} AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US')"),
                |c| format!("{c}::text")
            )
        );
        let from_pg = pg
            .query(&sql, &[])
            .unwrap()
            .iter()
            .map(|row| {
                columns
                    .iter()
                    .enumerate()
                    .map(|(i, &(_, k))| cell(k, row.try_get(i).unwrap()))
                    .collect()
            })
            .collect();
        (from_sqlite, from_pg)
    }

    /// Every table the queue and the privacy policy write, compared between the backends.
    fn assert_same_rows(sqlite: &std::path::Path, pg: &mut Client, after: &str) {
        use Kind::{Json, Real, Text, Time};
        let tables: [(&str, &str, &[Column]); 6] = [
            (
                "documents",
                "document_id",
                &[
                    ("document_id", Text),
                    ("status", Text),
                    ("audio_duration_seconds", Real),
                    ("content_format", Text),
                    ("content_text", Text),
                    ("detail_created_at", Time),
                    ("detail_updated_at", Time),
                    ("changed_at", Time),
                    ("detail_state", Text),
                    ("detail_attempts", Text),
                    ("detail_next_at_ns", Text),
                    ("transcript_state", Text),
                    ("transcript_attempts", Text),
                    ("transcript_next_at_ns", Text),
                    ("audio_state", Text),
                    ("audio_attempts", Text),
                    ("audio_next_at_ns", Text),
                    ("content_seq", Text),
                ],
            ),
            (
                "transcripts",
                "document_id",
                &[
                    ("document_id", Text),
                    ("encounter_id", Text),
                    ("provider", Text),
                    ("audio_duration_seconds", Real),
                    ("turn_count", Text),
                    ("fetched_at", Time),
                    ("fetched_for_updated_at", Time),
                    ("content_sha256", Text),
                    ("organization_id", Text),
                ],
            ),
            (
                "transcript_turns",
                "document_id, turn_index",
                &[
                    ("document_id", Text),
                    ("turn_index", Text),
                    ("speaker", Text),
                    ("start_seconds", Real),
                    ("end_seconds", Real),
                    ("text", Text),
                    ("organization_id", Text),
                ],
            ),
            (
                "recordings",
                "document_id",
                &[
                    ("document_id", Text),
                    ("encounter_id", Text),
                    ("path", Text),
                    ("size_bytes", Text),
                    ("sha256", Text),
                    ("duration_seconds", Real),
                    ("fetched_at", Time),
                    ("organization_id", Text),
                ],
            ),
            (
                "dead_letters",
                "work, document_id",
                &[
                    ("work", Text),
                    ("document_id", Text),
                    ("encounter_id", Text),
                    ("attempts", Text),
                    ("first_failed_at", Time),
                    ("last_failed_at", Time),
                    ("last_run_id", Text),
                    ("reason_code", Text),
                    ("last_error", Text),
                    ("organization", Text),
                    ("next_attempt_at_ns", Text),
                ],
            ),
            (
                "encounters e JOIN patients p USING (patient_id)",
                "encounter_id",
                &[
                    ("encounter_id", Text),
                    ("raw_json", Json),
                    ("first_name", Text),
                    ("last_name", Text),
                    ("date_of_birth", Text),
                ],
            ),
        ];
        for (table, order, columns) in tables {
            let (sqlite, postgres) = both_rows(sqlite, pg, table, order, columns);
            assert_eq!(postgres, sqlite, "{table} after {after}");
        }
    }

    /// The claims of run `run_id` at `now`, in a stable order.
    fn sorted_claims(b: &dyn crate::store::Backend, run_id: i64, now: OffsetDateTime) -> Vec<WorkItem> {
        let mut items = b
            .claim_work(Some("org_1"), run_id, &[], &HashSet::new(), 100, now)
            .unwrap();
        items.sort_by(|a, b| (a.work.as_str(), &a.document_id).cmp(&(b.work.as_str(), &b.document_id)));
        items
    }

    /// One step of the queue's life, through the seam as the content workers call it.
    fn step(
        b: &mut dyn crate::store::Backend,
        f: &mut dyn FnMut(&dyn crate::store::WriteTx) -> anyhow::Result<()>,
    ) {
        let end = b.write_group(&mut |tx| {
            f(tx).unwrap();
            true
        });
        assert!(matches!(end, crate::store::GroupEnd::Committed), "{end:?}");
    }

    #[test]
    fn the_queue_and_the_privacy_policy_store_what_the_sqlite_backend_stores() {
        use crate::config::{BirthDate, PrivacyConfig};
        use crate::store::Backend;

        let Some((_db, client)) = warehouse("content_same_as_sqlite") else {
            return;
        };
        let mut pg = super::super::PgBackend {
            client: std::cell::RefCell::new(client),
            location: "test".to_owned(),
            reconnect: None,
        };
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.db");
        let mut sqlite = crate::store::sqlite::open_writer(&path, Duration::from_secs(5)).unwrap();
        let t0 = time::macros::datetime!(2026-05-25 14:00:00.123456 UTC);
        let patient = || PatientRecord {
            patient_id: "pat_1".to_owned(),
            first_name: Some("Ada".to_owned()),
            last_name: Some("Lovelace".to_owned()),
            date_of_birth: Some("1970-01-02".to_owned()),
        };
        let page = |hash: &str, live_status: &str| {
            let mut record = encounter(
                "enc_1",
                t0,
                hash,
                Some(patient()),
                vec![
                    doc("doc_n", "document", None),
                    doc("doc_t", "ambient_transcript", Some("completed")),
                    doc("doc_f", "intake_form", None),
                    doc("doc_l", "ambient_transcript", Some(live_status)),
                ],
            );
            record.raw_json = format!(
                r#"{{"id":"enc_1","hash":"{hash}","patient":{{"id":"pat_1","first_name":"Ada","last_name":"Lovelace","date_of_birth":"1970-01-02"}}}}"#
            );
            record
        };
        let backends: [&mut dyn Backend; 2] = [&mut sqlite, &mut pg];
        let mut claims: Vec<Vec<Vec<WorkItem>>> = Vec::new();
        for b in backends {
            let mut seen = Vec::new();
            let at = |s: i64| t0 + time::Duration::seconds(s);
            step(b, &mut |tx| {
                tx.commit_page(&[page("h1", "processing")], &[], None, at(1))
                    .map(drop)
            });
            let first = sorted_claims(b, 1, at(2));
            seen.push(first.clone());
            let [form, note, transcript_item] = [&first[0], &first[1], &first[2]].map(Clone::clone);
            assert_eq!(
                [
                    form.document_id.as_str(),
                    &note.document_id,
                    &transcript_item.document_id
                ],
                ["doc_f", "doc_n", "doc_t"]
            );
            step(b, &mut |tx| {
                tx.save_detail(&form, &DetailOutcome::Unsupported, true, at(3))?;
                let text = DetailOutcome::Note {
                    format: "markdown".to_owned(),
                    text: Some("Headache.".to_owned()),
                    created_at: at(-60),
                    updated_at: at(-30),
                };
                tx.save_detail(&note, &text, true, at(3))?;
                tx.save_transcript(&transcript_item, &transcript("A headache."), at(3))
            });
            // The encounter changes, the live recording finishes; the note fails this run.
            step(b, &mut |tx| {
                tx.commit_page(&[page("h2", "completed")], &[], None, at(4))
                    .map(drop)
            });
            let second = sorted_claims(b, 1, at(5));
            seen.push(second.clone());
            step(b, &mut |tx| {
                for item in &second {
                    match (item.work, item.document_id.as_str()) {
                        (Work::Document, _) => {
                            tx.dead_letter("default", item, 1, Some("server_error"), "HTTP 500", at(6))?
                        }
                        (Work::Transcript, "doc_l") => {
                            tx.not_ready(item, &[Duration::from_secs(60)], at(6))?
                        }
                        (Work::Transcript, _) => {
                            tx.save_transcript(item, &transcript("A headache."), at(6))?
                        }
                        (Work::Audio, _) => unreachable!("audio is not queued yet"),
                    }
                }
                Ok(())
            });
            assert_eq!(b.queue_missing_audio(Some("org_1")).unwrap(), 2);
            let third = sorted_claims(b, 1, at(70));
            seen.push(third.clone());
            step(b, &mut |tx| {
                for item in &third {
                    match (item.work, item.document_id.as_str()) {
                        (Work::Audio, "doc_t") => {
                            let r = RecordingRecord {
                                path: "ab.m4a".to_owned(),
                                size_bytes: 10,
                                sha256: "ab".to_owned(),
                                duration_seconds: Some(61.5),
                            };
                            tx.save_recording(&item.encounter_id, &item.document_id, &r, at(71))?
                        }
                        // The other recording is not stored yet.
                        (Work::Audio, _) => tx.not_ready(item, &[Duration::from_secs(60)], at(71))?,
                        _ => tx.mark_unavailable(item)?,
                    }
                }
                Ok(())
            });
            // The dead-lettered note, asked again the next run, is not found while its
            // encounter is listed, nor is the recording: each asked once more on the
            // schedule, then unavailable.
            let schedule = [Duration::from_secs(60)];
            for (claimed, answered, expected) in [
                (80, 81, vec![(Work::Document, "doc_n")]),
                (141, 142, vec![(Work::Audio, "doc_l"), (Work::Document, "doc_n")]),
            ] {
                let due = sorted_claims(b, 2, at(claimed));
                seen.push(due.clone());
                let due: Vec<WorkItem> = due
                    .into_iter()
                    .filter(|i| matches!(i.work, Work::Document | Work::Audio))
                    .collect();
                let kinds: Vec<(Work, &str)> = due.iter().map(|i| (i.work, i.document_id.as_str())).collect();
                assert_eq!(kinds, expected);
                step(b, &mut |tx| {
                    due.iter()
                        .try_for_each(|item| tx.not_ready(item, &schedule, at(answered)))
                });
            }
            let left = sorted_claims(b, 2, at(100_000));
            seen.push(left.clone());
            // What is left fails two cycles 30 minutes apart: then it waits 15 minutes.
            for (run, failed) in [(2, at(100_001 - 1_800)), (3, at(100_001))] {
                step(b, &mut |tx| {
                    left.iter().try_for_each(|item| {
                        tx.dead_letter("default", item, run, Some("server_error"), "HTTP 500", failed)
                    })
                });
            }
            assert!(sorted_claims(b, 4, at(100_002)).is_empty());
            seen.push(sorted_claims(b, 4, at(100_002 + 15 * 60)));
            claims.push(seen);
        }
        assert_eq!(claims[0], claims[1], "claims");
        assert!(
            claims[0]
                .last()
                .unwrap()
                .iter()
                .all(|i| i.work == Work::Transcript)
        );
        // Both schedules ran out: unavailable after two answers, nothing left to ask.
        for (prefix, document_id) in [("detail", "doc_n"), ("audio", "doc_l")] {
            let row = pg
                .client
                .get_mut()
                .query_one(
                    &format!(
                        "SELECT {prefix}_state, {prefix}_attempts, {prefix}_next_at_ns FROM documents
                         WHERE document_id = $1"
                    ),
                    &[&document_id],
                )
                .unwrap();
            let schedule: (String, i64, Option<i64>) = (
                row.try_get(0).unwrap(),
                row.try_get(1).unwrap(),
                row.try_get(2).unwrap(),
            );
            assert_eq!(schedule, ("unavailable".to_owned(), 2, None), "{document_id}");
        }
        assert_same_rows(&path, pg.client.get_mut(), "the queue's work");

        let strict = PrivacyConfig {
            patient_names: false,
            date_of_birth: BirthDate::YearOnly,
            note_text: false,
            transcript_text: false,
            retention: None,
        };
        assert!(sqlite.apply_privacy(&strict).unwrap());
        assert!(pg.apply_privacy(&strict).unwrap());
        assert_same_rows(&path, pg.client.get_mut(), "a privacy change");

        let audio = tempfile::tempdir().unwrap();
        std::fs::write(audio.path().join("ab.m4a"), b"abc").unwrap();
        let range = (t0, t0 + time::Duration::seconds(1));
        let purged_at = t0 + time::Duration::days(1);
        let from_sqlite = sqlite
            .purge(audio.path(), range.0, range.1, "retention", purged_at)
            .unwrap();
        let from_pg = pg
            .purge(audio.path(), range.0, range.1, "retention", purged_at)
            .unwrap();
        assert_eq!(from_pg, from_sqlite, "purge counts");
        assert_eq!(from_pg.orphaned_files, ["ab.m4a"]);
        assert!(!audio.path().join("ab.m4a").exists());
        assert_eq!(pg.purged_ranges().unwrap(), sqlite.purged_ranges().unwrap());
        assert_eq!(
            pg.last_retention_purge().unwrap(),
            sqlite.last_retention_purge().unwrap()
        );
        assert_same_rows(&path, pg.client.get_mut(), "a purge");
    }
}
