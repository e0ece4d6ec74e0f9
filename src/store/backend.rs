//! The store seam: [`Reader`] (what `status` and the demo read, also on a read-only
//! connection), [`Backend`] (every operation the sync, content, audit, daemon and one-shot
//! commands ask of the warehouse) and [`WriteTx`] (the writes that run inside the writer's
//! shared, group-committed transaction). Callers see only these traits, the record types
//! (`store::records`) and [`super::StoreError`]; no database library's types appear in a
//! signature here, so a second backend implements the same three traits. What the operations
//! do (SQL, schema, migrations) is the implementation's (`store::sqlite`); how writes are
//! queued and grouped is [`super::Writer`]'s.

use std::collections::HashSet;
use std::path::Path;

use time::OffsetDateTime;

use super::{
    Audit, AuditTally, Backfill, DetailOutcome, EncounterRecord, PageCounts, PurgeCounts, RecordingRecord,
    Removal, RunCounts, RunEnd, TranscriptRecord, WebhookEvent, WebhookState, WindowCompletion, Work,
    WorkItem,
};
use crate::config::PrivacyConfig;
use crate::status::Status;

/// How a write transaction ended ([`Backend::write_group`]).
#[derive(Debug)]
pub enum GroupEnd {
    /// Every write in it is durable.
    Committed,
    /// The body asked for a rollback (one of its writes failed); nothing of it is stored.
    RolledBack,
    /// No transaction could be started; the body did not run.
    CannotBegin(anyhow::Error),
    /// The body ran but the commit failed; the transaction was rolled back.
    CannotCommit(anyhow::Error),
}

/// The writes that run inside a write transaction shared with the other writes queued next to
/// them: the transaction commits (or rolls back) as a whole, after all of them ran.
pub trait WriteTx {
    /// Upserts a page of encounters (an identical record, same content hash, costs no write),
    /// marks `removals`, queues the content work each new or changed document needs, and with
    /// `completion` records the window's ledger row and moves the watermark or backfill cursor.
    fn commit_page(
        &self,
        records: &[EncounterRecord],
        removals: &[Removal],
        completion: Option<&WindowCompletion>,
        now: OffsetDateTime,
    ) -> anyhow::Result<PageCounts>;
    /// Stores a note's or document's detail (or its absence) and settles its work item.
    fn save_detail(
        &self,
        item: &WorkItem,
        outcome: &DetailOutcome,
        audio: bool,
        now: OffsetDateTime,
    ) -> anyhow::Result<()>;
    /// Stores a finished transcript and its turns (an identical one is not rewritten).
    fn save_transcript(
        &self,
        item: &WorkItem,
        t: &TranscriptRecord,
        now: OffsetDateTime,
    ) -> anyhow::Result<()>;
    /// Schedules the next look at a transcript that is not finished yet, or at a note the
    /// document route did not find while the list shows it ([`crate::store::NotReady`]).
    fn not_ready(
        &self,
        item: &WorkItem,
        schedule: &[std::time::Duration],
        now: OffsetDateTime,
    ) -> anyhow::Result<()>;
    /// Settles a work item whose object no longer exists upstream.
    fn mark_unavailable(&self, item: &WorkItem) -> anyhow::Result<()>;
    /// `sync --refresh-content`: queues the notes and finished transcripts of the organization's
    /// live encounters created in `[start_ns, end_ns)` again, as if each encounter had changed;
    /// returns how many documents were queued.
    fn requeue_content(&self, organization_id: &str, start_ns: i64, end_ns: i64) -> anyhow::Result<u64>;
    /// Records a downloaded recording.
    fn save_recording(
        &self,
        encounter_id: &str,
        document_id: &str,
        r: &RecordingRecord,
        now: OffsetDateTime,
    ) -> anyhow::Result<()>;
    /// Records a work item given up on for this cycle.
    #[allow(clippy::too_many_arguments)]
    fn dead_letter(
        &self,
        organization: &str,
        item: &WorkItem,
        run_id: i64,
        reason_code: Option<&str>,
        error: &str,
        now: OffsetDateTime,
    ) -> anyhow::Result<()>;

    /// The implementation itself, for its own unit tests' statements.
    #[cfg(test)]
    fn as_any(&self) -> &dyn std::any::Any;
}

