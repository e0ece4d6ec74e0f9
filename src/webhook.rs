//! The receiver of ChartHero's webhook deliveries (`[webhook] listen`; docs/operations.md,
//! "Webhooks"), served by `run` next to its cycles: `POST /webhooks/charthero` (a configuration
//! of one organization) or `POST /webhooks/charthero/<name>`.
//!
//! A delivery is verified over its exact raw bytes before anything of it is parsed
//! ([`verify`]: every required header present, a whole-second timestamp within
//! [`TOLERANCE`] of now, a `v1=` HMAC-SHA256 of `"{timestamp}.{body}"` under the organization's
//! signing secret, compared in constant time), then its event is stored in the warehouse
//! (`webhook_events`, keyed by the event's id) and only then acknowledged (202, or 200 for an
//! event stored before: deliveries are idempotent). The organization's loop is woken and its
//! next cycle handles the event (`sync::webhook`). Nothing of a delivery is logged but IDs and
//! the reason a delivery was refused; the secret never leaves [`WebhookSecret::expose`].

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hmac::{Hmac, KeyInit, Mac};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper::{HeaderMap, Method, Request, Response, StatusCode};
use serde::Deserialize;
use sha2::Sha256;
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

use crate::secret::WebhookSecret;
use crate::store::WebhookEvent;
use crate::sync::SyncContext;
use crate::sync::webhook::TRANSCRIPT_READY;
use crate::timefmt::parse_rfc3339;

/// Where deliveries are posted: this path alone for a configuration of one organization, or
/// followed by `/<name>`.
pub const PATH: &str = "/webhooks/charthero";

/// How far a delivery's `ChartHero-Timestamp` may be from this machine's clock, either way.
pub const TOLERANCE: Duration = Duration::from_secs(300);

/// The largest body accepted: an event is a thin pointer of a few hundred bytes.
pub const MAX_BODY: usize = 64 * 1024;

/// What an oversized delivery's body is read and dropped up to, and for how long, before it is
/// refused (a lingering close).
const DRAIN_LIMIT: usize = 1024 * 1024;
const DRAIN_TIME: Duration = Duration::from_secs(2);

/// How long a client may take to send a delivery's headers, and then its body.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Connections served at once; more wait to be accepted.
const MAX_CONNECTIONS: usize = 64;

/// The most `v1=` signatures one delivery may carry (one per secret being rotated).
const MAX_SIGNATURES: usize = 4;

/// How long a delivery waits for its event to be stored before it is answered 503 (ChartHero
/// delivers it again): the writer may be busy with a merge or a reconnection.
const STORE_TIMEOUT: Duration = Duration::from_secs(5);

/// The headers every delivery carries (ChartHero's names; HTTP matches them in any case).
const EVENT_ID: &str = "chartHero-event-id";
const DELIVERY_ID: &str = "chartHero-delivery-id";
const TIMESTAMP: &str = "chartHero-timestamp";
const SIGNATURE: &str = "chartHero-signature";
const VERSION: &str = "chartHero-webhook-version";

