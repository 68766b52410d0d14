//! The start limit: a first generation that can never start is not retried
//! forever (`--start-limit N` failures of one slot within
//! `--start-limit-interval`, after systemd's `StartLimitBurst=`). nogap then
//! stops, and exits with `error::exit::NO_WORKER`, saying why. Once a
//! generation has served, failures are restarts with backoff, never fatal.

use std::time::Instant;

use super::{Action, State, Upstream, Worker};

impl State {
    /// A worker of the current generation failed to start or exited
    /// (`reason`). True when that hit the start limit: nogap stops, and
    /// nothing is restarted.
    pub(super) fn start_limit_hit(
        &mut self,
        w: &Worker,
        reason: &str,
        now: Instant,
        out: &mut Vec<Action>,
    ) -> bool {
        if self.serving().is_some() {
            return false;
        }
        self.last_start_failure = Some(reason.to_string());
        let Some(limit) = self.settings.start_limit else {
            return false;
        };
        let failures = self.start_failures.entry(w.slot).or_default();
        failures.push_back(now);
        while failures
            .front()
            .is_some_and(|t| now.saturating_duration_since(*t) >= limit.interval)
        {
            failures.pop_front();
        }
        if failures.len() < limit.burst as usize {
            return false;
        }
        let interval = humantime::format_duration(limit.interval);
        let mut why = format!(
            "{reason} ({} failed starts within {interval}, --start-limit)",
            failures.len()
        );
        // One line: the worker's last line of output, when nogap captures it
        // (--worker-output); the lines before it are in the log.
        if let Some(last) = w.output.last() {
            why.push_str(&format!("; its last output: {last}"));
        }
        tracing::error!(worker = w.slot, generation = w.generation, reason = %why, "no worker could start: giving up");
        self.no_worker = Some(why);
        self.stop(now, out);
        out.push(Action::Upstream(vec![Upstream::Status(self.status_line())]));
        true
    }

    /// Why no worker could start, once the start limit was hit.
    pub fn no_worker(&self) -> Option<&str> {
        self.no_worker.as_deref()
    }

    /// A worker process exists (starting, ready or leaving).
    pub(super) fn any_worker_running(&self) -> bool {
        self.workers.values().any(|w| w.state.pid().is_some())
    }

    /// What status says while no generation serves and no worker runs.
    pub(super) fn no_worker_status(&self) -> Option<String> {
        if let Some(why) = &self.no_worker {
            return Some(format!("; no worker could start: {why}"));
        }
        if self.serving().is_some() || self.stopping() || self.any_worker_running() {
            return None;
        }
        let last = self.last_start_failure.as_ref()?;
        Some(format!(
            "; no worker running (waiting to restart); last failure: {last}"
        ))
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::super::tests::{all_ready, run, settings};
    use super::super::{Action, Event, ExitStatus, Phase, State};
    use crate::spec::{ReadyMode, StartLimit};

    fn limited(workers: u32) -> State {
        let mut s = settings(workers, ReadyMode::Notify);
        s.start_limit = Some(StartLimit {
            burst: 3,
            interval: Duration::from_secs(10),
        });
        State::new(s)
    }

    /// The worker of slot 0 that runs now exits with status 2; the restart
    /// it schedules is due at the returned instant.
    fn fail(s: &mut State, now: Instant, pid: &mut i32) -> Vec<Action> {
        let p = s
            .workers
            .values()
            .find(|w| w.slot == 0)
            .and_then(|w| w.state.pid())
            .expect("slot 0 runs");
        let status = ExitStatus::Exited(2);
        run(s, Event::Exited { pid: p, status }, now, pid)
    }

    #[test]
    fn gives_up_after_the_burst_within_the_interval() {
        let t0 = Instant::now();
        let mut pid = 100;
        let mut s = limited(1);
        run(&mut s, Event::Start, t0, &mut pid);
        let mut t = t0;
        for n in 1..3 {
            let a = fail(&mut s, t, &mut pid);
            assert!(!a.contains(&Action::Exit), "failure {n}");
            assert!(s.no_worker().is_none());
            // While nothing runs, status says so (not "stalled").
            assert!(
                s.status_line().contains("no worker running"),
                "{}",
                s.status_line()
            );
            t = s.next_deadline().expect("a restart");
            run(&mut s, Event::Tick, t, &mut pid);
        }
        let a = fail(&mut s, t, &mut pid);
        assert!(a.contains(&Action::Exit), "{a:?}");
        assert!(matches!(s.phase, Phase::Stopped { serving: None }));
        let why = s.no_worker().expect("gave up");
        assert!(why.contains("exited with status 2"), "{why}");
        assert!(why.contains("3 failed starts within 10s"), "{why}");
    }

    #[test]
    fn failures_outside_the_interval_do_not_count() {
        let t0 = Instant::now();
        let mut pid = 100;
        let mut s = limited(1);
        run(&mut s, Event::Start, t0, &mut pid);
        let mut t = t0;
        for _ in 0..10 {
            let a = fail(&mut s, t, &mut pid);
            assert!(!a.contains(&Action::Exit));
            t = s.next_deadline().expect("a restart") + Duration::from_secs(6);
            run(&mut s, Event::Tick, t, &mut pid);
        }
        assert!(s.no_worker().is_none());
    }

    #[test]
    fn the_other_workers_drain_and_a_serving_generation_is_never_given_up() {
        let t0 = Instant::now();
        let mut pid = 100;
        let mut s = limited(2);
        run(&mut s, Event::Start, t0, &mut pid);
        let mut t = t0;
        for _ in 0..2 {
            fail(&mut s, t, &mut pid);
            t = s.next_deadline().expect("a restart");
            run(&mut s, Event::Tick, t, &mut pid);
        }
        let a = fail(&mut s, t, &mut pid);
        // Slot 1 (pid 102) runs: it is asked to stop; Exit once it is gone.
        assert!(a.contains(&Action::Signal {
            pid: 102,
            signal: nix::sys::signal::Signal::SIGTERM
        }));
        assert!(!a.contains(&Action::Exit));
        let status = ExitStatus::Exited(0);
        let a = run(&mut s, Event::Exited { pid: 102, status }, t, &mut pid);
        assert!(a.contains(&Action::Exit));
        assert!(s.no_worker().is_some());

        // Serving: failures are restarts, however many.
        let mut s = limited(1);
        run(&mut s, Event::Start, t0, &mut pid);
        all_ready(&mut s, 1, t0, &mut pid);
        let mut t = t0;
        for _ in 0..10 {
            let a = fail(&mut s, t, &mut pid);
            assert!(!a.contains(&Action::Exit));
            t = s.next_deadline().expect("a restart");
            run(&mut s, Event::Tick, t, &mut pid);
        }
        assert!(s.no_worker().is_none());
    }
}
