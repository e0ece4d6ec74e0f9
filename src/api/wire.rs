//! Wire models of ChartHero API v1: the only serde-for-the-wire in the program. Every type
//! tolerates unknown fields (the vendor adds fields without notice), unknown enum values are kept
//! as strings, and timestamps with any RFC 3339 offset are normalized to UTC. Records keep the
//! exact JSON they arrived in.

use std::fmt;

use serde::de::{self, Deserializer};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use time::OffsetDateTime;

use crate::timefmt;

/// An RFC 3339 timestamp normalized to UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(pub OffsetDateTime);

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl de::Visitor<'_> for Visitor {
            type Value = Timestamp;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an RFC 3339 timestamp with an offset")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Timestamp, E> {
                timefmt::parse_rfc3339(v).map(Timestamp).map_err(E::custom)
            }
        }
        d.deserialize_str(Visitor)
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&timefmt::format_utc(self.0))
    }
}

/// An encounter's `updated_at` as sent. The contract shows a timestamp; a server that stamps
/// only updates sends `null` (or nothing) for a record never updated. It is data, never a
/// version: one record's value must not stop its page from decoding.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum UpdatedAt {
    /// Absent, `null` or an empty string: never updated.
    #[default]
    Never,
    /// An RFC 3339 timestamp normalized to UTC.
    At(OffsetDateTime),
    /// Anything else.
    Unreadable,
}

impl<'de> Deserialize<'de> for UpdatedAt {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(match Loose::deserialize(d)? {
            Loose::Null => UpdatedAt::Never,
            Loose::Text(text) if text.is_empty() => UpdatedAt::Never,
            Loose::Text(text) => timefmt::parse_rfc3339(&text).map_or(UpdatedAt::Unreadable, UpdatedAt::At),
            Loose::Number(_) | Loose::Integer(_) | Loose::Other => UpdatedAt::Unreadable,
        })
    }
}

/// An encounter's `date_of_service` as sent. The contract shows an RFC 3339 timestamp, but the
/// field names a day and servers send it in other shapes; one record's value must not stop its
/// page from decoding (the stored JSON keeps what was sent).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ServiceDate {
    /// Absent, `null` or an empty string.
    #[default]
    Unknown,
    /// An RFC 3339 timestamp normalized to UTC, or a plain `YYYY-MM-DD` date read as that day's
    /// 00:00 UTC.
    At(OffsetDateTime),
    /// Anything else: a date-time without an offset, a number, an object, a malformed text.
    Unreadable,
}

impl ServiceDate {
    fn of_text(text: &str) -> ServiceDate {
        if text.is_empty() {
            return ServiceDate::Unknown;
        }
        if let Ok(t) = timefmt::parse_rfc3339(text) {
            return ServiceDate::At(t);
        }
        time::Date::parse(text, time::macros::format_description!("[year]-[month]-[day]"))
            .map_or(ServiceDate::Unreadable, |day| {
                ServiceDate::At(day.midnight().assume_utc())
            })
    }
}

impl<'de> Deserialize<'de> for ServiceDate {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(match Loose::deserialize(d)? {
            Loose::Null => ServiceDate::Unknown,
            Loose::Text(text) => ServiceDate::of_text(&text),
            Loose::Number(_) | Loose::Integer(_) | Loose::Other => ServiceDate::Unreadable,
        })
    }
}

/// Any JSON value, as the fields that must not stop a page read it: `null`, a text, a number,
/// or anything else (drained, so the rest of the record still decodes).
enum Loose<'a> {
    Null,
    Text(std::borrow::Cow<'a, str>),
    Number(f64),
    /// A JSON integer, kept exact (a label's code may exceed what an `f64` holds exactly).
    Integer(i128),
    Other,
}

