//! Workers that damage the socket they share with nogap, their siblings and
//! the other generations: shutdown(), listen(fd, 1), clearing O_NONBLOCK.

use std::time::{Duration, Instant};

use crate::common::load::FailureKind;
use crate::common::{free_addr, must, LONG};
use crate::fixture::{loads, scratch, status};
use crate::support::{
    failures_after, fds, print, reload_wait, rss_kb, start_with_slot_0_misbehaving,
};

/// Defect 1: a worker's `shutdown(SHUT_RDWR)` on its inherited listening
/// socket used to refuse every connection from then on while status said
/// healthy, and every later reload failed. Now nogap makes the same socket
/// listen again within a health round, says so, and reloads work.
#[test]
fn a_worker_that_shuts_the_socket_down_cannot_take_the_port_down() {
    let dir = scratch();
    let addr = free_addr();
    let nogap = start_with_slot_0_misbehaving(
        dir.path(),
        addr,
        "--abuse shutdown --abuse-after 1500ms",
        &["-w", "2"],
    );
    let (fd0, rss0) = (fds(nogap.pid()), rss_kb(nogap.pid()));
    let (ka, nc) = loads(addr, 4);
    nogap.wait_for_log("a worker damaged a shared socket: repaired", LONG);
    let repaired = Instant::now();
    assert!(nc.wait_for_more_ok(200, LONG), "answers after the repair");
    let st = status(dir.path());
    let line = st["status"].as_str().unwrap_or_default().to_string();
    assert!(line.contains("socket web repaired"), "status tells: {line}");
    assert_eq!(st["healthy"], true, "{st}");
    // Later reloads work (they failed: "another process shares the address").
    for _ in 0..2 {
        let (took, ok, text) = reload_wait(dir.path(), LONG);
        assert!(ok, "reload after the repair failed after {took:?}: {text}");
    }
    assert!(nc.wait_for_more_ok(100, LONG));
    let (ka, nc) = (ka.stop(), nc.stop());
    print("keep-alive", &ka);
    print("new-connection", &nc);
    // The window: connections refused (or reset in the queue) between the
    // shutdown and the next health round (250 ms); none after the repair
    // was logged.
    for r in [&ka, &nc] {
        let late = failures_after(r, repaired + Duration::from_millis(100));
        assert!(late.is_empty(), "failures after the repair: {late:?}");
        let other =
            r.failed() - r.failures_of(FailureKind::Refused) - r.failures_of(FailureKind::Reset);
        assert_eq!(
            other, 0,
            "only refused or reset in the window: {:?}",
            r.failures
        );
    }
    assert!(
        fds(nogap.pid()) <= fd0 + 8,
        "fds {fd0} -> {}",
        fds(nogap.pid())
    );
    assert!(
        rss_kb(nogap.pid()) < rss0 + 20_000,
        "RSS {rss0} kB -> {}",
        rss_kb(nogap.pid())
    );
}

/// Defect 6: `listen(fd, 1)` by a worker used to spread to the next
/// generation's steered socket. Now the backlog is restored, and new pools
/// get the configured one.
#[test]
fn a_shrunk_backlog_is_restored_and_does_not_spread() {
    let dir = scratch();
    let addr = free_addr();
    let nogap = start_with_slot_0_misbehaving(
        dir.path(),
        addr,
        "--abuse backlog1 --abuse-after 500ms",
        &["--backlog", "128"],
    );
    let backlog = |d: &std::path::Path| status(d)["sockets"][0]["backlog"].as_u64();
    nogap.wait_for_log("a worker damaged a shared socket: repaired", LONG);
    assert!(nogap
        .log_text()
        .contains("backlog shrunk to 1 (restored to 128)"));
    assert_eq!(backlog(dir.path()), Some(128));
    let (took, ok, text) = reload_wait(dir.path(), LONG);
    assert!(ok, "reload failed after {took:?}: {text}");
    // The new generation serves from its own socket: the configured backlog.
    assert_eq!(backlog(dir.path()), Some(128));
}

/// Defect 7: a worker that clears O_NONBLOCK on the shared socket left its
/// sibling blocked in accept(). nogap sets the flag again (the socket was
/// seen non-blocking: the demo makes it so, as Go and tokio servers do),
/// and no request fails.
#[test]
fn a_cleared_nonblocking_flag_is_set_again() {
    let dir = scratch();
    let addr = free_addr();
    let nogap = start_with_slot_0_misbehaving(
        dir.path(),
        addr,
        "--abuse blocking --abuse-after 1s",
        &["-w", "2"],
    );
    let (ka, nc) = loads(addr, 4);
    nogap.wait_for_log("a worker damaged a shared socket: repaired", LONG);
    assert!(nogap.log_text().contains("O_NONBLOCK cleared by a worker"));
    must(LONG, "both workers answer after the repair", || {
        nc.wait_for_more_ok(200, LONG)
    });
    let (ka, nc) = (ka.stop(), nc.stop());
    print("keep-alive", &ka);
    print("new-connection", &nc);
    assert_eq!(
        ka.failed() + nc.failed(),
        0,
        "{:?} {:?}",
        ka.failures,
        nc.failures
    );
    assert!(nc.pids().len() >= 2, "both workers served: {:?}", nc.pids());
}
