//! `SimOptions`: everything that shapes the generated data set, the wire rendering and how list
//! queries are read at start, with the small value types those options use (`QueryPrecision`,
//! `Rendering`, `Rounding`).
//!
//! Options are read once by `Simulator::start`; this module does not validate them beyond what
//! `start` reports, and run-time switches live on the `Simulator` handle.

use time::{Duration, OffsetDateTime};

/// How to build a simulator. `Default` gives seed 1, no encounters, a 60-day window ending one
/// hour ago, and the defaults documented per field.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SimOptions {
    /// Seed of every generated value (ids, timestamps, names, note and transcript text).
    /// The same seed and options give the same data.
    pub seed: u64,
    /// Number of encounters generated at start.
    pub encounters: usize,
    /// Inclusive start of the generated `created_at` range.
    pub start: OffsetDateTime,
    /// Exclusive end of the generated `created_at` range; must be after `start` when
    /// `encounters > 0`.
    pub end: OffsetDateTime,
    /// Inclusive minimum and maximum number of documents per generated encounter.
    pub docs_per_encounter: (u32, u32),
    /// Inclusive minimum and maximum number of turns per (normal-sized) transcript.
    pub turns_per_transcript: (u32, u32),
    /// Size of the shared patient pool; 0 (the default) means `encounters / 3 + 1`.
    pub patients: usize,
    /// Every Nth ambient transcript is about 2 MB of text; 0 disables.
    pub large_transcript_every: u32,
    /// Every Nth transcript turn and every Nth note carries emoji (including ZWJ sequences), CJK
    /// and combining marks; 0 disables.
    pub unicode_every: u32,
    /// Every Nth generated document has an unsupported `schema_type`; 0 disables.
    pub unsupported_doc_every: u32,
    /// The organization all encounters belong to.
    pub organization_id: String,
    /// Render timestamps with non-UTC offsets (`+02:00`, `-03:30`) denoting the same instants,
    /// so clients must normalize. Can be switched later with `set_offset_timestamps`.
    pub offset_timestamps: bool,
    /// Add an unknown field to every JSON object the API returns, so clients must ignore
    /// unknown fields. Can be switched later with `set_extra_fields`.
    pub extra_fields: bool,
    /// Behave as a production host: keys starting with `ch_sk_test_` are rejected with 401
    /// `test_prefix_not_allowed`. Default `false` (a sandbox accepts them).
    pub production: bool,
    /// How finely the list route reads `start_at`/`end_at`, and how finely the server keeps its
    /// own timestamps (`nanosecond_timestamps` needs [`QueryPrecision::Nanos`]). Default [`QueryPrecision::Nanos`]. Can be switched later with
    /// `set_query_precision`.
    pub query_precision: QueryPrecision,
    /// Render each encounter's `created_at` coarser than the server filters and sorts on it (list
    /// and encounter detail only). Default `None`: rendered exactly. Can be switched later with
    /// `set_render_created_at`; `start` rejects a unit that is not positive.
    pub render_created_at: Option<Rendering>,
    /// Batch imports generated at start, in addition to `encounters`: for each
    /// `(created_at, count)`, `count` encounters sharing exactly that `created_at` (shaped like
    /// `NewEncounter::at`, with `updated_at` equal to `created_at`). Default empty.
    pub bulk_instants: Vec<(OffsetDateTime, usize)>,
    /// Generate `created_at` and `updated_at` at every precision from whole minutes down to the
    /// nanosecond (0 to 9 fractional digits as rendered), instead of whole minutes down to the
    /// microsecond. Only with [`QueryPrecision::Nanos`] (the micro modes keep microseconds at
    /// most). Default `false`.
    pub nanosecond_timestamps: bool,
    /// Put U+0000 (NUL, which JSON sends as `\u0000`) into text, as some upstream editors do: every
    /// third first name of the patient pool gets `\0Null` appended, and every unicode note and unicode
    /// transcript turn (see `unicode_every`) ends with ` \0`. SQLite stores it; PostgreSQL's
    /// `text` cannot hold it. Default `false`.
    pub nul_in_text: bool,
    /// Hold every list page to fewer records than `limit` asks for, as a server may (the
    /// envelope echoes the server's own `limit`); `total` stays the count of matching records.
    /// Default `None`: a page holds `min(limit, remaining)` records. Can be switched later with
    /// `set_page_cap`; `start` rejects a cap of 0.
    pub page_cap: Option<PageCap>,
    /// The list's `total` also counts the encounters unavailable to the key (403
    /// `cross_organization_denied`/`demo_training_denied` on their detail routes), which it
    /// does not list, as a server that counts before it filters by access would. Default
    /// `false`. Can be switched later with `set_total_counts_unavailable`.
    pub total_counts_unavailable: bool,
    /// The list pages over every encounter of the range, those unavailable to the key
    /// included, then drops those from the page, as a server that applies its LIMIT and OFFSET
    /// before its access filter would: offsets count them, pages come back short or empty while
    /// records remain, and `total` counts them (whatever `total_counts_unavailable` says).
    /// Pages in `(created_at, encounter_id)` order both ways. Default `false`.
    pub filter_after_limit: bool,
    /// The `status` of an ambient transcript document once its transcript is final (the
    /// contract shows `completed` and says the enum is not documented; the vendor's overview
    /// speaks of "finalized transcript data"). Unfinished ones stay `processing`. Default
    /// `completed`.
    pub final_document_status: String,
    /// Render `"documents": null` for an encounter without documents, instead of `[]` (the
    /// contract shows an array; a server may send null for none). Default `false`.
    pub null_empty_documents: bool,
    /// With `sort_order=desc`, break `created_at` ties by ascending `encounter_id` (`ORDER BY
    /// created_at DESC, encounter_id ASC`), so a descending page is not the reverse of an
    /// ascending one where records share an instant. The contract says ties are broken by the
    /// ID, not in which direction. Default `false`: descending is the exact reverse.
    pub desc_ties_ascending: bool,
    /// Keep stored timestamps at microseconds whatever `query_precision` does with the list's
    /// bounds: a store that keeps microseconds behind an API layer that parses bounds into
    /// milliseconds or seconds, so one unit of the bounds holds records at many instants.
    /// Default `false`: the data is as coarse as the bounds are read.
    pub micro_data: bool,
    /// The shape of every encounter's `date_of_service` on the wire. Default
    /// [`ServiceDates::Timestamps`], as the contract shows it.
    pub service_dates: ServiceDates,
    /// Send every decimal as a JSON string (`"842.4"`), as APIs that keep decimals exact do:
    /// `audio_duration_seconds` in list summaries, ambient document details and transcripts, and
    /// each transcript turn's `start` and `end`. Default `false`: JSON numbers, as the contract
    /// shows them.
    pub decimals_as_strings: bool,
    /// Send the list envelope's `limit`, `offset` and `total` as JSON strings (`"100"`), as a
    /// server that sends its integers as strings does. Default `false`: JSON numbers.
    pub counts_as_strings: bool,
    /// Generate every fifth encounter as never updated (`updated_at` equal to `created_at`) and
    /// send an encounter never updated since its creation with `"updated_at": null`, as a server
    /// that stamps only updates does. A later change sends its instant as usual. Default
    /// `false`: every encounter carries an `updated_at`.
    pub null_updated_at: bool,
    /// Send each encounter's `encounter_type` and `status` and each document summary's `title`
    /// as JSON numbers (codes of the values), as a server that sends enum codes would; the
    /// contract shows strings. Default `false`.
    pub labels_as_numbers: bool,
    /// Render every response as a server built on unordered maps, or on an unordered join,
    /// would: each object's keys and each encounter's `documents` in an order that changes
    /// from one response to the next, and a space after `:` and `,` in every other response.
    /// The values are the same. Default `false`: one fixed order, no whitespace.
    pub unordered_rendering: bool,
    /// Answer a document's routes — a note's detail, a transcript, a recording's URL — with 404
    /// `encounter_not_found` for a document created less than this long ago, although the list
    /// already shows it: routes served from a replica or a store that lags the list. Default
    /// zero: none. Can be changed later with `set_document_lag`.
    pub document_lag: std::time::Duration,
    /// Embed a signed link to each finished recording in its document's summary (list and
    /// encounter detail): `"recording": {"audio_url": "https://media.charthero.test/…?token=…",
    /// "expires_at": …}`, as a server backed by object storage may, with a token and expiry that
    /// differ on every response although the record did not change. The links are not served
    /// (the audio route is how recordings are fetched). Default `false`: the contract's
    /// summaries, without links.
    pub signed_recording_links: bool,
}

