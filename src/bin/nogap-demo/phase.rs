//! The phase of the server, broadcast from the lifecycle loop to every
//! accept loop and connection through a `watch` channel.
//!
//! Transitions: `Serving -> Stalled` (`--stall-accept-after`), and
//! `Serving | Stalled -> Draining` (a stop signal). Nothing leaves `Draining`.

use std::time::Instant;

use tokio::sync::watch;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Accepting and serving.
    Serving,
    /// Not calling accept (or recv on datagram sockets), listeners kept open,
    /// existing connections served.
    Stalled,
    /// Listeners closed; connections finish and close.
    Draining { since: Instant },
}

impl Phase {
    pub fn draining_since(self) -> Option<Instant> {
        match self {
            Phase::Draining { since } => Some(since),
            Phase::Serving | Phase::Stalled => None,
        }
    }
}

/// A task's view of the phase. Tasks of the `--health` listener use
/// `PhaseWatch::always_serving`.
#[derive(Clone, Debug)]
pub struct PhaseWatch(Option<watch::Receiver<Phase>>);

impl PhaseWatch {
    pub fn new(phase: watch::Receiver<Phase>) -> PhaseWatch {
        PhaseWatch(Some(phase))
    }

    pub fn always_serving() -> PhaseWatch {
        PhaseWatch(None)
    }

    pub fn current(&self) -> Phase {
        self.0
            .as_ref()
            .map_or(Phase::Serving, |phase| *phase.borrow())
    }

    /// When draining started, if it has.
    pub fn draining_since(&self) -> Option<Instant> {
        self.current().draining_since()
    }

    /// For listeners: waits while stalled, then says whether to keep serving
    /// (`true`) or to close the listener (`false`, draining).
    pub async fn serving(&mut self) -> bool {
        loop {
            match self.current() {
                Phase::Serving => return true,
                Phase::Draining { .. } => return false,
                Phase::Stalled => self.changed().await,
            }
        }
    }

    /// Waits until draining starts.
    pub async fn drain_started(&mut self) -> Instant {
        loop {
            if let Some(since) = self.draining_since() {
                return since;
            }
            self.changed().await;
        }
    }

    /// Waits for the next change of phase. Never returns for
    /// `always_serving`, or once the lifecycle loop is gone (the process is
    /// exiting then anyway).
    pub async fn changed(&mut self) {
        if let Some(phase) = &mut self.0 {
            if phase.changed().await.is_ok() {
                return;
            }
        }
        std::future::pending().await
    }
}
