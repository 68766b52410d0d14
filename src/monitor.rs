//! Accept health, as the kernel sees it: turns queue and descriptor samples
//! into [`Event`]s. Deciding what they mean for the workers is the policy's.
//!
//! nogap holds every listening socket, so it can watch the accept queue that
//! workers drain. For each TCP listener, every `interval`:
//!
//! 1. Read the queue depth (`TCP_INFO`, well under a microsecond).
//! 2. An empty queue is healthy.
//! 3. A non-empty queue is *progressing* when it got shorter since the last
//!    sample, or when a connection that was queued at the last sample has
//!    left the queue since (it was accepted: `diag` tells queued connections
//!    apart from accepted ones). A busy, even saturated, server accepts now and
//!    then, so its queue makes progress at times; a dead accept loop never does.
//! 4. A queue that stays non-empty without any progress for [`FIRST_SIGN`]
//!    (150 ms), while no worker was seen in the middle of a request on its
//!    port (`diag::in_request`, asked at every sample from [`FIRST_LOOK`],
//!    50 ms, on) for the last [`IDLE_FOR`] (100 ms), is **stalled** at once:
//!    nobody accepts, and nobody is busy. Nor kept waiting: workers whose
//!    threads waited for a CPU for more than 5 ms between two looks, or a
//!    worker ready for less than [`WARMING_UP`] (1 s), hold the first sign
//!    off (a loaded machine has not run them, a runtime may still warm
//!    up; they are not dead). (A serial worker between two requests is in none for a
//!    moment; 100 ms of none is not a moment.) While a worker is in a
//!    request, the queue may be waiting for a busy server (a serial worker,
//!    every thread of a pool pinned by its connections): it is stalled only
//!    after `stall_timeout` without progress, and reported as busy if a
//!    worker was in a request within the last [`IDLE_FOR`] (a CPU wait does
//!    not count there: a queue nobody accepts from for the stall timeout is
//!    not pinned because the machine is loaded). [`Verdict::Stalled`] is
//!    reported then, and again every further `stall_timeout` while it lasts
//!    (so workers can be replaced one at a time); [`Verdict::Recovered`]
//!    once the queue empties or progresses.
//! 5. While a queue is non-empty without progress (two samples in a row),
//!    the supervisor samples every [`HURRIED`] (25 ms) instead of every
//!    `interval`
//!    ([`Monitor::hurried`], [`Monitor::sample_queues`]): neither an idle
//!    server nor one whose queue moves costs more.
//!
//! Per worker, nogap also reads its open descriptors against its
//! `RLIMIT_NOFILE` soft limit ([`fd_usage`]): a worker near the limit is about
//! to fail `accept4` with EMFILE.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::config::HealthConfig;
use crate::policy::{Event, QueueId, Snapshot};
use crate::sockets::diag::QueueProgress;
use crate::sockets::guard::{Guard, Tamper};
use crate::sockets::steer::Steering;
use crate::sockets::{Listener, Listeners, Queue};

/// A non-empty queue without progress for this long, while no worker was in
/// a request for [`IDLE_FOR`], is stalled (see step 4 above).
pub const FIRST_SIGN: Duration = Duration::from_millis(150);

/// From this long without progress on, each sample asks whether a worker
/// is in a request.
pub const FIRST_LOOK: Duration = Duration::from_millis(50);

/// How long no worker must have been seen in a request.
pub const IDLE_FOR: Duration = Duration::from_millis(100);

/// A worker ready for less than this may still be warming up (a runtime
/// compiling its request path, filling its caches: a Node worker under
/// load in CI took 280 ms over its first connections): like one kept
/// waiting for a CPU, it holds off the first sign, not the stall timeout.
pub const WARMING_UP: Duration = Duration::from_secs(1);

/// How often queues are sampled while one is non-empty.
pub const HURRIED: Duration = Duration::from_millis(25);