/// Every row of the warehouse's main tables, removed ones included (the demo's summary).
#[derive(Debug, Clone, Copy, Default)]
pub struct TableCounts {
    pub encounters: i64,
    pub patients: i64,
    pub documents: i64,
    /// Documents with text.
    pub notes: i64,
    pub transcripts: i64,
    pub turns: i64,
}

/// An instant the sync keeps per organization (in `organization_state`) besides its watermark.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StateTime {
    /// When the last deep revisit completed.
    DeepRevisitAt,
    /// Until when ChartHero asked for no requests with the organization's key (a `Retry-After`
    /// longer than a request waits): a new process sends nothing before it either.
    PausedUntil,
    /// When the organization's running cycle last wrote its counters
    /// ([`Backend::record_progress`], every [`crate::sync::PROGRESS_EVERY`]): `status` tells a
    /// cycle at work from one whose process is gone.
    Heartbeat,
}

impl StateTime {
    /// Its `organization_state.name`.
    pub fn name(self) -> &'static str {
        match self {
            StateTime::DeepRevisitAt => "deep_revisit_at",
            StateTime::PausedUntil => "paused_until",
            StateTime::Heartbeat => "cycle_heartbeat_at",
        }
    }
}

/// What may be read from a warehouse, also on a read-only connection next to a running writer
/// (`status`, the demo's summary): never a write.
pub trait Reader: Send {
    /// Whether the process holding the warehouse's writer lock (a `run` or `sync`) is alive at
    /// `now`: on SQLite, it touched the lock file within `grace`; on PostgreSQL, a session holds
    /// the schema's advisory lock. `None` when this reader cannot tell.
    fn writer_present(&self, now: OffsetDateTime, grace: time::Duration) -> Option<bool>;
    /// The live watermark: every record created before it is stored.
    fn complete_through(&self, organization: &str) -> anyhow::Result<Option<OffsetDateTime>>;
    /// An instant kept for the organization, if it was ever set.
    fn state_time(&self, organization: &str, which: StateTime) -> anyhow::Result<Option<OffsetDateTime>>;
    /// ChartHero's `organization_id` recorded for a configured name.
    fn known_organization_id(&self, organization: &str) -> anyhow::Result<Option<String>>;
    /// Every configured name whose clinic is recorded, with ChartHero's `organization_id`.
    fn recorded_clinics(&self) -> anyhow::Result<Vec<(String, String)>>;
    /// Stored live encounters created in `[start_ns, end_ns)`.
    fn live_count_in_range(
        &self,
        organization_id: Option<&str>,
        start_ns: i64,
        end_ns: i64,
    ) -> anyhow::Result<u64>;
    /// `charthero-sync status`: the whole warehouse, and one entry per organization (those in
    /// `configured` first, in that order, then any other it holds bookkeeping for).
    fn status(&self, now: OffsetDateTime, configured: &[String]) -> anyhow::Result<Status>;
    /// Live encounters, and the live documents that are notes, finished transcripts and
    /// anything else (the content mix of a backfill's ETA).
    fn live_content_counts(&self) -> anyhow::Result<[i64; 4]>;
    /// Every row of the main tables.
    fn table_counts(&self) -> anyhow::Result<TableCounts>;
    /// A flag [`Backend::set_marker`] set, if it is set.
    fn marker(&self, name: &str) -> anyhow::Result<Option<String>>;
}

/// One open warehouse for writing, owned by one thread at a time (the [`super::Writer`]'s, or a
/// one-shot command's `store::blocking` closure). Every [`Reader`] read is here too. Methods
/// outside [`Backend::write_group`] run outside any shared transaction; those that change
/// several rows at once open their own.
pub trait Backend: Reader {
    /// What errors name the database by: the file for SQLite, `postgresql://user@host:port/db
    /// (schema s)` for PostgreSQL (never a password).
    fn location(&self) -> String;

    /// Starts a write transaction, runs `body` in it, and commits if `body` answers `true`, else
    /// rolls back. The writer thread's group commit is built on this.
    fn write_group(&mut self, body: &mut dyn FnMut(&dyn WriteTx) -> bool) -> GroupEnd;

    // Run and window bookkeeping (the ledger), per configured organization name.

