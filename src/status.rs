//! `charthero-sync status`: what the warehouse says about the sync, read through the store's
//! read-only [`crate::store::Reader`] so it works while the daemon writes (the queries are the
//! backend's). Text for people, `--json` for scripts.

use std::fmt::Write;

use serde::Serialize;
use time::OffsetDateTime;

use crate::timefmt::{format_utc, parse_rfc3339};

#[derive(Debug, Serialize)]
pub struct Status {
    /// Which warehouse this is.
    pub database: Database,
    /// Everything created before this instant is known to be complete (of every organization:
    /// the watermark of the one furthest behind; decided by [`read`]).
    pub complete_through: Option<String>,
    /// Seconds between `complete_through` and now.
    pub lag_seconds: Option<i64>,
    /// One entry per organization, configured or found in the warehouse, in that order.
    pub organizations: Vec<OrganizationStatus>,
    pub rows: Rows,
    pub queue: Queue,
    /// The most recent cycles, newest first.
    pub runs: Vec<Run>,
    /// Every backfill queued or running, and the most recent completed ones, oldest first.
    pub backfills: Vec<Backfill>,
    /// The newest history audit (running or completed), if any ever ran.
    pub audit: Option<Audit>,
    pub dead_letter_count: i64,
    /// The oldest dead letters (at most 20).
    pub dead_letters: Vec<DeadLetter>,
    /// Routes the last finished cycle found closed to the key, as `route:reason_code` pairs;
    /// empty when every route worked.
    pub disabled_routes: Vec<String>,
    /// The error of the last cycle that did not succeed, if the last cycle did not.
    pub last_error: Option<LastError>,
}

/// The warehouse `status` read: its backend and where it is.
#[derive(Debug, Serialize)]
pub struct Database {
    /// `sqlite` or `postgresql`.
    pub backend: &'static str,
    /// The SQLite file, or the PostgreSQL URL (never with a password).
    pub location: String,
}

/// One organization: where its sync stands, and whether (and why) it is stopped.
#[derive(Debug, Default, Serialize)]
pub struct OrganizationStatus {
    /// The configured name (`default` without `[[organizations]]`).
    pub name: String,
    /// ChartHero's id of the clinic, once known (configured or learnt from its first page).
    pub organization_id: Option<String>,
    /// Its watermark: the backend reads it as stored (`timefmt::format_stored`), [`read`]
    /// renders it for people and derives `lag_seconds` from it.
    pub complete_through: Option<String>,
    pub lag_seconds: Option<i64>,
    /// `ok` (the last cycle succeeded), `incomplete` (it left work undone), `interrupted` (a
    /// signal stopped it, or its first cycle stalled; the next cycle resumes), `failing` (it
    /// failed; retried), `stopped` (its key was refused, or its IDs collide with another
    /// clinic's: nothing is sent with it until the operator acts), `never_synced`, `syncing` (no cycle finished yet; the first is at work).
    pub state: String,
    /// Why, when not `ok`: the upstream `reason_code` (e.g. `revoked_key`) or ours (e.g.
    /// `organization_mismatch`).
    pub reason_code: Option<String>,
    pub last_run: Option<Run>,
    pub last_error: Option<LastError>,
    /// Routes the last finished cycle found closed to this key (`route:reason_code`).
    pub disabled_routes: Vec<String>,
    /// While ChartHero's `Retry-After` pause lasts: until when no request is sent with this
    /// key, by any process (RFC 3339, UTC).
    pub paused_until: Option<String>,
    pub encounters: i64,
    pub encounters_removed: i64,
    pub documents: i64,
    pub transcripts: i64,
    pub dead_letters: i64,
    pub backfills_pending: i64,
    /// Its cycle running now, if any.
    pub running_cycle: Option<RunningCycle>,
    /// Its content work waiting in the queue.
    pub queue: Queue,
    /// Requests its content queue still needs under the configuration (a detail per document,
    /// a transcript each, two per recording); filled in by [`Status::estimate`].
    pub content_requests_pending: i64,
    /// Encounters created between its watermark and now that are not listed yet, as many as
    /// the density of its stored history predicts (the rest of a first sync, or what a stopped
    /// sync has to catch up); filled in by [`Status::estimate`].
    pub encounters_unlisted_estimate: i64,
    /// Seconds until both are done at its rate (its `requests_per_second`, at most
    /// `[limits]`'s), by the model of `charthero-sync plan`; `None` when nothing is left, or the
    /// organization is not configured.
    pub eta_seconds: Option<f64>,
    /// The webhook events its endpoint stored, when it holds any (`[webhook]`; handled ones are
    /// kept 30 days).
    pub webhooks: Option<Webhooks>,
}

