//! Keeping only the PHI the partner decided to keep, on PostgreSQL (the rules of
//! `store::sqlite::privacy`): applying a (changed) privacy policy to rows already stored, and
//! purging encounters completely — rows, history, orphaned patients — with the purged range
//! recorded so that the sync never stores those encounters again. Recording files nothing
//! references any more are deleted.
//!
//! Removing PHI from the files: PostgreSQL never overwrites a row in place. A deleted or updated
//! row stays in the table's file as a dead tuple until VACUUM, and even plain VACUUM only marks
//! its space free (the bytes linger until reused); the same holds for the GIN search indexes and
//! TOAST. So after a purge, or a policy change that overwrote anything, every table it changed is
//! rewritten with `VACUUM (FULL, ANALYZE)`: new files holding only the live rows, indexes rebuilt,
//! the old files truncated at commit. What this cannot reach, and `docs/postgres.md` must say:
//! the server's WAL (`pg_wal`, and any WAL archive) holds the removed rows until the server
//! recycles it, and base backups, `pg_dump` files and replicas' own WAL and backups keep them
//! until they age out under the team's retention.
//!
//! `apply_privacy` and `purge` take the `Client` itself, not any `GenericClient`: VACUUM cannot
//! run inside a transaction block, so these two open their own transaction, commit it, then
//! rewrite the tables outside it.

use anyhow::Context;
use postgres::{Client, GenericClient};
use time::OffsetDateTime;

use crate::config::{BirthDate, PrivacyConfig};
use crate::store::PurgeCounts;
use crate::timefmt::unix_nanos;

const POLICY_KEY: &str = "privacy_policy";

