//! When and how long to wait before trying a failed request again. 429 and 503 honour
//! `Retry-After` up to `retry_after_max`; a longer one pauses every request of the key instead
//! (`api::Client::start`) and is not retried; other transient failures back off exponentially
//! with full jitter.
//! Retries are bounded per request and per cycle, so a failing upstream is never hammered.

use std::future::Future;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use super::{ApiError, ErrorClass};

/// Retry settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts per request, the first included.
    pub max_attempts: u32,
    /// The first backoff ceiling; it doubles with every failure.
    pub base: Duration,
    /// The largest backoff ceiling.
    pub cap: Duration,
    /// The longest `Retry-After` a request waits for; a longer one pauses the key's requests
    /// until it has passed (up to [`PAUSE_MAX`]) and ends the request with the pause.
    pub retry_after_max: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 6,
            base: Duration::from_millis(500),
            cap: Duration::from_secs(30),
            retry_after_max: Duration::from_secs(120),
        }
    }
}

/// The longest pause a `Retry-After` can impose: a day, whatever the server says.
pub const PAUSE_MAX: Duration = Duration::from_secs(24 * 60 * 60);

/// Even a server that says `Retry-After: 0` gets this much breathing room.
const RETRY_AFTER_MIN: Duration = Duration::from_millis(250);

impl RetryPolicy {
    /// The wait before the next attempt after `failures` failed attempts (1-based), or `None`
    /// when the error must not be retried.
    pub fn delay(&self, err: &ApiError, failures: u32, rng: &mut fastrand::Rng) -> Option<Duration> {
        if err.class() != ErrorClass::Retryable || err.is_paused() || failures >= self.max_attempts {
            return None;
        }
        if let Some(after) = err.retry_after() {
            return (after <= self.retry_after_max).then(|| after.max(RETRY_AFTER_MIN));
        }
        // Full jitter (uniform between zero and the exponential ceiling) spreads retries of many
        // clients and requests instead of synchronising them.
        let exp = self
            .base
            .saturating_mul(1u32 << failures.saturating_sub(1).min(16));
        let ceiling = exp.min(self.cap);
        // Whole milliseconds: the timer has millisecond resolution anyway.
        Some(Duration::from_millis(rng.u64(0..=ceiling.as_millis() as u64)))
    }
}

/// Retries left in the current cycle, shared by every request; and how many were used.
#[derive(Debug, Default)]
pub struct RetryBudget {
    remaining: AtomicU32,
    used: AtomicU64,
}

impl RetryBudget {
    pub fn reset(&self, retries: u32) {
        self.remaining.store(retries, Ordering::SeqCst);
        self.used.store(0, Ordering::SeqCst);
    }

    fn take(&self) -> bool {
        let took = self
            .remaining
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if took {
            self.used.fetch_add(1, Ordering::SeqCst);
        }
        took
    }

    /// Retries spent since the last reset.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::SeqCst)
    }
}

