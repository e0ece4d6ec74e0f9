//! The one place where what the list route returns becomes what the warehouse stores: a wire
//! encounter mapped to its record, keeping only the PHI the privacy policy allows (in the
//! columns and in the stored JSON), with the content hash that change detection compares.
//! Nothing here does I/O.

use std::sync::atomic::{AtomicBool, Ordering};

use time::Date;

use crate::api::wire::{Encounter, ServiceDate};
use crate::config::{BirthDate, PrivacyConfig};
use crate::store::{DocumentRecord, EncounterRecord, PatientRecord, content_hash};

/// Maps a wire encounter to the warehouse record, keeping only the PHI `privacy` allows (in the
/// columns and in the stored JSON) and no signed link ([`without_signed_links`]). The content
/// hash is over the record as received less its signed links (in canonical form:
/// `store::content_hash`), so change detection depends neither on the policy nor on links that
/// a server signs anew for every response.
pub fn encounter_record(e: Encounter, privacy: &PrivacyConfig) -> EncounterRecord {
    let raw = without_signed_links(e.raw, &e.encounter_id);
    let content_hash = content_hash(&raw);
    let date_of_service = match e.date_of_service {
        ServiceDate::At(t) => Some(t),
        ServiceDate::Unknown => None,
        ServiceDate::Unreadable => {
            unreadable(Field::DateOfService, &e.encounter_id, None);
            None
        }
    };
    let patient = e.patient.map(|p| {
        let born = p
            .date_of_birth
            .as_deref()
            .and_then(|text| birth_date(text, &e.encounter_id, &p.patient_id));
        PatientRecord {
            date_of_birth: born.and_then(|d| match privacy.date_of_birth {
                BirthDate::Full => Some(d.to_string()),
                BirthDate::YearOnly => Some(format!("{:04}", d.year())),
                BirthDate::Omit => None,
            }),
            patient_id: p.patient_id,
            first_name: p.first_name.filter(|_| privacy.patient_names),
            last_name: p.last_name.filter(|_| privacy.patient_names),
        }
    });
    let redact = !privacy.patient_names || privacy.date_of_birth != BirthDate::Full;
    let raw_json = if redact {
        redact_patient(&raw, privacy)
    } else {
        raw
    };
    EncounterRecord {
        encounter_id: e.encounter_id,
        organization_id: e.organization_id,
        encounter_type: e.encounter_type,
        status: e.status,
        created_at: e.created_at.0,
        updated_at: e.updated_at.0,
        date_of_service,
        patient,
        documents: e
            .documents
            .into_iter()
            .map(|d| DocumentRecord {
                document_id: d.document_id,
                schema_type: d.schema_type,
                title: d.title,
                status: d.status,
                workflow_variant: d.workflow_variant,
                audio_duration_seconds: d.audio_duration_seconds,
            })
            .collect(),
        content_hash,
        raw_json,
    }
}

/// A `date_of_birth` as the contract gives it (`YYYY-MM-DD`), or `None`: empty means unknown,
/// and anything else is logged by the record's IDs (never the value, which is PHI) and stored
/// as NULL, the record's JSON keeping it as received — one malformed value must not stop a
/// clinic's sync.
fn birth_date(text: &str, encounter_id: &str, patient_id: &str) -> Option<Date> {
    if text.is_empty() {
        return None;
    }
    Date::parse(text, time::macros::format_description!("[year]-[month]-[day]"))
        .inspect_err(|_| unreadable(Field::DateOfBirth, encounter_id, Some(patient_id)))
        .ok()
}

/// A field the warehouse stores as NULL when its value cannot be read.
#[derive(Clone, Copy)]
enum Field {
    DateOfBirth,
    DateOfService,
}

impl Field {
    fn unreadable(self) -> &'static str {
        match self {
            Field::DateOfBirth => "date_of_birth is not a YYYY-MM-DD date; stored as NULL",
            Field::DateOfService => {
                "date_of_service is neither an RFC 3339 timestamp nor a YYYY-MM-DD date; stored as NULL"
            }
        }
    }
}

/// Whether a field's unreadable value was logged as a warning yet, by [`Field`].
static WARNED: [AtomicBool; 2] = [AtomicBool::new(false), AtomicBool::new(false)];

