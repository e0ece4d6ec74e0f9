//! Keeping only the PHI the partner decided to keep: applying a (changed) privacy policy to rows
//! already stored, and purging encounters completely — rows, full-text entries, history, orphaned
//! patients. No bytes of removed PHI remain in the database or its WAL: `secure_delete` (on for
//! every writing connection) zeroes deleted cells, each search index is merged into one segment
//! (which drops its deleted entries; FTS5's own secure-delete is not used, since it makes the index
//! unreadable to SQLite before 3.42), then VACUUM and a truncating WAL checkpoint. Recording files
//! are returned for the caller to delete.

use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use time::OffsetDateTime;

use crate::config::{BirthDate, PrivacyConfig};
use crate::store::PurgeCounts;
use crate::timefmt::{format_stored, unix_nanos};

const POLICY_KEY: &str = "privacy_policy";

/// Brings stored rows in line with `privacy` when the policy differs from the one last applied.
/// Returns whether anything was applied.
pub fn apply_privacy(conn: &mut Connection, privacy: &PrivacyConfig) -> anyhow::Result<bool> {
    let fingerprint = privacy.fingerprint();
    let applied: Option<String> = conn
        .query_row(
            "SELECT value FROM sync_state WHERE name = ?1",
            [POLICY_KEY],
            |r| r.get(0),
        )
        .optional()?;
    if applied.as_deref() == Some(fingerprint.as_str()) {
        return Ok(false);
    }
    super::staging::merge_before(conn)?;
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    if !privacy.patient_names {
        tx.execute(
            "UPDATE patients SET first_name = NULL, last_name = NULL
             WHERE first_name IS NOT NULL OR last_name IS NOT NULL",
            [],
        )?;
        tx.execute(
            "UPDATE encounters SET raw_json = json_remove(raw_json, '$.patient.first_name', '$.patient.last_name')
             WHERE json_type(raw_json, '$.patient.first_name') IS NOT NULL
                OR json_type(raw_json, '$.patient.last_name') IS NOT NULL",
            [],
        )?;
    }
    match privacy.date_of_birth {
        BirthDate::Full => {}
        BirthDate::YearOnly => {
            tx.execute(
                "UPDATE patients SET date_of_birth = substr(date_of_birth, 1, 4)
                 WHERE length(date_of_birth) > 4",
                [],
            )?;
            tx.execute(
                "UPDATE encounters
                 SET raw_json = json_set(raw_json, '$.patient.date_of_birth',
                                         substr(json_extract(raw_json, '$.patient.date_of_birth'), 1, 4))
                 WHERE length(json_extract(raw_json, '$.patient.date_of_birth')) > 4",
                [],
            )?;
        }
        BirthDate::Omit => {
            tx.execute(
                "UPDATE patients SET date_of_birth = NULL WHERE date_of_birth IS NOT NULL",
                [],
            )?;
            tx.execute(
                "UPDATE encounters SET raw_json = json_remove(raw_json, '$.patient.date_of_birth')
                 WHERE json_type(raw_json, '$.patient.date_of_birth') IS NOT NULL",
                [],
            )?;
        }
    }
    if !privacy.note_text {
        tx.execute(
            "UPDATE documents SET content_text = NULL WHERE content_text IS NOT NULL",
            [],
        )?;
    }
    if !privacy.transcript_text {
        tx.execute(
            "UPDATE transcript_turns SET text = NULL WHERE text IS NOT NULL",
            [],
        )?;
    }
    tx.execute(
        "INSERT INTO sync_state (name, value) VALUES (?1, ?2)
         ON CONFLICT (name) DO UPDATE SET value = excluded.value",
        params![POLICY_KEY, fingerprint],
    )?;
    tx.commit()?;
    compact_search(conn)?;
    scrub(conn)?;
    tracing::info!(policy = fingerprint, "privacy policy applied to stored rows");
    Ok(true)
}

/// Merges each full-text index into a single segment ('optimize'). A deleted row's entries stay
/// in the segment that indexed it, cancelled by a delete marker in a newer one, until a merge
/// reaches them; merging everything into one segment drops both, and `secure_delete` zeroes the
/// pages of the old segments as they are freed. (Measured against 'rebuild', which re-tokenizes
/// all stored text: see BENCHMARKS.md, "Analysts' queries".)
pub(crate) fn compact_search(conn: &Connection) -> anyhow::Result<()> {
    conn.execute(
        "INSERT INTO transcript_turns_fts (transcript_turns_fts) VALUES ('optimize')",
        [],
    )?;
    conn.execute("INSERT INTO notes_fts (notes_fts) VALUES ('optimize')", [])?;
    Ok(())
}