/// How the API renders an encounter's `date_of_service`. The contract's example is an RFC 3339
/// timestamp, but the field names a day, and servers send it as a plain date or in looser shapes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum ServiceDates {
    /// RFC 3339, rendered like every other timestamp. The default.
    #[default]
    Timestamps,
    /// `YYYY-MM-DD`: the UTC day of the instant.
    PlainDates,
    /// One of six shapes per record, chosen by a hash of the instant: an RFC 3339
    /// timestamp, a plain date, a date-time without an offset (`2026-05-25T14:00:00`), an empty
    /// string, the unix seconds as a JSON number, or `null`.
    Assorted,
}

/// How many records a list page holds at most, whatever `limit` asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PageCap {
    /// The most records a page holds (at least 1).
    pub max: u32,
    /// Each page holds a pseudo-random number of records from 1 to `max` (as a server that
    /// filters after its LIMIT would), instead of exactly `max` while that many remain.
    pub varying: bool,
}

/// How the list route treats sub-microsecond digits in `start_at`/`end_at`, and the precision of
/// the server's own timestamps.
///
/// The contract only says "timezone-aware ISO datetime"; servers built on Python (pydantic,
/// `datetime`) hold microseconds at most, and either drop or refuse the extra digits.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum QueryPrecision {
    /// Filters at nanoseconds: up to nine fractional digits are significant (later digits are
    /// ignored). Inserted records keep nanosecond `created_at` values. The default.
    #[default]
    Nanos,
    /// More than six fractional digits are accepted but truncated to microseconds before the
    /// `start_at < end_at` check and the filter, so `[t, t + 1 ns)` for a whole-microsecond `t`
    /// becomes an empty range and is refused (422 `invalid_query`, field `start_at`). Every
    /// timestamp the server stores is truncated to microseconds.
    TruncateMicros,
    /// More than six fractional digits are refused: 422 `invalid_query` with `field` naming the
    /// parameter. Every timestamp the server stores is truncated to microseconds.
    RejectPastMicros,
    /// More than three fractional digits are accepted but truncated to milliseconds before the
    /// `start_at < end_at` check and the filter, as a server that parses datetimes into
    /// milliseconds (JavaScript's `Date`, many document stores) does: `[t, t + 1 µs)` for a
    /// whole-millisecond `t` becomes an empty range and is refused (422 `invalid_query`, field
    /// `start_at`). Every `created_at` (generated or inserted) and every explicit `updated_at`
    /// the server stores is truncated to milliseconds.
    TruncateMillis,
    /// [`QueryPrecision::TruncateMillis`] at whole seconds: every fractional digit is dropped
    /// before the range check and the filter, and every stored `created_at` and explicit
    /// `updated_at` is a whole second.
    TruncateSeconds,
}

