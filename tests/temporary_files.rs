//! Where SQLite makes a writer's temporary files. A test binary of its own: the directory is a
//! process-wide setting of SQLite's, set once by the first writer opened, so a test beside
//! others that open warehouses in parallel could see theirs.

use std::path::PathBuf;
use std::time::Duration;

/// The files this process has open that have no name: SQLite's temporary files, which it makes
/// unnamed (`O_TMPFILE`, shown as `<dir>/#<inode> (deleted)`) or unlinks as soon as they are made.
fn open_temporary_files() -> Vec<PathBuf> {
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
        .filter(|target| target.to_string_lossy().ends_with(" (deleted)"))
        .collect()
}

/// A sort larger than the sorter's memory spills to a temporary file: it is made in the
/// warehouse's directory, not in the system's temporary directory (`/var/tmp`, `$TMPDIR`).
#[test]
fn a_writers_temporary_files_are_made_in_the_warehouses_directory() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("warehouse.db");
    let conn = charthero_sync::store::sqlite::open_writer(&path, Duration::from_secs(5)).unwrap();
    // The smallest sorter memory SQLite allows (about 1 MB), then about 6 MB to sort.
    conn.pragma_update(None, "cache_size", 16).unwrap();
    let mut stmt = conn
        .prepare(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 50000)
             SELECT i FROM n ORDER BY randomblob(120)",
        )
        .unwrap();
    let mut rows = stmt.query([]).unwrap();
    rows.next().unwrap().expect("a first row");
    let open = open_temporary_files();
    let home = std::fs::canonicalize(dir.path()).unwrap();
    assert!(!open.is_empty(), "the sort made no temporary file");
    assert!(
        open.iter().all(|f| f.starts_with(&home)),
        "temporary files outside {}: {open:?}",
        home.display()
    );
}
