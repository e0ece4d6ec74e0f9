//! Filling an empty PostgreSQL warehouse with another warehouse's rows for `charthero-sync copy`:
//! its tables in foreign-key order with the columns a row supplies (generated columns such as
//! the search vectors are computed by the server), one `COPY … FROM STDIN (FORMAT binary)` per
//! table, all in one transaction, so a copy that stops anywhere leaves the warehouse as empty as
//! it found it. History triggers do not fire while the copied history goes in (`DISABLE TRIGGER
//! USER` inside the transaction, enabled again before it commits), and identity columns continue
//! after the copied ids.
//!
//! Values are bound by the destination column's type: a SQLite timestamp's text becomes a
//! `timestamptz` through the same `time::OffsetDateTime` binding the backend writes with (the
//! instant truncated to PostgreSQL's microseconds), so a copied row equals one the sync would
//! have written. It does not read the source, compare shapes or decide what a refusal says:
//! `store::transfer` does.

use std::error::Error;

use anyhow::Context;
use bytes::BytesMut;
use postgres::binary_copy::BinaryCopyInWriter;
use postgres::types::{IsNull, ToSql, Type, to_sql_checked};
use postgres::{GenericClient, Transaction};
use time::OffsetDateTime;

use super::PgBackend;
use crate::store::transfer::{Cell, RowSink};
use crate::timefmt::parse_rfc3339;

/// A table of the warehouse as the copy fills it.
#[derive(Debug, Clone)]
pub struct Table {
    pub name: String,
    oid: u32,
    /// The columns a copied row supplies (not the generated ones), in table order.
    columns: Vec<Column>,
    /// Identity columns, whose sequences must continue after the copied ids.
    identities: Vec<String>,
    /// Whether the table has triggers of its own (history, moved documents).
    has_user_triggers: bool,
}

#[derive(Debug, Clone)]
struct Column {
    name: String,
    kind: Kind,
}

/// The column types of the warehouse's schema.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Text,
    BigInt,
    Integer,
    Double,
    Boolean,
    Timestamptz,
    Bytea,
}

impl Kind {
    /// The kind of a type as `format_type` names it; `None` for a type the copy cannot fill.
    fn of(type_name: &str) -> Option<Kind> {
        Some(match type_name {
            "text" => Kind::Text,
            "bigint" => Kind::BigInt,
            "integer" => Kind::Integer,
            "double precision" => Kind::Double,
            "boolean" => Kind::Boolean,
            "timestamp with time zone" => Kind::Timestamptz,
            "bytea" => Kind::Bytea,
            _ => return None,
        })
    }

    fn pg_type(self) -> Type {
        match self {
            Kind::Text => Type::TEXT,
            Kind::BigInt => Type::INT8,
            Kind::Integer => Type::INT4,
            Kind::Double => Type::FLOAT8,
            Kind::Boolean => Type::BOOL,
            Kind::Timestamptz => Type::TIMESTAMPTZ,
            Kind::Bytea => Type::BYTEA,
        }
    }
}

impl Table {
    /// The names of the columns a copied row supplies, in the order its values come.
    pub fn column_names(&self) -> Vec<String> {
        self.columns.iter().map(|c| c.name.clone()).collect()
    }
}

