//! Replication against an upstream that changes while we page: removals behind the cursor,
//! late-visible inserts into windows already read, updates during paging, fresh inserts at now,
//! dense windows and instants, crashes at random moments. Every test ends by comparing the
//! warehouse with the simulator entity by entity, and runs on SQLite and on PostgreSQL.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use charthero_sim::{
    Fault, FaultRule, ListRequest, NewEncounter, Route, SimOptions, Simulator, Unavailable, Visibility,
};
use charthero_sync::sync::{BackfillRange, CyclePlan};
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

use crate::support::{Backend, TestEnv, both_backends, compare, count, sim_options};

/// Mutations a chaos hook performed, to check how the warehouse recorded them.
#[derive(Default)]
struct Chaos {
    removed: BTreeSet<String>,
    unavailable: BTreeSet<String>,
    mutations: u32,
}

/// On list requests, at random, mutates upstream the ways the API contract warns about.
fn chaos_hook(seed: u64, state: Arc<Mutex<Chaos>>) -> charthero_sim::ListHook {
    let rng = Mutex::new(fastrand::Rng::with_seed(seed));
    Arc::new(move |sim: &Simulator, req: &ListRequest| {
        let mut rng = rng.lock().unwrap();
        if rng.u32(0..10) >= 4 {
            return;
        }
        let snapshot = sim.snapshot();
        if snapshot.len() < 10 {
            return;
        }
        let now = OffsetDateTime::now_utc();
        let cursor = req.start_at.unwrap_or(now);
        // Records the pager has already passed, where a removal shifts every later offset.
        let behind: Vec<_> = snapshot.iter().filter(|e| e.created_at < cursor).collect();
        let mut chaos = state.lock().unwrap();
        chaos.mutations += 1;
        match rng.u32(0..6) {
            0 | 1 if !behind.is_empty() => {
                let victim = &behind[rng.usize(..behind.len())].encounter_id;
                if rng.bool() {
                    sim.remove(victim);
                    chaos.removed.insert(victim.clone());
                } else {
                    let why = if rng.bool() {
                        Unavailable::CrossOrganization
                    } else {
                        Unavailable::DemoTraining
                    };
                    sim.mark_unavailable(victim, why);
                    chaos.unavailable.insert(victim.clone());
                }
            }
            2 => {
                // Late-visible: created in time already paged, visible only now.
                let first = snapshot[0].created_at;
                let span = (cursor - first).whole_seconds().max(1);
                let at = first + time::Duration::seconds(rng.i64(0..span));
                sim.insert(NewEncounter::at(at));
            }
            3 => {
                let e = &snapshot[rng.usize(..snapshot.len())];
                sim.update_status(&e.encounter_id, if rng.bool() { "in_progress" } else { "signed" });
            }
            4 => {
                sim.insert(NewEncounter::at(now));
            }
            _ => {
                let e = &snapshot[rng.usize(..snapshot.len())];
                sim.add_document(&e.encounter_id, charthero_sim::DocKind::Note);
            }
        }
    })
}

