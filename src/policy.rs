//! The supervisor's decisions: a state, an event, and the actions that follow.
//!
//! [`State::handle`] is plain code, no I/O besides logging, so every rule can
//! be tested without processes. The rules:
//!
//! | event | rule |
//! |-------|------|
//! | Start | start generation 1 |
//! | Reload | start a new generation; during one, remember one more (coalesced) |
//! | worker ready (READY=1, or alive long enough) | when every slot of the starting generation is ready, it serves and the older ones get the stop signal |
//! | a starting worker exits, cannot be spawned, or misses the start timeout | during a reload: the new generation is stopped, the old keeps serving, the reload failed; for the first generation: retried with backoff |
//! | a serving worker exits | replaced in its slot, after a backoff that doubles per quick failure (capped) |
//! | a draining worker exits | forgotten |
//! | drain timeout | SIGKILL to the worker's process group |
//! | a daemonizing worker's main process is known (MainPid) | the worker is that process from now on (and can become ready: alive time counts from now); a stop already sent is repeated to it |
//! | Stop | stop signal to every worker; exit once all are gone |
//! | with steering (`Settings::steered`): a generation becomes ready, or Stop | new connections are steered to it (to the original sockets at Stop); the workers it replaces keep running until their sockets' queues are drained (`Drained`, or the hand-over timeout), then get the stop signal |
//! | a queue stalls, a worker misses its watchdog or nears its fd limit | a replacement starts in its slot; once ready, the unhealthy worker drains (at most `max_replacements` per `window`, one at a time) |
//! | replacements exhausted while still unhealthy | say so (logs, STATUS=); `healthy()` turns false until the queues move again |

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use crate::config::{ReadyMode, StopPolicy};
use crate::notify::Message;
use crate::worker::{Worker, WorkerId, WorkerState};

/// What the health checks have seen of one slot.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct SlotHealth {
    /// Workers of this slot found unhealthy (stall, watchdog, descriptors).
    pub unhealthy: u64,
    /// Health replacements started for this slot.
    pub replacements: u64,
}

/// A client waiting for a reload's outcome (`nogap reload --wait`).
pub type WaiterId = u64;

#[derive(Clone, Copy, Debug)]
pub struct Settings {
    pub workers: u32,
    pub ready: ReadyMode,
    pub start_timeout: Duration,
    pub stop: StopPolicy,
    pub backoff: Backoff,
    pub health: HealthSettings,
    /// Workers daemonize (`--pidfile`): one is ready only once nogap follows
    /// its daemon (`MainPid`), by `READY=1` or the alive time counted from then.
    pub daemonizes: bool,
    /// Each generation accepts from its own sockets and new connections are
    /// steered (see `steer`): old workers stop only once their queues are
    /// drained.
    pub steered: bool,
}

/// How long old workers may take to empty their sockets' queues after new
/// connections were steered away; then they get the stop signal anyway.
pub const HANDOVER_TIMEOUT: Duration = Duration::from_secs(5);

/// How unhealthy workers are replaced.
#[derive(Clone, Copy, Debug)]
pub struct HealthSettings {
    /// Ready workers must send `WATCHDOG=1` at least this often.
    pub worker_watchdog: Option<Duration>,
    /// At most this many health replacements per `window`.
    pub max_replacements: u32,
    pub window: Duration,
}

impl Default for HealthSettings {
    fn default() -> Self {
        HealthSettings {
            worker_watchdog: None,
            max_replacements: 5,
            window: Duration::from_secs(60),
        }
    }
}

/// Restart backoff: none for the first failure, then `base` doubling up to
/// `cap`; a worker that lived `reset_after` starts the count again.
#[derive(Clone, Copy, Debug)]
pub struct Backoff {
    pub base: Duration,
    pub cap: Duration,
    pub reset_after: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            base: Duration::from_millis(100),
            cap: Duration::from_secs(10),
            reset_after: Duration::from_secs(10),
        }
    }
}

impl Backoff {
    fn delay(&self, failures: u32) -> Duration {
        if failures == 0 {
            return Duration::ZERO;
        }
        let factor = 1u32.checked_shl(failures - 1).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.cap)
    }
}

