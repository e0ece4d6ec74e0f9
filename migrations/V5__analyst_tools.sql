-- What analysts' stock tools need (issue 14): a search index every SQLite from 3.40 reads,
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

UPDATE encounters SET
    created_at = CASE WHEN length(created_at) BETWEEN 20 AND 29 AND (created_at GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T[0-9][0-9]:[0-9][0-9]:[0-9][0-9]Z' OR (created_at GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T[0-9][0-9]:[0-9][0-9]:[0-9][0-9].[0-9]*Z' AND substr(created_at, 21, length(created_at) - 21) NOT GLOB '*[^0-9]*'))
        THEN substr(created_at, 1, 19) || '.' || substr(CASE WHEN substr(created_at, 20, 1) = '.' THEN substr(created_at, 21, length(created_at) - 21) ELSE '' END || '000000000', 1, 9) || 'Z' ELSE created_at END,
    updated_at = CASE WHEN length(updated_at) BETWEEN 20 AND 29 AND (updated_at GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T[0-9][0-9]:[0-9][0-9]:[0-9][0-9]Z' OR (updated_at GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T[0-9][0-9]:[0-9][0-9]:[0-9][0-9].[0-9]*Z' AND substr(updated_at, 21, length(updated_at) - 21) NOT GLOB '*[^0-9]*'))
        THEN substr(updated_at, 1, 19) || '.' || substr(CASE WHEN substr(updated_at, 20, 1) = '.' THEN substr(updated_at, 21, length(updated_at) - 21) ELSE '' END || '000000000', 1, 9) || 'Z' ELSE updated_at END,
    date_of_service = CASE WHEN length(date_of_service) BETWEEN 20 AND 29 AND (date_of_service GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T[0-9][0-9]:[0-9][0-9]:[0-9][0-9]Z' OR (date_of_service GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T[0-9][0-9]:[0-9][0-9]:[0-9][0-9].[0-9]*Z' AND substr(date_of_service, 21, length(date_of_service) - 21) NOT GLOB '*[^0-9]*'))
        THEN substr(date_of_service, 1, 19) || '.' || substr(CASE WHEN substr(date_of_service, 20, 1) = '.' THEN substr(date_of_service, 21, length(date_of_service) - 21) ELSE '' END || '000000000', 1, 9) || 'Z' ELSE date_of_service END,
    removed_at = CASE WHEN length(removed_at) BETWEEN 20 AND 29 AND (removed_at GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T[0-9][0-9]:[0-9][0-9]:[0-9][0-9]Z' OR (removed_at GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T[0-9][0-9]:[0-9][0-9]:[0-9][0-9].[0-9]*Z' AND substr(removed_at, 21, length(removed_at) - 21) NOT GLOB '*[^0-9]*'))
        THEN substr(removed_at, 1, 19) || '.' || substr(CASE WHEN substr(removed_at, 20, 1) = '.' THEN substr(removed_at, 21, length(removed_at) - 21) ELSE '' END || '000000000', 1, 9) || 'Z' ELSE removed_at END,
    first_seen_at = CASE WHEN length(first_seen_at) BETWEEN 20 AND 29 AND (first_seen_at GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T[0-9][0-9]:[0-9][0-9]:[0-9][0-9]Z' OR (first_seen_at GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T[0-9][0-9]:[0-9][0-9]:[0-9][0-9].[0-9]*Z' AND substr(first_seen_at, 21, length(first_seen_at) - 21) NOT GLOB '*[^0-9]*'))
        THEN substr(first_seen_at, 1, 19) || '.' || substr(CASE WHEN substr(first_seen_at, 20, 1) = '.' THEN substr(first_seen_at, 21, length(first_seen_at) - 21) ELSE '' END || '000000000', 1, 9) || 'Z' ELSE first_seen_at END,
    changed_at = CASE WHEN length(changed_at) BETWEEN 20 AND 29 AND (changed_at GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T[0-9][0-9]:[0-9][0-9]:[0-9][0-9]Z' OR (changed_at GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T[0-9][0-9]:[0-9][0-9]:[0-9][0-9].[0-9]*Z' AND substr(changed_at, 21, length(changed_at) - 21) NOT GLOB '*[^0-9]*'))
        THEN substr(changed_at, 1, 19) || '.' || substr(CASE WHEN substr(changed_at, 20, 1) = '.' THEN substr(changed_at, 21, length(changed_at) - 21) ELSE '' END || '000000000', 1, 9) || 'Z' ELSE changed_at END;
