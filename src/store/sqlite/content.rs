//! The content work queue, kept in the database so it survives crashes and costs no memory
//! whatever the backlog: which documents need their detail, transcript or recording fetched,
//! saving what was fetched, and the dead letters of work that exhausted its retries.

use std::collections::HashSet;

use rusqlite::{Connection, OptionalExtension, params};
use time::OffsetDateTime;

use crate::store::{
    DetailOutcome, NotReady, RecordingRecord, TranscriptRecord, Work, WorkItem, dead_letter_retry_at,
};
use crate::timefmt::{format_stored, parse_rfc3339, unix_nanos};

/// [`claim_work`]'s query: `?1` the run, `?2` now (nanoseconds), `?3` how many, `?4` the
/// organization, `?5`–`?7` whether notes, transcripts and recordings are skipped. Each arm is
/// in the form its partial index answers (an OR of two states is not;
/// `claims_read_each_kind_of_work_through_its_partial_index`), and a skipped kind's arm reads
/// nothing: its items (notes stay queued while details are off) must not fill the claim.
const CLAIM_SQL: &str =
    "SELECT w.work, d.encounter_id, d.document_id, d.audio_duration_seconds, d.content_seq,
                d.detail_updated_at
         FROM (
             SELECT 'document' AS work, document_id FROM documents
              WHERE NOT ?5 AND detail_state IN ('pending', 'not_ready')
                AND (detail_state = 'pending' OR detail_next_at_ns <= ?2)
             UNION ALL
             SELECT 'transcript', document_id FROM documents
              WHERE NOT ?6 AND transcript_state IN ('pending', 'not_ready')
                AND (transcript_state = 'pending' OR transcript_next_at_ns <= ?2)
             UNION ALL
             SELECT 'audio', document_id FROM documents
              WHERE NOT ?7 AND audio_state IN ('pending', 'not_ready')
                AND (audio_state = 'pending' OR audio_next_at_ns <= ?2)
         ) w
         JOIN documents d ON d.document_id = w.document_id
         JOIN encounters e ON e.encounter_id = d.encounter_id
         WHERE d.removed_at IS NULL AND e.removed_at IS NULL AND e.organization_id = ?4
           AND NOT EXISTS (SELECT 1 FROM dead_letters x
                           WHERE x.work = w.work AND x.document_id = w.document_id
                             AND (x.last_run_id = ?1 OR x.next_attempt_at_ns > ?2))
         LIMIT ?3";

/// Up to `limit` items of `organization_id`'s documents due now (none while the organization is
/// not known yet), skipping kinds in `skip` (routes disabled this cycle), the
/// items in `exclude` (claimed earlier and still being worked on) and items that already failed
/// in this run. Documents of removed encounters are never worked on.
pub fn claim_work(
    conn: &Connection,
    organization_id: Option<&str>,
    run_id: i64,
    skip: &[Work],
    exclude: &HashSet<(Work, String)>,
    limit: usize,
    now: OffsetDateTime,
) -> anyhow::Result<Vec<WorkItem>> {
    let mut stmt = conn.prepare_cached(CLAIM_SQL)?;
    let rows = stmt.query_map(
        params![
            run_id,
            unix_nanos(now),
            (limit + exclude.len()) as i64,
            organization_id,
            skip.contains(&Work::Document),
            skip.contains(&Work::Transcript),
            skip.contains(&Work::Audio),
        ],
        |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get(1)?,
                r.get::<_, String>(2)?,
                r.get(3)?,
                r.get(4)?,
                r.get(5)?,
            ))
        },
    )?;
    let mut items = Vec::new();
    for row in rows {
        let (work, encounter_id, document_id, audio_duration_seconds, content_seq, detail_updated_at) = row?;
        let work = Work::from_stored(&work);
        if exclude.contains(&(work, document_id.clone())) {
            continue;
        }
        items.push(WorkItem {
            work,
            encounter_id,
            document_id,
            audio_duration_seconds,
            content_seq,
            detail_updated_at,
        });
        if items.len() == limit {
            break;
        }
    }
    Ok(items)
}

