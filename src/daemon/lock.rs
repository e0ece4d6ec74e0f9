//! One writer per warehouse, held for the life of the process. A SQLite warehouse: an
//! exclusive advisory lock on `<database>.lock`, a file that also says who holds it, so the
//! refusal can name the holder; the kernel releases it when the process dies, however it dies.
//! The file is its owner's alone (mode 0600): anyone who can open a file can lock it, and a
//! reader in the warehouse's group must not be able to keep the service from starting.
//! A PostgreSQL warehouse: a session advisory lock keyed by the schema
//! (`pg_try_advisory_lock`) on a dedicated connection whose `application_name` names the
//! holder; the server releases it when that connection closes, however the process dies.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::config::DatabaseTarget;
use crate::store::{WriterLease, sqlite_lock_path as lock_path, try_postgres_writer_lock};

/// Held for as long as this value lives.
#[derive(Debug)]
pub struct WriterLock {
    _held: Held,
}

#[derive(Debug)]
enum Held {
    File { _file: File, _alive: Liveness },
    Server { _lease: WriterLease },
}

/// How often the holder of a SQLite warehouse's lock touches the lock file.
pub const TOUCH_EVERY: std::time::Duration = std::time::Duration::from_secs(2);

/// Touches the lock file every [`TOUCH_EVERY`] while the lock is held, from a thread of its
/// own: its modification time tells `status` the holder is alive even while the writer thread
/// is busy for long (a merge, a `VACUUM`), and stops the moment the process dies. A stat of the
/// file is all a reader needs, so an analyst who may not open the file can tell too.
#[derive(Debug)]
struct Liveness {
    /// Dropped with the lock, which ends the thread.
    _stop: std::sync::mpsc::Sender<()>,
}

impl Liveness {
    /// Touches `path` through an open file of its own: a duplicate of the locked file's
    /// descriptor would share its lock and keep it held after the lock is dropped, until the
    /// thread noticed.
    fn start(path: &Path, every: std::time::Duration) -> std::io::Result<Liveness> {
        let file = File::open(path)?;
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        std::thread::Builder::new()
            .name("writer-lock-alive".to_owned())
            .spawn(move || {
                loop {
                    let _ = file.set_modified(std::time::SystemTime::now());
                    if !matches!(
                        stopped.recv_timeout(every),
                        Err(std::sync::mpsc::RecvTimeoutError::Timeout)
                    ) {
                        return;
                    }
                }
            })?;
        Ok(Liveness { _stop: stop })
    }
}

/// Why the lock could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error(
        "the warehouse {database} is being written by another process ({holder}); only one `run` or `sync` may write it at a time"
    )]
    Held { database: String, holder: String },
    /// The OS error is the `source`, printed once by the `{:#}` chain, not also in this message.
    #[error("cannot use the lock file {path} beside `database.path`")]
    Io { path: PathBuf, source: std::io::Error },
    /// The PostgreSQL server could not be asked (its message names the warehouse and what to do).
    #[error("cannot take the warehouse's writer lock: {0:#}")]
    Server(anyhow::Error),
}

impl WriterLock {
    /// Takes the lock for the warehouse, or says who holds it. `what` describes this process
    /// (e.g. `charthero-sync run`).
    pub fn acquire(database: &DatabaseTarget, what: &str) -> Result<WriterLock, LockError> {
        match database {
            DatabaseTarget::Sqlite { path } => WriterLock::acquire_file(path, what),
            DatabaseTarget::Postgres(pg) => match try_postgres_writer_lock(pg, what) {
                Ok(Ok(lease)) => Ok(WriterLock {
                    _held: Held::Server { _lease: lease },
                }),
                Ok(Err(holder)) => Err(LockError::Held {
                    database: database.to_string(),
                    holder,
                }),
                Err(e) => Err(LockError::Server(e)),
            },
        }
    }

