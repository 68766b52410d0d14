//! Policy rules, driven without processes.

use super::*;
use std::time::{Duration, Instant};

fn settings(workers: u32, ready: ReadyMode) -> Settings {
    Settings {
        workers,
        ready,
        start_timeout: Duration::from_secs(5),
        stop: StopPolicy {
            signal: Signal::SIGTERM,
            grace: Duration::from_secs(3),
        },
        backoff: Backoff::default(),
        health: HealthSettings::default(),
        daemonizes: false,
        steered: false,
    }
}

/// Feed Spawned for every Spawn action, with pids from a counter.
fn run(state: &mut State, event: Event, now: Instant, next_pid: &mut i32) -> Vec<Action> {
    let mut all = Vec::new();
    let mut queue = vec![event];
    while let Some(ev) = queue.pop() {
        for a in state.handle(ev, now) {
            if let Action::Spawn { worker, .. } = a {
                *next_pid += 1;
                queue.push(Event::Spawned {
                    worker,
                    pid: *next_pid,
                });
            }
            all.push(a);
        }
    }
    all
}

fn pids_in(state: &State, generation: u64) -> Vec<i32> {
    state
        .workers
        .values()
        .filter(|w| w.generation == generation)
        .filter_map(|w| w.state.pid())
        .collect()
}

#[test]
fn first_generation_ready_then_reload_hands_over() {
    let t0 = Instant::now();
    let mut pid = 100;
    let mut s = State::new(settings(2, ReadyMode::Notify));
    run(&mut s, Event::Start, t0, &mut pid);
    assert_eq!(pids_in(&s, 1), vec![101, 102]);
    let ids: Vec<_> = s.workers.keys().copied().collect();
    ready(&mut s, ids[0], t0, &mut pid);
    assert_eq!(s.serving, None);
    let a = ready(&mut s, ids[1], t0, &mut pid);
    assert_eq!(s.serving, Some(1));
    assert!(a.contains(&Action::Upstream(vec![
        Upstream::Ready,
        Upstream::Status(s.status_line())
    ])));

    let a = run(&mut s, Event::Reload { waiter: Some(7) }, t0, &mut pid);
    assert!(a
        .iter()
        .any(|a| matches!(a, Action::Upstream(u) if u[0] == Upstream::Reloading)));
    assert_eq!(pids_in(&s, 2), vec![103, 104]);
    // Old workers untouched until all new ones are ready.
    let new: Vec<_> = s
        .workers
        .values()
        .filter(|w| w.generation == 2)
        .map(|w| w.id)
        .collect();
    let a = ready(&mut s, new[0], t0, &mut pid);
    assert!(!a.iter().any(|a| matches!(a, Action::Signal { .. })));
    let a = ready(&mut s, new[1], t0, &mut pid);
    assert!(a.contains(&Action::Signal {
        pid: 101,
        signal: Signal::SIGTERM
    }));
    assert!(a.contains(&Action::Signal {
        pid: 102,
        signal: Signal::SIGTERM
    }));
    assert!(a.contains(&Action::Reply {
        waiter: 7,
        result: Ok(2)
    }));
    assert_eq!(s.serving, Some(2));
}

#[test]
fn failed_reload_keeps_old_generation() {
    let t0 = Instant::now();
    let mut pid = 100;
    let mut s = State::new(settings(1, ReadyMode::Notify));
    run(&mut s, Event::Start, t0, &mut pid);
    let id = *s.workers.keys().next().unwrap();
    ready(&mut s, id, t0, &mut pid);
    run(&mut s, Event::Reload { waiter: Some(1) }, t0, &mut pid);
    let a = run(
        &mut s,
        Event::Exited {
            pid: 102,
            status: "exited with status 3".into(),
        },
        t0,
        &mut pid,
    );
    assert!(a.iter().any(
        |a| matches!(a, Action::Reply { waiter: 1, result: Err(r) } if r.contains("status 3"))
    ));
    assert!(!a
        .iter()
        .any(|a| matches!(a, Action::Signal { pid: 101, .. })));
    assert_eq!(s.serving, Some(1));
    assert!(matches!(
        s.last_reload,
        Some(ReloadOutcome::Failed { generation: 2, .. })
    ));
    // Start timeout of a reload fails it too.
    run(&mut s, Event::Reload { waiter: None }, t0, &mut pid);
    let a = run(&mut s, Event::Tick, t0 + Duration::from_secs(6), &mut pid);
    assert!(a.contains(&Action::Signal {
        pid: 103,
        signal: Signal::SIGTERM
    }));
    assert_eq!(s.serving, Some(1));
}

