//! `charthero-sync copy`: a SQLite warehouse synced from the simulator (content, a backfill, an
//! audit, a purge, a dead letter) moves into a PostgreSQL warehouse row for row — every table
//! compared value by value through one text form, the watermark equal — and a destination that
//! holds data, or a copy that fails before its end, leaves the destination as it was. Each test
//! skips, saying why, where no PostgreSQL server can run (`charthero_sim::pgcluster`).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use charthero_sim::pgcluster::{self, PgDatabase};
use charthero_sync::config::Config;
use charthero_sync::store::{self, CopyRefused, CopyReport};
use charthero_sync::sync::{BackfillRange, CyclePlan};
use charthero_sync::timefmt::format_stored;
use postgres::{Client, NoTls};
use rusqlite::types::Value;
use time::OffsetDateTime;

use crate::support::TestEnv;

/// A new database in the shared cluster (None, reason printed, where there is none).
fn pg_database(name: &str) -> Option<PgDatabase> {
    Some(
        pgcluster::shared()?
            .create_database(name)
            .expect("a test database"),
    )
}

/// A connection as the database's owner with the warehouse's schema on its search_path. The
/// synchronous client runs a runtime of its own: connect, use and drop it on a blocking thread.
fn connect(db: &PgDatabase) -> Client {
    let mut config: postgres::Config = db.url.parse().expect("the test database's URL");
    config.password(&db.password).options("-c search_path=charthero");
    config.connect(NoTls).expect("a connection to the test database")
}

/// A SQLite warehouse with rows in (nearly) every table: a full sync with content and
/// recordings, a backfill and an audit, then a purged day, a dead letter, a webhook event and
/// the demo marker.
async fn synced_source(seed: u64, encounters: usize) -> (TestEnv, Config) {
    let env = TestEnv::with_encounters(seed, encounters).await;
    let mut raw = env.raw_config();
    raw.audio.enabled = true;
    raw.audio.directory = env.dir.path().join("audio");
    let config = raw.validate().expect("test config is valid");
    let now = OffsetDateTime::now_utc();
    let range = BackfillRange {
        start: config.sync.start_at,
        end: now,
    };
    env.sync(&config, CyclePlan::full(Some(range), true)).await;
    let database = config.database.clone();
    let audio = config.audio.directory.clone();
    store::blocking(move || {
        let mut backend = store::open(&database)?;
        backend.purge(
            &audio,
            now - time::Duration::days(30),
            now - time::Duration::days(29),
            "range",
            now,
        )?;
        backend.set_marker("demo")?;
        Ok(())
    })
    .await
    .expect("purge and marker");
    let conn = rusqlite::Connection::open(env.db_path()).unwrap();
    conn.execute(
        "INSERT INTO dead_letters (work, document_id, encounter_id, attempts, first_failed_at, last_failed_at,
             last_run_id, reason_code, last_error, organization, next_attempt_at_ns)
         VALUES ('transcript', 'doc_dead', 'enc_dead', 3, ?1, ?1, 1, 'upstream_error', 'HTTP 502', 'default',
                 1796152064000000000)",
        [format_stored(now)],
    )
    .unwrap();
    conn.execute(
        "INSERT INTO webhook_events (organization, event_id, event_type, api_version, occurred_at,
             organization_id, encounter_id, document_id, first_delivery_id, deliveries, received_at,
             last_received_at, state, handled_at)
         VALUES ('default', 'evt_1', 'recording.transcript_ready', '2026-05-01', ?1, 'org_7Df4', 'enc_1',
             'doc_1', 'dlv_1', 2, ?1, ?1, 'queued', ?1)",
        [format_stored(now)],
    )
    .unwrap();
    (env, config)
}

