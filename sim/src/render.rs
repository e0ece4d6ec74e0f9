//! Wire JSON: turns store records and derived content into the exact response bodies of the API,
//! and decides how each response renders its timestamps: in UTC (`Z`) or shifted to another
//! offset (`offset_timestamps`), and an encounter's `created_at` possibly coarser than it is
//! stored (a [`crate::Rendering`]); every other timestamp is rendered exactly. The RFC 3339 text
//! itself comes from `timestamp`.
//!
//! Rendering borrows records through small view types and serializes straight into a `Vec<u8>`;
//! nothing is converted to `serde_json::Value` first, except to render a body again in another
//! key order (`SimOptions::unordered_rendering`). This module decides no status codes and
//! holds no locks: callers pass a `&Store` they already hold.

use serde::ser::{SerializeMap, SerializeSeq, SerializeStruct};
use serde::{Serialize, Serializer};
use time::UtcOffset;

use crate::content::deciseconds;
use crate::id::{Id, mix64};
use crate::model::{Transcript, Turn};
use crate::options::{Rendering, Rounding, ServiceDates};
use crate::store::{DocRec, EncRec, Slot, Store};
use crate::timestamp::{TsText, format_date, format_datetime, instant};

/// Lifetime of signed audio URLs; the vendor's example shows 15 minutes.
pub(crate) const MEDIA_URL_LIFETIME_SECS: i64 = 15 * 60;

/// Name of the unknown field added to every object when `extra_fields` is on.
pub(crate) const EXTRA_FIELD: &str = "x_sim_extension";

/// Per-response rendering switches.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct RenderOpts {
    pub(crate) offset_timestamps: bool,
    pub(crate) extra_fields: bool,
    /// Coarser rendering of encounters' `created_at`: the rounding and the checked unit in ns.
    pub(crate) created_at: Option<(Rounding, i64)>,
    /// `"documents": null` for an encounter without documents.
    pub(crate) null_empty_documents: bool,
    pub(crate) service_dates: ServiceDates,
    /// Decimals as JSON strings (`SimOptions::decimals_as_strings`).
    pub(crate) decimals_as_strings: bool,
    /// The list envelope's counts as JSON strings (`SimOptions::counts_as_strings`).
    pub(crate) counts_as_strings: bool,
    /// `"updated_at": null` for an encounter never updated (`SimOptions::null_updated_at`).
    pub(crate) null_updated_at: bool,
    /// Labels as their codes (`SimOptions::labels_as_numbers`).
    pub(crate) labels_as_numbers: bool,
    /// `SimOptions::unordered_rendering`: this response's salt, which orders its keys and
    /// documents and picks its whitespace.
    pub(crate) unordered: Option<u64>,
    /// `SimOptions::signed_recording_links`: this response's salt, which makes each link's
    /// token, and the instant the response is rendered at, which sets its expiry.
    pub(crate) recording_links: Option<(u64, i64)>,
}

impl RenderOpts {
    /// The `created_at` an encounter is rendered with.
    fn created_at(&self, nanos: i64) -> i64 {
        match self.created_at {
            None => nanos,
            Some((rounding, unit)) => Rendering::apply(rounding, unit, nanos),
        }
    }
}

/// The value of the unknown field: a nested object, so clients must skip structured unknowns.
struct Extra;

impl Serialize for Extra {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(2))?;
        map.serialize_entry("note", "unknown field added by the simulator; ignore it")?;
        map.serialize_entry("revision", &3)?;
        map.end()
    }
}

/// Offsets used in `offset_timestamps` mode; both signs and a half-hour offset exercise the
/// client's normalization.
const OFFSETS: [(i8, i8); 2] = [(2, 0), (-3, -30)];

