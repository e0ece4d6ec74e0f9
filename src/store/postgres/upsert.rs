//! Idempotent upserts of a page of encounters, patients and document summaries on PostgreSQL, in
//! the writer's transaction, and the content work a new or changed document needs — the rules of
//! `store::sqlite::upsert`, applied to the whole page at once: one read of the stored hashes, then
//! one `INSERT … SELECT … FROM unnest(…) ON CONFLICT DO UPDATE` per table for the records that
//! are new or changed. An identical record is not written at all (no new row version, no dead
//! tuple), and every `DO UPDATE` also carries a `WHERE` that skips a row that would not change.
//!
//! A statement may not update one row twice, while SQLite's loop may meet an encounter (or a
//! document, moved between encounters while the sync paged) twice in one page. The page is
//! therefore cut into rounds in which every encounter and document appears once, applied in
//! order: the result is the loop's, record after record, with one exception that does not
//! matter: when a document moves between two encounters of one round and the page lists the
//! one it left first, SQLite bumps its `content_seq` once more (the counter only has to change
//! when the document may have; both backends bump it at least once).

use std::collections::{HashMap, HashSet};

use postgres::GenericClient;
use time::OffsetDateTime;

use super::{ledger, privacy};
use crate::store::{
    EncounterRecord, IdCollision, IdKind, PageCounts, PatientRecord, Removal, WindowCompletion,
};
use crate::timefmt::unix_nanos;

/// Writes one page of encounters, the removals a window found, and, when given, the completion
/// of the window, in the caller's transaction: a crash leaves all or nothing.
pub fn commit_page(
    tx: &mut impl GenericClient,
    records: &[EncounterRecord],
    removals: &[Removal],
    completion: Option<&WindowCompletion>,
    now: OffsetDateTime,
) -> anyhow::Result<PageCounts> {
    let mut counts = PageCounts::default();
    if let Some(refused) = collision(tx, records)? {
        counts.refused = Some(refused);
        return Ok(counts);
    }
    if !records.is_empty() {
        let purged = privacy::purged_ranges(tx)?;
        for round in rounds(records) {
            upsert_round(tx, &round, &purged, now, &mut counts)?;
        }
    }
    if !removals.is_empty() {
        let ids: Vec<&str> = removals.iter().map(|r| r.encounter_id.as_str()).collect();
        let reasons: Vec<&str> = removals.iter().map(|r| r.reason.as_str()).collect();
        counts.removed += tx.execute(
            "UPDATE encounters e SET removed_at = $3, removed_reason = r.reason, changed_at = $3
               FROM unnest($1::text[], $2::text[]) AS r(encounter_id, reason)
              WHERE e.encounter_id = r.encounter_id AND e.removed_at IS NULL",
            &[&ids, &reasons, &now],
        )?;
    }
    if let Some(c) = completion {
        ledger::record_window(tx, c, now)?;
    }
    Ok(counts)
}

