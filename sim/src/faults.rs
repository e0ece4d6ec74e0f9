//! Bookkeeping for injected faults and the rate limit: which rule fires for a request, and
//! whether a request breaks the trailing one-second window.
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
            .is_some_and(|&t| now.duration_since(t) >= WINDOW)
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
}