/// Why a delivery was refused: its status and the reason code its answer and the log carry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// A required header is absent, empty or not text (its name).
    MissingHeader(&'static str),
    /// `ChartHero-Timestamp` is not a whole number of seconds.
    MalformedTimestamp,
    /// `ChartHero-Timestamp` is further than [`TOLERANCE`] from now (a replay, or a clock off).
    TimestampOutsideTolerance,
    /// `ChartHero-Signature` carries no `v1=` signature.
    UnsupportedSignatureVersion,
    /// No `v1=` signature matches the body under this organization's secret.
    InvalidSignature,
    /// The signed body is not the event JSON (what is wrong, never the text).
    MalformedBody(String),
    /// A header disagrees with the body (`ChartHero-Event-Id` or `ChartHero-Webhook-Version`).
    HeaderMismatch(&'static str),
    /// The event is about another clinic than the one this organization reads.
    OrganizationMismatch,
}

impl Refusal {
    pub fn status(&self) -> StatusCode {
        match self {
            Refusal::InvalidSignature => StatusCode::UNAUTHORIZED,
            Refusal::OrganizationMismatch => StatusCode::UNPROCESSABLE_ENTITY,
            _ => StatusCode::BAD_REQUEST,
        }
    }

    pub fn reason_code(&self) -> &'static str {
        match self {
            Refusal::MissingHeader(_) => "missing_header",
            Refusal::MalformedTimestamp => "malformed_timestamp",
            Refusal::TimestampOutsideTolerance => "timestamp_outside_tolerance",
            Refusal::UnsupportedSignatureVersion => "unsupported_signature_version",
            Refusal::InvalidSignature => "invalid_signature",
            Refusal::MalformedBody(_) => "malformed_body",
            Refusal::HeaderMismatch(_) => "header_mismatch",
            Refusal::OrganizationMismatch => "organization_mismatch",
        }
    }

    fn message(&self) -> String {
        match self {
            Refusal::MissingHeader(h) => format!("the header {} is missing or empty", canonical(h)),
            Refusal::MalformedTimestamp => "ChartHero-Timestamp is not a number of seconds".into(),
            Refusal::TimestampOutsideTolerance => format!(
                "ChartHero-Timestamp is more than {} s from this receiver's clock",
                TOLERANCE.as_secs()
            ),
            Refusal::UnsupportedSignatureVersion => "ChartHero-Signature carries no v1= signature".into(),
            Refusal::InvalidSignature => "no signature matches this endpoint's signing secret".into(),
            Refusal::MalformedBody(why) => format!("the body is not a webhook event: {why}"),
            Refusal::HeaderMismatch(h) => format!("the header {} disagrees with the body", canonical(h)),
            Refusal::OrganizationMismatch => {
                "the event names another organization than the one this endpoint receives for".into()
            }
        }
    }
}

/// A header's name as ChartHero writes it.
fn canonical(name: &str) -> String {
    name.split('-')
        .map(|part| match part {
            "chartHero" => "ChartHero".to_owned(),
            part => {
                let mut chars = part.chars();
                chars.next().map_or_else(String::new, |c| {
                    c.to_ascii_uppercase().to_string() + chars.as_str()
                })
            }
        })
        .collect::<Vec<_>>()
        .join("-")
}

/// The event body, as far as the sync reads it; other fields are ignored.
#[derive(Deserialize)]
struct Body {
    id: String,
    #[serde(rename = "type")]
    event_type: String,
    api_version: String,
    occurred_at: String,
    organization_id: String,
    #[serde(default)]
    resources: Resources,
}

#[derive(Deserialize, Default)]
struct Resources {
    encounter_id: Option<String>,
    document_id: Option<String>,
}

/// Verifies one delivery against `secret` at `now` (Unix seconds) and reads its event; answers
/// the event and the delivery's id. The checks run in the contract's order: headers present,
/// timestamp well-formed, a `v1=` signature, the timestamp within [`TOLERANCE`], the signature
/// over the raw bytes — and only then is the body parsed.
pub fn verify(
    headers: &HeaderMap,
    body: &[u8],
    secret: &WebhookSecret,
    now: i64,
) -> Result<(WebhookEvent, String), Refusal> {
    let header = |name: &'static str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
            .filter(|v| !v.is_empty())
            .ok_or(Refusal::MissingHeader(name))
    };
    let event_id = header(EVENT_ID)?;
    let delivery_id = header(DELIVERY_ID)?;
    let timestamp = header(TIMESTAMP)?;
    let signatures = header(SIGNATURE)?;
    let version = header(VERSION)?;
    if timestamp.is_empty() || timestamp.len() > 12 || !timestamp.bytes().all(|b| b.is_ascii_digit()) {
        return Err(Refusal::MalformedTimestamp);
    }
    let sent: i64 = timestamp.parse().map_err(|_| Refusal::MalformedTimestamp)?;
    // Several signatures may be sent at once (a secret being rotated): any `v1=` one may match.
    // A few at most, each the 64 hex digits of a SHA-256: a header of thousands of candidates
    // must not cost a MAC each.
    let v1: Vec<&str> = signatures
        .split(',')
        .filter_map(|s| s.trim().strip_prefix("v1="))
        .collect();
    if v1.is_empty() {
        return Err(Refusal::UnsupportedSignatureVersion);
    }
    if sent.abs_diff(now) > TOLERANCE.as_secs() {
        return Err(Refusal::TimestampOutsideTolerance);
    }
    if v1.len() > MAX_SIGNATURES {
        return Err(Refusal::InvalidSignature);
    }
    let mut mac =
        Hmac::<Sha256>::new_from_slice(secret.expose().as_bytes()).expect("HMAC takes a key of any length");
    mac.update(timestamp.as_bytes());
    mac.update(b".");
    mac.update(body);
    // `verify_slice` compares in constant time.
    let matches = |tag: Vec<u8>| mac.clone().verify_slice(&tag).is_ok();
    if !v1.into_iter().filter_map(sha256_hex).any(matches) {
        return Err(Refusal::InvalidSignature);
    }
    let parsed: Body =
        serde_json::from_slice(body).map_err(|e| Refusal::MalformedBody(crate::api::scrub_json_error(&e)))?;
    let occurred_at = parse_rfc3339(&parsed.occurred_at)
        .map_err(|_| Refusal::MalformedBody("occurred_at is not an RFC 3339 timestamp".into()))?;
    if parsed.id != event_id {
        return Err(Refusal::HeaderMismatch(EVENT_ID));
    }
    if parsed.api_version != version {
        return Err(Refusal::HeaderMismatch(VERSION));
    }
    let ids = [&parsed.resources.encounter_id, &parsed.resources.document_id];
    if parsed.event_type == TRANSCRIPT_READY && ids.iter().any(|id| id.as_deref().is_none_or(str::is_empty)) {
        return Err(Refusal::MalformedBody(
            "a recording.transcript_ready event without resources.encounter_id and resources.document_id"
                .into(),
        ));
    }
    Ok((
        WebhookEvent {
            event_id: parsed.id,
            event_type: parsed.event_type,
            api_version: parsed.api_version,
            occurred_at,
            organization_id: parsed.organization_id,
            encounter_id: parsed.resources.encounter_id,
            document_id: parsed.resources.document_id,
        },
        delivery_id.to_owned(),
    ))
}

