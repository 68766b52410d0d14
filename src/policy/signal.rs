//! Signals to nogap, as decisions (the table is in `spec::signals`).

use std::time::Instant;

use nix::sys::signal::Signal;

use super::{Action, State, WorkerState};
use crate::spec::signals::{self, Meaning};

impl State {
    /// Signal `signo` arrived (any caught signal but CHLD, which the
    /// executor turns into `Exited` events).
    pub(super) fn signal(&mut self, signo: i32, now: Instant, out: &mut Vec<Action>) {
        let name = signals::name(signo);
        match signals::meaning(signo) {
            Meaning::Reload => {
                tracing::info!(signal = %name, "reload asked for");
                self.reload(None, now, out);
            }
            Meaning::Stop => {
                tracing::info!(signal = %name, "stop asked for");
                self.stop(now, out);
            }
            Meaning::Forward => self.forward(Signal::SIGUSR1, out),
            // The loop turns USR2 into an upgrade request (see `upgrade`).
            Meaning::Upgrade => {}
            Meaning::Scale => tracing::info!(
                signal = %name,
                "signal ignored: nogap does not scale at run time (change --workers and reload)"
            ),
            Meaning::Reap => {}
            Meaning::Ignore => {
                tracing::info!(signal = %name, "signal ignored: it means nothing to nogap")
            }
        }
    }

    /// Pass `signal` on to every ready or draining worker. A worker that is
    /// not ready yet may not handle it yet (the default action of USR1
    /// terminates): it is left out, and says so in the log.
    fn forward(&self, signal: Signal, out: &mut Vec<Action>) {
        let mut sent = 0;
        let mut skipped = 0;
        for w in self.workers.values() {
            match w.state {
                WorkerState::Ready { pid, .. } | WorkerState::Draining { pid, .. } => {
                    out.push(Action::Signal { pid, signal });
                    sent += 1;
                }
                _ => skipped += 1,
            }
        }
        tracing::info!(signal = %signal, workers = sent, not_ready = skipped, "signal forwarded to the workers");
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use nix::sys::signal::Signal;

    use super::super::tests::{all_ready, run, settings};
    use super::super::{Action, Event, Phase, State};
    use crate::spec::ReadyMode;

    fn serving(workers: u32) -> (State, Instant, i32) {
        let t0 = Instant::now();
        let mut pid = 100;
        let mut s = State::new(settings(workers, ReadyMode::Notify));
        run(&mut s, Event::Start, t0, &mut pid);
        all_ready(&mut s, 1, t0, &mut pid);
        assert_eq!(s.phase, Phase::Serving { generation: 1 });
        (s, t0, pid)
    }

    #[test]
    fn hup_reloads_and_term_int_quit_stop() {
        let (mut s, t0, mut pid) = serving(1);
        run(&mut s, Event::Signal(libc::SIGHUP), t0, &mut pid);
        assert_eq!(s.phase.starting(), Some(2));
        for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGQUIT] {
            let (mut s, t0, mut pid) = serving(1);
            let a = run(&mut s, Event::Signal(sig), t0, &mut pid);
            assert!(s.phase.stopping(), "{sig}");
            assert!(a.contains(&Action::Signal {
                pid: 101,
                signal: Signal::SIGTERM
            }));
        }
    }

    #[test]
    fn usr1_goes_to_every_ready_or_draining_worker_only() {
        let (mut s, t0, mut pid) = serving(2);
        // A reload: generation 2 starts (pids 103, 104, not ready yet).
        run(&mut s, Event::Signal(libc::SIGHUP), t0, &mut pid);
        let a = run(&mut s, Event::Signal(libc::SIGUSR1), t0, &mut pid);
        let usr1 = |pid| Action::Signal {
            pid,
            signal: Signal::SIGUSR1,
        };
        assert_eq!(a, vec![usr1(101), usr1(102)]);
        // Generation 2 ready: 101 and 102 drain and still get it.
        all_ready(&mut s, 2, t0, &mut pid);
        let mut a = run(&mut s, Event::Signal(libc::SIGUSR1), t0, &mut pid);
        a.sort_by_key(|a| format!("{a:?}"));
        assert_eq!(a, vec![usr1(101), usr1(102), usr1(103), usr1(104)]);
    }

    #[test]
    fn every_other_signal_changes_nothing() {
        let mut others: Vec<i32> = crate::spec::signals::caught();
        others.retain(|s| {
            ![
                libc::SIGHUP,
                libc::SIGTERM,
                libc::SIGINT,
                libc::SIGQUIT,
                libc::SIGUSR1,
            ]
            .contains(s)
        });
        assert!(others.len() > 40, "{others:?}");
        let (mut s, t0, mut pid) = serving(2);
        for sig in others {
            let a = run(&mut s, Event::Signal(sig), t0, &mut pid);
            assert!(a.is_empty(), "{sig}: {a:?}");
            assert_eq!(s.phase, Phase::Serving { generation: 1 });
        }
    }
}
