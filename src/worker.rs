//! A worker and its state. Transitions happen in `policy` only.

use std::time::Instant;

pub type WorkerId = u64;

/// One worker process (or the slot it is about to fill).
#[derive(Clone, Debug)]
pub struct Worker {
    pub id: WorkerId,
    pub generation: u64,
    /// Position in its generation, 0..workers; a replacement keeps the slot.
    pub slot: u32,
    pub state: WorkerState,
    /// When the current process was started.
    pub spawned_at: Option<Instant>,
    /// Replacements of this slot in this generation before this worker.
    pub restarts: u32,
    /// The last `STATUS=` it sent.
    pub status: Option<String>,
    /// The last `WATCHDOG=1` it sent.
    pub last_ping: Option<Instant>,
    /// Why the health checks gave up on it, if they did.
    pub unhealthy: Option<String>,
    /// The worker started to take this one's place (health replacement).
    pub replaced_by: Option<WorkerId>,
    /// The unhealthy worker this one takes the place of, once ready.
    pub replaces: Option<WorkerId>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WorkerState {
    /// To be started at `until` (restart backoff; `until` may be now).
    Waiting {
        until: Instant,
    },
    /// A spawn was asked for; its result is the next event.
    Spawning,
    /// Running, not ready yet. Ready at `ready_at` (alive mode) or on
    /// `READY=1`; failed at `deadline`.
    Starting {
        pid: i32,
        ready_at: Option<Instant>,
        deadline: Instant,
    },
    Ready {
        pid: i32,
        since: Instant,
    },
    /// Stop signal sent; SIGKILL at `kill_at`.
    Draining {
        pid: i32,
        kill_at: Instant,
    },
    /// SIGKILL sent; waiting to reap.
    Killed {
        pid: i32,
    },
}

impl WorkerState {
    pub fn pid(&self) -> Option<i32> {
        match *self {
            WorkerState::Starting { pid, .. }
            | WorkerState::Ready { pid, .. }
            | WorkerState::Draining { pid, .. }
            | WorkerState::Killed { pid } => Some(pid),
            WorkerState::Waiting { .. } | WorkerState::Spawning => None,
        }
    }

    /// The next instant at which this state changes by itself.
    pub fn deadline(&self) -> Option<Instant> {
        match *self {
            WorkerState::Waiting { until } => Some(until),
            WorkerState::Starting {
                ready_at, deadline, ..
            } => Some(ready_at.map_or(deadline, |r| r.min(deadline))),
            WorkerState::Draining { kill_at, .. } => Some(kill_at),
            _ => None,
        }
    }

    /// Leaving: stop signal sent or killed.
    pub fn is_leaving(&self) -> bool {
        matches!(
            self,
            WorkerState::Draining { .. } | WorkerState::Killed { .. }
        )
    }

    pub fn name(&self) -> &'static str {
        match self {
            WorkerState::Waiting { .. } => "waiting",
            WorkerState::Spawning => "spawning",
            WorkerState::Starting { .. } => "starting",
            WorkerState::Ready { .. } => "ready",
            WorkerState::Draining { .. } => "draining",
            WorkerState::Killed { .. } => "killed",
        }
    }
}