impl QueryPrecision {
    /// The unit, in nanoseconds, every `created_at` and explicit `updated_at` the server stores
    /// is a whole multiple of: 1 (nanoseconds), 1,000 (both micro modes), 1,000,000 or a second;
    /// at most a microsecond with `micro_data` ([`SimOptions::micro_data`]).
    pub(crate) fn data_unit(self, micro_data: bool) -> i64 {
        let unit = match self {
            QueryPrecision::Nanos => 1,
            QueryPrecision::TruncateMicros | QueryPrecision::RejectPastMicros => 1_000,
            QueryPrecision::TruncateMillis => 1_000_000,
            QueryPrecision::TruncateSeconds => 1_000_000_000,
        };
        if micro_data { unit.min(1_000) } else { unit }
    }
}

/// A coarser precision to render a timestamp at.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Rendering {
    /// The rendered value is a whole multiple of this since the Unix epoch (e.g. one second, one
    /// millisecond). Must be positive.
    pub unit: Duration,
    /// How to reach that multiple.
    pub rounding: Rounding,
}

/// How a [`Rendering`] reaches a multiple of its unit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Rounding {
    /// Down to the previous multiple (toward the past, also before 1970).
    Truncate,
    /// To the nearest multiple; exactly half a unit rounds up (toward the future).
    Nearest,
}

impl Rendering {
    /// The unit in whole nanoseconds, when it is positive and fits an `i64`.
    pub(crate) fn unit_nanos(self) -> Option<i64> {
        i64::try_from(self.unit.whole_nanoseconds())
            .ok()
            .filter(|unit| *unit > 0)
    }

    /// Applies the rule to unix nanoseconds; `unit` is the checked `unit_nanos`.
    pub(crate) fn apply(rounding: Rounding, unit: i64, nanos: i64) -> i64 {
        let rest = nanos.rem_euclid(unit);
        let down = nanos - rest;
        match rounding {
            Rounding::Truncate => down,
            // `rest >= unit - rest` is `2 * rest >= unit` without overflow.
            Rounding::Nearest if rest >= unit - rest => down.saturating_add(unit),
            Rounding::Nearest => down,
        }
    }
}

impl Default for SimOptions {
    fn default() -> SimOptions {
        let now = OffsetDateTime::now_utc();
        SimOptions {
            seed: 1,
            encounters: 0,
            start: now - Duration::days(60),
            end: now - Duration::hours(1),
            docs_per_encounter: (1, 3),
            turns_per_transcript: (20, 80),
            patients: 0,
            large_transcript_every: 0,
            unicode_every: 7,
            unsupported_doc_every: 50,
            organization_id: "org_sim".to_owned(),
            offset_timestamps: false,
            extra_fields: false,
            production: false,
            query_precision: QueryPrecision::Nanos,
            render_created_at: None,
            bulk_instants: Vec::new(),
            nanosecond_timestamps: false,
            nul_in_text: false,
            page_cap: None,
            total_counts_unavailable: false,
            filter_after_limit: false,
            final_document_status: "completed".to_owned(),
            null_empty_documents: false,
            desc_ties_ascending: false,
            micro_data: false,
            service_dates: ServiceDates::Timestamps,
            decimals_as_strings: false,
            counts_as_strings: false,
            null_updated_at: false,
            labels_as_numbers: false,
            unordered_rendering: false,
            document_lag: std::time::Duration::ZERO,
            signed_recording_links: false,
        }
    }
}

impl SimOptions {
    /// The patient pool size after applying the `0 = encounters / 3 + 1` rule.
    pub fn effective_patients(&self) -> usize {
        if self.patients == 0 {
            self.encounters / 3 + 1
        } else {
            self.patients
        }
    }
}
