-- Content at the request floor (docs/content.md has the table of which request is made when).
--
-- An ambient transcript document's detail is no longer asked: the list's document summary
-- already carries `status` and `audio_duration_seconds`, so a finished one queues its transcript
-- directly, and on a changed encounter the transcript itself is fetched again (the one request
-- a detail would have cost to say whether it changed). Meanings that change without DDL:
--   * documents.detail_state gains 'skipped': not asked, because nothing it could return is
--     needed (every ambient document from now on).
--   * documents.detail_created_at / detail_updated_at are filled only when a detail was fetched:
--     for notes always, for ambient documents only by an earlier version (kept as they were).
--   * transcripts.fetched_for_updated_at is the detail `updated_at` known before the transcript
--     request (the transcript is at least that new); NULL when no detail had been fetched.

-- Counts observed changes that can affect a document's content: bumped when paging writes the
-- document's row or sees its encounter change (and when a fetched detail re-queues its
-- transcript). Work claimed at an older value is saved but stays queued, so a fetch already in
-- flight when a change was observed cannot mark the newer state done.
ALTER TABLE documents ADD COLUMN content_seq INTEGER NOT NULL DEFAULT 0;

-- SHA-256 of the transcript as stored (provider, duration, turns; text only when the privacy
-- policy keeps it). A transcript fetched again unchanged is not rewritten. NULL for rows written
-- before this migration: their next fetch rewrites them once.
ALTER TABLE transcripts ADD COLUMN content_sha256 TEXT;

-- Ambient details an earlier version queued are not asked under the new rules: the summary
-- decides the transcript instead (fetched again when finished, since its encounter changed or
-- it is new), exactly as paging now decides it.
UPDATE documents
   SET detail_state = CASE WHEN detail_updated_at IS NULL THEN 'skipped' ELSE 'done' END,
       transcript_state = CASE WHEN status = 'completed' THEN 'pending' ELSE 'waiting' END,
       transcript_attempts = 0,
       transcript_next_at_ns = NULL
 WHERE schema_type = 'ambient_transcript' AND detail_state = 'pending';
