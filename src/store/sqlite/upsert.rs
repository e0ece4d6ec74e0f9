//! Idempotent upserts of encounters, patients and document summaries, in the writer's
//! transaction, and the content work a new or changed document needs (decided from the list
//! alone: which note details and transcripts to queue; see docs/content.md). Upstream wins: the
//! state read last is the state stored, whatever its `updated_at` says (a vendor may recompute
//! `updated_at` from what remains, so it can go backwards); the single writer applies
//! observations in the order the sync read them. An identical record (by content hash) costs one
//! indexed read and no write. A backfill's page is staged instead and merged in bulk by
//! `staging`, with the same statements' conflict rules.

use std::collections::HashSet;
use std::sync::LazyLock;

use rusqlite::{Connection, OptionalExtension, params};
use time::OffsetDateTime;

use super::{ledger, staging};
use crate::store::{
    EncounterRecord, IdCollision, IdKind, PageCounts, PatientRecord, Removal, WindowCompletion,
};
use crate::timefmt::{format_stored, unix_nanos};

/// What a stored patient row takes from a new observation of its patient: a response without
/// names (a key lacking patients:read, or a terse record) must not erase names learnt earlier,
/// so absent fields keep what is stored; an identical observation writes nothing. A row is
/// written from its own clinic's records only: another clinic listing the same patient (one
/// whose known fields agree, else the page is refused: [`collision`]) fills nothing in, unless
/// the row's clinic holds no encounter of it any more (purged, say): then the clinic that lists
/// it takes it over, as it does a row without a clinic.
pub(super) const PATIENT_SEEN_AGAIN: &str = "ON CONFLICT (patient_id) DO UPDATE SET
             first_name = coalesce(excluded.first_name, first_name),
             last_name = coalesce(excluded.last_name, last_name),
             date_of_birth = coalesce(excluded.date_of_birth, date_of_birth),
             changed_at = excluded.changed_at, organization_id = excluded.organization_id
         WHERE (coalesce(excluded.first_name, first_name) IS NOT first_name
                OR coalesce(excluded.last_name, last_name) IS NOT last_name
                OR coalesce(excluded.date_of_birth, date_of_birth) IS NOT date_of_birth)
           AND (organization_id IS NULL OR organization_id = excluded.organization_id
                OR NOT EXISTS (SELECT 1 FROM encounters e WHERE e.patient_id = patients.patient_id
                                  AND e.organization_id = patients.organization_id))";

/// What a stored document row takes from a new observation of its summary (see
/// `upsert_documents` for the content work it decides). A document that moved to another
/// encounter is served by other routes: a note is asked again, and a recording that was
/// unavailable or not ready is looked for again, whichever order the page lists the two
/// encounters in.
pub(super) const DOCUMENT_SEEN_AGAIN: &str = "ON CONFLICT (document_id) DO UPDATE SET
             encounter_id = excluded.encounter_id, position = excluded.position,
             schema_type = excluded.schema_type, title = excluded.title, status = excluded.status,
             workflow_variant = excluded.workflow_variant,
             audio_duration_seconds = excluded.audio_duration_seconds, removed_at = NULL,
             changed_at = excluded.changed_at,
             content_seq = content_seq + 1,
             detail_state = CASE
                 WHEN schema_type IS NOT excluded.schema_type THEN excluded.detail_state
                 WHEN schema_type <> 'ambient_transcript' AND encounter_id IS NOT excluded.encounter_id
                      AND detail_state IN ('done', 'unavailable', 'not_ready') THEN 'pending'
                 ELSE detail_state END,
             detail_attempts = CASE
                 WHEN schema_type IS NOT excluded.schema_type OR encounter_id IS NOT excluded.encounter_id
                 THEN 0 ELSE detail_attempts END,
             detail_next_at_ns = CASE
                 WHEN schema_type IS NOT excluded.schema_type OR encounter_id IS NOT excluded.encounter_id
                 THEN NULL ELSE detail_next_at_ns END,
             transcript_state = CASE
                 WHEN excluded.schema_type = 'ambient_transcript' OR schema_type IS NOT excluded.schema_type
                 THEN excluded.transcript_state ELSE transcript_state END,
             transcript_attempts = CASE
                 WHEN excluded.schema_type = 'ambient_transcript' OR schema_type IS NOT excluded.schema_type
                 THEN 0 ELSE transcript_attempts END,
             transcript_next_at_ns = CASE
                 WHEN excluded.schema_type = 'ambient_transcript' OR schema_type IS NOT excluded.schema_type
                 THEN NULL ELSE transcript_next_at_ns END,
             audio_state = CASE
                 WHEN encounter_id IS NOT excluded.encounter_id AND audio_state IN ('unavailable', 'not_ready')
                 THEN NULL ELSE audio_state END,
             audio_attempts = CASE
                 WHEN encounter_id IS NOT excluded.encounter_id AND audio_state IN ('unavailable', 'not_ready')
                 THEN 0 ELSE audio_attempts END,
             audio_next_at_ns = CASE
                 WHEN encounter_id IS NOT excluded.encounter_id AND audio_state IN ('unavailable', 'not_ready')
                 THEN NULL ELSE audio_next_at_ns END
         WHERE encounter_id IS NOT excluded.encounter_id OR position IS NOT excluded.position
            OR schema_type IS NOT excluded.schema_type OR title IS NOT excluded.title
            OR status IS NOT excluded.status OR workflow_variant IS NOT excluded.workflow_variant
            OR audio_duration_seconds IS NOT excluded.audio_duration_seconds
            OR removed_at IS NOT NULL";

