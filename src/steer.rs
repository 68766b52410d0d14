//! Steered hand-over: each generation accepts from its own socket.
//!
//! When every generation accepts from one shared socket, an old worker keeps
//! accepting until its stop signal, and a graceful stop may close a
//! connection it accepted an instant before without reading it (uvicorn
//! does): that client gets a reset. Steering closes the window. For a TCP
//! socket with `SO_REUSEPORT` that is alone in its reuseport group, nogap
//! binds more sockets to the same address, one *pool* per generation alive
//! at a time (pool 0 is the original socket; pools are reused once their
//! generation is gone). A classic BPF program on the group
//! (`SO_ATTACH_REUSEPORT_CBPF`, [`sys::steer_reuseport`]) sends every new
//! connection to the serving generation's pool. When a generation is ready,
//! nogap steers to it, waits until every other pool's accept queue has been
//! empty for [`QUIET`] (old workers accept and read what was queued for
//! them), and only then sends the old workers the stop signal.
//!
//! Pool k is index k of the group: a socket joins its group at the end when
//! it starts listening, and nogap closes no pool socket while it runs, so
//! indices never move. That holds only if the original socket is alone in
//! its group when nogap starts (checked with sock_diag); otherwise, and for
//! UDP, unix and inherited sockets without `SO_REUSEPORT`, a socket stays
//! shared by every generation, as before.
//!
//! At stop nogap steers back to pool 0, the socket a socket unit or the fd
//! store keeps, and stops the workers only once the other pools are empty:
//! connections that arrive while nogap restarts wait in the socket that
//! survives it.

use std::collections::{BTreeMap, BTreeSet};
use std::os::fd::{AsFd, RawFd};
use std::time::{Duration, Instant};

use crate::sockets::{self, Listener};
use crate::sys;

/// How long the other pools' queues must stay empty after a steer before
/// their workers are stopped: covers handshakes that were steered before the
/// switch, and an old worker reading what it accepted last.
pub const QUIET: Duration = Duration::from_millis(100);

/// How often a hand-over in progress samples the queues.
pub const POLL: Duration = Duration::from_millis(5);

/// One steered socket and its pools beyond the original.
#[derive(Debug)]
struct Steered {
    /// Index into the supervisor's listeners.
    listener: usize,
    /// The original's `O_NONBLOCK` before any hand-off: pools start so too.
    nonblocking: bool,
    /// `copies[k - 1]` is pool k.
    copies: Vec<Listener>,
}

impl Steered {
    /// Its socket in pool `p`.
    fn socket<'a>(&'a self, listeners: &'a [Listener], p: usize) -> &'a Listener {
        match p {
            0 => &listeners[self.listener],
            _ => &self.copies[p - 1],
        }
    }
}

#[derive(Debug)]
pub struct Steering {
    steered: Vec<Steered>,
    /// Pools so far, including pool 0.
    pools: usize,
    /// The pool of each generation that has one.
    generations: BTreeMap<u64, usize>,
    /// Where new connections go.
    target: usize,
    /// A steer waiting for the other pools to drain: when their queues were
    /// last seen non-empty (or the steer).
    busy_at: Option<Instant>,
    /// Pool 0 outlives nogap (socket activation, fd store): steer back to it
    /// at stop.
    keep_home: bool,
}

impl Steering {
    /// Steer every socket that can be steered to pool 0, and log which
    /// cannot and why. `enabled` false (`--handover shared`): none.
    /// `keep_home`: the original sockets outlive nogap.
    pub fn new(listeners: &[Listener], enabled: bool, keep_home: bool) -> Steering {
        let mut steered = Vec::new();
        for (i, l) in listeners.iter().enumerate() {
            if !enabled {
                break;
            }
            match steerable(l) {
                Ok(()) => {
                    tracing::info!(socket = %l.name, "hand-over: steered (a socket per generation)");
                    steered.push(Steered {
                        listener: i,
                        nonblocking: socket2::SockRef::from(l).nonblocking().unwrap_or(false),
                        copies: Vec::new(),
                    });
                }
                Err(why) => {
                    tracing::info!(socket = %l.name, reason = %why, "hand-over: shared by every generation")
                }
            }
        }
        Steering {
            steered,
            pools: 1,
            generations: BTreeMap::new(),
            target: 0,
            busy_at: None,
            keep_home,
        }
    }

    pub fn active(&self) -> bool {
        !self.steered.is_empty()
    }

    /// Whether listener `i` is steered.
    pub fn steers(&self, i: usize) -> bool {
        self.steered.iter().any(|s| s.listener == i)
    }

    /// How many sockets each steered listener has (pools), and the pool new
    /// connections go to.
    pub fn pools(&self) -> (usize, usize) {
        (self.pools, self.target)
    }

    /// The fds a worker of `generation` gets: `base` (the listeners', in
    /// hand-off order) with its pool's socket for every steered listener.
    /// A generation's first worker picks the lowest pool no generation in
    /// `live` holds, binding a new one if all are taken; if that fails the
    /// generation shares the target pool (logged; shared hand-over). With
    /// `stalled` (nobody accepts from the target pool) it shares the target
    /// pool too, so that it takes over the connections waiting there.
    pub fn fds(
        &mut self,
        listeners: &[Listener],
        generation: u64,
        live: &BTreeSet<u64>,
        base: &[RawFd],
        stalled: bool,
    ) -> Vec<RawFd> {
        self.generations
            .retain(|g, _| live.contains(g) || *g == generation);
        let pool = match self.generations.get(&generation) {
            Some(&p) => p,
            None => {
                let taken: BTreeSet<usize> = self.generations.values().copied().collect();
                let free = (0..self.pools).find(|p| !taken.contains(p));
                let pool = match free {
                    _ if stalled => {
                        tracing::warn!(generation, "the serving socket is stalled: this generation shares it, to take over its queue");
                        self.target
                    }
                    Some(p) => p,
                    None => match self.add_pool(listeners) {
                        Ok(p) => p,
                        Err(e) => {
                            tracing::warn!(generation, error = %e, "cannot bind another socket: this generation shares the serving one");
                            self.target
                        }
                    },
                };
                self.generations.insert(generation, pool);
                pool
            }
        };
        let mut fds = base.to_vec();
        for s in &self.steered {
            fds[s.listener] = s.socket(listeners, pool).raw_fd();
        }
        fds
    }

