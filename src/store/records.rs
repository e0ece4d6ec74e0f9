//! The records and counts that cross the store seam: what the sync hands the warehouse (a
//! page's encounters, removals, a window's completion, content results) and what the
//! warehouse answers (counts, backfills, audits, work items). Plain data, shared by every
//! backend; how they are stored is the backend's.

use time::OffsetDateTime;

/// An encounter as the warehouse stores it (mapped from the wire type by the sync).
#[derive(Debug, Clone)]
pub struct EncounterRecord {
    pub encounter_id: String,
    pub organization_id: String,
    pub encounter_type: Option<String>,
    pub status: Option<String>,
    pub created_at: OffsetDateTime,
    pub updated_at: OffsetDateTime,
    pub date_of_service: Option<OffsetDateTime>,
    pub patient: Option<PatientRecord>,
    pub documents: Vec<DocumentRecord>,
    pub content_hash: String,
    pub raw_json: String,
}

#[derive(Debug, Clone)]
pub struct PatientRecord {
    pub patient_id: String,
    pub first_name: Option<String>,
    pub last_name: Option<String>,
    /// `YYYY-MM-DD`.
    pub date_of_birth: Option<String>,
}

#[derive(Debug, Clone)]
pub struct DocumentRecord {
    pub document_id: String,
    pub schema_type: String,
    pub title: Option<String>,
    pub status: Option<String>,
    pub workflow_variant: Option<String>,
    pub audio_duration_seconds: Option<f64>,
}

/// What one page did to the warehouse.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PageCounts {
    pub new: u64,
    pub changed: u64,
    pub unchanged: u64,
    /// Inside a purged range, so ignored (a purge is never undone by a re-listing).
    pub purged: u64,
    /// Previously marked removed and seen again.
    pub revived: u64,
    /// Newly marked removed.
    pub removed: u64,
    /// The page was refused, and nothing of it written (neither its removals nor its window's
    /// completion): one of its IDs is another organization's.
    pub refused: Option<IdCollision>,
}

/// A listed encounter, one of its documents or its patient, whose ID the warehouse holds for
/// another organization (clinic) of it. ChartHero's IDs are opaque: nothing promises them unique
/// across clinics, and a warehouse keys encounters, documents and patients by ID alone, so
/// writing the page would take the other clinic's row over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdCollision {
    pub kind: IdKind,
    pub id: String,
    /// The listed encounter it belongs to (the same as `id` for an encounter).
    pub encounter_id: String,
    /// The configured name of the organization the warehouse holds it for (its
    /// `organization_id` when no configured name reads that clinic any more).
    pub holder: String,
}

/// Which of a listed record's IDs collides.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IdKind {
    Encounter,
    Document,
    Patient,
}

impl std::fmt::Display for IdKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            IdKind::Encounter => "encounter",
            IdKind::Document => "document",
            IdKind::Patient => "patient",
        })
    }
}

impl std::fmt::Display for IdCollision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let IdCollision {
            kind,
            id,
            encounter_id,
            holder,
        } = self;
        let of = if *kind == IdKind::Encounter {
            String::new()
        } else {
            format!(" (of encounter {encounter_id})")
        };
        write!(
            f,
            "{kind} {id}{of} is stored for organization {holder}, another clinic of this warehouse: \
             ChartHero's IDs are not unique across these clinics, and one warehouse keys encounters, \
             documents and patients by ID alone; nothing of the page was written. Serve each of these \
             clinics by an instance of its own (charthero-sync@.service, docs/operations.md)"
        )
    }
}

/// An encounter found gone upstream, and why (`encounter_not_found`, `demo_training_denied`,
/// `cross_organization_denied`, `absent_on_reconcile`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Removal {
    pub encounter_id: String,
    pub reason: String,
}