UPDATE patients SET
    first_seen_at = CASE WHEN length(first_seen_at) BETWEEN 20 AND 29 AND (first_seen_at GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T[0-9][0-9]:[0-9][0-9]:[0-9][0-9]Z' OR (first_seen_at GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T[0-9][0-9]:[0-9][0-9]:[0-9][0-9].[0-9]*Z' AND substr(first_seen_at, 21, length(first_seen_at) - 21) NOT GLOB '*[^0-9]*'))
        THEN substr(first_seen_at, 1, 19) || '.' || substr(CASE WHEN substr(first_seen_at, 20, 1) = '.' THEN substr(first_seen_at, 21, length(first_seen_at) - 21) ELSE '' END || '000000000', 1, 9) || 'Z' ELSE first_seen_at END,
    changed_at = CASE WHEN length(changed_at) BETWEEN 20 AND 29 AND (changed_at GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T[0-9][0-9]:[0-9][0-9]:[0-9][0-9]Z' OR (changed_at GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T[0-9][0-9]:[0-9][0-9]:[0-9][0-9].[0-9]*Z' AND substr(changed_at, 21, length(changed_at) - 21) NOT GLOB '*[^0-9]*'))
        THEN substr(changed_at, 1, 19) || '.' || substr(CASE WHEN substr(changed_at, 20, 1) = '.' THEN substr(changed_at, 21, length(changed_at) - 21) ELSE '' END || '000000000', 1, 9) || 'Z' ELSE changed_at END;
UPDATE documents SET
    detail_created_at = CASE WHEN length(detail_created_at) BETWEEN 20 AND 29 AND (detail_created_at GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T[0-9][0-9]:[0-9][0-9]:[0-9][0-9]Z' OR (detail_created_at GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T[0-9][0-9]:[0-9][0-9]:[0-9][0-9].[0-9]*Z' AND substr(detail_created_at, 21, length(detail_created_at) - 21) NOT GLOB '*[^0-9]*'))
        THEN substr(detail_created_at, 1, 19) || '.' || substr(CASE WHEN substr(detail_created_at, 20, 1) = '.' THEN substr(detail_created_at, 21, length(detail_created_at) - 21) ELSE '' END || '000000000', 1, 9) || 'Z' ELSE detail_created_at END,
    detail_updated_at = CASE WHEN length(detail_updated_at) BETWEEN 20 AND 29 AND (detail_updated_at GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T[0-9][0-9]:[0-9][0-9]:[0-9][0-9]Z' OR (detail_updated_at GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T[0-9][0-9]:[0-9][0-9]:[0-9][0-9].[0-9]*Z' AND substr(detail_updated_at, 21, length(detail_updated_at) - 21) NOT GLOB '*[^0-9]*'))
        THEN substr(detail_updated_at, 1, 19) || '.' || substr(CASE WHEN substr(detail_updated_at, 20, 1) = '.' THEN substr(detail_updated_at, 21, length(detail_updated_at) - 21) ELSE '' END || '000000000', 1, 9) || 'Z' ELSE detail_updated_at END,
    removed_at = CASE WHEN length(removed_at) BETWEEN 20 AND 29 AND (removed_at GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T[0-9][0-9]:[0-9][0-9]:[0-9][0-9]Z' OR (removed_at GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T[0-9][0-9]:[0-9][0-9]:[0-9][0-9].[0-9]*Z' AND substr(removed_at, 21, length(removed_at) - 21) NOT GLOB '*[^0-9]*'))
        THEN substr(removed_at, 1, 19) || '.' || substr(CASE WHEN substr(removed_at, 20, 1) = '.' THEN substr(removed_at, 21, length(removed_at) - 21) ELSE '' END || '000000000', 1, 9) || 'Z' ELSE removed_at END,
    first_seen_at = CASE WHEN length(first_seen_at) BETWEEN 20 AND 29 AND (first_seen_at GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T[0-9][0-9]:[0-9][0-9]:[0-9][0-9]Z' OR (first_seen_at GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T[0-9][0-9]:[0-9][0-9]:[0-9][0-9].[0-9]*Z' AND substr(first_seen_at, 21, length(first_seen_at) - 21) NOT GLOB '*[^0-9]*'))
        THEN substr(first_seen_at, 1, 19) || '.' || substr(CASE WHEN substr(first_seen_at, 20, 1) = '.' THEN substr(first_seen_at, 21, length(first_seen_at) - 21) ELSE '' END || '000000000', 1, 9) || 'Z' ELSE first_seen_at END,
    changed_at = CASE WHEN length(changed_at) BETWEEN 20 AND 29 AND (changed_at GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T[0-9][0-9]:[0-9][0-9]:[0-9][0-9]Z' OR (changed_at GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T[0-9][0-9]:[0-9][0-9]:[0-9][0-9].[0-9]*Z' AND substr(changed_at, 21, length(changed_at) - 21) NOT GLOB '*[^0-9]*'))
        THEN substr(changed_at, 1, 19) || '.' || substr(CASE WHEN substr(changed_at, 20, 1) = '.' THEN substr(changed_at, 21, length(changed_at) - 21) ELSE '' END || '000000000', 1, 9) || 'Z' ELSE changed_at END;