/// The sockets nogap holds, as the monitor (and status) reads them.
pub struct Sockets<'a> {
    pub listeners: &'a Listeners,
    /// Per-slot SO_REUSEPORT copies (`--reuseport-per-worker`), slot 1.. .
    pub copies: &'a [Vec<Option<Listener>>],
    pub steering: &'a Steering,
}

impl Sockets<'_> {
    /// The socket a queue is: a slot's own copy, the serving generation's
    /// (steering), or the listener.
    pub fn socket(&self, q: QueueId) -> &Listener {
        q.slot
            .filter(|s| *s > 0)
            .and_then(|s| self.copies.get(s as usize - 1))
            .and_then(|row| row[q.listener].as_ref())
            .unwrap_or_else(|| self.steering.serving(self.listeners, q.listener))
    }

    pub fn queue(&self, q: QueueId) -> Option<Queue> {
        self.socket(q).queue()
    }

    /// With per-slot copies of listener `i`: the depth of each slot's queue.
    pub fn slot_depths(&self, i: usize) -> Option<Vec<Option<u32>>> {
        self.copies.first().and_then(|row| row[i].as_ref())?;
        Some(
            (0..=self.copies.len() as u32)
                .map(|s| {
                    let q = QueueId {
                        listener: i,
                        slot: Some(s),
                    };
                    self.queue(q).map(|q| q.depth)
                })
                .collect(),
        )
    }
}

/// What the health rounds keep between rounds.
pub struct Monitor {
    /// Every watched accept queue: one per TCP listener, or one per slot
    /// with `--reuseport-per-worker`.
    queues: Vec<(QueueId, QueueWatch)>,
    /// `--stall-timeout` (None: off); whether the slots have their own
    /// queues (then the sockets never change).
    stall_timeout: Option<Duration>,
    per_slot: bool,
    /// Sample descriptors (`--fd-high` is on).
    fds: bool,
    /// Sample descriptors every this many rounds (about once a second).
    fd_every: u64,
    round: u64,
    /// The workers' CPU wait at the last look (see [`kept_waiting`]).
    cpu_waits: Option<(Instant, u64)>,
    /// During a canary: the canary generation's own queue of each watched
    /// listener (see [`Monitor::sample_canary`]).
    canary: Vec<(usize, QueueWatch)>,
}

impl Monitor {
    pub fn new(
        listeners: &Listeners,
        copies: &[Vec<Option<Listener>>],
        workers: u32,
        health: &HealthConfig,
    ) -> Monitor {
        let mut queues = Vec::new();
        if let Some(t) = health.stall_timeout {
            for (i, _) in listeners.iter().filter(|(_, l)| l.endpoint.tcp().is_some()) {
                let per_slot = copies.first().is_some_and(|row| row[i].is_some());
                let slots: Vec<Option<u32>> = match per_slot {
                    true => (0..workers).map(Some).collect(),
                    false => vec![None],
                };
                for slot in slots {
                    queues.push((QueueId { listener: i, slot }, QueueWatch::new(t)));
                }
            }
        }
        let per_second = (1000 / health.interval.as_millis().max(1)).max(1) as u64;
        Monitor {
            queues,
            stall_timeout: health.stall_timeout,
            per_slot: !copies.is_empty(),
            fds: health.fd_high.is_some(),
            fd_every: per_second,
            round: 0,
            cpu_waits: None,
            canary: Vec::new(),
        }
    }

    /// Anything to check at all; with every check off, no wake-ups.
    pub fn active(&self) -> bool {
        !self.queues.is_empty() || self.fds
    }

    /// One health round: sample every watched queue, and (less often) the
    /// descriptors of the ready workers in the `state` snapshot (taken only
    /// then).
    pub fn sample(
        &mut self,
        sockets: &Sockets,
        state: impl Fn() -> Snapshot,
        now: Instant,
    ) -> Vec<Event> {
        let mut events = self.sample_queues(sockets, &|| ready_pids(&state()), now);
        events.extend(self.sample_canary(sockets, now));
        self.round += 1;
        if self.fds && self.round % self.fd_every == 0 {
            for w in state().workers.iter().filter(|w| w.state == "ready") {
                let Some((open, limit)) = w.pid.and_then(fd_usage) else {
                    continue;
                };
                events.push(Event::FdUsage {
                    worker: w.id,
                    open,
                    limit,
                });
            }
        }
        events
    }