/// An organization's webhook deliveries (`webhook_events`).
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize)]
pub struct Webhooks {
    /// Events stored: those of the last 30 days and those not handled yet (a repeated delivery
    /// of one counts once).
    pub events: i64,
    /// Events no cycle has handled yet.
    pub pending: i64,
    /// When the latest delivery arrived (the stored fixed-width text).
    pub last_received_at: Option<String>,
}

/// An organization's cycle that has not finished.
#[derive(Debug, Serialize)]
pub struct RunningCycle {
    pub run_id: i64,
    pub trigger: String,
    pub started_at: String,
    /// When it last wrote its counters (`sync_runs` shows them), every
    /// [`crate::sync::PROGRESS_EVERY`] while it runs; none in its first seconds.
    pub progress_at: Option<String>,
    /// Its process is gone (killed, crashed, the machine restarted), and the organization's
    /// next cycle marks it aborted: the writer lock's holder shows no life
    /// ([`crate::store::Reader::writer_present`]) and it wrote no progress for [`GONE_AFTER`],
    /// or, where that cannot be told, for [`STALLED_AFTER`].
    pub stalled: bool,
}

/// How long a running cycle may go without writing its progress before `status` calls it
/// stalled. A cycle writes every [`crate::sync::PROGRESS_EVERY`] while it lists and fetches,
/// through the one writer, which a merge of staged rows holds for seconds and the end of a
/// cycle's daily retention purge (a `VACUUM` of a large warehouse) for longer.
pub const STALLED_AFTER: time::Duration = time::Duration::minutes(5);

/// How long a running cycle may go without writing its progress while the writer lock's holder
/// shows no life, before `status` calls it stalled: a few of its
/// [`crate::sync::PROGRESS_EVERY`] (and of the lock's pulse, `daemon::lock::TOUCH_EVERY`), so
/// that a cycle that just started is not called gone.
pub const GONE_AFTER: time::Duration = time::Duration::seconds(10);

/// Reason codes that stop the sync of an organization until the operator acts: its key is
/// refused (401, or the key reads another clinic), or its clinic's IDs collide with another
/// clinic's in the warehouse.
pub const STOPPING_CODES: &[&str] = &[
    "id_collision",
    "missing_bearer",
    "api_keys_disabled",
    "test_prefix_not_allowed",
    "malformed_token",
    "invalid_key",
    "disabled_key",
    "revoked_key",
    "expired_key",
    "organization_mismatch",
];

#[derive(Debug, Default, Serialize)]
pub struct Rows {
    pub encounters: i64,
    pub encounters_removed: i64,
    /// Encounters a SQLite backfill has read and staged that its next merge writes into the
    /// tables (docs/operations.md, "How a backfill is written"); not in the counts above yet.
    /// Always 0 on PostgreSQL, which does not stage.
    pub encounters_staged: i64,
    pub patients: i64,
    pub documents: i64,
    pub notes_with_text: i64,
    pub transcripts: i64,
    pub transcript_turns: i64,
    pub recordings: i64,
}

/// Content work waiting in the queue.
#[derive(Debug, Default, Serialize)]
pub struct Queue {
    pub documents_pending: i64,
    /// Notes the document route did not find while the list shows them, asked again on the
    /// not-ready schedule (docs/content.md).
    pub notes_not_ready: i64,
    pub transcripts_pending: i64,
    pub transcripts_not_ready: i64,
    pub recordings_pending: i64,
    /// Recordings the audio route did not find yet, asked again on the same schedule.
    pub recordings_not_ready: i64,
}

impl Queue {
    /// From the row of the store's queue query, whose counts come in this order.
    pub(crate) fn from_counts(counts: [i64; 6]) -> Queue {
        let [
            documents_pending,
            notes_not_ready,
            transcripts_pending,
            transcripts_not_ready,
            recordings_pending,
            recordings_not_ready,
        ] = counts;
        Queue {
            documents_pending,
            notes_not_ready,
            transcripts_pending,
            transcripts_not_ready,
            recordings_pending,
            recordings_not_ready,
        }
    }
}

