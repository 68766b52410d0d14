//! Canary-checked reloads (`--ready notify+http:PATH`, `tcp`): nogap probes
//! a new generation through its own socket before any client reaches it. A
//! generation that fails the probe fails the reload and never gets a client.

use std::process::Output;
use std::time::{Duration, Instant};

use crate::common::LONG;
use crate::util::{
    both_loads, client, scratch, set_worker_args, start_as_given, switchable_worker, text,
};

fn reload_wait(dir: &std::path::Path) -> (Output, Duration) {
    let t = Instant::now();
    let out = client(dir, &["reload", "--wait"]);
    (out, t.elapsed())
}

/// A deploy that says READY=1 and answers 500 to everything: the probe
/// fails it, `reload --wait` exits 1 with the status, and not one client
/// under load sees a 500 (or any other failure). The same worker healthy
/// passes, and then serves.
#[test]
fn a_generation_that_answers_500_fails_its_probe_and_no_client_sees_it() {
    let dir = scratch();
    let addr = crate::common::free_addr();
    let worker = switchable_worker(dir.path());
    let nogap = start_as_given(
        dir.path(),
        addr,
        &["-w", "2", "--ready", "notify+http:/healthz"],
        &[worker.to_str().unwrap()],
    );
    nogap.wait_for_log("probe passed", LONG);
    let gen1 = nogap.wait_workers(1, 2, LONG);
    let (ka, nc) = both_loads(addr, 4, Duration::from_millis(2));

    set_worker_args(dir.path(), "--status 500");
    // Five bad deploys in a row, each one failed by its probe.
    for _ in 0..5 {
        let (out, took) = reload_wait(dir.path());
        let said = text(&out);
        eprintln!("bad deploy: reload --wait took {took:?}: {said}");
        assert_eq!(out.status.code(), Some(1), "{said}");
        assert!(
            said.contains("failed its probe: GET /healthz answered 500 Internal Server Error"),
            "{said}"
        );
        // Clients keep being answered (by generation 1: checked at the end).
        assert!(ka.wait_for_more_ok(50, LONG) && nc.wait_for_more_ok(50, LONG));
    }
    let failed: Vec<i32> = (2..=6).flat_map(|g| nogap.started_pids(Some(g))).collect();
    assert_eq!(failed.len(), 10, "generations 2 to 6 were started");

    set_worker_args(dir.path(), "");
    let (out, took) = reload_wait(dir.path());
    eprintln!("good deploy: reload --wait took {took:?}: {}", text(&out));
    assert!(out.status.success(), "{}", text(&out));
    let good = nogap.wait_workers(7, 2, LONG);
    assert!(nc.wait_for_more_ok(50, LONG) && ka.wait_for_more_ok(50, LONG));
    let (ka, nc) = (ka.stop(), nc.stop());
    eprintln!("  {}\n  {}", ka.summary(), nc.summary());
    ka.assert_no_failures();
    nc.assert_no_failures();
    let answered_by = nc.pids();
    for pid in &failed {
        assert!(
            !answered_by.contains(&(*pid as u32)) && !ka.pids().contains(&(*pid as u32)),
            "a client reached the failed generation (pid {pid})"
        );
    }
    assert!(
        good.iter().any(|p| answered_by.contains(&(*p as u32))),
        "generation 7 serves: {answered_by:?}"
    );
    assert!(gen1.iter().any(|p| answered_by.contains(&(*p as u32))));
}

/// A worker that takes 30 s per answer: the probe is bounded by
/// `--start-timeout` (2 s), and the reload fails with the reason.
#[test]
fn a_slow_probe_is_bounded_by_the_start_timeout() {
    let dir = scratch();
    let addr = crate::common::free_addr();
    let worker = switchable_worker(dir.path());
    let _nogap = start_as_given(
        dir.path(),
        addr,
        &["--ready", "notify+http:/", "--start-timeout", "2s"],
        &[worker.to_str().unwrap()],
    );
    let (ka, nc) = both_loads(addr, 2, Duration::from_millis(2));
    set_worker_args(dir.path(), "--work 30s");
    let (out, took) = reload_wait(dir.path());
    let said = text(&out);
    eprintln!("slow probe: reload --wait took {took:?}: {said}");
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(said.contains("2s"), "{said}");
    assert!(
        said.contains("no answer"),
        "the reason names the probe: {said}"
    );
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(8),
        "bounded by the start timeout: {took:?}"
    );
    let (ka, nc) = (ka.stop(), nc.stop());
    ka.assert_no_failures();
    nc.assert_no_failures();
}

/// The bare `tcp` form: each generation is ready once a worker accepted
/// the probe; reloads under load lose nothing.
#[test]
fn the_tcp_probe_passes_once_a_worker_accepts() {
    let dir = scratch();
    let addr = crate::common::free_addr();
    let worker = switchable_worker(dir.path());
    let nogap = start_as_given(
        dir.path(),
        addr,
        &["--ready", "tcp"],
        &[worker.to_str().unwrap()],
    );
    let (ka, nc) = both_loads(addr, 2, Duration::from_millis(2));
    // A worker that accepts only after 1 s: the probe waits for it.
    set_worker_args(dir.path(), "--start-delay 1s");
    let (out, took) = reload_wait(dir.path());
    eprintln!("tcp probe, 1 s start delay: reload --wait took {took:?}");
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        took >= Duration::from_secs(1),
        "ready before it accepted: {took:?}"
    );
    assert_eq!(nogap.count_log("probe passed"), 2);
    assert!(nc.wait_for_more_ok(20, LONG));
    let (ka, nc) = (ka.stop(), nc.stop());
    ka.assert_no_failures();
    nc.assert_no_failures();
}
