-- A recording the audio route did not find is asked again on the not-ready schedule, as a
-- note's detail is since V2 (SQLite V10, docs/content.md): documents.audio_state gains
-- 'not_ready', asked again at audio_next_at_ns, then 'unavailable'.
ALTER TABLE documents ADD COLUMN audio_attempts bigint NOT NULL DEFAULT 0;
ALTER TABLE documents ADD COLUMN audio_next_at_ns bigint;

DROP INDEX documents_audio_work;
CREATE INDEX documents_audio_work ON documents (audio_state)
    WHERE audio_state IN ('pending', 'not_ready');

-- What earlier releases gave up on after one "not found" is asked once more, one request each
-- (SQLite V10).
UPDATE documents SET detail_state = 'not_ready', detail_attempts = 5, detail_next_at_ns = 0
 WHERE detail_state = 'unavailable' AND schema_type <> 'ambient_transcript' AND removed_at IS NULL
   AND EXISTS (SELECT 1 FROM encounters e
               WHERE e.encounter_id = documents.encounter_id AND e.removed_at IS NULL);
UPDATE documents SET audio_state = NULL, audio_attempts = 5, audio_next_at_ns = NULL
 WHERE audio_state = 'unavailable' AND removed_at IS NULL
   AND EXISTS (SELECT 1 FROM encounters e
               WHERE e.encounter_id = documents.encounter_id AND e.removed_at IS NULL);
