//! sd_notify, both ways.
//!
//! * [`WorkerSocket`]: the datagram socket nogap owns for one worker; its path
//!   is the worker's `NOTIFY_SOCKET`, so anything it receives is attributed to
//!   that worker. Datagrams are parsed into [`Message`]s; malformed ones are
//!   reported (and ignored by the supervisor), never fatal. Each one comes
//!   with its [`Sender`] (`SO_PASSCRED`: the kernel's `SCM_CREDENTIALS`, not
//!   what the sender claims); the policy accepts it only from the worker or
//!   a process of its group. File descriptors attached to a datagram are
//!   closed at once.
//! * [`Upstream`]: nogap's own notifications to systemd, to the
//!   `NOTIFY_SOCKET` read once at start-up.

use crate::spec::truncate;
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

/// Who sent a notification, as the kernel tells (`SCM_CREDENTIALS` on the
/// notify socket, `SO_PEERCRED` on einhorn's): its pid, and its process
/// group when it could be read (the sender may be gone already).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sender {
    pub pid: i32,
    pub pgid: Option<i32>,
}

impl Sender {
    /// The process `pid`, with its process group read now.
    pub fn of(pid: i32) -> Sender {
        let pgid = nix::unistd::getpgid(Some(nix::unistd::Pid::from_raw(pid)))
            .ok()
            .map(|p| p.as_raw());
        Sender { pid, pgid }
    }
}

/// What a notify or einhorn socket delivers: for `key` (the worker), who
/// sent it (None: the kernel gave no credentials), and its messages or why
/// they could not be read.
pub type Delivery<K> = (K, Option<Sender>, Result<Vec<Message>, String>);

