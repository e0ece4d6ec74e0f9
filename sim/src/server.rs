//! The HTTP side: the accept loop, one hyper HTTP/1 connection per socket (keep-alive on), and
//! the request pipeline — rate limit → fault injection → routing → authentication, route
//! enablement and scopes → query validation → list hook → resource lookup → rendering.
//!
//! Each connection is raced against its own kill token (used to drop connections on purpose)
//! and the server's shutdown token; dropping the hyper connection future closes the socket.
//! This module owns no data: it works on the shared state defined in `state`, reads the store
//! through short read locks and renders outside them where content has to be derived. It calls
//! no control method of `simulator` (only a list hook may). No TLS, no HTTP/2.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{ALLOW, AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::content;
use crate::faults::RateVerdict;
use crate::id::{Id, fnv64, mix64};
use crate::model::{Fault, ListRequest, Route, Visibility};
use crate::query::{self, QueryError};
use crate::render::{self, DocDetail, MEDIA_URL_LIFETIME_SECS};
use crate::state::{Inner, Simulator, lock, read};
use crate::store::Direction;
use crate::store::DocClass;
use crate::timestamp::{nanos, now_nanos};

/// How long a `DropMidBody` connection stays open after the partial body was handed to hyper,
/// so those bytes reach the socket before it closes.
const MID_BODY_GRACE: Duration = Duration::from_millis(20);

pub(crate) async fn serve(listener: TcpListener, sim: Simulator) {
    let shutdown = sim.inner.shutdown.clone();
    loop {
        let stream = tokio::select! {
            () = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(_) => {
                    // Typically EMFILE during a connection storm; back off instead of spinning.
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    continue;
                }
            },
        };
        // Small JSON responses must not wait for Nagle's algorithm.
        let _ = stream.set_nodelay(true);
        tokio::spawn(serve_connection(stream, sim.clone()));
    }
}

async fn serve_connection(stream: TcpStream, sim: Simulator) {
    let kill = CancellationToken::new();
    let shutdown = sim.inner.shutdown.clone();
    let service = {
        let kill = kill.clone();
        service_fn(move |request| handle(sim.clone(), kill.clone(), request))
    };
    let mut builder = http1::Builder::new();
    // No timer is configured: idle keep-alive connections stay open for as long as the client
    // wants, even in paused-clock tests.
    builder.keep_alive(true).header_read_timeout(None);
    let connection = builder.serve_connection(TokioIo::new(stream), service);
    tokio::select! {
        _ = connection => {}
        () = kill.cancelled() => {}
        () = shutdown.cancelled() => {}
    }
}

/// A response body: whole, or a prefix after which the connection is killed.
pub(crate) enum SimBody {
    Full(Option<Bytes>),
    Partial {
        prefix: Option<Bytes>,
        kill: Option<CancellationToken>,
    },
}

impl Body for SimBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.get_mut() {
            SimBody::Full(data) => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            SimBody::Partial { prefix, kill } => {
                if let Some(data) = prefix.take() {
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                if let Some(kill) = kill.take() {
                    tokio::spawn(async move {
                        tokio::time::sleep(MID_BODY_GRACE).await;
                        kill.cancel();
                    });
                }
                // Never completes: the connection is dropped underneath it.
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self, SimBody::Full(None))
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            SimBody::Full(Some(data)) => SizeHint::with_exact(data.len() as u64),
            SimBody::Full(None) => SizeHint::with_exact(0),
            SimBody::Partial { .. } => SizeHint::default(),
        }
    }
}

/// A complete answer before it becomes a hyper response.
struct Reply {
    status: u16,
    content_type: &'static str,
    body: Bytes,
    retry_after: Option<String>,
    allow_get: bool,
}

impl Reply {
    fn new(status: u16, content_type: &'static str, body: Vec<u8>) -> Reply {
        Reply {
            status,
            content_type,
            body: Bytes::from(body),
            retry_after: None,
            allow_get: false,
        }
    }

    fn json(body: Vec<u8>) -> Reply {
        Reply::new(200, "application/json", body)
    }
}