/// Brings stored rows in line with `privacy` when the policy differs from the one last applied,
/// then rewrites the tables it changed (see the module's header: `VACUUM FULL` holds an
/// exclusive lock on each table while it rewrites it, so analysts' queries on those tables wait,
/// and it needs free disk space for a copy of the table). Returns whether a new policy was
/// applied.
///
/// `raw_json` is edited through `jsonb`, so an edited record's text comes back normalized (keys
/// reordered, whitespace dropped), as SQLite's JSON functions minify it; its `content_hash`
/// stays the hash of the record as received, so an unchanged record is not written again.
pub fn apply_privacy(db: &mut Client, privacy: &PrivacyConfig) -> anyhow::Result<bool> {
    let fingerprint = privacy.fingerprint();
    let applied: Option<String> = db
        .query_opt("SELECT value FROM sync_state WHERE name = $1", &[&POLICY_KEY])?
        .map(|r| r.try_get(0))
        .transpose()?;
    if applied.as_deref() == Some(fingerprint.as_str()) {
        return Ok(false);
    }
    let mut changed: Vec<&'static str> = Vec::new();
    let mut tx = db.transaction()?;
    let mut update = |table: &'static str, sql: &str| -> anyhow::Result<()> {
        let rows = tx
            .execute(sql, &[])
            .with_context(|| format!("cannot apply the privacy policy to {table}"))?;
        if rows > 0 && !changed.contains(&table) {
            changed.push(table);
        }
        Ok(())
    };
    if !privacy.patient_names {
        update(
            "patients",
            "UPDATE patients SET first_name = NULL, last_name = NULL
             WHERE first_name IS NOT NULL OR last_name IS NOT NULL",
        )?;
        update(
            "encounters",
            "UPDATE encounters
                SET raw_json = (raw_json::jsonb #- '{patient,first_name}' #- '{patient,last_name}')::text
              WHERE jsonb_typeof(raw_json::jsonb -> 'patient') = 'object'
                AND (raw_json::jsonb -> 'patient') ?| array['first_name', 'last_name']",
        )?;
    }
    match privacy.date_of_birth {
        BirthDate::Full => {}
        BirthDate::YearOnly => {
            update(
                "patients",
                "UPDATE patients SET date_of_birth = substr(date_of_birth, 1, 4)
                 WHERE length(date_of_birth) > 4",
            )?;
            update(
                "encounters",
                "UPDATE encounters
                    SET raw_json = jsonb_set(raw_json::jsonb, '{patient,date_of_birth}',
                                             to_jsonb(substr(raw_json::jsonb #>> '{patient,date_of_birth}', 1, 4)))::text
                  WHERE length(raw_json::jsonb #>> '{patient,date_of_birth}') > 4",
            )?;
        }
        BirthDate::Omit => {
            update(
                "patients",
                "UPDATE patients SET date_of_birth = NULL WHERE date_of_birth IS NOT NULL",
            )?;
            update(
                "encounters",
                "UPDATE encounters SET raw_json = (raw_json::jsonb #- '{patient,date_of_birth}')::text
                  WHERE jsonb_typeof(raw_json::jsonb -> 'patient') = 'object'
                    AND (raw_json::jsonb -> 'patient') ? 'date_of_birth'",
            )?;
        }
    }
    if !privacy.note_text {
        update(
            "documents",
            "UPDATE documents SET content_text = NULL WHERE content_text IS NOT NULL",
        )?;
    }
    if !privacy.transcript_text {
        update(
            "transcript_turns",
            "UPDATE transcript_turns SET text = NULL WHERE text IS NOT NULL",
        )?;
    }
    tx.execute(
        "INSERT INTO sync_state (name, value) VALUES ($1, $2)
         ON CONFLICT (name) DO UPDATE SET value = EXCLUDED.value",
        &[&POLICY_KEY, &fingerprint],
    )?;
    tx.commit()?;
    scrub(db, &changed)?;
    tracing::info!(policy = fingerprint, "privacy policy applied to stored rows");
    Ok(true)
}

/// Rewrites `tables` from their live rows only and refreshes their statistics
/// (`VACUUM (FULL, ANALYZE)`, one statement, outside any transaction): the dead row versions that
/// still hold removed text, in the tables, their TOAST and their indexes (the GIN search indexes
/// too), are left behind in the old files, which PostgreSQL truncates when the command ends.
///
/// It blocks: each table is locked ACCESS EXCLUSIVE while it is rewritten, so readers of that
/// table (the `charthero_readers` role's queries) wait for it, and it waits for queries already
/// running on it. It needs free space for a copy of each table and its indexes.
fn scrub(db: &mut Client, tables: &[&'static str]) -> anyhow::Result<()> {
    if tables.is_empty() {
        return Ok(());
    }
    db.batch_execute(&format!("VACUUM (FULL, ANALYZE) {}", tables.join(", ")))
        .with_context(|| format!("cannot rewrite {} to remove deleted data", tables.join(", ")))?;
    Ok(())
}

/// Removes every encounter created in `[start, end)` and everything hanging off it — rows,
/// history, orphaned patients — in one transaction, records the purge (counts only), which also
/// keeps the sync from bringing those encounters back, rewrites the tables it deleted from (see
/// [`scrub`]: it blocks their readers while it runs), and deletes the recording files under
/// `audio_dir` that nothing references any more.
pub fn purge(
    db: &mut Client,
    audio_dir: &std::path::Path,
    start: OffsetDateTime,
    end: OffsetDateTime,
    reason: &str,
    now: OffsetDateTime,
) -> anyhow::Result<PurgeCounts> {
    let range: [&(dyn postgres::types::ToSql + Sync); 2] = [&unix_nanos(start), &unix_nanos(end)];
    // Encounters go last, so this set stays the same through every statement before.
    let in_range = "encounter_id IN (SELECT encounter_id FROM encounters
                                     WHERE created_at_ns >= $1 AND created_at_ns < $2)";
    let doc_filter = format!("document_id IN (SELECT document_id FROM documents WHERE {in_range})");
    let mut tx = db.transaction()?;
    let files: Vec<String> = tx
        .query(&format!("SELECT path FROM recordings WHERE {doc_filter}"), &range)?
        .iter()
        .map(|r| r.try_get(0))
        .collect::<Result<_, _>>()?;
    let mut changed: Vec<&'static str> = Vec::new();
    let mut delete = |table: &'static str, filter: &str| -> anyhow::Result<u64> {
        let rows = tx
            .execute(&format!("DELETE FROM {table} WHERE {filter}"), &range)
            .with_context(|| format!("cannot purge {table}"))?;
        if rows > 0 {
            changed.push(table);
        }
        Ok(rows)
    };
    let mut counts = PurgeCounts {
        turns: delete("transcript_turns", &doc_filter)?,
        transcripts: delete("transcripts", &doc_filter)?,
        recordings: delete("recordings", &doc_filter)?,
        ..PurgeCounts::default()
    };
    delete("dead_letters", &doc_filter)?;
    counts.documents = delete("documents", in_range)?;
    counts.history_rows = delete("encounter_history", in_range)?;
    counts.encounters = delete("encounters", in_range)?;
    // A patient with no encounter left is PHI about nobody we keep.
    let orphans = tx.execute(
        "DELETE FROM patients p WHERE NOT EXISTS (SELECT 1 FROM encounters e WHERE e.patient_id = p.patient_id)",
        &[],
    )?;
    if orphans > 0 {
        changed.push("patients");
    }
    counts.orphaned_files = tx
        .query(
            "SELECT f.path FROM unnest($1::text[]) WITH ORDINALITY AS f(path, n)
              WHERE NOT EXISTS (SELECT 1 FROM recordings r WHERE r.path = f.path)
              ORDER BY f.n",
            &[&files],
        )?
        .iter()
        .map(|r| r.try_get(0))
        .collect::<Result<_, _>>()?;
    let count = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
    tx.execute(
        "INSERT INTO purges (purged_at, range_start, range_end, range_start_ns, range_end_ns, reason,
             encounters, documents, transcripts, turns, recordings, history_rows)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
        &[
            &now,
            &start,
            &end,
            &unix_nanos(start),
            &unix_nanos(end),
            &reason,
            &count(counts.encounters),
            &count(counts.documents),
            &count(counts.transcripts),
            &count(counts.turns),
            &count(counts.recordings),
            &count(counts.history_rows),
        ],
    )?;
    tx.commit()?;
    scrub(db, &changed)?;
    for file in &counts.orphaned_files {
        let path = audio_dir.join(file);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => anyhow::bail!("cannot delete recording {}: {e}", path.display()),
        }
    }
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

/// The `created_at` ranges `[start_ns, end_ns)` purged so far: encounters in them are never
/// stored again. Few rows (one per purge), read once per page.
pub fn purged_ranges(db: &mut impl GenericClient) -> anyhow::Result<Vec<(i64, i64)>> {
    Ok(db
        .query("SELECT range_start_ns, range_end_ns FROM purges", &[])?
        .iter()
        .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
        .collect::<Result<_, postgres::Error>>()?)
}

/// When the last retention purge ran.
pub fn last_retention_purge(db: &mut impl GenericClient) -> anyhow::Result<Option<OffsetDateTime>> {
    Ok(db
        .query_opt(
            "SELECT purged_at FROM purges WHERE reason = 'retention' ORDER BY purge_id DESC LIMIT 1",
            &[],
        )?
        .map(|r| r.try_get(0))
        .transpose()?)
}