both_backends!(
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    every_harsh_behaviour_at_once_under_churn_converges_exactly_after_a_reconcile
);
/// The harsh behaviours the simulator knows, all at once and under the same churn: bounds read to
/// the millisecond, `created_at` rendered to whole seconds, pages of at most 37 records of varying
/// size, descending ties kept ascending, totals counting encounters the key may not see, a bulk
/// import on one instant and `"documents": null`. Each is tested alone elsewhere; together they
/// must still end exact after a reconcile.
async fn every_harsh_behaviour_at_once_under_churn_converges_exactly_after_a_reconcile(backend: Backend) {
    for seed in [31u64, 32, 33] {
        let now = OffsetDateTime::now_utc();
        let env = TestEnv::start_on(
            backend,
            SimOptions {
                start: now - time::Duration::days(20),
                end: now - time::Duration::hours(1),
                query_precision: charthero_sim::QueryPrecision::TruncateMillis,
                render_created_at: Some(charthero_sim::Rendering {
                    unit: time::Duration::seconds(1),
                    rounding: charthero_sim::Rounding::Truncate,
                }),
                page_cap: Some(charthero_sim::PageCap {
                    max: 37,
                    varying: true,
                }),
                desc_ties_ascending: true,
                total_counts_unavailable: true,
                null_empty_documents: true,
                service_dates: charthero_sim::ServiceDates::Assorted,
                decimals_as_strings: true,
                unordered_rendering: true,
                docs_per_encounter: (0, 2),
                ..sim_options(seed, 1_500)
            },
        )
        .await;
        env.sim.insert_bulk(now - time::Duration::days(3), 300);
        let mut raw = env.raw_config();
        raw.sync.page_size = 40;
        raw.content.details = false;
        raw.content.transcripts = false;
        let config = raw.validate().unwrap();
        let chaos = Arc::new(Mutex::new(Chaos::default()));
        env.sim.set_list_hook(Some(chaos_hook(seed, chaos.clone())));
        let cancel = CancellationToken::new();
        for _ in 0..2 {
            // A window that kept changing on every pass may fail a cycle honestly.
            let _ =
                charthero_sync::sync_once(&config, &env.key(), "test", CyclePlan::full(None, false), &cancel)
                    .await;
        }
        env.sim.set_list_hook(None);
        let range = BackfillRange {
            start: config.sync.start_at,
            end: OffsetDateTime::now_utc(),
        };
        let report = env.sync(&config, CyclePlan::full(Some(range), false)).await;
        assert!(report.is_complete(), "seed {seed}: {report:?}");
        compare(&env.sim, &env.warehouse).assert_empty();
        assert!(
            chaos.lock().unwrap().mutations > 10,
            "seed {seed}: the hook barely ran"
        );
    }
}

both_backends!(
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    mixed_churn_while_paging_converges_exactly_after_a_reconcile_over_ten_seeds
);
async fn mixed_churn_while_paging_converges_exactly_after_a_reconcile_over_ten_seeds(backend: Backend) {
    let mut rescans = 0;
    for seed in 1..=10u64 {
        let env = TestEnv::with_encounters_on(backend, seed, 2_500).await;
        let mut raw = env.raw_config();
        // Small pages make many requests per window, so the chaos lands mid-window.
        raw.sync.page_size = 40;
        raw.content.details = false;
        raw.content.transcripts = false;
        let config = raw.validate().unwrap();
        let cancel = CancellationToken::new();
        let chaos = Arc::new(Mutex::new(Chaos::default()));
        env.sim.set_list_hook(Some(chaos_hook(seed, chaos.clone())));
        for _ in 0..2 {
            let report =
                charthero_sync::sync_once(&config, &env.key(), "test", CyclePlan::full(None, false), &cancel)
                    .await;
            // A window that kept changing on every pass fails the cycle honestly; later cycles
            // and the reconcile pick it up.
            if let Ok(r) = report {
                rescans += r.counts.rescans;
            }
        }
        env.sim.set_list_hook(None);
        let range = BackfillRange {
            start: config.sync.start_at,
            end: OffsetDateTime::now_utc(),
        };
        let report = env.sync(&config, CyclePlan::full(Some(range), false)).await;
        rescans += report.counts.rescans;
        let db = &env.warehouse;
        compare(&env.sim, db).assert_empty();

        let chaos = chaos.lock().unwrap();
        assert!(chaos.mutations > 10, "seed {seed}: the hook barely ran");
        for id in chaos.removed.iter().chain(&chaos.unavailable) {
            let reason: Option<String> = db
                .optional_row::<(Option<String>,)>(
                    "SELECT removed_reason FROM encounters WHERE encounter_id = ?1",
                    &[id],
                )
                .and_then(|(reason,)| reason);
            let expected = match env.sim.visibility(id) {
                Some(Visibility::Removed) => "encounter_not_found",
                Some(Visibility::Unavailable(Unavailable::CrossOrganization)) => "cross_organization_denied",
                Some(Visibility::Unavailable(Unavailable::DemoTraining)) => "demo_training_denied",
                other => panic!("seed {seed}: {id} is {other:?} upstream"),
            };
            // Encounters removed before we ever listed them are simply never stored.
            if let Some(reason) = reason {
                assert_eq!(reason, expected, "seed {seed}: {id}");
            }
        }
        let dupes: i64 = db.scalar(
            "SELECT count(*) FROM (SELECT document_id FROM documents GROUP BY document_id HAVING count(*) > 1) d",
            &[],
        );
        assert_eq!(dupes, 0);
    }
    assert!(
        rescans > 0,
        "ten seeds of churn never triggered a re-scan: shift detection is not working"
    );
}