#[test]
fn reloads_during_a_reload_coalesce() {
    let t0 = Instant::now();
    let mut pid = 100;
    let mut s = State::new(settings(1, ReadyMode::Alive(Duration::from_secs(1))));
    run(&mut s, Event::Start, t0, &mut pid);
    run(&mut s, Event::Tick, t0 + Duration::from_secs(1), &mut pid);
    assert_eq!(s.serving, Some(1));
    for _ in 0..50 {
        run(
            &mut s,
            Event::Reload { waiter: None },
            t0 + Duration::from_secs(1),
            &mut pid,
        );
    }
    assert_eq!(s.starting_generation(), Some(2));
    run(&mut s, Event::Tick, t0 + Duration::from_secs(2), &mut pid);
    assert_eq!(s.serving, Some(2));
    assert_eq!(s.starting_generation(), Some(3), "exactly one more");
    run(&mut s, Event::Tick, t0 + Duration::from_secs(3), &mut pid);
    assert_eq!(s.serving, Some(3));
    assert_eq!(s.starting_generation(), None);
}

#[test]
fn crashes_back_off_and_reset() {
    let t0 = Instant::now();
    let mut pid = 100;
    let mut s = State::new(settings(1, ReadyMode::Alive(Duration::ZERO)));
    run(&mut s, Event::Start, t0, &mut pid);
    run(&mut s, Event::Tick, t0, &mut pid);
    assert_eq!(s.serving, Some(1));
    let mut delays = Vec::new();
    for _ in 0..8 {
        let p = pids_in(&s, 1)[0];
        run(
            &mut s,
            Event::Exited {
                pid: p,
                status: "exited with status 3".into(),
            },
            t0,
            &mut pid,
        );
        let until = s.next_deadline().unwrap();
        delays.push(until - t0);
        run(&mut s, Event::Tick, until, &mut pid);
        run(&mut s, Event::Tick, until, &mut pid);
    }
    let ms: Vec<u128> = delays.iter().map(|d| d.as_millis()).collect();
    assert_eq!(ms, vec![0, 100, 200, 400, 800, 1600, 3200, 6400]);
}

#[test]
fn stop_drains_and_exits_when_all_gone() {
    let t0 = Instant::now();
    let mut pid = 100;
    let mut s = State::new(settings(2, ReadyMode::Alive(Duration::ZERO)));
    run(&mut s, Event::Start, t0, &mut pid);
    run(&mut s, Event::Tick, t0, &mut pid);
    let a = run(&mut s, Event::Stop, t0, &mut pid);
    assert!(a.contains(&Action::Signal {
        pid: 101,
        signal: Signal::SIGTERM
    }));
    let a = run(&mut s, Event::Tick, t0 + Duration::from_secs(3), &mut pid);
    assert!(a.contains(&Action::KillGroup { pid: 101 }));
    run(
        &mut s,
        Event::Exited {
            pid: 101,
            status: "killed by signal SIGKILL".into(),
        },
        t0,
        &mut pid,
    );
    let a = run(
        &mut s,
        Event::Exited {
            pid: 102,
            status: "exited with status 0".into(),
        },
        t0,
        &mut pid,
    );
    assert_eq!(a.last(), Some(&Action::Exit));
    assert!(s.workers.is_empty());
}

