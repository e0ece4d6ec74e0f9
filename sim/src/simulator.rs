//! The `Simulator` handle's methods: starting and stopping the server, and every programmatic
//! control over keys, routes, data, faults, rate limits and hooks, plus observation for tests.
//!
//! The handle is a cheap `Clone` around shared state; the type and that state are defined in
//! `state`. Control methods take short locks and never await; none of them is called with a lock
//! held by the server, so a list hook may use them. HTTP handling lives in `server`; this module
//! does not parse requests or render JSON.

use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use time::OffsetDateTime;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::access::{ALL_SCOPES, Access};
use crate::content;
use crate::generate;
use crate::id::mix64;
use crate::model::{
    DocKind, Encounter, FaultRule, KeyState, NewEncounter, RateLimit, Route, Stats, Transcript, Unavailable,
    Visibility,
};
use crate::options::{PageCap, QueryPrecision, Rendering, Rounding, SimOptions};
use crate::render::ServiceDate;
use crate::server;
use crate::state::{Host, Inner, ListHook, Simulator, lock, read, write};
use crate::store::{DocClass, Slot, Store};
use crate::timestamp::{instant, nanos, now_nanos};

/// A rendering rule with its unit checked: positive and at most `i64::MAX` nanoseconds.
fn checked_rendering(rendering: Option<Rendering>) -> Result<Option<(Rounding, i64)>, String> {
    rendering
        .map(|r| {
            r.unit_nanos()
                .map(|unit| (r.rounding, unit))
                .ok_or_else(|| format!("rendering unit {} must be positive and below 292 years", r.unit))
        })
        .transpose()
}

/// A page cap with its `max` checked: at least one record.
fn checked_page_cap(cap: Option<PageCap>) -> Result<Option<PageCap>, String> {
    match cap {
        Some(PageCap { max: 0, .. }) => Err("a page cap must allow at least one record".into()),
        cap => Ok(cap),
    }
}

/// The default key: `ch_sk_sim_` plus 24 base62 characters drawn from the seed.
fn default_key(seed: u64) -> String {
    let mut rng = fastrand::Rng::with_seed(mix64(seed ^ 0x6b65_795f_7369_6d00));
    let tail: String = (0..24).map(|_| rng.alphanumeric()).collect();
    format!("ch_sk_sim_{tail}")
}