/// Formats unix nanoseconds. With `shifted`, the instant is expressed in one of `OFFSETS`
/// (chosen by the whole second, so it varies between records but is stable per value).
pub(crate) fn format_ts(nanos: i64, shifted: bool) -> TsText {
    let mut at = instant(nanos);
    if shifted {
        let (h, m) = OFFSETS[nanos.div_euclid(1_000_000_000).rem_euclid(2) as usize];
        at = at.to_offset(UtcOffset::from_hms(h, m, 0).expect("valid offset"));
    }
    format_datetime(at)
}

/// A timestamp field rendered per `RenderOpts`.
struct Ts(i64, bool);

impl Serialize for Ts {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(format_ts(self.0, self.1).as_str())
    }
}

/// A label (a type, a status, a title) as its string, or as its code when
/// `RenderOpts::labels_as_numbers`.
struct Label<'a>(&'a crate::store::Interner, Option<crate::store::Sym>, RenderOpts);

impl Serialize for Label<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.1 {
            None => s.serialize_none(),
            Some(sym) if self.2.labels_as_numbers => s.serialize_u32(crate::store::Interner::code(sym)),
            Some(sym) => s.serialize_str(self.0.get(sym)),
        }
    }
}

/// A decimal as a JSON number, or as a string when `RenderOpts::decimals_as_strings`.
struct Decimal(Option<f64>, bool);

/// A count of the list envelope as a JSON number, or as a string when
/// `RenderOpts::counts_as_strings`.
struct Count(usize, bool);

impl Serialize for Count {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match *self {
            Count(n, true) => s.serialize_str(&n.to_string()),
            Count(n, false) => s.serialize_u64(n as u64),
        }
    }
}

impl Serialize for Decimal {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match *self {
            Decimal(None, _) => s.serialize_none(),
            Decimal(Some(value), true) => s.serialize_str(&value.to_string()),
            Decimal(Some(value), false) => s.serialize_f64(value),
        }
    }
}

/// An encounter's `date_of_service` (unix nanoseconds) in the shape `ServiceDates` gives it.
pub(crate) struct ServiceDate(pub(crate) i64, pub(crate) bool, pub(crate) ServiceDates);

impl Serialize for ServiceDate {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let ServiceDate(nanos, shifted, shapes) = *self;
        let seconds = nanos.div_euclid(1_000_000_000);
        let shape = match shapes {
            ServiceDates::Timestamps => 0,
            ServiceDates::PlainDates => 1,
            ServiceDates::Assorted => mix64(nanos as u64) % 6,
        };
        let at = instant(nanos);
        match shape {
            0 => Ts(nanos, shifted).serialize(s),
            1 => s.serialize_str(&format_date(at.date())),
            2 => {
                let text = format_datetime(at.replace_nanosecond(0).expect("zero nanoseconds are valid"));
                let text = text.as_str();
                s.serialize_str(&text[..text.len() - 1])
            }
            3 => s.serialize_str(""),
            4 => s.serialize_i64(seconds),
            _ => s.serialize_none(),
        }
    }
}

fn to_vec(value: &impl Serialize, opts: RenderOpts) -> Vec<u8> {
    let mut out = Vec::with_capacity(1024);
    serde_json::to_writer(&mut out, value).expect("serializing to memory cannot fail");
    unordered(out, opts)
}

/// `body` as a server built on unordered maps sends it, when `opts` asks for that
/// (`SimOptions::unordered_rendering`): every object's keys, and the elements of every
/// `documents` array, in an order the response's salt picks, and on every other salt a space
/// after each `:` and `,`. The same values either way.
fn unordered(body: Vec<u8>, opts: RenderOpts) -> Vec<u8> {
    let Some(salt) = opts.unordered else {
        return body;
    };
    let value: serde_json::Value = serde_json::from_slice(&body).expect("the simulator renders valid JSON");
    let mut out = Vec::with_capacity(body.len() + body.len() / 8);
    write_unordered(&value, salt, false, &mut out);
    out
}

