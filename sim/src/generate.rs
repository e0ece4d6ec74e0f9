//! Deterministic generation of the initial data set from `SimOptions`.
//!
//! Everything is drawn from the store's seeded RNG in one sequential pass, so a seed and a set of
//! options always produce the same encounters. `created_at` clusters in clinic hours of a fixed
//! UTC-5 clinic, with occasional exact ties (batch imports) and mixed sub-second precision; the
//! optional `bulk_instants` add large batches sharing one instant after that pass. Generation
//! stores no text; see `content` for what is derived later.

use crate::model::{DocKind, NewEncounter, Visibility};
use crate::options::SimOptions;
use crate::store::{EncRec, Store};
use crate::timestamp::{micros, nanos};

const SECOND: i64 = 1_000_000_000;
const MINUTE: i64 = 60 * SECOND;
const HOUR: i64 = 60 * MINUTE;
const DAY: i64 = 24 * HOUR;

/// The simulated clinic keeps US Eastern standard time, without daylight saving.
const CLINIC_OFFSET: i64 = -5 * HOUR;

/// Fills `store` with `opts.encounters` encounters over `[opts.start, opts.end)`.
pub(crate) fn populate(store: &mut Store, opts: &SimOptions) {
    let patients = opts.effective_patients();
    store.reserve(opts.encounters, patients);
    for _ in 0..patients {
        store.add_patient(None);
    }
    let (start, end) = (nanos(opts.start), nanos(opts.end));
    let (min_docs, max_docs) = (
        opts.docs_per_encounter.0.min(opts.docs_per_encounter.1),
        opts.docs_per_encounter.0.max(opts.docs_per_encounter.1),
    );
    let mut previous_created = None;
    let mut doc_counter: u64 = 0;
    for index in 0..opts.encounters {
        let rng = &mut store.rng;
        // About 2% share the previous record's created_at exactly, as a batch import would, so
        // the encounter_id tie-break is exercised.
        let data_unit = opts.query_precision.data_unit(opts.micro_data);
        let fine = opts.nanosecond_timestamps && data_unit == 1;
        let created = match previous_created {
            Some(previous) if rng.u32(0..100) < 2 => previous,
            _ if fine => {
                // Any nanosecond of the second sampled, then truncated to a random precision.
                let at = sample_created(rng, start, end, 1) + rng.i64(0..SECOND);
                at_any_precision(rng, at.min(end - 1)).max(start)
            }
            _ => sample_created(rng, start, end, data_unit),
        };
        previous_created = Some(created);
        // Generated timestamps have at most microsecond precision, like the database behind the
        // real API (unless `nanosecond_timestamps`); created_at may be coarser (see
        // `sample_created`).
        let updated = created
            + rng
                .i64(5 * MINUTE..=180 * MINUTE)
                .min((end - created).max(SECOND));
        // At least five minutes after `created`: truncating to a whole minute keeps it after.
        let updated = if opts.null_updated_at && index % 5 == 0 {
            created
        } else if fine {
            at_any_precision(rng, updated).max(created)
        } else {
            micros(updated)
        };
        let date_of_service = if rng.u32(0..100) < 80 {
            created
        } else {
            // Scheduled slot start: the quarter hour the visit began in.
            created - created.rem_euclid(15 * MINUTE)
        };
        let ambient = rng.u32(0..100) < 65;
        let processing = ambient && rng.u32(0..100) < 3;
        let status_roll = rng.u32(0..100);
        let patient = rng.u32(0..patients as u32);
        let doc_count = rng.u32(min_docs..=max_docs);
        let v = &store.vocab;
        let status = if processing || (92..97).contains(&status_roll) {
            v.in_progress
        } else if status_roll >= 97 {
            v.pending_review
        } else {
            v.completed
        };
        let encounter_type = if ambient {
            v.ambient
        } else {
            v.clinical_documentation
        };
        let mut docs = Vec::with_capacity(doc_count as usize);
        for index in 0..doc_count {
            doc_counter += 1;
            let unsupported = opts.unsupported_doc_every != 0
                && doc_counter.is_multiple_of(u64::from(opts.unsupported_doc_every));
            let kind = match (unsupported, ambient && index == 0, processing) {
                (true, _, _) => DocKind::Unsupported,
                (false, true, true) => DocKind::Ambient,
                (false, true, false) => DocKind::AmbientFinal,
                (false, false, _) => DocKind::Note,
            };
            let doc_created = micros(created + store.rng.i64(0..=2 * MINUTE)).min(updated);
            let doc_updated = micros(doc_created + store.rng.i64(SECOND..=60 * MINUTE)).min(updated);
            docs.push(store.new_doc(kind, doc_created, doc_updated));
        }
        let id = store.mint_encounter_id();
        store.push_generated(EncRec {
            id,
            encounter_type,
            status,
            created,
            updated,
            date_of_service,
            patient,
            visibility: Visibility::Visible,
            docs,
        });
    }
    for (at, count) in &opts.bulk_instants {
        // A batch import: every record keeps the instant it was imported at as `updated_at`.
        let created = store.precise(nanos(*at));
        let new = NewEncounter::at(*at);
        for _ in 0..*count {
            store.push_new(&new, created, created);
        }
    }
    store.rebuild_index();
}

/// `at` truncated to a random precision from whole minutes down to the nanosecond, so that its
/// text has anything from 0 to 9 fractional digits.
fn at_any_precision(rng: &mut fastrand::Rng, at: i64) -> i64 {
    let unit = match rng.u32(0..11) {
        10 => MINUTE,
        digits => 10_i64.pow(9 - digits),
    };
    at - at.rem_euclid(unit)
}

