//! The PostgreSQL implementation of the store seam: embedded refinery migrations
//! (`migrations/postgres`), the schema-version rules of `open_current`, and the trait impls,
//! each dispatching to a submodule function that mirrors SQLite's (`upsert`, `ledger`, `audit`,
//! `content`, `privacy`, `status`): `f(db: &mut impl postgres::GenericClient, …)` with the SQLite
//! function's other parameters and result. Every statement names tables unqualified: the
//! connection's `search_path` selects the warehouse's schema. `import` fills an empty warehouse
//! from another one (`charthero-sync copy`).
//!
//! It does not connect (the caller hands it a `postgres::Client` with its search_path set), hold
//! the writer lock, or classify errors into a `StoreError`: those belong to the callers. Like the
//! SQLite backend it is blocking, and runs on the writer thread or in `store::blocking`: the
//! synchronous `postgres` client drives a runtime of its own, which panics when started (or
//! dropped) on an async worker.

mod audit;
pub mod connect;
mod content;
pub mod error;
pub(crate) mod import;
mod ledger;
mod privacy;
mod status;
mod text;
mod upsert;
mod webhook;

use std::cell::{RefCell, RefMut};
use std::collections::HashSet;
use std::path::Path;

use anyhow::Context;
use postgres::{Client, Transaction};
use time::OffsetDateTime;

use super::{
    Audit, AuditTally, Backend, Backfill, DetailOutcome, EncounterRecord, GroupEnd, PageCounts, PurgeCounts,
    Reader, RecordingRecord, Removal, RunCounts, RunEnd, StateTime, TableCounts, TranscriptRecord,
    WebhookEvent, WebhookState, WindowCompletion, Work, WorkItem, WriteTx,
};
use crate::config::{PostgresConfig, PrivacyConfig};
use crate::status::Status;

mod embedded {
    refinery::embed_migrations!("migrations/postgres");
}

/// A PostgreSQL warehouse on one connection: the writer's ([`open_writer`]), `backfill`'s
/// ([`open_current`]) or a reader's ([`open_reader`]). Trait methods take `&self`; the client is
/// used by one method at a time, on one thread.
pub struct PgBackend {
    client: RefCell<Client>,
    /// What errors name as the database (the URL without its password).
    location: String,
    /// The writer's configuration, to reconnect (and retake the write lock) when its session
    /// is lost ([`PgBackend::reconnecting`]); `None` for a reader or `backfill`'s connection,
    /// whose dead session fails every call until it is reopened.
    reconnect: Option<Box<PostgresConfig>>,
}

/// Applies pending migrations on `client` (its search_path selects the warehouse's schema) and
/// returns the backend; the caller holds the writer lock.
pub fn open_writer(mut client: Client, location: String) -> anyhow::Result<PgBackend> {
    // In one transaction, as on SQLite: readers never see a half-made schema.
    embedded::migrations::runner()
        .set_grouped(true)
        .run(&mut client)
        .with_context(|| format!("cannot apply migrations to {location}"))?;
    Ok(PgBackend {
        client: RefCell::new(client),
        location,
        reconnect: None,
    })
}

/// The warehouse on `client` without migrating it (migrations belong to the one writer that
/// holds the lock), and only if its schema is exactly the one this release knows: an older one
/// needs `migrate` (or a daemon start) first, a newer one was written by a newer release.
pub fn open_current(mut client: Client, location: String) -> anyhow::Result<PgBackend> {
    let applied = applied_version(&mut client)
        .with_context(|| format!("cannot read the schema version of {location}"))?;
    let known = latest_version();
    match applied.cmp(&known) {
        std::cmp::Ordering::Equal => Ok(PgBackend {
            client: RefCell::new(client),
            location,
            reconnect: None,
        }),
        std::cmp::Ordering::Less => anyhow::bail!(
            "the warehouse {location} has schema version {applied}; this release needs {known}: run \
             `charthero-sync migrate` (or start the daemon once) first"
        ),
        std::cmp::Ordering::Greater => anyhow::bail!(
            "the warehouse {location} has schema version {applied}, newer than this release knows ({known}): \
             use the release that wrote it"
        ),
    }
}

