//! Staged backfill pages: how a backfill writes a million encounters at the rate it writes the
//! first hundred thousand (docs/operations.md, "How a backfill is written"; the measurements are
//! in BENCHMARKS.md, "What bounds ingest").
//!
//! Upserting record by record touches a leaf of every random-key index (the encounter, document
//! and patient keys, documents by encounter, history by encounter, encounters by patient) per
//! record; once those indexes outgrow the page cache, each touch is a read, a log write and a
//! checkpoint write. A page the warehouse holds nothing near — no stored encounter of its
//! organization created within the page's range, which is what a backfill reads — is instead
//! appended to `staged_encounters`/`staged_documents` in the order it was read (unless the
//! warehouse holds another clinic's encounters: then every page is upserted at once and checked
//! for IDs the other clinic holds, see `upsert::commit_page`), and [`merge`]
//! writes the staged rows into the warehouse table by table, encounters and documents in key
//! order, so that an index page is written once per merge rather than once per record; those
//! orders come from indexes, and the one sort a merge makes holds document IDs only
//! ([`bulk_statements`]).
//!
//! The invariant: **staged rows are invisible to no one who asks the writer.** Every operation
//! of the writer's connection that reads or writes the warehouse's rows merges first
//! ([`merge_before`]; the removal check reads staged IDs as stored ones; bookkeeping — runs,
//! windows, backfills, audits, organization state — does not, so that it works on a full disk
//! and between a backfill's windows), every cycle's end merges, a page outside a backfill
//! merges before its own upserts (observations stay in the order they were read), and 100,000
//! staged encounters merge at once; what a crash left is merged by the next writer's first
//! operation. Analysts on their own connections see a staged encounter once it is merged:
//! within one merge of 100,000 records during a backfill, at the end of every cycle otherwise.
//!
//! A merge gives the warehouse exactly what record-by-record upserts of the same pages in the
//! same order would have: patients take every staged observation in read order; an encounter
//! that is already stored, was staged more than once, or shares a document with another staged
//! encounter goes through [`upsert_encounter`] record by record in read order (the unit tests
//! compare both paths table by table).

use rusqlite::{Connection, MAIN_DB, params};
use time::OffsetDateTime;

use super::upsert::{DOCUMENT_SEEN_AGAIN, PATIENT_SEEN_AGAIN, Patient, new_document_work, upsert_encounter};
use crate::store::{DocumentRecord, EncounterRecord, PageCounts, PatientRecord};
use crate::timefmt::{format_stored, unix_nanos};

/// A merge runs once this many encounters are staged: enough that a merge writes each leaf of
/// the encounter, history and document-by-encounter indexes of a million-encounter warehouse
/// about once per ten records, few enough that a backfill's rows reach analysts every few seconds.
const MERGE_AT: i64 = if cfg!(test) { 500 } else { 100_000 };

/// A page this short is staged only while others are (a backfill's last page of a window);
/// alone it is a live cycle's page, upserted at once.
const STAGE_MIN_RECORDS: usize = 50;

/// Whether `records` (a page without removals) is staged instead of upserted: it is a
/// backfill's (see [`STAGE_MIN_RECORDS`]), of one organization, and no stored encounter of that
/// organization was created within the page's range.
pub(super) fn stageable(conn: &Connection, records: &[EncounterRecord]) -> rusqlite::Result<bool> {
    let Some(first) = records.first() else {
        return Ok(false);
    };
    if records.iter().any(|r| r.organization_id != first.organization_id) {
        return Ok(false);
    }
    if records.len() < STAGE_MIN_RECORDS && !any_staged(conn)? {
        return Ok(false);
    }
    let (low, high) = records.iter().fold((i64::MAX, i64::MIN), |(lo, hi), r| {
        let ns = unix_nanos(r.created_at);
        (lo.min(ns), hi.max(ns))
    });
    let stored: bool = conn
        .prepare_cached(
            "SELECT EXISTS (SELECT 1 FROM encounters
              WHERE organization_id = ?1 AND created_at_ns BETWEEN ?2 AND ?3)",
        )?
        .query_row(params![first.organization_id, low, high], |r| r.get(0))?;
    Ok(!stored)
}