#[derive(Debug, Serialize)]
pub struct Run {
    pub run_id: i64,
    pub organization: String,
    pub trigger: String,
    pub started_at: String,
    pub finished_at: Option<String>,
    pub outcome: String,
    pub list_requests: i64,
    pub encounters_new: i64,
    pub encounters_changed: i64,
    pub encounters_removed: i64,
    pub documents_fetched: i64,
    pub transcripts_fetched: i64,
    pub recordings_fetched: i64,
    pub retries: i64,
    pub dead_letters: i64,
}

#[derive(Debug, Serialize)]
pub struct Backfill {
    pub backfill_id: i64,
    pub organization: String,
    pub range_start: String,
    pub range_end: String,
    pub cursor: Option<String>,
    /// `queued` (waiting for `run` or `sync`), `running` (started; an interrupted one resumes),
    /// `completed`.
    pub status: String,
    /// Who asked for it: `backfill`, `run` or `sync`.
    pub requested_by: String,
    pub requested_at: String,
    pub finished_at: Option<String>,
    /// Share of the range scanned, 0..=1.
    pub progress: f64,
    pub windows: i64,
    pub encounters_seen: i64,
    pub encounters_removed: i64,
    pub error: Option<String>,
    /// Seconds until an unfinished backfill completes at the configured rate, by the model of
    /// `charthero-sync plan` (see [`Status::estimate`]); `None` when unknown.
    pub eta_seconds: Option<f64>,
}

