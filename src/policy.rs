//! The supervisor's decisions: a state, an event, and the actions that follow.
//!
//! [`State::handle`] is plain code, no I/O besides logging, so every rule can
//! be tested without processes. The supervisor reads the state through a
//! [`Snapshot`]. The rules:
//!
//! | event | rule |
//! |-------|------|
//! | Start | start generation 1 (phase Starting) |
//! | Reload | start a new generation (phase Reloading); during one, remember one more (coalesced) |
//! | Reload, or a coalesced one, at the generation bound ([`MAX_GENERATIONS`] alive: serving, draining, starting; [`MAX_GENERATIONS_STEERED`] with steering) | deferred (coalesced with any other, its waiters kept): it starts once an old generation is gone; nothing is hurried |
//! | Deploy (a reload with new `Settings`, from the re-read config file) | as Reload; the new generation, and only it, runs with the new settings (each generation keeps its own until it leaves) |
//! | ReloadRejected (the config file is invalid) | the reload failed: nothing starts, the serving generation keeps serving, waiters get the reason, STATUS= says it |
//! | worker ready (READY=1, or alive long enough) | when every slot of the starting generation is ready, it serves (phase Serving) and the older ones get the stop signal |
//! | a starting worker exits, cannot be spawned, or misses the start timeout | during a reload: the new generation is stopped, the old keeps serving, the reload failed; for the first generation: retried with backoff |
//! | a serving worker exits | replaced in its slot, after a backoff that doubles per quick failure (capped) |
//! | a draining worker exits | forgotten |
//! | drain timeout | SIGKILL to the worker's process group |
//! | a daemonizing worker's first process exits with status 0 | `FollowDaemon`: the executor watches its pid file (`MainPid`, or a late `Exited` that fails the worker) |
//! | a daemonizing worker's main process is known (MainPid) | the worker is that process from now on (and can become ready: alive time counts from now); a stop already sent is repeated to it |
//! | Stop | stop signal to every worker (phase Stopping); exit once all are gone (phase Stopped) |
//! | with steering (`Settings::steered`): a generation becomes ready, or Stop | new connections are steered to it (to the original sockets at Stop); the workers it replaces keep running until their sockets' queues are drained (`Drained`, or the hand-over timeout), then get the stop signal |
//! | with steering: a worker is spawned while a serving socket's queue is stalled | `Spawn::share_serving` names the stalled sockets: the new worker shares their serving socket, to take over the queue |
//! | a queue stalls, a worker misses its watchdog, or `FdUsage` is at `fd_high` % of the limit | a replacement starts in its slot; once ready, the unhealthy worker drains (at most `max_replacements` per `window`, one at a time; workers being replaced or already unhealthy are not judged again) |
//! | a queue stalls while a worker is in a request (`busy`: pinned, not dead) | an extra worker in a new slot of the serving generation, sharing its socket; nobody is stopped (at most `workers` extras per generation, within the replacement budget) |
//! | replacements exhausted while still unhealthy | say so (logs, STATUS=); `healthy()` turns false until the queues move again |
//! | Signal | HUP: Reload; TERM, INT, QUIT: Stop; USR1: passed on to every ready or draining worker; anything else: a log line (table in `spec::signals`) |
//! | Leftovers (a dead nogap's workers, at start-up) | once the first generation is ready: the stop signal again; SIGKILL to their groups `--drain-timeout` after they were found (`leftovers`) |
//! | a self-upgrade is asked for (`UpgradeAsked`) | reloads are deferred (coalesced) until it ran or was refused (`UpgradeRefused`); it runs once the state is [`State::quiet`] (serving, nothing starting or handed over); [`State::export`] is what the new image [`State::import`]s, deferred reloads and their waiters included, and starts |
//! | with a probe (`Settings::probe`): a worker of the starting generation is ready (READY=1, alive) | `Probe` first: it is ready once `Probed` passes; a failed probe fails it as an exit would (the bare form, `http:PATH` alone, probes again every 100 ms until the start timeout) |
//! | with a canary (`Settings::canary`, steered): every worker of a reload's new generation is ready | `Split`: it gets PCT% of new connections for DURATION (probed every second with a probe); then it serves as above. A worker of it that exits or is unhealthy, its own queue stalled (`CanaryStalled`), or a failed probe: `Steer` back, its workers handed over (stopped once `Drained`), the reload fails (`canary`) |
//! | WatchdogDue (systemd's watchdog period / 2) | `PingWatchdog`, unless `watchdog_follows_health` and not healthy |

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use crate::logs::Limiter;
use crate::spec::{ReadyMode, StartLimit, StopPolicy};
use crate::worker::notify::{Message, Sender};

mod canary;
mod export;
mod leftovers;
mod listeners;
mod pinned;
mod probe;
mod record;
mod signal;
mod snapshot;
mod start_limit;
mod worker;

pub use canary::{CanarySnapshot, CANARY_PROBE_EVERY};
pub use export::{Exported, FORMAT as STATE_FORMAT};
pub use probe::ProbeOrder;
pub use record::{Counters, EventKind, Histogram, Recorded, RECENT_EVENTS, RELOAD_BUCKETS};
pub use snapshot::{EventSnapshot, QueueSnapshot, Snapshot, WorkerSnapshot};
pub use worker::{ExitStatus, UnhealthyReason, Worker, WorkerId, WorkerState};

/// What the health checks have seen of one slot.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SlotHealth {
    /// Workers of this slot found unhealthy (stall, watchdog, descriptors).
    pub unhealthy: u64,
    /// Health replacements started for this slot.
    pub replacements: u64,
}

/// A client waiting for a reload's outcome (`nogap reload --wait`).
pub type WaiterId = u64;

/// One watched accept queue: a listener's (by index), or with
/// `--reuseport-per-worker` one slot's own copy of it.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub struct QueueId {
    pub listener: usize,
    pub slot: Option<u32>,
}

#[derive(Clone, Debug)]
pub struct Settings {
    pub workers: u32,
    pub ready: ReadyMode,
    pub start_timeout: Duration,
    /// Give up when a slot of the first generation fails this often.
    pub start_limit: Option<StartLimit>,
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
    /// The sockets' names, by listener index (for logs and status).
    pub sockets: Vec<String>,
    /// The listeners (indices) this generation gets, in hand-off order.
    pub listeners: Vec<usize>,
    /// `--ready ...+http:PATH`: a starting generation's workers are ready
    /// only once a probe through its own socket passed.
    pub probe: Option<crate::spec::Probe>,
    /// `--canary PCT:DURATION`: a reload's new generation gets a share of
    /// new connections first, and is watched (see `canary`).
    pub canary: Option<crate::spec::Canary>,
}