/// Queues a recording for every finished ambient document that has none (audio was just
/// enabled, or a recording was purged), among `organization_id`'s documents: `completed`, or
/// with a fetched transcript (final under another status word). Returns how many were queued.
pub fn queue_missing_audio(conn: &Connection, organization_id: Option<&str>) -> anyhow::Result<usize> {
    Ok(conn.execute(
        "UPDATE documents SET audio_state = 'pending'
         WHERE schema_type = 'ambient_transcript' AND removed_at IS NULL
           AND (status = 'completed'
                OR EXISTS (SELECT 1 FROM transcripts t WHERE t.document_id = documents.document_id))
           AND organization_id = ?1
           AND (audio_state IS NULL OR (audio_state = 'done'
                AND NOT EXISTS (SELECT 1 FROM recordings r WHERE r.document_id = documents.document_id)))",
        [organization_id],
    )?)
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
    tx: &Connection,
    item: &WorkItem,
    outcome: &DetailOutcome,
    audio: bool,
    now: OffsetDateTime,
) -> anyhow::Result<()> {
    let now_text = format_stored(now);
    let document_id = item.document_id.as_str();
    match outcome {
        DetailOutcome::Note {
            format,
            text,
            created_at,
            updated_at,
        } => {
            tx.execute(
                "UPDATE documents SET content_format = ?2, content_text = ?3, detail_created_at = ?4,
                     detail_updated_at = ?5, changed_at = ?6,
                     detail_state = CASE WHEN content_seq = ?7 THEN 'done' ELSE detail_state END,
                     detail_attempts = 0, detail_next_at_ns = NULL
                 WHERE document_id = ?1",
                params![
                    document_id,
                    format,
                    text,
                    format_stored(*created_at),
                    format_stored(*updated_at),
                    now_text,
                    item.content_seq
                ],
            )?;
        }
        DetailOutcome::Ambient {
            status,
            audio_duration_seconds,
            created_at,
            updated_at,
        } => {
            let updated = format_stored(*updated_at);
            let fetched_for: Option<Option<String>> = tx
                .query_row(
                    "SELECT fetched_for_updated_at FROM transcripts WHERE document_id = ?1",
                    [document_id],
                    |r| r.get(0),
                )
                .optional()?;
            // Equality, never order: `updated_at` is data, not a version, but any change of the
            // document changes it. A transcript fetched without a detail before it (NULL) is of
            // unknown age, so it is fetched again.
            let current = fetched_for.flatten().as_deref() == Some(updated.as_str());
            let final_ = crate::store::may_be_final(status.as_deref());
            let requeue = final_ && !current;
            // Re-queueing bumps `content_seq`, so that a transcript fetch already in flight (sent
            // before this detail was known) does not count as current.
            tx.execute(
                "UPDATE documents SET status = ?2, audio_duration_seconds = ?3, detail_created_at = ?4,
                     detail_updated_at = ?5, changed_at = ?6,
                     detail_state = CASE WHEN content_seq = ?9 THEN 'done' ELSE detail_state END,
                     detail_attempts = 0, detail_next_at_ns = NULL,
                     transcript_state = CASE WHEN NOT ?10 THEN 'waiting'
                                             WHEN ?7 THEN 'pending'
                                             WHEN coalesce(transcript_state, 'waiting') = 'waiting' THEN 'done'
                                             ELSE transcript_state END,
                     transcript_attempts = CASE WHEN ?7 THEN 0 ELSE transcript_attempts END,
                     transcript_next_at_ns = CASE WHEN ?7 THEN NULL ELSE transcript_next_at_ns END,
                     content_seq = content_seq + ?7,
                     audio_state = CASE WHEN ?8 AND ?2 = 'completed' AND coalesce(audio_state, '') <> 'done'
                                        THEN 'pending' ELSE audio_state END
                 WHERE document_id = ?1",
                params![
                    document_id,
                    status,
                    audio_duration_seconds,
                    format_stored(*created_at),
                    updated,
                    now_text,
                    requeue,
                    audio,
                    item.content_seq,
                    final_
                ],
            )?;
        }
        DetailOutcome::Unsupported => set_detail_outcome(tx, item, "unsupported")?,
        DetailOutcome::Unavailable => set_detail_outcome(tx, item, "unavailable")?,
    }
    clear_dead_letter(tx, Work::Document, document_id)?;
    Ok(())
}

/// A detail answered with an outcome instead of a document: recorded, unless the document
/// changed meanwhile (then it is asked again).
fn set_detail_outcome(conn: &Connection, item: &WorkItem, state: &str) -> rusqlite::Result<()> {
    conn.execute(
        "UPDATE documents SET detail_state = ?2, detail_attempts = 0, detail_next_at_ns = NULL
         WHERE document_id = ?1 AND content_seq = ?3",
        params![item.document_id, state, item.content_seq],
    )?;
    Ok(())
}

/// A recording's outcome, which ends its not-ready schedule.
fn set_audio_state(conn: &Connection, document_id: &str, state: &str) -> rusqlite::Result<()> {
    conn.execute(
        "UPDATE documents SET audio_state = ?2, audio_attempts = 0, audio_next_at_ns = NULL
         WHERE document_id = ?1",
        params![document_id, state],
    )?;
    Ok(())
}

