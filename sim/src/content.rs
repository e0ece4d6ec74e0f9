//! Derived content: note markdown, transcript turns, audio durations and the media WAV bytes,
//! all computed on demand from `(seed, document_id)` and the [`ContentParams`] that shape them;
//! also the word lists generated records draw titles, names and unsupported types from.
//!
//! Nothing here is stored, so a million documents cost no text memory, and the same seed always
//! yields the same bytes. This module knows nothing about encounters, the store, locking or HTTP.

use crate::id::{Id, fnv64, mix64};
use crate::model::{Transcript, Turn};

/// Generation parameters that also govern run-time additions and derived content.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ContentParams {
    pub(crate) seed: u64,
    pub(crate) turns_per_transcript: (u32, u32),
    pub(crate) unicode_every: u32,
    pub(crate) large_transcript_every: u32,
    /// `SimOptions::nul_in_text`.
    pub(crate) nul_in_text: bool,
}

/// What `SimOptions::nul_in_text` appends to unicode notes and turns.
pub(crate) const NUL_SUFFIX: &str = " \u{0}";

/// Titles of generated markdown notes.
pub(crate) const NOTE_TITLES: &[&str] = &[
    "Progress note",
    "SOAP note",
    "Patient instructions",
    "Discharge summary",
    "Referral letter",
];

/// Schema types (with titles) the document detail route refuses with `unsupported_document_type`.
pub(crate) const UNSUPPORTED_TYPES: &[(&str, &str)] = &[
    ("intake_form", "Intake form"),
    ("patient_questionnaire", "Patient questionnaire"),
    ("consent_form", "Consent form"),
];

/// Given names, including precomposed and combining-mark spellings (`Rene\u{301}e` is decomposed
/// on purpose: clients must store it as received).
pub(crate) const FIRST_NAMES: &[&str] = &[
    "Jane",
    "John",
    "María",
    "José",
    "Zoë",
    "Rene\u{301}e",
    "Siobhán",
    "Łukasz",
    "Ngọc",
    "Aiko",
    "Mohammed",
    "Olivia",
    "Liam",
    "Chloé",
    "Björn",
    "Priya",
    "Wei",
    "Amara",
    "Dmitri",
    "Fatima",
];

/// Family names, including non-Latin scripts.
pub(crate) const LAST_NAMES: &[&str] = &[
    "Doe",
    "Smith",
    "García",
    "Müller",
    "O'Brien",
    "Nguyễn",
    "Ødegård",
    "Nakamura",
    "李",
    "Kowalski",
    "Smith-Jones",
    "Dubois",
    "Иванов",
    "Okafor",
    "Çelik",
    "Johnson",
];

/// Inserted into every Nth turn and note: a ZWJ emoji sequence, a flag, CJK and combining marks.
const UNICODE_SNIPPETS: &[&str] = &[
    "👩‍⚕️ 头痛三天了 — cafe\u{301} au lait spots",
    "🤒 胸が痛い; naïve vs nai\u{308}ve",
    "👨‍👩‍👧 家族歴あり, 🇺🇸 visit, n\u{303}o",
    "💊×2 每天 two times, Zoe\u{308} said ✅",
    "🫀 심장 두근거림, a\u{30a}ngstro\u{308}m 🧑🏽‍⚕️",
];

const CLINICIAN_LINES: &[&str] = &[
    "Good morning, what brings you in today?",
    "How long have you had these symptoms?",
    "Any fever, chills or night sweats?",
    "Let me listen to your lungs. Deep breath in.",
    "Your blood pressure is a little high today, 142 over 91.",
    "Are you taking the lisinopril every day?",
    "I'd like to order a basic metabolic panel and a CBC.",
    "Let's schedule a follow-up in two weeks.",
    "Does the pain radiate anywhere, like your arm or jaw?",
    "On a scale of one to ten, how bad is the pain?",
    "Any allergies to medications?",
    "I'm going to send a prescription to your pharmacy.",
    "Make sure you drink plenty of fluids and rest.",
    "If it gets worse, please go to the emergency department.",
];

const PATIENT_LINES: &[&str] = &[
    "Good morning.",
    "I've had a headache for about three days now.",
    "It started after I got back from the trip.",
    "No fever, but I've been really tired.",
    "Mostly in the evening, it gets worse when I lie down.",
    "I take it most days, sometimes I forget.",
    "Maybe a six, it comes and goes.",
    "Penicillin gives me a rash.",
    "I've been sleeping badly, maybe five hours a night.",
    "My mother had high blood pressure too.",
    "Okay, that sounds good.",
    "Should I keep taking the ibuprofen?",
    "Thank you, doctor.",
];