/// A window whose every page has been read; recorded in the same transaction as its last page.
#[derive(Debug, Clone)]
pub struct WindowCompletion {
    /// The configured organization name whose ledger and watermark this window belongs to.
    pub organization: std::sync::Arc<str>,
    pub run_id: i64,
    pub kind: &'static str,
    pub backfill_id: Option<i64>,
    pub start_at: OffsetDateTime,
    pub end_at: OffsetDateTime,
    pub records_seen: u64,
    pub total: u64,
    pub pages: u64,
    pub passes: u64,
    pub removed: u64,
    pub id_set_hash: String,
    /// Move `complete_through` up to `end_at` (never down).
    pub advances_watermark: bool,
}

/// A backfill being worked on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backfill {
    pub backfill_id: i64,
    pub start: OffsetDateTime,
    pub end: OffsetDateTime,
    /// Scanned completely up to here; `start` when nothing is done yet.
    pub cursor: OffsetDateTime,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunOutcome {
    Succeeded,
    /// Ran to the end but left work undone: dead letters or routes disabled for the cycle.
    Partial,
    Failed,
    /// Stopped on request (a signal) before finishing.
    Aborted,
}

impl RunOutcome {
    /// The value of `sync_runs.outcome`.
    pub fn as_str(self) -> &'static str {
        match self {
            RunOutcome::Succeeded => "succeeded",
            RunOutcome::Partial => "partial",
            RunOutcome::Failed => "failed",
            RunOutcome::Aborted => "aborted",
        }
    }
}

/// Counters of one cycle, written to its `sync_runs` row.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RunCounts {
    pub list_requests: u64,
    pub detail_requests: u64,
    pub windows: u64,
    pub encounters_new: u64,
    pub encounters_changed: u64,
    pub encounters_unchanged: u64,
    pub encounters_removed: u64,
    pub rescans: u64,
    pub splits: u64,
    pub documents_fetched: u64,
    pub transcripts_fetched: u64,
    pub recordings_fetched: u64,
    pub retries: u64,
    pub dead_letters: u64,
}

impl RunCounts {
    /// Every counter with the `sync_runs` column it is written to, in declaration order.
    pub fn columns(&self) -> [(&'static str, i64); 14] {
        let n = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        [
            ("list_requests", n(self.list_requests)),
            ("detail_requests", n(self.detail_requests)),
            ("windows", n(self.windows)),
            ("encounters_new", n(self.encounters_new)),
            ("encounters_changed", n(self.encounters_changed)),
            ("encounters_unchanged", n(self.encounters_unchanged)),
            ("encounters_removed", n(self.encounters_removed)),
            ("rescans", n(self.rescans)),
            ("splits", n(self.splits)),
            ("documents_fetched", n(self.documents_fetched)),
            ("transcripts_fetched", n(self.transcripts_fetched)),
            ("recordings_fetched", n(self.recordings_fetched)),
            ("retries", n(self.retries)),
            ("dead_letters", n(self.dead_letters)),
        ]
    }

    /// Adds counters gathered by a concurrent part of the same cycle.
    pub fn merge(&mut self, o: &RunCounts) {
        self.list_requests += o.list_requests;
        self.detail_requests += o.detail_requests;
        self.windows += o.windows;
        self.encounters_new += o.encounters_new;
        self.encounters_changed += o.encounters_changed;
        self.encounters_unchanged += o.encounters_unchanged;
        self.encounters_removed += o.encounters_removed;
        self.rescans += o.rescans;
        self.splits += o.splits;
        self.documents_fetched += o.documents_fetched;
        self.transcripts_fetched += o.transcripts_fetched;
        self.recordings_fetched += o.recordings_fetched;
        self.retries += o.retries;
        self.dead_letters += o.dead_letters;
    }
}

/// How a cycle ended, for its `sync_runs` row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunEnd {
    pub outcome: RunOutcome,
    pub counts: RunCounts,
    /// `route:reason_code` pairs, comma-separated.
    pub disabled_routes: Option<String>,
    pub error: Option<String>,
    pub reason_code: Option<String>,
}

/// An audit being worked on: `[start, end)` of completed history, audited up to `cursor`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Audit {
    pub audit_id: i64,
    pub start: OffsetDateTime,
    pub end: OffsetDateTime,
    pub cursor: OffsetDateTime,
}