impl Settings {
    /// The settings of a generation that runs `config`; `steered` and
    /// `sockets` are the supervisor's.
    pub fn new(config: &crate::config::RunConfig, steered: bool, sockets: Vec<String>) -> Settings {
        let health = config.health;
        Settings {
            workers: config.workers,
            ready: config.ready,
            start_timeout: config.start_timeout,
            start_limit: config.start_limit,
            stop: config.stop,
            backoff: Backoff::default(),
            health: HealthSettings {
                worker_watchdog: health.worker_watchdog,
                fd_high: health.fd_high,
                max_replacements: health.max_replacements,
                watchdog_follows_health: health.watchdog_follows_health,
                ..Default::default()
            },
            daemonizes: config.launch.pidfile.is_some(),
            steered,
            listeners: (0..sockets.len()).collect(),
            sockets,
            probe: config.probe.clone(),
            canary: config.canary,
        }
    }
}

/// At most this many generations are alive at once: the serving one, one
/// still draining, and one starting. A reload asked for at the bound waits
/// (coalesced) until the oldest is gone; nothing is cut short for it.
pub const MAX_GENERATIONS: usize = 3;

/// With steering, each generation holds its own socket per address, and a
/// socket nogap no longer needs can only be closed without misrouting a
/// connection while the serving socket is alone with it (see `steer`). So
/// at most two: the serving one and one draining or starting.
pub const MAX_GENERATIONS_STEERED: usize = 2;

/// How long old workers may take to empty their sockets' queues after new
/// connections were steered away; then they get the stop signal anyway.
pub const HANDOVER_TIMEOUT: Duration = Duration::from_secs(5);

/// How unhealthy workers are replaced.
#[derive(Clone, Copy, Debug)]
pub struct HealthSettings {
    /// Ready workers must send `WATCHDOG=1` at least this often.
    pub worker_watchdog: Option<Duration>,
    /// A worker with this percentage of its fd limit open is unhealthy.
    pub fd_high: Option<u8>,
    /// At most this many health replacements per `window`.
    pub max_replacements: u32,
    pub window: Duration,
    /// systemd's watchdog is pinged only while nogap is healthy.
    pub watchdog_follows_health: bool,
}