/// The `error` category for a status. Clients branch on `reason_code`; the category only has to
/// look plausible (the vendor's own example uses `api_key_validation_failed` for `invalid_limit`).
fn category(status: u16) -> &'static str {
    match status {
        400 | 401 | 422 => "api_key_validation_failed",
        403 => "access_denied",
        404 => "not_found",
        405 => "method_not_allowed",
        409 => "conflict",
        429 => "rate_limited",
        500..=599 => "service_unavailable",
        _ => "error",
    }
}

fn error(inner: &Inner, status: u16, reason_code: Option<&str>, message: &str, field: Option<&str>) -> Reply {
    let body = render::error_body(category(status), reason_code, message, field, inner.render_opts());
    Reply::new(status, "application/json", body)
}

fn query_error(inner: &Inner, err: QueryError) -> Reply {
    error(
        inner,
        err.status,
        Some(err.reason_code),
        &err.message,
        err.field.as_deref(),
    )
}

fn not_found(inner: &Inner) -> Reply {
    error(
        inner,
        404,
        Some("encounter_not_found"),
        "Encounter not found.",
        None,
    )
}

fn unsupported_document(inner: &Inner, route: &str) -> Reply {
    error(
        inner,
        400,
        Some("unsupported_document_type"),
        &format!("This document type is not served by the {route} route."),
        None,
    )
}

/// The kind of page a proxy or load balancer answers with when the upstream fails.
fn html_error(status: u16) -> Reply {
    let reason = StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("Error");
    let html = format!(
        "<html>\r\n<head><title>{status} {reason}</title></head>\r\n<body>\r\n\
         <center><h1>{status} {reason}</h1></center>\r\n<hr><center>nginx</center>\r\n\
         </body>\r\n</html>\r\n"
    );
    Reply::new(status, "text/html", html.into_bytes())
}

/// A routed API path.
struct Target<'a> {
    route: Route,
    encounter_id: &'a str,
    document_id: &'a str,
}

fn route(path: &str) -> Option<Target<'_>> {
    let rest = path.strip_prefix("/external/v1/encounters")?;
    let target = |route, encounter_id, document_id| {
        Some(Target {
            route,
            encounter_id,
            document_id,
        })
    };
    if rest.is_empty() {
        return target(Route::List, "", "");
    }
    let segments: Vec<&str> = rest.strip_prefix('/')?.split('/').collect();
    if segments.iter().any(|s| s.is_empty()) {
        return None;
    }
    match segments.as_slice() {
        [enc] => target(Route::Encounter, enc, ""),
        [enc, "documents", doc] => target(Route::Document, enc, doc),
        [enc, "documents", doc, "transcript"] => target(Route::Transcript, enc, doc),
        [enc, "documents", doc, "audio"] => target(Route::Audio, enc, doc),
        _ => None,
    }
}

