//! One sync cycle: decide which `created_at` ranges to (re-)list — new time up to now minus the
//! settle lag, the overlap and revisit horizons, an explicit backfill — cut them into windows of
//! a few thousand records, and scan each window completely (see `window`). This module owns the
//! replication algorithm; it does no SQL itself (that is `store`) and no HTTP itself (`api`).

mod audit;
mod content;
mod record;
pub mod webhook;
mod window;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::api::wire::Encounter;
use crate::api::{ApiError, Client};
use crate::config::{AudioConfig, ContentConfig, PrivacyConfig, SyncConfig};
use crate::store::{RunCounts, RunEnd, RunOutcome, StateTime, StoreError, Writer};
use crate::timefmt::{Micros, format_utc};

pub use record::encounter_record;
use window::{Scope, Window, WindowTarget};

/// Which organization a cycle syncs: its configured name (the warehouse's bookkeeping key) and
/// ChartHero's `organization_id` its key reads — configured, or learnt from the first page and
/// then held to.
#[derive(Debug)]
pub struct OrgScope {
    pub name: Arc<str>,
    /// `organization_id` from the configuration, if given.
    pub expected_id: Option<String>,
    /// What the warehouse knows this organization reads (loaded at the start of every cycle).
    known_id: Mutex<Option<Arc<str>>>,
    /// Whether the key's clinic is to be confirmed once, before this context's first cycle
    /// writes anything (configurations with `[[organizations]]`), and whether it was.
    verify: bool,
    verified: std::sync::atomic::AtomicBool,
    /// How finely the list route reads `start_at`/`end_at`, in microseconds: 1 until it refuses
    /// a range narrower than a millisecond (then 1,000) or a second (then 1,000,000); see
    /// `window::list_range`.
    query_unit: std::sync::atomic::AtomicI64,
    /// The list route was seen rendering `created_at` coarser than it filters: every window is
    /// then read by offsets from its first pass (`window::scan`).
    renders_coarse: Learnt,
    /// The list's totals were seen counting records it never lists (the same ones on two
    /// passes): a window's first disagreement is then read again whole (`window::scan`), and
    /// the audit re-scans a differing range whole (`audit`).
    totals_count_unlisted: Learnt,
}

/// Something learnt about an organization's list route, once per process.
#[derive(Debug, Default)]
struct Learnt(std::sync::atomic::AtomicBool);

impl Learnt {
    fn is_known(&self) -> bool {
        self.0.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Records it; returns whether it is news (to log it once).
    fn learn(&self) -> bool {
        !self.0.swap(true, std::sync::atomic::Ordering::Relaxed)
    }
}

impl OrgScope {
    /// `verify`: confirm the key's clinic with one `limit=1` list request before the first
    /// cycle of this context writes anything. With several keys in one configuration a key
    /// put under the wrong name is a real operator error, and a cycle whose windows happen to
    /// list nothing would otherwise not notice it while its removal checks and content
    /// requests run under the wrong key.
    pub fn new(name: &str, expected_id: Option<String>, verify: bool) -> OrgScope {
        OrgScope {
            name: name.into(),
            expected_id,
            known_id: Mutex::new(None),
            verify,
            verified: std::sync::atomic::AtomicBool::new(false),
            query_unit: std::sync::atomic::AtomicI64::new(1),
            renders_coarse: Learnt::default(),
            totals_count_unlisted: Learnt::default(),
        }
    }