both_backends!(
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    twenty_five_thousand_in_one_day_and_three_hundred_in_one_instant_come_out_complete
);
async fn twenty_five_thousand_in_one_day_and_three_hundred_in_one_instant_come_out_complete(
    backend: Backend,
) {
    let day = OffsetDateTime::now_utc().replace_time(time::Time::MIDNIGHT) - time::Duration::days(3);
    let env = TestEnv::start_on(
        backend,
        SimOptions {
            start: day,
            end: day + time::Duration::days(1),
            ..sim_options(25, 25_000)
        },
    )
    .await;
    let instant = day + time::Duration::hours(12);
    for _ in 0..300 {
        env.sim.insert(NewEncounter::at(instant));
    }
    let report = env
        .sync(&env.encounters_only_config(), CyclePlan::full(None, false))
        .await;
    let db = &env.warehouse;
    compare(&env.sim, db).assert_empty();
    assert_eq!(count(db, "encounters"), 25_300);
    assert!(
        report.counts.splits > 0,
        "a 25,300-record day must be split: {:?}",
        report.counts
    );
    let at_instant: i64 = db.scalar(
        "SELECT count(*) FROM encounters WHERE created_at = ?1",
        &[&charthero_sync::timefmt::format_stored(instant)],
    );
    assert!(at_instant >= 300);
    // Re-anchoring keeps the cost near the ceil(N/100) minimum even here.
    let minimum = 25_300f64 / 100.0;
    assert!(
        (report.counts.list_requests as f64) < minimum * 1.15,
        "{} list requests for a minimum of {minimum}",
        report.counts.list_requests
    );
}

both_backends!(
    #[tokio::test]
    a_second_quiet_cycle_changes_no_rows_and_only_lists_the_revisit_horizon
);
async fn a_second_quiet_cycle_changes_no_rows_and_only_lists_the_revisit_horizon(backend: Backend) {
    let env = TestEnv::with_encounters_on(backend, 31, 3_000).await;
    let config = env.config();
    env.sync(&config, CyclePlan::full(None, false)).await;
    let before = OffsetDateTime::now_utc();
    env.sim.reset_stats();
    let second = env.sync(&config, CyclePlan::full(None, false)).await;

    let stats = env.sim.stats();
    assert_eq!(
        stats.requests,
        stats.route(charthero_sim::Route::List),
        "only list requests"
    );
    assert_eq!(
        second.counts.list_requests,
        stats.route(charthero_sim::Route::List)
    );
    // The revisit horizon holds the last 48 hours; each page re-anchors on one record.
    let horizon = before - time::Duration::hours(48);
    let recent = env
        .sim
        .snapshot()
        .iter()
        .filter(|e| e.created_at >= horizon)
        .count() as u64;
    let pages = recent.div_ceil(99).max(1);
    let expected = if pages > 1 { pages + 1 } else { pages };
    assert!(
        second.counts.list_requests <= expected + 1,
        "{} list requests to revisit {recent} recent encounters",
        second.counts.list_requests
    );
    assert_eq!(second.counts.encounters_new + second.counts.encounters_changed, 0);
    let since = charthero_sync::timefmt::format_stored(before);
    for table in ["encounters", "patients", "documents"] {
        let changed: i64 = env.warehouse.scalar(
            &format!("SELECT count(*) FROM {table} WHERE changed_at >= ?1"),
            &[&since],
        );
        assert_eq!(changed, 0, "{table} rows changed on a quiet cycle");
    }
}