/// What an audit did, added to its row as it goes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AuditTally {
    /// Top-level ranges compared.
    pub ranges: u64,
    /// List requests that asked for a total (with a block of records, or `limit=1`).
    pub probes: u64,
    pub differing: u64,
    pub rescanned: u64,
    pub list_requests: u64,
}

/// The kinds of content work, as named in `dead_letters.work`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Work {
    Document,
    Transcript,
    Audio,
}

impl Work {
    pub const ALL: [Work; 3] = [Work::Document, Work::Transcript, Work::Audio];

    /// Whether `skip` names every kind: a claim would find nothing (a list-only cycle).
    pub fn all_skipped(skip: &[Work]) -> bool {
        Work::ALL.iter().all(|w| skip.contains(w))
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Work::Document => "document",
            Work::Transcript => "transcript",
            Work::Audio => "audio",
        }
    }

    /// The kind a stored `work` column names (its CHECK constraint allows these three).
    pub(crate) fn from_stored(text: &str) -> Work {
        match text {
            "document" => Work::Document,
            "transcript" => Work::Transcript,
            _ => Work::Audio,
        }
    }
}

/// One unit of content work.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkItem {
    pub work: Work,
    pub encounter_id: String,
    pub document_id: String,
    /// The document's `audio_duration_seconds`, for recordings whose header says nothing.
    pub audio_duration_seconds: Option<f64>,
    /// The document's `content_seq` when claimed: a result saved after paging observed a newer
    /// change of the document is kept, but does not mark the work done.
    pub content_seq: i64,
    /// The `updated_at` of the last document detail fetched, when claimed: a transcript fetched
    /// for this item is at least that new (`transcripts.fetched_for_updated_at`).
    pub detail_updated_at: Option<String>,
}

/// The longest a dead letter waits before its next attempt ([`dead_letter_retry_at`]).
pub(crate) const DEAD_LETTER_LONGEST_WAIT: time::Duration = time::Duration::hours(1);

/// When a dead letter failing again at `now` is asked next (nanoseconds since the epoch): `None`
/// for one failing for the first time (`first_failed_at` none: the next cycle asks again), else
/// after half the time it has been failing, at most [`DEAD_LETTER_LONGEST_WAIT`]. So the items
/// of an outage arrive within half its length after it ends (a one-cycle outage's with the next
/// cycle), and work that fails on its own (a transcript the server cannot render, say) costs at
/// most one cycle's `limits.max_attempts` requests an hour once it has failed for two, not
/// every cycle's. A change of the encounter, a webhook announcing the transcript and `sync
/// --refresh-content` end the wait.
pub(crate) fn dead_letter_retry_at(
    first_failed_at: Option<OffsetDateTime>,
    now: OffsetDateTime,
) -> Option<i64> {
    let failing = now - first_failed_at?;
    let wait: time::Duration = (failing / 2_i32).clamp(time::Duration::ZERO, DEAD_LETTER_LONGEST_WAIT);
    Some(crate::timefmt::unix_nanos(now + wait))
}

/// Where an answer of "not yet" leaves a work item — the transcript route's for an unfinished
/// transcript, the document or audio route's "not found" for a note or recording its
/// encounter's listing still shows: asked again after the next delay of the schedule, counted
/// in `{prefix}_attempts`; once the schedule is exhausted, only when the document changes. A
/// transcript then stays `not_ready`; a note or a recording becomes `unavailable`, the
/// contract's reading of a lasting 404.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct NotReady {
    prefix: &'static str,
    pub(crate) state: &'static str,
    /// When to ask again (nanoseconds since the epoch); `None` once the schedule is exhausted.
    pub(crate) next_at_ns: Option<i64>,
}

