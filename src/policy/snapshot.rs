//! What the supervisor, status, metrics and a hand-over to a new nogap read
//! of the state: a plain owned copy, taken at one instant.

use std::time::{Duration, Instant};

use super::{
    Counters, EventKind, Phase, QueueId, ReloadOutcome, SlotHealth, State, UnhealthyReason,
    WorkerId,
};

#[derive(Clone, Debug, serde::Serialize)]
pub struct Snapshot {
    /// `starting`, `serving`, `reloading`, `stopping` or `stopped`.
    pub phase: &'static str,
    /// The generation that serves (None until the first is ready).
    pub generation: Option<u64>,
    /// The generation a reload is starting.
    pub reloading: Option<u64>,
    pub stopping: bool,
    /// The line for systemd's `STATUS=` and `nogap status`.
    pub status: String,
    /// The progressive hand-over under way (`--canary`).
    pub canary: Option<super::CanarySnapshot>,
    pub last_reload: Option<ReloadOutcome>,
    pub healthy: bool,
    pub workers: Vec<WorkerSnapshot>,
    /// Every queue stalled now or before, with its stall count.
    pub queues: Vec<QueueSnapshot>,
    /// Counters since nogap started.
    pub counters: Counters,
    /// The recent reloads, replacements and restarts, oldest first.
    pub events: Vec<EventSnapshot>,
}

/// One recent event, with how long ago it was.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct EventSnapshot {
    pub kind: EventKind,
    pub generation: u64,
    pub worker: Option<u32>,
    pub reason: String,
    pub ago: Duration,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct WorkerSnapshot {
    pub id: WorkerId,
    pub slot: u32,
    pub generation: u64,
    pub pid: Option<i32>,
    /// The state's name (`waiting` ... `killed`).
    pub state: &'static str,
    pub ready_for: Option<Duration>,
    pub restarts: u32,
    /// The last `STATUS=` it sent.
    pub status: Option<String>,
    /// How long ago its last `WATCHDOG=1` was (while ready).
    pub last_ping_ago: Option<Duration>,
    pub unhealthy: Option<UnhealthyReason>,
    /// The health history of its slot.
    pub slot_health: SlotHealth,
    /// While draining: the time left before SIGKILL.
    pub drain_left: Option<Duration>,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct QueueSnapshot {
    pub queue: QueueId,
    /// As status names it: the socket's name, `/slot` for a slot's own queue.
    pub name: String,
    pub stalled: bool,
    pub stalls: u64,
}

impl Snapshot {
    /// Whether any queue of listener `i` is stalled now.
    pub fn stalled(&self, listener: usize) -> bool {
        self.queues
            .iter()
            .any(|q| q.queue.listener == listener && q.stalled)
    }

    /// Stalls reported on the queues of listener `i`.
    pub fn stalls(&self, listener: usize) -> u64 {
        self.queues
            .iter()
            .filter(|q| q.queue.listener == listener)
            .map(|q| q.stalls)
            .sum()
    }
}

impl State {
    pub fn snapshot(&self, now: Instant) -> Snapshot {
        let ago = |t: Instant| now.saturating_duration_since(t);
        let workers = self
            .workers
            .values()
            .map(|w| {
                let (ready_for, last_ping) = match w.state {
                    super::WorkerState::Ready {
                        since, last_ping, ..
                    } => (Some(ago(since)), last_ping.map(ago)),
                    _ => (None, None),
                };
                WorkerSnapshot {
                    id: w.id,
                    slot: w.slot,
                    generation: w.generation,
                    pid: w.state.pid(),
                    state: w.state.name(),
                    ready_for,
                    restarts: w.restarts,
                    status: w.status.clone(),
                    last_ping_ago: last_ping,
                    unhealthy: w.unhealthy().cloned(),
                    slot_health: self.slot_health.get(&w.slot).copied().unwrap_or_default(),
                    drain_left: match w.state {
                        super::WorkerState::Draining { kill_at, .. } => {
                            Some(kill_at.saturating_duration_since(now))
                        }
                        _ => None,
                    },
                }
            })
            .collect();
        let queues = self
            .stalls
            .iter()
            .map(|(q, n)| QueueSnapshot {
                queue: *q,
                name: self.queue_name(*q),
                stalled: self.stalled.contains(q),
                stalls: *n,
            })
            .collect();
        let serving = self.phase.serving();
        Snapshot {
            phase: self.phase.name(),
            generation: serving,
            reloading: matches!(self.phase, Phase::Reloading { .. })
                .then(|| self.phase.starting())
                .flatten(),
            stopping: self.phase.stopping(),
            status: self.status_line_at(Some(now)),
            canary: self.canary(now),
            last_reload: self.last_reload.clone(),
            healthy: self.healthy(),
            workers,
            queues,
            counters: self.record.counters.clone(),
            events: self
                .record
                .recent()
                .map(|e| EventSnapshot {
                    kind: e.kind,
                    generation: e.generation,
                    worker: e.worker,
                    reason: e.reason.clone(),
                    ago: ago(e.at),
                })
                .collect(),
        }
    }
}
