-- A dead letter waits before its next attempt: the next cycle asks after its first failure,
-- later ones wait half the time it has been failing, at most an hour (SQLite V12,
-- docs/content.md).
-- NULL: asked by the next cycle, as every dead letter written before this migration is. A change
-- of the encounter, a webhook announcing the transcript or `sync --refresh-content` ends the
-- wait; the index finds the waiting dead letters of an encounter.
ALTER TABLE dead_letters ADD COLUMN next_attempt_at_ns bigint;
CREATE INDEX dead_letters_waiting ON dead_letters (encounter_id) WHERE next_attempt_at_ns IS NOT NULL;