impl<'de> Deserialize<'de> for Loose<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> de::Visitor<'de> for Visitor {
            type Value = Loose<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Loose<'de>, E> {
                Ok(Loose::Text(v.into()))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Loose<'de>, E> {
                Ok(Loose::Text(v.to_owned().into()))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Loose<'de>, E> {
                Ok(Loose::Number(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Loose<'de>, E> {
                Ok(Loose::Integer(v.into()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Loose<'de>, E> {
                Ok(Loose::Integer(v.into()))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Loose<'de>, E> {
                Ok(Loose::Null)
            }
            fn visit_none<E: de::Error>(self) -> Result<Loose<'de>, E> {
                Ok(Loose::Null)
            }
            fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Loose<'de>, D::Error> {
                d.deserialize_any(self)
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<Loose<'de>, E> {
                Ok(Loose::Other)
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Loose<'de>, A::Error> {
                while seq.next_element::<de::IgnoredAny>()?.is_some() {}
                Ok(Loose::Other)
            }
            fn visit_map<A: de::MapAccess<'de>>(self, mut map: A) -> Result<Loose<'de>, A::Error> {
                while map.next_entry::<de::IgnoredAny, de::IgnoredAny>()?.is_some() {}
                Ok(Loose::Other)
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// A decimal sent as a JSON number or, by APIs that keep decimals exact, as a string holding one
/// (`"842.4"`); `None` for `null`, an empty string, or anything else (the record's JSON keeps
/// what was sent).
fn lenient_decimal<'de, D: Deserializer<'de>>(d: D) -> Result<Option<f64>, D::Error> {
    Ok(match Loose::deserialize(d)? {
        Loose::Number(n) => Some(n),
        Loose::Integer(n) => Some(n as f64),
        Loose::Text(text) => text.trim().parse::<f64>().ok().filter(|n| n.is_finite()),
        Loose::Null | Loose::Other => None,
    })
}

/// A descriptive text (a type, a status, a title, a name) sent as a string by the contract, or,
/// by a server that sends codes, as a number: kept as its text (`2`, `2.5`); `None` for `null`
/// or anything else (the record's JSON keeps what was sent), so that no such field stops a page.
fn lenient_text<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    Ok(match Loose::deserialize(d)? {
        Loose::Text(text) => Some(text.into_owned()),
        Loose::Integer(n) => Some(n.to_string()),
        Loose::Number(n) => Some(n.to_string()),
        Loose::Null | Loose::Other => None,
    })
}

/// [`lenient_decimal`] for a value that must be there: anything but a number (or a string
/// holding one) is an error.
fn decimal<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    lenient_decimal(d)?.ok_or_else(|| de::Error::custom("expected a number, or a string holding one"))
}

/// A count of the list envelope (`limit`, `offset`, `total`) sent as a JSON integer or, by a
/// server that sends its integers as strings, as a string holding one (`"100"`); anything else
/// is an error, since a page cannot be judged without it.
fn count<'de, D: Deserializer<'de>, T: TryFrom<i128>>(d: D) -> Result<T, D::Error> {
    let n = match Loose::deserialize(d)? {
        Loose::Integer(n) => Some(n),
        Loose::Text(text) => text.trim().parse::<i128>().ok(),
        Loose::Null | Loose::Number(_) | Loose::Other => None,
    };
    n.and_then(|n| T::try_from(n).ok())
        .ok_or_else(|| de::Error::custom("expected a count: a non-negative integer, or a string holding one"))
}

/// A list that may come as `null`: no items.
fn null_as_empty<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Vec<T>, D::Error> {
    Ok(Option::<Vec<T>>::deserialize(d)?.unwrap_or_default())
}

/// One page of `GET /encounters`.
#[derive(Debug)]
pub struct EncounterPage {
    pub items: Vec<Encounter>,
    pub limit: u32,
    pub offset: u32,
    /// Matching records at the moment this page was answered.
    pub total: u64,
}

#[derive(Deserialize)]
pub(super) struct RawPage<'a> {
    #[serde(borrow)]
    pub items: Vec<&'a RawValue>,
    #[serde(deserialize_with = "count")]
    pub limit: u32,
    #[serde(deserialize_with = "count")]
    pub offset: u32,
    #[serde(deserialize_with = "count")]
    pub total: u64,
}

#[derive(Deserialize)]
pub(super) struct EncounterEnvelope<'a> {
    #[serde(borrow)]
    pub encounter: &'a RawValue,
}