/// A datagram as received: its bytes, the sender's pid from
/// `SCM_CREDENTIALS` if there was one, and how many descriptors were
/// attached (already closed). Pure: what the fuzz target drives.
pub fn receive(datagram: &[u8], pid: Option<i32>, fds: usize) -> Result<Vec<Message>, String> {
    if fds > 0 {
        return Err(format!("{fds} file descriptors attached (closed)"));
    }
    if pid.is_none() {
        return Err("no sender credentials".into());
    }
    parse(datagram)
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
    /// Bind at `path` and forward every datagram, parsed, as `(key, sender,
    /// result)`.
    pub fn bind<K: Copy + Send + 'static>(
        path: PathBuf,
        key: K,
        tx: mpsc::Sender<Delivery<K>>,
    ) -> io::Result<WorkerSocket> {
        let _ = std::fs::remove_file(&path);
        let sock = UnixDatagram::bind(&path)?;
        nix::sys::socket::setsockopt(&sock, nix::sys::socket::sockopt::PassCred, &true)?;
        let reader = tokio::spawn(async move {
            let mut buf = vec![0u8; MAX_DATAGRAM];
            let mut backoff = Backoff::default();
            loop {
                let got = match sock.readable().await {
                    Ok(()) => sock.try_io(tokio::io::Interest::READABLE, || recv(&sock, &mut buf)),
                    Err(e) => Err(e),
                };
                let (n, pid, fds) = match got {
                    Ok(got) => got,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    Err(e) if Backoff::resource(&e) => {
                        backoff.wait().await;
                        continue;
                    }
                    Err(_) => return,
                };
                backoff.reset();
                let sender = pid.map(Sender::of);
                let parsed = receive(&buf[..n], pid, fds);
                if tx.send((key, sender, parsed)).await.is_err() {
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

/// One datagram into `buf`: its length, the sender's pid
/// (`SCM_CREDENTIALS`), and how many descriptors came with it (closed here).
fn recv(sock: &UnixDatagram, buf: &mut [u8]) -> io::Result<(usize, Option<i32>, usize)> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags, UnixAddr};
    use std::os::fd::AsRawFd;
    let mut cmsg = nix::cmsg_space!(libc::ucred, [std::os::fd::RawFd; 16]);
    let mut iov = [io::IoSliceMut::new(buf)];
    let msg = recvmsg::<UnixAddr>(
        sock.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::MSG_CMSG_CLOEXEC | MsgFlags::MSG_DONTWAIT,
    )?;
    let (mut pid, mut fds) = (None, 0);
    for c in msg.cmsgs()? {
        match c {
            ControlMessageOwned::ScmCredentials(cred) => pid = Some(cred.pid()),
            ControlMessageOwned::ScmRights(rights) => {
                fds += rights.len();
                for fd in rights {
                    let _ = nix::unistd::close(fd);
                }
            }
            _ => {}
        }
    }
    // Descriptors beyond the buffer were not installed (MSG_CTRUNC); they
    // count as attached all the same.
    if msg.flags.contains(MsgFlags::MSG_CTRUNC) {
        fds = fds.max(1);
    }
    Ok((msg.bytes, pid, fds))
}

/// Backoff of an accept or receive loop that hit a resource limit
/// (EMFILE, ENFILE, ENOBUFS, ENOMEM): 10 ms doubling to 1 s, so that the
/// loop neither spins nor gives up.
#[derive(Debug, Default)]
pub struct Backoff {
    next: Option<Duration>,
}

impl Backoff {
    pub const FIRST: Duration = Duration::from_millis(10);
    pub const MAX: Duration = Duration::from_secs(1);

    /// A resource shortage that passes: wait and retry.
    pub fn resource(e: &io::Error) -> bool {
        matches!(
            e.raw_os_error(),
            Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
        )
    }

    /// The next delay (and remember the one after).
    pub fn step(&mut self) -> Duration {
        let d = self.next.unwrap_or(Self::FIRST);
        self.next = Some((d * 2).min(Self::MAX));
        d
    }

    pub async fn wait(&mut self) {
        tokio::time::sleep(self.step()).await;
    }

    pub fn reset(&mut self) {
        self.next = None;
    }
}

impl Drop for WorkerSocket {
    fn drop(&mut self) {
        self.reader.abort();
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The messages of a notification, or None for a bad one, which is logged
/// (a few lines per worker and period, then a count: a flood of bad
/// datagrams writes little). `who` is the worker's slot and generation.
pub fn accepted<K: Copy + std::hash::Hash + Eq>(
    parsed: Result<Vec<Message>, String>,
    worker: K,
    from: Option<Sender>,
    who: Option<(u32, u64)>,
    limiter: &mut crate::logs::Limiter<K>,
) -> Option<Vec<Message>> {
    let error = match parsed {
        Ok(messages) => return Some(messages),
        Err(error) => error,
    };
    let suppressed = limiter.allow(worker, std::time::Instant::now())?;
    tracing::warn!(worker = who.map(|w| w.0), generation = who.map(|w| w.1), sender_pid = from.map(|s| s.pid), %error, suppressed, "bad notify message ignored");
    None
}

/// What nogap tells systemd (the policy decides, see `policy::Upstream`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Tell {
    Ready,
    Reloading,
    Stopping,
    Status(String),
    /// Ask systemd for this much more time (a generation is starting).
    ExtendTimeout(Duration),
}

/// Notifications to systemd. A no-op when nogap has no `NOTIFY_SOCKET`.
pub struct Upstream {
    target: Option<(StdDatagram, SocketAddr)>,
}

impl Upstream {
    /// Tell systemd `msgs` in one datagram (`RELOADING=1` with its
    /// `MONOTONIC_USEC=`).
    pub fn tell(&self, msgs: &[Tell]) {
        if !self.enabled() {
            return;
        }
        let monotonic = NotifyState::monotonic_usec_now().ok();
        let mut states = Vec::new();
        for m in msgs {
            match m {
                Tell::Ready => states.push(NotifyState::Ready),
                Tell::Reloading => {
                    states.push(NotifyState::Reloading);
                    states.extend(monotonic.clone());
                }
                Tell::Stopping => states.push(NotifyState::Stopping),
                Tell::Status(s) => states.push(NotifyState::Status(s)),
                Tell::ExtendTimeout(d) => {
                    let usec = d.as_micros().min(u32::MAX as u128) as u32;
                    states.push(NotifyState::ExtendTimeoutUsec(usec));
                }
            }
        }
        self.send(&states);
    }

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

    #[test]
    fn datagrams_with_descriptors_or_without_credentials_are_refused() {
        assert_eq!(receive(b"READY=1", Some(7), 0), Ok(vec![Message::Ready]));
        assert!(receive(b"READY=1", Some(7), 2).is_err());
        assert!(receive(b"READY=1", None, 0).is_err());
    }

    #[test]
    fn backoff_doubles_to_a_second() {
        let mut b = Backoff::default();
        let steps: Vec<u64> = (0..9).map(|_| b.step().as_millis() as u64).collect();
        assert_eq!(steps, [10, 20, 40, 80, 160, 320, 640, 1000, 1000]);
        b.reset();
        assert_eq!(b.step(), Backoff::FIRST);
    }

    #[tokio::test]
    async fn the_kernel_names_the_sender_and_descriptors_are_closed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("n.sock");
        let (tx, mut rx) = mpsc::channel(4);
        let _s = WorkerSocket::bind(path.clone(), 1u64, tx).unwrap();
        let c = StdDatagram::unbound().unwrap();
        c.send_to(b"READY=1", &path).unwrap();
        let (_, sender, parsed) = rx.recv().await.unwrap();
        assert_eq!(sender.map(|s| s.pid), Some(std::process::id() as i32));
        assert_eq!(parsed, Ok(vec![Message::Ready]));
        // A datagram carrying a descriptor: refused, and the fd not kept.
        use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags, UnixAddr};
        use std::os::fd::AsRawFd;
        let f = std::fs::File::open("/dev/null").unwrap();
        let fds = [f.as_raw_fd()];
        let addr = UnixAddr::new(&path).unwrap();
        let iov = [io::IoSlice::new(b"READY=1")];
        sendmsg(
            c.as_raw_fd(),
            &iov,
            &[ControlMessage::ScmRights(&fds)],
            MsgFlags::empty(),
            Some(&addr),
        )
        .unwrap();
        let (_, _, parsed) = rx.recv().await.unwrap();
        assert!(parsed.unwrap_err().contains("descriptors"));
    }
}
