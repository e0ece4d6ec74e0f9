//! `charthero-sync run`: the daemon. [`serve_organizations`] is its one entry point: it opens
//! the warehouse, queues a backfill if asked, serves metrics if configured, and runs [`run`]: one
//! loop per organization, side by side — a sync at start and then on the cron schedule, one
//! cycle at a time; queued backfills, then the history audit when it is due, between live cycles
//! in slices that end before the next live cycle is due, so the live sync is never starved, and
//! one organization's work never holds up another's. It tells systemd it is ready, alive
//! (watchdog, only while every organization's cycle makes progress) and stopping, and stops at a
//! unit boundary once its shutdown token is cancelled. Only start-up errors, a corrupt warehouse
//! and every organization stopped (its key refused, or its IDs colliding with another clinic's)
//! end it (one stopped organization stops alone); a
//! failed cycle (a full disk or a busy database included) is recorded and retried with capped,
//! jittered backoff. Signals, the writer lock and the process belong to the caller (`main.rs`).

pub mod lock;
pub mod notify;

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

use tracing::Instrument;

use crate::config::{Config, Organization};
use crate::secret::{ApiKey, WebhookSecret};
use crate::store::StoreError;
use crate::sync::{BackfillRange, CycleError, CyclePlan, SyncContext};
use crate::timefmt::format_utc;
use notify::Notifier;

/// A backfill or audit slice runs at most this long (and never past the next live cycle's
/// time) before the live sync gets a turn.
const SLICE: Duration = Duration::from_secs(60);

/// How long a woken loop gathers further webhook deliveries before its cycle starts.
const WEBHOOK_GATHER: Duration = Duration::from_secs(1);

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

/// The daemon of a configuration's first organization (a configuration without
/// `[[organizations]]` has exactly one): see [`serve_organizations`].
pub async fn serve(
    config: &Config,
    key: &ApiKey,
    backfill: Option<BackfillRange>,
    notifier: &Notifier,
    shutdown: &CancellationToken,
) -> Result<(), CycleError> {
    let keys = vec![(config.organizations[0].clone(), key.clone())];
    serve_organizations(config, keys, Vec::new(), backfill, notifier, shutdown).await
}

/// The daemon, wired: opens (and migrates) the warehouse, queues `backfill` for every
/// organization if given, serves Prometheus metrics (labelled by organization) on
/// `metrics.listen` and receives webhook deliveries on `webhook.listen` if configured (with
/// `webhook_secrets`, one per organization of `keys` in that order: see
/// [`crate::config::load_webhook_secret`]), and runs every organization's loop until
/// `shutdown` is cancelled. The caller holds the writer lock and turns signals into `shutdown`.
pub async fn serve_organizations(
    config: &Config,
    keys: Vec<(Organization, ApiKey)>,
    webhook_secrets: Vec<WebhookSecret>,
    backfill: Option<BackfillRange>,
    notifier: &Notifier,
    shutdown: &CancellationToken,
) -> Result<(), CycleError> {
    let contexts = std::sync::Arc::new(crate::connect_organizations(config, keys).await?);
    if let Some(r) = backfill {
        for ctx in contexts.iter() {
            let org = ctx.org.name.clone();
            let id = ctx
                .writer
                .call(move |c| c.queue_backfill(&org, r.start, r.end, "run", OffsetDateTime::now_utc()))
                .await?;
            tracing::info!(organization = %ctx.org.name, backfill_id = id, "backfill queued");
        }
    }
    if let Some(addr) = config.metrics_listen {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on metrics.listen {addr}: {e}"))?;
        tracing::info!(%addr, "serving Prometheus metrics at /metrics");
        let labelled = contexts
            .iter()
            .map(|c| (c.org.name.to_string(), c.client.metrics().clone()))
            .collect();
        tokio::spawn(crate::metrics::serve(listener, labelled, shutdown.clone()));
    }
    if let Some(addr) = config.webhook_listen {
        if webhook_secrets.len() != contexts.len() {
            return Err(anyhow::anyhow!(
                "webhook.listen is set, but not every organization has its signing secret"
            )
            .into());
        }
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on webhook.listen {addr}: {e}"))?;
        tracing::info!(%addr, path = crate::webhook::PATH, "receiving ChartHero webhook deliveries");
        tokio::spawn(crate::webhook::serve(
            listener,
            contexts.clone(),
            webhook_secrets,
            config.organizations.len() == 1,
            shutdown.clone(),
        ));
    }
    run(&contexts, &config.sync.schedule, shutdown, notifier).await
}

