//! The warehouse analysts query: the documented schema, views, full-text search, change
//! history, privacy controls and purges (verified on the raw database and WAL bytes), and
//! concurrent readers during a sync. Views, search, history, privacy and purges run on SQLite
//! and on PostgreSQL (whose concurrent readers are tested in postgres.rs); the documented
//! schema and the reader processes read SQLite files.

use std::collections::BTreeSet;
use std::time::Duration;

use charthero_sim::Simulator;
use charthero_sync::sync::{BackfillRange, CyclePlan};
use time::OffsetDateTime;

use crate::support::{Backend, TestEnv, Warehouse, both_backends, compare, holds};

/// PHI canaries of the given encounters: distinctive names, birth dates, a transcript
/// sentence and a note line each.
fn canaries(sim: &Simulator, encounter_ids: &BTreeSet<String>) -> Vec<String> {
    let mut out = BTreeSet::new();
    for e in sim
        .snapshot()
        .into_iter()
        .filter(|e| encounter_ids.contains(&e.encounter_id))
    {
        for name in [&e.patient.first_name, &e.patient.last_name]
            .into_iter()
            .flatten()
        {
            if name.len() >= 7 {
                out.insert(name.clone());
            }
        }
        if let Some(d) = e.patient.date_of_birth {
            out.insert(d.to_string());
        }
        for d in &e.documents {
            if let Some(t) = sim.transcript(&e.encounter_id, &d.document_id)
                && let Some(turn) = t.turns.iter().find(|t| t.text.len() > 40)
            {
                out.insert(turn.text.clone());
            }
            if let Some(note) = sim.note_text(&e.encounter_id, &d.document_id)
                && let Some(line) = note.lines().find(|l| l.len() > 40)
            {
                out.insert(line.to_owned());
            }
        }
    }
    out.into_iter().collect()
}

/// Where a leaked value lives: the live rows holding it, PostgreSQL's planner statistics, or
/// else only deleted data.
fn locate(db: &Warehouse, needle: &str) -> String {
    let statistics = db
        .postgres()
        .map(|pg| pg.statistics_holding(needle))
        .unwrap_or_default();
    format!("rows: {:?}; statistics: {statistics:?}", db.rows_holding(needle))
}

fn all_ids(sim: &Simulator) -> BTreeSet<String> {
    sim.snapshot().into_iter().map(|e| e.encounter_id).collect()
}

#[test]
fn docs_schema_md_documents_exactly_the_tables_and_columns_of_the_migrations() {
    let dir = tempfile::tempdir().unwrap();
    let conn =
        charthero_sync::store::sqlite::open_writer(&dir.path().join("w.db"), Duration::from_secs(1)).unwrap();
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/schema.md")).unwrap();
    // `### \`name\`` starts a table's section; its rows start with "| `column` |".
    let mut documented: Vec<(String, Vec<String>)> = Vec::new();
    for line in doc.lines() {
        if let Some(name) = line.strip_prefix("### `").and_then(|l| l.strip_suffix('`')) {
            documented.push((name.to_owned(), Vec::new()));
        } else if let (Some(col), Some(last)) = (
            line.strip_prefix("| `").and_then(|l| l.split('`').next()),
            documented.last_mut(),
        ) {
            last.1.push(col.to_owned());
        }
    }
    let names: Vec<String> = conn
        .prepare(
            "SELECT name FROM sqlite_master WHERE type IN ('table', 'view')
               AND name NOT LIKE 'sqlite_%' AND name <> 'refinery_schema_history'
               AND name NOT GLOB '*_fts_*' ORDER BY name",
        )
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let documented_names: BTreeSet<&str> = documented.iter().map(|(n, _)| n.as_str()).collect();
    let actual_names: BTreeSet<&str> = names.iter().map(String::as_str).collect();
    assert_eq!(
        documented_names, actual_names,
        "tables and views in docs/schema.md vs the migrations"
    );
    for (table, columns) in &documented {
        let actual: Vec<String> = conn
            .prepare(&format!("SELECT name FROM pragma_table_info('{table}')"))
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        assert_eq!(columns, &actual, "columns of {table} in docs/schema.md");
    }
}

