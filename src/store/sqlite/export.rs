//! Reading a whole SQLite warehouse for `charthero-sync copy`: its tables and their columns,
//! and every row of a table as stored (storage classes, no conversion), all from one read
//! snapshot so that the rows and the counts they are checked against agree. It writes nothing;
//! what the values become in the destination is the importer's business.

use anyhow::Context;
use rusqlite::types::ValueRef;
use rusqlite::{Connection, Transaction, TransactionBehavior};

use crate::store::transfer::{Cell, RowSink};

/// A read transaction on the warehouse: every read below sees the same state.
pub struct Snapshot<'c> {
    tx: Transaction<'c>,
}

/// An identifier quoted for SQLite's SQL text.
fn quoted(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

impl<'c> Snapshot<'c> {
    /// Starts the read transaction (its snapshot is taken at the first read).
    pub fn begin(conn: &'c mut Connection) -> anyhow::Result<Snapshot<'c>> {
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Deferred)
            .context("cannot begin a read transaction")?;
        Ok(Snapshot { tx })
    }

    /// The newest migration applied to the warehouse (0: none, not a warehouse of this program).
    pub fn schema_version(&mut self) -> anyhow::Result<i64> {
        let has_history: bool = self.tx.query_row(
            "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'refinery_schema_history')",
            [],
            |r| r.get(0),
        )?;
        if !has_history {
            return Ok(0);
        }
        Ok(self.tx.query_row(
            "SELECT coalesce(max(version), 0) FROM refinery_schema_history",
            [],
            |r| r.get(0),
        )?)
    }

    /// Every ordinary table (not views, not FTS5 virtual tables or their shadow tables, not
    /// SQLite's own) with its columns in declaration order.
    pub fn tables(&mut self) -> anyhow::Result<Vec<(String, Vec<String>)>> {
        let names: Vec<String> = self
            .tx
            .prepare(
                "SELECT name FROM pragma_table_list
                  WHERE schema = 'main' AND type = 'table' AND name NOT LIKE 'sqlite\\_%' ESCAPE '\\'
                  ORDER BY name",
            )?
            .query_map([], |r| r.get(0))?
            .collect::<Result<_, _>>()
            .context("cannot list the tables")?;
        let mut out = Vec::with_capacity(names.len());
        for name in names {
            let columns: Vec<String> = self
                .tx
                .prepare("SELECT name FROM pragma_table_info(?1) ORDER BY cid")?
                .query_map([&name], |r| r.get(0))?
                .collect::<Result<_, _>>()
                .with_context(|| format!("cannot list the columns of {name}"))?;
            out.push((name, columns));
        }
        Ok(out)
    }

    /// How many rows `table` holds.
    pub fn count(&mut self, table: &str) -> anyhow::Result<u64> {
        let n: i64 = self
            .tx
            .query_row(&format!("SELECT count(*) FROM {}", quoted(table)), [], |r| {
                r.get(0)
            })
            .with_context(|| format!("cannot count the rows of {table}"))?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    /// Hands every row of `table` to `sink`, its values in the order of `columns`; stops at the
    /// first error, the sink's included. Answers how many rows were read.
    pub fn for_each_row(
        &mut self,
        table: &str,
        columns: &[String],
        sink: &mut RowSink<'_>,
    ) -> anyhow::Result<u64> {
        let list: Vec<String> = columns.iter().map(|c| quoted(c)).collect();
        let sql = format!("SELECT {} FROM {}", list.join(", "), quoted(table));
        let mut stmt = self
            .tx
            .prepare(&sql)
            .with_context(|| format!("cannot read {table}"))?;
        let mut rows = stmt.query([])?;
        let mut read = 0_u64;
        while let Some(row) = rows.next().with_context(|| format!("cannot read {table}"))? {
            let mut cells = Vec::with_capacity(columns.len());
            for (i, column) in columns.iter().enumerate() {
                cells.push(match row.get_ref(i)? {
                    ValueRef::Null => Cell::Null,
                    ValueRef::Integer(v) => Cell::Integer(v),
                    ValueRef::Real(v) => Cell::Real(v),
                    ValueRef::Text(bytes) => Cell::Text(std::str::from_utf8(bytes).map_err(|_| {
                        anyhow::anyhow!("{table}.{column}, row {}: the text is not UTF-8", read + 1)
                    })?),
                    ValueRef::Blob(bytes) => Cell::Blob(bytes),
                });
            }
            sink(&cells)?;
            read += 1;
        }
        Ok(read)
    }
}
