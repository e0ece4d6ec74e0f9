//! `StoreError`, the one error type at the store's entry points ([`super::Writer`]'s answers,
//! [`super::open_writer`] and its migrations): it names the database path and classifies itself —
//! disk full, busy, corrupt, not writable, other I/O, or none of these — so that callers branch
//! on what can be done about it (retry, or stop and call a person) instead of on message text.
//! It classifies errors that reach it; it does not retry, log, or decide the daemon's policy.

use std::fmt;
use std::path::{Path, PathBuf};

use rusqlite::ErrorCode;

/// What went wrong with the warehouse, as far as it changes what anyone should do about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreErrorKind {
    /// `SQLITE_FULL`, or an I/O error while the database's filesystem has (next to) no space
    /// left. Retrying helps once space is freed; nothing was committed by the failed write.
    DiskFull {
        /// Bytes available to this user on the database's filesystem when the error was seen
        /// (`statvfs`), if they could be measured.
        free_bytes: Option<u64>,
    },
    /// `SQLITE_BUSY`/`SQLITE_LOCKED`/`SQLITE_PROTOCOL`: another connection held a lock longer
    /// than `database.busy_timeout`. Transient.
    Busy,
    /// `SQLITE_CORRUPT` or `SQLITE_NOTADB`: the file is damaged or not a SQLite database.
    /// Writing on could spread the damage; a person restores or rebuilds it.
    Corrupt,
    /// `SQLITE_READONLY`, `SQLITE_PERM`, `SQLITE_CANTOPEN`: the file, its directory or its
    /// filesystem cannot be written by this user. A person fixes ownership, modes or the mount.
    NotWritable,
    /// Any other `SQLITE_IOERR`: the kernel reported an I/O error. Possibly transient.
    Io,
    /// Not a condition of the database file: a statement this program got wrong, a constraint,
    /// a stored value it cannot parse, a writer thread that stopped. A bug to report.
    Other,
}

impl StoreErrorKind {
    /// The kind of a rusqlite error, or `None` if it did not come from SQLite's result codes.
    /// `path` is the database whose filesystem is measured when an I/O error may be a full disk.
    fn of_sqlite(e: &rusqlite::Error, path: &Path) -> Option<StoreErrorKind> {
        let code = e.sqlite_error_code()?;
        Some(match code {
            ErrorCode::DiskFull => StoreErrorKind::DiskFull {
                free_bytes: free_bytes(path),
            },
            ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked | ErrorCode::FileLockingProtocolFailed => {
                StoreErrorKind::Busy
            }
            ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase => StoreErrorKind::Corrupt,
            ErrorCode::ReadOnly | ErrorCode::PermissionDenied | ErrorCode::CannotOpen => {
                StoreErrorKind::NotWritable
            }
            ErrorCode::SystemIoFailure | ErrorCode::NoLargeFileSupport => {
                // SQLite says SQLITE_FULL only where it sees ENOSPC itself (writing the database
                // or the WAL); growing the -shm, a quota, or an fsync on a full filesystem come
                // back as SQLITE_IOERR_*. With less than a page of WAL room left, call it full.
                let free = free_bytes(path);
                if free.is_some_and(|b| b < NEARLY_FULL_BYTES) {
                    StoreErrorKind::DiskFull { free_bytes: free }
                } else {
                    StoreErrorKind::Io
                }
            }
            _ => StoreErrorKind::Other,
        })
    }

    /// Whether trying again later can succeed without anyone changing anything here (a busy
    /// lock is released; space may be freed by log rotation or an operator; an I/O error may
    /// pass). A corrupt or unwritable database stays so until a person acts.
    pub fn is_retryable(self) -> bool {
        matches!(
            self,
            StoreErrorKind::DiskFull { .. } | StoreErrorKind::Busy | StoreErrorKind::Io
        )
    }

    /// Whether a person must do something (free space, fix permissions, restore the file) for
    /// the warehouse to work again; retrying alone at best waits for them.
    pub fn operator_must_act(self) -> bool {
        matches!(
            self,
            StoreErrorKind::DiskFull { .. } | StoreErrorKind::Corrupt | StoreErrorKind::NotWritable
        )
    }

    /// Whether the process must stop writing this warehouse at once: only corruption, where
    /// every further write risks spreading the damage. `run` exits with `exit::STORE_CORRUPT`.
    pub fn is_fatal(self) -> bool {
        self == StoreErrorKind::Corrupt
    }

