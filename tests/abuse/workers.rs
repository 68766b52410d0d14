//! Workers that leave things behind or will not stop.

use crate::common::{free_addr, must, process_exists, LONG};
use crate::fixture::{loads, misbehave_once, scratch, start, status, Which};
use crate::support::{fds, print, reload_wait, start_with_slot_0_misbehaving};

/// The processes whose parent is `pid` and whose process group is `pgid`.
fn group_members(pgid: i32) -> Vec<i32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|p| crate::common::pgid_of(*p) == Some(pgid) && process_exists(*p))
        .collect()
}

/// A worker forks a child that keeps the sockets and exits itself: the
/// child is killed with the worker's group, a new worker takes the slot,
/// and nothing is lost on the other worker.
#[test]
fn a_worker_that_forks_and_exits_leaves_nothing_behind() {
    let dir = scratch();
    let addr = free_addr();
    let nogap = start_with_slot_0_misbehaving(
        dir.path(),
        addr,
        "--abuse fork-exit --abuse-after 1s",
        &["-w", "2"],
    );
    let first = nogap.wait_workers(1, 2, LONG);
    let (ka, nc) = loads(addr, 2);
    let line = nogap.wait_for_log("worker exited status=*", LONG);
    let pid = crate::fixture::pid_of(&line);
    must(LONG, "the forked child is gone with its group", || {
        group_members(pid).is_empty()
    });
    must(LONG, "slot 0 has a new worker", || {
        nogap.started_pids(Some(1)).len() >= 3
    });
    assert!(nc.wait_for_more_ok(200, LONG));
    let (ka, nc) = (ka.stop(), nc.stop());
    print("keep-alive", &ka);
    print("new-connection", &nc);
    // The forking worker exited without draining: requests it had accepted
    // (at most one per client connection) got EOF or a reset. Nothing else
    // failed: no refusal, no timeout.
    use crate::common::load::FailureKind::{EofBeforeResponse, Reset};
    for r in [&ka, &nc] {
        let lost = r.failures_of(EofBeforeResponse) + r.failures_of(Reset);
        assert_eq!(r.failed(), lost, "{:?}", r.failures);
        assert!(
            lost <= 2,
            "at most the connections it held: {:?}",
            r.failures
        );
    }
    assert!(first.contains(&pid));
    assert_eq!(status(dir.path())["healthy"], true);
}

/// Workers that ignore the stop signal: a reload still completes, the old
/// generation is killed at the drain timeout, nothing is lost.
#[test]
fn workers_that_ignore_the_stop_signal_are_killed_at_the_drain_timeout() {
    let dir = scratch();
    let addr = free_addr();
    let worker = misbehave_once(dir.path(), "--ignore-term", Which::FirstOfEachSlot);
    let nogap = start(
        dir.path(),
        addr,
        &["-w", "2", "--drain-timeout", "2s"],
        &[worker.to_str().unwrap()],
        &[],
    );
    let old = nogap.wait_workers(1, 2, LONG);
    let fd0 = fds(nogap.pid());
    let (ka, nc) = loads(addr, 2);
    let (took, ok, text) = reload_wait(dir.path(), LONG);
    assert!(ok, "reload failed after {took:?}: {text}");
    nogap.wait_for_count("drain timeout: killing worker", 2, LONG);
    must(LONG, "the old workers are gone", || {
        old.iter().all(|p| !process_exists(*p))
    });
    assert!(nc.wait_for_more_ok(100, LONG));
    let (ka, nc) = (ka.stop(), nc.stop());
    print("keep-alive", &ka);
    print("new-connection", &nc);
    assert_eq!(nc.failed(), 0, "{:?}", nc.failures);
    assert!(fds(nogap.pid()) <= fd0 + 4);
}
