//! `charthero-sync plan` against the simulator: the estimate from a few probes, compared with
//! the requests the first full-content backfill then makes.

use charthero_sync::sync::CyclePlan;
use time::OffsetDateTime;

use crate::support::TestEnv;

#[tokio::test]
async fn the_plan_estimates_the_first_backfill_within_ten_percent() {
    let env = TestEnv::with_encounters(81, 5_000).await;
    let config = env.config();
    let client = charthero_sync::api::Client::new(&config.api, &config.limits, &env.key()).unwrap();
    let plan = charthero_sync::plan::estimate(
        &config,
        &config.organizations[0],
        &client,
        OffsetDateTime::now_utc(),
    )
    .await
    .unwrap();
    let planned = env.sim.stats().requests;
    assert!(planned <= 12, "the plan itself is cheap: {planned} requests");
    assert_eq!(plan.probe_requests, planned);
    assert_eq!(plan.encounters, 5_000, "{}", plan.render());
    assert!(plan.hours > 0.0);

    env.sim.reset_stats();
    let report = env.sync(&config, CyclePlan::full(None, false)).await;
    assert!(report.is_complete());
    let actual = env.sim.stats().requests;
    let error = plan.total_requests as f64 / actual as f64 - 1.0;
    eprintln!(
        "plan: estimated {} requests ({} list + {} content), actual {actual}: error {:+.1} %",
        plan.total_requests,
        plan.list_requests,
        plan.content_requests,
        100.0 * error
    );
    assert!(
        error.abs() <= 0.10,
        "estimate {} vs actual {actual}",
        plan.total_requests
    );
    let text = plan.render();
    assert!(text.contains("first backfill   about"), "{text}");
}
