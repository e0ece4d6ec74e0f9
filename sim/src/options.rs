//! `SimOptions`: everything that shapes the generated data set and the wire rendering at start.
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
