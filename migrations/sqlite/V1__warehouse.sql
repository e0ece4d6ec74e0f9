-- The warehouse of product-contract.md plus the bookkeeping the sync needs.
-- Timestamps are RFC 3339 UTC text; *_ns columns hold the same instants as integer
-- nanoseconds because text with and without fractional seconds does not sort correctly.

CREATE TABLE patients (
    patient_id     TEXT PRIMARY KEY,
    first_name     TEXT,
    last_name      TEXT,
    date_of_birth  TEXT,              -- YYYY-MM-DD
    first_seen_at  TEXT NOT NULL,
    changed_at     TEXT NOT NULL      -- when this row last changed here
) STRICT;

CREATE TABLE encounters (
    encounter_id    TEXT PRIMARY KEY,
    organization_id TEXT NOT NULL,
    encounter_type  TEXT,
    status          TEXT,
    created_at      TEXT NOT NULL,
    updated_at      TEXT NOT NULL,
    date_of_service TEXT,
    patient_id      TEXT REFERENCES patients (patient_id),
    removed_at      TEXT,             -- NULL while live upstream
    removed_reason  TEXT,
    created_at_ns   INTEGER NOT NULL,
    updated_at_ns   INTEGER NOT NULL,
    content_hash    TEXT NOT NULL,    -- SHA-256 of the record's JSON as received
    raw_json        TEXT NOT NULL,
    first_seen_at   TEXT NOT NULL,
    changed_at      TEXT NOT NULL
) STRICT;
CREATE INDEX encounters_by_created ON encounters (created_at_ns);
CREATE INDEX encounters_by_patient ON encounters (patient_id);

CREATE TABLE documents (
    document_id            TEXT PRIMARY KEY,
    encounter_id           TEXT NOT NULL REFERENCES encounters (encounter_id),
    position               INTEGER NOT NULL,  -- index in the encounter's documents array
    schema_type            TEXT NOT NULL,
    title                  TEXT,
    status                 TEXT,
    workflow_variant       TEXT,
    audio_duration_seconds REAL,
    content_format         TEXT,              -- from document detail, schema_type = 'document'
    content_text           TEXT,
    detail_created_at      TEXT,
    detail_updated_at      TEXT,
    removed_at             TEXT,              -- set when the document left its encounter's list
    first_seen_at          TEXT NOT NULL,
    changed_at             TEXT NOT NULL,
    -- The content work queue. detail: 'pending' (fetch the document route), 'done',
    -- 'unsupported' (400 unsupported_document_type; not asked again unless the type changes),
    -- 'unavailable' (403/404 for this record).
    detail_state           TEXT NOT NULL DEFAULT 'pending',
    -- Ambient transcripts only: 'waiting' (document not final), 'pending', 'not_ready' (the route
    -- said not yet; retried at transcript_next_at_ns on a bounded schedule, and when the
    -- document changes), 'done', 'unavailable'.
    transcript_state       TEXT,
    transcript_attempts    INTEGER NOT NULL DEFAULT 0,
    transcript_next_at_ns  INTEGER,
    -- Audio (when enabled): 'pending', 'done', 'unavailable'.
    audio_state            TEXT
) STRICT;
CREATE INDEX documents_by_encounter ON documents (encounter_id);
CREATE INDEX documents_detail_work ON documents (detail_state) WHERE detail_state = 'pending';
CREATE INDEX documents_transcript_work ON documents (transcript_state)
    WHERE transcript_state IN ('pending', 'not_ready');
CREATE INDEX documents_audio_work ON documents (audio_state) WHERE audio_state = 'pending';

CREATE TABLE transcripts (
    document_id            TEXT PRIMARY KEY REFERENCES documents (document_id),
    encounter_id           TEXT NOT NULL REFERENCES encounters (encounter_id),
    provider               TEXT,
    audio_duration_seconds REAL,
    turn_count             INTEGER NOT NULL,
    fetched_at             TEXT NOT NULL,
    fetched_for_updated_at TEXT           -- the document's detail updated_at when fetched
) STRICT;

-- A rowid table (not WITHOUT ROWID) so that the full-text index can use it as external content.
CREATE TABLE transcript_turns (
    document_id   TEXT NOT NULL REFERENCES transcripts (document_id),
    turn_index    INTEGER NOT NULL,   -- 0-based, in API order
    speaker       TEXT,
    start_seconds REAL NOT NULL,
    end_seconds   REAL NOT NULL,
    text          TEXT,               -- NULL when [privacy] transcript_text = false
    PRIMARY KEY (document_id, turn_index)
) STRICT;

-- Downloaded recordings (audio is off by default). Files are content-addressed under the
-- configured directory; the signed URL they came from is never stored.
CREATE TABLE recordings (
    document_id      TEXT PRIMARY KEY REFERENCES documents (document_id),
    encounter_id     TEXT NOT NULL REFERENCES encounters (encounter_id),
    path             TEXT NOT NULL,   -- relative to [audio] directory: <sha256>.<ext>
    size_bytes       INTEGER NOT NULL,
    sha256           TEXT NOT NULL,
    duration_seconds REAL,
    fetched_at       TEXT NOT NULL
) STRICT;

