//! `webhook_events`: ChartHero's verified webhook deliveries, stored before they are
//! acknowledged and handled by the organization's next cycle (docs/operations.md, "Webhooks").

use rusqlite::{Connection, OptionalExtension, params};
use time::OffsetDateTime;

use crate::status::Webhooks;
use crate::store::{WebhookEvent, WebhookState, queue_transcript_now_sql};
use crate::timefmt::{format_stored, parse_rfc3339};

pub fn record_webhook_event(
    conn: &Connection,
    organization: &str,
    event: &WebhookEvent,
    delivery_id: &str,
    now: OffsetDateTime,
) -> anyhow::Result<bool> {
    let now = format_stored(now);
    let inserted = conn.execute(
        "INSERT INTO webhook_events (organization, event_id, event_type, api_version, occurred_at,
             organization_id, encounter_id, document_id, first_delivery_id, deliveries, received_at,
             last_received_at, state)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, 1, ?10, ?10, 'pending')
         ON CONFLICT (organization, event_id) DO NOTHING",
        params![
            organization,
            event.event_id,
            event.event_type,
            event.api_version,
            format_stored(event.occurred_at),
            event.organization_id,
            event.encounter_id,
            event.document_id,
            delivery_id,
            now,
        ],
    )? == 1;
    if !inserted {
        conn.execute(
            "UPDATE webhook_events SET deliveries = deliveries + 1, last_received_at = ?3
             WHERE organization = ?1 AND event_id = ?2",
            params![organization, event.event_id, now],
        )?;
    }
    Ok(inserted)
}

pub fn pending_webhook_events(
    conn: &Connection,
    organization: &str,
    limit: usize,
) -> anyhow::Result<Vec<WebhookEvent>> {
    let mut stmt = conn.prepare_cached(
        "SELECT event_id, event_type, api_version, occurred_at, organization_id, encounter_id, document_id
         FROM webhook_events WHERE organization = ?1 AND state = 'pending'
         ORDER BY received_at, event_id LIMIT ?2",
    )?;
    let rows = stmt.query_map(params![organization, limit as i64], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, String>(2)?,
            r.get::<_, String>(3)?,
            r.get::<_, String>(4)?,
            r.get::<_, Option<String>>(5)?,
            r.get::<_, Option<String>>(6)?,
        ))
    })?;
    let mut events = Vec::new();
    for row in rows {
        let (event_id, event_type, api_version, occurred_at, organization_id, encounter_id, document_id) =
            row?;
        events.push(WebhookEvent {
            event_id,
            event_type,
            api_version,
            occurred_at: parse_rfc3339(&occurred_at)
                .map_err(|e| anyhow::anyhow!("corrupt webhook event time: {e}"))?,
            organization_id,
            encounter_id,
            document_id,
        });
    }
    Ok(events)
}

pub fn settle_webhook_event(
    conn: &Connection,
    organization: &str,
    event_id: &str,
    state: WebhookState,
    now: OffsetDateTime,
) -> anyhow::Result<()> {
    conn.execute(
        "UPDATE webhook_events SET state = ?3, handled_at = ?4 WHERE organization = ?1 AND event_id = ?2",
        params![organization, event_id, state.as_str(), format_stored(now)],
    )?;
    Ok(())
}

pub fn prune_webhook_events(
    conn: &Connection,
    organization: &str,
    before: OffsetDateTime,
) -> anyhow::Result<u64> {
    Ok(conn.execute(
        "DELETE FROM webhook_events WHERE organization = ?1 AND received_at < ?2 AND state <> 'pending'",
        params![organization, format_stored(before)],
    )? as u64)
}

pub fn webhook_event_failed(
    conn: &Connection,
    organization: &str,
    event_id: &str,
    max_attempts: u32,
    now: OffsetDateTime,
) -> anyhow::Result<bool> {
    let state: Option<String> = conn
        .query_row(
            "UPDATE webhook_events SET attempts = attempts + 1,
                 state = CASE WHEN attempts + 1 >= ?3 THEN 'failed' ELSE state END,
                 handled_at = CASE WHEN attempts + 1 >= ?3 THEN ?4 ELSE handled_at END
             WHERE organization = ?1 AND event_id = ?2 RETURNING state",
            params![organization, event_id, max_attempts, format_stored(now)],
            |r| r.get(0),
        )
        .optional()?;
    Ok(state.as_deref() == Some("failed"))
}

pub fn transcript_state(
    conn: &Connection,
    organization_id: &str,
    encounter_id: &str,
    document_id: &str,
    occurred_at: OffsetDateTime,
) -> anyhow::Result<Option<String>> {
    Ok(conn
        .query_row(
            queue_transcript_now_sql!(state, "?1", "?2", "?3", "?4"),
            params![
                organization_id,
                encounter_id,
                document_id,
                format_stored(occurred_at)
            ],
            |r| r.get(0),
        )
        .optional()?)
}

pub fn queue_transcript_now(
    conn: &Connection,
    organization_id: &str,
    encounter_id: &str,
    document_id: &str,
    occurred_at: OffsetDateTime,
) -> anyhow::Result<bool> {
    let queued = conn.execute(
        queue_transcript_now_sql!(update, "?1", "?2", "?3", "?4"),
        params![
            organization_id,
            encounter_id,
            document_id,
            format_stored(occurred_at)
        ],
    )? == 1;
    if queued {
        // ChartHero says the transcript is ready: a dead letter of it need not wait.
        conn.execute(
            "UPDATE dead_letters SET next_attempt_at_ns = NULL WHERE work = 'transcript' AND document_id = ?1",
            [document_id],
        )?;
    }
    // Not updated: current already, or not there.
    Ok(queued || transcript_state(conn, organization_id, encounter_id, document_id, occurred_at)?.is_some())
}

/// The organization's webhook events for `status` (those of the last 30 days and those not
/// handled yet: older handled ones are deleted); `None` when there are none (or on a warehouse
/// older than the table, which `status` reads too).
pub fn webhook_summary(conn: &Connection, organization: &str) -> anyhow::Result<Option<Webhooks>> {
    let table: Option<i64> = conn
        .query_row(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'webhook_events'",
            [],
            |r| r.get(0),
        )
        .optional()?;
    if table.is_none() {
        return Ok(None);
    }
    let (events, pending, last_received_at): (i64, i64, Option<String>) = conn.query_row(
        "SELECT count(*), count(*) FILTER (WHERE state = 'pending'), max(last_received_at)
         FROM webhook_events WHERE organization = ?1",
        [organization],
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
    )?;
    Ok((events > 0).then_some(Webhooks {
        events,
        pending,
        last_received_at,
    }))
}
