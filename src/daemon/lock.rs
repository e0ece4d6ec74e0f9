//! One writer per warehouse, held for the life of the process. A SQLite warehouse: an
//! exclusive advisory lock on `<database>.lock`, a file that also says who holds it, so the
//! refusal can name the holder; the kernel releases it when the process dies, however it dies.
//! A PostgreSQL warehouse: a session advisory lock keyed by the schema
//! (`pg_try_advisory_lock`) on a dedicated connection whose `application_name` names the
//! holder; the server releases it when that connection closes, however the process dies.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use crate::config::DatabaseTarget;
use crate::store::{WriterLease, try_postgres_writer_lock};

/// Held for as long as this value lives.
#[derive(Debug)]
pub struct WriterLock {
    _held: Held,
}

#[derive(Debug)]
enum Held {
    File { _file: File },
    Server { _lease: WriterLease },
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

fn lock_path(database: &Path) -> PathBuf {
    let mut p = database.as_os_str().to_owned();
    p.push(".lock");
    PathBuf::from(p)
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
            .open(&path)
            .map_err(io)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let holder = holder.trim();
                return Err(LockError::Held {
                    database: database.display().to_string(),
                    holder: if holder.is_empty() {
                        "holder unknown".to_owned()
                    } else {
                        holder.to_owned()
                    },
                });
            }
            Err(TryLockError::Error(e)) => return Err(io(e)),
        }
        // The lock is held; saying who holds it is a courtesy. On a full disk it cannot be
        // written, and the command goes on to fail (or succeed) on the database itself, whose
        // error names the free bytes, instead of on this file.
        if let Err(e) = describe_holder(&mut file, what) {
            tracing::warn!(lock = %path.display(), "cannot write the lock holder's name: {e}");
        }
        Ok(WriterLock {
            _held: Held::File { _file: file },
        })
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
    }
}
