-- A recording the audio route did not find (404, 409, 410) for a document that is final is
-- asked again on the not-ready schedule, as a note's detail is since V9 (docs/content.md): a
-- recording is processed after its transcript, and a route that answers before it is stored
-- says "not found". Before this migration such a recording was marked 'unavailable' for good.
--
-- documents.audio_state gains 'not_ready': asked again at audio_next_at_ns (1 min, 5 min,
-- 15 min, 1 h and 6 h after each answer), then 'unavailable'; a change of the document's
-- summary queues an unavailable recording again.
ALTER TABLE documents ADD COLUMN audio_attempts INTEGER NOT NULL DEFAULT 0;
ALTER TABLE documents ADD COLUMN audio_next_at_ns INTEGER;

DROP INDEX documents_audio_work;
CREATE INDEX documents_audio_work ON documents (audio_state)
    WHERE audio_state IN ('pending', 'not_ready');

-- What earlier releases gave up on after one "not found" is asked once more: notes and
-- recordings marked unavailable (a 403 for another organization's record answers the same
-- again and is marked so again, one request each).
UPDATE documents SET detail_state = 'not_ready', detail_attempts = 0, detail_next_at_ns = 0
 WHERE detail_state = 'unavailable' AND schema_type <> 'ambient_transcript' AND removed_at IS NULL;
UPDATE documents SET audio_state = 'not_ready', audio_attempts = 0, audio_next_at_ns = 0
 WHERE audio_state = 'unavailable' AND removed_at IS NULL;