UPDATE transcripts SET
    fetched_at = CASE WHEN length(fetched_at) BETWEEN 20 AND 29 AND (fetched_at GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T[0-9][0-9]:[0-9][0-9]:[0-9][0-9]Z' OR (fetched_at GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T[0-9][0-9]:[0-9][0-9]:[0-9][0-9].[0-9]*Z' AND substr(fetched_at, 21, length(fetched_at) - 21) NOT GLOB '*[^0-9]*'))
        THEN substr(fetched_at, 1, 19) || '.' || substr(CASE WHEN substr(fetched_at, 20, 1) = '.' THEN substr(fetched_at, 21, length(fetched_at) - 21) ELSE '' END || '000000000', 1, 9) || 'Z' ELSE fetched_at END,
    fetched_for_updated_at = CASE WHEN length(fetched_for_updated_at) BETWEEN 20 AND 29 AND (fetched_for_updated_at GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T[0-9][0-9]:[0-9][0-9]:[0-9][0-9]Z' OR (fetched_for_updated_at GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T[0-9][0-9]:[0-9][0-9]:[0-9][0-9].[0-9]*Z' AND substr(fetched_for_updated_at, 21, length(fetched_for_updated_at) - 21) NOT GLOB '*[^0-9]*'))
        THEN substr(fetched_for_updated_at, 1, 19) || '.' || substr(CASE WHEN substr(fetched_for_updated_at, 20, 1) = '.' THEN substr(fetched_for_updated_at, 21, length(fetched_for_updated_at) - 21) ELSE '' END || '000000000', 1, 9) || 'Z' ELSE fetched_for_updated_at END;
UPDATE recordings SET
    fetched_at = CASE WHEN length(fetched_at) BETWEEN 20 AND 29 AND (fetched_at GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T[0-9][0-9]:[0-9][0-9]:[0-9][0-9]Z' OR (fetched_at GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T[0-9][0-9]:[0-9][0-9]:[0-9][0-9].[0-9]*Z' AND substr(fetched_at, 21, length(fetched_at) - 21) NOT GLOB '*[^0-9]*'))
        THEN substr(fetched_at, 1, 19) || '.' || substr(CASE WHEN substr(fetched_at, 20, 1) = '.' THEN substr(fetched_at, 21, length(fetched_at) - 21) ELSE '' END || '000000000', 1, 9) || 'Z' ELSE fetched_at END;