fn write_unordered(value: &serde_json::Value, salt: u64, shuffle_items: bool, out: &mut Vec<u8>) {
    use serde_json::Value;
    let (colon, comma): (&[u8], &[u8]) = if salt % 2 == 1 {
        (b": ", b", ")
    } else {
        (b":", b",")
    };
    let order = |n: usize, key: &dyn Fn(usize) -> u64| {
        let mut at: Vec<usize> = (0..n).collect();
        at.sort_by_key(|&i| mix64(salt ^ key(i)));
        at
    };
    match value {
        Value::Object(map) => {
            let entries: Vec<(&String, &Value)> = map.iter().collect();
            out.push(b'{');
            for (n, i) in order(entries.len(), &|i| crate::id::fnv64(entries[i].0.as_bytes()))
                .into_iter()
                .enumerate()
            {
                if n > 0 {
                    out.extend_from_slice(comma);
                }
                let (key, item) = entries[i];
                serde_json::to_writer(&mut *out, key).expect("serializing to memory cannot fail");
                out.extend_from_slice(colon);
                write_unordered(item, salt, key == "documents", out);
            }
            out.push(b'}');
        }
        Value::Array(items) => {
            let at = if shuffle_items {
                order(items.len(), &|i| i as u64)
            } else {
                (0..items.len()).collect()
            };
            out.push(b'[');
            for (n, i) in at.into_iter().enumerate() {
                if n > 0 {
                    out.extend_from_slice(comma);
                }
                write_unordered(&items[i], salt, false, out);
            }
            out.push(b']');
        }
        other => serde_json::to_writer(&mut *out, other).expect("serializing to memory cannot fail"),
    }
}

struct EncounterView<'a> {
    store: &'a Store,
    rec: &'a EncRec,
    opts: RenderOpts,
}

impl Serialize for EncounterView<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let (store, rec, shift) = (self.store, self.rec, self.opts.offset_timestamps);
        let mut obj = s.serialize_struct("Encounter", 10)?;
        obj.serialize_field("encounter_id", rec.id.as_str())?;
        obj.serialize_field("organization_id", &*store.organization_id)?;
        obj.serialize_field(
            "encounter_type",
            &Label(&store.syms, Some(rec.encounter_type), self.opts),
        )?;
        obj.serialize_field("status", &Label(&store.syms, Some(rec.status), self.opts))?;
        obj.serialize_field("created_at", &Ts(self.opts.created_at(rec.created), shift))?;
        if self.opts.null_updated_at && rec.updated == rec.created {
            obj.serialize_field("updated_at", &None::<()>)?;
        } else {
            obj.serialize_field("updated_at", &Ts(rec.updated, shift))?;
        }
        obj.serialize_field(
            "date_of_service",
            &ServiceDate(rec.date_of_service, shift, self.opts.service_dates),
        )?;
        obj.serialize_field("patient", &PatientView { view: self })?;
        if self.opts.null_empty_documents && rec.docs.is_empty() {
            obj.serialize_field("documents", &None::<()>)?;
        } else {
            obj.serialize_field("documents", &DocumentsView { view: self })?;
        }
        if self.opts.extra_fields {
            obj.serialize_field(EXTRA_FIELD, &Extra)?;
        }
        obj.end()
    }
}

struct PatientView<'a> {
    view: &'a EncounterView<'a>,
}

impl Serialize for PatientView<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let store = self.view.store;
        let patient = store.patient(self.view.rec);
        let name = |sym| store.syms.get(sym);
        let mut obj = s.serialize_struct("Patient", 4)?;
        obj.serialize_field("patient_id", &*patient.id)?;
        if !patient.withheld {
            obj.serialize_field("first_name", &patient.first_name.map(name))?;
            obj.serialize_field("last_name", &patient.last_name.map(name))?;
            obj.serialize_field("date_of_birth", &patient.date_of_birth.map(format_date))?;
        }
        if self.view.opts.extra_fields {
            obj.serialize_field(EXTRA_FIELD, &Extra)?;
        }
        obj.end()
    }
}

struct DocumentsView<'a> {
    view: &'a EncounterView<'a>,
}