/// The warehouse on `client` for reading only (`status`, the demo's summary).
pub fn open_reader(client: Client, location: String) -> PgBackend {
    PgBackend {
        client: RefCell::new(client),
        location,
        reconnect: None,
    }
}

/// The newest migration applied to the schema the search_path selects (0: none).
fn applied_version(client: &mut Client) -> anyhow::Result<i64> {
    let has_history: bool = client
        .query_one("SELECT to_regclass('refinery_schema_history') IS NOT NULL", &[])?
        .try_get(0)?;
    if !has_history {
        return Ok(0);
    }
    let version: i32 = client
        .query_one(
            "SELECT coalesce(max(version), 0) FROM refinery_schema_history",
            &[],
        )?
        .try_get(0)?;
    Ok(i64::from(version))
}

/// The newest migration this release embeds.
pub(super) fn latest_version() -> i64 {
    super::newest_migration(&embedded::migrations::runner())
}

impl PgBackend {
    /// The writer's backend, whose client came from [`connect::connect_writer`] with `pg` (its
    /// session holds the write lock): when that session is lost (the server restarted, an
    /// operator terminated it, the network dropped it), the next call reconnects with the same
    /// configuration and retakes the write lock before any statement, and fails with
    /// `WriteLockHeld` (`StoreErrorKind::LockLost`) if another process took it meanwhile.
    pub fn reconnecting(mut self, pg: PostgresConfig) -> PgBackend {
        self.reconnect = Some(Box::new(pg));
        self
    }

    /// The connection, for one method's statements; a writer's session is checked first (and
    /// replaced when lost, see [`PgBackend::check_write_lock`]).
    fn db(&self) -> anyhow::Result<RefMut<'_, Client>> {
        self.check_write_lock()?;
        Ok(self.client.borrow_mut())
    }

    /// The connection for a method that needs the `Client` itself (a transaction, VACUUM),
    /// checked like [`PgBackend::db`]'s.
    fn session(&mut self) -> anyhow::Result<&mut Client> {
        self.check_write_lock()?;
        Ok(self.client.get_mut())
    }

    /// Replaces a writer's lost session: a new one from the same configuration (search_path
    /// included) holding the write lock.
    fn revive(&self) -> anyhow::Result<()> {
        let Some(pg) = &self.reconnect else {
            return Ok(());
        };
        tracing::warn!(database = %self.location, "the warehouse's session was lost; reconnecting");
        let client = connect::connect_writer(pg, super::APPLICATION_NAME)?;
        // The old client is closed: dropping it sends nothing.
        drop(self.client.replace(client));
        tracing::info!(database = %self.location, "reconnected to the warehouse; the write lock is held again");
        Ok(())
    }

    /// Before a writer's unit of work (a write group, a run's start, a purge, a privacy
    /// change): checks, in one round trip, that its session is alive and holds the write lock.
    /// A session found dead is replaced once (and the lock retaken), so the first write after a
    /// server restart or a terminated session does not fail just because the client learns of
    /// the closed socket by using it. No-op for a reader.
    fn check_write_lock(&self) -> anyhow::Result<()> {
        let Some(schema) = self.reconnect.as_ref().map(|pg| pg.schema.as_str()) else {
            return Ok(());
        };
        if self.client.borrow().is_closed() {
            self.revive()?;
        }
        let checked = connect::holds_write_lock(&mut *self.client.borrow_mut(), schema);
        let held = match checked {
            // The client may not know its socket is closed until it uses it (nor mark itself
            // closed afterwards): a lost connection is told by its error's kind.
            Err(e)
                if self.client.borrow().is_closed()
                    || error::classify(&e) == Some(crate::store::StoreErrorKind::Unavailable) =>
            {
                tracing::debug!(database = %self.location, "the warehouse's session was found closed: {e:#}");
                self.revive()?;
                connect::holds_write_lock(&mut *self.client.borrow_mut(), schema)?
            }
            held => held?,
        };
        if !held {
            anyhow::bail!(error::WriteLockHeld {
                holder: "unknown: this process's session no longer holds it".to_owned()
            });
        }
        Ok(())
    }
}