fn clear_dead_letter(conn: &Connection, work: Work, document_id: &str) -> rusqlite::Result<()> {
    conn.prepare_cached("DELETE FROM dead_letters WHERE work = ?1 AND document_id = ?2")?
        .execute(params![work.as_str(), document_id])?;
    Ok(())
}

/// Replaces a document's transcript and turns in one transaction, and marks it done unless
/// paging observed a newer change of the document while it was fetched (then it stays queued).
/// It is recorded as fetched for the detail `updated_at` known when the item was claimed, which
/// the transcript is at least as new as (NULL when no detail had been fetched).
pub fn save_transcript(
    tx: &Connection,
    item: &WorkItem,
    t: &TranscriptRecord,
    now: OffsetDateTime,
) -> anyhow::Result<()> {
    let document_id = item.document_id.as_str();
    let stored: Option<Option<String>> = tx
        .prepare_cached("SELECT content_sha256 FROM transcripts WHERE document_id = ?1")?
        .query_row([document_id], |r| r.get(0))
        .optional()?;
    let unchanged = stored.flatten().as_deref() == Some(t.content_sha256.as_str());
    if unchanged {
        // Fetched again (its encounter changed) and identical: only when it was seen changes.
        tx.execute(
            "UPDATE transcripts SET fetched_at = ?2, fetched_for_updated_at = ?3 WHERE document_id = ?1",
            params![document_id, format_stored(now), item.detail_updated_at],
        )?;
    } else {
        replace_transcript(tx, item, t, now)?;
    }
    tx.execute(
        "UPDATE documents SET transcript_state = 'done', transcript_attempts = 0, transcript_next_at_ns = NULL
         WHERE document_id = ?1 AND content_seq = ?2",
        params![document_id, item.content_seq],
    )?;
    clear_dead_letter(tx, Work::Transcript, document_id)?;
    Ok(())
}

fn replace_transcript(
    tx: &Connection,
    item: &WorkItem,
    t: &TranscriptRecord,
    now: OffsetDateTime,
) -> anyhow::Result<()> {
    let document_id = item.document_id.as_str();
    tx.execute(
        "DELETE FROM transcript_turns WHERE document_id = ?1",
        [document_id],
    )?;
    tx.execute(
        "INSERT INTO transcripts (document_id, encounter_id, provider, audio_duration_seconds, turn_count,
             fetched_at, fetched_for_updated_at, content_sha256, organization_id)
         -- The document's encounter as stored now: paging may have moved it since the claim
         -- (the documents_moved trigger keeps the two in step from then on).
         VALUES (?1, (SELECT encounter_id FROM documents WHERE document_id = ?1), ?2, ?3, ?4, ?5, ?6, ?7,
             (SELECT organization_id FROM documents WHERE document_id = ?1))
         ON CONFLICT (document_id) DO UPDATE SET encounter_id = excluded.encounter_id,
             provider = excluded.provider, audio_duration_seconds = excluded.audio_duration_seconds,
             turn_count = excluded.turn_count, fetched_at = excluded.fetched_at,
             fetched_for_updated_at = excluded.fetched_for_updated_at,
             content_sha256 = excluded.content_sha256",
        params![
            document_id,
            t.provider,
            t.audio_duration_seconds,
            t.turns.len() as i64,
            format_stored(now),
            item.detail_updated_at,
            t.content_sha256
        ],
    )?;
    let organization_id: Option<String> = tx
        .prepare_cached("SELECT organization_id FROM documents WHERE document_id = ?1")?
        .query_row([document_id], |r| r.get(0))
        .optional()?
        .flatten();
    let mut insert = tx.prepare_cached(
        "INSERT INTO transcript_turns (document_id, turn_index, speaker, start_seconds, end_seconds, text,
             organization_id)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    )?;
    for (i, (speaker, start, end, text)) in t.turns.iter().enumerate() {
        insert.execute(params![
            document_id,
            i as i64,
            speaker,
            start,
            end,
            text,
            organization_id
        ])?;
    }
    Ok(())
}

/// The route said "not yet" ([`NotReady`]): asked again after the next delay of `schedule`, or,
/// once the schedule is exhausted, only after the document changes (at once when it changed
/// while the request was under way).
pub fn not_ready(
    conn: &Connection,
    item: &WorkItem,
    schedule: &[std::time::Duration],
    now: OffsetDateTime,
) -> anyhow::Result<()> {
    let document_id = item.document_id.as_str();
    let prefix = NotReady::prefix(item.work);
    let Some(attempts) = conn
        .query_row(
            &format!("SELECT {prefix}_attempts FROM documents WHERE document_id = ?1"),
            [document_id],
            |r| r.get::<_, i64>(0),
        )
        .optional()?
    else {
        // Purged while it was asked for: nothing is left to schedule.
        return Ok(());
    };
    let outcome = NotReady::after(item.work, attempts, schedule, now);
    conn.execute(
        &outcome.update_sql("?1", "?2", "?3", "?4"),
        params![document_id, outcome.state, outcome.next_at_ns, item.content_seq],
    )?;
    // An answer, if not the content: what once exhausted its retries is no longer failing.
    clear_dead_letter(conn, item.work, document_id)?;
    Ok(())
}

