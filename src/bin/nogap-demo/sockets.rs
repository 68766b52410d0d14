//! The sockets the demo serves: inherited by the systemd protocol
//! (`LISTEN_FDS`), passed by number (`--fd`), or bound here (`--listen`).
//!
//! Each socket is checked (it must be a listening stream socket or a
//! datagram socket of family inet, inet6 or unix), made close-on-exec and
//! non-blocking, and kept with its name and origin for the logs.

use std::collections::HashSet;
use std::fmt;
use std::io;
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixDatagram, UnixListener};

use nix::fcntl::{fcntl, FcntlArg, OFlag};
use socket2::{Domain, SockRef, Socket as Socket2, Type};

use crate::cli::ListenSpec;
use crate::sys;

/// First fd of the systemd protocol (`SD_LISTEN_FDS_START`).
const LISTEN_FDS_START: RawFd = 3;

/// Listen backlog for the sockets bound with `--listen` and `--health`.
const BACKLOG: i32 = 1024;

#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error("{var}={value:?} is not valid: {reason}")]
    Env {
        var: &'static str,
        value: String,
        reason: String,
    },
    #[error("fd {fd} ({origin}): {reason}")]
    Fd {
        fd: RawFd,
        origin: String,
        reason: String,
    },
    #[error("cannot listen on {spec}: {source}")]
    Bind { spec: String, source: io::Error },
}

/// The fds announced by `LISTEN_FDS`/`LISTEN_PID`/`LISTEN_FDNAMES`, read once.
#[derive(Debug, Default)]
pub struct Inherited {
    /// `(fd, name)` in fd order, starting at 3.
    fds: Vec<(RawFd, String)>,
}

impl Inherited {
    /// Reads the protocol variables like `sd_listen_fds_with_names`: nothing
    /// unless `LISTEN_PID` is our pid; a name count different from the fd
    /// count is an error; names default to "unknown".
    pub fn from_env() -> Result<Inherited, SocketError> {
        let Some(count) = env("LISTEN_FDS") else {
            return Ok(Inherited::default());
        };
        let pid = env("LISTEN_PID").unwrap_or_default();
        if pid.parse::<u32>().ok() != Some(std::process::id()) {
            say!("ignoring LISTEN_FDS={count}: LISTEN_PID={pid:?} is not our pid");
            return Ok(Inherited::default());
        }
        let bad = |var, value: &str, reason: &str| SocketError::Env {
            var,
            value: value.to_owned(),
            reason: reason.to_owned(),
        };
        let count: RawFd = count
            .parse()
            .ok()
            .filter(|n| (0..=i32::MAX - LISTEN_FDS_START).contains(n))
            .ok_or_else(|| bad("LISTEN_FDS", &count, "not a count"))?;
        let names: Vec<String> = match env("LISTEN_FDNAMES") {
            Some(names) => {
                let names: Vec<String> = names.split(':').map(str::to_owned).collect();
                if names.len() != count as usize {
                    let reason = format!("{} names for {count} fds", names.len());
                    return Err(bad("LISTEN_FDNAMES", &names.join(":"), &reason));
                }
                names
            }
            None => vec!["unknown".to_owned(); count as usize],
        };
        let fds = (LISTEN_FDS_START..).zip(names).collect();
        Ok(Inherited { fds })
    }
}

fn env(var: &str) -> Option<String> {
    std::env::var(var).ok()
}

/// A socket ready to be served, with where it came from.
#[derive(Debug)]
pub struct Socket {
    pub name: String,
    pub origin: Origin,
    pub kind: Kind,
}

#[derive(Debug)]
pub enum Origin {
    /// From `LISTEN_FDS`; `was_nonblocking` is the flag as inherited.
    ListenFds { fd: RawFd, was_nonblocking: bool },
    /// From `--fd`.
    Argument { fd: RawFd, was_nonblocking: bool },
    /// Bound by us (`--listen`).
    Bound,
}

/// The socket itself, non-blocking, ready for `tokio::net::*::from_std`.
#[derive(Debug)]
pub enum Kind {
    Tcp(TcpListener),
    Unix(UnixListener),
    Udp(UdpSocket),
    UnixDatagram(UnixDatagram),
}

/// All sockets to serve: inherited ones first (in fd order), then `--fd`,
/// then `--listen`.
pub fn collect(
    inherited: &Inherited,
    fds: &[RawFd],
    listen: &[ListenSpec],
) -> Result<Vec<Socket>, SocketError> {
    let mut taken = HashSet::new();
    let mut sockets = Vec::new();
    let passed = inherited
        .fds
        .iter()
        .map(|(fd, name)| (*fd, name.clone(), true));
    let argued = fds.iter().map(|fd| (*fd, format!("fd{fd}"), false));
    for (fd, name, from_env) in passed.chain(argued) {
        let origin = if from_env { "LISTEN_FDS" } else { "--fd" };
        let err = |reason: String| SocketError::Fd {
            fd,
            origin: origin.to_owned(),
            reason,
        };
        if !taken.insert(fd) {
            return Err(err("given twice".to_owned()));
        }
        let owned = sys::own_inherited_fd(fd).map_err(|e| err(e.to_string()))?;
        let was_nonblocking = is_nonblocking(fd).map_err(|e| err(e.to_string()))?;
        let kind = classify(owned).map_err(err)?;
        let origin = if from_env {
            Origin::ListenFds {
                fd,
                was_nonblocking,
            }
        } else {
            Origin::Argument {
                fd,
                was_nonblocking,
            }
        };
        sockets.push(Socket { name, origin, kind });
    }
    for spec in listen {
        let kind = bind(spec).map_err(|source| SocketError::Bind {
            spec: spec.to_string(),
            source,
        })?;
        sockets.push(Socket {
            name: spec.to_string(),
            origin: Origin::Bound,
            kind,
        });
    }
    Ok(sockets)
}