    /// How finely the list route reads its bounds, in microseconds (1 until learnt otherwise).
    pub fn query_unit(&self) -> i64 {
        self.query_unit.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Raises the query unit to `to` (it only ever grows: another request may have raised it
    /// further meanwhile).
    fn coarsen_query_unit(&self, to: i64) {
        self.query_unit
            .fetch_max(to, std::sync::atomic::Ordering::Relaxed);
    }

    /// ChartHero's id of this organization, once configured or learnt.
    pub fn id(&self) -> Option<Arc<str>> {
        self.known_id
            .lock()
            .expect("organization lock")
            .clone()
            .or_else(|| self.expected_id.as_deref().map(Arc::from))
    }

    fn set_known(&self, id: Option<&str>) {
        *self.known_id.lock().expect("organization lock") = id.map(Arc::from);
    }
}

/// The query unit after `unit` (microseconds): a millisecond after a microsecond, a second after
/// a millisecond; none after that.
fn coarser_query_unit(unit: i64) -> Option<i64> {
    match unit {
        1 => Some(1_000),
        1_000 => Some(1_000_000),
        _ => None,
    }
}

/// Everything a cycle needs, passed explicitly.
pub struct SyncContext {
    /// The organization this context syncs; every store call of its cycles is scoped to it.
    pub org: OrgScope,
    pub client: Client,
    /// The one writer thread of the warehouse, shared by every organization's context.
    pub writer: Arc<Writer>,
    /// `[sync]`, with `start_at` this organization's.
    pub sync: SyncConfig,
    pub content: ContentConfig,
    pub audio: AudioConfig,
    pub privacy: PrivacyConfig,
    /// `limits.max_in_flight`: how many requests may be awaiting answers at once.
    pub max_in_flight: usize,
    /// The running cycle's counters, for [`report_progress`].
    pub live: LiveCounts,
    /// Woken when the organization's webhook endpoint stored an event: the daemon's loop then
    /// runs a cycle that handles it ([`webhook::handle_pending`]) without waiting for the
    /// schedule.
    pub webhook_events: tokio::sync::Notify,
}

/// What one cycle does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CyclePlan {
    /// List new time and the revisit horizons.
    pub live: bool,
    /// Re-scan this range completely (resuming an interrupted backfill of the same range).
    pub backfill: Option<BackfillRange>,
    /// Then work every backfill still queued or unfinished (`charthero-sync backfill`, an
    /// interrupted process) to completion, oldest first.
    pub queued_backfills: bool,
    /// Audit completed history after the backfills (resuming an unfinished audit).
    pub audit: bool,
    /// Stop the backfill and the audit at the first window (or audit range) boundary after
    /// this long, to let the live sync have its turn; each resumes from its cursor next time.
    pub budget: Option<Duration>,
    /// Before paging, queue again the notes and finished transcripts of the stored encounters
    /// created in `backfill`'s range (all of them without one), as if each had changed
    /// (`sync --refresh-content`).
    pub refresh_content: bool,
}

impl CyclePlan {
    /// `sync [--backfill-from ..] [--audit]`: everything, to the end, queued backfills included.
    pub fn full(backfill: Option<BackfillRange>, audit: bool) -> CyclePlan {
        CyclePlan {
            live: true,
            backfill,
            queued_backfills: true,
            audit,
            budget: None,
            refresh_content: false,
        }
    }
}

/// After a stop request, in-flight work gets this long to reach a unit boundary before its
/// requests are abandoned (the unit's transaction then never commits).
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// What `half` answers, or `Cancelled` once [`SHUTDOWN_GRACE`] has passed after `stop` was
/// asked and it still has not answered (it is then dropped).
async fn within_grace(
    half: impl std::future::Future<Output = Result<(), CycleError>>,
    stop: &CancellationToken,
) -> Result<(), CycleError> {
    tokio::select! {
        r = half => r,
        () = async {
            stop.cancelled().await;
            tokio::time::sleep(SHUTDOWN_GRACE).await;
        } => Err(CycleError::Cancelled),
    }
}

/// While a cycle runs, how often it writes its counters so far to its `sync_runs` row and its
/// organization's heartbeat ([`StateTime::Heartbeat`]): what `status` shows of a cycle at work.
/// A cycle shorter than this writes neither.
pub const PROGRESS_EVERY: Duration = Duration::from_secs(2);

/// How often a long cycle logs its counters so far (at info level: IDs and counts only).
const PROGRESS_LOG_EVERY: Duration = Duration::from_secs(60);

/// The counters of the running cycle as its two halves last reported them (each half owns its
/// counters and hands over a copy at its own unit boundaries: a window, an audit range, a content
/// item), for the progress ticker.
#[derive(Debug, Default)]
pub struct LiveCounts {
    paging: Mutex<RunCounts>,
    content: Mutex<RunCounts>,
}

impl LiveCounts {
    fn put(slot: &Mutex<RunCounts>, counts: &RunCounts) {
        *slot.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = *counts;
    }

    /// The paging half's counters so far.
    fn paging(&self, counts: &RunCounts) {
        Self::put(&self.paging, counts);
    }

    /// The content half's counters so far.
    fn content(&self, counts: &RunCounts) {
        Self::put(&self.content, counts);
    }

