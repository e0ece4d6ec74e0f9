-- A dead letter waits before its next attempt: by the next cycle after the first failed cycle,
-- 15 minutes after the second, an hour after every later one (SQLite V12, docs/content.md).
-- NULL: asked by the next cycle, as every dead letter written before this migration is.
ALTER TABLE dead_letters ADD COLUMN next_attempt_at_ns bigint;