impl Serialize for DocumentsView<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let docs = &self.view.rec.docs;
        let mut seq = s.serialize_seq(Some(docs.len()))?;
        for doc in docs {
            seq.serialize_element(&SummaryView {
                store: self.view.store,
                doc,
                opts: self.view.opts,
            })?;
        }
        seq.end()
    }
}

struct SummaryView<'a> {
    store: &'a Store,
    doc: &'a DocRec,
    opts: RenderOpts,
}

impl Serialize for SummaryView<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let (doc, syms) = (self.doc, &self.store.syms);
        let mut obj = s.serialize_struct("Document", 6)?;
        obj.serialize_field("document_id", doc.id.as_str())?;
        obj.serialize_field("schema_type", syms.get(doc.schema_type))?;
        obj.serialize_field("title", &Label(syms, doc.title, self.opts))?;
        obj.serialize_field("status", &doc.status.map(|t| syms.get(t)))?;
        obj.serialize_field("workflow_variant", &doc.workflow_variant.map(|t| syms.get(t)))?;
        obj.serialize_field(
            "audio_duration_seconds",
            &Decimal(doc.audio_ds.map(deciseconds), self.opts.decimals_as_strings),
        )?;
        if let Some((salt, now)) = self
            .opts
            .recording_links
            .filter(|_| doc.is_final && doc.audio_ds.is_some())
        {
            obj.serialize_field(
                "recording",
                &RecordingLink {
                    doc,
                    salt,
                    now,
                    opts: self.opts,
                },
            )?;
        }
        if self.opts.extra_fields {
            obj.serialize_field(EXTRA_FIELD, &Extra)?;
        }
        obj.end()
    }
}

/// A finished recording's signed link in its document's summary
/// (`SimOptions::signed_recording_links`): `{"audio_url": "…?token=…&expires=…", "expires_at": …}`.
struct RecordingLink<'a> {
    doc: &'a DocRec,
    salt: u64,
    now: i64,
    opts: RenderOpts,
}

impl Serialize for RecordingLink<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let id = self.doc.id.as_str();
        let expires = self.now.div_euclid(1_000_000_000) + MEDIA_URL_LIFETIME_SECS;
        let token = mix64(self.salt ^ crate::id::fnv64(id.as_bytes()));
        let url =
            format!("https://media.charthero.test/recordings/{id}.wav?token={token:016x}&expires={expires}");
        Audio(&url, expires * 1_000_000_000, self.opts).serialize(s)
    }
}

/// `{"audio_url": "...", "expires_at": "..."}`: the audio route's answer, and a summary's
/// recording link.
struct Audio<'a>(&'a str, i64, RenderOpts);

impl Serialize for Audio<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut obj = s.serialize_struct("Audio", 2)?;
        obj.serialize_field("audio_url", self.0)?;
        obj.serialize_field("expires_at", &Ts(self.1, self.2.offset_timestamps))?;
        if self.2.extra_fields {
            obj.serialize_field(EXTRA_FIELD, &Extra)?;
        }
        obj.end()
    }
}

/// `{"items": [...], "limit": L, "offset": O, "total": T}`.
pub(crate) fn list_body(
    store: &Store,
    slots: &[Slot],
    limit: u32,
    offset: u32,
    total: usize,
    opts: RenderOpts,
) -> Vec<u8> {
    struct Items<'a>(&'a Store, &'a [Slot], RenderOpts);
    impl Serialize for Items<'_> {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            let mut seq = s.serialize_seq(Some(self.1.len()))?;
            for &slot in self.1 {
                seq.serialize_element(&EncounterView {
                    store: self.0,
                    rec: self.0.rec(slot),
                    opts: self.2,
                })?;
            }
            seq.end()
        }
    }
    struct Envelope<'a> {
        items: Items<'a>,
        limit: u32,
        offset: u32,
        total: usize,
    }
    impl Serialize for Envelope<'_> {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            let mut obj = s.serialize_struct("List", 4)?;
            obj.serialize_field("items", &self.items)?;
            let strings = self.items.2.counts_as_strings;
            obj.serialize_field("limit", &Count(self.limit as usize, strings))?;
            obj.serialize_field("offset", &Count(self.offset as usize, strings))?;
            obj.serialize_field("total", &Count(self.total, strings))?;
            if self.items.2.extra_fields {
                obj.serialize_field(EXTRA_FIELD, &Extra)?;
            }
            obj.end()
        }
    }
    // About 700 bytes per encounter; reserving avoids most reallocation on a full page.
    let mut out = Vec::with_capacity(256 + slots.len() * 900);
    let envelope = Envelope {
        items: Items(store, slots, opts),
        limit,
        offset,
        total,
    };
    serde_json::to_writer(&mut out, &envelope).expect("serializing to memory cannot fail");
    unordered(out, opts)
}