/// A history audit: completed history re-checked by totals (`sync --audit`, `audit_every`).
#[derive(Debug, Serialize)]
pub struct Audit {
    pub audit_id: i64,
    pub organization: String,
    pub status: String,
    pub range_start: String,
    pub range_end: String,
    /// Everything before it has been audited.
    pub cursor: String,
    pub started_at: String,
    pub finished_at: Option<String>,
    /// Top-level ranges compared, `limit=1` probes, ranges that differed, ranges re-scanned.
    pub ranges: i64,
    pub probes: i64,
    pub differing: i64,
    pub rescanned: i64,
    pub list_requests: i64,
    /// What last interrupted it, if anything (it resumes).
    pub error: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct DeadLetter {
    pub organization: String,
    pub work: String,
    pub encounter_id: String,
    pub document_id: String,
    pub attempts: i64,
    pub last_failed_at: String,
    pub reason_code: Option<String>,
    pub last_error: String,
    /// Not asked before this instant (`dead_letters.next_attempt_at_ns`); `None`: by the next
    /// cycle.
    pub next_attempt_at: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct LastError {
    pub run_id: i64,
    pub outcome: String,
    pub error: Option<String>,
    pub reason_code: Option<String>,
}

/// Reads the status from the warehouse: the whole warehouse, and one entry per organization —
/// those named in `configured` first (in that order), then any other the warehouse holds
/// bookkeeping for. The backend reads the facts; each organization's state, watermark and lag,
/// the warehouse's (the organization furthest behind) and each backfill's progress are decided
/// here, the same for every backend.
pub fn read(
    warehouse: &dyn crate::store::Reader,
    now: OffsetDateTime,
    configured: &[String],
) -> anyhow::Result<Status> {
    let mut status = warehouse.status(now, configured)?;
    let mut watermarks = Vec::with_capacity(status.organizations.len());
    let writer_present = if status.organizations.iter().any(|o| o.running_cycle.is_some()) {
        warehouse.writer_present(now, GONE_AFTER)
    } else {
        None
    };
    for o in &mut status.organizations {
        let through = o
            .complete_through
            .as_deref()
            .map(parse_rfc3339)
            .transpose()
            .map_err(|e| anyhow::anyhow!("corrupt complete_through of organization {}: {e}", o.name))?;
        o.complete_through = through.map(format_utc);
        o.lag_seconds = through.map(|t| (now - t).whole_seconds());
        watermarks.push(through);
        if let Some(cycle) = &mut o.running_cycle {
            let started = parse_rfc3339(&cycle.started_at)
                .map_err(|e| anyhow::anyhow!("corrupt started_at of run {}: {e}", cycle.run_id))?;
            let progress = warehouse
                .state_time(&o.name, crate::store::StateTime::Heartbeat)?
                .filter(|at| *at >= started);
            cycle.progress_at = progress.map(format_utc);
            cycle.started_at = format_utc(started);
            let silent = now - progress.unwrap_or(started);
            cycle.stalled = silent > STALLED_AFTER || (writer_present == Some(false) && silent > GONE_AFTER);
        }
        o.state = organization_state(
            o.last_run.as_ref(),
            o.running_cycle.as_ref(),
            o.last_error.is_some(),
            o.reason_code.as_deref(),
        )
        .to_owned();
        o.paused_until = warehouse
            .state_time(&o.name, crate::store::StateTime::PausedUntil)?
            .filter(|until| *until > now)
            .map(format_utc);
    }
    // The organization furthest behind; none while any has never completed a window (or there
    // is none).
    let through = watermarks
        .into_iter()
        .collect::<Option<Vec<_>>>()
        .and_then(|w| w.into_iter().min());
    status.complete_through = through.map(format_utc);
    status.lag_seconds = through.map(|t| (now - t).whole_seconds());
    for b in &mut status.backfills {
        b.progress = progress(b);
    }
    Ok(status)
}

impl Status {
    /// Fills in what is left and how long it takes, with the request model of `charthero-sync
    /// plan` (list pages, and the content the configuration fetches in the proportions the
    /// warehouse holds) at each organization's rate:
    /// - for each configured organization, its content queue and the encounters not listed yet
    ///   between its watermark and now (see [`OrganizationStatus::eta_seconds`]);
    /// - for every unfinished backfill, the encounters still to list — those stored in the rest
    ///   of the range, or as many as the density seen so far predicts, whichever is more.
    pub fn estimate(
        &mut self,
        warehouse: &dyn crate::store::Reader,
        config: &crate::config::Config,
        now: OffsetDateTime,
    ) -> anyhow::Result<()> {
        let [encounters, notes, finished, other] = warehouse.live_content_counts()?;
        let per = encounters.max(1) as f64;
        let mix = crate::plan::ContentMix {
            notes: notes as f64 / per,
            finished_transcripts: finished as f64 / per,
            other_documents: other as f64 / per,
        };
        let configured = |name: &str| config.organizations.iter().find(|o| o.name == name);
        let rate = |name: &str| {
            configured(name).map_or(config.limits.requests_per_second, |o| {
                o.budget
                    .requests_per_second
                    .min(config.limits.requests_per_second)
            })
        };
        for o in &mut self.organizations {
            let Some(org) = configured(&o.name) else {
                continue;
            };
            let q = &o.queue;
            let enabled = |on: bool, n: i64| if on { n } else { 0 };
            o.content_requests_pending = enabled(config.content.details, q.documents_pending)
                + enabled(config.content.transcripts, q.transcripts_pending)
                + enabled(config.audio.enabled, 2 * q.recordings_pending);
            let start = crate::sync::history_start(org.start_at, config.privacy.retention, now);
            let horizon = now - config.sync.settle_lag;
            if let Some(through) = o
                .complete_through
                .as_deref()
                .map(parse_rfc3339)
                .transpose()
                .ok()
                .flatten()
                && start < through
                && through < horizon
            {
                let stored = warehouse.live_count_in_range(
                    o.organization_id.as_deref(),
                    crate::timefmt::unix_nanos(start),
                    crate::timefmt::unix_nanos(through),
                )?;
                let density = stored as f64 / (through - start).as_seconds_f64();
                o.encounters_unlisted_estimate =
                    (density * (horizon - through).as_seconds_f64()).round() as i64;
            }
            let (list, content) =
                crate::plan::requests_for(o.encounters_unlisted_estimate.max(0) as u64, &mix, config);
            let requests = (list + content) as f64 + o.content_requests_pending as f64;
            o.eta_seconds = (requests > 0.0).then(|| requests / rate(&o.name));
        }
        for b in self.backfills.iter_mut().filter(|b| b.status != "completed") {
            let (Ok(end), Ok(from)) = (
                parse_rfc3339(&b.range_end),
                parse_rfc3339(b.cursor.as_deref().unwrap_or(&b.range_start)),
            ) else {
                continue;
            };
            let organization_id = warehouse.known_organization_id(&b.organization)?;
            let stored = warehouse.live_count_in_range(
                organization_id.as_deref(),
                crate::timefmt::unix_nanos(from),
                crate::timefmt::unix_nanos(end),
            )?;
            let predicted = (b.progress > 0.0 && b.encounters_seen > 0)
                .then(|| b.encounters_seen as f64 * (1.0 - b.progress) / b.progress);
            if predicted.is_none() && stored == 0 {
                continue;
            }
            let remaining = predicted.unwrap_or(0.0).max(stored as f64).round() as u64;
            let (list, content) = crate::plan::requests_for(remaining, &mix, config);
            b.eta_seconds = Some((list + content) as f64 / rate(&b.organization));
        }
        Ok(())
    }
}

/// An organization's state from its last finished run and whether that run ended in error:
/// `never_synced`, `ok`, `stopped` (its key was refused, or its IDs collide with another
/// clinic's), `incomplete` (a partial run),
/// `interrupted` (stopped by a signal; the next cycle resumes) or `failing`. Before any run
/// finished, its first cycle is `syncing`, or `interrupted` once it has stalled.
fn organization_state(
    last_run: Option<&Run>,
    running: Option<&RunningCycle>,
    failed: bool,
    reason_code: Option<&str>,
) -> &'static str {
    match (last_run, failed) {
        (None, _) => match running {
            Some(cycle) if cycle.stalled => "interrupted",
            Some(_) => "syncing",
            None => "never_synced",
        },
        (Some(_), false) => "ok",
        (Some(_), true) if reason_code.is_some_and(|c| STOPPING_CODES.contains(&c)) => "stopped",
        (Some(run), true) if run.outcome == "partial" => "incomplete",
        (Some(run), true) if run.outcome == "aborted" => "interrupted",
        (Some(_), true) => "failing",
    }
}

/// How far a backfill's cursor is through its range, 0 to 1.
fn progress(b: &Backfill) -> f64 {
    if b.status == "completed" {
        return 1.0;
    }
    let (Ok(start), Ok(end)) = (parse_rfc3339(&b.range_start), parse_rfc3339(&b.range_end)) else {
        return 0.0;
    };
    let Some(cursor) = b.cursor.as_deref().and_then(|c| parse_rfc3339(c).ok()) else {
        return 0.0;
    };
    let span = (end - start).as_seconds_f64();
    if span <= 0.0 {
        return 0.0;
    }
    ((cursor - start).as_seconds_f64() / span).clamp(0.0, 1.0)
}

impl Status {
    /// What there is to say of a warehouse not created yet: every configured organization
    /// `never_synced`, nothing stored (the same shape as any other status, for scripts).
    pub fn not_created(database: Database, configured: &[String]) -> Status {
        Status {
            database,
            complete_through: None,
            lag_seconds: None,
            organizations: configured
                .iter()
                .map(|name| OrganizationStatus {
                    name: name.clone(),
                    state: "never_synced".to_owned(),
                    ..OrganizationStatus::default()
                })
                .collect(),
            rows: Rows::default(),
            queue: Queue::default(),
            runs: Vec::new(),
            backfills: Vec::new(),
            audit: None,
            dead_letter_count: 0,
            dead_letters: Vec::new(),
            disabled_routes: Vec::new(),
            last_error: None,
        }
    }