/// Queues the content of live encounters created in `[start_ns, end_ns)` again
/// ([`crate::store::Backend::requeue_content`]).
pub fn requeue_content(
    conn: &Connection,
    organization_id: &str,
    start_ns: i64,
    end_ns: i64,
) -> anyhow::Result<u64> {
    let queued = conn.execute(
        crate::store::requeue_content_sql!("?1", "?2", "?3"),
        params![organization_id, start_ns, end_ns],
    )?;
    conn.execute(
        crate::store::requeue_dead_letters_sql!("?1", "?2", "?3"),
        params![organization_id, start_ns, end_ns],
    )?;
    Ok(queued as u64)
}

/// Marks work as unavailable for this record (403 for another organization, 400 unsupported). A
/// document or transcript that changed while it was asked for stays queued instead.
pub fn mark_unavailable(conn: &Connection, item: &WorkItem) -> anyhow::Result<()> {
    let document_id = item.document_id.as_str();
    match item.work {
        Work::Document => set_detail_outcome(conn, item, "unavailable")?,
        Work::Transcript => {
            conn.execute(
                "UPDATE documents SET transcript_state = 'unavailable'
                 WHERE document_id = ?1 AND content_seq = ?2",
                params![document_id, item.content_seq],
            )?;
        }
        // Recordings are queued by `queue_missing_audio`, not by paging: the outcome stands.
        Work::Audio => set_audio_state(conn, document_id, "unavailable")?,
    }
    clear_dead_letter(conn, item.work, document_id)?;
    Ok(())
}

pub fn save_recording(
    tx: &Connection,
    encounter_id: &str,
    document_id: &str,
    r: &RecordingRecord,
    now: OffsetDateTime,
) -> anyhow::Result<()> {
    tx.execute(
        "INSERT INTO recordings (document_id, encounter_id, path, size_bytes, sha256, duration_seconds, fetched_at,
             organization_id)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, (SELECT organization_id FROM documents WHERE document_id = ?1))
         ON CONFLICT (document_id) DO UPDATE SET path = excluded.path, size_bytes = excluded.size_bytes,
             sha256 = excluded.sha256, duration_seconds = excluded.duration_seconds,
             fetched_at = excluded.fetched_at",
        params![
            document_id,
            encounter_id,
            r.path,
            r.size_bytes as i64,
            r.sha256,
            r.duration_seconds,
            format_stored(now)
        ],
    )?;
    set_audio_state(tx, document_id, "done")?;
    clear_dead_letter(tx, Work::Audio, document_id)?;
    Ok(())
}

/// [`crate::store::Backend::dead_letters_left`].
pub fn dead_letters_left(conn: &Connection, organization: &str) -> anyhow::Result<Vec<(Work, i64)>> {
    conn.execute(crate::store::orphaned_dead_letters_sql!("?1"), [organization])?;
    let mut stmt = conn.prepare_cached(
        "SELECT work, count(*) FROM dead_letters WHERE organization = ?1 GROUP BY work ORDER BY work",
    )?;
    let rows = stmt.query_map([organization], |r| Ok((r.get::<_, String>(0)?, r.get(1)?)))?;
    rows.map(|row| {
        let (work, n) = row?;
        Ok((Work::from_stored(&work), n))
    })
    .collect()
}

