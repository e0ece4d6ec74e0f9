//! Request budgets: each key's own rate and in-flight bound ([`KeyBudget`]) and the process's
//! ceiling over all keys ([`Ceiling`], `[limits]`). A request starts only when both rate buckets
//! admit it *at the same instant*, and both are charged at that instant: waiting for one bucket
//! after being charged by the other would send requests later than they were admitted, and
//! requests admitted over a longer span than a second could then reach the server within one.
//! The in-flight bounds are semaphores, the key's taken before the ceiling's, and the ceiling's
//! only once the key's own bucket is ready, so a key waiting for its own budget does not hold
//! slots of the ceiling.
//!
//! ChartHero does not document its rate limit, so a key's configured rate may be more than the
//! server takes. Each request it refuses (429) is spent for nothing, and a refusal usually
//! comes with a `Retry-After` pause of the whole key, so the key's rate follows the refusals
//! ([`KeyBudget::refused`], [`KeyBudget::answered`]): down by a quarter at a refusal, without
//! bursts; then back up with each answer, quickly to near the rate the server refused and
//! slowly beyond it, bursts again once it is back at the configured rate. One signal cuts once:
//! a refusal of a request sent before the last cut, or with no answer since it (a server that
//! refuses everything until its window resets), cuts nothing more. This module knows nothing
//! of HTTP.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Semaphore, SemaphorePermit};
use tokio::time::Instant;

use crate::config::Budget;

/// How late a request may reach the server relative to its admission (task scheduling,
/// connection pool, network) without the server seeing more than `requests_per_second + burst`
/// requests in any second: buckets pace 1 % slower than configured, so requests admitted within
/// 1 s + 10 ms arrive within any server second even when some arrive up to 10 ms late.
const JITTER_ALLOWANCE_SECONDS: f64 = 0.010;

/// What a refusal multiplies the key's rate by.
const SLOW_DOWN: f64 = 0.75;
/// Below [`NEAR`] of the rate last refused, each answer multiplies the key's rate by
/// [`RECOVER`]; above it, by [`PROBE`]: at 20 requests a second, back from a cut to near the
/// refused rate in about half a second, then to it in about ten.
const RECOVER: f64 = 1.02;
const NEAR: f64 = 0.9;
const PROBE: f64 = 1.0005;
/// The lowest the key's rate goes, as a share of the configured rate.
const LOWEST: f64 = 0.02;

/// The request period of `rps` with the jitter allowance.
fn period(rps: f64) -> Option<Duration> {
    Duration::try_from_secs_f64((1.0 + JITTER_ALLOWANCE_SECONDS) / rps)
        .ok()
        .filter(|p| !p.is_zero() && *p <= Duration::from_secs(1_000))
}

/// A generic cell rate algorithm bucket: `burst` requests at once, then one per `interval`.
#[derive(Debug)]
struct Bucket {
    interval: Duration,
    /// `interval × (burst − 1)`: how far ahead of now the theoretical arrival time may run.
    tolerance: Duration,
    /// The theoretical arrival time of the next request.
    tat: Instant,
}

impl Bucket {
    fn new(budget: &Budget, what: &str) -> anyhow::Result<Bucket> {
        let rps = budget.requests_per_second;
        // `config` bounds requests_per_second (0.01..=1e6), so the interval is 1.01 µs..101 s;
        // the check keeps a bad value an error instead of a panic or a bucket that never opens.
        let interval = period(rps).ok_or_else(|| {
            anyhow::anyhow!("{what} requests_per_second = {rps} gives no usable request period")
        })?;
        Ok(Bucket {
            interval,
            tolerance: interval.saturating_mul(budget.burst.get() - 1),
            tat: Instant::now(),
        })
    }

    /// The earliest instant at which one more request conforms.
    fn earliest(&self) -> Instant {
        self.tat.checked_sub(self.tolerance).unwrap_or(self.tat)
    }

    fn charge(&mut self, now: Instant) {
        self.tat = self.tat.max(now) + self.interval;
    }
}

/// The whole process's ceiling (`[limits]`), shared by every organization's client.
#[derive(Debug)]
pub struct Ceiling {
    bucket: Mutex<Bucket>,
    in_flight: Semaphore,
}

impl Ceiling {
    pub fn new(budget: &Budget) -> anyhow::Result<Arc<Ceiling>> {
        Ok(Arc::new(Ceiling {
            bucket: Mutex::new(Bucket::new(budget, "limits.")?),
            in_flight: Semaphore::new(budget.max_in_flight.get()),
        }))
    }
}

/// One key's budget, with the ceiling it shares.
#[derive(Debug)]
pub struct KeyBudget {
    bucket: Mutex<Bucket>,
    in_flight: Semaphore,
    ceiling: Arc<Ceiling>,
    configured: Budget,
    pace: Mutex<Pace>,
}

