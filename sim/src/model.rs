//! The simulator's public vocabulary: the observable data (`Encounter`, `Document`, `Transcript`),
//! the inputs tests use to change it (`NewEncounter`, `DocKind`, `KeyState`, `Unavailable`) and the
//! descriptions of misbehaviour (`FaultRule`, `Fault`, `RateLimit`) and of traffic (`Stats`,
//! `ListRequest`).
//!
//! These are plain values; their `Serialize` is the canonical wire shape with UTC timestamps
//! (through `timestamp`'s helpers). This module does not store, render or serve anything; the
//! compact in-memory representation lives in `store` and the wire JSON in `render`.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::time::Duration;

use serde::Serialize;
use time::{Date, OffsetDateTime};

/// An encounter as the simulator currently holds it, in the same shape as the API's encounter
/// object (timestamps as instants, `organization_id` included).
///
/// `Serialize` produces the canonical wire shape with UTC (`Z`) timestamps, which makes it handy
/// for comparing a warehouse with upstream in tests.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Encounter {
    /// Opaque encounter id, e.g. `enc_` followed by 12 base62 characters.
    pub encounter_id: String,
    /// The organization every key of this simulator belongs to.
    pub organization_id: String,
    /// `ambient` or `clinical_documentation` for generated data; any string for inserted data.
    pub encounter_type: String,
    /// Mostly `completed`; any string set through [`crate::Simulator::update_status`].
    pub status: String,
    /// Creation instant; the list route filters and sorts on it. The API may render it coarser
    /// (see [`crate::Simulator::rendered_created_at`]).
    #[serde(serialize_with = "crate::timestamp::serialize_instant")]
    pub created_at: OffsetDateTime,
    /// Last modification instant. Mutations bump it, except those that recompute or restore it
    /// and may move it backwards ([`crate::Simulator::move_document`],
    /// [`crate::Simulator::restore_status`], [`crate::Simulator::set_encounter_updated_at`]).
    #[serde(serialize_with = "crate::timestamp::serialize_instant")]
    pub updated_at: OffsetDateTime,
    /// When the visit took place.
    #[serde(serialize_with = "crate::timestamp::serialize_instant")]
    pub date_of_service: OffsetDateTime,
    /// The encounter's patient.
    pub patient: Patient,
    /// Document summaries, in the order the API lists them.
    pub documents: Vec<Document>,
}

/// A patient as embedded in an encounter.
///
/// Some generated patients have their demographics withheld: the API then sends only
/// `patient_id`, and here `first_name`, `last_name` and `date_of_birth` are all `None`.
/// A patient whose names are present but whose `date_of_birth` is `None` is sent with an explicit
/// `"date_of_birth": null`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Patient {
    /// Opaque patient id, shared by every encounter of that patient.
    pub patient_id: String,
    /// Given name; may contain non-ASCII characters and combining marks.
    pub first_name: Option<String>,
    /// Family name; may contain non-ASCII characters.
    pub last_name: Option<String>,
    /// Plain calendar date.
    #[serde(serialize_with = "crate::timestamp::serialize_opt_date")]
    pub date_of_birth: Option<Date>,
}

/// A document summary plus the timestamps the document detail route reports.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Document {
    /// Opaque document id (`doc_...`).
    pub document_id: String,
    /// `document` (markdown note), `ambient_transcript`, or an unsupported type such as `intake_form`.
    pub schema_type: String,
    /// Human title, e.g. `Progress note`.
    pub title: Option<String>,
    /// `completed`/`processing` for ambient transcripts, `None` for notes.
    pub status: Option<String>,
    /// `ambient` for ambient transcripts, `None` otherwise.
    pub workflow_variant: Option<String>,
    /// Recording length; `None` for notes and for ambient transcripts still processing.
    pub audio_duration_seconds: Option<f64>,
    /// Creation instant (served by document detail only).
    #[serde(serialize_with = "crate::timestamp::serialize_instant")]
    pub created_at: OffsetDateTime,
    /// Last modification instant (served by document detail only).
    #[serde(serialize_with = "crate::timestamp::serialize_instant")]
    pub updated_at: OffsetDateTime,
}

/// A finalized transcript of an ambient transcript document.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Transcript {
    /// Always `deepgram` in the simulator.
    pub provider: String,
    /// Equal to the document summary's `audio_duration_seconds`.
    pub audio_duration_seconds: Option<f64>,
    /// Turns in API order.
    pub turns: Vec<Turn>,
}

