-- Work that exhausted its retries was asked again by every cycle, forever: a document whose
-- route fails on its own (a transcript the server cannot render, say) cost every cycle
-- `limits.max_attempts` requests. A dead letter now waits before its next attempt: the first
-- failed cycle's item is asked again by the next cycle (an outage's items arrive as soon as it
-- is over), the second's after 15 minutes, every later one's after an hour (docs/content.md).
-- NULL: asked by the next cycle, as every dead letter written before this migration is.
ALTER TABLE dead_letters ADD COLUMN next_attempt_at_ns INTEGER;
