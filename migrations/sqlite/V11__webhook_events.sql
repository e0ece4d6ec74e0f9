-- ChartHero's webhook deliveries the daemon accepted (`[webhook]`; docs/operations.md,
-- "Webhooks"): one row per event and organization, the event's id being the idempotency key.
-- The row is written before the delivery is acknowledged, so an acknowledged event survives a
-- crash; the organization's next cycle handles it (queues the document's transcript at once, fetching the
-- encounter first when the warehouse does not hold the document) and records what it did.
-- Events are thin pointers: IDs and instants, never PHI, never the signature.
CREATE TABLE webhook_events (
    organization      TEXT NOT NULL,     -- the configured name whose endpoint received it
    event_id          TEXT NOT NULL,
    event_type        TEXT NOT NULL,
    api_version       TEXT NOT NULL,
    occurred_at       TEXT NOT NULL,
    organization_id   TEXT NOT NULL,     -- ChartHero's, as the event names it
    encounter_id      TEXT,
    document_id       TEXT,
    first_delivery_id TEXT NOT NULL,
    deliveries        INTEGER NOT NULL,  -- verified deliveries of this event (retries, replays)
    received_at       TEXT NOT NULL,
    last_received_at  TEXT NOT NULL,
    state             TEXT NOT NULL
        CHECK (state IN ('pending', 'queued', 'not_found', 'ignored', 'failed')),
    attempts          INTEGER NOT NULL DEFAULT 0,  -- cycles whose handling of it failed
    handled_at        TEXT,
    PRIMARY KEY (organization, event_id)
) STRICT;
CREATE INDEX webhook_events_pending ON webhook_events (organization) WHERE state = 'pending';
-- Handled events are kept 30 days (`sync::webhook::KEEP_HANDLED`), then deleted by received_at.
CREATE INDEX webhook_events_by_received ON webhook_events (organization, received_at);
