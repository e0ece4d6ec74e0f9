//! Counters for operators, and the optional Prometheus endpoint of the daemon (loopback only:
//! it is for a local scraper or an SSH tunnel, never the network). Metrics carry route names,
//! statuses and counts — no IDs, no PHI.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::fmt::Write;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

/// Process-wide counters, shared through the API client.
#[derive(Debug, Default)]
pub struct Metrics {
    /// (route, status) → requests; status 0 means no HTTP response (timeout, reset).
    requests: Mutex<BTreeMap<(&'static str, u16), u64>>,
    limiter_wait_micros: AtomicU64,
    limiter_waits: AtomicU64,
    rows_written: AtomicU64,
    cycles: Mutex<BTreeMap<&'static str, u64>>,
    /// reason → windows that could not be read completely.
    window_failures: Mutex<BTreeMap<&'static str, u64>>,
    last_success_unix: AtomicI64,
    complete_through_unix: AtomicI64,
    /// Work in `dead_letters` at the end of the last cycle (shown once a cycle ended).
    dead_letters: AtomicI64,
    /// Set when the organization's sync stopped (its key refused, its IDs colliding): the reason code.
    stopped: Mutex<Option<String>>,
    /// The key's request rate now (`f64` bits; 0 before the client is built), and how many
    /// times ChartHero's refusals (429) lowered it.
    rate_bits: AtomicU64,
    rate_cuts: AtomicU64,
    /// outcome (`accepted`, `duplicate`, or the reason code of a refusal) → webhook deliveries
    /// to the organization's endpoint.
    webhook_deliveries: Mutex<BTreeMap<&'static str, u64>>,
}

impl Metrics {
    pub fn record_request(&self, route: &'static str, status: u16) {
        *self
            .requests
            .lock()
            .expect("metrics lock")
            .entry((route, status))
            .or_default() += 1;
    }

