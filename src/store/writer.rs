//! The single writer thread through which every write of the sync goes: closures queued in
//! order, writes group-committed into shared transactions, every answer a classified
//! [`StoreError`]. It owns one [`Backend`] and knows nothing of what a write does; async tasks
//! never touch the backend themselves.

use std::sync::{Arc, mpsc};
use std::thread;
use std::time::Duration;

use super::{Backend, GroupEnd, StoreError, StoreErrorKind, WriteTx};

/// Most writes one shared transaction takes before it commits, and how long it may keep taking
/// them: enough to write each hot index page once per group instead of once per page of
/// encounters, little enough that readers see progress within a fraction of a second.
const MAX_GROUP_WRITES: usize = 64;
const MAX_GROUP_TIME: Duration = Duration::from_millis(250);

/// Why a group's transaction did not commit, for every write in it: the message, and the kind
/// of the error that caused it (writes rolled back because the disk was full fail as
/// `DiskFull` too).
#[derive(Debug, Clone)]
struct Abort {
    why: String,
    kind: StoreErrorKind,
}

impl Abort {
    /// `what` happened because of `e`; the message is `e`'s cause (the headline naming the
    /// database is added once, by the `StoreError` each write is answered with).
    fn new(what: &str, e: &StoreError) -> Abort {
        Abort {
            why: format!("{what}: {:#}", e.cause()),
            kind: e.kind(),
        }
    }
}

/// A grouped write after it ran (or could not run): whether it failed, and how to answer its
/// caller once the transaction has ended.
struct Ran {
    error: Option<Abort>,
    /// Given why the transaction did not commit, if it did not.
    answer: Answer,
}

type Answer = Box<dyn FnOnce(Option<&Abort>, &str) + Send>;

/// A grouped write: given the shared transaction, or why none could be started, and the
/// database's path (for its errors).
type GroupedWrite = Box<dyn FnOnce(Result<&dyn WriteTx, &Abort>, &str) -> Ran + Send>;

/// A write on its own: given the backend and the database's path.
type AloneWrite = Box<dyn FnOnce(&mut dyn Backend, &str) + Send>;

enum Job {
    /// Runs on its own, outside any transaction (it may open its own).
    Alone(AloneWrite),
    /// Runs inside a write transaction shared with the grouped writes queued behind it; given
    /// the error instead when no transaction could be started.
    Grouped(GroupedWrite),
}

/// The one thread that owns the writing backend. Work arrives as closures, runs in order,
/// and answers through a oneshot channel, so async code awaits writes without blocking a worker.
///
/// Writes submitted with [`Writer::write`] are *group-committed*: while the thread is busy,
/// such writes queue up, and the next transaction takes all of them and commits once. Every
/// write is answered only after its transaction ended, so "answered Ok" means committed. If one
/// write of a group fails, the whole transaction rolls back and every write in it fails.
///
/// Every answer's error is a [`StoreError`] naming the database and classified by the first
/// database error in the closure's error chain (or, for a write rolled back with its group, by
/// the error that rolled the group back).
pub struct Writer {
    jobs: Option<mpsc::Sender<Job>>,
    thread: Option<thread::JoinHandle<()>>,
    /// The database file, for errors raised on this side of the channel.
    path: Arc<str>,
}

/// A write queued with [`Writer::write`]; resolves once it has committed (or failed).
pub struct Pending<T> {
    answer: Result<tokio::sync::oneshot::Receiver<Result<T, StoreError>>, StoreError>,
    path: Arc<str>,
}

impl<T> std::future::IntoFuture for Pending<T>
where
    T: Send + 'static,
{
    type Output = Result<T, StoreError>;
    type IntoFuture = std::pin::Pin<Box<dyn std::future::Future<Output = Result<T, StoreError>> + Send>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(async move {
            self.answer?.await.map_err(|_| {
                StoreError::new(
                    &self.path,
                    anyhow::anyhow!("the database writer thread stopped during a write"),
                )
            })?
        })
    }
}

impl Writer {
    pub fn spawn(mut backend: Box<dyn Backend>) -> Writer {
        let path: Arc<str> = backend.location().into();
        let (tx, rx) = mpsc::channel::<Job>();
        let thread_path = path.clone();
        let thread = thread::Builder::new()
            .name("sqlite-writer".into())
            .spawn(move || {
                let mut next = rx.recv().ok();
                while let Some(job) = next {
                    let held = match job {
                        Job::Alone(f) => {
                            f(backend.as_mut(), &thread_path);
                            None
                        }
                        Job::Grouped(f) => run_group(backend.as_mut(), &thread_path, f, &rx),
                    };
                    next = held.or_else(|| rx.recv().ok());
                }
            })
            .expect("spawning the writer thread");
        Writer {
            jobs: Some(tx),
            thread: Some(thread),
            path,
        }
    }

