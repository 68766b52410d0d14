//! Binding: the sockets `--listen` asks for, and the `SO_REUSEPORT` copies
//! of them that per-slot queues and steered generations use.

use std::fs::File;
use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::FileTypeExt;
use std::path::Path;

use nix::fcntl::{Flock, FlockArg};
use socket2::{Domain, SockAddr, SockRef, Socket, Type};

use super::{Listener, Origin};
use crate::config::{ListenSpec, UnixOptions};
use crate::error::Error;
use crate::spec::Endpoint;

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
        addr: spec.endpoint.to_string(),
        source,
    };
    let mut unix_lock = None;
    let sock = match &spec.endpoint {
        Endpoint::Tcp(a) => bind_inet(*a, Type::STREAM, reuseport || steer).map_err(err)?,
        Endpoint::Udp(a) => bind_inet(*a, Type::DGRAM, reuseport).map_err(err)?,
        Endpoint::Unix(p) => {
            let (sock, lock) = bind_unix(p, &spec.unix).map_err(err)?;
            unix_lock = Some(lock);
            sock
        }
        other => {
            return Err(err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("cannot bind {other}"),
            )))
        }
    };
    if spec.endpoint.listens() {
        sock.listen(backlog).map_err(err)?;
    }
    let local = sock.local_addr().map_err(err)?;
    // The bound address: a port 0 asked for is a real port now.
    let endpoint = match (&spec.endpoint, local.as_socket()) {
        (Endpoint::Tcp(_), Some(a)) => Endpoint::Tcp(a),
        (Endpoint::Udp(_), Some(a)) => Endpoint::Udp(a),
        (e, _) => e.clone(),
    };
    if let (true, Some(at)) = (steer && !reuseport, endpoint.tcp()) {
        match super::diag::listeners_at(at) {
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
    let mut l = Listener::new(spec.name.clone(), endpoint, Origin::Bound, sock.into());
    l.lock = unix_lock;
    Ok(l)
}

/// For `--reuseport-per-worker`: for each worker slot 1.., an SO_REUSEPORT
/// copy of every TCP socket nogap bound (slot 0 uses the original, which was
/// bound with SO_REUSEPORT too). `copies[slot - 1][i]` stands in for
/// `listeners[i]` in that slot, or is None where the socket stays shared
/// (inherited, UDP, unix). Each copy has its own accept queue, so a stall
/// names its slot; nogap holds every copy, so none is ever closed.
pub fn slot_copies(
    listeners: &super::Listeners,
    workers: u32,
    backlog: i32,
) -> Result<Vec<Vec<Option<Listener>>>, Error> {
    (1..workers)
        .map(|_| {
            listeners
                .iter()
                .map(|(_, l)| copy_for_slot(l, backlog))
                .collect()
        })
        .collect()
}

fn copy_for_slot(l: &Listener, backlog: i32) -> Result<Option<Listener>, Error> {
    if l.endpoint.tcp().is_none() || l.inherited() {
        return Ok(None);
    }
    copy_with_backlog(l, backlog).map(Some)
}

/// Another TCP listener on `l`'s address, with `SO_REUSEPORT` (so `l` must
/// have it), the same `IPV6_V6ONLY`, the `backlog` given (the configured
/// one: `l`'s current backlog may have been shrunk by a worker's
/// `listen(fd, 1)`), and `O_NONBLOCK` as given: it joins `l`'s reuseport
/// group, at its end.
pub fn reuseport_copy(l: &Listener, backlog: i32, nonblocking: bool) -> Result<Listener, Error> {
    let copy = copy_with_backlog(l, backlog)?;
    if nonblocking {
        SockRef::from(&copy)
            .set_nonblocking(true)
            .map_err(|source| Error::Bind {
                addr: l.endpoint.to_string(),
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
    for l in listeners.iter().filter(|l| l.endpoint.listens()) {
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
        addr: l.endpoint.to_string(),
        source,
    };
    let addr = l.endpoint.tcp().ok_or_else(|| {
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
    Ok(Listener::new(
        l.name.clone(),
        l.endpoint.clone(),
        Origin::Copy,
        sock.into(),
    ))
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
