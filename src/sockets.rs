//! The listening sockets nogap holds.
//!
//! Sockets come from two places: systemd socket activation (`LISTEN_FDS`
//! addressed to nogap, names from `LISTEN_FDNAMES`) and `--listen`, which nogap
//! binds itself. Either way they are validated, close-on-exec, known by name,
//! and never closed while nogap runs: that is what makes a hand-off gap-free.
//!
//! Hand-off mode: nogap creates sockets in blocking mode (as systemd does by
//! default) and never changes `O_NONBLOCK` afterwards; inherited sockets are
//! passed on exactly as received. The exception is the nginx form, which
//! gets non-blocking sockets (see [`nonblocking_for_nginx`]). A generation's
//! own steered socket (see `steer`) starts in the original's mode as it was
//! before the first hand-off. The flag belongs to the open file shared by
//! every worker, so a server that sets it (most event-loop servers do) sets it
//! for all generations.

use std::fmt;
use std::fs::File;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::path::Path;

use nix::fcntl::{Flock, FlockArg};
use socket2::{Domain, SockAddr, SockRef, Socket, Type};

use crate::config::{self, Address, ListenSpec, UnixOptions};
use crate::error::Error;
use crate::supervisor::Environment;
use crate::sys;

/// The kind of a socket, as far as hand-off and monitoring care.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A listening stream socket (TCP or unix): has an accept queue.
    Listener,
    /// A datagram socket (UDP or unix datagram).
    Datagram,
}

/// One socket nogap holds.
#[derive(Debug)]
pub struct Listener {
    pub name: String,
    /// Human-readable local address, e.g. `tcp://127.0.0.1:8080`.
    pub address: String,
    pub kind: Kind,
    /// True for TCP listeners, which have a readable accept queue.
    pub tcp: bool,
    pub inherited: bool,
    /// Asked for with `--listen` (bound now, or taken back from the fd store).
    pub listed: bool,
    /// For a unix socket nogap bound: the lock on `PATH.lock`, held while
    /// nogap holds the socket (see `bind_unix`).
    _lock: Option<Flock<File>>,
    /// The local IP address and port, for TCP and UDP.
    pub local: Option<SocketAddr>,
    fd: OwnedFd,
}

impl AsFd for Listener {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl fmt::Display for Listener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={}", self.name, self.address)
    }
}

/// Accept-queue depth of a TCP listener, from `TCP_INFO`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Queue {
    /// Connections waiting to be accepted.
    pub depth: u32,
    /// The effective backlog.
    pub backlog: u32,
}

impl Listener {
    /// The descriptor as nogap holds it, for the hand-off plan.
    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// The accept queue, for TCP listeners.
    pub fn queue(&self) -> Option<Queue> {
        if !self.tcp {
            return None;
        }
        sys::tcp_queue(self.fd.as_fd())
            .ok()
            .map(|(depth, backlog)| Queue { depth, backlog })
    }
}