    fn send(&self, job: Job) -> Result<(), StoreError> {
        self.jobs
            .as_ref()
            .expect("jobs is only taken in drop")
            .send(job)
            .map_err(|_| self.stopped("the database writer thread has stopped"))
    }

    fn stopped(&self, what: &'static str) -> StoreError {
        StoreError::new(&self.path, anyhow::anyhow!(what))
    }

    /// Runs `f` on the writer thread, outside any transaction, and returns its result.
    pub async fn call<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut dyn Backend) -> anyhow::Result<T> + Send + 'static,
    {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.send(Job::Alone(Box::new(move |backend, path| {
            // The receiver is gone only if the caller was cancelled; the work is done either way.
            let _ = tx.send(f(backend).map_err(|e| StoreError::new(path, e)));
        })))?;
        rx.await
            .map_err(|_| self.stopped("the database writer thread stopped during a write"))?
    }

    /// Queues `f` to run inside a write transaction (possibly shared with other queued writes)
    /// and returns at once; the returned [`Pending`] resolves after the transaction ended.
    /// Writes run in the order they were queued, with [`Writer::call`]s in between.
    pub fn write<T, F>(&self, f: F) -> Pending<T>
    where
        T: Send + 'static,
        F: FnOnce(&dyn WriteTx) -> anyhow::Result<T> + Send + 'static,
    {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let job = Job::Grouped(Box::new(move |transaction, path| {
            let result = match transaction {
                Ok(t) => f(t).map_err(|e| StoreError::new(path, e)),
                Err(abort) => Err(StoreError::with_kind(
                    path,
                    abort.kind,
                    anyhow::anyhow!("{}", abort.why),
                )),
            };
            Ran {
                error: result
                    .as_ref()
                    .err()
                    .map(|e| Abort::new("another write in the same transaction failed", e)),
                answer: Box::new(move |aborted, path| {
                    let answer = match (result, aborted) {
                        (Ok(_), Some(abort)) => Err(StoreError::with_kind(
                            path,
                            abort.kind,
                            anyhow::anyhow!("the write was not committed: {}", abort.why),
                        )),
                        (result, _) => result,
                    };
                    let _ = tx.send(answer);
                }),
            }
        }));
        Pending {
            answer: self.send(job).map(|()| rx),
            path: self.path.clone(),
        }
    }
}

/// Runs `first` and the grouped writes queued behind it in one transaction, then answers them
/// all. Returns a job it took from the queue but could not add to the group.
fn run_group(
    backend: &mut dyn Backend,
    path: &str,
    first: GroupedWrite,
    rx: &mpsc::Receiver<Job>,
) -> Option<Job> {
    let mut first = Some(first);
    let mut ran = Vec::new();
    let mut failure: Option<Abort> = None;
    let mut held = None;
    let end = backend.write_group(&mut |tx| {
        let started = std::time::Instant::now();
        let first = first.take().expect("a group's body runs once");
        ran.push(first(Ok(tx), path));
        failure = ran[0].error.clone();
        while failure.is_none() && ran.len() < MAX_GROUP_WRITES && started.elapsed() < MAX_GROUP_TIME {
            match rx.try_recv() {
                Ok(Job::Grouped(f)) => {
                    let r = f(Ok(tx), path);
                    failure = r.error.clone();
                    ran.push(r);
                }
                Ok(other) => {
                    held = Some(other);
                    break;
                }
                Err(_) => break,
            }
        }
        failure.is_none()
    });
    // A failed commit was rolled back by the backend (SQLite asks for the ROLLBACK after
    // SQLITE_FULL or SQLITE_IOERR), so every write of the group fails with its cause.
    let aborted = match end {
        GroupEnd::Committed | GroupEnd::RolledBack => failure,
        GroupEnd::CannotCommit(e) => Some(Abort::new("cannot commit", &StoreError::new(path, e))),
        GroupEnd::CannotBegin(e) => {
            let abort = Abort::new("cannot start a write transaction", &StoreError::new(path, e));
            if let Some(first) = first.take() {
                (first(Err(&abort), path).answer)(Some(&abort), path);
            }
            return None;
        }
    };
    for r in ran {
        (r.answer)(aborted.as_ref(), path);
    }
    held
}

impl Drop for Writer {
    /// Finishes queued writes and closes the connection before returning.
    fn drop(&mut self) {
        drop(self.jobs.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
