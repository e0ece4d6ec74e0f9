//! Logging setup. Log lines carry IDs and counts only: never patient names, note or transcript
//! text, the API key, or signed URLs (the types that hold secrets cannot even be printed).
//!
//! `CHARTHERO_LOG_FORMAT` chooses the format: `text` (human; colours on a terminal), `journald`
//! (no timestamps or colours: journald adds its own), `json` (one object per line, for log
//! shippers). Unset or empty: `text`; anything else is refused (the caller exits 2) rather than
//! logged in a format nobody asked for. `RUST_LOG` filters (default `info` for this program).

use std::io::{IsTerminal, Write};

use tracing_subscriber::EnvFilter;

pub const LOG_FORMAT_ENV: &str = "CHARTHERO_LOG_FORMAT";

/// Installs the global subscriber, or says why `CHARTHERO_LOG_FORMAT` cannot be used (nothing
/// is installed then).
pub fn init() -> Result<(), String> {
    let format = std::env::var(LOG_FORMAT_ENV).unwrap_or_default();
    if !matches!(format.as_str(), "" | "text" | "json" | "journald") {
        return Err(format!(
            "{LOG_FORMAT_ENV}={format:?} is not a log format: use text, journald or json"
        ));
    }
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn,charthero_sync=info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // On a failed write (a closed stderr: `... 2>&1 | head -1`) the subscriber would report
        // the failure with `eprintln!`, which panics on that same closed stderr. A log line that
        // cannot be written is dropped instead.
        .log_internal_errors(false)
        .with_target(false);
    match format.as_str() {
        "json" => builder.json().flatten_event(true).with_current_span(true).init(),
        "journald" => builder.without_time().with_ansi(false).init(),
        _ => builder.with_ansi(std::io::stderr().is_terminal()).init(),
    }
    Ok(())
}

/// A progress bar for long backfills, drawn on stderr only when it is a terminal (never into
/// journald or a log file). Shows the share of the `created_at` range read, records, and ETA.
pub struct Progress {
    start: time::OffsetDateTime,
    end: time::OffsetDateTime,
    started: std::time::Instant,
    draw: bool,
}

impl Progress {
    pub fn new(start: time::OffsetDateTime, end: time::OffsetDateTime) -> Progress {
        Progress {
            start,
            end,
            started: std::time::Instant::now(),
            draw: std::io::stderr().is_terminal(),
        }
    }

    /// The range is read completely up to `cursor`, with `records` listed so far.
    pub fn update(&self, cursor: time::OffsetDateTime, records: u64) {
        if !self.draw {
            return;
        }
        let span = (self.end - self.start).as_seconds_f64().max(1e-9);
        let done = ((cursor - self.start).as_seconds_f64() / span).clamp(0.0, 1.0);
        let elapsed = self.started.elapsed().as_secs_f64();
        let eta = if done > 0.0 {
            elapsed * (1.0 - done) / done
        } else {
            0.0
        };
        let filled = (done * 30.0).round() as usize;
        // A terminal that went away (EIO) must not panic the sync the way `eprint!` would.
        let _ = write!(
            std::io::stderr().lock(),
            "\r\x1b[2Kbackfill [{}{}] {:5.1}%  {records} encounters  elapsed {}  eta {}",
            "#".repeat(filled),
            "-".repeat(30 - filled),
            done * 100.0,
            clock(elapsed),
            clock(eta)
        );
    }

    pub fn finish(&self) {
        if self.draw {
            let _ = writeln!(std::io::stderr().lock());
        }
    }
}

fn clock(secs: f64) -> String {
    let s = secs.round() as u64;
    format!("{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
}
