//! How SQLite's result codes map to [`StoreErrorKind`]: [`classify`] finds the first rusqlite
//! error in a chain and names its kind, for [`StoreError::new`]. The kinds, the messages and
//! what callers do with them are the seam's (`store::error`); this module only reads codes.

use std::path::Path;

use rusqlite::ErrorCode;

use crate::store::StoreErrorKind;
use crate::store::error::{NEARLY_FULL_BYTES, free_bytes};

/// The kind of the first rusqlite error in `cause`'s chain, or `None` if there is none with a
/// SQLite result code.
pub(crate) fn classify(cause: &anyhow::Error, path: &Path) -> Option<StoreErrorKind> {
    cause
        .chain()
        .find_map(|e| e.downcast_ref::<rusqlite::Error>())
        .and_then(|e| of_sqlite(e, path))
}

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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use rusqlite::ffi;

    use super::*;
    use crate::store::StoreError;

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
            let e = StoreError::new(path.display(), sqlite(code));
            assert_eq!(e.reason_code(), Some(reason), "result code {code}");
        }
        for code in [
            ffi::SQLITE_CONSTRAINT_UNIQUE,
            ffi::SQLITE_ERROR,
            ffi::SQLITE_MISMATCH,
            ffi::SQLITE_MISUSE,
        ] {
            assert_eq!(
                StoreError::new(path.display(), sqlite(code)).kind(),
                StoreErrorKind::Other,
                "{code}"
            );
        }
        // Not from SQLite at all.
        let parse = StoreError::new(path.display(), anyhow::anyhow!("corrupt backfill cursor: bad"));
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
            path.display(),
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
        let other = StoreError::new(path.display(), anyhow::anyhow!("no such table: nope"));
        assert_eq!(
            other.to_string(),
            "database /srv/x/warehouse.db: no such table: nope"
        );
        let again = StoreError::new(Path::new("/elsewhere").display(), anyhow::Error::new(other));
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
        let e = StoreError::new(path.display(), anyhow::Error::new(err).context("counting"));
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
        let e = StoreError::new(path.display(), err.into());
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
        let e = StoreError::new(path.display(), err.into());
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
        let e = StoreError::new(path.display(), err.into());
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