async fn handle(
    sim: Simulator,
    kill: CancellationToken,
    request: Request<Incoming>,
) -> Result<Response<SimBody>, Infallible> {
    // On a host of several organizations, the request belongs to the one whose key it carries
    // (a media URL to the one holding the document); the host counts every API request.
    let sim = match sim.inner.host.clone() {
        None => sim,
        Some(host) => {
            let path = request.uri().path();
            let tenant = match path.strip_prefix("/media/") {
                Some(file) => media_tenant(&host, file, request.uri().query()),
                None => {
                    host.requests.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let verdict = lock(&host.rate).arrive(tokio::time::Instant::now());
                    if matches!(verdict, RateVerdict::Violation { .. }) {
                        host.rate_violations
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    host.tenant_for(request.headers().get(AUTHORIZATION).map(HeaderValue::as_bytes))
                }
            };
            tenant.unwrap_or(sim)
        }
    };
    let inner = &*sim.inner;
    let path = request.uri().path();
    if let Some(file) = path.strip_prefix("/media/") {
        {
            let mut stats = lock(&inner.stats);
            stats.requests += 1;
            stats.media += 1;
        }
        let reply = media(inner, request.method(), file, request.uri().query());
        return Ok(respond(inner, reply));
    }
    let target = route(path);
    {
        let mut stats = lock(&inner.stats);
        stats.requests += 1;
        match &target {
            Some(t) => *stats.by_route.entry(t.route).or_default() += 1,
            None => stats.unrouted += 1,
        }
    }

    let verdict = lock(&inner.rate).arrive(tokio::time::Instant::now());
    if let RateVerdict::Violation { enforce } = verdict {
        lock(&inner.stats).rate_violations += 1;
        if enforce {
            let mut reply = error(
                inner,
                429,
                Some("rate_limit_exceeded"),
                "Too many requests; retry later.",
                None,
            );
            reply.retry_after = Some("1".to_owned());
            return Ok(respond(inner, reply));
        }
    }

    let fault = lock(&inner.faults).next(target.as_ref().map(|t| t.route));
    if fault.is_some() {
        lock(&inner.stats).faults_injected += 1;
    }
    match &fault {
        Some(Fault::Status {
            status,
            reason_code,
            retry_after,
        }) => {
            let message = "Injected failure.";
            let mut reply = error(inner, *status, reason_code.as_deref(), message, None);
            reply.retry_after.clone_from(retry_after);
            return Ok(respond(inner, reply));
        }
        Some(Fault::HtmlStatus(status)) => return Ok(respond(inner, html_error(*status))),
        Some(Fault::Delay(delay)) => {
            tokio::select! {
                () = tokio::time::sleep(*delay) => {}
                () = inner.shutdown.cancelled() => {}
            }
        }
        Some(Fault::Hang) => return Ok(std::future::pending().await),
        Some(Fault::DropBeforeResponse) => {
            kill.cancel();
            return Ok(std::future::pending().await);
        }
        Some(Fault::DropMidBody | Fault::TruncatedJson | Fault::EmptyList) | None => {}
    }

    let is_list = target.as_ref().is_some_and(|t| t.route == Route::List);
    let reply = match target {
        None => error(inner, 404, Some("not_found"), "No such route.", None),
        Some(_) if request.method() != Method::GET => method_not_allowed(inner),
        Some(target) => {
            let authorization = request.headers().get(AUTHORIZATION).map(HeaderValue::as_bytes);
            answer(&sim, &target, authorization, request.uri().query())
        }
    };

    Ok(match fault {
        Some(Fault::DropMidBody) => {
            let full = reply.body.len();
            let partial = Reply {
                body: reply.body.slice(..full / 2),
                ..reply
            };
            let mut response = respond(inner, partial);
            let body = std::mem::replace(response.body_mut(), SimBody::Full(None));
            let SimBody::Full(prefix) = body else {
                unreachable!("respond builds full bodies")
            };
            *response.body_mut() = SimBody::Partial {
                prefix,
                kill: Some(kill),
            };
            response
                .headers_mut()
                .insert(CONTENT_LENGTH, HeaderValue::from(full));
            response
        }
        Some(Fault::EmptyList) if reply.status == 200 && is_list => {
            let mut page: serde_json::Value =
                serde_json::from_slice(&reply.body).expect("a list reply is JSON");
            page["items"] = serde_json::Value::Array(Vec::new());
            page["total"] = 0.into();
            let emptied = Reply {
                body: serde_json::to_vec(&page)
                    .expect("serializing to memory cannot fail")
                    .into(),
                ..reply
            };
            respond(inner, emptied)
        }
        Some(Fault::TruncatedJson) => {
            let half = reply.body.len() / 2;
            let truncated = Reply {
                status: 200,
                content_type: "application/json",
                body: reply.body.slice(..half),
                retry_after: None,
                allow_get: false,
            };
            respond(inner, truncated)
        }
        _ => respond(inner, reply),
    })
}

fn respond(inner: &Inner, reply: Reply) -> Response<SimBody> {
    *lock(&inner.stats).by_status.entry(reply.status).or_default() += 1;
    let status = StatusCode::from_u16(reply.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = Response::new(SimBody::Full(Some(reply.body)));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(reply.content_type));
    if let Some(value) = reply.retry_after.and_then(|v| HeaderValue::from_str(&v).ok()) {
        headers.insert(RETRY_AFTER, value);
    }
    if reply.allow_get {
        headers.insert(ALLOW, HeaderValue::from_static("GET"));
    }
    response
}

/// Everything after routing: access checks, query validation, lookup, rendering.
fn answer(sim: &Simulator, target: &Target<'_>, authorization: Option<&[u8]>, query: Option<&str>) -> Reply {
    let inner = &*sim.inner;
    if let Err(denied) = read(&inner.access).authorize(authorization, target.route) {
        return error(
            inner,
            denied.status,
            Some(&denied.reason_code),
            &denied.message,
            None,
        );
    }
    if target.route == Route::List {
        let precision = *read(&inner.query_precision);
        return match query::parse_list(query, precision) {
            Ok(params) => list(sim, params),
            Err(err) => query_error(inner, err),
        };
    }
    if let Err(err) = query::reject_any(query) {
        return query_error(inner, err);
    }
    match target.route {
        Route::Encounter => encounter(inner, target.encounter_id),
        Route::Document => document(inner, target),
        Route::Transcript => transcript(inner, target),
        Route::Audio => audio(inner, target),
        Route::List => unreachable!("handled above"),
    }
}

fn list(sim: &Simulator, params: query::ListParams) -> Reply {
    let inner = &*sim.inner;
    let seq = inner.list_seq.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    if params.limit == 1 {
        lock(&inner.stats).list_probe_requests += 1;
    }
    // Cloned out so the hook runs with no simulator lock held.
    let hook = read(&inner.hook).clone();
    if let Some(hook) = hook {
        hook(
            sim,
            &ListRequest {
                seq,
                limit: params.limit,
                offset: params.offset,
                start_at: params.start_at,
                end_at: params.end_at,
                sort_desc: params.sort_desc,
            },
        );
    }
    let opts = inner.render_opts();
    // The server's own page size, echoed in the envelope.
    let limit = match *read(&inner.page_cap) {
        None => params.limit,
        Some(cap) if cap.varying => {
            let most = u64::from(params.limit.min(cap.max));
            1 + (crate::id::mix64(inner.seed ^ seq) % most) as u32
        }
        Some(cap) => params.limit.min(cap.max),
    };
    let store = read(&inner.store);
    let (start, end) = (params.start_at.map(nanos), params.end_at.map(nanos));
    if inner.filter_after_limit {
        let page = store.page_then_filter(
            start,
            end,
            params.offset as usize,
            limit as usize,
            params.sort_desc,
        );
        return Reply::json(render::list_body(
            &store,
            &page.slots,
            limit,
            params.offset,
            page.total,
            opts,
        ));
    }
    let page = store.page(
        start,
        end,
        params.offset as usize,
        limit as usize,
        match (params.sort_desc, inner.desc_ties_ascending) {
            (false, _) => Direction::Asc,
            (true, false) => Direction::Desc,
            (true, true) => Direction::DescTiesAsc,
        },
    );
    let unlisted = if inner
        .total_counts_unavailable
        .load(std::sync::atomic::Ordering::Relaxed)
    {
        store.unavailable_in(params.start_at.map(nanos), params.end_at.map(nanos))
    } else {
        0
    };
    Reply::json(render::list_body(
        &store,
        &page.slots,
        limit,
        params.offset,
        page.total + unlisted,
        opts,
    ))
}

/// Resolves a visible encounter, or the reply for a missing or unavailable one.
fn visible_slot(inner: &Inner, store: &crate::store::Store, encounter_id: &str) -> Result<u32, Reply> {
    let slot = store.slot(encounter_id).ok_or_else(|| not_found(inner))?;
    match store.rec(slot).visibility {
        Visibility::Visible => Ok(slot),
        Visibility::Removed => Err(not_found(inner)),
        Visibility::Unavailable(why) => Err(error(
            inner,
            403,
            Some(why.reason_code()),
            "This encounter is not available to this API key.",
            None,
        )),
    }
}

/// Resolves a document of a visible encounter, or the reply for whatever is missing.
fn visible_document<'s>(
    inner: &Inner,
    store: &'s crate::store::Store,
    target: &Target<'_>,
) -> Result<(&'s crate::store::EncRec, crate::store::DocRec), Reply> {
    let rec = store.rec(visible_slot(inner, store, target.encounter_id)?);
    let doc = rec
        .doc(target.document_id)
        .copied()
        .ok_or_else(|| not_found(inner))?;
    Ok((rec, doc))
}