/// The writes of a group, inside its open transaction.
pub struct PgTx<'a> {
    tx: RefCell<Transaction<'a>>,
}

impl<'a> PgTx<'a> {
    fn db(&self) -> RefMut<'_, Transaction<'a>> {
        self.tx.borrow_mut()
    }
}

impl WriteTx for PgTx<'_> {
    fn commit_page(
        &self,
        records: &[EncounterRecord],
        removals: &[Removal],
        completion: Option<&WindowCompletion>,
        now: OffsetDateTime,
    ) -> anyhow::Result<PageCounts> {
        upsert::commit_page(
            &mut *self.db(),
            &text::records(records),
            removals,
            completion,
            now,
        )
    }
    fn save_detail(
        &self,
        item: &WorkItem,
        outcome: &DetailOutcome,
        audio: bool,
        now: OffsetDateTime,
    ) -> anyhow::Result<()> {
        content::save_detail(&mut *self.db(), item, &text::outcome(outcome), audio, now)
    }
    fn save_transcript(
        &self,
        item: &WorkItem,
        t: &TranscriptRecord,
        now: OffsetDateTime,
    ) -> anyhow::Result<()> {
        content::save_transcript(&mut *self.db(), item, &text::transcript(t), now)
    }
    fn not_ready(
        &self,
        item: &WorkItem,
        schedule: &[std::time::Duration],
        now: OffsetDateTime,
    ) -> anyhow::Result<()> {
        content::not_ready(&mut *self.db(), item, schedule, now)
    }
    fn mark_unavailable(&self, item: &WorkItem) -> anyhow::Result<()> {
        content::mark_unavailable(&mut *self.db(), item)
    }
    fn requeue_content(&self, organization_id: &str, start_ns: i64, end_ns: i64) -> anyhow::Result<u64> {
        content::requeue_content(&mut *self.db(), organization_id, start_ns, end_ns)
    }
    fn save_recording(
        &self,
        encounter_id: &str,
        document_id: &str,
        r: &RecordingRecord,
        now: OffsetDateTime,
    ) -> anyhow::Result<()> {
        content::save_recording(&mut *self.db(), encounter_id, document_id, r, now)
    }
    fn dead_letter(
        &self,
        organization: &str,
        item: &WorkItem,
        run_id: i64,
        reason_code: Option<&str>,
        error: &str,
        now: OffsetDateTime,
    ) -> anyhow::Result<()> {
        content::dead_letter(
            &mut *self.db(),
            organization,
            item,
            run_id,
            reason_code,
            error,
            now,
        )
    }
    /// A `PgTx` borrows the backend's client, so it is not `'static` and cannot be an `Any`;
    /// this backend's tests run their own statements on the backend, outside the group.
    #[cfg(test)]
    fn as_any(&self) -> &dyn std::any::Any {
        &()
    }
}