/// `{"encounter": {...}}`.
pub(crate) fn encounter_body(store: &Store, slot: Slot, opts: RenderOpts) -> Vec<u8> {
    struct Wrapper<'a>(EncounterView<'a>);
    impl Serialize for Wrapper<'_> {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            let mut obj = s.serialize_struct("Detail", 1)?;
            obj.serialize_field("encounter", &self.0)?;
            if self.0.opts.extra_fields {
                obj.serialize_field(EXTRA_FIELD, &Extra)?;
            }
            obj.end()
        }
    }
    to_vec(
        &Wrapper(EncounterView {
            store,
            rec: store.rec(slot),
            opts,
        }),
        opts,
    )
}

/// What document detail needs, copied out of the store so rendering (and deriving note text)
/// happens without the store lock.
pub(crate) struct DocDetail {
    pub(crate) encounter_id: Id,
    pub(crate) doc: DocRec,
    pub(crate) schema_type: String,
    pub(crate) title: Option<String>,
    pub(crate) status: Option<String>,
}

/// Document detail of a markdown note.
pub(crate) fn note_body(detail: &DocDetail, text: &str, opts: RenderOpts) -> Vec<u8> {
    struct Content<'a>(&'a str, bool);
    impl Serialize for Content<'_> {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            let mut obj = s.serialize_struct("Content", 2)?;
            obj.serialize_field("format", "markdown")?;
            obj.serialize_field("text", self.0)?;
            if self.1 {
                obj.serialize_field(EXTRA_FIELD, &Extra)?;
            }
            obj.end()
        }
    }
    struct Note<'a>(&'a DocDetail, &'a str, RenderOpts);
    impl Serialize for Note<'_> {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            let (d, shift) = (self.0, self.2.offset_timestamps);
            let mut obj = s.serialize_struct("Note", 9)?;
            obj.serialize_field("document_id", d.doc.id.as_str())?;
            obj.serialize_field("encounter_id", d.encounter_id.as_str())?;
            obj.serialize_field("schema_type", &d.schema_type)?;
            obj.serialize_field("title", &d.title)?;
            // The contract fixes both to null for markdown notes.
            obj.serialize_field("status", &None::<&str>)?;
            obj.serialize_field("workflow_variant", &None::<&str>)?;
            obj.serialize_field("created_at", &Ts(d.doc.created, shift))?;
            obj.serialize_field("updated_at", &Ts(d.doc.updated, shift))?;
            obj.serialize_field("content", &Content(self.1, self.2.extra_fields))?;
            if self.2.extra_fields {
                obj.serialize_field(EXTRA_FIELD, &Extra)?;
            }
            obj.end()
        }
    }
    to_vec(&DocumentWrapper(Note(detail, text, opts), opts), opts)
}