fn encounter(inner: &Inner, encounter_id: &str) -> Reply {
    let opts = inner.render_opts();
    let store = read(&inner.store);
    match visible_slot(inner, &store, encounter_id) {
        Ok(slot) => Reply::json(render::encounter_body(&store, slot, opts)),
        Err(reply) => reply,
    }
}

fn document(inner: &Inner, target: &Target<'_>) -> Reply {
    let opts = inner.render_opts();
    let (detail, note) = {
        let store = read(&inner.store);
        let (rec, doc) = match visible_document(inner, &store, target) {
            Ok(found) => found,
            Err(reply) => return reply,
        };
        if doc.class == DocClass::Unsupported {
            return unsupported_document(inner, "document detail");
        }
        if doc.class == DocClass::Note && lagging(inner, &doc) {
            return not_found(inner);
        }
        let text = |sym| store.syms.get(sym).to_owned();
        let detail = DocDetail {
            encounter_id: rec.id,
            doc,
            schema_type: text(doc.schema_type),
            title: doc.title.map(text),
            status: doc.status.map(text),
        };
        let note = (doc.class == DocClass::Note).then(|| store.note_text(&doc));
        (detail, note)
    };
    // Note text is derived after the lock is released.
    Reply::json(match note {
        Some(note) => render::note_body(&detail, &note.into_text(&detail.doc.id), opts),
        None => render::ambient_body(&detail, opts),
    })
}