/// Take the sockets systemd (or systemd-socket-activate) passed to nogap.
/// Returns none when LISTEN_FDS is not addressed to this process.
///
/// An fd that is not a usable socket is an error, except with `from_store`
/// (nogap uses systemd's fd store): then it is logged, dropped from the store,
/// and nogap binds afresh, rather than never starting again.
pub fn take_inherited(env: &Environment, from_store: bool) -> Result<Vec<Listener>, Error> {
    let mut out = Vec::new();
    for (raw, name) in listen_fds(env)? {
        match validate_inherited(raw, name.clone()) {
            Ok(l) => out.push(l),
            Err(e) if from_store => {
                tracing::error!(fd = raw, socket = %name, error = %e, "dropping unusable fd from the fd store");
                let _ = nix::unistd::close(raw);
                let _ = sd_notify::notify(&[
                    sd_notify::NotifyState::Custom("FDSTOREREMOVE=1"),
                    sd_notify::NotifyState::FdName(&name),
                ]);
            }
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

/// Give the sockets nogap bound itself to systemd's fd store, so that they
/// survive a restart of nogap (they come back as LISTEN_FDS, by name).
///
/// Every `--listen` socket is stored, including ones just taken back from the
/// store: systemd ignores an fd it holds already, and a socket that an
/// `FDSTOREREMOVE=1` of its name (a stale entry) took out must go back in.
pub fn store(listeners: &[Listener]) {
    for l in listeners.iter().filter(|l| l.listed) {
        let states = [
            sd_notify::NotifyState::FdStore,
            sd_notify::NotifyState::FdName(&l.name),
        ];
        match sd_notify::notify_with_fds(&states, &[l.fd.as_fd()]) {
            Ok(()) => tracing::info!(socket = %l.name, "socket stored in systemd's fd store"),
            Err(e) => {
                tracing::warn!(socket = %l.name, error = %e, "cannot store socket in systemd's fd store")
            }
        }
    }
}

/// The sd_listen_fds(3) protocol: fds 3.. with names, when LISTEN_PID is this
/// process (variables addressed to another process are ignored).
fn listen_fds(env: &Environment) -> Result<Vec<(RawFd, String)>, Error> {
    let var = |k: &str| env.get(k).map(|v| v.to_string_lossy().into_owned());
    let Some(pid) = var("LISTEN_PID") else {
        return Ok(Vec::new());
    };
    match pid.parse::<u32>() {
        Ok(p) if p == std::process::id() => {}
        Ok(_) => return Ok(Vec::new()),
        Err(_) => {
            return Err(Error::Inherited(format!(
                "LISTEN_PID='{pid}' is not a process id"
            )))
        }
    }
    let Some(count) = var("LISTEN_FDS") else {
        return Ok(Vec::new());
    };
    let n: i32 = count
        .parse()
        .ok()
        .filter(|n| (0..=4096).contains(n))
        .ok_or_else(|| {
            Error::Inherited(format!(
                "LISTEN_FDS='{count}' is not a number of descriptors"
            ))
        })?;
    let names: Vec<String> = match var("LISTEN_FDNAMES") {
        Some(names) => {
            let list: Vec<String> = names.split(':').map(str::to_string).collect();
            if list.len() != n as usize {
                return Err(Error::Inherited(format!(
                    "LISTEN_FDNAMES='{names}' has {} names for LISTEN_FDS={n}",
                    list.len()
                )));
            }
            list
        }
        None => vec!["unknown".to_string(); n as usize],
    };
    Ok((3..3 + n).zip(names).collect())
}

fn validate_inherited(raw: RawFd, name: String) -> Result<Listener, Error> {
    let what = |msg: &str| Error::Inherited(format!("fd {raw} (name '{name}') {msg}"));
    // Close-on-exec before anything else: nothing of nogap's crosses exec
    // except what the hand-off plan puts at 3, 4, ...
    nix::fcntl::fcntl(
        raw,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    )
    .map_err(|e| what(&format!("cannot be used: {}", e.desc())))?;
    let stat = nix::sys::stat::fstat(raw).map_err(|e| what(&format!("cannot be used: {e}")))?;
    if stat.st_mode & libc::S_IFMT != libc::S_IFSOCK {
        return Err(what("is not a socket"));
    }
    // SAFETY: `raw` is one of the LISTEN_FDS descriptors, which systemd's
    // protocol hands to this process to own; nothing else in nogap uses it.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let sock = SockRef::from(&fd);
    let ty = sock
        .r#type()
        .map_err(|e| what(&format!("has no socket type: {e}")))?;
    let local = sock
        .local_addr()
        .map_err(|e| what(&format!("has no address: {e}")))?;
    let kind = if ty == Type::STREAM || ty == Type::SEQPACKET {
        if !sock.is_listener().unwrap_or(false) {
            return Err(what("is a stream socket that is not listening"));
        }
        Kind::Listener
    } else if ty == Type::DGRAM {
        Kind::Datagram
    } else {
        return Err(what("has an unsupported socket type"));
    };
    config::check_fd_name(&name).map_err(|e| what(&e))?;
    let tcp = kind == Kind::Listener && local.as_socket().is_some();
    Ok(Listener {
        address: describe(&local, kind),
        name,
        kind,
        tcp,
        inherited: true,
        listed: false,
        _lock: None,
        local: local.as_socket(),
        fd,
    })
}

fn describe(addr: &SockAddr, kind: Kind) -> String {
    match (addr.as_socket(), addr.as_pathname(), kind) {
        (Some(a), _, Kind::Listener) => format!("tcp://{a}"),
        (Some(a), _, Kind::Datagram) => format!("udp://{a}"),
        (None, Some(p), _) => format!("unix:{}", p.display()),
        _ => "unix:(unnamed)".to_string(),
    }
}

/// Bind one `--listen` socket.
///
/// With `steer`, a TCP socket gets `SO_REUSEPORT` (for its per-generation
/// copies, see `steer`); unless `reuseport` was asked for too, binding fails
/// as if without it when another socket already listens on the address.
pub fn bind(
    spec: &ListenSpec,
    backlog: i32,
    reuseport: bool,
    steer: bool,
) -> Result<Listener, Error> {
    let err = |source: io::Error| Error::Bind {
        addr: spec.address.to_string(),
        source,
    };
    let mut unix_lock = None;
    let (sock, kind, tcp) = match &spec.address {
        Address::Tcp(a) => (
            bind_inet(*a, Type::STREAM, reuseport || steer).map_err(err)?,
            Kind::Listener,
            true,
        ),
        Address::Udp(a) => (
            bind_inet(*a, Type::DGRAM, reuseport).map_err(err)?,
            Kind::Datagram,
            false,
        ),
        Address::Unix(p) => {
            let (sock, lock) = bind_unix(p, &spec.unix).map_err(err)?;
            unix_lock = Some(lock);
            (sock, Kind::Listener, false)
        }
    };
    if kind == Kind::Listener {
        sock.listen(backlog).map_err(err)?;
    }
    let local = sock.local_addr().map_err(err)?;
    if let (true, false, Some(at)) = (steer && tcp, reuseport, local.as_socket()) {
        match crate::diag::listeners_at(at) {
            Ok(n) if n > 1 => {
                return Err(err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    "address already in use (another socket listens on it with SO_REUSEPORT)",
                )))
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(addr = %at, error = %e, "cannot check for other listeners on the address")
            }
        }
    }
    Ok(Listener {
        name: spec.name.clone(),
        address: describe(&local, kind),
        kind,
        tcp,
        inherited: false,
        listed: true,
        _lock: unix_lock,
        local: local.as_socket(),
        fd: sock.into(),
    })
}

/// For `--reuseport-per-worker`: for each worker slot 1.., an SO_REUSEPORT
/// copy of every TCP socket nogap bound (slot 0 uses the original, which was
/// bound with SO_REUSEPORT too). `copies[slot - 1][i]` stands in for
/// `listeners[i]` in that slot, or is None where the socket stays shared
/// (inherited, UDP, unix). Each copy has its own accept queue, so a stall
/// names its slot; nogap holds every copy, so none is ever closed.
pub fn slot_copies(
    listeners: &[Listener],
    workers: u32,
    backlog: i32,
) -> Result<Vec<Vec<Option<Listener>>>, Error> {
    (1..workers)
        .map(|_| {
            listeners
                .iter()
                .map(|l| copy_for_slot(l, backlog))
                .collect()
        })
        .collect()
}

fn copy_for_slot(l: &Listener, backlog: i32) -> Result<Option<Listener>, Error> {
    if !l.tcp || l.inherited {
        return Ok(None);
    }
    copy_with_backlog(l, backlog).map(Some)
}

/// Another TCP listener on `l`'s address, with `SO_REUSEPORT` (so `l` must
/// have it), the same `IPV6_V6ONLY` and backlog, and `O_NONBLOCK` as given:
/// it joins `l`'s reuseport group, at its end.
pub fn reuseport_copy(l: &Listener, nonblocking: bool) -> Result<Listener, Error> {
    let backlog = l.queue().map_or(libc::SOMAXCONN, |q| q.backlog as i32);
    let copy = copy_with_backlog(l, backlog)?;
    if nonblocking {
        SockRef::from(&copy)
            .set_nonblocking(true)
            .map_err(|source| Error::Bind {
                addr: l.address.clone(),
                source,
            })?;
    }
    Ok(copy)
}

/// For nginx (`--fds-as nginx`): make the listening sockets non-blocking
/// before the first hand-off. nginx sets `O_NONBLOCK` only on sockets it
/// opens itself; an inherited one comes from an older nginx on a binary
/// upgrade, non-blocking already. On a blocking one a worker woken for a
/// connection another worker took blocks in `accept()`, and misses its
/// master's stop command until a connection comes.
pub fn nonblocking_for_nginx(listeners: &[Listener]) {
    for l in listeners.iter().filter(|l| l.kind == Kind::Listener) {
        match SockRef::from(l).set_nonblocking(true) {
            Ok(()) => {
                tracing::info!(socket = %l.name, "nginx form: socket handed over non-blocking")
            }
            Err(e) => {
                tracing::warn!(socket = %l.name, error = %e, "cannot make the socket non-blocking")
            }
        }
    }
}

fn copy_with_backlog(l: &Listener, backlog: i32) -> Result<Listener, Error> {
    let err = |source| Error::Bind {
        addr: l.address.clone(),
        source,
    };
    let addr = l.local.filter(|_| l.tcp).ok_or_else(|| {
        err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a TCP listener",
        ))
    })?;
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, None).map_err(err)?;
    if addr.is_ipv6() {
        let only = SockRef::from(l).only_v6().map_err(err)?;
        sock.set_only_v6(only).map_err(err)?;
    }
    sock.set_reuse_address(true).map_err(err)?;
    sock.set_reuse_port(true).map_err(err)?;
    sock.bind(&addr.into()).map_err(err)?;
    sock.listen(backlog).map_err(err)?;
    Ok(Listener {
        name: l.name.clone(),
        address: l.address.clone(),
        kind: Kind::Listener,
        tcp: true,
        inherited: false,
        listed: false,
        _lock: None,
        local: Some(addr),
        fd: sock.into(),
    })
}

