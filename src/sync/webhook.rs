//! What a cycle does with the webhook events its organization's endpoint accepted
//! (`crate::webhook` stores them; docs/operations.md, "Webhooks"): before paging, each pending
//! `recording.transcript_ready` queues its document's transcript for the content worker at
//! once. A document the warehouse does not hold yet (its encounter not listed yet, or listed
//! before the document was added) is learnt from the encounter's detail first, written like any
//! encounter the sync reads. An event changes only *when* content is fetched, never what is
//! accepted: the scheduled sync stays the source of truth, so an event lost, refused or pointing
//! at nothing costs at most the wait for the next cycle.

use time::OffsetDateTime;

use super::{CycleError, SyncContext, encounter_record, window};
use crate::api::ErrorClass;
use crate::store::{RunCounts, WebhookEvent, WebhookState};

/// The one event type the sync acts on.
pub const TRANSCRIPT_READY: &str = "recording.transcript_ready";

/// Events read from the warehouse at a time.
const BATCH: usize = 100;

/// Handles every pending event of the organization, oldest first. A request that fails for a
/// reason other than "not there for this key" fails the cycle and leaves the event pending for
/// the next one.
pub async fn handle_pending(ctx: &SyncContext, counts: &mut RunCounts) -> Result<(), CycleError> {
    // Before the organization is known nothing of it is stored: its first cycle lists first.
    let Some(organization_id) = ctx.org.id() else {
        return Ok(());
    };
    loop {
        let org = ctx.org.name.clone();
        let events = ctx
            .writer
            .call(move |c| c.pending_webhook_events(&org, BATCH))
            .await?;
        if events.is_empty() {
            return Ok(());
        }
        for event in events {
            let state = handle(ctx, &organization_id, &event, counts).await?;
            tracing::info!(
                event_id = %event.event_id,
                event_type = %event.event_type,
                encounter_id = event.encounter_id.as_deref().unwrap_or("-"),
                document_id = event.document_id.as_deref().unwrap_or("-"),
                state = state.as_str(),
                "webhook event handled"
            );
            let org = ctx.org.name.clone();
            ctx.writer
                .call(move |c| {
                    c.settle_webhook_event(&org, &event.event_id, state, OffsetDateTime::now_utc())
                })
                .await?;
        }
    }
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
    if queue(ctx, organization_id, encounter_id, document_id).await? {
        return Ok(WebhookState::Queued);
    }
    counts.detail_requests += 1;
    match ctx.client.encounter(encounter_id).await {
        Ok(encounter) => {
            super::admit(ctx, std::slice::from_ref(&encounter)).await?;
            let record = encounter_record(encounter, &ctx.privacy);
            window::commit(ctx, vec![record], Vec::new(), None, counts).await?;
            Ok(if queue(ctx, organization_id, encounter_id, document_id).await? {
                WebhookState::Queued
            } else {
                WebhookState::NotFound
            })
        }
        Err(e) if e.class() == ErrorClass::ResourceUnavailable => Ok(WebhookState::NotFound),
        Err(e) => Err(e.into()),
    }
}

/// Queues the document's transcript now; `false` when the warehouse holds no such document.
async fn queue(
    ctx: &SyncContext,
    organization_id: &str,
    encounter_id: &str,
    document_id: &str,
) -> Result<bool, CycleError> {
    let (org, enc, doc) = (
        organization_id.to_owned(),
        encounter_id.to_owned(),
        document_id.to_owned(),
    );
    Ok(ctx
        .writer
        .call(move |c| c.queue_transcript_now(&org, &enc, &doc))
        .await?)
}
