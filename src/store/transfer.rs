//! Moving a SQLite warehouse into PostgreSQL without re-listing anything (`charthero-sync copy`):
//! every table's rows, data and bookkeeping alike (the watermark, the ledger, the content queue,
//! dead letters, purged ranges, history), column by column by name, in one PostgreSQL transaction,
//! then the row counts of both compared. The SQLite side reads one snapshot
//! (`sqlite::export`); the PostgreSQL side streams each table with `COPY … FROM STDIN`
//! (`postgres::import`). This is the one place both backends meet.
//!
//! It does not take writer locks, connect to the server or print anything: the command
//! (`crate::copy`) does. It never writes the source.

use std::path::Path;
use std::time::{Duration, Instant};

use super::postgres::import::Import;
use super::sqlite::export::Snapshot;
use super::{StoreError, postgres, sqlite};

/// One value of a source row, as SQLite stores it (its storage class), on its way to a column
/// of the destination, which decides what it becomes (a timestamp's fixed-width text becomes a
/// `timestamptz`, an integer a `bigint` or a `boolean`, …).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Cell<'a> {
    Null,
    Integer(i64),
    Real(f64),
    Text(&'a str),
    Blob(&'a [u8]),
}

/// Where the reader of a source table hands each row (its values in the importer's column
/// order); an error stops the table.
pub type RowSink<'s> = dyn FnMut(&[Cell<'_>]) -> anyhow::Result<()> + 's;

/// Why a copy was refused before anything was written: the operator picked the wrong source or
/// destination, and must act (the command exits 2).
#[derive(Debug, thiserror::Error)]
pub enum CopyRefused {
    #[error(
        "the source {source_path} has schema version {version}, but this release copies only version {known}: \
         migrate an older warehouse first (`charthero-sync migrate` with its SQLite configuration), or copy a \
         newer one with the release that wrote it"
    )]
    SourceSchema {
        source_path: String,
        version: i64,
        known: i64,
    },
    #[error(
        "the destination {location} already holds data ({holdings}); `copy` fills only a migrated, empty \
         warehouse: give it a new database or schema (`database.url`, `database.schema`)"
    )]
    DestinationNotEmpty { location: String, holdings: String },

    #[error(
        "the source {source_path} and the destination {location} do not have the same tables and columns \
         ({difference}); both must be at this release's schema"
    )]
    ShapesDiffer {
        source_path: String,
        location: String,
        difference: String,
    },
}

/// What was copied into one table.
#[derive(Debug, Clone, PartialEq)]
pub struct TableCopied {
    pub table: String,
    pub rows: u64,
    pub elapsed: Duration,
}

/// What a finished copy did: every table in the order it was filled, and how long the whole
/// copy took (migrating the destination and the final comparison of counts included).
#[derive(Debug, Clone, PartialEq)]
pub struct CopyReport {
    pub tables: Vec<TableCopied>,
    pub elapsed: Duration,
}

impl CopyReport {
    /// Rows copied, all tables together.
    pub fn rows(&self) -> u64 {
        self.tables.iter().map(|t| t.rows).sum()
    }
}

/// SQLite tables a PostgreSQL warehouse does not have because it derives their content: the
/// full-text indexes (FTS5 virtual tables are already left out; these names are their shadow
/// tables, should a SQLite build list them as ordinary tables), and migration bookkeeping, which
/// each backend keeps for its own migrations.
fn derived_in_sqlite(table: &str) -> bool {
    table == "refinery_schema_history"
        || table.starts_with("notes_fts")
        || table.starts_with("transcript_turns_fts")
        || STAGING.contains(&table)
}

/// SQLite's staging tables of backfill pages, empty once merged (the writer's next operation
/// merges what a crash left; `copy` merges it before its snapshot).
const STAGING: [&str; 2] = ["staged_encounters", "staged_documents"];