/// The 32 bytes of a SHA-256 written as 64 hex digits (lowercase, or uppercase); `None` for
/// anything else.
fn sha256_hex(text: &str) -> Option<Vec<u8>> {
    if text.len() != 64 || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    (0..64)
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).ok())
        .collect()
}

/// One organization's endpoint: its context (writer, key, metrics, wake-up) and signing secret.
struct Endpoint {
    /// Index into the daemon's contexts.
    at: usize,
    secret: WebhookSecret,
}

/// The endpoints served, and whether the bare [`PATH`] is one of them.
struct Endpoints {
    list: Vec<Endpoint>,
    /// The configuration has one organization: it also receives at [`PATH`] itself.
    bare: bool,
}

/// Serves deliveries on `listener` until `shutdown`, for `contexts[i]` with `secrets[i]`; `bare`:
/// the configuration has a single organization, which [`PATH`] itself serves too (besides
/// `PATH/<name>`).
pub async fn serve(
    listener: tokio::net::TcpListener,
    contexts: Arc<Vec<SyncContext>>,
    secrets: Vec<WebhookSecret>,
    bare: bool,
    shutdown: CancellationToken,
) {
    let endpoints = Arc::new(Endpoints {
        list: secrets
            .into_iter()
            .enumerate()
            .map(|(at, secret)| Endpoint { at, secret })
            .collect(),
        bare,
    });
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let (stream, peer) = tokio::select! {
            () = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!("webhook receiver: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let (contexts, endpoints, shutdown) = (contexts.clone(), endpoints.clone(), shutdown.clone());
        tokio::spawn(async move {
            let _slot = slot;
            let service = hyper::service::service_fn(move |req| {
                let (contexts, endpoints) = (contexts.clone(), endpoints.clone());
                async move { Ok::<_, Infallible>(answer(req, &contexts, &endpoints, peer).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(READ_TIMEOUT)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            tokio::select! {
                _ = conn => {}
                () = shutdown.cancelled() => {}
            }
        });
    }
}

/// The answer to one request. Every refusal is counted and logged with its reason code (a path
/// or method that reaches no endpoint at debug level only: the internet's scanners knock on
/// every port).
async fn answer(
    req: Request<hyper::body::Incoming>,
    contexts: &[SyncContext],
    endpoints: &Endpoints,
    peer: SocketAddr,
) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    let endpoint = match path.strip_prefix(PATH) {
        Some("" | "/") if endpoints.bare => endpoints.list.first(),
        Some(rest) => rest.strip_prefix('/').and_then(|name| {
            endpoints
                .list
                .iter()
                .find(|e| contexts[e.at].org.name.as_ref() == name)
        }),
        None => None,
    };
    let Some(endpoint) = endpoint else {
        tracing::debug!(%peer, "webhook receiver: no endpoint at the path asked for");
        let message = if endpoints.bare {
            format!("no such endpoint; deliveries go to {PATH}")
        } else {
            format!("no such endpoint; deliveries go to {PATH}/<name> of a configured organization")
        };
        return reply(StatusCode::NOT_FOUND, "unknown_endpoint", &message);
    };
    let ctx = &contexts[endpoint.at];
    let refuse = |status: StatusCode, reason_code: &'static str, message: &str| {
        ctx.client.metrics().record_webhook_delivery(reason_code);
        tracing::warn!(
            organization = %ctx.org.name,
            %peer,
            reason_code,
            "webhook delivery refused: {message}"
        );
        reply(status, reason_code, message)
    };
    if req.method() != Method::POST {
        let mut r = refuse(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "deliveries are POSTed",
        );
        r.headers_mut().insert(
            hyper::header::ALLOW,
            hyper::header::HeaderValue::from_static("POST"),
        );
        return r;
    }
    let (parts, body) = req.into_parts();
    let too_large = || {
        refuse(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            &format!("a delivery's body is at most {MAX_BODY} bytes"),
        )
    };
    let declared = parts
        .headers
        .get(hyper::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY as u64) {
        // Read (and drop) what the client sends anyway, within bounds, so that closing the
        // connection does not reset it before the client reads the answer.
        let _ = tokio::time::timeout(DRAIN_TIME, drain(body)).await;
        return too_large();
    }
    let body = match tokio::time::timeout(READ_TIMEOUT, Limited::new(body, MAX_BODY).collect()).await {
        Err(_) => {
            return refuse(
                StatusCode::REQUEST_TIMEOUT,
                "body_timeout",
                "the body did not arrive in time",
            );
        }
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => return too_large(),
        Ok(Err(_)) => {
            return refuse(
                StatusCode::BAD_REQUEST,
                "body_unreadable",
                "the body could not be read",
            );
        }
        Ok(Ok(collected)) => collected.to_bytes(),
    };
    let verified = verify(
        &parts.headers,
        &body,
        &endpoint.secret,
        OffsetDateTime::now_utc().unix_timestamp(),
    );
    let (event, delivery_id) = match verified {
        Ok(verified) => verified,
        Err(refusal) => return refuse(refusal.status(), refusal.reason_code(), &refusal.message()),
    };
    // Held to the clinic once it is known (configured, or learnt by the first sync).
    if ctx
        .org
        .id()
        .is_some_and(|id| id.as_ref() != event.organization_id)
    {
        let refusal = Refusal::OrganizationMismatch;
        return refuse(refusal.status(), refusal.reason_code(), &refusal.message());
    }
    if ctx.client.metrics().is_stopped() {
        // Not acknowledged: nothing would handle it before the operator acts (a key fixed, or
        // clinics whose IDs collide split) and restarts the daemon, and ChartHero's retries may
        // then find it taken.
        return refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            "organization_stopped",
            "this organization's sync is stopped (its API key was refused, or its IDs collide with another clinic's); deliver it again later",
        );
    }
    let organization = ctx.org.name.clone();
    let stored = event.clone();
    let recorded = tokio::time::timeout(
        STORE_TIMEOUT,
        ctx.writer.call(move |c| {
            c.record_webhook_event(&organization, &stored, &delivery_id, OffsetDateTime::now_utc())
        }),
    )
    .await;
    match recorded {
        Ok(Ok(new)) => {
            let outcome = if new { "accepted" } else { "duplicate" };
            ctx.client.metrics().record_webhook_delivery(outcome);
            tracing::info!(
                organization = %ctx.org.name,
                event_id = %event.event_id,
                event_type = %event.event_type,
                encounter_id = event.encounter_id.as_deref().unwrap_or("-"),
                document_id = event.document_id.as_deref().unwrap_or("-"),
                outcome,
                "webhook delivery"
            );
            // A duplicate wakes the loop too: the first delivery may have been stored after its
            // answer timed out (503), and then nothing woke the loop for it; a wake-up with
            // nothing pending starts no cycle.
            ctx.webhook_events.notify_one();
            if new {
                reply(
                    StatusCode::ACCEPTED,
                    "accepted",
                    "stored; the sync fetches what it points to",
                )
            } else {
                reply(StatusCode::OK, "duplicate", "this event was received before")
            }
        }
        // Not acknowledged, so ChartHero delivers it again.
        Ok(Err(e)) => {
            tracing::error!(organization = %ctx.org.name, "cannot store a webhook event: {e:#}");
            refuse(
                StatusCode::SERVICE_UNAVAILABLE,
                "store_unavailable",
                "the event could not be stored; deliver it again later",
            )
        }
        Err(_) => refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            "store_unavailable",
            "the warehouse did not store the event in time; deliver it again later",
        ),
    }
}

/// Reads and drops up to [`DRAIN_LIMIT`] bytes of a body, holding none of it.
async fn drain(mut body: hyper::body::Incoming) {
    let mut read = 0;
    while read < DRAIN_LIMIT {
        match body.frame().await {
            Some(Ok(frame)) => read += frame.data_ref().map_or(0, |d| d.len()),
            _ => return,
        }
    }
}

/// A JSON answer `{"status"|"error": code, "message": …}` (never anything of the request).
fn reply(status: StatusCode, code: &str, message: &str) -> Response<Full<Bytes>> {
    let key = if status.is_success() { "status" } else { "error" };
    let body = serde_json::json!({ key: code, "message": message }).to_string();
    Response::builder()
        .status(status)
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)))
        .expect("a response of a valid status and header is valid")
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "whsec_test_canary";

    fn sign(secret: &str, timestamp: &str, body: &[u8]) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
        mac.update(format!("{timestamp}.").as_bytes());
        mac.update(body);
        mac.finalize()
            .into_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    fn body(id: &str) -> Vec<u8> {
        format!(
            r#"{{"id":"{id}","type":"recording.transcript_ready","api_version":"2026-05-01",
                "occurred_at":"2026-11-30T10:00:00Z","organization_id":"org_7Df4",
                "resources":{{"encounter_id":"enc_1","document_id":"doc_1"}},"extra":1}}"#
        )
        .into_bytes()
    }

    fn headers(id: &str, timestamp: &str, signature: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("ChartHero-Event-Id", id),
            ("ChartHero-Delivery-Id", "dlv_1"),
            ("ChartHero-Timestamp", timestamp),
            ("ChartHero-Signature", signature),
            ("ChartHero-Webhook-Version", "2026-05-01"),
        ] {
            h.insert(
                hyper::header::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        h
    }

    fn secret() -> WebhookSecret {
        WebhookSecret::parse(SECRET).unwrap()
    }

    #[test]
    fn hmac_sha256_matches_rfc_4231() {
        // RFC 4231, test case 2: key "Jefe", data "what do ya want for nothing?".
        let mut mac = Hmac::<Sha256>::new_from_slice(b"Jefe").unwrap();
        mac.update(b"what do ya want for nothing?");
        let tag = sha256_hex("5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843").unwrap();
        assert!(mac.verify_slice(&tag).is_ok());
    }

    #[test]
    fn a_signed_delivery_within_the_tolerance_is_read() {
        let now = 1_800_000_000;
        let ts = now.to_string();
        let b = body("evt_1");
        let h = headers("evt_1", &ts, &format!("v1={}", sign(SECRET, &ts, &b)));
        let (event, delivery) = verify(&h, &b, &secret(), now + 300).unwrap();
        assert_eq!(delivery, "dlv_1");
        assert_eq!(event.event_id, "evt_1");
        assert_eq!(event.event_type, TRANSCRIPT_READY);
        assert_eq!(event.organization_id, "org_7Df4");
        assert_eq!(event.encounter_id.as_deref(), Some("enc_1"));
        assert_eq!(event.document_id.as_deref(), Some("doc_1"));
        // A rotation sends two signatures; one matching is enough, and uppercase hex reads.
        let two = format!(
            "v1={}, v1={}",
            "00".repeat(32),
            sign(SECRET, &ts, &b).to_uppercase()
        );
        assert!(verify(&headers("evt_1", &ts, &two), &b, &secret(), now - 300).is_ok());
    }

    #[test]
    fn a_timestamp_more_than_the_tolerance_away_either_way_is_refused() {
        let now = 1_800_000_000;
        let ts = now.to_string();
        let b = body("evt_1");
        let h = headers("evt_1", &ts, &format!("v1={}", sign(SECRET, &ts, &b)));
        for off in [-301, 301] {
            assert_eq!(
                verify(&h, &b, &secret(), now + off).unwrap_err(),
                Refusal::TimestampOutsideTolerance
            );
        }
    }

    #[test]
    fn signatures_that_are_not_one_sha256_in_hex_or_too_many_match_nothing() {
        let now = 1_800_000_000;
        let ts = now.to_string();
        let b = body("evt_1");
        let good = sign(SECRET, &ts, &b);
        let plus = format!("+{}", &good[1..]);
        let many = format!("{}, v1={good}", vec!["v1=".to_owned(); MAX_SIGNATURES].join(","));
        for bad in [
            "v1=".to_owned(),
            format!("v1={}", &good[..63]),
            format!("v1={good}0"),
            format!("v1={plus}"),
            many,
        ] {
            assert_eq!(
                verify(&headers("evt_1", &ts, &bad), &b, &secret(), now).unwrap_err(),
                Refusal::InvalidSignature,
                "{bad}"
            );
        }
        // A header that is not visible ASCII never reaches the hex (it is not text to HeaderMap),
        // and multibyte text is no hex either.
        assert_eq!(sha256_hex(&"é".repeat(32)), None);
    }

    #[test]
    fn each_fault_of_a_delivery_is_refused_with_its_own_reason() {
        let now = 1_800_000_000;
        let ts = now.to_string();
        let b = body("evt_1");
        let good = format!("v1={}", sign(SECRET, &ts, &b));
        let check = |h: HeaderMap, b: &[u8], expected: Refusal| {
            assert_eq!(verify(&h, b, &secret(), now).unwrap_err(), expected);
        };
        for name in [EVENT_ID, DELIVERY_ID, TIMESTAMP, SIGNATURE, VERSION] {
            let mut h = headers("evt_1", &ts, &good);
            h.remove(name);
            check(h, &b, Refusal::MissingHeader(name));
        }
        for bad in ["17e8", "-1800000000", "1800000000.5", " "] {
            let expected = if bad.trim().is_empty() {
                Refusal::MissingHeader(TIMESTAMP)
            } else {
                Refusal::MalformedTimestamp
            };
            check(headers("evt_1", bad, &good), &b, expected);
        }
        check(
            headers("evt_1", &ts, &format!("v2={}", sign(SECRET, &ts, &b))),
            &b,
            Refusal::UnsupportedSignatureVersion,
        );
        let old = (now - 301).to_string();
        check(
            headers("evt_1", &old, &format!("v1={}", sign(SECRET, &old, &b))),
            &b,
            Refusal::TimestampOutsideTolerance,
        );
        // Another secret, a changed byte, a signature over another timestamp, not hex.
        check(
            headers("evt_1", &ts, &format!("v1={}", sign("whsec_other", &ts, &b))),
            &b,
            Refusal::InvalidSignature,
        );
        let mut tampered = b.clone();
        *tampered.iter_mut().find(|c| **c == b'1').unwrap() = b'2';
        check(headers("evt_1", &ts, &good), &tampered, Refusal::InvalidSignature);
        let later = (now + 1).to_string();
        check(headers("evt_1", &later, &good), &b, Refusal::InvalidSignature);
        check(headers("evt_1", &ts, "v1=zz"), &b, Refusal::InvalidSignature);
        // Signed, but not what the headers say, or not an event at all.
        check(
            headers("evt_2", &ts, &good),
            &b,
            Refusal::HeaderMismatch(EVENT_ID),
        );
        let junk = b"{\"id\": 7}";
        let signed_junk = format!("v1={}", sign(SECRET, &ts, junk));
        assert!(matches!(
            verify(&headers("evt_1", &ts, &signed_junk), junk, &secret(), now),
            Err(Refusal::MalformedBody(_))
        ));
    }

    #[test]
    fn refusals_never_quote_the_body_or_the_secret() {
        let now = 1_800_000_000;
        let ts = now.to_string();
        let b =
            br#"{"id":"evt_1","type":"x","api_version":"v","occurred_at":"Jane Doe","organization_id":"o"}"#;
        let h = headers("evt_1", &ts, &format!("v1={}", sign(SECRET, &ts, b)));
        let refusal = verify(&h, b, &secret(), now).unwrap_err();
        assert!(matches!(refusal, Refusal::MalformedBody(_)));
        let text = refusal.message();
        assert!(!text.contains("Jane") && !text.contains("canary"), "{text}");
        assert_eq!(canonical(EVENT_ID), "ChartHero-Event-Id");
    }
}