    /// Sets an instant kept for the organization.
    fn set_state_time(&self, organization: &str, which: StateTime, at: OffsetDateTime) -> anyhow::Result<()>;
    /// Records the name's `organization_id`, or answers the one already recorded if it differs.
    fn claim_organization_id(
        &self,
        organization: &str,
        organization_id: &str,
        now: OffsetDateTime,
    ) -> anyhow::Result<Result<(), String>>;
    /// IDs of stored, not removed encounters created in `[start, end)` (removal candidates).
    fn live_ids_in_range(
        &self,
        organization_id: &str,
        start: OffsetDateTime,
        end: OffsetDateTime,
    ) -> anyhow::Result<Vec<String>>;
    /// Opens (or resumes) the backfill of a range.
    fn open_backfill(
        &self,
        organization: &str,
        start: OffsetDateTime,
        end: OffsetDateTime,
        requested_by: &str,
        now: OffsetDateTime,
    ) -> anyhow::Result<Backfill>;
    /// Queues a backfill of a range for the daemon to run.
    fn queue_backfill(
        &self,
        organization: &str,
        start: OffsetDateTime,
        end: OffsetDateTime,
        requested_by: &str,
        now: OffsetDateTime,
    ) -> anyhow::Result<i64>;
    // ChartHero's webhook deliveries (`webhook_events`), per configured organization name.

    /// Stores a verified delivery's event unless the organization holds it already; answers
    /// whether it is new (a repeated delivery only counts as one more).
    fn record_webhook_event(
        &self,
        organization: &str,
        event: &WebhookEvent,
        delivery_id: &str,
        now: OffsetDateTime,
    ) -> anyhow::Result<bool>;
    /// Up to `limit` of the organization's events not handled yet, oldest first.
    fn pending_webhook_events(&self, organization: &str, limit: usize) -> anyhow::Result<Vec<WebhookEvent>>;
    /// Records what became of a stored event.
    fn settle_webhook_event(
        &self,
        organization: &str,
        event_id: &str,
        state: WebhookState,
        now: OffsetDateTime,
    ) -> anyhow::Result<()>;
    /// Deletes the organization's dead letters no claim can pick up any more (their document or
    /// its encounter removed, or gone, or the work no longer queued), then counts the rest by
    /// kind of work, waiting or due.
    fn dead_letters_left(&self, organization: &str) -> anyhow::Result<Vec<(Work, i64)>>;
    /// Deletes the organization's handled events (any state but `pending`) received before
    /// `before`; answers how many.
    fn prune_webhook_events(&self, organization: &str, before: OffsetDateTime) -> anyhow::Result<u64>;
    /// Counts a cycle whose handling of a stored event failed; the event is `failed` once
    /// `max_attempts` cycles did. Answers whether it was given up.
    fn webhook_event_failed(
        &self,
        organization: &str,
        event_id: &str,
        max_attempts: u32,
        now: OffsetDateTime,
    ) -> anyhow::Result<bool>;
    /// For a webhook event that occurred at `occurred_at`, the transcript of a live ambient
    /// document of a live encounter of the organization: `current` (queued, or fetched at or
    /// after the event), else its state (`none` for none yet); `None` when the warehouse holds
    /// no such document.
    fn transcript_state(
        &self,
        organization_id: &str,
        encounter_id: &str,
        document_id: &str,
        occurred_at: OffsetDateTime,
    ) -> anyhow::Result<Option<String>>;
    /// Queues that document's transcript for the content worker at once, whatever its summary's
    /// status says and whatever its schedule was (ChartHero said it is ready), unless it is
    /// current; answers `false` when the warehouse holds no such document.
    fn queue_transcript_now(
        &self,
        organization_id: &str,
        encounter_id: &str,
        document_id: &str,
        occurred_at: OffsetDateTime,
    ) -> anyhow::Result<bool>;