/// Document detail of an ambient transcript: the closed metadata object, keys in the order the
/// reference documents them (alphabetical).
pub(crate) fn ambient_body(detail: &DocDetail, opts: RenderOpts) -> Vec<u8> {
    struct Ambient<'a>(&'a DocDetail, RenderOpts);
    impl Serialize for Ambient<'_> {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            let (d, shift) = (self.0, self.1.offset_timestamps);
            let mut obj = s.serialize_struct("Ambient", 8)?;
            obj.serialize_field(
                "audio_duration_seconds",
                &Decimal(d.doc.audio_ds.map(deciseconds), self.1.decimals_as_strings),
            )?;
            obj.serialize_field("created_at", &Ts(d.doc.created, shift))?;
            obj.serialize_field("document_id", d.doc.id.as_str())?;
            obj.serialize_field("encounter_id", d.encounter_id.as_str())?;
            obj.serialize_field("schema_type", &d.schema_type)?;
            obj.serialize_field("status", &d.status)?;
            obj.serialize_field("title", &d.title)?;
            obj.serialize_field("updated_at", &Ts(d.doc.updated, shift))?;
            if self.1.extra_fields {
                obj.serialize_field(EXTRA_FIELD, &Extra)?;
            }
            obj.end()
        }
    }
    to_vec(&DocumentWrapper(Ambient(detail, opts), opts), opts)
}

struct DocumentWrapper<T>(T, RenderOpts);

impl<T: Serialize> Serialize for DocumentWrapper<T> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut obj = s.serialize_struct("Detail", 1)?;
        obj.serialize_field("document", &self.0)?;
        if self.1.extra_fields {
            obj.serialize_field(EXTRA_FIELD, &Extra)?;
        }
        obj.end()
    }
}

/// `{"encounter_id", "document_id", "transcript": {"provider", "audio_duration_seconds", "turns"}}`.
pub(crate) fn transcript_body(
    encounter_id: &str,
    document_id: &str,
    transcript: &Transcript,
    opts: RenderOpts,
) -> Vec<u8> {
    struct TurnView<'a>(&'a Turn, RenderOpts);
    impl Serialize for TurnView<'_> {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            let strings = self.1.decimals_as_strings;
            let mut obj = s.serialize_struct("Turn", 4)?;
            obj.serialize_field("speaker", &self.0.speaker)?;
            obj.serialize_field("start", &Decimal(Some(self.0.start), strings))?;
            obj.serialize_field("end", &Decimal(Some(self.0.end), strings))?;
            obj.serialize_field("text", &self.0.text)?;
            if self.1.extra_fields {
                obj.serialize_field(EXTRA_FIELD, &Extra)?;
            }
            obj.end()
        }
    }
    struct TranscriptView<'a>(&'a Transcript, RenderOpts);
    impl Serialize for TranscriptView<'_> {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            let mut obj = s.serialize_struct("Transcript", 3)?;
            obj.serialize_field("provider", &self.0.provider)?;
            obj.serialize_field(
                "audio_duration_seconds",
                &Decimal(self.0.audio_duration_seconds, self.1.decimals_as_strings),
            )?;
            obj.serialize_field("turns", &Turns(&self.0.turns, self.1))?;
            if self.1.extra_fields {
                obj.serialize_field(EXTRA_FIELD, &Extra)?;
            }
            obj.end()
        }
    }
    struct Turns<'a>(&'a [Turn], RenderOpts);
    impl Serialize for Turns<'_> {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            s.collect_seq(self.0.iter().map(|t| TurnView(t, self.1)))
        }
    }
    struct Envelope<'a>(&'a str, &'a str, &'a Transcript, RenderOpts);
    impl Serialize for Envelope<'_> {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            let mut obj = s.serialize_struct("TranscriptResponse", 3)?;
            obj.serialize_field("encounter_id", self.0)?;
            obj.serialize_field("document_id", self.1)?;
            obj.serialize_field("transcript", &TranscriptView(self.2, self.3))?;
            if self.3.extra_fields {
                obj.serialize_field(EXTRA_FIELD, &Extra)?;
            }
            obj.end()
        }
    }
    let envelope = Envelope(encounter_id, document_id, transcript, opts);
    let mut out = Vec::with_capacity(64 + transcript.turns.len() * 160);
    serde_json::to_writer(&mut out, &envelope).expect("serializing to memory cannot fail");
    unordered(out, opts)
}

