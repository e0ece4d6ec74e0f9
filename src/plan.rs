//! `charthero-sync plan`: how long will the first backfill take? From a few cheap requests — one
//! `limit=1` total per calendar month of the configured range and a sample page from up to three
//! months — it estimates how many encounters the range holds and how many requests (list pages,
//! note details, finished transcripts, recordings) and hours the first backfill takes at the
//! configured rate. The same request model gives the ETA of a running backfill in `status`.
//! It writes nothing and stores nothing it reads.

use std::time::Instant;

use serde::Serialize;
use time::{Date, Month, OffsetDateTime, Time};

use crate::api::wire::Encounter;
use crate::api::{ApiError, Client, ListQuery, SortOrder};
use crate::config::{Config, Organization};
use crate::timefmt::{Micros, format_utc};

/// Encounters sampled per sample page.
const SAMPLE_PAGE: u32 = 100;

/// Window verification and re-anchoring: a list-only backfill makes about one request per 99
/// new records plus one per 5,000-record window (measured: 1.031 × ⌈N / 100⌉ for 100,000).
fn list_requests(encounters: u64) -> u64 {
    encounters.div_ceil(99) + encounters.div_ceil(5_000)
}

/// What the documents of sampled encounters call for, per encounter.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct ContentMix {
    /// Notes (`schema_type = 'document'`): one detail request each.
    pub notes: f64,
    /// Ambient transcripts whose list summary may be final (`store::may_be_final`): one
    /// transcript request each (and a recording, when audio is on).
    pub finished_transcripts: f64,
    /// Other document types: one detail request each, answered `unsupported_document_type`.
    pub other_documents: f64,
}

impl ContentMix {
    /// The mix of a set of encounters as listed.
    pub fn of(encounters: &[Encounter]) -> ContentMix {
        let n = encounters.len().max(1) as f64;
        let mut mix = ContentMix::default();
        for d in encounters.iter().flat_map(|e| &e.documents) {
            match d.schema_type.as_str() {
                "document" => mix.notes += 1.0,
                "ambient_transcript" if crate::store::may_be_final(d.status.as_deref()) => {
                    mix.finished_transcripts += 1.0;
                }
                "ambient_transcript" => {}
                _ => mix.other_documents += 1.0,
            }
        }
        ContentMix {
            notes: mix.notes / n,
            finished_transcripts: mix.finished_transcripts / n,
            other_documents: mix.other_documents / n,
        }
    }

    /// Content requests per encounter under `config` (details, transcripts, audio).
    pub fn requests_per_encounter(&self, config: &Config) -> f64 {
        let mut r = 0.0;
        if config.content.details {
            r += self.notes + self.other_documents;
        }
        if config.content.transcripts {
            r += self.finished_transcripts;
        }
        if config.audio.enabled {
            // The signed URL, then the download; both pass the limiter.
            r += 2.0 * self.finished_transcripts;
        }
        r
    }
}

/// Encounters created in one calendar month of the range.
#[derive(Debug, Clone, Serialize)]
pub struct MonthCount {
    pub month: String,
    pub encounters: u64,
}

/// The estimate.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    /// The `[[organizations]]` name (`default` without it) whose key was asked.
    pub organization: String,
    pub range_start: String,
    pub range_end: String,
    pub months: Vec<MonthCount>,
    pub encounters: u64,
    pub sampled_encounters: u64,
    pub mix: ContentMix,
    pub list_requests: u64,
    pub content_requests: u64,
    pub total_requests: u64,
    /// The organization's `requests_per_second`, at most `limits.requests_per_second`.
    pub configured_rate: f64,
    /// The median latency of the plan's own requests, in seconds.
    pub latency_seconds: f64,
    /// The rate the backfill can reach: the configured rate, or `max_in_flight / latency` when
    /// that is lower.
    pub effective_rate: f64,
    pub hours: f64,
    /// Requests the plan itself made.
    pub probe_requests: u64,
}

/// Requests a backfill of `encounters` with this content mix makes under `config`.
pub fn requests_for(encounters: u64, mix: &ContentMix, config: &Config) -> (u64, u64) {
    let content = (encounters as f64 * mix.requests_per_encounter(config)).round() as u64;
    (list_requests(encounters), content)
}

/// First instants of the calendar months overlapping `[start, end)`, then `end`.
fn month_bounds(start: OffsetDateTime, end: OffsetDateTime) -> Vec<OffsetDateTime> {
    let mut bounds = vec![start];
    let mut month = first_of_month(start.date());
    loop {
        let next = next_month(month);
        let at = next.with_time(Time::MIDNIGHT).assume_utc();
        if at >= end {
            break;
        }
        bounds.push(at);
        month = next;
    }
    bounds.push(end);
    bounds
}

fn first_of_month(d: Date) -> Date {
    Date::from_calendar_date(d.year(), d.month(), 1).unwrap_or(d)
}

fn next_month(d: Date) -> Date {
    let (year, month) = match d.month() {
        Month::December => (d.year() + 1, Month::January),
        m => (d.year(), m.next()),
    };
    Date::from_calendar_date(year, month, 1).unwrap_or(d)
}

