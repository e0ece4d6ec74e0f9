-- What analysts query: change history, full-text search, views, and the purge log.

-- Every observed change of an encounter's status, updated_at or liveness: IDs and values only,
-- never PHI. Append-only; kept in step by triggers, whatever code path writes encounters.
CREATE TABLE encounter_history (
    history_id     INTEGER PRIMARY KEY,
    encounter_id   TEXT NOT NULL,
    observed_at    TEXT NOT NULL,     -- when this program saw the change
    change         TEXT NOT NULL CHECK (change IN ('created', 'changed', 'removed', 'revived')),
    status         TEXT,              -- the encounter's status after the change
    updated_at     TEXT NOT NULL,     -- the encounter's updated_at after the change
    removed_reason TEXT               -- for 'removed'
) STRICT;
CREATE INDEX encounter_history_by_encounter ON encounter_history (encounter_id, history_id);

CREATE TRIGGER encounters_history_insert AFTER INSERT ON encounters BEGIN
    INSERT INTO encounter_history (encounter_id, observed_at, change, status, updated_at)
    VALUES (new.encounter_id, new.changed_at, 'created', new.status, new.updated_at);
END;

CREATE TRIGGER encounters_history_update AFTER UPDATE OF status, updated_at, removed_at ON encounters
WHEN old.status IS NOT new.status OR old.updated_at IS NOT new.updated_at
  OR (old.removed_at IS NULL) <> (new.removed_at IS NULL)
BEGIN
    INSERT INTO encounter_history (encounter_id, observed_at, change, status, updated_at, removed_reason)
    VALUES (
        new.encounter_id,
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

-- Full-text search over transcript turns and note text. External-content FTS5 tables: the text
-- lives once, in transcript_turns.text and documents.content_text; the triggers keep the
-- indexes in step with every write. secure-delete removes deleted tokens from the index itself.
CREATE VIRTUAL TABLE transcript_turns_fts USING fts5(
    text, content = 'transcript_turns', content_rowid = 'rowid',
    tokenize = 'unicode61 remove_diacritics 2'
);
INSERT INTO transcript_turns_fts (transcript_turns_fts, rank) VALUES ('secure-delete', 1);

CREATE TRIGGER transcript_turns_fts_insert AFTER INSERT ON transcript_turns WHEN new.text IS NOT NULL BEGIN
    INSERT INTO transcript_turns_fts (rowid, text) VALUES (new.rowid, new.text);
END;
CREATE TRIGGER transcript_turns_fts_delete AFTER DELETE ON transcript_turns WHEN old.text IS NOT NULL BEGIN
    INSERT INTO transcript_turns_fts (transcript_turns_fts, rowid, text) VALUES ('delete', old.rowid, old.text);
END;
CREATE TRIGGER transcript_turns_fts_update AFTER UPDATE OF text ON transcript_turns BEGIN
    INSERT INTO transcript_turns_fts (transcript_turns_fts, rowid, text)
        SELECT 'delete', old.rowid, old.text WHERE old.text IS NOT NULL;
    INSERT INTO transcript_turns_fts (rowid, text) SELECT new.rowid, new.text WHERE new.text IS NOT NULL;
END;

CREATE VIRTUAL TABLE notes_fts USING fts5(
    content_text, content = 'documents', content_rowid = 'rowid',
    tokenize = 'unicode61 remove_diacritics 2'
);
INSERT INTO notes_fts (notes_fts, rank) VALUES ('secure-delete', 1);

CREATE TRIGGER notes_fts_insert AFTER INSERT ON documents WHEN new.content_text IS NOT NULL BEGIN
    INSERT INTO notes_fts (rowid, content_text) VALUES (new.rowid, new.content_text);
END;
CREATE TRIGGER notes_fts_delete AFTER DELETE ON documents WHEN old.content_text IS NOT NULL BEGIN
    INSERT INTO notes_fts (notes_fts, rowid, content_text) VALUES ('delete', old.rowid, old.content_text);
END;
CREATE TRIGGER notes_fts_update AFTER UPDATE OF content_text ON documents BEGIN
    INSERT INTO notes_fts (notes_fts, rowid, content_text)
        SELECT 'delete', old.rowid, old.content_text WHERE old.content_text IS NOT NULL;
    INSERT INTO notes_fts (rowid, content_text)
        SELECT new.rowid, new.content_text WHERE new.content_text IS NOT NULL;
END;

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
    t.provider,
    t.audio_duration_seconds,
    t.turn_count,
    -- Ordered by a subquery rather than group_concat(... ORDER BY ...), which SQLite before 3.44
    -- cannot parse: analysts' sqlite3 (Debian 12 ships 3.40) must be able to open this file.
    (SELECT group_concat(line, char(10))
       FROM (SELECT coalesce(tt.speaker, 'unknown') || ': ' || tt.text AS line
               FROM transcript_turns tt
              WHERE tt.document_id = t.document_id AND tt.text IS NOT NULL
              ORDER BY tt.turn_index)) AS text
FROM transcripts t;

-- Purges, with counts only.
CREATE TABLE purges (
    purge_id      INTEGER PRIMARY KEY,
    purged_at     TEXT NOT NULL,
    range_start   TEXT NOT NULL,      -- created_at, inclusive
    range_end     TEXT NOT NULL,      -- created_at, exclusive
    range_start_ns INTEGER NOT NULL,
    range_end_ns   INTEGER NOT NULL,
    reason        TEXT NOT NULL,      -- 'retention' or 'range'
    encounters    INTEGER NOT NULL,
    documents     INTEGER NOT NULL,
    transcripts   INTEGER NOT NULL,
    turns         INTEGER NOT NULL,
    recordings    INTEGER NOT NULL,
    history_rows  INTEGER NOT NULL
) STRICT;