    fn total(&self) -> RunCounts {
        let lock = |m: &Mutex<RunCounts>| *m.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut total = lock(&self.paging);
        total.merge(&lock(&self.content));
        total
    }
}

/// Until `done`: every [`PROGRESS_EVERY`], the cycle's counters so far and the heartbeat go to
/// the warehouse, and every [`PROGRESS_LOG_EVERY`] to the log. A write that fails is only
/// logged: the cycle's own writes meet the same warehouse and fail it.
async fn report_progress(ctx: &SyncContext, run_id: i64, started: Instant, done: &CancellationToken) {
    let mut logged = started;
    loop {
        tokio::select! {
            () = done.cancelled() => return,
            () = tokio::time::sleep(PROGRESS_EVERY) => {}
        }
        let mut counts = ctx.live.total();
        counts.retries = ctx.client.retries_used();
        let org = ctx.org.name.clone();
        let written = ctx
            .writer
            .call(move |c| c.record_progress(&org, run_id, &counts, OffsetDateTime::now_utc()))
            .await;
        if let Err(e) = written {
            tracing::debug!(error = %e, "cannot record the cycle's progress");
        }
        if logged.elapsed() >= PROGRESS_LOG_EVERY {
            logged = Instant::now();
            log_counts(&counts, started.elapsed(), "cycle in progress");
        }
    }
}

/// A `created_at` range to re-scan completely: `[start, end)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackfillRange {
    pub start: OffsetDateTime,
    pub end: OffsetDateTime,
}

/// What a completed cycle did.
#[derive(Debug, Clone)]
pub struct CycleReport {
    pub run_id: i64,
    pub counts: RunCounts,
    /// Everything created before this instant is known to be complete.
    pub complete_through: Option<OffsetDateTime>,
    /// Routes closed to this key during the cycle, as `route:reason_code` pairs.
    pub disabled_routes: Option<String>,
    /// A backfill is still queued or unfinished when the cycle ends.
    pub backfills_pending: bool,
    /// Work in `dead_letters` when the cycle ends: this cycle's and earlier ones' still waiting.
    pub dead_letters_left: i64,
    pub elapsed: Duration,
}

impl CycleReport {
    /// Nothing was left undone: no dead letters (of this cycle or waiting from earlier ones), no
    /// route closed to the key, no backfill waiting.
    pub fn is_complete(&self) -> bool {
        self.dead_letters_left == 0 && self.disabled_routes.is_none() && !self.backfills_pending
    }
}

/// Why a cycle did not complete.
#[derive(Debug, thiserror::Error)]
pub enum CycleError {
    #[error(transparent)]
    Api(#[from] ApiError),
    #[error("the cycle was cancelled")]
    Cancelled,
    #[error(
        "upstream kept changing in the window {start} .. {end} on all {passes} passes; it stays \
         unfinished and is scanned again next cycle"
    )]
    Unsettled { start: String, end: String, passes: u64 },
    #[error(
        "listing the window {start} .. {end} took {requests} requests for {records} records, more \
         than any consistent upstream needs; stopped instead of spinning (the server may render \
         created_at coarser than it filters)"
    )]
    RequestBound {
        start: String,
        end: String,
        requests: u64,
        records: u64,
    },
    #[error(
        "{count} encounters share the created_at instant {instant}; the API's offset cap (10000) \
         reaches {reachable} of them {}, so the rest cannot be listed; what was read is kept",
        reach(*.descending_reverses)
    )]
    InstantOverfull {
        instant: String,
        count: u64,
        /// How many records of one instant offsets reach.
        reachable: u64,
        /// Whether the server's descending order is the reverse of its ascending one, so that
        /// offsets reach records from both ends.
        descending_reverses: bool,
    },
    /// The list route answered a window with nothing while encounters are stored for it, and
    /// the first ones asked for by ID were all still there, inside the window (or, in a
    /// reconcile, the encounter route is closed to the key, so none can be confirmed gone): the
    /// list route, not the data, looks wrong (an empty answer during an outage), so the rest are
    /// neither asked for one by one nor marked removed.
    #[error(
        "the list route answered the window {start} .. {end} with no encounters, but {unlisted} are \
         stored for it and {}: the list looks broken (an outage?); nothing is marked removed, and \
         the window is read again next cycle",
        omission_evidence(*.probed)
    )]
    ListOmits {
        start: String,
        end: String,
        unlisted: u64,
        /// How many were asked for by ID and found still there; 0 when the encounter route is
        /// closed to the key.
        probed: u64,
    },
    /// The warehouse failed (full disk, busy, corrupt, not writable, I/O); it says which.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The key reads another clinic than this organization's: refused before anything of it
    /// is written (keys mixed up between clinics).
    #[error(
        "the key of organization {organization} lists encounters of organization_id {found}, but {expected}; \
         refused before anything was written: give this organization its own clinic's key"
    )]
    WrongOrganization {
        organization: String,
        /// What was expected, as a phrase ("organization_id = \"org_a\" is configured").
        expected: String,
        found: String,
    },
    /// The page holds an ID the warehouse stores for another of its clinics: refused before
    /// anything of it was written. The organization stops ([`Self::stops_organization`]) until
    /// the clinics are served by warehouses of their own.
    #[error("{0}")]
    IdCollision(crate::store::IdCollision),
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

/// Why an empty listing was not believed, for [`CycleError::ListOmits`].
fn omission_evidence(probed: u64) -> String {
    if probed == 0 {
        "the encounter route is closed to this key, so none can be confirmed gone".to_owned()
    } else {
        format!("the first {probed} asked for by ID were all still there, inside it")
    }
}

/// How offsets reached into an overfull instant, for [`CycleError::InstantOverfull`].
fn reach(descending_reverses: bool) -> &'static str {
    if descending_reverses {
        "from both ends"
    } else {
        "from the front only (the server's descending order keeps that instant's records in their \
         ascending order, so reading from the back lists the same ones)"
    }
}