UPDATE dead_letters SET
    first_failed_at = CASE WHEN length(first_failed_at) BETWEEN 20 AND 29 AND (first_failed_at GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T[0-9][0-9]:[0-9][0-9]:[0-9][0-9]Z' OR (first_failed_at GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T[0-9][0-9]:[0-9][0-9]:[0-9][0-9].[0-9]*Z' AND substr(first_failed_at, 21, length(first_failed_at) - 21) NOT GLOB '*[^0-9]*'))
        THEN substr(first_failed_at, 1, 19) || '.' || substr(CASE WHEN substr(first_failed_at, 20, 1) = '.' THEN substr(first_failed_at, 21, length(first_failed_at) - 21) ELSE '' END || '000000000', 1, 9) || 'Z' ELSE first_failed_at END,
    last_failed_at = CASE WHEN length(last_failed_at) BETWEEN 20 AND 29 AND (last_failed_at GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T[0-9][0-9]:[0-9][0-9]:[0-9][0-9]Z' OR (last_failed_at GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T[0-9][0-9]:[0-9][0-9]:[0-9][0-9].[0-9]*Z' AND substr(last_failed_at, 21, length(last_failed_at) - 21) NOT GLOB '*[^0-9]*'))
        THEN substr(last_failed_at, 1, 19) || '.' || substr(CASE WHEN substr(last_failed_at, 20, 1) = '.' THEN substr(last_failed_at, 21, length(last_failed_at) - 21) ELSE '' END || '000000000', 1, 9) || 'Z' ELSE last_failed_at END;
UPDATE sync_runs SET
    started_at = CASE WHEN length(started_at) BETWEEN 20 AND 29 AND (started_at GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T[0-9][0-9]:[0-9][0-9]:[0-9][0-9]Z' OR (started_at GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T[0-9][0-9]:[0-9][0-9]:[0-9][0-9].[0-9]*Z' AND substr(started_at, 21, length(started_at) - 21) NOT GLOB '*[^0-9]*'))
        THEN substr(started_at, 1, 19) || '.' || substr(CASE WHEN substr(started_at, 20, 1) = '.' THEN substr(started_at, 21, length(started_at) - 21) ELSE '' END || '000000000', 1, 9) || 'Z' ELSE started_at END,
    finished_at = CASE WHEN length(finished_at) BETWEEN 20 AND 29 AND (finished_at GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T[0-9][0-9]:[0-9][0-9]:[0-9][0-9]Z' OR (finished_at GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T[0-9][0-9]:[0-9][0-9]:[0-9][0-9].[0-9]*Z' AND substr(finished_at, 21, length(finished_at) - 21) NOT GLOB '*[^0-9]*'))
        THEN substr(finished_at, 1, 19) || '.' || substr(CASE WHEN substr(finished_at, 20, 1) = '.' THEN substr(finished_at, 21, length(finished_at) - 21) ELSE '' END || '000000000', 1, 9) || 'Z' ELSE finished_at END;
