//! sd_notify, both ways.
//!
//! * [`WorkerSocket`]: the datagram socket nogap owns for one worker; its path
//!   is the worker's `NOTIFY_SOCKET`, so anything it receives is attributed to
//!   that worker. Datagrams are parsed into [`Message`]s; malformed ones are
//!   reported (and ignored by the supervisor), never fatal.
//! * [`Upstream`]: nogap's own notifications to systemd, to the
//!   `NOTIFY_SOCKET` read once at start-up.

use std::io;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram as StdDatagram};
use std::path::{Path, PathBuf};
use std::time::Duration;

use sd_notify::NotifyState;
use tokio::net::UnixDatagram;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// One assignment a worker sent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    Ready,
    Reloading,
    Stopping,
    Watchdog,
    /// `WATCHDOG=trigger`: the worker asks to be treated as failed.
    WatchdogTrigger,
    Status(String),
    /// `EXTEND_TIMEOUT_USEC=`: more time to become ready.
    ExtendTimeout(Duration),
    /// Anything else (`MAINPID=`, `ERRNO=`, `FDSTORE=`...): noted, no effect.
    Other(String),
}

/// Parse one datagram: newline-separated `KEY=VALUE` lines.
pub fn parse(datagram: &[u8]) -> Result<Vec<Message>, String> {
    let text = std::str::from_utf8(datagram).map_err(|_| "not UTF-8".to_string())?;
    let mut out = Vec::new();
    for line in text.split('\n').filter(|l| !l.is_empty()) {
        let (key, value) = line
            .split_once('=')
            .ok_or_else(|| format!("line without '=': {:?}", truncate(line)))?;
        out.push(match (key, value) {
            ("READY", "1") => Message::Ready,
            ("RELOADING", "1") => Message::Reloading,
            ("STOPPING", "1") => Message::Stopping,
            ("WATCHDOG", "1") => Message::Watchdog,
            ("WATCHDOG", "trigger") => Message::WatchdogTrigger,
            ("STATUS", s) => Message::Status(s.to_string()),
            ("EXTEND_TIMEOUT_USEC", us) => {
                let us: u64 = us
                    .parse()
                    .map_err(|_| format!("bad EXTEND_TIMEOUT_USEC={:?}", truncate(us)))?;
                Message::ExtendTimeout(Duration::from_micros(us))
            }
            ("READY" | "RELOADING" | "STOPPING" | "WATCHDOG", v) => {
                return Err(format!("bad value {key}={:?}", truncate(v)));
            }
            _ => Message::Other(truncate(line).to_string()),
        });
    }
    if out.is_empty() {
        return Err("empty message".into());
    }
    Ok(out)
}

fn truncate(s: &str) -> &str {
    match s.char_indices().nth(80) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// The largest datagram read; longer ones are cut and then fail to parse.
const MAX_DATAGRAM: usize = 16 * 1024;

/// A worker's notify socket. Dropping it stops the reader and removes the
/// socket file.
pub struct WorkerSocket {
    path: PathBuf,
    reader: JoinHandle<()>,
}

impl WorkerSocket {
    /// Bind at `path` and forward every datagram, parsed, as `(key, result)`.
    pub fn bind<K: Copy + Send + 'static>(
        path: PathBuf,
        key: K,
        tx: mpsc::Sender<(K, Result<Vec<Message>, String>)>,
    ) -> io::Result<WorkerSocket> {
        let _ = std::fs::remove_file(&path);
        let sock = UnixDatagram::bind(&path)?;
        let reader = tokio::spawn(async move {
            let mut buf = vec![0u8; MAX_DATAGRAM];
            loop {
                let n = match sock.recv(&mut buf).await {
                    Ok(n) => n,
                    Err(_) => return,
                };
                if tx.send((key, parse(&buf[..n]))).await.is_err() {
                    return;
                }
            }
        });
        Ok(WorkerSocket { path, reader })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for WorkerSocket {
    fn drop(&mut self) {
        self.reader.abort();
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Notifications to systemd. A no-op when nogap has no `NOTIFY_SOCKET`.
pub struct Upstream {
    target: Option<(StdDatagram, SocketAddr)>,
}

impl Upstream {
    /// From the `NOTIFY_SOCKET` value nogap was started with.
    pub fn new(notify_socket: Option<&std::ffi::OsStr>) -> io::Result<Upstream> {
        let Some(path) = notify_socket else {
            return Ok(Upstream { target: None });
        };
        let bytes = std::os::unix::ffi::OsStrExt::as_bytes(path);
        let addr = match bytes.strip_prefix(b"@") {
            Some(name) => SocketAddr::from_abstract_name(name)?,
            None => SocketAddr::from_pathname(path)?,
        };
        let sock = StdDatagram::unbound()?;
        sock.set_nonblocking(true)?;
        Ok(Upstream {
            target: Some((sock, addr)),
        })
    }

    pub fn enabled(&self) -> bool {
        self.target.is_some()
    }

    /// Send; failures are logged, never fatal (systemd may be gone).
    pub fn send(&self, states: &[NotifyState<'_>]) {
        let Some((sock, addr)) = &self.target else {
            return;
        };
        let msg: String = states.iter().map(|s| format!("{s}\n")).collect();
        if let Err(e) = sock.send_to_addr(msg.as_bytes(), addr) {
            tracing::warn!(error = %e, "cannot notify systemd");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses() {
        assert_eq!(
            parse(b"READY=1\nSTATUS=ok\n").unwrap(),
            vec![Message::Ready, Message::Status("ok".into())]
        );
        assert_eq!(parse(b"WATCHDOG=1").unwrap(), vec![Message::Watchdog]);
        assert_eq!(
            parse(b"EXTEND_TIMEOUT_USEC=2000000").unwrap(),
            vec![Message::ExtendTimeout(Duration::from_secs(2))]
        );
        assert!(matches!(parse(b"MAINPID=4").unwrap()[0], Message::Other(_)));
        assert!(parse(b"READY").is_err());
        assert!(parse(b"READY=2").is_err());
        assert!(parse(b"\xff\xfe").is_err());
        assert!(parse(b"").is_err());
        assert!(parse(b"EXTEND_TIMEOUT_USEC=x").is_err());
    }
}