/// Logs a value stored as NULL because it cannot be read, by the record's IDs, never the value
/// (PHI). The first of each field per process is a warning; later ones are logged at debug
/// level, so a server that sends every record so does not flood the journal.
fn unreadable(field: Field, encounter_id: &str, patient_id: Option<&str>) {
    let message = field.unreadable();
    if WARNED[field as usize].swap(true, Ordering::Relaxed) {
        tracing::debug!(encounter_id, patient_id, "{message}");
    } else {
        tracing::warn!(
            encounter_id,
            patient_id,
            "{message} (further ones are logged at debug level)"
        );
    }
}

/// The record's JSON without the temporary access links a server may embed in it (a recording's
/// signed URL in a document summary, say): the contract says signed URLs are never to be stored,
/// and a server that signs them anew for every response would make an unchanged record look
/// changed on every listing, fetching its notes and transcripts again each time. A link is an
/// absolute `http(s)` URL with a query or a fragment (where signatures and tokens go), or any
/// URL under `audio_url` (the contract's name for a signed URL); the `expires_at` (or
/// `*_expires_at`) beside a removed link goes with it. A record without links is kept byte for
/// byte.
fn without_signed_links(raw: String, encounter_id: &str) -> String {
    // Every link has "//" (or "\/\/", as JSON may escape it).
    if !raw.contains("//") && !raw.contains(r"\/\/") {
        return raw;
    }
    let Ok(mut value) = serde_json::from_str::<serde_json::Value>(&raw) else {
        return raw;
    };
    if !remove_signed_links(&mut value) {
        return raw;
    }
    tracing::debug!(encounter_id, "signed links in the record are not stored");
    value.to_string()
}

/// Removes [`without_signed_links`]'s links from `value` and everything it holds; whether any was.
fn remove_signed_links(value: &mut serde_json::Value) -> bool {
    use serde_json::Value;
    let is_link = |key: &str, value: &Value| value.as_str().is_some_and(|text| signed_link(key, text));
    match value {
        Value::Object(fields) => {
            let before = fields.len();
            fields.retain(|key, value| !is_link(key, value));
            let removed = fields.len() != before;
            if removed {
                fields.retain(|key, _| key != "expires_at" && !key.ends_with("_expires_at"));
            }
            fields
                .values_mut()
                .fold(removed, |any, value| remove_signed_links(value) || any)
        }
        Value::Array(items) => {
            let before = items.len();
            items.retain(|item| !is_link("", item));
            let removed = items.len() != before;
            items
                .iter_mut()
                .fold(removed, |any, item| remove_signed_links(item) || any)
        }
        _ => false,
    }
}

/// Whether `text`, the value of `key`, is a link [`without_signed_links`] removes.
fn signed_link(key: &str, text: &str) -> bool {
    let Some((scheme, rest)) = text.trim_start().split_once("://") else {
        return false;
    };
    (scheme.eq_ignore_ascii_case("https") || scheme.eq_ignore_ascii_case("http"))
        && (key == "audio_url" || rest.contains(['?', '#']))
}