/// The key's rate as the server's refusals have set it.
#[derive(Debug)]
struct Pace {
    /// Requests per second now, at most the configured rate.
    rate: f64,
    /// When the rate was last cut: a refusal of a request admitted before it is the same
    /// signal (it was in flight when the server said no).
    cut_at: Option<Instant>,
    /// The rate the server last refused a request at.
    refused_at: Option<f64>,
    /// Whether a request was answered since the last cut.
    answered_since_cut: bool,
}

/// A request's place in flight: the key's and the ceiling's slots, released on drop.
pub struct Slot<'a> {
    _key: SemaphorePermit<'a>,
    _ceiling: SemaphorePermit<'a>,
    /// When both buckets admitted it.
    pub admitted: Instant,
}

impl KeyBudget {
    pub fn new(budget: &Budget, what: &str, ceiling: Arc<Ceiling>) -> anyhow::Result<KeyBudget> {
        Ok(KeyBudget {
            bucket: Mutex::new(Bucket::new(budget, what)?),
            in_flight: Semaphore::new(budget.max_in_flight.get()),
            ceiling,
            configured: *budget,
            pace: Mutex::new(Pace {
                rate: budget.requests_per_second,
                cut_at: None,
                refused_at: None,
                answered_since_cut: true,
            }),
        })
    }

    /// The key's rate now, in requests per second: the configured one unless refusals
    /// brought it down.
    pub fn rate(&self) -> f64 {
        self.pace.lock().expect("pace lock").rate
    }

    /// The server refused (429) a request admitted at `admitted`: unless it was sent before
    /// the last cut, or nothing was answered since, the rate comes down by a quarter (never
    /// below [`LOWEST`] of the configured one) and bursts stop. Returns the new rate when it
    /// was cut.
    pub fn refused(&self, admitted: Instant) -> Option<f64> {
        let mut pace = self.pace.lock().expect("pace lock");
        if pace.cut_at.is_some_and(|cut| admitted < cut) || !pace.answered_since_cut {
            return None;
        }
        pace.answered_since_cut = false;
        let lowest = self.configured.requests_per_second * LOWEST;
        pace.refused_at = Some(pace.rate);
        pace.rate = (pace.rate * SLOW_DOWN).max(lowest);
        pace.cut_at = Some(Instant::now());
        self.set_pace(pace.rate, false);
        Some(pace.rate)
    }

    /// The server answered a request: a rate a refusal lowered goes back up ([`RECOVER`],
    /// [`PROBE`]), and bursts are allowed again once it is back at the configured rate. Returns
    /// the new rate when it changed.
    pub fn answered(&self) -> Option<f64> {
        let mut pace = self.pace.lock().expect("pace lock");
        pace.answered_since_cut = true;
        let configured = self.configured.requests_per_second;
        if pace.rate >= configured {
            return None;
        }
        let refused_at = pace.refused_at.unwrap_or(configured).min(configured);
        let step = if pace.rate < refused_at * NEAR {
            RECOVER
        } else {
            PROBE
        };
        pace.rate = (pace.rate * step).min(configured);
        self.set_pace(pace.rate, pace.rate >= configured);
        Some(pace.rate)
    }

    fn set_pace(&self, rate: f64, bursts: bool) {
        let mut bucket = self.bucket.lock().expect("bucket lock");
        if let Some(interval) = period(rate) {
            bucket.interval = interval;
        }
        bucket.tolerance = if bursts {
            bucket.interval.saturating_mul(self.configured.burst.get() - 1)
        } else {
            Duration::ZERO
        };
    }

    /// Waits for an in-flight slot of the key, then of the ceiling, then for the instant both
    /// rate buckets admit a request, and charges both. Returns the slot and how long the rate
    /// wait took.
    pub async fn admit(&self) -> (Slot<'_>, Duration) {
        let key = self
            .in_flight
            .acquire()
            .await
            .expect("the key's semaphore is never closed");
        let started = Instant::now();
        // Wait for the key's own bucket before taking a slot of the ceiling, so that a key
        // paced slower than the others does not sit on the ceiling's slots while it waits.
        loop {
            let at = self.bucket.lock().expect("bucket lock").earliest();
            if at <= Instant::now() {
                break;
            }
            tokio::time::sleep_until(at).await;
        }
        let ceiling = self
            .ceiling
            .in_flight
            .acquire()
            .await
            .expect("the ceiling's semaphore is never closed");
        loop {
            let wake = {
                // Always the key's lock first, then the ceiling's: no two orders, no deadlock.
                let mut own = self.bucket.lock().expect("bucket lock");
                let mut all = self.ceiling.bucket.lock().expect("ceiling lock");
                let now = Instant::now();
                let at = own.earliest().max(all.earliest());
                if at <= now {
                    own.charge(now);
                    all.charge(now);
                    None
                } else {
                    Some(at)
                }
            };
            match wake {
                None => break,
                Some(at) => tokio::time::sleep_until(at).await,
            }
        }
        (
            Slot {
                _key: key,
                _ceiling: ceiling,
                admitted: Instant::now(),
            },
            started.elapsed(),
        )
    }
}

