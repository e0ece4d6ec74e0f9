-- The whole PostgreSQL warehouse, equal to the SQLite warehouse after its migration V6: the same
-- tables, columns (in the same order), views, keys, checks and history triggers, in the schema
-- the connection's search_path names (no schema name is written here). Later changes get a new
-- version both here and in migrations/sqlite/.
--
-- What differs from SQLite, on purpose:
--   * Timestamps are `timestamptz` (microsecond precision). The exact instant ChartHero sent (up
--     to nine fractional digits) stays where SQLite keeps it: the *_ns columns and raw_json.
--   * SQLite's INTEGER is bigint, REAL double precision; `INTEGER PRIMARY KEY` ids are identity
--     columns. raw_json stays text: the record exactly as received (its content_hash is over it).
--   * Full-text search is a generated tsvector column with a GIN index (documents.content_tsv,
--     transcript_turns.text_tsv, configuration 'simple') instead of the FTS5 tables notes_fts and
--     transcript_turns_fts; nothing has to keep it in step, PostgreSQL computes it on every write.
--   * encounter_overview.has_transcript is a boolean (SQLite answers 0 or 1).
--   * The read-only role charthero_readers (NOLOGIN) gets USAGE on the schema and SELECT on every
--     table and view, now and (default privileges) in later migrations.

-- Everything below is created in the first existing schema of the search_path.
DO $$
BEGIN
    IF current_schema() IS NULL THEN
        RAISE EXCEPTION 'no schema to create the warehouse in: the search_path (%) names no existing schema',
            current_setting('search_path');
    END IF;
END
$$;

CREATE TABLE patients (
    patient_id      text PRIMARY KEY,
    first_name      text,
    last_name       text,
    date_of_birth   text,                 -- YYYY-MM-DD, as sent
    first_seen_at   timestamptz NOT NULL,
    changed_at      timestamptz NOT NULL, -- when this row last changed here
    organization_id text
);

CREATE TABLE encounters (
    encounter_id    text PRIMARY KEY,
    organization_id text NOT NULL,
    encounter_type  text,
    status          text,
    created_at      timestamptz NOT NULL,
    updated_at      timestamptz NOT NULL,
    date_of_service timestamptz,
    patient_id      text REFERENCES patients (patient_id),
    removed_at      timestamptz,          -- NULL while live upstream
    removed_reason  text,
    created_at_ns   bigint NOT NULL,      -- the exact instants, in unix nanoseconds
    updated_at_ns   bigint NOT NULL,
    content_hash    text NOT NULL,        -- SHA-256 of the record's JSON as received
    raw_json        text NOT NULL,
    first_seen_at   timestamptz NOT NULL,
    changed_at      timestamptz NOT NULL
);
CREATE INDEX encounters_by_created ON encounters (created_at_ns);
CREATE INDEX encounters_by_patient ON encounters (patient_id, removed_at);
CREATE INDEX encounters_by_created_text ON encounters (created_at, encounter_type, status, removed_at);
CREATE INDEX encounters_removed ON encounters (removed_reason) WHERE removed_at IS NOT NULL;
-- Per-organization range queries (removal candidates, audit counts).
CREATE INDEX encounters_by_organization ON encounters (organization_id, created_at_ns, removed_at);

