//! A PostgreSQL warehouse that goes away and comes back: the daemon's sessions terminated by an
//! operator, the server restarted during a sync, the writer's session lost while another
//! process takes the warehouse. The binary runs against the real simulator and a real server
//! (`charthero_sim::pgcluster`); the warehouse must equal the simulator afterwards, and no two
//! processes may ever write it at once.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use charthero_sim::Simulator;
use charthero_sim::pgcluster::{self, PgCluster, PgDatabase};
use charthero_sync::store::postgres::connect::write_lock_key;
use charthero_sync::timefmt::format_utc;
use time::OffsetDateTime;

use crate::support::{
    KillOnDrop, TestEnv, charthero_sync, run_within, sim_options, text, wait_exit, wait_for,
};

/// A config file for the binary: this simulator, the PostgreSQL database `db` (its password in
/// a 0600 file), a cycle every 2 seconds.
fn pg_config_file(env: &TestEnv, db: &PgDatabase) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    env.write_key_file(&env.sim.api_key());
    let password = env.dir.path().join("db-password");
    std::fs::write(&password, &db.password).unwrap();
    std::fs::set_permissions(&password, std::fs::Permissions::from_mode(0o600)).unwrap();
    let path = env.dir.path().join("config.toml");
    let text = format!(
        "[api]\nbase_url = \"{}\"\napi_key_file = \"{}\"\n\n[database]\nurl = \"{}\"\npassword_file = \"{}\"\n\n\
         [sync]\nstart_at = \"{}\"\nsettle_lag = \"0s\"\nschedule = \"*/2 * * * * *\"\n\n\
         [limits]\nrequests_per_second = 400.0\nburst = 20\nmax_in_flight = 4\n",
        env.sim.base_url(),
        env.dir.path().join("api-key").display(),
        db.url,
        password.display(),
        format_utc(OffsetDateTime::now_utc() - time::Duration::days(61)),
    );
    std::fs::write(&path, text).unwrap();
    path
}

fn bin(config: &Path, args: &[&str]) -> Command {
    let mut cmd = charthero_sync();
    cmd.arg("--config").arg(config).args(args);
    cmd
}