impl Reader for PgBackend {
    fn writer_present(&self, _now: OffsetDateTime, _grace: time::Duration) -> Option<bool> {
        let present = self
            .db()
            .and_then(|mut client| connect::writer_present(&mut client));
        present
            .map_err(|e| tracing::debug!("cannot tell whether the warehouse's writer is alive: {e:#}"))
            .ok()
    }
    fn complete_through(&self, organization: &str) -> anyhow::Result<Option<OffsetDateTime>> {
        ledger::complete_through(&mut *self.db()?, organization)
    }
    fn state_time(&self, organization: &str, which: StateTime) -> anyhow::Result<Option<OffsetDateTime>> {
        ledger::state_time(&mut *self.db()?, organization, which)
    }
    fn known_organization_id(&self, organization: &str) -> anyhow::Result<Option<String>> {
        ledger::known_organization_id(&mut *self.db()?, organization)
    }
    fn recorded_clinics(&self) -> anyhow::Result<Vec<(String, String)>> {
        ledger::recorded_clinics(&mut *self.db()?)
    }
    fn live_count_in_range(
        &self,
        organization_id: Option<&str>,
        start_ns: i64,
        end_ns: i64,
    ) -> anyhow::Result<u64> {
        audit::live_count_in_range(&mut *self.db()?, organization_id, start_ns, end_ns)
    }
    fn status(&self, now: OffsetDateTime, configured: &[String]) -> anyhow::Result<Status> {
        status::read_status(&mut *self.db()?, now, configured, &self.location)
    }
    fn live_content_counts(&self) -> anyhow::Result<[i64; 4]> {
        status::live_content_counts(&mut *self.db()?)
    }
    fn table_counts(&self) -> anyhow::Result<TableCounts> {
        let row = self.db()?.query_one(
            "SELECT (SELECT count(*) FROM encounters), (SELECT count(*) FROM patients),
                    (SELECT count(*) FROM documents),
                    (SELECT count(*) FROM documents WHERE content_text IS NOT NULL),
                    (SELECT count(*) FROM transcripts), (SELECT count(*) FROM transcript_turns)",
            &[],
        )?;
        Ok(TableCounts {
            encounters: row.try_get(0)?,
            patients: row.try_get(1)?,
            documents: row.try_get(2)?,
            notes: row.try_get(3)?,
            transcripts: row.try_get(4)?,
            turns: row.try_get(5)?,
        })
    }
    fn marker(&self, name: &str) -> anyhow::Result<Option<String>> {
        let row = self
            .db()?
            .query_opt("SELECT value FROM sync_state WHERE name = $1", &[&name])?;
        Ok(row.map(|r| r.try_get(0)).transpose()?)
    }
}

impl Backend for PgBackend {
    fn location(&self) -> String {
        self.location.clone()
    }

    /// One PostgreSQL transaction. A statement that fails aborts it (every later statement
    /// would fail too), and the writer stops the group at its first failed write and asks for a
    /// rollback, exactly as on SQLite; dropping the transaction rolls it back. With one writer per
    /// warehouse (the advisory lock) and readers that never write, no serialization failure or
    /// deadlock can end a group: the default READ COMMITTED isolation is enough.
    fn write_group(&mut self, body: &mut dyn FnMut(&dyn WriteTx) -> bool) -> GroupEnd {
        if let Err(e) = self.check_write_lock() {
            return GroupEnd::CannotBegin(e);
        }
        let tx = match self.client.get_mut().transaction() {
            Ok(tx) => tx,
            Err(e) => return GroupEnd::CannotBegin(e.into()),
        };
        let group = PgTx { tx: RefCell::new(tx) };
        if !body(&group) {
            return GroupEnd::RolledBack;
        }
        match group.tx.into_inner().commit() {
            Ok(()) => GroupEnd::Committed,
            Err(e) => GroupEnd::CannotCommit(e.into()),
        }
    }