/// Runs every organization's loop side by side until `shutdown` is cancelled: one organization's
/// backfill, failure or refused key never holds up another's live cycles. An organization whose
/// key is refused (401, or a key that reads another clinic) or whose IDs collide with another
/// clinic's ([`CycleError::stops_organization`]) stops alone, named in the log and in `status`;
/// the others go on. `Err` only for what must end the daemon: a corrupt warehouse
/// (`StoreError::is_fatal`, which stops every organization), or every organization stopped.
pub async fn run(
    contexts: &[SyncContext],
    schedule: &cron::Schedule,
    shutdown: &CancellationToken,
    notifier: &Notifier,
) -> Result<(), CycleError> {
    notifier.ready("started; first cycle running");
    let stop_all = shutdown.child_token();
    // Which organizations are inside a cycle: the watchdog is fed only while every one of them
    // makes progress, so one wedged organization is not hidden by the others' idle loops.
    let busy: Vec<AtomicBool> = contexts.iter().map(|_| AtomicBool::new(false)).collect();
    let loops = contexts.iter().zip(&busy).map(|(ctx, busy)| {
        let stop_all = &stop_all;
        // At the error level, so that its organization shows on every line that is logged
        // at all, whatever level an operator filters at (`RUST_LOG=warn` included).
        let span = tracing::error_span!("organization", organization = %ctx.org.name);
        async move {
            let result = run_organization(ctx, schedule, stop_all, notifier, busy).await;
            if let Err(e) = &result {
                tracing::error!(reason_code = e.reason_code().unwrap_or("none"), "stopping: {e:#}");
                if e.stops_organization() {
                    ctx.client
                        .metrics()
                        .record_stopped(e.reason_code().unwrap_or("key_refused"));
                }
                if is_fatal(e) {
                    stop_all.cancel();
                }
            }
            result
        }
        .instrument(span)
    });
    let watchdog = async {
        let Some(limit) = notifier.watchdog() else {
            return std::future::pending().await;
        };
        let mut interval = tokio::time::interval((limit / 3).min(QUEUE_POLL));
        loop {
            interval.tick().await;
            let progressing = contexts
                .iter()
                .zip(&busy)
                .all(|(ctx, busy)| !busy.load(Ordering::Relaxed) || ctx.client.idle_for() < limit / 2);
            if progressing {
                notifier.watchdog_ping();
            }
        }
    };
    let results = tokio::select! {
        results = futures_util::future::join_all(loops) => results,
        never = watchdog => never,
    };
    notifier.stopping();
    let mut errors: Vec<CycleError> = results.into_iter().filter_map(Result::err).collect();
    if let Some(i) = errors.iter().position(is_fatal) {
        return Err(errors.swap_remove(i));
    }
    if errors.len() == contexts.len() && !errors.is_empty() {
        return Err(errors.swap_remove(0));
    }
    Ok(())
}

