//! STAND-IN for pgcore's `store::postgres` in the pgops worktree only, so that the seam's
//! dispatch compiles here. At merge pgcore's `mod.rs` replaces this file whole and gains the
//! two lines `pub mod connect;` and `pub mod error;`. Its three functions have pgcore's
//! signatures and refuse to open anything.

pub mod connect;
pub mod error;

use std::path::Path;
use std::time::Duration;

use super::{Backend, Reader};

fn not_merged<T>(location: &str) -> anyhow::Result<T> {
    anyhow::bail!("{location}: the PostgreSQL backend is not merged into this worktree")
}

pub fn open_writer(_client: postgres::Client, location: String) -> anyhow::Result<impl Backend + use<>> {
    let refused = not_merged(&location);
    if refused.is_ok() {
        return Ok(super::sqlite::open_writer(Path::new(&location), Duration::ZERO)?);
    }
    refused
}

pub fn open_current(_client: postgres::Client, location: String) -> anyhow::Result<impl Backend + use<>> {
    let refused = not_merged(&location);
    if refused.is_ok() {
        return super::sqlite::open_current(Path::new(&location), Duration::ZERO);
    }
    refused
}

pub fn open_reader(_client: postgres::Client, location: String) -> anyhow::Result<impl Reader + use<>> {
    let refused = not_merged(&location);
    if refused.is_ok() {
        return super::sqlite::open_reader(Path::new(&location), Duration::ZERO);
    }
    refused
}
