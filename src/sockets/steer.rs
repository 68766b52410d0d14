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
//! it starts listening. That holds only if the original socket is alone in
//! its group when nogap starts (checked with sock_diag); otherwise, and for
//! UDP, unix and inherited sockets without `SO_REUSEPORT`, a socket stays
//! shared by every generation, as before.
//!
//! A pool that no live generation holds and whose queue is empty is closed
//! ([`Steering::release`]), so that after any number of reloads nogap holds
//! as many sockets as at start. A socket leaving its group moves the group's
//! last socket into its index, and the program names indices, so nogap
//! closes a pool only where no connection can be misrouted: the pool at the
//! group's last index, which moves nothing; or, when the serving pool is
//! last and the only other one left, that other one. Then the serving
//! socket moves to index 0, and until the program is re-attached (a few
//! microseconds) the kernel, finding the index out of range, picks by hash
//! among what is left: the serving socket alone. Indices are those of the
//! group as it is (`order`: a pool a worker shut down and nogap made listen
//! again rejoined at the end, see [`Steering::guard`]), not pool numbers;
//! the highest pool takes a closed pool's number. A pool is taken out with
//! `shutdown(SHUT_RD)`, which leaves the group at once even if a process
//! outside nogap still holds the socket. Pool 0 is closed only when it does
//! not outlive nogap (no socket unit, no fd store); otherwise up to two
//! sockets stay. With at most two generations alive (the policy's bound
//! with steering) there are at most two pools, and the serving one ends at
//! index 0 or alone.
//!
//! Probes (`--ready ...+http:PATH`, see `probe`): the program can also send
//! the connections from one source address and port, a probe's, to another
//! pool than the target: nogap checks a starting generation through its own
//! socket before any client connection goes there ([`program`]).
//!
//! Canary (`--canary PCT:DURATION`, see `policy::canary`): the program can
//! also split the new connections, PCT% to a starting generation's pool and
//! the rest to the target, by the kernel's random number
//! ([`Steering::split`]); a steer ends the split.
//!
//! At stop nogap steers back to pool 0, the socket a socket unit or the fd
//! store keeps, and stops the workers only once the other pools are empty:
//! connections that arrive while nogap restarts wait in the socket that
//! survives it.
//!
//! When nogap dies instead, the program still sends new connections to the
//! pool that served, whose draining workers close it. So when pool 0
//! outlives nogap, every pool nogap binds goes to systemd's fd store too,
//! as `nogap.poolK.NAME` ([`pool_name`]), and the pool new connections go
//! to is written down next to the control socket (`control.steer`). The
//! next nogap adopts the stored pools in order (indices unchanged: systemd
//! held every one), steers to the recorded pool, and its first generation
//! accepts from it: what was queued there, and what arrived while no nogap
//! ran, is served, not reset.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::os::fd::{AsFd, RawFd};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use super::guard::{Finding, Guard, Tamper};
use super::{bind, diag, Listener, Listeners};
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
    fn socket<'a>(&'a self, listeners: &'a Listeners, p: usize) -> &'a Listener {
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
    /// at stop, and keep every pool in systemd's fd store.
    keep_home: bool,
    /// Probe connections in flight: (listener, source, pool).
    probes: Vec<(usize, SocketAddr, usize)>,
    /// The backlog new pools listen with (`--backlog`).
    backlog: i32,
    /// The pool at each index of the reuseport group. Pools join in order;
    /// a pool a worker shut down leaves the group (the kernel moves the
    /// last member into its index) and joins at the end when nogap makes it
    /// listen again (see `guard`).
    order: Vec<usize>,
    /// Where the target pool is written down for the next nogap.
    record: Option<PathBuf>,
    /// No generation has had a pool yet: the first one takes the target.
    first: bool,
    /// A canary: this pool gets this percentage of new connections, the
    /// target the rest (see [`Steering::split`]).
    split: Option<(usize, u8)>,
}

/// The fd-store name of pool `k` (≥ 1) of the socket `name`.
pub fn pool_name(name: &str, k: usize) -> String {
    format!("nogap.pool{k}.{name}")
}

/// The socket name and pool of a stored pool's fd name.
pub fn parse_pool_name(fdname: &str) -> Option<(&str, usize)> {
    let (k, name) = fdname.strip_prefix("nogap.pool")?.split_once('.')?;
    let k: usize = k.parse().ok().filter(|&k| k >= 1)?;
    (!name.is_empty()).then_some((name, k))
}

/// Whether an inherited socket is a stored pool (see [`Steering::new`]).
pub fn is_stored_pool(l: &Listener) -> bool {
    parse_pool_name(&l.name).is_some()
}

