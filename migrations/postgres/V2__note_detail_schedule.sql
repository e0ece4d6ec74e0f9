-- A note's detail answered "not found" while its encounter is still listed is asked again on a
-- schedule, as a transcript's "not yet" is (SQLite V9, docs/content.md): documents.detail_state
-- gains 'not_ready', asked again at detail_next_at_ns, then 'unavailable' as before.
ALTER TABLE documents ADD COLUMN detail_attempts bigint NOT NULL DEFAULT 0;
ALTER TABLE documents ADD COLUMN detail_next_at_ns bigint;

DROP INDEX documents_detail_work;
CREATE INDEX documents_detail_work ON documents (detail_state)
    WHERE detail_state IN ('pending', 'not_ready');
