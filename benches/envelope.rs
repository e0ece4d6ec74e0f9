//! The performance envelope, measured against the in-process simulator over loopback with the
//! real sync and a real SQLite file. Prints numbers; asserts nothing about time.
//!
//! `cargo bench --bench envelope -- [scenario...]`; scenarios: `transcripts`. With no scenario,
//! all run. `cargo test --bench envelope` runs the same code on a small N as a smoke test.

use std::time::Instant;

use charthero_sim::{RateLimit, Route, SimOptions, Simulator};
use charthero_sync::config::RawConfig;
use charthero_sync::secret::ApiKey;
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

/// `cargo bench` passes `--bench`; `cargo test --bench` does not: then run small.
fn full_size() -> bool {
    std::env::args().any(|a| a == "--bench")
}

fn wanted(name: &str) -> bool {
    let named: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    named.is_empty() || named.iter().any(|n| n == name)
}

async fn start_sim(encounters: usize) -> Simulator {
    let now = OffsetDateTime::now_utc();
    Simulator::start(SimOptions {
        seed: 7,
        encounters,
        start: now - time::Duration::days(30),
        end: now - time::Duration::hours(1),
        ..SimOptions::default()
    })
    .await
    .expect("simulator starts")
}

fn config(sim: &Simulator, dir: &tempfile::TempDir, rps: f64, burst: u32, in_flight: u32) -> RawConfig {
    let mut raw = RawConfig::default();
    raw.api.base_url = sim.base_url();
    raw.api.api_key_file = None;
    raw.database.path = dir.path().join("bench.db");
    raw.sync.start_at =
        charthero_sync::timefmt::format_utc(OffsetDateTime::now_utc() - time::Duration::days(31));
    raw.limits.requests_per_second = rps;
    raw.limits.burst = burst;
    raw.limits.max_in_flight = in_flight;
    raw
}

/// A full content backfill (notes and transcripts) under a rate limit: the achieved request
/// rate against the configured one, and the violations the server counted.
async fn transcripts() {
    let (encounters, rps) = if full_size() { (2_000, 200.0) } else { (150, 100.0) };
    let sim = start_sim(encounters).await;
    sim.set_rate_limit(Some(RateLimit {
        requests_per_second: rps,
        burst: 5,
        enforce: false,
    }));
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(&sim, &dir, rps, 5, 4).validate().unwrap();
    let key = ApiKey::new(&sim.api_key()).unwrap();
    let started = Instant::now();
    let report = charthero_sync::sync_once(&cfg, &key, "bench", None, &CancellationToken::new())
        .await
        .expect("the sync completes");
    let elapsed = started.elapsed().as_secs_f64();
    let stats = sim.stats();
    let achieved = stats.requests as f64 / elapsed;
    println!(
        "transcripts: {encounters} encounters, {} requests (list {}, document {}, transcript {}) in {elapsed:.2} s; \
         achieved {achieved:.1} req/s of {rps} configured ({:.1} %); {} rate violations; \
         {} documents, {} transcripts fetched",
        stats.requests,
        stats.route(Route::List),
        stats.route(Route::Document),
        stats.route(Route::Transcript),
        100.0 * achieved / rps,
        stats.rate_violations,
        report.counts.documents_fetched,
        report.counts.transcripts_fetched,
    );
    assert_eq!(
        stats.rate_violations, 0,
        "the client exceeded its configured rate"
    );
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        if wanted("transcripts") {
            transcripts().await;
        }
    });
}