/// `{"audio_url": "...", "expires_at": "..."}`.
pub(crate) fn audio_body(audio_url: &str, expires_at: i64, opts: RenderOpts) -> Vec<u8> {
    to_vec(&Audio(audio_url, expires_at, opts), opts)
}

/// `{"error": ..., "reason_code": ..., "message": ..., "field": ...}` with explicit nulls.
pub(crate) fn error_body(
    category: &str,
    reason_code: Option<&str>,
    message: &str,
    field: Option<&str>,
    opts: RenderOpts,
) -> Vec<u8> {
    struct ErrorView<'a>(&'a str, Option<&'a str>, &'a str, Option<&'a str>, bool);
    impl Serialize for ErrorView<'_> {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            let mut obj = s.serialize_struct("Error", 4)?;
            obj.serialize_field("error", self.0)?;
            obj.serialize_field("reason_code", &self.1)?;
            obj.serialize_field("message", self.2)?;
            obj.serialize_field("field", &self.3)?;
            if self.4 {
                obj.serialize_field(EXTRA_FIELD, &Extra)?;
            }
            obj.end()
        }
    }
    to_vec(
        &ErrorView(category, reason_code, message, field, opts.extra_fields),
        opts,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(text: &str) -> i64 {
        let at = time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339).unwrap();
        crate::timestamp::nanos(at)
    }

    #[test]
    fn timestamps_use_z_and_only_significant_fraction_digits() {
        assert_eq!(
            format_ts(ts("2026-05-25T14:00:00Z"), false).as_str(),
            "2026-05-25T14:00:00Z"
        );
        assert_eq!(
            format_ts(ts("2026-05-25T14:00:00.120Z"), false).as_str(),
            "2026-05-25T14:00:00.12Z"
        );
        assert_eq!(
            format_ts(ts("2026-05-25T14:00:00.000001Z"), false).as_str(),
            "2026-05-25T14:00:00.000001Z"
        );
    }

    #[test]
    fn shifted_timestamps_denote_the_same_instant() {
        for text in ["2026-05-25T14:00:00Z", "2026-05-25T14:00:01.5Z"] {
            let shifted = format_ts(ts(text), true);
            assert!(!shifted.as_str().ends_with('Z'), "{}", shifted.as_str());
            assert_eq!(ts(shifted.as_str()), ts(text));
        }
        assert_eq!(
            format_ts(ts("2026-05-25T14:00:01Z"), true).as_str(),
            "2026-05-25T10:30:01-03:30"
        );
    }

    #[test]
    fn coarse_created_at_truncates_or_rounds_half_up_on_both_sides_of_1970() {
        let second = 1_000_000_000;
        let cases = [
            (Rounding::Truncate, 1_499_999_999, second),
            (Rounding::Truncate, -1, -second),
            (Rounding::Truncate, 2 * second, 2 * second),
            (Rounding::Nearest, 1_499_999_999, second),
            (Rounding::Nearest, 1_500_000_000, 2 * second),
            (Rounding::Nearest, -500_000_000, 0),
            (Rounding::Nearest, -500_000_001, -second),
        ];
        for (rounding, nanos, want) in cases {
            let opts = RenderOpts {
                created_at: Some((rounding, second)),
                ..RenderOpts::default()
            };
            assert_eq!(opts.created_at(nanos), want, "{rounding:?} {nanos}");
        }
        // An odd unit: 3 ns, half is 1.5 ns.
        assert_eq!(Rendering::apply(Rounding::Nearest, 3, 1), 0);
        assert_eq!(Rendering::apply(Rounding::Nearest, 3, 2), 3);
        assert_eq!(
            Rendering::apply(Rounding::Nearest, i64::MAX, i64::MAX - 1),
            i64::MAX
        );
        assert_eq!(RenderOpts::default().created_at(7), 7);
    }
}