both_backends!(
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    views_search_history_and_every_documented_query_work_on_a_synced_dataset
);
async fn views_search_history_and_every_documented_query_work_on_a_synced_dataset(backend: Backend) {
    let env = TestEnv::with_encounters_on(backend, 61, 400).await;
    let config = env.config();
    env.sync(&config, CyclePlan::full(None, false)).await;
    let db = &env.warehouse;
    let snapshot = env.sim.snapshot();

    let overview: i64 = db.scalar("SELECT count(*) FROM encounter_overview", &[]);
    assert_eq!(overview as usize, snapshot.len());
    let e = &snapshot[0];
    let (docs, with_name): (i64, Option<String>) = db.row(
        "SELECT document_count, last_name FROM encounter_overview WHERE encounter_id = ?1",
        &[&e.encounter_id],
    );
    assert_eq!(docs as usize, e.documents.len());
    assert_eq!(with_name, e.patient.last_name);

    // transcript_text: the turns in order, "speaker: text" per line.
    let (enc, doc, t) = snapshot
        .iter()
        .flat_map(|e| e.documents.iter().map(move |d| (e, d)))
        .find_map(|(e, d)| {
            env.sim
                .transcript(&e.encounter_id, &d.document_id)
                .map(|t| (e, d, t))
        })
        .expect("the dataset has a final transcript");
    let expected: Vec<String> = t
        .turns
        .iter()
        .map(|t| format!("{}: {}", t.speaker, t.text))
        .collect();
    let text: String = db.scalar(
        "SELECT text FROM transcript_text WHERE document_id = ?1",
        &[&doc.document_id],
    );
    assert_eq!(text, expected.join("\n"));

    // Full-text search finds a distinctive word of that transcript in that document.
    let word = t
        .turns
        .iter()
        .flat_map(|t| t.text.split(|c: char| !c.is_alphabetic()))
        .find(|w| w.len() >= 9);
    if let Some(word) = word {
        let found: Vec<String> = match backend {
            Backend::Sqlite => db.column(
                "SELECT DISTINCT tt.document_id FROM transcript_turns_fts f
                 JOIN transcript_turns tt ON tt.rowid = f.rowid WHERE transcript_turns_fts MATCH ?1",
                &[&format!("\"{word}\"")],
            ),
            Backend::Postgres => db.column(
                "SELECT DISTINCT document_id FROM transcript_turns
                 WHERE text_tsv @@ phraseto_tsquery('simple', ?1)",
                &[&word],
            ),
        };
        assert!(
            found.contains(&doc.document_id),
            "{word} not found in {}",
            doc.document_id
        );
    }
    let notes_indexed: i64 = db.scalar(
        db.pick(
            "SELECT count(*) FROM notes_fts WHERE notes_fts MATCH 'patient OR plan OR follow'",
            "SELECT count(*) FROM documents WHERE content_tsv @@ to_tsquery('simple', 'patient | plan | follow')",
        ),
        &[],
    );
    assert!(notes_indexed > 0);

    // History: a status change and a removal are each one appended row.
    env.sim.update_status(&enc.encounter_id, "amended");
    let gone = snapshot.last().unwrap().encounter_id.clone();
    env.sim.remove(&gone);
    let range = BackfillRange {
        start: config.sync.start_at,
        end: OffsetDateTime::now_utc(),
    };
    env.sync(&config, CyclePlan::full(Some(range), false)).await;
    let changes: Vec<(String, Option<String>)> = db.rows(
        "SELECT change, status FROM encounter_history WHERE encounter_id = ?1 ORDER BY history_id",
        &[&enc.encounter_id],
    );
    assert_eq!(changes.first().map(|c| c.0.as_str()), Some("created"));
    assert_eq!(
        changes.last(),
        Some(&("changed".to_owned(), Some("amended".to_owned())))
    );
    let removed: String = db.scalar(
        "SELECT change FROM encounter_history WHERE encounter_id = ?1 ORDER BY history_id DESC LIMIT 1",
        &[&gone],
    );
    assert_eq!(removed, "removed");

    // Every SQL block of docs/schema.md runs on SQLite, every query of its PostgreSQL version
    // (tests/fixtures/postgres-queries.sql, which the docs cite) on PostgreSQL.
    let queries = match backend {
        Backend::Sqlite => documented_queries(),
        Backend::Postgres => crate::support::postgres_queries(),
    };
    for sql in &queries {
        db.row_count(sql);
    }
    assert!(queries.len() >= 12, "{} documented queries", queries.len());
}

/// The SQL blocks of docs/schema.md.
fn documented_queries() -> Vec<String> {
    let doc_text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/schema.md")).unwrap();
    doc_text
        .split("```sql")
        .skip(1)
        .map(|block| {
            let sql = block.split("```").next().unwrap();
            sql.lines().map(str::trim).collect::<Vec<_>>().join("\n")
        })
        .collect()
}