both_backends!(
    #[tokio::test]
    only_the_contracts_answers_mark_an_encounter_removed
);
async fn only_the_contracts_answers_mark_an_encounter_removed(backend: Backend) {
    let env = TestEnv::with_encounters_on(backend, 44, 300).await;
    let config = env.encounters_only_config();
    env.sync(&config, CyclePlan::full(None, false)).await;
    let gone = env.sim.snapshot()[0].encounter_id.clone();
    env.sim.remove(&gone);
    let range = BackfillRange {
        start: config.sync.start_at,
        end: OffsetDateTime::now_utc() - time::Duration::days(10),
    };
    let removed_reason = || -> Option<String> {
        env.warehouse.scalar(
            "SELECT removed_reason FROM encounters WHERE encounter_id = ?1",
            &[&gone],
        )
    };
    // A gateway's HTML 404, then a 409 and a 410 the contract does not list: no evidence.
    for fault in [
        Fault::HtmlStatus(404),
        Fault::status(409, "conflict"),
        Fault::status(410, "gone"),
    ] {
        env.sim
            .push_fault(FaultRule::once(Some(Route::Encounter), fault.clone()));
        let report = env.sync(&config, CyclePlan::full(Some(range), false)).await;
        assert_eq!(report.counts.encounters_removed, 0, "{fault:?}");
        assert_eq!(removed_reason(), None, "{fault:?}");
    }
    assert_eq!(env.sim.stats().route(Route::Encounter), 3);
    // The documented answer.
    let report = env.sync(&config, CyclePlan::full(Some(range), false)).await;
    assert_eq!(report.counts.encounters_removed, 1);
    assert_eq!(removed_reason().as_deref(), Some("encounter_not_found"));
    compare(&env.sim, &env.warehouse).assert_empty();
}

both_backends!(
    #[tokio::test]
    a_backfill_marks_removals_revives_returns_and_leaves_the_watermark_alone
);
async fn a_backfill_marks_removals_revives_returns_and_leaves_the_watermark_alone(backend: Backend) {
    let env = TestEnv::with_encounters_on(backend, 41, 800).await;
    let config = env.encounters_only_config();
    let first = env.sync(&config, CyclePlan::full(None, false)).await;
    let ids: Vec<_> = env.sim.snapshot().into_iter().map(|e| e.encounter_id).collect();
    // Old enough to be outside the revisit horizon: only a reconcile finds these.
    env.sim.remove(&ids[0]);
    env.sim.mark_unavailable(&ids[1], Unavailable::DemoTraining);
    let range = BackfillRange {
        start: config.sync.start_at,
        end: OffsetDateTime::now_utc() - time::Duration::days(10),
    };
    let report = env.sync(&config, CyclePlan::full(Some(range), false)).await;
    assert_eq!(report.counts.encounters_removed, 2, "{:?}", report.counts);
    let db = &env.warehouse;
    let reasons: Vec<String> = ids[..2]
        .iter()
        .map(|id| {
            db.scalar(
                "SELECT removed_reason FROM encounters WHERE encounter_id = ?1",
                &[id],
            )
        })
        .collect();
    assert_eq!(reasons, ["encounter_not_found", "demo_training_denied"]);
    assert!(report.complete_through >= first.complete_through);
    let (status, cursor): (String, String) = db.row("SELECT status, cursor FROM backfills", &[]);
    assert_eq!(status, "completed");
    assert_eq!(
        cursor,
        charthero_sync::timefmt::format_stored(charthero_sync::timefmt::Micros::ceil(range.end).instant())
    );

    env.sim.restore(&ids[0]);
    env.sync(&config, CyclePlan::full(Some(range), false)).await;
    compare(&env.sim, db).assert_empty();
    let removed: Option<String> = db.scalar(
        "SELECT removed_at FROM encounters WHERE encounter_id = ?1",
        &[&ids[0]],
    );
    assert_eq!(removed, None, "a record that came back is revived");
}