impl CycleError {
    /// The upstream `reason_code`, or ours for a window that could not be read completely.
    pub fn reason_code(&self) -> Option<&str> {
        match self {
            CycleError::Api(e) => e.reason_code(),
            CycleError::WrongOrganization { .. } => Some("organization_mismatch"),
            CycleError::IdCollision(_) => Some("id_collision"),
            _ => self
                .window_failure()
                .or_else(|| self.store_error().and_then(StoreError::reason_code)),
        }
    }

    /// The warehouse's error, if that is what stopped the cycle: the `Store` variant, or a
    /// `StoreError` inside `Other`'s chain (opening the warehouse goes through `anyhow`).
    pub fn store_error(&self) -> Option<&StoreError> {
        match self {
            CycleError::Store(e) => Some(e),
            CycleError::Other(e) => e.chain().find_map(|c| c.downcast_ref::<StoreError>()),
            _ => None,
        }
    }

    /// Why a window could not be read completely, if that is what stopped the cycle.
    pub fn window_failure(&self) -> Option<&'static str> {
        match self {
            CycleError::Unsettled { .. } => Some("window_unsettled"),
            CycleError::RequestBound { .. } => Some("request_bound_exceeded"),
            CycleError::InstantOverfull { .. } => Some("instant_overfull"),
            CycleError::ListOmits { .. } => Some("list_omits_stored_encounters"),
            CycleError::Api(_)
            | CycleError::Cancelled
            | CycleError::Store(_)
            | CycleError::WrongOrganization { .. }
            | CycleError::IdCollision(_)
            | CycleError::Other(_) => None,
        }
    }

    /// The organization's key was refused — by ChartHero (401) or by us (it reads another
    /// clinic): nothing more is sent with it until the operator acts; the other organizations go
    /// on. (A 403 such as `org_scope_only_required` fails the cycle, which is retried.)
    pub fn key_refused(&self) -> bool {
        match self {
            CycleError::Api(e) => e.is_auth(),
            CycleError::WrongOrganization { .. } => true,
            _ => false,
        }
    }

    /// Nothing more is synced for the organization until the operator acts, and the other
    /// organizations go on: its key was refused ([`Self::key_refused`]), or its clinic's IDs
    /// collide with another clinic's in the warehouse, which every later cycle would find again
    /// at the same page, spending requests to get there.
    pub fn stops_organization(&self) -> bool {
        self.key_refused() || matches!(self, CycleError::IdCollision(_))
    }
}

/// Holds a page (or a detail) to the organization's clinic before anything of it is written:
/// every encounter must carry the configured `organization_id`, or, when none is configured,
/// the one this organization's key listed first (recorded in `organizations`; an id another
/// configured organization already reads is refused too).
pub(crate) async fn admit(ctx: &SyncContext, items: &[Encounter]) -> Result<(), CycleError> {
    let Some(first) = items.first() else {
        return Ok(());
    };
    let refuse = |expected: String, found: &str| CycleError::WrongOrganization {
        organization: ctx.org.name.to_string(),
        expected,
        found: found.to_owned(),
    };
    let known = ctx.org.id();
    let reference: Arc<str> = match known {
        Some(id) => id,
        None => {
            // The first page this organization ever lists: claim its clinic.
            let (name, id) = (ctx.org.name.clone(), first.organization_id.clone());
            let claim = ctx
                .writer
                .call(move |c| c.claim_organization_id(&name, &id, OffsetDateTime::now_utc()))
                .await?;
            if let Err(holder) = claim {
                return Err(refuse(
                    format!("organization {holder} of this warehouse already reads it"),
                    &first.organization_id,
                ));
            }
            ctx.org.set_known(Some(&first.organization_id));
            tracing::info!(organization_id = %first.organization_id, "organization identified");
            Arc::from(first.organization_id.as_str())
        }
    };
    if let Some(other) = items.iter().find(|e| *e.organization_id != *reference) {
        let expected = match &ctx.org.expected_id {
            Some(id) => format!("organization_id = {id:?} is configured"),
            None => format!("the warehouse holds organization_id {reference:?} for it"),
        };
        return Err(refuse(expected, &other.organization_id));
    }
    Ok(())
}