    /// The range of the next queued or unfinished backfill.
    fn next_backfill(&self, organization: &str) -> anyhow::Result<Option<(OffsetDateTime, OffsetDateTime)>>;
    fn finish_backfill(
        &self,
        backfill_id: i64,
        error: Option<&str>,
        now: OffsetDateTime,
    ) -> anyhow::Result<()>;
    /// Marks runs a crash left open as aborted; answers how many.
    fn abort_stale_runs(&self, organization: &str, now: OffsetDateTime) -> anyhow::Result<usize>;
    fn start_run(&self, organization: &str, trigger: &str, now: OffsetDateTime) -> anyhow::Result<i64>;
    fn finish_run(&self, run_id: i64, end: &RunEnd, now: OffsetDateTime) -> anyhow::Result<()>;
    /// Writes the counters of a run still going, and `now` as its organization's
    /// [`StateTime::Heartbeat`].
    fn record_progress(
        &self,
        organization: &str,
        run_id: i64,
        counts: &RunCounts,
        now: OffsetDateTime,
    ) -> anyhow::Result<()>;

    // The history audit.

    fn open_audit(
        &self,
        organization: &str,
        start: OffsetDateTime,
        end: OffsetDateTime,
        requested_by: &str,
        now: OffsetDateTime,
    ) -> anyhow::Result<Audit>;
    fn audit_due(
        &self,
        organization: &str,
        every: time::Duration,
        now: OffsetDateTime,
    ) -> anyhow::Result<bool>;
    fn advance_audit(&self, audit_id: i64, cursor: OffsetDateTime, tally: &AuditTally) -> anyhow::Result<()>;
    fn finish_audit(&self, audit_id: i64, now: OffsetDateTime) -> anyhow::Result<()>;
    fn audit_failed(&self, audit_id: i64, error: &str) -> anyhow::Result<()>;
    /// `created_at` (unix ns) of the `n`th stored live encounter in the range.
    fn nth_live_created_ns(
        &self,
        organization_id: Option<&str>,
        start_ns: i64,
        end_ns: i64,
        n: u64,
    ) -> anyhow::Result<Option<i64>>;
    /// Whether the stored encounters at `offset` in the range are exactly `block`.
    fn block_agrees(
        &self,
        organization_id: Option<&str>,
        start_ns: i64,
        end_ns: i64,
        offset: u64,
        block: &[(String, i64)],
    ) -> anyhow::Result<bool>;

    // The content queue.

    /// Claims up to `limit` due work items.
    #[allow(clippy::too_many_arguments)]
    fn claim_work(
        &self,
        organization_id: Option<&str>,
        run_id: i64,
        skip: &[Work],
        exclude: &HashSet<(Work, String)>,
        limit: usize,
        now: OffsetDateTime,
    ) -> anyhow::Result<Vec<WorkItem>>;
    /// Queues the recordings `audio.enabled` now asks for; answers how many.
    fn queue_missing_audio(&self, organization_id: Option<&str>) -> anyhow::Result<usize>;

    // Privacy and purges.

    /// Applies a privacy policy to stored rows; answers whether it changed anything.
    fn apply_privacy(&mut self, privacy: &PrivacyConfig) -> anyhow::Result<bool>;
    /// Removes every encounter created in `[start, end)` and what hangs off it.
    fn purge(
        &mut self,
        audio_dir: &Path,
        start: OffsetDateTime,
        end: OffsetDateTime,
        reason: &str,
        now: OffsetDateTime,
    ) -> anyhow::Result<PurgeCounts>;
    /// The purged ranges (unix ns), never synced again.
    fn purged_ranges(&self) -> anyhow::Result<Vec<(i64, i64)>>;
    fn last_retention_purge(&self) -> anyhow::Result<Option<OffsetDateTime>>;

    // Maintenance.

    /// Makes what was committed durable in the main database and cuts its log back.
    fn checkpoint(&self) -> anyhow::Result<()>;
    /// How far the log is cut back after a checkpoint (`database.wal_size_limit`).
    fn set_wal_size_limit(&self, bytes: u64) -> anyhow::Result<()>;
    /// Rebuilds the full-text search indexes from the text they index (`reindex`).
    fn rebuild_search(&self) -> anyhow::Result<()>;
    /// Sets a named flag in the warehouse's own state, once (the demo warehouse's marker).
    fn set_marker(&self, name: &str) -> anyhow::Result<()>;

    /// The implementation itself, for its own unit tests' statements.
    #[cfg(test)]
    fn as_any_mut(&mut self) -> &mut dyn std::any::Any;
}