    /// The human-readable report.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "complete through: {}{}",
            self.complete_through.as_deref().unwrap_or("(nothing yet)"),
            self.lag_seconds
                .map_or_else(String::new, |l| format!("  (lag {l} s)"))
        );
        for o in &self.organizations {
            let _ = writeln!(
                out,
                "organization {} ({}): {}{}{}; complete through {}{}; {} encounters, {} dead letters",
                o.name,
                o.organization_id.as_deref().unwrap_or("clinic not known yet"),
                o.state,
                o.reason_code
                    .as_deref()
                    .map_or_else(String::new, |c| format!(" ({c})")),
                o.paused_until.as_deref().map_or_else(String::new, |t| format!(
                    ", paused by ChartHero (Retry-After) until {t}"
                )),
                o.complete_through.as_deref().unwrap_or("(nothing yet)"),
                o.lag_seconds
                    .map_or_else(String::new, |l| format!(" (lag {l} s)")),
                o.encounters,
                o.dead_letters,
            );
            if let Some(c) = &o.running_cycle {
                let _ = writeln!(
                    out,
                    "  cycle #{} ({}) started {}: {}",
                    c.run_id,
                    c.trigger,
                    c.started_at,
                    match (&c.progress_at, c.stalled) {
                        (_, true) => format!(
                            "no progress since {}: its process is gone; the next cycle marks it aborted",
                            c.progress_at.as_deref().unwrap_or(&c.started_at)
                        ),
                        (Some(at), false) => format!("running; its counters below are as of {at}"),
                        (None, false) => "running".to_owned(),
                    }
                );
            }
            if let Some(w) = &o.webhooks {
                let _ = writeln!(
                    out,
                    "  webhooks: {} events received, {} not handled yet; last delivery {}",
                    w.events,
                    w.pending,
                    w.last_received_at.as_deref().unwrap_or("-")
                );
            }
            if let Some(eta) = o.eta_seconds {
                let _ = writeln!(
                    out,
                    "  left: {} content requests queued, about {} encounters not listed yet: about {} to go",
                    o.content_requests_pending,
                    o.encounters_unlisted_estimate,
                    crate::plan::duration_text(eta)
                );
            }
        }
        let r = &self.rows;
        let _ = writeln!(
            out,
            "rows: {} encounters ({} removed{}), {} patients, {} documents ({} notes with text), \
             {} transcripts ({} turns), {} recordings",
            r.encounters,
            r.encounters_removed,
            if r.encounters_staged > 0 {
                format!(
                    "; {} more read and staged, written at the next merge",
                    r.encounters_staged
                )
            } else {
                String::new()
            },
            r.patients,
            r.documents,
            r.notes_with_text,
            r.transcripts,
            r.transcript_turns,
            r.recordings
        );
        let q = &self.queue;
        let _ = writeln!(
            out,
            "queue: {} documents ({} not found yet), {} transcripts ({} not ready yet), {} recordings ({} not found yet)",
            q.documents_pending,
            q.notes_not_ready,
            q.transcripts_pending,
            q.transcripts_not_ready,
            q.recordings_pending,
            q.recordings_not_ready
        );
        if !self.disabled_routes.is_empty() {
            let _ = writeln!(
                out,
                "disabled routes (last cycle): {}",
                self.disabled_routes.join(", ")
            );
        }
        if let Some(e) = &self.last_error {
            let _ = writeln!(
                out,
                "last cycle #{} {}: {}{}",
                e.run_id,
                e.outcome,
                e.error.as_deref().unwrap_or(""),
                e.reason_code
                    .as_deref()
                    .map_or_else(String::new, |c| format!(" [reason_code {c}]"))
            );
        }
        let _ = writeln!(out, "dead letters: {}", self.dead_letter_count);
        for d in &self.dead_letters {
            let _ = writeln!(
                out,
                "  {} {} (encounter {}): {} attempt(s), last {}: {}; asked again {}",
                d.work,
                d.document_id,
                d.encounter_id,
                d.attempts,
                d.last_failed_at,
                d.last_error,
                d.next_attempt_at
                    .as_deref()
                    .map_or_else(|| "by the next cycle".to_owned(), |at| format!("from {at}"))
            );
        }
        if self.backfills.is_empty() {
            let _ = writeln!(out, "backfills: none");
        }
        for b in &self.backfills {
            let _ = writeln!(
                out,
                "backfill #{} {} .. {}: {} {:.0}%{}, requested by {} at {}{} ({} encounters seen, {} removed){}",
                b.backfill_id,
                b.range_start,
                b.range_end,
                b.status,
                b.progress * 100.0,
                b.eta_seconds.map_or_else(String::new, |s| format!(
                    " (about {} to go)",
                    crate::plan::duration_text(s)
                )),
                b.requested_by,
                b.requested_at,
                b.finished_at
                    .as_deref()
                    .map_or_else(String::new, |f| format!(", finished {f}")),
                b.encounters_seen,
                b.encounters_removed,
                b.error
                    .as_deref()
                    .map_or_else(String::new, |e| format!("; last error: {e}"))
            );
        }
        if let Some(a) = &self.audit {
            let _ = writeln!(
                out,
                "history audit #{} {} .. {}: {} (through {}; {} ranges, {} probes, {} differed, {} re-scanned, \
                 {} list requests){}",
                a.audit_id,
                a.range_start,
                a.range_end,
                a.finished_at
                    .as_deref()
                    .map_or_else(|| a.status.clone(), |f| format!("{} at {f}", a.status)),
                a.cursor,
                a.ranges,
                a.probes,
                a.differing,
                a.rescanned,
                a.list_requests,
                a.error
                    .as_deref()
                    .map_or_else(String::new, |e| format!("; last error: {e}"))
            );
        }
        let _ = writeln!(out, "recent runs:");
        for run in &self.runs {
            let _ = writeln!(
                out,
                "  #{} {} {} {}: {} list requests; {} new, {} changed, {} removed encounters; \
                 {} documents, {} transcripts, {} recordings; {} retries, {} dead letters",
                run.run_id,
                run.started_at,
                run.trigger,
                run.outcome,
                run.list_requests,
                run.encounters_new,
                run.encounters_changed,
                run.encounters_removed,
                run.documents_fetched,
                run.transcripts_fetched,
                run.recordings_fetched,
                run.retries,
                run.dead_letters
            );
        }
        out
    }
}
