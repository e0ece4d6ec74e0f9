//! Migration V5: what analysts' stock tools need (issue 14). A Rust migration (refinery calls
//! `migration()`) only because its second part applies one expression to 39 timestamp columns;
//! the SQL it returns is what runs, and the comments in it say why.

/// Search indexes every SQLite from 3.40 reads; the history trigger set aside while timestamps
/// are padded.
const SEARCH_AND_TRIGGER_ASIDE: &str = r#"-- What analysts' stock tools need (issue 14): a search index every SQLite from 3.40 reads,
-- timestamps whose text order is their time order, and the indexes the documented queries need.
--
-- 1. Full-text search without FTS5's secure-delete. With it on, FTS5 rewrites an index to file
--    format 5 at the first delete, which SQLite before 3.42 cannot read ("invalid fts5 file
--    format (found 5, expected 4)"): notes search failed on Debian 12's sqlite3 and Python, and
--    Datasette refused the file. Both indexes are dropped and created again (format 4, never
--    secure-delete) and rebuilt from the text they index. Removal of PHI stays complete by another
--    route: a privacy change or purge merges each index into one segment ('optimize', which drops
--    deleted entries with the segments that held them), then VACUUMs and truncates the WAL
--    (store::privacy). The content table is now written `content="…"`, the spelling Datasette
--    recognises when it looks for a table's search index.

DROP TABLE transcript_turns_fts;
CREATE VIRTUAL TABLE transcript_turns_fts USING fts5(
    text, content="transcript_turns", content_rowid="rowid",
    tokenize = 'unicode61 remove_diacritics 2'
);
INSERT INTO transcript_turns_fts (transcript_turns_fts) VALUES ('rebuild');

DROP TABLE notes_fts;
CREATE VIRTUAL TABLE notes_fts USING fts5(
    content_text, content="documents", content_rowid="rowid",
    tokenize = 'unicode61 remove_diacritics 2'
);
INSERT INTO notes_fts (notes_fts) VALUES ('rebuild');

-- The triggers of V2 name the indexes in their bodies only, so they keep working unchanged.

-- 2. One fixed width for every stored timestamp: RFC 3339 in UTC with nine fractional digits,
--    `2026-05-25T14:00:00.000000000Z`, so that text order is time order in every column (the
--    product contract), and every instant stays exact (ChartHero may send up to nine digits;
--    the *_ns columns keep nanoseconds too). Every value written so far came from the same
--    formatter (UTC, `Z`, fraction without trailing zeros or none), so padding the fraction with
--    zeros to nine digits keeps each instant. A value that does not have that shape is left as
--    it is. The history trigger would record the padded `updated_at` as a change: it is set
--    aside while the rows are rewritten.

DROP TRIGGER encounters_history_update;

"#;

/// The history trigger back, the analysts' indexes and a `transcript_text` DuckDB parses.
const TRIGGER_INDEXES_AND_VIEW: &str = r#"CREATE TRIGGER encounters_history_update AFTER UPDATE OF status, updated_at, removed_at ON encounters
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

-- 3. Indexes for what analysts ask (docs/schema.md's example queries and the views): each answers
--    in under 100 ms on 100,000 encounters (BENCHMARKS.md, "Analysts' queries"), and no plan
--    scans a table inside a per-row subquery. encounter_overview looks documents and transcripts
--    up per encounter (covering, so no row is read); time-ordered reads use the text column, now
--    that its order is time order; the rest cover one documented question each.
CREATE INDEX transcripts_by_encounter ON transcripts (encounter_id);
CREATE INDEX transcripts_by_fetched ON transcripts (fetched_at);
CREATE INDEX encounters_by_created_text ON encounters (created_at, encounter_type, status, removed_at);
DROP INDEX encounters_by_patient;
CREATE INDEX encounters_by_patient ON encounters (patient_id, removed_at);
CREATE INDEX encounters_removed ON encounters (removed_reason) WHERE removed_at IS NOT NULL;
DROP INDEX documents_by_encounter;
CREATE INDEX documents_by_encounter ON documents (encounter_id, removed_at, schema_type, audio_duration_seconds);
-- Partial: only ambient transcripts (about a third of the documents), so every other document
-- costs the writer no entry in a second random-key index. schema_type is listed although the
-- WHERE fixes it: SQLite 3.40 counts a partial index as covering only if it names the column.
CREATE INDEX documents_ambient ON documents (removed_at, encounter_id, audio_duration_seconds, schema_type)
    WHERE schema_type = 'ambient_transcript';
CREATE INDEX documents_by_type_and_detail ON documents (schema_type, detail_updated_at);

-- 4. transcript_text as DuckDB's sqlite scanner reads it too. DuckDB parses a view's SQL with its
--    own parser (where `char(10)` is a type name: the separator is now a newline written inside
--    the string literal, which both read), and it does not keep a subquery's ORDER BY when it
--    aggregates in parallel (on 100,000 encounters every transcript came out shuffled). A window
--    ordered by turn_index fixes the order in both engines; group_concat(... ORDER BY ...), which
--    SQLite before 3.44 cannot parse, is still not used. The frame is the whole transcript and
--    only its first row is read, so the text is built once (linear even for a 2 MB transcript).
DROP VIEW transcript_text;
CREATE VIEW transcript_text AS
SELECT
    t.document_id,
    t.encounter_id,
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
"#;

/// Every stored timestamp column, by table.
const TIMESTAMP_COLUMNS: &[(&str, &[&str])] = &[
    (
        "encounters",
        &[
            "created_at",
            "updated_at",
            "date_of_service",
            "removed_at",
            "first_seen_at",
            "changed_at",
        ],
    ),
    ("patients", &["first_seen_at", "changed_at"]),
    (
        "documents",
        &[
            "detail_created_at",
            "detail_updated_at",
            "removed_at",
            "first_seen_at",
            "changed_at",
        ],
    ),
    ("transcripts", &["fetched_at", "fetched_for_updated_at"]),
    ("recordings", &["fetched_at"]),
    ("dead_letters", &["first_failed_at", "last_failed_at"]),
    ("sync_runs", &["started_at", "finished_at"]),
    (
        "backfills",
        &[
            "range_start",
            "range_end",
            "cursor",
            "requested_at",
            "started_at",
            "finished_at",
        ],
    ),
    ("sync_windows", &["start_at", "end_at", "completed_at"]),
    ("encounter_history", &["observed_at", "updated_at"]),
    ("purges", &["purged_at", "range_start", "range_end"]),
    (
        "audits",
        &["range_start", "range_end", "cursor", "started_at", "finished_at"],
    ),
];

/// True when `column` holds what the old formatter wrote: `YYYY-MM-DDTHH:MM:SS`, then nothing
/// or `.` and one to nine digits, then `Z`.
fn written_by_the_old_formatter(column: &str) -> String {
    format!(
        "length({c}) BETWEEN 20 AND 29 AND ({c} GLOB '{d}Z' OR ({c} GLOB '{d}.[0-9]*Z' \
         AND substr({c}, 21, length({c}) - 21) NOT GLOB '*[^0-9]*'))",
        c = column,
        d = "[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T[0-9][0-9]:[0-9][0-9]:[0-9][0-9]",
    )
}

/// `column` with its fraction padded with zeros to nine digits (the same instant).
fn padded(column: &str) -> String {
    format!(
        "substr({c}, 1, 19) || '.' || substr(CASE WHEN substr({c}, 20, 1) = '.' \
         THEN substr({c}, 21, length({c}) - 21) ELSE '' END || '000000000', 1, 9) || 'Z'",
        c = column,
    )
}

pub fn migration() -> String {
    let mut sql = String::from(SEARCH_AND_TRIGGER_ASIDE);
    for (table, columns) in TIMESTAMP_COLUMNS {
        let sets: Vec<String> = columns
            .iter()
            .map(|c| {
                format!(
                    "{c} = CASE WHEN {} THEN {} ELSE {c} END",
                    written_by_the_old_formatter(c),
                    padded(c)
                )
            })
            .collect();
        sql.push_str(&format!("UPDATE {table} SET\n    {};\n", sets.join(",\n    ")));
    }
    sql.push_str(&format!(
        "UPDATE sync_state SET value = {}\n WHERE name IN ('complete_through', 'deep_revisit_at') AND {};\n\n",
        padded("value"),
        written_by_the_old_formatter("value")
    ));
    sql.push_str(TRIGGER_INDEXES_AND_VIEW);
    sql
}