/// An identifier quoted for PostgreSQL's SQL text.
fn quoted(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// One value as bound to its column: the conversion from a source cell already done, each
/// variant checking its PostgreSQL type when it is written.
#[derive(Debug)]
enum Bound<'a> {
    Null,
    Text(&'a str),
    BigInt(i64),
    Integer(i32),
    Double(f64),
    Boolean(bool),
    Timestamptz(OffsetDateTime),
    Bytea(&'a [u8]),
}

impl ToSql for Bound<'_> {
    fn to_sql(&self, ty: &Type, out: &mut BytesMut) -> Result<IsNull, Box<dyn Error + Sync + Send>> {
        match self {
            Bound::Null => Ok(IsNull::Yes),
            Bound::Text(v) => v.to_sql_checked(ty, out),
            Bound::BigInt(v) => v.to_sql_checked(ty, out),
            Bound::Integer(v) => v.to_sql_checked(ty, out),
            Bound::Double(v) => v.to_sql_checked(ty, out),
            Bound::Boolean(v) => v.to_sql_checked(ty, out),
            Bound::Timestamptz(v) => v.to_sql_checked(ty, out),
            Bound::Bytea(v) => v.to_sql_checked(ty, out),
        }
    }

    /// Every variant checks its own type in `to_sql`.
    fn accepts(_: &Type) -> bool {
        true
    }

    to_sql_checked!();
}

/// A source cell as the value of a `kind` column, or why it cannot be one (the message names
/// no value: it may be patient data).
fn bind<'a>(cell: Cell<'a>, kind: Kind) -> Result<Bound<'a>, &'static str> {
    Ok(match (kind, cell) {
        (_, Cell::Null) => Bound::Null,
        (Kind::Text, Cell::Text(v)) => Bound::Text(v),
        (Kind::BigInt, Cell::Integer(v)) => Bound::BigInt(v),
        (Kind::Integer, Cell::Integer(v)) => {
            Bound::Integer(i32::try_from(v).map_err(|_| "the integer is too large for the column")?)
        }
        (Kind::Double, Cell::Real(v)) => Bound::Double(v),
        // SQLite may hand back a whole number stored in a REAL column as an integer.
        (Kind::Double, Cell::Integer(v)) => Bound::Double(v as f64),
        (Kind::Boolean, Cell::Integer(0)) => Bound::Boolean(false),
        (Kind::Boolean, Cell::Integer(1)) => Bound::Boolean(true),
        (Kind::Timestamptz, Cell::Text(v)) => {
            Bound::Timestamptz(parse_rfc3339(v).map_err(|_| "the text is not an RFC 3339 timestamp")?)
        }
        (Kind::Bytea, Cell::Blob(v)) => Bound::Bytea(v),
        _ => return Err("the stored value's type does not fit the column's"),
    })
}

/// The warehouse's tables (in the schema the search_path selects, refinery's history left out),
/// parents before the tables whose foreign keys name them.
fn read_tables(db: &mut impl GenericClient) -> anyhow::Result<Vec<Table>> {
    let mut found: Vec<Table> = Vec::new();
    for row in db.query(
        "SELECT c.oid, c.relname,
                EXISTS (SELECT 1 FROM pg_trigger t WHERE t.tgrelid = c.oid AND NOT t.tgisinternal)
           FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
          WHERE n.nspname = current_schema() AND c.relkind IN ('r', 'p')
            AND c.relname <> 'refinery_schema_history'
          ORDER BY c.relname",
        &[],
    )? {
        let oid: u32 = row.try_get(0)?;
        let name: String = row.try_get(1)?;
        let mut columns = Vec::new();
        let mut identities = Vec::new();
        for col in db.query(
            "SELECT attname::text, format_type(atttypid, NULL), attidentity <> '', attgenerated <> ''
               FROM pg_attribute
              WHERE attrelid = $1 AND attnum > 0 AND NOT attisdropped
              ORDER BY attnum",
            &[&oid],
        )? {
            let column: String = col.try_get(0)?;
            let type_name: String = col.try_get(1)?;
            let identity: bool = col.try_get(2)?;
            let generated: bool = col.try_get(3)?;
            if generated {
                continue;
            }
            let kind = Kind::of(&type_name).with_context(|| {
                format!("{name}.{column} is of type {type_name}, which `copy` does not know how to fill")
            })?;
            if identity {
                identities.push(column.clone());
            }
            columns.push(Column { name: column, kind });
        }
        found.push(Table {
            name,
            oid,
            columns,
            identities,
            has_user_triggers: row.try_get(2)?,
        });
    }
    let mut parents: Vec<(u32, u32)> = Vec::new();
    for row in db.query(
        "SELECT conrelid, confrelid FROM pg_constraint
          WHERE contype = 'f' AND conrelid <> confrelid
            AND connamespace = (SELECT oid FROM pg_namespace WHERE nspname = current_schema())",
        &[],
    )? {
        parents.push((row.try_get(0)?, row.try_get(1)?));
    }
    // Kahn's algorithm, taking the first ready table in name order each time.
    let mut ordered = Vec::with_capacity(found.len());
    while !found.is_empty() {
        let ready = found
            .iter()
            .position(|t| {
                parents
                    .iter()
                    .all(|&(child, parent)| child != t.oid || !found.iter().any(|o| o.oid == parent))
            })
            .context("the warehouse's foreign keys form a cycle; `copy` cannot order its tables")?;
        ordered.push(found.remove(ready));
    }
    Ok(ordered)
}