fn any_staged(conn: &Connection) -> rusqlite::Result<bool> {
    conn.prepare_cached("SELECT EXISTS (SELECT 1 FROM staged_encounters)")?
        .query_row([], |r| r.get(0))
}

/// Appends a page read at `now` to the staging tables, counting each record as a page of
/// upserts would: new, changed (staged before with other content), unchanged (staged before
/// with the same content: not staged again) or purged (in a purged range and not stored: never
/// synced again). Merges when [`MERGE_AT`] encounters are staged.
pub(super) fn stage(
    conn: &Connection,
    records: &[EncounterRecord],
    purged: &[(i64, i64)],
    now: &str,
    counts: &mut PageCounts,
) -> rusqlite::Result<()> {
    let mut last_staged = conn.prepare_cached(
        "SELECT content_hash FROM staged_encounters WHERE encounter_id = ?1 ORDER BY seq DESC LIMIT 1",
    )?;
    let mut stored =
        conn.prepare_cached("SELECT EXISTS (SELECT 1 FROM encounters WHERE encounter_id = ?1)")?;
    let mut encounter = conn.prepare_cached(
        "INSERT INTO staged_encounters (encounter_id, organization_id, encounter_type, status,
             created_at_ns, updated_at_ns, date_of_service_ns, patient_id, first_name, last_name,
             date_of_birth, content_hash, raw_json, observed_at, created_at, updated_at,
             date_of_service)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17)",
    )?;
    let mut document = conn.prepare_cached(
        "INSERT INTO staged_documents (encounter_seq, position, document_id, schema_type, title,
             status, workflow_variant, audio_duration_seconds)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
    )?;
    for rec in records {
        let created_ns = unix_nanos(rec.created_at);
        let last: Option<String> = last_staged
            .query_row([&rec.encounter_id], |r| r.get(0))
            .map(Some)
            .or_else(|e| match e {
                rusqlite::Error::QueryReturnedNoRows => Ok(None),
                e => Err(e),
            })?;
        match last {
            Some(hash) if hash == rec.content_hash => {
                counts.unchanged += 1;
                continue;
            }
            Some(_) => counts.changed += 1,
            // A purged encounter stays purged, unless it is stored (its `created_at` moved into
            // the range): then the merge upserts it as a page outside a backfill would.
            None if purged
                .iter()
                .any(|&(from, to)| from <= created_ns && created_ns < to)
                && !stored.query_row([&rec.encounter_id], |r| r.get::<_, bool>(0))? =>
            {
                counts.purged += 1;
                continue;
            }
            None => counts.new += 1,
        }
        let p = rec.patient.as_ref();
        encounter.execute(params![
            rec.encounter_id,
            rec.organization_id,
            rec.encounter_type,
            rec.status,
            created_ns,
            unix_nanos(rec.updated_at),
            rec.date_of_service.map(unix_nanos),
            p.map(|p| &p.patient_id),
            p.and_then(|p| p.first_name.as_ref()),
            p.and_then(|p| p.last_name.as_ref()),
            p.and_then(|p| p.date_of_birth.as_ref()),
            rec.content_hash,
            rec.raw_json,
            now,
            format_stored(rec.created_at),
            format_stored(rec.updated_at),
            rec.date_of_service.map(format_stored),
        ])?;
        let seq = conn.last_insert_rowid();
        for (position, d) in rec.documents.iter().enumerate() {
            document.execute(params![
                seq,
                position as i64,
                d.document_id,
                d.schema_type,
                d.title,
                d.status,
                d.workflow_variant,
                d.audio_duration_seconds,
            ])?;
        }
    }
    let staged: i64 = conn
        .prepare_cached("SELECT coalesce(max(seq), 0) FROM staged_encounters")?
        .query_row([], |r| r.get(0))?;
    // `seq` restarts at 1 after each merge empties the table, so the largest is the count.
    if staged >= MERGE_AT {
        merge(conn)?;
    }
    Ok(())
}