impl Steering {
    /// Steer every socket that can be steered (to pool 0, or the adopted
    /// pool that served), and log which
    /// cannot and why. `enabled` false (`--handover shared`): none.
    /// `keep_home`: the original sockets outlive nogap. `stored`: pools a
    /// dead nogap left in systemd's fd store (see [`pool_name`]), adopted
    /// with the target pool in `record`, if any.
    pub fn new(
        listeners: &Listeners,
        enabled: bool,
        keep_home: bool,
        backlog: i32,
        stored: Vec<Listener>,
        record: Option<PathBuf>,
    ) -> Steering {
        let mut adopted = adopt(listeners, stored);
        let pools = 1 + adopted.values().map(Vec::len).min().unwrap_or(0);
        if adopted.values().any(|v| v.len() + 1 != pools) {
            tracing::warn!("stored pools differ between sockets: not adopted");
            adopted.clear();
        }
        let pools = 1 + adopted.values().map(Vec::len).next().unwrap_or(0);
        let recorded = record
            .as_ref()
            .and_then(|p| std::fs::read_to_string(p).ok())
            .and_then(|t| t.trim().parse::<usize>().ok())
            .filter(|&k| k < pools)
            .unwrap_or(0);
        let target = if pools > 1 { recorded } else { 0 };
        let mut steered = Vec::new();
        for (i, l) in listeners.iter() {
            if !enabled {
                break;
            }
            let copies = adopted.remove(&i).unwrap_or_default();
            match steerable(l, backlog, 1 + copies.len(), target) {
                Ok(()) => {
                    tracing::info!(socket = %l.name, "hand-over: steered (a socket per generation)");
                    if !copies.is_empty() {
                        tracing::info!(socket = %l.name, pools = copies.len(), target, "took back the pools a previous nogap stored: the first generation accepts from the one that served");
                    }
                    steered.push(Steered {
                        listener: i,
                        nonblocking: socket2::SockRef::from(l).nonblocking().unwrap_or(false),
                        copies,
                    });
                }
                Err(why) => {
                    tracing::info!(socket = %l.name, reason = %why, "hand-over: shared by every generation")
                }
            }
        }
        let pools = if steered.iter().any(|s| !s.copies.is_empty()) {
            pools
        } else {
            1
        };
        let steering = Steering {
            steered,
            pools,
            generations: BTreeMap::new(),
            target: if pools > 1 { target } else { 0 },
            busy_at: None,
            keep_home,
            probes: Vec::new(),
            backlog,
            order: (0..pools).collect(),
            record,
            first: true,
            split: None,
        };
        steering.write_record();
        steering
    }

