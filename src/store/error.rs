//! `StoreError`, the one error type at the store's entry points ([`super::Writer`]'s answers,
//! [`super::open`] and its migrations): it names the database (its file, or its server and
//! schema) and classifies itself — disk full, busy, corrupt, not writable, other I/O, server
//! unavailable, or none of these — by the first SQLite or PostgreSQL error in its cause's
//! chain (`sqlite::classify`, `postgres::error::classify`), so that callers branch
//! on what can be done about it (retry, or stop and call a person) instead of on message text.
//! It classifies errors that reach it; it does not retry, log, or decide the daemon's policy.

use std::fmt;
use std::path::Path;

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
    /// The database server cannot be reached, closed the connection, is shutting down or
    /// restarting, or is out of a resource (connections, memory). Transient: the next attempt
    /// reconnects.
    Unavailable,
    /// This process no longer holds the warehouse's one-writer lock (its PostgreSQL session
    /// ended and another process took the lock before it could reconnect, or another process
    /// writes it already): it must stop writing at once, never write beside the other writer.
    LockLost,
    /// Not a condition of the database file: a statement this program got wrong, a constraint,
    /// a stored value it cannot parse, a writer thread that stopped. A bug to report.
    Other,
}

impl StoreErrorKind {
    /// Whether trying again later can succeed without anyone changing anything here (a busy
    /// lock is released; space may be freed by log rotation or an operator; an I/O error may
    /// pass). A corrupt or unwritable database stays so until a person acts.
    pub fn is_retryable(self) -> bool {
        matches!(
            self,
            StoreErrorKind::DiskFull { .. }
                | StoreErrorKind::Busy
                | StoreErrorKind::Io
                | StoreErrorKind::Unavailable
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

    /// Whether the process must stop writing this warehouse at once: corruption, where every
    /// further write risks spreading the damage (`run` exits with `exit::STORE_CORRUPT`), or a
    /// lost writer lock, where another process may be writing (`run` exits with
    /// `exit::CYCLE_FAILED`; its service manager restarts it, and the restart waits its turn).
    pub fn is_fatal(self) -> bool {
        matches!(self, StoreErrorKind::Corrupt | StoreErrorKind::LockLost)
    }

    /// A stable code for logs, `sync_runs.reason_code` and alerts; `None` for [`Other`](Self::Other).
    pub fn reason_code(self) -> Option<&'static str> {
        match self {
            StoreErrorKind::DiskFull { .. } => Some("disk_full"),
            StoreErrorKind::Busy => Some("database_busy"),
            StoreErrorKind::Corrupt => Some("database_corrupt"),
            StoreErrorKind::NotWritable => Some("database_not_writable"),
            StoreErrorKind::Io => Some("database_io_error"),
            StoreErrorKind::Unavailable => Some("database_unavailable"),
            StoreErrorKind::LockLost => Some("writer_lock_lost"),
            StoreErrorKind::Other => None,
        }
    }
}

/// Below this many free bytes an I/O error while writing is taken for a full disk: less than a
/// WAL frame of a 64 KiB page (SQLite's largest) plus its header.
pub(super) const NEARLY_FULL_BYTES: u64 = 64 * 1024 + 24;

/// Bytes available to this user on the filesystem holding `path` (its directory is measured:
/// the database itself may not exist yet).
pub(super) fn free_bytes(path: &Path) -> Option<u64> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let st = rustix::fs::statvfs(dir).ok()?;
    Some(st.f_bavail.saturating_mul(st.f_frsize))
}

/// A failed operation on the warehouse at `location`, classified by [`StoreErrorKind`].
///
/// Its message names the database (and, for a full disk, the free bytes) and what to do; the
/// original error chain (the database's message, the contexts added on the way) follows as its
/// `source()`, so `{:#}` prints everything. For [`StoreErrorKind::Other`] the message is the
/// original one, prefixed with the location.
#[derive(Debug)]
pub struct StoreError {
    location: String,
    kind: StoreErrorKind,
    cause: anyhow::Error,
}

impl StoreError {
    /// Classifies `cause` by the first database error in its chain (a `StoreError` already in
    /// it is kept as it is, not wrapped twice). `location` is what the database is called in
    /// messages ([`super::Backend::location`]): a SQLite file's path (whose filesystem a full
    /// disk is measured on), or a PostgreSQL server and schema.
    pub fn new(location: impl fmt::Display, cause: anyhow::Error) -> StoreError {
        let cause = match cause.downcast::<StoreError>() {
            Ok(already) => return already,
            Err(cause) => cause,
        };
        let location = location.to_string();
        let kind = super::sqlite::classify(&cause, Path::new(&location))
            .or_else(|| super::postgres::error::classify(&cause))
            .unwrap_or(StoreErrorKind::Other);
        StoreError::with_kind(location, kind, cause)
    }

    /// A `StoreError` whose kind is already known (a write rolled back because another write
    /// of its transaction failed is classified like that failure).
    pub fn with_kind(location: impl fmt::Display, kind: StoreErrorKind, cause: anyhow::Error) -> StoreError {
        StoreError {
            location: location.to_string(),
            kind,
            cause,
        }
    }

    pub fn kind(&self) -> StoreErrorKind {
        self.kind
    }

    /// The database this error is about: a file's path, or `postgresql://user@host:port/db
    /// (schema s)`.
    pub fn location(&self) -> &str {
        &self.location
    }

    /// Whether the cause is a configuration error reached only when the database was opened (a
    /// password file that cannot be used): the operator's to fix, exit 2 like any other.
    pub fn is_configuration(&self) -> bool {
        self.cause.chain().any(|c| c.is::<crate::config::ConfigError>())
    }

    /// The error as it was raised, before classification.
    pub(super) fn cause(&self) -> &anyhow::Error {
        &self.cause
    }

    /// Whether the database is a server's (its location is a `postgresql://` name) rather than
    /// a file.
    fn is_server(&self) -> bool {
        self.location.starts_with("postgresql://")
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
        let path = &self.location;
        match self.kind {
            // A server's data: the message of SQLite's file would send the operator to the
            // wrong place.
            StoreErrorKind::Corrupt if self.is_server() => write!(
                f,
                "database {path} reports corrupt data; stopped writing it: have its administrator \
                 check the server (docs/postgres.md, \"Backups\")"
            )?,
            StoreErrorKind::NotWritable if self.is_server() => write!(
                f,
                "database {path} cannot be written: the role lacks a privilege on the schema, or the \
                 server is read-only (a standby); grant the privilege or point database.url at the primary"
            )?,
            StoreErrorKind::Busy if self.is_server() => write!(
                f,
                "database {path} is busy: a lock conflict, deadlock or cancelled statement; the next \
                 attempt retries"
            )?,
            StoreErrorKind::DiskFull { .. } if self.is_server() => write!(
                f,
                "the disk of the database server of {path} is full; free space there, the next attempt resumes"
            )?,
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
            StoreErrorKind::Unavailable => write!(
                f,
                "database {path} is unavailable: the server cannot be reached, closed the \
                 connection or is out of resources; the next attempt reconnects"
            )?,
            StoreErrorKind::LockLost => write!(
                f,
                "database {path}: another process holds the warehouse's writer lock (this process's \
                 session ended and was taken over, or another process writes it already); this \
                 process stopped writing so that only one process writes it"
            )?,
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