/// `detail_state, transcript_state` of a document seen for the first time, given the SQL
/// expressions (literals) of its `schema_type` and `status`.
macro_rules! new_document_work {
    ($schema_type:literal, $status:literal) => {
        concat!(
            "CASE WHEN ",
            $schema_type,
            " = 'ambient_transcript' THEN 'skipped' ELSE 'pending' END,
             CASE WHEN ",
            $schema_type,
            " <> 'ambient_transcript' THEN NULL
                  WHEN ",
            $crate::store::may_be_final_sql!($status),
            " THEN 'pending' ELSE 'waiting' END"
        )
    };
}
pub(super) use new_document_work;

enum Existing {
    Absent,
    Present { content_hash: String, removed: bool },
}

/// Writes one page of encounters, the removals a window found, and, when given, the completion
/// of the window, in the caller's transaction (see [`crate::store::Writer::write`]): a crash leaves all or nothing.
pub fn commit_page(
    tx: &Connection,
    records: &[EncounterRecord],
    removals: &[Removal],
    completion: Option<&WindowCompletion>,
    now: OffsetDateTime,
) -> anyhow::Result<PageCounts> {
    let now_text = format_stored(now);
    let mut counts = PageCounts::default();
    let purged = super::privacy::purged_ranges(tx)?;
    let shared = match records.first() {
        Some(first) => shares_warehouse(tx, &first.organization_id)?,
        None => false,
    };
    if removals.is_empty() && !shared && staging::stageable(tx, records)? {
        staging::stage(tx, records, &purged, &now_text, &mut counts)?;
    } else {
        if !records.is_empty() || !removals.is_empty() {
            // What was read before this page is applied before it.
            staging::merge(tx)?;
        }
        if shared && let Some(refused) = collision(tx, records)? {
            counts.refused = Some(refused);
            return Ok(counts);
        }
        for rec in records {
            upsert_encounter(tx, rec, &purged, &now_text, Patient::Upsert, &mut counts)?;
        }
    }
    let mut mark = tx.prepare_cached(
        "UPDATE encounters SET removed_at = ?2, removed_reason = ?3, changed_at = ?2
         WHERE encounter_id = ?1 AND removed_at IS NULL",
    )?;
    for r in removals {
        counts.removed += mark.execute(params![r.encounter_id, now_text, r.reason])? as u64;
    }
    drop(mark);
    if let Some(c) = completion {
        ledger::record_window(tx, c, now)?;
    }
    Ok(counts)
}

