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
    // jsonb cannot hold U+0000: a record whose JSON escapes one (`\u0000`) is read as jsonb
    // with U+FFFD in its place (the text columns' replacement, `text.rs`), so editing it never
    // fails; the edited record's raw_json carries `\ufffd` there.
    if !privacy.patient_names {
        update(
            "patients",
            "UPDATE patients SET first_name = NULL, last_name = NULL
             WHERE first_name IS NOT NULL OR last_name IS NOT NULL",
        )?;
        update(
            "encounters",
            "UPDATE encounters
                SET raw_json = (replace(raw_json, '\\u0000', '\\ufffd')::jsonb #- '{patient,first_name}' #- '{patient,last_name}')::text
              WHERE jsonb_typeof(replace(raw_json, '\\u0000', '\\ufffd')::jsonb -> 'patient') = 'object'
                AND (replace(raw_json, '\\u0000', '\\ufffd')::jsonb -> 'patient') ?| array['first_name', 'last_name']",
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
                    SET raw_json = jsonb_set(replace(raw_json, '\\u0000', '\\ufffd')::jsonb, '{patient,date_of_birth}',
                                             to_jsonb(substr(replace(raw_json, '\\u0000', '\\ufffd')::jsonb #>> '{patient,date_of_birth}', 1, 4)))::text
                  WHERE length(replace(raw_json, '\\u0000', '\\ufffd')::jsonb #>> '{patient,date_of_birth}') > 4",
            )?;
        }
        BirthDate::Omit => {
            update(
                "patients",
                "UPDATE patients SET date_of_birth = NULL WHERE date_of_birth IS NOT NULL",
            )?;
            update(
                "encounters",
                "UPDATE encounters SET raw_json = (replace(raw_json, '\\u0000', '\\ufffd')::jsonb #- '{patient,date_of_birth}')::text
                  WHERE jsonb_typeof(replace(raw_json, '\\u0000', '\\ufffd')::jsonb -> 'patient') = 'object'
                    AND (replace(raw_json, '\\u0000', '\\ufffd')::jsonb -> 'patient') ? 'date_of_birth'",
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
    scrub(db, &changed, false)?;
    tracing::info!(policy = fingerprint, "privacy policy applied to stored rows");
    Ok(true)
}

/// Rewrites `tables` from their live rows only and refreshes their statistics
/// (`VACUUM (FULL, ANALYZE)`, one statement, outside any transaction): the dead row versions that
/// still hold removed text, in the tables, their TOAST and their indexes (the GIN search indexes
/// too), are left behind in the old files, which PostgreSQL truncates when the command ends.
/// When `ids_removed` (a purge), then `pg_statistic` the same way ([`STATISTICS`]): the
/// statistics the ANALYZE replaced stay in its file as dead rows, and those of the ID columns
/// hold sampled IDs (a privacy change removes text only, which collects no statistics).
///
/// It blocks: each table is locked ACCESS EXCLUSIVE while it is rewritten, so readers of that
/// table (the `charthero_readers` role's queries) wait for it, and it waits for queries already
/// running on it. It needs free space for a copy of each table and its indexes.
///
/// A long analyst query holding a lock on a table, or a session holding a snapshot from before
/// the removal ([`rewrite`]), would make it wait without end, so it waits at most
/// [`SCRUB_TIMEOUT`] for each, [`SCRUB_ATTEMPTS`] times (the statistics catalog, which every
/// query's planning reads, once and at most [`CATALOG_LOCK_TIMEOUT`] for its lock). If it still
/// cannot, the rows are already removed and only the rewrite remains: what is left is
/// recorded in `sync_state` (`scrub_pending`), a warning and the error say so, and the next
/// purge or privacy change (or `charthero-sync purge` of an empty range) rewrites it first.
fn scrub(db: &mut Client, tables: &[&'static str], ids_removed: bool) -> anyhow::Result<()> {
    scrub_waiting(db, tables, ids_removed, SCRUB_TIMEOUT)
}

/// How long a rewrite waits for older snapshots to end, and then for its table locks, per
/// attempt.
const SCRUB_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);
/// How many times a table rewrite is tried before it is left pending.
const SCRUB_ATTEMPTS: u32 = 3;
/// How long the statistics catalog's rewrite waits for its lock: queries queue behind it.
const CATALOG_LOCK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
/// The `sync_state` entry listing the tables whose rewrite is pending (comma-separated).
const SCRUB_PENDING: &str = "scrub_pending";
/// The catalog ANALYZE copies column values into (histogram bounds, most common values). The ID
/// columns keep their statistics, so the catalog rows each ANALYZE replaces hold IDs of rows
/// since removed until this catalog is rewritten too (the PHI columns collect none).
const STATISTICS: &str = "pg_statistic";
/// Whether this session may rewrite [`STATISTICS`]: a superuser, the database's owner (or a
/// role with its privileges), or on PostgreSQL 17 and later a member of `pg_maintain`.
/// PostgreSQL skips the catalog with a warning for anyone else. `check` reports it too.
pub(super) const MAY_REWRITE_STATISTICS: &str =
    "SELECT r.rolsuper OR pg_has_role(current_user, d.datdba, 'USAGE')
        OR EXISTS (SELECT 1 FROM pg_roles m WHERE m.rolname = 'pg_maintain'
                     AND pg_has_role(current_user, m.oid, 'USAGE'))
   FROM pg_database d, pg_roles r
  WHERE d.datname = current_database() AND r.rolname = current_user";

fn scrub_waiting(
    db: &mut Client,
    tables: &[&'static str],
    ids_removed: bool,
    timeout: std::time::Duration,
) -> anyhow::Result<()> {
    let pending: Option<String> = db
        .query_opt("SELECT value FROM sync_state WHERE name = $1", &[&SCRUB_PENDING])?
        .map(|r| r.try_get(0))
        .transpose()?;
    let mut all: Vec<&str> = tables.to_vec();
    // Only the tables a purge or a privacy change rewrites are ever recorded; anything else in
    // the entry is ignored.
    let known = [
        "encounters",
        "patients",
        "documents",
        "transcripts",
        "transcript_turns",
        "recordings",
        "dead_letters",
        "encounter_history",
        "webhook_events",
        STATISTICS,
    ];
    for t in pending.as_deref().unwrap_or("").split(',') {
        if let Some(k) = known.iter().find(|k| **k == t)
            && !all.contains(k)
        {
            all.push(k);
        }
    }
    // The tables first, then the statistics their ANALYZE just replaced.
    let statistics = all.contains(&STATISTICS) || (ids_removed && !all.is_empty());
    all.retain(|t| *t != STATISTICS);
    let mut steps = Vec::new();
    if !all.is_empty() {
        steps.push(all);
    }
    if statistics {
        steps.push(vec![STATISTICS]);
    }
    if steps.is_empty() {
        return Ok(());
    }
    let failed = rewrite_all(db, &steps, timeout).err();
    db.batch_execute("RESET lock_timeout")?;
    let Some((i, e)) = failed else {
        if pending.is_some() {
            db.execute("DELETE FROM sync_state WHERE name = $1", &[&SCRUB_PENDING])?;
        }
        return Ok(());
    };
    let left = steps[i..].concat();
    db.execute(
        "INSERT INTO sync_state (name, value) VALUES ($1, $2)
         ON CONFLICT (name) DO UPDATE SET value = EXCLUDED.value",
        &[&SCRUB_PENDING, &left.join(",")],
    )?;
    let how = match &e {
        Unfinished::Waited(why) => format!("{why} (end it, or run `charthero-sync purge` again later)"),
        Unfinished::Failed(_) => "failed".to_owned(),
    };
    let what = format!(
        "the rows are removed, but rewriting {} (VACUUM FULL, which removes the old row versions \
         still holding their text from the files) {how}; it is recorded as pending and the next \
         purge or privacy change does it first",
        left.join(", ")
    );
    tracing::warn!("{what}");
    Err(match e {
        Unfinished::Waited(_) => anyhow::anyhow!(what),
        Unfinished::Failed(e) => anyhow::Error::new(e).context(what),
    })
}

/// Runs the rewrites `steps` in order (see [`scrub`]); answers which one did not happen, and why.
fn rewrite_all(
    db: &mut Client,
    steps: &[Vec<&str>],
    timeout: std::time::Duration,
) -> Result<(), (usize, Unfinished)> {
    for (i, tables) in steps.iter().enumerate() {
        let at = |e: postgres::Error| (i, Unfinished::Failed(e));
        let step = tables.join(", ");
        let catalog = step == STATISTICS;
        if catalog
            && !db
                .query_one(MAY_REWRITE_STATISTICS, &[])
                .and_then(|r| r.try_get::<_, bool>(0))
                .map_err(at)?
        {
            tracing::warn!(
                "pg_statistic is not rewritten: only a superuser, the database's owner or (PostgreSQL 17 \
                 and later) a member of pg_maintain may, and this role is none of them. The planner \
                 statistics the rewrite replaced may still hold removed encounter, document and patient \
                 IDs (never names, birth dates or text) in its file until one of them runs VACUUM FULL \
                 pg_statistic (docs/postgres.md)"
            );
            continue;
        }
        let (attempts, lock) = if catalog {
            (1, CATALOG_LOCK_TIMEOUT.min(timeout))
        } else {
            (SCRUB_ATTEMPTS, timeout)
        };
        // Every removal this step is for committed before this: they have smaller transaction
        // IDs than the next one. (0 to 2 are never assigned: past a wraparound the next is 3.)
        let row = db
            .query_one(
                "SELECT greatest(3, txid_snapshot_xmax(txid_current_snapshot()) % 4294967296)::text,
                        coalesce(current_setting('vacuum_defer_cleanup_age', true), '0')::bigint",
                &[],
            )
            .map_err(at)?;
        let mark: String = row.try_get(0).map_err(at)?;
        let deferred: i64 = row.try_get(1).map_err(at)?;
        if deferred > 0 && !catalog {
            tracing::warn!(
                "the server keeps removed row versions for vacuum_defer_cleanup_age = {deferred} more \
                 transactions, which no session shows: the rewrite may copy the removed rows into the \
                 new files, where they stay until the next rewrite (docs/postgres.md)"
            );
        }
        db.batch_execute(&format!("SET lock_timeout = {}", lock.as_millis()))
            .map_err(at)?;
        for attempt in 1..=attempts {
            match rewrite(db, &step, &mark, timeout) {
                Ok(()) => break,
                Err(Unfinished::Waited(why)) if attempt < attempts => {
                    tracing::warn!(tables = %step, attempt, "the rewrite {why}; trying again");
                }
                Err(Unfinished::Waited(why)) if attempts > 1 => {
                    return Err((i, Unfinished::Waited(format!("{why}, {attempts} times"))));
                }
                Err(e) => return Err((i, e)),
            }
        }
    }
    Ok(())
}

/// Why a rewrite did not happen.
enum Unfinished {
    /// What it waited for was still held after its timeout (worth trying again): says what.
    Waited(String),
    Failed(postgres::Error),
}

impl From<postgres::Error> for Unfinished {
    fn from(e: postgres::Error) -> Self {
        Unfinished::Failed(e)
    }
}

/// Rewrites `step`, tables from their live rows with fresh statistics or the statistics
/// catalog, once no other session can still see what was removed before transaction ID `mark`.
///
/// VACUUM FULL copies a removed row version into the new file, bytes and all, while a snapshot
/// older than its removal may still read it: an analyst's query or transaction that began
/// before, a `pg_dump`, a replica's feedback. So it first waits, at most `timeout`, until no
/// session, replication slot or prepared transaction holds one ([`older_snapshots`]).
fn rewrite(db: &mut Client, step: &str, mark: &str, timeout: std::time::Duration) -> Result<(), Unfinished> {
    let catalog = step == STATISTICS;
    let deadline = std::time::Instant::now() + timeout;
    let mut told = false;
    loop {
        let older = older_snapshots(db, mark, catalog)?;
        if older.is_empty() {
            break;
        }
        if !told {
            tracing::info!(
                tables = %step,
                "the rewrite waits, at most {} s, for sessions that began before the removal and may \
                 still read the removed rows: {}",
                timeout.as_secs(),
                older.join(", ")
            );
            told = true;
        }
        if std::time::Instant::now() >= deadline {
            return Err(Unfinished::Waited(format!(
                "waited {} s for sessions that began before the removal and may still read the removed \
                 rows (VACUUM FULL would copy them): {}",
                timeout.as_secs(),
                older.join(", ")
            )));
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let statement = if catalog {
        "VACUUM FULL pg_statistic".to_owned()
    } else {
        format!("VACUUM (FULL, ANALYZE) {step}")
    };
    db.batch_execute(&statement).map_err(|e| {
        if e.code().is_some_and(|c| c.code() == "55P03") {
            Unfinished::Waited(format!(
                "could not get its table locks within its lock timeout (a long query holds them): {e}"
            ))
        } else {
            Unfinished::Failed(e)
        }
    })
}

/// Who may still read row versions removed before transaction ID `mark`, as `pid 123 (alice)`,
/// `replication slot s`, `prepared transaction g`:
/// - sessions of this database, and processes of none (replication senders: a replica's
///   feedback holds every database's horizon), whose snapshot or transaction is older, except
///   lazy VACUUMs (PostgreSQL leaves them out);
/// - transactions of any database holding an older transaction ID, prepared ones included:
///   the rewrite's own snapshot counts them as running, and its own horizon is its snapshot's;
/// - any replication slot holding an older horizon (for a catalog also the logical slots'
///   catalog horizon, which counts in every database).
///
/// Ages compare transaction IDs across their wraparound. Only columns every role may read are
/// used: another role's `backend_type` is hidden, and a background process has no user.
fn older_snapshots(db: &mut Client, mark: &str, catalog: bool) -> Result<Vec<String>, postgres::Error> {
    db.query(
        "SELECT 'pid ' || a.pid || ' (' || coalesce(a.usename::text, a.backend_type, 'a background process') || ')'
           FROM pg_stat_activity a
          WHERE a.pid <> pg_backend_pid()
            AND (age(a.backend_xid) > age($1::text::xid)
                 OR ((a.datname = current_database() OR a.datid IS NULL)
                     AND age(a.backend_xmin) > age($1::text::xid)
                     AND a.pid NOT IN (SELECT v.pid FROM pg_stat_progress_vacuum v)))
         UNION ALL
         SELECT 'replication slot ' || s.slot_name FROM pg_replication_slots s
          WHERE age(s.xmin) > age($1::text::xid) OR ($2 AND age(s.catalog_xmin) > age($1::text::xid))
         UNION ALL
         SELECT 'prepared transaction ' || p.gid FROM pg_prepared_xacts p
          WHERE age(p.transaction) > age($1::text::xid)",
        &[&mark, &catalog],
    )?
    .iter()
    .map(|r| r.try_get(0))
    .collect()
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
    purge_waiting(db, audio_dir, (start, end), reason, now, SCRUB_TIMEOUT)
}

/// [`purge`], its rewrite waiting at most `timeout` per attempt ([`scrub`]).
fn purge_waiting(
    db: &mut Client,
    audio_dir: &std::path::Path,
    (start, end): (OffsetDateTime, OffsetDateTime),
    reason: &str,
    now: OffsetDateTime,
    timeout: std::time::Duration,
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
    // Webhook events are IDs only, but they are the purged encounters' IDs.
    delete("webhook_events", &format!("{in_range} OR {doc_filter}"))?;
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
    let scrubbed = scrub_waiting(db, &changed, true, timeout);
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

/// Policies and purges against a real server (`charthero_sim::pgcluster`), and the PHI canaries:
/// a unique term written into a note, transcript turns and a patient's name must be in no file
/// of the cluster's `base/` once purged or dropped by the policy. Each test skips, saying why,
/// where no server can run.
#[cfg(test)]
mod tests {
    use std::path::Path;

    use charthero_sim::pgcluster;
    use time::macros::datetime;

    use super::*;
    use crate::store::postgres::content::tests::{claim, doc, encounter, save, transcript, warehouse};
    use crate::store::postgres::{content, upsert};
    use crate::store::{DetailOutcome, PatientRecord, Work};
    use crate::timefmt::from_unix_nanos;

    /// The instant `s` seconds after the epoch (encounters here are created then).
    fn at(s: i64) -> OffsetDateTime {
        from_unix_nanos(s * 1_000_000_000)
    }

    /// Whether any file under the cluster's `base/` (every database's tables, indexes, TOAST
    /// and catalogs) holds `needle`, after a checkpoint wrote every changed page to them.
    fn on_disk(needle: &str) -> bool {
        let cluster = pgcluster::shared().expect("the cluster the warehouse is in");
        cluster.psql("CHECKPOINT").expect("a checkpoint");
        fn holds(dir: &Path, needle: &[u8]) -> bool {
            // Files come and go while other tests run: what cannot be read is not there.
            let Ok(entries) = std::fs::read_dir(dir) else {
                return false;
            };
            entries.flatten().any(|entry| {
                let path = entry.path();
                if path.is_dir() {
                    holds(&path, needle)
                } else {
                    std::fs::read(&path)
                        .unwrap_or_default()
                        .windows(needle.len())
                        .any(|w| w == needle)
                }
            })
        }
        holds(&cluster.data_dir().join("base"), needle.as_bytes())
    }

    /// 300 encounters (encounter `n` created at second `n`) with a note and a transcript turn
    /// of ordinary text each (`"<name> cough number <n> today"`, in no other test's database), and
    /// encounter 7, stored through the sync's own writes, whose
    /// patient's last name, note and patient turn hold `word`.
    fn warehouse_with(name: &str, word: &str) -> Option<Client> {
        let (_db, mut c) = warehouse(name)?;
        let filler = format!(
            "INSERT INTO encounters (encounter_id, organization_id, created_at, updated_at, created_at_ns,
                 updated_at_ns, content_hash, raw_json, first_seen_at, changed_at)
             SELECT 'e' || n, 'org_1', to_timestamp(n), to_timestamp(n), n * 1000000000::bigint, n * 1000000000::bigint, 'h',
                    '{{}}', now(), now()
               FROM generate_series(0, 299) n WHERE n <> 7;
             INSERT INTO documents (document_id, encounter_id, position, schema_type, content_text,
                 detail_state, first_seen_at, changed_at)
             SELECT 'd' || n, 'e' || n, 0, 'document', '{name} cough number ' || n || ' today', 'done', now(), now()
               FROM generate_series(0, 299) n WHERE n <> 7;
             INSERT INTO documents (document_id, encounter_id, position, schema_type, detail_state,
                 first_seen_at, changed_at)
             SELECT 't' || n, 'e' || n, 1, 'ambient_transcript', 'skipped', now(), now()
               FROM generate_series(0, 299) n WHERE n <> 7;
             INSERT INTO transcripts (document_id, encounter_id, turn_count, fetched_at)
             SELECT 't' || n, 'e' || n, 1, now() FROM generate_series(0, 299) n WHERE n <> 7;
             INSERT INTO transcript_turns (document_id, turn_index, speaker, start_seconds, end_seconds, text)
             SELECT 't' || n, 0, 'patient', 0, 1, '{name} cough number ' || n || ' today'
               FROM generate_series(0, 299) n WHERE n <> 7;"
        );
        c.batch_execute(&filler).unwrap();
        let patient = PatientRecord {
            patient_id: "p7".to_owned(),
            first_name: Some("Ada".to_owned()),
            last_name: Some(word.to_owned()),
            date_of_birth: Some("1970-01-02".to_owned()),
        };
        let mut record = encounter(
            "e7",
            at(7),
            "h7",
            Some(patient),
            vec![
                doc("d7", "document", None),
                doc("t7", "ambient_transcript", Some("completed")),
            ],
        );
        record.raw_json = format!(
            r#"{{"id":"e7","patient":{{"id":"p7","first_name":"Ada","last_name":"{word}","date_of_birth":"1970-01-02"}}}}"#
        );
        let now = OffsetDateTime::now_utc();
        save(&mut c, |tx| upsert::commit_page(tx, &[record], &[], None, now));
        let note = claim(&mut c, Work::Document, "d7").expect("the note is queued");
        let text = format!("patient reports {word} since monday");
        let detail = DetailOutcome::Note {
            format: "markdown".to_owned(),
            text: Some(text.clone()),
            created_at: now,
            updated_at: now,
        };
        save(&mut c, |tx| content::save_detail(tx, &note, &detail, false, now));
        let turns = claim(&mut c, Work::Transcript, "t7").expect("the transcript is queued");
        save(&mut c, |tx| {
            content::save_transcript(tx, &turns, &transcript(&text), now)
        });
        Some(c)
    }

    fn count(c: &mut Client, sql: &str) -> i64 {
        c.query_one(sql, &[]).unwrap().try_get(0).unwrap()
    }

    /// Another session of the warehouse's database, as an analyst's would be.
    fn second_session(db: &charthero_sim::pgcluster::PgDatabase) -> Client {
        let mut config: postgres::Config = db.url.parse().unwrap();
        config.password(&db.password).options("-c search_path=charthero");
        config.connect(postgres::NoTls).unwrap()
    }

    /// A REPEATABLE READ transaction of `session` whose snapshot is taken now, by reading
    /// `table` (which it then holds ACCESS SHARE on, and no other).
    fn snapshot_now<'a>(session: &'a mut Client, table: &str) -> postgres::Transaction<'a> {
        let mut snapshot = session
            .build_transaction()
            .isolation_level(postgres::IsolationLevel::RepeatableRead)
            .start()
            .unwrap();
        snapshot
            .query_one(&format!("SELECT count(*) FROM {table}"), &[])
            .unwrap();
        snapshot
    }

    /// The rewrites a scrub left pending (`scrub_pending`), if any.
    fn pending(c: &mut Client) -> Option<String> {
        c.query_opt("SELECT value FROM sync_state WHERE name = 'scrub_pending'", &[])
            .unwrap()
            .map(|r| r.try_get(0).unwrap())
    }

    /// A reader holding ACCESS SHARE on a table in an open transaction: the rewrite gives up
    /// after its lock timeout and attempts, says the rows are removed and the rewrite pending,
    /// records it, and the next scrub (with nothing new to rewrite) does it once the reader is
    /// gone.
    #[test]
    fn a_rewrite_blocked_by_a_long_reader_is_left_pending_and_done_by_the_next_one() {
        let Some((db, mut c)) = warehouse("scrub_blocked") else {
            return;
        };
        let mut analyst = second_session(&db);
        let mut long_query = analyst.transaction().unwrap();
        long_query
            .query_one("SELECT count(*) FROM documents", &[])
            .unwrap();
        let short = std::time::Duration::from_millis(200);
        let error = scrub_waiting(&mut c, &["documents"], true, short).unwrap_err();
        let message = format!("{error:#}");
        assert!(message.contains("the rows are removed"), "{message}");
        assert!(message.contains("pending"), "{message}");
        assert!(
            message.contains("lock_timeout") || message.contains("lock"),
            "{message}"
        );
        assert_eq!(pending(&mut c).as_deref(), Some("documents,pg_statistic"));
        long_query.commit().unwrap();
        scrub_waiting(&mut c, &[], true, short).unwrap();
        assert_eq!(pending(&mut c), None);
        assert_eq!(
            c.query_one("SHOW lock_timeout", &[])
                .unwrap()
                .try_get::<_, String>(0)
                .unwrap(),
            "0",
            "the session's lock_timeout is reset"
        );
    }

    /// An analyst's transaction whose snapshot predates a removal may still read the removed
    /// row, and VACUUM FULL would copy it, text and all, into the table's new file. The rewrite
    /// waits for such a session, says who it waited for, and is left pending while it lasts;
    /// once it ends the next scrub removes the text.
    #[test]
    fn a_rewrite_waits_for_a_snapshot_older_than_the_removal_and_is_left_pending_while_it_lasts() {
        let word = "zanthoxylumsnapshotcanary";
        let Some((db, mut c)) = warehouse("scrub_snapshot") else {
            return;
        };
        c.batch_execute(&format!(
            "INSERT INTO encounters (encounter_id, organization_id, created_at, updated_at, created_at_ns,
                 updated_at_ns, content_hash, raw_json, first_seen_at, changed_at)
             VALUES ('e1', 'org_1', to_timestamp(1), to_timestamp(1), 1000000000, 1000000000, 'h', '{{}}',
                     now(), now());
             INSERT INTO documents (document_id, encounter_id, position, schema_type, content_text,
                 detail_state, first_seen_at, changed_at)
             VALUES ('d1', 'e1', 0, 'document', 'patient reports {word} since monday', 'done', now(), now());"
        ))
        .unwrap();
        assert!(
            on_disk(word),
            "the term never reached the files: the test proves nothing"
        );
        let mut analyst = second_session(&db);
        // A snapshot taken before the removal, on another table (no lock on `documents`).
        let snapshot = snapshot_now(&mut analyst, "encounters");
        c.execute("UPDATE documents SET content_text = NULL", &[])
            .unwrap();
        let short = std::time::Duration::from_millis(200);
        let message = format!(
            "{:#}",
            scrub_waiting(&mut c, &["documents"], true, short).unwrap_err()
        );
        assert!(message.contains("the rows are removed"), "{message}");
        assert!(message.contains("began before the removal"), "{message}");
        assert!(
            message.contains(&format!("({})", db.user)),
            "names the session: {message}"
        );
        assert_eq!(pending(&mut c).as_deref(), Some("documents,pg_statistic"));
        snapshot.commit().unwrap();
        scrub_waiting(&mut c, &[], true, short).unwrap();
        assert!(!on_disk(word), "the removed text is still in a file under base/");
        assert_eq!(pending(&mut c), None);
    }

    /// A purge whose rewrite is left pending (a snapshot from before it lasts) still deletes
    /// the recording files no row points at any more: no later purge would find them.
    #[test]
    fn a_purge_left_pending_still_deletes_the_recordings_it_orphaned() {
        let Some((db, mut c)) = warehouse("purge_pending_files") else {
            return;
        };
        let now = OffsetDateTime::now_utc();
        let record = encounter(
            "e1",
            at(1),
            "h",
            None,
            vec![doc("t1", "ambient_transcript", Some("completed"))],
        );
        save(&mut c, |tx| upsert::commit_page(tx, &[record], &[], None, now));
        let recording = crate::store::RecordingRecord {
            path: "r.m4a".to_owned(),
            size_bytes: 3,
            sha256: "r".to_owned(),
            duration_seconds: None,
        };
        save(&mut c, |tx| {
            content::save_recording(tx, "e1", "t1", &recording, now)
        });
        let audio = tempfile::tempdir().unwrap();
        std::fs::write(audio.path().join("r.m4a"), b"abc").unwrap();
        let mut analyst = second_session(&db);
        let snapshot = snapshot_now(&mut analyst, "purges");
        let short = std::time::Duration::from_millis(200);
        let error = purge_waiting(&mut c, audio.path(), (at(0), at(10)), "range", now, short).unwrap_err();
        assert!(format!("{error:#}").contains("recorded as pending"), "{error:#}");
        assert!(
            !audio.path().join("r.m4a").exists(),
            "the orphaned recording is deleted"
        );
        assert_eq!(count(&mut c, "SELECT count(*) FROM encounters"), 0);
        snapshot.commit().unwrap();
    }

    #[test]
    fn a_purge_leaves_no_byte_of_the_purged_text_in_the_clusters_files() {
        let word = "zanthoxylumpurgecanary";
        let Some(mut c) = warehouse_with("privacy_purge_canary", word) else {
            return;
        };
        assert!(
            on_disk(word),
            "the term never reached the files: the test proves nothing"
        );
        let audio = tempfile::tempdir().unwrap();
        let counts = purge(&mut c, audio.path(), at(5), at(10), "range", at(1_000)).unwrap();
        assert_eq!((counts.encounters, counts.documents, counts.turns), (5, 10, 6));
        // The search index keeps answering for the rest.
        let left = count(
            &mut c,
            "SELECT count(*) FROM documents WHERE content_tsv @@ to_tsquery('simple', 'cough')",
        );
        assert_eq!(left, 299 - 4);
        assert!(!on_disk(word), "the purged term is still in a file under base/");
        assert!(!on_disk("privacy_purge_canary cough number 8 today"));
    }

    #[test]
    fn a_privacy_change_leaves_no_byte_of_the_dropped_text_in_the_clusters_files() {
        let word = "zanthoxylumpolicycanary";
        let Some(mut c) = warehouse_with("privacy_policy_canary", word) else {
            return;
        };
        assert!(
            on_disk(word),
            "the term never reached the files: the test proves nothing"
        );
        let strict = PrivacyConfig {
            patient_names: false,
            date_of_birth: BirthDate::Full,
            note_text: false,
            transcript_text: false,
            retention: None,
        };
        assert!(apply_privacy(&mut c, &strict).unwrap());
        assert!(!on_disk(word), "the dropped term is still in a file under base/");
        assert!(!on_disk("privacy_policy_canary cough number 8 today"));
    }

    /// ANALYZE (autovacuum runs it on its own) copies column values into `pg_statistic`: a
    /// histogram's bounds, the most common values and lexemes. The purge's own ANALYZE replaces
    /// them, but the replaced catalog rows stay in its files until that catalog is rewritten too,
    /// which only a superuser or the database's owner may do, and the writer need not own it.
    /// So the columns that hold PHI must collect no statistics at all (`SET STATISTICS 0`).
    #[test]
    fn analyze_copies_no_phi_into_the_planners_statistics() {
        let word = "zanthoxylumstatisticscanary";
        let Some(mut c) = warehouse_with("privacy_statistics", word) else {
            return;
        };
        c.batch_execute("ANALYZE").unwrap();
        let leaked: Vec<String> = c
            .query(
                "SELECT tablename || '.' || attname FROM pg_stats
                  WHERE schemaname = current_schema()
                    AND concat(most_common_vals::text, histogram_bounds::text, most_common_elems::text)
                        LIKE '%' || $1 || '%'
                  ORDER BY 1",
                &[&word],
            )
            .unwrap()
            .iter()
            .map(|r| r.try_get(0).unwrap())
            .collect();
        assert!(leaked.is_empty(), "PHI in the statistics of {leaked:?}");
    }

    /// The ID columns keep their statistics (the planner needs them), so ANALYZE copies IDs into
    /// `pg_statistic`, and the purge's own ANALYZE leaves the replaced catalog rows in that
    /// catalog's file until it is rewritten too. A few short IDs make rows too small to be
    /// compressed: each purged ID would be found as it is.
    #[test]
    fn a_purge_leaves_no_purged_id_in_the_planners_statistics() {
        let Some((_db, mut c)) = warehouse("privacy_statistics_ids") else {
            return;
        };
        c.batch_execute(
            "INSERT INTO encounters (encounter_id, organization_id, created_at, updated_at, created_at_ns,
                 updated_at_ns, content_hash, raw_json, first_seen_at, changed_at)
             SELECT 'statcanary' || n || 'purgeid', 'org_1', to_timestamp(n), to_timestamp(n),
                    n * 1000000000::bigint, n * 1000000000::bigint, 'h', '{}', now(), now()
               FROM generate_series(0, 19) n;
             ANALYZE encounters;",
        )
        .unwrap();
        assert!(
            on_disk("statcanary3purgeid"),
            "the statistics never held the IDs: the test proves nothing"
        );
        let audio = tempfile::tempdir().unwrap();
        let counts = purge(&mut c, audio.path(), at(0), at(10), "range", at(1_000)).unwrap();
        assert_eq!(counts.encounters, 10);
        let left: Vec<String> = (0..10)
            .map(|n| format!("statcanary{n}purgeid"))
            .filter(|id| on_disk(id))
            .collect();
        assert!(
            left.is_empty(),
            "purged IDs still in a file under base/: {left:?}"
        );
        assert!(
            on_disk("statcanary15purgeid"),
            "a kept encounter's ID is in its row"
        );
    }

    /// A writer that does not own the database (docs/postgres.md allows it) may not rewrite
    /// `pg_statistic`: the purge still removes the rows and rewrites the tables, and only warns.
    #[test]
    fn a_writer_that_does_not_own_the_database_purges_and_leaves_the_statistics_catalog() {
        let Some((db, mut c)) = warehouse("privacy_not_owner") else {
            return;
        };
        let cluster = pgcluster::shared().expect("the warehouse's cluster");
        cluster
            .psql(&format!("ALTER DATABASE {} OWNER TO postgres", db.name))
            .unwrap();
        c.batch_execute(
            "INSERT INTO encounters (encounter_id, organization_id, created_at, updated_at, created_at_ns,
                 updated_at_ns, content_hash, raw_json, first_seen_at, changed_at)
             SELECT 'e' || n, 'org_1', to_timestamp(n), to_timestamp(n),
                    n * 1000000000::bigint, n * 1000000000::bigint, 'h', '{}', now(), now()
               FROM generate_series(0, 19) n;",
        )
        .unwrap();
        let node = |c: &mut Client| -> u32 {
            c.query_one("SELECT pg_relation_filenode('pg_statistic')::oid", &[])
                .unwrap()
                .try_get(0)
                .unwrap()
        };
        let before = node(&mut c);
        let audio = tempfile::tempdir().unwrap();
        let counts = purge(&mut c, audio.path(), at(0), at(10), "range", at(1_000)).unwrap();
        assert_eq!(counts.encounters, 10);
        assert_eq!(count(&mut c, "SELECT count(*) FROM encounters"), 10);
        assert_eq!(node(&mut c), before, "the catalog was not rewritten");
        assert_eq!(
            pending(&mut c),
            None,
            "a rewrite the role may not do is not retried"
        );
    }

    #[test]
    fn a_privacy_policy_is_applied_to_stored_rows_once() {
        let Some(mut c) = warehouse_with("privacy_policy_rows", "Lovelace") else {
            return;
        };
        let policy = |date_of_birth| PrivacyConfig {
            patient_names: false,
            date_of_birth,
            note_text: true,
            transcript_text: false,
            retention: None,
        };
        assert!(apply_privacy(&mut c, &policy(BirthDate::YearOnly)).unwrap());
        assert!(
            !apply_privacy(&mut c, &policy(BirthDate::YearOnly)).unwrap(),
            "once"
        );
        let patient = |c: &mut Client| -> (Option<String>, Option<String>, Option<String>, String) {
            let row = c
                .query_one(
                    "SELECT first_name, last_name, date_of_birth,
                            (SELECT raw_json FROM encounters WHERE encounter_id = 'e7')
                       FROM patients",
                    &[],
                )
                .unwrap();
            (
                row.try_get(0).unwrap(),
                row.try_get(1).unwrap(),
                row.try_get(2).unwrap(),
                row.try_get(3).unwrap(),
            )
        };
        let (first, last, born, raw) = patient(&mut c);
        assert_eq!((first, last, born.as_deref()), (None, None, Some("1970")));
        let raw: serde_json::Value = serde_json::from_str(&raw).unwrap();
        assert_eq!(
            raw,
            serde_json::json!({"id": "e7", "patient": {"id": "p7", "date_of_birth": "1970"}})
        );
        assert_eq!(
            count(
                &mut c,
                "SELECT count(*) FROM transcript_turns WHERE text IS NOT NULL"
            ),
            0
        );
        assert_eq!(
            count(
                &mut c,
                "SELECT count(*) FROM documents WHERE content_text IS NOT NULL"
            ),
            300,
            "notes are kept"
        );
        assert!(apply_privacy(&mut c, &policy(BirthDate::Omit)).unwrap());
        let (_, _, born, raw) = patient(&mut c);
        assert_eq!(born, None);
        assert_eq!(raw, r#"{"id": "e7", "patient": {"id": "p7"}}"#);
    }

    #[test]
    fn a_purge_removes_the_range_and_what_hangs_off_it_and_keeps_it_from_coming_back() {
        let Some((_db, mut c)) = warehouse("privacy_purge_rows") else {
            return;
        };
        let patient = |id: &str| PatientRecord {
            patient_id: id.to_owned(),
            first_name: Some("Ada".to_owned()),
            last_name: None,
            date_of_birth: None,
        };
        let records = [
            ("e1", 1, "p1", "a.m4a"),
            ("e2", 2, "p2", "b.m4a"),
            ("e3", 3, "p2", "a.m4a"),
        ]
        .map(|(id, s, p, _)| {
            encounter(
                id,
                at(s),
                "h",
                Some(patient(p)),
                vec![doc(&format!("t{s}"), "ambient_transcript", Some("completed"))],
            )
        });
        let now = OffsetDateTime::now_utc();
        save(&mut c, |tx| upsert::commit_page(tx, &records, &[], None, now));
        let audio = tempfile::tempdir().unwrap();
        for (s, file) in [(1, "a.m4a"), (2, "b.m4a"), (3, "a.m4a")] {
            let (document, encounter) = (format!("t{s}"), format!("e{s}"));
            let item = claim(&mut c, Work::Transcript, &document).unwrap();
            save(&mut c, |tx| {
                content::save_transcript(tx, &item, &transcript("Hello."), now)
            });
            let recording = crate::store::RecordingRecord {
                path: file.to_owned(),
                size_bytes: 3,
                sha256: file.to_owned(),
                duration_seconds: None,
            };
            save(&mut c, |tx| {
                content::save_recording(tx, &encounter, &document, &recording, now)
            });
            std::fs::write(audio.path().join(file), b"abc").unwrap();
        }
        let counts = purge(&mut c, audio.path(), at(1), at(3), "range", now).unwrap();
        assert_eq!(
            counts,
            PurgeCounts {
                encounters: 2,
                documents: 2,
                transcripts: 2,
                turns: 4,
                recordings: 2,
                history_rows: 2,
                orphaned_files: vec!["b.m4a".to_owned()],
            }
        );
        assert!(audio.path().join("a.m4a").exists(), "e3 still has it");
        assert!(!audio.path().join("b.m4a").exists());
        let left: Vec<String> = c
            .query("SELECT patient_id FROM patients", &[])
            .unwrap()
            .iter()
            .map(|r| r.try_get(0).unwrap())
            .collect();
        assert_eq!(left, ["p2"], "p1 had no encounter left");
        assert_eq!(purged_ranges(&mut c).unwrap(), [(1_000_000_000, 3_000_000_000)]);
        assert_eq!(last_retention_purge(&mut c).unwrap(), None);
        let row = c
            .query_one(
                "SELECT range_start, range_end, reason, encounters, turns, history_rows FROM purges",
                &[],
            )
            .unwrap();
        assert_eq!(row.try_get::<_, OffsetDateTime>(0).unwrap(), at(1));
        assert_eq!(row.try_get::<_, OffsetDateTime>(1).unwrap(), at(3));
        assert_eq!(row.try_get::<_, String>(2).unwrap(), "range");
        assert_eq!(
            (
                row.try_get::<_, i64>(3).unwrap(),
                row.try_get::<_, i64>(4).unwrap(),
                row.try_get::<_, i64>(5).unwrap()
            ),
            (2, 4, 2)
        );

        // Listed again (a revisit, a backfill): not stored.
        let again = save(&mut c, |tx| {
            upsert::commit_page(tx, &records[..1], &[], None, now)
        });
        assert_eq!((again.purged, again.new), (1, 0));
        assert_eq!(count(&mut c, "SELECT count(*) FROM encounters"), 1);

        let retention_at = datetime!(2026-05-25 03:00:00.123456 UTC);
        let nothing = purge(&mut c, audio.path(), at(0), at(1), "retention", retention_at).unwrap();
        assert_eq!(nothing, PurgeCounts::default());
        assert_eq!(last_retention_purge(&mut c).unwrap(), Some(retention_at));
    }
}
