-- No INSERT trigger on `encounters` or `documents` (docs/operations.md, "How a backfill is
-- written").
--
-- SQLite evaluates an `INSERT … SELECT` into a table that has an INSERT trigger into a temporary
-- table first: the merge of staged backfill pages copied every staged encounter, its raw JSON
-- with the patient's name and date of birth included, and every staged document into SQLite's
-- temporary files outside the warehouse's directory (about 1.2 KB per encounter) before writing
-- them. Without the triggers the merge writes straight from the staged rows.
--
-- An encounter's `created` history row is written by the statement that inserts the encounter
-- (record by record; in a merge, by the statement after it, in the same order); a change,
-- removal or revival is still recorded by `encounters_history_update`. A note's text never
-- arrives with its document's first row (the list carries none): the document route's answer
-- fills it in by an UPDATE, which `notes_fts_update` indexes.
DROP TRIGGER encounters_history_insert;
DROP TRIGGER notes_fts_insert;
