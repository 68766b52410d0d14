//! Policy rules, driven without processes.

use super::*;
use std::time::{Duration, Instant};

pub(super) fn settings(workers: u32, ready: ReadyMode) -> Settings {
    Settings {
        workers,
        ready,
        start_timeout: Duration::from_secs(5),
        start_limit: None,
        stop: StopPolicy {
            signal: Signal::SIGTERM,
            grace: Duration::from_secs(3),
        },
        backoff: Backoff::default(),
        health: HealthSettings::default(),
        daemonizes: false,
        steered: false,
        sockets: vec!["http".into()],
        listeners: vec![0],
        probe: None,
        canary: None,
    }
}

/// Feed Spawned for every Spawn action, with pids from a counter.
pub(super) fn run(
    state: &mut State,
    event: Event,
    now: Instant,
    next_pid: &mut i32,
) -> Vec<Action> {
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
    assert_eq!(s.serving(), None);
    let a = ready(&mut s, ids[1], t0, &mut pid);
    assert_eq!(s.serving(), Some(1));
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
    assert_eq!(s.serving(), Some(2));
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
            status: ExitStatus::Exited(3),
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
    assert_eq!(s.serving(), Some(1));
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
    assert_eq!(s.serving(), Some(1));
}

#[test]
fn reloads_during_a_reload_coalesce() {
    let t0 = Instant::now();
    let mut pid = 100;
    let mut s = State::new(settings(1, ReadyMode::Alive(Duration::from_secs(1))));
    run(&mut s, Event::Start, t0, &mut pid);
    run(&mut s, Event::Tick, t0 + Duration::from_secs(1), &mut pid);
    assert_eq!(s.serving(), Some(1));
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
    assert_eq!(s.serving(), Some(2));
    assert_eq!(s.starting_generation(), Some(3), "exactly one more");
    run(&mut s, Event::Tick, t0 + Duration::from_secs(3), &mut pid);
    assert_eq!(s.serving(), Some(3));
    assert_eq!(s.starting_generation(), None);
}

