-- History audits (`sync --audit`, and the daemon every [sync] audit_every): completed history is
-- re-checked by totals, range by range, against the live rows stored for the same ranges; ranges
-- that differ are narrowed and re-scanned. One row per audit; `cursor` is how far the audit has
-- got, so an audit interrupted by a stop or a live cycle resumes there.
CREATE TABLE audits (
    audit_id      INTEGER PRIMARY KEY,
    range_start   TEXT NOT NULL,         -- inclusive: sync.start_at (or the retention horizon)
    range_end     TEXT NOT NULL,         -- exclusive: complete_through when the audit started
    cursor        TEXT NOT NULL,         -- everything before it has been audited
    status        TEXT NOT NULL CHECK (status IN ('running', 'completed')),
    requested_by  TEXT NOT NULL,         -- 'sync' or 'run'
    started_at    TEXT NOT NULL,
    finished_at   TEXT,
    ranges        INTEGER NOT NULL DEFAULT 0,   -- top-level ranges whose totals were compared
    probes        INTEGER NOT NULL DEFAULT 0,   -- limit=1 list requests asking for a total
    differing     INTEGER NOT NULL DEFAULT 0,   -- ranges (at any level) whose totals differed
    rescanned     INTEGER NOT NULL DEFAULT 0,   -- ranges re-scanned as a reconcile
    list_requests INTEGER NOT NULL DEFAULT 0,   -- probes plus the re-scans' pages
    error         TEXT                   -- what last interrupted it (it then resumes)
) STRICT;
CREATE INDEX audits_by_status ON audits (status);

-- A document the vendor moves to another encounter (filed to the wrong visit) takes its
-- transcript and recording with it, so every table agrees on which encounter holds it.
CREATE TRIGGER documents_moved AFTER UPDATE OF encounter_id ON documents
WHEN old.encounter_id IS NOT new.encounter_id
BEGIN
    UPDATE transcripts SET encounter_id = new.encounter_id WHERE document_id = new.document_id;
    UPDATE recordings SET encounter_id = new.encounter_id WHERE document_id = new.document_id;
END;