/// The configuration text of a PostgreSQL warehouse in `db` (its password in a 0600 file in
/// `dir`): `[database]` only, which is all `copy` reads besides the file it is given.
fn pg_config_text(db: &PgDatabase, dir: &Path) -> String {
    use std::os::unix::fs::PermissionsExt;
    let password_file = dir.join(format!("{}-password", db.name));
    std::fs::write(&password_file, format!("{}\n", db.password)).unwrap();
    std::fs::set_permissions(&password_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    format!(
        "[database]\nurl = \"{}\"\npassword_file = \"{}\"\n",
        db.url,
        password_file.display()
    )
}

/// Copies `source` into `db` as the command does, through the configuration.
async fn copy(source: &Path, db: &PgDatabase) -> anyhow::Result<CopyReport> {
    let dir = tempfile::tempdir().unwrap();
    let config = Config::parse(&pg_config_text(db, dir.path()), Path::new("copy.toml")).unwrap();
    charthero_sync::copy::run(source.to_owned(), &config.database).await
}

/// One table's rows in one text form, sorted: a timestamp as its UTC text to the microsecond
/// (PostgreSQL keeps no more), a double by its value, everything else as text; NULL as `∅`.
type Rows = Vec<Vec<String>>;

/// The destination's tables with their non-generated columns and types.
fn pg_columns(client: &mut Client) -> BTreeMap<String, Vec<(String, String)>> {
    let mut tables: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
    for row in client
        .query(
            "SELECT table_name::text, column_name::text, data_type::text FROM information_schema.columns
              WHERE table_schema = current_schema() AND is_generated = 'NEVER'
                AND table_name IN (SELECT table_name FROM information_schema.tables
                                    WHERE table_schema = current_schema() AND table_type = 'BASE TABLE')
                AND table_name <> 'refinery_schema_history'
              ORDER BY table_name, ordinal_position",
            &[],
        )
        .unwrap()
    {
        tables
            .entry(row.try_get(0).unwrap())
            .or_default()
            .push((row.try_get(1).unwrap(), row.try_get(2).unwrap()));
    }
    tables
}

fn float_text(value: f64) -> String {
    format!("{value:?}")
}

fn pg_rows(client: &mut Client, table: &str, columns: &[(String, String)]) -> Rows {
    let exprs: Vec<String> = columns
        .iter()
        .map(|(c, t)| match t.as_str() {
            "timestamp with time zone" => {
                format!("to_char(\"{c}\" AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US')")
            }
            _ => format!("\"{c}\"::text"),
        })
        .collect();
    let mut rows: Rows = client
        .query(&format!("SELECT {} FROM \"{table}\"", exprs.join(", ")), &[])
        .unwrap()
        .iter()
        .map(|r| {
            columns
                .iter()
                .enumerate()
                .map(|(i, (_, t))| match r.try_get::<_, Option<String>>(i).unwrap() {
                    None => "∅".to_owned(),
                    Some(v) if t == "double precision" => float_text(v.parse().unwrap()),
                    Some(v) => v,
                })
                .collect()
        })
        .collect();
    rows.sort();
    rows
}

fn sqlite_rows(conn: &rusqlite::Connection, table: &str, columns: &[(String, String)]) -> Rows {
    let list: Vec<String> = columns.iter().map(|(c, _)| format!("\"{c}\"")).collect();
    let mut stmt = conn
        .prepare(&format!("SELECT {} FROM \"{table}\"", list.join(", ")))
        .unwrap();
    let mut rows: Rows = stmt
        .query_map([], |r| {
            Ok(columns
                .iter()
                .enumerate()
                .map(|(i, (c, t))| match (r.get::<_, Value>(i).unwrap(), t.as_str()) {
                    (Value::Null, _) => "∅".to_owned(),
                    (Value::Text(s), "timestamp with time zone") => {
                        assert_eq!(s.len(), 30, "{table}.{c}: {s:?} is not of the stored width");
                        s[..26].to_owned()
                    }
                    (Value::Integer(v), "double precision") => float_text(v as f64),
                    (Value::Real(v), _) => float_text(v),
                    (Value::Integer(v), _) => v.to_string(),
                    (Value::Text(s), _) => s,
                    (Value::Blob(b), _) => format!("\\x{}", charthero_sync::store::hex(&b)),
                })
                .collect())
        })
        .unwrap()
        .map(Result::unwrap)
        .collect();
    rows.sort();
    rows
}

/// The warehouse's indexes, constraints and triggers (with whether each fires), as definitions.
fn schema_objects(client: &mut Client) -> Vec<String> {
    client
        .query(
            "SELECT indexdef FROM pg_indexes WHERE schemaname = current_schema()
             UNION ALL
             SELECT c.conrelid::regclass::text || ' ' || c.conname || ' ' || pg_get_constraintdef(c.oid)
               FROM pg_constraint c WHERE c.connamespace = current_schema()::regnamespace
             UNION ALL
             SELECT t.tgrelid::regclass::text || ' ' || t.tgname || ' ' || t.tgenabled::text
               FROM pg_trigger t JOIN pg_class r ON r.oid = t.tgrelid
              WHERE r.relnamespace = current_schema()::regnamespace AND NOT t.tgisinternal
             ORDER BY 1",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.try_get(0).unwrap())
        .collect()
}

/// [`schema_objects`] of a warehouse just migrated, in a database of its own named `name`.
fn fresh_schema_objects(name: &str) -> Vec<String> {
    let db = pg_database(name).expect("the cluster of the calling test");
    let backend = store::postgres::open_writer(connect(&db), db.url.clone()).unwrap();
    drop(backend);
    let objects = schema_objects(&mut connect(&db));
    assert!(objects.len() > 30, "the schema's objects are read: {objects:?}");
    objects
}

/// Row counts of every table of the destination that holds rows.
fn pg_holdings(client: &mut Client) -> Vec<(String, i64)> {
    pg_columns(client)
        .into_keys()
        .filter_map(|t| {
            let n: i64 = client
                .query_one(&format!("SELECT count(*) FROM \"{t}\""), &[])
                .unwrap()
                .try_get(0)
                .unwrap();
            (n > 0).then_some((t, n))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_synced_sqlite_warehouse_copies_into_postgresql_value_for_value_with_its_watermark() {
    let Some(db) = tokio::task::spawn_blocking(|| pg_database("copy_equal"))
        .await
        .unwrap()
    else {
        return;
    };
    let (env, config) = synced_source(1701, 400).await;
    let report = copy(&env.db_path(), &db)
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));

    let (source, pg) = (env.db_path(), db.clone());
    let filled = tokio::task::spawn_blocking(move || {
        let mut client = connect(&pg);
        let conn = crate::support::reader(&source);
        let mut filled = Vec::new();
        for (table, columns) in pg_columns(&mut client) {
            let expected = sqlite_rows(&conn, &table, &columns);
            let copied = pg_rows(&mut client, &table, &columns);
            assert_eq!(copied.len(), expected.len(), "{table}: row count");
            for (c, e) in copied.iter().zip(&expected) {
                assert_eq!(c, e, "{table}: a row differs (columns {columns:?})");
            }
            if !copied.is_empty() {
                filled.push(table);
            }
        }
        filled
    })
    .await
    .unwrap();
    // Every table but those the fixture cannot fill (none today) has rows, so none was skipped.
    for table in [
        "audits",
        "backfills",
        "dead_letters",
        "documents",
        "encounter_history",
        "encounters",
        "organization_state",
        "organizations",
        "patients",
        "purges",
        "recordings",
        "sync_runs",
        "sync_state",
        "sync_windows",
        "transcript_turns",
        "transcripts",
        "webhook_events",
    ] {
        assert!(filled.iter().any(|t| t == table), "{table} is empty: {filled:?}");
    }
    assert_eq!(report.tables.len(), filled.len());
    let summary = charthero_sync::copy::summary(&report);
    assert!(
        summary
            .last()
            .unwrap()
            .contains(&format!("{} rows", report.rows())),
        "{summary:?}"
    );

    // The watermark (and the history not re-created by triggers: counts above are equal).
    let (database, pg) = (config.database.clone(), db.clone());
    let (sqlite_mark, pg_mark) = tokio::task::spawn_blocking(move || {
        let sqlite = store::open_reader(&database).unwrap();
        let postgres = store::postgres::open_reader(connect(&pg), pg.url.clone());
        (
            sqlite.complete_through("default").unwrap(),
            store::Reader::complete_through(&postgres, "default").unwrap(),
        )
    })
    .await
    .unwrap();
    assert!(sqlite_mark.is_some());
    assert_eq!(pg_mark, sqlite_mark);

    // Identity columns continue after the copied ids; the indexes and foreign keys set aside
    // during the copy and the triggers disabled are back as a migration makes them.
    let pg = db.clone();
    tokio::task::spawn_blocking(move || {
        let mut client = connect(&pg);
        assert_eq!(
            schema_objects(&mut client),
            fresh_schema_objects("copy_equal_reference")
        );
        let max: i64 = client
            .query_one("SELECT max(run_id) FROM sync_runs", &[])
            .unwrap()
            .try_get(0)
            .unwrap();
        let next: i64 = client
            .query_one(
                "INSERT INTO sync_runs (started_at, outcome, trigger) VALUES (now(), 'running', 'test')
                 RETURNING run_id",
                &[],
            )
            .unwrap()
            .try_get(0)
            .unwrap();
        assert_eq!(next, max + 1);
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_that_holds_data_is_refused_and_left_as_it_was() {
    let Some(db) = tokio::task::spawn_blocking(|| pg_database("copy_refused"))
        .await
        .unwrap()
    else {
        return;
    };
    let (env, _) = synced_source(1702, 60).await;
    copy(&env.db_path(), &db)
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
    let pg = db.clone();
    let before = tokio::task::spawn_blocking(move || pg_holdings(&mut connect(&pg)))
        .await
        .unwrap();

    let err = copy(&env.db_path(), &db).await.unwrap_err();
    let refused = err
        .downcast_ref::<CopyRefused>()
        .unwrap_or_else(|| panic!("not a refusal: {err:#}"));
    let text = refused.to_string();
    assert!(
        matches!(refused, CopyRefused::DestinationNotEmpty { .. }),
        "{text}"
    );
    assert!(text.contains("encounters: "), "{text}");
    assert!(text.contains("sync_runs: "), "{text}");
    let pg = db.clone();
    let after = tokio::task::spawn_blocking(move || pg_holdings(&mut connect(&pg)))
        .await
        .unwrap();
    assert_eq!(after, before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_that_fails_after_most_tables_leaves_the_destination_empty() {
    let Some(db) = tokio::task::spawn_blocking(|| pg_database("copy_rollback"))
        .await
        .unwrap()
    else {
        return;
    };
    let (env, _) = synced_source(1703, 60).await;
    // A damaged value in a table filled late (the ledger, after every data table): the copy
    // stops there, having streamed the tables before it.
    let conn = rusqlite::Connection::open(env.db_path()).unwrap();
    conn.execute(
        "UPDATE sync_windows SET completed_at = 'not a time' WHERE window_id = (SELECT max(window_id) FROM sync_windows)",
        [],
    )
    .unwrap();
    drop(conn);
    let err = copy(&env.db_path(), &db).await.unwrap_err();
    let text = format!("{err:#}");
    assert!(text.contains("sync_windows.completed_at"), "{text}");
    assert!(!text.contains("not a time"), "the value is not echoed: {text}");
    let pg = db.clone();
    let (held, objects, fresh) = tokio::task::spawn_blocking(move || {
        let mut client = connect(&pg);
        (
            pg_holdings(&mut client),
            schema_objects(&mut client),
            fresh_schema_objects("copy_rollback_reference"),
        )
    })
    .await
    .unwrap();
    assert!(held.is_empty(), "{held:?}");
    assert_eq!(
        objects, fresh,
        "the indexes, keys and triggers are as the migration made them"
    );
}

/// Kills the child when dropped, whatever the test's outcome.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// What the copying process's session in `db` is doing: (state, query), or None once it is gone
/// (its writer lock's connection has another `application_name`).
fn copier_session(client: &mut Client, db: &PgDatabase) -> Option<(String, String)> {
    client
        .query_opt(
            "SELECT coalesce(state, ''), query FROM pg_stat_activity
              WHERE datname = $1 AND application_name = $2",
            &[&db.name, &store::APPLICATION_NAME],
        )
        .unwrap()
        .map(|r| (r.try_get(0).unwrap(), r.try_get(1).unwrap()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_killed_midway_leaves_the_destination_empty() {
    let Some(db) = tokio::task::spawn_blocking(|| pg_database("copy_killed"))
        .await
        .unwrap()
    else {
        return;
    };
    let (env, _) = synced_source(1704, 60).await;
    // A ledger large enough to be caught filling: sync_windows comes after every data table but
    // the transcripts, so most of the copy has been streamed when the process dies.
    let conn = rusqlite::Connection::open(env.db_path()).unwrap();
    conn.execute(
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 300000)
         INSERT INTO sync_windows (run_id, kind, backfill_id, start_at, end_at, start_at_ns, end_at_ns,
             records_seen, total, pages, passes, removed, id_set_hash, completed_at, organization)
         SELECT run_id, kind, backfill_id, start_at, end_at, start_at_ns, end_at_ns, records_seen, total, pages,
                passes, removed, id_set_hash, completed_at, organization
           FROM sync_windows, n WHERE window_id = (SELECT min(window_id) FROM sync_windows)",
        [],
    )
    .unwrap();
    drop(conn);

    let config = env.dir.path().join("postgres.toml");
    std::fs::write(&config, pg_config_text(&db, env.dir.path())).unwrap();
    let mut child = KillOnDrop(
        crate::support::charthero_sync()
            .arg("--config")
            .arg(&config)
            .arg("copy")
            .arg("--from")
            .arg(env.db_path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let pg = db.clone();
    let killed_in = tokio::task::spawn_blocking(move || {
        let mut watch = connect(&pg);
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
        loop {
            assert!(
                std::time::Instant::now() < deadline,
                "the copy never reached sync_windows"
            );
            if let Some(status) = child.0.try_wait().unwrap() {
                panic!("the copier ended ({status}) before it could be killed");
            }
            if let Some((state, query)) = copier_session(&mut watch, &pg)
                && state == "active"
                && query.starts_with("COPY \"sync_windows\"")
            {
                child.0.kill().unwrap(); // SIGKILL
                child.0.wait().unwrap();
                break query;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    })
    .await
    .unwrap();
    assert!(killed_in.contains("sync_windows"), "{killed_in}");

    // The server ends the dead client's session (rolling its transaction back); afterwards the
    // warehouse holds nothing, and no transaction is left that could still commit.
    let pg = db.clone();
    let held = tokio::task::spawn_blocking(move || {
        let mut check = connect(&pg);
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while copier_session(&mut check, &pg).is_some() {
            assert!(
                std::time::Instant::now() < deadline,
                "the killed copier's session lingers"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        pg_holdings(&mut check)
    })
    .await
    .unwrap();
    assert!(held.is_empty(), "{held:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_of_an_older_schema_is_refused_with_what_to_run_and_is_not_written() {
    let Some(db) = tokio::task::spawn_blocking(|| pg_database("copy_old_source"))
        .await
        .unwrap()
    else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("v4.db");
    let fixture = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/v4-warehouse.db");
    std::fs::copy(fixture, &source).unwrap();
    let err = copy(&source, &db).await.unwrap_err();
    let text = format!("{err:#}");
    assert!(
        matches!(
            err.downcast_ref::<CopyRefused>(),
            Some(CopyRefused::SourceSchema { version: 4, .. })
        ),
        "{text}"
    );
    assert!(text.contains("charthero-sync migrate"), "{text}");
    assert_eq!(std::fs::read(&source).unwrap(), std::fs::read(fixture).unwrap());
}

/// The point of `copy`: the sync goes on in PostgreSQL where it stopped in SQLite.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_copy_the_next_sync_against_postgresql_lists_only_its_horizon() {
    let Some(db) = tokio::task::spawn_blocking(|| pg_database("copy_then_sync"))
        .await
        .unwrap()
    else {
        return;
    };
    let (env, sqlite_config) = synced_source(1705, 300).await;
    copy(&env.db_path(), &db)
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));

    let mut raw = env.raw_config();
    raw.audio = charthero_sync::config::RawConfig::default().audio;
    raw.audio.enabled = sqlite_config.audio.enabled;
    raw.audio.directory = sqlite_config.audio.directory.clone();
    raw.database.path = None;
    let pg_only = Config::parse(&pg_config_text(&db, env.dir.path()), Path::new("copy.toml")).unwrap();
    let config = Config {
        database: pg_only.database,
        ..raw.validate().expect("test config is valid")
    };
    env.sim.reset_stats();
    let report = env.sync(&config, CyclePlan::full(None, false)).await;
    // Nothing was created since the watermark: one request lists the horizon, no history again,
    // and no content is fetched twice.
    assert_eq!(report.counts.list_requests, 1, "{:?}", report.counts);
    assert_eq!(env.sim.stats().route(charthero_sim::Route::List), 1);
    assert_eq!(report.counts.encounters_new, 0);
    for route in [
        charthero_sim::Route::Document,
        charthero_sim::Route::Transcript,
        charthero_sim::Route::Audio,
    ] {
        assert_eq!(env.sim.stats().route(route), 0, "{route:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_command_prints_every_table_and_exits_2_on_a_second_copy_or_a_sqlite_destination() {
    let Some(db) = tokio::task::spawn_blocking(|| pg_database("copy_command"))
        .await
        .unwrap()
    else {
        return;
    };
    let (env, _) = synced_source(1706, 40).await;
    let config = env.dir.path().join("postgres.toml");
    std::fs::write(&config, pg_config_text(&db, env.dir.path())).unwrap();
    let copy_into = |config: &Path| {
        let mut cmd = crate::support::charthero_sync();
        cmd.arg("--config")
            .arg(config)
            .arg("copy")
            .arg("--from")
            .arg(env.db_path());
        cmd
    };

    let out = crate::support::run(copy_into(&config)).await;
    let text = crate::support::text(&out);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(text.contains("transcript_turns"), "{text}");
    assert!(text.contains("copied 17 tables"), "{text}");
    assert!(text.contains("row count verified"), "{text}");

    let out = crate::support::run(copy_into(&config)).await;
    let text = crate::support::text(&out);
    assert_eq!(out.status.code(), Some(2), "{text}");
    assert!(text.contains("already holds data"), "{text}");

    let sqlite = env.write_config_file("");
    let out = crate::support::run(copy_into(&sqlite)).await;
    let text = crate::support::text(&out);
    assert_eq!(out.status.code(), Some(2), "{text}");
    assert!(text.contains("`database.url`"), "{text}");
}

/// A backfill that crashed on SQLite leaves pages staged (durable, not yet in `encounters`):
/// `copy` merges them before its snapshot, so the destination holds them too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn staged_rows_a_crash_left_are_merged_before_the_copy() {
    let Some(db) = tokio::task::spawn_blocking(|| pg_database("copy_staged"))
        .await
        .unwrap()
    else {
        return;
    };
    let (env, _) = synced_source(1703, 60).await;
    let path = env.db_path();
    let conn = store::sqlite::open_writer(&path, Duration::from_secs(5)).unwrap();
    let organization_id: String = conn
        .query_row("SELECT organization_id FROM encounters LIMIT 1", [], |r| r.get(0))
        .unwrap();
    let stored: i64 = conn
        .query_row("SELECT count(*) FROM encounters", [], |r| r.get(0))
        .unwrap();
    // A page of 60 from a year the warehouse holds nothing of: staged, then the process dies.
    let created = time::macros::datetime!(2021-06-01 09:00:00 UTC);
    let page: Vec<store::EncounterRecord> = (0..60)
        .map(|i| store::EncounterRecord {
            encounter_id: format!("enc_staged_{i:02}"),
            organization_id: organization_id.clone(),
            encounter_type: Some("visit".to_owned()),
            status: Some("completed".to_owned()),
            created_at: created + time::Duration::minutes(i),
            updated_at: created + time::Duration::minutes(i),
            date_of_service: None,
            patient: None,
            documents: Vec::new(),
            content_hash: format!("hash {i}"),
            raw_json: format!(r#"{{"encounter_id":"enc_staged_{i:02}"}}"#),
        })
        .collect();
    let tx = conn.unchecked_transaction().unwrap();
    store::sqlite::commit_page(&tx, &page, &[], None, OffsetDateTime::now_utc()).unwrap();
    tx.commit().unwrap();
    let staged = |conn: &rusqlite::Connection| -> i64 {
        conn.query_row("SELECT count(*) FROM staged_encounters", [], |r| r.get(0))
            .unwrap()
    };
    assert_eq!(staged(&conn), 60);
    drop(conn);

    let report = copy(&path, &db).await.unwrap_or_else(|e| panic!("{e:#}"));
    let copied = report
        .tables
        .iter()
        .find(|t| t.table == "encounters")
        .map(|t| t.rows);
    assert_eq!(copied, Some(stored as u64 + 60));
    assert!(report.tables.iter().all(|t| !t.table.starts_with("staged_")));
    let conn = rusqlite::Connection::open(&path).unwrap();
    assert_eq!(staged(&conn), 0, "the source's staged rows were merged");
}