/// The first ID of `records` (one clinic's page) that the warehouse holds for another clinic:
/// an encounter (live or removed), a document of another clinic's encounter, or a patient
/// another clinic's row holds, with an encounter of it, under another name or date of birth
/// where both are known (one patient seen at two clinics keeps one row, which only its own
/// clinic's records write).
/// Nothing more is asked in a warehouse without another clinic's encounters.
fn collision(
    tx: &mut impl GenericClient,
    records: &[EncounterRecord],
) -> anyhow::Result<Option<IdCollision>> {
    let Some(first) = records.first() else {
        return Ok(None);
    };
    let org = first.organization_id.as_str();
    let shared: bool = tx
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM encounters WHERE organization_id < $1)
                 OR EXISTS (SELECT 1 FROM encounters WHERE organization_id > $1)",
            &[&org],
        )?
        .try_get(0)?;
    if !shared {
        return Ok(None);
    }
    let encounters: Vec<&str> = records.iter().map(|r| r.encounter_id.as_str()).collect();
    let documents: Vec<&str> = records
        .iter()
        .flat_map(|r| r.documents.iter().map(|d| d.document_id.as_str()))
        .collect();
    let patients: Vec<&PatientRecord> = records.iter().filter_map(|r| r.patient.as_ref()).collect();
    let column = |f: fn(&PatientRecord) -> Option<&str>| -> Vec<Option<&str>> {
        patients.iter().map(|p| f(p)).collect()
    };
    let found_rows = [
        (
            IdKind::Encounter,
            tx.query(
                "SELECT encounter_id, organization_id FROM encounters
                  WHERE encounter_id = ANY($1::text[]) AND organization_id <> $2",
                &[&encounters, &org],
            )?,
        ),
        (
            IdKind::Document,
            tx.query(
                "SELECT d.document_id, e.organization_id
                   FROM documents d JOIN encounters e ON e.encounter_id = d.encounter_id
                  WHERE d.document_id = ANY($1::text[]) AND e.organization_id <> $2",
                &[&documents, &org],
            )?,
        ),
        (
            IdKind::Patient,
            tx.query(
                "SELECT p.patient_id, p.organization_id
                   FROM unnest($1::text[], $3::text[], $4::text[], $5::text[])
                        AS u(patient_id, first_name, last_name, date_of_birth)
                   JOIN patients p ON p.patient_id = u.patient_id
                  WHERE p.organization_id <> $2
                    AND (p.first_name <> u.first_name OR p.last_name <> u.last_name
                         OR p.date_of_birth <> u.date_of_birth)
                    AND EXISTS (SELECT 1 FROM encounters e WHERE e.patient_id = p.patient_id
                                   AND e.organization_id = p.organization_id)",
                &[
                    &column(|p| Some(&p.patient_id)),
                    &org,
                    &column(|p| p.first_name.as_deref()),
                    &column(|p| p.last_name.as_deref()),
                    &column(|p| p.date_of_birth.as_deref()),
                ],
            )?,
        ),
    ];
    // Every colliding ID of the page, by kind, with the organization_id holding it.
    let mut held: HashMap<(IdKind, String), String> = HashMap::new();
    for (kind, rows) in found_rows {
        for row in rows {
            held.insert((kind, row.try_get(0)?), row.try_get(1)?);
        }
    }
    let first_held = records.iter().find_map(|rec| {
        let at = |kind: IdKind, id: &str| {
            held.get(&(kind, id.to_owned()))
                .map(|h| (kind, id.to_owned(), rec, h))
        };
        at(IdKind::Encounter, &rec.encounter_id)
            .or_else(|| {
                rec.documents
                    .iter()
                    .find_map(|d| at(IdKind::Document, &d.document_id))
            })
            .or_else(|| {
                rec.patient
                    .as_ref()
                    .and_then(|p| at(IdKind::Patient, &p.patient_id))
            })
    });
    let Some((kind, id, rec, holder)) = first_held else {
        return Ok(None);
    };
    let holder: String = tx
        .query_one(
            "SELECT coalesce((SELECT organization FROM organizations WHERE organization_id = $1), $1)",
            &[holder],
        )?
        .try_get(0)?;
    Ok(Some(IdCollision {
        kind,
        id,
        encounter_id: rec.encounter_id.clone(),
        holder,
    }))
}

/// Consecutive runs of `records` in which no encounter and no document appears twice.
fn rounds(records: &[EncounterRecord]) -> Vec<Vec<&EncounterRecord>> {
    let mut rounds: Vec<Vec<&EncounterRecord>> = Vec::new();
    let mut encounters: HashSet<&str> = HashSet::new();
    let mut documents: HashSet<&str> = HashSet::new();
    for rec in records {
        let clashes = encounters.contains(rec.encounter_id.as_str())
            || rec
                .documents
                .iter()
                .any(|d| documents.contains(d.document_id.as_str()));
        if clashes || rounds.is_empty() {
            rounds.push(Vec::new());
            encounters.clear();
            documents.clear();
        }
        encounters.insert(&rec.encounter_id);
        documents.extend(rec.documents.iter().map(|d| d.document_id.as_str()));
        if let Some(round) = rounds.last_mut() {
            round.push(rec);
        }
    }
    rounds
}