/// Drops, inside the transaction, the indexes of `table` that back no constraint and its foreign
/// keys, and answers the statements that make them again once its rows are in: one build of each
/// index and one check of each foreign key over the whole table cost a fraction of maintaining
/// them row by row (a GIN index above all), the way `pg_restore` loads data before indexes and
/// constraints. They come back under the same names and definitions before the next table, and
/// a copy that stops rolls the drops back with everything else.
fn set_aside_indexes_and_foreign_keys(
    tx: &mut Transaction<'_>,
    table: &Table,
) -> anyhow::Result<Vec<(String, String)>> {
    let mut rebuild = Vec::new();
    let name = quoted(&table.name);
    for row in tx.query(
        "SELECT c.relname::text, pg_get_indexdef(i.indexrelid)
           FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
          WHERE i.indrelid = $1 AND NOT EXISTS (SELECT 1 FROM pg_constraint k WHERE k.conindid = i.indexrelid)
          ORDER BY c.relname",
        &[&table.oid],
    )? {
        let (index, definition): (String, String) = (row.try_get(0)?, row.try_get(1)?);
        tx.batch_execute(&format!("DROP INDEX {}", quoted(&index)))
            .with_context(|| format!("cannot set the index {index} aside"))?;
        rebuild.push((format!("the index {index}"), definition));
    }
    for row in tx.query(
        "SELECT conname::text, pg_get_constraintdef(oid) FROM pg_constraint
          WHERE conrelid = $1 AND contype = 'f' ORDER BY conname",
        &[&table.oid],
    )? {
        let (constraint, definition): (String, String) = (row.try_get(0)?, row.try_get(1)?);
        let constraint = quoted(&constraint);
        tx.batch_execute(&format!("ALTER TABLE {name} DROP CONSTRAINT {constraint}"))
            .with_context(|| format!("cannot set the foreign key {constraint} aside"))?;
        rebuild.push((
            format!("the foreign key {constraint}"),
            format!("ALTER TABLE {name} ADD CONSTRAINT {constraint} {definition}"),
        ));
    }
    Ok(rebuild)
}

/// The import's one transaction on the destination warehouse.
pub struct Import<'a> {
    tx: Transaction<'a>,
    tables: Vec<Table>,
    /// Tables whose triggers this transaction disabled, to enable again before it commits.
    disabled: Vec<usize>,
}