    /// During a canary (`Steering::split`), the canary generation's own
    /// socket of each watched listener: judged by its depth alone (its
    /// connections have the serving socket's address and port, so
    /// sock_diag cannot tell them apart), stalled when it stays non-empty
    /// without getting shorter for the stall timeout: its share of new
    /// connections waits for workers that do not accept.
    fn sample_canary(&mut self, sockets: &Sockets, now: Instant) -> Vec<Event> {
        let Some(t) = self.stall_timeout else {
            return Vec::new();
        };
        let depths: Vec<(usize, u32)> = (self.queues.iter())
            .filter(|(q, _)| q.slot.is_none())
            .filter_map(|(q, _)| {
                let socket = sockets
                    .steering
                    .canary_socket(sockets.listeners, q.listener)?;
                Some((q.listener, socket.queue()?.depth))
            })
            .collect();
        self.canary
            .retain(|(i, _)| depths.iter().any(|(j, _)| i == j));
        let mut events = Vec::new();
        for (listener, depth) in depths {
            let k = match self.canary.iter().position(|(i, _)| *i == listener) {
                Some(k) => k,
                None => {
                    self.canary.push((listener, QueueWatch::new(t)));
                    self.canary.len() - 1
                }
            };
            if let Verdict::Stalled { depth, .. } = self.canary[k].1.sample(now, depth, None) {
                events.push(Event::CanaryStalled { listener, depth });
            }
        }
        events
    }

    /// A queue was non-empty at the last two samples without progress
    /// between them: sample the queues every [`HURRIED`] until it moves. A
    /// queue that moves between samples (a server under load, whose queue
    /// a sample catches non-empty now and then) is sampled at the interval.
    pub fn hurried(&self) -> bool {
        self.queues.iter().any(|(_, w)| w.stuck_samples >= 2)
    }

    /// The queues only (what a [`HURRIED`] round samples).
    /// `workers`: the ready workers, asked for only while a queue is
    /// suspect.
    pub fn sample_queues(
        &mut self,
        sockets: &Sockets,
        workers: &dyn Fn() -> ReadyWorkers,
        now: Instant,
    ) -> Vec<Event> {
        self.follow(sockets.listeners);
        let mut events = Vec::new();
        // Depths first (TCP_INFO, cheap); then one sock_diag dump for all the
        // non-empty queues, to see which of their connections were accepted.
        let depths: Vec<u32> = self
            .queues
            .iter()
            .map(|(q, _)| sockets.queue(*q).map_or(0, |q| q.depth))
            .collect();
        // Per-slot copies share their address and port: sock_diag cannot
        // tell their connections apart, so they are judged by depth alone.
        let busy: Vec<(usize, SocketAddr)> = self
            .queues
            .iter()
            .enumerate()
            // A queue seen non-empty for the first time is only noted: a
            // server under load is caught so now and then, and its next
            // sample is empty. Its connections are listed from the second
            // sample on (progress is judged from the third).
            .filter(|(k, (q, w))| depths[*k] > 0 && w.last_depth > 0 && q.slot.is_none())
            .filter_map(|(k, (q, _))| sockets.listeners[q.listener].endpoint.tcp().map(|a| (k, a)))
            .collect();
        let mut queued: Vec<Option<Vec<u64>>> = vec![None; depths.len()];
        if !busy.is_empty() {
            let addrs: Vec<_> = busy.iter().map(|(_, a)| *a).collect();
            if let Ok(lists) = crate::sockets::diag::queued_each(&addrs) {
                for ((k, _), list) in busy.iter().zip(lists) {
                    queued[*k] = Some(list);
                }
            }
        }
        for (k, (queue, watch)) in self.queues.iter_mut().enumerate() {
            let queue = *queue;
            // Per-slot copies: no telling whose request it is; busy.
            let addr = sockets.listeners[queue.listener].endpoint.tcp();
            // A worker kept waiting for a CPU (a loaded machine), or just
            // ready, is not dead either.
            let mark = &mut self.cpu_waits;
            let look = || match (queue.slot, addr) {
                (None, Some(a)) => {
                    let ready = workers();
                    Look {
                        in_request: crate::sockets::diag::in_request(a).unwrap_or(true),
                        kept_waiting: kept_waiting(mark, &ready.pids, now)
                            || ready.youngest.is_some_and(|d| d < WARMING_UP),
                    }
                }
                _ => Look::BUSY,
            };
            match watch.judge(now, depths[k], queued[k].as_deref(), look) {
                Verdict::Stalled { depth, busy } => {
                    events.push(Event::QueueStalled { queue, depth, busy })
                }
                Verdict::Recovered => events.push(Event::QueueRecovered { queue }),
                Verdict::Quiet => {}
            }
        }
        events
    }
}