/// Classifies each record of a round against what is stored (new, changed, revived, unchanged,
/// or purged and not stored), then writes the new and changed ones.
fn upsert_round(
    tx: &mut impl GenericClient,
    round: &[&EncounterRecord],
    purged: &[(i64, i64)],
    now: OffsetDateTime,
    counts: &mut PageCounts,
) -> anyhow::Result<()> {
    let ids: Vec<&str> = round.iter().map(|r| r.encounter_id.as_str()).collect();
    let mut stored: HashMap<String, (String, bool)> = HashMap::with_capacity(ids.len());
    for row in tx.query(
        "SELECT encounter_id, content_hash, removed_at IS NOT NULL FROM encounters
          WHERE encounter_id = ANY($1::text[])",
        &[&ids],
    )? {
        stored.insert(row.try_get(0)?, (row.try_get(1)?, row.try_get(2)?));
    }
    // Live stored encounters whose hash differs: the same record all the same when their stored
    // JSON says what the new one does (rendered another way, hashed by an earlier release, which
    // hashed the bytes as received, stored with signed links by an earlier release, or changed
    // only in what the privacy policy does not keep); then only the hash and the JSON are
    // brought up to date (the links go).
    let differing: Vec<&str> = round
        .iter()
        .filter(|r| {
            stored
                .get(&r.encounter_id)
                .is_some_and(|(hash, removed)| !removed && *hash != r.content_hash)
        })
        .map(|r| r.encounter_id.as_str())
        .collect();
    let mut rehash: Vec<&EncounterRecord> = Vec::new();
    if !differing.is_empty() {
        let mut raw: HashMap<String, String> = HashMap::with_capacity(differing.len());
        for row in tx.query(
            "SELECT encounter_id, raw_json FROM encounters WHERE encounter_id = ANY($1::text[])",
            &[&differing],
        )? {
            raw.insert(row.try_get(0)?, row.try_get(1)?);
        }
        rehash = round
            .iter()
            .copied()
            .filter(|r| {
                raw.get(&r.encounter_id)
                    .is_some_and(|stored| crate::store::same_content(stored, &r.raw_json))
            })
            .collect();
        if !rehash.is_empty() {
            let ids: Vec<&str> = rehash.iter().map(|r| r.encounter_id.as_str()).collect();
            let hashes: Vec<&str> = rehash.iter().map(|r| r.content_hash.as_str()).collect();
            let json: Vec<&str> = rehash.iter().map(|r| r.raw_json.as_str()).collect();
            tx.execute(
                "UPDATE encounters e SET content_hash = u.content_hash, raw_json = u.raw_json
                   FROM unnest($1::text[], $2::text[], $3::text[]) AS u (encounter_id, content_hash, raw_json)
                  WHERE e.encounter_id = u.encounter_id",
                &[&ids, &hashes, &json],
            )?;
        }
    }
    // (record, is_new) for every record to write.
    let mut writes: Vec<(&EncounterRecord, bool)> = Vec::new();
    for rec in round {
        let created_ns = unix_nanos(rec.created_at);
        match stored.get(&rec.encounter_id) {
            // A purged encounter stays purged, whatever revisit or backfill lists it again.
            None if purged
                .iter()
                .any(|&(from, to)| from <= created_ns && created_ns < to) =>
            {
                counts.purged += 1;
            }
            None => {
                counts.new += 1;
                writes.push((rec, true));
            }
            Some((content_hash, removed)) => {
                if *removed {
                    counts.revived += 1;
                }
                let same = *content_hash == rec.content_hash
                    || rehash.iter().any(|r| r.encounter_id == rec.encounter_id);
                if same && !removed {
                    counts.unchanged += 1;
                } else {
                    // Upstream wins, even with an older `updated_at`: this observation was read
                    // after the stored one (the writer applies them in the order they were read).
                    counts.changed += 1;
                    writes.push((rec, false));
                }
            }
        }
    }
    if writes.is_empty() {
        return Ok(());
    }
    upsert_patients(tx, &writes, now)?;
    upsert_encounters(tx, &writes, now)?;
    upsert_documents(tx, &writes, now)
}