/// Whether the document's routes do not know it yet ([`crate::SimOptions::document_lag`]).
fn lagging(inner: &Inner, doc: &crate::store::DocRec) -> bool {
    let lag = inner.document_lag_ns.load(std::sync::atomic::Ordering::Relaxed);
    lag > 0 && now_nanos().saturating_sub(doc.created) < lag
}

fn transcript(inner: &Inner, target: &Target<'_>) -> Reply {
    let opts = inner.render_opts();
    let (params, encounter_id, doc) = {
        let store = read(&inner.store);
        let (rec, doc) = match visible_document(inner, &store, target) {
            Ok(found) => found,
            Err(reply) => return reply,
        };
        (store.params, rec.id, doc)
    };
    if doc.class != DocClass::Ambient {
        return unsupported_document(inner, "transcript");
    }
    if lagging(inner, &doc) {
        return not_found(inner);
    }
    let Some(audio_ds) = doc.audio_ds.filter(|_| doc.is_final) else {
        // Undocumented upstream; 409 says "this resource exists but is not in a servable state
        // yet", which a client should treat as "retry on a later cycle", not as a removal.
        return error(
            inner,
            409,
            Some("transcript_not_ready"),
            "The transcript is not finalized yet.",
            None,
        );
    };
    // Deriving (up to ~2 MB) and rendering happen without any lock.
    let transcript = content::transcript(&params, &doc.id, audio_ds, doc.large);
    Reply::json(render::transcript_body(
        encounter_id.as_str(),
        doc.id.as_str(),
        &transcript,
        opts,
    ))
}

fn media_token(inner: &Inner, document_id: &str, expires: i64) -> String {
    let base = inner.media_secret ^ fnv64(document_id.as_bytes()) ^ expires as u64;
    format!(
        "{:016x}{:016x}",
        mix64(base),
        mix64(base.rotate_left(32) ^ 0x5167)
    )
}

