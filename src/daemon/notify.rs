//! The systemd notification protocol (`sd_notify`), spoken directly: one datagram per message
//! to `$NOTIFY_SOCKET`. Without that variable (not under systemd) every call does nothing.

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

/// A handle on `$NOTIFY_SOCKET`, if systemd gave one.
#[derive(Debug)]
pub struct Notifier {
    socket: Option<(UnixDatagram, std::os::unix::net::SocketAddr)>,
    watchdog: Option<Duration>,
}

impl Notifier {
    /// A notifier that says nothing: the daemon run in-process (tests, embedding).
    pub fn silent() -> Notifier {
        Notifier {
            socket: None,
            watchdog: None,
        }
    }

    /// Reads `NOTIFY_SOCKET` and `WATCHDOG_USEC` (honouring `WATCHDOG_PID`).
    pub fn from_env() -> Notifier {
        let socket = std::env::var("NOTIFY_SOCKET").ok().and_then(|path| {
            let addr = if let Some(name) = path.strip_prefix('@') {
                use std::os::linux::net::SocketAddrExt;
                std::os::unix::net::SocketAddr::from_abstract_name(name).ok()?
            } else {
                std::os::unix::net::SocketAddr::from_pathname(&path).ok()?
            };
            Some((UnixDatagram::unbound().ok()?, addr))
        });
        let for_us = std::env::var("WATCHDOG_PID")
            .ok()
            .and_then(|p| p.parse::<u32>().ok())
            .is_none_or(|pid| pid == std::process::id());
        let watchdog = std::env::var("WATCHDOG_USEC")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .filter(|us| *us > 0 && for_us)
            .map(Duration::from_micros);
        Notifier { socket, watchdog }
    }

    /// The watchdog interval systemd expects pings within, if it set one.
    pub fn watchdog(&self) -> Option<Duration> {
        self.watchdog
    }

    fn send(&self, message: &str) {
        if let Some((socket, addr)) = &self.socket
            && let Err(e) = socket.send_to_addr(message.as_bytes(), addr)
        {
            tracing::warn!("cannot notify systemd: {e}");
        }
    }

    /// The service is up: database open and migrated, key loaded.
    pub fn ready(&self, status: &str) {
        self.send(&format!("READY=1\nSTATUS={status}"));
    }

    pub fn status(&self, status: &str) {
        self.send(&format!("STATUS={status}"));
    }

    pub fn watchdog_ping(&self) {
        if self.watchdog.is_some() {
            self.send("WATCHDOG=1");
        }
    }

    pub fn stopping(&self) {
        self.send("STOPPING=1\nSTATUS=shutting down");
    }
}