#[derive(Clone, Debug)]
pub enum Event {
    Start,
    Reload {
        waiter: Option<WaiterId>,
    },
    Stop,
    Spawned {
        worker: WorkerId,
        pid: i32,
    },
    SpawnFailed {
        worker: WorkerId,
        error: String,
    },
    Exited {
        pid: i32,
        status: String,
    },
    Notify {
        worker: WorkerId,
        messages: Vec<Message>,
    },
    /// Nobody has accepted from this socket's queue for the stall timeout.
    QueueStalled {
        socket: String,
        depth: u32,
        /// The worker slot whose own queue it is (`--reuseport-per-worker`).
        slot: Option<u32>,
    },
    QueueRecovered {
        socket: String,
    },
    /// A health check found this worker unfit (e.g. near its fd limit).
    Unhealthy {
        worker: WorkerId,
        reason: String,
    },
    /// The worker daemonized: `pid` (from its pid file, a child of nogap)
    /// is its main process now.
    MainPid {
        worker: WorkerId,
        pid: i32,
    },
    /// Since the last `Steer`, every socket but the target's has had an
    /// empty accept queue for a quiet period.
    Drained,
    /// A deadline may have passed.
    Tick,
}

/// What the supervisor tells systemd.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Upstream {
    Ready,
    Reloading,
    Stopping,
    Status(String),
    /// Ask systemd for this much more time (a generation is starting).
    ExtendTimeout(Duration),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    Spawn {
        worker: WorkerId,
        generation: u64,
        slot: u32,
    },
    Signal {
        pid: i32,
        signal: Signal,
    },
    /// SIGKILL the live process `pid` and the process group it leads.
    KillGroup {
        pid: i32,
    },
    /// SIGKILL what is left of the process group of a reaped leader. Only the
    /// group is signalled: the leader's pid may already belong to another
    /// process, but a group id is not reused while the group has members.
    KillOrphans {
        pgid: i32,
    },
    /// The worker is gone: release what belongs to it (notify socket).
    Forget {
        worker: WorkerId,
    },
    /// Send new connections to this generation's sockets (None: the
    /// original sockets, which outlive nogap), then report `Drained`.
    Steer {
        generation: Option<u64>,
    },
    Upstream(Vec<Upstream>),
    Reply {
        waiter: WaiterId,
        result: Result<u64, String>,
    },
    Exit,
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "result", rename_all = "lowercase")]
pub enum ReloadOutcome {
    Ok { generation: u64 },
    Failed { generation: u64, reason: String },
}

#[derive(Debug)]
struct Reload {
    generation: u64,
    waiters: Vec<WaiterId>,
}

/// Workers that keep serving what is queued for them until `Drained`.
#[derive(Debug)]
struct Handover {
    workers: Vec<WorkerId>,
    deadline: Instant,
}

#[derive(Debug)]
pub struct State {
    settings: Settings,
    pub workers: BTreeMap<WorkerId, Worker>,
    next_id: WorkerId,
    /// The highest generation started so far.
    generation: u64,
    /// The generation that serves; None until the first one is ready.
    pub serving: Option<u64>,
    starting: Option<Reload>,
    /// A reload asked for while another runs (coalesced), with its waiters.
    queued: Option<Vec<WaiterId>>,
    pub stopping: bool,
    exited: bool,
    /// Consecutive quick failures per slot of the serving generation.
    failures: BTreeMap<u32, u32>,
    pub last_reload: Option<ReloadOutcome>,
    /// Sockets whose queue is stalled now.
    pub stalled: std::collections::BTreeSet<String>,
    /// When health replacements were started (within the window).
    replacements: std::collections::VecDeque<Instant>,
    /// Replacing did not help: still unhealthy with no replacements left.
    pub gave_up: bool,
    /// Stalls reported per socket, since nogap started.
    pub stalls: BTreeMap<String, u64>,
    /// Health history per slot, since nogap started.
    pub slot_health: BTreeMap<u32, SlotHealth>,
    /// With steering: workers waiting for their queues to drain before they
    /// get the stop signal.
    handover: Option<Handover>,
}

impl State {
    pub fn new(settings: Settings) -> State {
        State {
            settings,
            workers: BTreeMap::new(),
            next_id: 1,
            generation: 0,
            serving: None,
            starting: None,
            queued: None,
            stopping: false,
            exited: false,
            failures: BTreeMap::new(),
            last_reload: None,
            stalled: Default::default(),
            replacements: Default::default(),
            gave_up: false,
            stalls: BTreeMap::new(),
            slot_health: BTreeMap::new(),
            handover: None,
        }
    }