/// Merges whatever is staged, on the writer's connection, before an operation that reads or
/// writes the warehouse: inside the caller's transaction if one is open, else in its own.
/// Nothing on a read-only connection (an analyst's, `status`): it cannot write, and sees what
/// was merged.
pub fn merge_before(conn: &Connection) -> anyhow::Result<()> {
    if conn.is_readonly(MAIN_DB)? || !any_staged(conn)? {
        return Ok(());
    }
    if !conn.is_autocommit() {
        return Ok(merge(conn)?);
    }
    let tx = conn.unchecked_transaction()?;
    merge(&tx)?;
    tx.commit()?;
    Ok(())
}

/// Writes every staged row into the warehouse and empties the staging tables (see the module
/// documentation for the order and why it equals upserting the pages one by one).
pub(super) fn merge(conn: &Connection) -> rusqlite::Result<()> {
    if !any_staged(conn)? {
        return Ok(());
    }
    let started = std::time::Instant::now();
    // Encounters the bulk statements cannot take: already stored, staged more than once, or
    // sharing a document with another staged encounter (a document that moved between them).
    // A document staged twice under one encounter ID belongs to an encounter staged twice, taken
    // record by record anyway, so counting a document's staged rows finds the rest without
    // reading the staged encounters (a sort of the staged document IDs, nothing else).
    let [mark, patients, encounters, history, documents] = bulk_statements();
    conn.prepare_cached(&mark)?.execute([])?;
    // Patients: every staged observation, in read order. Not sorted by patient ID: the sort
    // would hold every staged name and date of birth in SQLite's sorter (as much memory as the
    // page cache, the rest spilled to temporary files), while the patient key is the smallest
    // of the warehouse's keys and stays in the page cache.
    conn.prepare_cached(&patients)?.execute([])?;
    // The encounters that need it, record by record in read order.
    let one_by_one: Vec<(String, EncounterRecord)> = {
        let mut stmt = conn.prepare_cached(
            "SELECT seq, encounter_id, organization_id, encounter_type, status, created_at_ns,
                    updated_at_ns, date_of_service_ns, patient_id, first_name, last_name,
                    date_of_birth, content_hash, raw_json, observed_at
               FROM staged_encounters WHERE one_by_one = 1 ORDER BY seq",
        )?;
        let rows = stmt.query_map([], |r| {
            let seq: i64 = r.get(0)?;
            let patient_id: Option<String> = r.get(8)?;
            Ok((
                seq,
                r.get::<_, String>(14)?,
                EncounterRecord {
                    encounter_id: r.get(1)?,
                    organization_id: r.get(2)?,
                    encounter_type: r.get(3)?,
                    status: r.get(4)?,
                    created_at: instant(r.get(5)?)?,
                    updated_at: instant(r.get(6)?)?,
                    date_of_service: r.get::<_, Option<i64>>(7)?.map(instant).transpose()?,
                    patient: match patient_id {
                        Some(patient_id) => Some(PatientRecord {
                            patient_id,
                            first_name: r.get(9)?,
                            last_name: r.get(10)?,
                            date_of_birth: r.get(11)?,
                        }),
                        None => None,
                    },
                    documents: Vec::new(),
                    content_hash: r.get(12)?,
                    raw_json: r.get(13)?,
                },
            ))
        })?;
        let mut documents = conn.prepare_cached(
            "SELECT document_id, schema_type, title, status, workflow_variant, audio_duration_seconds
               FROM staged_documents WHERE encounter_seq = ?1 ORDER BY position",
        )?;
        let mut out = Vec::new();
        for row in rows {
            let (seq, observed_at, mut rec) = row?;
            rec.documents = documents
                .query_map([seq], |r| {
                    Ok(DocumentRecord {
                        document_id: r.get(0)?,
                        schema_type: r.get(1)?,
                        title: r.get(2)?,
                        status: r.get(3)?,
                        workflow_variant: r.get(4)?,
                        audio_duration_seconds: r.get(5)?,
                    })
                })?
                .collect::<rusqlite::Result<_>>()?;
            out.push((observed_at, rec));
        }
        out
    };
    // Their counts were given when they were staged.
    let mut ignored = PageCounts::default();
    for (observed_at, rec) in &one_by_one {
        upsert_encounter(conn, rec, &[], observed_at, Patient::AlreadyWritten, &mut ignored)?;
    }
    // Everything else is new: encounters in key order, then their `created` history rows in
    // the same order, read back from the rows just inserted (SQLite gives a new row the largest
    // rowid plus one, so they are the rows past the largest before, adjacent and in cache,
    // where the staged rows would be read in random order again), then their documents in the
    // encounters' order.
    //
    // Before each statement the pages earlier ones dirtied are written to the log: SQLite would
    // otherwise spill them while the statement runs, copying each first to the statement's
    // rollback journal, a temporary file (raw JSON, names and dates of birth included; 6 MB per
    // 10,000 encounters).
    let before: i64 = conn.query_row("SELECT coalesce(max(rowid), 0) FROM encounters", [], |r| r.get(0))?;
    conn.cache_flush()?;
    let inserted = conn.prepare_cached(&encounters)?.execute([])?;
    conn.cache_flush()?;
    conn.prepare_cached(&history)?.execute([before])?;
    conn.cache_flush()?;
    conn.prepare_cached(&documents)?.execute([])?;
    conn.execute_batch("DELETE FROM staged_documents; DELETE FROM staged_encounters;")?;
    tracing::debug!(
        staged = inserted + one_by_one.len(),
        one_by_one = one_by_one.len(),
        elapsed_ms = started.elapsed().as_millis() as u64,
        "merged staged encounters"
    );
    Ok(())
}

