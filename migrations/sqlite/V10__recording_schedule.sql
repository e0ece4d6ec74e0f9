-- A recording the audio route did not find (404, 409, 410) for a document that is final is
-- asked again on the not-ready schedule, as a note's detail is since V9 (docs/content.md): a
-- recording is processed after its transcript, and a route that answers before it is stored
-- says "not found". Before this migration such a recording was marked 'unavailable' for good.
--
-- documents.audio_state gains 'not_ready': asked again at audio_next_at_ns (1 min, 5 min,
-- 15 min, 1 h and 6 h after each answer), then 'unavailable'; a change of its encounter
-- queues an unavailable recording again.
ALTER TABLE documents ADD COLUMN audio_attempts INTEGER NOT NULL DEFAULT 0;
ALTER TABLE documents ADD COLUMN audio_next_at_ns INTEGER;

DROP INDEX documents_audio_work;
CREATE INDEX documents_audio_work ON documents (audio_state)
    WHERE audio_state IN ('pending', 'not_ready');

-- What earlier releases gave up on after one "not found" is asked once more, one request
-- each, as the last step of its schedule (attempts = the schedule's 5 delays): notes and
-- recordings marked unavailable, of live documents of live encounters. A note is due at once;
-- a recording is forgotten, so that the next cycle with audio enabled queues it again if it
-- is final (a 403 for another organization's record answers the same and is marked so again).
UPDATE documents SET detail_state = 'not_ready', detail_attempts = 5, detail_next_at_ns = 0
 WHERE detail_state = 'unavailable' AND schema_type <> 'ambient_transcript' AND removed_at IS NULL
   AND EXISTS (SELECT 1 FROM encounters e
               WHERE e.encounter_id = documents.encounter_id AND e.removed_at IS NULL);
UPDATE documents SET audio_state = NULL, audio_attempts = 5, audio_next_at_ns = NULL
 WHERE audio_state = 'unavailable' AND removed_at IS NULL
   AND EXISTS (SELECT 1 FROM encounters e
               WHERE e.encounter_id = documents.encounter_id AND e.removed_at IS NULL);