#[test]
fn first_generation_failure_retries() {
    let t0 = Instant::now();
    let mut pid = 100;
    let mut s = State::new(settings(1, ReadyMode::Notify));
    run(&mut s, Event::Start, t0, &mut pid);
    run(
        &mut s,
        Event::Exited {
            pid: 101,
            status: "exited with status 1".into(),
        },
        t0,
        &mut pid,
    );
    assert_eq!(s.workers.len(), 1, "a replacement waits");
    assert_eq!(s.starting_generation(), Some(1));
}

#[test]
fn daemonized_worker_is_followed() {
    let t0 = Instant::now();
    let mut pid = 100;
    let mut s = State::new(settings(1, ReadyMode::Notify));
    run(&mut s, Event::Start, t0, &mut pid);
    let id = *s.workers.keys().next().unwrap();
    // The first process (101) daemonized; 555 is the server now.
    let out = s.handle(
        Event::MainPid {
            worker: id,
            pid: 555,
        },
        t0,
    );
    assert!(out.is_empty(), "{out:?}");
    assert_eq!(pids_in(&s, 1), vec![555]);
    ready(&mut s, id, t0, &mut pid);
    assert_eq!(s.serving, Some(1));
    // Stopping signals the daemon; its exit ends nogap.
    let out = s.handle(Event::Stop, t0);
    assert!(out.contains(&Action::Signal {
        pid: 555,
        signal: Signal::SIGTERM
    }));
    let out = s.handle(
        Event::Exited {
            pid: 555,
            status: "exited with status 0".into(),
        },
        t0,
    );
    assert!(out.contains(&Action::Exit), "{out:?}");
}

#[test]
fn a_daemonizing_worker_is_ready_only_once_followed() {
    let t0 = Instant::now();
    let s_ = |ms: u64| t0 + Duration::from_millis(ms);
    let mut pid = 100;
    let mut settings = settings(1, ReadyMode::Alive(Duration::from_millis(300)));
    settings.daemonizes = true;
    let mut s = State::new(settings);
    run(&mut s, Event::Start, t0, &mut pid);
    let id = *s.workers.keys().next().unwrap();
    // The alive time passes while nogap waits for the pid file.
    run(&mut s, Event::Tick, s_(400), &mut pid);
    assert_eq!(s.serving, None);
    run(
        &mut s,
        Event::MainPid {
            worker: id,
            pid: 555,
        },
        s_(500),
        &mut pid,
    );
    run(&mut s, Event::Tick, s_(700), &mut pid);
    assert_eq!(s.serving, None, "alive time counts from the daemon");
    run(&mut s, Event::Tick, s_(800), &mut pid);
    assert_eq!(s.serving, Some(1));
    assert_eq!(pids_in(&s, 1), vec![555]);
}

#[test]
fn stop_before_the_daemon_is_known_reaches_it() {
    let t0 = Instant::now();
    let mut pid = 100;
    let mut s = State::new(settings(1, ReadyMode::Notify));
    run(&mut s, Event::Start, t0, &mut pid);
    let id = *s.workers.keys().next().unwrap();
    s.handle(Event::Stop, t0);
    let out = s.handle(
        Event::MainPid {
            worker: id,
            pid: 777,
        },
        t0,
    );
    assert_eq!(
        out,
        vec![Action::Signal {
            pid: 777,
            signal: Signal::SIGTERM
        }]
    );
    // Unknown workers are ignored.
    assert!(s
        .handle(
            Event::MainPid {
                worker: 999,
                pid: 1
            },
            t0
        )
        .is_empty());
}

