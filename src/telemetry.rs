//! Logging setup. Log lines carry IDs and counts only: never patient names, note or transcript
//! text, the API key, or signed URLs (the types that hold secrets cannot even be printed).

use tracing_subscriber::EnvFilter;

/// Human-readable logs on stderr, filtered by `RUST_LOG` (default: `info` for this program,
/// `warn` for its dependencies).
pub fn init() {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("warn,charthero_sync=info,charthero_sync::demo=info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
}