    fn set_state_time(&self, organization: &str, which: StateTime, at: OffsetDateTime) -> anyhow::Result<()> {
        ledger::set_state_time(&mut *self.db()?, organization, which, at)
    }
    fn claim_organization_id(
        &self,
        organization: &str,
        organization_id: &str,
        now: OffsetDateTime,
    ) -> anyhow::Result<Result<(), String>> {
        ledger::claim_organization_id(&mut *self.db()?, organization, organization_id, now)
    }
    fn live_ids_in_range(
        &self,
        organization_id: &str,
        start: OffsetDateTime,
        end: OffsetDateTime,
    ) -> anyhow::Result<Vec<String>> {
        ledger::live_ids_in_range(&mut *self.db()?, organization_id, start, end)
    }
    fn open_backfill(
        &self,
        organization: &str,
        start: OffsetDateTime,
        end: OffsetDateTime,
        requested_by: &str,
        now: OffsetDateTime,
    ) -> anyhow::Result<Backfill> {
        ledger::open_backfill(&mut *self.db()?, organization, start, end, requested_by, now)
    }
    fn queue_backfill(
        &self,
        organization: &str,
        start: OffsetDateTime,
        end: OffsetDateTime,
        requested_by: &str,
        now: OffsetDateTime,
    ) -> anyhow::Result<i64> {
        ledger::queue_backfill(&mut *self.db()?, organization, start, end, requested_by, now)
    }
    fn record_webhook_event(
        &self,
        organization: &str,
        event: &WebhookEvent,
        delivery_id: &str,
        now: OffsetDateTime,
    ) -> anyhow::Result<bool> {
        webhook::record_webhook_event(&mut *self.db()?, organization, event, delivery_id, now)
    }
    fn pending_webhook_events(&self, organization: &str, limit: usize) -> anyhow::Result<Vec<WebhookEvent>> {
        webhook::pending_webhook_events(&mut *self.db()?, organization, limit)
    }
    fn settle_webhook_event(
        &self,
        organization: &str,
        event_id: &str,
        state: WebhookState,
        now: OffsetDateTime,
    ) -> anyhow::Result<()> {
        webhook::settle_webhook_event(&mut *self.db()?, organization, event_id, state, now)
    }
    fn dead_letters_left(&self, organization: &str) -> anyhow::Result<Vec<(Work, i64)>> {
        content::dead_letters_left(&mut *self.db()?, organization)
    }
    fn prune_webhook_events(&self, organization: &str, before: OffsetDateTime) -> anyhow::Result<u64> {
        webhook::prune_webhook_events(&mut *self.db()?, organization, before)
    }
    fn webhook_event_failed(
        &self,
        organization: &str,
        event_id: &str,
        max_attempts: u32,
        now: OffsetDateTime,
    ) -> anyhow::Result<bool> {
        webhook::webhook_event_failed(&mut *self.db()?, organization, event_id, max_attempts, now)
    }
    fn transcript_state(
        &self,
        organization_id: &str,
        encounter_id: &str,
        document_id: &str,
        occurred_at: OffsetDateTime,
    ) -> anyhow::Result<Option<String>> {
        webhook::transcript_state(
            &mut *self.db()?,
            organization_id,
            encounter_id,
            document_id,
            occurred_at,
        )
    }
    fn queue_transcript_now(
        &self,
        organization_id: &str,
        encounter_id: &str,
        document_id: &str,
        occurred_at: OffsetDateTime,
    ) -> anyhow::Result<bool> {
        webhook::queue_transcript_now(
            &mut *self.db()?,
            organization_id,
            encounter_id,
            document_id,
            occurred_at,
        )
    }
    fn next_backfill(&self, organization: &str) -> anyhow::Result<Option<(OffsetDateTime, OffsetDateTime)>> {
        ledger::next_backfill(&mut *self.db()?, organization)
    }
    fn finish_backfill(
        &self,
        backfill_id: i64,
        error: Option<&str>,
        now: OffsetDateTime,
    ) -> anyhow::Result<()> {
        ledger::finish_backfill(&mut *self.db()?, backfill_id, error, now)
    }
    fn abort_stale_runs(&self, organization: &str, now: OffsetDateTime) -> anyhow::Result<usize> {
        ledger::abort_stale_runs(&mut *self.db()?, organization, now)
    }
    fn start_run(&self, organization: &str, trigger: &str, now: OffsetDateTime) -> anyhow::Result<i64> {
        ledger::start_run(&mut *self.db()?, organization, trigger, now)
    }
    fn finish_run(&self, run_id: i64, end: &RunEnd, now: OffsetDateTime) -> anyhow::Result<()> {
        ledger::finish_run(&mut *self.db()?, run_id, end, now)
    }
    fn record_progress(
        &self,
        organization: &str,
        run_id: i64,
        counts: &RunCounts,
        now: OffsetDateTime,
    ) -> anyhow::Result<()> {
        let mut db = self.db()?;
        let mut tx = db.transaction()?;
        ledger::write_counts(&mut tx, run_id, counts)?;
        ledger::set_state_time(&mut tx, organization, StateTime::Heartbeat, now)?;
        Ok(tx.commit()?)
    }