UPDATE backfills SET
    range_start = CASE WHEN length(range_start) BETWEEN 20 AND 29 AND (range_start GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T[0-9][0-9]:[0-9][0-9]:[0-9][0-9]Z' OR (range_start GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T[0-9][0-9]:[0-9][0-9]:[0-9][0-9].[0-9]*Z' AND substr(range_start, 21, length(range_start) - 21) NOT GLOB '*[^0-9]*'))
        THEN substr(range_start, 1, 19) || '.' || substr(CASE WHEN substr(range_start, 20, 1) = '.' THEN substr(range_start, 21, length(range_start) - 21) ELSE '' END || '000000000', 1, 9) || 'Z' ELSE range_start END,
    range_end = CASE WHEN length(range_end) BETWEEN 20 AND 29 AND (range_end GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T[0-9][0-9]:[0-9][0-9]:[0-9][0-9]Z' OR (range_end GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T[0-9][0-9]:[0-9][0-9]:[0-9][0-9].[0-9]*Z' AND substr(range_end, 21, length(range_end) - 21) NOT GLOB '*[^0-9]*'))
        THEN substr(range_end, 1, 19) || '.' || substr(CASE WHEN substr(range_end, 20, 1) = '.' THEN substr(range_end, 21, length(range_end) - 21) ELSE '' END || '000000000', 1, 9) || 'Z' ELSE range_end END,
    cursor = CASE WHEN length(cursor) BETWEEN 20 AND 29 AND (cursor GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T[0-9][0-9]:[0-9][0-9]:[0-9][0-9]Z' OR (cursor GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T[0-9][0-9]:[0-9][0-9]:[0-9][0-9].[0-9]*Z' AND substr(cursor, 21, length(cursor) - 21) NOT GLOB '*[^0-9]*'))
        THEN substr(cursor, 1, 19) || '.' || substr(CASE WHEN substr(cursor, 20, 1) = '.' THEN substr(cursor, 21, length(cursor) - 21) ELSE '' END || '000000000', 1, 9) || 'Z' ELSE cursor END,
    requested_at = CASE WHEN length(requested_at) BETWEEN 20 AND 29 AND (requested_at GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T[0-9][0-9]:[0-9][0-9]:[0-9][0-9]Z' OR (requested_at GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T[0-9][0-9]:[0-9][0-9]:[0-9][0-9].[0-9]*Z' AND substr(requested_at, 21, length(requested_at) - 21) NOT GLOB '*[^0-9]*'))
        THEN substr(requested_at, 1, 19) || '.' || substr(CASE WHEN substr(requested_at, 20, 1) = '.' THEN substr(requested_at, 21, length(requested_at) - 21) ELSE '' END || '000000000', 1, 9) || 'Z' ELSE requested_at END,
    started_at = CASE WHEN length(started_at) BETWEEN 20 AND 29 AND (started_at GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T[0-9][0-9]:[0-9][0-9]:[0-9][0-9]Z' OR (started_at GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T[0-9][0-9]:[0-9][0-9]:[0-9][0-9].[0-9]*Z' AND substr(started_at, 21, length(started_at) - 21) NOT GLOB '*[^0-9]*'))
        THEN substr(started_at, 1, 19) || '.' || substr(CASE WHEN substr(started_at, 20, 1) = '.' THEN substr(started_at, 21, length(started_at) - 21) ELSE '' END || '000000000', 1, 9) || 'Z' ELSE started_at END,
    finished_at = CASE WHEN length(finished_at) BETWEEN 20 AND 29 AND (finished_at GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T[0-9][0-9]:[0-9][0-9]:[0-9][0-9]Z' OR (finished_at GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T[0-9][0-9]:[0-9][0-9]:[0-9][0-9].[0-9]*Z' AND substr(finished_at, 21, length(finished_at) - 21) NOT GLOB '*[^0-9]*'))
        THEN substr(finished_at, 1, 19) || '.' || substr(CASE WHEN substr(finished_at, 20, 1) = '.' THEN substr(finished_at, 21, length(finished_at) - 21) ELSE '' END || '000000000', 1, 9) || 'Z' ELSE finished_at END;
UPDATE sync_windows SET
    start_at = CASE WHEN length(start_at) BETWEEN 20 AND 29 AND (start_at GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T[0-9][0-9]:[0-9][0-9]:[0-9][0-9]Z' OR (start_at GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T[0-9][0-9]:[0-9][0-9]:[0-9][0-9].[0-9]*Z' AND substr(start_at, 21, length(start_at) - 21) NOT GLOB '*[^0-9]*'))
        THEN substr(start_at, 1, 19) || '.' || substr(CASE WHEN substr(start_at, 20, 1) = '.' THEN substr(start_at, 21, length(start_at) - 21) ELSE '' END || '000000000', 1, 9) || 'Z' ELSE start_at END,
    end_at = CASE WHEN length(end_at) BETWEEN 20 AND 29 AND (end_at GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T[0-9][0-9]:[0-9][0-9]:[0-9][0-9]Z' OR (end_at GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T[0-9][0-9]:[0-9][0-9]:[0-9][0-9].[0-9]*Z' AND substr(end_at, 21, length(end_at) - 21) NOT GLOB '*[^0-9]*'))
        THEN substr(end_at, 1, 19) || '.' || substr(CASE WHEN substr(end_at, 20, 1) = '.' THEN substr(end_at, 21, length(end_at) - 21) ELSE '' END || '000000000', 1, 9) || 'Z' ELSE end_at END,
    completed_at = CASE WHEN length(completed_at) BETWEEN 20 AND 29 AND (completed_at GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T[0-9][0-9]:[0-9][0-9]:[0-9][0-9]Z' OR (completed_at GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T[0-9][0-9]:[0-9][0-9]:[0-9][0-9].[0-9]*Z' AND substr(completed_at, 21, length(completed_at) - 21) NOT GLOB '*[^0-9]*'))
        THEN substr(completed_at, 1, 19) || '.' || substr(CASE WHEN substr(completed_at, 20, 1) = '.' THEN substr(completed_at, 21, length(completed_at) - 21) ELSE '' END || '000000000', 1, 9) || 'Z' ELSE completed_at END;
