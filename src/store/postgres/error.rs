//! How PostgreSQL's errors map to [`StoreErrorKind`]: [`classify`] finds the first
//! `postgres::Error` in a chain and names its kind by SQLSTATE class, or by the connection's
//! state when the server sent none (closed, unreachable). It classifies; what anyone does about
//! a kind is [`crate::store::StoreError`]'s and the daemon's.

use crate::store::StoreErrorKind;

/// The writer's session could not (re)take the warehouse's write lock: another process holds
/// it (named, as its `application_name` and address say). Classified as
/// [`StoreErrorKind::LockLost`].
#[derive(Debug, thiserror::Error)]
#[error("the warehouse's write lock is held by another process ({holder})")]
pub struct WriteLockHeld {
    pub holder: String,
}

/// The kind of the first PostgreSQL error in `cause`'s chain; `None` when there is none (the
/// error did not come from PostgreSQL).
pub(crate) fn classify(cause: &anyhow::Error) -> Option<StoreErrorKind> {
    if cause.chain().any(|e| e.is::<WriteLockHeld>()) {
        return Some(StoreErrorKind::LockLost);
    }
    let e = cause.chain().find_map(|e| e.downcast_ref::<postgres::Error>())?;
    Some(match e.code() {
        Some(code) => of_sqlstate(code.code()),
        // No SQLSTATE: the client's side of the connection failed (refused, reset, timed out,
        // closed by the server) or a value could not be converted.
        None if e.is_closed() || has_io_error(e) => StoreErrorKind::Unavailable,
        None => StoreErrorKind::Other,
    })
}

fn has_io_error(e: &postgres::Error) -> bool {
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if s.is::<std::io::Error>() {
            return true;
        }
        source = s.source();
    }
    false
}

/// SQLSTATE (appendix A of PostgreSQL's manual) → kind.
fn of_sqlstate(code: &str) -> StoreErrorKind {
    match code {
        // disk_full
        "53100" => StoreErrorKind::DiskFull { free_bytes: None },
        // Insufficient resources (out of memory, too many connections, a limit): the server is
        // there but cannot serve now.
        c if c.starts_with("53") => StoreErrorKind::Unavailable,
        // admin_shutdown, crash_shutdown, cannot_connect_now (starting or in recovery),
        // idle_session_timeout, database_dropped; connection exceptions (class 08).
        "57P01" | "57P02" | "57P03" | "57P05" => StoreErrorKind::Unavailable,
        c if c.starts_with("08") => StoreErrorKind::Unavailable,
        // serialization_failure, deadlock_detected, lock_not_available, query_canceled (a
        // lock_timeout or an operator's pg_cancel_backend).
        "40001" | "40P01" | "55P03" | "57014" => StoreErrorKind::Busy,
        // data_corrupted, index_corrupted.
        "XX001" | "XX002" => StoreErrorKind::Corrupt,
        // insufficient_privilege, read_only_sql_transaction (a standby, or
        // default_transaction_read_only).
        "42501" | "25006" => StoreErrorKind::NotWritable,
        // io_error, undefined_file: the server's own storage failed.
        "58030" | "58P01" => StoreErrorKind::Io,
        _ => StoreErrorKind::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlstate_classes_map_to_the_kinds_the_daemon_acts_on() {
        use StoreErrorKind::*;
        let cases = [
            ("53100", DiskFull { free_bytes: None }),
            ("53200", Unavailable),
            ("53300", Unavailable),
            ("57P01", Unavailable),
            ("57P02", Unavailable),
            ("57P03", Unavailable),
            ("08006", Unavailable),
            ("40001", Busy),
            ("40P01", Busy),
            ("XX001", Corrupt),
            ("XX002", Corrupt),
            ("42501", NotWritable),
            ("25006", NotWritable),
            ("58030", Io),
            ("23505", Other),
            ("42P01", Other),
        ];
        for (code, kind) in cases {
            assert_eq!(of_sqlstate(code), kind, "{code}");
        }
        // A lost server is retried, never taken for corruption.
        assert!(Unavailable.is_retryable() && !Unavailable.is_fatal() && !Unavailable.operator_must_act());
    }

    #[test]
    fn errors_without_a_postgres_error_are_not_classified_here() {
        assert_eq!(classify(&anyhow::anyhow!("no such table: nope")), None);
    }
}