#[test]
fn crashes_back_off_and_reset() {
    let t0 = Instant::now();
    let mut pid = 100;
    let mut s = State::new(settings(1, ReadyMode::Alive(Duration::ZERO)));
    run(&mut s, Event::Start, t0, &mut pid);
    run(&mut s, Event::Tick, t0, &mut pid);
    assert_eq!(s.serving(), Some(1));
    let mut delays = Vec::new();
    for _ in 0..8 {
        let p = pids_in(&s, 1)[0];
        run(
            &mut s,
            Event::Exited {
                pid: p,
                status: ExitStatus::Exited(3),
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
            status: ExitStatus::Signaled(Signal::SIGKILL),
        },
        t0,
        &mut pid,
    );
    let a = run(
        &mut s,
        Event::Exited {
            pid: 102,
            status: ExitStatus::Exited(0),
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
            status: ExitStatus::Exited(1),
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
    assert_eq!(s.serving(), Some(1));
    // Stopping signals the daemon; its exit ends nogap.
    let out = s.handle(Event::Stop, t0);
    assert!(out.contains(&Action::Signal {
        pid: 555,
        signal: Signal::SIGTERM
    }));
    let out = s.handle(
        Event::Exited {
            pid: 555,
            status: ExitStatus::Exited(0),
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
    assert_eq!(s.serving(), None);
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
    assert_eq!(s.serving(), None, "alive time counts from the daemon");
    run(&mut s, Event::Tick, s_(800), &mut pid);
    assert_eq!(s.serving(), Some(1));
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
    assert_eq!(s.serving(), Some(1));
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
        ..HealthSettings::default()
    };
    let mut s = State::new(settings);
    run(&mut s, Event::Start, t0, &mut pid);
    run(&mut s, Event::Tick, t0, &mut pid);
    assert_eq!(s.serving(), Some(1));
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
            status: ExitStatus::Exited(3),
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
pub(super) fn ready(s: &mut State, worker: WorkerId, now: Instant, pid: &mut i32) -> Vec<Action> {
    let messages = vec![Message::Ready];
    let from = s
        .worker(worker)
        .and_then(|w| w.state.pid())
        .map(|pid| Sender {
            pid,
            pgid: Some(pid),
        });
    run(
        s,
        Event::Notify {
            worker,
            from,
            messages,
        },
        now,
        pid,
    )
}

/// READY=1 from every worker of `generation`.
pub(super) fn all_ready(
    s: &mut State,
    generation: u64,
    now: Instant,
    pid: &mut i32,
) -> Vec<Action> {
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

pub(super) fn stop_signals(actions: &[Action]) -> Vec<i32> {
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
            queue: QueueId {
                listener: 0,
                slot: None,
            },
            depth: 3,
            busy: false,
        },
        t0,
    );
    assert!(!a.iter().any(|a| matches!(a, Action::Spawn { .. })));
    s.handle(
        Event::Exited {
            pid: 101,
            status: ExitStatus::Exited(0),
        },
        t0,
    );
    let a = s.handle(
        Event::Exited {
            pid: 102,
            status: ExitStatus::Exited(0),
        },
        t0,
    );
    assert!(a.contains(&Action::Exit));
}

/// One worker, generation 1 (pid 101) serving, alive-ready.
fn one_serving(settings: Settings, t0: Instant, pid: &mut i32) -> State {
    let mut s = State::new(settings);
    run(&mut s, Event::Start, t0, pid);
    run(&mut s, Event::Tick, t0, pid);
    assert_eq!(s.serving(), Some(1));
    s
}

const HTTP: QueueId = QueueId {
    listener: 0,
    slot: None,
};

#[test]
fn the_watchdog_is_pinged_unless_it_follows_health_and_nogap_gave_up() {
    let t0 = Instant::now();
    let mut pid = 100;
    let mut cfg = settings(1, ReadyMode::Alive(Duration::ZERO));
    cfg.health.max_replacements = 0;
    let mut s = one_serving(cfg.clone(), t0, &mut pid);
    assert_eq!(s.handle(Event::WatchdogDue, t0), vec![Action::PingWatchdog]);
    // No replacement budget: a stall makes nogap give up; it still pings.
    s.handle(
        Event::QueueStalled {
            queue: HTTP,
            depth: 2,
            busy: false,
        },
        t0,
    );
    assert!(!s.healthy());
    assert_eq!(s.handle(Event::WatchdogDue, t0), vec![Action::PingWatchdog]);

    cfg.health.watchdog_follows_health = true;
    let mut s = one_serving(cfg, t0, &mut pid);
    assert_eq!(s.handle(Event::WatchdogDue, t0), vec![Action::PingWatchdog]);
    s.handle(
        Event::QueueStalled {
            queue: HTTP,
            depth: 2,
            busy: false,
        },
        t0,
    );
    assert!(s.handle(Event::WatchdogDue, t0).is_empty());
}

#[test]
fn a_worker_at_its_fd_threshold_is_replaced_once() {
    let t0 = Instant::now();
    let mut pid = 100;
    let mut cfg = settings(1, ReadyMode::Alive(Duration::ZERO));
    cfg.health.fd_high = Some(80);
    let mut s = one_serving(cfg.clone(), t0, &mut pid);
    let id = *s.workers.keys().next().unwrap();
    let usage = |open| Event::FdUsage {
        worker: id,
        open,
        limit: 1000,
    };
    assert!(run(&mut s, usage(799), t0, &mut pid).is_empty());
    let a = run(&mut s, usage(800), t0, &mut pid);
    assert!(
        a.iter().any(|a| matches!(a, Action::Spawn { slot: 0, .. })),
        "{a:?}"
    );
    assert_eq!(
        s.workers[&id].unhealthy(),
        Some(&UnhealthyReason::Descriptors {
            open: 800,
            limit: 1000,
            pct: 80
        })
    );
    // Being replaced: not judged again.
    assert!(run(&mut s, usage(1000), t0, &mut pid).is_empty());
    // A limit of 0 (unknown) or the check off: never unhealthy.
    let mut s = one_serving(cfg.clone(), t0, &mut pid);
    let id = *s.workers.keys().next().unwrap();
    let zero = Event::FdUsage {
        worker: id,
        open: 5,
        limit: 0,
    };
    assert!(run(&mut s, zero, t0, &mut pid).is_empty());
    cfg.health.fd_high = None;
    let mut s = one_serving(cfg, t0, &mut pid);
    let id = *s.workers.keys().next().unwrap();
    let full = Event::FdUsage {
        worker: id,
        open: 1000,
        limit: 1000,
    };
    assert!(run(&mut s, full, t0, &mut pid).is_empty());
}

fn shares(actions: &[Action]) -> Vec<Vec<usize>> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Spawn { share_serving, .. } => Some(share_serving.clone()),
            _ => None,
        })
        .collect()
}

#[test]
fn a_new_worker_shares_the_stalled_serving_socket_when_steered() {
    let t0 = Instant::now();
    let mut pid = 100;
    let mut s = steered_one_worker_serving(t0, &mut pid);
    let a = run(&mut s, Event::Reload { waiter: None }, t0, &mut pid);
    assert_eq!(shares(&a), vec![Vec::<usize>::new()]);
    all_ready(&mut s, 2, t0, &mut pid);
    s.handle(Event::Drained, t0);
    // The serving socket stalls: the health replacement shares it.
    let a = run(
        &mut s,
        Event::QueueStalled {
            queue: HTTP,
            depth: 4,
            busy: false,
        },
        t0,
        &mut pid,
    );
    assert_eq!(shares(&a), vec![vec![0]]);
    // A slot's own queue (per-worker sockets) is not a serving socket.
    let mut s = steered_one_worker_serving(t0, &mut pid);
    let own = QueueId {
        listener: 0,
        slot: Some(0),
    };
    s.handle(
        Event::QueueStalled {
            queue: own,
            depth: 4,
            busy: false,
        },
        t0,
    );
    let a = run(&mut s, Event::Reload { waiter: None }, t0, &mut pid);
    assert_eq!(shares(&a), vec![Vec::<usize>::new()]);
    // Without steering, never.
    let mut s = one_serving(settings(1, ReadyMode::Alive(Duration::ZERO)), t0, &mut pid);
    let a = run(
        &mut s,
        Event::QueueStalled {
            queue: HTTP,
            depth: 4,
            busy: false,
        },
        t0,
        &mut pid,
    );
    assert_eq!(shares(&a), vec![Vec::<usize>::new()]);
}

#[test]
fn a_daemonizing_workers_first_exit_0_is_followed_once() {
    let t0 = Instant::now();
    let mut pid = 100;
    let mut cfg = settings(1, ReadyMode::Notify);
    cfg.daemonizes = true;
    let mut s = State::new(cfg);
    run(&mut s, Event::Start, t0, &mut pid);
    let id = *s.workers.keys().next().unwrap();
    let exit0 = |pid| Event::Exited {
        pid,
        status: ExitStatus::Exited(0),
    };
    let a = s.handle(exit0(101), t0);
    assert_eq!(
        a,
        vec![Action::FollowDaemon {
            worker: id,
            pid: 101
        }]
    );
    assert_eq!(pids_in(&s, 1), vec![101], "still the worker's pid");
    s.handle(
        Event::MainPid {
            worker: id,
            pid: 555,
        },
        t0,
    );
    ready(&mut s, id, t0, &mut pid);
    // The daemon's own exit is an exit: the slot restarts.
    let a = s.handle(exit0(555), t0);
    assert!(a.contains(&Action::Forget { worker: id }), "{a:?}");
    // A daemon that cannot be followed fails its worker (the late exit).
    let id = *s.workers.keys().next().unwrap();
    run(&mut s, Event::Tick, t0, &mut pid);
    let first = pids_in(&s, 1)[0];
    assert_eq!(
        s.handle(exit0(first), t0),
        vec![Action::FollowDaemon {
            worker: id,
            pid: first
        }]
    );
    let late = Event::Exited {
        pid: first,
        status: ExitStatus::DaemonNoPid {
            pidfile: "/run/x.pid".into(),
            within: Duration::from_secs(5),
        },
    };
    let a = s.handle(late, t0);
    assert!(a.contains(&Action::Forget { worker: id }), "{a:?}");
    // Without --pidfile, an exit 0 is an exit.
    let mut s = one_serving(settings(1, ReadyMode::Alive(Duration::ZERO)), t0, &mut pid);
    let p = pids_in(&s, 1)[0];
    assert!(s
        .handle(exit0(p), t0)
        .contains(&Action::KillOrphans { pgid: p }));
}

#[test]
fn typed_event_data_reads_as_before() {
    assert_eq!(ExitStatus::Exited(3).to_string(), "exited with status 3");
    assert_eq!(
        ExitStatus::Signaled(Signal::SIGKILL).to_string(),
        "was killed by signal SIGKILL"
    );
    let pidfile: std::path::PathBuf = "/run/d.pid".into();
    let within = Duration::from_secs(5);
    assert_eq!(
        ExitStatus::DaemonNotRunning {
            pid: 7,
            pidfile: pidfile.clone()
        }
        .to_string(),
        "exited with status 0, and pid 7 in /run/d.pid is not running"
    );
    assert_eq!(
        ExitStatus::DaemonNoPid {
            pidfile: pidfile.clone(),
            within
        }
        .to_string(),
        "exited with status 0 and wrote no pid to /run/d.pid within 5s"
    );
    assert_eq!(
        ExitStatus::DaemonNotOurs {
            pid: 7,
            pidfile,
            within
        }
        .to_string(),
        "exited with status 0 and named pid 7 in /run/d.pid, not a child of nogap within 5s"
    );
    let stalled = UnhealthyReason::Stalled {
        socket: "http/1".into(),
        depth: 3,
    };
    assert_eq!(
        stalled.to_string(),
        "accept queue of 'http/1' stalled with 3 waiting"
    );
    let silent = UnhealthyReason::NoWatchdogPing {
        period: Duration::from_secs(2),
    };
    assert_eq!(silent.to_string(), "no WATCHDOG=1 for 2s");
    let fds = UnhealthyReason::Descriptors {
        open: 9,
        limit: 10,
        pct: 90,
    };
    assert_eq!(
        fds.to_string(),
        "9 of 10 file descriptors open (--fd-high 90%)"
    );
    assert_eq!(serde_json::to_value(&fds).unwrap(), fds.to_string());
}

#[test]
fn the_snapshot_shows_phase_workers_and_queues() {
    let t0 = Instant::now();
    let mut pid = 100;
    let mut cfg = settings(2, ReadyMode::Notify);
    cfg.sockets = vec!["http".into(), "admin".into()];
    cfg.listeners = vec![0, 1];
    let mut s = State::new(cfg);
    run(&mut s, Event::Start, t0, &mut pid);
    let snap = s.snapshot(t0);
    assert_eq!((snap.phase, snap.generation), ("starting", None));
    all_ready(&mut s, 1, t0, &mut pid);
    run(&mut s, Event::Reload { waiter: None }, t0, &mut pid);
    let own = QueueId {
        listener: 1,
        slot: Some(1),
    };
    s.handle(
        Event::QueueStalled {
            queue: own,
            depth: 2,
            busy: false,
        },
        t0,
    );
    let later = t0 + Duration::from_secs(3);
    let snap = s.snapshot(later);
    assert_eq!(snap.phase, "reloading");
    assert_eq!((snap.generation, snap.reloading), (Some(1), Some(2)));
    assert!(!snap.stopping && snap.healthy);
    assert_eq!(
        snap.status,
        "generation 1: 2/2 workers ready; reloading to generation 2; accept queue stalled: admin/1"
    );
    assert_eq!(snap.workers.len(), 4);
    let w = &snap.workers[0];
    assert_eq!(
        (w.slot, w.generation, w.pid, w.state),
        (0, 1, Some(101), "ready")
    );
    assert_eq!(w.ready_for, Some(Duration::from_secs(3)));
    assert_eq!(snap.workers[2].state, "starting");
    assert!(snap.stalled(1) && !snap.stalled(0));
    assert_eq!((snap.stalls(1), snap.stalls(0)), (1, 0));
    assert_eq!(snap.queues[0].name, "admin/1");
    s.handle(Event::Stop, t0);
    let snap = s.snapshot(t0);
    assert_eq!(
        (snap.phase, snap.stopping, snap.generation),
        ("stopping", true, Some(1))
    );
}

#[test]
fn a_deploy_gives_the_new_generation_its_settings_and_the_old_keeps_its_own() {
    let t0 = Instant::now();
    let mut pid = 100;
    let mut s = State::new(settings(2, ReadyMode::Notify));
    run(&mut s, Event::Start, t0, &mut pid);
    let ids: Vec<_> = s.workers.keys().copied().collect();
    for id in ids {
        ready(&mut s, id, t0, &mut pid);
    }
    let mut new = settings(3, ReadyMode::Notify);
    new.stop.signal = Signal::SIGQUIT;
    let deploy = Event::Deploy {
        waiter: Some(4),
        settings: Box::new(new),
    };
    run(&mut s, deploy, t0, &mut pid);
    assert_eq!(pids_in(&s, 2), vec![103, 104, 105], "3 workers now");
    let new: Vec<_> = s
        .workers
        .values()
        .filter(|w| w.generation == 2)
        .map(|w| w.id)
        .collect();
    let mut a = Vec::new();
    for id in new {
        a = ready(&mut s, id, t0, &mut pid);
    }
    assert!(a.contains(&Action::Reply {
        waiter: 4,
        result: Ok(2)
    }));
    // The old generation leaves with its own stop signal.
    assert!(a.contains(&Action::Signal {
        pid: 101,
        signal: Signal::SIGTERM
    }));
    assert!(s
        .status_line()
        .starts_with("generation 2: 3/3 workers ready"));
    // Gone, its settings go too; the new generation stops with its own.
    for pid in [101, 102] {
        let status = ExitStatus::Exited(0);
        run(&mut s, Event::Exited { pid, status }, t0, &mut 200);
    }
    assert_eq!(s.generations.keys().copied().collect::<Vec<_>>(), vec![2]);
    let a = run(&mut s, Event::Stop, t0, &mut pid);
    assert!(a.contains(&Action::Signal {
        pid: 103,
        signal: Signal::SIGQUIT
    }));
}

#[test]
fn a_rejected_reload_starts_nothing_and_says_why() {
    let t0 = Instant::now();
    let mut pid = 100;
    let mut s = State::new(settings(1, ReadyMode::Notify));
    run(&mut s, Event::Start, t0, &mut pid);
    let id = *s.workers.keys().next().unwrap();
    ready(&mut s, id, t0, &mut pid);
    let reason = "app.toml:3: unknown key 'wrokers'".to_string();
    let rejected = Event::ReloadRejected {
        waiter: Some(9),
        reason: reason.clone(),
    };
    let a = run(&mut s, rejected, t0, &mut pid);
    assert!(a.contains(&Action::Reply {
        waiter: 9,
        result: Err(reason.clone())
    }));
    assert!(!a
        .iter()
        .any(|a| matches!(a, Action::Spawn { .. } | Action::Signal { .. })));
    assert_eq!(s.phase, Phase::Serving { generation: 1 });
    let status = s.status_line();
    assert!(
        status.ends_with(&format!("last reload failed: {reason}")),
        "{status}"
    );
    assert!(a.contains(&Action::Upstream(vec![Upstream::Status(status)])));
    // The next reload starts generation 2 as usual.
    run(&mut s, Event::Reload { waiter: None }, t0, &mut pid);
    assert_eq!(pids_in(&s, 2), vec![102]);
}

#[test]
fn counters_and_recent_events_follow_reloads_restarts_and_replacements() {
    let t0 = Instant::now();
    let sec = |n| t0 + Duration::from_secs(n);
    let mut pid = 100;
    let mut s = one_serving(settings(1, ReadyMode::Alive(Duration::ZERO)), t0, &mut pid);
    let snap = s.snapshot(t0);
    assert_eq!(snap.counters, Counters::default());
    assert!(snap.events.is_empty(), "the first start is no reload");

    // A reload that serves after 2 s.
    run(&mut s, Event::Reload { waiter: None }, t0, &mut pid);
    run(&mut s, Event::Tick, sec(2), &mut pid);
    assert_eq!(s.serving(), Some(2));
    // One that fails after 3 s, with the worker's last lines.
    run(&mut s, Event::Reload { waiter: Some(9) }, sec(10), &mut pid);
    let failing = s.workers.values().find(|w| w.generation == 3).unwrap().id;
    let lines = vec!["starting".to_string(), "bind: bad config".to_string()];
    s.handle(
        Event::Output {
            worker: failing,
            lines: lines.clone(),
        },
        sec(13),
    );
    let failing_pid = s.workers[&failing].state.pid().unwrap();
    let a = run(
        &mut s,
        Event::Exited {
            pid: failing_pid,
            status: ExitStatus::Exited(1),
        },
        sec(13),
        &mut pid,
    );
    let answer = a
        .iter()
        .find_map(|a| match a {
            Action::Reply { waiter: 9, result } => Some(result.clone()),
            _ => None,
        })
        .expect("a reply");
    let answer = answer.unwrap_err();
    assert!(answer.contains("status 1"), "{answer}");
    assert!(
        answer.ends_with("its last output:\n  starting\n  bind: bad config"),
        "{answer}"
    );
    assert!(
        s.status_line()
            .contains("its last output: bind: bad config"),
        "{}",
        s.status_line()
    );
    assert!(
        matches!(&s.last_reload, Some(ReloadOutcome::Failed { output, .. }) if *output == lines)
    );

    // The serving worker crashes: a restart.
    let serving_pid = pids_in(&s, 2)[0];
    run(
        &mut s,
        Event::Exited {
            pid: serving_pid,
            status: ExitStatus::Signaled(Signal::SIGSEGV),
        },
        sec(20),
        &mut pid,
    );
    run(&mut s, Event::Tick, sec(20), &mut pid);
    run(&mut s, Event::Tick, sec(21), &mut pid);
    assert!(s.workers.values().any(|w| w.state.is_ready()));
    // Its queue stalls: a replacement.
    run(
        &mut s,
        Event::QueueStalled {
            queue: HTTP,
            depth: 4,
            busy: false,
        },
        sec(30),
        &mut pid,
    );

    let snap = s.snapshot(sec(40));
    let c = &snap.counters;
    assert_eq!((c.reloads_ok, c.reloads_failed, c.restarts), (1, 1, 1));
    assert_eq!(c.replacements.get("stall"), Some(&1));
    assert_eq!(c.reload_seconds.count, 2);
    assert!((c.reload_seconds.sum - 5.0).abs() < 1e-9);
    let kinds: Vec<EventKind> = snap.events.iter().map(|e| e.kind).collect();
    assert_eq!(
        kinds,
        vec![
            EventKind::Reload,
            EventKind::ReloadFailed,
            EventKind::Restart,
            EventKind::Replacement
        ]
    );
    assert_eq!(snap.events[0].ago, Duration::from_secs(38));
    assert!(
        snap.events[0].reason.contains("took 2s"),
        "{:?}",
        snap.events[0]
    );
    assert!(
        snap.events[2].reason.contains("SIGSEGV"),
        "{:?}",
        snap.events[2]
    );
    assert_eq!(snap.events[3].worker, Some(0));
    assert!(
        snap.events[3].reason.contains("stalled"),
        "{:?}",
        snap.events[3]
    );
}

/// Messages to `worker` from `from`.
fn notify_from(s: &mut State, worker: WorkerId, from: Option<Sender>, m: Message, now: Instant) {
    s.handle(
        Event::Notify {
            worker,
            from,
            messages: vec![m],
        },
        now,
    );
}

#[test]
fn only_the_worker_or_its_group_may_notify() {
    let t0 = Instant::now();
    let mut pid = 100;
    let mut s = State::new(settings(1, ReadyMode::Notify));
    run(&mut s, Event::Start, t0, &mut pid);
    let id = *s.workers.keys().next().unwrap();
    // Another process (not in the worker's group) forges READY=1.
    let stranger = Sender {
        pid: 999,
        pgid: Some(999),
    };
    notify_from(&mut s, id, Some(stranger), Message::Ready, t0);
    assert_eq!(s.serving(), None, "a forged READY=1 counts for nothing");
    notify_from(&mut s, id, None, Message::Ready, t0);
    assert_eq!(s.serving(), None, "no credentials, no READY");
    // A child of the worker, in the group the worker leads.
    let child = Sender {
        pid: 555,
        pgid: Some(101),
    };
    notify_from(&mut s, id, Some(child), Message::Ready, t0);
    assert_eq!(s.serving(), Some(1));
}

#[test]
fn watchdog_trigger_replaces_a_ready_worker_and_fails_a_starting_one() {
    let t0 = Instant::now();
    let mut pid = 100;
    let mut s = one_serving(settings(1, ReadyMode::Alive(Duration::ZERO)), t0, &mut pid);
    let id = *s.workers.keys().next().unwrap();
    let me = Some(Sender {
        pid: 101,
        pgid: Some(101),
    });
    let a = s.handle(
        Event::Notify {
            worker: id,
            from: me,
            messages: vec![Message::WatchdogTrigger],
        },
        t0,
    );
    assert!(
        a.iter().any(|a| matches!(a, Action::Spawn { slot: 0, .. })),
        "a replacement starts: {a:?}"
    );
    assert_eq!(
        s.worker(id).unwrap().unhealthy(),
        Some(&UnhealthyReason::Triggered)
    );

    // During a reload, a new worker that triggers fails the reload.
    let mut s = one_serving(settings(1, ReadyMode::Alive(Duration::ZERO)), t0, &mut pid);
    run(&mut s, Event::Reload { waiter: Some(3) }, t0, &mut pid);
    let new = *s.workers.keys().last().unwrap();
    let new_pid = s.worker(new).unwrap().state.pid().unwrap();
    let a = s.handle(
        Event::Notify {
            worker: new,
            from: Some(Sender {
                pid: new_pid,
                pgid: Some(new_pid),
            }),
            messages: vec![Message::WatchdogTrigger],
        },
        t0,
    );
    assert!(a.iter().any(
        |a| matches!(a, Action::Reply { waiter: 3, result: Err(r) } if r.contains("trigger"))
    ));
    assert_eq!(s.serving(), Some(1));
}

#[test]
fn a_damaged_socket_is_reported_and_unrepaired_is_unhealthy() {
    let t0 = Instant::now();
    let mut pid = 100;
    let mut s = one_serving(settings(1, ReadyMode::Alive(Duration::ZERO)), t0, &mut pid);
    let a = s.handle(
        Event::SocketTampered {
            socket: "http".into(),
            what: "not listening".into(),
            repaired: Ok(()),
        },
        t0,
    );
    assert!(s.healthy());
    assert!(
        s.status_line().contains("socket http repaired 1x"),
        "{}",
        s.status_line()
    );
    assert!(a.iter().any(|a| matches!(a, Action::Upstream(_))));
    s.handle(
        Event::SocketTampered {
            socket: "http".into(),
            what: "not listening".into(),
            repaired: Err("cannot listen again: address in use".into()),
        },
        t0,
    );
    assert!(!s.healthy());
    assert!(
        s.status_line().contains("UNHEALTHY: socket http"),
        "{}",
        s.status_line()
    );
    // Listening again (repaired on a later round): healthy.
    s.handle(
        Event::SocketTampered {
            socket: "http".into(),
            what: "not listening".into(),
            repaired: Ok(()),
        },
        t0,
    );
    assert!(s.healthy());
}

fn replies(actions: &[Action]) -> Vec<(WaiterId, Result<u64, String>)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Reply { waiter, result } => Some((*waiter, result.clone())),
            _ => None,
        })
        .collect()
}