UPDATE encounter_history SET
    observed_at = CASE WHEN length(observed_at) BETWEEN 20 AND 29 AND (observed_at GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T[0-9][0-9]:[0-9][0-9]:[0-9][0-9]Z' OR (observed_at GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T[0-9][0-9]:[0-9][0-9]:[0-9][0-9].[0-9]*Z' AND substr(observed_at, 21, length(observed_at) - 21) NOT GLOB '*[^0-9]*'))
        THEN substr(observed_at, 1, 19) || '.' || substr(CASE WHEN substr(observed_at, 20, 1) = '.' THEN substr(observed_at, 21, length(observed_at) - 21) ELSE '' END || '000000000', 1, 9) || 'Z' ELSE observed_at END,
    updated_at = CASE WHEN length(updated_at) BETWEEN 20 AND 29 AND (updated_at GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T[0-9][0-9]:[0-9][0-9]:[0-9][0-9]Z' OR (updated_at GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T[0-9][0-9]:[0-9][0-9]:[0-9][0-9].[0-9]*Z' AND substr(updated_at, 21, length(updated_at) - 21) NOT GLOB '*[^0-9]*'))
        THEN substr(updated_at, 1, 19) || '.' || substr(CASE WHEN substr(updated_at, 20, 1) = '.' THEN substr(updated_at, 21, length(updated_at) - 21) ELSE '' END || '000000000', 1, 9) || 'Z' ELSE updated_at END;
UPDATE purges SET
    purged_at = CASE WHEN length(purged_at) BETWEEN 20 AND 29 AND (purged_at GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T[0-9][0-9]:[0-9][0-9]:[0-9][0-9]Z' OR (purged_at GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T[0-9][0-9]:[0-9][0-9]:[0-9][0-9].[0-9]*Z' AND substr(purged_at, 21, length(purged_at) - 21) NOT GLOB '*[^0-9]*'))
        THEN substr(purged_at, 1, 19) || '.' || substr(CASE WHEN substr(purged_at, 20, 1) = '.' THEN substr(purged_at, 21, length(purged_at) - 21) ELSE '' END || '000000000', 1, 9) || 'Z' ELSE purged_at END,
    range_start = CASE WHEN length(range_start) BETWEEN 20 AND 29 AND (range_start GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T[0-9][0-9]:[0-9][0-9]:[0-9][0-9]Z' OR (range_start GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T[0-9][0-9]:[0-9][0-9]:[0-9][0-9].[0-9]*Z' AND substr(range_start, 21, length(range_start) - 21) NOT GLOB '*[^0-9]*'))
        THEN substr(range_start, 1, 19) || '.' || substr(CASE WHEN substr(range_start, 20, 1) = '.' THEN substr(range_start, 21, length(range_start) - 21) ELSE '' END || '000000000', 1, 9) || 'Z' ELSE range_start END,
    range_end = CASE WHEN length(range_end) BETWEEN 20 AND 29 AND (range_end GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T[0-9][0-9]:[0-9][0-9]:[0-9][0-9]Z' OR (range_end GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T[0-9][0-9]:[0-9][0-9]:[0-9][0-9].[0-9]*Z' AND substr(range_end, 21, length(range_end) - 21) NOT GLOB '*[^0-9]*'))
        THEN substr(range_end, 1, 19) || '.' || substr(CASE WHEN substr(range_end, 20, 1) = '.' THEN substr(range_end, 21, length(range_end) - 21) ELSE '' END || '000000000', 1, 9) || 'Z' ELSE range_end END;