fn audio(inner: &Inner, target: &Target<'_>) -> Reply {
    let opts = inner.render_opts();
    let doc = {
        let store = read(&inner.store);
        match visible_document(inner, &store, target) {
            Ok((_, doc)) => doc,
            Err(reply) => return reply,
        }
    };
    if doc.class != DocClass::Ambient {
        return unsupported_document(inner, "audio");
    }
    if lagging(inner, &doc) {
        return not_found(inner);
    }
    let expires = now_nanos().div_euclid(1_000_000_000) + MEDIA_URL_LIFETIME_SECS;
    let document_id = doc.id.as_str();
    let url = format!(
        "{}/media/{document_id}.wav?token={}&expires={expires}",
        inner.base_url,
        media_token(inner, document_id, expires)
    );
    Reply::json(render::audio_body(&url, expires * 1_000_000_000, opts))
}

/// 405 with `Allow: GET`: every route of the API and the media route are GET only.
fn method_not_allowed(inner: &Inner) -> Reply {
    let mut reply = error(
        inner,
        405,
        Some("method_not_allowed"),
        "Only GET is supported.",
        None,
    );
    reply.allow_get = true;
    reply
}

/// The `token` and `expires` of a signed media URL's query, each if present and well-formed.
fn signature(query: Option<&str>) -> (Option<String>, Option<i64>) {
    let mut token = None;
    let mut expires = None;
    for (key, value) in url::form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        match &*key {
            "token" => token = Some(value.into_owned()),
            "expires" => expires = value.parse::<i64>().ok(),
            _ => {}
        }
    }
    (token, expires)
}

/// The organization of a host that signed this media URL (its token matches that
/// organization's secret).
fn media_tenant(host: &crate::state::Host, file: &str, query: Option<&str>) -> Option<Simulator> {
    let document_id = file.strip_suffix(".wav")?;
    let (token, expires) = signature(query);
    let (token, expires) = (token?, expires?);
    host.tenants()
        .into_iter()
        .find(|s| media_token(&s.inner, document_id, expires) == token)
}

/// The signed media URL route (not part of the API: no bearer, no rate limit, no faults).
fn media(inner: &Inner, method: &Method, file: &str, query: Option<&str>) -> Reply {
    let forbidden = |reason: &str, message: &str| error(inner, 403, Some(reason), message, None);
    if method != Method::GET {
        return method_not_allowed(inner);
    }
    let Some(document_id) = file.strip_suffix(".wav").filter(|d| Id::parse(d).is_some()) else {
        return error(inner, 404, Some("not_found"), "No such recording.", None);
    };
    let (Some(token), Some(expires)) = signature(query) else {
        return forbidden("invalid_signature", "The signed URL is incomplete.");
    };
    if token != media_token(inner, document_id, expires) {
        return forbidden("invalid_signature", "The signed URL signature does not match.");
    }
    if now_nanos() >= expires.saturating_mul(1_000_000_000) {
        return forbidden("signed_url_expired", "The signed URL has expired.");
    }
    Reply::new(200, "audio/wav", content::wav_bytes(inner.seed, document_id))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_match_exact_paths_only() {
        let r = |p| route(p).map(|t| (t.route, t.encounter_id, t.document_id));
        assert_eq!(r("/external/v1/encounters"), Some((Route::List, "", "")));
        assert_eq!(
            r("/external/v1/encounters/e1"),
            Some((Route::Encounter, "e1", ""))
        );
        assert_eq!(
            r("/external/v1/encounters/e1/documents/d1/transcript"),
            Some((Route::Transcript, "e1", "d1"))
        );
        assert_eq!(
            r("/external/v1/encounters/e1/documents/d1/audio"),
            Some((Route::Audio, "e1", "d1"))
        );
        for bad in [
            "/external/v1/encounters/",
            "/external/v1/encountersx",
            "/external/v1/encounters/e1/documents",
            "/external/v1/encounters/e1/documents/d1/other",
            "/external/v2/encounters",
        ] {
            assert!(route(bad).is_none(), "{bad}");
        }
    }
}