fn upsert_patients(
    tx: &mut impl GenericClient,
    writes: &[(&EncounterRecord, bool)],
    now: OffsetDateTime,
) -> anyhow::Result<()> {
    // One row per patient, as the loop would leave it: a field a later record leaves out keeps
    // the earlier one, and the first record's organization is the one a new row gets.
    let mut order: Vec<&str> = Vec::new();
    let mut merged: HashMap<&str, [Option<&str>; 4]> = HashMap::new();
    for (rec, _) in writes {
        let Some(p) = &rec.patient else { continue };
        let fields = [
            p.first_name.as_deref(),
            p.last_name.as_deref(),
            p.date_of_birth.as_deref(),
            Some(rec.organization_id.as_str()),
        ];
        match merged.get_mut(p.patient_id.as_str()) {
            Some(m) => {
                for (kept, new) in m.iter_mut().take(3).zip(fields) {
                    *kept = new.or(*kept);
                }
            }
            None => {
                order.push(&p.patient_id);
                merged.insert(&p.patient_id, fields);
            }
        }
    }
    if order.is_empty() {
        return Ok(());
    }
    let column = |i: usize| -> Vec<Option<&str>> { order.iter().map(|id| merged[id][i]).collect() };
    // A response without names (a key lacking patients:read, or a terse record) must not erase
    // names learnt earlier, so absent fields keep what is stored. Only the row's own clinic
    // writes it (another clinic listing the same patient fills nothing in), or, once that
    // clinic holds no encounter of it, the clinic that lists it, which takes it over.
    tx.execute(
        "INSERT INTO patients AS p (patient_id, first_name, last_name, date_of_birth, first_seen_at, changed_at,
             organization_id)
         SELECT u.patient_id, u.first_name, u.last_name, u.date_of_birth, $6, $6, u.organization_id
           FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[])
                AS u(patient_id, first_name, last_name, date_of_birth, organization_id)
         ON CONFLICT (patient_id) DO UPDATE SET
             first_name = coalesce(EXCLUDED.first_name, p.first_name),
             last_name = coalesce(EXCLUDED.last_name, p.last_name),
             date_of_birth = coalesce(EXCLUDED.date_of_birth, p.date_of_birth),
             changed_at = EXCLUDED.changed_at, organization_id = EXCLUDED.organization_id
         WHERE (coalesce(EXCLUDED.first_name, p.first_name) IS DISTINCT FROM p.first_name
                OR coalesce(EXCLUDED.last_name, p.last_name) IS DISTINCT FROM p.last_name
                OR coalesce(EXCLUDED.date_of_birth, p.date_of_birth) IS DISTINCT FROM p.date_of_birth)
           AND (p.organization_id IS NULL OR p.organization_id = EXCLUDED.organization_id
                OR NOT EXISTS (SELECT 1 FROM encounters e WHERE e.patient_id = p.patient_id
                                  AND e.organization_id = p.organization_id))",
        &[&order, &column(0), &column(1), &column(2), &column(3), &now],
    )?;
    Ok(())
}