impl Monitor {
    /// Watch the queues of the listeners a reload added, and no more those
    /// of the ones closed (see `sockets::set`).
    fn follow(&mut self, listeners: &Listeners) {
        self.queues
            .retain(|(q, _)| listeners.get(q.listener).is_some());
        let (Some(t), false) = (self.stall_timeout, self.per_slot) else {
            return;
        };
        for (i, l) in listeners.iter() {
            let watched = self.queues.iter().any(|(q, _)| q.listener == i);
            if !watched && l.endpoint.tcp().is_some() {
                let q = QueueId {
                    listener: i,
                    slot: None,
                };
                self.queues.push((q, QueueWatch::new(t)));
            }
        }
    }
}

/// What one sample says about a queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Nothing new: healthy, or still stalled since the last report.
    Quiet,
    /// No progress for the stall timeout (again), or for [`FIRST_SIGN`]
    /// with no worker in a request (`busy` false).
    Stalled {
        depth: u32,
        busy: bool,
    },
    Recovered,
}

/// One look at the workers on a queue's port (asked only while the queue
/// is suspect).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Look {
    /// A worker is in a request (see `diag::in_request`).
    pub in_request: bool,
    /// The workers waited for a CPU (a loaded machine has not run them),
    /// or one was ready less than [`WARMING_UP`] ago.
    pub kept_waiting: bool,
}

impl Look {
    pub const IDLE: Look = Look {
        in_request: false,
        kept_waiting: false,
    };
    pub const BUSY: Look = Look {
        in_request: true,
        kept_waiting: false,
    };
}

/// One listener's history.
pub struct QueueWatch {
    stall_timeout: Duration,
    last_depth: u32,
    /// Since when the queue has been non-empty without progress.
    stuck_since: Option<Instant>,
    stalled: bool,
    progress: QueueProgress,
    /// Since when no worker has been seen in a request nor kept waiting
    /// for a CPU, while stuck (the first sign).
    idle_since: Option<Instant>,
    /// Since when no worker has been seen in a request, while stuck (busy
    /// or not, at the stall timeout).
    no_request_since: Option<Instant>,
    /// Samples in a row that saw it non-empty without progress.
    stuck_samples: u32,
}

impl QueueWatch {
    pub fn new(stall_timeout: Duration) -> QueueWatch {
        QueueWatch {
            stall_timeout,
            last_depth: 0,
            stuck_since: None,
            stalled: false,
            progress: QueueProgress::new(),
            idle_since: None,
            no_request_since: None,
            stuck_samples: 0,
        }
    }

    pub fn is_stalled(&self) -> bool {
        self.stalled
    }

    /// Feed one sample, judged by the stall timeout alone (as if a worker
    /// were always in a request).
    pub fn sample(&mut self, now: Instant, depth: u32, queued: Option<&[u64]>) -> Verdict {
        self.judge(now, depth, queued, || Look::BUSY)
    }