/// Loads what the warehouse knows of the organization's clinic, refusing a configured
/// `organization_id` that contradicts it.
async fn load_organization(ctx: &SyncContext) -> Result<(), CycleError> {
    let name = ctx.org.name.clone();
    let known = ctx.writer.call(move |c| c.known_organization_id(&name)).await?;
    if let (Some(expected), Some(known)) = (&ctx.org.expected_id, &known)
        && expected != known
    {
        return Err(CycleError::WrongOrganization {
            organization: ctx.org.name.to_string(),
            expected: format!("organization_id = {expected:?} is configured"),
            found: format!("{known} (what this warehouse holds for it)"),
        });
    }
    let known = match (known, &ctx.org.expected_id) {
        (None, Some(expected)) => {
            // A configured clinic is recorded before the first write, like a learnt one.
            let (name, id) = (ctx.org.name.clone(), expected.clone());
            let claim = ctx
                .writer
                .call(move |c| c.claim_organization_id(&name, &id, OffsetDateTime::now_utc()))
                .await?;
            if let Err(holder) = claim {
                return Err(CycleError::WrongOrganization {
                    organization: ctx.org.name.to_string(),
                    expected: format!("organization {holder} of this warehouse already reads it"),
                    found: expected.clone(),
                });
            }
            Some(expected.clone())
        }
        (known, _) => known,
    };
    ctx.org.set_known(known.as_deref());
    if ctx.org.verify && !ctx.org.verified.load(std::sync::atomic::Ordering::Relaxed) {
        confirm_clinic(ctx).await?;
    }
    Ok(())
}

/// Reads the newest encounter the key can see, whatever its date (one `limit=1` list request),
/// and holds it to the organization's clinic (`admit`), which records the clinic when it is not
/// known yet: a key put under the wrong name is refused before anything is written.
pub(crate) async fn confirm_clinic(ctx: &SyncContext) -> Result<(), CycleError> {
    let page = ctx
        .client
        .list_encounters(&crate::api::ListQuery {
            start_at: None,
            end_at: None,
            offset: 0,
            limit: 1,
            sort: crate::api::SortOrder::Desc,
        })
        .await?;
    admit(ctx, &page.items).await?;
    ctx.org.verified.store(true, std::sync::atomic::Ordering::Relaxed);
    Ok(())
}

/// Runs one cycle — the live and revisit ranges, then `backfill` if given, and concurrently the
/// content queue (document details, transcripts, recordings) — and records it in `sync_runs`,
/// whatever its outcome.
pub async fn run_cycle(
    ctx: &SyncContext,
    trigger: &'static str,
    plan: CyclePlan,
    cancel: &CancellationToken,
) -> Result<CycleReport, CycleError> {
    let started = Instant::now();
    ctx.client.begin_cycle();
    if ctx.audio.enabled {
        let dir = ctx.audio.directory.clone();
        tokio::fs::create_dir_all(&dir)
            .await
            .map_err(|e| anyhow::anyhow!("cannot create audio.directory {}: {e}", dir.display()))?;
    }
    let privacy = ctx.privacy;
    let org = ctx.org.name.clone();
    let (run_id, paused_until) = ctx
        .writer
        .call(move |c| {
            let now = OffsetDateTime::now_utc();
            let aborted = c.abort_stale_runs(&org, now)?;
            if aborted > 0 {
                tracing::warn!(
                    aborted,
                    "marked runs left running by an earlier process as aborted"
                );
            }
            c.apply_privacy(&privacy)?;
            Ok((
                c.start_run(&org, trigger, now)?,
                c.state_time(&org, StateTime::PausedUntil)?,
            ))
        })
        .await?;
    // A pause ChartHero asked an earlier process for holds for this one too.
    if let Some(until) = paused_until {
        ctx.client.pause_until(until);
    }
    // At the error level, so that its fields show on every line that is logged at all.
    let span = tracing::error_span!("cycle", organization = %ctx.org.name, run_id, trigger);
    execute(ctx, run_id, plan, trigger, cancel, started)
        .instrument(span)
        .await
}