/// Whether the warehouse holds, stored or staged, encounters of another clinic than
/// `organization_id`: then a page of this clinic is checked for IDs the other holds
/// ([`collision`]) and never staged (staged rows would escape the check). Four index range
/// scans that find nothing in a warehouse of one clinic.
fn shares_warehouse(tx: &Connection, organization_id: &str) -> rusqlite::Result<bool> {
    tx.prepare_cached(
        "SELECT EXISTS (SELECT 1 FROM encounters WHERE organization_id < ?1)
             OR EXISTS (SELECT 1 FROM encounters WHERE organization_id > ?1)
             OR EXISTS (SELECT 1 FROM staged_encounters WHERE organization_id < ?1)
             OR EXISTS (SELECT 1 FROM staged_encounters WHERE organization_id > ?1)",
    )?
    .query_row([organization_id], |r| r.get(0))
}

/// The first ID of `records` (one clinic's page) that the warehouse holds for another clinic:
/// an encounter (live or removed), a document of another clinic's encounter, or a patient
/// another clinic's row holds, with an encounter of it, under another name or date of birth
/// where both are known (one patient seen at two clinics keeps one row; see
/// [`PATIENT_SEEN_AGAIN`]).
fn collision(tx: &Connection, records: &[EncounterRecord]) -> rusqlite::Result<Option<IdCollision>> {
    let mut encounter = tx.prepare_cached(
        "SELECT organization_id FROM encounters WHERE encounter_id = ?1 AND organization_id <> ?2",
    )?;
    let mut document = tx.prepare_cached(
        "SELECT e.organization_id FROM documents d JOIN encounters e ON e.encounter_id = d.encounter_id
          WHERE d.document_id = ?1 AND e.organization_id <> ?2",
    )?;
    let mut patient = tx.prepare_cached(
        "SELECT organization_id FROM patients
          WHERE patient_id = ?1 AND organization_id <> ?2
            AND (first_name <> ?3 OR last_name <> ?4 OR date_of_birth <> ?5)
            AND EXISTS (SELECT 1 FROM encounters e WHERE e.patient_id = patients.patient_id
                           AND e.organization_id = patients.organization_id)",
    )?;
    let found = 'records: {
        for rec in records {
            let org = &rec.organization_id;
            let held: Option<String> = encounter
                .query_row(params![rec.encounter_id, org], |r| r.get(0))
                .optional()?;
            if let Some(holder) = held {
                break 'records Some((IdKind::Encounter, rec.encounter_id.as_str(), rec, holder));
            }
            for d in &rec.documents {
                let held: Option<String> = document
                    .query_row(params![d.document_id, org], |r| r.get(0))
                    .optional()?;
                if let Some(holder) = held {
                    break 'records Some((IdKind::Document, d.document_id.as_str(), rec, holder));
                }
            }
            if let Some(p) = &rec.patient {
                let held: Option<String> = patient
                    .query_row(
                        params![p.patient_id, org, p.first_name, p.last_name, p.date_of_birth],
                        |r| r.get(0),
                    )
                    .optional()?;
                if let Some(holder) = held {
                    break 'records Some((IdKind::Patient, p.patient_id.as_str(), rec, holder));
                }
            }
        }
        None
    };
    let Some((kind, id, rec, holder)) = found else {
        return Ok(None);
    };
    let holder: String = tx
        .prepare_cached(
            "SELECT coalesce((SELECT organization FROM organizations WHERE organization_id = ?1), ?1)",
        )?
        .query_row([holder], |r| r.get(0))?;
    Ok(Some(IdCollision {
        kind,
        id: id.to_owned(),
        encounter_id: rec.encounter_id.clone(),
        holder,
    }))
}

/// Whether [`upsert_encounter`] writes the record's patient: a merge of staged pages writes all
/// their patients first, in the order they were read.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Patient {
    Upsert,
    AlreadyWritten,
}