    fn acquire_file(database: &Path, what: &str) -> Result<WriterLock, LockError> {
        let path = lock_path(database);
        let io = |source| LockError::Io {
            path: path.clone(),
            source,
        };
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(io)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                return Err(LockError::Held {
                    database: database.display().to_string(),
                    holder: describe_other_holder(holder.trim(), &path),
                });
            }
            Err(TryLockError::Error(e)) => return Err(io(e)),
        }
        // A lock file an earlier release left readable by the group becomes the owner's alone.
        if let Ok(meta) = file.metadata()
            && meta.permissions().mode() & 0o077 != 0
            && let Err(e) = file.set_permissions(std::fs::Permissions::from_mode(0o600))
        {
            tracing::warn!(lock = %path.display(), "cannot make the lock file its owner's alone: {e}");
        }
        // The lock is held; saying who holds it is a courtesy. On a full disk it cannot be
        // written, and the command goes on to fail (or succeed) on the database itself, whose
        // error names the free bytes, instead of on this file.
        if let Err(e) = describe_holder(&mut file, what) {
            tracing::warn!(lock = %path.display(), "cannot write the lock holder's name: {e}");
        }
        let alive = Liveness::start(&path, TOUCH_EVERY).map_err(io)?;
        Ok(WriterLock {
            _held: Held::File {
                _file: file,
                _alive: alive,
            },
        })
    }
}

/// Who holds the lock, from what the file says (`pid N (what) since T`, written by the holder):
/// as written when that process still runs; otherwise the file's words are a past holder's,
/// and whatever holds the lock now did not write it.
fn describe_other_holder(written: &str, path: &Path) -> String {
    let pid = written
        .strip_prefix("pid ")
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|pid| pid.parse::<u32>().ok());
    match pid {
        Some(pid) if Path::new(&format!("/proc/{pid}")).exists() => written.to_owned(),
        _ => format!(
            "a process that did not write {} (it names {}); `fuser -v {}` shows which",
            path.display(),
            if written.is_empty() { "no one" } else { written },
            path.display()
        ),
    }
}

fn describe_holder(file: &mut File, what: &str) -> std::io::Result<()> {
    file.set_len(0)?;
    file.seek(SeekFrom::Start(0))?;
    write!(
        file,
        "pid {} ({what}) since {}",
        std::process::id(),
        crate::timefmt::format_utc(time::OffsetDateTime::now_utc())
    )?;
    file.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The lock file's modification time is the holder's pulse: renewed while the lock is held,
    /// on a thread of its own, and never again once it is dropped.
    #[test]
    fn the_holder_touches_its_lock_file_until_it_lets_go() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.db.lock");
        let file = File::create(&path).unwrap();
        let long_ago = std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000);
        let touched = || std::fs::metadata(&path).unwrap().modified().unwrap();
        let alive = Liveness::start(&path, std::time::Duration::from_millis(20)).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(100));
        file.set_modified(long_ago).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(200));
        assert!(touched() > long_ago, "not touched while held");
        drop(alive);
        std::thread::sleep(std::time::Duration::from_millis(100));
        file.set_modified(long_ago).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(200));
        assert_eq!(touched(), long_ago, "touched after it was let go");
    }

    #[test]
    fn a_second_writer_is_refused_with_the_holder_named_until_the_first_lets_go() {
        let dir = tempfile::tempdir().unwrap();
        let db = DatabaseTarget::Sqlite {
            path: dir.path().join("w.db"),
        };
        let first = WriterLock::acquire(&db, "charthero-sync run").unwrap();
        let err = WriterLock::acquire(&db, "charthero-sync sync")
            .unwrap_err()
            .to_string();
        assert!(err.contains(&format!("pid {}", std::process::id())), "{err}");
        assert!(err.contains("charthero-sync run"), "{err}");
        drop(first);
        WriterLock::acquire(&db, "charthero-sync sync").unwrap();
        let mode = std::fs::metadata(dir.path().join("w.db.lock"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "the lock file is its owner's alone");
    }

    #[test]
    fn a_lock_held_by_a_process_that_did_not_write_the_file_is_not_blamed_on_the_past_holder() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.db");
        std::fs::write(
            lock_path(&path),
            "pid 4000000000 (charthero-sync run) since 2026-01-01T00:00:00Z",
        )
        .unwrap();
        // Another open of the file (as a reader's `flock` would) holds the lock.
        let other = File::open(lock_path(&path)).unwrap();
        other.try_lock_shared().unwrap();
        let err = WriterLock::acquire(
            &DatabaseTarget::Sqlite { path: path.clone() },
            "charthero-sync sync",
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("a process that did not write")
                && err.contains("pid 4000000000")
                && err.contains("fuser"),
            "{err}"
        );
    }
}