both_backends!(
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    a_sync_killed_twenty_times_mid_backfill_resumes_and_ends_equal
);
async fn a_sync_killed_twenty_times_mid_backfill_resumes_and_ends_equal(backend: Backend) {
    let kills = if std::env::var_os("CHARTHERO_SOAK").is_some() {
        100
    } else {
        20
    };
    let env = TestEnv::with_encounters_on(backend, 77, 20_000).await;
    env.write_key_file(&env.sim.api_key());
    let config_path = env.write_config_file(crate::support::ENCOUNTERS_ONLY);
    // Live time starts now, so the work is the backfill of the whole dataset.
    let text = std::fs::read_to_string(&config_path).unwrap();
    let start_line = text
        .lines()
        .find(|l| l.starts_with("start_at"))
        .unwrap()
        .to_owned();
    let now = charthero_sync::timefmt::format_utc(OffsetDateTime::now_utc());
    // A modest rate keeps the backfill long enough (about 1.5 s) for kills to land inside it.
    let text = text
        .replace(&start_line, &format!("start_at = \"{now}\""))
        .replace("requests_per_second = 2000.0", "requests_per_second = 150.0");
    std::fs::write(&config_path, text).unwrap();
    let from = charthero_sync::timefmt::format_utc(OffsetDateTime::now_utc() - time::Duration::days(61));
    let to = charthero_sync::timefmt::format_utc(OffsetDateTime::now_utc());
    // Migrated first: the kills are meant for the backfill (a PostgreSQL schema takes about a
    // second to create on a loaded machine, longer than many of the delays below).
    let mut migrate = crate::support::charthero_sync();
    migrate.arg("--config").arg(&config_path).arg("migrate");
    let out = crate::support::run(migrate).await;
    assert!(out.status.success(), "{}", crate::support::text(&out));
    let spawn = move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_charthero-sync"))
            .arg("--config")
            .arg(&config_path)
            .args(["sync", "--backfill-from", &from, "--backfill-to", &to])
            .env("RUST_LOG", "error")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap()
    };
    let mut rng = fastrand::Rng::with_seed(77);
    let mut finished_early = 0;
    for _ in 0..kills {
        let mut child = spawn();
        tokio::time::sleep(Duration::from_millis(rng.u64(30..900))).await;
        if child.try_wait().unwrap().is_some() {
            finished_early += 1;
        }
        child.kill().ok();
        tokio::task::spawn_blocking(move || child.wait())
            .await
            .unwrap()
            .unwrap();
    }
    let mut last = spawn();
    let status = tokio::task::spawn_blocking(move || last.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "the final run failed");
    let db = &env.warehouse;
    compare(&env.sim, db).assert_empty();
    if let Some(path) = db.sqlite_path() {
        let integrity: String = crate::support::reader(path)
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))
            .unwrap();
        assert_eq!(integrity, "ok");
    }
    assert_eq!(count(db, "encounters"), 20_000);
    let (aborted, backfills, unfinished, other): (i64, i64, i64, i64) = db.row(
        "SELECT (SELECT count(*) FROM sync_runs WHERE outcome = 'aborted'), (SELECT count(*) FROM backfills),
                (SELECT count(*) FROM backfills WHERE status <> 'completed'),
                (SELECT count(*) FROM sync_runs WHERE outcome NOT IN ('aborted', 'succeeded'))",
        &[],
    );
    // Every killed run that had written its row is marked aborted by the next one; a kill that
    // lands before the row exists (a slow start on a loaded machine) leaves nothing to mark, so
    // only most of the kills, not all but one, are required to show up.
    let left: Vec<(i64, String, Option<String>)> = db.rows(
        "SELECT run_id, outcome, error FROM sync_runs WHERE outcome NOT IN ('aborted', 'succeeded')",
        &[],
    );
    assert_eq!(other, 0, "a killed run was left running (or failed): {left:?}");
    assert!(
        aborted >= (kills - finished_early) as i64 / 2,
        "killed runs are marked aborted: {aborted} of {kills} kills ({finished_early} finished early)"
    );
    // Restarts resume the interrupted backfill: a new backfill row appears only after the
    // previous one completed (a run may complete it just before its kill lands).
    let rows: Vec<(String, Option<String>)> = db.rows(
        "SELECT requested_at, finished_at FROM backfills ORDER BY backfill_id",
        &[],
    );
    let parse = |t: &str| charthero_sync::timefmt::parse_rfc3339(t).unwrap();
    for pair in rows.windows(2) {
        let finished = pair[0]
            .1
            .as_deref()
            .map(parse)
            .expect("an earlier backfill finished");
        assert!(
            finished <= parse(&pair[1].0),
            "a backfill was started while another was unfinished"
        );
    }
    assert_eq!(backfills as usize, rows.len());
    assert!(backfills >= 1);
    assert_eq!(unfinished, 0);
}