/// The merge's set-wise statements, in the order [`merge`] runs them: mark the encounters that
/// go record by record, then patients, encounters, their `created` history rows and documents.
/// A sorter or a temporary table may take as much memory again as the page cache and spills
/// what does not fit to temporary files, so the writes read
/// the staged rows in the order an index gives, straight into their tables (an INSERT trigger
/// would make SQLite copy the whole selection to a temporary table first), and the only sort
/// (finding a document staged twice) holds document IDs, never a name or a date of birth (a
/// unit test holds all of it).
fn bulk_statements() -> [String; 5] {
    [
        "UPDATE staged_encounters SET one_by_one = 1 WHERE encounter_id IN (
             SELECT encounter_id FROM staged_encounters GROUP BY encounter_id HAVING count(*) > 1
             UNION ALL
             SELECT s.encounter_id FROM (SELECT DISTINCT encounter_id FROM staged_encounters) s
              WHERE EXISTS (SELECT 1 FROM encounters e WHERE e.encounter_id = s.encounter_id)
             UNION ALL
             SELECT s.encounter_id FROM staged_documents d JOIN staged_encounters s ON s.seq = d.encounter_seq
              WHERE d.document_id IN (
                  SELECT document_id FROM staged_documents GROUP BY document_id HAVING count(*) > 1))"
            .to_owned(),
        format!(
            "INSERT INTO patients (patient_id, first_name, last_name, date_of_birth, first_seen_at,
                 changed_at, organization_id)
             SELECT patient_id, first_name, last_name, date_of_birth, observed_at, observed_at,
                    organization_id
               FROM staged_encounters WHERE patient_id IS NOT NULL ORDER BY seq
             {PATIENT_SEEN_AGAIN}"
        ),
        "INSERT INTO encounters (encounter_id, organization_id, encounter_type, status, created_at,
             updated_at, date_of_service, patient_id, removed_at, removed_reason, created_at_ns,
             updated_at_ns, content_hash, raw_json, first_seen_at, changed_at)
         SELECT encounter_id, organization_id, encounter_type, status, created_at,
                updated_at, date_of_service, patient_id, NULL, NULL,
                created_at_ns, updated_at_ns, content_hash, raw_json, observed_at, observed_at
           FROM staged_encounters WHERE one_by_one = 0 ORDER BY encounter_id"
            .to_owned(),
        "INSERT INTO encounter_history (encounter_id, organization_id, observed_at, change, status,
             updated_at)
         SELECT encounter_id, organization_id, changed_at, 'created', status, updated_at
           FROM encounters WHERE rowid > ?1 ORDER BY rowid"
            .to_owned(),
        format!(
            "INSERT INTO documents (document_id, encounter_id, position, schema_type, title, status,
                 workflow_variant, audio_duration_seconds, first_seen_at, changed_at, detail_state,
                 transcript_state, organization_id)
             SELECT d.document_id, s.encounter_id, d.position, d.schema_type, d.title, d.status,
                    d.workflow_variant, d.audio_duration_seconds, s.observed_at, s.observed_at,
                    {}, s.organization_id
               FROM staged_encounters s JOIN staged_documents d ON d.encounter_seq = s.seq
              WHERE s.one_by_one = 0 ORDER BY s.encounter_id, s.seq, d.position
             {DOCUMENT_SEEN_AGAIN}",
            new_document_work!("d.schema_type", "d.status")
        ),
    ]
}

