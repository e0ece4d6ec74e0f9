-- A note's detail answered "not found" while its encounter is still listed is asked again on a
-- schedule, as a transcript's "not yet" is (docs/content.md). A server whose document route
-- lags its list (a replica, a search index filled first) answers 404 for a note it lists;
-- before this migration that note was marked 'unavailable' and never asked again unless its
-- encounter changed, so its text could be missing for good.
--
-- documents.detail_state gains 'not_ready': asked again at detail_next_at_ns (1 min, 5 min,
-- 15 min, 1 h and 6 h after each answer), then 'unavailable' as before; any change of the
-- encounter queues it at once.

-- How often the document route answered "not found" since the detail was last fetched or the
-- document last changed.
ALTER TABLE documents ADD COLUMN detail_attempts INTEGER NOT NULL DEFAULT 0;
-- When to ask again (nanoseconds since the epoch); NULL unless detail_state = 'not_ready'.
ALTER TABLE documents ADD COLUMN detail_next_at_ns INTEGER;

DROP INDEX documents_detail_work;
CREATE INDEX documents_detail_work ON documents (detail_state)
    WHERE detail_state IN ('pending', 'not_ready');
