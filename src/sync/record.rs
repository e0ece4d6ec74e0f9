//! The one place where what the list route returns becomes what the warehouse stores: a wire
//! encounter mapped to its record, keeping only the PHI the privacy policy allows (in the
//! columns and in the stored JSON), with the content hash that change detection compares.
//! Nothing here does I/O.

use sha2::{Digest, Sha256};

use crate::api::wire::Encounter;
use crate::config::{BirthDate, PrivacyConfig};
use crate::store::{DocumentRecord, EncounterRecord, PatientRecord, hex};

/// Maps a wire encounter to the warehouse record, keeping only the PHI `privacy` allows (in the
/// columns and in the stored JSON). The content hash is over the record as received, so change
/// detection does not depend on the policy.
pub fn encounter_record(e: Encounter, privacy: &PrivacyConfig) -> EncounterRecord {
    let content_hash = hex(&Sha256::digest(e.raw.as_bytes()));
    let redact = !privacy.patient_names || privacy.date_of_birth != BirthDate::Full;
    let raw_json = if redact {
        redact_patient(&e.raw, privacy)
    } else {
        e.raw
    };
    EncounterRecord {
        encounter_id: e.encounter_id,
        organization_id: e.organization_id,
        encounter_type: e.encounter_type,
        status: e.status,
        created_at: e.created_at.0,
        updated_at: e.updated_at.0,
        date_of_service: e.date_of_service.map(|t| t.0),
        patient: e.patient.map(|p| PatientRecord {
            patient_id: p.patient_id,
            first_name: p.first_name.filter(|_| privacy.patient_names),
            last_name: p.last_name.filter(|_| privacy.patient_names),
            date_of_birth: p.date_of_birth.and_then(|d| match privacy.date_of_birth {
                BirthDate::Full => Some(d.to_string()),
                BirthDate::YearOnly => Some(format!("{:04}", d.year())),
                BirthDate::Omit => None,
            }),
        }),
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
