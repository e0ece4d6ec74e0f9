//! What a cycle does with the webhook events its organization's endpoint accepted
//! (`crate::webhook` stores them; docs/operations.md, "Webhooks"): before paging, each pending
//! `recording.transcript_ready` reads its encounter's detail, writes it like any encounter the
//! sync reads (so the stored record is current, and the next listing finds nothing changed to
//! fetch again), and queues the document's transcript for the content worker at once, whatever
//! the summary's status says. An event changes only *when* content is fetched, never what is
//! accepted: the scheduled sync stays the source of truth, so an event lost, refused, failing or
//! pointing at nothing costs at most the wait for the next cycle, and never fails a cycle.

use std::collections::HashSet;

use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

use super::{CycleError, SyncContext, encounter_record, history_start, window};
use crate::api::ErrorClass;
use crate::store::{RunCounts, StoreErrorKind, WebhookEvent, WebhookState};

/// The one event type the sync acts on.
pub const TRANSCRIPT_READY: &str = "recording.transcript_ready";

/// Cycles that may fail to handle an event before it is given up (`failed`).
pub const MAX_ATTEMPTS: u32 = 5;

/// Events read from the warehouse at a time.
const BATCH: usize = 100;

/// How long a handled event is kept (`webhook_events`): long past any redelivery, which the
/// event's id then still recognises; a later one costs nothing if its transcript is current.
pub const KEEP_HANDLED: time::Duration = time::Duration::days(30);

/// Handles every pending event of the organization, oldest first, each at most once per cycle,
/// until `stop`. An event whose handling fails (a request that failed after its retries, a route
/// closed to the key) is counted and left for the next cycle, then given up after
/// [`MAX_ATTEMPTS`]; only what stops the whole cycle anyway (the key refused, a `Retry-After`
/// pause, the warehouse failing, `stop`) is returned as an error.
pub async fn handle_pending(
    ctx: &SyncContext,
    counts: &mut RunCounts,
    stop: &CancellationToken,
) -> Result<(), CycleError> {
    let org = ctx.org.name.clone();
    let before = OffsetDateTime::now_utc() - KEEP_HANDLED;
    let mut events = ctx
        .writer
        .call(move |c| {
            let pruned = c.prune_webhook_events(&org, before)?;
            if pruned > 0 {
                tracing::debug!(pruned, "webhook events handled over 30 days ago deleted");
            }
            c.pending_webhook_events(&org, BATCH)
        })
        .await?;
    if events.is_empty() {
        return Ok(());
    }
    if ctx.org.id().is_none() && !ctx.org.verified.load(std::sync::atomic::Ordering::Relaxed) {
        // A first sync: the clinic, which every event is held to, is learnt from one page now
        // rather than after the whole history is listed (once per process: a key that lists
        // nothing yet is not asked again at every cycle).
        super::confirm_clinic(ctx).await?;
    }
    // A key that sees no encounter at all yet: nothing of the events can be there either.
    let Some(organization_id) = ctx.org.id() else {
        return Ok(());
    };
    let mut tried = HashSet::new();
    loop {
        events.retain(|e| !tried.contains(&e.event_id));
        if events.is_empty() {
            return Ok(());
        }
        for event in std::mem::take(&mut events) {
            if stop.is_cancelled() {
                return Err(CycleError::Cancelled);
            }
            tried.insert(event.event_id.clone());
            let org = ctx.org.name.clone();
            let event_id = event.event_id.clone();
            match handle(ctx, &organization_id, &event, counts).await {
                Ok(state) => {
                    tracing::info!(
                        event_id = %event.event_id,
                        event_type = %event.event_type,
                        encounter_id = event.encounter_id.as_deref().unwrap_or("-"),
                        document_id = event.document_id.as_deref().unwrap_or("-"),
                        state = state.as_str(),
                        "webhook event handled"
                    );
                    ctx.writer
                        .call(move |c| {
                            c.settle_webhook_event(&org, &event_id, state, OffsetDateTime::now_utc())
                        })
                        .await?;
                }
                Err(e) if stops_the_cycle(&e) => return Err(e),
                Err(e) => {
                    let given_up = ctx
                        .writer
                        .call(move |c| {
                            c.webhook_event_failed(&org, &event_id, MAX_ATTEMPTS, OffsetDateTime::now_utc())
                        })
                        .await?;
                    tracing::warn!(
                        event_id = %event.event_id,
                        reason_code = e.reason_code().unwrap_or("none"),
                        given_up,
                        "cannot handle a webhook event{}: {e:#}",
                        if given_up {
                            "; given up, the scheduled sync finds what it points to"
                        } else {
                            "; the next cycle tries again"
                        }
                    );
                }
            }
        }
        // The events still pending past those tried (failed ones stay pending), oldest first.
        let org = ctx.org.name.clone();
        let limit = BATCH + tried.len();
        events = ctx
            .writer
            .call(move |c| c.pending_webhook_events(&org, limit))
            .await?;
    }
}