    fn open_audit(
        &self,
        organization: &str,
        start: OffsetDateTime,
        end: OffsetDateTime,
        requested_by: &str,
        now: OffsetDateTime,
    ) -> anyhow::Result<Audit> {
        audit::open_audit(&mut *self.db()?, organization, start, end, requested_by, now)
    }
    fn audit_due(
        &self,
        organization: &str,
        every: time::Duration,
        now: OffsetDateTime,
    ) -> anyhow::Result<bool> {
        audit::audit_due(&mut *self.db()?, organization, every, now)
    }
    fn advance_audit(&self, audit_id: i64, cursor: OffsetDateTime, tally: &AuditTally) -> anyhow::Result<()> {
        audit::advance_audit(&mut *self.db()?, audit_id, cursor, tally)
    }
    fn finish_audit(&self, audit_id: i64, now: OffsetDateTime) -> anyhow::Result<()> {
        audit::finish_audit(&mut *self.db()?, audit_id, now)
    }
    fn audit_failed(&self, audit_id: i64, error: &str) -> anyhow::Result<()> {
        audit::audit_failed(&mut *self.db()?, audit_id, error)
    }
    fn nth_live_created_ns(
        &self,
        organization_id: Option<&str>,
        start_ns: i64,
        end_ns: i64,
        n: u64,
    ) -> anyhow::Result<Option<i64>> {
        audit::nth_live_created_ns(&mut *self.db()?, organization_id, start_ns, end_ns, n)
    }
    fn block_agrees(
        &self,
        organization_id: Option<&str>,
        start_ns: i64,
        end_ns: i64,
        offset: u64,
        block: &[(String, i64)],
    ) -> anyhow::Result<bool> {
        audit::block_agrees(&mut *self.db()?, organization_id, start_ns, end_ns, offset, block)
    }

    fn claim_work(
        &self,
        organization_id: Option<&str>,
        run_id: i64,
        skip: &[Work],
        exclude: &HashSet<(Work, String)>,
        limit: usize,
        now: OffsetDateTime,
    ) -> anyhow::Result<Vec<WorkItem>> {
        content::claim_work(
            &mut *self.db()?,
            organization_id,
            run_id,
            skip,
            exclude,
            limit,
            now,
        )
    }
    fn queue_missing_audio(&self, organization_id: Option<&str>) -> anyhow::Result<usize> {
        content::queue_missing_audio(&mut *self.db()?, organization_id)
    }

    fn apply_privacy(&mut self, privacy: &PrivacyConfig) -> anyhow::Result<bool> {
        privacy::apply_privacy(self.session()?, privacy)
    }
    fn purge(
        &mut self,
        audio_dir: &Path,
        start: OffsetDateTime,
        end: OffsetDateTime,
        reason: &str,
        now: OffsetDateTime,
    ) -> anyhow::Result<PurgeCounts> {
        privacy::purge(self.session()?, audio_dir, start, end, reason, now)
    }
    fn purged_ranges(&self) -> anyhow::Result<Vec<(i64, i64)>> {
        privacy::purged_ranges(&mut *self.db()?)
    }
    fn last_retention_purge(&self) -> anyhow::Result<Option<OffsetDateTime>> {
        privacy::last_retention_purge(&mut *self.db()?)
    }

    /// Nothing to do: PostgreSQL makes a transaction durable in its WAL at COMMIT, and moving
    /// the WAL into the tables (its CHECKPOINT) and recycling it is the server's own schedule
    /// (`checkpoint_timeout`, `max_wal_size`), which only a superuser may force.
    fn checkpoint(&self) -> anyhow::Result<()> {
        Ok(())
    }
    /// Nothing to do: the server's WAL size is the server's setting (`max_wal_size`,
    /// `wal_keep_size`), not a client's; `database.wal_size_limit` is SQLite's.
    fn set_wal_size_limit(&self, _bytes: u64) -> anyhow::Result<()> {
        Ok(())
    }
    /// Rebuilds both full-text indexes (the GIN indexes over the generated tsvector columns).
    fn rebuild_search(&self) -> anyhow::Result<()> {
        self.db()?
            .batch_execute("REINDEX INDEX documents_search; REINDEX INDEX transcript_turns_search;")?;
        Ok(())
    }
    fn set_marker(&self, name: &str) -> anyhow::Result<()> {
        self.db()?.execute(
            "INSERT INTO sync_state (name, value) VALUES ($1, 'yes') ON CONFLICT DO NOTHING",
            &[&name],
        )?;
        Ok(())
    }

    #[cfg(test)]
    fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
        self
    }
}

#[cfg(test)]
mod tests;