    /// The generation being started, if any.
    pub fn starting_generation(&self) -> Option<u64> {
        self.starting.as_ref().map(|r| r.generation)
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// When `handle(Tick)` next has something to do.
    pub fn next_deadline(&self) -> Option<Instant> {
        let pings = self.workers.values().filter_map(|w| self.ping_deadline(w));
        self.workers
            .values()
            .filter_map(|w| w.state.deadline())
            .chain(pings)
            .chain(self.budget_deadline())
            .chain(self.handover.as_ref().map(|h| h.deadline))
            .min()
    }

    /// When a ready worker with a watchdog must have pinged by.
    fn ping_deadline(&self, w: &Worker) -> Option<Instant> {
        let period = self.settings.health.worker_watchdog?;
        match w.state {
            WorkerState::Ready { since, .. } if w.unhealthy.is_none() => {
                Some(w.last_ping.map_or(since, |p| p.max(since)) + period)
            }
            _ => None,
        }
    }

    /// False while a health problem persists that replacing could not fix.
    pub fn healthy(&self) -> bool {
        !self.gave_up
    }

    pub fn worker_by_pid(&self, pid: i32) -> Option<&Worker> {
        self.workers.values().find(|w| w.state.pid() == Some(pid))
    }

    pub fn handle(&mut self, event: Event, now: Instant) -> Vec<Action> {
        let mut out = Vec::new();
        match event {
            Event::Start => self.start_generation(Vec::new(), now, &mut out),
            Event::Reload { waiter } => self.reload(waiter, now, &mut out),
            Event::Stop => self.stop(now, &mut out),
            Event::Spawned { worker, pid } => self.spawned(worker, pid, now),
            Event::SpawnFailed { worker, error } => {
                if let Some(w) = self.workers.remove(&worker) {
                    out.push(Action::Forget { worker });
                    let reason = format!(
                        "worker {} of generation {} cannot start: {error}",
                        w.slot, w.generation
                    );
                    tracing::error!(worker = w.slot, generation = w.generation, %error, "worker cannot start");
                    self.failed(w, reason, now, &mut out);
                }
            }
            Event::Exited { pid, status } => self.exited(pid, status, now, &mut out),
            Event::Notify { worker, messages } => {
                for m in messages {
                    self.notified(worker, m, now, &mut out);
                }
            }
            Event::QueueStalled {
                socket,
                depth,
                slot,
            } => {
                self.stalled.insert(socket.clone());
                *self.stalls.entry(socket.clone()).or_default() += 1;
                self.queue_stalled(&socket, depth, slot, now, &mut out);
            }
            Event::QueueRecovered { socket } => {
                if self.stalled.remove(&socket) {
                    tracing::info!(socket = %socket, "accept queue moving again");
                }
                self.maybe_clear_gave_up(&mut out);
            }
            Event::Unhealthy { worker, reason } => self.unhealthy(worker, reason, now, &mut out),
            Event::MainPid { worker, pid } => self.main_pid(worker, pid, now, &mut out),
            Event::Drained => self.finish_handover(now, &mut out),
            Event::Tick => self.tick(now, &mut out),
        }
        self.maybe_clear_gave_up(&mut out);
        if self.stopping && self.workers.is_empty() && !self.exited {
            self.exited = true;
            tracing::info!("stopped");
            out.push(Action::Exit);
        }
        out
    }

    // ---- generations ---------------------------------------------------------

    fn reload(&mut self, waiter: Option<WaiterId>, now: Instant, out: &mut Vec<Action>) {
        if self.stopping {
            if let Some(waiter) = waiter {
                out.push(Action::Reply {
                    waiter,
                    result: Err("nogap is stopping".into()),
                });
            }
            return;
        }
        if self.starting.is_some() {
            let queued = self.queued.get_or_insert_with(Vec::new);
            queued.extend(waiter);
            tracing::info!("reload queued: one runs already");
            return;
        }
        self.start_generation(waiter.into_iter().collect(), now, out);
    }

    fn start_generation(&mut self, waiters: Vec<WaiterId>, now: Instant, out: &mut Vec<Action>) {
        self.generation += 1;
        let generation = self.generation;
        self.starting = Some(Reload {
            generation,
            waiters,
        });
        let extend = Upstream::ExtendTimeout(self.settings.start_timeout + Duration::from_secs(5));
        if self.serving.is_some() {
            tracing::info!(generation, "reload started");
            out.push(Action::Upstream(vec![
                Upstream::Reloading,
                extend,
                Upstream::Status(self.status_line()),
            ]));
        } else {
            tracing::info!(generation, workers = self.settings.workers, "starting");
            out.push(Action::Upstream(vec![extend]));
        }
        for slot in 0..self.settings.workers {
            self.add_worker(generation, slot, 0, now, None);
        }
        self.tick(now, out);
    }

    fn add_worker(
        &mut self,
        generation: u64,
        slot: u32,
        restarts: u32,
        until: Instant,
        replaces: Option<WorkerId>,
    ) -> WorkerId {
        let id = self.next_id;
        self.next_id += 1;
        self.workers.insert(
            id,
            Worker {
                id,
                generation,
                slot,
                state: WorkerState::Waiting { until },
                spawned_at: None,
                restarts,
                status: None,
                last_ping: None,
                unhealthy: None,
                replaced_by: None,
                replaces,
            },
        );
        id
    }

    /// Every slot of the starting generation has a ready worker: it serves.
    fn maybe_commit(&mut self, now: Instant, out: &mut Vec<Action>) {
        let Some(generation) = self.starting_generation() else {
            return;
        };
        let ready = self
            .workers
            .values()
            .filter(|w| w.generation == generation && matches!(w.state, WorkerState::Ready { .. }))
            .count();
        if ready < self.settings.workers as usize {
            return;
        }
        let reload = self.starting.take().expect("a starting generation");
        let first = self.serving.is_none();
        self.serving = Some(generation);
        self.failures.clear();
        let old: Vec<WorkerId> = self
            .workers
            .values()
            .filter(|w| w.generation != generation && !w.state.is_leaving())
            .map(|w| w.id)
            .collect();
        if self.settings.steered {
            out.push(Action::Steer {
                generation: Some(generation),
            });
            self.hand_over(old, now);
        } else {
            for id in old {
                self.stop_worker(id, now, out);
            }
        }
        tracing::info!(generation, "generation ready");
        if !first {
            self.last_reload = Some(ReloadOutcome::Ok { generation });
        }
        for waiter in reload.waiters {
            out.push(Action::Reply {
                waiter,
                result: Ok(generation),
            });
        }
        out.push(Action::Upstream(vec![
            Upstream::Ready,
            Upstream::Status(self.status_line()),
        ]));
        self.run_queued(now, out);
    }

    /// The starting generation failed during a reload: stop it, keep the old.
    fn abort_reload(&mut self, reason: String, now: Instant, out: &mut Vec<Action>) {
        let reload = self.starting.take().expect("a starting generation");
        let generation = reload.generation;
        tracing::error!(generation, %reason, "reload failed");
        let ids: Vec<WorkerId> = self
            .workers
            .values()
            .filter(|w| w.generation == generation && !w.state.is_leaving())
            .map(|w| w.id)
            .collect();
        for id in ids {
            self.stop_worker(id, now, out);
        }
        self.last_reload = Some(ReloadOutcome::Failed {
            generation,
            reason: reason.clone(),
        });
        for waiter in reload.waiters {
            out.push(Action::Reply {
                waiter,
                result: Err(reason.clone()),
            });
        }
        out.push(Action::Upstream(vec![
            Upstream::Ready,
            Upstream::Status(self.status_line()),
        ]));
        self.run_queued(now, out);
    }

    fn run_queued(&mut self, now: Instant, out: &mut Vec<Action>) {
        if let Some(waiters) = self.queued.take() {
            self.start_generation(waiters, now, out);
        }
    }

    // ---- workers -------------------------------------------------------------

    fn spawned(&mut self, id: WorkerId, pid: i32, now: Instant) {
        let ready_mode = self.settings.ready;
        let timeout = self.settings.start_timeout;
        let daemonizes = self.settings.daemonizes;
        let Some(w) = self.workers.get_mut(&id) else {
            return;
        };
        w.spawned_at = Some(now);
        w.state = WorkerState::Starting {
            pid,
            ready_at: match ready_mode {
                ReadyMode::Alive(d) if !daemonizes => Some(now + d),
                _ => None,
            },
            deadline: now + timeout,
        };
        tracing::info!(
            worker = w.slot,
            generation = w.generation,
            pid,
            "worker started"
        );
    }

    fn became_ready(&mut self, id: WorkerId, now: Instant, out: &mut Vec<Action>) {
        let Some(w) = self.workers.get_mut(&id) else {
            return;
        };
        let WorkerState::Starting { pid, .. } = w.state else {
            return;
        };
        w.state = WorkerState::Ready { pid, since: now };
        tracing::info!(
            worker = w.slot,
            generation = w.generation,
            pid,
            "worker ready"
        );
        if let Some(old) = w.replaces.take() {
            if let Some(o) = self.workers.get(&old) {
                let old_pid = o.state.pid().unwrap_or(0);
                tracing::info!(
                    worker = o.slot,
                    generation = o.generation,
                    old_pid,
                    pid,
                    "unhealthy worker replaced"
                );
            }
            self.stop_worker(old, now, out);
        }
        self.maybe_commit(now, out);
        self.replace_next_unhealthy(now, out);
    }

    fn exited(&mut self, pid: i32, status: String, now: Instant, out: &mut Vec<Action>) {
        let Some(id) = self.worker_by_pid(pid).map(|w| w.id) else {
            tracing::debug!(pid, %status, "reaped a process that is not a worker");
            return;
        };
        let w = self.workers.remove(&id).expect("worker found by pid");
        out.push(Action::Forget { worker: id });
        // Leftovers in its process group are orphans now.
        out.push(Action::KillOrphans { pgid: pid });
        let (slot, generation) = (w.slot, w.generation);
        match w.state {
            WorkerState::Draining { .. } | WorkerState::Killed { .. } => {
                tracing::info!(worker = slot, generation, pid, %status, "worker exited");
            }
            WorkerState::Starting { .. } => {
                tracing::error!(worker = slot, generation, pid, %status, "worker exited before it was ready");
                let reason = format!("worker {slot} (pid {pid}) of generation {generation} {status} before it was ready");
                self.failed(w, reason, now, out);
            }
            _ => {
                tracing::warn!(worker = slot, generation, pid, %status, "worker exited");
                let reason =
                    format!("worker {slot} (pid {pid}) of generation {generation} {status}");
                self.failed(w, reason, now, out);
            }
        }
    }

    /// A worker that should be serving, or about to, is gone (already removed).
    fn failed(&mut self, w: Worker, reason: String, now: Instant, out: &mut Vec<Action>) {
        if self.stopping {
            return;
        }
        // A health replacement that failed: the old worker stays; the health
        // checks will try again (rate-limited).
        if let Some(old) = w.replaces {
            tracing::error!(worker = w.slot, generation = w.generation, %reason, "replacement worker failed");
            if let Some(o) = self.workers.get_mut(&old) {
                o.replaced_by = None;
                o.unhealthy = None;
            }
            return;
        }
        // An unhealthy worker that died while its replacement starts: the
        // replacement fills the slot.
        if let Some(new) = w.replaced_by {
            if let Some(n) = self.workers.get_mut(&new) {
                n.replaces = None;
                return;
            }
        }
        let reloading = self.serving.is_some() && self.starting_generation() == Some(w.generation);
        if reloading {
            self.abort_reload(reason, now, out);
            return;
        }
        let current = self.serving.or(self.starting_generation());
        if current != Some(w.generation) {
            return; // an old generation's worker: nothing to replace
        }
        let lived = w
            .spawned_at
            .map_or(Duration::ZERO, |t| now.saturating_duration_since(t));
        let failures = self.failures.entry(w.slot).or_insert(0);
        if lived >= self.settings.backoff.reset_after {
            *failures = 0;
        }
        let delay = self.settings.backoff.delay(*failures);
        *failures += 1;
        tracing::warn!(
            worker = w.slot,
            generation = w.generation,
            backoff_ms = delay.as_millis() as u64,
            restarts = w.restarts + 1,
            "restart scheduled"
        );
        self.add_worker(w.generation, w.slot, w.restarts + 1, now + delay, None);
    }

    /// Follow a daemonized worker's new main process. Its state and start
    /// deadline stay; the alive time starts now; a stop signal or SIGKILL
    /// already sent to the first process is sent to the new one.
    fn main_pid(&mut self, id: WorkerId, new: i32, now: Instant, out: &mut Vec<Action>) {
        let signal = self.settings.stop.signal;
        let ready_mode = self.settings.ready;
        let Some(w) = self.workers.get_mut(&id) else {
            return;
        };
        let old = w.state.pid();
        match &mut w.state {
            WorkerState::Starting { pid, ready_at, .. } => {
                *pid = new;
                if let ReadyMode::Alive(d) = ready_mode {
                    *ready_at = Some(now + d);
                }
            }
            WorkerState::Ready { pid, .. } => *pid = new,
            WorkerState::Draining { pid, .. } => {
                *pid = new;
                out.push(Action::Signal { pid: new, signal });
            }
            WorkerState::Killed { pid } => {
                *pid = new;
                out.push(Action::KillGroup { pid: new });
            }
            WorkerState::Waiting { .. } | WorkerState::Spawning => return,
        }
        tracing::info!(
            worker = w.slot,
            generation = w.generation,
            pid = new,
            first_pid = old,
            "worker daemonized: following its main process"
        );
    }

    /// Ask a worker to leave: stop signal, SIGKILL later. A worker that has
    /// not started yet is just dropped.
    fn stop_worker(&mut self, id: WorkerId, now: Instant, out: &mut Vec<Action>) {
        let grace = self.settings.stop.grace;
        let signal = self.settings.stop.signal;
        let Some(w) = self.workers.get_mut(&id) else {
            return;
        };
        match w.state {
            WorkerState::Waiting { .. } | WorkerState::Spawning => {
                self.workers.remove(&id);
                out.push(Action::Forget { worker: id });
            }
            WorkerState::Starting { pid, .. } | WorkerState::Ready { pid, .. } => {
                tracing::info!(worker = w.slot, generation = w.generation, pid, signal = %signal, "draining worker");
                w.state = WorkerState::Draining {
                    pid,
                    kill_at: now + grace,
                };
                out.push(Action::Signal { pid, signal });
            }
            WorkerState::Draining { .. } | WorkerState::Killed { .. } => {}
        }
    }

    fn stop(&mut self, now: Instant, out: &mut Vec<Action>) {
        if self.stopping {
            tracing::info!("already stopping");
            return;
        }
        tracing::info!("stopping: draining every worker");
        self.stopping = true;
        let reason = "nogap is stopping".to_string();
        let waiters = self
            .starting
            .take()
            .map(|r| r.waiters)
            .into_iter()
            .chain(self.queued.take())
            .flatten();
        for waiter in waiters {
            out.push(Action::Reply {
                waiter,
                result: Err(reason.clone()),
            });
        }
        out.push(Action::Upstream(vec![
            Upstream::Stopping,
            Upstream::Status("stopping".into()),
        ]));
        // With steering, serving workers first take what is queued in
        // sockets that do not outlive nogap.
        let (serving, rest): (Vec<&Worker>, Vec<&Worker>) = self
            .workers
            .values()
            .partition(|w| self.settings.steered && matches!(w.state, WorkerState::Ready { .. }));
        let serving: Vec<WorkerId> = serving.iter().map(|w| w.id).collect();
        let rest: Vec<WorkerId> = rest.iter().map(|w| w.id).collect();
        for id in rest {
            self.stop_worker(id, now, out);
        }
        if self.settings.steered {
            out.push(Action::Steer { generation: None });
            self.hand_over(serving, now);
        }
    }

    /// Keep `ids` serving until `Drained` (or the hand-over timeout).
    fn hand_over(&mut self, ids: Vec<WorkerId>, now: Instant) {
        let h = self.handover.get_or_insert_with(|| Handover {
            workers: Vec::new(),
            deadline: now,
        });
        for id in ids {
            if !h.workers.contains(&id) {
                h.workers.push(id);
            }
        }
        h.deadline = now + HANDOVER_TIMEOUT;
    }

    /// The queues of the workers handed over are empty: stop them.
    fn finish_handover(&mut self, now: Instant, out: &mut Vec<Action>) {
        let Some(h) = self.handover.take() else {
            return;
        };
        for id in h.workers {
            self.stop_worker(id, now, out);
        }
    }

    fn notified(&mut self, id: WorkerId, m: Message, now: Instant, out: &mut Vec<Action>) {
        let Some(w) = self.workers.get_mut(&id) else {
            return;
        };
        let (slot, generation) = (w.slot, w.generation);
        match m {
            Message::Ready => self.became_ready(id, now, out),
            Message::Status(s) => {
                tracing::debug!(worker = slot, generation, status = %s, "worker status");
                w.status = Some(s);
            }
            Message::Watchdog => w.last_ping = Some(now),
            Message::ExtendTimeout(d) => {
                if let WorkerState::Starting { deadline, .. } = &mut w.state {
                    *deadline = (*deadline).max(now + d);
                }
            }
            Message::Stopping => {
                tracing::info!(worker = slot, generation, "worker says it is stopping")
            }
            Message::Reloading => {
                tracing::debug!(worker = slot, generation, "worker says it is reloading")
            }
            Message::WatchdogTrigger => {
                tracing::warn!(
                    worker = slot,
                    generation,
                    "worker asked to be treated as failed (WATCHDOG=trigger)"
                )
            }
            Message::Other(line) => {
                tracing::debug!(worker = slot, generation, %line, "worker notification ignored")
            }
        }
    }

    fn tick(&mut self, now: Instant, out: &mut Vec<Action>) {
        // Forget replacements older than the window first, so that a budget
        // deadline in the past cannot keep firing.
        let window = self.settings.health.window;
        while self
            .replacements
            .front()
            .is_some_and(|t| now.saturating_duration_since(*t) >= window)
        {
            self.replacements.pop_front();
        }
        if self.gave_up && self.has_unreplaced_unhealthy() {
            self.replace_next_unhealthy(now, out);
        }
        if self.handover.as_ref().is_some_and(|h| h.deadline <= now) {
            tracing::warn!(
                timeout = %humantime::format_duration(HANDOVER_TIMEOUT),
                "old workers' queues not drained in time: stopping them anyway (what is still queued for them waits for the next generation that takes their socket)"
            );
            self.finish_handover(now, out);
        }
        let silent: Vec<WorkerId> = self
            .workers
            .values()
            .filter(|w| self.ping_deadline(w).is_some_and(|d| d <= now))
            .map(|w| w.id)
            .collect();
        for id in silent {
            let period = self.settings.health.worker_watchdog.unwrap_or_default();
            let reason = format!("no WATCHDOG=1 for {}", humantime::format_duration(period));
            self.unhealthy(id, reason, now, out);
        }
        let due: Vec<(WorkerId, WorkerState)> = self
            .workers
            .values()
            .filter(|w| w.state.deadline().is_some_and(|d| d <= now))
            .map(|w| (w.id, w.state))
            .collect();
        for (id, state) in due {
            if !self.workers.contains_key(&id) {
                continue; // removed by an earlier step of this tick
            }
            match state {
                WorkerState::Waiting { .. } => {
                    let w = self.workers.get_mut(&id).expect("present");
                    w.state = WorkerState::Spawning;
                    out.push(Action::Spawn {
                        worker: id,
                        generation: w.generation,
                        slot: w.slot,
                    });
                }
                WorkerState::Starting {
                    ready_at: Some(r),
                    deadline,
                    ..
                } if r <= now && r <= deadline => {
                    self.became_ready(id, now, out);
                }
                WorkerState::Starting { pid, .. } => {
                    let w = self.workers.get(&id).expect("present").clone();
                    let timeout = humantime::format_duration(self.settings.start_timeout);
                    tracing::error!(worker = w.slot, generation = w.generation, pid, %timeout, "worker not ready in time");
                    let reason = format!(
                        "worker {} (pid {pid}) of generation {} was not ready after {timeout}",
                        w.slot, w.generation
                    );
                    self.stop_worker(id, now, out);
                    self.failed(w, reason, now, out);
                }
                WorkerState::Draining { pid, .. } => {
                    let w = self.workers.get_mut(&id).expect("present");
                    tracing::warn!(
                        worker = w.slot,
                        generation = w.generation,
                        pid,
                        "drain timeout: killing worker"
                    );
                    w.state = WorkerState::Killed { pid };
                    out.push(Action::KillGroup { pid });
                }
                _ => {}
            }
        }
    }

    /// One line for systemd's STATUS= and `nogap status`.
    pub fn status_line(&self) -> String {
        let mut s = match self.serving {
            Some(g) => {
                let ready = self
                    .workers
                    .values()
                    .filter(|w| w.generation == g && matches!(w.state, WorkerState::Ready { .. }))
                    .count();
                format!(
                    "generation {g}: {ready}/{} workers ready",
                    self.settings.workers
                )
            }
            None => "starting".to_string(),
        };
        if let (Some(g), Some(_)) = (self.starting_generation(), self.serving) {
            s.push_str(&format!("; reloading to generation {g}"));
        }
        match &self.last_reload {
            Some(ReloadOutcome::Ok { generation }) => {
                s.push_str(&format!("; last reload ok (generation {generation})"))
            }
            Some(ReloadOutcome::Failed { reason, .. }) => {
                s.push_str(&format!("; last reload failed: {reason}"))
            }
            None => {}
        }
        if !self.stalled.is_empty() {
            let names: Vec<&str> = self.stalled.iter().map(|s| s.as_str()).collect();
            s.push_str(&format!("; accept queue stalled: {}", names.join(", ")));
        }
        if self.gave_up {
            s.push_str("; UNHEALTHY: replacing workers did not help");
        }
        s
    }

    // ---- health ----------------------------------------------------------------

    /// A queue nobody accepts from: replace the worker that is most likely at
    /// fault. With one worker that is the one; with several, nogap cannot
    /// tell which one stopped accepting, so it replaces the longest-running
    /// one, one at a time, until the queue moves again.
    /// With a slot (per-worker sockets) the queue is that slot's own, and
    /// its worker is the one at fault.
    fn queue_stalled(
        &mut self,
        socket: &str,
        depth: u32,
        slot: Option<u32>,
        now: Instant,
        out: &mut Vec<Action>,
    ) {
        tracing::warn!(socket = %socket, depth, "accept queue stalled: nobody is accepting");
        let Some(serving) = self.serving else { return };
        if self.starting.is_some() {
            return; // a new generation is about to take over anyway
        }
        let candidate = self
            .workers
            .values()
            .filter(|w| w.generation == serving && w.replaced_by.is_none() && w.replaces.is_none())
            .filter(|w| slot.map_or(true, |s| w.slot == s))
            .filter_map(|w| match w.state {
                WorkerState::Ready { since, .. } => Some((since, w.id)),
                _ => None,
            })
            .min();
        match candidate {
            Some((_, id)) => {
                let reason = format!("accept queue of '{socket}' stalled with {depth} waiting");
                self.unhealthy(id, reason, now, out);
            }
            None => {
                self.give_up_if_exhausted(now, "accept queue stalled", out);
            }
        }
    }

    fn unhealthy(&mut self, id: WorkerId, reason: String, now: Instant, out: &mut Vec<Action>) {
        let serving = self.serving;
        let starting = self.starting.is_some();
        let Some(w) = self.workers.get_mut(&id) else {
            return;
        };
        if serving != Some(w.generation)
            || starting
            || self.stopping
            || !matches!(w.state, WorkerState::Ready { .. })
        {
            return;
        }
        if w.replaced_by.is_some() || w.replaces.is_some() {
            return;
        }
        let (slot, generation, pid) = (w.slot, w.generation, w.state.pid().unwrap_or(0));
        if w.unhealthy.replace(reason.clone()).is_none() {
            self.slot_health.entry(slot).or_default().unhealthy += 1;
        }
        if self.workers.values().any(|w| w.replaces.is_some()) {
            return; // one replacement at a time
        }
        if self.give_up_if_exhausted(now, &reason, out) {
            return;
        }
        self.replacements.push_back(now);
        self.slot_health.entry(slot).or_default().replacements += 1;
        tracing::warn!(worker = slot, generation, pid, %reason, "replacing unhealthy worker");
        let new = self.add_worker(generation, slot, 0, now, Some(id));
        if let Some(w) = self.workers.get_mut(&id) {
            w.replaced_by = Some(new);
        }
        self.tick(now, out);
    }

    /// Workers found unhealthy while another replacement was under way
    /// wait for their turn (the watchdog and fd checks skip them, being
    /// marked): the next one is replaced once a worker became ready.
    fn replace_next_unhealthy(&mut self, now: Instant, out: &mut Vec<Action>) {
        let next = self
            .workers
            .values()
            .find_map(|w| match (&w.unhealthy, w.state) {
                (Some(reason), WorkerState::Ready { .. })
                    if w.replaced_by.is_none() && w.replaces.is_none() =>
                {
                    Some((w.id, reason.clone()))
                }
                _ => None,
            });
        if let Some((id, reason)) = next {
            self.unhealthy(id, reason, now, out);
        }
    }

    /// True (and loud, once) when the replacement budget of the window is spent.
    fn give_up_if_exhausted(&mut self, now: Instant, reason: &str, out: &mut Vec<Action>) -> bool {
        let window = self.settings.health.window;
        while self
            .replacements
            .front()
            .is_some_and(|t| now.saturating_duration_since(*t) >= window)
        {
            self.replacements.pop_front();
        }
        let max = self.settings.health.max_replacements;
        if self.replacements.len() < max as usize {
            return false;
        }
        if !self.gave_up {
            self.gave_up = true;
            tracing::error!(
                %reason,
                max,
                window = %humantime::format_duration(window),
                "UNHEALTHY: replacing workers does not help; no more replacements in this window"
            );
            out.push(Action::Upstream(vec![Upstream::Status(self.status_line())]));
        }
        true
    }

    /// A ready worker marked unhealthy that no replacement is on its way for.
    fn has_unreplaced_unhealthy(&self) -> bool {
        self.workers.values().any(|w| {
            w.unhealthy.is_some()
                && w.replaced_by.is_none()
                && matches!(w.state, WorkerState::Ready { .. })
        })
    }

    /// When the replacement budget frees up again, if a marked worker waits
    /// for it (stalled queues are re-reported by the monitor instead).
    fn budget_deadline(&self) -> Option<Instant> {
        if !self.gave_up || !self.has_unreplaced_unhealthy() {
            return None;
        }
        self.replacements
            .front()
            .map(|t| *t + self.settings.health.window)
    }

    fn maybe_clear_gave_up(&mut self, out: &mut Vec<Action>) {
        if self.gave_up && self.stalled.is_empty() && !self.has_unreplaced_unhealthy() {
            self.gave_up = false;
            tracing::info!("healthy again");
            out.push(Action::Upstream(vec![Upstream::Status(self.status_line())]));
        }
    }
}

#[cfg(test)]
mod tests;
