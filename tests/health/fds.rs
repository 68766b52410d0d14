//! A worker that leaks descriptors until accept fails with EMFILE, then
//! retries accept in a loop with a short sleep (5 ms doubling to 1 s), as
//! Go's net/http server does: the process is up, its accept loop "runs",
//! and no connection is ever taken.

use crate::fixture::Which;
use crate::scenario::{recover_under_load, report, Failure};

/// The demo's EMFILE retry is what this failure mode is about: make sure
/// it happened, and was not something else.
fn assert_accept_hit_emfile(log: &[String]) {
    assert!(
        log.iter()
            .any(|l| l.contains("failed: Too many open files") && l.contains("retrying")),
        "the worker's accept never failed with EMFILE"
    );
}

#[test]
fn an_fd_leak_is_replaced_under_load_by_fd_high() {
    let r = recover_under_load(&Failure {
        workers: 1,
        knobs: "--leak-fds-after 3s",
        which: Which::FirstOfEachSlot,
        // The queue detector off: its first sign (150 ms) would beat the
        // descriptor check (once a second) to it.
        nogap_args: &["--stall-timeout", "0"],
        conns: 4,
        health: None,
        new_connections_after: None,
    });
    report("fd leak (--fd-high 90%), 1 worker", &r);
    assert_accept_hit_emfile(&r.log);
    assert!(
        r.reason.contains("file descriptors"),
        "reason: {}",
        r.reason
    );
}

#[test]
fn an_fd_leak_is_replaced_under_load_by_the_queue_without_fd_high() {
    // Without the fd check, the retry loop must not pass for progress:
    // accept4 fails before it takes a connection, so the queue stands still.
    // New connections start once the fds are gone: a connection in flight
    // at the leak would free an fd when it closes, and the retry loop would
    // then go on accepting on the freed fds, a few at a time (a slow worker,
    // not a dead one: only --fd-high catches that; the benchmark shows it).
    let r = recover_under_load(&Failure {
        workers: 1,
        knobs: "--leak-fds-after 3s",
        which: Which::FirstOfEachSlot,
        nogap_args: &["--fd-high", "0"],
        conns: 4,
        health: None,
        new_connections_after: Some("leaked"),
    });
    report("fd leak (--fd-high 0), 1 worker", &r);
    assert_accept_hit_emfile(&r.log);
    assert!(r.reason.contains("accept queue"), "reason: {}", r.reason);
}