fn bind_inet(addr: SocketAddr, ty: Type, reuseport: bool) -> io::Result<Socket> {
    // socket2 creates sockets with SOCK_CLOEXEC, in blocking mode.
    let sock = Socket::new(Domain::for_address(addr), ty, None)?;
    sock.set_reuse_address(true)?;
    if reuseport {
        sock.set_reuse_port(true)?;
    }
    sock.bind(&addr.into())?;
    Ok(sock)
}

/// Bind a unix stream socket, with the file mode and owner asked for.
///
/// Two nogaps starting on the same path must not both decide that the
/// socket file is stale and remove it (the second would unlink the first
/// one's fresh socket): a lock on `PATH.lock`, held as long as the socket,
/// decides. Holding it, a socket file nobody accepts on is stale and
/// replaced; one that accepts (or has a full queue) belongs to a live server,
/// and binding fails rather than stealing it; anything else is left alone.
fn bind_unix(path: &Path, opts: &UnixOptions) -> io::Result<(Socket, Flock<File>)> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let dir = path.parent().unwrap_or(Path::new("/"));
    if !dir.is_dir() {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("directory {} does not exist", dir.display()),
        ));
    }
    let mut lock_path = path.as_os_str().to_owned();
    lock_path.push(".lock");
    let lock_file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&lock_path)?;
    let lock = Flock::lock(lock_file, FlockArg::LockExclusiveNonblock).map_err(|(_, e)| {
        let e = io::Error::from(e);
        if e.kind() == io::ErrorKind::WouldBlock {
            io::Error::new(
                io::ErrorKind::AddrInUse,
                format!("another nogap holds {}", Path::new(&lock_path).display()),
            )
        } else {
            e
        }
    })?;
    let sock = Socket::new(Domain::UNIX, Type::STREAM, None)?;
    let addr = SockAddr::unix(path)?;
    match sock.bind(&addr) {
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
            let is_socket = std::fs::symlink_metadata(path)
                .map(|m| m.file_type().is_socket())
                .unwrap_or(false);
            if !is_socket {
                return Err(e);
            }
            // Non-blocking: a live server with a full queue answers EAGAIN.
            let probe = Socket::new(Domain::UNIX, Type::STREAM, None)?;
            probe.set_nonblocking(true)?;
            match probe.connect(&addr) {
                Err(p) if p.kind() == io::ErrorKind::ConnectionRefused => {}
                _ => return Err(e),
            }
            std::fs::remove_file(path)?;
            sock.bind(&addr)?;
        }
        other => other?,
    }
    if let Some(mode) = opts.mode {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    }
    if opts.uid.is_some() || opts.gid.is_some() {
        std::os::unix::fs::chown(path, opts.uid, opts.gid)?;
    }
    Ok((sock, lock))
}