const FAMILY_LINES: &[&str] = &[
    "She hasn't been eating much this week.",
    "He keeps forgetting his evening pills.",
    "Can I ask about the side effects?",
];

const NOTE_SENTENCES: &[&str] = &[
    "Patient reports intermittent headache for three days, worse in the evening.",
    "Denies fever, chills, chest pain or shortness of breath.",
    "Adherence to antihypertensive medication is inconsistent.",
    "Sleep has been poor, approximately five hours per night.",
    "Family history notable for hypertension in mother.",
    "Allergic to penicillin (rash).",
    "Lungs clear to auscultation bilaterally; no wheezes or crackles.",
    "Heart regular rate and rhythm, no murmurs.",
    "Abdomen soft, non-tender, non-distended.",
    "Neurological exam grossly intact.",
];

/// Duration of an ambient recording in tenths of a second: 2–40 minutes, or about three hours
/// for a large transcript (so its ~2 MB of turns fit plausibly).
pub(crate) fn audio_duration_ds(seed: u64, doc: &Id, large: bool) -> u32 {
    let mut rng = doc_rng(seed, doc, 0x0d00_a710);
    if large {
        rng.u32(100_000..=110_000)
    } else {
        rng.u32(1_200..=24_000)
    }
}

/// Tenths of a second as the seconds value the API reports.
pub(crate) fn deciseconds(ds: u32) -> f64 {
    f64::from(ds) / 10.0
}

fn doc_rng(seed: u64, doc: &Id, salt: u64) -> fastrand::Rng {
    fastrand::Rng::with_seed(mix64(seed ^ fnv64(doc.as_str().as_bytes()) ^ mix64(salt)))
}

/// The markdown text of a note.
pub(crate) fn note_text(seed: u64, doc: &Id, title: &str, unicode: bool) -> String {
    let mut rng = doc_rng(seed, doc, 0x07e7);
    let mut pick = |n: usize| -> Vec<&'static str> {
        (0..n)
            .map(|_| NOTE_SENTENCES[rng.usize(..NOTE_SENTENCES.len())])
            .collect()
    };
    let subjective = pick(3).join(" ");
    let objective = pick(2);
    let assessment = pick(1).join(" ");
    let mut text = format!(
        "# {title}\n\n## Subjective\n{subjective}\n\n## Objective\n- {}\n- {}\n\n## Assessment\n{assessment}\n\n## Plan\n1. Basic metabolic panel and CBC.\n2. Follow up in {} weeks.\n",
        objective[0],
        objective[1],
        rng.u32(2..=6)
    );
    if unicode {
        let snippet = UNICODE_SNIPPETS[rng.usize(..UNICODE_SNIPPETS.len())];
        text.push_str(&format!("\n> Patient's words: \"{snippet}\"\n"));
    }
    text
}

/// Number of turns in a large transcript and the minimum text per turn; together about 2 MB.
const LARGE_TURNS: u32 = 1_600;
const LARGE_TURN_BYTES: usize = 1_250;

/// The final transcript of an ambient document whose audio lasts `audio_ds` tenths of a second.
pub(crate) fn transcript(params: &ContentParams, doc: &Id, audio_ds: u32, large: bool) -> Transcript {
    let mut rng = doc_rng(params.seed, doc, 0x0007_a15c);
    let (min, max) = params.turns_per_transcript;
    let count = if large {
        LARGE_TURNS
    } else {
        rng.u32(min..=max).max(1)
    };
    // Timings are whole centiseconds so the JSON numbers stay short and exact.
    let total_cs = u64::from(audio_ds) * 10;
    let slot = (total_cs / u64::from(count)).max(2);
    let mut turns = Vec::with_capacity(count as usize);
    let mut speaker_is_clinician = true;
    for i in 0..u64::from(count) {
        let (speaker, lines) = if rng.u32(0..100) < 4 {
            ("family_member", FAMILY_LINES)
        } else if speaker_is_clinician {
            ("clinician", CLINICIAN_LINES)
        } else {
            ("patient", PATIENT_LINES)
        };
        speaker_is_clinician = !speaker_is_clinician;
        let mut text = String::from(lines[rng.usize(..lines.len())]);
        if large {
            while text.len() < LARGE_TURN_BYTES {
                text.push(' ');
                text.push_str(lines[rng.usize(..lines.len())]);
            }
        }
        if params.unicode_every != 0 && (i + 1).is_multiple_of(u64::from(params.unicode_every)) {
            text.push(' ');
            text.push_str(UNICODE_SNIPPETS[rng.usize(..UNICODE_SNIPPETS.len())]);
            if params.nul_in_text {
                text.push_str(NUL_SUFFIX);
            }
        }
        // Speech at roughly 14 characters per second, inside this turn's share of the recording;
        // the rest of the share is silence, so turns never overlap.
        let start = i * slot + rng.u64(0..=slot / 10);
        let speech = 40 + text.chars().count() as u64 * 7 + rng.u64(0..=60);
        let end = (start + speech).min((i + 1) * slot).max(start + 1);
        turns.push(Turn {
            speaker: speaker.to_owned(),
            start: start as f64 / 100.0,
            end: end as f64 / 100.0,
            text,
        });
    }
    Transcript {
        provider: "deepgram".to_owned(),
        audio_duration_seconds: Some(deciseconds(audio_ds)),
        turns,
    }
}