#[test]
fn workers_found_unhealthy_during_a_replacement_are_replaced_after_it() {
    let t0 = Instant::now();
    let mut pid = 100;
    let mut cfg = settings(2, ReadyMode::Notify);
    cfg.health.worker_watchdog = Some(Duration::from_secs(1));
    let mut s = State::new(cfg);
    run(&mut s, Event::Start, t0, &mut pid);
    let starting_ready = |s: &mut State, pid: &mut i32, now| {
        let starting: Vec<WorkerId> = s
            .workers
            .values()
            .filter(|w| matches!(w.state, WorkerState::Starting { .. }))
            .map(|w| w.id)
            .collect();
        let mut out = Vec::new();
        for worker in starting {
            out.extend(ready(s, worker, now, pid));
        }
        out
    };
    starting_ready(&mut s, &mut pid, t0);
    assert_eq!(s.serving, Some(1));
    let (a, b) = (101, 102);
    // Neither pings: both miss the watchdog at once; one is replaced now.
    let t1 = t0 + Duration::from_secs(1);
    let out = run(&mut s, Event::Tick, t1, &mut pid);
    let spawns = out
        .iter()
        .filter(|a| matches!(a, Action::Spawn { .. }))
        .count();
    assert_eq!(spawns, 1, "one replacement at a time: {out:?}");
    // Its replacement is ready: the first drains, the second is replaced.
    let out = starting_ready(&mut s, &mut pid, t1);
    assert!(
        out.contains(&Action::Signal {
            pid: a,
            signal: Signal::SIGTERM
        }),
        "{out:?}"
    );
    assert!(
        out.iter()
            .any(|a| matches!(a, Action::Spawn { slot: 1, .. })),
        "{out:?}"
    );
    let out = starting_ready(&mut s, &mut pid, t1);
    assert!(
        out.contains(&Action::Signal {
            pid: b,
            signal: Signal::SIGTERM
        }),
        "{out:?}"
    );
    assert!(s.healthy());
}

#[test]
fn a_watchdog_give_up_ends_once_the_window_frees_a_replacement() {
    let t0 = Instant::now();
    let s_ = |secs: u64| t0 + Duration::from_secs(secs);
    let mut pid = 100;
    let mut settings = settings(1, ReadyMode::Alive(Duration::ZERO));
    settings.health = HealthSettings {
        worker_watchdog: Some(Duration::from_secs(1)),
        max_replacements: 1,
        window: Duration::from_secs(10),
    };
    let mut s = State::new(settings);
    run(&mut s, Event::Start, t0, &mut pid);
    run(&mut s, Event::Tick, t0, &mut pid);
    assert_eq!(s.serving, Some(1));
    // Silent for 1s: replaced (the budget of 1 is used).
    run(&mut s, Event::Tick, s_(1), &mut pid);
    run(&mut s, Event::Tick, s_(1), &mut pid);
    assert!(s.healthy());
    // The replacement is silent too: no budget left, nogap gives up.
    run(&mut s, Event::Tick, s_(2), &mut pid);
    assert!(!s.healthy(), "gave up");
    // The retry is scheduled for when the window frees the budget; until then
    // nothing happens, and there is no busy deadline in the past.
    let d = s.next_deadline().unwrap();
    assert!(d > s_(2), "a future deadline, got {:?}", d - t0);
    run(&mut s, Event::Tick, s_(11), &mut pid);
    run(&mut s, Event::Tick, s_(11), &mut pid);
    assert!(
        s.healthy(),
        "the unhealthy worker was replaced: no longer given up"
    );
    assert!(s.next_deadline().unwrap() > s_(11));
}

#[test]
fn a_reaped_worker_gets_only_its_group_killed_never_its_pid() {
    let t0 = Instant::now();
    let mut pid = 100;
    let mut s = State::new(settings(1, ReadyMode::Alive(Duration::ZERO)));
    run(&mut s, Event::Start, t0, &mut pid);
    run(&mut s, Event::Tick, t0, &mut pid);
    let a = run(
        &mut s,
        Event::Exited {
            pid: 101,
            status: "exited with status 3".into(),
        },
        t0,
        &mut pid,
    );
    assert!(a.contains(&Action::KillOrphans { pgid: 101 }));
    assert!(
        !a.contains(&Action::KillGroup { pid: 101 }),
        "the reaped pid may be reused"
    );
}

/// READY=1 from one worker.
fn ready(s: &mut State, worker: WorkerId, now: Instant, pid: &mut i32) -> Vec<Action> {
    let messages = vec![Message::Ready];
    run(s, Event::Notify { worker, messages }, now, pid)
}

