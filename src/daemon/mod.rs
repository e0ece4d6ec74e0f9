//! `charthero-sync run`: the daemon. [`serve`] is its one entry point: it opens the warehouse,
//! queues a backfill if asked, serves metrics if configured, and runs [`run`], the loop: a sync
//! at start and then on the cron schedule, one cycle at a time; queued backfills, then the
//! history audit when it is due, between live cycles in slices that end before the next live
//! cycle is due, so the live sync is never starved. It tells systemd it is ready, alive
//! (watchdog, only while the loop makes progress) and stopping, and stops at a unit boundary
//! once its shutdown token is cancelled. Only start-up errors, a refused key and a corrupt
//! warehouse end it; a failed cycle (a full disk or a busy database included) is recorded and
//! retried with capped, jittered backoff. Signals, the writer lock and the process belong to the
//! caller (`main.rs`).

pub mod lock;
pub mod notify;

use std::time::Duration;

use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::secret::ApiKey;
use crate::store::StoreError;
use crate::sync::{BackfillRange, CycleError, CyclePlan, SyncContext};
use crate::timefmt::format_utc;
use notify::Notifier;

/// A backfill or audit slice runs at most this long (and never past the next live cycle's
/// time) before the live sync gets a turn.
const SLICE: Duration = Duration::from_secs(60);

/// How often an idle daemon looks for queued backfills.
const QUEUE_POLL: Duration = Duration::from_secs(2);

/// Backoff after failed cycles: 30 s doubling up to 15 min (never later than the next fire).
const FAILURE_BACKOFF_BASE: Duration = Duration::from_secs(30);
const FAILURE_BACKOFF_CAP: Duration = Duration::from_secs(15 * 60);

/// The next fire time of `schedule` strictly after `now`. Computed from the present every
/// time, so a suspended machine runs once when it wakes instead of replaying missed fires.
pub fn next_fire(schedule: &cron::Schedule, now: OffsetDateTime) -> Option<OffsetDateTime> {
    let now_chrono = chrono::DateTime::<chrono::Utc>::from_timestamp(now.unix_timestamp(), now.nanosecond())?;
    let next = schedule.after(&now_chrono).next()?;
    Some(crate::timefmt::from_unix_nanos(next.timestamp_nanos_opt()?))
}

fn failure_backoff(failures: u32) -> Duration {
    let exp = FAILURE_BACKOFF_BASE.saturating_mul(1 << failures.saturating_sub(1).min(10));
    let ceiling = exp.min(FAILURE_BACKOFF_CAP);
    // Jitter between half and all of the ceiling: spread out, but never hammering.
    Duration::try_from_secs_f64(ceiling.as_secs_f64() * (0.5 + fastrand::f64() / 2.0)).unwrap_or(ceiling)
}

/// The daemon, wired: opens (and migrates) the warehouse, queues `backfill` if given, serves
/// Prometheus metrics on `metrics.listen` if configured, and runs the loop until `shutdown` is
/// cancelled. The caller holds the writer lock and turns signals into `shutdown`.
pub async fn serve(
    config: &Config,
    key: &ApiKey,
    backfill: Option<BackfillRange>,
    notifier: &Notifier,
    shutdown: &CancellationToken,
) -> Result<(), CycleError> {
    let ctx = crate::connect(config, key).await?;
    if let Some(r) = backfill {
        let id = ctx
            .writer
            .call(move |c| crate::store::queue_backfill(c, r.start, r.end, "run", OffsetDateTime::now_utc()))
            .await?;
        tracing::info!(backfill_id = id, "backfill queued");
    }
    if let Some(addr) = config.metrics_listen {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on metrics.listen {addr}: {e}"))?;
        tracing::info!(%addr, "serving Prometheus metrics at /metrics");
        tokio::spawn(crate::metrics::serve(
            listener,
            ctx.client.metrics().clone(),
            shutdown.clone(),
        ));
    }
    run(&ctx, &config.sync.schedule, shutdown, notifier).await
}

