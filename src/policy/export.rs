//! The state as data, for a self-upgrade: [`State::export`] turns it into
//! an [`Exported`] value that serde can write, and [`State::import`] rebuilds
//! it in the new image. Instants become signed offsets (microseconds) from
//! the moment of export; the monotonic clock goes on across `execve`, so the
//! new image places them from its own "now". Pure: no I/O.
//!
//! [`FORMAT`] is the version of this shape. A new nogap says which versions
//! it can import (`nogap upgrade-probe`); the old one execs it only if its
//! own is among them.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::record::{Counters, EventKind, Histogram, Record, Recorded};
use super::{
    Handover, Phase, QueueId, ReloadOutcome, Replacement, Settings, SlotHealth, State,
    UnhealthyReason, Worker, WorkerId, WorkerState,
};

/// The version of the [`Exported`] shape.
pub const FORMAT: u32 = 1;

/// An instant as microseconds after (positive) or before (negative) export.
type Rel = i64;

fn rel(t: Instant, now: Instant) -> Rel {
    match t.checked_duration_since(now) {
        Some(d) => d.as_micros().min(i64::MAX as u128) as i64,
        None => -(now.duration_since(t).as_micros().min(i64::MAX as u128) as i64),
    }
}

fn abs(r: Rel, now: Instant) -> Instant {
    let d = Duration::from_micros(r.unsigned_abs());
    match r >= 0 {
        true => now + d,
        false => now.checked_sub(d).unwrap_or(now),
    }
}

/// Everything [`State`] holds but its settings (the new image derives each
/// generation's from the configuration carried for it) and the rate limit
/// of rejected-notification log lines (a fresh one only logs a few lines
/// more).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Exported {
    pub phase: ExportedPhase,
    pub workers: Vec<ExportedWorker>,
    pub next_id: WorkerId,
    pub generation: u64,
    pub failures: BTreeMap<u32, u32>,
    pub last_reload: Option<ReloadOutcome>,
    pub stalled: BTreeSet<QueueId>,
    pub replacements: Vec<Rel>,
    pub replacing: Option<(WorkerId, WorkerId)>,
    pub gave_up: bool,
    pub stalls: Vec<(QueueId, u64)>,
    pub slot_health: BTreeMap<u32, SlotHealth>,
    pub handover: Option<(Vec<WorkerId>, Rel)>,
    /// A deferred reload and its waiters (whose connections the executor
    /// carries by id).
    pub deferred: Option<Vec<u64>>,
    /// Sockets a worker damaged (how often, the last damage), and those
    /// damaged beyond repair (why).
    pub tampered: BTreeMap<String, (u64, String)>,
    pub broken: BTreeMap<String, String>,
    /// The generations with settings of their own (rebuilt from their
    /// configurations), and whether a deployed one waits to start.
    pub generations: Vec<u64>,
    pub next: bool,
    /// Counters and recent events (metrics stay monotonic across upgrades).
    pub record: ExportedRecord,
    pub reload_started: Option<Rel>,
    /// Which listeners each has (absent from an image before `listen`
    /// could change: every socket).
    #[serde(default)]
    pub listeners: Option<ExportedListeners>,
}