/// Asks for the totals and samples through `client` (the organization's key) and builds the
/// estimate for the range the first backfill of `organization` would list:
/// `[start_at, now − settle_lag)`, at its budget under the `[limits]` ceiling. The estimate is for
/// the organization alone: clinics backfilling at the same time share the ceiling.
pub async fn estimate(
    config: &Config,
    organization: &Organization,
    client: &Client,
    now: OffsetDateTime,
) -> Result<Plan, ApiError> {
    let start = organization.start_at;
    let end = (now - config.sync.settle_lag).max(start);
    let bounds = month_bounds(start, end);
    let mut latencies = Vec::new();
    let mut months = Vec::new();
    let mut ranges = Vec::new();
    for pair in bounds.windows(2) {
        let (a, b) = (Micros::floor(pair[0]), Micros::ceil(pair[1]));
        if a >= b {
            continue;
        }
        let started = Instant::now();
        let page = client.list_encounters(&query(a, b, 0, 1)).await?;
        latencies.push(started.elapsed().as_secs_f64());
        months.push(MonthCount {
            month: format!("{:04}-{:02}", pair[0].year(), u8::from(pair[0].month())),
            encounters: page.total,
        });
        ranges.push((a, b, page.total));
    }
    // Samples from the first, middle and last non-empty months: content changes over time (old
    // encounters are finished, recent ones may not be).
    let filled: Vec<_> = ranges.iter().filter(|r| r.2 > 0).collect();
    let mut picks: Vec<_> = [0, filled.len() / 2, filled.len().saturating_sub(1)]
        .into_iter()
        .filter_map(|i| filled.get(i).copied())
        .collect();
    picks.dedup();
    let mut sample = Vec::new();
    for &&(a, b, total) in &picks {
        let offset = (total / 2)
            .saturating_sub(u64::from(SAMPLE_PAGE) / 2)
            .min(u64::from(crate::api::MAX_OFFSET)) as u32;
        let started = Instant::now();
        let page = client.list_encounters(&query(a, b, offset, SAMPLE_PAGE)).await?;
        latencies.push(started.elapsed().as_secs_f64());
        sample.extend(page.items);
    }
    let encounters: u64 = months.iter().map(|m| m.encounters).sum();
    let mix = ContentMix::of(&sample);
    let (list, content) = requests_for(encounters, &mix, config);
    latencies.sort_by(f64::total_cmp);
    let latency = latencies.get(latencies.len() / 2).copied().unwrap_or(0.0);
    let configured = organization
        .budget
        .requests_per_second
        .min(config.limits.requests_per_second);
    let in_flight = organization
        .budget
        .max_in_flight
        .min(config.limits.max_in_flight)
        .get() as f64;
    let effective = if latency > 0.0 {
        configured.min(in_flight / latency)
    } else {
        configured
    };
    let total = list + content;
    Ok(Plan {
        organization: organization.name.clone(),
        range_start: format_utc(start),
        range_end: format_utc(end),
        months,
        encounters,
        sampled_encounters: sample.len() as u64,
        mix,
        list_requests: list,
        content_requests: content,
        total_requests: total,
        configured_rate: configured,
        latency_seconds: latency,
        effective_rate: effective,
        hours: total as f64 / effective / 3600.0,
        probe_requests: latencies.len() as u64,
    })
}

fn query(a: Micros, b: Micros, offset: u32, limit: u32) -> ListQuery {
    ListQuery {
        start_at: Some(a),
        end_at: Some(b),
        offset,
        limit,
        sort: SortOrder::Asc,
    }
}

/// Seconds as `2 h 05 min` or `41 s`.
pub fn duration_text(seconds: f64) -> String {
    let s = seconds.max(0.0).round() as u64;
    match s {
        0..60 => format!("{s} s"),
        60..3_600 => format!("{} min {:02} s", s / 60, s % 60),
        _ => format!("{} h {:02} min", s / 3_600, (s % 3_600) / 60),
    }
}

impl Plan {
    /// The human-readable report.
    pub fn render(&self) -> String {
        let months: Vec<String> = self
            .months
            .iter()
            .map(|m| format!("{} {}", m.month, m.encounters))
            .collect();
        format!(
            "range            {} .. {}\n\
             encounters       {} ({})\n\
             documents        per encounter: {:.2} notes, {:.2} finished transcripts, {:.2} other (sample of {})\n\
             requests         {} list + {} content = {}\n\
             rate             {} req/s configured; median latency {:.0} ms; effective {:.1} req/s\n\
             first backfill   about {}\n\
             plan requests    {}\n",
            self.range_start,
            self.range_end,
            self.encounters,
            months.join(", "),
            self.mix.notes,
            self.mix.finished_transcripts,
            self.mix.other_documents,
            self.sampled_encounters,
            self.list_requests,
            self.content_requests,
            self.total_requests,
            self.configured_rate,
            self.latency_seconds * 1000.0,
            self.effective_rate,
            duration_text(self.hours * 3600.0),
            self.probe_requests,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    #[test]
    fn months_tile_the_range_at_calendar_boundaries() {
        let b = month_bounds(datetime!(2025-11-15 10:00 UTC), datetime!(2026-02-03 0:00 UTC));
        assert_eq!(
            b,
            vec![
                datetime!(2025-11-15 10:00 UTC),
                datetime!(2025-12-01 0:00 UTC),
                datetime!(2026-01-01 0:00 UTC),
                datetime!(2026-02-01 0:00 UTC),
                datetime!(2026-02-03 0:00 UTC),
            ]
        );
        let one = month_bounds(datetime!(2026-03-02 0:00 UTC), datetime!(2026-03-09 0:00 UTC));
        assert_eq!(one.len(), 2);
    }

    #[test]
    fn list_requests_follow_the_measured_backfill_cost() {
        // 1,031 measured for a quiet 100,000-encounter backfill.
        assert_eq!(list_requests(100_000), 1_011 + 20);
        assert_eq!(list_requests(0), 0);
    }

    #[test]
    fn durations_read_as_an_operator_would_say_them() {
        assert_eq!(duration_text(41.2), "41 s");
        assert_eq!(duration_text(125.0), "2 min 05 s");
        assert_eq!(duration_text(7_500.0), "2 h 05 min");
    }
}
