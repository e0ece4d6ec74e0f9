-- ChartHero's webhook deliveries the daemon accepted (SQLite V11; docs/operations.md,
-- "Webhooks"): one row per event and organization, written before the delivery is
-- acknowledged and handled by the organization's next cycle. IDs and instants only.
CREATE TABLE webhook_events (
    organization      text NOT NULL,
    event_id          text NOT NULL,
    event_type        text NOT NULL,
    api_version       text NOT NULL,
    occurred_at       timestamptz NOT NULL,
    organization_id   text NOT NULL,
    encounter_id      text,
    document_id       text,
    first_delivery_id text NOT NULL,
    deliveries        bigint NOT NULL,
    received_at       timestamptz NOT NULL,
    last_received_at  timestamptz NOT NULL,
    state             text NOT NULL
        CHECK (state IN ('pending', 'queued', 'not_found', 'ignored', 'failed')),
    attempts          bigint NOT NULL DEFAULT 0,
    handled_at        timestamptz,
    PRIMARY KEY (organization, event_id)
);
CREATE INDEX webhook_events_pending ON webhook_events (organization) WHERE state = 'pending';
CREATE INDEX webhook_events_by_received ON webhook_events (organization, received_at);