CREATE TABLE documents (
    document_id            text PRIMARY KEY,
    encounter_id           text NOT NULL REFERENCES encounters (encounter_id),
    position               bigint NOT NULL,   -- index in the encounter's documents array
    schema_type            text NOT NULL,
    title                  text,
    status                 text,
    workflow_variant       text,
    audio_duration_seconds double precision,
    content_format         text,              -- from document detail, schema_type = 'document'
    content_text           text,
    detail_created_at      timestamptz,
    detail_updated_at      timestamptz,
    removed_at             timestamptz,       -- set when the document left its encounter's list
    first_seen_at          timestamptz NOT NULL,
    changed_at             timestamptz NOT NULL,
    -- The content work queue (docs/content.md): detail 'pending', 'done', 'skipped',
    -- 'unsupported', 'unavailable'; transcript 'waiting', 'pending', 'not_ready', 'done',
    -- 'unavailable'; audio 'pending', 'done', 'unavailable'.
    detail_state           text NOT NULL DEFAULT 'pending',
    transcript_state       text,
    transcript_attempts    bigint NOT NULL DEFAULT 0,
    transcript_next_at_ns  bigint,
    audio_state            text,
    -- Observed changes that can affect the document's content (SQLite V4).
    content_seq            bigint NOT NULL DEFAULT 0,
    organization_id        text,
    -- Full-text search over note text (SQLite's notes_fts).
    content_tsv            tsvector GENERATED ALWAYS AS (to_tsvector('simple', coalesce(content_text, ''))) STORED
);
CREATE INDEX documents_by_encounter ON documents (encounter_id, removed_at, schema_type, audio_duration_seconds);
CREATE INDEX documents_detail_work ON documents (detail_state) WHERE detail_state = 'pending';
CREATE INDEX documents_transcript_work ON documents (transcript_state)
    WHERE transcript_state IN ('pending', 'not_ready');
CREATE INDEX documents_audio_work ON documents (audio_state) WHERE audio_state = 'pending';
CREATE INDEX documents_ambient ON documents (removed_at, encounter_id, audio_duration_seconds)
    WHERE schema_type = 'ambient_transcript';
CREATE INDEX documents_by_type_and_detail ON documents (schema_type, detail_updated_at);
CREATE INDEX documents_search ON documents USING gin (content_tsv);

CREATE TABLE transcripts (
    document_id            text PRIMARY KEY REFERENCES documents (document_id),
    encounter_id           text NOT NULL REFERENCES encounters (encounter_id),
    provider               text,
    audio_duration_seconds double precision,
    turn_count             bigint NOT NULL,
    fetched_at             timestamptz NOT NULL,
    fetched_for_updated_at timestamptz,       -- the document's detail updated_at when fetched
    content_sha256         text,              -- SHA-256 of the transcript as stored
    organization_id        text
);
CREATE INDEX transcripts_by_encounter ON transcripts (encounter_id);
CREATE INDEX transcripts_by_fetched ON transcripts (fetched_at);

CREATE TABLE transcript_turns (
    document_id     text NOT NULL REFERENCES transcripts (document_id),
    turn_index      bigint NOT NULL,          -- 0-based, in API order
    speaker         text,
    start_seconds   double precision NOT NULL,
    end_seconds     double precision NOT NULL,
    text            text,                     -- NULL when [privacy] transcript_text = false
    organization_id text,
    -- Full-text search over turns (SQLite's transcript_turns_fts).
    text_tsv        tsvector GENERATED ALWAYS AS (to_tsvector('simple', coalesce(text, ''))) STORED,
    PRIMARY KEY (document_id, turn_index)
);
CREATE INDEX transcript_turns_search ON transcript_turns USING gin (text_tsv);

-- Downloaded recordings; the signed URL they came from is never stored.
CREATE TABLE recordings (
    document_id      text PRIMARY KEY REFERENCES documents (document_id),
    encounter_id     text NOT NULL REFERENCES encounters (encounter_id),
    path             text NOT NULL,           -- relative to [audio] directory: <sha256>.<ext>
    size_bytes       bigint NOT NULL,
    sha256           text NOT NULL,
    duration_seconds double precision,
    fetched_at       timestamptz NOT NULL,
    organization_id  text
);

-- Work that exhausted its retries; tried again next cycle, removed when it succeeds.
CREATE TABLE dead_letters (
    work            text NOT NULL CHECK (work IN ('document', 'transcript', 'audio')),
    document_id     text NOT NULL,
    encounter_id    text NOT NULL,
    attempts        bigint NOT NULL,          -- cycles that gave up on it
    first_failed_at timestamptz NOT NULL,
    last_failed_at  timestamptz NOT NULL,
    last_run_id     bigint NOT NULL,
    reason_code     text,
    last_error      text NOT NULL,
    organization    text NOT NULL DEFAULT 'default',
    PRIMARY KEY (work, document_id)
);

-- One row per sync cycle.
CREATE TABLE sync_runs (
    run_id               bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    started_at           timestamptz NOT NULL,
    finished_at          timestamptz,
    outcome              text NOT NULL CHECK (outcome IN ('running', 'succeeded', 'partial', 'failed', 'aborted')),
    trigger              text NOT NULL,       -- 'sync', 'run', 'demo', ...
    list_requests        bigint NOT NULL DEFAULT 0,
    detail_requests      bigint NOT NULL DEFAULT 0,
    windows              bigint NOT NULL DEFAULT 0,
    encounters_new       bigint NOT NULL DEFAULT 0,
    encounters_changed   bigint NOT NULL DEFAULT 0,
    encounters_unchanged bigint NOT NULL DEFAULT 0,
    encounters_removed   bigint NOT NULL DEFAULT 0,
    rescans              bigint NOT NULL DEFAULT 0,
    splits               bigint NOT NULL DEFAULT 0,
    documents_fetched    bigint NOT NULL DEFAULT 0,
    transcripts_fetched  bigint NOT NULL DEFAULT 0,
    recordings_fetched   bigint NOT NULL DEFAULT 0,
    retries              bigint NOT NULL DEFAULT 0,
    dead_letters         bigint NOT NULL DEFAULT 0,
    disabled_routes      text,
    error                text,
    reason_code          text,
    organization         text NOT NULL DEFAULT 'default'
);
CREATE INDEX sync_runs_by_organization ON sync_runs (organization, run_id);

-- Backfills (reconciles) of a created_at range; `cursor` is how far it has been scanned.
CREATE TABLE backfills (
    backfill_id        bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    range_start        timestamptz NOT NULL,  -- inclusive
    range_end          timestamptz NOT NULL,  -- exclusive
    cursor             timestamptz,           -- NULL until the first window completes
    status             text NOT NULL CHECK (status IN ('queued', 'running', 'completed', 'failed')),
    requested_by       text NOT NULL,
    requested_at       timestamptz NOT NULL,
    started_at         timestamptz,
    finished_at        timestamptz,
    windows            bigint NOT NULL DEFAULT 0,
    encounters_seen    bigint NOT NULL DEFAULT 0,
    encounters_removed bigint NOT NULL DEFAULT 0,
    error              text,
    organization       text NOT NULL DEFAULT 'default'
);
CREATE INDEX backfills_by_organization ON backfills (organization, status);

-- The window ledger: one row per completed created_at window.
CREATE TABLE sync_windows (
    window_id    bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    run_id       bigint NOT NULL REFERENCES sync_runs (run_id),
    kind         text NOT NULL,               -- 'live', 'revisit' or 'backfill'
    backfill_id  bigint REFERENCES backfills (backfill_id),
    start_at     timestamptz NOT NULL,        -- inclusive
    end_at       timestamptz NOT NULL,        -- exclusive
    start_at_ns  bigint NOT NULL,
    end_at_ns    bigint NOT NULL,
    records_seen bigint NOT NULL,
    total        bigint NOT NULL,
    pages        bigint NOT NULL,
    passes       bigint NOT NULL,
    removed      bigint NOT NULL,
    id_set_hash  text NOT NULL,
    completed_at timestamptz NOT NULL,
    organization text NOT NULL DEFAULT 'default'
);
CREATE INDEX sync_windows_by_end ON sync_windows (end_at_ns);

-- Small named values of the whole warehouse (the demo's marker).
CREATE TABLE sync_state (
    name  text PRIMARY KEY,
    value text NOT NULL
);

-- Every observed change of an encounter's status, updated_at or liveness: IDs and values only,
-- never PHI. Append-only; kept in step by triggers, whatever code path writes encounters.
CREATE TABLE encounter_history (
    history_id      bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    encounter_id    text NOT NULL,
    observed_at     timestamptz NOT NULL,     -- when this program saw the change
    change          text NOT NULL CHECK (change IN ('created', 'changed', 'removed', 'revived')),
    status          text,
    updated_at      timestamptz NOT NULL,
    removed_reason  text,
    organization_id text
);
CREATE INDEX encounter_history_by_encounter ON encounter_history (encounter_id, history_id);

CREATE FUNCTION encounters_history_insert() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO encounter_history (encounter_id, organization_id, observed_at, change, status, updated_at)
    VALUES (NEW.encounter_id, NEW.organization_id, NEW.changed_at, 'created', NEW.status, NEW.updated_at);
    RETURN NULL;
END;
$$;
CREATE TRIGGER encounters_history_insert AFTER INSERT ON encounters
    FOR EACH ROW EXECUTE FUNCTION encounters_history_insert();

CREATE FUNCTION encounters_history_update() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO encounter_history (encounter_id, organization_id, observed_at, change, status, updated_at,
        removed_reason)
    VALUES (
        NEW.encounter_id,
        NEW.organization_id,
        NEW.changed_at,
        CASE
            WHEN OLD.removed_at IS NULL AND NEW.removed_at IS NOT NULL THEN 'removed'
            WHEN OLD.removed_at IS NOT NULL AND NEW.removed_at IS NULL THEN 'revived'
            ELSE 'changed'
        END,
        NEW.status,
        NEW.updated_at,
        NEW.removed_reason
    );
    RETURN NULL;
END;
$$;
-- updated_at_ns too: SQLite compares the nanosecond text, and timestamptz keeps microseconds.
CREATE TRIGGER encounters_history_update AFTER UPDATE OF status, updated_at, updated_at_ns, removed_at ON encounters
    FOR EACH ROW
    WHEN (OLD.status IS DISTINCT FROM NEW.status OR OLD.updated_at IS DISTINCT FROM NEW.updated_at
          OR OLD.updated_at_ns IS DISTINCT FROM NEW.updated_at_ns
          OR (OLD.removed_at IS NULL) <> (NEW.removed_at IS NULL))
    EXECUTE FUNCTION encounters_history_update();

-- A document the vendor moves to another encounter takes its transcript and recording with it.
CREATE FUNCTION documents_moved() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE transcripts SET encounter_id = NEW.encounter_id WHERE document_id = NEW.document_id;
    UPDATE recordings SET encounter_id = NEW.encounter_id WHERE document_id = NEW.document_id;
    RETURN NULL;
END;
$$;
CREATE TRIGGER documents_moved AFTER UPDATE OF encounter_id ON documents
    FOR EACH ROW WHEN (OLD.encounter_id IS DISTINCT FROM NEW.encounter_id)
    EXECUTE FUNCTION documents_moved();

-- Purges, with counts only.
CREATE TABLE purges (
    purge_id       bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    purged_at      timestamptz NOT NULL,
    range_start    timestamptz NOT NULL,      -- created_at, inclusive
    range_end      timestamptz NOT NULL,      -- created_at, exclusive
    range_start_ns bigint NOT NULL,
    range_end_ns   bigint NOT NULL,
    reason         text NOT NULL,             -- 'retention' or 'range'
    encounters     bigint NOT NULL,
    documents      bigint NOT NULL,
    transcripts    bigint NOT NULL,
    turns          bigint NOT NULL,
    recordings     bigint NOT NULL,
    history_rows   bigint NOT NULL
);

-- History audits; `cursor` is how far the audit has got.
CREATE TABLE audits (
    audit_id      bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    range_start   timestamptz NOT NULL,
    range_end     timestamptz NOT NULL,
    cursor        timestamptz NOT NULL,
    status        text NOT NULL CHECK (status IN ('running', 'completed')),
    requested_by  text NOT NULL,
    started_at    timestamptz NOT NULL,
    finished_at   timestamptz,
    ranges        bigint NOT NULL DEFAULT 0,
    probes        bigint NOT NULL DEFAULT 0,
    differing     bigint NOT NULL DEFAULT 0,
    rescanned     bigint NOT NULL DEFAULT 0,
    list_requests bigint NOT NULL DEFAULT 0,
    error         text,
    organization  text NOT NULL DEFAULT 'default'
);
CREATE INDEX audits_by_status ON audits (status);

-- Which ChartHero organization each configured name reads (SQLite V6).
CREATE TABLE organizations (
    organization    text PRIMARY KEY,
    organization_id text UNIQUE,
    first_seen_at   timestamptz NOT NULL
);

-- Small named values per organization: 'complete_through', 'deep_revisit_at' (RFC 3339 text).
CREATE TABLE organization_state (
    organization text NOT NULL,
    name         text NOT NULL,
    value        text NOT NULL,
    PRIMARY KEY (organization, name)
);

-- The columns that hold PHI collect no planner statistics: ANALYZE (autovacuum runs it on its
-- own) copies column values into pg_statistic (histogram bounds, most common values and
-- lexemes), where a purge or a privacy change cannot reach them (that catalog is vacuumed only
-- when the server decides, or by a superuser). Predicates on these columns get PostgreSQL's
-- default estimates; full-text search uses its GIN indexes regardless.
-- Test: store::postgres::privacy::tests::analyze_copies_no_phi_into_the_planners_statistics.
ALTER TABLE patients
    ALTER COLUMN first_name SET STATISTICS 0,
    ALTER COLUMN last_name SET STATISTICS 0,
    ALTER COLUMN date_of_birth SET STATISTICS 0;
ALTER TABLE encounters
    ALTER COLUMN raw_json SET STATISTICS 0;
ALTER TABLE documents
    ALTER COLUMN title SET STATISTICS 0,
    ALTER COLUMN content_text SET STATISTICS 0,
    ALTER COLUMN content_tsv SET STATISTICS 0;
ALTER TABLE transcript_turns
    ALTER COLUMN text SET STATISTICS 0,
    ALTER COLUMN text_tsv SET STATISTICS 0;

-- One row per live encounter: patient, document counts, transcript availability.
CREATE VIEW encounter_overview AS
SELECT
    e.encounter_id,
    e.organization_id,
    e.encounter_type,
    e.status,
    e.created_at,
    e.updated_at,
    e.date_of_service,
    e.patient_id,
    p.first_name,
    p.last_name,
    p.date_of_birth,
    (SELECT count(*) FROM documents d
      WHERE d.encounter_id = e.encounter_id AND d.removed_at IS NULL) AS document_count,
    (SELECT count(*) FROM documents d
      WHERE d.encounter_id = e.encounter_id AND d.removed_at IS NULL AND d.schema_type = 'document') AS note_count,
    (SELECT count(*) FROM documents d
      WHERE d.encounter_id = e.encounter_id AND d.removed_at IS NULL
        AND d.schema_type = 'ambient_transcript') AS ambient_count,
    (SELECT count(*) FROM transcripts t WHERE t.encounter_id = e.encounter_id) AS transcript_count,
    EXISTS (SELECT 1 FROM transcripts t WHERE t.encounter_id = e.encounter_id) AS has_transcript,
    (SELECT sum(d.audio_duration_seconds) FROM documents d
      WHERE d.encounter_id = e.encounter_id AND d.removed_at IS NULL) AS audio_seconds
FROM encounters e
LEFT JOIN patients p ON p.patient_id = e.patient_id
WHERE e.removed_at IS NULL;

-- One row per transcript: its turns in order, one line each, "speaker: text".
CREATE VIEW transcript_text AS
SELECT
    t.document_id,
    t.encounter_id,
    t.organization_id,
    t.provider,
    t.audio_duration_seconds,
    t.turn_count,
    (SELECT string_agg(coalesce(tt.speaker, 'unknown') || ': ' || tt.text, E'\n' ORDER BY tt.turn_index)
       FROM transcript_turns tt
      WHERE tt.document_id = t.document_id AND tt.text IS NOT NULL) AS text
FROM transcripts t;

-- The read-only role analysts' logins are granted. Created here if missing; a migrating role that
-- may not create roles gets a message naming what a DBA runs first. The schema is whichever the
-- connection's search_path selected (current_schema()), never a name written here.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'charthero_readers') THEN
        BEGIN
            CREATE ROLE charthero_readers NOLOGIN;
        EXCEPTION
            WHEN insufficient_privilege THEN
                RAISE EXCEPTION 'the role % may not create the read-only role charthero_readers: ask a DBA to run `CREATE ROLE charthero_readers NOLOGIN` first, then migrate again',
                    current_user;
            -- Another warehouse's migration created it at the same moment.
            WHEN duplicate_object OR unique_violation THEN
                NULL;
        END;
    END IF;
    EXECUTE format('GRANT USAGE ON SCHEMA %I TO charthero_readers', current_schema());
    EXECUTE format('GRANT SELECT ON ALL TABLES IN SCHEMA %I TO charthero_readers', current_schema());
    EXECUTE format('ALTER DEFAULT PRIVILEGES IN SCHEMA %I GRANT SELECT ON TABLES TO charthero_readers',
        current_schema());
END
$$;