    /// A stable code for logs, `sync_runs.reason_code` and alerts; `None` for [`Other`](Self::Other).
    pub fn reason_code(self) -> Option<&'static str> {
        match self {
            StoreErrorKind::DiskFull { .. } => Some("disk_full"),
            StoreErrorKind::Busy => Some("database_busy"),
            StoreErrorKind::Corrupt => Some("database_corrupt"),
            StoreErrorKind::NotWritable => Some("database_not_writable"),
            StoreErrorKind::Io => Some("database_io_error"),
            StoreErrorKind::Other => None,
        }
    }
}

/// Below this many free bytes an I/O error while writing is taken for a full disk: less than a
/// WAL frame of a 64 KiB page (SQLite's largest) plus its header.
const NEARLY_FULL_BYTES: u64 = 64 * 1024 + 24;

/// Bytes available to this user on the filesystem holding `path` (its directory is measured:
/// the database itself may not exist yet).
fn free_bytes(path: &Path) -> Option<u64> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let st = rustix::fs::statvfs(dir).ok()?;
    Some(st.f_bavail.saturating_mul(st.f_frsize))
}

/// A failed operation on the warehouse at `path`, classified by [`StoreErrorKind`].
///
/// Its message names the path (and, for a full disk, the free bytes) and what to do; the
/// original error chain (rusqlite's message, the contexts added on the way) follows as its
/// `source()`, so `{:#}` prints everything. For [`StoreErrorKind::Other`] the message is the
/// original one, prefixed with the path.
#[derive(Debug)]
pub struct StoreError {
    path: PathBuf,
    kind: StoreErrorKind,
    cause: anyhow::Error,
}

impl StoreError {
    /// Classifies `cause` by the first rusqlite error in its chain (a `StoreError` already in
    /// it is kept as it is, not wrapped twice).
    pub fn new(path: &Path, cause: anyhow::Error) -> StoreError {
        let cause = match cause.downcast::<StoreError>() {
            Ok(already) => return already,
            Err(cause) => cause,
        };
        let kind = cause
            .chain()
            .find_map(|e| e.downcast_ref::<rusqlite::Error>())
            .and_then(|e| StoreErrorKind::of_sqlite(e, path))
            .unwrap_or(StoreErrorKind::Other);
        StoreError::with_kind(path, kind, cause)
    }

    /// A `StoreError` whose kind is already known (a write rolled back because another write
    /// of its transaction failed is classified like that failure).
    pub fn with_kind(path: &Path, kind: StoreErrorKind, cause: anyhow::Error) -> StoreError {
        StoreError {
            path: path.to_owned(),
            kind,
            cause,
        }
    }

    pub fn kind(&self) -> StoreErrorKind {
        self.kind
    }

    /// The database file this error is about.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The error as it was raised, before classification.
    pub(super) fn cause(&self) -> &anyhow::Error {
        &self.cause
    }

    /// See [`StoreErrorKind::is_retryable`].
    pub fn is_retryable(&self) -> bool {
        self.kind.is_retryable()
    }

    /// See [`StoreErrorKind::operator_must_act`].
    pub fn operator_must_act(&self) -> bool {
        self.kind.operator_must_act()
    }

    /// See [`StoreErrorKind::is_fatal`].
    pub fn is_fatal(&self) -> bool {
        self.kind.is_fatal()
    }

    /// See [`StoreErrorKind::reason_code`].
    pub fn reason_code(&self) -> Option<&'static str> {
        self.kind.reason_code()
    }
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let path = self.path.display();
        match self.kind {
            StoreErrorKind::DiskFull {
                free_bytes: Some(free),
            } => write!(
                f,
                "the disk holding database {path} is full ({free} bytes free on its filesystem); \
                 free space there, the next attempt resumes"
            )?,
            StoreErrorKind::DiskFull { free_bytes: None } => write!(
                f,
                "the disk holding database {path} is full; free space there, the next attempt resumes"
            )?,
            StoreErrorKind::Busy => write!(
                f,
                "database {path} is busy: another connection held a lock longer than database.busy_timeout"
            )?,
            StoreErrorKind::Corrupt => write!(
                f,
                "database {path} is corrupt or not a SQLite database; stopped writing it: restore it \
                 from a backup or rebuild it (docs/operations.md, \"Disk full, corruption\")"
            )?,
            StoreErrorKind::NotWritable => write!(
                f,
                "database {path} cannot be written: the file, its directory or its filesystem is \
                 read-only to this user; fix its owner, mode or mount"
            )?,
            StoreErrorKind::Io => write!(f, "I/O error on database {path}")?,
            StoreErrorKind::Other => write!(f, "database {path}: {}", self.cause)?,
        }
        // Like anyhow's `{:#}`: the causes, outermost first.
        if f.alternate() {
            let mut cause = std::error::Error::source(self);
            while let Some(c) = cause {
                write!(f, ": {c}")?;
                cause = c.source();
            }
        }
        Ok(())
    }
}