fn upsert_encounters(
    tx: &mut impl GenericClient,
    writes: &[(&EncounterRecord, bool)],
    now: OffsetDateTime,
) -> anyhow::Result<()> {
    let recs: Vec<&EncounterRecord> = writes.iter().map(|(r, _)| *r).collect();
    let ids: Vec<&str> = recs.iter().map(|r| r.encounter_id.as_str()).collect();
    let orgs: Vec<&str> = recs.iter().map(|r| r.organization_id.as_str()).collect();
    let types: Vec<Option<&str>> = recs.iter().map(|r| r.encounter_type.as_deref()).collect();
    let statuses: Vec<Option<&str>> = recs.iter().map(|r| r.status.as_deref()).collect();
    let created: Vec<OffsetDateTime> = recs.iter().map(|r| r.created_at).collect();
    let updated: Vec<OffsetDateTime> = recs.iter().map(|r| r.updated_at).collect();
    let service: Vec<Option<OffsetDateTime>> = recs.iter().map(|r| r.date_of_service).collect();
    let patients: Vec<Option<&str>> = recs
        .iter()
        .map(|r| r.patient.as_ref().map(|p| p.patient_id.as_str()))
        .collect();
    let created_ns: Vec<i64> = recs.iter().map(|r| unix_nanos(r.created_at)).collect();
    let updated_ns: Vec<i64> = recs.iter().map(|r| unix_nanos(r.updated_at)).collect();
    let hashes: Vec<&str> = recs.iter().map(|r| r.content_hash.as_str()).collect();
    let raw: Vec<&str> = recs.iter().map(|r| r.raw_json.as_str()).collect();
    tx.execute(
        "INSERT INTO encounters AS e (encounter_id, organization_id, encounter_type, status, created_at,
             updated_at, date_of_service, patient_id, removed_at, removed_reason, created_at_ns,
             updated_at_ns, content_hash, raw_json, first_seen_at, changed_at)
         SELECT u.encounter_id, u.organization_id, u.encounter_type, u.status, u.created_at, u.updated_at,
                u.date_of_service, u.patient_id, NULL, NULL, u.created_at_ns, u.updated_at_ns,
                u.content_hash, u.raw_json, $13, $13
           FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::timestamptz[], $6::timestamptz[],
                       $7::timestamptz[], $8::text[], $9::bigint[], $10::bigint[], $11::text[], $12::text[])
                AS u(encounter_id, organization_id, encounter_type, status, created_at, updated_at,
                     date_of_service, patient_id, created_at_ns, updated_at_ns, content_hash, raw_json)
         ON CONFLICT (encounter_id) DO UPDATE SET
             organization_id = EXCLUDED.organization_id, encounter_type = EXCLUDED.encounter_type,
             status = EXCLUDED.status, created_at = EXCLUDED.created_at,
             updated_at = EXCLUDED.updated_at, date_of_service = EXCLUDED.date_of_service,
             patient_id = EXCLUDED.patient_id, removed_at = NULL, removed_reason = NULL,
             created_at_ns = EXCLUDED.created_at_ns, updated_at_ns = EXCLUDED.updated_at_ns,
             content_hash = EXCLUDED.content_hash, raw_json = EXCLUDED.raw_json,
             changed_at = EXCLUDED.changed_at
         WHERE e.content_hash IS DISTINCT FROM EXCLUDED.content_hash OR e.removed_at IS NOT NULL",
        &[
            &ids,
            &orgs,
            &types,
            &statuses,
            &created,
            &updated,
            &service,
            &patients,
            &created_ns,
            &updated_ns,
            &hashes,
            &raw,
            &now,
        ],
    )?;
    Ok(())
}

