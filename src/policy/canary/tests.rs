//! The canary's phases, driven without processes.

use super::super::tests::{all_ready, run, settings, stop_signals};
use super::super::*;
use super::CANARY_PROBE_EVERY;
use crate::spec::{Canary, Check, Probe};
use std::time::{Duration, Instant};

const LENGTH: Duration = Duration::from_secs(30);

fn probes(actions: &[Action]) -> Vec<WorkerId> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Probe(order) => Some(order.worker),
            _ => None,
        })
        .collect()
}

fn failure(actions: &[Action]) -> Option<String> {
    actions.iter().find_map(|a| match a {
        Action::Reply {
            waiter: 7,
            result: Err(e),
        } => Some(e.clone()),
        _ => None,
    })
}

/// Steered, two workers, `--canary 10%:30s` (and `probe`): generation 1
/// (pids 101, 102) serving; a reload (waiter 7) whose generation 2 (pids
/// 103, 104) is ready and in its canary.
fn in_canary(t0: Instant, pid: &mut i32, probe: bool) -> State {
    let mut cfg = settings(2, ReadyMode::Notify);
    cfg.steered = true;
    cfg.canary = Some(Canary {
        percent: 10,
        duration: LENGTH,
    });
    if probe {
        let check = Check::Http {
            path: "/healthz".into(),
        };
        cfg.probe = Some(Probe {
            check,
            retry: false,
        });
    }
    let mut s = State::new(cfg);
    run(&mut s, Event::Start, t0, pid);
    let a = all_ready(&mut s, 1, t0, pid);
    // The first generation: no canary (nothing serves to compare).
    let a = match probe {
        true => probes(&a)
            .into_iter()
            .flat_map(|worker| {
                let result = Ok(());
                s.handle(Event::Probed { worker, result }, t0)
            })
            .collect(),
        false => a,
    };
    assert!(a.contains(&Action::Steer {
        generation: Some(1)
    }));
    assert!(s.canary(t0).is_none());
    s.handle(Event::Drained, t0);
    run(&mut s, Event::Reload { waiter: Some(7) }, t0, pid);
    let mut a = all_ready(&mut s, 2, t0, pid);
    if probe {
        let first: Vec<Action> = probes(&a)
            .into_iter()
            .flat_map(|worker| {
                let result = Ok(());
                s.handle(Event::Probed { worker, result }, t0)
            })
            .collect();
        a.extend(first);
    }
    assert!(
        a.contains(&Action::Split {
            generation: 2,
            percent: 10
        }),
        "{a:?}"
    );
    assert!(!a.iter().any(|a| matches!(a, Action::Steer { .. })));
    assert_eq!(failure(&a), None);
    assert!(!a.iter().any(|a| matches!(a, Action::Reply { .. })));
    assert_eq!(stop_signals(&a), Vec::<i32>::new());
    assert_eq!(s.serving(), Some(1));
    s
}

#[test]
fn a_canary_that_passes_serves_then_the_old_generation_drains() {
    let t0 = Instant::now();
    let mut pid = 100;
    let mut s = in_canary(t0, &mut pid, false);
    assert_eq!(s.next_deadline(), Some(t0 + LENGTH));
    let c = s.canary(t0 + Duration::from_secs(18)).unwrap();
    assert_eq!((c.generation, c.percent), (2, 10));
    assert_eq!(c.left, Duration::from_secs(12));
    let status = s.snapshot(t0 + Duration::from_secs(18)).status;
    assert!(
        status.contains("; canary: 10% to generation 2, 12s left"),
        "{status}"
    );
    assert!(!s.quiet(), "no self-upgrade during a canary");
    // Not yet.
    let a = s.handle(Event::Tick, t0 + LENGTH - Duration::from_millis(1));
    assert!(a.is_empty(), "{a:?}");
    let a = s.handle(Event::Tick, t0 + LENGTH);
    assert!(a.contains(&Action::Steer {
        generation: Some(2)
    }));
    assert!(a.contains(&Action::Reply {
        waiter: 7,
        result: Ok(2)
    }));
    assert_eq!(s.serving(), Some(2));
    assert!(s.canary(t0 + LENGTH).is_none());
    assert_eq!(stop_signals(&a), Vec::<i32>::new());
    let a = s.handle(Event::Drained, t0 + LENGTH);
    assert_eq!(stop_signals(&a), vec![101, 102]);
}