impl std::error::Error for StoreError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self.kind {
            // The message already is the cause's; its own causes follow.
            StoreErrorKind::Other => self.cause.chain().nth(1),
            _ => Some(self.cause.as_ref()),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use rusqlite::ffi;

    use super::*;

    /// A rusqlite error as SQLite reports it: a (possibly extended) result code and a message.
    fn sqlite(code: i32) -> anyhow::Error {
        rusqlite::Error::SqliteFailure(ffi::Error::new(code), Some("from sqlite".into())).into()
    }

    #[test]
    fn every_sqlite_result_code_that_matters_has_its_kind() {
        let path = Path::new("/nonexistent-dir/w.db");
        let table = [
            (ffi::SQLITE_FULL, "disk_full"),
            (ffi::SQLITE_BUSY, "database_busy"),
            (ffi::SQLITE_BUSY_SNAPSHOT, "database_busy"),
            (ffi::SQLITE_LOCKED, "database_busy"),
            (ffi::SQLITE_PROTOCOL, "database_busy"),
            (ffi::SQLITE_CORRUPT, "database_corrupt"),
            (ffi::SQLITE_CORRUPT_VTAB, "database_corrupt"),
            (ffi::SQLITE_NOTADB, "database_corrupt"),
            (ffi::SQLITE_READONLY, "database_not_writable"),
            (ffi::SQLITE_READONLY_DBMOVED, "database_not_writable"),
            (ffi::SQLITE_PERM, "database_not_writable"),
            (ffi::SQLITE_CANTOPEN, "database_not_writable"),
            // The filesystem of a path that does not exist cannot be measured: plain I/O.
            (ffi::SQLITE_IOERR_WRITE, "database_io_error"),
            (ffi::SQLITE_IOERR_FSYNC, "database_io_error"),
        ];
        for (code, reason) in table {
            let e = StoreError::new(path, sqlite(code));
            assert_eq!(e.reason_code(), Some(reason), "result code {code}");
        }
        for code in [
            ffi::SQLITE_CONSTRAINT_UNIQUE,
            ffi::SQLITE_ERROR,
            ffi::SQLITE_MISMATCH,
            ffi::SQLITE_MISUSE,
        ] {
            assert_eq!(
                StoreError::new(path, sqlite(code)).kind(),
                StoreErrorKind::Other,
                "{code}"
            );
        }
        // Not from SQLite at all.
        let parse = StoreError::new(path, anyhow::anyhow!("corrupt backfill cursor: bad"));
        assert_eq!(parse.kind(), StoreErrorKind::Other);
    }

    #[test]
    fn retry_and_operator_answers_follow_the_kind() {
        use StoreErrorKind::*;
        let full = DiskFull { free_bytes: Some(0) };
        // (kind, retryable, operator must act, fatal)
        let table = [
            (full, true, true, false),
            (Busy, true, false, false),
            (Corrupt, false, true, true),
            (NotWritable, false, true, false),
            (Io, true, false, false),
            (Other, false, false, false),
        ];
        for (kind, retry, act, fatal) in table {
            assert_eq!(
                (kind.is_retryable(), kind.operator_must_act(), kind.is_fatal()),
                (retry, act, fatal),
                "{kind:?}"
            );
        }
    }

    #[test]
    fn the_message_names_the_path_and_keeps_the_chain() {
        let path = Path::new("/srv/x/warehouse.db");
        let full = StoreError::with_kind(
            path,
            StoreErrorKind::DiskFull {
                free_bytes: Some(4096),
            },
            sqlite(ffi::SQLITE_FULL).context("cannot commit"),
        );
        let text = format!("{full:#}");
        assert!(
            text.contains("/srv/x/warehouse.db") && text.contains("4096 bytes free"),
            "{text}"
        );
        assert!(
            text.contains("; free space there, the next attempt resumes: cannot commit: from sqlite"),
            "{text}"
        );
        // Wrapped in anyhow, the chain is printed once.
        assert_eq!(format!("{:#}", anyhow::Error::new(full)), text);
        // `Other` keeps the original message after the path, and is not wrapped twice.
        let other = StoreError::new(path, anyhow::anyhow!("no such table: nope"));
        assert_eq!(
            other.to_string(),
            "database /srv/x/warehouse.db: no such table: nope"
        );
        let again = StoreError::new(Path::new("/elsewhere"), anyhow::Error::new(other));
        assert_eq!(
            format!("{again:#}"),
            "database /srv/x/warehouse.db: no such table: nope"
        );
    }