/// Runs `op` until it succeeds, fails with an error that is not retryable, runs out of attempts,
/// or the cycle's budget is spent. `op` must redo the whole exchange, body included.
pub async fn retrying<T, F, Fut>(
    policy: &RetryPolicy,
    budget: &RetryBudget,
    rng: &Mutex<fastrand::Rng>,
    mut op: F,
) -> Result<T, ApiError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, ApiError>>,
{
    let mut failures = 0;
    loop {
        let err = match op().await {
            Ok(v) => return Ok(v),
            Err(e) => e,
        };
        failures += 1;
        let delay = policy.delay(&err, failures, &mut rng.lock().expect("rng lock"));
        let Some(delay) = delay.filter(|_| budget.take()) else {
            return Err(err);
        };
        tracing::debug!(
            route = err.route.as_str(),
            failures,
            delay_ms = delay.as_millis() as u64,
            "retrying after: {err}"
        );
        tokio::time::sleep(delay).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{ApiErrorKind, Route};
    use std::cell::Cell;
    use tokio::time::Instant;

    fn status(status: u16, retry_after: Option<Duration>) -> ApiError {
        ApiError {
            route: Route::Transcript,
            kind: ApiErrorKind::Status {
                status,
                reason_code: None,
                field: None,
                retry_after,
            },
        }
    }

    #[test]
    fn retry_after_is_honoured_up_to_its_maximum_and_a_longer_one_is_not_retried() {
        let p = RetryPolicy::default();
        let mut rng = fastrand::Rng::with_seed(1);
        let d = |e: &ApiError, rng: &mut fastrand::Rng| p.delay(e, 1, rng);
        assert_eq!(
            d(&status(429, Some(Duration::from_secs(7))), &mut rng),
            Some(Duration::from_secs(7))
        );
        assert_eq!(
            d(&status(503, Some(p.retry_after_max)), &mut rng),
            Some(p.retry_after_max)
        );
        assert_eq!(d(&status(503, Some(Duration::from_secs(3600))), &mut rng), None);
        assert_eq!(
            d(&status(429, Some(Duration::ZERO)), &mut rng),
            Some(RETRY_AFTER_MIN)
        );
        assert_eq!(d(&status(401, None), &mut rng), None);
        assert_eq!(d(&status(404, None), &mut rng), None);
    }

    #[test]
    fn backoff_ceilings_double_up_to_the_cap_with_full_jitter() {
        let p = RetryPolicy {
            max_attempts: 100,
            ..RetryPolicy::default()
        };
        let mut rng = fastrand::Rng::with_seed(7);
        let e = status(500, None);
        for (failures, ceiling_ms) in [
            (1, 500),
            (2, 1_000),
            (3, 2_000),
            (4, 4_000),
            (7, 30_000),
            (40, 30_000),
        ] {
            let samples: Vec<Duration> = (0..500)
                .map(|_| p.delay(&e, failures, &mut rng).unwrap())
                .collect();
            let max = samples.iter().max().unwrap().as_millis();
            let min = samples.iter().min().unwrap().as_millis();
            assert!(max <= ceiling_ms, "{failures}: {max} > {ceiling_ms}");
            assert!(
                max >= ceiling_ms * 9 / 10,
                "{failures}: jitter never reaches the ceiling"
            );
            assert!(min <= ceiling_ms / 10, "{failures}: jitter never comes near zero");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_retry_loop_sleeps_the_scheduled_delays_and_stops_at_max_attempts() {
        let p = RetryPolicy::default();
        let budget = RetryBudget::default();
        budget.reset(100);
        let rng = Mutex::new(fastrand::Rng::with_seed(3));
        let mut expected_rng = fastrand::Rng::with_seed(3);
        let expected: Duration = (1..p.max_attempts)
            .map(|f| p.delay(&status(502, None), f, &mut expected_rng).unwrap())
            .sum();
        let calls = Cell::new(0);
        let start = Instant::now();
        let result: Result<(), _> = retrying(&p, &budget, &rng, || {
            calls.set(calls.get() + 1);
            async { Err(status(502, None)) }
        })
        .await;
        assert!(result.is_err());
        assert_eq!(calls.get(), p.max_attempts);
        assert_eq!(start.elapsed(), expected);
        assert_eq!(budget.used(), u64::from(p.max_attempts - 1));
    }

    #[tokio::test(start_paused = true)]
    async fn a_retry_after_delay_is_slept_exactly_then_the_request_succeeds() {
        let budget = RetryBudget::default();
        budget.reset(10);
        let rng = Mutex::new(fastrand::Rng::with_seed(3));
        let calls = Cell::new(0);
        let start = Instant::now();
        let v = retrying(&RetryPolicy::default(), &budget, &rng, || {
            calls.set(calls.get() + 1);
            let n = calls.get();
            async move {
                match n {
                    1 => Err(status(429, Some(Duration::from_secs(30)))),
                    2 => Err(status(503, Some(Duration::from_secs(2)))),
                    _ => Ok(n),
                }
            }
        })
        .await
        .unwrap();
        assert_eq!(v, 3);
        assert_eq!(start.elapsed(), Duration::from_secs(32));
    }

    #[tokio::test(start_paused = true)]
    async fn an_exhausted_cycle_budget_stops_retrying_at_once() {
        let budget = RetryBudget::default();
        budget.reset(1);
        let rng = Mutex::new(fastrand::Rng::with_seed(3));
        let calls = Cell::new(0);
        let result: Result<(), _> = retrying(&RetryPolicy::default(), &budget, &rng, || {
            calls.set(calls.get() + 1);
            async { Err(status(500, None)) }
        })
        .await;
        assert!(result.is_err());
        assert_eq!(calls.get(), 2, "one try plus the single retry left in the budget");
    }
}
