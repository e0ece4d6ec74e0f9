-- Several organizations (clinics) in one warehouse. Two kinds of key:
--   * `organization_id` is ChartHero's id of the clinic, carried by every row analysts join
--     (encounters had it already; patients, documents, transcripts, transcript_turns,
--     recordings and encounter_history get it here), so one clinic is `WHERE organization_id = ?`.
--   * `organization` is the name the configuration gives the clinic (`[[organizations]] name`),
--     carried by the sync's own bookkeeping: runs, windows, backfills, audits, dead letters and
--     the per-organization state (watermark, deep revisit). A configuration without
--     `[[organizations]]` is the one organization `default`.
-- A warehouse of one organization is upgraded in place: every row is kept, data rows take their
-- encounter's organization_id, bookkeeping becomes organization `default`, and the watermark
-- moves with it, so the next cycle lists only its horizon.

-- Which ChartHero organization each configured name reads: set on the first page its key lists
-- (or from the configuration) and never changed by the sync; a key that lists another
-- organization's encounters is refused before anything is written. UNIQUE: two names (two keys)
-- never write the same clinic.
CREATE TABLE organizations (
    organization    TEXT PRIMARY KEY,
    organization_id TEXT UNIQUE,
    first_seen_at   TEXT NOT NULL
) STRICT;

-- Small named values per organization: 'complete_through', 'deep_revisit_at'.
CREATE TABLE organization_state (
    organization TEXT NOT NULL,
    name         TEXT NOT NULL,
    value        TEXT NOT NULL,
    PRIMARY KEY (organization, name)
) STRICT;

-- The upgraded warehouse's one organization: `default`, reading the clinic its rows came from
-- (the most frequent organization_id, should an earlier key ever have seen another).
INSERT INTO organizations (organization, organization_id, first_seen_at)
SELECT 'default', organization_id, min(first_seen_at)
  FROM encounters GROUP BY organization_id ORDER BY count(*) DESC LIMIT 1;

INSERT INTO organization_state (organization, name, value)
SELECT 'default', name, value FROM sync_state WHERE name IN ('complete_through', 'deep_revisit_at');
DELETE FROM sync_state WHERE name IN ('complete_through', 'deep_revisit_at');

-- Bookkeeping, keyed by organization name.
ALTER TABLE sync_runs ADD COLUMN organization TEXT NOT NULL DEFAULT 'default';
ALTER TABLE sync_windows ADD COLUMN organization TEXT NOT NULL DEFAULT 'default';
ALTER TABLE backfills ADD COLUMN organization TEXT NOT NULL DEFAULT 'default';
ALTER TABLE audits ADD COLUMN organization TEXT NOT NULL DEFAULT 'default';
ALTER TABLE dead_letters ADD COLUMN organization TEXT NOT NULL DEFAULT 'default';
CREATE INDEX sync_runs_by_organization ON sync_runs (organization, run_id);
CREATE INDEX backfills_by_organization ON backfills (organization, status);

-- Data, keyed by ChartHero's organization_id (NULL only for a row whose encounter is gone,
-- which the sync never leaves behind).
ALTER TABLE patients ADD COLUMN organization_id TEXT;
ALTER TABLE documents ADD COLUMN organization_id TEXT;
ALTER TABLE transcripts ADD COLUMN organization_id TEXT;
ALTER TABLE transcript_turns ADD COLUMN organization_id TEXT;
ALTER TABLE recordings ADD COLUMN organization_id TEXT;
ALTER TABLE encounter_history ADD COLUMN organization_id TEXT;

UPDATE patients SET organization_id =
    (SELECT e.organization_id FROM encounters e WHERE e.patient_id = patients.patient_id LIMIT 1);
UPDATE documents SET organization_id =
    (SELECT e.organization_id FROM encounters e WHERE e.encounter_id = documents.encounter_id);
UPDATE transcripts SET organization_id =
    (SELECT d.organization_id FROM documents d WHERE d.document_id = transcripts.document_id);
UPDATE transcript_turns SET organization_id =
    (SELECT t.organization_id FROM transcripts t WHERE t.document_id = transcript_turns.document_id);
UPDATE recordings SET organization_id =
    (SELECT d.organization_id FROM documents d WHERE d.document_id = recordings.document_id);
UPDATE encounter_history SET organization_id =
    (SELECT e.organization_id FROM encounters e WHERE e.encounter_id = encounter_history.encounter_id);

-- Per-organization range queries (removal candidates, audit counts) read this index; with
-- removed_at it also counts each clinic's live encounters without reading the rows.
CREATE INDEX encounters_by_organization ON encounters (organization_id, created_at_ns, removed_at);

-- History rows carry their encounter's organization.
DROP TRIGGER encounters_history_insert;
DROP TRIGGER encounters_history_update;

CREATE TRIGGER encounters_history_insert AFTER INSERT ON encounters BEGIN
    INSERT INTO encounter_history (encounter_id, organization_id, observed_at, change, status, updated_at)
    VALUES (new.encounter_id, new.organization_id, new.changed_at, 'created', new.status, new.updated_at);
END;

CREATE TRIGGER encounters_history_update AFTER UPDATE OF status, updated_at, removed_at ON encounters
WHEN old.status IS NOT new.status OR old.updated_at IS NOT new.updated_at
  OR (old.removed_at IS NULL) <> (new.removed_at IS NULL)
BEGIN
    INSERT INTO encounter_history (encounter_id, organization_id, observed_at, change, status, updated_at,
        removed_reason)
    VALUES (
        new.encounter_id,
        new.organization_id,
        new.changed_at,
        CASE
            WHEN old.removed_at IS NULL AND new.removed_at IS NOT NULL THEN 'removed'
            WHEN old.removed_at IS NOT NULL AND new.removed_at IS NULL THEN 'revived'
            ELSE 'changed'
        END,
        new.status,
        new.updated_at,
        new.removed_reason
    );
END;

-- The transcript view names its organization too (otherwise V5's view: turns ordered by a
-- window, which DuckDB's scanner keeps, and a newline written inside the literal).
DROP VIEW transcript_text;
CREATE VIEW transcript_text AS
SELECT
    t.document_id,
    t.encounter_id,
    t.organization_id,
    t.provider,
    t.audio_duration_seconds,
    t.turn_count,
    (SELECT w.text
       FROM (SELECT group_concat(coalesce(tt.speaker, 'unknown') || ': ' || tt.text, '
') OVER (ORDER BY tt.turn_index ROWS BETWEEN UNBOUNDED PRECEDING AND UNBOUNDED FOLLOWING) AS text
               FROM transcript_turns tt
              WHERE tt.document_id = t.document_id AND tt.text IS NOT NULL) w
      LIMIT 1) AS text
FROM transcripts t;
