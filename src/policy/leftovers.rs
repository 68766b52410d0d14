//! What a dead nogap left running (see `worker::leftover`): its workers got
//! the stop signal as their parent-death signal and drain. This nogap lets
//! them finish, tells them again once its own first generation is ready (a
//! worker that missed it, or a child of one), and SIGKILLs their process
//! groups `--drain-timeout` after it found them, never before its own first
//! generation is ready. If this nogap stops before it ever serves, they are
//! left to the drain their parent-death signal started.

use std::time::Instant;

use super::{Action, State};

/// The predecessor's leftovers, as far as the policy is concerned.
#[derive(Clone, Copy, Debug)]
pub(super) struct Predecessor {
    count: usize,
    found: Instant,
    /// Told to stop (the first generation is ready): killed at this instant.
    kill_at: Option<Instant>,
}

impl State {
    /// `count` leftovers were found at start-up.
    pub(super) fn leftovers_found(&mut self, count: usize, now: Instant) {
        if count == 0 {
            return;
        }
        tracing::warn!(
            count,
            drain_timeout = %humantime::format_duration(self.settings.stop.grace),
            "a previous nogap's workers are still running: they drain, and are stopped once this nogap serves"
        );
        self.predecessor = Some(Predecessor {
            count,
            found: now,
            kill_at: None,
        });
    }

    /// The first generation is ready: the leftovers get the stop signal
    /// again, and SIGKILL once `--drain-timeout` since they were found has
    /// passed (now at the earliest).
    pub(super) fn leftovers_serving(&mut self, now: Instant, out: &mut Vec<Action>) {
        let grace = self.settings.stop.grace;
        let signal = self.settings.stop.signal;
        let Some(p) = self.predecessor.as_mut().filter(|p| p.kill_at.is_none()) else {
            return;
        };
        let kill_at = (p.found + grace).max(now);
        p.kill_at = Some(kill_at);
        tracing::info!(count = p.count, signal = %signal, "telling the previous nogap's workers to stop");
        out.push(Action::StopLeftovers { signal });
    }

    pub(super) fn leftovers_deadline(&self) -> Option<Instant> {
        self.predecessor?.kill_at
    }

    pub(super) fn leftovers_tick(&mut self, now: Instant, out: &mut Vec<Action>) {
        if self.leftovers_deadline().is_some_and(|t| t <= now) {
            self.predecessor = None;
            out.push(Action::KillLeftovers);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use nix::sys::signal::Signal;

    use super::super::tests::{all_ready, run, settings};
    use super::super::{Action, Event, State};
    use crate::spec::ReadyMode;

    #[test]
    fn leftovers_are_stopped_once_serving_and_killed_after_the_drain_timeout() {
        let t0 = Instant::now();
        let mut pid = 100;
        // Drain timeout 3s.
        let mut s = State::new(settings(1, ReadyMode::Notify));
        run(&mut s, Event::Leftovers { count: 2 }, t0, &mut pid);
        let a = run(&mut s, Event::Start, t0, &mut pid);
        assert!(!a
            .iter()
            .any(|a| matches!(a, Action::StopLeftovers { .. } | Action::KillLeftovers)));
        // Nothing happens to them before the first generation is ready,
        // however long that takes.
        let late = t0 + Duration::from_secs(4);
        assert_eq!(s.next_deadline(), Some(t0 + Duration::from_secs(5)));
        let t1 = t0 + Duration::from_secs(1);
        let a = all_ready(&mut s, 1, t1, &mut pid);
        assert!(a.contains(&Action::StopLeftovers {
            signal: Signal::SIGTERM
        }));
        assert!(!a.contains(&Action::KillLeftovers));
        assert_eq!(s.next_deadline(), Some(t0 + Duration::from_secs(3)));
        let a = run(&mut s, Event::Tick, t0 + Duration::from_secs(3), &mut pid);
        assert_eq!(a, vec![Action::KillLeftovers]);
        assert_eq!(s.next_deadline(), None);
        let a = run(&mut s, Event::Tick, late, &mut pid);
        assert!(a.is_empty());

        // Ready after the drain timeout: stop signal now, SIGKILL at once
        // on the next tick.
        let mut s = State::new(settings(1, ReadyMode::Notify));
        run(&mut s, Event::Leftovers { count: 1 }, t0, &mut pid);
        run(&mut s, Event::Start, t0, &mut pid);
        let a = all_ready(&mut s, 1, late, &mut pid);
        assert!(a.contains(&Action::StopLeftovers {
            signal: Signal::SIGTERM
        }));
        assert_eq!(s.next_deadline(), Some(late));

        // None found: nothing to do.
        let mut s = State::new(settings(1, ReadyMode::Notify));
        run(&mut s, Event::Leftovers { count: 0 }, t0, &mut pid);
        run(&mut s, Event::Start, t0, &mut pid);
        let a = all_ready(&mut s, 1, t0, &mut pid);
        assert!(!a.iter().any(|a| matches!(a, Action::StopLeftovers { .. })));
    }
}
