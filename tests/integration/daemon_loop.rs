//! The daemon in-process, the way mini-redis tests its server: `daemon::serve` from the library
//! with a cancellation token instead of signals (the binary-level signal and sd_notify tests
//! are in `daemon.rs`).

use std::time::Duration;

use charthero_sim::KeyState;
use charthero_sync::daemon::notify::Notifier;
use charthero_sync::sync::CycleError;
use tokio_util::sync::CancellationToken;

use crate::support::{TestEnv, compare, reader, wait_for};

fn runs(env: &TestEnv, outcome: &str) -> i64 {
    if !env.db_path().exists() {
        return 0;
    }
    reader(&env.db_path())
        .query_row(
            "SELECT count(*) FROM sync_runs WHERE outcome = ?1",
            [outcome],
            |r| r.get(0),
        )
        .unwrap_or(0)
}

/// Cancels `shutdown` and waits for the `serve` task: it must return promptly, and cleanly.
async fn cancel_and_join<E: std::fmt::Debug>(
    shutdown: &CancellationToken,
    daemon: tokio::task::JoinHandle<Result<(), E>>,
) {
    shutdown.cancel();
    let stopped = tokio::time::timeout(Duration::from_secs(10), daemon)
        .await
        .expect("serve returns promptly after cancellation")
        .unwrap();
    assert!(stopped.is_ok(), "{stopped:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_syncs_at_start_and_returns_when_its_token_is_cancelled() {
    let env = TestEnv::with_encounters(91, 1_000).await;
    let config = env.encounters_only_config();
    let key = env.key();
    let shutdown = CancellationToken::new();
    let daemon = {
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            charthero_sync::daemon::serve(&config, &key, None, &Notifier::silent(), &shutdown).await
        })
    };
    wait_for("a succeeded cycle", Duration::from_secs(30), || {
        runs(&env, "succeeded") >= 1
    })
    .await;
    compare(&env.sim, &env.db_path()).assert_empty();
    cancel_and_join(&shutdown, daemon).await;
    assert_eq!(runs(&env, "running"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_key_ends_serve_with_the_authentication_error() {
    let env = TestEnv::with_encounters(92, 200).await;
    env.sim.set_key_state(&env.sim.api_key(), KeyState::Revoked);
    let config = env.encounters_only_config();
    let result = tokio::time::timeout(
        Duration::from_secs(30),
        charthero_sync::daemon::serve(
            &config,
            &env.key(),
            None,
            &Notifier::silent(),
            &CancellationToken::new(),
        ),
    )
    .await
    .expect("a refused key ends the daemon instead of retrying");
    match result {
        Err(CycleError::Api(e)) => assert_eq!(e.reason_code(), Some("revoked_key")),
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_upstream_is_retried_with_backoff_never_spun_on() {
    let env = TestEnv::with_encounters(93, 100).await;
    let mut raw = env.raw_config();
    // A loopback port nothing listens on: every cycle fails at once.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    raw.api.base_url = format!("http://{closed}");
    raw.limits.max_attempts = 1;
    // The retry comes at the backoff or the next scheduled cycle, whichever is sooner; with the
    // default schedule (every 5 minutes) a failure just before a fire retried within 3 s.
    raw.sync.schedule = "0 0 0 1 1 *".into();
    let config = raw.validate().unwrap();
    let shutdown = CancellationToken::new();
    let daemon = {
        let (shutdown, key) = (shutdown.clone(), env.key());
        tokio::spawn(async move {
            charthero_sync::daemon::serve(&config, &key, None, &Notifier::silent(), &shutdown).await
        })
    };
    wait_for("a failed cycle", Duration::from_secs(20), || {
        runs(&env, "failed") >= 1
    })
    .await;
    // The first backoff is at least 15 s (30 s with jitter down to half): nothing more in 3 s.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(runs(&env, "failed"), 1);
    cancel_and_join(&shutdown, daemon).await;
}