fn instant(ns: i64) -> rusqlite::Result<OffsetDateTime> {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ns))
        .map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::time::Duration;

    use rusqlite::Connection;
    use time::macros::datetime;

    use super::*;
    use crate::store::sqlite::{commit_page, live_ids_in_range, open_reader, open_writer};

    /// Encounter `n` of organization `org_1`, created `n` seconds after a fixed instant (or at
    /// `created_s`), with two documents `doc_<n>_a`/`_b` unless given, and patient
    /// `pat_<n % 7>`; `version` stands for its content.
    fn rec(n: u32, version: &str) -> EncounterRecord {
        rec_at(n, i64::from(n), version)
    }

    fn rec_at(n: u32, created_s: i64, version: &str) -> EncounterRecord {
        let created = datetime!(2026-03-01 08:00:00.000000123 UTC) + time::Duration::seconds(created_s);
        let doc = |suffix: &str, schema_type: &str| DocumentRecord {
            document_id: format!("doc_{n}_{suffix}"),
            schema_type: schema_type.to_owned(),
            title: Some(format!("title {version}")),
            status: Some(
                if version == "v1" {
                    "in_progress"
                } else {
                    "completed"
                }
                .to_owned(),
            ),
            workflow_variant: None,
            audio_duration_seconds: Some(f64::from(n)),
        };
        EncounterRecord {
            encounter_id: format!("enc_{n:05}"),
            organization_id: "org_1".to_owned(),
            encounter_type: Some("visit".to_owned()),
            status: Some(format!("status {version}")),
            created_at: created,
            updated_at: created + time::Duration::milliseconds(i64::from(version.len() as u32)),
            date_of_service: n.is_multiple_of(3).then_some(created),
            patient: (!n.is_multiple_of(5)).then(|| PatientRecord {
                patient_id: format!("pat_{}", n % 7),
                first_name: n.is_multiple_of(2).then(|| format!("First{version}")),
                last_name: Some("Last".to_owned()),
                date_of_birth: None,
            }),
            documents: vec![doc("a", "document"), doc("b", "ambient_transcript")],
            content_hash: format!("hash {n} {version}"),
            raw_json: format!(r#"{{"n":{n},"v":"{version}"}}"#),
        }
    }

    fn page(range: std::ops::Range<u32>, version: &str) -> Vec<EncounterRecord> {
        range.map(|n| rec(n, version)).collect()
    }

    fn staged(conn: &Connection) -> i64 {
        conn.query_row("SELECT count(*) FROM staged_encounters", [], |r| r.get(0))
            .unwrap()
    }

    /// Every row of the tables a page writes, in a stable order (history without its ids).
    fn tables(conn: &Connection) -> Vec<Vec<String>> {
        [
            "SELECT * FROM patients ORDER BY patient_id",
            "SELECT * FROM encounters ORDER BY encounter_id",
            "SELECT document_id, encounter_id, position, schema_type, title, status, workflow_variant,
                    audio_duration_seconds, removed_at, first_seen_at, changed_at, detail_state,
                    transcript_state, organization_id, content_seq
               FROM documents ORDER BY document_id",
            "SELECT encounter_id, observed_at, change, status, updated_at, removed_reason
               FROM encounter_history ORDER BY encounter_id, history_id",
        ]
        .iter()
        .map(|sql| {
            crate::store::sqlite::rows_as_text(conn, sql)
                .unwrap()
                .into_iter()
                .map(|row| format!("{row:?}"))
                .collect()
        })
        .collect()
    }

    /// The same pages, in the same order, into two warehouses: one through `commit_page` (which
    /// stages what it can), one upserted record by record. Answers both connections and the
    /// totals each path counted (new, changed, unchanged, purged).
    fn both_ways(
        dir: &Path,
        before: &[EncounterRecord],
        pages: &[Vec<EncounterRecord>],
    ) -> [(Connection, [u64; 4]); 2] {
        let mut out = Vec::new();
        for (name, staged_path) in [("staged.db", true), ("direct.db", false)] {
            let mut conn = open_writer(&dir.join(name), Duration::from_secs(1)).unwrap();
            let start = datetime!(2026-03-01 09:00:00 UTC);
            conn.execute(
                "INSERT INTO purges (purged_at, range_start, range_end, range_start_ns, range_end_ns,
                     reason, encounters, documents, transcripts, turns, recordings, history_rows)
                 VALUES ('x', 'a', 'b', ?1, ?2, 'range', 0, 0, 0, 0, 0, 0)",
                [unix_nanos(start), unix_nanos(start + time::Duration::minutes(10))],
            )
            .unwrap();
            let mut totals = [0; 4];
            let mut write =
                |conn: &mut Connection, records: &[EncounterRecord], at: i64, staged_path: bool| {
                    let now = datetime!(2026-03-02 00:00:00 UTC) + time::Duration::seconds(at);
                    let tx = conn.transaction().unwrap();
                    let c = if staged_path {
                        commit_page(&tx, records, &[], None, now).unwrap()
                    } else {
                        let purged = super::super::purged_ranges(&tx).unwrap();
                        let mut c = PageCounts::default();
                        for r in records {
                            upsert_encounter(&tx, r, &purged, &format_stored(now), Patient::Upsert, &mut c)
                                .unwrap();
                        }
                        c
                    };
                    tx.commit().unwrap();
                    for (t, v) in totals.iter_mut().zip([c.new, c.changed, c.unchanged, c.purged]) {
                        *t += v;
                    }
                };
            write(&mut conn, before, 0, false);
            for (i, p) in pages.iter().enumerate() {
                write(&mut conn, p, i as i64 + 1, staged_path);
            }
            if staged_path {
                assert!(staged(&conn) > 0, "the test's pages were staged");
                merge_before(&conn).unwrap();
                assert_eq!(staged(&conn), 0);
            }
            out.push((conn, totals));
        }
        let direct = out.pop().unwrap();
        [out.pop().unwrap(), direct]
    }

    /// A sort or a temporary table in a merge takes as much memory again as the page cache and
    /// spills to temporary files: the writes read the staged rows in an index's order straight
    /// into their tables, and the one sort, in the marking statement, is of document IDs.
    #[test]
    fn the_merge_sorts_only_document_ids_and_copies_no_staged_row_to_a_temporary_table() {
        let dir = tempfile::tempdir().unwrap();
        let conn = open_writer(&dir.path().join("w.db"), Duration::from_secs(1)).unwrap();
        // Column `column` of each row of `sql` prefixed with `explain` (parameters bound to 0).
        let explain = |explain: &str, sql: &str, column: usize| -> Vec<String> {
            let mut stmt = conn.prepare(&format!("{explain} {sql}")).unwrap();
            let zeros = std::iter::repeat_n(0, stmt.parameter_count());
            stmt.query_map(rusqlite::params_from_iter(zeros), |r| {
                let value: rusqlite::types::Value = r.get(column)?;
                Ok(match value {
                    rusqlite::types::Value::Text(t) => t,
                    rusqlite::types::Value::Integer(i) => i.to_string(),
                    other => format!("{other:?}"),
                })
            })
            .unwrap()
            .map(Result::unwrap)
            .collect()
        };
        for sql in bulk_statements() {
            let plan = explain("EXPLAIN QUERY PLAN", &sql, 3);
            assert!(!plan.is_empty());
            let sorts = plan.iter().filter(|step| step.contains("TEMP B-TREE")).count();
            if sql.starts_with("UPDATE staged_encounters SET one_by_one") {
                let grouped_ids = plan
                    .windows(2)
                    .filter(|w| w[0] == "SCAN staged_documents" && w[1] == "USE TEMP B-TREE FOR GROUP BY")
                    .count();
                assert_eq!((sorts, grouped_ids), (1, 1), "{plan:#?}");
            } else {
                assert_eq!(sorts, 0, "{plan:#?} in the plan of {sql}");
            }
            // The bytecode: every temporary table or sorter holds one value per entry (an ID,
            // a rowid, a constant of an IN list), never a copy of staged rows. SQLite copies an
            // `INSERT … SELECT` into a table with an INSERT trigger to a temporary table first
            // (raw JSON, names and dates of birth included, until migration V8 dropped them).
            let opcodes = explain("EXPLAIN", &sql, 1);
            let columns = explain("EXPLAIN", &sql, 3);
            let keys = explain("EXPLAIN", &sql, 5);
            let temporary: Vec<String> = (0..opcodes.len())
                .filter(|&i| matches!(opcodes[i].as_str(), "OpenEphemeral" | "SorterOpen"))
                .map(|i| format!("{} {} {}", opcodes[i], columns[i], keys[i]))
                .collect();
            let copies: Vec<&String> = temporary
                .iter()
                .filter(|t| !t.ends_with(" 0 Null") && !t.contains(" 1 k(1,"))
                .collect();
            assert!(copies.is_empty(), "{temporary:?} in the bytecode of {sql}");
        }
    }

    #[test]
    fn a_merge_stores_exactly_what_record_by_record_upserts_store() {
        let dir = tempfile::tempdir().unwrap();
        // Stored before the backfill, far from its range; 9,001 is listed again later with a
        // `created_at` moved into the backfill's range.
        let before = vec![rec_at(9_000, 90_000, "v1"), rec_at(9_001, 90_001, "v1")];
        let mut moved_doc = rec(200, "v1");
        moved_doc.documents.push(rec(10, "v1").documents[0].clone());
        let mut renamed = rec(201, "v1");
        renamed.patient.as_mut().unwrap().first_name = Some("Renamed".to_owned());
        let mut third = page(202..250, "v1");
        third.extend([moved_doc, renamed, rec_at(9_001, 250, "v2")]);
        let pages = vec![
            page(0..60, "v1"),
            // Listed again: 50..55 identical, 55..60 changed; 60..110 new.
            page(50..55, "v1")
                .into_iter()
                .chain(page(55..110, "v2"))
                .collect(),
            // A short last page of a window, staged because others are.
            page(110..120, "v1"),
            third,
            // Created in the purged range (09:00 + 0..10 min): never stored.
            (0..60)
                .map(|i| rec_at(3_000 + i, 3_600 + i64::from(i), "v1"))
                .collect(),
        ];
        let [(staged_conn, staged_counts), (direct_conn, direct_counts)] =
            both_ways(dir.path(), &before, &pages);
        assert_eq!(tables(&staged_conn), tables(&direct_conn));
        // The moved encounter counts as new when staged (its page's range held nothing) and as
        // changed upserted; everything else counts the same.
        assert_eq!(
            staged_counts[0] + staged_counts[1],
            direct_counts[0] + direct_counts[1]
        );
        assert_eq!(staged_counts[2..], direct_counts[2..]);
        assert_eq!(direct_counts, [2 + 60 + 50 + 10 + 50, 5 + 1, 5, 60]);
        let documents: i64 = staged_conn
            .query_row(
                "SELECT count(*) FROM documents WHERE encounter_id = 'enc_00200'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(documents, 3, "the moved document belongs to its new encounter");
    }

    #[test]
    fn a_live_page_is_upserted_at_once_and_merges_what_was_staged_before_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = open_writer(&dir.path().join("w.db"), Duration::from_secs(1)).unwrap();
        let now = datetime!(2026-03-02 00:00:00 UTC);
        let tx = conn.transaction().unwrap();
        // A short page alone is a live cycle's: upserted.
        commit_page(&tx, &page(0..3, "v1"), &[], None, now).unwrap();
        assert_eq!(staged(&tx), 0);
        // A full page in a range the warehouse holds nothing of: staged, yet a removal candidate.
        commit_page(&tx, &page(100..200, "v1"), &[], None, now).unwrap();
        assert_eq!(staged(&tx), 100);
        let ids = live_ids_in_range(
            &tx,
            "org_1",
            datetime!(2026-03-01 08:00:00 UTC),
            datetime!(2026-03-01 09:00:00 UTC),
        )
        .unwrap();
        assert_eq!(ids.len(), 103);
        // A page next to stored rows: what was staged is merged first, then it is upserted.
        commit_page(&tx, &page(2..60, "v2"), &[], None, now).unwrap();
        assert_eq!(staged(&tx), 0);
        let stored: i64 = tx
            .query_row("SELECT count(*) FROM encounters", [], |r| r.get(0))
            .unwrap();
        assert_eq!(stored, 160);
        tx.commit().unwrap();
    }

    #[test]
    fn staged_rows_merge_every_merge_at_records_and_after_a_crash_at_the_next_operation() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.db");
        let mut conn = open_writer(&path, Duration::from_secs(1)).unwrap();
        let now = datetime!(2026-03-02 00:00:00 UTC);
        let pages = (0..MERGE_AT as u32 + 150)
            .step_by(100)
            .map(|s| page(s..s + 100, "v1"));
        for p in pages {
            let tx = conn.transaction().unwrap();
            commit_page(&tx, &p, &[], None, now).unwrap();
            tx.commit().unwrap();
        }
        // One merge ran at MERGE_AT; the rest is staged, durable, and invisible to readers.
        let visible = |path: &Path| -> i64 {
            open_reader(path, Duration::from_secs(1))
                .unwrap()
                .query_row("SELECT count(*) FROM encounters", [], |r| r.get(0))
                .unwrap()
        };
        assert_eq!(visible(&path), MERGE_AT);
        assert_eq!(staged(&conn), 200);
        // `status` (on its own read-only connection) says what is staged apart.
        let status = |path: &Path| {
            use crate::store::Reader;
            open_reader(path, Duration::from_secs(1))
                .unwrap()
                .status(now, &[])
                .unwrap()
        };
        let before = status(&path);
        assert_eq!(
            (before.rows.encounters, before.rows.encounters_staged),
            (MERGE_AT, 200)
        );
        assert!(
            before.render().contains(&format!(
                "rows: {MERGE_AT} encounters (0 removed; 200 more read and staged, written at the next merge)"
            )),
            "{}",
            before.render()
        );
        // A crash: the connection goes away without a merge; the next writer's first
        // operation merges before it runs.
        drop(conn);
        let conn = open_writer(&path, Duration::from_secs(1)).unwrap();
        assert_eq!(staged(&conn), 200);
        use crate::store::{Backend, Reader};
        // Bookkeeping does not need the rows (and must work on a full disk)...
        assert_eq!(conn.start_run("default", "sync", now).unwrap(), 1);
        assert_eq!(staged(&conn), 200);
        // ...the first look at them merges.
        let ids = conn.live_count_in_range(Some("org_1"), 0, i64::MAX).unwrap();
        assert_eq!(ids, (MERGE_AT + 200) as u64);
        assert_eq!(staged(&conn), 0);
        assert_eq!(visible(&path), MERGE_AT + 200);
        let after = status(&path);
        assert_eq!(
            (after.rows.encounters, after.rows.encounters_staged),
            (MERGE_AT + 200, 0)
        );
        assert!(
            after
                .render()
                .contains(&format!("rows: {} encounters (0 removed),", MERGE_AT + 200))
        );
    }

    #[test]
    fn every_other_operation_of_the_writer_merges_first() {
        use crate::store::{Backend, Reader};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.db");
        let mut conn = open_writer(&path, Duration::from_secs(1)).unwrap();
        let tx = conn.transaction().unwrap();
        commit_page(
            &tx,
            &page(0..100, "v1"),
            &[],
            None,
            datetime!(2026-03-02 00:00:00 UTC),
        )
        .unwrap();
        tx.commit().unwrap();
        // A reader cannot merge and sees nothing yet.
        let reader = open_reader(&path, Duration::from_secs(1)).unwrap();
        assert_eq!(reader.table_counts().unwrap().encounters, 0);
        // The writer's own read merges, and the reader sees it all.
        assert_eq!(conn.table_counts().unwrap().encounters, 100);
        assert_eq!(reader.table_counts().unwrap().encounters, 100);
        assert_eq!(staged(&conn), 0);
        assert_eq!(conn.location(), Connection::path(&conn).unwrap());
    }
}