/// What fails the cycle whatever it does next: the key refused or paused, `stop`, or the
/// warehouse failing (`handle` turns a write refused for the event's own record into the
/// event's failure).
fn stops_the_cycle(e: &CycleError) -> bool {
    e.key_refused()
        || e.store_error().is_some()
        || matches!(e, CycleError::Cancelled)
        || matches!(e, CycleError::Api(api) if api.is_paused())
}

async fn handle(
    ctx: &SyncContext,
    organization_id: &str,
    event: &WebhookEvent,
    counts: &mut RunCounts,
) -> Result<WebhookState, CycleError> {
    let (Some(encounter_id), Some(document_id)) = (&event.encounter_id, &event.document_id) else {
        return Ok(WebhookState::Ignored);
    };
    if event.event_type != TRANSCRIPT_READY || !ctx.content.transcripts {
        return Ok(WebhookState::Ignored);
    }
    if event.organization_id != organization_id {
        // Signed with this endpoint's secret, yet about another clinic: nothing of this
        // organization's to fetch (the receiver refuses such deliveries once the clinic is known).
        tracing::warn!(
            event_id = %event.event_id,
            "a webhook event names another organization_id than this organization's; ignored"
        );
        return Ok(WebhookState::Ignored);
    }
    let occurred = event.occurred_at;
    let (org, enc, doc) = (
        organization_id.to_owned(),
        encounter_id.to_owned(),
        document_id.to_owned(),
    );
    let state = ctx
        .writer
        .call(move |c| c.transcript_state(&org, &enc, &doc, occurred))
        .await?;
    if state.as_deref() == Some("current") {
        // Queued by a listing that saw the document finish, or fetched since the event: that
        // fetch is the one the event asks for, and the record it came with is current.
        return Ok(WebhookState::Queued);
    }
    counts.detail_requests += 1;
    let encounter = match ctx.client.encounter(encounter_id).await {
        Ok(encounter) => encounter,
        Err(e) if e.class() == ErrorClass::ResourceUnavailable => return Ok(WebhookState::NotFound),
        Err(e) => return Err(e.into()),
    };
    super::admit(ctx, std::slice::from_ref(&encounter)).await?;
    let now = OffsetDateTime::now_utc();
    if encounter.created_at.0 < history_start(ctx.sync.start_at, ctx.privacy.retention, now) {
        // Before `start_at`, or past the retention: the organization keeps nothing of it.
        return Ok(WebhookState::Ignored);
    }
    let record = encounter_record(encounter, &ctx.privacy);
    if let Err(e) = window::commit(ctx, vec![record], Vec::new(), None, counts).await {
        // A write refused for this record alone (a constraint, a value the backend refuses:
        // kind `Other`) is the event's failure, counted like a request that failed, so that
        // one event never blocks every cycle; the warehouse failing stops the cycle. (An ID
        // another clinic of the warehouse holds, `id_collision`, is the event's failure as it
        // is: the listing that follows stops the organization.)
        return Err(match e.store_error() {
            Some(s) if s.kind() == StoreErrorKind::Other => CycleError::Other(anyhow::anyhow!(
                "cannot write the encounter the event points to: {e:#}"
            )),
            _ => e,
        });
    }
    let (org, enc, doc) = (
        organization_id.to_owned(),
        encounter_id.to_owned(),
        document_id.to_owned(),
    );
    let queued = ctx
        .writer
        .call(move |c| c.queue_transcript_now(&org, &enc, &doc, occurred))
        .await?;
    Ok(if queued {
        WebhookState::Queued
    } else {
        WebhookState::NotFound
    })
}