/// Upserts one encounter read at `now` (new, changed, revived or identical) with its patient
/// and documents, counting what it did.
pub(super) fn upsert_encounter(
    conn: &Connection,
    rec: &EncounterRecord,
    purged: &[(i64, i64)],
    now: &str,
    patient: Patient,
    counts: &mut PageCounts,
) -> rusqlite::Result<()> {
    let existing = conn
        .prepare_cached(
            "SELECT content_hash, removed_at IS NOT NULL FROM encounters WHERE encounter_id = ?1",
        )?
        .query_row([&rec.encounter_id], |r| {
            Ok(Existing::Present {
                content_hash: r.get(0)?,
                removed: r.get(1)?,
            })
        })
        .optional()?
        .unwrap_or(Existing::Absent);
    let updated_ns = unix_nanos(rec.updated_at);
    let created_ns = unix_nanos(rec.created_at);
    let is_new = matches!(existing, Existing::Absent);
    match existing {
        // A purged encounter stays purged, whatever revisit or backfill lists it again.
        Existing::Absent
            if purged
                .iter()
                .any(|&(from, to)| from <= created_ns && created_ns < to) =>
        {
            counts.purged += 1;
            return Ok(());
        }
        Existing::Absent => counts.new += 1,
        Existing::Present {
            content_hash,
            removed,
        } => {
            if removed {
                counts.revived += 1;
            }
            if content_hash == rec.content_hash && !removed {
                counts.unchanged += 1;
                return Ok(());
            }
            if !removed && same_as_stored(conn, rec)? {
                counts.unchanged += 1;
                return Ok(());
            }
            // Upstream wins, even with an older `updated_at`: this observation was read after
            // the stored one (the writer applies them in the order they were read).
            counts.changed += 1;
        }
    }
    if let Some(p) = rec.patient.as_ref().filter(|_| patient == Patient::Upsert) {
        upsert_patient(conn, p, &rec.organization_id, now)?;
    }
    let updated_at = format_stored(rec.updated_at);
    conn.prepare_cached(
        "INSERT INTO encounters (encounter_id, organization_id, encounter_type, status, created_at,
             updated_at, date_of_service, patient_id, removed_at, removed_reason, created_at_ns,
             updated_at_ns, content_hash, raw_json, first_seen_at, changed_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, NULL, NULL, ?9, ?10, ?11, ?12, ?13, ?13)
         ON CONFLICT (encounter_id) DO UPDATE SET
             organization_id = excluded.organization_id, encounter_type = excluded.encounter_type,
             status = excluded.status, created_at = excluded.created_at,
             updated_at = excluded.updated_at, date_of_service = excluded.date_of_service,
             patient_id = excluded.patient_id, removed_at = NULL, removed_reason = NULL,
             created_at_ns = excluded.created_at_ns, updated_at_ns = excluded.updated_at_ns,
             content_hash = excluded.content_hash, raw_json = excluded.raw_json,
             changed_at = excluded.changed_at",
    )?
    .execute(params![
        rec.encounter_id,
        rec.organization_id,
        rec.encounter_type,
        rec.status,
        format_stored(rec.created_at),
        updated_at,
        rec.date_of_service.map(format_stored),
        rec.patient.as_ref().map(|p| &p.patient_id),
        created_ns,
        updated_ns,
        rec.content_hash,
        rec.raw_json,
        now,
    ])?;
    // Its `created` history row (a change, removal or revival is recorded by the update's
    // trigger). Not a trigger: an INSERT trigger would make a merge's `INSERT … SELECT` copy
    // every staged row into a temporary file first (migration V8).
    if is_new {
        conn.prepare_cached(
            "INSERT INTO encounter_history (encounter_id, organization_id, observed_at, change, status,
                 updated_at)
             VALUES (?1, ?2, ?3, 'created', ?4, ?5)",
        )?
        .execute(params![
            rec.encounter_id,
            rec.organization_id,
            now,
            rec.status,
            updated_at
        ])?;
    }
    upsert_documents(conn, rec, is_new, now)
}

/// Whether a live stored encounter whose hash differs from `rec`'s holds the same record all
/// the same ([`crate::store::same_content`]): rendered another way, hashed by an earlier
/// release (which hashed the bytes as received), stored with signed links by an earlier
/// release, or changed only in what the privacy policy does not keep. Then only its hash and
/// JSON are brought up to date (the links go): nothing else is written, and its documents are
/// not queued again.
fn same_as_stored(conn: &Connection, rec: &EncounterRecord) -> rusqlite::Result<bool> {
    let stored: String = conn
        .prepare_cached("SELECT raw_json FROM encounters WHERE encounter_id = ?1")?
        .query_row([&rec.encounter_id], |r| r.get(0))?;
    if !crate::store::same_content(&stored, &rec.raw_json) {
        return Ok(false);
    }
    conn.prepare_cached("UPDATE encounters SET content_hash = ?2, raw_json = ?3 WHERE encounter_id = ?1")?
        .execute(params![rec.encounter_id, rec.content_hash, rec.raw_json])?;
    Ok(true)
}