/// A quarter second of 8 kHz, 8-bit mono PCM: a tone whose pitch depends on the document id.
pub(crate) fn wav_bytes(seed: u64, document_id: &str) -> Vec<u8> {
    const RATE: u32 = 8_000;
    const SAMPLES: u32 = RATE / 4;
    let mut out = Vec::with_capacity(44 + SAMPLES as usize);
    out.extend_from_slice(b"RIFF");
    out.extend_from_slice(&(36 + SAMPLES).to_le_bytes());
    out.extend_from_slice(b"WAVEfmt ");
    out.extend_from_slice(&16u32.to_le_bytes()); // fmt chunk size
    out.extend_from_slice(&1u16.to_le_bytes()); // PCM
    out.extend_from_slice(&1u16.to_le_bytes()); // mono
    out.extend_from_slice(&RATE.to_le_bytes());
    out.extend_from_slice(&RATE.to_le_bytes()); // byte rate = rate * 1 channel * 1 byte
    out.extend_from_slice(&1u16.to_le_bytes()); // block align
    out.extend_from_slice(&8u16.to_le_bytes()); // bits per sample
    out.extend_from_slice(b"data");
    out.extend_from_slice(&SAMPLES.to_le_bytes());
    let pitch = 220 + (mix64(seed ^ fnv64(document_id.as_bytes())) % 440) as u32;
    let period = RATE / pitch;
    for n in 0..SAMPLES {
        // A triangle wave: cheap, deterministic and audible.
        let phase = (n % period) * 512 / period;
        let level = if phase < 256 { phase } else { 511 - phase };
        out.push(64 + (level / 2) as u8);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(unicode_every: u32) -> ContentParams {
        ContentParams {
            seed: 9,
            turns_per_transcript: (20, 80),
            unicode_every,
            large_transcript_every: 0,
            nul_in_text: false,
        }
    }

    fn some_doc() -> Id {
        Id::mint(b"doc", 0, mix64(1))
    }

    #[test]
    fn transcripts_are_deterministic_ordered_and_carry_unicode_every_nth_turn() {
        let doc = some_doc();
        let a = transcript(&params(3), &doc, 6_000, false);
        let b = transcript(&params(3), &doc, 6_000, false);
        assert_eq!(a, b);
        assert!((20..=80).contains(&a.turns.len()));
        for pair in a.turns.windows(2) {
            assert!(pair[0].start < pair[0].end && pair[0].end <= pair[1].start);
        }
        assert!(a.turns.last().unwrap().end <= 600.0);
        assert!(a.turns[2].text.chars().any(|c| c == '\u{200d}' || !c.is_ascii()));
        assert!(a.turns[0].text.is_ascii());
    }

    #[test]
    fn large_transcripts_are_about_two_megabytes() {
        let t = transcript(&params(0), &some_doc(), 100_000, true);
        let bytes: usize = t.turns.iter().map(|t| t.text.len()).sum();
        assert!((1_900_000..2_300_000).contains(&bytes), "{bytes}");
    }

    #[test]
    fn wav_header_matches_its_length() {
        let wav = wav_bytes(1, "doc_x");
        assert_eq!(&wav[..4], b"RIFF");
        let data_len = u32::from_le_bytes(wav[40..44].try_into().unwrap()) as usize;
        assert_eq!(wav.len(), 44 + data_len);
    }
}
