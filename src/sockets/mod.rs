//! The listening sockets nogap holds.
//!
//! Sockets come from two places: systemd socket activation (`LISTEN_FDS`
//! addressed to nogap, names from `LISTEN_FDNAMES`; see [`intake`]) and
//! `--listen`, which nogap binds itself (see [`bind`]). Either way they are
//! validated, close-on-exec, known by name, and never closed while nogap
//! runs: that is what makes a hand-off gap-free. [`steer`] gives each
//! generation its own copy of a TCP socket and steers new connections;
//! [`diag`] reads which connections wait in an accept queue (sock_diag);
//! [`carry`] names them for a self-upgrade, across `execve`; [`set`] holds
//! them by index and plans what a reload's `listen` changes.
//!
//! Hand-off mode: nogap creates sockets in blocking mode (as systemd does by
//! default) and never changes `O_NONBLOCK` afterwards; inherited sockets are
//! passed on exactly as received. The exception is the nginx form, which
//! gets non-blocking sockets (see [`bind::nonblocking_for_nginx`]). A
//! generation's own steered socket starts in the original's mode as it was
//! before the first hand-off. The flag belongs to the open file shared by
//! every worker, so a server that sets it (most event-loop servers do) sets it
//! for all generations.

use std::fmt;
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};

use nix::fcntl::Flock;

use crate::config::ListenSpec;
use crate::error::Error;
use crate::spec::Endpoint;
use crate::sys;

pub mod bind;
pub mod carry;
pub mod diag;
pub mod guard;
pub mod intake;
pub mod set;
pub mod steer;

pub use bind::{nonblocking_for_nginx, reuseport_copy, slot_copies};
pub use intake::take_inherited;
pub use set::Listeners;

/// Where a socket nogap holds came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Origin {
    /// Passed by systemd (`LISTEN_FDS`), and not asked for by `--listen`.
    Inherited,
    /// Bound by nogap for a `--listen`.
    Bound,
    /// Passed by systemd for a `--listen` of the same name and address:
    /// taken back from the fd store.
    Restored,
    /// A `SO_REUSEPORT` copy nogap made (a slot's own queue, a generation's
    /// steered socket).
    Copy,
}

/// One socket nogap holds.
#[derive(Debug)]
pub struct Listener {
    pub name: String,
    pub endpoint: Endpoint,
    pub origin: Origin,
    fd: OwnedFd,
    /// For a unix socket nogap bound: the lock on `PATH.lock`, held while
    /// nogap holds the socket (see `bind`).
    lock: Option<Flock<File>>,
}

impl AsFd for Listener {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl fmt::Display for Listener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={}", self.name, self.endpoint)
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
    fn new(name: String, endpoint: Endpoint, origin: Origin, fd: OwnedFd) -> Listener {
        Listener {
            name,
            endpoint,
            origin,
            fd,
            lock: None,
        }
    }

    /// The descriptor as nogap holds it, for the hand-off plan.
    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Passed to nogap by systemd (socket unit or fd store).
    pub fn inherited(&self) -> bool {
        matches!(self.origin, Origin::Inherited | Origin::Restored)
    }

    /// Asked for with `--listen` (bound now, or taken back from the fd store).
    pub fn listed(&self) -> bool {
        matches!(self.origin, Origin::Bound | Origin::Restored)
    }

    /// The accept queue, for TCP listeners.
    pub fn queue(&self) -> Option<Queue> {
        self.endpoint.tcp()?;
        sys::tcp_queue(self.fd.as_fd())
            .ok()
            .map(|(depth, backlog)| Queue { depth, backlog })
    }
}

