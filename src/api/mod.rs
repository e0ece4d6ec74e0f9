//! The ChartHero API v1 client: one method per route, every request (retries and audio
//! downloads included) through one rate limiter and one in-flight bound, bodies read under a size
//! cap, transient failures retried (see `retry`), errors classified by [`ApiError`]. After a 401
//! it sends nothing more. It never touches SQLite.

pub mod budget;
mod error;
pub mod retry;
pub mod wire;

use std::fmt;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use reqwest::header::{AUTHORIZATION, HeaderMap, HeaderValue, RETRY_AFTER};
use serde_json::value::RawValue;
use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use tokio::io::AsyncWriteExt;
use url::Url;

pub(crate) use error::scrub_json_error;
pub use error::{ApiError, ApiErrorKind, ErrorClass};
use retry::{RetryBudget, RetryPolicy};
use wire::SignedUrl;
use wire::{
    AudioLink, DocumentDetail, DocumentEnvelope, Encounter, EncounterEnvelope, EncounterPage, ErrorBody,
    RawPage, SchemaTypeProbe, TranscriptResponse,
};

pub use budget::Ceiling;
use budget::KeyBudget;

use crate::config::{ApiConfig, Limits, Organization};
use crate::metrics::Metrics;
use crate::secret::ApiKey;
use crate::timefmt::Micros;

/// The largest `offset` the list route accepts.
pub const MAX_OFFSET: u32 = 10_000;
/// The largest `limit` the list route accepts.
pub const MAX_LIMIT: u32 = 100;

/// The API's routes, named for logs and metrics (never with IDs or query strings).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Route {
    ListEncounters,
    Encounter,
    Document,
    Transcript,
    Audio,
    /// The download of a signed recording URL (not an API route; no bearer key is sent).
    Recording,
}

impl Route {
    pub fn as_str(self) -> &'static str {
        match self {
            Route::ListEncounters => "list_encounters",
            Route::Encounter => "encounter",
            Route::Document => "document",
            Route::Transcript => "transcript",
            Route::Audio => "audio",
            Route::Recording => "recording",
        }
    }
}

impl fmt::Display for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Route::ListEncounters => "GET /encounters",
            Route::Encounter => "GET /encounters/{id}",
            Route::Document => "GET /encounters/{id}/documents/{id}",
            Route::Transcript => "GET /encounters/{id}/documents/{id}/transcript",
            Route::Audio => "GET /encounters/{id}/documents/{id}/audio",
            Route::Recording => "GET <signed recording URL>",
        })
    }
}

/// Sort direction of the list route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SortOrder {
    Asc,
    Desc,
}

/// Parameters of one `GET /encounters` request.
#[derive(Debug, Clone, Copy)]
pub struct ListQuery {
    /// Inclusive lower bound on `created_at`, at microsecond precision (see [`Micros`]).
    pub start_at: Option<Micros>,
    /// Exclusive upper bound on `created_at`, at microsecond precision.
    pub end_at: Option<Micros>,
    pub offset: u32,
    pub limit: u32,
    pub sort: SortOrder,
}

/// A ChartHero API client. Cheap to clone; clones share the limiter and connection pool.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    http: reqwest::Client,
    /// `{base_url}/external/v1/`, ending in a slash so relative joins append.
    api_root: Url,
    auth: HeaderValue,
    max_body: usize,
    /// This key's rate and in-flight budget, and the process's ceiling over all keys.
    key_budget: KeyBudget,
    retry: RetryPolicy,
    retries_per_cycle: u32,
    budget: RetryBudget,
    rng: Mutex<fastrand::Rng>,
    /// Set by a 429 or 503 with `Retry-After`: no request starts before this instant.
    paused_until: Mutex<Option<tokio::time::Instant>>,
    /// Set by the first 401: the key is refused, so nothing more is sent with it.
    refused: Mutex<Option<Option<String>>>,
    /// When the last response (of any kind) arrived: the daemon's watchdog evidence of progress.
    last_activity: Mutex<std::time::Instant>,
    metrics: Arc<Metrics>,
    /// Whether this process has warned that refusals lowered the key's rate (once; later cuts
    /// are logged at debug level).
    rate_warned: std::sync::atomic::AtomicBool,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("api_root", &self.inner.api_root.as_str())
            .finish_non_exhaustive()
    }
}

