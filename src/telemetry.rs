//! Logging setup. Log lines carry IDs and counts only: never patient names, note or transcript
//! text, the API key, or signed URLs (the types that hold secrets cannot even be printed).
//!
//! `CHARTHERO_LOG_FORMAT` chooses the format: `text` (human; colours on a terminal), `journald`
//! (no timestamps or colours: journald adds its own), `json` (one object per line, for log
//! shippers). Unset: `text`. `RUST_LOG` filters (default `info` for this program).

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

pub const LOG_FORMAT_ENV: &str = "CHARTHERO_LOG_FORMAT";

pub fn init() {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn,charthero_sync=info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    match std::env::var(LOG_FORMAT_ENV).as_deref() {
        Ok("json") => builder.json().flatten_event(true).with_current_span(true).init(),
        Ok("journald") => builder.without_time().with_ansi(false).init(),
        _ => builder.with_ansi(std::io::stderr().is_terminal()).init(),
    }
}
