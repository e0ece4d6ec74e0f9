//! `webhook_events` on PostgreSQL: the same statements as SQLite's (`store::sqlite::webhook`).

use postgres::GenericClient;
use time::OffsetDateTime;

use crate::status::Webhooks;
use crate::store::{WebhookEvent, WebhookState, queue_transcript_now_sql};
use crate::timefmt::format_stored;

pub fn record_webhook_event(
    db: &mut impl GenericClient,
    organization: &str,
    event: &WebhookEvent,
    delivery_id: &str,
    now: OffsetDateTime,
) -> anyhow::Result<bool> {
    let inserted = db.execute(
        "INSERT INTO webhook_events (organization, event_id, event_type, api_version, occurred_at,
             organization_id, encounter_id, document_id, first_delivery_id, deliveries, received_at,
             last_received_at, state)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, 1, $10, $10, 'pending')
         ON CONFLICT (organization, event_id) DO NOTHING",
        &[
            &organization,
            &event.event_id,
            &event.event_type,
            &event.api_version,
            &event.occurred_at,
            &event.organization_id,
            &event.encounter_id,
            &event.document_id,
            &delivery_id,
            &now,
        ],
    )? == 1;
    if !inserted {
        db.execute(
            "UPDATE webhook_events SET deliveries = deliveries + 1, last_received_at = $3
             WHERE organization = $1 AND event_id = $2",
            &[&organization, &event.event_id, &now],
        )?;
    }
    Ok(inserted)
}

pub fn pending_webhook_events(
    db: &mut impl GenericClient,
    organization: &str,
    limit: usize,
) -> anyhow::Result<Vec<WebhookEvent>> {
    let rows = db.query(
        "SELECT event_id, event_type, api_version, occurred_at, organization_id, encounter_id, document_id
         FROM webhook_events WHERE organization = $1 AND state = 'pending'
         ORDER BY received_at, event_id LIMIT $2",
        &[&organization, &(limit as i64)],
    )?;
    rows.iter()
        .map(|r| {
            Ok(WebhookEvent {
                event_id: r.try_get(0)?,
                event_type: r.try_get(1)?,
                api_version: r.try_get(2)?,
                occurred_at: r.try_get(3)?,
                organization_id: r.try_get(4)?,
                encounter_id: r.try_get(5)?,
                document_id: r.try_get(6)?,
            })
        })
        .collect()
}

pub fn settle_webhook_event(
    db: &mut impl GenericClient,
    organization: &str,
    event_id: &str,
    state: WebhookState,
    now: OffsetDateTime,
) -> anyhow::Result<()> {
    db.execute(
        "UPDATE webhook_events SET state = $3, handled_at = $4 WHERE organization = $1 AND event_id = $2",
        &[&organization, &event_id, &state.as_str(), &now],
    )?;
    Ok(())
}

pub fn prune_webhook_events(
    db: &mut impl GenericClient,
    organization: &str,
    before: OffsetDateTime,
) -> anyhow::Result<u64> {
    Ok(db.execute(
        "DELETE FROM webhook_events WHERE organization = $1 AND received_at < $2 AND state <> 'pending'",
        &[&organization, &before],
    )?)
}

pub fn webhook_event_failed(
    db: &mut impl GenericClient,
    organization: &str,
    event_id: &str,
    max_attempts: u32,
    now: OffsetDateTime,
) -> anyhow::Result<bool> {
    let row = db.query_opt(
        "UPDATE webhook_events SET attempts = attempts + 1,
             state = CASE WHEN attempts + 1 >= $3 THEN 'failed' ELSE state END,
             handled_at = CASE WHEN attempts + 1 >= $3 THEN $4 ELSE handled_at END
         WHERE organization = $1 AND event_id = $2 RETURNING state",
        &[&organization, &event_id, &i64::from(max_attempts), &now],
    )?;
    Ok(row.map(|r| r.try_get::<_, String>(0)).transpose()?.as_deref() == Some("failed"))
}

pub fn transcript_state(
    db: &mut impl GenericClient,
    organization_id: &str,
    encounter_id: &str,
    document_id: &str,
    occurred_at: OffsetDateTime,
) -> anyhow::Result<Option<String>> {
    db.query_opt(
        queue_transcript_now_sql!(state, "$1", "$2", "$3", "$4"),
        &[&organization_id, &encounter_id, &document_id, &occurred_at],
    )?
    .map(|r| r.try_get(0))
    .transpose()
    .map_err(Into::into)
}

pub fn queue_transcript_now(
    db: &mut impl GenericClient,
    organization_id: &str,
    encounter_id: &str,
    document_id: &str,
    occurred_at: OffsetDateTime,
) -> anyhow::Result<bool> {
    let queued = db.execute(
        queue_transcript_now_sql!(update, "$1", "$2", "$3", "$4"),
        &[&organization_id, &encounter_id, &document_id, &occurred_at],
    )? == 1;
    if queued {
        // ChartHero says the transcript is ready: a dead letter of it need not wait.
        db.execute(
            "UPDATE dead_letters SET next_attempt_at_ns = NULL WHERE work = 'transcript' AND document_id = $1",
            &[&document_id],
        )?;
    }
    // Not updated: current already, or not there.
    Ok(queued || transcript_state(db, organization_id, encounter_id, document_id, occurred_at)?.is_some())
}

/// The organization's webhook events for `status` (see the SQLite backend's); `None` when there
/// are none (or on a schema older than the table).
pub fn webhook_summary(db: &mut impl GenericClient, organization: &str) -> anyhow::Result<Option<Webhooks>> {
    let table: Option<String> = db
        .query_one("SELECT to_regclass('webhook_events')::text", &[])?
        .try_get(0)?;
    if table.is_none() {
        return Ok(None);
    }
    let row = db.query_one(
        "SELECT count(*), count(*) FILTER (WHERE state = 'pending'), max(last_received_at)
         FROM webhook_events WHERE organization = $1",
        &[&organization],
    )?;
    let events: i64 = row.try_get(0)?;
    let last: Option<OffsetDateTime> = row.try_get(2)?;
    if events == 0 {
        return Ok(None);
    }
    Ok(Some(Webhooks {
        events,
        pending: row.try_get(1)?,
        last_received_at: last.map(format_stored),
    }))
}
