//! Pinned, not dead: a queue that nobody accepts from while a worker is in
//! the middle of a request (the monitor's `busy`) belongs to a server whose
//! workers are all busy with the connections they accepted: a serial
//! worker on a slow request, a thread per connection with every thread
//! taken by a long-lived client. Its accept loop is not dead, and stopping
//! a worker would cut its clients off. So nogap adds a worker instead: a
//! new slot in the serving generation, on the same socket, which takes the
//! waiting queue at once; the pinned workers keep serving their clients.
//! Each further stall report (every stall timeout while it lasts) adds one
//! more, up to as many extras as the generation has workers, within the
//! replacement budget. Extras are workers of the generation like any other
//! (restarted if they exit) until it leaves at the next reload.

use std::time::Instant;

use super::{Action, EventKind, QueueId, Recorded, State, UnhealthyReason, WorkerState};

impl State {
    pub(super) fn pinned(
        &mut self,
        queue: QueueId,
        depth: u32,
        now: Instant,
        out: &mut Vec<Action>,
    ) {
        let socket = self.queue_name(queue);
        tracing::warn!(socket = %socket, depth, "accept queue stalled while workers are busy in requests: pinned, not dead");
        let Some(generation) = self.serving() else {
            return;
        };
        if self.starting_generation().is_some() || self.stopping() {
            return;
        }
        let workers = self.settings_of(generation).workers;
        let slots: Vec<u32> = self
            .workers
            .values()
            .filter(|w| w.generation == generation && !w.state.is_leaving())
            .map(|w| w.slot)
            .collect();
        let extras = slots.iter().filter(|s| **s >= workers).count() as u32;
        if extras >= workers {
            tracing::warn!(socket = %socket, extras, "pinned: no more extra workers for this generation");
            return;
        }
        // Still starting: it has not taken the queue yet.
        let starting = self.workers.values().any(|w| {
            w.generation == generation
                && w.slot >= workers
                && !matches!(w.state, WorkerState::Ready { .. })
                && !w.state.is_leaving()
        });
        let reason = UnhealthyReason::Stalled { socket, depth };
        if starting || self.give_up_if_exhausted(now, &reason, out) {
            return;
        }
        let slot = slots.iter().max().map_or(0, |s| s + 1).max(workers);
        self.replacements.push_back(now);
        self.record.push(Recorded {
            at: now,
            kind: EventKind::Replacement,
            generation,
            worker: Some(slot),
            reason: format!("pinned, not dead: {reason}: extra worker"),
        });
        tracing::warn!(
            worker = slot,
            generation,
            extras = extras + 1,
            "adding an extra worker: the others keep serving their clients"
        );
        self.add_worker(generation, slot, 0, now);
        self.tick(now, out);
    }
}
