//! PostgreSQL only: the binary killed with SIGKILL at seeded random points of a sync (mid-page
//! and mid-content) and restarted until it ends equal to the simulator with no duplicate turn
//! and no stale writer lock; two writers on one schema; every command against a PostgreSQL
//! warehouse; and the read-only role `charthero_readers`: what a login granted it may read and
//! write, and 16 such logins running the analysts' queries (tests/fixtures/postgres-queries.sql)
//! throughout a sync. The tests the two backends share live with their SQLite twins
//! (`both_backends!`). Each test skips, saying why, where no PostgreSQL server can run, and fails
//! instead under `CHARTHERO_REQUIRE_POSTGRES=1`.

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use charthero_sim::Route as SimRoute;
use charthero_sync::sync::CyclePlan;
use charthero_sync::timefmt::format_utc;
use postgres::NoTls;
use postgres::error::SqlState;
use time::OffsetDateTime;

use crate::support::{
    Backend, ENCOUNTERS_ONLY, KillOnDrop, PgWarehouse, TestEnv, charthero_sync, compare, compare_content,
    count, off_runtime, postgres_queries, run_within, text, wait_for,
};

/// A simulator of `encounters` and a PostgreSQL warehouse, or `None` (the reason printed) where
/// no server can run.
async fn pg_env(seed: u64, encounters: usize) -> Option<TestEnv> {
    if !Backend::Postgres.available() {
        return None;
    }
    Some(TestEnv::with_encounters_on(Backend::Postgres, seed, encounters).await)
}

fn pg(env: &TestEnv) -> &PgWarehouse {
    env.warehouse.postgres().expect("a PostgreSQL warehouse")
}

/// Advisory locks held in the warehouse's database (the writer lock is one).
fn advisory_locks(env: &TestEnv) -> i64 {
    env.warehouse.scalar(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'
           AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
        &[],
    )
}