#[test]
fn a_worker_exit_in_the_canary_rolls_back_and_the_old_generation_never_stops() {
    let t0 = Instant::now();
    let mut pid = 100;
    let mut s = in_canary(t0, &mut pid, false);
    let at = t0 + Duration::from_secs(3);
    let status = ExitStatus::Exited(3);
    let a = s.handle(Event::Exited { pid: 103, status }, at);
    // Back to the serving generation; the other canary worker serves what
    // is queued for it, then stops.
    assert!(a.contains(&Action::Steer {
        generation: Some(1)
    }));
    assert_eq!(stop_signals(&a), Vec::<i32>::new());
    let e = failure(&a).expect("the reload failed");
    assert!(
        e.starts_with("canary failed: worker 0 (pid 103) of generation 2"),
        "{e}"
    );
    assert_eq!(s.serving(), Some(1));
    assert!(matches!(s.phase(), Phase::Serving { generation: 1 }));
    assert!(s.canary(at).is_none());
    let snap = s.snapshot(at);
    assert!(
        snap.status.contains("last reload failed: canary failed"),
        "{}",
        snap.status
    );
    assert_eq!(snap.counters.reloads_failed, 1);
    // The exited worker is not restarted.
    assert!(!a.iter().any(|a| matches!(a, Action::Spawn { .. })));
    let a = s.handle(Event::Drained, at);
    assert_eq!(stop_signals(&a), vec![104]);
    // The canary's end passes by: nothing.
    let a = s.handle(Event::Tick, t0 + LENGTH);
    assert_eq!(stop_signals(&a), Vec::<i32>::new());
    assert!(!a.iter().any(|a| matches!(a, Action::Steer { .. })));
}

#[test]
fn an_unhealthy_canary_worker_rolls_back_instead_of_being_replaced() {
    let t0 = Instant::now();
    let mut pid = 100;
    let mut s = in_canary(t0, &mut pid, false);
    let worker = s
        .workers
        .values()
        .find(|w| w.state.pid() == Some(104))
        .unwrap()
        .id;
    let a = s.handle(
        Event::FdUsage {
            worker,
            open: 99,
            limit: 100,
        },
        t0,
    );
    // fd_high is off in these settings: nothing.
    assert!(a.is_empty(), "{a:?}");
    let stuck = Duration::from_secs(2);
    let a = s.handle(Event::AcceptBlocked { worker, stuck }, t0);
    assert!(a.contains(&Action::Steer {
        generation: Some(1)
    }));
    assert!(!a.iter().any(|a| matches!(a, Action::Spawn { .. })));
    let e = failure(&a).unwrap();
    assert!(
        e.starts_with("canary failed: worker 1 (pid 104) of generation 2 is unhealthy"),
        "{e}"
    );
    assert_eq!(stop_signals(&s.handle(Event::Drained, t0)), vec![103, 104]);
}

/// The canary's own queue stalls (its share waits for workers that do not
/// accept): rolled back; the serving generation is untouched. Outside a
/// canary the event says nothing.
#[test]
fn a_stalled_canary_queue_rolls_back() {
    let t0 = Instant::now();
    let mut pid = 100;
    let mut s = in_canary(t0, &mut pid, false);
    let stalled = Event::CanaryStalled {
        listener: 0,
        depth: 12,
    };
    let a = s.handle(stalled.clone(), t0);
    assert!(a.contains(&Action::Steer {
        generation: Some(1)
    }));
    assert!(!a.iter().any(|a| matches!(a, Action::Spawn { .. })));
    let e = failure(&a).unwrap();
    assert!(
        e.starts_with(
            "canary failed: its accept queue on socket http stalled (12 connections waiting"
        ),
        "{e}"
    );
    assert_eq!(stop_signals(&a), Vec::<i32>::new());
    assert_eq!(stop_signals(&s.handle(Event::Drained, t0)), vec![103, 104]);
    assert!(s.handle(stalled, t0).is_empty(), "no canary any more");
}

