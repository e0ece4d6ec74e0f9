//! Bookkeeping for injected faults and the rate limit: which rule fires for a request, and
//! whether a request breaks the trailing one-second window (less [`ARRIVAL_JITTER_TOLERANCE`]).
//!
//! This module only decides; the server carries the decision out (answers, delays, hangs or drops
//! the connection). Time comes from the caller, so paused-clock tests behave.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

use crate::model::{Fault, FaultRule, RateLimit, Route};

struct ActiveRule {
    rule: FaultRule,
    skipped: u64,
    applied: u64,
}

/// Pending fault rules in push order.
#[derive(Default)]
pub(crate) struct FaultBook {
    rules: Vec<ActiveRule>,
}

impl FaultBook {
    pub(crate) fn push(&mut self, rule: FaultRule) {
        self.rules.push(ActiveRule {
            rule,
            skipped: 0,
            applied: 0,
        });
    }

    pub(crate) fn clear(&mut self) {
        self.rules.clear();
    }

    /// The fault to apply to a request on `route` (`None` for an unroutable API path), if any.
    /// See [`FaultRule`] for the matching semantics.
    pub(crate) fn next(&mut self, route: Option<Route>) -> Option<Fault> {
        let mut fired = None;
        for (at, active) in self.rules.iter_mut().enumerate() {
            if active.rule.route.is_some() && active.rule.route != route {
                continue;
            }
            if active.skipped < active.rule.skip {
                active.skipped += 1;
                continue;
            }
            if active.applied < active.rule.times {
                active.applied += 1;
                fired = Some((at, active.rule.fault.clone()));
                break;
            }
        }
        let (at, fault) = fired?;
        if self.rules[at].applied >= self.rules[at].rule.times {
            self.rules.remove(at);
        }
        Some(fault)
    }
}

/// Verdict on one arriving request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RateVerdict {
    Within,
    /// Over the limit; `enforce` says whether to answer 429.
    Violation {
        enforce: bool,
    },
}

/// Arrival times inside the trailing one-second window, kept only while a limit is set.
#[derive(Default)]
pub(crate) struct RateWindow {
    limit: Option<RateLimit>,
    arrivals: VecDeque<Instant>,
}

const WINDOW: Duration = Duration::from_secs(1);

/// How unevenly a client's requests may be delayed between its sending them and the server
/// counting them. A client that keeps to the limit when it sends cannot keep its requests'
/// spacing on the way: the first requests of a burst wait for new connections while later ones
/// reuse them, and either side's scheduler may hold a request back, so arrivals bunch closer
/// than the sends, and a paced client's second can reach the server in less than a second.
/// Measured under load with the charthero-sync client (allowance 108): never more than 106
/// admissions in a second, yet arrivals delayed unevenly by up to 32 ms and 107 of them in a
/// second; a stall of 30 ms at the start of a burst is enough for 109. A violation therefore
/// needs more than the allowance within the trailing second *less this tolerance*: the
/// sliding-window form of the delay-variation tolerance that GCRA rate policers add for the
/// same reason (ITU-T I.371's CDVT). It is short against the window, so bursts beyond the
/// allowance and rates well over the limit are still counted (see the tests).
pub(crate) const ARRIVAL_JITTER_TOLERANCE: Duration = Duration::from_millis(50);

impl RateWindow {
    pub(crate) fn set(&mut self, limit: Option<RateLimit>) {
        self.limit = limit;
        self.arrivals.clear();
    }

