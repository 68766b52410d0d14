//! Canary probes, the policy's side. With `Settings::probe`, a worker of the
//! starting generation that is ready by its own signal (`READY=1`, the alive
//! time) is not ready yet: nogap probes the generation through its own
//! socket first (`Action::Probe`, executed by the `probe` module) and the
//! worker is ready once `Event::Probed` passes. A failed probe fails the
//! worker as an exit before ready would: a reload fails, and the serving
//! generation keeps serving. The bare form (`http:PATH` alone, no other
//! sign of readiness) probes again every [`PROBE_RETRY`] until the start
//! timeout; after a worker's own signal, the first answer decides. Workers
//! of the serving generation (restarts, health replacements) are not
//! probed: their generation passed already.

use std::time::{Duration, Instant};

use super::{Action, State, WorkerId, WorkerState};

/// The bare form probes again this long after a failed probe.
pub const PROBE_RETRY: Duration = Duration::from_millis(100);

/// What [`Action::Probe`] asks for: probe `worker`'s `generation` through
/// its own socket with `check`, by `deadline`; then report `Probed`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProbeOrder {
    pub worker: WorkerId,
    pub generation: u64,
    pub check: crate::spec::Check,
    pub deadline: Instant,
}

/// A starting worker's probe.
#[derive(Clone, Debug, Default)]
pub(super) struct Probing {
    in_flight: bool,
    passed: bool,
    /// What the last failed probe said (bare form).
    last_error: Option<String>,
}

impl State {
    /// True when `id` may become ready only once a probe passes: the probe
    /// is then sent (or already on its way).
    pub(super) fn probe_first(&mut self, id: WorkerId, out: &mut Vec<Action>) -> bool {
        let Some(w) = self.workers.get(&id) else {
            return false;
        };
        let WorkerState::Starting { deadline, .. } = w.state else {
            return false;
        };
        let generation = w.generation;
        let Some(probe) = self.settings_of(generation).probe.clone() else {
            return false;
        };
        if self.starting_generation() != Some(generation) {
            return false;
        }
        let p = self.probes.entry(id).or_default();
        if p.passed {
            return false;
        }
        if !p.in_flight {
            p.in_flight = true;
            out.push(Action::Probe(ProbeOrder {
                worker: id,
                generation,
                check: probe.check,
                deadline,
            }));
        }
        // Ready when the probe passes, not at the alive time again.
        if let Some(WorkerState::Starting { ready_at, .. }) =
            self.workers.get_mut(&id).map(|w| &mut w.state)
        {
            *ready_at = None;
        }
        true
    }

    pub(super) fn probed(
        &mut self,
        id: WorkerId,
        result: Result<(), String>,
        now: Instant,
        out: &mut Vec<Action>,
    ) {
        let Some(w) = self.workers.get(&id).cloned() else {
            return;
        };
        let WorkerState::Starting { pid, deadline, .. } = w.state else {
            return;
        };
        let (slot, generation) = (w.slot, w.generation);
        let retry = self
            .settings_of(generation)
            .probe
            .as_ref()
            .is_some_and(|p| p.retry);
        let Some(p) = self.probes.get_mut(&id).filter(|p| p.in_flight) else {
            return;
        };
        p.in_flight = false;
        match result {
            Ok(()) => {
                p.passed = true;
                tracing::info!(worker = slot, generation, pid, "probe passed");
                self.became_ready(id, now, out);
            }
            Err(error) if retry && now + PROBE_RETRY < deadline => {
                tracing::info!(worker = slot, generation, pid, %error, "probe failed: probing again");
                p.last_error = Some(error);
                if let Some(WorkerState::Starting { ready_at, .. }) =
                    self.workers.get_mut(&id).map(|w| &mut w.state)
                {
                    *ready_at = Some(now + PROBE_RETRY);
                }
            }
            Err(error) => {
                tracing::error!(worker = slot, generation, pid, %error, "probe failed: the new generation gets no client");
                let reason = format!(
                    "worker {slot} (pid {pid}) of generation {generation} failed its probe: {error}"
                );
                self.stop_worker(id, now, out);
                self.failed(w, reason, now, out);
            }
        }
    }

    /// For a start timeout's reason: the probe's story, if there is one.
    pub(super) fn probe_note(&self, id: WorkerId) -> String {
        match self.probes.get(&id) {
            Some(p) if p.in_flight => "; its probe got no answer".to_string(),
            Some(Probing {
                last_error: Some(e),
                ..
            }) => format!("; the last probe: {e}"),
            _ => String::new(),
        }
    }
}