    #[test]
    fn a_file_that_is_not_a_database_is_corrupt_when_opened() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.db");
        std::fs::write(&path, vec![0x5a_u8; 8192]).unwrap();
        let e = crate::store::sqlite::open_writer(&path, Duration::from_secs(1)).unwrap_err();
        assert_eq!(e.kind(), StoreErrorKind::Corrupt, "{e:#}");
        assert!(e.is_fatal());
        assert!(format!("{e:#}").contains(&path.display().to_string()), "{e:#}");
    }

    #[test]
    fn damaged_pages_are_corrupt_when_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.db");
        {
            let conn = rusqlite::Connection::open(&path).unwrap();
            conn.execute_batch(
                "CREATE TABLE t (x TEXT);
                 WITH RECURSIVE c(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM c WHERE i < 2000)
                 INSERT INTO t SELECT printf('%0100d', i) FROM c;",
            )
            .unwrap();
        }
        // Keep page 1 (header and schema), overwrite the table's pages with garbage.
        let mut bytes = std::fs::read(&path).unwrap();
        for b in &mut bytes[4096..] {
            *b = 0xa5;
        }
        std::fs::write(&path, bytes).unwrap();
        let conn = rusqlite::Connection::open(&path).unwrap();
        let err = conn
            .query_row("SELECT count(*), max(x) FROM t", [], |r| r.get::<_, i64>(0))
            .unwrap_err();
        let e = StoreError::new(&path, anyhow::Error::new(err).context("counting"));
        assert_eq!(e.kind(), StoreErrorKind::Corrupt, "{e:#}");
    }

    #[test]
    fn a_read_only_file_is_not_writable() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.db");
        rusqlite::Connection::open(&path)
            .unwrap()
            .execute_batch("CREATE TABLE t (x)")
            .unwrap();
        let conn =
            rusqlite::Connection::open_with_flags(&path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap();
        let err = conn.execute("INSERT INTO t VALUES (1)", []).unwrap_err();
        let e = StoreError::new(&path, err.into());
        assert_eq!(e.kind(), StoreErrorKind::NotWritable, "{e:#}");
        assert!(!e.is_retryable() && e.operator_must_act());
    }

    #[test]
    fn a_lock_held_past_the_busy_timeout_is_busy() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.db");
        let holder = rusqlite::Connection::open(&path).unwrap();
        holder
            .execute_batch("CREATE TABLE t (x); BEGIN IMMEDIATE; INSERT INTO t VALUES (1);")
            .unwrap();
        let other = rusqlite::Connection::open(&path).unwrap();
        crate::store::sqlite::set_busy_timeout(&other, Duration::ZERO).unwrap();
        let err = other.execute("INSERT INTO t VALUES (2)", []).unwrap_err();
        let e = StoreError::new(&path, err.into());
        assert_eq!(e.kind(), StoreErrorKind::Busy, "{e:#}");
        assert!(e.is_retryable() && !e.operator_must_act());
    }

    #[test]
    fn a_database_that_reached_its_page_limit_is_full_and_names_the_free_bytes() {
        // SQLite answers SQLITE_FULL when max_page_count is reached, as on a full disk.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.db");
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.execute_batch("CREATE TABLE t (x); PRAGMA max_page_count = 4;")
            .unwrap();
        let err = conn
            .execute_batch(
                "WITH RECURSIVE c(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM c WHERE i < 1000)
                 INSERT INTO t SELECT randomblob(200) FROM c;",
            )
            .unwrap_err();
        let e = StoreError::new(&path, err.into());
        let StoreErrorKind::DiskFull {
            free_bytes: Some(free),
        } = e.kind()
        else {
            panic!("{e:#} is {:?}", e.kind());
        };
        assert!(e.to_string().contains(&format!("{free} bytes free")), "{e}");
        assert!(e.is_retryable() && e.operator_must_act() && !e.is_fatal());
    }
}
