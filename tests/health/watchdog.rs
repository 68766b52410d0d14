//! Workers that stop sending WATCHDOG=1 (`--worker-watchdog`).

use crate::common::{free_addr, must, process_exists, LONG};
use crate::fixture::{loads, misbehave_once, scratch, start, Which};
use crate::scenario::{finish, recover_under_load, report, Failure};

#[test]
fn a_wedged_worker_that_stops_its_watchdog_is_replaced_under_load() {
    // A wedged event loop neither pings nor accepts. The queue detector is
    // off so that the watchdog alone has to notice.
    let r = recover_under_load(&Failure {
        workers: 1,
        knobs: "--stop-watchdog-after 3s --stall-accept-after 3s",
        which: Which::FirstOfEachSlot,
        nogap_args: &["--worker-watchdog", "1s", "--stall-timeout", "0"],
        conns: 4,
        health: None,
        new_connections_after: None,
    });
    report("watchdog silent (--worker-watchdog 1s), 1 worker", &r);
    assert!(r.reason.contains("WATCHDOG"), "reason: {}", r.reason);
}

#[test]
fn every_silent_worker_of_four_is_replaced_one_at_a_time() {
    // All four stop pinging at once (and keep serving): one replacement at
    // a time, but every one of them is replaced in the end.
    let dir = scratch();
    let addr = free_addr();
    let script = misbehave_once(
        dir.path(),
        "--stop-watchdog-after 3s",
        Which::FirstOfEachSlot,
    );
    let nogap = start(
        dir.path(),
        addr,
        // 2s: a healthy worker pings every second, a margin of one second
        // for a loaded test machine.
        &[
            "-w",
            "4",
            "--worker-watchdog",
            "2s",
            "--drain-timeout",
            "20s",
        ],
        &[script.to_str().unwrap()],
        &[],
    );
    let original = nogap.wait_workers(1, 4, LONG);
    let (ka, nc) = loads(addr, 8);
    let replaced = nogap.wait_for_count("unhealthy worker replaced", 4, LONG);
    must(LONG, "every silent worker exits", || {
        original.iter().all(|&p| !process_exists(p))
    });
    assert!(nc.wait_for_more_ok(50, LONG), "new connections stalled");
    assert!(ka.wait_for_more_ok(50, LONG), "keep-alive stalled");
    let (ka, nc) = (ka.stop(), nc.stop());
    let log = finish(nogap);
    eprintln!("4 silent workers: {} replacements", replaced.len());
    eprintln!("  {}\n  {}", ka.summary(), nc.summary());
    ka.assert_no_failures();
    nc.assert_no_failures();
    let replacing = log
        .iter()
        .filter(|l| l.contains("replacing unhealthy worker"))
        .count();
    assert_eq!(replacing, 4, "one replacement per silent worker");
}