/// All sockets for a run: inherited ones first (in LISTEN_FDS order), then
/// `--listen` in command-line order. A `--listen` takes an inherited socket
/// of the same name and address instead of binding (that is how sockets come
/// back from systemd's fd store). An inherited socket with the name of a
/// `--listen` but another address is stale (the configuration changed): it
/// is closed, and with `fd_store` removed from the store.
pub fn open_all(
    inherited: Vec<Listener>,
    specs: &[ListenSpec],
    backlog: i32,
    reuseport: bool,
    steer: bool,
    fd_store: bool,
) -> Result<Vec<Listener>, Error> {
    let mut inherited = inherited;
    let mut own = Vec::new();
    for spec in specs {
        let want = spec.address.to_string();
        if let Some(i) = inherited
            .iter()
            .position(|l| l.name == spec.name && l.address == want)
        {
            let mut l = inherited.remove(i);
            tracing::info!(socket = %l.name, addr = %l.address, "taking the inherited socket back");
            l.listed = true;
            own.push(l);
            continue;
        }
        own.push(bind(spec, backlog, reuseport, steer)?);
    }
    let (stale, inherited): (Vec<Listener>, Vec<Listener>) = inherited
        .into_iter()
        .partition(|l| specs.iter().any(|s| s.name == l.name));
    for l in stale {
        tracing::warn!(socket = %l.name, addr = %l.address, "dropping a stale inherited socket: --listen gives this name another address");
        if fd_store {
            let _ = sd_notify::notify(&[
                sd_notify::NotifyState::Custom("FDSTOREREMOVE=1"),
                sd_notify::NotifyState::FdName(&l.name),
            ]);
        }
    }
    let mut all = inherited;
    all.extend(own);
    if all.is_empty() {
        return Err(Error::Usage(
            "no sockets: give --listen ADDR, or start nogap with LISTEN_FDS (socket activation)"
                .into(),
        ));
    }
    Ok(all)
}

/// Raw fds of the sockets, in hand-off order (fd 3, 4, ... in the worker).
pub fn raw_fds(listeners: &[Listener]) -> Vec<RawFd> {
    listeners.iter().map(Listener::raw_fd).collect()
}