/// One organization's loop: a live cycle at start and then on the schedule, its queued
/// backfills and audits in slices between them. Returns when `shutdown` is cancelled, or with
/// the error that stops this organization: its key refused, its IDs colliding with another
/// clinic's, or a corrupt warehouse.
async fn run_organization(
    ctx: &SyncContext,
    schedule: &cron::Schedule,
    shutdown: &CancellationToken,
    notifier: &Notifier,
    busy: &AtomicBool,
) -> Result<(), CycleError> {
    let status = |what: &str| {
        if ctx.org.name.as_ref() == crate::config::DEFAULT_ORGANIZATION {
            notifier.status(what);
        } else {
            notifier.status(&format!("{}: {what}", ctx.org.name));
        }
    };
    let mut next_live = OffsetDateTime::now_utc();
    let mut failures = 0u32;
    // An event the webhook endpoint stored: a cycle handles it now, between live cycles.
    let mut webhook_due = false;
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
            Err(e) if is_fatal(&e) => return Err(e),
            Err(e) => {
                // Like a failed cycle: a busy or full database is retried with backoff.
                failures += 1;
                tracing::error!(
                    failures,
                    reason_code = e.reason_code().unwrap_or("none"),
                    "cannot read the backfill queue or the audit schedule: {e:#}"
                );
                status("cannot read the warehouse; retrying");
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = tokio::time::sleep(failure_backoff(failures)) => continue,
                }
            }
        };
        // A failing organization waits for its backoff (the next live cycle handles the events),
        // so does one whose clinic is not known yet (its key lists nothing yet); a wake-up
        // whose events a running cycle already handled starts nothing.
        if webhook_due && (failures > 0 || ctx.org.id().is_none() || !webhook_pending(ctx).await) {
            webhook_due = false;
        }
        if !live && backfill.is_none() && !audit && !webhook_due {
            let wait = ((next_live - now).unsigned_abs()).min(tick);
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = tokio::time::sleep(wait) => continue,
                () = ctx.webhook_events.notified() => {
                    // Deliveries come in bursts (a clinic's morning): one cycle for the burst.
                    tokio::select! {
                        () = shutdown.cancelled() => break,
                        () = tokio::time::sleep(WEBHOOK_GATHER) => {}
                    }
                    webhook_due = true;
                    continue;
                }
            }
        }
        // Every cycle handles the stored events first; this one may do nothing else.
        webhook_due = false;
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
            refresh_content: false,
        };
        let (trigger, doing) = match (live, backfill.is_some(), audit) {
            (true, _, _) => ("run", "syncing"),
            (false, true, _) => ("run", "backfilling"),
            (false, false, true) => ("run", "auditing history"),
            (false, false, false) => ("webhook", "fetching what webhook events point to"),
        };
        status(doing);
        busy.store(true, Ordering::Relaxed);
        let result = crate::sync::run_cycle(ctx, trigger, plan, shutdown).await;
        busy.store(false, Ordering::Relaxed);
        let now = OffsetDateTime::now_utc();
        match result {
            Ok(report) => {
                failures = 0;
                if live {
                    next_live = next_fire(schedule, now).unwrap_or(now + Duration::from_secs(300));
                }
                status(&format!(
                    "idle; complete through {}; next cycle {}",
                    report.complete_through.map_or_else(|| "-".to_owned(), format_utc),
                    format_utc(next_live)
                ));
            }
            Err(CycleError::Cancelled) => break,
            Err(e) if e.stops_organization() => return Err(e),
            Err(e) if is_fatal(&e) => return Err(e),
            Err(CycleError::Api(e)) if e.is_paused() => {
                // ChartHero asked for no requests until then (a `Retry-After` longer than a
                // request waits): nothing is sent before it, so no cycle starts before it
                // either — one line, not a failed cycle at every tick of the schedule. (A pause
                // over by now leaves nothing to wait for.)
                let until = ctx.client.paused_until().unwrap_or(now);
                next_live = until;
                tracing::warn!(
                    paused_until = %format_utc(until),
                    "{e}; the next cycle starts then"
                );
                status(&format!(
                    "paused by ChartHero (Retry-After) until {}",
                    format_utc(until)
                ));
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = tokio::time::sleep((until - now).max(time::Duration::ZERO).unsigned_abs()) => {}
                }
            }
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
                status(&format!(
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
    Ok(())
}

/// Whether the organization's webhook endpoint stored events no cycle has handled yet (a
/// warehouse that cannot be read says no: the next live cycle reads it again).
async fn webhook_pending(ctx: &SyncContext) -> bool {
    let org = ctx.org.name.clone();
    ctx.writer
        .call(move |c| c.pending_webhook_events(&org, 1))
        .await
        .is_ok_and(|events| !events.is_empty())
}

/// What the loop works when no live cycle is due: the oldest queued backfill, else the history
/// audit if it is due.
async fn queued_work(
    ctx: &SyncContext,
    live: bool,
    now: OffsetDateTime,
) -> Result<(Option<BackfillRange>, bool), CycleError> {
    let org = ctx.org.name.clone();
    let backfill = ctx
        .writer
        .call(move |c| c.next_backfill(&org))
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
            .call({
                let org = ctx.org.name.clone();
                move |c| c.audit_due(&org, audit_every, now)
            })
            .await?;
    Ok((backfill, audit))
}

/// A corrupt warehouse ends the daemon (exit `STORE_CORRUPT`): every further write risks
/// spreading the damage, and a restart cannot repair it. So does a lost writer lock (exit 1:
/// another process may write now; the service manager's restart waits for the lock). Busy,
/// full, unwritable or an unavailable server is retried.
fn is_fatal(e: &CycleError) -> bool {
    e.store_error().is_some_and(StoreError::is_fatal)
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