/// The body of a cycle whose `sync_runs` row exists.
async fn execute(
    ctx: &SyncContext,
    run_id: i64,
    plan: CyclePlan,
    trigger: &'static str,
    cancel: &CancellationToken,
    started: Instant,
) -> Result<CycleReport, CycleError> {
    // Paging and content work run side by side; a failure of either stops both.
    let stop = cancel.child_token();
    let paging_done = CancellationToken::new();
    let gate = content::RouteGate::default();
    let mut counts = RunCounts::default();
    let mut content_counts = RunCounts::default();
    let deadline = plan.budget.map(|b| Instant::now() + b);
    ctx.live.paging(&counts);
    ctx.live.content(&content_counts);
    let mut identified = load_organization(ctx).await;
    if let (Ok(()), true, Some(org_id)) = (&identified, plan.refresh_content, ctx.org.id()) {
        let (start_ns, end_ns) = plan.backfill.map_or((i64::MIN, i64::MAX), |r| {
            (
                crate::timefmt::unix_nanos(r.start),
                crate::timefmt::unix_nanos(r.end),
            )
        });
        match ctx
            .writer
            .write(move |tx| tx.requeue_content(&org_id, start_ns, end_ns))
            .await
        {
            Ok(queued) => tracing::info!(
                queued,
                "refresh-content: notes and finished transcripts queued again"
            ),
            Err(e) => identified = Err(e.into()),
        }
    }
    let paging = async {
        let mut r = if let Err(e) = identified {
            Err(e)
        } else if let Err(e) = webhook::handle_pending(ctx, &mut counts, &stop).await {
            // Before listing: what ChartHero said is ready is fetched first, and an encounter
            // read from its detail is written before paging may read it again.
            Err(e)
        } else if plan.live {
            sync_recent(ctx, run_id, &mut counts, &stop)
                .await
                .map(|()| Finished::Yes)
        } else {
            Ok(Finished::Yes)
        };
        if let (Ok(Finished::Yes), Some(range)) = (&r, plan.backfill) {
            r = run_backfill(ctx, run_id, range, trigger, deadline, &mut counts, &stop).await;
        }
        if let (Ok(Finished::Yes), true) = (&r, plan.queued_backfills) {
            r = run_queued_backfills(ctx, run_id, trigger, &mut counts, &stop)
                .await
                .map(|()| Finished::Yes);
        }
        if let (Ok(Finished::Yes), true) = (&r, plan.audit) {
            r = audit::run(ctx, run_id, trigger, deadline, &mut counts, &stop).await;
        }
        let r = r.map(|_| ());
        paging_done.cancel();
        if r.is_err() {
            stop.cancel();
        }
        r
    };
    let content = async {
        let r = content::drain(ctx, run_id, &paging_done, &stop, &gate, &mut content_counts).await;
        if r.is_err() {
            stop.cancel();
        }
        r
    };
    // Each half is abandoned on its own, so the error of a half that failed (and asked the
    // other to stop) is kept even when the other cannot stop in time.
    let halves_done = CancellationToken::new();
    let halves = async {
        let both = tokio::join!(within_grace(paging, &stop), within_grace(content, &stop));
        halves_done.cancel();
        both
    };
    let ((paged, fetched), ()) = tokio::join!(halves, report_progress(ctx, run_id, started, &halves_done));
    counts.merge(&content_counts);
    counts.retries = ctx.client.retries_used();
    // The first real error wins over the cancellation it caused in the other half.
    let mut result = match (paged, fetched) {
        (Err(e), _) | (_, Err(e)) if !matches!(e, CycleError::Cancelled) => Err(e),
        (Err(e), _) | (_, Err(e)) => Err(e),
        // Purged before the run ends, so that a purge that fails ends the run as failed.
        _ => purge_expired(ctx).await,
    };
    if let Some(reason) = result.as_ref().err().and_then(CycleError::window_failure) {
        ctx.client.metrics().record_window_failure(reason);
    }
    // Dead letters of earlier cycles still waiting for their next attempt are work left undone
    // too, although this cycle did not ask for them; those no claim can pick up (removed, or of
    // a kind the configuration does not fetch) are not.
    let org = ctx.org.name.clone();
    let dead_letters_left = match ctx.writer.call(move |c| c.dead_letters_left(&org)).await {
        Ok(kinds) => kinds
            .into_iter()
            .filter(|&(work, _)| content::enabled(ctx, work))
            .map(|(_, n)| n)
            .sum(),
        Err(e) => {
            if result.is_ok() {
                result = Err(e.into());
            }
            0
        }
    };
    let disabled_routes = gate.summary();
    let incomplete = dead_letters_left > 0 || disabled_routes.is_some();
    let end = match &result {
        Ok(()) => RunEnd {
            outcome: if incomplete {
                RunOutcome::Partial
            } else {
                RunOutcome::Succeeded
            },
            counts,
            disabled_routes: disabled_routes.clone(),
            error: incomplete.then(|| {
                format!(
                    "{dead_letters_left} item(s) in dead letters ({} by this cycle){}",
                    counts.dead_letters,
                    disabled_routes
                        .as_deref()
                        .map_or_else(String::new, |d| format!("; routes closed to this key: {d}"))
                )
            }),
            reason_code: None,
        },
        Err(e) => RunEnd {
            outcome: if matches!(e, CycleError::Cancelled) {
                RunOutcome::Aborted
            } else {
                RunOutcome::Failed
            },
            counts,
            disabled_routes: disabled_routes.clone(),
            error: Some(format!("{e:#}")),
            reason_code: e.reason_code().map(str::to_owned),
        },
    };
    let outcome = end.outcome.as_str();
    let rows = counts.encounters_new
        + counts.encounters_changed
        + counts.encounters_removed
        + counts.documents_fetched
        + counts.transcripts_fetched
        + counts.recordings_fetched;
    let bookkeeping = async {
        let org = ctx.org.name.clone();
        let (complete_through, backfills_pending) = ctx
            .writer
            .call(move |c| Ok((c.complete_through(&org)?, c.next_backfill(&org)?.is_some())))
            .await?;
        // Metrics first: whoever sees the run finished in the warehouse also sees it counted.
        ctx.client
            .metrics()
            .record_cycle(outcome, rows, complete_through, dead_letters_left);
        let org = ctx.org.name.clone();
        let paused_until = ctx.client.paused_until();
        ctx.writer
            .call(move |c| {
                if let Some(until) = paused_until {
                    c.set_state_time(&org, StateTime::PausedUntil, until)?;
                }
                c.finish_run(run_id, &end, OffsetDateTime::now_utc())?;
                c.checkpoint()
            })
            .await?;
        Ok::<_, CycleError>((complete_through, backfills_pending))
    }
    .await;
    // The cycle's own error wins over a bookkeeping failure it caused (a full disk, say).
    let (complete_through, backfills_pending) = match (result, bookkeeping) {
        (Err(e), _) | (Ok(()), Err(e)) => return Err(e),
        (Ok(()), Ok(done)) => done,
    };
    let report = CycleReport {
        run_id,
        counts,
        complete_through,
        disabled_routes,
        backfills_pending,
        dead_letters_left,
        elapsed: started.elapsed(),
    };
    log_counts(&counts, report.elapsed, "cycle complete");
    Ok(report)
}