/// A list-only backfill of 250,000 encounters on SQLite crosses two staged merges of 100,000
/// and a last one at the cycle's end, the later ones writing into pages the earlier ones freed
/// (where a statement journal larger than SQLite's unix VFS writes at once failed with
/// `SQLITE_FULL`, BENCHMARKS.md): the warehouse equals the simulator, nothing stays staged, and
/// SQLite's integrity check passes. Heavy: runs only with `CHARTHERO_SOAK=1`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_a_sqlite_backfill_across_several_merges_equals_the_simulator() {
    if std::env::var_os("CHARTHERO_SOAK").is_none() {
        return;
    }
    let n = 250_000;
    let env = TestEnv::with_encounters_on(Backend::Sqlite, 7, n).await;
    let config = env.encounters_only_config();
    let report = charthero_sync::sync_once(
        &config,
        &env.key(),
        "soak",
        CyclePlan::full(None, false),
        &CancellationToken::new(),
    )
    .await
    .unwrap();
    assert_eq!(report.counts.encounters_new, n as u64);
    compare(&env.sim, &env.warehouse).assert_empty();
    let path = env.warehouse.sqlite_path().expect("a SQLite warehouse");
    let (integrity, staged): (String, i64) = crate::support::reader(path)
        .query_row(
            "SELECT (SELECT integrity_check FROM pragma_integrity_check), (SELECT count(*) FROM staged_encounters)",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!((integrity.as_str(), staged), ("ok", 0));
}

both_backends!(
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    soak_list_requests_per_encounter_for_a_100k_backfill
);
/// Measures list requests per encounter for a 100k backfill, quiet and churning, against the
/// ceil(N/100) minimum. Heavy: runs only with `CHARTHERO_SOAK=1` (add `--nocapture` to see it).
async fn soak_list_requests_per_encounter_for_a_100k_backfill(backend: Backend) {
    if std::env::var_os("CHARTHERO_SOAK").is_none() {
        return;
    }
    let n = 100_000usize;
    let minimum = n.div_ceil(100) as f64;
    for churn in [false, true] {
        let env = TestEnv::with_encounters_on(backend, 100, n).await;
        let config = env.encounters_only_config();
        let chaos = Arc::new(Mutex::new(Chaos::default()));
        if churn {
            env.sim.set_list_hook(Some(chaos_hook(100, chaos.clone())));
        }
        let cancel = CancellationToken::new();
        let report =
            charthero_sync::sync_once(&config, &env.key(), "soak", CyclePlan::full(None, false), &cancel)
                .await;
        env.sim.set_list_hook(None);
        let (list, rescans) = report
            .as_ref()
            .map_or((0, 0), |r| (r.counts.list_requests, r.counts.rescans));
        let listed = env.sim.stats().route(charthero_sim::Route::List);
        eprintln!(
            "soak churn={churn}: {n} encounters, {listed} list requests ({:.3} per minimum {minimum}), \
             {rescans} re-scans, {} mutations, cycle result {:?}",
            listed as f64 / minimum,
            chaos.lock().unwrap().mutations,
            report.as_ref().map(|r| r.counts).map_err(|e| e.to_string())
        );
        assert!(list <= listed);
        if !churn {
            assert!(
                (listed as f64) < minimum * 1.05,
                "quiet backfill used {listed} list requests"
            );
        }
        let range = BackfillRange {
            start: config.sync.start_at,
            end: OffsetDateTime::now_utc(),
        };
        charthero_sync::sync_once(
            &config,
            &env.key(),
            "soak",
            CyclePlan::full(Some(range), false),
            &cancel,
        )
        .await
        .unwrap();
        compare(&env.sim, &env.warehouse).assert_empty();
    }
}