/// Copies the SQLite warehouse at `source` (of exactly this release's schema; it is only read,
/// in one snapshot) into the PostgreSQL warehouse on `destination` (migrated here first; it must hold
/// no data), all in one PostgreSQL transaction, and checks afterwards that every table holds as
/// many rows as the source's. `on_table` hears of each table as it is filled. The caller holds
/// both writer locks.
pub fn sqlite_to_postgres(
    source: &Path,
    busy_timeout: Duration,
    destination: ::postgres::Client,
    location: String,
    on_table: &mut dyn FnMut(&TableCopied),
) -> anyhow::Result<CopyReport> {
    let started = Instant::now();
    let mut conn =
        sqlite::open_reader(source, busy_timeout).map_err(|e| StoreError::new(source.display(), e))?;
    let mut snapshot = Snapshot::begin(&mut conn).map_err(|e| StoreError::new(source.display(), e))?;
    let version = snapshot
        .schema_version()
        .map_err(|e| StoreError::new(source.display(), e))?;
    let known = sqlite::latest_version();
    if version != known {
        return Err(CopyRefused::SourceSchema {
            source_path: source.display().to_string(),
            version,
            known,
        }
        .into());
    }
    if snapshot.count(STAGING[0])? > 0 {
        // Pages a crashed backfill staged: merged first, as the next writer would (the caller
        // holds the source's writer lock), then the snapshot starts again.
        drop(snapshot);
        let writer = sqlite::open_writer(source, busy_timeout)?;
        sqlite::staging::merge_before(&writer).map_err(|e| StoreError::new(source.display(), e))?;
        drop(writer);
        snapshot = Snapshot::begin(&mut conn).map_err(|e| StoreError::new(source.display(), e))?;
    }
    let source_tables: Vec<(String, Vec<String>)> = snapshot
        .tables()?
        .into_iter()
        .filter(|(name, _)| !derived_in_sqlite(name))
        .collect();

    let mut warehouse = postgres::open_writer(destination, location.clone())?;
    let mut import = Import::begin(&mut warehouse)?;
    let holdings: Vec<String> = import
        .holdings()?
        .into_iter()
        .map(|(table, rows)| format!("{table}: {rows} rows"))
        .collect();
    if !holdings.is_empty() {
        return Err(CopyRefused::DestinationNotEmpty {
            location,
            holdings: holdings.join(", "),
        }
        .into());
    }
    let difference = shape_difference(&source_tables, import.tables());
    if !difference.is_empty() {
        return Err(CopyRefused::ShapesDiffer {
            source_path: source.display().to_string(),
            location,
            difference: difference.join("; "),
        }
        .into());
    }

    let mut copied = Vec::with_capacity(import.tables().len());
    for index in 0..import.tables().len() {
        let table_started = Instant::now();
        let (name, columns) = {
            let t = &import.tables()[index];
            (t.name.clone(), t.column_names())
        };
        let expected = snapshot.count(&name)?;
        let rows = import.copy_table(index, &mut |sink| snapshot.for_each_row(&name, &columns, sink))?;
        if rows != expected {
            anyhow::bail!(
                "{name}: the source holds {expected} rows but {rows} were copied; nothing was committed"
            );
        }
        let done = TableCopied {
            table: name,
            rows,
            elapsed: table_started.elapsed(),
        };
        on_table(&done);
        copied.push(done);
    }
    import.commit()?;

    // Read back after the commit, from what other sessions now see.
    for t in &copied {
        let stored = postgres::import::count_rows(&mut warehouse, &t.table)?;
        if stored != t.rows {
            anyhow::bail!(
                "verification failed: {} holds {stored} rows in {location} but {} in the source",
                t.table,
                t.rows
            );
        }
    }
    drop(snapshot);
    Ok(CopyReport {
        tables: copied,
        elapsed: started.elapsed(),
    })
}

/// Every way the source's tables and columns differ from the destination's, by name; empty when
/// every destination column has a source column and the other way round.
fn shape_difference(
    source: &[(String, Vec<String>)],
    destination: &[postgres::import::Table],
) -> Vec<String> {
    let mut out = Vec::new();
    for (name, columns) in source {
        match destination.iter().find(|t| &t.name == name) {
            None => out.push(format!("table {name} is only in the source")),
            Some(t) => {
                let wanted = t.column_names();
                for c in columns.iter().filter(|c| !wanted.contains(c)) {
                    out.push(format!("column {name}.{c} is only in the source"));
                }
                for c in wanted.iter().filter(|c| !columns.contains(c)) {
                    out.push(format!("column {name}.{c} is only in the destination"));
                }
            }
        }
    }
    for t in destination {
        if !source.iter().any(|(name, _)| name == &t.name) {
            out.push(format!("table {} is only in the destination", t.name));
        }
    }
    out
}
