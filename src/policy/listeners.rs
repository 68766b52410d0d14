//! Which listeners nogap still needs: a listener a reload dropped stays
//! open while a generation that has it is alive (its workers drain on it),
//! and is closed once none is and the next generation will not have it
//! either ([`Action::CloseSockets`]). Its health record goes with it.

use super::{Action, State};

impl State {
    /// The listeners a generation alive, the newest settings or a deploy
    /// waiting to start still have.
    fn listeners_in_use(&self) -> impl Iterator<Item = usize> + '_ {
        let settings = self
            .generations
            .values()
            .chain([&self.settings])
            .chain(self.next.as_ref());
        settings.flat_map(|s| s.listeners.iter().copied())
    }

    /// Close the open listeners nothing uses any more.
    pub(super) fn retire_listeners(&mut self, out: &mut Vec<Action>) {
        let used: std::collections::BTreeSet<usize> = self.listeners_in_use().collect();
        let unused: Vec<usize> = self.open.difference(&used).copied().collect();
        if unused.is_empty() {
            return;
        }
        for i in &unused {
            self.open.remove(i);
            self.stalled.retain(|q| q.listener != *i);
            self.stalls.retain(|q, _| q.listener != *i);
            // Damage is recorded by name: forgotten unless a listener of
            // that name is still in use.
            let name = self.settings.sockets.get(*i).cloned().unwrap_or_default();
            let named = |j: &usize| self.settings.sockets.get(*j) == Some(&name);
            if !used.iter().any(named) {
                self.tampered.remove(&name);
                self.broken.remove(&name);
            }
        }
        out.push(Action::CloseSockets { listeners: unused });
    }

    /// Whether the serving generation has listener `i` (true while none
    /// serves yet).
    pub(super) fn serving_has(&self, i: usize) -> bool {
        let serving = self.serving();
        serving.map_or(true, |g| self.settings_of(g).listeners.contains(&i))
    }

    /// Connections wait on a listener a reload dropped, which only a
    /// draining generation has: no worker of the serving generation could
    /// take them (no extra worker, no replacement). They are reset when it
    /// closes, once that generation is gone.
    pub(super) fn stalled_unserved(&mut self, queue: super::QueueId, depth: u32) {
        let socket = self.queue_name(queue);
        tracing::warn!(%socket, depth, "connections wait on a socket a reload removed: the serving generation does not have it; they are reset when it closes");
    }

    /// The listeners open, as far as the policy knows.
    pub fn open_listeners(&self) -> impl Iterator<Item = usize> + '_ {
        self.open.iter().copied()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::super::tests::{ready, run, settings};
    use super::super::{Action, Event, ExitStatus, Settings, State};
    use crate::spec::ReadyMode;

    fn with(listeners: &[usize]) -> Settings {
        let mut s = settings(1, ReadyMode::Notify);
        s.sockets = vec!["http".into(), "admin".into(), "extra".into()];
        s.listeners = listeners.to_vec();
        s
    }

    fn closed(actions: &[Action]) -> Vec<usize> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::CloseSockets { listeners } => Some(listeners.clone()),
                _ => None,
            })
            .flatten()
            .collect()
    }

    fn deploy(s: &mut State, listeners: &[usize], t0: Instant, pid: &mut i32) -> Vec<Action> {
        let settings = Box::new(with(listeners));
        run(
            s,
            Event::Deploy {
                waiter: None,
                settings,
            },
            t0,
            pid,
        )
    }

    fn exited(s: &mut State, pid: i32, code: i32, t0: Instant) -> Vec<Action> {
        let status = ExitStatus::Exited(code);
        run(s, Event::Exited { pid, status }, t0, &mut 900)
    }

    /// Started with http and admin; generation 1 (pid 101) serves.
    fn serving() -> (State, Instant, i32) {
        let (t0, mut pid) = (Instant::now(), 100);
        let mut s = State::new(with(&[0, 1]));
        run(&mut s, Event::Start, t0, &mut pid);
        let id = *s.workers.keys().next().unwrap();
        ready(&mut s, id, t0, &mut pid);
        (s, t0, pid)
    }

    #[test]
    fn a_dropped_listener_closes_once_its_last_generation_is_gone() {
        let (mut s, t0, mut pid) = serving();
        let a = deploy(&mut s, &[0], t0, &mut pid);
        assert!(closed(&a).is_empty(), "generation 1 still has admin");
        let new = *s.workers.keys().last().unwrap();
        let a = ready(&mut s, new, t0, &mut pid);
        assert!(a.contains(&Action::Signal {
            pid: 101,
            signal: nix::sys::signal::Signal::SIGTERM
        }));
        assert!(closed(&a).is_empty(), "generation 1 drains on admin");
        let a = exited(&mut s, 101, 0, t0);
        assert_eq!(closed(&a), [1]);
        // Once: nothing more to close, and the kept one never.
        let a = run(&mut s, Event::Stop, t0, &mut pid);
        assert!(closed(&a).is_empty());
        assert_eq!(s.open_listeners().collect::<Vec<_>>(), [0]);
    }

    #[test]
    fn a_listener_added_for_a_generation_that_failed_is_closed_with_it() {
        let (mut s, t0, mut pid) = serving();
        let a = deploy(&mut s, &[0, 1, 2], t0, &mut pid);
        assert!(closed(&a).is_empty());
        assert_eq!(s.open_listeners().collect::<Vec<_>>(), [0, 1, 2]);
        // Generation 2's worker (pid 102) exits before it is ready.
        let a = exited(&mut s, 102, 3, t0);
        assert_eq!(s.serving(), Some(1));
        assert_eq!(closed(&a), [2]);
        assert_eq!(s.open_listeners().collect::<Vec<_>>(), [0, 1]);
    }

    #[test]
    fn a_queue_on_a_dropped_listener_starts_no_worker() {
        let (mut s, t0, mut pid) = serving();
        deploy(&mut s, &[0], t0, &mut pid);
        let new = *s.workers.keys().last().unwrap();
        ready(&mut s, new, t0, &mut pid);
        let queue = crate::policy::QueueId {
            listener: 1,
            slot: None,
        };
        for busy in [true, false] {
            let a = s.handle(
                Event::QueueStalled {
                    queue,
                    depth: 1,
                    busy,
                },
                t0,
            );
            assert!(
                !a.iter().any(|a| matches!(a, Action::Spawn { .. })),
                "{a:?}"
            );
            assert!(!s.stalled.contains(&queue));
        }
        assert_eq!(s.workers.len(), 2, "generation 1 draining, 2 serving");
    }

    #[test]
    fn a_deploy_waiting_to_start_keeps_its_listeners_and_stalls_go_with_a_socket() {
        let (mut s, t0, mut pid) = serving();
        let queue = crate::policy::QueueId {
            listener: 1,
            slot: None,
        };
        let depth = 3;
        s.handle(
            Event::QueueStalled {
                queue,
                depth,
                busy: false,
            },
            t0,
        );
        // Generation 2 starts without admin; generation 3 waits (queued)
        // with admin back and extra.
        deploy(&mut s, &[0], t0, &mut pid);
        let a = deploy(&mut s, &[0, 1, 2], t0, &mut pid);
        assert!(closed(&a).is_empty());
        let a = deploy(&mut s, &[0], t0, &mut pid);
        assert_eq!(closed(&a), [2], "superseded before it started");
        assert!(s.stalled.contains(&queue));
        let new = s.workers.values().find(|w| w.generation == 2).unwrap().id;
        ready(&mut s, new, t0, &mut pid);
        let a = exited(&mut s, 101, 0, t0);
        assert_eq!(closed(&a), [1]);
        assert!(!s.stalled.contains(&queue) && s.stalls.is_empty());
    }
}