impl Client {
    /// A client of one key that alone has the whole of `[limits]` (a configuration of one
    /// organization; tests and tools).
    pub fn new(api: &ApiConfig, limits: &Limits, key: &ApiKey) -> anyhow::Result<Client> {
        let ceiling = Ceiling::new(&limits.ceiling())?;
        let budget = KeyBudget::new(&limits.ceiling(), "limits.", ceiling)?;
        Client::build(api, &api.base_url, budget, limits, key, Arc::default())
    }

    /// The client of one organization's key: its own base URL and budget, under the `ceiling`
    /// every organization's client of this process shares; `metrics` are this organization's.
    pub fn for_organization(
        api: &ApiConfig,
        org: &Organization,
        limits: &Limits,
        ceiling: Arc<Ceiling>,
        key: &ApiKey,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Client> {
        let budget = KeyBudget::new(&org.budget, &format!("organizations.{}.", org.name), ceiling)?;
        Client::build(api, &org.base_url, budget, limits, key, metrics)
    }

    fn build(
        api: &ApiConfig,
        base_url: &Url,
        budget: KeyBudget,
        limits: &Limits,
        key: &ApiKey,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Client> {
        let http = reqwest::Client::builder()
            .user_agent(concat!("charthero-sync/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(api.connect_timeout)
            .read_timeout(api.read_timeout)
            .timeout(api.request_timeout)
            // A redirect could carry the bearer key to another host; the API never redirects.
            .redirect(reqwest::redirect::Policy::none())
            .pool_max_idle_per_host(limits.max_in_flight.get())
            .build()?;
        let mut auth = HeaderValue::from_str(&format!("Bearer {}", key.expose()))
            .map_err(|_| anyhow::anyhow!("the API key contains characters not allowed in an HTTP header"))?;
        auth.set_sensitive(true);
        let mut api_root = base_url.clone();
        let path = format!("{}/external/v1/", api_root.path().trim_end_matches('/'));
        api_root.set_path(&path);
        Ok(Client {
            inner: Arc::new(Inner {
                http,
                api_root,
                auth,
                max_body: api.max_response_bytes,
                key_budget: budget,
                retry: RetryPolicy {
                    max_attempts: limits.max_attempts.get(),
                    ..RetryPolicy::default()
                },
                retries_per_cycle: limits.retries_per_cycle,
                budget: RetryBudget::default(),
                rng: Mutex::new(fastrand::Rng::new()),
                paused_until: Mutex::new(None),
                refused: Mutex::new(None),
                last_activity: Mutex::new(std::time::Instant::now()),
                metrics,
                rate_warned: std::sync::atomic::AtomicBool::new(false),
            }),
        })
        .inspect(|c| {
            c.inner.metrics.record_rate(c.inner.key_budget.rate(), false);
            c.begin_cycle();
        })
    }

    /// Renews the per-cycle retry budget.
    pub fn begin_cycle(&self) {
        self.inner.budget.reset(self.inner.retries_per_cycle);
    }

    /// Sends nothing before `until` (a pause ChartHero asked an earlier process for), unless a
    /// later one is already set. An instant past, or beyond [`retry::PAUSE_MAX`] from now (a
    /// clock that moved back, a corrupt value), is not taken as is: past is nothing, and no pause
    /// is held longer than the longest ChartHero can ask for.
    pub fn pause_until(&self, until: OffsetDateTime) {
        let left = until - OffsetDateTime::now_utc();
        if !left.is_positive() {
            return;
        }
        let left = Duration::try_from(left)
            .unwrap_or(retry::PAUSE_MAX)
            .min(retry::PAUSE_MAX);
        self.extend_pause(tokio::time::Instant::now() + left);
    }

    /// No request starts before `until`, nor before a later pause already set.
    fn extend_pause(&self, until: tokio::time::Instant) {
        let mut pause = self.inner.paused_until.lock().expect("pause lock");
        *pause = Some(pause.map_or(until, |p| p.max(until)));
    }

    /// Until when no request is sent, while a pause ChartHero asked for lasts: to the nearest
    /// second, as `Retry-After` counts, so that a pause kept and read back cycle after cycle does
    /// not drift with the conversions between clocks.
    pub fn paused_until(&self) -> Option<OffsetDateTime> {
        let until = (*self.inner.paused_until.lock().expect("pause lock"))?;
        let left = until.checked_duration_since(tokio::time::Instant::now())?;
        Some(wall_clock_in(left))
    }

    /// The process's counters (requests, limiter waits, cycles).
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.inner.metrics
    }

    /// How long since the last response arrived (or the client was made).
    pub fn idle_for(&self) -> Duration {
        self.inner.last_activity.lock().expect("activity lock").elapsed()
    }

    /// Retries spent since [`Client::begin_cycle`].
    pub fn retries_used(&self) -> u64 {
        self.inner.budget.used()
    }

    /// Runs `decode` over the body of a GET, retrying the whole exchange on transient failure.
    async fn call<T>(
        &self,
        route: Route,
        url: Url,
        decode: impl Fn(&[u8]) -> Result<T, ApiError>,
    ) -> Result<T, ApiError> {
        let inner = &self.inner;
        retry::retrying(&inner.retry, &inner.budget, &inner.rng, || {
            let url = url.clone();
            let decode = &decode;
            async move { decode(&self.get(route, url, true).await?) }
        })
        .await
    }

    /// One page of the encounter list.
    pub async fn list_encounters(&self, q: &ListQuery) -> Result<EncounterPage, ApiError> {
        let route = Route::ListEncounters;
        let mut url = self.url(&["encounters"]);
        {
            let mut pairs = url.query_pairs_mut();
            pairs.append_pair("limit", &q.limit.to_string());
            pairs.append_pair("offset", &q.offset.to_string());
            pairs.append_pair(
                "sort_order",
                match q.sort {
                    SortOrder::Asc => "asc",
                    SortOrder::Desc => "desc",
                },
            );
            if let Some(t) = q.start_at {
                pairs.append_pair("start_at", &t.to_string());
            }
            if let Some(t) = q.end_at {
                pairs.append_pair("end_at", &t.to_string());
            }
        }
        self.call(route, url, |body| {
            let page: RawPage = serde_json::from_slice(body).map_err(|e| decode(route, &e))?;
            let items = page
                .items
                .iter()
                .map(|raw| Encounter::from_raw(raw).map_err(|e| decode_item(route, raw, &e)))
                .collect::<Result<Vec<_>, _>>()?;
            Ok(EncounterPage {
                items,
                limit: page.limit,
                offset: page.offset,
                total: page.total,
            })
        })
        .await
    }

    /// `GET /encounters/{id}`.
    pub async fn encounter(&self, encounter_id: &str) -> Result<Encounter, ApiError> {
        let route = Route::Encounter;
        self.call(route, self.url(&["encounters", encounter_id]), |body| {
            let env: EncounterEnvelope = serde_json::from_slice(body).map_err(|e| decode(route, &e))?;
            Encounter::from_raw(env.encounter).map_err(|e| decode_item(route, env.encounter, &e))
        })
        .await
    }

    /// `GET /encounters/{id}/documents/{doc}`. Types other than notes and ambient transcripts
    /// come back from the server as 400 `unsupported_document_type`.
    pub async fn document(&self, encounter_id: &str, document_id: &str) -> Result<DocumentDetail, ApiError> {
        let route = Route::Document;
        let url = self.url(&["encounters", encounter_id, "documents", document_id]);
        self.call(route, url, |body| {
            let env: DocumentEnvelope = serde_json::from_slice(body).map_err(|e| decode(route, &e))?;
            let doc = env.document.get();
            let probe: SchemaTypeProbe = serde_json::from_str(doc).map_err(|e| decode(route, &e))?;
            match probe.schema_type.as_str() {
                "document" => serde_json::from_str(doc).map(DocumentDetail::Note),
                "ambient_transcript" => serde_json::from_str(doc).map(DocumentDetail::Ambient),
                other => {
                    return Err(ApiError {
                        route,
                        kind: ApiErrorKind::Decode(format!(
                            "document {document_id} has schema_type {other:?}, which the document route does not serve"
                        )),
                    });
                }
            }
            .map_err(|e| decode(route, &e))
        })
        .await
    }

    /// `GET .../transcript`: the finalized turns of an ambient transcript.
    pub async fn transcript(
        &self,
        encounter_id: &str,
        document_id: &str,
    ) -> Result<TranscriptResponse, ApiError> {
        let route = Route::Transcript;
        let url = self.url(&["encounters", encounter_id, "documents", document_id, "transcript"]);
        self.call(route, url, |body| {
            serde_json::from_slice(body).map_err(|e| decode(route, &e))
        })
        .await
    }

    /// `GET .../audio`: a signed, short-lived recording URL.
    pub async fn audio(&self, encounter_id: &str, document_id: &str) -> Result<AudioLink, ApiError> {
        let route = Route::Audio;
        let url = self.url(&["encounters", encounter_id, "documents", document_id, "audio"]);
        self.call(route, url, |body| {
            serde_json::from_slice(body).map_err(|e| decode(route, &e))
        })
        .await
    }

    /// Downloads a signed recording URL into `dest` (created or truncated), under the same rate
    /// limit and retries as API requests but without the bearer key, which belongs to the API
    /// host only. Refuses to use the URL at or after `expires_at`. Returns the size and SHA-256.
    pub async fn download(
        &self,
        link: &SignedUrl,
        expires_at: OffsetDateTime,
        dest: &Path,
        max_bytes: u64,
    ) -> Result<(u64, [u8; 32]), ApiError> {
        let route = Route::Recording;
        let url = Url::parse(link.expose()).map_err(|_| ApiError {
            route,
            kind: ApiErrorKind::Decode("the audio URL is not a valid URL".into()),
        })?;
        let inner = &self.inner;
        retry::retrying(&inner.retry, &inner.budget, &inner.rng, || {
            let url = url.clone();
            async move {
                if OffsetDateTime::now_utc() >= expires_at {
                    return Err(ApiError {
                        route,
                        kind: ApiErrorKind::LinkExpired,
                    });
                }
                let io = |e: std::io::Error| ApiError {
                    route,
                    kind: ApiErrorKind::LocalIo(e.to_string()),
                };
                let mut file = tokio::fs::File::create(dest).await.map_err(io)?;
                let mut hasher = Sha256::new();
                let mut resp = self.start(route, url, false).await?;
                let mut size = 0u64;
                while let Some(chunk) = resp.chunk().await.map_err(|e| fail(route, transport_kind(e)))? {
                    size += chunk.len() as u64;
                    if size > max_bytes {
                        return Err(fail(
                            route,
                            ApiErrorKind::BodyTooLarge {
                                limit: max_bytes as usize,
                            },
                        ));
                    }
                    hasher.update(&chunk);
                    file.write_all(&chunk).await.map_err(io)?;
                }
                file.sync_all().await.map_err(io)?;
                Ok((size, hasher.finalize().into()))
            }
        })
        .await
    }

    fn url(&self, segments: &[&str]) -> Url {
        let mut url = self.inner.api_root.clone();
        url.path_segments_mut()
            .expect("an http(s) URL always has path segments")
            .pop_if_empty()
            .extend(segments);
        url
    }

    /// Sends one GET under the rate limit and in-flight bound and returns the whole body of a
    /// success response.
    async fn get(&self, route: Route, url: Url, with_key: bool) -> Result<Vec<u8>, ApiError> {
        let mut resp = self.start(route, url, with_key).await?;
        let max = self.inner.max_body;
        if resp.content_length().is_some_and(|n| n > max as u64) {
            return Err(fail(route, ApiErrorKind::BodyTooLarge { limit: max }));
        }
        let mut body = Vec::with_capacity(resp.content_length().map_or(8 * 1024, |n| n as usize));
        while let Some(chunk) = resp.chunk().await.map_err(|e| fail(route, transport_kind(e)))? {
            if body.len() + chunk.len() > max {
                return Err(fail(route, ApiErrorKind::BodyTooLarge { limit: max }));
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    }

    /// Sends one GET and returns the response once its status is known to be a success. Every
    /// request of the process passes here: the 401 latch, the `Retry-After` pause, then the
    /// key's and the process's in-flight bounds and rate buckets (`budget`), in that order.
    async fn start(&self, route: Route, url: Url, with_key: bool) -> Result<reqwest::Response, ApiError> {
        if let Some(reason_code) = self.inner.refused.lock().expect("refused lock").clone() {
            return Err(fail(
                route,
                ApiErrorKind::Status {
                    status: 401,
                    reason_code,
                    field: None,
                    retry_after: None,
                },
            ));
        }
        // A pause ChartHero asked for while this request waited for its slot holds it too: it is
        // admitted again once the pause is over, never sent during it.
        let (slot, waited) = loop {
            self.wait_out_pause(route).await?;
            let admitted = self.inner.key_budget.admit().await;
            if self.pause_left().is_none() {
                break admitted;
            }
        };
        self.inner.metrics.record_limiter_wait(waited);
        let mut headers = HeaderMap::new();
        if with_key {
            headers.insert(AUTHORIZATION, self.inner.auth.clone());
        }
        let started = std::time::Instant::now();
        let result = self.send(route, url, headers).await;
        *self.inner.last_activity.lock().expect("activity lock") = std::time::Instant::now();
        let status = match &result {
            Ok(r) => r.status().as_u16(),
            Err(e) => e.status().unwrap_or(0),
        };
        self.inner.metrics.record_request(route.as_str(), status);
        tracing::trace!(
            route = route.as_str(),
            status,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "request"
        );
        // The signed recording URLs are another host's: its answers say nothing of the key's.
        if with_key {
            match &result {
                Ok(_) => {
                    if let Some(rate) = self.inner.key_budget.answered() {
                        self.inner.metrics.record_rate(rate, false);
                    }
                }
                Err(e) if e.status() == Some(429) => {
                    if let Some(rate) = self.inner.key_budget.refused(slot.admitted) {
                        self.inner.metrics.record_rate(rate, true);
                        self.rate_lowered(route, rate);
                    }
                }
                Err(_) => {}
            }
        }
        drop(slot);
        if let Err(e) = &result {
            if e.is_auth() && with_key {
                *self.inner.refused.lock().expect("refused lock") = Some(e.reason_code().map(str::to_owned));
            }
            if let (Some(429 | 503), Some(after)) = (e.status(), e.retry_after()) {
                // The server asked everyone to wait, not just this request: the whole wait,
                // however long (up to a day). A wait longer than a request is held for ends
                // this request, and every later one fails at once until the pause is over.
                let after = after.min(retry::PAUSE_MAX);
                self.extend_pause(tokio::time::Instant::now() + after);
                if after > self.inner.retry.retry_after_max {
                    tracing::warn!(
                        route = route.as_str(),
                        status = e.status(),
                        retry_after_s = after.as_secs(),
                        "ChartHero asked for a pause longer than a request waits; no request is sent until it is over"
                    );
                    return Err(paused(route, after));
                }
            }
        }
        result
    }

    /// How long the `Retry-After` pause ChartHero asked for still lasts, if it does.
    fn pause_left(&self) -> Option<std::time::Duration> {
        let until = (*self.inner.paused_until.lock().expect("pause lock"))?;
        let left = until.saturating_duration_since(tokio::time::Instant::now());
        (!left.is_zero()).then_some(left)
    }

    /// Waits out the `Retry-After` pause, or fails at once when it is longer than a request
    /// waits.
    async fn wait_out_pause(&self, route: Route) -> Result<(), ApiError> {
        if let Some(left) = self.pause_left() {
            if left > self.inner.retry.retry_after_max {
                return Err(paused(route, left));
            }
            tokio::time::sleep(left).await;
        }
        Ok(())
    }

    /// A refusal (429) lowered the key's rate to `rate`: said once per process at warn level,
    /// for the operator who configured more than ChartHero takes.
    fn rate_lowered(&self, route: Route, rate: f64) {
        let message = "ChartHero refused a request (429): this key's rate is lowered and comes back up as \
                       requests are answered; a requests_per_second the server takes spends no request on refusals";
        let rate = (rate * 100.0).round() / 100.0;
        if self
            .inner
            .rate_warned
            .swap(true, std::sync::atomic::Ordering::Relaxed)
        {
            tracing::debug!(route = route.as_str(), requests_per_second = rate, "{message}");
        } else {
            tracing::warn!(route = route.as_str(), requests_per_second = rate, "{message}");
        }
    }

    async fn send(&self, route: Route, url: Url, headers: HeaderMap) -> Result<reqwest::Response, ApiError> {
        let resp = self
            .inner
            .http
            .get(url)
            .headers(headers)
            .send()
            .await
            .map_err(|e| fail(route, transport_kind(e)))?;
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        let retry_after = resp
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| parse_retry_after(v, SystemTime::now()));
        // Error bodies are small; read at most 64 KiB of one to find its reason_code.
        let mut resp = resp;
        let mut body = Vec::new();
        while let Ok(Some(chunk)) = resp.chunk().await {
            body.extend_from_slice(&chunk);
            if body.len() > 64 * 1024 {
                break;
            }
        }
        let parsed: Option<ErrorBody> = serde_json::from_slice(&body).ok();
        let (reason_code, field) = parsed.map_or((None, None), |b| (b.reason_code, b.field));
        Err(fail(
            route,
            ApiErrorKind::Status {
                status: status.as_u16(),
                reason_code,
                field,
                retry_after,
            },
        ))
    }
}

fn fail(route: Route, kind: ApiErrorKind) -> ApiError {
    ApiError { route, kind }
}

fn transport_kind(e: reqwest::Error) -> ApiErrorKind {
    if e.is_timeout() {
        return ApiErrorKind::Timeout;
    }
    // The URL may hold IDs we do not want repeated in every log line, and for audio downloads a
    // signed token: strip it and describe the cause chain instead.
    let e = e.without_url();
    let mut msg = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        source = s.source();
    }
    ApiErrorKind::Transport(msg)
}

/// The error of a request not sent (or ended) because the server asked for no requests for
/// `left` more.
fn paused(route: Route, left: Duration) -> ApiError {
    ApiError {
        route,
        kind: ApiErrorKind::Paused {
            until: wall_clock_in(left),
        },
    }
}

/// The wall-clock instant `left` from now, to the nearest second (how `Retry-After` counts), so
/// that a pause reads the same in an error, in `status` and after being kept and read back.
fn wall_clock_in(left: Duration) -> OffsetDateTime {
    let at = OffsetDateTime::now_utc() + left + Duration::from_millis(500);
    at.replace_nanosecond(0).unwrap_or(at)
}

fn decode(route: Route, e: &serde_json::Error) -> ApiError {
    ApiError {
        route,
        kind: ApiErrorKind::Decode(error::scrub_json_error(e)),
    }
}

/// A decode error for one record, naming its `encounter_id` when the record has one.
fn decode_item(route: Route, raw: &RawValue, e: &serde_json::Error) -> ApiError {
    #[derive(serde::Deserialize)]
    struct Id {
        encounter_id: Option<String>,
    }
    let id = serde_json::from_str::<Id>(raw.get())
        .ok()
        .and_then(|i| i.encounter_id);
    let what = id.map_or_else(
        || "an encounter without encounter_id".to_owned(),
        |id| format!("encounter {id}"),
    );
    ApiError {
        route,
        kind: ApiErrorKind::Decode(format!("{what}: {}", error::scrub_json_error(e))),
    }
}

/// Parses `Retry-After` as delta-seconds or an HTTP-date, relative to `now`.
/// A date in the past means "now" (zero delay).
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let when = httpdate::parse_http_date(value).ok()?;
    Some(when.duration_since(now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_accepts_seconds_and_http_dates() {
        let now = httpdate::parse_http_date("Sun, 22 Nov 2026 06:00:00 GMT").unwrap();
        assert_eq!(parse_retry_after("7", now), Some(Duration::from_secs(7)));
        assert_eq!(
            parse_retry_after("Sun, 22 Nov 2026 06:00:30 GMT", now),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            parse_retry_after("Sun, 22 Nov 2026 05:00:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon", now), None);
    }

    /// A pause read back from the warehouse: one in the past is none, the later of two holds,
    /// and none is held longer than the longest ChartHero can ask for.
    #[test]
    fn a_kept_pause_is_taken_within_bounds() {
        let config = crate::config::RawConfig::default().validate().unwrap();
        let key = crate::secret::ApiKey::new("ch_sk_test").unwrap();
        let client = Client::new(&config.api, &config.limits, &key).unwrap();
        let now = OffsetDateTime::now_utc();
        let near = |t: Option<OffsetDateTime>, want: OffsetDateTime| {
            t.is_some_and(|t| (t - want).abs() < time::Duration::seconds(5))
        };
        client.pause_until(now - time::Duration::seconds(1));
        assert_eq!(client.paused_until(), None);
        client.pause_until(now + time::Duration::minutes(10));
        client.pause_until(now + time::Duration::minutes(5));
        assert!(near(client.paused_until(), now + time::Duration::minutes(10)));
        assert_eq!(client.paused_until().map(|t| t.nanosecond()), Some(0));
        client.pause_until(now + time::Duration::days(30));
        assert!(near(client.paused_until(), now + time::Duration::days(1)));
        // The error a paused request fails with names the same whole second.
        let ApiErrorKind::Paused { until } =
            paused(Route::ListEncounters, Duration::from_millis(90_250)).kind
        else {
            panic!("not a pause");
        };
        assert!(near(Some(until), now + time::Duration::seconds(90)));
        assert_eq!(until.nanosecond(), 0);
    }
}