/// Runs until `shutdown` is cancelled. `Err` only for what must end the daemon: a refused key
/// (401) or a corrupt warehouse (`StoreError::is_fatal`).
pub async fn run(
    ctx: &SyncContext,
    schedule: &cron::Schedule,
    shutdown: &CancellationToken,
    notifier: &Notifier,
) -> Result<(), CycleError> {
    notifier.ready("started; first cycle running");
    let mut next_live = OffsetDateTime::now_utc();
    let mut failures = 0u32;
    let tick = notifier
        .watchdog()
        .map_or(QUEUE_POLL, |w| (w / 3).min(QUEUE_POLL));
    loop {
        if shutdown.is_cancelled() {
            break;
        }
        let now = OffsetDateTime::now_utc();
        let live = now >= next_live;
        let (backfill, audit) = match queued_work(ctx, live, now).await {
            Ok(work) => work,
            Err(e) if is_fatal(&e) => return Err(stop_for(e, notifier)),
            Err(e) => {
                // Like a failed cycle: a busy or full database is retried with backoff.
                failures += 1;
                tracing::error!(
                    failures,
                    reason_code = e.reason_code().unwrap_or("none"),
                    "cannot read the backfill queue or the audit schedule: {e:#}"
                );
                notifier.status("cannot read the warehouse; retrying");
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = tokio::time::sleep(failure_backoff(failures)) => continue,
                }
            }
        };
        if !live && backfill.is_none() && !audit {
            notifier.watchdog_ping();
            let wait = ((next_live - now).unsigned_abs()).min(tick);
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = tokio::time::sleep(wait) => continue,
            }
        }
        // A slice after the live part ends before the next live cycle is due.
        let until_next_live = if live {
            SLICE
        } else {
            (next_live - now).unsigned_abs().min(SLICE)
        };
        let plan = CyclePlan {
            live,
            backfill,
            audit,
            budget: Some(until_next_live),
            // The loop itself takes the queue one slice at a time, between live cycles.
            queued_backfills: false,
        };
        notifier.status(match (live, backfill.is_some()) {
            (true, _) => "syncing",
            (false, true) => "backfilling",
            (false, false) => "auditing history",
        });
        let result = with_watchdog(
            ctx,
            notifier,
            tick,
            crate::sync::run_cycle(ctx, "run", plan, shutdown),
        )
        .await;
        let now = OffsetDateTime::now_utc();
        match result {
            Ok(report) => {
                failures = 0;
                if live {
                    next_live = next_fire(schedule, now).unwrap_or(now + Duration::from_secs(300));
                }
                notifier.status(&format!(
                    "idle; complete through {}; next cycle {}",
                    report.complete_through.map_or_else(|| "-".to_owned(), format_utc),
                    format_utc(next_live)
                ));
            }
            Err(CycleError::Cancelled) => break,
            Err(CycleError::Api(e)) if e.is_auth() => {
                notifier.stopping();
                return Err(CycleError::Api(e));
            }
            Err(e) if is_fatal(&e) => return Err(stop_for(e, notifier)),
            Err(e) => {
                failures += 1;
                let retry_at = now + failure_backoff(failures);
                let scheduled = next_fire(schedule, now).unwrap_or(retry_at);
                next_live = retry_at.min(scheduled);
                tracing::error!(
                    failures,
                    reason_code = e.reason_code().unwrap_or("none"),
                    next_attempt = %format_utc(next_live),
                    "cycle failed: {e:#}"
                );
                notifier.status(&format!(
                    "last cycle failed; next attempt {}",
                    format_utc(next_live)
                ));
                if (backfill.is_some() || audit) && !live {
                    // Do not spin on a failing backfill or audit between live cycles.
                    tokio::select! {
                        () = shutdown.cancelled() => break,
                        () = tokio::time::sleep(failure_backoff(failures)) => {}
                    }
                }
            }
        }
    }
    notifier.stopping();
    Ok(())
}

/// What the loop works when no live cycle is due: the oldest queued backfill, else the history
/// audit if it is due.
async fn queued_work(
    ctx: &SyncContext,
    live: bool,
    now: OffsetDateTime,
) -> Result<(Option<BackfillRange>, bool), CycleError> {
    let backfill = ctx
        .writer
        .call(|c| crate::store::next_backfill(c))
        .await?
        .map(|(start, end)| BackfillRange { start, end });
    // Bounded by config (at most ten years), so the conversion and the sum cannot overflow.
    let audit_every = time::Duration::try_from(ctx.sync.audit_every).unwrap_or(time::Duration::ZERO);
    // The audit works between live cycles only, after queued backfills.
    let audit = !live
        && backfill.is_none()
        && !ctx.sync.audit_every.is_zero()
        && ctx
            .writer
            .call(move |c| crate::store::audit_due(c, audit_every, now))
            .await?;
    Ok((backfill, audit))
}

/// A corrupt warehouse ends the daemon (exit `STORE_CORRUPT`): every further write risks
/// spreading the damage, and a restart cannot repair it. Busy, full or unwritable is retried.
fn is_fatal(e: &CycleError) -> bool {
    e.store_error().is_some_and(StoreError::is_fatal)
}

/// Logs why the daemon stops and tells systemd, then hands the error back for the exit code.
fn stop_for(e: CycleError, notifier: &Notifier) -> CycleError {
    tracing::error!(reason_code = e.reason_code().unwrap_or("none"), "stopping: {e:#}");
    notifier.stopping();
    e
}

/// Drives `cycle` while pinging the systemd watchdog, but only while requests keep completing:
/// a wedged cycle stops the pings and systemd restarts the service.
async fn with_watchdog<T>(
    ctx: &SyncContext,
    notifier: &Notifier,
    tick: Duration,
    cycle: impl std::future::Future<Output = T>,
) -> T {
    let Some(watchdog) = notifier.watchdog() else {
        return cycle.await;
    };
    tokio::pin!(cycle);
    let mut interval = tokio::time::interval(tick);
    loop {
        tokio::select! {
            out = &mut cycle => return out,
            _ = interval.tick() => {
                if ctx.client.idle_for() < watchdog / 2 {
                    notifier.watchdog_ping();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;
    use time::macros::datetime;

    #[test]
    fn the_next_fire_is_strictly_after_now_and_never_a_missed_one() {
        let every_five = cron::Schedule::from_str("0 */5 * * * *").unwrap();
        let now = datetime!(2026-11-22 10:07:30 UTC);
        assert_eq!(
            next_fire(&every_five, now),
            Some(datetime!(2026-11-22 10:10:00 UTC))
        );
        let on_the_dot = datetime!(2026-11-22 10:10:00 UTC);
        assert_eq!(
            next_fire(&every_five, on_the_dot),
            Some(datetime!(2026-11-22 10:15:00 UTC))
        );
        // After a three-hour suspend the next fire is computed from the wake-up time.
        let woke = datetime!(2026-11-22 13:11:00 UTC);
        assert_eq!(
            next_fire(&every_five, woke),
            Some(datetime!(2026-11-22 13:15:00 UTC))
        );
    }

    #[test]
    fn failure_backoff_grows_and_stays_capped() {
        for failures in 1..20 {
            let d = failure_backoff(failures);
            let ceiling = FAILURE_BACKOFF_BASE
                .saturating_mul(1 << (failures - 1).min(10))
                .min(FAILURE_BACKOFF_CAP);
            assert!(d >= ceiling / 2 && d <= ceiling, "{failures}: {d:?}");
        }
    }
}