    /// Bind pool `self.pools` for every steered socket. A new socket lands
    /// at the group's end, which is that index only while the group holds
    /// nogap's pools alone: checked before and after, so that a stranger who
    /// joined (another process of the same user with SO_REUSEPORT) can make
    /// a generation share a socket, never steer connections to the stranger.
    fn add_pool(&mut self, listeners: &[Listener]) -> Result<usize, String> {
        let members = |s: &Steered| {
            let local = listeners[s.listener]
                .local
                .expect("steered sockets are TCP");
            crate::diag::listeners_at(local)
                .map_err(|e| format!("cannot count sockets on {local}: {e}"))
        };
        // All or nothing: a half-made pool would misnumber the next.
        let mut copies = Vec::new();
        for s in &self.steered {
            let l = &listeners[s.listener];
            let before = members(s)?;
            if before != self.pools {
                return Err(format!("{before} sockets listen on {} where nogap has {}: another process shares the address", l.address, self.pools));
            }
            copies.push(sockets::reuseport_copy(l, s.nonblocking).map_err(|e| e.to_string())?);
            let after = members(s)?;
            if after != self.pools + 1 {
                return Err(format!("{after} sockets listen on {} after adding one to nogap's {}: another process shares the address", l.address, self.pools));
            }
        }
        for (s, c) in self.steered.iter_mut().zip(copies) {
            s.copies.push(c);
        }
        self.pools += 1;
        Ok(self.pools - 1)
    }

    /// Send new connections to `generation`'s pool (None, at stop: pool 0 if
    /// it outlives nogap, else where they go now). Returns true when the
    /// other pools are already known to be empty and quiet (nothing was
    /// steered away), false when [`Steering::poll`] will tell.
    pub fn steer(&mut self, listeners: &[Listener], generation: Option<u64>, now: Instant) -> bool {
        let pool = match generation {
            Some(g) => self.generations.get(&g).copied().unwrap_or(0),
            None if self.keep_home => 0,
            None => self.target,
        };
        let moved = pool != self.target;
        if moved {
            for s in &self.steered {
                let l = &listeners[s.listener];
                if let Err(e) = sys::steer_reuseport(l.as_fd(), pool as u32) {
                    tracing::error!(socket = %l.name, pool, error = %e, "cannot steer new connections");
                }
            }
            tracing::info!(pool, generation, "new connections steered");
            self.target = pool;
        }
        if moved || self.busy_at.is_some() || !self.others_empty(listeners) {
            self.busy_at = Some(now);
            return false;
        }
        true
    }

    /// True while a steer waits for the other pools to drain.
    pub fn waiting(&self) -> bool {
        self.busy_at.is_some()
    }

    /// Sample the other pools: true (once) when they have stayed empty for
    /// [`QUIET`].
    pub fn poll(&mut self, listeners: &[Listener], now: Instant) -> bool {
        let Some(busy_at) = self.busy_at else {
            return false;
        };
        if !self.others_empty(listeners) {
            self.busy_at = Some(now);
            return false;
        }
        if now.saturating_duration_since(busy_at) < QUIET {
            return false;
        }
        self.busy_at = None;
        true
    }

    fn others_empty(&self, listeners: &[Listener]) -> bool {
        (0..self.pools)
            .filter(|&p| p != self.target)
            .all(|p| self.depth(listeners, p) == 0)
    }

    /// Connections waiting in pool `p`, over every steered socket.
    pub fn depth(&self, listeners: &[Listener], p: usize) -> u32 {
        self.steered
            .iter()
            .map(|s| s.socket(listeners, p).queue().map_or(0, |q| q.depth))
            .sum()
    }

    /// The socket of listener `i` that new connections go to now.
    pub fn serving<'a>(&'a self, listeners: &'a [Listener], i: usize) -> &'a Listener {
        match self.steered.iter().find(|s| s.listener == i) {
            Some(s) => s.socket(listeners, self.target),
            None => &listeners[i],
        }
    }
}

/// Why a socket cannot be steered, if it cannot.
fn steerable(l: &Listener) -> Result<(), String> {
    let Some(local) = l.local.filter(|_| l.tcp) else {
        return Err("not a TCP listener".into());
    };
    let sock = socket2::SockRef::from(l);
    if !sock.reuse_port().unwrap_or(false) {
        return Err("no SO_REUSEPORT on it (ReusePort=yes in the socket unit)".into());
    }
    match crate::diag::listeners_at(local) {
        Ok(1) => {}
        Ok(n) => {
            return Err(format!(
                "{n} sockets listen on {local}: it is not nogap's alone"
            ))
        }
        Err(e) => return Err(format!("cannot count the sockets on {local}: {e}")),
    }
    sys::steer_reuseport(l.as_fd(), 0)
        .map_err(|e| format!("cannot attach a steering program: {e}"))?;
    // Can nogap bind another socket there (same user as the socket's
    // creator)? With the program in place the trial copy gets no
    // connection, and as the group's last member it leaves without moving
    // the others.
    drop(
        sockets::reuseport_copy(l, false)
            .map_err(|e| format!("cannot bind a second socket: {e}"))?,
    );
    Ok(())
}
