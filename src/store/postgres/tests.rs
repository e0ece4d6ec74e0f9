//! The PostgreSQL backend against a throwaway server (`charthero_sim::pgcluster`): migrations,
//! the schema-version rule, pages compared column by column with what the SQLite backend stores
//! for the same records, identical pages that write nothing, removals, the watermark moving with
//! its page, history, the views and full-text search against SQLite's, and the read-only role.
//! Each test skips, saying why, where no server can run (and fails instead under
//! `CHARTHERO_REQUIRE_POSTGRES=1`).

use std::collections::BTreeMap;
use std::time::Duration;

use charthero_sim::pgcluster::{self, PgDatabase};
use postgres::error::SqlState;
use postgres::{Client, NoTls};
use time::macros::datetime;

use super::*;
use crate::store::sqlite::rows_as_text;
use crate::store::{DocumentRecord, IdCollision, IdKind, PatientRecord, RunCounts, RunOutcome};
use crate::timefmt::{parse_rfc3339, unix_nanos};

/// A new database in the shared cluster (None, reason printed, where there is none).
fn database(name: &str) -> Option<PgDatabase> {
    let cluster = pgcluster::shared()?;
    Some(cluster.create_database(name).expect("a test database"))
}

/// A connection as `user`, with the warehouse's schema on its search_path.
fn connect_as(db: &PgDatabase, user: &str, password: &str) -> Result<Client, postgres::Error> {
    let mut config: postgres::Config = db.url.parse().expect("the test database's URL");
    config
        .user(user)
        .password(password)
        .options("-c search_path=charthero");
    config.connect(NoTls)
}

/// A connection as the database's owner.
fn connect(db: &PgDatabase) -> Client {
    connect_as(db, &db.user, &db.password).expect("a connection to the test database")
}

/// A migrated warehouse in a new database.
fn warehouse(name: &str) -> Option<(PgDatabase, PgBackend)> {
    let db = database(name)?;
    let backend = open_writer(connect(&db), db.url.clone()).expect("migrations apply");
    Some((db, backend))
}

/// Commits one page in its own write group, through the trait as the writer does.
fn commit(
    backend: &mut dyn Backend,
    records: &[EncounterRecord],
    removals: &[Removal],
    completion: Option<&WindowCompletion>,
    now: OffsetDateTime,
) -> PageCounts {
    let mut counts = None;
    let end = backend.write_group(&mut |tx| {
        let result = tx.commit_page(records, removals, completion, now);
        let ok = result.is_ok();
        counts = Some(result);
        ok
    });
    assert!(matches!(end, GroupEnd::Committed), "{end:?}");
    counts.expect("the body ran").expect("the page commits")
}

fn document(id: &str, schema_type: &str, status: Option<&str>, title: &str) -> DocumentRecord {
    DocumentRecord {
        document_id: id.to_owned(),
        schema_type: schema_type.to_owned(),
        title: Some(title.to_owned()),
        status: status.map(str::to_owned),
        workflow_variant: None,
        audio_duration_seconds: (schema_type == "ambient_transcript").then_some(61.5),
    }
}

fn patient(id: &str, first: Option<&str>, last: Option<&str>) -> PatientRecord {
    PatientRecord {
        patient_id: id.to_owned(),
        first_name: first.map(str::to_owned),
        last_name: last.map(str::to_owned),
        date_of_birth: first.map(|_| "1970-01-02".to_owned()),
    }
}