    /// Records an arrival at `now`. Every arrival counts toward the window, rejected ones
    /// included, as a server-side limiter sees them.
    pub(crate) fn arrive(&mut self, now: Instant) -> RateVerdict {
        let Some(limit) = self.limit else {
            return RateVerdict::Within;
        };
        while self
            .arrivals
            .front()
            .is_some_and(|&t| now.duration_since(t) >= WINDOW - ARRIVAL_JITTER_TOLERANCE)
        {
            self.arrivals.pop_front();
        }
        self.arrivals.push_back(now);
        let allowed = limit.requests_per_second.max(0.0).ceil() as u64 + u64::from(limit.burst);
        if self.arrivals.len() as u64 > allowed {
            RateVerdict::Violation {
                enforce: limit.enforce,
            }
        } else {
            RateVerdict::Within
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_skip_then_fire_then_expire() {
        let mut book = FaultBook::default();
        book.push(FaultRule {
            route: Some(Route::List),
            skip: 1,
            times: 2,
            fault: Fault::Hang,
        });
        assert_eq!(book.next(Some(Route::Encounter)), None);
        assert_eq!(book.next(Some(Route::List)), None);
        assert_eq!(book.next(Some(Route::List)), Some(Fault::Hang));
        assert_eq!(book.next(Some(Route::List)), Some(Fault::Hang));
        assert_eq!(book.next(Some(Route::List)), None);
    }

    #[test]
    fn first_active_rule_wins_and_any_route_rules_match_everything() {
        let mut book = FaultBook::default();
        book.push(FaultRule::once(None, Fault::HtmlStatus(502)));
        book.push(FaultRule::once(Some(Route::Audio), Fault::DropBeforeResponse));
        assert_eq!(book.next(Some(Route::Audio)), Some(Fault::HtmlStatus(502)));
        assert_eq!(book.next(Some(Route::Audio)), Some(Fault::DropBeforeResponse));
        assert_eq!(book.next(None), None);
    }

    #[test]
    fn rate_window_counts_requests_beyond_rate_plus_burst_within_one_second() {
        let mut window = RateWindow::default();
        window.set(Some(RateLimit {
            requests_per_second: 2.5,
            burst: 1,
            enforce: true,
        }));
        let t0 = Instant::now();
        for i in 0..4 {
            assert_eq!(window.arrive(t0 + Duration::from_millis(i)), RateVerdict::Within);
        }
        assert_eq!(
            window.arrive(t0 + Duration::from_millis(500)),
            RateVerdict::Violation { enforce: true }
        );
        // One second after the first arrivals, the window has room again.
        assert_eq!(
            window.arrive(t0 + Duration::from_millis(1_003)),
            RateVerdict::Within
        );
    }

    /// The host ceiling of the three-clinic integration test: 100 requests per second, burst 8.
    fn ceiling() -> RateWindow {
        let mut window = RateWindow::default();
        window.set(Some(RateLimit {
            requests_per_second: 100.0,
            burst: 8,
            enforce: false,
        }));
        window
    }

    /// How many of `arrivals` (offsets from one instant, in any order) the window counts.
    fn violations(mut window: RateWindow, arrivals: impl IntoIterator<Item = Duration>) -> usize {
        let t0 = Instant::now();
        let mut arrivals: Vec<Duration> = arrivals.into_iter().collect();
        arrivals.sort();
        arrivals
            .into_iter()
            .filter(|&at| window.arrive(t0 + at) != RateVerdict::Within)
            .count()
    }

    /// When a GCRA sender paced at `interval` with `burst` sends its `n`-th request.
    fn paced_send(n: u32, burst: u32, interval: Duration) -> Duration {
        interval * n.saturating_sub(burst - 1)
    }

    #[test]
    fn a_paced_client_whose_first_requests_stall_60_ms_on_the_way_is_not_counted() {
        // The client's pacing (1 % under the limit) and burst; everything it sends in the first
        // 60 ms (new connections, a busy scheduler) arrives at once at 60 ms. Counted over a
        // strict second this would be 4 violations, though no second of sends held more
        // than 107.
        let interval = Duration::from_micros(10_100);
        let stall = Duration::from_millis(60);
        let arrivals = (0..400).map(|n| paced_send(n, 8, interval).max(stall));
        assert_eq!(violations(ceiling(), arrivals), 0);
    }

    #[test]
    fn bursts_of_several_keys_adding_up_past_the_ceiling_are_counted() {
        // Three keys' bursts of 5 on top of the ceiling's 8, all at once, then the ceiling's
        // rate: more than 108 within the first second even with the jitter tolerance.
        let interval = Duration::from_millis(10);
        let arrivals = (0..300).map(|n| paced_send(n, 8 + 3 * 5, interval));
        assert!(violations(ceiling(), arrivals) >= 5);
    }

    #[test]
    fn a_client_over_the_rate_or_over_the_allowance_at_once_is_counted() {
        // Three keys at their own 60 per second with no shared ceiling: 180 per second.
        let arrivals = (0..540).map(|n| Duration::from_micros(5_556) * n);
        assert!(violations(ceiling(), arrivals) > 100);
        // One request more than the allowance, all within a millisecond.
        let arrivals = (0..109).map(|n| Duration::from_micros(9) * n);
        assert_eq!(violations(ceiling(), arrivals), 1);
    }
}