#[test]
fn a_failing_canary_probe_rolls_back_naming_the_answer() {
    let t0 = Instant::now();
    let mut pid = 100;
    let mut s = in_canary(t0, &mut pid, true);
    // The next probe in a second, through a ready worker of generation 2.
    assert_eq!(s.next_deadline(), Some(t0 + CANARY_PROBE_EVERY));
    let at = t0 + CANARY_PROBE_EVERY;
    let w = probes(&s.handle(Event::Tick, at));
    assert_eq!(w.len(), 1);
    assert_eq!(s.worker(w[0]).unwrap().generation(), 2);
    // None more while it is out.
    assert!(probes(&s.handle(Event::Tick, at + CANARY_PROBE_EVERY)).is_empty());
    let a = s.handle(
        Event::Probed {
            worker: w[0],
            result: Ok(()),
        },
        at,
    );
    assert!(a.is_empty(), "{a:?}");
    let at = at + CANARY_PROBE_EVERY;
    assert_eq!(s.next_deadline(), Some(at));
    let w = probes(&s.handle(Event::Tick, at));
    let result = Err("GET /healthz answered 500 Internal Server Error".to_string());
    let a = s.handle(
        Event::Probed {
            worker: w[0],
            result,
        },
        at,
    );
    assert!(a.contains(&Action::Steer {
        generation: Some(1)
    }));
    let e = failure(&a).unwrap();
    assert_eq!(
        e,
        "canary failed: probe of generation 2: GET /healthz answered 500 Internal Server Error"
    );
}

#[test]
fn a_stop_in_the_canary_drains_everything() {
    let t0 = Instant::now();
    let mut pid = 100;
    let mut s = in_canary(t0, &mut pid, false);
    let a = s.handle(Event::Stop, t0);
    assert!(a.contains(&Action::Steer { generation: None }));
    assert_eq!(failure(&a).as_deref(), Some("nogap is stopping"));
    assert!(s.canary(t0).is_none());
    assert_eq!(s.next_deadline(), Some(t0 + HANDOVER_TIMEOUT));
    let a = s.handle(Event::Drained, t0);
    assert_eq!(stop_signals(&a), vec![101, 102, 103, 104]);
    // Its end passes while stopping: nothing is steered again.
    let a = s.handle(Event::Tick, t0 + LENGTH);
    assert!(
        !a.iter().any(|a| matches!(a, Action::Steer { .. })),
        "{a:?}"
    );
}

#[test]
fn a_reload_in_the_canary_waits_for_its_outcome_and_an_old_generation_to_leave() {
    let t0 = Instant::now();
    let mut pid = 100;
    let mut s = in_canary(t0, &mut pid, false);
    let a = run(&mut s, Event::Reload { waiter: Some(8) }, t0, &mut pid);
    assert!(
        !a.iter().any(|a| matches!(a, Action::Spawn { .. })),
        "{a:?}"
    );
    let a = run(&mut s, Event::Tick, t0 + LENGTH, &mut pid);
    assert!(a.contains(&Action::Reply {
        waiter: 7,
        result: Ok(2)
    }));
    // Generation 1 still drains: two are alive, the bound with steering.
    assert!(
        !a.iter().any(|a| matches!(a, Action::Spawn { .. })),
        "{a:?}"
    );
    assert!(s.status_line().contains("reload deferred"));
    run(&mut s, Event::Drained, t0 + LENGTH, &mut pid);
    let mut a = Vec::new();
    for p in [101, 102] {
        let status = ExitStatus::Exited(0);
        a.extend(run(
            &mut s,
            Event::Exited { pid: p, status },
            t0 + LENGTH,
            &mut pid,
        ));
    }
    assert!(
        a.iter()
            .any(|a| matches!(a, Action::Spawn { generation: 3, .. })),
        "{a:?}"
    );
}
