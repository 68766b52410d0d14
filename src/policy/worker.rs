//! A worker and its state, and the typed facts about one: how it exited, why
//! it is unhealthy. Transitions happen in `policy` only (this module is part
//! of it).

use std::fmt;

use std::time::{Duration, Instant};

pub use crate::worker::{ExitStatus, WorkerId};

/// One worker process (or the slot it is about to fill).
#[derive(Clone, Debug)]
pub struct Worker {
    pub(super) id: WorkerId,
    pub(super) generation: u64,
    /// Position in its generation, 0..workers; a replacement keeps the slot.
    pub(super) slot: u32,
    pub(super) state: WorkerState,
    /// When the current process was started.
    pub(super) spawned_at: Option<Instant>,
    /// Replacements of this slot in this generation before this worker.
    pub(super) restarts: u32,
    /// The last `STATUS=` it sent.
    pub(super) status: Option<String>,
    /// Its pid is still the first process it was started as: with `--pidfile`
    /// a status-0 exit of that process means "follow the daemon".
    pub(super) first_process: bool,
    /// The process group the worker leads: its first process's pid.
    pub(super) group: Option<i32>,
    /// Its last lines of output, as the executor last passed them
    /// (`Event::Output`): shown when it fails to start.
    pub(super) output: Vec<String>,
}

impl Worker {
    pub fn id(&self) -> WorkerId {
        self.id
    }

    pub fn slot(&self) -> u32 {
        self.slot
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    pub fn state(&self) -> &WorkerState {
        &self.state
    }

    /// The health problem found while it was ready, if any.
    pub fn unhealthy(&self) -> Option<&UnhealthyReason> {
        match &self.state {
            WorkerState::Ready { unhealthy, .. } => unhealthy.as_ref(),
            _ => None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WorkerState {
    /// To be started at `until` (restart backoff; `until` may be now).
    Waiting { until: Instant },
    /// A spawn was asked for; its result is the next event.
    Spawning,
    /// Running, not ready yet. Ready at `ready_at` (alive mode) or on
    /// `READY=1`; failed at `deadline`.
    Starting {
        pid: i32,
        ready_at: Option<Instant>,
        deadline: Instant,
    },
    /// Serving (or ready to). `last_ping`: its last `WATCHDOG=1`;
    /// `unhealthy`: why the health checks gave up on it, if they did.
    Ready {
        pid: i32,
        since: Instant,
        last_ping: Option<Instant>,
        unhealthy: Option<UnhealthyReason>,
    },
    /// Stop signal sent; SIGKILL at `kill_at`.
    Draining { pid: i32, kill_at: Instant },
    /// SIGKILL sent; waiting to reap.
    Killed { pid: i32 },
}

impl WorkerState {
    /// Ready since `since`, healthy, no ping yet.
    pub fn ready(pid: i32, since: Instant) -> WorkerState {
        WorkerState::Ready {
            pid,
            since,
            last_ping: None,
            unhealthy: None,
        }
    }

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

    pub fn is_ready(&self) -> bool {
        matches!(self, WorkerState::Ready { .. })
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

/// Why a ready worker is unfit to keep serving.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UnhealthyReason {
    /// Nobody accepted from this queue (named as in status) for the stall timeout.
    Stalled { socket: String, depth: u32 },
    /// No `WATCHDOG=1` within its watchdog period.
    NoWatchdogPing { period: Duration },
    /// Near its descriptor limit (`--fd-high`).
    Descriptors { open: u64, limit: u64, pct: u8 },
    /// It sent `WATCHDOG=trigger`: asked to be treated as failed.
    Triggered,
    /// Blocked in `accept()` on a shared socket this long (a worker had
    /// cleared its `O_NONBLOCK`).
    BlockedInAccept { stuck: Duration },
}

impl fmt::Display for UnhealthyReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UnhealthyReason::Stalled { socket, depth } => {
                write!(f, "accept queue of '{socket}' stalled with {depth} waiting")
            }
            UnhealthyReason::NoWatchdogPing { period } => {
                write!(
                    f,
                    "no WATCHDOG=1 for {}",
                    humantime::format_duration(*period)
                )
            }
            UnhealthyReason::Descriptors { open, limit, pct } => {
                write!(
                    f,
                    "{open} of {limit} file descriptors open (--fd-high {pct}%)"
                )
            }
            UnhealthyReason::Triggered => f.write_str("it sent WATCHDOG=trigger"),
            UnhealthyReason::BlockedInAccept { stuck } => write!(
                f,
                "blocked in accept() for {} (a worker cleared O_NONBLOCK on a shared socket)",
                humantime::format_duration(Duration::from_millis(stuck.as_millis() as u64))
            ),
        }
    }
}

impl UnhealthyReason {
    /// The reason's kind, as a metric label: `stall`, `watchdog`, `fds`,
    /// `trigger` or `accept`.
    pub fn label(&self) -> &'static str {
        match self {
            UnhealthyReason::Stalled { .. } => "stall",
            UnhealthyReason::NoWatchdogPing { .. } => "watchdog",
            UnhealthyReason::Descriptors { .. } => "fds",
            UnhealthyReason::Triggered => "trigger",
            UnhealthyReason::BlockedInAccept { .. } => "accept",
        }
    }
}

/// As its text, like `status --json` always showed it.
impl serde::Serialize for UnhealthyReason {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}