UPDATE audits SET
    range_start = CASE WHEN length(range_start) BETWEEN 20 AND 29 AND (range_start GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T[0-9][0-9]:[0-9][0-9]:[0-9][0-9]Z' OR (range_start GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T[0-9][0-9]:[0-9][0-9]:[0-9][0-9].[0-9]*Z' AND substr(range_start, 21, length(range_start) - 21) NOT GLOB '*[^0-9]*'))
        THEN substr(range_start, 1, 19) || '.' || substr(CASE WHEN substr(range_start, 20, 1) = '.' THEN substr(range_start, 21, length(range_start) - 21) ELSE '' END || '000000000', 1, 9) || 'Z' ELSE range_start END,
    range_end = CASE WHEN length(range_end) BETWEEN 20 AND 29 AND (range_end GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T[0-9][0-9]:[0-9][0-9]:[0-9][0-9]Z' OR (range_end GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T[0-9][0-9]:[0-9][0-9]:[0-9][0-9].[0-9]*Z' AND substr(range_end, 21, length(range_end) - 21) NOT GLOB '*[^0-9]*'))
        THEN substr(range_end, 1, 19) || '.' || substr(CASE WHEN substr(range_end, 20, 1) = '.' THEN substr(range_end, 21, length(range_end) - 21) ELSE '' END || '000000000', 1, 9) || 'Z' ELSE range_end END,
    cursor = CASE WHEN length(cursor) BETWEEN 20 AND 29 AND (cursor GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T[0-9][0-9]:[0-9][0-9]:[0-9][0-9]Z' OR (cursor GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T[0-9][0-9]:[0-9][0-9]:[0-9][0-9].[0-9]*Z' AND substr(cursor, 21, length(cursor) - 21) NOT GLOB '*[^0-9]*'))
        THEN substr(cursor, 1, 19) || '.' || substr(CASE WHEN substr(cursor, 20, 1) = '.' THEN substr(cursor, 21, length(cursor) - 21) ELSE '' END || '000000000', 1, 9) || 'Z' ELSE cursor END,
    started_at = CASE WHEN length(started_at) BETWEEN 20 AND 29 AND (started_at GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T[0-9][0-9]:[0-9][0-9]:[0-9][0-9]Z' OR (started_at GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T[0-9][0-9]:[0-9][0-9]:[0-9][0-9].[0-9]*Z' AND substr(started_at, 21, length(started_at) - 21) NOT GLOB '*[^0-9]*'))
        THEN substr(started_at, 1, 19) || '.' || substr(CASE WHEN substr(started_at, 20, 1) = '.' THEN substr(started_at, 21, length(started_at) - 21) ELSE '' END || '000000000', 1, 9) || 'Z' ELSE started_at END,
    finished_at = CASE WHEN length(finished_at) BETWEEN 20 AND 29 AND (finished_at GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T[0-9][0-9]:[0-9][0-9]:[0-9][0-9]Z' OR (finished_at GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T[0-9][0-9]:[0-9][0-9]:[0-9][0-9].[0-9]*Z' AND substr(finished_at, 21, length(finished_at) - 21) NOT GLOB '*[^0-9]*'))
        THEN substr(finished_at, 1, 19) || '.' || substr(CASE WHEN substr(finished_at, 20, 1) = '.' THEN substr(finished_at, 21, length(finished_at) - 21) ELSE '' END || '000000000', 1, 9) || 'Z' ELSE finished_at END;
UPDATE sync_state SET value = substr(value, 1, 19) || '.' || substr(CASE WHEN substr(value, 20, 1) = '.' THEN substr(value, 21, length(value) - 21) ELSE '' END || '000000000', 1, 9) || 'Z'
 WHERE name IN ('complete_through', 'deep_revisit_at') AND length(value) BETWEEN 20 AND 29 AND (value GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T[0-9][0-9]:[0-9][0-9]:[0-9][0-9]Z' OR (value GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T[0-9][0-9]:[0-9][0-9]:[0-9][0-9].[0-9]*Z' AND substr(value, 21, length(value) - 21) NOT GLOB '*[^0-9]*'));

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