/// One speaker turn of a transcript.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Turn {
    /// `clinician`, `patient` or `family_member`.
    pub speaker: String,
    /// Start offset in seconds (two decimals at most).
    pub start: f64,
    /// End offset in seconds (two decimals at most).
    pub end: f64,
    /// What was said; some turns carry emoji, CJK and combining marks.
    pub text: String,
}

/// Whether an encounter is currently served, and if not, why.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Visibility {
    /// Listed and readable.
    Visible,
    /// Gone: absent from the list, detail answers 404 `encounter_not_found`.
    Removed,
    /// Absent from the list, detail answers 403 with the given reason.
    Unavailable(Unavailable),
}

/// Why an encounter is not available to the caller's key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Unavailable {
    /// 403 `cross_organization_denied`.
    CrossOrganization,
    /// 403 `demo_training_denied`.
    DemoTraining,
}

impl Unavailable {
    /// The `reason_code` the API answers with.
    pub fn reason_code(self) -> &'static str {
        match self {
            Unavailable::CrossOrganization => "cross_organization_denied",
            Unavailable::DemoTraining => "demo_training_denied",
        }
    }
}

/// Lifecycle state of an API key; anything but `Active` authenticates with a 401.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KeyState {
    /// The key works.
    Active,
    /// 401 `disabled_key`.
    Disabled,
    /// 401 `revoked_key`.
    Revoked,
    /// 401 `expired_key`.
    Expired,
}

/// The five API routes; usable as a map key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Route {
    /// `GET /encounters`
    List,
    /// `GET /encounters/{encounter_id}`
    Encounter,
    /// `GET /encounters/{encounter_id}/documents/{document_id}`
    Document,
    /// `GET .../documents/{document_id}/transcript`
    Transcript,
    /// `GET .../documents/{document_id}/audio`
    Audio,
}

impl Route {
    /// Every route, in declaration order.
    pub const ALL: [Route; 5] = [
        Route::List,
        Route::Encounter,
        Route::Document,
        Route::Transcript,
        Route::Audio,
    ];

    /// A short lowercase name (`list`, `encounter`, `document`, `transcript`, `audio`).
    pub fn as_str(self) -> &'static str {
        match self {
            Route::List => "list",
            Route::Encounter => "encounter",
            Route::Document => "document",
            Route::Transcript => "transcript",
            Route::Audio => "audio",
        }
    }
}

impl fmt::Display for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The kind of a document added through [`NewEncounter::docs`] or
/// [`crate::Simulator::add_document`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DocKind {
    /// `schema_type: "document"`, a markdown clinical note.
    Note,
    /// `schema_type: "ambient_transcript"` still processing: status `processing`, no duration,
    /// the transcript route answers 409 `transcript_not_ready`.
    Ambient,
    /// `schema_type: "ambient_transcript"` with a final transcript (status `completed`).
    AmbientFinal,
    /// A schema type the document detail route does not serve (e.g. `intake_form`).
    Unsupported,
}

/// An encounter to insert at run time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewEncounter {
    /// Creation instant; `date_of_service` is set to the same instant.
    pub created_at: OffsetDateTime,
    /// E.g. `ambient` or `clinical_documentation`; any string is stored as-is.
    pub encounter_type: String,
    /// E.g. `completed`; any string is stored as-is.
    pub status: String,
    /// An existing patient id (or a new id to create with generated demographics);
    /// `None` creates a new patient with a fresh id.
    pub patient_id: Option<String>,
    /// Documents to create, in order.
    pub docs: Vec<DocKind>,
}

impl NewEncounter {
    /// A completed ambient encounter with one finalized ambient transcript and a new patient.
    pub fn at(created_at: OffsetDateTime) -> NewEncounter {
        NewEncounter {
            created_at,
            encounter_type: "ambient".to_owned(),
            status: "completed".to_owned(),
            patient_id: None,
            docs: vec![DocKind::AmbientFinal],
        }
    }
}

/// Parameters of a list request that passed validation, as given to a [`crate::ListHook`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListRequest {
    /// 0-based count of valid list requests answered before this one (since start, not reset by
    /// `reset_stats`).
    pub seq: u64,
    /// Requested page size.
    pub limit: u32,
    /// Requested offset.
    pub offset: u32,
    /// Inclusive lower bound on `created_at`, as the server read it (truncated to microseconds
    /// under [`crate::QueryPrecision::TruncateMicros`]).
    pub start_at: Option<OffsetDateTime>,
    /// Exclusive upper bound on `created_at`, read like `start_at`.
    pub end_at: Option<OffsetDateTime>,
    /// `true` for `sort_order=desc` (the default).
    pub sort_desc: bool,
}