/// `charthero-sync --config <config> <args…>` started with errors-only logging and no output,
/// killed if the test drops it.
fn spawn_quiet(config: &std::path::Path, args: &[&str]) -> KillOnDrop {
    KillOnDrop(
        command(config, args)
            .env("RUST_LOG", "error")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

/// `charthero-sync --config <config> <args…>`.
fn command(config: &std::path::Path, args: &[&str]) -> Command {
    let mut cmd = charthero_sync();
    cmd.arg("--config").arg(config).args(args);
    cmd
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sync_killed_at_random_points_mid_page_and_mid_content_ends_equal_without_duplicate_turns() {
    let Some(env) = pg_env(79, 1_500).await else {
        return;
    };
    env.write_key_file(&env.sim.api_key());
    let config = env.write_config_file("");
    // Small pages and a modest rate: listing and content each take seconds, so the kill points
    // land inside pages and inside content work.
    let slow = std::fs::read_to_string(&config)
        .unwrap()
        .replace("requests_per_second = 2000.0", "requests_per_second = 300.0")
        .replace("settle_lag = \"0s\"", "settle_lag = \"0s\"\npage_size = 25");
    std::fs::write(&config, slow).unwrap();
    let mut rng = fastrand::Rng::with_seed(79);
    // A kill inside the migration: PostgreSQL's DDL is transactional, so the schema is there
    // completely and recorded, or not at all (the next run migrates).
    let mut migrating = command(&config, &["migrate"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(rng.u64(50..400))).await;
    migrating.kill().ok();
    tokio::task::spawn_blocking(move || migrating.wait())
        .await
        .unwrap()
        .unwrap();
    let recorded = env.warehouse.has_table("refinery_schema_history")
        && env
            .warehouse
            .scalar::<i64>("SELECT count(*) FROM refinery_schema_history", &[])
            > 0;
    assert_eq!(
        recorded,
        env.warehouse.has_table("encounters"),
        "a killed migration left the schema half made"
    );
    // Each point: once the simulator has answered a few more requests of the route (a list page
    // being stored, a note or transcript being saved), and a few milliseconds more, SIGKILL.
    let points = [
        SimRoute::List,
        SimRoute::Document,
        SimRoute::Transcript,
        SimRoute::List,
        SimRoute::Transcript,
        SimRoute::Document,
        SimRoute::List,
        SimRoute::Transcript,
    ];
    let mut landed: Vec<SimRoute> = Vec::new();
    for route in points {
        // A killed writer's sessions end with its sockets; the lock must be free again.
        wait_for(
            "the killed process's writer lock released",
            Duration::from_secs(10),
            || advisory_locks(&env) == 0,
        )
        .await;
        let target = env.sim.stats().route(route) + rng.u64(1..20);
        let delay = Duration::from_millis(rng.u64(0..15));
        let mut child = spawn_quiet(&config, &["sync"]);
        wait_for("the kill point or the run's end", Duration::from_secs(60), || {
            env.sim.stats().route(route) >= target || child.try_wait().is_ok_and(|s| s.is_some())
        })
        .await;
        tokio::time::sleep(delay).await;
        let finished = child.try_wait().unwrap();
        child.kill().ok();
        tokio::task::spawn_blocking(move || child.0.wait())
            .await
            .unwrap()
            .unwrap();
        if finished.is_none() {
            landed.push(route);
        } else {
            eprintln!("kill point {route:?}: the run ended first ({finished:?})");
        }
    }
    assert!(
        landed.len() >= 5,
        "only {} kills landed inside a run: {landed:?}",
        landed.len()
    );
    assert!(
        landed.contains(&SimRoute::List),
        "no kill landed mid-listing: {landed:?}"
    );
    assert!(
        landed.contains(&SimRoute::Document) || landed.contains(&SimRoute::Transcript),
        "no kill landed mid-content: {landed:?}"
    );

    wait_for(
        "the killed process's writer lock released",
        Duration::from_secs(10),
        || advisory_locks(&env) == 0,
    )
    .await;
    let out = run_within(command(&config, &["sync"]), Duration::from_secs(300)).await;
    assert_eq!(out.status.code(), Some(0), "the final run: {}", text(&out));
    let db = &env.warehouse;
    compare(&env.sim, db).assert_empty();
    assert_eq!(compare_content(&env.sim, db), Vec::<String>::new());
    let duplicate_turns: Vec<(String, i64, i64)> = db.rows(
        "SELECT document_id, turn_index, count(*) FROM transcript_turns
         GROUP BY document_id, turn_index HAVING count(*) > 1",
        &[],
    );
    assert_eq!(duplicate_turns, Vec::new());
    let miscounted: i64 = db.scalar(
        "SELECT count(*) FROM transcripts t
         WHERE t.turn_count <> (SELECT count(*) FROM transcript_turns tt WHERE tt.document_id = t.document_id)",
        &[],
    );
    assert_eq!(miscounted, 0, "transcripts whose turns were stored partly");
    let (running, aborted): (i64, i64) = db.row(
        "SELECT count(*) FILTER (WHERE outcome = 'running'), count(*) FILTER (WHERE outcome = 'aborted')
         FROM sync_runs",
        &[],
    );
    assert_eq!(running, 0, "a killed run was left running");
    assert!(aborted >= 1, "killed runs are marked aborted by the next one");
    assert_eq!(advisory_locks(&env), 0, "the writer lock outlived the last run");
    eprintln!(
        "{} SIGKILLs inside a PostgreSQL sync ({landed:?}); {aborted} runs marked aborted; equal afterwards",
        landed.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_writer_on_the_same_schema_exits_with_the_lock_error() {
    let Some(env) = pg_env(80, 300).await else {
        return;
    };
    env.write_key_file(&env.sim.api_key());
    let config = env.write_config_file(ENCOUNTERS_ONLY);
    let mut daemon = spawn_quiet(&config, &["run"]);
    wait_for("the daemon's writer lock", Duration::from_secs(30), || {
        advisory_locks(&env) >= 1
    })
    .await;
    let second = run_within(command(&config, &["sync"]), Duration::from_secs(60)).await;
    daemon.kill().ok();
    tokio::task::spawn_blocking(move || daemon.0.wait())
        .await
        .unwrap()
        .unwrap();
    let shown = text(&second);
    assert_eq!(second.status.code(), Some(4), "{shown}");
    assert!(shown.contains("another process"), "{shown}");
    assert!(
        shown.contains(&pg(&env).database.url),
        "the error names the warehouse: {shown}"
    );
    assert!(!shown.contains(&pg(&env).database.password), "{shown}");

    wait_for(
        "the killed daemon's writer lock released",
        Duration::from_secs(10),
        || advisory_locks(&env) == 0,
    )
    .await;
    let out = run_within(command(&config, &["sync"]), Duration::from_secs(60)).await;
    assert_eq!(
        out.status.code(),
        Some(0),
        "once the first let go: {}",
        text(&out)
    );
    compare(&env.sim, &env.warehouse).assert_empty();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_command_works_on_a_postgresql_warehouse() {
    let Some(env) = pg_env(81, 300).await else {
        return;
    };
    env.write_key_file(&env.sim.api_key());
    let config = env.write_config_file("");
    let password = pg(&env).database.password.clone();
    let ok = |out: &std::process::Output, what: &str| -> String {
        let shown = text(out);
        assert_eq!(out.status.code(), Some(0), "{what}: {shown}");
        assert!(!shown.contains(&password), "{what} printed the password");
        shown
    };
    let limit = Duration::from_secs(120);

    ok(
        &run_within(command(&config, &["migrate"]), limit).await,
        "migrate",
    );
    let checked = ok(&run_within(command(&config, &["check"]), limit).await, "check");
    assert!(
        checked.contains("postgresql://"),
        "check names the database: {checked}"
    );
    ok(&run_within(command(&config, &["sync"]), limit).await, "sync");
    compare(&env.sim, &env.warehouse).assert_empty();
    assert_eq!(compare_content(&env.sim, &env.warehouse), Vec::<String>::new());

    let status = ok(&run_within(command(&config, &["status"]), limit).await, "status");
    assert!(status.contains("succeeded"), "{status}");
    let out = run_within(command(&config, &["status", "--json"]), limit).await;
    ok(&out, "status --json");
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["runs"][0]["outcome"], "succeeded", "{json}");

    let from = format_utc(OffsetDateTime::now_utc() - time::Duration::days(20));
    let to = format_utc(OffsetDateTime::now_utc() - time::Duration::days(10));
    let queued = ok(
        &run_within(
            command(&config, &["backfill", "--from", &from, "--to", &to]),
            limit,
        )
        .await,
        "backfill",
    );
    assert!(queued.contains("queued backfill 1"), "{queued}");
    ok(
        &run_within(command(&config, &["sync"]), limit).await,
        "sync of the backfill",
    );
    let backfills: Vec<(i64, String)> = env.warehouse.rows(
        "SELECT backfill_id, status FROM backfills ORDER BY backfill_id",
        &[],
    );
    assert_eq!(backfills, vec![(1, "completed".to_owned())]);

    let search = "SELECT count(*) FROM transcript_turns WHERE text_tsv @@ to_tsquery('simple', 'the')";
    let before: i64 = env.warehouse.scalar(search, &[]);
    ok(
        &run_within(command(&config, &["reindex"]), limit).await,
        "reindex",
    );
    assert!(before > 0);
    assert_eq!(env.warehouse.scalar::<i64>(search, &[]), before);

    let purged = ok(
        &run_within(command(&config, &["purge", "--older-than", "30d"]), limit).await,
        "purge",
    );
    assert!(purged.contains("purged encounters created"), "{purged}");
    let cut = charthero_sync::timefmt::unix_nanos(OffsetDateTime::now_utc() - time::Duration::days(30));
    let (left, purges): (i64, i64) = env.warehouse.row(
        "SELECT (SELECT count(*) FROM encounters WHERE created_at_ns < ?1), (SELECT count(*) FROM purges)",
        &[&cut],
    );
    assert_eq!((left, purges), (0, 1));
    assert!(
        count(&env.warehouse, "encounters") > 0,
        "younger encounters are kept"
    );
}

/// A login role granted `charthero_readers` (created as the superuser, as a DBA would), and its
/// password.
fn analyst(pg: &PgWarehouse) -> (String, String) {
    let user = format!("{}_analyst", pg.database.name);
    let password: String = std::iter::repeat_with(fastrand::alphanumeric).take(24).collect();
    charthero_sim::pgcluster::shared()
        .expect("the warehouse's cluster runs")
        .psql(&format!(
            "CREATE ROLE {user} LOGIN PASSWORD '{password}' IN ROLE charthero_readers;"
        ))
        .expect("the analyst's role");
    (user, password)
}

fn drop_role(user: &str) {
    if let Some(cluster) = charthero_sim::pgcluster::shared() {
        cluster
            .psql(&format!("DROP ROLE IF EXISTS {user};"))
            .expect("the analyst's role is dropped");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_login_granted_charthero_readers_reads_every_table_and_view_and_writes_none() {
    let Some(env) = pg_env(82, 200).await else {
        return;
    };
    env.sync(&env.config(), CyclePlan::full(None, false)).await;
    let relations: Vec<(String, String)> = env.warehouse.rows(
        "SELECT table_name::text, table_type::text FROM information_schema.tables
         WHERE table_schema = current_schema() ORDER BY table_name",
        &[],
    );
    assert!(relations.len() >= 17, "{relations:?}");
    let pg = pg(&env);
    let (user, password) = analyst(pg);
    let login = pg.config_as(&user, &password);
    let failures = off_runtime(|| {
        let mut reader = login.connect(NoTls).expect("the analyst logs in");
        let mut failures = Vec::new();
        for (name, kind) in &relations {
            if let Err(e) = reader.query(&format!("SELECT * FROM {name} LIMIT 5"), &[]) {
                failures.push(format!("SELECT from {name}: {e}"));
            }
            if kind != "BASE TABLE" {
                continue;
            }
            for write in [
                format!("INSERT INTO {name} DEFAULT VALUES"),
                format!("DELETE FROM {name}"),
                format!("TRUNCATE {name}"),
            ] {
                match reader.execute(&write, &[]) {
                    Err(e) if e.code() == Some(&SqlState::INSUFFICIENT_PRIVILEGE) => {}
                    other => failures.push(format!("{write}: {other:?}")),
                }
            }
        }
        match reader.execute("CREATE TABLE reader_scratch (x int)", &[]) {
            Err(e) if e.code() == Some(&SqlState::INSUFFICIENT_PRIVILEGE) => {}
            other => failures.push(format!("CREATE TABLE: {other:?}")),
        }
        for sql in postgres_queries() {
            if let Err(e) = reader.query(&sql, &[]) {
                failures.push(format!("{sql}: {e}"));
            }
        }
        failures
    });
    drop_role(&user);
    assert!(failures.is_empty(), "{failures:#?}");
    compare(&env.sim, &env.warehouse).assert_empty();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_readers_in_charthero_readers_see_no_errors_during_a_list_only_sync() {
    // 50,000 encounters under CHARTHERO_SOAK=1 (the figure); 10,000 otherwise, which
    // keeps the normal suite's run of it well under a minute on two cores.
    let encounters = if std::env::var_os("CHARTHERO_SOAK").is_some() {
        50_000
    } else {
        10_000
    };
    let Some(env) = pg_env(83, encounters).await else {
        return;
    };
    let config = env.encounters_only_config();
    // The schema exists before the readers start; the sync fills it while they read.
    let database = config.database.clone();
    charthero_sync::store::blocking(move || {
        charthero_sync::store::open(&database)
            .map(drop)
            .map_err(Into::into)
    })
    .await
    .unwrap();
    let pg = pg(&env);
    let (user, password) = analyst(pg);
    let login = pg.config_as(&user, &password);
    let queries = Arc::new(postgres_queries());
    let stop = Arc::new(AtomicBool::new(false));
    let readers: Vec<_> = (0..16)
        .map(|_| {
            let (queries, stop, login) = (queries.clone(), stop.clone(), login.clone());
            std::thread::spawn(move || {
                let (mut reads, mut errors) = (0u64, Vec::new());
                let mut reader = match login.connect(NoTls) {
                    Ok(r) => r,
                    Err(e) => return (reads, vec![format!("login: {e}")]),
                };
                while !stop.load(Ordering::Relaxed) {
                    for sql in queries.iter() {
                        match reader.query(sql.as_str(), &[]) {
                            Ok(_) => reads += 1,
                            Err(e) => errors.push(format!("{sql}: {e}")),
                        }
                    }
                }
                (reads, errors)
            })
        })
        .collect();
    let started = Instant::now();
    let report = env.sync(&config, CyclePlan::full(None, false)).await;
    let took = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    let mut reads = 0;
    let mut errors = Vec::new();
    for r in readers {
        let (n, e) = tokio::task::spawn_blocking(move || r.join().expect("a reader thread"))
            .await
            .unwrap();
        reads += n;
        errors.extend(e);
    }
    drop_role(&user);
    assert!(report.is_complete(), "{report:?}");
    assert_eq!(report.counts.encounters_new as usize, encounters);
    assert!(
        errors.is_empty(),
        "{} reader errors, e.g. {:?}",
        errors.len(),
        errors.first()
    );
    assert!(
        reads >= 16 * queries.len() as u64,
        "the readers barely ran: {reads} queries"
    );
    compare(&env.sim, &env.warehouse).assert_empty();
    eprintln!(
        "{encounters} encounters synced list-only into PostgreSQL in {took:.1?} while 16 charthero_readers \
         logins ran {reads} queries ({} distinct), 0 errors",
        queries.len()
    );
}
