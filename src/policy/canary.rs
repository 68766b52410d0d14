//! The progressive hand-over, the policy's side (`--canary PCT:DURATION`,
//! `Settings::canary` of the starting generation). When every worker of a
//! reload's new generation is ready (after its probe, if any), it does not
//! serve yet: `Action::Split` sends it `percent`% of new connections, the
//! rest still go to the serving generation, for `duration`. Meanwhile:
//!
//! * a worker of it exits, or is found unhealthy (the health events: a
//!   missed worker watchdog, descriptors, `WATCHDOG=trigger`, blocked in
//!   accept), or its own queue stalls (`CanaryStalled`), or, with a probe in `--ready`, the probe repeated every
//!   [`CANARY_PROBE_EVERY`] fails → **roll back**: `Steer` to the serving
//!   generation (which ends the split), and its workers are handed over as
//!   old workers are after a reload, so they get the stop signal only once
//!   their queue is empty (`Drained`); the reload fails with `canary
//!   failed: <reason>`. The serving generation is never signalled.
//! * `duration` passes → the generation serves as without a canary
//!   (`maybe_commit`: `Steer` to it, the old one handed over).
//!
//! The phase stays `Reloading` throughout, so a reload asked meanwhile is
//! queued, a stop stops everything as during any reload, and a self-upgrade
//! waits (the state is not `quiet`): the canary is never exported.
//! A probe in flight when `duration` ends does not count.

use std::time::{Duration, Instant};

use super::{Action, Phase, State, Upstream, WorkerId, WorkerState};

/// During a canary with a probe, a probe goes out this often.
pub const CANARY_PROBE_EVERY: Duration = Duration::from_secs(1);

/// A canary under way.
#[derive(Clone, Debug)]
pub(super) struct Canary {
    generation: u64,
    percent: u8,
    duration: Duration,
    until: Instant,
    /// When the next probe goes out (with a probe), unless one is out.
    next_probe: Option<Instant>,
    /// The worker whose probe is out.
    probing: Option<WorkerId>,
    /// `until` passed: the generation serves (`maybe_commit` goes on).
    passed: bool,
}

/// What status and metrics show of a canary.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct CanarySnapshot {
    pub generation: u64,
    pub percent: u8,
    pub duration: Duration,
    /// The time left (as of the snapshot).
    pub left: Duration,
}

impl State {
    /// Called when every worker of the starting `generation` is ready:
    /// true while a canary holds it back (one starts now if its settings
    /// ask for one).
    pub(super) fn canary_holds(
        &mut self,
        generation: u64,
        now: Instant,
        out: &mut Vec<Action>,
    ) -> bool {
        if let Some(c) = &self.canary {
            return !c.passed;
        }
        let settings = self.settings_of(generation);
        let (Some(canary), true) = (settings.canary, settings.steered) else {
            return false;
        };
        let probe = settings.probe.is_some();
        if !matches!(self.phase, Phase::Reloading { to, .. } if to == generation) {
            return false; // the first generation: nothing serves to compare
        }
        self.canary = Some(Canary {
            generation,
            percent: canary.percent,
            duration: canary.duration,
            until: now + canary.duration,
            next_probe: probe.then_some(now + CANARY_PROBE_EVERY),
            probing: None,
            passed: false,
        });
        let duration = humantime::format_duration(canary.duration);
        tracing::info!(generation, percent = canary.percent, %duration, probe, "canary: the new generation gets a share of new connections");
        out.push(Action::Split {
            generation,
            percent: canary.percent,
        });
        out.push(Action::Upstream(vec![Upstream::Status(self.status_line())]));
        true
    }

    /// Whether worker `id` belongs to the canary under way.
    fn in_canary(&self, id: WorkerId) -> bool {
        let generation = self.workers.get(&id).map(|w| w.generation);
        self.canary
            .as_ref()
            .is_some_and(|c| !c.passed && Some(c.generation) == generation)
    }

    /// A worker of the canary failed (exited, unhealthy): roll back. True
    /// when `generation` is the canary's (and it was rolled back).
    pub(super) fn canary_failed(
        &mut self,
        generation: u64,
        reason: &str,
        output: Vec<String>,
        now: Instant,
        out: &mut Vec<Action>,
    ) -> bool {
        let Some(c) = self
            .canary
            .take_if(|c| !c.passed && c.generation == generation)
        else {
            return false;
        };
        let Phase::Reloading { from, .. } = self.phase else {
            return false;
        };
        tracing::error!(generation, serving = from, %reason, "canary failed: rolling back, every new connection goes to the serving generation again");
        out.push(Action::Steer {
            generation: Some(from),
        });
        // Its workers serve what is queued for them, then stop.
        let ids: Vec<WorkerId> = self
            .workers
            .values()
            .filter(|w| w.generation == c.generation && !w.state.is_leaving())
            .map(|w| w.id)
            .collect();
        self.hand_over(ids, now);
        self.abort_reload(format!("canary failed: {reason}"), output, now, out);
        true
    }