impl NotReady {
    /// The prefix of `work`'s queue columns (`detail_state`, `detail_attempts`, …).
    pub(crate) fn prefix(work: Work) -> &'static str {
        match work {
            Work::Document => "detail",
            Work::Transcript => "transcript",
            Work::Audio => "audio",
        }
    }

    /// The outcome of one more "not yet" for `work` after `attempts` earlier ones.
    pub(crate) fn after(
        work: Work,
        attempts: i64,
        schedule: &[std::time::Duration],
        now: time::OffsetDateTime,
    ) -> NotReady {
        let prefix = NotReady::prefix(work);
        let next_at_ns = usize::try_from(attempts)
            .ok()
            .and_then(|a| schedule.get(a))
            .map(|d| crate::timefmt::unix_nanos(now + *d));
        let state = match (work, next_at_ns) {
            (Work::Transcript, _) | (_, Some(_)) => "not_ready",
            (Work::Document | Work::Audio, None) => "unavailable",
        };
        NotReady {
            prefix,
            state,
            next_at_ns,
        }
    }

    /// The UPDATE that records it, given the backend's placeholders for the document ID, the
    /// state, the next time and the `content_seq` the item was claimed at (a document that
    /// changed meanwhile stays queued).
    pub(crate) fn update_sql(&self, id: &str, state: &str, next_at: &str, seq: &str) -> String {
        let p = self.prefix;
        format!(
            "UPDATE documents SET {p}_state = {state}, {p}_attempts = {p}_attempts + 1, {p}_next_at_ns = {next_at}
             WHERE document_id = {id} AND content_seq = {seq}"
        )
    }
}

/// What the document route said about a document.
#[derive(Debug, Clone)]
pub enum DetailOutcome {
    Note {
        format: String,
        /// `None` when the privacy policy does not keep note text.
        text: Option<String>,
        created_at: OffsetDateTime,
        updated_at: OffsetDateTime,
    },
    Ambient {
        status: Option<String>,
        audio_duration_seconds: Option<f64>,
        created_at: OffsetDateTime,
        updated_at: OffsetDateTime,
    },
    /// 400 `unsupported_document_type`: recorded, not asked again unless the type changes.
    Unsupported,
    /// 403 `cross_organization_denied` or `demo_training_denied`: not this key's record.
    Unavailable,
}

/// A transcript as the warehouse stores it.
#[derive(Debug, Clone)]
pub struct TranscriptRecord {
    pub provider: Option<String>,
    pub audio_duration_seconds: Option<f64>,
    /// In API order; text `None` when the privacy policy does not keep transcript text.
    pub turns: Vec<TurnRecord>,
    /// SHA-256 (hex) of all of the above, so that a transcript fetched again unchanged is not
    /// rewritten.
    pub content_sha256: String,
}

impl TranscriptRecord {
    /// The record of a transcript as it will be stored (text already dropped when the privacy
    /// policy does not keep it), with its digest. Hashing a 2 MB transcript takes milliseconds,
    /// so callers do it before the write, off the writer thread.
    pub fn new(
        provider: Option<String>,
        audio_duration_seconds: Option<f64>,
        turns: Vec<TurnRecord>,
    ) -> TranscriptRecord {
        use sha2::{Digest, Sha256};
        // Every field is tagged and length-prefixed, so that no two different records hash the
        // same bytes; floats by their bits, so that equal means identical.
        fn text(h: &mut Sha256, t: &Option<String>) {
            match t {
                Some(t) => {
                    h.update([1]);
                    h.update((t.len() as u64).to_le_bytes());
                    h.update(t.as_bytes());
                }
                None => h.update([0]),
            }
        }
        let mut h = Sha256::new();
        text(&mut h, &provider);
        match audio_duration_seconds {
            Some(d) => {
                h.update([1]);
                h.update(d.to_bits().to_le_bytes());
            }
            None => h.update([0]),
        }
        h.update((turns.len() as u64).to_le_bytes());
        for (speaker, start, end, t) in &turns {
            text(&mut h, speaker);
            h.update(start.to_bits().to_le_bytes());
            h.update(end.to_bits().to_le_bytes());
            text(&mut h, t);
        }
        let content_sha256 = crate::store::hex(&h.finalize());
        TranscriptRecord {
            provider,
            audio_duration_seconds,
            turns,
            content_sha256,
        }
    }
}

/// A downloaded recording.
#[derive(Debug, Clone)]
pub struct RecordingRecord {
    /// Relative to the audio directory.
    pub path: String,
    pub size_bytes: u64,
    pub sha256: String,
    pub duration_seconds: Option<f64>,
}