/// Request counters. `requests` counts everything the server received, API or media.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Every request received (API, media and unrouted).
    pub requests: u64,
    /// Requests per recognized API route.
    pub by_route: HashMap<Route, u64>,
    /// Requests to the signed media URL route.
    pub media: u64,
    /// Requests that matched no route (answered 404).
    pub unrouted: u64,
    /// Responses per HTTP status; requests answered by hanging or by dropping the connection
    /// before the status line are not counted here.
    pub by_status: BTreeMap<u16, u64>,
    /// API requests that exceeded the configured [`RateLimit`] (counted whether or not enforced).
    pub rate_violations: u64,
    /// Requests that a [`FaultRule`] acted on.
    pub faults_injected: u64,
    /// List requests with `limit=1` (total probes) that passed authentication and query
    /// validation and reached the data, i.e. were not answered by the rate limit or by an
    /// injected `Status`, `HtmlStatus`, `Hang` or `DropBeforeResponse` fault. Every list request
    /// received, probes included, counts in `route(Route::List)`.
    pub list_probe_requests: u64,
}

impl Stats {
    /// Requests seen on `route` (0 when none).
    pub fn route(&self, route: Route) -> u64 {
        self.by_route.get(&route).copied().unwrap_or(0)
    }

    /// Responses sent with `status` (0 when none).
    pub fn status(&self, status: u16) -> u64 {
        self.by_status.get(&status).copied().unwrap_or(0)
    }
}

/// Misbehaviour to inject into API responses (never into the media route).
///
/// Rules are consulted in the order they were pushed. A request is offered to each rule whose
/// `route` matches; a rule still skipping counts the request and lets it pass on to the next rule;
/// the first rule in its active phase applies its fault and no later rule sees the request.
/// A rule is discarded once it has applied its fault `times` times.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FaultRule {
    /// Route to act on; `None` matches every API request, including unroutable paths.
    pub route: Option<Route>,
    /// How many matching requests to let through first.
    pub skip: u64,
    /// How many matching requests to act on after that.
    pub times: u64,
    /// What to do.
    pub fault: Fault,
}

impl FaultRule {
    /// Apply `fault` to the next matching request only.
    pub fn once(route: Option<Route>, fault: Fault) -> FaultRule {
        FaultRule {
            route,
            skip: 0,
            times: 1,
            fault,
        }
    }
}

/// One kind of injected misbehaviour.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Answer `status` with a JSON error body carrying `reason_code` (explicit `null` when
    /// `None`), plus a `Retry-After` header when given.
    Status {
        /// HTTP status, e.g. 503.
        status: u16,
        /// E.g. `digest_key_unavailable`.
        reason_code: Option<String>,
        /// Raw `Retry-After` value: seconds or an HTTP-date.
        retry_after: Option<String>,
    },
    /// Answer this status with an HTML body, as a proxy or load balancer would.
    HtmlStatus(u16),
    /// Wait, then answer normally.
    Delay(Duration),
    /// Never answer (the connection stays open until the client gives up or the server stops).
    Hang,
    /// Close the connection without sending anything.
    DropBeforeResponse,
    /// Send the status, the headers (with the full `Content-Length`) and about half of the real
    /// body, then close the connection.
    DropMidBody,
    /// Answer 200 with the first half of the real body, which is never valid JSON, with a
    /// `Content-Length` matching what is sent.
    TruncatedJson,
    /// A list request that would succeed is answered 200 with no items and `total` 0 (its
    /// `limit` and `offset` echoed), as a list route whose search index is being rebuilt would;
    /// an error the request earns (authorization, a bad parameter) is answered as usual, and so
    /// is every other route.
    EmptyList,
}

impl Fault {
    /// A JSON error with the given status and reason code and no `Retry-After`.
    pub fn status(status: u16, reason_code: &str) -> Fault {
        Fault::Status {
            status,
            reason_code: Some(reason_code.to_owned()),
            retry_after: None,
        }
    }
}

/// Rate limit over all API requests (the media route is exempt).
///
/// A violation is counted whenever more than `ceil(requests_per_second) + burst` requests have
/// arrived within the trailing one-second window (the arriving request included), less a 50 ms
/// tolerance for requests sent on time but delayed unevenly on the way (see `faults.rs`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RateLimit {
    /// Sustained rate.
    pub requests_per_second: f64,
    /// Extra requests tolerated within one second.
    pub burst: u32,
    /// When `true`, violating requests are answered 429 with `Retry-After: 1`; otherwise they are
    /// only counted.
    pub enforce: bool,
}