impl Default for HealthSettings {
    fn default() -> Self {
        HealthSettings {
            worker_watchdog: None,
            fd_high: None,
            max_replacements: 5,
            window: Duration::from_secs(60),
            watchdog_follows_health: false,
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
    /// A reload whose new generation runs with these settings.
    Deploy {
        waiter: Option<WaiterId>,
        settings: Box<Settings>,
    },
    /// A reload that cannot start: its configuration is invalid.
    ReloadRejected {
        waiter: Option<WaiterId>,
        reason: String,
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
    /// A child was reaped (or a daemon could not be followed).
    Exited {
        pid: i32,
        status: ExitStatus,
    },
    /// Messages on a worker's notify (or einhorn) socket; `from`: who sent
    /// them, as the kernel says. Only the worker's main process or a process
    /// of its process group counts (systemd's `NotifyAccess=all` within the
    /// worker's group), so another process that can write the socket cannot
    /// forge `READY=1`.
    Notify {
        worker: WorkerId,
        from: Option<Sender>,
        messages: Vec<Message>,
    },
    /// Nobody has accepted from this queue for the stall timeout, or
    /// (`busy` false) for the monitor's first sign while no worker was in a
    /// request.
    QueueStalled {
        queue: QueueId,
        depth: u32,
        busy: bool,
    },
    QueueRecovered {
        queue: QueueId,
    },
    /// During a canary: the canary generation's own socket of `listener`
    /// (its pool) kept `depth` connections for the stall timeout without
    /// getting shorter (see `monitor`).
    CanaryStalled {
        listener: usize,
        depth: u32,
    },
    /// A ready worker's open descriptors and its soft `RLIMIT_NOFILE`.
    FdUsage {
        worker: WorkerId,
        open: u64,
        limit: u64,
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
    /// Time to ping systemd's watchdog (half its period).
    WatchdogDue,
    /// A self-upgrade of nogap is asked for: no new generation starts
    /// until it ran or was refused, so that the state becomes quiet.
    UpgradeAsked,
    /// The self-upgrade was refused (or failed): reloads go on.
    UpgradeRefused,
    /// A ready worker has been blocked in `accept()` on a shared socket
    /// (made blocking by a worker, then non-blocking again) for `stuck`.
    AcceptBlocked {
        worker: WorkerId,
        stuck: Duration,
    },
    /// A worker damaged a socket nogap holds (see `sockets::guard`):
    /// `repaired` says whether nogap undid it, or why it could not.
    SocketTampered {
        socket: String,
        what: String,
        repaired: Result<(), String>,
    },
    /// A deadline may have passed.
    Tick,
    /// A signal to nogap, by number (see `spec::signals` for the table).
    Signal(i32),
    /// At start-up: this many processes of a dead nogap still run
    /// (`worker::leftover`).
    Leftovers {
        count: usize,
    },
    /// The result of a worker's `Probe`: Err says what failed.
    Probed {
        worker: WorkerId,
        result: Result<(), String>,
    },
    /// The last lines a starting worker wrote (see `worker::output`), passed
    /// before an event that may fail it, so a failure can show them.
    Output {
        worker: WorkerId,
        lines: Vec<String>,
    },
}

impl From<crate::sockets::guard::Finding> for Event {
    fn from(f: crate::sockets::guard::Finding) -> Event {
        Event::SocketTampered {
            socket: f.socket,
            what: f.tamper.to_string(),
            repaired: f.repaired,
        }
    }
}

/// What the supervisor tells systemd (sent by `notify::Upstream::tell`).
pub use crate::worker::notify::Tell as Upstream;

impl From<(i32, ExitStatus)> for Event {
    fn from((pid, status): (i32, ExitStatus)) -> Event {
        Event::Exited { pid, status }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    Spawn {
        worker: WorkerId,
        generation: u64,
        slot: u32,
        /// With steering: the listeners (indices) whose serving socket is
        /// stalled; the new worker shares it, to take over its queue.
        share_serving: Vec<usize>,
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
    /// No generation has these listeners (indices) any more, nor will the
    /// next: close them (see `sockets::set`).
    CloseSockets {
        listeners: Vec<usize>,
    },
    /// Send new connections to this generation's sockets (None: the
    /// original sockets, which outlive nogap), then report `Drained`.
    Steer {
        generation: Option<u64>,
    },
    /// The first process `pid` of a daemonizing worker exited with status 0:
    /// watch its pid file, then report `MainPid` (or a late `Exited`).
    FollowDaemon {
        worker: WorkerId,
        pid: i32,
    },
    /// A canary (see `canary`): send `percent`% of new connections to
    /// `generation`'s sockets, the rest where they go now, until the next
    /// `Steer`.
    Split {
        generation: u64,
        percent: u8,
    },
    /// Probe `worker`'s generation through its own socket (see `probe`),
    /// by `deadline`; then report `Probed`.
    Probe(ProbeOrder),
    /// `WATCHDOG=1` to systemd.
    PingWatchdog,
    Upstream(Vec<Upstream>),
    /// Send `signal` to a dead nogap's leftover workers.
    StopLeftovers {
        signal: Signal,
    },
    /// SIGKILL the leftover workers still running, and their process groups.
    KillLeftovers,
    Reply {
        waiter: WaiterId,
        result: Result<u64, String>,
    },
    Exit,
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "result", rename_all = "lowercase")]
pub enum ReloadOutcome {
    Ok {
        generation: u64,
    },
    Failed {
        generation: u64,
        reason: String,
        /// The last lines the failing worker wrote, if it wrote any.
        #[serde(skip_serializing_if = "Vec::is_empty")]
        output: Vec<String>,
    },
}

/// Where nogap is in its life. `queued`: a reload asked for while a
/// generation starts (coalesced), with its waiters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Phase {
    /// The first generation starts; nothing serves yet (generation 0: before
    /// `Start`).
    Starting {
        generation: u64,
        queued: Option<Vec<WaiterId>>,
    },
    Serving {
        generation: u64,
    },
    /// `from` serves while `to` starts; `waiters` want the outcome.
    Reloading {
        from: u64,
        to: u64,
        waiters: Vec<WaiterId>,
        queued: Option<Vec<WaiterId>>,
    },
    /// Every worker was asked to stop; `serving` is what served last.
    Stopping {
        serving: Option<u64>,
    },
    /// Every worker is gone (`Exit` was given).
    Stopped {
        serving: Option<u64>,
    },
}

impl Phase {
    pub fn name(&self) -> &'static str {
        match self {
            Phase::Starting { .. } => "starting",
            Phase::Serving { .. } => "serving",
            Phase::Reloading { .. } => "reloading",
            Phase::Stopping { .. } => "stopping",
            Phase::Stopped { .. } => "stopped",
        }
    }

    /// The generation that serves; None until the first one is ready.
    pub fn serving(&self) -> Option<u64> {
        match *self {
            Phase::Starting { .. } => None,
            Phase::Serving { generation } => Some(generation),
            Phase::Reloading { from, .. } => Some(from),
            Phase::Stopping { serving } | Phase::Stopped { serving } => serving,
        }
    }

    /// The generation being started, if any.
    pub fn starting(&self) -> Option<u64> {
        match *self {
            Phase::Starting { generation, .. } => Some(generation),
            Phase::Reloading { to, .. } => Some(to),
            _ => None,
        }
    }

    pub fn stopping(&self) -> bool {
        matches!(self, Phase::Stopping { .. } | Phase::Stopped { .. })
    }
}

/// A health replacement under way: `new` starts in `old`'s slot; once ready,
/// `old` drains.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Replacement {
    old: WorkerId,
    new: WorkerId,
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
    phase: Phase,
    workers: BTreeMap<WorkerId, Worker>,
    next_id: WorkerId,
    /// The highest generation started so far.
    generation: u64,
    /// Consecutive quick failures per slot of the serving generation.
    failures: BTreeMap<u32, u32>,
    last_reload: Option<ReloadOutcome>,
    /// Queues stalled now.
    stalled: BTreeSet<QueueId>,
    /// When health replacements were started (within the window).
    replacements: VecDeque<Instant>,
    /// The health replacement under way (one at a time).
    replacing: Option<Replacement>,
    /// Replacing did not help: still unhealthy with no replacements left.
    gave_up: bool,
    /// Stalls reported per queue, since nogap started.
    stalls: BTreeMap<QueueId, u64>,
    /// Health history per slot, since nogap started.
    slot_health: BTreeMap<u32, SlotHealth>,
    /// With steering: workers waiting for their queues to drain before they
    /// get the stop signal.
    handover: Option<Handover>,
    /// A reload asked for at the generation bound, with its waiters: it
    /// starts once an old generation is gone.
    deferred: Option<Vec<WaiterId>>,
    /// A self-upgrade waits for a quiet state: reloads are deferred.
    upgrading: bool,
    /// Sockets a worker damaged, per name: how often, and the last damage.
    tampered: BTreeMap<String, (u64, String)>,
    /// Sockets damaged beyond repair, per name: why (UNHEALTHY).
    broken: BTreeMap<String, String>,
    /// Rejected notifications, logged a few per worker and period.
    rejected: Limiter<WorkerId>,
    /// The first generation's failed starts, per slot (see `start_limit`).
    start_failures: BTreeMap<u32, VecDeque<Instant>>,
    /// Why the last worker failed to start, while no generation serves.
    last_start_failure: Option<String>,
    /// The start limit was hit: why no worker could start (nogap stops).
    no_worker: Option<String>,
    /// A dead nogap's workers, still draining (see `leftovers`).
    predecessor: Option<leftovers::Predecessor>,
    /// The settings of each generation started (`settings` is the newest's),
    /// kept while it has workers.
    generations: BTreeMap<u64, Settings>,
    /// The settings the next generation starts with (a deploy that waits
    /// for the reload under way).
    next: Option<Settings>,
    /// Counters and recent events, for metrics and status.
    record: record::Record,
    /// When the reload under way was started.
    reload_started: Option<Instant>,
    /// Probes of starting workers (`Settings::probe`).
    probes: BTreeMap<WorkerId, probe::Probing>,
    /// The listeners open (see `listeners`).
    open: BTreeSet<usize>,
    /// The progressive hand-over under way (see `canary`).
    canary: Option<canary::Canary>,
}

impl State {
    pub fn new(settings: Settings) -> State {
        State {
            open: settings.listeners.iter().copied().collect(),
            settings,
            phase: Phase::Starting {
                generation: 0,
                queued: None,
            },
            workers: BTreeMap::new(),
            next_id: 1,
            generation: 0,
            failures: BTreeMap::new(),
            last_reload: None,
            stalled: BTreeSet::new(),
            replacements: VecDeque::new(),
            replacing: None,
            gave_up: false,
            stalls: BTreeMap::new(),
            slot_health: BTreeMap::new(),
            handover: None,
            deferred: None,
            upgrading: false,
            tampered: BTreeMap::new(),
            broken: BTreeMap::new(),
            rejected: Limiter::new(Duration::from_secs(10), 3),
            start_failures: BTreeMap::new(),
            last_start_failure: None,
            no_worker: None,
            predecessor: None,
            generations: BTreeMap::new(),
            next: None,
            record: record::Record::default(),
            reload_started: None,
            probes: BTreeMap::new(),
            canary: None,
        }
    }

    /// The settings generation `generation` runs with.
    pub fn settings_of(&self, generation: u64) -> &Settings {
        self.generations.get(&generation).unwrap_or(&self.settings)
    }

    pub fn phase(&self) -> &Phase {
        &self.phase
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Whether `generation` serves, starts, or still has workers.
    pub fn generation_alive(&self, generation: u64) -> bool {
        self.generations.contains_key(&generation)
    }

    pub fn worker(&self, id: WorkerId) -> Option<&Worker> {
        self.workers.get(&id)
    }

    /// The starting workers that `event` may fail (their exit, or their
    /// start timeout at `now`): the executor passes their last output first.
    pub fn may_fail(&self, event: &Event, now: Instant) -> Vec<WorkerId> {
        self.workers
            .values()
            .filter(|w| match (&w.state, event) {
                (WorkerState::Starting { pid, .. }, Event::Exited { pid: p, .. }) => pid == p,
                (WorkerState::Starting { deadline, .. }, Event::Tick) => *deadline <= now,
                (WorkerState::Starting { .. }, Event::Probed { worker, result }) => {
                    *worker == w.id && result.is_err()
                }
                _ => false,
            })
            .map(|w| w.id)
            .collect()
    }

    fn serving(&self) -> Option<u64> {
        self.phase.serving()
    }

    fn starting_generation(&self) -> Option<u64> {
        self.phase.starting()
    }

    fn stopping(&self) -> bool {
        self.phase.stopping()
    }

    /// A queue's name as status shows it: the socket's, `/slot` for a slot's own.
    pub fn queue_name(&self, q: QueueId) -> String {
        let name = self
            .settings
            .sockets
            .get(q.listener)
            .cloned()
            .unwrap_or_else(|| format!("#{}", q.listener));
        match q.slot {
            Some(slot) => format!("{name}/{slot}"),
            None => name,
        }
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
            .chain(self.leftovers_deadline())
            .chain(self.canary_deadline())
            .min()
    }

    /// When a ready, healthy worker with a watchdog must have pinged by.
    fn ping_deadline(&self, w: &Worker) -> Option<Instant> {
        let period = self.settings.health.worker_watchdog?;
        match w.state {
            WorkerState::Ready {
                since,
                last_ping,
                unhealthy: None,
                ..
            } => Some(last_ping.map_or(since, |p| p.max(since)) + period),
            _ => None,
        }
    }

    /// False while a health problem persists that replacing could not fix.
    pub fn healthy(&self) -> bool {
        !self.gave_up && self.broken.is_empty()
    }

    /// Part of a health replacement under way, either side.
    fn in_replacement(&self, id: WorkerId) -> bool {
        self.replacing.is_some_and(|r| r.old == id || r.new == id)
    }

    pub fn handle(&mut self, event: Event, now: Instant) -> Vec<Action> {
        let mut out = Vec::new();
        match event {
            Event::Start => self.start_generation(Vec::new(), now, &mut out),
            Event::Reload { waiter } => self.reload(waiter, now, &mut out),
            Event::Deploy { waiter, settings } => {
                self.open.extend(&settings.listeners);
                self.next = Some(*settings);
                self.reload(waiter, now, &mut out)
            }
            Event::ReloadRejected { waiter, reason } => self.reject(waiter, reason, now, &mut out),
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
            Event::Notify {
                worker,
                from,
                messages,
            } => {
                if self.may_notify(worker, from, now) {
                    for m in messages {
                        self.notified(worker, m, now, &mut out);
                    }
                }
            }
            Event::QueueStalled { queue, depth, .. } if !self.serving_has(queue.listener) => {
                self.stalled_unserved(queue, depth)
            }
            Event::QueueStalled { queue, depth, busy } => {
                self.stalled.insert(queue);
                *self.stalls.entry(queue).or_default() += 1;
                match busy && queue.slot.is_none() {
                    true => self.pinned(queue, depth, now, &mut out),
                    false => self.queue_stalled(queue, depth, now, &mut out),
                }
            }
            Event::CanaryStalled { listener, depth } => {
                self.canary_stalled(listener, depth, now, &mut out)
            }
            Event::QueueRecovered { queue } => {
                if self.stalled.remove(&queue) {
                    tracing::info!(socket = %self.queue_name(queue), "accept queue moving again");
                }
                self.maybe_clear_gave_up(&mut out);
            }
            Event::FdUsage {
                worker,
                open,
                limit,
            } => self.fd_usage(worker, open, limit, now, &mut out),
            Event::MainPid { worker, pid } => self.main_pid(worker, pid, now, &mut out),
            Event::Drained => self.finish_handover(now, &mut out),
            Event::WatchdogDue => self.watchdog_due(&mut out),
            Event::UpgradeAsked => self.upgrading = true,
            Event::UpgradeRefused => self.upgrading = false,
            Event::SocketTampered {
                socket,
                what,
                repaired,
            } => self.socket_tampered(socket, what, repaired, &mut out),
            Event::AcceptBlocked { worker, stuck } => {
                let reason = UnhealthyReason::BlockedInAccept { stuck };
                self.unhealthy(worker, reason, now, &mut out);
            }
            Event::Tick => self.tick(now, &mut out),
            Event::Signal(signo) => self.signal(signo, now, &mut out),
            Event::Leftovers { count } => self.leftovers_found(count, now),
            Event::Probed { worker, result } => {
                if !self.canary_probed(worker, &result, now, &mut out) {
                    self.probed(worker, result, now, &mut out)
                }
            }
            Event::Output { worker, lines } => {
                if let Some(w) = self.workers.get_mut(&worker) {
                    w.output = lines;
                }
            }
        }
        self.maybe_clear_gave_up(&mut out);
        self.maybe_run_deferred(now, &mut out);
        // A replacement whose new worker left (stopped with its generation)
        // is over.
        if let Some(r) = self.replacing {
            if self
                .workers
                .get(&r.new)
                .map_or(true, |w| w.state.is_leaving())
            {
                self.replacing = None;
            }
        }
        let (serving, starting) = (self.serving(), self.starting_generation());
        let workers = &self.workers;
        self.probes.retain(|id, _| workers.contains_key(id));
        self.generations.retain(|g, _| {
            Some(*g) == serving
                || Some(*g) == starting
                || workers.values().any(|w| w.generation == *g)
        });
        self.retire_listeners(&mut out);
        if let Phase::Stopping { serving } = self.phase {
            if self.workers.is_empty() {
                self.phase = Phase::Stopped { serving };
                tracing::info!("stopped");
                out.push(Action::Exit);
            }
        }
        out
    }

    /// systemd's watchdog is pinged from the loop, so a wedged nogap stops
    /// pinging; with `watchdog_follows_health`, an unhealthy one too.
    fn watchdog_due(&self, out: &mut Vec<Action>) {
        if !self.settings.health.watchdog_follows_health || self.healthy() {
            out.push(Action::PingWatchdog);
        } else {
            tracing::warn!("unhealthy: not pinging systemd's watchdog");
        }
    }

    // ---- generations ---------------------------------------------------------

    fn reload(&mut self, waiter: Option<WaiterId>, now: Instant, out: &mut Vec<Action>) {
        match &mut self.phase {
            Phase::Stopping { .. } | Phase::Stopped { .. } => {
                if let Some(waiter) = waiter {
                    out.push(Action::Reply {
                        waiter,
                        result: Err("nogap is stopping".into()),
                    });
                }
            }
            Phase::Starting { queued, .. } | Phase::Reloading { queued, .. } => {
                queued.get_or_insert_with(Vec::new).extend(waiter);
                tracing::info!("reload queued: one runs already");
            }
            Phase::Serving { .. } => self.run_queued(Some(waiter.into_iter().collect()), now, out),
        }
    }

    /// How many generations may be alive at once.
    pub fn generation_bound(&self) -> usize {
        match self.settings.steered {
            true => MAX_GENERATIONS_STEERED,
            false => MAX_GENERATIONS,
        }
    }

    /// The generations with a worker (in any state), and the serving one.
    /// The pid of every worker process.
    pub fn pids(&self) -> Vec<i32> {
        self.workers
            .values()
            .filter_map(|w| w.state.pid())
            .collect()
    }

    pub fn alive_generations(&self) -> BTreeSet<u64> {
        self.workers
            .values()
            .map(|w| w.generation)
            .chain(self.serving())
            .collect()
    }

    /// A deferred reload starts once the bound allows it (and nothing else
    /// starts).
    fn maybe_run_deferred(&mut self, now: Instant, out: &mut Vec<Action>) {
        if self.deferred.is_some()
            && !self.upgrading
            && matches!(self.phase, Phase::Serving { .. })
            && self.alive_generations().len() < self.generation_bound()
        {
            let waiters = self.deferred.take();
            tracing::info!("deferred reload starts: an old generation is gone");
            self.run_queued(waiters, now, out);
        }
    }

    /// A reload whose configuration is invalid: nothing starts.
    fn reject(
        &mut self,
        waiter: Option<WaiterId>,
        reason: String,
        now: Instant,
        out: &mut Vec<Action>,
    ) {
        let reason = match self.stopping() {
            true => "nogap is stopping".to_string(),
            false => {
                tracing::error!(%reason, "reload failed: configuration rejected, the serving generation keeps serving");
                self.record.counters.reloads_failed += 1;
                self.record.push(Recorded {
                    at: now,
                    kind: EventKind::ReloadFailed,
                    generation: self.generation + 1,
                    worker: None,
                    reason: reason.clone(),
                });
                self.last_reload = Some(ReloadOutcome::Failed {
                    generation: self.generation + 1,
                    reason: reason.clone(),
                    output: Vec::new(),
                });
                out.push(Action::Upstream(vec![Upstream::Status(self.status_line())]));
                reason
            }
        };
        if let Some(waiter) = waiter {
            out.push(Action::Reply {
                waiter,
                result: Err(reason),
            });
        }
    }

    fn start_generation(&mut self, waiters: Vec<WaiterId>, now: Instant, out: &mut Vec<Action>) {
        self.generation += 1;
        let generation = self.generation;
        if let Some(next) = self.next.take() {
            self.settings = next;
        }
        self.generations.insert(generation, self.settings.clone());
        let extend = Upstream::ExtendTimeout(self.settings.start_timeout + Duration::from_secs(5));
        match self.serving() {
            Some(from) => {
                self.phase = Phase::Reloading {
                    from,
                    to: generation,
                    waiters,
                    queued: None,
                };
                tracing::info!(generation, "reload started");
                self.reload_started = Some(now);
                out.push(Action::Upstream(vec![
                    Upstream::Reloading,
                    extend,
                    Upstream::Status(self.status_line()),
                ]));
            }
            None => {
                self.phase = Phase::Starting {
                    generation,
                    queued: None,
                };
                tracing::info!(generation, workers = self.settings.workers, "starting");
                out.push(Action::Upstream(vec![extend]));
            }
        }
        for slot in 0..self.settings.workers {
            self.add_worker(generation, slot, 0, now);
        }
        self.tick(now, out);
    }

    fn add_worker(
        &mut self,
        generation: u64,
        slot: u32,
        restarts: u32,
        until: Instant,
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
                first_process: false,
                group: None,
                output: Vec::new(),
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
            .filter(|w| w.generation == generation && w.state.is_ready())
            .count();
        if ready < self.settings.workers as usize {
            return;
        }
        if self.canary_holds(generation, now, out) {
            return;
        }
        let (first, waiters, queued) =
            match std::mem::replace(&mut self.phase, Phase::Serving { generation }) {
                Phase::Starting { queued, .. } => (true, Vec::new(), queued),
                Phase::Reloading {
                    waiters, queued, ..
                } => (false, waiters, queued),
                _ => unreachable!("a generation starts"),
            };
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
        if first {
            self.leftovers_serving(now, out);
        }
        if !first {
            self.last_reload = Some(ReloadOutcome::Ok { generation });
            let took = self.reload_took(now);
            self.record.counters.reloads_ok += 1;
            self.record.push(Recorded {
                at: now,
                kind: EventKind::Reload,
                generation,
                worker: None,
                reason: format!(
                    "generation {generation} serves (took {})",
                    humantime::format_duration(Duration::from_millis(took.as_millis() as u64))
                ),
            });
        }
        for waiter in waiters {
            out.push(Action::Reply {
                waiter,
                result: Ok(generation),
            });
        }
        out.push(Action::Upstream(vec![
            Upstream::Ready,
            Upstream::Status(self.status_line()),
        ]));
        self.run_queued(queued, now, out);
    }

    /// How long the reload under way took until `now` (and it is over).
    fn reload_took(&mut self, now: Instant) -> Duration {
        let took = self
            .reload_started
            .take()
            .map_or(Duration::ZERO, |t| now.saturating_duration_since(t));
        self.record.counters.reload_seconds.observe(took);
        took
    }

    /// The starting generation failed during a reload: stop it, keep the old.
    /// `output`: the last lines of the worker that failed.
    fn abort_reload(
        &mut self,
        reason: String,
        output: Vec<String>,
        now: Instant,
        out: &mut Vec<Action>,
    ) {
        let Phase::Reloading {
            from,
            to: generation,
            waiters,
            queued,
        } = std::mem::replace(&mut self.phase, Phase::Serving { generation: 0 })
        else {
            unreachable!("a reload runs");
        };
        self.phase = Phase::Serving { generation: from };
        self.settings = self.settings_of(from).clone();
        tracing::error!(generation, %reason, "reload failed");
        // A canary's workers handed over stop once their queue is empty.
        let handed = |id: &WorkerId| {
            self.handover
                .as_ref()
                .is_some_and(|h| h.workers.contains(id))
        };
        let ids: Vec<WorkerId> = self
            .workers
            .values()
            .filter(|w| w.generation == generation && !w.state.is_leaving())
            .map(|w| w.id)
            .filter(|id| !handed(id))
            .collect();
        for id in ids {
            self.stop_worker(id, now, out);
        }
        self.reload_took(now);
        self.record.counters.reloads_failed += 1;
        self.record.push(Recorded {
            at: now,
            kind: EventKind::ReloadFailed,
            generation,
            worker: None,
            reason: reason.clone(),
        });
        let answer = with_output(&reason, &output);
        self.last_reload = Some(ReloadOutcome::Failed {
            generation,
            reason,
            output,
        });
        for waiter in waiters {
            out.push(Action::Reply {
                waiter,
                result: Err(answer.clone()),
            });
        }
        out.push(Action::Upstream(vec![
            Upstream::Ready,
            Upstream::Status(self.status_line()),
        ]));
        self.run_queued(queued, now, out);
    }

    /// Start a reload now, or defer it while the generation bound is met.
    fn run_queued(&mut self, queued: Option<Vec<WaiterId>>, now: Instant, out: &mut Vec<Action>) {
        let Some(mut waiters) = queued else {
            return;
        };
        if let Some(earlier) = self.deferred.take() {
            waiters.splice(0..0, earlier);
        }
        let alive = self.alive_generations().len();
        let bound = self.generation_bound();
        if alive < bound && !self.upgrading {
            self.start_generation(waiters, now, out);
            return;
        }
        if self.deferred.is_none() && self.upgrading {
            tracing::info!("reload deferred: the self-upgrade asked for goes first");
        } else if self.deferred.is_none() {
            tracing::info!(
                alive,
                bound,
                "reload deferred: it starts once an old generation is gone"
            );
        }
        self.deferred.get_or_insert_with(Vec::new).extend(waiters);
    }

    // ---- workers -------------------------------------------------------------

    fn spawned(&mut self, id: WorkerId, pid: i32, now: Instant) {
        let Some(generation) = self.workers.get(&id).map(|w| w.generation) else {
            return;
        };
        let settings = self.settings_of(generation);
        let (ready_mode, timeout) = (settings.ready, settings.start_timeout);
        let daemonizes = settings.daemonizes;
        let Some(w) = self.workers.get_mut(&id) else {
            return;
        };
        w.spawned_at = Some(now);
        w.first_process = true;
        w.group = Some(pid);
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
        if self.probe_first(id, out) {
            return;
        }
        let Some(w) = self.workers.get_mut(&id) else {
            return;
        };
        let WorkerState::Starting { pid, .. } = w.state else {
            return;
        };
        w.state = WorkerState::ready(pid, now);
        tracing::info!(
            worker = w.slot,
            generation = w.generation,
            pid,
            "worker ready"
        );
        if let Some(r) = self.replacing.filter(|r| r.new == id) {
            self.replacing = None;
            if let Some(o) = self.workers.get(&r.old) {
                let old_pid = o.state.pid().unwrap_or(0);
                tracing::info!(
                    worker = o.slot,
                    generation = o.generation,
                    old_pid,
                    pid,
                    "unhealthy worker replaced"
                );
            }
            self.stop_worker(r.old, now, out);
        }
        self.maybe_commit(now, out);
        self.replace_next_unhealthy(now, out);
    }

    fn exited(&mut self, pid: i32, status: ExitStatus, now: Instant, out: &mut Vec<Action>) {
        let Some(w) = self
            .workers
            .values_mut()
            .find(|w| w.state.pid() == Some(pid))
        else {
            tracing::debug!(pid, %status, "reaped a process that is not a worker");
            return;
        };
        // A daemonizing worker's first process leaves its daemon behind.
        let daemonizes = self
            .generations
            .get(&w.generation)
            .unwrap_or(&self.settings)
            .daemonizes;
        if daemonizes && w.first_process && status == ExitStatus::Exited(0) {
            w.first_process = false;
            out.push(Action::FollowDaemon { worker: w.id, pid });
            return;
        }
        let id = w.id;
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
        if self.stopping() {
            return;
        }
        if let Some(r) = self.replacing.filter(|r| r.new == w.id || r.old == w.id) {
            self.replacing = None;
            if r.new == w.id {
                // A health replacement that failed: the old worker stays; the
                // health checks will try again (rate-limited).
                tracing::error!(worker = w.slot, generation = w.generation, %reason, "replacement worker failed");
                if let Some(WorkerState::Ready { unhealthy, .. }) =
                    self.workers.get_mut(&r.old).map(|o| &mut o.state)
                {
                    *unhealthy = None;
                }
                return;
            }
            // An unhealthy worker that died while its replacement starts:
            // the replacement fills the slot.
            if self.workers.contains_key(&r.new) {
                return;
            }
        }
        if self.canary_failed(w.generation, &reason, w.output.clone(), now, out) {
            return;
        }
        if matches!(self.phase, Phase::Reloading { to, .. } if to == w.generation) {
            self.abort_reload(reason, w.output, now, out);
            return;
        }
        let current = self.serving().or(self.starting_generation());
        if current != Some(w.generation) {
            return; // an old generation's worker: nothing to replace
        }
        if self.start_limit_hit(&w, &reason, now, out) {
            return;
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
        self.record.counters.restarts += 1;
        self.record.push(Recorded {
            at: now,
            kind: EventKind::Restart,
            generation: w.generation,
            worker: Some(w.slot),
            reason,
        });
        self.add_worker(w.generation, w.slot, w.restarts + 1, now + delay);
    }

    /// Follow a daemonized worker's new main process. Its state and start
    /// deadline stay; the alive time starts now; a stop signal or SIGKILL
    /// already sent to the first process is sent to the new one.
    fn main_pid(&mut self, id: WorkerId, new: i32, now: Instant, out: &mut Vec<Action>) {
        let Some(generation) = self.workers.get(&id).map(|w| w.generation) else {
            return;
        };
        let (signal, ready_mode) = {
            let settings = self.settings_of(generation);
            (settings.stop.signal, settings.ready)
        };
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
        let Some(generation) = self.workers.get(&id).map(|w| w.generation) else {
            return;
        };
        let StopPolicy { grace, signal } = self.settings_of(generation).stop;
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
        if self.stopping() {
            tracing::info!("already stopping");
            return;
        }
        tracing::info!("stopping: draining every worker");
        self.canary_stopped();
        let serving = self.serving();
        let (waiters, queued) =
            match std::mem::replace(&mut self.phase, Phase::Stopping { serving }) {
                Phase::Starting { queued, .. } => (Vec::new(), queued),
                Phase::Reloading {
                    waiters, queued, ..
                } => (waiters, queued),
                _ => (Vec::new(), None),
            };
        let reason = "nogap is stopping".to_string();
        let deferred = self.deferred.take();
        let waiters = waiters
            .into_iter()
            .chain(queued.into_iter().flatten())
            .chain(deferred.into_iter().flatten());
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
            .partition(|w| self.settings.steered && w.state.is_ready());
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

    /// Whether `from` may speak for worker `id`: its main process, or a
    /// process of the group the worker leads (its first process's pid) or
    /// of its main process's group. A daemonizing worker's messages count
    /// from anyone until its main process is known (limit: nogap cannot
    /// tell the daemon yet).
    fn may_notify(&mut self, id: WorkerId, from: Option<Sender>, now: Instant) -> bool {
        let Some(w) = self.workers.get(&id) else {
            return false;
        };
        let pid = w.state.pid();
        let ok = match from {
            None => false,
            Some(s) => {
                Some(s.pid) == pid
                    || (s.pgid.is_some() && (s.pgid == pid || s.pgid == w.group))
                    || (self.settings.daemonizes && w.first_process)
            }
        };
        if !ok {
            let (slot, generation) = (w.slot, w.generation);
            if let Some(suppressed) = self.rejected.allow(id, now) {
                tracing::warn!(
                    worker = slot,
                    generation,
                    worker_pid = pid,
                    sender_pid = from.map(|s| s.pid),
                    suppressed,
                    "notification ignored: not sent by the worker or its process group"
                );
            }
        }
        ok
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
            Message::Watchdog => {
                if let WorkerState::Ready { last_ping, .. } = &mut w.state {
                    *last_ping = Some(now);
                }
            }
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
                );
                self.triggered(id, now, out);
            }
            Message::Other(line) => {
                tracing::debug!(worker = slot, generation, %line, "worker notification ignored")
            }
        }
    }

    /// `WATCHDOG=trigger`: a ready worker is unhealthy (replaced, as for a
    /// missed ping); a starting one has failed to start.
    fn triggered(&mut self, id: WorkerId, now: Instant, out: &mut Vec<Action>) {
        let Some(w) = self.workers.get(&id) else {
            return;
        };
        match w.state {
            WorkerState::Ready { .. } => {
                self.unhealthy(id, UnhealthyReason::Triggered, now, out);
            }
            WorkerState::Starting { pid, .. } => {
                let w = w.clone();
                let reason = format!(
                    "worker {} (pid {pid}) of generation {} sent WATCHDOG=trigger before it was ready",
                    w.slot, w.generation
                );
                self.stop_worker(id, now, out);
                self.failed(w, reason, now, out);
            }
            _ => {}
        }
    }

    fn tick(&mut self, now: Instant, out: &mut Vec<Action>) {
        // Forget replacements older than the window first, so that a budget
        // deadline in the past cannot keep firing.
        self.prune_budget(now);
        self.leftovers_tick(now, out);
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
        self.canary_tick(now, out);
        let silent: Vec<WorkerId> = self
            .workers
            .values()
            .filter(|w| self.ping_deadline(w).is_some_and(|d| d <= now))
            .map(|w| w.id)
            .collect();
        for id in silent {
            let period = self.settings.health.worker_watchdog.unwrap_or_default();
            self.unhealthy(id, UnhealthyReason::NoWatchdogPing { period }, now, out);
        }
        let due: Vec<(WorkerId, WorkerState)> = self
            .workers
            .values()
            .filter(|w| w.state.deadline().is_some_and(|d| d <= now))
            .map(|w| (w.id, w.state.clone()))
            .collect();
        for (id, state) in due {
            if !self.workers.contains_key(&id) {
                continue; // removed by an earlier step of this tick
            }
            match state {
                WorkerState::Waiting { .. } => {
                    let share_serving = self.stalled_serving();
                    let w = self.workers.get_mut(&id).expect("present");
                    w.state = WorkerState::Spawning;
                    out.push(Action::Spawn {
                        worker: id,
                        generation: w.generation,
                        slot: w.slot,
                        share_serving,
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
                    let timeout =
                        humantime::format_duration(self.settings_of(w.generation).start_timeout);
                    tracing::error!(worker = w.slot, generation = w.generation, pid, %timeout, "worker not ready in time");
                    let reason = format!(
                        "worker {} (pid {pid}) of generation {} was not ready after {timeout}{}",
                        w.slot,
                        w.generation,
                        self.probe_note(id)
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

    /// With steering, the listeners whose whole (serving) socket is stalled:
    /// nobody accepts from it, so a new worker must share it to take over
    /// its queue.
    fn stalled_serving(&self) -> Vec<usize> {
        if !self.settings.steered {
            return Vec::new();
        }
        let mut share: Vec<usize> = self
            .stalled
            .iter()
            .filter(|q| q.slot.is_none())
            .map(|q| q.listener)
            .collect();
        share.dedup();
        share
    }

    /// One line for systemd's STATUS= and `nogap status`.
    pub fn status_line(&self) -> String {
        self.status_line_at(None)
    }

    /// [`State::status_line`]; with `now`, a canary says the time it has left.
    pub fn status_line_at(&self, now: Option<Instant>) -> String {
        let serving = self.serving();
        let mut s = match serving {
            Some(g) => {
                let ready = self
                    .workers
                    .values()
                    .filter(|w| w.generation == g && w.state.is_ready())
                    .count();
                format!(
                    "generation {g}: {ready}/{} workers ready",
                    self.settings_of(g).workers
                )
            }
            None => "starting".to_string(),
        };
        if let (Some(g), Some(_)) = (self.starting_generation(), serving) {
            s.push_str(&format!("; reloading to generation {g}"));
        }
        if let Some(c) = self.canary_status(now) {
            s.push_str(&format!("; {c}"));
        }
        match &self.last_reload {
            Some(ReloadOutcome::Ok { generation }) => {
                s.push_str(&format!("; last reload ok (generation {generation})"))
            }
            Some(ReloadOutcome::Failed { reason, output, .. }) => {
                s.push_str(&format!("; last reload failed: {reason}"));
                if let Some(last) = output.last() {
                    s.push_str(&format!(
                        "; its last output: {}",
                        crate::spec::truncate(last)
                    ));
                }
            }
            None => {}
        }
        if self.deferred.is_some() {
            s.push_str(&format!(
                "; reload deferred ({} generations alive, at most {})",
                self.alive_generations().len(),
                self.generation_bound()
            ));
        }
        if let Some(s2) = self.no_worker_status() {
            s.push_str(&s2);
        } else if !self.stalled.is_empty() {
            let mut names: Vec<String> = self.stalled.iter().map(|q| self.queue_name(*q)).collect();
            names.sort();
            s.push_str(&format!("; accept queue stalled: {}", names.join(", ")));
        }
        if self.gave_up {
            s.push_str("; UNHEALTHY: replacing workers did not help");
        }
        for (socket, why) in &self.broken {
            s.push_str(&format!("; UNHEALTHY: socket {socket} is damaged: {why}"));
        }
        for (socket, (n, what)) in &self.tampered {
            if !self.broken.contains_key(socket) {
                s.push_str(&format!("; socket {socket} repaired {n}x (last: {what})"));
            }
        }
        s
    }

    /// A worker damaged a shared socket. Repaired: said once per damage
    /// (logs, STATUS=). Not repaired: nogap is unhealthy until it is.
    fn socket_tampered(
        &mut self,
        socket: String,
        what: String,
        repaired: Result<(), String>,
        out: &mut Vec<Action>,
    ) {
        match repaired {
            Ok(()) => {
                tracing::warn!(socket = %socket, damage = %what, "a worker damaged a shared socket: repaired");
                let t = self.tampered.entry(socket.clone()).or_default();
                t.0 += 1;
                t.1 = what;
                self.broken.remove(&socket);
            }
            Err(error) => {
                let first = !self.broken.contains_key(&socket);
                let why = format!("{what}; {error}");
                if first {
                    tracing::error!(socket = %socket, damage = %what, %error, "UNHEALTHY: a worker damaged a shared socket and nogap cannot repair it");
                }
                self.broken.insert(socket, why);
                if !first {
                    return;
                }
            }
        }
        out.push(Action::Upstream(vec![Upstream::Status(self.status_line())]));
    }

    // ---- health ----------------------------------------------------------------

    /// A queue nobody accepts from: replace the worker that is most likely at
    /// fault. With one worker that is the one; with several, nogap cannot
    /// tell which one stopped accepting, so it replaces the longest-running
    /// one, one at a time, until the queue moves again.
    /// With a slot (per-worker sockets) the queue is that slot's own, and
    /// its worker is the one at fault.
    fn queue_stalled(&mut self, queue: QueueId, depth: u32, now: Instant, out: &mut Vec<Action>) {
        let socket = self.queue_name(queue);
        if !self.any_worker_running() {
            tracing::warn!(socket = %socket, depth, "connections are waiting: no worker is running");
            return;
        }
        tracing::warn!(socket = %socket, depth, "accept queue stalled: nobody is accepting");
        let Some(serving) = self.serving() else {
            return;
        };
        if self.starting_generation().is_some() {
            return; // a new generation is about to take over anyway
        }
        let candidate = self
            .workers
            .values()
            .filter(|w| w.generation == serving && !self.in_replacement(w.id))
            .filter(|w| queue.slot.map_or(true, |s| w.slot == s))
            .filter_map(|w| match w.state {
                WorkerState::Ready { since, .. } => Some((since, w.id)),
                _ => None,
            })
            .min();
        match candidate {
            Some((_, id)) => {
                let reason = UnhealthyReason::Stalled { socket, depth };
                self.unhealthy(id, reason, now, out);
            }
            None => {
                self.give_up_if_exhausted(now, &"accept queue stalled", out);
            }
        }
    }

    /// A ready worker near its descriptor limit is unhealthy. Workers being
    /// replaced, or already found unhealthy, are not judged again.
    fn fd_usage(
        &mut self,
        id: WorkerId,
        open: u64,
        limit: u64,
        now: Instant,
        out: &mut Vec<Action>,
    ) {
        let Some(pct) = self.settings.health.fd_high else {
            return;
        };
        let Some(w) = self.workers.get(&id) else {
            return;
        };
        if !matches!(
            w.state,
            WorkerState::Ready {
                unhealthy: None,
                ..
            }
        ) || self.replacing.is_some_and(|r| r.old == id)
        {
            return;
        }
        if limit > 0 && open * 100 >= limit * pct as u64 {
            let reason = UnhealthyReason::Descriptors { open, limit, pct };
            self.unhealthy(id, reason, now, out);
        }
    }

    fn unhealthy(
        &mut self,
        id: WorkerId,
        reason: UnhealthyReason,
        now: Instant,
        out: &mut Vec<Action>,
    ) {
        let (serving, starting, stopping) = (
            self.serving(),
            self.starting_generation().is_some(),
            self.stopping(),
        );
        if self.canary_unhealthy(id, &reason, now, out) {
            return;
        }
        let involved = self.in_replacement(id);
        let Some(w) = self.workers.get_mut(&id) else {
            return;
        };
        if serving != Some(w.generation) || starting || stopping || involved {
            return;
        }
        let WorkerState::Ready { pid, unhealthy, .. } = &mut w.state else {
            return;
        };
        let (slot, generation, pid) = (w.slot, w.generation, *pid);
        if unhealthy.replace(reason.clone()).is_none() {
            self.slot_health.entry(slot).or_default().unhealthy += 1;
        }
        if self.replacing.is_some() {
            return; // one replacement at a time
        }
        if self.give_up_if_exhausted(now, &reason, out) {
            return;
        }
        self.replacements.push_back(now);
        self.slot_health.entry(slot).or_default().replacements += 1;
        *self
            .record
            .counters
            .replacements
            .entry(reason.label())
            .or_default() += 1;
        self.record.push(Recorded {
            at: now,
            kind: EventKind::Replacement,
            generation,
            worker: Some(slot),
            reason: reason.to_string(),
        });
        tracing::warn!(worker = slot, generation, pid, %reason, "replacing unhealthy worker");
        let new = self.add_worker(generation, slot, 0, now);
        self.replacing = Some(Replacement { old: id, new });
        self.tick(now, out);
    }

    /// Workers found unhealthy while another replacement was under way
    /// wait for their turn (the watchdog and fd checks skip them, being
    /// marked): the next one is replaced once a worker became ready.
    fn replace_next_unhealthy(&mut self, now: Instant, out: &mut Vec<Action>) {
        let next = self.workers.values().find_map(|w| match &w.state {
            WorkerState::Ready {
                unhealthy: Some(reason),
                ..
            } if !self.in_replacement(w.id) => Some((w.id, reason.clone())),
            _ => None,
        });
        if let Some((id, reason)) = next {
            self.unhealthy(id, reason, now, out);
        }
    }

    /// Forget the replacements that left the window.
    fn prune_budget(&mut self, now: Instant) {
        let window = self.settings.health.window;
        while self
            .replacements
            .front()
            .is_some_and(|t| now.saturating_duration_since(*t) >= window)
        {
            self.replacements.pop_front();
        }
    }

    /// True (and loud, once) when the replacement budget of the window is spent.
    fn give_up_if_exhausted(
        &mut self,
        now: Instant,
        reason: &dyn std::fmt::Display,
        out: &mut Vec<Action>,
    ) -> bool {
        self.prune_budget(now);
        let max = self.settings.health.max_replacements;
        if self.replacements.len() < max as usize {
            return false;
        }
        if !self.gave_up {
            self.gave_up = true;
            tracing::error!(
                %reason,
                max,
                window = %humantime::format_duration(self.settings.health.window),
                "UNHEALTHY: replacing workers does not help; no more replacements in this window"
            );
            out.push(Action::Upstream(vec![Upstream::Status(self.status_line())]));
        }
        true
    }

    /// A ready worker marked unhealthy that no replacement is on its way for.
    fn has_unreplaced_unhealthy(&self) -> bool {
        self.workers
            .values()
            .any(|w| w.unhealthy().is_some() && !self.replacing.is_some_and(|r| r.old == w.id))
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

/// A failure's reason, followed by the failing worker's last lines.
fn with_output(reason: &str, output: &[String]) -> String {
    if output.is_empty() {
        return reason.to_string();
    }
    let mut s = format!("{reason}; its last output:");
    for line in output {
        s.push_str("\n  ");
        s.push_str(line);
    }
    s
}

#[cfg(test)]
mod tests;
