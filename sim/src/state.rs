//! The state a running simulator shares between its handle and its connections: the
//! [`Simulator`] handle type (a cheap `Clone` around `Arc<Inner>`), `Inner` (store, access,
//! fault book, rate window, statistics, list hook, rendering switches, shutdown token), the
//! [`ListHook`] type, and lock helpers that ignore poisoning.
//!
//! Both `simulator` (`start` and the control methods) and `server` (the request pipeline) build
//! on this module, so the server does not depend on the control API. Beyond reading the current
//! rendering switches it has no behaviour: it starts nothing, handles no request, changes no data.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use tokio_util::sync::CancellationToken;

use crate::access::Access;
use crate::faults::{FaultBook, RateWindow};
use crate::model::{ListRequest, Stats};
use crate::options::{PageCap, QueryPrecision, Rounding, ServiceDates};
use crate::render::RenderOpts;
use crate::store::Store;
use crate::timestamp::now_nanos;

/// Called on every valid list request before it is answered, with no simulator lock held, so it
/// may call any control method (for example, insert a record between two pages).
pub type ListHook = Arc<dyn Fn(&Simulator, &ListRequest) + Send + Sync>;

/// A running ChartHero API simulator on a loopback port.
///
/// The server runs until [`Simulator::shutdown`] is called or the tokio runtime it was started
/// on stops; dropping the handle alone does not stop it.
#[derive(Clone)]
pub struct Simulator {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) addr: SocketAddr,
    pub(crate) base_url: String,
    pub(crate) api_key: String,
    pub(crate) seed: u64,
    /// Signs media URLs; derived from the seed so URLs are reproducible too.
    pub(crate) media_secret: u64,
    pub(crate) store: RwLock<Store>,
    pub(crate) access: RwLock<Access>,
    pub(crate) faults: Mutex<FaultBook>,
    pub(crate) rate: Mutex<RateWindow>,
    pub(crate) stats: Mutex<Stats>,
    pub(crate) hook: RwLock<Option<ListHook>>,
    pub(crate) list_seq: AtomicU64,
    pub(crate) offset_timestamps: AtomicBool,
    pub(crate) extra_fields: AtomicBool,
    /// Kept here as well as in the store so list queries are judged without the store lock.
    pub(crate) query_precision: RwLock<QueryPrecision>,
    /// The checked form of the `created_at` rendering rule (see `RenderOpts::created_at`).
    pub(crate) render_created_at: RwLock<Option<(Rounding, i64)>>,
    pub(crate) page_cap: RwLock<Option<PageCap>>,
    pub(crate) total_counts_unavailable: AtomicBool,
    /// [`crate::SimOptions::filter_after_limit`].
    pub(crate) filter_after_limit: bool,
    /// [`crate::SimOptions::desc_ties_ascending`].
    pub(crate) desc_ties_ascending: bool,
    pub(crate) null_empty_documents: bool,
    pub(crate) service_dates: ServiceDates,
    pub(crate) decimals_as_strings: bool,
    pub(crate) counts_as_strings: bool,
    pub(crate) null_updated_at: bool,
    pub(crate) labels_as_numbers: bool,
    /// [`crate::SimOptions::unordered_rendering`], and the responses rendered so: each one's salt.
    pub(crate) unordered_rendering: bool,
    pub(crate) responses_rendered: AtomicU64,
    /// [`crate::SimOptions::signed_recording_links`].
    pub(crate) signed_recording_links: bool,
    /// [`crate::SimOptions::document_lag`] in nanoseconds.
    pub(crate) document_lag_ns: AtomicI64,
    /// Where finalized transcripts are announced, if anywhere, and every delivery attempt.
    pub(crate) webhook: Mutex<Option<crate::webhook::WebhookTarget>>,
    pub(crate) webhook_log: Arc<Mutex<Vec<crate::webhook::WebhookDelivery>>>,
    pub(crate) webhook_seq: AtomicU64,
    pub(crate) shutdown: CancellationToken,
    /// Set when this simulator is one organization of a host serving several on one port
    /// (`Simulator::start_organizations`): the host routes each request by its key.
    pub(crate) host: Option<Arc<Host>>,
}

/// One host serving several organizations on one port, as ChartHero does: each organization
/// has its own data set, keys, routes, faults, rate window and statistics; a request goes to
/// the organization whose key it carries. The host also counts every API request against one
/// host-wide rate window, so a test can check a client's total rate across all its keys.
pub(crate) struct Host {
    /// Every organization of the host, in the order given; weak, so the handles own them.
    pub(crate) tenants: RwLock<Vec<std::sync::Weak<Inner>>>,
    pub(crate) rate: Mutex<RateWindow>,
    pub(crate) rate_violations: AtomicU64,
    pub(crate) requests: AtomicU64,
}

impl Host {
    /// The organization whose key `authorization` carries; the first one when no organization
    /// knows the key (it then answers `invalid_key` or `missing_bearer` as a lone one would).
    pub(crate) fn tenant_for(&self, authorization: Option<&[u8]>) -> Option<Simulator> {
        let tenants = self.tenants();
        let token = authorization
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| h.split_once(' '))
            .map(|(_, t)| t.trim_start_matches(' '));
        token
            .and_then(|t| tenants.iter().find(|s| read(&s.inner.access).knows(t)).cloned())
            .or_else(|| tenants.into_iter().next())
    }

    /// Every organization of the host still alive, in the order given.
    pub(crate) fn tenants(&self) -> Vec<Simulator> {
        read(&self.tenants)
            .iter()
            .filter_map(std::sync::Weak::upgrade)
            .map(|inner| Simulator { inner })
            .collect()
    }
}

// A panic inside a control closure or hook must not wedge the simulator for the rest of a test
// run, and no lock is ever held across a partial mutation, so poisoning is ignored.
pub(crate) fn read<T>(lock: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(PoisonError::into_inner)
}

pub(crate) fn write<T>(lock: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(PoisonError::into_inner)
}

pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Inner {
    pub(crate) fn render_opts(&self) -> RenderOpts {
        let response = (self.unordered_rendering || self.signed_recording_links)
            .then(|| self.seed ^ self.responses_rendered.fetch_add(1, Ordering::Relaxed));
        RenderOpts {
            offset_timestamps: self.offset_timestamps.load(Ordering::Relaxed),
            extra_fields: self.extra_fields.load(Ordering::Relaxed),
            created_at: *read(&self.render_created_at),
            null_empty_documents: self.null_empty_documents,
            service_dates: self.service_dates,
            decimals_as_strings: self.decimals_as_strings,
            counts_as_strings: self.counts_as_strings,
            null_updated_at: self.null_updated_at,
            labels_as_numbers: self.labels_as_numbers,
            unordered: response.filter(|_| self.unordered_rendering),
            recording_links: response
                .filter(|_| self.signed_recording_links)
                .map(|salt| (salt, now_nanos())),
        }
    }
}