fn exit_generation(s: &mut State, generation: u64, now: Instant, pid: &mut i32) -> Vec<Action> {
    let mut out = Vec::new();
    for p in pids_in(s, generation) {
        let status = ExitStatus::Exited(0);
        out.extend(run(s, Event::Exited { pid: p, status }, now, pid));
    }
    out
}

#[test]
fn reloads_at_the_generation_bound_wait_for_an_old_generation_to_leave() {
    let t0 = Instant::now();
    let mut pid = 100;
    let mut s = State::new(settings(1, ReadyMode::Notify));
    run(&mut s, Event::Start, t0, &mut pid);
    all_ready(&mut s, 1, t0, &mut pid);
    // Generations 1 (draining) and 2 (serving), then 3 starts: the bound.
    run(&mut s, Event::Reload { waiter: None }, t0, &mut pid);
    all_ready(&mut s, 2, t0, &mut pid);
    run(&mut s, Event::Reload { waiter: Some(1) }, t0, &mut pid);
    assert_eq!(s.alive_generations().len(), MAX_GENERATIONS);
    // Two more reloads while 3 starts: coalesced into one.
    run(&mut s, Event::Reload { waiter: Some(2) }, t0, &mut pid);
    run(&mut s, Event::Reload { waiter: Some(3) }, t0, &mut pid);
    let a = all_ready(&mut s, 3, t0, &mut pid);
    assert_eq!(replies(&a), vec![(1, Ok(3))]);
    // 3 serves, 1 and 2 drain: the coalesced reload waits, no generation 4.
    assert_eq!(s.alive_generations(), BTreeSet::from([1, 2, 3]));
    assert!(pids_in(&s, 4).is_empty());
    assert!(
        s.status_line().contains("reload deferred"),
        "{}",
        s.status_line()
    );
    // A reload asked for now joins the deferred one.
    run(&mut s, Event::Reload { waiter: Some(4) }, t0, &mut pid);
    assert!(pids_in(&s, 4).is_empty());
    // Generation 1 leaves: the deferred reload starts, with every waiter.
    exit_generation(&mut s, 1, t0, &mut pid);
    assert_eq!(s.alive_generations(), BTreeSet::from([2, 3, 4]));
    assert_eq!(s.phase().starting(), Some(4));
    let a = all_ready(&mut s, 4, t0, &mut pid);
    assert_eq!(
        replies(&a),
        vec![(2, Ok(4)), (3, Ok(4)), (4, Ok(4))],
        "every waiter of the coalesced reloads is answered"
    );
    assert!(s.alive_generations().len() <= MAX_GENERATIONS);
}