/// Give the sockets nogap bound itself to systemd's fd store, so that they
/// survive a restart of nogap (they come back as LISTEN_FDS, by name).
///
/// Every `--listen` socket is stored, including ones just taken back from the
/// store: systemd ignores an fd it holds already, and a socket that an
/// `FDSTOREREMOVE=1` of its name (a stale entry) took out must go back in.
pub fn store<'a>(listeners: impl IntoIterator<Item = &'a Listener>) {
    for l in listeners.into_iter().filter(|l| l.listed()) {
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

/// The sockets a run will have, by name and endpoint, in hand-off order
/// (fd 3, 4, ... in the worker), before any is bound: what [`open_all`]
/// yields.
pub fn planned<'a>(
    inherited: &'a [Listener],
    specs: &'a [ListenSpec],
) -> Vec<(&'a str, &'a Endpoint)> {
    let kept = inherited
        .iter()
        .filter(|l| !specs.iter().any(|s| s.name == l.name))
        .map(|l| (l.name.as_str(), &l.endpoint));
    kept.chain(specs.iter().map(|s| (s.name.as_str(), &s.endpoint)))
        .collect()
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
        if let Some(i) = inherited
            .iter()
            .position(|l| l.name == spec.name && l.endpoint == spec.endpoint)
        {
            let mut l = inherited.remove(i);
            tracing::info!(socket = %l.name, addr = %l.endpoint, "taking the inherited socket back");
            l.origin = Origin::Restored;
            own.push(l);
            continue;
        }
        own.push(bind::bind(spec, backlog, reuseport, steer)?);
    }
    let (stale, inherited): (Vec<Listener>, Vec<Listener>) = inherited
        .into_iter()
        .partition(|l| specs.iter().any(|s| s.name == l.name));
    for l in stale {
        tracing::warn!(socket = %l.name, addr = %l.endpoint, "dropping a stale inherited socket: --listen gives this name another address");
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

/// Per slot, the fds a worker gets: the slot's own copies where there are,
/// else `fds` (slot 0's row, and every row without copies).
pub fn slot_fds(fds: &[RawFd], copies: &[Vec<Option<Listener>>]) -> Vec<Vec<RawFd>> {
    std::iter::once(fds.to_vec())
        .chain(copies.iter().map(|row| {
            row.iter()
                .zip(fds)
                .map(|(c, fd)| c.as_ref().map_or(*fd, Listener::raw_fd))
                .collect()
        }))
        .collect()
}

/// Every socket a run holds, ready for the loop.
pub struct Assembled {
    /// The listeners, in hand-off order (stored pools taken out).
    pub listeners: Listeners,
    /// The per-slot copies, `copies[slot - 1][listener]`.
    pub copies: Vec<Vec<Option<Listener>>>,
    pub steering: steer::Steering,
    /// The original sockets outlive nogap (socket unit or fd store).
    pub keep_home: bool,
}

/// Set up what a run holds: the nginx form's socket mode, the pools a dead
/// nogap left in the fd store (taken back into steering, which writes the
/// pool that serves to `steer_record` for the next nogap), the fd store,
/// and the per-slot copies.
pub fn assemble(
    listeners: Vec<Listener>,
    config: &crate::config::RunConfig,
    steer_record: std::path::PathBuf,
) -> Result<Assembled, Error> {
    if config.launch.fds_as.contains(&crate::spec::HandOff::Nginx) {
        nonblocking_for_nginx(&listeners);
    }
    let (stored, listeners): (Vec<Listener>, Vec<Listener>) =
        listeners.into_iter().partition(steer::is_stored_pool);
    let keep_home = config.fd_store || listeners.iter().any(|l| l.inherited());
    let listeners = Listeners::from(listeners);
    let steering = steer::Steering::new(
        &listeners,
        config.steer,
        keep_home,
        config.backlog,
        stored,
        Some(steer_record),
    );
    if config.fd_store {
        store(listeners.iter().map(|(_, l)| l));
    }
    let copies = if config.per_worker_sockets {
        slot_copies(&listeners, config.workers, config.backlog)?
    } else {
        Vec::new()
    };
    Ok(Assembled {
        listeners,
        copies,
        steering,
        keep_home,
    })
}
