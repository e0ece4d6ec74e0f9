//! `charthero-sync copy --from <file>`: moves a SQLite warehouse into the configured PostgreSQL
//! warehouse without re-listing anything. Every table's rows go across (the watermark, ledger,
//! content queue, dead letters and history with the data), so the next `sync` against
//! PostgreSQL lists only what is new. The source must be of exactly this release's schema (an
//! older one is refused: `migrate` it with its SQLite configuration first) and is never written;
//! the destination is migrated and must hold no data. All of it commits in one PostgreSQL
//! transaction: a copy that stops anywhere leaves the destination empty.
//!
//! The writer locks of both warehouses are the binary's to take, like every writing command's;
//! the copy itself is `store::sqlite_to_postgres`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::store::{self, CopyReport, TableCopied};

/// Why the source cannot be copied; the operator named the wrong file (exit 2).
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("--from {0}: no such file")]
    Missing(PathBuf),
    #[error("--from {0}: not a regular file")]
    NotAFile(PathBuf),
    #[error("--from {path}: cannot read it ({source})")]
    Unreadable { path: PathBuf, source: std::io::Error },
}

/// Checks that `from` names an existing regular file, before any lock file is made beside it.
pub fn check_source(from: &Path) -> Result<(), SourceError> {
    match std::fs::metadata(from) {
        Ok(m) if m.is_file() => Ok(()),
        Ok(_) => Err(SourceError::NotAFile(from.to_owned())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(SourceError::Missing(from.to_owned())),
        Err(source) => Err(SourceError::Unreadable {
            path: from.to_owned(),
            source,
        }),
    }
}

/// Copies the SQLite warehouse `from` into the PostgreSQL warehouse on `destination` (`location`
/// names it in messages, never with a password), on a blocking thread; each table is logged as
/// it is filled. The caller holds both writer locks.
pub async fn run(
    from: PathBuf,
    busy_timeout: Duration,
    destination: postgres::Client,
    location: String,
) -> anyhow::Result<CopyReport> {
    store::blocking(move || {
        store::sqlite_to_postgres(
            &from,
            busy_timeout,
            destination,
            location,
            &mut |t: &TableCopied| {
                tracing::info!(
                    table = %t.table,
                    rows = t.rows,
                    seconds = t.elapsed.as_secs_f64(),
                    "table copied"
                );
            },
        )
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
