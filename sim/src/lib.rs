//! `charthero-sim`: an in-process, deterministic simulator of the ChartHero public API v1
//! (`/external/v1`), for integration tests, benchmarks and the `charthero-sync demo` command.
//!
//! It owns a seeded synthetic data set (encounters, patients, documents; note and transcript text
//! derived on demand), a hyper HTTP/1 server on a random loopback port that answers exactly as
//! the API contract describes (check order, reason codes, offset pagination without snapshot
//! consistency), and programmatic control: keys and scopes, route enablement, data mutations
//! between requests, injected faults, a rate-limit observer, a list hook and request statistics.
//!
//! It does not persist anything, speak TLS or HTTP/2, send webhooks, or know anything about the
//! sync client. Nothing here reads the environment or the wall clock for data generation: the
//! same seed and options give the same data (only mutation timestamps use the real clock).
//!
//! ```no_run
//! # async fn demo() -> std::io::Result<()> {
//! use charthero_sim::{SimOptions, Simulator};
//! let sim = Simulator::start(SimOptions { encounters: 1_000, ..SimOptions::default() }).await?;
//! let url = format!("{}/external/v1/encounters", sim.base_url());
//! let key = sim.api_key(); // send as `Authorization: Bearer {key}`
//! # let _ = (url, key);
//! sim.shutdown();
//! # Ok(()) }
//! ```

mod access;
mod content;
mod faults;
mod generate;
mod model;
mod options;
mod query;
mod render;
mod server;
mod simulator;
mod store;
#[cfg(test)]
mod tests;

pub use model::{
    DocKind, Document, Encounter, Fault, FaultRule, KeyState, ListRequest, NewEncounter, Patient, RateLimit,
    Route, Stats, Transcript, Turn, Unavailable, Visibility,
};
pub use options::SimOptions;
pub use simulator::{ListHook, Simulator};
