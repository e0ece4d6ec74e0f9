//! `charthero-sim`: an in-process, deterministic simulator of the ChartHero public API v1
//! (`/external/v1`), for integration tests, benchmarks and the `charthero-sync demo` command.
//!
//! It owns a seeded synthetic data set (encounters, patients, documents; note and transcript text
//! derived on demand), a hyper HTTP/1 server on a random loopback port that answers exactly as
//! the API contract describes (check order, reason codes, offset pagination without snapshot
//! consistency), and programmatic control: keys and scopes, route enablement, data mutations
//! between requests, injected faults, a rate-limit observer, a list hook, request statistics, and
//! opt-in "harsh upstream" behaviours (listed below).
//!
//! It does not persist anything, speak TLS or HTTP/2, or know anything about the sync client; it
//! sends webhooks only when told where ([`Simulator::set_webhook`], module [`webhook`]). Nothing here reads the environment or the wall clock for data generation: the
//! same seed and options give the same data (only mutation timestamps use the real clock).
//!
//! # Choices where the vendor's contract is silent
//! - A transcript that is not final yet answers **409 `transcript_not_ready`**: the resource
//!   exists but cannot be served yet, so a client should retry later rather than record a removal.
//! - An enforced [`RateLimit`] answers **429 `rate_limit_exceeded`** with `Retry-After: 1`.
//! - The full check order: no `Authorization` header → 401 `missing_bearer`; not
//!   `Bearer ch_sk_…` → `malformed_token`; a `ch_sk_test_` key in production mode
//!   ([`SimOptions::production`], [`Simulator::set_production`]) → `test_prefix_not_allowed`;
//!   unknown key → `invalid_key`; organization API keys disabled
//!   ([`Simulator::set_api_keys_disabled`]) → `api_keys_disabled`; key state → `disabled_key`,
//!   `revoked_key`, `expired_key`; a key flagged as not organization-scoped
//!   ([`Simulator::set_key_org_scoped`]) → 403 `org_scope_only_required`; a disabled route → 403
//!   with its reason; missing scopes → 403 `missing_scope`; then query validation, then lookup.
//! - The `error` category is `api_key_validation_failed` for 400/401/422 (as in the vendor's own
//!   example), `access_denied` for 403, `not_found` for 404; clients must branch on `reason_code`.
//! - Unroutable paths answer 404 `not_found`; other methods than `GET` on API routes answer 405.
//! - Signed audio URLs point at `/media/{document_id}.wav?token=…&expires=…` on the same server,
//!   need no bearer, live 15 minutes and answer 403 (`invalid_signature`, `signed_url_expired`)
//!   otherwise.
//!
//! ## Harsh upstream (each off by default, each within the contract)
//! - **Query timestamp precision** ([`SimOptions::query_precision`],
//!   [`Simulator::set_query_precision`]): by default `start_at`/`end_at` filter at nanoseconds.
//!   [`QueryPrecision::TruncateMicros`] drops digits past the sixth before the range check and
//!   the filter (so `[t, t + 1 ns)` becomes an empty range: 422 `invalid_query`, field
//!   `start_at`); [`QueryPrecision::RejectPastMicros`] refuses them with 422 `invalid_query`
//!   naming the parameter. In both, every stored timestamp (inserted `created_at`, explicit
//!   `updated_at`) is truncated to microseconds; generated data and the wall clock are
//!   microseconds already. [`QueryPrecision::TruncateMillis`] drops digits past the third (as a
//!   server parsing into JavaScript's `Date` would: `[t, t + 1 µs)` is refused as empty), and
//!   keeps `created_at` (generated and inserted) and explicit `updated_at` at milliseconds;
//!   [`QueryPrecision::TruncateSeconds`] does the same at whole seconds. With
//!   [`SimOptions::micro_data`] the data stays at microseconds behind coarser bounds.
//! - **Coarse rendering** ([`SimOptions::render_created_at`],
//!   [`Simulator::set_render_created_at`]): the list and encounter detail routes render each
//!   encounter's `created_at` truncated or rounded (half up) to a [`Rendering`] unit, while
//!   filtering, ordering and `total` use the finer stored value, so an item may show a
//!   `created_at` outside the window that returned it, or out of order.
//!   [`Simulator::rendered_created_at`] applies the current rule.
//! - **Bulk instants** ([`SimOptions::bulk_instants`], [`Simulator::insert_bulk`]): tens of
//!   thousands of encounters sharing one `created_at`, so one instant holds more than the 10,000
//!   offset cap can page through in one direction.
//! - **`updated_at` that goes backwards**: [`Simulator::move_document`] recomputes both
//!   encounters' `updated_at` from what they hold now (the latest of the encounter's own last
//!   change, else `created_at`, and its documents' `updated_at`), so the source's can fall
//!   although its content changed; [`Simulator::restore_status`] and
//!   [`Simulator::set_encounter_updated_at`] set an older value outright.
//! - **`date_of_service` in other shapes** ([`SimOptions::service_dates`]): a plain date, or an
//!   assortment of plain dates, date-times without an offset, empty strings, numbers and `null`;
//!   [`Simulator::rendered_date_of_service`] gives the JSON value an encounter is sent with.
//! - **Decimals as strings** ([`SimOptions::decimals_as_strings`]): `audio_duration_seconds` and
//!   transcript turns' `start`/`end` sent as JSON strings (`"842.4"`).
//! - **`updated_at` null until updated** ([`SimOptions::null_updated_at`]): every fifth
//!   encounter is never updated, and an encounter never updated is sent with
//!   `"updated_at": null`.
//! - **Counts as strings** ([`SimOptions::counts_as_strings`]): the list envelope's `limit`,
//!   `offset` and `total` sent as JSON strings (`"100"`).
//! - **Labels as numbers** ([`SimOptions::labels_as_numbers`]): each encounter's
//!   `encounter_type` and `status` and each document summary's `title` sent as JSON numbers.
//! - **Unordered rendering** ([`SimOptions::unordered_rendering`]): keys, documents and
//!   whitespace differ between two responses about the same, unchanged records.
//! - **Signed recording links in summaries** ([`SimOptions::signed_recording_links`]): each
//!   finished ambient document's summary carries `"recording": {"audio_url": …, "expires_at":
//!   …}` with a token and expiry that differ on every response.
//! - Back-dated inserts ([`Simulator::insert`] with an old `created_at`) get `updated_at` = now;
//!   removals work at any age.
//! - [`Stats::list_probe_requests`] counts `limit=1` list requests (total probes) apart from
//!   `stats().route(Route::List)`, which counts every list request.
//!
//! ## Several organizations on one host
//! [`Simulator::start_organizations`] serves several clinic organizations on one port, as
//! ChartHero does: each has its own data set, `organization_id`, keys and scopes, routes,
//! faults, rate window (server-counted violations of its key) and statistics, and a request goes
//! to the organization whose key it carries (an unknown key answers `invalid_key`). The host
//! also counts every request of all keys against one host-wide window
//! ([`Simulator::set_host_rate_limit`], [`Simulator::host_stats`]).
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

#![warn(missing_docs)]

mod access;
mod content;
mod faults;
mod generate;
mod id;
mod model;
mod options;
pub mod pgcluster;
mod query;
mod render;
mod server;
mod simulator;
mod state;
mod store;
#[cfg(test)]
mod tests;
mod timestamp;
pub mod webhook;

pub use access::ALL_SCOPES;
pub use model::{
    DocKind, Document, Encounter, Fault, FaultRule, KeyState, ListRequest, NewEncounter, Patient, RateLimit,
    Route, Stats, Transcript, Turn, Unavailable, Visibility,
};
pub use options::{PageCap, QueryPrecision, Rendering, Rounding, ServiceDates, SimOptions};
pub use state::{ListHook, Simulator};