#[test]
fn steered_reloads_keep_two_generations_at_most() {
    let t0 = Instant::now();
    let mut pid = 100;
    let mut s = steered_one_worker_serving(t0, &mut pid);
    let mut most = 0;
    let mut answered = Vec::new();
    // A storm: a reload asked for after every event.
    for i in 0..20u64 {
        let a = run(&mut s, Event::Reload { waiter: Some(i) }, t0, &mut pid);
        answered.extend(replies(&a));
        most = most.max(s.alive_generations().len());
        if let Some(g) = s.phase().starting() {
            answered.extend(replies(&all_ready(&mut s, g, t0, &mut pid)));
        }
        most = most.max(s.alive_generations().len());
        answered.extend(replies(&s.handle(Event::Drained, t0)));
        let old: Vec<u64> = s
            .alive_generations()
            .into_iter()
            .filter(|g| Some(*g) != s.phase().serving())
            .collect();
        for g in old {
            answered.extend(replies(&exit_generation(&mut s, g, t0, &mut pid)));
        }
        most = most.max(s.alive_generations().len());
    }
    assert_eq!(most, MAX_GENERATIONS_STEERED);
    // Every waiter got an answer, and only successes.
    assert_eq!(answered.len(), 20);
    assert!(answered.iter().all(|(_, r)| r.is_ok()), "{answered:?}");
}