fn upsert_documents(
    tx: &mut impl GenericClient,
    writes: &[(&EncounterRecord, bool)],
    now: OffsetDateTime,
) -> anyhow::Result<()> {
    // What each document needs is decided here, from the summary (docs/content.md has the
    // table; `store::sqlite::upsert` says why each rule is what it is). A note or an unknown type
    // is asked once on first sight, and again when it moves; an ambient document's detail is
    // never asked ('skipped'): a finished one queues its transcript, an unfinished one waits.
    // Every update of a row bumps `content_seq`, so that a fetch in flight cannot mark the newer
    // state done.
    let mut ids: Vec<&str> = Vec::new();
    let mut encounters: Vec<&str> = Vec::new();
    let mut positions: Vec<i64> = Vec::new();
    let mut types: Vec<&str> = Vec::new();
    let mut titles: Vec<Option<&str>> = Vec::new();
    let mut statuses: Vec<Option<&str>> = Vec::new();
    let mut variants: Vec<Option<&str>> = Vec::new();
    let mut durations: Vec<Option<f64>> = Vec::new();
    let mut orgs: Vec<&str> = Vec::new();
    for (rec, _) in writes {
        // A document listed twice in one encounter is written once, as its last listing says.
        let last: HashMap<&str, usize> = rec
            .documents
            .iter()
            .enumerate()
            .map(|(i, d)| (d.document_id.as_str(), i))
            .collect();
        for (position, d) in rec.documents.iter().enumerate() {
            if last.get(d.document_id.as_str()) != Some(&position) {
                continue;
            }
            ids.push(&d.document_id);
            encounters.push(&rec.encounter_id);
            positions.push(position as i64);
            types.push(&d.schema_type);
            titles.push(d.title.as_deref());
            statuses.push(d.status.as_deref());
            variants.push(d.workflow_variant.as_deref());
            durations.push(d.audio_duration_seconds);
            orgs.push(&rec.organization_id);
        }
    }
    if !ids.is_empty() {
        tx.execute(
            concat!(
                "INSERT INTO documents AS d (document_id, encounter_id, position, schema_type, title, status,
                 workflow_variant, audio_duration_seconds, first_seen_at, changed_at, detail_state,
                 transcript_state, organization_id)
             SELECT u.document_id, u.encounter_id, u.position, u.schema_type, u.title, u.status,
                    u.workflow_variant, u.audio_duration_seconds, $10, $10,
                    CASE WHEN u.schema_type = 'ambient_transcript' THEN 'skipped' ELSE 'pending' END,
                    CASE WHEN u.schema_type <> 'ambient_transcript' THEN NULL
                         WHEN ",
                super::super::may_be_final_sql!("u.status"),
                " THEN 'pending' ELSE 'waiting' END,
                    u.organization_id
               FROM unnest($1::text[], $2::text[], $3::bigint[], $4::text[], $5::text[], $6::text[],
                           $7::text[], $8::float8[], $9::text[])
                    AS u(document_id, encounter_id, position, schema_type, title, status, workflow_variant,
                         audio_duration_seconds, organization_id)
             ON CONFLICT (document_id) DO UPDATE SET
                 encounter_id = EXCLUDED.encounter_id, position = EXCLUDED.position,
                 schema_type = EXCLUDED.schema_type, title = EXCLUDED.title, status = EXCLUDED.status,
                 workflow_variant = EXCLUDED.workflow_variant,
                 audio_duration_seconds = EXCLUDED.audio_duration_seconds, removed_at = NULL,
                 changed_at = EXCLUDED.changed_at,
                 content_seq = d.content_seq + 1,
                 detail_state = CASE
                     WHEN d.schema_type IS DISTINCT FROM EXCLUDED.schema_type THEN EXCLUDED.detail_state
                     WHEN d.schema_type <> 'ambient_transcript'
                          AND d.encounter_id IS DISTINCT FROM EXCLUDED.encounter_id
                          AND d.detail_state IN ('done', 'unavailable', 'not_ready') THEN 'pending'
                     ELSE d.detail_state END,
                 detail_attempts = CASE
                     WHEN d.schema_type IS DISTINCT FROM EXCLUDED.schema_type
                          OR d.encounter_id IS DISTINCT FROM EXCLUDED.encounter_id
                     THEN 0 ELSE d.detail_attempts END,
                 detail_next_at_ns = CASE
                     WHEN d.schema_type IS DISTINCT FROM EXCLUDED.schema_type
                          OR d.encounter_id IS DISTINCT FROM EXCLUDED.encounter_id
                     THEN NULL ELSE d.detail_next_at_ns END,
                 transcript_state = CASE
                     WHEN EXCLUDED.schema_type = 'ambient_transcript'
                          OR d.schema_type IS DISTINCT FROM EXCLUDED.schema_type
                     THEN EXCLUDED.transcript_state ELSE d.transcript_state END,
                 transcript_attempts = CASE
                     WHEN EXCLUDED.schema_type = 'ambient_transcript'
                          OR d.schema_type IS DISTINCT FROM EXCLUDED.schema_type
                     THEN 0 ELSE d.transcript_attempts END,
                 transcript_next_at_ns = CASE
                     WHEN EXCLUDED.schema_type = 'ambient_transcript'
                          OR d.schema_type IS DISTINCT FROM EXCLUDED.schema_type
                     THEN NULL ELSE d.transcript_next_at_ns END,
                 audio_state = CASE
                     WHEN d.encounter_id IS DISTINCT FROM EXCLUDED.encounter_id
                          AND d.audio_state IN ('unavailable', 'not_ready')
                     THEN NULL ELSE d.audio_state END,
                 audio_attempts = CASE
                     WHEN d.encounter_id IS DISTINCT FROM EXCLUDED.encounter_id
                          AND d.audio_state IN ('unavailable', 'not_ready')
                     THEN 0 ELSE d.audio_attempts END,
                 audio_next_at_ns = CASE
                     WHEN d.encounter_id IS DISTINCT FROM EXCLUDED.encounter_id
                          AND d.audio_state IN ('unavailable', 'not_ready')
                     THEN NULL ELSE d.audio_next_at_ns END
             WHERE d.encounter_id IS DISTINCT FROM EXCLUDED.encounter_id
                OR d.position IS DISTINCT FROM EXCLUDED.position
                OR d.schema_type IS DISTINCT FROM EXCLUDED.schema_type
                OR d.title IS DISTINCT FROM EXCLUDED.title
                OR d.status IS DISTINCT FROM EXCLUDED.status
                OR d.workflow_variant IS DISTINCT FROM EXCLUDED.workflow_variant
                OR d.audio_duration_seconds IS DISTINCT FROM EXCLUDED.audio_duration_seconds
                OR d.removed_at IS NOT NULL"
            ),
            &[
                &ids,
                &encounters,
                &positions,
                &types,
                &titles,
                &statuses,
                &variants,
                &durations,
                &orgs,
                &now,
            ],
        )?;
    }
    // Changed encounters (a new one has no earlier documents to re-fetch or mark as gone): a
    // note's text or a transcript can change without its summary doing so, so a note is asked
    // again (unsupported types excepted), and so is a finished ambient document's transcript.
    let changed: Vec<&str> = writes
        .iter()
        .filter(|(_, is_new)| !is_new)
        .map(|(r, _)| r.encounter_id.as_str())
        .collect();
    if changed.is_empty() {
        return Ok(());
    }
    tx.execute(
        concat!(
            "UPDATE documents SET ",
            super::super::requeue_changed_documents!(),
            " WHERE encounter_id = ANY($1::text[]) AND removed_at IS NULL"
        ),
        &[&changed],
    )?;
    // What changed may be what failed: their dead letters need not wait.
    tx.execute(
        "UPDATE dead_letters SET next_attempt_at_ns = NULL
          WHERE encounter_id = ANY($1::text[]) AND next_attempt_at_ns IS NOT NULL",
        &[&changed],
    )?;
    // Documents that left their encounter's list are marked, never deleted. Every document the
    // round lists now sits under the encounter that lists it, so a live document of a changed
    // encounter that the round does not list has left that encounter's list.
    tx.execute(
        "UPDATE documents SET removed_at = $3, changed_at = $3
          WHERE encounter_id = ANY($1::text[]) AND removed_at IS NULL
            AND NOT (document_id = ANY($2::text[]))",
        &[&changed, &ids, &now],
    )?;
    Ok(())
}