/// Rewrites the database from its live content only (`VACUUM`), then checkpoints the WAL into it
/// and truncates it, so that neither free pages nor old page images keep removed data.
/// `secure_delete` already zeroes what is deleted; VACUUM also clears what SQLite moved around
/// (cells relocated while pages were rebalanced) before the data was removed.
fn scrub(conn: &Connection) -> anyhow::Result<()> {
    conn.execute_batch("VACUUM")?;
    let (busy, _, _): (i64, i64, i64) = conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
        Ok((r.get(0)?, r.get(1)?, r.get(2)?))
    })?;
    if busy != 0 {
        tracing::warn!(
            "a reader kept the WAL from being truncated; removed data may stay in the -wal file until the next checkpoint"
        );
    }
    Ok(())
}

/// Removes every encounter created in `[start, end)` and everything hanging off it — rows,
/// search entries, history, orphaned patients — records the purge (counts only), which also
/// keeps the sync from bringing those encounters back, and deletes the recording files under
/// `audio_dir` that nothing references any more.
pub fn purge(
    conn: &mut Connection,
    audio_dir: &std::path::Path,
    start: OffsetDateTime,
    end: OffsetDateTime,
    reason: &str,
    now: OffsetDateTime,
) -> anyhow::Result<PurgeCounts> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    tx.execute("DROP TABLE IF EXISTS temp.purge_ids", [])?;
    tx.execute(
        "CREATE TEMP TABLE purge_ids AS SELECT encounter_id FROM encounters
         WHERE created_at_ns >= ?1 AND created_at_ns < ?2",
        params![unix_nanos(start), unix_nanos(end)],
    )?;
    let doc_filter = "document_id IN (SELECT document_id FROM documents
                      WHERE encounter_id IN (SELECT encounter_id FROM temp.purge_ids))";
    let files: Vec<String> = tx
        .prepare(&format!("SELECT path FROM recordings WHERE {doc_filter}"))?
        .query_map([], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    let mut counts = PurgeCounts {
        turns: tx.execute(&format!("DELETE FROM transcript_turns WHERE {doc_filter}"), [])? as u64,
        transcripts: tx.execute(&format!("DELETE FROM transcripts WHERE {doc_filter}"), [])? as u64,
        recordings: tx.execute(&format!("DELETE FROM recordings WHERE {doc_filter}"), [])? as u64,
        ..PurgeCounts::default()
    };
    tx.execute(&format!("DELETE FROM dead_letters WHERE {doc_filter}"), [])?;
    // Webhook events are IDs only, but they are the purged encounters' IDs.
    tx.execute(
        &format!(
            "DELETE FROM webhook_events
              WHERE encounter_id IN (SELECT encounter_id FROM temp.purge_ids) OR {doc_filter}"
        ),
        [],
    )?;
    counts.documents = tx.execute(
        "DELETE FROM documents WHERE encounter_id IN (SELECT encounter_id FROM temp.purge_ids)",
        [],
    )? as u64;
    counts.history_rows = tx.execute(
        "DELETE FROM encounter_history WHERE encounter_id IN (SELECT encounter_id FROM temp.purge_ids)",
        [],
    )? as u64;
    counts.encounters = tx.execute(
        "DELETE FROM encounters WHERE encounter_id IN (SELECT encounter_id FROM temp.purge_ids)",
        [],
    )? as u64;
    // A patient with no encounter left is PHI about nobody we keep.
    tx.execute(
        "DELETE FROM patients WHERE NOT EXISTS (SELECT 1 FROM encounters e WHERE e.patient_id = patients.patient_id)",
        [],
    )?;
    tx.execute("DROP TABLE temp.purge_ids", [])?;
    for path in files {
        let still_used: bool = tx.query_row(
            "SELECT EXISTS (SELECT 1 FROM recordings WHERE path = ?1)",
            [&path],
            |r| r.get(0),
        )?;
        if !still_used {
            counts.orphaned_files.push(path);
        }
    }
    tx.execute(
        "INSERT INTO purges (purged_at, range_start, range_end, range_start_ns, range_end_ns, reason,
             encounters, documents, transcripts, turns, recordings, history_rows)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
        params![
            format_stored(now),
            format_stored(start),
            format_stored(end),
            unix_nanos(start),
            unix_nanos(end),
            reason,
            counts.encounters as i64,
            counts.documents as i64,
            counts.transcripts as i64,
            counts.turns as i64,
            counts.recordings as i64,
            counts.history_rows as i64,
        ],
    )?;
    tx.commit()?;
    let scrubbed = compact_search(conn).and_then(|()| scrub(conn));
    counts.delete_orphaned_files(audio_dir)?;
    scrubbed?;
    tracing::info!(
        encounters = counts.encounters,
        documents = counts.documents,
        transcripts = counts.transcripts,
        recordings = counts.recordings,
        reason,
        "purged"
    );
    Ok(counts)
}

