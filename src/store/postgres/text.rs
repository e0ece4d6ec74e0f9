//! PostgreSQL's `text` cannot hold U+0000 (NUL), which JSON may carry (`\u0000`) and SQLite
//! stores: a record with one would fail its page's write on every attempt. The PostgreSQL
//! backend stores such text with each NUL replaced by U+FFFD (the replacement character);
//! `raw_json` keeps the record's exact JSON text, where NUL is the six characters `\u0000`.
//! Records without NUL (all but a few) are written as they are, without a copy.

use std::borrow::Cow;

use crate::store::{DetailOutcome, EncounterRecord, TranscriptRecord};

/// What replaces U+0000 in stored text.
pub(super) const NUL_REPLACEMENT: char = '\u{FFFD}';

fn clean(text: &mut String) {
    if text.contains('\0') {
        *text = text.replace('\0', &NUL_REPLACEMENT.to_string());
    }
}

fn clean_opt(text: &mut Option<String>) {
    if let Some(text) = text {
        clean(text);
    }
}

/// The page's records with NUL replaced in every decoded field. A decoded string holds NUL
/// only if the record's JSON has the escape `\u0000` (JSON cannot carry a raw control
/// character), so that is the test for copying.
pub(super) fn records(records: &[EncounterRecord]) -> Cow<'_, [EncounterRecord]> {
    if !records.iter().any(|r| r.raw_json.contains("\\u0000")) {
        return Cow::Borrowed(records);
    }
    let mut owned = records.to_vec();
    for r in &mut owned {
        clean(&mut r.encounter_id);
        clean(&mut r.organization_id);
        clean_opt(&mut r.encounter_type);
        clean_opt(&mut r.status);
        if let Some(p) = &mut r.patient {
            clean(&mut p.patient_id);
            clean_opt(&mut p.first_name);
            clean_opt(&mut p.last_name);
            clean_opt(&mut p.date_of_birth);
        }
        for d in &mut r.documents {
            clean(&mut d.document_id);
            clean(&mut d.schema_type);
            clean_opt(&mut d.title);
            clean_opt(&mut d.status);
            clean_opt(&mut d.workflow_variant);
        }
    }
    Cow::Owned(owned)
}

/// A document detail with NUL replaced in its text fields.
pub(super) fn outcome(outcome: &DetailOutcome) -> Cow<'_, DetailOutcome> {
    let has_nul = match outcome {
        DetailOutcome::Note { format, text, .. } => {
            format.contains('\0') || text.as_deref().is_some_and(|t| t.contains('\0'))
        }
        DetailOutcome::Ambient { status, .. } => status.as_deref().is_some_and(|s| s.contains('\0')),
        DetailOutcome::Unsupported | DetailOutcome::Unavailable => false,
    };
    if !has_nul {
        return Cow::Borrowed(outcome);
    }
    let mut owned = outcome.clone();
    match &mut owned {
        DetailOutcome::Note { format, text, .. } => {
            clean(format);
            clean_opt(text);
        }
        DetailOutcome::Ambient { status, .. } => clean_opt(status),
        DetailOutcome::Unsupported | DetailOutcome::Unavailable => {}
    }
    Cow::Owned(owned)
}

/// A transcript with NUL replaced in its provider, speakers and turns' text. Its digest stays
/// the one of the text as received, so an unchanged transcript is still not rewritten.
pub(super) fn transcript(t: &TranscriptRecord) -> Cow<'_, TranscriptRecord> {
    let has = |s: &Option<String>| s.as_deref().is_some_and(|s| s.contains('\0'));
    if !has(&t.provider) && !t.turns.iter().any(|turn| has(&turn.0) || has(&turn.3)) {
        return Cow::Borrowed(t);
    }
    let mut owned = t.clone();
    clean_opt(&mut owned.provider);
    for turn in &mut owned.turns {
        clean_opt(&mut turn.0);
        clean_opt(&mut turn.3);
    }
    Cow::Owned(owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nul_becomes_the_replacement_character_and_clean_text_is_not_copied() {
        let mut s = "Ada\0Null \0".to_owned();
        clean(&mut s);
        assert_eq!(s, "Ada\u{FFFD}Null \u{FFFD}");
        let note = DetailOutcome::Note {
            format: "markdown".into(),
            text: Some("plain".into()),
            created_at: time::OffsetDateTime::UNIX_EPOCH,
            updated_at: time::OffsetDateTime::UNIX_EPOCH,
        };
        assert!(matches!(outcome(&note), Cow::Borrowed(_)));
        let nul = DetailOutcome::Note {
            format: "markdown".into(),
            text: Some("a\0b".into()),
            created_at: time::OffsetDateTime::UNIX_EPOCH,
            updated_at: time::OffsetDateTime::UNIX_EPOCH,
        };
        match outcome(&nul).as_ref() {
            DetailOutcome::Note { text, .. } => assert_eq!(text.as_deref(), Some("a\u{FFFD}b")),
            other => panic!("{other:?}"),
        }
    }
}
