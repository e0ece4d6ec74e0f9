//! Process exit codes, documented in the README so wrappers can alert on them.

/// Success.
pub const OK: u8 = 0;
/// A sync cycle failed or did not complete; details are in the log and in `sync_runs`.
pub const CYCLE_FAILED: u8 = 1;
/// Bad command-line usage or bad configuration (including a missing or unsafe API key).
pub const USAGE: u8 = 2;
/// ChartHero refused the API key (HTTP 401); the log names the `reason_code`.
pub const AUTH_REFUSED: u8 = 3;
/// Another process holds the warehouse's writer lock; the message names it.
pub const LOCKED: u8 = 4;
/// The warehouse is corrupt or not a SQLite database (`StoreErrorKind::Corrupt`): the process
/// stopped writing it. Restarting cannot help; restore or rebuild it (docs/operations.md).
pub const STORE_CORRUPT: u8 = 5;
/// A clinic lists IDs the warehouse stores for another clinic (`id_collision`): the clinics
/// need warehouses of their own (docs/operations.md, "Several organizations"). Restarting
/// cannot help.
pub const ID_COLLISION: u8 = 6;