    /// The key's request rate is now `rate` (requests per second); `cut`: a refusal lowered it.
    pub fn record_rate(&self, rate: f64, cut: bool) {
        self.rate_bits.store(rate.to_bits(), Ordering::Relaxed);
        if cut {
            self.rate_cuts.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn record_limiter_wait(&self, waited: Duration) {
        if !waited.is_zero() {
            self.limiter_waits.fetch_add(1, Ordering::Relaxed);
            self.limiter_wait_micros
                .fetch_add(waited.as_micros() as u64, Ordering::Relaxed);
        }
    }

    /// A cycle ended with `outcome` (`succeeded`, `partial`, `failed`, `aborted`), leaving
    /// `dead_letters` items in `dead_letters`.
    pub fn record_cycle(
        &self,
        outcome: &'static str,
        rows: u64,
        complete_through: Option<OffsetDateTime>,
        dead_letters: i64,
    ) {
        self.dead_letters.store(dead_letters, Ordering::Relaxed);
        *self
            .cycles
            .lock()
            .expect("metrics lock")
            .entry(outcome)
            .or_default() += 1;
        self.rows_written.fetch_add(rows, Ordering::Relaxed);
        if outcome == "succeeded" {
            self.last_success_unix
                .store(OffsetDateTime::now_utc().unix_timestamp(), Ordering::Relaxed);
        }
        if let Some(t) = complete_through {
            self.complete_through_unix
                .store(t.unix_timestamp(), Ordering::Relaxed);
        }
    }

    /// The organization's sync stopped: its key was refused (`reason_code`, e.g. `revoked_key`),
    /// or its IDs collide with another clinic's (`id_collision`).
    pub fn record_stopped(&self, reason_code: &str) {
        *self.stopped.lock().expect("metrics lock") = Some(reason_code.to_owned());
    }

    /// A webhook delivery to the organization's endpoint was answered: `accepted`, `duplicate`
    /// or the reason code it was refused with.
    pub fn record_webhook_delivery(&self, outcome: &'static str) {
        *self
            .webhook_deliveries
            .lock()
            .expect("metrics lock")
            .entry(outcome)
            .or_default() += 1;
    }

    /// Whether the organization's sync stopped (its key refused, its IDs colliding).
    pub fn is_stopped(&self) -> bool {
        self.stopped.lock().expect("metrics lock").is_some()
    }

    /// A window could not be read completely (`window_unsettled`, `request_bound_exceeded`,
    /// `instant_overfull`); its cycle failed with the watermark unmoved.
    pub fn record_window_failure(&self, reason: &'static str) {
        *self
            .window_failures
            .lock()
            .expect("metrics lock")
            .entry(reason)
            .or_default() += 1;
    }
}

/// One organization's counters, under its name.
pub type Labelled = Vec<(String, std::sync::Arc<Metrics>)>;

/// The Prometheus text exposition format (0.0.4): every family once, with one sample per
/// organization, labelled `organization="<name>"` first.
pub fn render(orgs: &[(String, std::sync::Arc<Metrics>)], now: OffsetDateTime) -> String {
    let mut out = String::new();
    let name = family(
        &mut out,
        "requests_total",
        "counter",
        "HTTP requests by route and status (0: no response).",
    );
    for (org, m) in orgs {
        for ((route, status), n) in m.requests.lock().expect("metrics lock").iter() {
            let _ = writeln!(
                out,
                "{name}{{organization=\"{org}\",route=\"{route}\",status=\"{status}\"}} {n}"
            );
        }
    }
    let name = family(
        &mut out,
        "rate_limiter_wait_seconds_total",
        "counter",
        "Time requests spent waiting for the rate limiter (the key's budget and the process's ceiling).",
    );
    for (org, m) in orgs {
        let secs = m.limiter_wait_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}{{organization=\"{org}\"}} {secs}");
    }
    let name = family(
        &mut out,
        "rate_limiter_waits_total",
        "counter",
        "Requests that waited for the rate limiter.",
    );
    for (org, m) in orgs {
        let _ = writeln!(
            out,
            "{name}{{organization=\"{org}\"}} {}",
            m.limiter_waits.load(Ordering::Relaxed)
        );
    }
    let name = family(
        &mut out,
        "request_rate_per_second",
        "gauge",
        "The key's request rate now: its configured rate, unless ChartHero's refusals (429) lowered it.",
    );
    for (org, m) in orgs {
        let rate = f64::from_bits(m.rate_bits.load(Ordering::Relaxed));
        let _ = writeln!(out, "{name}{{organization=\"{org}\"}} {rate}");
    }
    let name = family(
        &mut out,
        "request_rate_cuts_total",
        "counter",
        "Times a refusal (429) lowered the key's request rate.",
    );
    for (org, m) in orgs {
        let _ = writeln!(
            out,
            "{name}{{organization=\"{org}\"}} {}",
            m.rate_cuts.load(Ordering::Relaxed)
        );
    }
    let name = family(
        &mut out,
        "rows_written_total",
        "counter",
        "Encounters, documents, transcripts and recordings written or marked.",
    );
    for (org, m) in orgs {
        let _ = writeln!(
            out,
            "{name}{{organization=\"{org}\"}} {}",
            m.rows_written.load(Ordering::Relaxed)
        );
    }
    let name = family(&mut out, "cycles_total", "counter", "Sync cycles by outcome.");
    for (org, m) in orgs {
        for (outcome, n) in m.cycles.lock().expect("metrics lock").iter() {
            let _ = writeln!(out, "{name}{{organization=\"{org}\",outcome=\"{outcome}\"}} {n}");
        }
    }
    if orgs
        .iter()
        .any(|(_, m)| !m.window_failures.lock().expect("metrics lock").is_empty())
    {
        let name = family(
            &mut out,
            "window_failures_total",
            "counter",
            "Windows that could not be read completely, by reason (the cycle failed, the watermark stayed).",
        );
        for (org, m) in orgs {
            for (reason, n) in m.window_failures.lock().expect("metrics lock").iter() {
                let _ = writeln!(out, "{name}{{organization=\"{org}\",reason=\"{reason}\"}} {n}");
            }
        }
    }
    if orgs
        .iter()
        .any(|(_, m)| !m.webhook_deliveries.lock().expect("metrics lock").is_empty())
    {
        let name = family(
            &mut out,
            "webhook_deliveries_total",
            "counter",
            "Webhook deliveries answered, by outcome: accepted, duplicate, or the reason code of a refusal.",
        );
        for (org, m) in orgs {
            for (outcome, n) in m.webhook_deliveries.lock().expect("metrics lock").iter() {
                let _ = writeln!(out, "{name}{{organization=\"{org}\",outcome=\"{outcome}\"}} {n}");
            }
        }
    }
    let name = family(
        &mut out,
        "organization_stopped",
        "gauge",
        "1 when the organization's sync stopped (its key refused, or its IDs colliding with another clinic's), labelled with why.",
    );
    for (org, m) in orgs {
        match m.stopped.lock().expect("metrics lock").as_deref() {
            Some(reason) => {
                let _ = writeln!(out, "{name}{{organization=\"{org}\",reason_code=\"{reason}\"}} 1");
            }
            None => {
                let _ = writeln!(out, "{name}{{organization=\"{org}\"}} 0");
            }
        }
    }
    let name = family(
        &mut out,
        "dead_letters",
        "gauge",
        "Work items that exhausted their retries and wait for a later cycle, at the end of the last cycle.",
    );
    for (org, m) in orgs {
        if !m.cycles.lock().expect("metrics lock").is_empty() {
            let n = m.dead_letters.load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}{{organization=\"{org}\"}} {n}");
        }
    }
    let name = family(
        &mut out,
        "last_success_timestamp_seconds",
        "gauge",
        "When the last cycle succeeded (0: never).",
    );
    for (org, m) in orgs {
        let _ = writeln!(
            out,
            "{name}{{organization=\"{org}\"}} {}",
            m.last_success_unix.load(Ordering::Relaxed)
        );
    }
    if orgs
        .iter()
        .any(|(_, m)| m.complete_through_unix.load(Ordering::Relaxed) > 0)
    {
        let name = family(
            &mut out,
            "lag_seconds",
            "gauge",
            "Now minus complete_through: how far behind the warehouse is known complete.",
        );
        for (org, m) in orgs {
            let through = m.complete_through_unix.load(Ordering::Relaxed);
            if through > 0 {
                let _ = writeln!(
                    out,
                    "{name}{{organization=\"{org}\"}} {}",
                    now.unix_timestamp() - through
                );
            }
        }
    }
    out
}

/// Writes a family's HELP and TYPE lines and returns its full name.
fn family(out: &mut String, suffix: &str, kind: &str, help: &str) -> String {
    let name = format!("charthero_sync_{suffix}");
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    name
}

/// Checks that a `metrics.listen` address is on the loopback interface.
pub fn parse_listen(text: &str) -> Result<SocketAddr, String> {
    let addr: SocketAddr = text
        .parse()
        .map_err(|_| format!("{text:?} is not an address like \"127.0.0.1:9464\""))?;
    if !addr.ip().is_loopback() {
        return Err(format!(
            "{text:?} is not a loopback address; the metrics endpoint is served on 127.0.0.1 or ::1 only"
        ));
    }
    Ok(addr)
}

/// Serves `GET /metrics` on `listener` until `shutdown`.
pub async fn serve(listener: tokio::net::TcpListener, metrics: Labelled, shutdown: CancellationToken) {
    let metrics = std::sync::Arc::new(metrics);
    loop {
        let stream = tokio::select! {
            () = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!("metrics endpoint: accept failed: {e}");
                    continue;
                }
            },
        };
        let metrics = metrics.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let metrics = metrics.clone();
                async move {
                    let (status, body) = if req.uri().path() == "/metrics" {
                        (200, render(&metrics, OffsetDateTime::now_utc()))
                    } else {
                        (404, "not found; try /metrics\n".to_owned())
                    };
                    let resp = hyper::Response::builder()
                        .status(status)
                        .header("content-type", "text/plain; version=0.0.4")
                        .body(Full::new(Bytes::from(body)))
                        .expect("a static response is valid");
                    Ok::<_, Infallible>(resp)
                }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            tokio::select! {
                _ = conn => {}
                () = shutdown.cancelled() => {}
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exposition_groups_samples_under_their_family() {
        let m = Metrics::default();
        m.record_request("list_encounters", 200);
        m.record_request("list_encounters", 200);
        m.record_request("transcript", 429);
        m.record_limiter_wait(Duration::from_millis(1500));
        let now = OffsetDateTime::now_utc();
        m.record_cycle("succeeded", 42, Some(now - time::Duration::seconds(120)), 3);
        m.record_window_failure("request_bound_exceeded");
        m.record_stopped("revoked_key");
        m.record_rate(5.0, false);
        m.record_rate(3.75, true);
        m.record_webhook_delivery("accepted");
        m.record_webhook_delivery("invalid_signature");
        let text = render(&[("northside".to_owned(), std::sync::Arc::new(m))], now);
        assert!(text.contains("charthero_sync_request_rate_per_second{organization=\"northside\"} 3.75\n"));
        assert!(text.contains("charthero_sync_request_rate_cuts_total{organization=\"northside\"} 1\n"));
        assert!(
            text.contains("# TYPE charthero_sync_requests_total counter\n"),
            "{text}"
        );
        assert!(text.contains("charthero_sync_requests_total{organization=\"northside\",route=\"list_encounters\",status=\"200\"} 2\n"));
        assert!(text.contains("charthero_sync_requests_total{organization=\"northside\",route=\"transcript\",status=\"429\"} 1\n"));
        assert!(
            text.contains("charthero_sync_rate_limiter_wait_seconds_total{organization=\"northside\"} 1.5\n")
        );
        assert!(text.contains("charthero_sync_rows_written_total{organization=\"northside\"} 42\n"));
        assert!(text.contains(
            "charthero_sync_webhook_deliveries_total{organization=\"northside\",outcome=\"invalid_signature\"} 1\n"
        ));
        assert!(
            text.contains(
                "charthero_sync_cycles_total{organization=\"northside\",outcome=\"succeeded\"} 1\n"
            )
        );
        assert!(text.contains(
            "charthero_sync_organization_stopped{organization=\"northside\",reason_code=\"revoked_key\"} 1\n"
        ));
        assert!(text.contains("charthero_sync_lag_seconds{organization=\"northside\"} 120\n"));
        assert!(text.contains("charthero_sync_dead_letters{organization=\"northside\"} 3\n"));
        assert!(text.contains("charthero_sync_window_failures_total{organization=\"northside\",reason=\"request_bound_exceeded\"} 1\n"));
    }

    #[test]
    fn only_loopback_addresses_are_accepted() {
        assert!(parse_listen("127.0.0.1:9464").is_ok());
        assert!(parse_listen("[::1]:9464").is_ok());
        assert!(parse_listen("0.0.0.0:9464").unwrap_err().contains("loopback"));
        assert!(parse_listen("localhost").is_err());
    }
}