both_backends!(
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    turning_phi_off_removes_it_from_the_database_and_wal_bytes
);
async fn turning_phi_off_removes_it_from_the_database_and_wal_bytes(backend: Backend) {
    let env = TestEnv::with_encounters_on(backend, 62, 150).await;
    env.sync(&env.config(), CyclePlan::full(None, false)).await;
    let db = &env.warehouse;
    let marks = canaries(&env.sim, &all_ids(&env.sim));
    assert!(marks.len() > 50, "too few canaries: {}", marks.len());
    // PostgreSQL's statistics sample the stored values; a policy change must not leave them there.
    db.gather_statistics();
    let image = db.disk_image();
    assert!(
        marks.iter().any(|m| holds(&image, m)),
        "the canaries were never stored: the test proves nothing"
    );

    let mut raw = env.raw_config();
    raw.privacy.patient_names = false;
    raw.privacy.date_of_birth = "year".into();
    raw.privacy.note_text = false;
    raw.privacy.transcript_text = false;
    let strict = raw.validate().unwrap();
    env.sync(&strict, CyclePlan::full(None, false)).await;
    let image = db.disk_image();
    let leaked: Vec<&String> = marks.iter().filter(|m| holds(&image, m)).collect();
    assert!(
        leaked.is_empty(),
        "{} canaries remain on disk, e.g. {:?}: {}",
        leaked.len(),
        leaked.first(),
        leaked.first().map(|m| locate(db, m)).unwrap_or_default()
    );
    // Encounters, documents and timings are still all there.
    compare(&env.sim, db).assert_empty_except_patients();
    let years: i64 = db.scalar(
        "SELECT count(*) FROM patients WHERE length(date_of_birth) = 4",
        &[],
    );
    assert!(years > 0);
}