impl Simulator {
    /// Binds `127.0.0.1:0`, generates the data set (on a blocking thread: a million encounters
    /// take a few seconds) and spawns the server on the current tokio runtime.
    ///
    /// Fails with `InvalidInput` when encounters are requested over an empty time range.
    pub async fn start(opts: SimOptions) -> io::Result<Simulator> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
        let sim = Simulator::build(opts, listener.local_addr()?, None).await?;
        tokio::spawn(server::serve(listener, sim.clone()));
        Ok(sim)
    }

    /// Several organizations on one host (one loopback port), as ChartHero serves them: one
    /// simulator per `SimOptions` — its own data set (give each its own `seed` and
    /// `organization_id`), default key, scopes, routes, faults, per-key rate window and
    /// statistics — and a request goes to the organization whose key it carries. Every handle's
    /// [`Simulator::base_url`] is the host's; [`Simulator::host_stats`] counts what the host
    /// received from all keys together. [`Simulator::shutdown`] on any handle stops the host.
    pub async fn start_organizations(organizations: Vec<SimOptions>) -> io::Result<Vec<Simulator>> {
        if organizations.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "start_organizations needs at least one organization",
            ));
        }
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
        let addr = listener.local_addr()?;
        let host = Arc::new(Host {
            tenants: RwLock::new(Vec::new()),
            rate: Mutex::default(),
            rate_violations: AtomicU64::new(0),
            requests: AtomicU64::new(0),
        });
        let shutdown = CancellationToken::new();
        let mut sims = Vec::with_capacity(organizations.len());
        for opts in organizations {
            let sim = Simulator::build(opts, addr, Some((host.clone(), shutdown.clone()))).await?;
            write(&host.tenants).push(Arc::downgrade(&sim.inner));
            sims.push(sim);
        }
        tokio::spawn(server::serve(listener, sims[0].clone()));
        Ok(sims)
    }

    /// Generates the data set and builds the handle, without serving.
    async fn build(
        opts: SimOptions,
        addr: SocketAddr,
        host: Option<(Arc<Host>, CancellationToken)>,
    ) -> io::Result<Simulator> {
        if opts.encounters > 0 && opts.end <= opts.start {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "SimOptions: end must be after start when generating encounters",
            ));
        }
        let render_created_at = checked_rendering(opts.render_created_at).map_err(|message| {
            io::Error::new(io::ErrorKind::InvalidInput, format!("SimOptions: {message}"))
        })?;
        let page_cap = checked_page_cap(opts.page_cap).map_err(|message| {
            io::Error::new(io::ErrorKind::InvalidInput, format!("SimOptions: {message}"))
        })?;
        let generation = opts.clone();
        let store = tokio::task::spawn_blocking(move || {
            let mut store = Store::new(&generation);
            generate::populate(&mut store, &generation);
            store
        })
        .await
        .map_err(io::Error::other)?;
        let api_key = default_key(opts.seed);
        let mut access = Access::default();
        access.production = opts.production;
        access.add_key(&api_key, &ALL_SCOPES);
        let (host, shutdown) = match host {
            Some((host, shutdown)) => (Some(host), shutdown),
            None => (None, CancellationToken::new()),
        };
        Ok(Simulator {
            inner: Arc::new(Inner {
                addr,
                base_url: format!("http://{addr}"),
                api_key,
                seed: opts.seed,
                media_secret: mix64(opts.seed ^ 0x6d65_6469_6100),
                store: RwLock::new(store),
                access: RwLock::new(access),
                faults: Mutex::default(),
                rate: Mutex::default(),
                stats: Mutex::default(),
                hook: RwLock::new(None),
                list_seq: AtomicU64::new(0),
                offset_timestamps: AtomicBool::new(opts.offset_timestamps),
                extra_fields: AtomicBool::new(opts.extra_fields),
                query_precision: RwLock::new(opts.query_precision),
                render_created_at: RwLock::new(render_created_at),
                page_cap: RwLock::new(page_cap),
                total_counts_unavailable: AtomicBool::new(opts.total_counts_unavailable),
                filter_after_limit: opts.filter_after_limit,
                desc_ties_ascending: opts.desc_ties_ascending,
                null_empty_documents: opts.null_empty_documents,
                service_dates: opts.service_dates,
                decimals_as_strings: opts.decimals_as_strings,
                counts_as_strings: opts.counts_as_strings,
                null_updated_at: opts.null_updated_at,
                labels_as_numbers: opts.labels_as_numbers,
                unordered_rendering: opts.unordered_rendering,
                signed_recording_links: opts.signed_recording_links,
                responses_rendered: AtomicU64::new(0),
                document_lag_ns: AtomicI64::new(lag_nanos(opts.document_lag)),
                webhook: Mutex::new(None),
                webhook_log: Arc::default(),
                webhook_seq: AtomicU64::new(0),
                shutdown,
                host,
            }),
        })
    }

    /// On a host of several organizations: every API request the host received (all keys) and
    /// how many exceeded the host-wide limit set with [`Simulator::set_host_rate_limit`].
    /// `(0, 0)` for a lone simulator.
    pub fn host_stats(&self) -> (u64, u64) {
        self.inner.host.as_ref().map_or((0, 0), |h| {
            (
                h.requests.load(Ordering::Relaxed),
                h.rate_violations.load(Ordering::Relaxed),
            )
        })
    }

    /// On a host of several organizations: sets the host-wide limit that all keys together are
    /// counted against (never enforced; only counted). No effect on a lone simulator.
    pub fn set_host_rate_limit(&self, limit: Option<RateLimit>) {
        if let Some(h) = &self.inner.host {
            lock(&h.rate).set(limit.map(|l| RateLimit { enforce: false, ..l }));
            h.rate_violations.store(0, Ordering::Relaxed);
        }
    }

    /// `http://127.0.0.1:PORT`; clients append `/external/v1`.
    pub fn base_url(&self) -> String {
        self.inner.base_url.clone()
    }

    /// The bound loopback address.
    pub fn local_addr(&self) -> SocketAddr {
        self.inner.addr
    }

    /// The default key, active with all four scopes: `ch_sk_sim_…`, derived from the seed.
    pub fn api_key(&self) -> String {
        self.inner.api_key.clone()
    }

    /// The seed the data set was generated from.
    pub fn seed(&self) -> u64 {
        self.inner.seed
    }

    /// The organization every encounter belongs to.
    pub fn organization_id(&self) -> String {
        read(&self.inner.store).organization_id.to_string()
    }

    /// Stops accepting connections and closes every open connection, including hanging ones.
    pub fn shutdown(&self) {
        self.inner.shutdown.cancel();
    }

    /// Whether [`Simulator::shutdown`] has been called.
    pub fn is_shut_down(&self) -> bool {
        self.inner.shutdown.is_cancelled()
    }

    // ----- keys and access -----

    /// Adds (or replaces) an active key with the given scopes. Scope names the API does not know
    /// are ignored. Keys must look like `ch_sk_…` or every request with them is
    /// `malformed_token`.
    pub fn add_key(&self, key: &str, scopes: &[&str]) {
        write(&self.inner.access).add_key(key, scopes);
    }

    /// Sets a key's lifecycle state (`Disabled`/`Revoked`/`Expired` answer 401 with the matching
    /// reason code).
    ///
    /// # Panics
    /// When the key was never added.
    pub fn set_key_state(&self, key: &str, state: KeyState) {
        let known = write(&self.inner.access).set_state(key, state);
        assert!(known, "charthero-sim: unknown key");
    }

    /// Marks a key as not organization-scoped (`false`): every request with it is answered 403
    /// `org_scope_only_required` right after authentication. Keys are organization-scoped by
    /// default.
    ///
    /// # Panics
    /// When the key was never added.
    pub fn set_key_org_scoped(&self, key: &str, org_scoped: bool) {
        let known = write(&self.inner.access).set_org_scoped(key, org_scoped);
        assert!(known, "charthero-sim: unknown key");
    }

    /// Disables API keys for the whole organization: every request with a known, well-formed key
    /// is answered 401 `api_keys_disabled` (checked after `invalid_key`, before key states).
    pub fn set_api_keys_disabled(&self, disabled: bool) {
        write(&self.inner.access).api_keys_disabled = disabled;
    }

    /// Production mode: keys starting with `ch_sk_test_` are answered 401
    /// `test_prefix_not_allowed` (checked before the key is looked up). Off by default.
    pub fn set_production(&self, production: bool) {
        write(&self.inner.access).production = production;
    }

    /// Makes `route` answer 403 with `reason` (`route_not_allowed` or
    /// `organization_not_allowlisted`) for every authenticated key, before scopes are checked.
    pub fn disable_route(&self, route: Route, reason: &str) {
        write(&self.inner.access).disable_route(route, reason);
    }

    /// Re-enables a route disabled with [`Simulator::disable_route`].
    pub fn enable_route(&self, route: Route) {
        write(&self.inner.access).enable_route(route);
    }

    // ----- rendering switches -----

    /// Switches rendering of timestamps with non-UTC offsets (same instants).
    pub fn set_offset_timestamps(&self, on: bool) {
        self.inner.offset_timestamps.store(on, Ordering::Relaxed);
    }

    /// Switches the unknown `x_sim_extension` field on every JSON object.
    pub fn set_extra_fields(&self, on: bool) {
        self.inner.extra_fields.store(on, Ordering::Relaxed);
    }

    /// Switches how list queries read `start_at`/`end_at` and whether instants given to later
    /// control calls (`insert`, `insert_bulk`, `set_encounter_updated_at`, …) are truncated to
    /// microseconds. Records stored before the switch keep their timestamps.
    pub fn set_query_precision(&self, precision: QueryPrecision) {
        let mut store = write(&self.inner.store);
        store.set_query_precision(precision);
        *write(&self.inner.query_precision) = precision;
    }

    /// Sets or clears the coarser rendering of encounters' `created_at` (list and encounter
    /// detail); filtering, sorting and `total` keep using the stored value.
    ///
    /// # Panics
    /// When the unit is not positive or longer than `i64::MAX` nanoseconds.
    pub fn set_render_created_at(&self, rendering: Option<Rendering>) {
        let checked =
            checked_rendering(rendering).unwrap_or_else(|message| panic!("charthero-sim: {message}"));
        *write(&self.inner.render_created_at) = checked;
    }

    /// Sets or clears the cap on the records a list page holds (see [`SimOptions::page_cap`]).
    ///
    /// # Panics
    /// When the cap's `max` is 0.
    pub fn set_page_cap(&self, cap: Option<PageCap>) {
        let checked = checked_page_cap(cap).unwrap_or_else(|message| panic!("charthero-sim: {message}"));
        *write(&self.inner.page_cap) = checked;
    }

    /// Switches whether the list's `total` counts encounters unavailable to the key (see
    /// [`SimOptions::total_counts_unavailable`]).
    pub fn set_total_counts_unavailable(&self, counts: bool) {
        self.inner
            .total_counts_unavailable
            .store(counts, Ordering::Relaxed);
    }

    /// The `created_at` the API currently renders for an encounter created at `t` (identity
    /// without a [`Rendering`]), in `t`'s offset. Compare a warehouse, which stores what was
    /// rendered, with [`Simulator::snapshot`] through this.
    pub fn rendered_created_at(&self, t: OffsetDateTime) -> OffsetDateTime {
        let opts = self.inner.render_opts();
        match opts.created_at {
            None => t,
            Some((rounding, unit)) => {
                instant(Rendering::apply(rounding, unit, nanos(t))).to_offset(t.offset())
            }
        }
    }

    /// Whether responses come with keys and documents in changing orders
    /// ([`SimOptions::unordered_rendering`]): a document's position then says nothing.
    pub fn renders_unordered(&self) -> bool {
        self.inner.unordered_rendering
    }

    /// The JSON value the API currently sends as an encounter's `date_of_service` (see
    /// [`SimOptions::service_dates`]), for comparing a warehouse with [`Simulator::snapshot`].
    pub fn rendered_date_of_service(&self, encounter: &Encounter) -> serde_json::Value {
        let opts = self.inner.render_opts();
        let value = ServiceDate(
            nanos(encounter.date_of_service),
            opts.offset_timestamps,
            opts.service_dates,
        );
        serde_json::to_value(value).expect("a date of service renders as JSON")
    }

    // ----- data control -----

    /// Inserts an encounter, visible immediately. Its `updated_at` is `max(created_at, now)`.
    /// Returns the new encounter id.
    pub fn insert(&self, encounter: NewEncounter) -> String {
        let now = now_nanos();
        write(&self.inner.store)
            .insert(&encounter, now)
            .as_str()
            .to_owned()
    }

    /// Inserts `count` visible encounters that all share exactly `created_at`, as a batch import
    /// would, and returns their ids in minting order. Each is shaped like [`NewEncounter::at`]: a
    /// completed ambient encounter with a new patient and one finalized ambient transcript;
    /// `updated_at` is `max(created_at, now)`. Costs one pass over the list index plus
    /// `count log count` (20,000 take milliseconds), not one sorted insert per record.
    pub fn insert_bulk(&self, created_at: OffsetDateTime, count: usize) -> Vec<String> {
        let now = now_nanos();
        let ids = write(&self.inner.store).insert_bulk(created_at, count, now);
        ids.iter().map(|id| id.as_str().to_owned()).collect()
    }

    /// Runs `change` on an existing encounter under the store's write lock; panics (after
    /// releasing the lock) with the error `change` or the lookup reports.
    fn mutate<R>(
        &self,
        encounter_id: &str,
        change: impl FnOnce(&mut Store, Slot, i64) -> Result<R, String>,
    ) -> R {
        let result = {
            let mut store = write(&self.inner.store);
            match store.slot(encounter_id) {
                Some(slot) => change(&mut store, slot, now_nanos()),
                None => Err(format!("unknown encounter {encounter_id}")),
            }
        };
        result.unwrap_or_else(|message| panic!("charthero-sim: {message}"))
    }

    /// Removes an encounter: absent from the list, detail routes answer 404
    /// `encounter_not_found`. Bumps `updated_at`.
    ///
    /// # Panics
    /// For an unknown encounter id (as do all data-control methods below).
    pub fn remove(&self, encounter_id: &str) {
        self.mutate(encounter_id, |store, slot, now| {
            store.set_visibility(slot, Visibility::Removed, now);
            Ok(())
        });
    }

    /// Makes an encounter unavailable to the key: absent from the list, detail routes answer 403
    /// `cross_organization_denied` or `demo_training_denied`. Bumps `updated_at`.
    pub fn mark_unavailable(&self, encounter_id: &str, reason: Unavailable) {
        self.mutate(encounter_id, |store, slot, now| {
            store.set_visibility(slot, Visibility::Unavailable(reason), now);
            Ok(())
        });
    }

    /// Makes a removed or unavailable encounter visible again. Bumps `updated_at`.
    pub fn restore(&self, encounter_id: &str) {
        self.mutate(encounter_id, |store, slot, now| {
            store.set_visibility(slot, Visibility::Visible, now);
            Ok(())
        });
    }

    /// Sets an encounter's status (any string). Bumps `updated_at`.
    pub fn update_status(&self, encounter_id: &str, status: &str) {
        self.mutate(encounter_id, |store, slot, now| {
            store.set_status(slot, status, now);
            Ok(())
        });
    }

    /// Appends a document to an encounter and returns its id. Bumps `updated_at`.
    pub fn add_document(&self, encounter_id: &str, kind: DocKind) -> String {
        self.mutate(encounter_id, |store, slot, now| {
            Ok(store.add_document(slot, kind, now).as_str().to_owned())
        })
    }

    /// Moves a document to another encounter, as a vendor fixing a document filed to the wrong
    /// visit would. The document keeps its id and content; its `updated_at` becomes now (and
    /// later than the target's current `updated_at`). Both encounters' `updated_at` are then
    /// **recomputed** as the latest of the encounter's base and its remaining documents'
    /// `updated_at`, where the base is the encounter's last own change (status or visibility
    /// change, [`Simulator::restore_status`], [`Simulator::set_encounter_updated_at`]) or else its
    /// `created_at`. So the source's `updated_at` can go backwards although its documents changed;
    /// the target's moves forward.
    ///
    /// # Panics
    /// Also when the document is not on `from_encounter`, or both ids are the same encounter.
    pub fn move_document(&self, from_encounter: &str, document_id: &str, to_encounter: &str) {
        let result = {
            let mut store = write(&self.inner.store);
            match (store.slot(from_encounter), store.slot(to_encounter)) {
                (Some(from), Some(to)) => store.move_document(from, document_id, to, now_nanos()),
                (None, _) => Err(format!("unknown encounter {from_encounter}")),
                (_, None) => Err(format!("unknown encounter {to_encounter}")),
            }
        };
        result.unwrap_or_else(|message| panic!("charthero-sim: {message}"));
    }

    /// Moves an encounter's `created_at` to `created_at` (truncated to microseconds in the micro
    /// [`QueryPrecision`] modes), as a vendor correcting a visit's creation time would: the
    /// list shows it in the windows of its new instant and no longer in those of the old. Bumps
    /// `updated_at`. The contract does not promise `created_at` never changes.
    pub fn move_created_at(&self, encounter_id: &str, created_at: OffsetDateTime) {
        self.mutate(encounter_id, |store, slot, now| {
            store.move_created(slot, created_at, now);
            Ok(())
        });
    }

    /// Sets an encounter's `updated_at` to exactly `updated_at`, earlier or later than before
    /// (truncated to microseconds in the micro [`QueryPrecision`] modes), and makes it the
    /// encounter's base for later recomputes (see [`Simulator::move_document`]). Nothing else
    /// changes.
    pub fn set_encounter_updated_at(&self, encounter_id: &str, updated_at: OffsetDateTime) {
        self.mutate(encounter_id, |store, slot, _| {
            store.set_updated(slot, updated_at);
            Ok(())
        });
    }

    /// Sets an encounter's status and sets its `updated_at` to `updated_at` (possibly older than
    /// before), as a vendor restoring a record from a backup would; see
    /// [`Simulator::set_encounter_updated_at`].
    pub fn restore_status(&self, encounter_id: &str, status: &str, updated_at: OffsetDateTime) {
        self.mutate(encounter_id, |store, slot, _| {
            store.restore_status(slot, status, updated_at);
            Ok(())
        });
    }

    /// Finalizes an ambient transcript: status `completed`, audio duration set, the transcript
    /// route serves it. Bumps the document's and the encounter's `updated_at`.
    ///
    /// # Panics
    /// Also when the document is missing or not an ambient transcript.
    ///
    /// With a webhook target set ([`Simulator::set_webhook`]), a `recording.transcript_ready`
    /// event is then delivered to it in the background (needs a Tokio runtime).
    pub fn finalize_transcript(&self, encounter_id: &str, document_id: &str) {
        self.mutate(encounter_id, |store, slot, now| {
            store.finalize_transcript(slot, document_id, now)
        });
        self.announce_transcript(encounter_id, document_id);
    }

    /// Delivers a `recording.transcript_ready` event for the document to the webhook target,
    /// if one is set, in the background; answers the event's id. The transcript itself is not
    /// touched: an event about a document whose transcript is not final (or does not exist) is
    /// as a test makes it.
    pub fn announce_transcript(&self, encounter_id: &str, document_id: &str) -> Option<String> {
        let target = lock(&self.inner.webhook).clone()?;
        let seq = self.inner.webhook_seq.fetch_add(1, Ordering::Relaxed) + 1;
        let event_id = format!("evt_{:016x}", mix64(self.inner.seed ^ seq));
        let delivery_id = format!("dlv_{:016x}", mix64(self.inner.seed ^ seq ^ 0x646c76));
        let body = crate::webhook::transcript_ready_body(
            &event_id,
            &self.organization_id(),
            encounter_id,
            document_id,
            OffsetDateTime::now_utc(),
        );
        let log = self.inner.webhook_log.clone();
        tokio::spawn(crate::webhook::deliver(
            target,
            event_id.clone(),
            delivery_id,
            body,
            move |attempt| lock(&log).push(attempt),
        ));
        Some(event_id)
    }

    /// Announces finalized transcripts to `target` from now on (`None`: to nobody).
    pub fn set_webhook(&self, target: Option<crate::webhook::WebhookTarget>) {
        *lock(&self.inner.webhook) = target;
    }

    /// Every webhook delivery attempt so far, in the order they were answered.
    pub fn webhook_deliveries(&self) -> Vec<crate::webhook::WebhookDelivery> {
        lock(&self.inner.webhook_log).clone()
    }

    /// Replaces a note's markdown text. Bumps the document's and the encounter's `updated_at`.
    ///
    /// # Panics
    /// Also when the document is missing or not a note.
    pub fn edit_note(&self, encounter_id: &str, document_id: &str, text: &str) {
        self.mutate(encounter_id, |store, slot, now| {
            store.edit_note(slot, document_id, text, now, false)
        });
    }

    /// Replaces a note's markdown text and bumps the document's `updated_at` (which only its
    /// detail route shows), leaving the encounter's record — its `updated_at` and its list
    /// entry — exactly as it was: a server whose list does not show document edits.
    ///
    /// # Panics
    /// Also when the document is missing or not a note.
    pub fn edit_note_quietly(&self, encounter_id: &str, document_id: &str, text: &str) {
        self.mutate(encounter_id, |store, slot, now| {
            store.edit_note(slot, document_id, text, now, true)
        });
    }

    // ----- observation -----

    /// Every visible encounter, ordered by `(created_at, encounter_id)`.
    pub fn snapshot(&self) -> Vec<Encounter> {
        let store = read(&self.inner.store);
        store.visible_slots().map(|slot| store.to_public(slot)).collect()
    }

    /// An encounter in any state (visible, removed or unavailable).
    pub fn encounter(&self, encounter_id: &str) -> Option<Encounter> {
        let store = read(&self.inner.store);
        store.slot(encounter_id).map(|slot| store.to_public(slot))
    }

    /// Whether an encounter is visible, removed or unavailable; `None` when unknown.
    pub fn visibility(&self, encounter_id: &str) -> Option<Visibility> {
        let store = read(&self.inner.store);
        store.slot(encounter_id).map(|slot| store.rec(slot).visibility)
    }

    /// Number of visible encounters.
    pub fn visible_count(&self) -> usize {
        read(&self.inner.store).visible_len()
    }

    /// Number of encounters in any state.
    pub fn encounter_count(&self) -> usize {
        read(&self.inner.store).encounter_count()
    }

    /// The markdown text document detail serves for a note; `None` for other documents or
    /// unknown ids.
    pub fn note_text(&self, encounter_id: &str, document_id: &str) -> Option<String> {
        let (id, text) = {
            let store = read(&self.inner.store);
            let doc = *store.rec(store.slot(encounter_id)?).doc(document_id)?;
            if doc.class != DocClass::Note {
                return None;
            }
            (doc.id, store.note_text(&doc))
        };
        Some(text.into_text(&id))
    }

    /// The transcript the transcript route serves; `None` unless the document is a finalized
    /// ambient transcript.
    pub fn transcript(&self, encounter_id: &str, document_id: &str) -> Option<Transcript> {
        let (params, doc) = {
            let store = read(&self.inner.store);
            let doc = *store.rec(store.slot(encounter_id)?).doc(document_id)?;
            (store.params, doc)
        };
        let audio_ds = doc
            .audio_ds
            .filter(|_| doc.is_final && doc.class == DocClass::Ambient)?;
        Some(content::transcript(&params, &doc.id, audio_ds, doc.large))
    }

    /// A copy of the request counters.
    pub fn stats(&self) -> Stats {
        lock(&self.inner.stats).clone()
    }

    /// Zeroes the request counters (the list hook's `seq` keeps counting).
    pub fn reset_stats(&self) {
        *lock(&self.inner.stats) = Stats::default();
    }

    // ----- faults, limits, hooks -----

    /// Queues a fault rule; see [`FaultRule`] for matching semantics.
    pub fn push_fault(&self, rule: FaultRule) {
        lock(&self.inner.faults).push(rule);
    }

    /// Drops every queued fault rule.
    pub fn clear_faults(&self) {
        lock(&self.inner.faults).clear();
    }

    /// Sets or clears the rate limit; the trailing window restarts empty.
    pub fn set_rate_limit(&self, limit: Option<RateLimit>) {
        lock(&self.inner.rate).set(limit);
    }

    /// Sets how long after its creation a document's routes still answer 404
    /// ([`SimOptions::document_lag`]); zero: never.
    pub fn set_document_lag(&self, lag: std::time::Duration) {
        self.inner
            .document_lag_ns
            .store(lag_nanos(lag), Ordering::Relaxed);
    }

    /// Sets or clears the list hook.
    pub fn set_list_hook(&self, hook: Option<ListHook>) {
        *write(&self.inner.hook) = hook;
    }
}

/// A lag in nanoseconds, saturated (a lag of centuries is "never caught up").
fn lag_nanos(lag: std::time::Duration) -> i64 {
    i64::try_from(lag.as_nanos()).unwrap_or(i64::MAX)
}
