//! sd_notify: datagrams such as `READY=1` to the socket named by
//! `NOTIFY_SOCKET` (a path, or `@name` for the abstract namespace).
//!
//! The environment is read once, at start-up. Sends never block: the socket
//! is non-blocking and a datagram the supervisor has no room for is dropped
//! with a log line, so a slow supervisor cannot stall the demo.

use std::ffi::OsStr;
use std::io;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

#[derive(Debug, Default)]
pub struct Notifier {
    target: Option<(UnixDatagram, SocketAddr)>,
    watchdog: Option<Duration>,
}

impl Notifier {
    /// Reads `NOTIFY_SOCKET`, `WATCHDOG_USEC` and `WATCHDOG_PID`.
    pub fn from_env() -> Notifier {
        let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
            return Notifier::default();
        };
        let target = match connect(path.as_bytes()) {
            Ok(target) => target,
            Err(e) => {
                say!(
                    "NOTIFY_SOCKET={}: {e}; not notifying",
                    path.to_string_lossy()
                );
                return Notifier::default();
            }
        };
        Notifier {
            target: Some(target),
            watchdog: watchdog_interval(),
        }
    }

    /// Sends one notification, e.g. `"READY=1\nSTATUS=serving"`. A no-op
    /// without `NOTIFY_SOCKET`.
    pub fn send(&self, state: &str) {
        let Some((socket, addr)) = &self.target else {
            return;
        };
        if let Err(e) = socket.send_to_addr(state.as_bytes(), addr) {
            say!("sd_notify {:?} failed: {e}", state.replace('\n', " "));
        }
    }

    /// How often to send `WATCHDOG=1`: half of `WATCHDOG_USEC`, if the
    /// watchdog is enabled for this process.
    pub fn watchdog_interval(&self) -> Option<Duration> {
        self.watchdog
    }
}

fn connect(path: &[u8]) -> io::Result<(UnixDatagram, SocketAddr)> {
    let addr = match path {
        [] => return Err(io::Error::new(io::ErrorKind::InvalidInput, "empty")),
        [b'@', name @ ..] => SocketAddr::from_abstract_name(name)?,
        path => SocketAddr::from_pathname(OsStr::from_bytes(path))?,
    };
    let socket = UnixDatagram::unbound()?;
    socket.set_nonblocking(true)?;
    Ok((socket, addr))
}

/// Like `sd_watchdog_enabled`: `WATCHDOG_USEC` set to a positive number, and
/// `WATCHDOG_PID` unset or our pid.
fn watchdog_interval() -> Option<Duration> {
    let usec = std::env::var("WATCHDOG_USEC").ok()?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID") {
        if pid.parse::<u32>().ok() != Some(std::process::id()) {
            say!("watchdog is for WATCHDOG_PID={pid}, not us; not sending WATCHDOG=1");
            return None;
        }
    }
    match usec.parse::<u64>() {
        Ok(usec) if usec > 0 => Some(Duration::from_micros(usec) / 2),
        _ => {
            say!("WATCHDOG_USEC={usec:?} is not a positive number; not sending WATCHDOG=1");
            None
        }
    }
}
