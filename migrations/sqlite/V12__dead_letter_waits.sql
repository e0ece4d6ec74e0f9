-- Work that exhausted its retries was asked again by every cycle, forever: a document whose
-- route fails on its own (a transcript the server cannot render, say) cost every cycle
-- `limits.max_attempts` requests. A dead letter now waits before its next attempt: the first
-- failed cycle's item is asked again by the next cycle (a one-cycle outage's items arrive with
-- it), the second's after 15 minutes, every later one's after an hour (docs/content.md).
-- NULL: asked by the next cycle, as every dead letter written before this migration is. A change
-- of the encounter, a webhook announcing the transcript or `sync --refresh-content` ends the
-- wait; the index finds the waiting dead letters of an encounter.
ALTER TABLE dead_letters ADD COLUMN next_attempt_at_ns INTEGER;
CREATE INDEX dead_letters_waiting ON dead_letters (encounter_id) WHERE next_attempt_at_ns IS NOT NULL;
