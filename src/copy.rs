//! `charthero-sync copy --from <file>`: moves a SQLite warehouse into the configured PostgreSQL
//! warehouse without re-listing anything. Every table's rows go across (the watermark, ledger,
//! content queue, dead letters and history with the data), so the next `sync` against
//! PostgreSQL lists only what is new. The source must be of exactly this release's schema (an
//! older one is refused: `migrate` it with its SQLite configuration first) and is never written;
//! the destination is migrated and must hold no data. All of it commits in one PostgreSQL
//! transaction: a copy that stops anywhere leaves the destination empty.
//!
//! The writer locks of both warehouses are the binary's to take, like every writing command's;
//! the copy itself is `store::sqlite_to_postgres`; this module checks the arguments, connects,
//! runs it off the async workers and words the summary.

use std::path::{Path, PathBuf};

use crate::config::{DatabaseConfig, DatabaseTarget};
use crate::store::{self, CopyReport, StoreError, TableCopied};

/// Why `copy` cannot start with these arguments and this configuration: the operator named the
/// wrong file or configuration (exit 2).
#[derive(Debug, thiserror::Error)]
pub enum UsageError {
    #[error("--from {0}: no such file")]
    Missing(PathBuf),
    #[error("--from {0}: not a regular file")]
    NotAFile(PathBuf),
    #[error("--from {path}: cannot read it ({source})")]
    Unreadable { path: PathBuf, source: std::io::Error },
    #[error(
        "`copy` writes into a PostgreSQL warehouse, but the configuration names the SQLite file {0} \
         (`database.path`): configure the destination with `database.url` instead"
    )]
    NotPostgres(PathBuf),
}

/// Checks, before any lock is taken (the SQLite lock is a file beside `from`), that `from` names
/// an existing regular file and that the configured warehouse is a PostgreSQL one.
pub fn check_arguments(from: &Path, database: &DatabaseConfig) -> Result<(), UsageError> {
    if let DatabaseTarget::Sqlite { path } = &database.target {
        return Err(UsageError::NotPostgres(path.clone()));
    }
    match std::fs::metadata(from) {
        Ok(m) if m.is_file() => Ok(()),
        Ok(_) => Err(UsageError::NotAFile(from.to_owned())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(UsageError::Missing(from.to_owned())),
        Err(source) => Err(UsageError::Unreadable {
            path: from.to_owned(),
            source,
        }),
    }
}

/// Copies the SQLite warehouse `from` into the PostgreSQL warehouse `database` names (connected,
/// migrated and filled on a blocking thread); each table is logged as it is filled. The caller
/// holds both writer locks.
pub async fn run(from: PathBuf, database: &DatabaseConfig) -> anyhow::Result<CopyReport> {
    let pg = match &database.target {
        DatabaseTarget::Postgres(pg) => pg.clone(),
        DatabaseTarget::Sqlite { path } => return Err(UsageError::NotPostgres(path.clone()).into()),
    };
    let busy_timeout = database.busy_timeout;
    store::blocking(move || {
        let location = pg.to_string();
        let client = store::postgres::connect::connect(&pg, store::APPLICATION_NAME)
            .map_err(|e| StoreError::new(&location, e))?;
        store::sqlite_to_postgres(&from, busy_timeout, client, location, &mut |t: &TableCopied| {
            tracing::info!(
                table = %t.table,
                rows = t.rows,
                seconds = t.elapsed.as_secs_f64(),
                "table copied"
            );
        })
    })
    .await
}

/// The summary `copy` prints: one line per table (rows, seconds), then the totals.
pub fn summary(report: &CopyReport) -> Vec<String> {
    let width = report.tables.iter().map(|t| t.table.len()).max().unwrap_or(0);
    let mut lines: Vec<String> = report
        .tables
        .iter()
        .map(|t| {
            format!(
                "  {:<width$}  {:>10} rows  {:>8.2} s",
                t.table,
                t.rows,
                t.elapsed.as_secs_f64()
            )
        })
        .collect();
    let seconds = report.elapsed.as_secs_f64();
    #[allow(clippy::cast_precision_loss)] // a rate for people: a rounding error does not matter
    let rate = if seconds > 0.0 {
        report.rows() as f64 / seconds
    } else {
        0.0
    };
    lines.push(format!(
        "copied {} tables, {} rows in {seconds:.2} s ({rate:.0} rows/s); every table's row count verified",
        report.tables.len(),
        report.rows(),
    ));
    lines
}