#[test]
fn stop_answers_a_deferred_reload() {
    let t0 = Instant::now();
    let mut pid = 100;
    let mut s = steered_one_worker_serving(t0, &mut pid);
    run(&mut s, Event::Reload { waiter: None }, t0, &mut pid);
    all_ready(&mut s, 2, t0, &mut pid);
    // Generation 1 still hands over: the bound (2) is met.
    run(&mut s, Event::Reload { waiter: Some(9) }, t0, &mut pid);
    assert_eq!(s.phase().starting(), None);
    let a = run(&mut s, Event::Stop, t0, &mut pid);
    assert_eq!(replies(&a), vec![(9, Err("nogap is stopping".into()))]);
}

#[test]
fn the_state_survives_export_and_import_through_json() {
    let t0 = Instant::now();
    let mut pid = 100;
    let mut s = State::new(settings(2, ReadyMode::Notify));
    run(&mut s, Event::Start, t0, &mut pid);
    all_ready(&mut s, 1, t0, &mut pid);
    run(&mut s, Event::Reload { waiter: None }, t0, &mut pid);
    all_ready(&mut s, 2, t0, &mut pid);
    // Health history, a crash with its backoff, a stall: all carried.
    let t1 = t0 + Duration::from_secs(1);
    run(
        &mut s,
        Event::QueueStalled {
            queue: HTTP,
            depth: 3,
            busy: false,
        },
        t1,
        &mut pid,
    );
    let ready_pid = pids_in(&s, 2)[0];
    let status = ExitStatus::Signaled(Signal::SIGSEGV);
    run(
        &mut s,
        Event::Exited {
            pid: ready_pid,
            status,
        },
        t1,
        &mut pid,
    );
    let e = s.export(t1);
    let json = serde_json::to_string(&e).unwrap();
    let back: Exported = serde_json::from_str(&json).unwrap();
    assert_eq!(back, e);
    // Imported 5 s later on the monotonic clock, the state reads the same.
    let t2 = t1 + Duration::from_secs(5);
    let settings = s.settings().clone();
    let imported = State::import(back, t2, |_| settings.clone());
    assert_eq!(imported.export(t2), e);
    let (a, b) = (s.snapshot(t1), imported.snapshot(t2));
    assert_eq!(a.status, b.status);
    assert_eq!(format!("{:?}", a.workers), format!("{:?}", b.workers));
    assert_eq!(
        s.next_deadline().map(|d| d - t1),
        imported.next_deadline().map(|d| d - t2)
    );
    // And it goes on: the deadlines fire (generation 1's drain timeout).
    let mut s = imported;
    let a = run(&mut s, Event::Tick, t2 + Duration::from_secs(10), &mut pid);
    assert!(a.contains(&Action::KillGroup { pid: 101 }), "{a:?}");
}

