-- Content at the request floor (docs/content.md has the full table of which request is made when).
--
-- An ambient transcript document is no longer asked for its detail on first sight: the list's
-- document summary already carries `status` and `audio_duration_seconds`, so a finished one
-- queues its transcript directly. Its detail is asked only when the answer can change what the
-- sync does: the encounter changed while the document's own summary did not, and a transcript
-- is held (is it still current?). So for ambient documents:
--   * detail_state gains the value 'skipped': never asked, nothing it could say was needed.
--     detail_created_at / detail_updated_at stay NULL until a detail is fetched, and hold the
--     values of the last detail fetched (which can predate a later change of the summary).
--   * transcripts.fetched_for_updated_at is the document `updated_at` of the last detail fetched
--     before the transcript request (the transcript is at least that new), or NULL when no
--     detail was fetched before it: the next detail check then fetches the transcript again.
-- No DDL is needed for these meanings; this file records them and moves an earlier version's
-- queue onto the new rules.

-- Counts observed changes that can affect a document's content: bumped when paging sees its
-- encounter or its summary change (or a fetched detail re-queues its transcript). Work claimed
-- at an older value is saved but stays queued, so a fetch that was in flight when the change
-- was observed cannot mark the newer state done.
ALTER TABLE documents ADD COLUMN content_seq INTEGER NOT NULL DEFAULT 0;

-- Ambient details queued by an earlier version that the new rules would not ask: every queued
-- ambient detail except the check of a finished document whose transcript is held. The summary
-- decides the transcript instead, as it does on first sight.
UPDATE documents
   SET detail_state = CASE WHEN detail_updated_at IS NULL THEN 'skipped' ELSE 'done' END,
       transcript_state = CASE WHEN status = 'completed' THEN 'pending' ELSE 'waiting' END,
       transcript_attempts = 0,
       transcript_next_at_ns = NULL
 WHERE schema_type = 'ambient_transcript'
   AND detail_state = 'pending'
   AND NOT (status = 'completed'
            AND EXISTS (SELECT 1 FROM transcripts t WHERE t.document_id = documents.document_id));
