//! The one place where what the list route returns becomes what the warehouse stores: a wire
//! encounter mapped to its record, keeping only the PHI the privacy policy allows (in the
//! columns and in the stored JSON), with the content hash that change detection compares.
//! Nothing here does I/O.

use std::sync::atomic::{AtomicBool, Ordering};

use time::Date;

use crate::api::wire::{Encounter, ServiceDate, UpdatedAt};
use crate::config::{BirthDate, PrivacyConfig};
use crate::store::{DocumentRecord, EncounterRecord, PatientRecord, stored_json_and_hash};

/// Maps a wire encounter to the warehouse record, keeping only the PHI `privacy` allows (in the
/// columns and in the stored JSON) and no signed link (`store::stored_json_and_hash`). The
/// content hash is over the record as received less its signed links, in canonical form, so
/// change detection depends neither on the policy nor on links a server signs anew for every
/// response.
pub fn encounter_record(e: Encounter, privacy: &PrivacyConfig) -> EncounterRecord {
    let redact = !privacy.patient_names || privacy.date_of_birth != BirthDate::Full;
    let redaction = |value: &mut serde_json::Value| redact_patient(value, privacy);
    let (raw_json, content_hash) = stored_json_and_hash(e.raw, redact.then_some(&redaction as _));
    // Never updated: stored as updated at its creation.
    let updated_at = match e.updated_at {
        UpdatedAt::At(t) => t,
        UpdatedAt::Never => e.created_at.0,
        UpdatedAt::Unreadable => {
            unreadable(Field::UpdatedAt, &e.encounter_id, None);
            e.created_at.0
        }
    };
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
    EncounterRecord {
        encounter_id: e.encounter_id,
        organization_id: e.organization_id,
        encounter_type: e.encounter_type,
        status: e.status,
        created_at: e.created_at.0,
        updated_at,
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
    UpdatedAt,
}

impl Field {
    fn unreadable(self) -> &'static str {
        match self {
            Field::DateOfBirth => "date_of_birth is not a YYYY-MM-DD date; stored as NULL",
            Field::DateOfService => {
                "date_of_service is neither an RFC 3339 timestamp nor a YYYY-MM-DD date; stored as NULL"
            }
            Field::UpdatedAt => "updated_at is not an RFC 3339 timestamp; stored as its created_at",
        }
    }
}

/// Whether a field's unreadable value was logged as a warning yet, by [`Field`].
static WARNED: [AtomicBool; 3] = [const { AtomicBool::new(false) }; 3];

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

/// Removes from the record's JSON the patient fields the policy does not keep.
fn redact_patient(value: &mut serde_json::Value, privacy: &PrivacyConfig) {
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

    #[test]
    fn an_updated_at_not_sent_or_unreadable_is_stored_as_the_created_at() {
        for (sent, expected) in [
            (r#""updated_at": "2026-05-01T10:05:00Z","#, "2026-05-01T10:05:00Z"),
            (r#""updated_at": null,"#, "2026-05-01T10:00:00Z"),
            (r#""updated_at": "","#, "2026-05-01T10:00:00Z"),
            ("", "2026-05-01T10:00:00Z"),
            (r#""updated_at": "yesterday","#, "2026-05-01T10:00:00Z"),
            (r#""updated_at": 1777629900,"#, "2026-05-01T10:00:00Z"),
        ] {
            let text = format!(
                r#"{{"encounter_id": "enc_1", "organization_id": "org_1", "created_at": "2026-05-01T10:00:00Z",
                    {sent} "documents": []}}"#
            );
            let record = encounter_record(Encounter::parse(&text).unwrap(), &policy(BirthDate::Full));
            assert_eq!(
                record.updated_at,
                crate::timefmt::parse_rfc3339(expected).unwrap(),
                "{sent}"
            );
            assert_eq!(record.raw_json, text, "the JSON keeps what was sent");
        }
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