/// An encounter from the list or the detail route.
#[derive(Debug, Clone, Deserialize)]
pub struct Encounter {
    pub encounter_id: String,
    pub organization_id: String,
    #[serde(default, deserialize_with = "lenient_text")]
    pub encounter_type: Option<String>,
    #[serde(default, deserialize_with = "lenient_text")]
    pub status: Option<String>,
    pub created_at: Timestamp,
    #[serde(default)]
    pub updated_at: UpdatedAt,
    #[serde(default)]
    pub date_of_service: ServiceDate,
    #[serde(default)]
    pub patient: Option<Patient>,
    /// An array by the contract; `null` (as a server may send for none) is read as no documents.
    #[serde(default, deserialize_with = "null_as_empty")]
    pub documents: Vec<DocumentSummary>,
    /// The record exactly as received.
    #[serde(skip)]
    pub raw: String,
}

impl Encounter {
    /// Parses one encounter object, keeping its raw text.
    pub(super) fn from_raw(raw: &RawValue) -> Result<Encounter, serde_json::Error> {
        Encounter::parse(raw.get())
    }

    /// Parses one encounter object from its JSON text, keeping the text.
    pub fn parse(json: &str) -> Result<Encounter, serde_json::Error> {
        let mut e: Encounter = serde_json::from_str(json)?;
        e.raw = json.to_owned();
        Ok(e)
    }
}

/// Patient fields depend on the key's `patients:read` scope; only `patient_id` is certain.
#[derive(Debug, Clone, Deserialize)]
pub struct Patient {
    pub patient_id: String,
    #[serde(default, deserialize_with = "lenient_text")]
    pub first_name: Option<String>,
    #[serde(default, deserialize_with = "lenient_text")]
    pub last_name: Option<String>,
    /// `YYYY-MM-DD` by the contract; kept as text so that one malformed value cannot stop a
    /// page from decoding (`sync::record` parses it).
    #[serde(default)]
    pub date_of_birth: Option<String>,
}

/// A document as summarised inside an encounter.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct DocumentSummary {
    pub document_id: String,
    pub schema_type: String,
    #[serde(default, deserialize_with = "lenient_text")]
    pub title: Option<String>,
    #[serde(default, deserialize_with = "lenient_text")]
    pub status: Option<String>,
    #[serde(default, deserialize_with = "lenient_text")]
    pub workflow_variant: Option<String>,
    #[serde(default, deserialize_with = "lenient_decimal")]
    pub audio_duration_seconds: Option<f64>,
}

/// `GET /encounters/{id}/documents/{doc}`.
#[derive(Debug, Clone)]
pub enum DocumentDetail {
    /// `schema_type = "document"`: a clinical note.
    Note(NoteDocument),
    /// `schema_type = "ambient_transcript"`: metadata only.
    Ambient(AmbientDocument),
}

#[derive(Deserialize)]
pub(super) struct DocumentEnvelope<'a> {
    #[serde(borrow)]
    pub document: &'a RawValue,
}