#[test]
fn an_upgrade_waits_for_a_quiet_state() {
    let t0 = Instant::now();
    let mut pid = 100;
    let mut s = steered_one_worker_serving(t0, &mut pid);
    assert!(s.quiet());
    run(&mut s, Event::Reload { waiter: None }, t0, &mut pid);
    assert!(!s.quiet(), "a generation starts");
    all_ready(&mut s, 2, t0, &mut pid);
    assert!(!s.quiet(), "generation 1 is handed over");
    s.handle(Event::Drained, t0);
    assert!(s.quiet(), "generation 1 drains: its workers are carried");
}

#[test]
fn reloads_wait_for_an_asked_upgrade_and_are_carried_by_it() {
    let t0 = Instant::now();
    let mut pid = 100;
    let mut s = steered_one_worker_serving(t0, &mut pid);
    run(&mut s, Event::Reload { waiter: None }, t0, &mut pid);
    run(&mut s, Event::UpgradeAsked, t0, &mut pid);
    // Asked for during the reload: coalesced, then deferred at the commit.
    run(&mut s, Event::Reload { waiter: Some(5) }, t0, &mut pid);
    all_ready(&mut s, 2, t0, &mut pid);
    s.handle(Event::Drained, t0);
    exit_generation(&mut s, 1, t0, &mut pid);
    assert!(
        pids_in(&s, 3).is_empty(),
        "no generation starts before the upgrade"
    );
    assert!(s.quiet());
    // The new image gets the deferred reload and its waiter, and starts it.
    let e = s.export(t0);
    assert_eq!(e.deferred, Some(vec![5]));
    let settings = s.settings().clone();
    let mut new = State::import(e, t0, |_| settings.clone());
    run(&mut new, Event::Tick, t0, &mut pid);
    assert_eq!(new.phase().starting(), Some(3));
    let a = all_ready(&mut new, 3, t0, &mut pid);
    assert_eq!(replies(&a), vec![(5, Ok(3))]);
    // A refused upgrade lets the deferred reload go on in the old image.
    let a = run(&mut s, Event::UpgradeRefused, t0, &mut pid);
    assert!(a.iter().any(|a| matches!(a, Action::Spawn { .. })));
    assert_eq!(s.phase().starting(), Some(3));
}