/// What a purge removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PurgeCounts {
    pub encounters: u64,
    pub documents: u64,
    pub transcripts: u64,
    pub turns: u64,
    pub recordings: u64,
    pub history_rows: u64,
    /// Recording files (relative to the audio directory) no longer referenced by any row.
    pub orphaned_files: Vec<String>,
}

impl PurgeCounts {
    /// Deletes the orphaned recording files under `audio_dir` (one already gone is fine). A
    /// purge does so even when removing the purged bytes from the warehouse's files failed: no
    /// row points at them any more, so no later purge would find them.
    pub(crate) fn delete_orphaned_files(&self, audio_dir: &std::path::Path) -> anyhow::Result<()> {
        for file in &self.orphaned_files {
            let path = audio_dir.join(file);
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => anyhow::bail!("cannot delete recording {}: {e}", path.display()),
            }
        }
        Ok(())
    }
}

/// A transcript turn as stored: (speaker, start, end, text).
pub type TurnRecord = (Option<String>, f64, f64, Option<String>);

/// A two-turn finished transcript whose second turn says `text` (the backends' tests).
#[cfg(test)]
pub(crate) fn sample_transcript(text: &str) -> TranscriptRecord {
    TranscriptRecord::new(
        Some("deepgram".to_owned()),
        Some(12.5),
        vec![
            (
                Some("clinician".to_owned()),
                0.0,
                1.5,
                Some("Good morning.".to_owned()),
            ),
            (Some("patient".to_owned()), 1.75, 3.0, Some(text.to_owned())),
        ],
    )
}

/// A ChartHero webhook event whose delivery was verified (`webhook_events`): a thin pointer,
/// IDs and instants only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookEvent {
    pub event_id: String,
    pub event_type: String,
    pub api_version: String,
    pub occurred_at: OffsetDateTime,
    /// ChartHero's, as the event names it.
    pub organization_id: String,
    pub encounter_id: Option<String>,
    pub document_id: Option<String>,
}

/// What became of a stored webhook event (`webhook_events.state`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WebhookState {
    /// Accepted; the organization's next cycle handles it.
    Pending,
    /// The document's transcript was queued for the content worker.
    Queued,
    /// The encounter or its document is not there for this key (the scheduled sync decides).
    NotFound,
    /// An event of a type the sync does not act on, whose content is turned off, or about an
    /// encounter older than the history the organization keeps.
    Ignored,
    /// Its handling failed in [`crate::sync::webhook::MAX_ATTEMPTS`] cycles; left to the
    /// scheduled sync.
    Failed,
}

impl WebhookState {
    pub fn as_str(self) -> &'static str {
        match self {
            WebhookState::Pending => "pending",
            WebhookState::Queued => "queued",
            WebhookState::NotFound => "not_found",
            WebhookState::Ignored => "ignored",
            WebhookState::Failed => "failed",
        }
    }
}

#[cfg(test)]
mod tests {
    use time::Duration;
    use time::macros::datetime;

    use super::dead_letter_retry_at;
    use crate::timefmt::unix_nanos;

    #[test]
    fn a_dead_letter_waits_half_the_time_it_has_been_failing_at_most_an_hour() {
        let now = datetime!(2026-12-01 12:00 UTC);
        let after = |failing: Duration| dead_letter_retry_at(Some(now - failing), now);
        assert_eq!(dead_letter_retry_at(None, now), None, "a first failure");
        assert_eq!(after(Duration::ZERO), Some(unix_nanos(now)));
        assert_eq!(
            after(Duration::seconds(30)),
            Some(unix_nanos(now + Duration::seconds(15)))
        );
        assert_eq!(
            after(Duration::minutes(30)),
            Some(unix_nanos(now + Duration::minutes(15)))
        );
        assert_eq!(
            after(Duration::hours(3)),
            Some(unix_nanos(now + Duration::hours(1)))
        );
        // A first failure in the future (the clock went back): no wait.
        assert_eq!(after(-Duration::hours(1)), Some(unix_nanos(now)));
    }
}
