//! The state a running simulator shares between its handle and its connections: the
//! [`Simulator`] handle type (a cheap `Clone` around `Arc<Inner>`), `Inner` (store, access,
//! fault book, rate window, statistics, list hook, rendering switches, shutdown token), the
//! [`ListHook`] type, and lock helpers that ignore poisoning.
//!
//! Both `simulator` (`start` and the control methods) and `server` (the request pipeline) build
//! on this module, so the server does not depend on the control API. Beyond reading the current
//! rendering switches it has no behaviour: it starts nothing, handles no request, changes no data.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use tokio_util::sync::CancellationToken;

use crate::access::Access;
use crate::faults::{FaultBook, RateWindow};
use crate::model::{ListRequest, Stats};
use crate::options::{QueryPrecision, Rounding};
use crate::render::RenderOpts;
use crate::store::Store;

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
    pub(crate) shutdown: CancellationToken,
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
        RenderOpts {
            offset_timestamps: self.offset_timestamps.load(Ordering::Relaxed),
            extra_fields: self.extra_fields.load(Ordering::Relaxed),
            created_at: *read(&self.render_created_at),
        }
    }
}
