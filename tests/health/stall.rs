//! A worker whose accept loop stops while its process stays up.

use std::time::{Duration, Instant};

use crate::common::{free_addr, LONG};
use crate::fixture::{loads, misbehave_once, scratch, start, Which};
use crate::scenario::{finish, recover_under_load, report, Failure};

#[test]
fn a_stalled_accept_loop_is_replaced_under_load() {
    let health = free_addr();
    let knobs = format!("--stall-accept-after 3s --health {health}");
    let r = recover_under_load(&Failure {
        workers: 1,
        knobs: &knobs,
        which: Which::FirstOfEachSlot,
        nogap_args: &[],
        conns: 4,
        health: Some(health),
        new_connections_after: None,
    });
    report("accept stall, 1 worker", &r);
    assert!(r.reason.contains("accept queue"), "reason: {}", r.reason);
}

#[test]
fn four_stalled_accept_loops_are_replaced_under_load() {
    // All four stop accepting at once: one replacement is enough to empty
    // the queue again (the other three keep serving their keep-alive
    // connections until they are replaced or stopped).
    let r = recover_under_load(&Failure {
        workers: 4,
        knobs: "--stall-accept-after 3s",
        which: Which::FirstOfEachSlot,
        nogap_args: &[],
        conns: 8,
        health: None,
        new_connections_after: None,
    });
    report("accept stall, 4 workers", &r);
    assert!(r.reason.contains("accept queue"), "reason: {}", r.reason);
}

#[test]
fn one_stalled_accept_loop_of_four_costs_no_request() {
    // The other three keep draining the shared queue: nothing stalls,
    // nothing is lost, and nogap has nothing to replace.
    let dir = scratch();
    let addr = free_addr();
    let script = misbehave_once(dir.path(), "--stall-accept-after 3s", Which::FirstOfSlot(0));
    let nogap = start(
        dir.path(),
        addr,
        &["-w", "4", "--drain-timeout", "20s"],
        &[script.to_str().unwrap()],
        &[],
    );
    let (ka, nc) = loads(addr, 8);
    nogap.wait_for_log("stalled accept", LONG);
    // Watch for three stall timeouts (default 2s): traffic keeps flowing
    // all along, on new connections as on kept-alive ones.
    let since = Instant::now();
    let before = nc.ok();
    while since.elapsed() < Duration::from_secs(6) {
        assert!(nc.wait_for_more_ok(10, LONG), "new connections stalled");
        assert!(ka.wait_for_more_ok(10, LONG), "keep-alive stalled");
    }
    let answered = nc.ok() - before;
    let (ka, nc) = (ka.stop(), nc.stop());
    let log = finish(nogap);
    eprintln!("one of 4 workers stalled, {answered} answered meanwhile:");
    eprintln!("  {}\n  {}", ka.summary(), nc.summary());
    ka.assert_no_failures();
    nc.assert_no_failures();
    let stalls: Vec<&String> = log
        .iter()
        .filter(|l| l.contains("accept queue stalled"))
        .collect();
    assert!(
        stalls.is_empty(),
        "the shared queue kept moving: {stalls:?}"
    );
}

#[test]
fn status_shows_the_stall_and_the_replacement() {
    use crate::common::wait_until;
    use crate::fixture::status;
    let dir = scratch();
    let addr = free_addr();
    let worker = misbehave_once(
        dir.path(),
        "--stall-accept-after 1s",
        Which::FirstOfEachSlot,
    );
    let nogap = start(dir.path(), addr, &[], &[worker.to_str().unwrap()], &[]);
    let (ka, nc) = loads(addr, 2);
    nogap.wait_for_log("unhealthy worker replaced", LONG);
    // Once the queue moves again: one stall seen on the socket, none now;
    // the slot was found unhealthy and replaced once; the ready worker's
    // descriptors are shown against its limit.
    let settled = wait_until(LONG, || {
        let s = status(dir.path());
        s["sockets"][0]["stalls"] == 1 && s["sockets"][0]["stalled"] == false
    });
    let s = status(dir.path());
    assert!(settled, "status never showed a recovered stall: {s:#}");
    let ready = s["workers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["state"] == "ready")
        .unwrap_or_else(|| panic!("no ready worker: {s:#}"))
        .clone();
    assert_eq!(ready["slot_unhealthy_seen"], 1, "{s:#}");
    assert_eq!(ready["slot_replacements"], 1, "{s:#}");
    let (open, limit) = (
        ready["fds_open"].as_u64().unwrap(),
        ready["fds_limit"].as_u64().unwrap(),
    );
    assert!(open >= 3 && limit >= open, "fds {open}/{limit}");
    assert_eq!(s["healthy"], true);
    let (ka, nc) = (ka.stop(), nc.stop());
    ka.assert_no_failures();
    nc.assert_no_failures();
}

/// The socket inode a process has at `fd`.
fn socket_at(pid: i32, fd: u32) -> String {
    std::fs::read_link(format!("/proc/{pid}/fd/{fd}"))
        .map(|p| p.display().to_string())
        .unwrap_or_default()
}

#[test]
fn per_worker_sockets_name_the_stalled_worker_and_keep_its_queue() {
    use crate::common::proc::field;
    let dir = scratch();
    let addr = free_addr();
    let worker = misbehave_once(dir.path(), "--stall-accept-after 2s", Which::FirstOfSlot(2));
    let nogap = start(
        dir.path(),
        addr,
        &["-w", "4", "--reuseport-per-worker"],
        &[worker.to_str().unwrap()],
        &[],
    );
    // Every slot has its own socket at fd 3.
    let pid_of_slot = |slot: u32| -> i32 {
        let line = nogap
            .matching(&format!("worker started worker={slot}"))
            .pop()
            .unwrap_or_else(|| panic!("no worker started in slot {slot}"));
        field(&line, "pid").unwrap().parse().unwrap()
    };
    let sockets: Vec<String> = (0..4).map(|s| socket_at(pid_of_slot(s), 3)).collect();
    let distinct: std::collections::BTreeSet<_> = sockets.iter().collect();
    assert_eq!(distinct.len(), 4, "one socket per slot: {sockets:?}");
    let stalled_pid = pid_of_slot(2);

    let (ka, nc) = loads(addr, 4);
    let line = nogap.wait_for_log("replacing unhealthy worker", LONG);
    assert_eq!(field(&line, "worker").as_deref(), Some("2"), "{line}");
    assert_eq!(
        field(&line, "pid").unwrap().parse::<i32>().unwrap(),
        stalled_pid
    );
    nogap.wait_for_log("unhealthy worker replaced", LONG);
    // The replacement took over slot 2's own socket, with what waited in it.
    let replacement = pid_of_slot(2);
    assert_ne!(replacement, stalled_pid);
    assert_eq!(socket_at(replacement, 3), sockets[2]);
    assert!(nc.wait_for_more_ok(50, LONG), "new connections stalled");
    let (ka, nc) = (ka.stop(), nc.stop());
    ka.assert_no_failures();
    nc.assert_no_failures();
    assert_eq!(
        nogap.count_log("replacing unhealthy worker"),
        1,
        "only slot 2 was replaced"
    );
    // Connections hashed to slot 2 while it stalled were answered by its replacement.
    assert!(
        nc.pids().contains(&(replacement as u32)),
        "{}",
        nc.summary()
    );
}