/// A cycle's counters at info level (counts only, never an ID or PHI).
fn log_counts(counts: &RunCounts, elapsed: Duration, message: &'static str) {
    tracing::info!(
        list_requests = counts.list_requests,
        detail_requests = counts.detail_requests,
        windows = counts.windows,
        new = counts.encounters_new,
        changed = counts.encounters_changed,
        unchanged = counts.encounters_unchanged,
        removed = counts.encounters_removed,
        rescans = counts.rescans,
        documents = counts.documents_fetched,
        transcripts = counts.transcripts_fetched,
        recordings = counts.recordings_fetched,
        retries = counts.retries,
        dead_letters = counts.dead_letters,
        elapsed_ms = elapsed.as_millis() as u64,
        "{message}"
    );
}

/// Under a retention period, purges what has aged out of it, at most once a day.
async fn purge_expired(ctx: &SyncContext) -> Result<(), CycleError> {
    let Some(retention) = ctx.privacy.retention else {
        return Ok(());
    };
    let now = OffsetDateTime::now_utc();
    let last = ctx.writer.call(|c| c.last_retention_purge()).await?;
    if last.is_some_and(|t| now - t < time::Duration::days(1)) {
        return Ok(());
    }
    let range = BackfillRange {
        start: OffsetDateTime::UNIX_EPOCH,
        end: now - retention,
    };
    let dir = ctx.audio.directory.clone();
    ctx.writer
        .call(move |c| {
            c.purge(
                &dir,
                range.start,
                range.end,
                "retention",
                OffsetDateTime::now_utc(),
            )
        })
        .await?;
    Ok(())
}

/// Lists new time (from the watermark minus the overlap to now minus the settle lag) together
/// with the revisit horizons, as one ascending range.
async fn sync_recent(
    ctx: &SyncContext,
    run_id: i64,
    counts: &mut RunCounts,
    cancel: &CancellationToken,
) -> Result<(), CycleError> {
    let org = ctx.org.name.clone();
    let (watermark, deep_at) = ctx
        .writer
        .call(move |c| {
            Ok((
                c.complete_through(&org)?,
                c.state_time(&org, StateTime::DeepRevisitAt)?,
            ))
        })
        .await?;
    let s = &ctx.sync;
    let now = OffsetDateTime::now_utc();
    let horizon = now - s.settle_lag;
    let start_at = history_start(ctx.sync.start_at, ctx.privacy.retention, now);
    let deep_due = !s.revisit_deep.is_zero() && deep_at.is_none_or(|t| t + s.revisit_deep_every <= now);
    let from = match watermark {
        None => start_at,
        Some(wm) => {
            let mut from = (wm - s.overlap).min(now - s.revisit_recent);
            if deep_due {
                from = from.min(now - s.revisit_deep);
            }
            from.max(start_at)
        }
    };
    tracing::debug!(from = %format_utc(from), to = %format_utc(horizon), deep_due, "planning");
    let scan = RangeScan {
        run_id,
        scope: Scope::Recent { watermark },
        reconcile: false,
        deadline: None,
    };
    scan_range(
        ctx,
        &scan,
        Micros::floor(from),
        Micros::floor(horizon),
        counts,
        cancel,
    )
    .await?;
    // The first cycle reads all history, which covers the deep horizon too.
    if deep_due && from <= now - s.revisit_deep {
        let org = ctx.org.name.clone();
        ctx.writer
            .call(move |c| c.set_state_time(&org, StateTime::DeepRevisitAt, now))
            .await?;
    }
    Ok(())
}

/// The earliest `created_at` replicated: the organization's `start_at`, or the retention
/// horizon when that is later (what is older than it is never synced, and gets purged).
pub fn history_start(
    start_at: OffsetDateTime,
    retention: Option<Duration>,
    now: OffsetDateTime,
) -> OffsetDateTime {
    retention.map_or(start_at, |r| start_at.max(now - r))
}