    /// A canary worker is unhealthy: true if that rolled the canary back.
    pub(super) fn canary_unhealthy(
        &mut self,
        id: WorkerId,
        reason: &super::UnhealthyReason,
        now: Instant,
        out: &mut Vec<Action>,
    ) -> bool {
        if !self.in_canary(id) {
            return false;
        }
        let Some(w) = self.workers.get(&id) else {
            return false;
        };
        let (slot, generation) = (w.slot, w.generation);
        let pid = w.state.pid().unwrap_or(0);
        let why =
            format!("worker {slot} (pid {pid}) of generation {generation} is unhealthy: {reason}");
        self.canary_failed(generation, &why, Vec::new(), now, out)
    }

    /// The canary's own queue on `listener` stalled (nobody of it accepts):
    /// roll back.
    pub(super) fn canary_stalled(
        &mut self,
        listener: usize,
        depth: u32,
        now: Instant,
        out: &mut Vec<Action>,
    ) {
        let Some(generation) = self.canary.as_ref().filter(|c| !c.passed) else {
            return;
        };
        let generation = generation.generation;
        let socket = self.queue_name(super::QueueId {
            listener,
            slot: None,
        });
        let why = format!(
            "its accept queue on socket {socket} stalled ({depth} connections waiting, none accepted)"
        );
        self.canary_failed(generation, &why, Vec::new(), now, out);
    }

    /// The result of a canary probe: true if `worker`'s probe was one.
    pub(super) fn canary_probed(
        &mut self,
        worker: WorkerId,
        result: &Result<(), String>,
        now: Instant,
        out: &mut Vec<Action>,
    ) -> bool {
        let Some(c) = self.canary.as_mut().filter(|c| c.probing == Some(worker)) else {
            return false;
        };
        c.probing = None;
        c.next_probe = Some(now + CANARY_PROBE_EVERY);
        let generation = c.generation;
        if let Err(error) = result {
            let why = format!("probe of generation {generation}: {error}");
            self.canary_failed(generation, &why, Vec::new(), now, out);
        }
        true
    }

    /// The canary's deadlines: its end, and its next probe.
    pub(super) fn canary_deadline(&self) -> Option<Instant> {
        let c = self.canary.as_ref().filter(|c| !c.passed)?;
        let probe = c.next_probe.filter(|_| c.probing.is_none());
        Some(probe.map_or(c.until, |p| p.min(c.until)))
    }

    pub(super) fn canary_tick(&mut self, now: Instant, out: &mut Vec<Action>) {
        let Some(c) = self.canary.as_mut().filter(|c| !c.passed) else {
            return;
        };
        let generation = c.generation;
        if c.until <= now {
            c.passed = true;
            let percent = c.percent;
            tracing::info!(
                generation,
                percent,
                "canary passed: every new connection goes to the new generation"
            );
            self.maybe_commit(now, out);
            self.canary = None;
            return;
        }
        if c.probing.is_some() || !c.next_probe.is_some_and(|p| p <= now) {
            return;
        }
        let duration = c.duration;
        // Any ready worker of it: they share the generation's socket.
        let worker = self
            .workers
            .values()
            .find(|w| w.generation == generation && matches!(w.state, WorkerState::Ready { .. }))
            .map(|w| w.id);
        let settings = self.settings_of(generation);
        let (Some(worker), Some(probe)) = (worker, settings.probe.clone()) else {
            return;
        };
        let deadline = now + settings.start_timeout.min(duration);
        let Some(c) = self.canary.as_mut() else {
            return;
        };
        c.probing = Some(worker);
        c.next_probe = None;
        out.push(Action::Probe(super::ProbeOrder {
            worker,
            generation,
            check: probe.check,
            deadline,
        }));
    }

    /// Stop during a canary: it is over (everything drains).
    pub(super) fn canary_stopped(&mut self) {
        if let Some(c) = self.canary.take() {
            tracing::info!(generation = c.generation, "canary ends: nogap stops");
        }
    }

    /// What status shows: the canary, with the time left as of `now`.
    pub fn canary(&self, now: Instant) -> Option<CanarySnapshot> {
        let c = self.canary.as_ref().filter(|c| !c.passed)?;
        Some(CanarySnapshot {
            generation: c.generation,
            percent: c.percent,
            duration: c.duration,
            left: c.until.saturating_duration_since(now),
        })
    }

    /// The canary's part of the status line (`now`: with the time left).
    pub(super) fn canary_status(&self, now: Option<Instant>) -> Option<String> {
        let c = self.canary.as_ref().filter(|c| !c.passed)?;
        let (g, pct) = (c.generation, c.percent);
        Some(match now {
            Some(now) => {
                let left = c.until.saturating_duration_since(now);
                let left = Duration::from_secs(left.as_secs_f64().ceil() as u64);
                let left = humantime::format_duration(left);
                format!("canary: {pct}% to generation {g}, {left} left")
            }
            None => {
                let d = humantime::format_duration(c.duration);
                format!("canary: {pct}% to generation {g} for {d}")
            }
        })
    }
}

#[cfg(test)]
mod tests;