    /// Write the target pool down for the next nogap.
    fn write_record(&self) {
        if let (Some(path), true) = (&self.record, self.keep_home && self.active()) {
            let _ = std::fs::write(path, format!("{}\n", self.target));
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
        listeners: &Listeners,
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
                let first = std::mem::replace(&mut self.first, false);
                let pool = match free {
                    // Where new connections go already (pool 0, or an
                    // adopted pool that served before nogap restarted).
                    _ if first => self.target,
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
    fn add_pool(&mut self, listeners: &Listeners) -> Result<usize, String> {
        let members = |s: &Steered| {
            let Some(local) = listeners[s.listener].endpoint.tcp() else {
                return Err("only TCP sockets are steered".to_string());
            };
            diag::listeners_at(local).map_err(|e| format!("cannot count sockets on {local}: {e}"))
        };
        // All or nothing: a half-made pool would misnumber the next.
        let mut copies = Vec::new();
        for s in &self.steered {
            let l = &listeners[s.listener];
            let before = members(s)?;
            if before < self.pools {
                return Err(format!("{before} sockets listen on {} where nogap has {}: one of nogap's stopped listening (shut down by a worker?)", l.endpoint, self.pools));
            }
            if before != self.pools {
                return Err(format!("{before} sockets listen on {} where nogap has {}: another process shares the address", l.endpoint, self.pools));
            }
            let copy = bind::reuseport_copy(l, self.backlog, s.nonblocking);
            copies.push(copy.map_err(|e| e.to_string())?);
            let after = members(s)?;
            if after != self.pools + 1 {
                return Err(format!("{after} sockets listen on {} after adding one to nogap's {}: another process shares the address", l.endpoint, self.pools));
            }
        }
        for (s, c) in self.steered.iter_mut().zip(copies) {
            if self.keep_home {
                store(&listeners[s.listener].name, self.pools, &c);
            }
            s.copies.push(c);
        }
        self.order.push(self.pools);
        self.pools += 1;
        Ok(self.pools - 1)
    }

    /// Close the pools no generation in `live` holds, whose queues are
    /// empty, where that misroutes nothing (see the module doc). Pool 0 (the
    /// original socket in `listeners`) is replaced by the highest pool's
    /// socket when it goes. Returns how many pools were closed.
    pub fn release(&mut self, listeners: &mut Listeners, live: &BTreeSet<u64>) -> usize {
        self.generations.retain(|g, _| live.contains(g));
        let mut closed = 0;
        while self.pools > 1 {
            let free = |p: usize| {
                p != self.target
                    && !self.generations.values().any(|&q| q == p)
                    && !(p == 0 && self.keep_home)
                    && self.depth(listeners, p) == 0
            };
            // Group indices, not pool numbers, say what moves: `order` (a
            // pool a worker shut down rejoined at the end, see `guard`).
            let last = self.order[self.order.len() - 1];
            let gone = if free(last) {
                // The last index: nothing moves.
                self.order.pop();
                last
            } else if self.pools == 2 && last == self.target && free(self.order[0]) {
                // The other pool goes and the serving one moves to index 0:
                // the kernel picks it alone until the program is back.
                self.order.swap_remove(0)
            } else {
                break;
            };
            self.remove_pool(listeners, gone);
            self.aim(listeners);
            closed += 1;
        }
        if closed > 0 {
            tracing::info!(
                closed,
                pools = self.pools,
                target = self.target,
                "steered sockets no generation uses closed"
            );
            if self.keep_home {
                self.restore(listeners, self.pools + closed);
            }
            self.write_record();
        }
        closed
    }

    /// The fd store holds pools 1..`before` under their old numbers: take
    /// them all out, and put in the pools there are now, renumbered.
    fn restore(&self, listeners: &Listeners, before: usize) {
        for s in &self.steered {
            let name = &listeners[s.listener].name;
            for k in 1..before {
                super::intake::unstore(&pool_name(name, k));
            }
            for (k, copy) in s.copies.iter().enumerate() {
                store(name, k + 1, copy);
            }
        }
    }

    /// Take pool `gone` out of its group and close it; the highest pool
    /// takes its number, so that pools stay 0..pools (pool 0 lives in
    /// `listeners`).
    fn remove_pool(&mut self, listeners: &mut Listeners, gone: usize) {
        let high = self.pools - 1;
        for s in &mut self.steered {
            let Some(top) = s.copies.pop() else { continue };
            let old = match gone {
                _ if gone == high => top,
                0 => std::mem::replace(&mut listeners[s.listener], top),
                p => std::mem::replace(&mut s.copies[p - 1], top),
            };
            leave_group(&old);
        }
        let renumber = |p: &mut usize| {
            if *p == high {
                *p = gone;
            }
        };
        renumber(&mut self.target);
        if let Some((p, _)) = &mut self.split {
            renumber(p);
        }
        self.generations.values_mut().for_each(renumber);
        self.order.iter_mut().for_each(renumber);
        self.pools -= 1;
    }

    /// Send new connections to `generation`'s pool (None, at stop: pool 0 if
    /// it outlives nogap, else where they go now). Returns true when the
    /// other pools are already known to be empty and quiet (nothing was
    /// steered away), false when [`Steering::poll`] will tell.
    pub fn steer(&mut self, listeners: &Listeners, generation: Option<u64>, now: Instant) -> bool {
        let pool = match generation {
            Some(g) => self.generations.get(&g).copied().unwrap_or(0),
            None if self.keep_home => 0,
            None => self.target,
        };
        // A canary's split ends with any steer.
        let moved = pool != self.target || self.split.take().is_some();
        if moved {
            self.target = pool;
            self.aim(listeners);
            tracing::info!(pool, generation, "new connections steered");
            self.write_record();
        }
        if moved || self.busy_at.is_some() || !self.others_empty(listeners) {
            self.busy_at = Some(now);
            return false;
        }
        true
    }

    /// A canary: send `percent`% of new connections to `generation`'s pool
    /// and the rest to the target, until the next [`Steering::steer`]
    /// (which ends the split, to the canary's pool or back). A generation
    /// that shares the target pool (a stalled socket) gets its share anyway.
    pub fn split(&mut self, listeners: &Listeners, generation: u64, percent: u8) {
        let Some(pool) = self.pool_of(generation).filter(|&p| p != self.target) else {
            tracing::warn!(generation, "the canary shares the serving socket: no split");
            return;
        };
        self.split = Some((pool, percent));
        self.aim(listeners);
        tracing::info!(pool, generation, percent, "new connections split");
    }

    /// During a canary: listener `i`'s socket that gets the canary's share.
    pub fn canary_socket<'a>(&'a self, listeners: &'a Listeners, i: usize) -> Option<&'a Listener> {
        let (pool, _) = self.split?;
        self.pool_socket(listeners, i, pool)
    }

    /// Point the group's program at the target pool's index in the group
    /// (and each probe's source at its pool's).
    fn aim(&self, listeners: &Listeners) {
        for s in &self.steered {
            let l = &listeners[s.listener];
            if let Err(e) = self.attach(listeners, s.listener) {
                tracing::error!(socket = %l.name, pool = self.target, error = %e, "cannot steer new connections");
            }
        }
    }

    /// Pool `pool`'s index in the reuseport group (see `order`).
    fn index_of(&self, pool: usize) -> u32 {
        self.order.iter().position(|p| *p == pool).unwrap_or(pool) as u32
    }

    /// Check every pool's socket with `guard` (see `guard`), and keep
    /// steering right: a pool that a worker shut down left the reuseport
    /// group and, listening again, joined it at the end. The sockets that
    /// are not steered are the caller's to check.
    ///
    /// Two pools shut down within one round may have left in either order;
    /// nogap assumes the order of their pool numbers.
    pub fn guard(&mut self, guard: &mut Guard, listeners: &Listeners) -> Vec<Finding> {
        let mut out = Vec::new();
        let mut rejoined = Vec::new();
        for p in 0..self.pools {
            for s in &self.steered {
                for f in guard.check(s.socket(listeners, p)) {
                    let back = f.tamper == Tamper::NotListening && f.repaired.is_ok();
                    if back && !rejoined.contains(&p) {
                        rejoined.push(p);
                    }
                    out.push(f);
                }
            }
        }
        if rejoined.is_empty() {
            return out;
        }
        for p in &rejoined {
            if let Some(i) = self.order.iter().position(|q| q == p) {
                self.order.swap_remove(i);
            }
        }
        self.order.extend(&rejoined);
        tracing::warn!(pools = ?rejoined, order = ?self.order, "steered sockets listen again: steering follows their new places in the group");
        self.aim(listeners);
        out
    }

    /// True while a steer waits for the other pools to drain.
    pub fn waiting(&self) -> bool {
        self.busy_at.is_some()
    }

    /// Sample the other pools: true (once) when they have stayed empty for
    /// [`QUIET`].
    pub fn poll(&mut self, listeners: &Listeners, now: Instant) -> bool {
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

    fn others_empty(&self, listeners: &Listeners) -> bool {
        (0..self.pools)
            .filter(|&p| p != self.target)
            .all(|p| self.depth(listeners, p) == 0)
    }

    /// Connections waiting in pool `p`, over every steered socket.
    pub fn depth(&self, listeners: &Listeners, p: usize) -> u32 {
        self.steered
            .iter()
            .map(|s| s.socket(listeners, p).queue().map_or(0, |q| q.depth))
            .sum()
    }

    /// The socket of listener `i` that new connections go to now.
    pub fn serving<'a>(&'a self, listeners: &'a Listeners, i: usize) -> &'a Listener {
        match self.steered.iter().find(|s| s.listener == i) {
            Some(s) => s.socket(listeners, self.target),
            None => &listeners[i],
        }
    }
}

impl Steering {
    /// Listener `i` is about to be closed (no generation has it any more):
    /// its pools beyond the original leave the group and close, and leave
    /// systemd's fd store. Returns their descriptors (closed now).
    pub fn forget(&mut self, listeners: &Listeners, i: usize) -> Vec<RawFd> {
        self.probes.retain(|p| p.0 != i);
        let Some(at) = self.steered.iter().position(|s| s.listener == i) else {
            return Vec::new();
        };
        let gone = self.steered.remove(at);
        let name = &listeners[i].name;
        let mut fds = Vec::new();
        for (k, copy) in gone.copies.into_iter().enumerate() {
            if self.keep_home {
                super::intake::unstore(&pool_name(name, k + 1));
            }
            leave_group(&copy);
            fds.push(copy.raw_fd());
        }
        fds
    }

    /// A listener a reload added is shared by every generation that has
    /// it: its pools would have to join the group in the order of the
    /// others', and the connections that arrive before its first
    /// generation takes a pool would wait in a pool nobody accepts from.
    pub fn added(&self, l: &Listener) {
        if self.active() && l.endpoint.tcp().is_some() {
            tracing::info!(socket = %l.name, "hand-over: shared by every generation (a socket added by a reload is not steered until nogap restarts)");
        }
    }
}

impl Steering {
    /// The pool `generation` accepts from, once it has one.
    pub fn pool_of(&self, generation: u64) -> Option<usize> {
        self.generations.get(&generation).copied()
    }

    /// Listener `i`'s socket in `pool`, if `i` is steered and the pool exists.
    pub fn pool_socket<'a>(
        &'a self,
        listeners: &'a Listeners,
        i: usize,
        pool: usize,
    ) -> Option<&'a Listener> {
        let s = self.steered.iter().find(|s| s.listener == i)?;
        (pool < self.pools).then(|| s.socket(listeners, pool))
    }

    /// Send the connection from `source` (a probe's bound address) to
    /// listener `i` to `generation`'s pool, while every other keeps going to
    /// the target.
    pub fn route_probe(
        &mut self,
        listeners: &Listeners,
        i: usize,
        source: SocketAddr,
        generation: u64,
    ) -> Result<usize, String> {
        let pool = self
            .pool_of(generation)
            .ok_or_else(|| format!("generation {generation} has no socket"))?;
        if !self.steers(i) {
            return Err(format!("socket {} is not steered", listeners[i].name));
        }
        self.probes.push((i, source, pool));
        self.attach(listeners, i).map_err(|e| {
            self.probes.retain(|p| p.1 != source);
            format!("cannot steer the probe: {e}")
        })?;
        Ok(pool)
    }

    /// The probe from `source` is over: its route goes.
    pub fn unroute_probe(&mut self, listeners: &Listeners, source: SocketAddr) {
        let gone: Vec<usize> = self
            .probes
            .iter()
            .filter(|p| p.1 == source)
            .map(|p| p.0)
            .collect();
        self.probes.retain(|p| p.1 != source);
        for i in gone {
            if let Err(e) = self.attach(listeners, i) {
                tracing::error!(socket = %listeners[i].name, error = %e, "cannot steer new connections");
            }
        }
    }

    /// (Re)attach listener `i`'s program: the target, and its probes' routes.
    fn attach(&self, listeners: &Listeners, i: usize) -> std::io::Result<()> {
        let routes: Vec<(SocketAddr, u32)> = self
            .probes
            .iter()
            .filter(|p| p.0 == i)
            .map(|p| (p.1, self.index_of(p.2)))
            .collect();
        let split = self.split.map(|(p, pct)| (self.index_of(p), pct));
        let code = split_program(self.index_of(self.target), &routes, split);
        sys::attach_reuseport_cbpf(listeners[i].as_fd(), &code)
    }
}

/// `SKF_NET_OFF` (linux/filter.h): loads at this offset and beyond read the
/// packet from its network header. For a TCP connection the reuseport
/// program runs with the packet data past the TCP header (the payload), so
/// the headers are reached through this negative offset only.
const NET: u32 = (-0x100000i32) as u32;

fn insn(code: u32, jt: u8, jf: u8, k: u32) -> libc::sock_filter {
    libc::sock_filter {
        code: code as u16,
        jt,
        jf,
        k,
    }
}

/// The steering program: a connection from one of `routes`' source
/// addresses (IP and port, matched exactly) goes to the socket at that
/// route's index in the reuseport group, every other one to `target`. A
/// block per route; a failed comparison jumps to the next block. No source
/// can be forged past it: the address is one of this host's own, from
/// which the kernel only lets nogap's bound probe socket use the port.
pub fn program(target: u32, routes: &[(SocketAddr, u32)]) -> Vec<libc::sock_filter> {
    split_program(target, routes, None)
}

/// [`program`], where the connections no route takes go, with `split`
/// (`(index, percent)`), `percent`% of the time to `index` instead of
/// `target`: the kernel's random number (`SKF_AD_RANDOM`, a fresh one per
/// connection) modulo 100, below `percent`.
pub fn split_program(
    target: u32,
    routes: &[(SocketAddr, u32)],
    split: Option<(u32, u8)>,
) -> Vec<libc::sock_filter> {
    use libc::{
        BPF_ABS, BPF_ALU, BPF_B, BPF_H, BPF_IND, BPF_JEQ, BPF_JMP, BPF_K, BPF_LD, BPF_LDX, BPF_MSH,
        BPF_RET, BPF_RSH, BPF_W,
    };
    let mut code = Vec::new();
    for (source, index) in routes {
        // Each check: the instructions to run, then a JEQ on the value;
        // the JEQ's false branch goes to the end of the block.
        let mut block: Vec<(Vec<libc::sock_filter>, u32)> = Vec::new();
        let version = vec![
            insn(BPF_LD | BPF_B | BPF_ABS, 0, 0, NET),
            insn(BPF_ALU | BPF_RSH | BPF_K, 0, 0, 4),
        ];
        match source.ip() {
            std::net::IpAddr::V4(ip) => {
                block.push((version, 4));
                block.push((
                    vec![insn(BPF_LD | BPF_W | BPF_ABS, 0, 0, NET + 12)],
                    ip.into(),
                ));
                // X = the IP header's length; the source port follows it.
                let port = vec![
                    insn(BPF_LDX | BPF_B | BPF_MSH, 0, 0, NET),
                    insn(BPF_LD | BPF_H | BPF_IND, 0, 0, NET),
                ];
                block.push((port, source.port() as u32));
            }
            std::net::IpAddr::V6(ip) => {
                block.push((version, 6));
                for (w, chunk) in ip.octets().chunks(4).enumerate() {
                    let word = u32::from_be_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
                    let load = insn(BPF_LD | BPF_W | BPF_ABS, 0, 0, NET + 8 + 4 * w as u32);
                    block.push((vec![load], word));
                }
                // A probe's packets carry no extension header.
                let port = vec![insn(BPF_LD | BPF_H | BPF_ABS, 0, 0, NET + 40)];
                block.push((port, source.port() as u32));
            }
        }
        let len: usize = block.iter().map(|(i, _)| i.len() + 1).sum::<usize>() + 1;
        let mut at = 0;
        for (loads, value) in block {
            at += loads.len();
            code.extend(loads);
            // From the JEQ, the block's end is this far.
            let skip = (len - at - 1) as u8;
            code.push(insn(BPF_JMP | BPF_JEQ | BPF_K, 0, skip, value));
            at += 1;
        }
        code.push(insn(BPF_RET | BPF_K, 0, 0, *index));
    }
    if let Some((index, percent)) = split {
        use libc::{BPF_JGE, BPF_MOD, SKF_AD_OFF, SKF_AD_RANDOM};
        let random = (SKF_AD_OFF + SKF_AD_RANDOM) as u32;
        code.push(insn(BPF_LD | BPF_W | BPF_ABS, 0, 0, random));
        code.push(insn(BPF_ALU | BPF_MOD | BPF_K, 0, 0, 100));
        // A >= percent: the target (the last instruction); else `index`.
        code.push(insn(BPF_JMP | BPF_JGE | BPF_K, 1, 0, percent as u32));
        code.push(insn(BPF_RET | BPF_K, 0, 0, index));
    }
    code.push(insn(BPF_RET | BPF_K, 0, 0, target));
    code
}

/// Take a listening socket out of its reuseport group now, whoever else
/// holds it (`shutdown(SHUT_RD)` stops listening; closing only drops
/// nogap's reference).
fn leave_group(l: &Listener) {
    if let Err(e) = socket2::SockRef::from(l).shutdown(std::net::Shutdown::Read) {
        tracing::warn!(socket = %l.name, error = %e, "cannot stop listening on a steered socket");
    }
}

/// Give pool `k` of the socket `name` to systemd's fd store, so that it
/// outlives nogap (see the module doc).
fn store(name: &str, k: usize, copy: &Listener) {
    let fdname = pool_name(name, k);
    let states = [
        sd_notify::NotifyState::FdStore,
        sd_notify::NotifyState::FdName(&fdname),
    ];
    match sd_notify::notify_with_fds(&states, &[copy.as_fd()]) {
        Ok(()) => {
            tracing::info!(socket = %name, pool = k, fdname, "pool stored in systemd's fd store")
        }
        Err(e) => {
            tracing::warn!(socket = %name, pool = k, error = %e, "cannot store the pool in systemd's fd store")
        }
    }
}

/// The stored pools of each listener (by index), in pool order 1, 2, ...:
/// only a gap-free run from 1 on, of the listener's name and address.
/// Anything else is closed.
fn adopt(listeners: &Listeners, stored: Vec<Listener>) -> BTreeMap<usize, Vec<Listener>> {
    let mut by: BTreeMap<usize, BTreeMap<usize, Listener>> = BTreeMap::new();
    for p in stored {
        let found = parse_pool_name(&p.name).and_then(|(name, k)| {
            let (i, _) = listeners
                .iter()
                .find(|(_, l)| l.name == name && l.endpoint == p.endpoint)?;
            Some((i, k))
        });
        match found {
            Some((i, k)) => {
                by.entry(i).or_default().insert(k, p);
            }
            None => {
                tracing::warn!(fdname = %p.name, "a stored pool of no socket of this nogap: closed")
            }
        }
    }
    by.into_iter()
        .map(|(i, pools)| {
            let run: Vec<Listener> = pools
                .into_iter()
                .enumerate()
                .take_while(|(n, (k, _))| *k == n + 1)
                .map(|(_, (_, l))| l)
                .collect();
            (i, run)
        })
        .collect()
}

/// Why a socket cannot be steered, if it cannot: it must have
/// `SO_REUSEPORT`, and `members` sockets in its group (itself and the pools
/// taken back). New connections go to pool `target`.
fn steerable(l: &Listener, backlog: i32, members: usize, target: usize) -> Result<(), String> {
    let Some(local) = l.endpoint.tcp() else {
        return Err("not a TCP listener".into());
    };
    let sock = socket2::SockRef::from(l);
    if !sock.reuse_port().unwrap_or(false) {
        return Err("no SO_REUSEPORT on it (ReusePort=yes in the socket unit)".into());
    }
    match diag::listeners_at(local) {
        Ok(n) if n == members => {}
        Ok(n) => {
            return Err(format!(
                "{n} sockets listen on {local}: it is not nogap's alone"
            ))
        }
        Err(e) => return Err(format!("cannot count the sockets on {local}: {e}")),
    }
    sys::steer_reuseport(l.as_fd(), target as u32)
        .map_err(|e| format!("cannot attach a steering program: {e}"))?;
    // Can nogap bind another socket there (same user as the socket's
    // creator)? With the program in place the trial copy gets no
    // connection, and as the group's last member it leaves without moving
    // the others.
    drop(
        bind::reuseport_copy(l, backlog, false)
            .map_err(|e| format!("cannot bind a second socket: {e}"))?,
    );
    Ok(())
}

/// Steering as a self-upgrade carries it: pools, target, which generation
/// holds which pool, and every pool's sockets (see `carry`). Taken only
/// when no hand-over waits (the policy's `quiet`).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Carried {
    pools: usize,
    target: usize,
    keep_home: bool,
    backlog: i32,
    order: Vec<usize>,
    generations: Vec<(u64, usize)>,
    steered: Vec<CarriedSteered>,
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct CarriedSteered {
    listener: usize,
    nonblocking: bool,
    copies: Vec<super::carry::Carried>,
}

impl Steering {
    /// Describe the steering for the new image; descriptors go to `keep`.
    pub fn carry(&self, keep: &mut Vec<RawFd>) -> Carried {
        Carried {
            pools: self.pools,
            target: self.target,
            keep_home: self.keep_home,
            backlog: self.backlog,
            order: self.order.clone(),
            generations: self.generations.iter().map(|(g, p)| (*g, *p)).collect(),
            steered: self
                .steered
                .iter()
                .map(|s| CarriedSteered {
                    listener: s.listener,
                    nonblocking: s.nonblocking,
                    copies: s.copies.iter().map(|c| c.carry(keep)).collect(),
                })
                .collect(),
        }
    }

    /// Take back the steering the old image carried. The program on each
    /// group stays as it was: the kernel keeps it with the sockets.
    pub fn adopt(c: Carried, record: Option<PathBuf>) -> std::io::Result<Steering> {
        let mut steered = Vec::new();
        for s in c.steered {
            let copies = s
                .copies
                .into_iter()
                .map(Listener::adopt)
                .collect::<std::io::Result<Vec<_>>>()?;
            steered.push(Steered {
                listener: s.listener,
                nonblocking: s.nonblocking,
                copies,
            });
        }
        Ok(Steering {
            steered,
            pools: c.pools,
            target: c.target,
            generations: c.generations.into_iter().collect(),
            busy_at: None,
            keep_home: c.keep_home,
            backlog: c.backlog,
            order: c.order,
            record,
            first: false,
            probes: Vec::new(),
            split: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use socket2::{Domain, Protocol, SockAddr, Socket, Type};
    use std::time::{Duration, Instant};

    fn listener(addr: SocketAddr) -> Socket {
        let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP)).unwrap();
        s.set_reuse_port(true).unwrap();
        s.bind(&SockAddr::from(addr)).unwrap();
        s.listen(16).unwrap();
        s.set_nonblocking(true).unwrap();
        s
    }

    /// Which of `group` accepts the next connection (within a second).
    fn taker(group: &[Socket]) -> usize {
        let deadline = Instant::now() + Duration::from_secs(1);
        while Instant::now() < deadline {
            for (k, s) in group.iter().enumerate() {
                if s.accept().is_ok() {
                    return k;
                }
            }
            std::thread::yield_now();
        }
        panic!("no socket of the group got the connection");
    }

    /// On this kernel: the program sees the headers through SKF_NET_OFF,
    /// and a probe's source (address and port) picks its own socket while
    /// every other connection goes to the target.
    fn routes_a_probe(loopback: &str) {
        let Ok(first) =
            std::panic::catch_unwind(|| listener(format!("{loopback}:0").parse().unwrap()))
        else {
            eprintln!("no {loopback}: skipped");
            return;
        };
        let addr = first.local_addr().unwrap().as_socket().unwrap();
        let group = [first, listener(addr), listener(addr)];
        let plain = || std::net::TcpStream::connect(addr).unwrap();
        let probe = || {
            let s = Socket::new(Domain::for_address(addr), Type::STREAM, None).unwrap();
            s.bind(&SockAddr::from(SocketAddr::new(addr.ip(), 0)))
                .unwrap();
            s
        };
        for target in [0u32, 1] {
            let p = probe();
            let source = p.local_addr().unwrap().as_socket().unwrap();
            let code = program(target, &[(source, 2)]);
            sys::attach_reuseport_cbpf(group[0].as_fd(), &code).unwrap();
            let _c = plain();
            assert_eq!(
                taker(&group),
                target as usize,
                "a client goes to the target"
            );
            p.connect(&SockAddr::from(addr)).unwrap();
            assert_eq!(taker(&group), 2, "the probe goes to its pool");
            let _c = plain();
            assert_eq!(taker(&group), target as usize, "the next client too");
        }
        // Another source on the same address, or the same port elsewhere:
        // not the probe's route.
        let p = probe();
        let source = p.local_addr().unwrap().as_socket().unwrap();
        let other = SocketAddr::new(source.ip(), source.port().wrapping_add(1).max(1));
        sys::attach_reuseport_cbpf(group[0].as_fd(), &program(1, &[(other, 2)])).unwrap();
        p.connect(&SockAddr::from(addr)).unwrap();
        assert_eq!(taker(&group), 1);
    }

    #[test]
    fn a_probe_is_routed_by_its_source_ipv4() {
        routes_a_probe("127.0.0.1");
    }

    #[test]
    fn a_probe_is_routed_by_its_source_ipv6() {
        routes_a_probe("[::1]");
    }

    /// On this kernel: the random split sends about `percent`% of new
    /// connections to its socket (loose bounds: 400 connections at 30%
    /// land 120 ± 40 there with overwhelming probability), and a probe's
    /// route still comes first.
    #[test]
    fn a_split_sends_a_share_to_the_canary() {
        let first = listener("127.0.0.1:0".parse().unwrap());
        let addr = first.local_addr().unwrap().as_socket().unwrap();
        let group = [first, listener(addr)];
        let probe = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        probe
            .bind(&SockAddr::from(SocketAddr::new(addr.ip(), 0)))
            .unwrap();
        let source = probe.local_addr().unwrap().as_socket().unwrap();
        let code = split_program(1, &[(source, 0)], Some((0, 30)));
        sys::attach_reuseport_cbpf(group[0].as_fd(), &code).unwrap();
        probe.connect(&SockAddr::from(addr)).unwrap();
        assert_eq!(taker(&group), 0, "the probe's route first");
        let n = 400;
        let mut landed = [0usize; 2];
        for _ in 0..n {
            let _c = std::net::TcpStream::connect(addr).unwrap();
            landed[taker(&group)] += 1;
        }
        eprintln!("split 30%: {landed:?} of {n}");
        assert!((80..=160).contains(&landed[0]), "{landed:?}");
        // 1% and 99% are possible shares too.
        for (percent, low, high) in [(1u8, 0, 16), (99, 384, 400)] {
            let code = split_program(1, &[], Some((0, percent)));
            sys::attach_reuseport_cbpf(group[0].as_fd(), &code).unwrap();
            let mut canary = 0;
            for _ in 0..n {
                let _c = std::net::TcpStream::connect(addr).unwrap();
                canary += usize::from(taker(&group) == 0);
            }
            assert!((low..=high).contains(&canary), "{percent}%: {canary}");
        }
    }

    #[test]
    fn without_routes_the_program_is_the_target() {
        let code = program(3, &[]);
        assert_eq!(code.len(), 1);
        assert_eq!(code[0].k, 3);
    }

    #[test]
    fn pool_names_round_trip() {
        assert_eq!(pool_name("http", 2), "nogap.pool2.http");
        assert_eq!(parse_pool_name("nogap.pool2.http"), Some(("http", 2)));
        assert_eq!(parse_pool_name("nogap.pool1.a.b"), Some(("a.b", 1)));
        for not in [
            "http",
            "nogap.pool0.http",
            "nogap.poolx.http",
            "nogap.pool1.",
            "nogap.pool1",
        ] {
            assert_eq!(parse_pool_name(not), None, "{not}");
        }
        assert!(spec_ok(&pool_name("tcp-127.0.0.1-8080", 3)));
    }

    fn spec_ok(name: &str) -> bool {
        crate::spec::check_fd_name(name).is_ok()
    }
}
