//! ChartHero's webhooks as the contract describes them (planned, not generally available): a
//! thin `recording.transcript_ready` event POSTed to a receiver with its five headers and a
//! `v1=` HMAC-SHA256 signature of `"{timestamp}.{raw_body}"` under the endpoint's signing secret.
//!
//! [`crate::Simulator::set_webhook`] makes [`crate::Simulator::finalize_transcript`] deliver one
//! event per finalized transcript, again after 1, 2, 4 and 8 s while the receiver answers anything
//! but 2xx (or cannot be reached); every attempt is logged for tests
//! ([`crate::Simulator::webhook_deliveries`]). [`signature`], [`transcript_ready_body`] and [`post`]
//! let a test send deliveries of its own, well-formed or not. Plain HTTP/1.1 to a loopback
//! receiver only: the simulator speaks no TLS.

use std::io;
use std::time::Duration;

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The `api_version` (and `ChartHero-Webhook-Version`) of the events the contract documents.
pub const API_VERSION: &str = "2026-05-01";

/// The event type sent when a transcript is finalized.
pub const TRANSCRIPT_READY: &str = "recording.transcript_ready";

/// Where deliveries go and how they are signed.
#[derive(Clone, Debug)]
pub struct WebhookTarget {
    /// `http://127.0.0.1:<port>/<path>`.
    pub url: String,
    /// The endpoint's signing secret.
    pub secret: String,
}

/// One attempt to deliver an event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WebhookDelivery {
    /// The event's id (`ChartHero-Event-Id`).
    pub event_id: String,
    /// Stable across the attempts of one delivery.
    pub delivery_id: String,
    /// 1 for the first attempt.
    pub attempt: u32,
    /// The receiver's status; `None` when it could not be reached or answered no status line.
    pub status: Option<u16>,
}

/// Delays before the attempts after the first.
const RETRIES: [Duration; 4] = [
    Duration::from_secs(1),
    Duration::from_secs(2),
    Duration::from_secs(4),
    Duration::from_secs(8),
];

/// `v1=` and the lowercase hex HMAC-SHA256 of `"{timestamp}.{body}"` under `secret`.
pub fn signature(secret: &str, timestamp: i64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes a key of any length");
    mac.update(format!("{timestamp}.").as_bytes());
    mac.update(body);
    let hex: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("v1={hex}")
}

/// The body of a `recording.transcript_ready` event.
pub fn transcript_ready_body(
    event_id: &str,
    organization_id: &str,
    encounter_id: &str,
    document_id: &str,
    occurred_at: OffsetDateTime,
) -> String {
    serde_json::json!({
        "id": event_id,
        "type": TRANSCRIPT_READY,
        "api_version": API_VERSION,
        "occurred_at": occurred_at.format(&Rfc3339).expect("a current instant formats"),
        "organization_id": organization_id,
        "resources": {"encounter_id": encounter_id, "document_id": document_id},
    })
    .to_string()
}

/// The five headers of a delivery of `body`, signed at `timestamp`.
pub fn headers(
    secret: &str,
    event_id: &str,
    delivery_id: &str,
    timestamp: i64,
    body: &[u8],
) -> Vec<(&'static str, String)> {
    vec![
        ("ChartHero-Event-Id", event_id.to_owned()),
        ("ChartHero-Delivery-Id", delivery_id.to_owned()),
        ("ChartHero-Timestamp", timestamp.to_string()),
        ("ChartHero-Signature", signature(secret, timestamp, body)),
        ("ChartHero-Webhook-Version", API_VERSION.to_owned()),
    ]
}

/// POSTs `body` with `headers` to an `http://` URL over a new connection and answers the
/// response's status.
pub async fn post(url: &str, headers: &[(&str, String)], body: &[u8]) -> io::Result<u16> {
    let url = url::Url::parse(url).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    if url.scheme() != "http" {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "the simulator delivers webhooks over plain http only",
        ));
    }
    let host = url.host_str().unwrap_or("127.0.0.1");
    let port = url.port().unwrap_or(80);
    let mut stream = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::net::TcpStream::connect((host, port)),
    )
    .await
    .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
    let mut request = format!(
        "POST {} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n",
        url.path(),
        body.len()
    );
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).await?;
    stream.write_all(body).await?;
    let mut response = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), stream.read_to_end(&mut response))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no answer in time"))??;
    let status_line = response.split(|&b| b == b'\n').next().unwrap_or_default();
    std::str::from_utf8(status_line)
        .ok()
        .and_then(|line| line.split_whitespace().nth(1))
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no HTTP status line in the answer"))
}

/// Delivers one event to `target` until it is acknowledged (2xx) or the retries are spent,
/// calling `log` after every attempt.
pub(crate) async fn deliver(
    target: WebhookTarget,
    event_id: String,
    delivery_id: String,
    body: String,
    log: impl Fn(WebhookDelivery),
) {
    for attempt in 1..=RETRIES.len() as u32 + 1 {
        if attempt > 1 {
            tokio::time::sleep(RETRIES[attempt as usize - 2]).await;
        }
        let now = OffsetDateTime::now_utc().unix_timestamp();
        let headers = headers(&target.secret, &event_id, &delivery_id, now, body.as_bytes());
        let status = post(&target.url, &headers, body.as_bytes()).await.ok();
        log(WebhookDelivery {
            event_id: event_id.clone(),
            delivery_id: delivery_id.clone(),
            attempt,
            status,
        });
        if status.is_some_and(|s| (200..300).contains(&s)) {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signature_is_hmac_sha256_of_the_timestamp_a_dot_and_the_body() {
        // Computed independently: Python's hmac.new(b"whsec_sim",
        // b'1800000000.{"id":"evt_1"}', hashlib.sha256).hexdigest().
        assert_eq!(
            signature("whsec_sim", 1_800_000_000, br#"{"id":"evt_1"}"#),
            "v1=70cda9d5449ef3716dbe0ac8318762c536b40a6aa0c2a13ac9d97f111537a6dc"
        );
    }
}