#[test]
fn an_import_gives_each_generation_the_settings_of_its_own_configuration() {
    let t0 = Instant::now();
    let mut pid = 100;
    let mut s = State::new(settings(1, ReadyMode::Notify));
    run(&mut s, Event::Start, t0, &mut pid);
    all_ready(&mut s, 1, t0, &mut pid);
    let deploy = |workers| Event::Deploy {
        waiter: None,
        settings: Box::new(settings(workers, ReadyMode::Notify)),
    };
    run(&mut s, deploy(2), t0, &mut pid);
    all_ready(&mut s, 2, t0, &mut pid);
    let e = s.export(t0);
    assert_eq!(e.generations, vec![1, 2]);
    assert!(!e.next);
    assert_eq!(e.record.reloads_ok, 1);
    // Each generation's settings come from its configuration (here: the
    // generation number as the worker count); None is the newest deployed.
    let imported = State::import(e, t0, |g| {
        settings(g.map_or(7, |g| g as u32), ReadyMode::Notify)
    });
    assert_eq!(imported.settings_of(1).workers, 1);
    assert_eq!(imported.settings_of(2).workers, 2);
    assert_eq!(imported.settings().workers, 2);
    assert_eq!(imported.snapshot(t0).counters, s.snapshot(t0).counters);
}

// ---- probes ------------------------------------------------------------------

fn probed(actions: &[Action]) -> Vec<WorkerId> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Probe(order) => Some(order.worker),
            _ => None,
        })
        .collect()
}

/// Steered, one worker, probing `notify+http:/healthz` (or the bare form
/// with `retry`); generation 1 serving (it passed its probe).
fn probed_serving(t0: Instant, pid: &mut i32, retry: bool) -> State {
    let mode = match retry {
        true => ReadyMode::Alive(Duration::ZERO),
        false => ReadyMode::Notify,
    };
    let mut settings = settings(1, mode);
    settings.steered = true;
    settings.probe = Some(crate::spec::Probe {
        check: crate::spec::Check::Http {
            path: "/healthz".into(),
        },
        retry,
    });
    let mut s = State::new(settings);
    run(&mut s, Event::Start, t0, pid);
    // Alive at once (bare form): the probe goes out at the next tick.
    let a = match retry {
        true => s.handle(Event::Tick, t0),
        false => all_ready(&mut s, 1, t0, pid),
    };
    let w = probed(&a);
    assert_eq!(w.len(), 1, "{a:?}");
    let result = Ok(());
    let a = s.handle(
        Event::Probed {
            worker: w[0],
            result,
        },
        t0,
    );
    assert!(a.contains(&Action::Steer {
        generation: Some(1)
    }));
    s.handle(Event::Drained, t0);
    s
}