    /// Feed one sample. `queued` lists the queued connections (diag cookies)
    /// when they could be read; it is only needed when `depth > 0`.
    /// `look` says whether a worker is in a request on the port, or kept
    /// waiting for a CPU; it is asked only once the queue went
    /// [`FIRST_LOOK`] without progress. Either holds off the first sign; a
    /// stall at the stall timeout is `busy` only if a worker was in a
    /// request within [`IDLE_FOR`] (a loaded machine does not make a dead
    /// accept loop look pinned).
    pub fn judge(
        &mut self,
        now: Instant,
        depth: u32,
        queued: Option<&[u64]>,
        look: impl FnOnce() -> Look,
    ) -> Verdict {
        let shrank = depth < self.last_depth;
        self.last_depth = depth;
        let left = match queued {
            Some(q) => self.progress.observe(q),
            None => {
                self.progress.observe(&[]);
                false
            }
        };
        if depth == 0 || shrank || left {
            self.stuck_since = None;
            self.idle_since = None;
            self.no_request_since = None;
            self.stuck_samples = 0;
            if std::mem::take(&mut self.stalled) {
                return Verdict::Recovered;
            }
            return Verdict::Quiet;
        }
        self.stuck_samples += 1;
        let since = *self.stuck_since.get_or_insert(now);
        let stuck = now.saturating_duration_since(since);
        // Looks go on while stalled: a report at the next stall timeout is
        // busy or not by what they saw, as the first one.
        if stuck >= FIRST_LOOK.min(self.stall_timeout) {
            let l = look();
            // Since when it has not been seen (None: seen at this look).
            let mark = |since: &mut Option<Instant>, seen: bool| {
                *since = if seen {
                    None
                } else {
                    Some(since.unwrap_or(now))
                };
            };
            mark(&mut self.idle_since, l.in_request || l.kept_waiting);
            mark(&mut self.no_request_since, l.in_request);
        }
        let for_long = |since: Option<Instant>| {
            since.is_some_and(|t| now.saturating_duration_since(t) >= IDLE_FOR)
        };
        let first_sign = !self.stalled && for_long(self.idle_since) && stuck >= FIRST_SIGN;
        if stuck >= self.stall_timeout || first_sign {
            self.stalled = true;
            self.stuck_since = Some(now);
            return Verdict::Stalled {
                depth,
                busy: !first_sign && !for_long(self.no_request_since),
            };
        }
        Verdict::Quiet
    }
}

/// The ready workers of a snapshot, as the looks at a suspect queue need
/// them.
pub struct ReadyWorkers {
    pub pids: Vec<i32>,
    /// How long the worker ready last has been ready.
    pub youngest: Option<Duration>,
}

/// The ready workers in a snapshot.
pub fn ready_pids(s: &Snapshot) -> ReadyWorkers {
    let ready = || s.workers.iter().filter(|w| w.state == "ready");
    ReadyWorkers {
        pids: ready().filter_map(|w| w.pid).collect(),
        youngest: ready().filter_map(|w| w.ready_for).min(),
    }
}