/// Binds the `--health` listener.
pub fn bind_health(addr: SocketAddr) -> Result<TcpListener, SocketError> {
    bind_tcp(addr).map_err(|source| SocketError::Bind {
        spec: addr.to_string(),
        source,
    })
}

pub fn is_nonblocking(fd: RawFd) -> io::Result<bool> {
    let flags = fcntl(fd, FcntlArg::F_GETFL)?;
    Ok(OFlag::from_bits_truncate(flags).contains(OFlag::O_NONBLOCK))
}

/// Checks what an inherited fd is and wraps it in the matching std type.
fn classify(fd: OwnedFd) -> Result<Kind, String> {
    let sock = SockRef::from(&fd);
    let ty = sock.r#type().map_err(|e| format!("not a socket: {e}"))?;
    let domain = sock.domain().map_err(|e| e.to_string())?;
    let inet = domain == Domain::IPV4 || domain == Domain::IPV6;
    if domain != Domain::UNIX && !inet {
        return Err(format!("unsupported socket family {domain:?}"));
    }
    if ty == Type::STREAM && !sock.is_listener().map_err(|e| e.to_string())? {
        return Err("stream socket is not listening".to_owned());
    }
    // What real servers do to inherited sockets: close-on-exec (as
    // sd_listen_fds does) and O_NONBLOCK (as Go, node and tokio do).
    sock.set_cloexec(true).map_err(|e| e.to_string())?;
    sock.set_nonblocking(true).map_err(|e| e.to_string())?;
    match (ty, inet) {
        (Type::STREAM, true) => Ok(Kind::Tcp(fd.into())),
        (Type::STREAM, false) => Ok(Kind::Unix(fd.into())),
        (Type::DGRAM, true) => Ok(Kind::Udp(fd.into())),
        (Type::DGRAM, false) => Ok(Kind::UnixDatagram(fd.into())),
        (ty, _) => Err(format!("unsupported socket type {ty:?}")),
    }
}

fn bind(spec: &ListenSpec) -> io::Result<Kind> {
    match spec {
        ListenSpec::Tcp(addr) => bind_tcp(*addr).map(Kind::Tcp),
        ListenSpec::Udp(addr) => {
            let socket = UdpSocket::bind(addr)?;
            socket.set_nonblocking(true)?;
            Ok(Kind::Udp(socket))
        }
        ListenSpec::Unix(path) => {
            let listener = UnixListener::bind(path)?;
            listener.set_nonblocking(true)?;
            Ok(Kind::Unix(listener))
        }
    }
}

/// A TCP listener with SO_REUSEADDR, so a bare demo can be restarted at once.
fn bind_tcp(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = Socket2::new(Domain::for_address(addr), Type::STREAM.cloexec(), None)?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

impl fmt::Display for ListenSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenSpec::Tcp(addr) => write!(f, "tcp:{addr}"),
            ListenSpec::Udp(addr) => write!(f, "udp:{addr}"),
            ListenSpec::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

impl fmt::Display for Socket {
    /// e.g. `tcp 127.0.0.1:8080 "http" (LISTEN_FDS fd 3, was blocking)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (proto, fd) = match &self.kind {
            Kind::Tcp(s) => ("tcp", s.as_fd()),
            Kind::Unix(s) => ("unix", s.as_fd()),
            Kind::Udp(s) => ("udp", s.as_fd()),
            Kind::UnixDatagram(s) => ("unixgram", s.as_fd()),
        };
        let local = local_address(&SockRef::from(&fd));
        write!(f, "{proto} {local} {:?}", self.name)?;
        match self.origin {
            Origin::ListenFds {
                fd,
                was_nonblocking,
            } => {
                write!(
                    f,
                    " (LISTEN_FDS fd {fd}, was {})",
                    blocking(was_nonblocking)
                )
            }
            Origin::Argument {
                fd,
                was_nonblocking,
            } => {
                write!(f, " (--fd {fd}, was {})", blocking(was_nonblocking))
            }
            Origin::Bound => write!(f, " (bound, fd {})", fd.as_raw_fd()),
        }
    }
}

fn blocking(nonblocking: bool) -> &'static str {
    if nonblocking {
        "O_NONBLOCK"
    } else {
        "blocking"
    }
}

/// The local address of a socket, for logs and the report: `127.0.0.1:80`,
/// `/run/x.sock`, `@abstract`, or `?`.
pub fn local_address(sock: &SockRef<'_>) -> String {
    let Ok(addr) = sock.local_addr() else {
        return "?".to_owned();
    };
    if let Some(inet) = addr.as_socket() {
        return inet.to_string();
    }
    if let Some(path) = addr.as_pathname() {
        return path.display().to_string();
    }
    if let Some(name) = addr.as_abstract_namespace() {
        return format!("@{}", String::from_utf8_lossy(name));
    }
    "(unnamed)".to_owned()
}