/// Starts the daemon, its log (warnings and up) in `log`.
fn spawn_daemon(config: &Path, log: &Path) -> Child {
    bin(config, &["run"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap()
}

/// A daemon running against a fresh database of the shared cluster, and what it was started
/// with.
struct Running {
    db: PgDatabase,
    env: TestEnv,
    config: PathBuf,
    log: PathBuf,
    daemon: KillOnDrop,
}

/// Creates the database `name`, starts a simulator of `encounters` (`seed`) and the daemon
/// (its log in `daemon.log`), and waits until its first cycle has made the warehouse equal to
/// the simulator.
async fn daemon_after_first_cycle(cluster: &PgCluster, name: &str, seed: u64, encounters: usize) -> Running {
    let db = cluster.create_database(name).unwrap();
    let env = TestEnv::start(sim_options(seed, encounters)).await;
    let config = pg_config_file(&env, &db);
    let log = env.dir.path().join("daemon.log");
    let daemon = KillOnDrop(spawn_daemon(&config, &log));
    wait_for("the first cycle", Duration::from_secs(60), || {
        equal(cluster, &db, &env.sim)
    })
    .await;
    Running {
        db,
        env,
        config,
        log,
        daemon,
    }
}

fn terminate(child: &Child) {
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

/// The warehouse's live encounters, `id updated_at_ns` sorted, or `None` before its schema
/// exists.
fn stored(cluster: &PgCluster, db: &PgDatabase) -> Option<Vec<String>> {
    let out = cluster
        .psql_in(
            &db.name,
            "SELECT encounter_id || ' ' || updated_at_ns FROM charthero.encounters \
             WHERE removed_at IS NULL ORDER BY 1",
        )
        .ok()?;
    Some(out.lines().map(str::to_owned).collect())
}

/// The simulator's live encounters in the form of [`stored`].
fn upstream(sim: &Simulator) -> Vec<String> {
    let mut all: Vec<String> = sim
        .snapshot()
        .iter()
        .map(|e| format!("{} {}", e.encounter_id, e.updated_at.unix_timestamp_nanos()))
        .collect();
    all.sort();
    all
}

fn equal(cluster: &PgCluster, db: &PgDatabase, sim: &Simulator) -> bool {
    stored(cluster, db).is_some_and(|s| s == upstream(sim))
}

/// Terminates this database's charthero-sync sessions whose `application_name` is LIKE
/// `pattern`, waiting until they are gone; how many there were.
fn terminate_sessions(cluster: &PgCluster, db: &PgDatabase, pattern: &str) -> usize {
    let out = cluster
        .psql(&format!(
            "SELECT pg_terminate_backend(pid, 10000) FROM pg_stat_activity \
             WHERE datname = '{}' AND application_name LIKE '{pattern}'",
            db.name
        ))
        .unwrap();
    out.lines().filter(|l| *l == "t").count()
}

fn sessions(cluster: &PgCluster, db: &PgDatabase, pattern: &str) -> usize {
    cluster
        .psql(&format!(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = '{}' AND application_name LIKE '{pattern}'",
            db.name
        ))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// An operator terminates every session of the running daemon (its writer's and its lock's):
/// the daemon notices at its next unit of work, reconnects, retakes its write lock and goes on
/// by itself; the warehouse then equals the simulator, including encounters created upstream
/// after the termination.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_session_of_a_running_daemon_terminated_it_reconnects_and_converges() {
    let Some(cluster) = pgcluster::shared() else {
        return;
    };
    let Running {
        db,
        env,
        log,
        mut daemon,
        ..
    } = daemon_after_first_cycle(cluster, "outage_terminate", 171, 400).await;

    let ended = terminate_sessions(cluster, &db, "charthero-sync%");
    assert!(ended >= 2, "the writer's and the lock's sessions: {ended}");
    env.sim.insert_bulk(OffsetDateTime::now_utc(), 5);
    assert!(!equal(cluster, &db, &env.sim));

    // A failed cycle is retried after 15-30 s (the daemon's failure backoff).
    wait_for(
        "recovery after the sessions were terminated",
        Duration::from_secs(90),
        || equal(cluster, &db, &env.sim),
    )
    .await;
    assert!(
        daemon.try_wait().unwrap().is_none(),
        "the daemon recovered without exiting"
    );
    assert_eq!(
        sessions(cluster, &db, "charthero-sync"),
        1,
        "a new writer session"
    );
    terminate(&daemon);
    assert_eq!(
        wait_exit("the daemon", &mut daemon, Duration::from_secs(20)).await,
        Some(0)
    );
    let log = std::fs::read_to_string(&log).unwrap();
    assert!(log.contains("reconnecting"), "{log}");
}

/// The server restarts (`pg_ctl restart -m fast`) in the middle of a `sync`: nothing committed
/// is lost, the sync fails as a whole (exit 1), and the next sync completes to equality.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_restart_during_a_sync_loses_nothing_and_the_next_sync_completes() {
    let Some(cluster) = pgcluster::require_or_skip() else {
        return;
    };
    let db = cluster.create_database("outage_restart").unwrap();
    let env = TestEnv::start(sim_options(172, 3_000)).await;
    let config = pg_config_file(&env, &db);
    let mut sync = bin(&config, &["sync"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for("the first pages", Duration::from_secs(60), || {
        stored(&cluster, &db).is_some_and(|s| s.len() >= 200)
    })
    .await;
    let before = stored(&cluster, &db).unwrap().len();
    let cluster = tokio::task::spawn_blocking(move || {
        cluster.restart().unwrap();
        cluster
    })
    .await
    .unwrap();
    let after = stored(&cluster, &db).unwrap().len();
    assert!(
        after >= before,
        "committed pages survive the restart: {after} < {before}"
    );

    let code = wait_exit("the sync", &mut sync, Duration::from_secs(120)).await;
    let mut err = String::new();
    std::io::Read::read_to_string(sync.stderr.as_mut().unwrap(), &mut err).unwrap();
    // The restart ended the sync's session mid-cycle: the cycle fails as a whole.
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("unavailable"), "{err}");
    let out = run_within(bin(&config, &["sync"]), Duration::from_secs(120)).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(
        equal(&cluster, &db, &env.sim),
        "the next sync completes to equality"
    );
}

/// The daemon's sessions are terminated and, before it reconnects, another process takes the
/// warehouse's write lock: the daemon stops writing with the lock-lost error and exits 1 (a
/// service manager restarts it, and the restart waits its turn); nothing was written while
/// the other process held the lock. Also: while the daemon runs, a second writer that finds
/// the lease's session gone (terminated) is still refused by the write lock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_whose_lock_was_taken_meanwhile_stops_and_never_writes_beside_the_other() {
    let Some(cluster) = pgcluster::shared() else {
        return;
    };
    let Running {
        db,
        env,
        config,
        log,
        mut daemon,
    } = daemon_after_first_cycle(cluster, "outage_lock", 173, 300).await;

    // Only the lease's session ended: a second `sync` takes the lease's lock, but the daemon's
    // writing session still holds the write lock, so the second is refused and writes nothing.
    assert_eq!(terminate_sessions(cluster, &db, "charthero-sync run (pid %"), 1);
    let out = run_within(bin(&config, &["sync"]), Duration::from_secs(60)).await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("another process"), "{}", text(&out));
    assert!(
        text(&out).contains("charthero-sync from"),
        "names the holder: {}",
        text(&out)
    );
    assert!(daemon.try_wait().unwrap().is_none(), "the daemon writes on");

    // Every session of the daemon ends and another session takes the write lock at once.
    let key = write_lock_key("charthero");
    let url = format!(
        "{}?application_name=other-writer",
        cluster.superuser_url(&db.name)
    );
    let (taken_tx, taken_rx) = std::sync::mpsc::channel();
    let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
    let pattern = "charthero-sync%".to_owned();
    let name = db.name.clone();
    let holder = std::thread::spawn(move || {
        let mut other = postgres::Client::connect(&url, postgres::NoTls).unwrap();
        // Terminate and take at once; again if the daemon reconnected in between.
        let (mut ended, mut taken) = (0, false);
        for _ in 0..50 {
            ended += other
                .query(
                    "SELECT pg_terminate_backend(pid, 10000) FROM pg_stat_activity \
                     WHERE datname = $1 AND application_name LIKE $2",
                    &[&name, &pattern],
                )
                .unwrap()
                .len();
            taken = other
                .query_one("SELECT pg_try_advisory_lock($1)", &[&key])
                .unwrap()
                .try_get(0)
                .unwrap();
            if taken {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        taken_tx.send((ended, taken)).unwrap();
        release_rx.recv().ok();
    });
    let (ended, taken) = taken_rx.recv().unwrap();
    assert!(ended >= 1 && taken, "ended {ended}, taken {taken}");
    let runs_before = cluster
        .psql_in(&db.name, "SELECT count(*) FROM charthero.sync_runs")
        .unwrap();
    let code = wait_exit("the daemon", &mut daemon, Duration::from_secs(90)).await;
    assert_eq!(code, Some(1), "the daemon stops once it cannot retake its lock");
    let log = std::fs::read_to_string(&log).unwrap();
    assert!(log.contains("writer lock"), "{log}");
    assert!(log.contains("other-writer"), "names who holds it: {log}");
    let runs_after = cluster
        .psql_in(&db.name, "SELECT count(*) FROM charthero.sync_runs")
        .unwrap();
    assert_eq!(runs_before, runs_after, "nothing written without the lock");

    release_tx.send(()).unwrap();
    holder.join().unwrap();
    env.sim.insert_bulk(OffsetDateTime::now_utc(), 5);
    let out = run_within(bin(&config, &["sync"]), Duration::from_secs(60)).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(equal(cluster, &db, &env.sim));
}

/// Upstream text with NUL (`SimOptions::nul_in_text`: a first name, unicode notes and turns):
/// a sync into PostgreSQL completes, its rows carry U+FFFD where NUL was and raw_json is the
/// exact JSON (`\u0000`); a privacy change editing raw_json through jsonb does not fail on it;
/// SQLite stores NUL unchanged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_with_nul_is_stored_with_the_replacement_character_in_postgres_and_unchanged_in_sqlite() {
    let Some(cluster) = pgcluster::shared() else {
        return;
    };
    let db = cluster.create_database("outage_nul").unwrap();
    let env = TestEnv::start(charthero_sim::SimOptions {
        nul_in_text: true,
        patients: 20,
        ..sim_options(174, 300)
    })
    .await;
    let config = pg_config_file(&env, &db);
    let out = run_within(bin(&config, &["sync"]), Duration::from_secs(120)).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(equal(cluster, &db, &env.sim));
    let count = |sql: &str| -> i64 { cluster.psql_in(&db.name, sql).unwrap().trim().parse().unwrap() };
    assert!(
        count("SELECT count(*) FROM charthero.patients WHERE first_name LIKE '%' || chr(65533) || 'Null'")
            > 0
    );
    assert!(count("SELECT count(*) FROM charthero.documents WHERE content_text LIKE '%' || chr(65533)") > 0);
    assert!(count("SELECT count(*) FROM charthero.transcript_turns WHERE text LIKE '%' || chr(65533)") > 0);

    // SQLite: the same upstream, NUL kept; raw_json identical in both.
    let sqlite = env.config();
    env.sync(&sqlite, charthero_sync::sync::CyclePlan::full(None, false))
        .await;
    let conn = crate::support::reader(&env.db_path());
    let (id, raw): (String, String) = conn
        .query_row(
            "SELECT e.encounter_id, e.raw_json FROM encounters e JOIN patients p USING (patient_id)
             WHERE instr(p.first_name, char(0)) > 0 LIMIT 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert!(raw.contains("\\u0000Null"), "{raw}");
    let pg_raw = cluster
        .psql_in(
            &db.name,
            &format!("SELECT raw_json FROM charthero.encounters WHERE encounter_id = '{id}'"),
        )
        .unwrap();
    assert_eq!(
        pg_raw.trim_end_matches('\n'),
        raw,
        "raw_json is the exact JSON text"
    );
    let nul_turns: i64 = conn
        .query_row(
            "SELECT count(*) FROM transcript_turns WHERE instr(text, char(0)) > 0",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert!(nul_turns > 0);

    // A privacy change edits raw_json through jsonb: NUL does not fail it.
    let text_config = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        format!("{text_config}\n[privacy]\npatient_names = false\n"),
    )
    .unwrap();
    let out = run_within(bin(&config, &["sync"]), Duration::from_secs(120)).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(
        count("SELECT count(*) FROM charthero.patients WHERE first_name IS NOT NULL"),
        0
    );
    assert_eq!(
        count("SELECT count(*) FROM charthero.encounters WHERE raw_json LIKE '%first_name%'"),
        0
    );
}