/// A creation instant in `[start, end)`, weighted toward weekday clinic hours, truncated to a
/// mix of precisions (whole minutes, seconds, milliseconds, microseconds), never finer than
/// `data_unit` nanoseconds (`QueryPrecision::data_unit`).
fn sample_created(rng: &mut fastrand::Rng, start: i64, end: i64, data_unit: i64) -> i64 {
    let mut at = rng.i64(start..end);
    // Rejection sampling; bounded so tiny or night-only windows still terminate.
    for _ in 0..64 {
        let local = at + CLINIC_OFFSET;
        let hour = local.div_euclid(HOUR).rem_euclid(24);
        // 1970-01-01 was a Thursday: day 0 + 4 → weekday with 0 = Sunday.
        let weekday = (local.div_euclid(DAY) + 4).rem_euclid(7);
        let workday = (1..=5).contains(&weekday);
        let weight = match (workday, hour) {
            (true, 8..=17) => 100,
            (true, 7 | 18..=20) => 15,
            (false, 9..=13) => 8,
            _ => 2,
        };
        if rng.u32(0..100) < weight {
            break;
        }
        at = rng.i64(start..end);
    }
    let unit = match rng.u32(0..100) {
        0..10 => MINUTE,
        10..55 => SECOND,
        55..80 => 1_000_000,
        _ => 1_000,
    }
    .max(data_unit);
    let truncated = at - at.rem_euclid(unit);
    if truncated >= start {
        truncated
    } else {
        // `start` itself is finer than the unit: round up to the next multiple of the data's
        // unit instead (past `end` only in a window shorter than that unit, which holds no
        // valid instant).
        let up = at + (data_unit - 1);
        up - up.rem_euclid(data_unit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    fn options(seed: u64) -> SimOptions {
        SimOptions {
            seed,
            encounters: 2_000,
            start: datetime!(2026-03-01 00:00 UTC),
            end: datetime!(2026-05-01 00:00 UTC),
            ..SimOptions::default()
        }
    }

    fn generate(opts: &SimOptions) -> Store {
        let mut store = Store::new(opts);
        populate(&mut store, opts);
        store
    }

    #[test]
    fn the_same_seed_generates_the_same_data() {
        let (a, b) = (generate(&options(7)), generate(&options(7)));
        let c = generate(&options(8));
        let all = |s: &Store| {
            s.visible_slots()
                .map(|slot| s.to_public(slot))
                .collect::<Vec<_>>()
        };
        assert_eq!(all(&a), all(&b));
        assert_ne!(all(&a), all(&c));
    }

    #[test]
    fn generated_data_is_varied_and_within_bounds() {
        let opts = options(3);
        let store = generate(&opts);
        let all: Vec<_> = store.visible_slots().map(|slot| store.to_public(slot)).collect();
        assert_eq!(all.len(), 2_000);
        assert!(
            all.iter()
                .all(|e| e.created_at >= opts.start && e.created_at < opts.end)
        );
        assert!(all.iter().all(|e| e.updated_at >= e.created_at));
        assert!(
            all.windows(2).any(|w| w[0].created_at == w[1].created_at),
            "ties exist"
        );
        assert!(
            all.iter().any(|e| e.created_at.nanosecond() != 0),
            "sub-second values exist"
        );
        assert!(all.iter().any(|e| e.encounter_type == "clinical_documentation"));
        assert!(all.iter().any(|e| e.status != "completed"));
        assert!(
            all.iter().any(|e| e.patient.first_name.is_none()),
            "withheld patients exist"
        );
        let docs: Vec<_> = all.iter().flat_map(|e| &e.documents).collect();
        assert!(docs.iter().any(|d| d.schema_type == "intake_form"
            || d.schema_type == "patient_questionnaire"
            || d.schema_type == "consent_form"));
        assert!(docs.iter().any(|d| d.status.as_deref() == Some("processing")));
        let patients: std::collections::HashSet<_> = all.iter().map(|e| &e.patient.patient_id).collect();
        assert!(patients.len() < all.len(), "patients are shared");
        let business = all
            .iter()
            .filter(|e| (13..23).contains(&e.created_at.hour()))
            .count();
        assert!(business * 2 > all.len(), "clustered in clinic hours: {business}");
    }

    #[test]
    fn nanosecond_timestamps_render_every_precision_from_none_to_nine_digits() {
        let digits = |t: time::OffsetDateTime| format!("{:09}", t.nanosecond()).trim_end_matches('0').len();
        let fine = SimOptions {
            nanosecond_timestamps: true,
            ..options(5)
        };
        let store = generate(&fine);
        let all: Vec<_> = store.visible_slots().map(|slot| store.to_public(slot)).collect();
        let seen: std::collections::BTreeSet<usize> = all
            .iter()
            .flat_map(|e| [digits(e.created_at), digits(e.updated_at)])
            .collect();
        assert_eq!(seen, (0..=9).collect());
        assert!(
            all.iter().all(|e| e.created_at >= fine.start
                && e.created_at < fine.end
                && e.updated_at >= e.created_at)
        );
        // Only with nanosecond queries: a server at microseconds keeps at most six digits.
        let micro = SimOptions {
            query_precision: crate::options::QueryPrecision::TruncateMicros,
            ..fine
        };
        let store = generate(&micro);
        assert!(
            store
                .visible_slots()
                .map(|slot| store.to_public(slot))
                .all(|e| digits(e.created_at) <= 6 && digits(e.updated_at) <= 6)
        );
    }
}