/// The record's JSON without the patient fields the policy does not keep.
fn redact_patient(raw: &str, privacy: &PrivacyConfig) -> String {
    let Ok(mut value) = serde_json::from_str::<serde_json::Value>(raw) else {
        return raw.to_owned();
    };
    if let Some(p) = value.get_mut("patient").and_then(|p| p.as_object_mut()) {
        if !privacy.patient_names {
            p.remove("first_name");
            p.remove("last_name");
        }
        match privacy.date_of_birth {
            BirthDate::Full => {}
            BirthDate::Omit => {
                p.remove("date_of_birth");
            }
            BirthDate::YearOnly => {
                if let Some(year) = p
                    .get("date_of_birth")
                    .and_then(|d| d.as_str())
                    .map(|d| d.chars().take(4).collect::<String>())
                {
                    p.insert("date_of_birth".into(), serde_json::Value::String(year));
                }
            }
        }
    }
    value.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(date_of_birth: BirthDate) -> PrivacyConfig {
        PrivacyConfig {
            patient_names: true,
            date_of_birth,
            note_text: true,
            transcript_text: true,
            retention: None,
        }
    }

    fn listed(date_of_birth: &str) -> Encounter {
        Encounter::parse(&format!(
            r#"{{"encounter_id": "enc_1", "organization_id": "org_1", "encounter_type": "ambient",
                "status": "completed", "created_at": "2026-05-01T10:00:00Z",
                "updated_at": "2026-05-01T10:05:00Z", "date_of_service": null,
                "patient": {{"patient_id": "pat_1", "first_name": "Jane", "last_name": "Doe",
                             "date_of_birth": {date_of_birth}}},
                "documents": []}}"#
        ))
        .unwrap()
    }

    /// A record whose links carry `token`, in the shapes a server may embed them.
    fn with_links(token: &str) -> Encounter {
        Encounter::parse(&format!(
            r#"{{"encounter_id": "enc_1", "organization_id": "org_1", "encounter_type": "ambient",
                "status": "completed", "created_at": "2026-05-01T10:00:00Z",
                "updated_at": "2026-05-01T10:05:00Z", "date_of_service": null,
                "patient": {{"patient_id": "pat_1", "photo_url": "HTTPS://cdn.test/p.png#{token}"}},
                "portal_url": "https://app.test/encounters/enc_1",
                "question": "Why? https is not a link here",
                "consent": {{"expires_at": "2027-01-01T00:00:00Z"}},
                "links": ["https:\/\/files.test\/a.pdf?X-Amz-Signature={token}", "https://app.test/x"],
                "documents": [
                  {{"document_id": "doc_1", "schema_type": "ambient_transcript", "title": null,
                    "status": "completed", "workflow_variant": "ambient", "audio_duration_seconds": 1.5,
                    "recording": {{"audio_url": "https://media.test/doc_1.wav?token={token}",
                                   "expires_at": "2026-05-01T10:15:{token_second}Z", "format": "wav"}}}},
                  {{"document_id": "doc_2", "schema_type": "ambient_transcript", "title": null,
                    "status": "completed", "workflow_variant": "ambient", "audio_duration_seconds": 2.5,
                    "audio_url": "https://media.test/{token}/doc_2.wav",
                    "audio_url_expires_at": "2026-05-01T10:15:{token_second}Z"}}]}}"#,
            token_second = &token[..2],
        ))
        .unwrap()
    }

    #[test]
    fn signed_links_are_neither_stored_nor_compared_and_a_record_without_any_is_kept_as_received() {
        let (a, b) = (with_links("17abc0ffee"), with_links("42def1dead"));
        let (a, b) = (
            encounter_record(a, &policy(BirthDate::Full)),
            encounter_record(b, &policy(BirthDate::Full)),
        );
        assert_eq!(
            a.content_hash, b.content_hash,
            "links signed anew count as a change"
        );
        for record in [&a, &b] {
            let json = &record.raw_json;
            for gone in ["17abc", "42def", "audio_url", "X-Amz", "HTTPS://", "10:15:"] {
                assert!(!json.contains(gone), "{gone} in {json}");
            }
            for kept in [
                "https://app.test/encounters/enc_1",
                "https://app.test/x",
                "Why? https is not a link here",
                r#""consent":{"expires_at":"2027-01-01T00:00:00Z"}"#,
                r#""format":"wav""#,
                r#""patient":{"patient_id":"pat_1"}"#,
            ] {
                assert!(json.contains(kept), "{kept} not in {json}");
            }
            assert_eq!(record.documents.len(), 2);
        }
        // Anything else that changes is a change.
        let mut edited = with_links("17abc0ffee");
        edited.raw = edited.raw.replace("\"format\": \"wav\"", "\"format\": \"mp3\"");
        assert_ne!(
            encounter_record(edited, &policy(BirthDate::Full)).content_hash,
            a.content_hash
        );

        let plain = listed(r#""1970-01-02""#);
        let received = plain.raw.clone();
        assert_eq!(
            encounter_record(plain, &policy(BirthDate::Full)).raw_json,
            received
        );
    }

    #[test]
    fn a_malformed_date_of_birth_is_stored_as_null_and_the_record_is_kept() {
        for bad in [r#""01/02/1970""#, r#""""#, r#""1970-13-45""#, r#""unknown""#] {
            let record = encounter_record(listed(bad), &policy(BirthDate::Full));
            let patient = record.patient.as_ref().unwrap();
            assert_eq!(patient.date_of_birth, None, "{bad}");
            assert_eq!(patient.first_name.as_deref(), Some("Jane"), "{bad}");
            // The JSON as received, under a policy that keeps the full date.
            assert!(record.raw_json.contains(bad), "{bad}: {}", record.raw_json);
        }
        let record = encounter_record(listed(r#""1970-01-02""#), &policy(BirthDate::YearOnly));
        assert_eq!(record.patient.unwrap().date_of_birth.as_deref(), Some("1970"));
        assert!(
            record.raw_json.contains(r#""date_of_birth":"1970""#),
            "{}",
            record.raw_json
        );
        let record = encounter_record(listed("null"), &policy(BirthDate::Full));
        assert_eq!(record.patient.unwrap().date_of_birth, None);
    }
}