/// How long the threads of `pids` have waited for a CPU in all, in ns
/// (`run_delay`, the second field of /proc/PID/task/*/schedstat).
fn cpu_wait(pids: &[i32]) -> u64 {
    let mut total = 0;
    for pid in pids {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            continue;
        };
        for t in tasks.flatten() {
            let text = std::fs::read_to_string(t.path().join("schedstat")).unwrap_or_default();
            total += text
                .split_whitespace()
                .nth(1)
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    total
}

/// The workers waited for a CPU for more than [`KEPT_WAITING`] since the
/// previous look (at most 100 ms ago): a worker whose accept loop died
/// sleeps; one the machine is too busy to run has not had its turn.
fn kept_waiting(mark: &mut Option<(Instant, u64)>, pids: &[i32], now: Instant) -> bool {
    let waited = cpu_wait(pids);
    let before = mark.replace((now, waited));
    match before {
        Some((at, w)) if now.saturating_duration_since(at) <= Duration::from_millis(100) => {
            waited.saturating_sub(w) > KEPT_WAITING.as_nanos() as u64
        }
        _ => false,
    }
}

/// See [`kept_waiting`].
const KEPT_WAITING: Duration = Duration::from_millis(5);

/// The integrity of the sockets nogap holds, each health round: what a
/// worker did to them is undone (`sockets::guard`), and after a worker
/// cleared `O_NONBLOCK`, workers stuck in `accept()` are looked for (for 5
/// minutes after the last time; [`AcceptWatch`]).
pub struct Integrity {
    guard: Guard,
    /// A worker in `accept()` this long is stuck (the stall timeout, 2 s
    /// when that is off).
    stuck_after: Duration,
    blocked: Option<(Instant, AcceptWatch)>,
}

impl Integrity {
    /// Socket `fd` is closed (see `Guard::forget`).
    pub fn forget(&mut self, fd: std::os::fd::RawFd) {
        self.guard.forget(fd);
    }

    pub fn new(backlog: i32, stall_timeout: Option<Duration>) -> Integrity {
        Integrity {
            guard: Guard::new(backlog),
            stuck_after: stall_timeout.unwrap_or(Duration::from_secs(2)),
            blocked: None,
        }
    }

    /// Check every socket: the steered ones through `steering` (it keeps
    /// their order in the group), the others and the per-slot copies here.
    /// `state` is read only while stuck workers are looked for.
    pub fn round(
        &mut self,
        steering: &mut Steering,
        listeners: &Listeners,
        copies: &[Vec<Option<Listener>>],
        state: impl FnOnce() -> Snapshot,
    ) -> Vec<Event> {
        let now = Instant::now();
        let mut found = steering.guard(&mut self.guard, listeners);
        for (i, l) in listeners.iter() {
            if !steering.steers(i) {
                found.extend(self.guard.check(l));
            }
        }
        for l in copies.iter().flatten().flatten() {
            found.extend(self.guard.check(l));
        }
        if found.iter().any(|f| f.tamper == Tamper::Blocking) {
            let watch = self.blocked.take().map(|(_, w)| w).unwrap_or_default();
            self.blocked = Some((now, watch));
        }
        let mut events: Vec<Event> = found.into_iter().map(Event::from).collect();
        if let Some((at, watch)) = &mut self.blocked {
            events.extend(watch.sample(&state(), self.stuck_after, now));
            if now.saturating_duration_since(*at) > Duration::from_secs(300) {
                self.blocked = None;
            }
        }
        events
    }
}

/// Workers stuck in a blocking `accept()` on a shared socket: after a worker
/// cleared `O_NONBLOCK` (see `sockets::guard`, which sets it again), a
/// sibling woken for a connection another worker took sleeps in `accept()`,
/// and a single-threaded server serves nothing more until the kernel hands
/// it a connection. On a non-blocking socket `accept()` never sleeps, so a
/// thread seen in it at every round for the stall timeout is stuck.
#[derive(Debug, Default)]
pub struct AcceptWatch {
    since: std::collections::BTreeMap<crate::policy::WorkerId, Instant>,
    reported: std::collections::BTreeSet<crate::policy::WorkerId>,
}

impl AcceptWatch {
    /// One round over the ready workers of `state`: an event for each
    /// worker stuck for `after` (once per worker).
    pub fn sample(&mut self, state: &Snapshot, after: Duration, now: Instant) -> Vec<Event> {
        let mut out = Vec::new();
        let mut seen = std::collections::BTreeSet::new();
        for w in state.workers.iter().filter(|w| w.state == "ready") {
            let Some(pid) = w.pid else { continue };
            if !in_accept(pid) {
                continue;
            }
            seen.insert(w.id);
            let since = *self.since.entry(w.id).or_insert(now);
            if now.saturating_duration_since(since) >= after && self.reported.insert(w.id) {
                out.push(Event::AcceptBlocked {
                    worker: w.id,
                    stuck: now.saturating_duration_since(since),
                });
            }
        }
        self.since.retain(|id, _| seen.contains(id));
        self.reported.retain(|id| seen.contains(id));
        out
    }
}

/// Whether a thread of `pid` is in `accept()`/`accept4()` now
/// (`/proc/PID/task/TID/syscall`).
pub fn in_accept(pid: i32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks.filter_map(Result::ok).any(|t| {
        std::fs::read_to_string(t.path().join("syscall"))
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse::<i64>().ok())
            .is_some_and(|nr| nr == libc::SYS_accept || nr == libc::SYS_accept4)
    })
}