#[cfg(test)]
mod tests {
    use std::num::{NonZeroU32, NonZeroUsize};

    use super::*;

    fn budget(rps: f64, burst: u32, in_flight: usize) -> Budget {
        Budget {
            requests_per_second: rps,
            burst: NonZeroU32::new(burst).unwrap(),
            max_in_flight: NonZeroUsize::new(in_flight).unwrap(),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn refusals_lower_the_rate_once_per_signal_and_answers_bring_it_back() {
        let ceiling = Ceiling::new(&budget(100.0, 10, 8)).unwrap();
        let key = KeyBudget::new(&budget(40.0, 5, 4), "k.", ceiling).unwrap();
        let (first, _) = key.admit().await;
        let (second, _) = key.admit().await;
        let (sent_before, sent_after) = (first.admitted, second.admitted);
        drop((first, second));
        tokio::time::advance(Duration::from_millis(10)).await;
        assert_eq!(key.refused(sent_before), Some(30.0));
        // In flight when the server said no: the same signal.
        assert_eq!(key.refused(sent_after), None);
        assert_eq!(key.rate(), 30.0);
        // Refused again with nothing answered since (a window that refuses everything): the
        // same signal too.
        let (late, _) = key.admit().await;
        let refused_late = late.admitted;
        drop(late);
        assert_eq!(key.refused(refused_late), None);
        key.answered();
        assert!((key.rate() - 30.6).abs() < 1e-9, "{}", key.rate());
        // No burst while lowered: two requests in a row are a period apart.
        let (a, _) = key.admit().await;
        let (b, _) = key.admit().await;
        assert!(
            b.admitted - a.admitted >= Duration::from_micros(33_333),
            "{:?}",
            b.admitted - a.admitted
        );
        let refused_again = b.admitted;
        drop((a, b));
        assert!((key.refused(refused_again).unwrap() - 22.95).abs() < 1e-9);
        // Quickly back to 90 % of the rate refused last (30.6), then slowly.
        let mut answers = 0;
        while key.rate() < 27.54 {
            key.answered();
            answers += 1;
        }
        assert!((10..=20).contains(&answers), "{answers} answers to recover");
        let mut probing = 0;
        while key.rate() < 40.0 {
            key.answered();
            probing += 1;
        }
        assert!(
            probing > 300,
            "only {probing} answers from 27 to 40 requests a second"
        );
        assert_eq!(key.answered(), None, "the configured rate is the ceiling");
        // Back at the configured rate, bursts are allowed again.
        tokio::time::advance(Duration::from_secs(1)).await;
        let (a, _) = key.admit().await;
        let (b, _) = key.admit().await;
        assert_eq!(a.admitted, b.admitted);
    }

    #[tokio::test(start_paused = true)]
    async fn a_key_gets_its_burst_then_its_rate_and_the_ceiling_caps_two_keys_together() {
        let ceiling = Ceiling::new(&budget(10.0, 2, 8)).unwrap();
        let a = Arc::new(KeyBudget::new(&budget(8.0, 2, 4), "a.", ceiling.clone()).unwrap());
        let b = Arc::new(KeyBudget::new(&budget(8.0, 2, 4), "b.", ceiling).unwrap());
        let start = Instant::now();
        let mut tasks = Vec::new();
        for key in [a, b] {
            tasks.push(tokio::spawn(async move {
                let mut at = Vec::new();
                for _ in 0..20 {
                    let (_slot, _) = key.admit().await;
                    at.push(Instant::now() - start);
                }
                at
            }));
        }
        let mut all = Vec::new();
        let mut per_key = Vec::new();
        for t in tasks {
            let at = t.await.unwrap();
            all.extend(at.iter().copied());
            per_key.push(at);
        }
        all.sort();
        // In any one second: at most rate + burst, for each key and for both together.
        let max_in_a_second = |times: &[Duration]| {
            times
                .iter()
                .map(|&t0| {
                    times
                        .iter()
                        .filter(|&&t| t >= t0 && t < t0 + Duration::from_secs(1))
                        .count()
                })
                .max()
                .unwrap()
        };
        assert!(max_in_a_second(&all) <= 12, "{all:?}");
        for at in &per_key {
            assert!(max_in_a_second(at) <= 10, "{at:?}");
        }
        // Both keys made progress: the ceiling is shared, not taken by one.
        assert!(per_key.iter().all(|at| at.len() == 20));
    }
}