/// The listeners (indices, in hand-off order) of the newest settings, of
/// a deploy waiting, and of each generation; and those open.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ExportedListeners {
    pub newest: Vec<usize>,
    pub next: Option<Vec<usize>>,
    pub generations: Vec<(u64, Vec<usize>)>,
    pub open: Vec<usize>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ExportedRecord {
    pub reloads_ok: u64,
    pub reloads_failed: u64,
    pub restarts: u64,
    pub replacements: BTreeMap<String, u64>,
    pub reload_counts: Vec<u64>,
    pub reload_sum: f64,
    pub reload_count: u64,
    pub recent: Vec<ExportedRecorded>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportedRecorded {
    pub at: Rel,
    pub kind: String,
    pub generation: u64,
    pub worker: Option<u32>,
    pub reason: String,
}

/// The replacement reasons' labels (`UnhealthyReason::label`), as the
/// counters key them.
const LABELS: &[&str] = &["stall", "watchdog", "fds", "trigger", "accept"];

const KINDS: &[EventKind] = &[
    EventKind::Reload,
    EventKind::ReloadFailed,
    EventKind::Replacement,
    EventKind::Restart,
];

impl ExportedRecord {
    fn of(r: &Record, now: Instant) -> ExportedRecord {
        let c = &r.counters;
        ExportedRecord {
            reloads_ok: c.reloads_ok,
            reloads_failed: c.reloads_failed,
            restarts: c.restarts,
            replacements: c
                .replacements
                .iter()
                .map(|(k, v)| (k.to_string(), *v))
                .collect(),
            reload_counts: c.reload_seconds.counts.clone(),
            reload_sum: c.reload_seconds.sum,
            reload_count: c.reload_seconds.count,
            recent: r
                .recent()
                .map(|e| ExportedRecorded {
                    at: rel(e.at, now),
                    kind: e.kind.name().to_string(),
                    generation: e.generation,
                    worker: e.worker,
                    reason: e.reason.clone(),
                })
                .collect(),
        }
    }

    fn record(self, now: Instant) -> Record {
        let mut histogram = Histogram::default();
        if self.reload_counts.len() == histogram.counts.len() {
            histogram.counts = self.reload_counts;
        }
        histogram.sum = self.reload_sum;
        histogram.count = self.reload_count;
        let mut r = Record::default();
        r.counters = Counters {
            reloads_ok: self.reloads_ok,
            reloads_failed: self.reloads_failed,
            restarts: self.restarts,
            replacements: self
                .replacements
                .into_iter()
                .filter_map(|(k, v)| Some((*LABELS.iter().find(|l| **l == k)?, v)))
                .collect(),
            reload_seconds: histogram,
        };
        for e in self.recent {
            let Some(kind) = KINDS.iter().find(|k| k.name() == e.kind) else {
                continue;
            };
            r.push(Recorded {
                at: abs(e.at, now),
                kind: *kind,
                generation: e.generation,
                worker: e.worker,
                reason: e.reason,
            });
        }
        r
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "phase", rename_all = "lowercase")]
pub enum ExportedPhase {
    Starting {
        generation: u64,
        queued: Option<Vec<u64>>,
    },
    Serving {
        generation: u64,
    },
    Reloading {
        from: u64,
        to: u64,
        waiters: Vec<u64>,
        queued: Option<Vec<u64>>,
    },
    Stopping {
        serving: Option<u64>,
    },
    Stopped {
        serving: Option<u64>,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportedWorker {
    pub id: WorkerId,
    pub generation: u64,
    pub slot: u32,
    pub state: ExportedWorkerState,
    pub spawned_at: Option<Rel>,
    pub restarts: u32,
    pub status: Option<String>,
    pub first_process: bool,
    pub group: Option<i32>,
    pub output: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "lowercase")]
pub enum ExportedWorkerState {
    Waiting {
        until: Rel,
    },
    Spawning,
    Starting {
        pid: i32,
        ready_at: Option<Rel>,
        deadline: Rel,
    },
    Ready {
        pid: i32,
        since: Rel,
        last_ping: Option<Rel>,
        unhealthy: Option<ExportedUnhealthy>,
    },
    Draining {
        pid: i32,
        kill_at: Rel,
    },
    Killed {
        pid: i32,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "reason", rename_all = "lowercase")]
pub enum ExportedUnhealthy {
    Stalled { socket: String, depth: u32 },
    NoWatchdogPing { period_us: u64 },
    Descriptors { open: u64, limit: u64, pct: u8 },
    Triggered,
    BlockedInAccept { stuck_us: u64 },
}

impl ExportedUnhealthy {
    fn of(r: &UnhealthyReason) -> ExportedUnhealthy {
        match r.clone() {
            UnhealthyReason::Stalled { socket, depth } => {
                ExportedUnhealthy::Stalled { socket, depth }
            }
            UnhealthyReason::NoWatchdogPing { period } => ExportedUnhealthy::NoWatchdogPing {
                period_us: period.as_micros() as u64,
            },
            UnhealthyReason::Descriptors { open, limit, pct } => {
                ExportedUnhealthy::Descriptors { open, limit, pct }
            }
            UnhealthyReason::Triggered => ExportedUnhealthy::Triggered,
            UnhealthyReason::BlockedInAccept { stuck } => ExportedUnhealthy::BlockedInAccept {
                stuck_us: stuck.as_micros() as u64,
            },
        }
    }

    fn reason(self) -> UnhealthyReason {
        match self {
            ExportedUnhealthy::Stalled { socket, depth } => {
                UnhealthyReason::Stalled { socket, depth }
            }
            ExportedUnhealthy::NoWatchdogPing { period_us } => UnhealthyReason::NoWatchdogPing {
                period: Duration::from_micros(period_us),
            },
            ExportedUnhealthy::Descriptors { open, limit, pct } => {
                UnhealthyReason::Descriptors { open, limit, pct }
            }
            ExportedUnhealthy::Triggered => UnhealthyReason::Triggered,
            ExportedUnhealthy::BlockedInAccept { stuck_us } => UnhealthyReason::BlockedInAccept {
                stuck: Duration::from_micros(stuck_us),
            },
        }
    }
}

impl ExportedWorkerState {
    fn of(s: &WorkerState, now: Instant) -> ExportedWorkerState {
        let r = |t: Instant| rel(t, now);
        match s.clone() {
            WorkerState::Waiting { until } => ExportedWorkerState::Waiting { until: r(until) },
            WorkerState::Spawning => ExportedWorkerState::Spawning,
            WorkerState::Starting {
                pid,
                ready_at,
                deadline,
            } => ExportedWorkerState::Starting {
                pid,
                ready_at: ready_at.map(r),
                deadline: r(deadline),
            },
            WorkerState::Ready {
                pid,
                since,
                last_ping,
                unhealthy,
            } => ExportedWorkerState::Ready {
                pid,
                since: r(since),
                last_ping: last_ping.map(r),
                unhealthy: unhealthy.as_ref().map(ExportedUnhealthy::of),
            },
            WorkerState::Draining { pid, kill_at } => ExportedWorkerState::Draining {
                pid,
                kill_at: r(kill_at),
            },
            WorkerState::Killed { pid } => ExportedWorkerState::Killed { pid },
        }
    }

    fn state(self, now: Instant) -> WorkerState {
        let a = |t: Rel| abs(t, now);
        match self {
            ExportedWorkerState::Waiting { until } => WorkerState::Waiting { until: a(until) },
            // A spawn the old image did not finish: try again.
            ExportedWorkerState::Spawning => WorkerState::Waiting { until: now },
            ExportedWorkerState::Starting {
                pid,
                ready_at,
                deadline,
            } => WorkerState::Starting {
                pid,
                ready_at: ready_at.map(a),
                deadline: a(deadline),
            },
            ExportedWorkerState::Ready {
                pid,
                since,
                last_ping,
                unhealthy,
            } => WorkerState::Ready {
                pid,
                since: a(since),
                last_ping: last_ping.map(a),
                unhealthy: unhealthy.map(ExportedUnhealthy::reason),
            },
            ExportedWorkerState::Draining { pid, kill_at } => WorkerState::Draining {
                pid,
                kill_at: a(kill_at),
            },
            ExportedWorkerState::Killed { pid } => WorkerState::Killed { pid },
        }
    }
}

impl ExportedPhase {
    fn of(p: &Phase) -> ExportedPhase {
        match p.clone() {
            Phase::Starting { generation, queued } => {
                ExportedPhase::Starting { generation, queued }
            }
            Phase::Serving { generation } => ExportedPhase::Serving { generation },
            Phase::Reloading {
                from,
                to,
                waiters,
                queued,
            } => ExportedPhase::Reloading {
                from,
                to,
                waiters,
                queued,
            },
            Phase::Stopping { serving } => ExportedPhase::Stopping { serving },
            Phase::Stopped { serving } => ExportedPhase::Stopped { serving },
        }
    }

    fn phase(self) -> Phase {
        match self {
            ExportedPhase::Starting { generation, queued } => {
                Phase::Starting { generation, queued }
            }
            ExportedPhase::Serving { generation } => Phase::Serving { generation },
            ExportedPhase::Reloading {
                from,
                to,
                waiters,
                queued,
            } => Phase::Reloading {
                from,
                to,
                waiters,
                queued,
            },
            ExportedPhase::Stopping { serving } => Phase::Stopping { serving },
            ExportedPhase::Stopped { serving } => Phase::Stopped { serving },
        }
    }
}

impl State {
    /// The state as data, instants relative to `now`.
    pub fn export(&self, now: Instant) -> Exported {
        Exported {
            phase: ExportedPhase::of(&self.phase),
            workers: self
                .workers
                .values()
                .map(|w| ExportedWorker {
                    id: w.id,
                    generation: w.generation,
                    slot: w.slot,
                    state: ExportedWorkerState::of(&w.state, now),
                    spawned_at: w.spawned_at.map(|t| rel(t, now)),
                    restarts: w.restarts,
                    status: w.status.clone(),
                    first_process: w.first_process,
                    group: w.group,
                    output: w.output.clone(),
                })
                .collect(),
            next_id: self.next_id,
            generation: self.generation,
            failures: self.failures.clone(),
            last_reload: self.last_reload.clone(),
            stalled: self.stalled.clone(),
            replacements: self.replacements.iter().map(|t| rel(*t, now)).collect(),
            replacing: self.replacing.map(|r| (r.old, r.new)),
            gave_up: self.gave_up,
            stalls: self.stalls.iter().map(|(q, n)| (*q, *n)).collect(),
            slot_health: self.slot_health.clone(),
            handover: self
                .handover
                .as_ref()
                .map(|h| (h.workers.clone(), rel(h.deadline, now))),
            deferred: self.deferred.clone(),
            tampered: self.tampered.clone(),
            broken: self.broken.clone(),
            generations: self.generations.keys().copied().collect(),
            next: self.next.is_some(),
            record: ExportedRecord::of(&self.record, now),
            reload_started: self.reload_started.map(|t| rel(t, now)),
            listeners: Some(ExportedListeners {
                newest: self.settings.listeners.clone(),
                next: self.next.as_ref().map(|s| s.listeners.clone()),
                generations: (self.generations.iter())
                    .map(|(g, s)| (*g, s.listeners.clone()))
                    .collect(),
                open: self.open.iter().copied().collect(),
            }),
        }
    }

    /// Rebuild the state an old image exported, instants placed relative to
    /// `now`; `settings_of(Some(g))` are generation g's settings,
    /// `settings_of(None)` the newest deployed ones.
    pub fn import(
        e: Exported,
        now: Instant,
        settings_of: impl Fn(Option<u64>) -> Settings,
    ) -> State {
        let mut s = State::new(settings_of(Some(e.generation)));
        s.generations = e
            .generations
            .iter()
            .map(|g| (*g, settings_of(Some(*g))))
            .collect();
        s.next = e.next.then(|| settings_of(None));
        s.tampered = e.tampered;
        s.broken = e.broken;
        s.record = e.record.record(now);
        s.reload_started = e.reload_started.map(|t| abs(t, now));
        s.phase = e.phase.phase();
        s.workers = e
            .workers
            .into_iter()
            .map(|w| {
                let worker = Worker {
                    id: w.id,
                    generation: w.generation,
                    slot: w.slot,
                    state: w.state.state(now),
                    spawned_at: w.spawned_at.map(|t| abs(t, now)),
                    restarts: w.restarts,
                    status: w.status,
                    first_process: w.first_process,
                    group: w.group,
                    output: w.output,
                };
                (w.id, worker)
            })
            .collect();
        s.next_id = e.next_id;
        s.generation = e.generation;
        s.failures = e.failures;
        s.last_reload = e.last_reload;
        s.stalled = e.stalled;
        s.replacements = e
            .replacements
            .into_iter()
            .map(|t| abs(t, now))
            .collect::<VecDeque<_>>();
        s.replacing = e.replacing.map(|(old, new)| Replacement { old, new });
        s.gave_up = e.gave_up;
        s.stalls = e.stalls.into_iter().collect();
        s.slot_health = e.slot_health;
        s.handover = e.handover.map(|(workers, deadline)| Handover {
            workers,
            deadline: abs(deadline, now),
        });
        s.deferred = e.deferred;
        if let Some(l) = e.listeners {
            s.settings.listeners = l.newest;
            if let (Some(next), Some(set)) = (&mut s.next, l.next) {
                next.listeners = set;
            }
            for (g, set) in l.generations {
                if let Some(settings) = s.generations.get_mut(&g) {
                    settings.listeners = set;
                }
            }
            s.open = l.open.into_iter().collect();
        }
        s
    }

    /// No transition under way that the new image could not pick up from
    /// the state alone: nothing starts, nothing is handed over (a deferred
    /// reload is carried, and starts in the new image). A self-upgrade
    /// waits for this.
    pub fn quiet(&self) -> bool {
        matches!(self.phase, Phase::Serving { .. })
            && self.handover.is_none()
            && self.replacing.is_none()
            && self.workers.values().all(|w| {
                matches!(
                    w.state,
                    WorkerState::Ready { .. }
                        | WorkerState::Draining { .. }
                        | WorkerState::Killed { .. }
                )
            })
    }
}