/// An encounter created `n` minutes (and some nanoseconds) after a fixed instant; `hash` stands
/// for its content.
fn encounter(
    id: &str,
    n: i64,
    hash: &str,
    status: &str,
    p: Option<PatientRecord>,
    documents: Vec<DocumentRecord>,
) -> EncounterRecord {
    let created = datetime!(2026-05-25 14:00:00.123456789 UTC) + time::Duration::minutes(n);
    EncounterRecord {
        encounter_id: id.to_owned(),
        organization_id: "org_1".to_owned(),
        encounter_type: Some("visit".to_owned()),
        status: Some(status.to_owned()),
        created_at: created,
        updated_at: created + time::Duration::nanoseconds(999),
        date_of_service: Some(created),
        patient: p,
        documents,
        content_hash: hash.to_owned(),
        raw_json: format!(r#"{{"id":"{id}","hash":"{hash}"}}"#),
    }
}

fn window(run_id: i64, backfill_id: Option<i64>, end_minutes: i64, advances: bool) -> WindowCompletion {
    let start = datetime!(2026-05-25 14:00:00 UTC);
    WindowCompletion {
        organization: "default".into(),
        run_id,
        kind: if backfill_id.is_some() { "backfill" } else { "live" },
        backfill_id,
        start_at: start,
        end_at: start + time::Duration::minutes(end_minutes) + time::Duration::nanoseconds(7),
        records_seen: 3,
        total: 3,
        pages: 1,
        passes: 1,
        removed: 0,
        id_set_hash: "ids".to_owned(),
        advances_watermark: advances,
    }
}

/// A page's records, removals and window, and when it is committed.
type Page = (
    Vec<EncounterRecord>,
    Vec<Removal>,
    Option<WindowCompletion>,
    OffsetDateTime,
);

/// The pages of the round trip, each with the time it is committed at: new encounters sharing a
/// patient (one without names), then changes (a note dropped, a title changed, a note added, a
/// document moved between encounters, an encounter listed twice), a removal completing a
/// window, the removed encounter listed again, and a change of `updated_at` by a nanosecond.
fn scenario() -> Vec<Page> {
    let p1 = || Some(patient("pat_1", Some("Ada"), Some("Lovelace")));
    let p1_terse = || Some(patient("pat_1", None, None));
    let note = |id: &str, title: &str| document(id, "document", None, title);
    let ambient = |id: &str, status: &str| document(id, "ambient_transcript", Some(status), "Visit");
    let first = vec![
        encounter(
            "enc_a",
            1,
            "a1",
            "open",
            p1(),
            vec![note("doc_n1", "Note"), ambient("doc_t1", "completed")],
        ),
        encounter(
            "enc_b",
            2,
            "b1",
            "open",
            p1_terse(),
            vec![ambient("doc_t2", "processing")],
        ),
        encounter("enc_c", 3, "c1", "open", None, vec![]),
    ];
    let second = vec![
        encounter(
            "enc_a",
            1,
            "a2",
            "open",
            p1_terse(),
            vec![ambient("doc_t1", "completed"), note("doc_n2", "Second note")],
        ),
        // doc_t2 moves from enc_b to enc_d (listed first: see upsert.rs on content_seq).
        encounter(
            "enc_d",
            4,
            "d1",
            "open",
            None,
            vec![ambient("doc_t2", "completed")],
        ),
        encounter("enc_b", 2, "b2", "completed", p1(), vec![]),
        encounter("enc_c", 3, "c2", "completed", None, vec![]),
        encounter("enc_c", 3, "c3", "signed", None, vec![]),
    ];
    let removal = vec![Removal {
        encounter_id: "enc_c".to_owned(),
        reason: "encounter_not_found".to_owned(),
    }];
    let revived = vec![encounter("enc_c", 3, "c3", "signed", None, vec![])];
    // Only updated_at's nanoseconds change: history as on SQLite, which compares the exact text.
    let mut touched = encounter("enc_b", 2, "b3", "completed", p1(), vec![]);
    touched.updated_at += time::Duration::nanoseconds(1);
    vec![
        (first, vec![], None, datetime!(2026-05-25 15:00:00.000000001 UTC)),
        (second, vec![], None, datetime!(2026-05-25 16:00:00 UTC)),
        (
            vec![],
            removal,
            Some(window(1, None, 10, true)),
            datetime!(2026-05-25 17:00:00 UTC),
        ),
        (revived, vec![], None, datetime!(2026-05-25 18:00:00 UTC)),
        (vec![touched], vec![], None, datetime!(2026-05-25 19:00:00 UTC)),
    ]
}

/// A stored value, comparable between the backends: timestamps as microseconds (PostgreSQL's
/// precision), SQLite's text parsed.
#[derive(Debug, PartialEq)]
enum Value {
    Null,
    Text(String),
    Int(i64),
    Real(f64),
    Micros(i64),
    Bool(bool),
}

/// The columns of `table` in the PostgreSQL schema with their types, search columns left out
/// (SQLite has none).
fn columns(pg: &mut Client, table: &str) -> Vec<(String, String)> {
    pg.query(
        "SELECT column_name::text, data_type::text FROM information_schema.columns
          WHERE table_schema = current_schema() AND table_name = $1 AND data_type <> 'tsvector'
          ORDER BY ordinal_position",
        &[&table],
    )
    .unwrap()
    .iter()
    .map(|r| (r.try_get(0).unwrap(), r.try_get(1).unwrap()))
    .collect()
}

fn pg_rows(pg: &mut Client, table: &str, order: &str, skip: &[&str]) -> Vec<Vec<(String, Value)>> {
    let cols: Vec<(String, String)> = columns(pg, table)
        .into_iter()
        .filter(|(c, _)| !skip.contains(&c.as_str()))
        .collect();
    let list: Vec<&str> = cols.iter().map(|(c, _)| c.as_str()).collect();
    let sql = format!("SELECT {} FROM {table} ORDER BY {order}", list.join(", "));
    pg.query(&sql, &[])
        .unwrap()
        .iter()
        .map(|row| {
            cols.iter()
                .enumerate()
                .map(|(i, (name, ty))| {
                    let v = match ty.as_str() {
                        "text" => row.try_get::<_, Option<String>>(i).unwrap().map(Value::Text),
                        "bigint" => row.try_get::<_, Option<i64>>(i).unwrap().map(Value::Int),
                        "double precision" => row.try_get::<_, Option<f64>>(i).unwrap().map(Value::Real),
                        "boolean" => row.try_get::<_, Option<bool>>(i).unwrap().map(Value::Bool),
                        "timestamp with time zone" => row
                            .try_get::<_, Option<OffsetDateTime>>(i)
                            .unwrap()
                            .map(|t| Value::Micros(unix_nanos(t).div_euclid(1000))),
                        other => panic!("column {table}.{name} of type {other}"),
                    };
                    (name.clone(), v.unwrap_or(Value::Null))
                })
                .collect()
        })
        .collect()
}

/// The same columns of `table` in the SQLite warehouse `sqlite` reads from (its rows as text).
fn sqlite_rows(
    sqlite: &dyn Fn(&str) -> Vec<Vec<Option<String>>>,
    pg: &mut Client,
    table: &str,
    order: &str,
    skip: &[&str],
) -> Vec<Vec<(String, Value)>> {
    let cols: Vec<(String, String)> = columns(pg, table)
        .into_iter()
        .filter(|(c, _)| !skip.contains(&c.as_str()))
        .collect();
    let list: Vec<&str> = cols.iter().map(|(c, _)| c.as_str()).collect();
    sqlite(&format!(
        "SELECT {} FROM {table} ORDER BY {order}",
        list.join(", ")
    ))
    .into_iter()
    .map(|row| {
        cols.iter()
            .zip(row)
            .map(|((name, ty), text)| {
                let v = text.map(|t| match ty.as_str() {
                    "text" => Value::Text(t),
                    "bigint" => Value::Int(t.parse().unwrap()),
                    "double precision" => Value::Real(t.parse().unwrap()),
                    "boolean" => Value::Bool(t != "0"),
                    "timestamp with time zone" => {
                        Value::Micros(unix_nanos(parse_rfc3339(&t).unwrap()).div_euclid(1000))
                    }
                    other => panic!("column {table}.{name} of type {other}"),
                });
                (name.clone(), v.unwrap_or(Value::Null))
            })
            .collect()
    })
    .collect()
}

/// Every table the sync's pages write, compared row by row and column by column (history by
/// encounter and order of its changes: the two backends number it differently when one page
/// changes several encounters).
fn assert_same_rows(sqlite: &dyn Fn(&str) -> Vec<Vec<Option<String>>>, pg: &mut Client, after: &str) {
    for (table, order, skip) in [
        ("patients", "patient_id", &[][..]),
        ("encounters", "encounter_id", &[][..]),
        ("documents", "document_id", &[][..]),
        (
            "encounter_history",
            "encounter_id, history_id",
            &["history_id"][..],
        ),
        ("sync_runs", "run_id", &[][..]),
        ("sync_windows", "window_id", &[][..]),
        ("organization_state", "organization, name", &[][..]),
    ] {
        let from_sqlite = sqlite_rows(sqlite, pg, table, order, skip);
        let postgres = pg_rows(pg, table, order, skip);
        assert_eq!(postgres, from_sqlite, "{table} after {after}");
    }
}

#[test]
fn migrations_apply_twice_without_change() {
    let Some((db, backend)) = warehouse("migrate_twice") else {
        return;
    };
    drop(backend);
    let again = open_writer(connect(&db), db.url.clone()).expect("migrations apply again");
    let applied: i64 = again
        .db()
        .unwrap()
        .query_one("SELECT count(*) FROM refinery_schema_history", &[])
        .unwrap()
        .try_get(0)
        .unwrap();
    assert_eq!(applied, latest_version());
    assert!(open_current(connect(&db), db.url.clone()).is_ok());
}

#[test]
fn open_current_refuses_an_older_or_newer_schema() {
    let Some(db) = database("current_version") else {
        return;
    };
    let older = open_current(connect(&db), db.url.clone())
        .err()
        .expect("an empty schema is refused");
    assert!(
        format!("{older:#}").contains("schema version 0") && format!("{older:#}").contains("migrate"),
        "{older:#}"
    );
    let backend = open_writer(connect(&db), db.url.clone()).unwrap();
    backend
        .db()
        .unwrap()
        .execute(
            "INSERT INTO refinery_schema_history (version, name, applied_on, checksum)
             VALUES (999, 'future', '2030-01-01T00:00:00Z', '0')",
            &[],
        )
        .unwrap();
    let newer = open_current(connect(&db), db.url.clone())
        .err()
        .expect("a newer schema is refused");
    assert!(
        format!("{newer:#}").contains("newer than this release"),
        "{newer:#}"
    );
}

#[test]
fn pages_store_exactly_what_the_sqlite_backend_stores() {
    let Some((db, mut pg)) = warehouse("round_trip") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut sqlite =
        crate::store::sqlite::open_writer(&dir.path().join("w.db"), Duration::from_secs(5)).unwrap();
    // A second connection to the same warehouse, for the comparisons.
    let mut check = connect(&db);
    let started = datetime!(2026-05-25 14:30:00 UTC);
    assert_eq!(pg.start_run("default", "sync", started).unwrap(), 1);
    assert_eq!(sqlite.start_run("default", "sync", started).unwrap(), 1);
    for (i, (records, removals, completion, now)) in scenario().into_iter().enumerate() {
        if i == 1 {
            // A note fetched before the encounter changed: a change asks for it again.
            sqlite
                .execute(
                    "UPDATE documents SET detail_state = 'done' WHERE document_id = 'doc_n1'",
                    [],
                )
                .unwrap();
            check
                .execute(
                    "UPDATE documents SET detail_state = 'done' WHERE document_id = 'doc_n1'",
                    &[],
                )
                .unwrap();
        }
        let from_pg = commit(&mut pg, &records, &removals, completion.as_ref(), now);
        let from_sqlite = commit(&mut sqlite, &records, &removals, completion.as_ref(), now);
        assert_eq!(from_pg, from_sqlite, "counts of page {i}");
        assert_same_rows(
            &|sql| rows_as_text(&sqlite, sql).unwrap(),
            &mut check,
            &format!("page {i}"),
        );
    }
    let finished = datetime!(2026-05-25 19:00:00.5 UTC);
    let end = RunEnd {
        outcome: RunOutcome::Succeeded,
        counts: RunCounts {
            list_requests: 4,
            ..RunCounts::default()
        },
        disabled_routes: None,
        error: None,
        reason_code: None,
    };
    pg.finish_run(1, &end, finished).unwrap();
    sqlite.finish_run(1, &end, finished).unwrap();
    assert_same_rows(&|sql| rows_as_text(&sqlite, sql).unwrap(), &mut check, "the run");
    let history: Vec<String> = check
        .query(
            "SELECT change FROM encounter_history WHERE encounter_id = 'enc_c' ORDER BY history_id",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.try_get(0).unwrap())
        .collect();
    assert_eq!(history, ["created", "changed", "changed", "removed", "revived"]);
}

/// Each encounter, document and patient row: its ID, its clinic and what tells it apart.
const CLINIC_ROWS: &str = "
    SELECT 'e', encounter_id || ' ' || organization_id || ' '
                || CASE WHEN removed_at IS NULL THEN 'live' ELSE 'removed' END FROM encounters
    UNION ALL SELECT 'd', document_id || ' ' || encounter_id || ' ' || organization_id FROM documents
    UNION ALL SELECT 'p', patient_id || ' ' || organization_id || ' ' || coalesce(first_name, '-')
      FROM patients
    ORDER BY 1, 2";

fn pg_clinic_rows(pg: &mut Client) -> Vec<(String, String)> {
    let rows = pg.query(CLINIC_ROWS, &[]).unwrap();
    rows.iter()
        .map(|r| (r.try_get(0).unwrap(), r.try_get(1).unwrap()))
        .collect()
}

fn pairs(rows: Vec<Vec<Option<String>>>) -> Vec<(String, String)> {
    rows.into_iter()
        .map(|r| (r[0].clone().unwrap(), r[1].clone().unwrap()))
        .collect()
}

/// A finished ambient document whose recording was `unavailable` under one encounter and that
/// moves to a new one is asked for again (docs/content.md): under its new encounter the audio
/// route is another route. Both orders of the page (the new encounter listed after or before the
/// one it left), on both backends.
#[test]
fn a_moved_documents_missing_recording_is_asked_again_in_either_order_on_both_backends() {
    let ambient_x = || {
        vec![document(
            "doc_x",
            "ambient_transcript",
            Some("completed"),
            "Ambient",
        )]
    };
    let t1 = datetime!(2026-05-25 14:00:00 UTC);
    let t2 = datetime!(2026-05-25 15:00:00 UTC);
    let state = "SELECT encounter_id, audio_state, audio_attempts, removed_at IS NULL
                   FROM documents WHERE document_id = 'doc_x'";
    for new_first in [false, true] {
        let left = encounter("enc_a", 1, "a2", "completed", None, vec![]);
        let joined = encounter("enc_b", 2, "b1", "completed", None, ambient_x());
        let second = if new_first {
            vec![joined, left]
        } else {
            vec![left, joined]
        };
        let first = [encounter("enc_a", 1, "a1", "completed", None, ambient_x())];
        let unavailable = "UPDATE documents SET audio_state = 'unavailable', audio_attempts = 3
                            WHERE document_id = 'doc_x'";
        let dir = tempfile::tempdir().unwrap();
        let mut sqlite =
            crate::store::sqlite::open_writer(&dir.path().join("w.db"), Duration::from_secs(5)).unwrap();
        commit(&mut sqlite, &first, &[], None, t1);
        sqlite.execute(unavailable, []).unwrap();
        commit(&mut sqlite, &second, &[], None, t2);
        let expected = vec![vec![
            Some("enc_b".to_owned()),
            None,
            Some("0".to_owned()),
            Some("1".to_owned()),
        ]];
        assert_eq!(
            rows_as_text(&sqlite, state).unwrap(),
            expected,
            "SQLite, new encounter listed first: {new_first}"
        );
        let Some((db, mut pg)) = warehouse(&format!("moved_audio_{new_first}")) else {
            continue;
        };
        commit(&mut pg, &first, &[], None, t1);
        let mut check = connect(&db);
        check.execute(unavailable, &[]).unwrap();
        commit(&mut pg, &second, &[], None, t2);
        let row = check.query_one(state, &[]).unwrap();
        let got = (
            row.try_get::<_, String>(0).unwrap(),
            row.try_get::<_, Option<String>>(1).unwrap(),
            row.try_get::<_, i64>(2).unwrap(),
            row.try_get::<_, bool>(3).unwrap(),
        );
        assert_eq!(
            got,
            ("enc_b".to_owned(), None, 0, true),
            "PostgreSQL, new encounter listed first: {new_first}"
        );
    }
}

#[test]
fn a_page_holding_an_id_another_clinic_holds_is_refused_whole_on_both_backends() {
    // SQLite always; PostgreSQL too where a server runs (else the reason is printed).
    let mut pg = warehouse("id_collision").map(|(db, backend)| (connect(&db), backend, db));
    let dir = tempfile::tempdir().unwrap();
    let mut sqlite =
        crate::store::sqlite::open_writer(&dir.path().join("w.db"), Duration::from_secs(5)).unwrap();
    let now = datetime!(2026-05-25 14:30:00 UTC);
    let of =
        |org: &str, id: &str, n: i64, p: Option<PatientRecord>, docs: Vec<DocumentRecord>| EncounterRecord {
            organization_id: org.to_owned(),
            ..encounter(id, n, id, "completed", p, docs)
        };
    let note = |id: &str| document(id, "document", None, "Note");
    let ann = || Some(patient("pat_1", Some("Ann"), Some("Lee")));
    let beta_page = |first: usize, n: usize| -> Vec<EncounterRecord> {
        (first..first + n)
            .map(|i| of("org_2", &format!("enc_n{i:03}"), 100 + i as i64, None, Vec::new()))
            .collect()
    };
    // Each step on every backend, answering each backend's counts.
    macro_rules! each {
        (|$b:ident| $body:expr) => {{
            let mut answers = Vec::new();
            for $b in std::iter::once(&mut sqlite as &mut dyn Backend)
                .chain(pg.as_mut().map(|(_, backend, _)| backend as &mut dyn Backend))
            {
                answers.push($body);
            }
            answers
        }};
    }
    // The clinic rows, the same on every backend.
    macro_rules! rows {
        () => {{
            let rows = pairs(rows_as_text(&sqlite, CLINIC_ROWS).unwrap());
            if let Some((check, _, _)) = pg.as_mut() {
                assert_eq!(
                    pg_clinic_rows(check),
                    rows,
                    "PostgreSQL stores what SQLite stores"
                );
            }
            rows
        }};
    }
    let beta_live = Removal {
        encounter_id: "enc_b9".into(),
        reason: "encounter_not_found".into(),
    };
    let alpha_gone = Removal {
        encounter_id: "enc_r".into(),
        reason: "encounter_not_found".into(),
    };
    each!(|backend| {
        // In a warehouse of one clinic nothing is asked: every ID is that clinic's.
        let first = of("org_1", "enc_a", 1, ann(), vec![note("doc_1")]);
        let nameless = of(
            "org_1",
            "enc_c",
            2,
            Some(patient("pat_2", None, None)),
            Vec::new(),
        );
        let purged = of(
            "org_1",
            "enc_p",
            4,
            Some(patient("pat_3", Some("Dee"), None)),
            Vec::new(),
        );
        assert_eq!(
            commit(backend, &[first, nameless, purged], &[], None, now).refused,
            None
        );
        for (name, id) in [("alpha", "org_1"), ("beta", "org_2")] {
            assert_eq!(backend.claim_organization_id(name, id, now).unwrap(), Ok(()));
        }
        commit(
            backend,
            &[of("org_1", "enc_r", 3, None, vec![note("doc_r")])],
            &[],
            None,
            now,
        );
        commit(backend, &[], std::slice::from_ref(&alpha_gone), None, now);
        let counts = commit(
            backend,
            &[of("org_2", "enc_b9", 9, None, Vec::new())],
            &[],
            None,
            now,
        );
        assert_eq!((counts.refused, counts.new), (None, 1));
        backend.start_run("beta", "sync", now).unwrap()
    });
    // Alpha's only encounter of pat_3 goes (as a purge deletes it); its patient row stays.
    sqlite
        .execute("DELETE FROM encounters WHERE encounter_id = 'enc_p'", [])
        .unwrap();
    if let Some((check, _, _)) = pg.as_mut() {
        check
            .execute("DELETE FROM encounters WHERE encounter_id = 'enc_p'", &[])
            .unwrap();
    }
    let before = rows!();
    let refused = |kind: IdKind, id: &str, encounter_id: &str| IdCollision {
        kind,
        id: id.into(),
        encounter_id: encounter_id.into(),
        holder: "alpha".into(),
    };
    // Beta's pages of 60 records, a removal of beta's own encounter and its window's
    // completion: the whole page is refused, and the answer names the first ID alpha holds,
    // live or removed.
    let refusals = [
        (
            of("org_2", "enc_a", 1, None, Vec::new()),
            refused(IdKind::Encounter, "enc_a", "enc_a"),
        ),
        (
            of("org_2", "enc_r", 3, None, Vec::new()),
            refused(IdKind::Encounter, "enc_r", "enc_r"),
        ),
        (
            of("org_2", "enc_b1", 4, None, vec![note("doc_b1"), note("doc_1")]),
            refused(IdKind::Document, "doc_1", "enc_b1"),
        ),
        (
            of(
                "org_2",
                "enc_b2",
                5,
                Some(patient("pat_1", Some("Bob"), Some("Lee"))),
                Vec::new(),
            ),
            refused(IdKind::Patient, "pat_1", "enc_b2"),
        ),
    ];
    for (rec, expected) in refusals {
        let mut page = beta_page(0, 59);
        page.push(rec);
        let completion = WindowCompletion {
            organization: "beta".into(),
            ..window(1, None, 10, true)
        };
        let answers = each!(|backend| commit(
            backend,
            &page,
            std::slice::from_ref(&beta_live),
            Some(&completion),
            now
        ));
        for counts in answers {
            assert_eq!(counts.refused.as_ref(), Some(&expected));
            assert_eq!((counts.new, counts.removed), (0, 0));
        }
        assert_eq!(rows!(), before, "{expected}");
    }
    let windows: i64 = sqlite
        .query_row("SELECT count(*) FROM sync_windows", [], |r| r.get(0))
        .unwrap();
    assert_eq!(windows, 0, "no refused window was recorded");
    if let Some((check, _, _)) = pg.as_mut() {
        let windows: i64 = check
            .query_one("SELECT count(*) FROM sync_windows", &[])
            .unwrap()
            .try_get(0)
            .unwrap();
        assert_eq!(windows, 0, "no refused window was recorded");
    }
    assert!(
        refused(IdKind::Document, "doc_1", "enc_b1")
            .to_string()
            .starts_with(
                "document doc_1 (of encounter enc_b1) is stored for organization alpha, another clinic"
            )
    );
    // A page of beta without alpha's IDs is written at once, never staged; the same patient
    // seen at both clinics (known fields agree) is beta's to list, and fills nothing in of the
    // row alpha's records write; a patient alpha holds no encounter of any more is beta's to
    // take over, whatever alpha last stored.
    let mut page = beta_page(100, 59);
    page.push(of(
        "org_2",
        "enc_b3",
        200,
        Some(patient("pat_1", Some("Ann"), None)),
        Vec::new(),
    ));
    page.push(of(
        "org_2",
        "enc_b4",
        201,
        Some(patient("pat_2", Some("Cy"), Some("Doe"))),
        Vec::new(),
    ));
    page.push(of(
        "org_2",
        "enc_b5",
        202,
        Some(patient("pat_3", Some("Eve"), None)),
        Vec::new(),
    ));
    for counts in each!(|backend| commit(backend, &page, &[], None, now)) {
        assert_eq!((counts.refused, counts.new), (None, 62));
    }
    let after = rows!();
    assert!(
        after.contains(&("e".into(), "enc_n100 org_2 live".into())),
        "{after:?}"
    );
    assert!(
        after.contains(&("p".into(), "pat_1 org_1 Ann".into())),
        "{after:?}"
    );
    assert!(after.contains(&("p".into(), "pat_2 org_1 -".into())), "{after:?}");
    assert!(
        after.contains(&("p".into(), "pat_3 org_2 Eve".into())),
        "{after:?}"
    );
    let staged: i64 = sqlite
        .query_row("SELECT count(*) FROM staged_encounters", [], |r| r.get(0))
        .unwrap();
    assert_eq!(staged, 0);
}

/// Each row's version (`xmin`, the transaction that wrote it) in the tables a page writes.
fn row_versions(pg: &mut Client) -> Vec<(String, String)> {
    pg.query(
        "SELECT 'e:' || encounter_id, xmin::text FROM encounters
         UNION ALL SELECT 'p:' || patient_id, xmin::text FROM patients
         UNION ALL SELECT 'd:' || document_id, xmin::text FROM documents
         UNION ALL SELECT 'h:' || history_id, xmin::text FROM encounter_history
         ORDER BY 1",
        &[],
    )
    .unwrap()
    .iter()
    .map(|r| (r.try_get(0).unwrap(), r.try_get(1).unwrap()))
    .collect()
}

#[test]
fn an_identical_page_writes_nothing_and_a_removal_is_marked_once() {
    let Some((db, mut pg)) = warehouse("identical_page") else {
        return;
    };
    let mut check = connect(&db);
    let (page, _, _, first_at) = scenario().remove(0);
    let counts = commit(&mut pg, &page, &[], None, first_at);
    assert_eq!((counts.new, counts.unchanged), (3, 0));
    let before = row_versions(&mut check);
    let later = first_at + time::Duration::hours(1);
    let again = commit(&mut pg, &page, &[], None, later);
    assert_eq!((again.new, again.changed, again.unchanged), (0, 0, 3));
    assert_eq!(row_versions(&mut check), before, "an identical page wrote rows");

    let gone = [Removal {
        encounter_id: "enc_b".to_owned(),
        reason: "absent_on_reconcile".to_owned(),
    }];
    assert_eq!(commit(&mut pg, &[], &gone, None, later).removed, 1);
    assert_eq!(
        commit(&mut pg, &[], &gone, None, later).removed,
        0,
        "already marked"
    );
    let row = check
        .query_one(
            "SELECT removed_reason, removed_at = $1 FROM encounters WHERE encounter_id = 'enc_b'",
            &[&later],
        )
        .unwrap();
    assert_eq!(row.try_get::<_, String>(0).unwrap(), "absent_on_reconcile");
    assert!(row.try_get::<_, bool>(1).unwrap());
    assert_eq!(
        pg.live_ids_in_range("org_1", first_at - time::Duration::days(1), first_at)
            .unwrap()
            .len(),
        2,
        "enc_a and enc_c stay live"
    );
}

#[test]
fn a_window_moves_the_watermark_and_backfill_cursor_only_with_its_page() {
    let Some((_db, mut pg)) = warehouse("watermark") else {
        return;
    };
    let now = datetime!(2026-05-25 15:00:00 UTC);
    let run = pg.start_run("default", "sync", now).unwrap();
    let (page, _, _, _) = scenario().remove(0);
    let live = window(run, None, 10, true);
    // A group whose body asks for a rollback leaves neither the page nor the window behind.
    let end = pg.write_group(&mut |tx| {
        tx.commit_page(&page, &[], Some(&live), now).unwrap();
        false
    });
    assert!(matches!(end, GroupEnd::RolledBack), "{end:?}");
    assert_eq!(pg.complete_through("default").unwrap(), None);
    assert_eq!(pg.table_counts().unwrap().encounters, 0);
    // A failed statement aborts the transaction; the group rolls back and the backend works on.
    let end = pg.write_group(&mut |tx| {
        tx.commit_page(&page, &[], Some(&window(run + 7, None, 10, true)), now)
            .is_ok()
    });
    assert!(matches!(end, GroupEnd::RolledBack), "{end:?}");
    assert_eq!(pg.table_counts().unwrap().encounters, 0);

    commit(&mut pg, &page, &[], Some(&live), now);
    assert_eq!(
        pg.complete_through("default").unwrap(),
        Some(live.end_at),
        "exact to the nanosecond"
    );
    // An older window never moves the watermark back.
    commit(&mut pg, &[], &[], Some(&window(run, None, 5, true)), now);
    assert_eq!(pg.complete_through("default").unwrap(), Some(live.end_at));

    let range = (
        datetime!(2026-05-01 00:00:00 UTC),
        datetime!(2026-05-25 14:00:00 UTC),
    );
    let backfill = pg
        .open_backfill("default", range.0, range.1, "sync", now)
        .unwrap();
    assert_eq!(backfill.cursor, range.0);
    let slice = window(run, Some(backfill.backfill_id), 3, false);
    commit(&mut pg, &[], &[], Some(&slice), now);
    assert_eq!(
        pg.complete_through("default").unwrap(),
        Some(live.end_at),
        "a backfill leaves the watermark"
    );
    let resumed = pg
        .open_backfill("default", range.0, range.1, "sync", now)
        .unwrap();
    assert_eq!(resumed.backfill_id, backfill.backfill_id);
    assert_eq!(
        unix_nanos(resumed.cursor).div_euclid(1000),
        unix_nanos(slice.end_at).div_euclid(1000),
        "the cursor, at PostgreSQL's microseconds"
    );
    assert_eq!(pg.next_backfill("default").unwrap(), Some(range));
    pg.finish_backfill(backfill.backfill_id, None, now).unwrap();
    assert_eq!(pg.next_backfill("default").unwrap(), None);
}

#[test]
fn the_ledger_keeps_runs_backfills_and_organizations_per_organization() {
    let Some((_db, pg)) = warehouse("ledger") else {
        return;
    };
    let now = datetime!(2026-05-25 15:00:00.123456789 UTC);
    assert_eq!(pg.claim_organization_id("default", "org_1", now).unwrap(), Ok(()));
    assert_eq!(pg.claim_organization_id("default", "org_1", now).unwrap(), Ok(()));
    assert_eq!(
        pg.claim_organization_id("second", "org_1", now).unwrap(),
        Err("default".to_owned())
    );
    assert_eq!(
        pg.known_organization_id("default").unwrap().as_deref(),
        Some("org_1")
    );
    assert_eq!(pg.known_organization_id("second").unwrap(), None);

    let a = pg.start_run("default", "run", now).unwrap();
    let b = pg.start_run("second", "run", now).unwrap();
    assert_eq!(pg.abort_stale_runs("default", now).unwrap(), 1);
    assert_eq!(pg.abort_stale_runs("default", now).unwrap(), 0);
    let outcome: String = pg
        .db()
        .unwrap()
        .query_one("SELECT outcome FROM sync_runs WHERE run_id = $1", &[&b])
        .unwrap()
        .try_get(0)
        .unwrap();
    assert_eq!(outcome, "running", "another organization's run is not stale");
    assert!(a < b);

    for which in [StateTime::DeepRevisitAt, StateTime::PausedUntil] {
        assert_eq!(pg.state_time("default", which).unwrap(), None);
        pg.set_state_time("default", which, now).unwrap();
        assert_eq!(pg.state_time("default", which).unwrap(), Some(now));
        assert_eq!(pg.state_time("second", which).unwrap(), None);
    }
    let later = now + time::Duration::hours(1);
    pg.set_state_time("default", StateTime::PausedUntil, later)
        .unwrap();
    assert_eq!(
        (
            pg.state_time("default", StateTime::DeepRevisitAt).unwrap(),
            pg.state_time("default", StateTime::PausedUntil).unwrap()
        ),
        (Some(now), Some(later)),
        "each instant is kept apart and replaced"
    );

    let (start, end) = (
        datetime!(2026-01-01 00:00:00 UTC),
        datetime!(2026-02-01 00:00:00 UTC),
    );
    let queued = pg.queue_backfill("second", start, end, "backfill", now).unwrap();
    assert_eq!(pg.next_backfill("default").unwrap(), None);
    assert_eq!(pg.next_backfill("second").unwrap(), Some((start, end)));
    let opened = pg.open_backfill("second", start, end, "run", now).unwrap();
    assert_eq!(
        (opened.backfill_id, opened.cursor),
        (queued, start),
        "the queued backfill is resumed"
    );
    pg.finish_backfill(queued, Some("interrupted"), now).unwrap();
    assert_eq!(
        pg.next_backfill("second").unwrap(),
        Some((start, end)),
        "an interrupted backfill stays"
    );

    assert_eq!(pg.marker("demo_database").unwrap(), None);
    pg.set_marker("demo_database").unwrap();
    pg.set_marker("demo_database").unwrap();
    assert_eq!(pg.marker("demo_database").unwrap().as_deref(), Some("yes"));
    pg.rebuild_search().unwrap();
    pg.checkpoint().unwrap();
    pg.set_wal_size_limit(1 << 20).unwrap();
}

#[test]
fn charthero_readers_may_read_every_table_and_view_and_write_none() {
    let Some((db, _pg)) = warehouse("readers") else {
        return;
    };
    let cluster = pgcluster::shared().expect("the cluster the warehouse is in");
    let password: String = std::iter::repeat_with(fastrand::alphanumeric).take(20).collect();
    cluster
        .psql(&format!(
            "CREATE ROLE readers_analyst LOGIN PASSWORD '{password}' IN ROLE charthero_readers;"
        ))
        .unwrap();
    let mut analyst = connect_as(&db, "readers_analyst", &password).expect("the analyst logs in");
    let relations: Vec<String> = analyst
        .query(
            "SELECT table_name::text FROM information_schema.tables
              WHERE table_schema = 'charthero' ORDER BY 1",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.try_get(0).unwrap())
        .collect();
    for expected in [
        "encounters",
        "documents",
        "encounter_overview",
        "transcript_text",
        "sync_state",
    ] {
        assert!(
            relations.iter().any(|r| r == expected),
            "{expected} in {relations:?}"
        );
    }
    for relation in &relations {
        analyst
            .query(&format!("SELECT * FROM {relation} LIMIT 1"), &[])
            .unwrap_or_else(|e| panic!("SELECT on {relation}: {e}"));
    }
    let refused = analyst
        .execute("INSERT INTO sync_state (name, value) VALUES ('x', 'y')", &[])
        .expect_err("readers cannot write");
    assert_eq!(
        refused.code(),
        Some(&SqlState::INSUFFICIENT_PRIVILEGE),
        "{refused}"
    );
}

#[test]
fn a_migrating_role_that_may_not_create_roles_is_told_what_the_dba_runs() {
    // A cluster of its own: charthero_readers must not exist yet, and roles are cluster-wide.
    let Some(cluster) = pgcluster::require_or_skip() else {
        return;
    };
    let db = cluster.create_database("plain").unwrap();
    cluster.psql("ALTER ROLE plain NOCREATEROLE;").unwrap();
    let error = open_writer(connect(&db), db.url.clone())
        .err()
        .expect("the migration needs the role");
    let shown = format!("{error:#}");
    assert!(shown.contains("CREATE ROLE charthero_readers NOLOGIN"), "{shown}");
    cluster.psql("CREATE ROLE charthero_readers NOLOGIN;").unwrap();
    open_writer(connect(&db), db.url.clone()).expect("migrates once the role exists");
}

/// The live encounters (status, `updated_at_ns`), the number of documents and every row's
/// version, read on a connection of its own (on a blocking thread: the synchronous client runs
/// a runtime of its own, which may not be started inside the test's).
async fn stored_state(db: &PgDatabase) -> (BTreeMap<String, (String, i64)>, i64, Vec<(String, String)>) {
    let db = db.clone();
    tokio::task::spawn_blocking(move || {
        let mut check = connect(&db);
        let live = check
            .query(
                "SELECT encounter_id, status, updated_at_ns FROM encounters WHERE removed_at IS NULL",
                &[],
            )
            .unwrap()
            .iter()
            .map(|r| {
                (
                    r.try_get(0).unwrap(),
                    (r.try_get(1).unwrap(), r.try_get(2).unwrap()),
                )
            })
            .collect();
        let documents = check
            .query_one("SELECT count(*) FROM documents", &[])
            .unwrap()
            .try_get(0)
            .unwrap();
        (live, documents, row_versions(&mut check))
    })
    .await
    .unwrap()
}

/// A list-only cycle of the sync against the simulator, written through the writer thread into
/// PostgreSQL (the context is built here as `crate::connect_organizations` builds it, with this
/// backend in place of the configured one), then a second cycle that finds nothing new.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_list_only_cycle_replicates_the_simulator_into_postgresql() {
    use std::sync::Arc;

    use crate::sync::{CyclePlan, OrgScope, SyncContext, run_cycle};

    let Some((db, backend)) = tokio::task::spawn_blocking(|| warehouse("cycle")).await.unwrap() else {
        return;
    };
    let now = OffsetDateTime::now_utc();
    let sim = charthero_sim::Simulator::start(charthero_sim::SimOptions {
        seed: 17,
        encounters: 600,
        start: now - time::Duration::days(60),
        end: now - time::Duration::hours(1),
        ..charthero_sim::SimOptions::default()
    })
    .await
    .unwrap();
    let mut raw = crate::config::RawConfig::default();
    raw.api.base_url = sim.base_url();
    raw.api.api_key_file = None;
    raw.api.request_timeout = "10s".into();
    raw.database.path = Some("unused-by-this-test.db".into());
    raw.sync.start_at = crate::timefmt::format_stored(now - time::Duration::days(61));
    raw.sync.settle_lag = "0s".into();
    raw.limits.requests_per_second = 5_000.0;
    raw.limits.burst = 200;
    raw.limits.max_in_flight = 8;
    raw.content.details = false;
    raw.content.transcripts = false;
    let config = raw.validate().unwrap();
    let org = config.organizations[0].clone();
    let key = crate::secret::ApiKey::new(&sim.api_key()).unwrap();
    let ceiling = crate::api::Ceiling::new(&config.limits.ceiling()).unwrap();
    let client = crate::api::Client::for_organization(
        &config.api,
        &org,
        &config.limits,
        ceiling,
        &key,
        Arc::default(),
    )
    .unwrap();
    let mut sync = config.sync.clone();
    sync.start_at = org.start_at;
    let ctx = SyncContext {
        org: OrgScope::new(&org.name, org.organization_id.clone(), false),
        client,
        writer: Arc::new(crate::store::Writer::spawn(Box::new(backend))),
        sync,
        content: config.content,
        privacy: config.privacy,
        audio: config.audio.clone(),
        max_in_flight: org.budget.max_in_flight.get(),
        live: Default::default(),
        webhook_events: Default::default(),
    };
    let cancel = tokio_util::sync::CancellationToken::new();
    let first = run_cycle(&ctx, "test", CyclePlan::full(None, false), &cancel)
        .await
        .unwrap_or_else(|e| panic!("the first cycle failed: {e:#}"));
    assert_eq!(first.counts.encounters_new, 600);

    let expected: BTreeMap<String, (String, i64)> = sim
        .snapshot()
        .into_iter()
        .map(|e| (e.encounter_id, (e.status, unix_nanos(e.updated_at))))
        .collect();
    let listed: usize = sim.snapshot().iter().map(|e| e.documents.len()).sum();
    let (live, documents, before) = stored_state(&db).await;
    assert_eq!(live, expected);
    assert_eq!(usize::try_from(documents).unwrap(), listed);

    let second = run_cycle(&ctx, "test", CyclePlan::full(None, false), &cancel)
        .await
        .unwrap_or_else(|e| panic!("the second cycle failed: {e:#}"));
    assert_eq!(
        (second.counts.encounters_new, second.counts.encounters_changed),
        (0, 0)
    );
    let (_, _, after) = stored_state(&db).await;
    assert_eq!(after, before, "a cycle over unchanged data rewrote rows");
    let watermark = ctx.writer.call(|c| c.complete_through("default")).await.unwrap();
    assert!(
        watermark.is_some_and(|w| w > now - time::Duration::hours(1)),
        "{watermark:?}"
    );
}

#[test]
fn the_views_and_search_answer_as_on_sqlite() {
    let Some((db, mut pg)) = warehouse("views") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut sqlite =
        crate::store::sqlite::open_writer(&dir.path().join("w.db"), Duration::from_secs(5)).unwrap();
    let mut check = connect(&db);
    let (page, _, _, now) = scenario().remove(0);
    commit(&mut pg, &page, &[], None, now);
    commit(&mut sqlite, &page, &[], None, now);
    // A transcript and its turns, as the content queue stores them (out of order on purpose).
    let rows = "INSERT INTO transcripts (document_id, encounter_id, provider, audio_duration_seconds, turn_count,
                    fetched_at, organization_id)
                VALUES ('doc_t1', 'enc_a', 'scribe', 61.5, 3, '2026-05-25T15:30:00.000000000Z', 'org_1');
                INSERT INTO transcript_turns (document_id, turn_index, speaker, start_seconds, end_seconds, text,
                    organization_id)
                VALUES ('doc_t1', 2, NULL, 9.0, 12.5, 'Metformin twice daily.', 'org_1'),
                       ('doc_t1', 0, 'clinician', 0.0, 4.0, 'How is the chest pain?', 'org_1'),
                       ('doc_t1', 1, 'patient', 4.0, 9.0, NULL, 'org_1');
                UPDATE documents SET content_format = 'markdown', content_text = 'Follow up in two weeks.'
                 WHERE document_id = 'doc_n1';";
    sqlite.execute_batch(rows).unwrap();
    check.batch_execute(rows).unwrap();
    for (view, order) in [
        ("encounter_overview", "encounter_id"),
        ("transcript_text", "document_id"),
    ] {
        assert_eq!(
            pg_rows(&mut check, view, order, &[]),
            sqlite_rows(
                &|sql| rows_as_text(&sqlite, sql).unwrap(),
                &mut check,
                view,
                order,
                &[]
            ),
            "{view}"
        );
    }
    let text: String = check
        .query_one(
            "SELECT text FROM transcript_text WHERE document_id = 'doc_t1'",
            &[],
        )
        .unwrap()
        .try_get(0)
        .unwrap();
    assert_eq!(
        text,
        "clinician: How is the chest pain?\nunknown: Metformin twice daily."
    );
    let hits = |check: &mut Client, sql: &str, term: &str| -> Vec<String> {
        check
            .query(sql, &[&term])
            .unwrap()
            .iter()
            .map(|r| r.try_get(0).unwrap())
            .collect()
    };
    let turns = "SELECT document_id || '/' || turn_index FROM transcript_turns
                  WHERE text_tsv @@ websearch_to_tsquery('simple', $1) ORDER BY turn_index";
    let notes = "SELECT document_id FROM documents WHERE content_tsv @@ websearch_to_tsquery('simple', $1)";
    assert_eq!(hits(&mut check, turns, "metformin"), ["doc_t1/2"]);
    assert_eq!(hits(&mut check, turns, "\"chest pain\""), ["doc_t1/0"]);
    assert_eq!(hits(&mut check, notes, "\"follow up\""), ["doc_n1"]);
    check
        .execute(
            "UPDATE documents SET content_text = NULL WHERE document_id = 'doc_n1'",
            &[],
        )
        .unwrap();
    assert!(
        hits(&mut check, notes, "follow").is_empty(),
        "the index follows the text"
    );
    pg.rebuild_search().unwrap();
    assert_eq!(hits(&mut check, turns, "metformin"), ["doc_t1/2"]);
}