/// Records work that exhausted its retries in this run; it stays queued, and is claimed again
/// once its wait is over ([`crate::store::dead_letter_retry_at`]).
pub fn dead_letter(
    conn: &Connection,
    organization: &str,
    item: &WorkItem,
    run_id: i64,
    reason_code: Option<&str>,
    error: &str,
    now: OffsetDateTime,
) -> anyhow::Result<()> {
    // A first failure stored unreadable (written by hand) counts as failing since now.
    let first_failed_at = conn
        .query_row(
            "SELECT first_failed_at FROM dead_letters WHERE work = ?1 AND document_id = ?2",
            params![item.work.as_str(), item.document_id],
            |r| r.get::<_, String>(0),
        )
        .optional()?
        .map(|text| parse_rfc3339(&text).unwrap_or(now));
    conn.execute(
        "INSERT INTO dead_letters (work, document_id, encounter_id, attempts, first_failed_at, last_failed_at,
             last_run_id, reason_code, last_error, organization, next_attempt_at_ns)
         VALUES (?1, ?2, ?3, 1, ?4, ?4, ?5, ?6, ?7, ?8, NULL)
         ON CONFLICT (work, document_id) DO UPDATE SET attempts = attempts + 1,
             last_failed_at = excluded.last_failed_at, last_run_id = excluded.last_run_id,
             reason_code = excluded.reason_code, last_error = excluded.last_error,
             next_attempt_at_ns = ?9",
        params![
            item.work.as_str(),
            item.document_id,
            item.encounter_id,
            format_stored(now),
            run_id,
            reason_code,
            error,
            organization,
            dead_letter_retry_at(first_failed_at, now)
        ],
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::store::records::sample_transcript as transcript;
    use crate::store::sqlite::{commit_page, open_writer};
    use crate::store::{DocumentRecord, EncounterRecord};

    /// The queue is asked several times a second while content is fetched: each kind of work
    /// is found through its partial index, never by a scan of `documents`.
    #[test]
    fn claims_read_each_kind_of_work_through_its_partial_index() {
        let dir = tempfile::tempdir().unwrap();
        let conn = open_writer(&dir.path().join("w.db"), Duration::from_secs(1)).unwrap();
        let plan: Vec<String> = conn
            .prepare(&format!("EXPLAIN QUERY PLAN {CLAIM_SQL}"))
            .unwrap()
            .query_map(params![0, 0, 0, "org", false, false, false], |r| r.get(3))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        for kind in ["detail", "transcript", "audio"] {
            let search = format!("SEARCH documents USING INDEX documents_{kind}_work ({kind}_state=?)");
            assert!(plan.contains(&search), "{search} not in {plan:#?}");
        }
        assert!(!plan.iter().any(|step| step.starts_with("SCAN")), "{plan:#?}");
    }

    /// A webhook event queues a transcript that is not current, whatever its state (none at
    /// all included), ending a dead letter's wait, and leaves one that is; it finds nothing of
    /// another organization.
    #[test]
    fn a_webhook_queues_a_transcript_that_is_not_current_whatever_its_state() {
        use crate::store::sqlite::webhook::{queue_transcript_now, transcript_state};
        let dir = tempfile::tempdir().unwrap();
        let mut conn = open_writer(&dir.path().join("w.db"), Duration::from_secs(1)).unwrap();
        page(
            &mut conn,
            "h1",
            vec![doc("doc_a", "ambient_transcript", Some("processing"))],
        );
        let now = OffsetDateTime::now_utc();
        let state = |conn: &Connection| transcript_state(conn, "org_1", "enc_1", "doc_a", now).unwrap();
        // A dead letter of the transcript, waiting: the announcement ends the wait.
        conn.execute(
            "INSERT INTO dead_letters (work, document_id, encounter_id, attempts, first_failed_at, last_failed_at,
                 last_run_id, last_error, next_attempt_at_ns)
             VALUES ('transcript', 'doc_a', 'enc_1', 3, 'x', 'x', 1, '500', ?1)",
            [i64::MAX],
        )
        .unwrap();
        let claimable = |conn: &Connection| {
            claim_work(conn, Some("org_1"), 2, &[], &HashSet::new(), 10, now)
                .unwrap()
                .iter()
                .any(|w| w.work == Work::Transcript)
        };
        conn.execute(
            "UPDATE documents SET transcript_state = 'pending' WHERE document_id = 'doc_a'",
            [],
        )
        .unwrap();
        assert!(!claimable(&conn), "a waiting dead letter was claimed");
        for stored in [None, Some("waiting"), Some("not_ready"), Some("unavailable")] {
            conn.execute(
                "UPDATE documents SET transcript_state = ?1 WHERE document_id = 'doc_a'",
                [stored],
            )
            .unwrap();
            assert_eq!(state(&conn).as_deref(), Some(stored.unwrap_or("none")));
            assert!(queue_transcript_now(&conn, "org_1", "enc_1", "doc_a", now).unwrap());
            assert_eq!(states(&conn, "doc_a").1.as_deref(), Some("pending"), "{stored:?}");
            assert_eq!(state(&conn).as_deref(), Some("current"));
            assert!(claimable(&conn), "{stored:?}");
        }
        assert!(!queue_transcript_now(&conn, "org_2", "enc_1", "doc_a", now).unwrap());
        assert_eq!(
            transcript_state(&conn, "org_1", "enc_1", "doc_b", now).unwrap(),
            None
        );
    }

    /// Dead letters a claim can still pick up are counted by kind; one whose work a change took
    /// off the queue, or whose document was removed, is deleted.
    #[test]
    fn dead_letters_left_are_those_a_claim_can_still_pick_up() {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = open_writer(&dir.path().join("w.db"), Duration::from_secs(1)).unwrap();
        page(
            &mut conn,
            "h1",
            vec![
                doc("doc_a", "ambient_transcript", Some("completed")),
                doc("doc_b", "ambient_transcript", Some("completed")),
                doc("doc_n", "document", None),
            ],
        );
        let now = OffsetDateTime::now_utc();
        let items = claimable(&conn);
        assert_eq!(items.len(), 3, "{items:?}");
        for item in &items {
            dead_letter(&conn, "default", item, 1, None, "HTTP 500", now).unwrap();
        }
        let left = |conn: &Connection| dead_letters_left(conn, "default").unwrap();
        assert_eq!(left(&conn), [(Work::Document, 1), (Work::Transcript, 2)]);
        assert_eq!(dead_letters_left(&conn, "another").unwrap(), []);
        // doc_a's transcript waits for its recording again; doc_n is removed.
        conn.execute_batch(
            "UPDATE documents SET transcript_state = 'waiting' WHERE document_id = 'doc_a';
             UPDATE documents SET removed_at = 'x' WHERE document_id = 'doc_n';",
        )
        .unwrap();
        assert_eq!(left(&conn), [(Work::Transcript, 1)]);
        let kept: String = conn
            .query_row("SELECT document_id FROM dead_letters", [], |r| r.get(0))
            .unwrap();
        assert_eq!(kept, "doc_b");
    }

    fn doc(id: &str, schema_type: &str, status: Option<&str>) -> DocumentRecord {
        DocumentRecord {
            document_id: id.to_owned(),
            schema_type: schema_type.to_owned(),
            title: None,
            status: status.map(str::to_owned),
            workflow_variant: None,
            audio_duration_seconds: None,
        }
    }

    /// Writes `docs` as the documents of encounter `enc_1`, as a page would; `hash` stands for
    /// the record's content (a different hash is a changed encounter).
    fn page(conn: &mut Connection, hash: &str, docs: Vec<DocumentRecord>) {
        let now = OffsetDateTime::now_utc();
        let encounter = EncounterRecord {
            encounter_id: "enc_1".to_owned(),
            organization_id: "org_1".to_owned(),
            encounter_type: None,
            status: None,
            created_at: now,
            updated_at: now,
            date_of_service: None,
            patient: None,
            documents: docs,
            content_hash: hash.to_owned(),
            // Another hash is another record: change detection also compares the JSON.
            raw_json: format!(r#"{{"hash":"{hash}"}}"#),
        };
        let tx = conn.transaction().unwrap();
        commit_page(&tx, &[encounter], &[], None, now).unwrap();
        tx.commit().unwrap();
    }

    fn states(conn: &Connection, id: &str) -> (String, Option<String>) {
        conn.query_row(
            "SELECT detail_state, transcript_state FROM documents WHERE document_id = ?1",
            [id],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap()
    }

    /// Everything organization `org_1` may claim now, up to 100 items.
    fn claimable(conn: &Connection) -> Vec<WorkItem> {
        claim_work(
            conn,
            Some("org_1"),
            1,
            &[],
            &HashSet::new(),
            100,
            OffsetDateTime::now_utc(),
        )
        .unwrap()
    }

    fn claim(conn: &Connection, work: Work, id: &str) -> Option<WorkItem> {
        claimable(conn)
            .into_iter()
            .find(|i| i.work == work && i.document_id == id)
    }

    fn save(conn: &mut Connection, f: impl FnOnce(&rusqlite::Transaction<'_>) -> anyhow::Result<()>) {
        let tx = conn.transaction().unwrap();
        f(&tx).unwrap();
        tx.commit().unwrap();
    }

    #[test]
    fn the_summary_decides_ambient_work_and_a_changed_encounter_asks_notes_and_finished_transcripts_again() {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = open_writer(&dir.path().join("w.db"), Duration::from_secs(1)).unwrap();
        let first = || {
            vec![
                doc("doc_final", "ambient_transcript", Some("completed")),
                doc("doc_live", "ambient_transcript", Some("processing")),
                doc("doc_note", "document", None),
                doc("doc_form", "intake_form", None),
            ]
        };
        page(&mut conn, "h1", first());
        let pending = || (String::from("pending"), None);
        assert_eq!(
            states(&conn, "doc_final"),
            ("skipped".into(), Some("pending".into()))
        );
        assert_eq!(
            states(&conn, "doc_live"),
            ("skipped".into(), Some("waiting".into()))
        );
        assert_eq!(states(&conn, "doc_note"), pending());
        assert_eq!(states(&conn, "doc_form"), pending());
        for (id, state) in [
            ("doc_final", "transcript_state = 'done'"),
            ("doc_note", "detail_state = 'done'"),
            ("doc_form", "detail_state = 'unsupported'"),
        ] {
            conn.execute(
                &format!("UPDATE documents SET {state} WHERE document_id = ?1"),
                [id],
            )
            .unwrap();
        }
        // Listed again unchanged: nothing is written, nothing queued.
        page(&mut conn, "h1", first());
        assert_eq!(states(&conn, "doc_final").1.as_deref(), Some("done"));
        assert_eq!(states(&conn, "doc_note").0, "done");

        // The encounter changed elsewhere (say, a patient field): the note and the finished
        // transcript are asked again; the unfinished one and the unsupported type are not.
        page(&mut conn, "h2", first());
        assert_eq!(
            states(&conn, "doc_final"),
            ("skipped".into(), Some("pending".into()))
        );
        assert_eq!(
            states(&conn, "doc_live"),
            ("skipped".into(), Some("waiting".into()))
        );
        assert_eq!(states(&conn, "doc_note"), pending());
        assert_eq!(states(&conn, "doc_form").0, "unsupported");

        // The unfinished transcript finishes: queued from its summary, without a detail.
        let mut finished = first();
        finished[1].status = Some("completed".to_owned());
        page(&mut conn, "h3", finished);
        assert_eq!(
            states(&conn, "doc_live"),
            ("skipped".into(), Some("pending".into()))
        );
        let documents: Vec<String> = claimable(&conn)
            .into_iter()
            .filter(|i| i.work == Work::Document)
            .map(|i| i.document_id)
            .collect();
        assert_eq!(documents, ["doc_note"], "no ambient detail is ever queued");
    }

    #[test]
    fn a_transcript_fetched_again_unchanged_is_not_rewritten_and_a_changed_one_is() {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = open_writer(&dir.path().join("w.db"), Duration::from_secs(1)).unwrap();
        page(
            &mut conn,
            "h1",
            vec![doc("doc_a", "ambient_transcript", Some("completed"))],
        );
        let item = claim(&conn, Work::Transcript, "doc_a").unwrap();
        // Counts the turns written (a rewrite deletes and inserts them all).
        conn.execute_batch(
            "CREATE TEMP TABLE written (n INTEGER NOT NULL); INSERT INTO written VALUES (0);
             CREATE TEMP TRIGGER count_turns AFTER INSERT ON main.transcript_turns BEGIN
                 UPDATE written SET n = n + 1;
             END;",
        )
        .unwrap();
        let written =
            |conn: &Connection| -> i64 { conn.query_row("SELECT n FROM written", [], |r| r.get(0)).unwrap() };
        let first = transcript("A headache.");
        save(&mut conn, |tx| {
            save_transcript(tx, &item, &first, OffsetDateTime::now_utc())
        });
        assert_eq!(written(&conn), 2);
        assert_eq!(states(&conn, "doc_a").1.as_deref(), Some("done"));

        assert_eq!(transcript("A headache.").content_sha256, first.content_sha256);
        save(&mut conn, |tx| {
            save_transcript(tx, &item, &transcript("A headache."), OffsetDateTime::now_utc())
        });
        assert_eq!(written(&conn), 2, "identical: not rewritten");

        let changed = transcript("A headache since Tuesday.");
        assert_ne!(changed.content_sha256, first.content_sha256);
        save(&mut conn, |tx| {
            save_transcript(tx, &item, &changed, OffsetDateTime::now_utc())
        });
        assert_eq!(written(&conn), 4, "changed: rewritten");
        let (text, sha): (String, String) = conn
            .query_row(
                "SELECT (SELECT text FROM transcript_turns WHERE document_id = 'doc_a' AND turn_index = 1),
                        content_sha256
                 FROM transcripts WHERE document_id = 'doc_a'",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        assert_eq!(
            (text.as_str(), sha),
            ("A headache since Tuesday.", changed.content_sha256)
        );
    }

    #[test]
    fn work_fetched_before_a_change_was_observed_is_saved_but_stays_queued() {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = open_writer(&dir.path().join("w.db"), Duration::from_secs(1)).unwrap();
        let docs = || {
            vec![
                doc("doc_a", "ambient_transcript", Some("completed")),
                doc("doc_n", "document", None),
            ]
        };
        page(&mut conn, "h1", docs());
        let transcript_item = claim(&conn, Work::Transcript, "doc_a").unwrap();
        let note_item = claim(&conn, Work::Document, "doc_n").unwrap();
        // While both requests are under way, paging sees the encounter change.
        page(&mut conn, "h2", docs());
        let now = OffsetDateTime::now_utc();
        save(&mut conn, |tx| {
            save_transcript(tx, &transcript_item, &transcript("Old."), now)
        });
        let note = DetailOutcome::Note {
            format: "markdown".to_owned(),
            text: Some("Old note.".to_owned()),
            created_at: now,
            updated_at: now,
        };
        save(&mut conn, |tx| save_detail(tx, &note_item, &note, false, now));
        assert_eq!(
            states(&conn, "doc_a").1.as_deref(),
            Some("pending"),
            "the transcript may predate the change"
        );
        assert_eq!(
            states(&conn, "doc_n").0,
            "pending",
            "the note may predate the change"
        );

        // Claimed again, after the change: done.
        let transcript_item = claim(&conn, Work::Transcript, "doc_a").unwrap();
        let note_item = claim(&conn, Work::Document, "doc_n").unwrap();
        save(&mut conn, |tx| {
            save_transcript(tx, &transcript_item, &transcript("New."), now)
        });
        save(&mut conn, |tx| save_detail(tx, &note_item, &note, false, now));
        assert_eq!(states(&conn, "doc_a").1.as_deref(), Some("done"));
        assert_eq!(states(&conn, "doc_n").0, "done");
    }

    #[test]
    fn v4_moves_an_earlier_versions_queued_ambient_details_onto_the_summary() {
        use refinery::Target;
        let dir = tempfile::tempdir().unwrap();
        let mut conn = Connection::open(dir.path().join("w.db")).unwrap();
        crate::store::sqlite::embedded::migrations::runner()
            .set_target(Target::Version(3))
            .run(&mut conn)
            .unwrap();
        conn.execute_batch(
            "INSERT INTO encounters (encounter_id, organization_id, created_at, updated_at,
                 created_at_ns, updated_at_ns, content_hash, raw_json, first_seen_at, changed_at)
             VALUES ('enc_1', 'org_1', 't', 't', 0, 0, 'h', '{}', 't', 't');
             INSERT INTO documents (document_id, encounter_id, position, schema_type, status,
                 detail_updated_at, first_seen_at, changed_at, detail_state, transcript_state)
             VALUES ('doc_new', 'enc_1', 0, 'ambient_transcript', 'completed', NULL, 't', 't', 'pending', NULL),
                    ('doc_live', 'enc_1', 1, 'ambient_transcript', 'processing', NULL, 't', 't', 'pending', NULL),
                    ('doc_seen', 'enc_1', 2, 'ambient_transcript', 'completed', '2026-05-25T15:00:00Z', 't', 't', 'pending', 'done'),
                    ('doc_kept', 'enc_1', 3, 'ambient_transcript', 'completed', '2026-05-25T15:00:00Z', 't', 't', 'done', 'done'),
                    ('doc_note', 'enc_1', 4, 'document', NULL, NULL, 't', 't', 'pending', NULL);",
        )
        .unwrap();
        crate::store::sqlite::embedded::migrations::runner()
            .run(&mut conn)
            .unwrap();
        let all: Vec<(String, String, Option<String>)> = conn
            .prepare("SELECT document_id, detail_state, transcript_state FROM documents ORDER BY position")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        let expect = |id: &str, d: &str, t: Option<&str>| (id.to_owned(), d.to_owned(), t.map(str::to_owned));
        assert_eq!(
            all,
            [
                expect("doc_new", "skipped", Some("pending")),
                expect("doc_live", "skipped", Some("waiting")),
                expect("doc_seen", "done", Some("pending")),
                expect("doc_kept", "done", Some("done")),
                expect("doc_note", "pending", None),
            ]
        );
    }

    #[test]
    fn claims_skip_the_items_still_being_worked_on() {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = open_writer(&dir.path().join("w.db"), Duration::from_secs(1)).unwrap();
        let now = OffsetDateTime::now_utc();
        page(
            &mut conn,
            "h",
            vec![doc("doc_a", "document", None), doc("doc_b", "document", None)],
        );
        let claim = |exclude: &HashSet<(Work, String)>| -> Vec<String> {
            claim_work(&conn, Some("org_1"), 1, &[], exclude, 10, now)
                .unwrap()
                .into_iter()
                .map(|i| i.document_id)
                .collect()
        };
        let mut all = claim(&HashSet::new());
        all.sort();
        assert_eq!(all, ["doc_a", "doc_b"]);
        let busy = HashSet::from([(Work::Document, "doc_a".to_owned())]);
        assert_eq!(claim(&busy), ["doc_b"]);
    }
}