-- Work that exhausted its retries; tried again next cycle, removed when it succeeds.
CREATE TABLE dead_letters (
    work            TEXT NOT NULL CHECK (work IN ('document', 'transcript', 'audio')),
    document_id     TEXT NOT NULL,
    encounter_id    TEXT NOT NULL,
    attempts        INTEGER NOT NULL,   -- cycles that gave up on it
    first_failed_at TEXT NOT NULL,
    last_failed_at  TEXT NOT NULL,
    last_run_id     INTEGER NOT NULL,
    reason_code     TEXT,
    last_error      TEXT NOT NULL,
    PRIMARY KEY (work, document_id)
) STRICT;

-- One row per sync cycle.
CREATE TABLE sync_runs (
    run_id               INTEGER PRIMARY KEY,
    started_at           TEXT NOT NULL,
    finished_at          TEXT,
    -- 'partial': the cycle ran to the end but left work undone (dead letters, disabled routes).
    outcome              TEXT NOT NULL CHECK (outcome IN ('running', 'succeeded', 'partial', 'failed', 'aborted')),
    trigger              TEXT NOT NULL,        -- 'sync', 'run', 'demo', ...
    list_requests        INTEGER NOT NULL DEFAULT 0,
    detail_requests      INTEGER NOT NULL DEFAULT 0,   -- encounter detail, to confirm removals
    windows              INTEGER NOT NULL DEFAULT 0,
    encounters_new       INTEGER NOT NULL DEFAULT 0,
    encounters_changed   INTEGER NOT NULL DEFAULT 0,
    encounters_unchanged INTEGER NOT NULL DEFAULT 0,
    encounters_removed   INTEGER NOT NULL DEFAULT 0,
    rescans              INTEGER NOT NULL DEFAULT 0,
    splits               INTEGER NOT NULL DEFAULT 0,
    documents_fetched    INTEGER NOT NULL DEFAULT 0,
    transcripts_fetched  INTEGER NOT NULL DEFAULT 0,
    recordings_fetched   INTEGER NOT NULL DEFAULT 0,
    retries              INTEGER NOT NULL DEFAULT 0,
    dead_letters         INTEGER NOT NULL DEFAULT 0,   -- work items that exhausted retries
    disabled_routes      TEXT,                          -- e.g. 'audio:missing_scope', comma-separated
    error                TEXT,
    reason_code          TEXT
) STRICT;

-- Backfills (reconciles) of a created_at range: requested by `sync --backfill-from`, and later
-- queued for the daemon. `cursor` is how far the range has been scanned completely, so an
-- interrupted backfill resumes there.
CREATE TABLE backfills (
    backfill_id  INTEGER PRIMARY KEY,
    range_start  TEXT NOT NULL,         -- inclusive
    range_end    TEXT NOT NULL,         -- exclusive
    cursor       TEXT,                  -- NULL until the first window completes
    status       TEXT NOT NULL CHECK (status IN ('queued', 'running', 'completed', 'failed')),
    requested_by TEXT NOT NULL,         -- 'sync', 'run' or 'backfill'
    requested_at TEXT NOT NULL,
    started_at   TEXT,
    finished_at  TEXT,
    windows      INTEGER NOT NULL DEFAULT 0,
    encounters_seen    INTEGER NOT NULL DEFAULT 0,
    encounters_removed INTEGER NOT NULL DEFAULT 0,
    error        TEXT
) STRICT;

-- The window ledger: one row per completed created_at window.
CREATE TABLE sync_windows (
    window_id     INTEGER PRIMARY KEY,
    run_id        INTEGER NOT NULL REFERENCES sync_runs (run_id),
    kind          TEXT NOT NULL,        -- 'live', 'revisit' or 'backfill'
    backfill_id   INTEGER REFERENCES backfills (backfill_id),
    start_at      TEXT NOT NULL,        -- inclusive
    end_at        TEXT NOT NULL,        -- exclusive
    start_at_ns   INTEGER NOT NULL,
    end_at_ns     INTEGER NOT NULL,
    records_seen  INTEGER NOT NULL,     -- distinct encounters listed in the accepted pass
    total         INTEGER NOT NULL,     -- the list route's total for the window at the start
    pages         INTEGER NOT NULL,     -- list requests over all passes
    passes        INTEGER NOT NULL,     -- 1 unless upstream changed while we paged
    removed       INTEGER NOT NULL,     -- encounters marked removed by this window
    id_set_hash   TEXT NOT NULL,        -- SHA-256 over the sorted encounter IDs seen
    completed_at  TEXT NOT NULL
) STRICT;
CREATE INDEX sync_windows_by_end ON sync_windows (end_at_ns);

-- Small named values: 'complete_through' (everything created before it is known complete),
-- 'deep_revisit_at' (when the last deep revisit completed), 'demo_database'.
CREATE TABLE sync_state (
    name  TEXT PRIMARY KEY,
    value TEXT NOT NULL
) STRICT;