impl<'a> Import<'a> {
    /// Begins the transaction and reads the warehouse's tables (in the order they are filled).
    pub fn begin(warehouse: &'a mut PgBackend) -> anyhow::Result<Import<'a>> {
        let mut tx = warehouse
            .client
            .get_mut()
            .transaction()
            .context("cannot begin the copy's transaction")?;
        let tables = read_tables(&mut tx).context("cannot read the destination's tables")?;
        Ok(Import {
            tx,
            tables,
            disabled: Vec::new(),
        })
    }

    /// The tables, parents first: the order [`Import::copy_table`] should fill them in.
    pub fn tables(&self) -> &[Table] {
        &self.tables
    }

    /// Every table that holds rows, with how many.
    pub fn holdings(&mut self) -> anyhow::Result<Vec<(String, u64)>> {
        let mut out = Vec::new();
        for t in &self.tables {
            let rows = count(&mut self.tx, &t.name)?;
            if rows > 0 {
                out.push((t.name.clone(), rows));
            }
        }
        Ok(out)
    }

    /// Fills the table at `index` of [`Import::tables`] with the rows `feed` hands its sink
    /// (values in the order of the table's `column_names`), in one `COPY`; answers how many
    /// rows it holds now.
    pub fn copy_table(
        &mut self,
        index: usize,
        feed: &mut dyn FnMut(&mut RowSink<'_>) -> anyhow::Result<u64>,
    ) -> anyhow::Result<u64> {
        let table = self.tables.get(index).context("no such table")?;
        let name = quoted(&table.name);
        if table.has_user_triggers && !self.disabled.contains(&index) {
            self.tx
                .batch_execute(&format!("ALTER TABLE {name} DISABLE TRIGGER USER"))
                .with_context(|| format!("cannot disable the triggers of {}", table.name))?;
            self.disabled.push(index);
        }
        let rebuilt = set_aside_indexes_and_foreign_keys(&mut self.tx, table)?;
        let list: Vec<String> = table.columns.iter().map(|c| quoted(&c.name)).collect();
        let types: Vec<Type> = table.columns.iter().map(|c| c.kind.pg_type()).collect();
        let copy = self
            .tx
            .copy_in(&format!(
                "COPY {name} ({}) FROM STDIN (FORMAT binary)",
                list.join(", ")
            ))
            .with_context(|| format!("cannot start copying into {}", table.name))?;
        let mut writer = BinaryCopyInWriter::new(copy, &types);
        let mut row = 0_u64;
        feed(&mut |cells| {
            row += 1;
            let values = cells
                .iter()
                .zip(&table.columns)
                .map(|(cell, column)| {
                    bind(*cell, column.kind)
                        .map_err(|why| anyhow::anyhow!("{}.{}, row {row}: {why}", table.name, column.name))
                })
                .collect::<anyhow::Result<Vec<Bound<'_>>>>()?;
            if values.len() != table.columns.len() {
                anyhow::bail!(
                    "{}, row {row}: {} values for {} columns",
                    table.name,
                    values.len(),
                    table.columns.len()
                );
            }
            writer
                .write_raw(values.iter())
                .with_context(|| format!("cannot copy row {row} into {}", table.name))
        })?;
        let rows = writer
            .finish()
            .with_context(|| format!("cannot finish copying into {}", table.name))?;
        for (what, sql) in rebuilt {
            self.tx
                .batch_execute(&sql)
                .with_context(|| format!("cannot build {what} of {} again", table.name))?;
        }
        Ok(rows)
    }

    /// Continues every identity column after its copied ids, enables the triggers again and
    /// commits: the warehouse holds everything, or (any error before) nothing.
    pub fn commit(mut self) -> anyhow::Result<()> {
        for t in &self.tables {
            for column in &t.identities {
                self.tx
                    .query_one(
                        &format!(
                            "SELECT setval(pg_get_serial_sequence($1, $2), coalesce(max({}), 0) + 1, false) FROM {}",
                            quoted(column),
                            quoted(&t.name)
                        ),
                        &[&quoted(&t.name), column],
                    )
                    .with_context(|| format!("cannot move the sequence of {}.{column}", t.name))?;
            }
        }
        for &index in &self.disabled {
            let t = &self.tables[index];
            self.tx
                .batch_execute(&format!("ALTER TABLE {} ENABLE TRIGGER USER", quoted(&t.name)))
                .with_context(|| format!("cannot enable the triggers of {} again", t.name))?;
        }
        self.tx.commit().context("cannot commit the copy")
    }
}

/// How many rows `table` holds.
fn count(db: &mut impl GenericClient, table: &str) -> anyhow::Result<u64> {
    let n: i64 = db
        .query_one(&format!("SELECT count(*) FROM {}", quoted(table)), &[])
        .with_context(|| format!("cannot count the rows of {table}"))?
        .try_get(0)?;
    Ok(u64::try_from(n).unwrap_or(0))
}

/// How many rows `table` of the warehouse holds, as any session sees it now.
pub fn count_rows(warehouse: &mut PgBackend, table: &str) -> anyhow::Result<u64> {
    count(warehouse.client.get_mut(), table)
}