#[derive(Deserialize)]
pub(super) struct SchemaTypeProbe {
    pub schema_type: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct NoteDocument {
    pub document_id: String,
    pub encounter_id: String,
    #[serde(default)]
    pub title: Option<String>,
    #[serde(default)]
    pub status: Option<String>,
    #[serde(default)]
    pub workflow_variant: Option<String>,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
    pub content: NoteContent,
}

#[derive(Debug, Clone, Deserialize)]
pub struct NoteContent {
    pub format: String,
    pub text: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct AmbientDocument {
    pub document_id: String,
    pub encounter_id: String,
    #[serde(default)]
    pub title: Option<String>,
    #[serde(default)]
    pub status: Option<String>,
    #[serde(default, deserialize_with = "lenient_decimal")]
    pub audio_duration_seconds: Option<f64>,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
}

/// `GET .../transcript`.
#[derive(Debug, Clone, Deserialize)]
pub struct TranscriptResponse {
    pub encounter_id: String,
    pub document_id: String,
    pub transcript: Transcript,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Transcript {
    #[serde(default)]
    pub provider: Option<String>,
    #[serde(default, deserialize_with = "lenient_decimal")]
    pub audio_duration_seconds: Option<f64>,
    pub turns: Vec<Turn>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Turn {
    #[serde(default)]
    pub speaker: Option<String>,
    #[serde(deserialize_with = "decimal")]
    pub start: f64,
    #[serde(deserialize_with = "decimal")]
    pub end: f64,
    pub text: String,
}

/// `GET .../audio`: a short-lived signed URL.
#[derive(Debug, Clone, Deserialize)]
pub struct AudioLink {
    pub audio_url: SignedUrl,
    pub expires_at: Timestamp,
}

/// A signed URL: a temporary credential. Its `Debug` hides it; it is never stored or logged.
#[derive(Clone, Deserialize)]
#[serde(transparent)]
pub struct SignedUrl(String);

impl SignedUrl {
    /// The URL itself, for the download request and nothing else.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for SignedUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SignedUrl(<redacted>)")
    }
}

/// The documented error body.
#[derive(Debug, Deserialize)]
pub(super) struct ErrorBody {
    #[serde(default)]
    pub reason_code: Option<String>,
    #[serde(default)]
    pub field: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_list_envelope_takes_its_counts_as_integers_or_strings_holding_them() {
        let page = |limit: &str, offset: &str, total: &str| {
            serde_json::from_str::<RawPage>(&format!(
                r#"{{"items": [], "limit": {limit}, "offset": {offset}, "total": {total}}}"#
            ))
            .map(|p| (p.limit, p.offset, p.total))
        };
        assert_eq!(page("100", "0", "123").unwrap(), (100, 0, 123));
        assert_eq!(page(r#""100""#, r#"" 0 ""#, r#""123""#).unwrap(), (100, 0, 123));
        for (limit, offset, total) in [
            ("100", "0", "-1"),
            ("100", "0", "1.5"),
            ("100", "0", r#""many""#),
            ("100", "0", "null"),
            ("4294967296", "0", "1"),
        ] {
            let err = page(limit, offset, total).unwrap_err().to_string();
            assert!(
                err.contains("expected a count"),
                "{limit} {offset} {total}: {err}"
            );
        }
    }

    #[test]
    fn encounters_tolerate_unknown_fields_and_normalize_offsets() {
        let text = r#"{"encounter_id":"enc_1","organization_id":"org_1","encounter_type":"telepathy",
            "status":"reticulating","created_at":"2026-05-25T16:00:00+02:00",
            "updated_at":"2026-05-25T15:00:00.5Z","date_of_service":null,"brand_new_field":{"x":1},
            "patient":{"patient_id":"pat_1"},
            "documents":[{"document_id":"doc_1","schema_type":"hologram","title":null,"status":null,
              "workflow_variant":null,"audio_duration_seconds":null,"extra":true}]}"#;
        let raw: &RawValue = serde_json::from_str(text).unwrap();
        let e = Encounter::from_raw(raw).unwrap();
        assert_eq!(e.created_at.to_string(), "2026-05-25T14:00:00Z");
        assert_eq!(
            e.updated_at,
            UpdatedAt::At(time::macros::datetime!(2026-05-25 15:00:00.5 UTC))
        );
        assert_eq!(e.encounter_type.as_deref(), Some("telepathy"));
        assert_eq!(e.documents[0].schema_type, "hologram");
        assert!(e.patient.unwrap().first_name.is_none());
        assert_eq!(e.raw, text);
    }

    #[test]
    fn a_date_of_service_in_any_shape_decodes_and_only_timestamps_and_dates_are_read() {
        let cases = [
            (
                r#""2026-05-25T16:00:00+02:00""#,
                ServiceDate::At(time::macros::datetime!(2026-05-25 14:00 UTC)),
            ),
            (
                r#""2026-05-25""#,
                ServiceDate::At(time::macros::datetime!(2026-05-25 00:00 UTC)),
            ),
            (r#""2026-05-25T14:00:00""#, ServiceDate::Unreadable),
            (r#""25/05/2026""#, ServiceDate::Unreadable),
            (r#""2026-02-30""#, ServiceDate::Unreadable),
            (r#""9999-12-31T23:59:59-05:00""#, ServiceDate::Unreadable),
            ("1779717600", ServiceDate::Unreadable),
            ("-1.5", ServiceDate::Unreadable),
            ("true", ServiceDate::Unreadable),
            (r#"{"date":"2026-05-25","tz":["UTC"]}"#, ServiceDate::Unreadable),
            (r#"["2026-05-25"]"#, ServiceDate::Unreadable),
            (r#""""#, ServiceDate::Unknown),
            ("null", ServiceDate::Unknown),
        ];
        for (value, expected) in cases {
            let text = format!(
                r#"{{"encounter_id":"enc_1","organization_id":"org_1","created_at":"2026-05-25T14:00:00Z",
                    "updated_at":"2026-05-25T14:00:00Z","date_of_service":{value},"documents":[]}}"#
            );
            let e = Encounter::parse(&text).unwrap_or_else(|err| panic!("{value}: {err}"));
            assert_eq!(e.date_of_service, expected, "{value}");
        }
        let absent = Encounter::parse(
            r#"{"encounter_id":"enc_1","organization_id":"org_1","created_at":"2026-05-25T14:00:00Z",
                "updated_at":"2026-05-25T14:00:00Z"}"#,
        )
        .unwrap();
        assert_eq!(absent.date_of_service, ServiceDate::Unknown);
    }

    #[test]
    fn decimals_arrive_as_numbers_or_strings_holding_them() {
        for (value, expected) in [
            ("842.4", Some(842.4)),
            (r#""842.4""#, Some(842.4)),
            (r#"" 12 ""#, Some(12.0)),
            ("7", Some(7.0)),
            (r#""""#, None),
            (r#""n/a""#, None),
            (r#""NaN""#, None),
            ("null", None),
            ("true", None),
            (r#"{"seconds":1}"#, None),
        ] {
            let summary: DocumentSummary = serde_json::from_str(&format!(
                r#"{{"document_id":"doc_1","schema_type":"ambient_transcript","audio_duration_seconds":{value}}}"#
            ))
            .unwrap_or_else(|e| panic!("{value}: {e}"));
            assert_eq!(summary.audio_duration_seconds, expected, "{value}");
        }
        let turn: Turn = serde_json::from_str(r#"{"start":"1.5","end":2,"text":"Hi."}"#).unwrap();
        assert_eq!((turn.start, turn.end), (1.5, 2.0));
        let err = serde_json::from_str::<Turn>(r#"{"start":"soon","end":2,"text":"Hi."}"#).unwrap_err();
        assert!(err.to_string().contains("expected a number"), "{err}");
    }

    #[test]
    fn labels_arrive_as_strings_or_as_numbers_kept_as_their_text() {
        for (value, expected) in [
            (r#""Progress note""#, Some("Progress note")),
            ("2", Some("2")),
            ("-3", Some("-3")),
            ("9007199254740993", Some("9007199254740993")),
            ("2.5", Some("2.5")),
            ("null", None),
            ("true", None),
            (r#"["a"]"#, None),
            (r#"{"code":2}"#, None),
        ] {
            let summary: DocumentSummary = serde_json::from_str(&format!(
                r#"{{"document_id":"doc_1","schema_type":"document","title":{value},"status":{value}}}"#
            ))
            .unwrap_or_else(|e| panic!("{value}: {e}"));
            assert_eq!(summary.title.as_deref(), expected, "{value}");
            assert_eq!(summary.status.as_deref(), expected, "{value}");
        }
    }

    #[test]
    fn signed_urls_do_not_show_in_debug_output() {
        let link: AudioLink = serde_json::from_str(
            r#"{"audio_url":"https://media.example/x.wav?token=canary","expires_at":"2026-05-25T15:15:00Z"}"#,
        )
        .unwrap();
        assert!(!format!("{link:?}").contains("canary"));
        assert!(link.audio_url.expose().contains("canary"));
    }
}