/// READY=1 from every worker of `generation`.
fn all_ready(s: &mut State, generation: u64, now: Instant, pid: &mut i32) -> Vec<Action> {
    let ids: Vec<_> = s
        .workers
        .values()
        .filter(|w| w.generation == generation)
        .map(|w| w.id)
        .collect();
    let mut out = Vec::new();
    for worker in ids {
        out.extend(ready(s, worker, now, pid));
    }
    out
}

fn stop_signals(actions: &[Action]) -> Vec<i32> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Signal { pid, .. } => Some(*pid),
            _ => None,
        })
        .collect()
}

#[test]
fn steered_reload_stops_the_old_generation_only_once_drained() {
    let t0 = Instant::now();
    let mut pid = 100;
    let mut settings = settings(2, ReadyMode::Notify);
    settings.steered = true;
    let mut s = State::new(settings);
    run(&mut s, Event::Start, t0, &mut pid);
    let a = all_ready(&mut s, 1, t0, &mut pid);
    assert!(a.contains(&Action::Steer {
        generation: Some(1)
    }));
    run(&mut s, Event::Reload { waiter: Some(7) }, t0, &mut pid);
    let a = all_ready(&mut s, 2, t0, &mut pid);
    // Steered to generation 2 and the reload answered; generation 1 serves
    // what is queued for it: no stop signal yet.
    assert!(a.contains(&Action::Steer {
        generation: Some(2)
    }));
    assert!(a.contains(&Action::Reply {
        waiter: 7,
        result: Ok(2)
    }));
    assert_eq!(stop_signals(&a), Vec::<i32>::new());
    assert_eq!(s.next_deadline(), Some(t0 + HANDOVER_TIMEOUT));
    let a = s.handle(Event::Drained, t0);
    assert_eq!(stop_signals(&a), vec![101, 102]);
    // A second Drained does nothing.
    assert!(s.handle(Event::Drained, t0).is_empty());
}

/// Steered, one worker, generation 1 (pid 101) serving.
fn steered_one_worker_serving(t0: Instant, pid: &mut i32) -> State {
    let mut settings = settings(1, ReadyMode::Notify);
    settings.steered = true;
    let mut s = State::new(settings);
    run(&mut s, Event::Start, t0, pid);
    all_ready(&mut s, 1, t0, pid);
    s.handle(Event::Drained, t0);
    s
}

#[test]
fn steered_handover_times_out() {
    let t0 = Instant::now();
    let mut pid = 100;
    let mut s = steered_one_worker_serving(t0, &mut pid);
    run(&mut s, Event::Reload { waiter: None }, t0, &mut pid);
    all_ready(&mut s, 2, t0, &mut pid);
    let early = t0 + HANDOVER_TIMEOUT - Duration::from_millis(1);
    assert_eq!(
        stop_signals(&s.handle(Event::Tick, early)),
        Vec::<i32>::new()
    );
    let a = s.handle(Event::Tick, t0 + HANDOVER_TIMEOUT);
    assert_eq!(stop_signals(&a), vec![101]);
}

#[test]
fn steered_stop_drains_serving_workers_first_and_stops_the_rest_now() {
    let t0 = Instant::now();
    let mut pid = 100;
    let mut s = steered_one_worker_serving(t0, &mut pid);
    // A reload under way: its worker (102) is not ready yet.
    run(&mut s, Event::Reload { waiter: None }, t0, &mut pid);
    let a = s.handle(Event::Stop, t0);
    assert!(a.contains(&Action::Steer { generation: None }));
    assert_eq!(stop_signals(&a), vec![102]);
    let a = s.handle(Event::Drained, t0);
    assert_eq!(stop_signals(&a), vec![101]);
    // No health replacement while stopping.
    let a = s.handle(
        Event::QueueStalled {
            socket: "http".into(),
            depth: 3,
            slot: None,
        },
        t0,
    );
    assert!(!a.iter().any(|a| matches!(a, Action::Spawn { .. })));
    s.handle(
        Event::Exited {
            pid: 101,
            status: "exited with status 0".into(),
        },
        t0,
    );
    let a = s.handle(
        Event::Exited {
            pid: 102,
            status: "exited with status 0".into(),
        },
        t0,
    );
    assert!(a.contains(&Action::Exit));
}
