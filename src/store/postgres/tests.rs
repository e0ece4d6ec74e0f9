//! The PostgreSQL backend against a throwaway server (`charthero_sim::pgcluster`): migrations,
//! the schema-version rule, pages compared with what the SQLite backend stores for the same
//! records, identical pages that write nothing, removals, the watermark moving with its page,
//! history, and the read-only role. Each test skips, saying why, where no server can run.

use charthero_sim::pgcluster::{self, PgDatabase};
use postgres::{Client, NoTls};

use super::*;

/// A new database in the shared cluster (None, reason printed, where there is none).
fn database(name: &str) -> Option<PgDatabase> {
    let cluster = pgcluster::shared()?;
    Some(cluster.create_database(name).expect("a test database"))
}

/// A connection as the database's owner, with the warehouse's schema on its search_path.
fn connect(db: &PgDatabase) -> Client {
    let mut config: postgres::Config = db.url.parse().expect("the test database's URL");
    config.password(&db.password).options("-c search_path=charthero");
    config.connect(NoTls).expect("a connection to the test database")
}

/// A migrated warehouse in a new database.
fn warehouse(name: &str) -> Option<(PgDatabase, PgBackend)> {
    let db = database(name)?;
    let backend = open_writer(connect(&db), db.url.clone()).expect("migrations apply");
    Some((db, backend))
}

#[test]
fn migrations_apply_twice_without_change() {
    let Some((db, backend)) = warehouse("migrate_twice") else {
        return;
    };
    drop(backend);
    let again = open_writer(connect(&db), db.url.clone()).expect("migrations apply again");
    let applied: i64 = again
        .db()
        .query_one("SELECT count(*) FROM refinery_schema_history", &[])
        .unwrap()
        .try_get(0)
        .unwrap();
    assert_eq!(applied, latest_version());
    assert!(open_current(connect(&db), db.url.clone()).is_ok());
}