both_backends!(
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    purge_removes_a_range_completely_and_keeps_it_from_coming_back
);
async fn purge_removes_a_range_completely_and_keeps_it_from_coming_back(backend: Backend) {
    let env = TestEnv::with_encounters_on(backend, 63, 300).await;
    let mut raw = env.raw_config();
    raw.audio.enabled = true;
    raw.audio.directory = env.dir.path().join("audio");
    let config = raw.validate().unwrap();
    env.sync(&config, CyclePlan::full(None, false)).await;
    let db = &env.warehouse;
    let snapshot = env.sim.snapshot();
    let cut = snapshot[snapshot.len() / 2].created_at;
    let old: BTreeSet<String> = snapshot
        .iter()
        .filter(|e| e.created_at < cut)
        .map(|e| e.encounter_id.clone())
        .collect();
    let young: BTreeSet<String> = all_ids(&env.sim).difference(&old).cloned().collect();
    // Canaries only of purged encounters (a shared patient may still have young encounters).
    let keep = canaries(&env.sim, &young);
    let marks: Vec<String> = canaries(&env.sim, &old)
        .into_iter()
        .filter(|m| !keep.contains(m))
        .collect();
    assert!(marks.iter().any(|m| holds(&db.disk_image(), m)));
    let files_before = std::fs::read_dir(&config.audio.directory).unwrap().count();
    // PostgreSQL's statistics sample the stored values; a purge must not leave them there.
    db.gather_statistics();

    let range = BackfillRange {
        start: OffsetDateTime::UNIX_EPOCH,
        end: cut,
    };
    // Webhook events pointing at purged encounters, by encounter or by document only, and one
    // pointing at a kept encounter.
    let event = |id: &str, encounter: &charthero_sim::Encounter, by_document: bool| {
        charthero_sync::store::WebhookEvent {
            event_id: id.to_owned(),
            event_type: "recording.transcript_ready".to_owned(),
            api_version: "2026-05-01".to_owned(),
            occurred_at: OffsetDateTime::now_utc(),
            organization_id: encounter.organization_id.clone(),
            encounter_id: (!by_document).then(|| encounter.encounter_id.clone()),
            document_id: encounter.documents.first().map(|d| d.document_id.clone()),
        }
    };
    let with_document = |e: &&charthero_sim::Encounter| !e.documents.is_empty();
    let purged_first = snapshot.iter().find(|e| old.contains(&e.encounter_id)).unwrap();
    let purged_by_document = snapshot
        .iter()
        .filter(|e| old.contains(&e.encounter_id) && e.encounter_id != purged_first.encounter_id)
        .find(with_document)
        .unwrap();
    let kept = snapshot
        .iter()
        .filter(|e| young.contains(&e.encounter_id))
        .find(with_document)
        .unwrap();
    let events = [
        event("evt_purged", purged_first, false),
        event("evt_purged_document", purged_by_document, true),
        event("evt_kept", kept, false),
    ];
    let (database, audio) = (config.database.clone(), config.audio.directory.clone());
    let counts = charthero_sync::store::blocking(move || {
        let mut store = charthero_sync::store::open(&database)?;
        for e in &events {
            store.record_webhook_event("default", e, "dlv_test", OffsetDateTime::now_utc())?;
        }
        store.purge(&audio, range.start, range.end, "range", OffsetDateTime::now_utc())
    })
    .await
    .unwrap();
    assert_eq!(counts.encounters as usize, old.len());
    let events: Vec<String> = db.column("SELECT event_id FROM webhook_events", &[]);
    assert_eq!(
        events,
        vec!["evt_kept".to_owned()],
        "the purged encounters' events go with them"
    );
    // Generated text repeats across encounters: a canary still held by a kept row is not a leak.
    let image = db.disk_image();
    let leaked: Vec<&String> = marks
        .iter()
        .filter(|m| holds(&image, m) && db.rows_holding(m).is_empty())
        .collect();
    assert!(
        leaked.is_empty(),
        "{} canaries remain on disk outside live rows, e.g. {:?}: {}",
        leaked.len(),
        leaked.first(),
        leaked.first().map(|m| locate(db, m)).unwrap_or_default()
    );
    assert!(
        marks.iter().filter(|m| !holds(&image, m)).count() > marks.len() / 2,
        "most canaries of purged encounters should be gone entirely"
    );
    for id in &old {
        assert!(
            !holds(&image, id),
            "purged encounter {id} still on disk: {}",
            locate(db, id)
        );
    }
    // Files are content-addressed and may be shared: exactly the referenced ones remain.
    let files: BTreeSet<String> = std::fs::read_dir(&config.audio.directory)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let referenced: BTreeSet<String> = db
        .column("SELECT DISTINCT path FROM recordings", &[])
        .into_iter()
        .collect();
    assert_eq!(files, referenced);
    assert!(counts.recordings > 0 && files.len() <= files_before);
    let recorded: (i64, i64) = db.row("SELECT encounters, documents FROM purges", &[]);
    assert_eq!(recorded.0 as u64, counts.encounters);

    // A reconcile over the purged range lists those encounters again and stores none of them.
    let all = BackfillRange {
        start: config.sync.start_at,
        end: OffsetDateTime::now_utc(),
    };
    env.sync(&config, CyclePlan::full(Some(all), false)).await;
    let back: i64 = db.scalar(
        "SELECT count(*) FROM encounters WHERE created_at_ns < ?1",
        &[&(cut.unix_timestamp_nanos() as i64)],
    );
    assert_eq!(back, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_reader_processes_during_a_sync_see_no_errors_and_the_wal_stays_bounded() {
    let env = TestEnv::with_encounters(64, 3_000).await;
    let mut raw = env.raw_config();
    raw.database.wal_size_limit = 4 * 1024 * 1024;
    raw.limits.requests_per_second = 1_500.0;
    let config = raw.validate().unwrap();
    let db = env.db_path();
    drop(charthero_sync::store::sqlite::open_writer(&db, Duration::from_secs(1)).unwrap());
    let stop = env.dir.path().join("stop");
    let script = r#"
import os, sqlite3, sys
db, stop = sys.argv[1], sys.argv[2]
queries, errors = 0, 0
while not os.path.exists(stop):
    try:
        c = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
        c.execute("SELECT count(*), sum(document_count) FROM encounter_overview").fetchone()
        c.execute("SELECT count(*) FROM transcript_text").fetchone()
        c.execute("SELECT count(*) FROM transcript_turns_fts WHERE transcript_turns_fts MATCH 'pain'").fetchone()
        c.close()
        queries += 1
    except Exception as e:
        errors += 1
        print("reader error:", e, file=sys.stderr)
print(queries, errors)
"#;
    let readers: Vec<_> = (0..8)
        .map(|_| {
            std::process::Command::new("python3")
                .args(["-c", script])
                .arg(&db)
                .arg(&stop)
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("python3 is available")
        })
        .collect();
    let report = env.sync(&config, CyclePlan::full(None, false)).await;
    assert!(report.is_complete());
    std::fs::write(&stop, "").unwrap();
    let mut total = 0;
    for r in readers {
        let out = tokio::task::spawn_blocking(move || r.wait_with_output().unwrap())
            .await
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let mut parts = text.split_whitespace().map(|n| n.parse::<u64>().unwrap());
        let (queries, errors) = (parts.next().unwrap(), parts.next().unwrap());
        assert_eq!(errors, 0, "{}", String::from_utf8_lossy(&out.stderr));
        total += queries;
    }
    assert!(total > 8, "the readers barely ran: {total} query rounds");
    compare(&env.sim, &db).assert_empty();
    let wal = std::fs::metadata(format!("{}-wal", db.display()))
        .map(|m| m.len())
        .unwrap_or(0);
    assert!(wal <= 4 * 1024 * 1024, "the WAL is {wal} bytes after the sync");
}