fn upsert_patient(
    conn: &Connection,
    p: &PatientRecord,
    organization_id: &str,
    now: &str,
) -> rusqlite::Result<()> {
    static SQL: LazyLock<String> = LazyLock::new(|| {
        format!(
            "INSERT INTO patients (patient_id, first_name, last_name, date_of_birth, first_seen_at,
                 changed_at, organization_id)
             VALUES (?1, ?2, ?3, ?4, ?5, ?5, ?6) {PATIENT_SEEN_AGAIN}"
        )
    });
    conn.prepare_cached(&SQL)?.execute(params![
        p.patient_id,
        p.first_name,
        p.last_name,
        p.date_of_birth,
        now,
        organization_id
    ])?;
    Ok(())
}

fn upsert_documents(
    conn: &Connection,
    rec: &EncounterRecord,
    is_new: bool,
    now: &str,
) -> rusqlite::Result<()> {
    // What each document needs is decided here, from the summary, so that no request is made
    // that the data does not need (docs/content.md has the table). A note or an unknown type is
    // asked once on first sight (`detail_state = 'pending'`), and again when it moves (the
    // encounter-wide rule below covers the rest). An ambient document's detail is never asked
    // (`'skipped'`): its summary says whether the transcript is final, so a finished one queues
    // the transcript and an unfinished one waits, decided again on every change of the row
    // (rows are only written for a new or changed encounter). Every update of a row bumps
    // `content_seq`, so that a fetch in flight cannot mark the newer state done.
    static SQL: LazyLock<String> = LazyLock::new(|| {
        format!(
            "INSERT INTO documents (document_id, encounter_id, position, schema_type, title, status,
                 workflow_variant, audio_duration_seconds, first_seen_at, changed_at, detail_state,
                 transcript_state, organization_id)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?9, {}, ?10) {DOCUMENT_SEEN_AGAIN}",
            new_document_work!("?4", "?6")
        )
    });
    let mut upsert = conn.prepare_cached(&SQL)?;
    for (position, d) in rec.documents.iter().enumerate() {
        upsert.execute(params![
            d.document_id,
            rec.encounter_id,
            position as i64,
            d.schema_type,
            d.title,
            d.status,
            d.workflow_variant,
            d.audio_duration_seconds,
            now,
            rec.organization_id,
        ])?;
    }
    if is_new {
        // Documents reference their encounter, so a new encounter has no earlier documents to
        // re-fetch or mark as gone.
        return Ok(());
    }
    // The encounter changed, and a note's text or a transcript can change without its summary
    // doing so: its documents are queued again (`requeue_changed_documents`).
    conn.prepare_cached(concat!(
        "UPDATE documents SET ",
        super::super::requeue_changed_documents!(),
        " WHERE encounter_id = ?1 AND removed_at IS NULL"
    ))?
    .execute([&rec.encounter_id])?;
    // What changed may be what failed: its dead letters need not wait.
    conn.prepare_cached(
        "UPDATE dead_letters SET next_attempt_at_ns = NULL
          WHERE encounter_id = ?1 AND next_attempt_at_ns IS NOT NULL",
    )?
    .execute([&rec.encounter_id])?;
    // Documents that left the encounter's list are marked, never deleted.
    let current: HashSet<&str> = rec.documents.iter().map(|d| d.document_id.as_str()).collect();
    let mut stored = conn
        .prepare_cached("SELECT document_id FROM documents WHERE encounter_id = ?1 AND removed_at IS NULL")?;
    let gone: Vec<String> = stored
        .query_map([&rec.encounter_id], |r| r.get::<_, String>(0))?
        .filter(|id| id.as_ref().map_or(true, |id| !current.contains(id.as_str())))
        .collect::<rusqlite::Result<_>>()?;
    let mut mark =
        conn.prepare_cached("UPDATE documents SET removed_at = ?2, changed_at = ?2 WHERE document_id = ?1")?;
    for id in gone {
        mark.execute(params![id, now])?;
    }
    Ok(())
}
