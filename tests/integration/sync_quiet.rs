//! A sync of a quiet simulator: the warehouse ends equal to upstream, record by record, and a
//! second cycle changes nothing. Every test runs on SQLite and on PostgreSQL.

use charthero_sim::{Fault, FaultRule, Route as SimRoute, SimOptions};
use charthero_sync::sync::{CycleError, CyclePlan};
use tokio_util::sync::CancellationToken;

use crate::support::{Backend, TestEnv, both_backends, compare, compare_content, count, sim_options};

both_backends!(
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    a_quiet_sync_of_20000_encounters_equals_the_simulator
);
async fn a_quiet_sync_of_20000_encounters_equals_the_simulator(backend: Backend) {
    let env = TestEnv::with_encounters_on(backend, 2026, 20_000).await;
    let report = env
        .sync(&env.encounters_only_config(), CyclePlan::full(None, false))
        .await;
    let db = &env.warehouse;
    compare(&env.sim, db).assert_empty();
    assert_eq!(count(db, "encounters"), 20_000);
    assert_eq!(report.counts.encounters_new, 20_000);
    // Records re-read at a page's anchor or a window's cut are not reported as unchanged:
    // a first sync found only new records. (Windows cut by density re-read a handful.)
    assert!(report.counts.encounters_unchanged <= 4, "{:?}", report.counts);
    let patients: usize = {
        let mut ids: Vec<_> = env
            .sim
            .snapshot()
            .into_iter()
            .map(|e| e.patient.patient_id)
            .collect();
        ids.sort();
        ids.dedup();
        ids.len()
    };
    assert_eq!(count(db, "patients") as usize, patients);
    // Close to the minimum of ceil(N / 100) list requests: the first probe and splits add few.
    assert!(report.counts.list_requests <= 200 + 20, "{:?}", report.counts);
    let (outcome, windows): (String, i64) = db.row(
        "SELECT outcome, windows FROM sync_runs WHERE run_id = ?1",
        &[&report.run_id],
    );
    assert_eq!(outcome, "succeeded");
    assert!(
        windows >= 3,
        "20,000 records need several windows under the offset cap"
    );
    let ledger_records: i64 = db.scalar("SELECT CAST(sum(records_seen) AS bigint) FROM sync_windows", &[]);
    assert_eq!(ledger_records, 20_000);
}

both_backends!(
    #[tokio::test]
    a_second_cycle_without_upstream_changes_writes_nothing
);
async fn a_second_cycle_without_upstream_changes_writes_nothing(backend: Backend) {
    let env = TestEnv::with_encounters_on(backend, 11, 1_500).await;
    let cfg = env.encounters_only_config();
    env.sync(&cfg, CyclePlan::full(None, false)).await;
    let changes_before: i64 = env.warehouse.scalar(
        "SELECT count(*) FROM encounters WHERE changed_at IS NOT NULL",
        &[],
    );
    let second = env.sync(&cfg, CyclePlan::full(None, false)).await;
    assert_eq!(
        second.counts.encounters_new + second.counts.encounters_changed,
        0,
        "{:?}",
        second.counts
    );
    assert_eq!(changes_before, 1_500);
    compare(&env.sim, &env.warehouse).assert_empty();
}

both_backends!(
    #[tokio::test]
    offsets_other_than_utc_and_unknown_fields_are_accepted_and_normalized
);
async fn offsets_other_than_utc_and_unknown_fields_are_accepted_and_normalized(backend: Backend) {
    let env = TestEnv::start_on(
        backend,
        SimOptions {
            offset_timestamps: true,
            extra_fields: true,
            ..sim_options(5, 400)
        },
    )
    .await;
    env.sync(&env.config(), CyclePlan::full(None, false)).await;
    compare(&env.sim, &env.warehouse).assert_empty();
    assert_eq!(compare_content(&env.sim, &env.warehouse), Vec::<String>::new());
    let sample: String = env
        .warehouse
        .scalar("SELECT created_at FROM encounters LIMIT 1", &[]);
    assert!(sample.ends_with('Z'), "{sample}");
}

both_backends!(
    #[tokio::test]
    a_truncated_page_is_retried_and_one_that_stays_broken_fails_with_a_clear_error
);
async fn a_truncated_page_is_retried_and_one_that_stays_broken_fails_with_a_clear_error(backend: Backend) {
    let env = TestEnv::with_encounters_on(backend, 12, 600).await;
    let cfg = env.encounters_only_config();
    let cancel = CancellationToken::new();
    env.sync(&cfg, CyclePlan::full(None, false)).await;
    env.sim
        .push_fault(FaultRule::once(Some(SimRoute::List), Fault::TruncatedJson));
    let report = env.sync(&cfg, CyclePlan::full(None, false)).await;
    assert_eq!(report.counts.retries, 1);

    env.sim.push_fault(FaultRule {
        route: Some(SimRoute::List),
        skip: 0,
        times: 1_000,
        fault: Fault::TruncatedJson,
    });
    let err = charthero_sync::sync_once(&cfg, &env.key(), "test", CyclePlan::full(None, false), &cancel)
        .await
        .unwrap_err();
    assert!(matches!(err, CycleError::Api(_)), "{err}");
    assert!(err.to_string().contains("malformed response body"), "{err}");
    env.sim.clear_faults();
    compare(&env.sim, &env.warehouse).assert_empty();
    let (outcome, error, retries): (String, String, i64) = env.warehouse.row(
        "SELECT outcome, error, retries FROM sync_runs ORDER BY run_id DESC LIMIT 1",
        &[],
    );
    assert_eq!(outcome, "failed");
    assert!(error.contains("malformed"), "{error}");
    assert_eq!(retries, 5, "max_attempts = 6 means five retries, then the error");
}