/// Open descriptors of `pid` and its soft `RLIMIT_NOFILE`.
pub fn fd_usage(pid: i32) -> Option<(u64, u64)> {
    let open = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count() as u64;
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).ok()?;
    let soft = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))?
        .split_whitespace()
        .nth(3)?
        .parse()
        .ok()?;
    Some((open, soft))
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Duration = Duration::from_secs(2);

    #[test]
    fn a_dead_queue_stalls_and_recovers() {
        let t0 = Instant::now();
        let mut q = QueueWatch::new(T);
        let ms = |n| t0 + Duration::from_millis(n);
        assert_eq!(q.sample(ms(0), 1, Some(&[1])), Verdict::Quiet);
        assert_eq!(q.sample(ms(1000), 3, Some(&[1, 2, 3])), Verdict::Quiet);
        assert_eq!(
            q.sample(ms(2000), 5, Some(&[1, 2, 3, 4, 5])),
            Verdict::Stalled {
                depth: 5,
                busy: true
            }
        );
        assert_eq!(
            q.sample(ms(3000), 6, Some(&[1, 2, 3, 4, 5, 6])),
            Verdict::Quiet
        );
        assert_eq!(
            q.sample(ms(4000), 6, Some(&[1, 2, 3, 4, 5, 6])),
            Verdict::Stalled {
                depth: 6,
                busy: true
            }
        );
        // Someone accepts again.
        assert_eq!(
            q.sample(ms(4100), 6, Some(&[2, 3, 4, 5, 6, 7])),
            Verdict::Recovered
        );
        assert_eq!(q.sample(ms(4200), 0, Some(&[])), Verdict::Quiet);
    }

    #[test]
    fn a_full_but_progressing_queue_is_not_stalled() {
        let t0 = Instant::now();
        let mut q = QueueWatch::new(T);
        // Depth pinned at the backlog, but the head keeps changing.
        for i in 0..100u64 {
            let queued: Vec<u64> = (i..i + 128).collect();
            let v = q.sample(t0 + Duration::from_millis(100 * i), 128, Some(&queued));
            assert_eq!(v, Verdict::Quiet, "sample {i}");
        }
    }

    #[test]
    fn without_diag_a_shrinking_depth_is_progress() {
        let t0 = Instant::now();
        let mut q = QueueWatch::new(T);
        let s = |q: &mut QueueWatch, ms: u64, d| q.sample(t0 + Duration::from_millis(ms), d, None);
        assert_eq!(s(&mut q, 0, 4), Verdict::Quiet);
        assert_eq!(s(&mut q, 1500, 3), Verdict::Quiet);
        assert_eq!(s(&mut q, 3000, 3), Verdict::Quiet);
        assert_eq!(s(&mut q, 4000, 3), Verdict::Quiet);
        assert_eq!(
            s(&mut q, 5000, 3),
            Verdict::Stalled {
                depth: 3,
                busy: true
            }
        );
    }

    #[test]
    fn nobody_in_a_request_is_a_stall_at_the_first_sign() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let mut q = QueueWatch::new(T);
        let idle = || Look::IDLE;
        assert_eq!(q.judge(ms(0), 2, Some(&[1, 2]), idle), Verdict::Quiet);
        assert_eq!(q.judge(ms(100), 2, Some(&[1, 2]), idle), Verdict::Quiet);
        assert_eq!(q.judge(ms(175), 2, Some(&[1, 2]), idle), Verdict::Quiet);
        assert_eq!(
            q.judge(ms(200), 3, Some(&[1, 2, 3]), idle),
            Verdict::Stalled {
                depth: 3,
                busy: false
            }
        );
        // Reported once; again only after the stall timeout.
        assert_eq!(q.judge(ms(400), 3, Some(&[1, 2, 3]), idle), Verdict::Quiet);
        assert!(matches!(
            q.judge(ms(2200), 3, Some(&[1, 2, 3]), idle),
            Verdict::Stalled { .. }
        ));
    }

    /// A loaded machine (workers kept waiting for a CPU) holds off the
    /// first sign, but does not make a queue nobody accepts from look
    /// pinned; nor does a report after the first.
    #[test]
    fn kept_waiting_is_not_busy_at_the_stall_timeout() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let mut q = QueueWatch::new(T);
        let waiting = || Look {
            in_request: false,
            kept_waiting: true,
        };
        for n in (0..2000).step_by(25) {
            let v = q.judge(ms(n), 2, Some(&[1, 2]), waiting);
            assert_eq!(v, Verdict::Quiet, "{n} ms");
        }
        let dead = Verdict::Stalled {
            depth: 2,
            busy: false,
        };
        assert_eq!(q.judge(ms(2000), 2, Some(&[1, 2]), waiting), dead);
        for n in (2025..4000).step_by(25) {
            let v = q.judge(ms(n), 2, Some(&[1, 2]), || Look::IDLE);
            assert_eq!(v, Verdict::Quiet, "{n} ms");
        }
        assert_eq!(q.judge(ms(4000), 2, Some(&[1, 2]), || Look::IDLE), dead);
    }

    #[test]
    fn a_worker_in_a_request_gets_the_stall_timeout() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let mut q = QueueWatch::new(T);
        let busy = || Look::BUSY;
        for n in (0..2000).step_by(25) {
            assert_eq!(
                q.judge(ms(n), 2, Some(&[1, 2]), busy),
                Verdict::Quiet,
                "{n} ms"
            );
        }
        assert_eq!(
            q.judge(ms(2000), 2, Some(&[1, 2]), busy),
            Verdict::Stalled {
                depth: 2,
                busy: true
            }
        );
        // A worker between two requests: in none for a moment only.
        let mut q = QueueWatch::new(T);
        for n in (0..2000).step_by(25) {
            let between = n % 300 == 0;
            let look = || match between {
                true => Look::IDLE,
                false => Look::BUSY,
            };
            let v = q.judge(ms(n), 2, Some(&[1, 2]), look);
            assert_eq!(v, Verdict::Quiet, "{n} ms");
        }
        // Asked only once the first look is due.
        let mut q = QueueWatch::new(T);
        let never = || panic!("asked too early");
        assert_eq!(q.judge(ms(0), 1, Some(&[7]), never), Verdict::Quiet);
        assert_eq!(q.judge(ms(100), 1, Some(&[8]), never), Verdict::Quiet);
    }

    #[test]
    fn a_thread_blocked_in_accept_is_seen() {
        let me = std::process::id() as i32;
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let t = std::thread::spawn(move || l.accept().map(|_| ()));
        let deadline = Instant::now() + Duration::from_secs(10);
        while !in_accept(me) {
            assert!(Instant::now() < deadline, "never seen in accept()");
            std::thread::yield_now();
        }
        let _c = std::net::TcpStream::connect(addr).unwrap();
        t.join().unwrap().unwrap();
    }

    #[test]
    fn own_fd_usage() {
        let (open, soft) = fd_usage(std::process::id() as i32).unwrap();
        assert!(open >= 3 && soft >= open);
    }
}