/// Whether an encounter created at `created_at` lies in a purged range (and must not be stored).
/// The `created_at` ranges `[start_ns, end_ns)` purged so far: encounters in them are never
/// stored again. Few rows (one per purge), read once per page.
pub fn purged_ranges(conn: &Connection) -> rusqlite::Result<Vec<(i64, i64)>> {
    conn.prepare_cached("SELECT range_start_ns, range_end_ns FROM purges")?
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect()
}

/// When the last retention purge ran.
pub fn last_retention_purge(conn: &Connection) -> anyhow::Result<Option<OffsetDateTime>> {
    let text: Option<String> = conn
        .query_row(
            "SELECT purged_at FROM purges WHERE reason = 'retention' ORDER BY purge_id DESC LIMIT 1",
            [],
            |r| r.get(0),
        )
        .optional()?;
    text.map(|t| crate::timefmt::parse_rfc3339(&t).map_err(|e| anyhow::anyhow!("corrupt purge time: {e}")))
        .transpose()
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::time::Duration;

    use super::*;

    /// Whether the database file or its WAL holds `needle` anywhere, free pages included.
    fn on_disk(db: &Path, needle: &str) -> bool {
        let mut wal = db.as_os_str().to_owned();
        wal.push("-wal");
        [db.to_owned(), wal.into()].iter().any(|p| {
            let bytes = std::fs::read(p).unwrap_or_default();
            bytes.windows(needle.len()).any(|w| w == needle.as_bytes())
        })
    }

    /// Encounter `n` (created at second `n`) with a note and a transcript turn each holding
    /// `word`, among 300 others whose text is ordinary, so the indexes have many segments. The
    /// note's text arrives as the document route's does, by an update of the listed row.
    fn warehouse_with(path: &Path, word: &str) -> Connection {
        let conn = crate::store::sqlite::open_writer(path, Duration::from_secs(5)).unwrap();
        for n in 0..300_i64 {
            let (e, d, t) = (format!("e{n}"), format!("d{n}"), format!("t{n}"));
            let text = if n == 7 {
                format!("patient reports {word} since monday")
            } else {
                format!("patient reports cough number {n}")
            };
            conn.execute_batch(&format!(
                "INSERT INTO encounters VALUES ('{e}', 'o', NULL, NULL, 't', 't', NULL, NULL, NULL, NULL,
                     {ns}, 0, 'h', '{{}}', 't', 't');
                 INSERT INTO documents (document_id, encounter_id, position, schema_type,
                     first_seen_at, changed_at) VALUES ('{d}', '{e}', 0, 'document', 't', 't');
                 UPDATE documents SET content_text = '{text}' WHERE document_id = '{d}';
                 INSERT INTO documents (document_id, encounter_id, position, schema_type, first_seen_at,
                     changed_at) VALUES ('{t}', '{e}', 1, 'ambient_transcript', 't', 't');
                 INSERT INTO transcripts (document_id, encounter_id, turn_count, fetched_at)
                     VALUES ('{t}', '{e}', 1, 't');
                 INSERT INTO transcript_turns (document_id, turn_index, speaker, start_seconds,
                     end_seconds, text) VALUES ('{t}', 0, 'patient', 0, 1, '{text}');",
                ns = n * 1_000_000_000
            ))
            .unwrap();
        }
        conn
    }

    #[test]
    fn a_purge_leaves_no_search_term_of_the_purged_text_in_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.db");
        let word = "zanthoxylumcanary";
        let mut conn = warehouse_with(&path, word);
        assert!(
            on_disk(&path, "xylumcanary"),
            "the index never held the term: the test proves nothing"
        );
        let at = |s: i64| crate::timefmt::from_unix_nanos(s * 1_000_000_000);
        let counts = purge(&mut conn, dir.path(), at(5), at(10), "range", at(1_000)).unwrap();
        assert_eq!(counts.encounters, 5);
        // The index keeps answering for the rest, in the format SQLite 3.40 reads.
        let left: i64 = conn
            .query_row(
                "SELECT count(*) FROM notes_fts WHERE notes_fts MATCH 'cough'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(left, 299 - 4);
        drop(conn);
        // Terms are stored prefix-compressed: the tail of the word is what a leaf would keep.
        assert!(
            !on_disk(&path, "xylumcanary"),
            "the purged term is still in the file"
        );
        assert!(!on_disk(&path, "since monday"));
    }

    #[test]
    fn a_privacy_change_leaves_no_search_term_of_the_dropped_text_in_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.db");
        let word = "zanthoxylumcanary";
        let mut conn = warehouse_with(&path, word);
        let strict = PrivacyConfig {
            patient_names: true,
            date_of_birth: BirthDate::Full,
            note_text: false,
            transcript_text: false,
            retention: None,
        };
        assert!(apply_privacy(&mut conn, &strict).unwrap());
        drop(conn);
        assert!(
            !on_disk(&path, "xylumcanary"),
            "the dropped term is still in the file"
        );
        assert!(!on_disk(&path, "cough number"));
    }
}