#[test]
fn a_probed_generation_serves_only_once_its_probe_passed() {
    let t0 = Instant::now();
    let mut pid = 100;
    let mut s = probed_serving(t0, &mut pid, false);
    run(&mut s, Event::Reload { waiter: Some(7) }, t0, &mut pid);
    let a = all_ready(&mut s, 2, t0, &mut pid);
    let w = probed(&a);
    assert_eq!(w.len(), 1);
    assert!(!a.iter().any(|a| matches!(a, Action::Steer { .. })));
    assert_eq!(s.serving(), Some(1));
    // READY=1 again while the probe is out: no second probe.
    assert!(probed(&all_ready(&mut s, 2, t0, &mut pid)).is_empty());
    let a = s.handle(
        Event::Probed {
            worker: w[0],
            result: Ok(()),
        },
        t0,
    );
    assert!(a.contains(&Action::Steer {
        generation: Some(2)
    }));
    assert!(a.contains(&Action::Reply {
        waiter: 7,
        result: Ok(2)
    }));
}

#[test]
fn a_failed_probe_fails_the_reload_and_nothing_is_steered() {
    let t0 = Instant::now();
    let mut pid = 100;
    let mut s = probed_serving(t0, &mut pid, false);
    run(&mut s, Event::Reload { waiter: Some(7) }, t0, &mut pid);
    let w = probed(&all_ready(&mut s, 2, t0, &mut pid));
    let error = "GET /healthz answered 500 Internal Server Error".to_string();
    let a = s.handle(
        Event::Probed {
            worker: w[0],
            result: Err(error),
        },
        t0,
    );
    assert!(!a.iter().any(|a| matches!(a, Action::Steer { .. })));
    assert_eq!(stop_signals(&a), vec![102], "the new worker drains");
    assert!(a.iter().any(|a| matches!(a,
        Action::Reply { waiter: 7, result: Err(r) } if r.contains("failed its probe: GET /healthz answered 500"))));
    assert_eq!(s.serving(), Some(1));
    // A late result for the failed worker changes nothing.
    let late = s.handle(
        Event::Probed {
            worker: w[0],
            result: Ok(()),
        },
        t0,
    );
    assert!(late.is_empty(), "{late:?}");
}

#[test]
fn the_bare_probe_tries_again_until_the_start_timeout() {
    let t0 = Instant::now();
    let mut pid = 100;
    let mut s = probed_serving(t0, &mut pid, true);
    run(&mut s, Event::Reload { waiter: Some(7) }, t0, &mut pid);
    let mut w = probed(&s.handle(Event::Tick, t0));
    let mut at = t0;
    for _ in 0..3 {
        assert_eq!(w.len(), 1);
        let result = Err("GET /healthz answered 503 Service Unavailable".into());
        let a = s.handle(
            Event::Probed {
                worker: w[0],
                result,
            },
            at,
        );
        assert!(stop_signals(&a).is_empty(), "{a:?}");
        assert_eq!(s.next_deadline(), Some(at + super::probe::PROBE_RETRY));
        at += super::probe::PROBE_RETRY;
        w = probed(&s.handle(Event::Tick, at));
    }
    // The start timeout (5 s) while a probe is out.
    let a = s.handle(Event::Tick, t0 + Duration::from_secs(5));
    assert!(a.iter().any(|a| matches!(a,
        Action::Reply { waiter: 7, result: Err(r) } if r.contains("not ready after 5s; its probe got no answer"))), "{a:?}");
}

#[test]
fn a_restart_in_the_serving_generation_is_not_probed() {
    let t0 = Instant::now();
    let mut pid = 100;
    let mut s = probed_serving(t0, &mut pid, false);
    let exited = Event::Exited {
        pid: 101,
        status: ExitStatus::Exited(1),
    };
    run(&mut s, exited, t0, &mut pid);
    run(&mut s, Event::Tick, t0, &mut pid);
    let a = all_ready(&mut s, 1, t0, &mut pid);
    assert!(probed(&a).is_empty(), "{a:?}");
    assert_eq!(s.workers.values().filter(|w| w.state.is_ready()).count(), 1);
}

#[test]
fn a_pinned_queue_gets_an_extra_worker_and_nobody_is_stopped() {
    let t0 = Instant::now();
    let mut pid = 100;
    let mut s = steered_one_worker_serving(t0, &mut pid);
    let stalled = |busy| Event::QueueStalled {
        queue: QueueId {
            listener: 0,
            slot: None,
        },
        depth: 3,
        busy,
    };
    let a = run(&mut s, stalled(true), t0, &mut pid);
    assert!(
        a.iter().any(|a| matches!(a, Action::Spawn { slot: 1, generation: 1, share_serving, .. } if share_serving == &vec![0])),
        "{a:?}"
    );
    assert!(stop_signals(&a).is_empty(), "{a:?}");
    // Reported again while the extra starts: nothing more.
    let a = run(&mut s, stalled(true), t0, &mut pid);
    assert!(a.is_empty(), "{a:?}");
    let extra = *s.workers.keys().last().unwrap();
    ready(&mut s, extra, t0, &mut pid);
    assert_eq!(s.workers.values().filter(|w| w.state.is_ready()).count(), 2);
    // As many extras as workers (1), then no more.
    let a = run(&mut s, stalled(true), t0, &mut pid);
    assert!(a.is_empty(), "{a:?}");
    // A dead accept loop (not busy) is replaced as before.
    let a = run(&mut s, stalled(false), t0, &mut pid);
    assert!(
        a.iter().any(|a| matches!(a, Action::Spawn { slot: 0, .. })),
        "{a:?}"
    );
}