/// Re-scans an explicit range completely, resuming an interrupted backfill of the same range.
async fn run_backfill(
    ctx: &SyncContext,
    run_id: i64,
    range: BackfillRange,
    requested_by: &'static str,
    deadline: Option<Instant>,
    counts: &mut RunCounts,
    cancel: &CancellationToken,
) -> Result<Finished, CycleError> {
    let org = ctx.org.name.clone();
    let bf = ctx
        .writer
        .call(move |c| {
            c.open_backfill(
                &org,
                range.start,
                range.end,
                requested_by,
                OffsetDateTime::now_utc(),
            )
        })
        .await?;
    tracing::info!(
        backfill_id = bf.backfill_id,
        from = %format_utc(bf.start),
        to = %format_utc(bf.end),
        resume_at = %format_utc(bf.cursor),
        "backfill"
    );
    let scan = RangeScan {
        run_id,
        scope: Scope::Backfill {
            backfill_id: bf.backfill_id,
        },
        reconcile: true,
        deadline,
    };
    // An explicit range is scanned exactly as given, widened to whole microseconds.
    let result = scan_range(
        ctx,
        &scan,
        Micros::floor(bf.cursor),
        Micros::ceil(bf.end),
        counts,
        cancel,
    )
    .await;
    let finished = matches!(result, Ok(Finished::Yes));
    let error = result.as_ref().err().map(|e| format!("{e:#}"));
    if finished || error.is_some() {
        ctx.writer
            .call(move |c| c.finish_backfill(bf.backfill_id, error.as_deref(), OffsetDateTime::now_utc()))
            .await?;
    }
    result
}

/// Works every queued or unfinished backfill to completion, oldest first. A backfill that is
/// still queued after it was worked (which would loop forever) ends the cycle with an error.
async fn run_queued_backfills(
    ctx: &SyncContext,
    run_id: i64,
    trigger: &'static str,
    counts: &mut RunCounts,
    cancel: &CancellationToken,
) -> Result<(), CycleError> {
    let mut worked = Vec::new();
    loop {
        let org = ctx.org.name.clone();
        let Some((start, end)) = ctx.writer.call(move |c| c.next_backfill(&org)).await? else {
            break;
        };
        let range = BackfillRange { start, end };
        if worked.contains(&range) {
            return Err(CycleError::Other(anyhow::anyhow!(
                "the backfill {} .. {} is still queued after it was worked; see `charthero-sync status`",
                format_utc(start),
                format_utc(end)
            )));
        }
        worked.push(range);
        run_backfill(ctx, run_id, range, trigger, None, counts, cancel).await?;
    }
    Ok(())
}

/// Whether a range was scanned to its end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Finished {
    Yes,
    /// Stopped at a window boundary because the deadline passed.
    Paused,
}

/// How a range is scanned: which ledger scope its windows belong to, whether absence is
/// evidence of removal, and when to stop at a window boundary.
struct RangeScan {
    run_id: i64,
    scope: Scope,
    reconcile: bool,
    deadline: Option<Instant>,
}

impl RangeScan {
    fn out_of_time(&self) -> bool {
        self.deadline.is_some_and(|d| Instant::now() >= d)
    }
}

/// Scans `[from, to)` window by window in ascending order, stopping early at a window boundary
/// once the scan's deadline has passed.
async fn scan_range(
    ctx: &SyncContext,
    scan: &RangeScan,
    from: Micros,
    to: Micros,
    counts: &mut RunCounts,
    cancel: &CancellationToken,
) -> Result<Finished, CycleError> {
    let mut cursor = from;
    let progress = matches!(scan.scope, Scope::Backfill { .. })
        .then(|| crate::telemetry::Progress::new(from.instant(), to.instant()));
    let listed_before = counts.encounters_new + counts.encounters_changed + counts.encounters_unchanged;
    let mut finished = Finished::Yes;
    let mut target = WindowTarget::new();
    while cursor < to {
        if scan.out_of_time() {
            finished = Finished::Paused;
            break;
        }
        let w = Window {
            run_id: scan.run_id,
            scope: scan.scope,
            start: cursor,
            end: to,
            reconcile: scan.reconcile,
            target,
        };
        let span = tracing::debug_span!("window", start = %cursor, kind = ?scan.scope);
        let window::Completed { end, changed } =
            window::scan(ctx, w, counts, cancel).instrument(span).await?;
        target = target.after(changed);
        tracing::debug!(start = %cursor, end = %end, "window complete");
        ctx.live.paging(counts);
        cursor = end;
        if let Some(p) = &progress {
            let listed = counts.encounters_new + counts.encounters_changed + counts.encounters_unchanged;
            p.update(cursor.instant(), listed - listed_before);
        }
    }
    if let Some(p) = &progress {
        p.finish();
    }
    Ok(finished)
}
