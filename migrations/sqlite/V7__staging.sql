-- Staged backfill pages (SQLite only; docs/operations.md, "How a backfill is written").
--
-- A page of encounters the warehouse holds nothing near (no stored encounter of its
-- organization created within the page's range) is appended here, in the order it was read,
-- instead of being upserted row by row; every 100,000 staged encounters, and before anything
-- else reads or writes the warehouse's tables, the staged rows are merged into `patients`,
-- `encounters` and `documents` table by table in each table's key order, so each index page is
-- written once per merge instead of once per record. The rows are durable here in the same
-- transaction as the window's ledger row: a crash leaves them staged, and the next writer to
-- open the warehouse merges them. Analysts see a staged encounter once it is merged.
CREATE TABLE staged_encounters (
    seq                 INTEGER PRIMARY KEY,   -- the order the records were read in
    encounter_id        TEXT NOT NULL,
    organization_id     TEXT NOT NULL,
    encounter_type      TEXT,
    status              TEXT,
    created_at          TEXT NOT NULL,         -- as encounters stores them
    updated_at          TEXT NOT NULL,
    date_of_service     TEXT,
    created_at_ns       INTEGER NOT NULL,
    updated_at_ns       INTEGER NOT NULL,
    date_of_service_ns  INTEGER,
    patient_id          TEXT,
    first_name          TEXT,
    last_name           TEXT,
    date_of_birth       TEXT,
    content_hash        TEXT NOT NULL,
    raw_json            TEXT NOT NULL,
    observed_at         TEXT NOT NULL,         -- when this program read it (first_seen_at)
    -- 1: merged record by record, in `seq` order, as a page outside a backfill would be (the
    -- encounter is already stored, was staged more than once, or shares a document with
    -- another staged encounter).
    one_by_one          INTEGER NOT NULL DEFAULT 0
) STRICT;
CREATE INDEX staged_encounters_by_id ON staged_encounters (encounter_id, seq);
CREATE INDEX staged_encounters_by_created ON staged_encounters (organization_id, created_at_ns);

CREATE TABLE staged_documents (
    encounter_seq          INTEGER NOT NULL,  -- staged_encounters.seq
    position               INTEGER NOT NULL,
    document_id            TEXT NOT NULL,
    schema_type            TEXT NOT NULL,
    title                  TEXT,
    status                 TEXT,
    workflow_variant       TEXT,
    audio_duration_seconds REAL,
    PRIMARY KEY (encounter_seq, position)
) STRICT, WITHOUT ROWID;
