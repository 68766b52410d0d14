//! Reload storms: back-to-back `nogap reload --wait` under load keep the
//! generations alive bounded, and nogap's descriptors and memory return to
//! where they started.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::{free_addr, must, proc_status, LONG};
use crate::util::{both_loads, client, fd_count, scratch, start_demo, text};

/// Reloads in the test; `NOGAP_STORM_RELOADS` overrides (the benchmark
/// `cargo bench --bench storm` runs 1000).
fn reloads() -> usize {
    std::env::var("NOGAP_STORM_RELOADS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(200)
}

/// Resident memory of `pid`, in KiB.
fn rss_kib(pid: i32) -> u64 {
    proc_status(pid, "VmRSS")
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// The generations of `pid`'s live children (their `NOGAP_GENERATION`).
fn child_generations(pid: i32) -> BTreeSet<u64> {
    let children =
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    children
        .split_whitespace()
        .filter_map(|c| std::fs::read(format!("/proc/{c}/environ")).ok())
        .filter_map(|env| {
            env.split(|&b| b == 0)
                .find_map(|kv| kv.strip_prefix(b"NOGAP_GENERATION="))
                .and_then(|g| std::str::from_utf8(g).ok()?.parse().ok())
        })
        .collect()
}

fn reload_wait(dir: &Path) -> Duration {
    let t = Instant::now();
    let out = client(dir, &["reload", "--wait"]);
    assert!(out.status.success(), "reload --wait failed: {}", text(&out));
    t.elapsed()
}

#[test]
fn a_reload_storm_keeps_generations_descriptors_and_memory_bounded() {
    let dir = scratch();
    let addr = free_addr();
    let nogap = start_demo(dir.path(), addr, &["-w", "2"], &[]);
    let (ka, nc) = both_loads(addr, 4, Duration::from_millis(1));
    // Start values: the first generation serving under load.
    let (fds0, rss0) = (fd_count(nogap.pid()), rss_kib(nogap.pid()));

    // A sampler counts the generations alive, as the process table shows.
    let stop = Arc::new(AtomicBool::new(false));
    let most = Arc::new(AtomicUsize::new(0));
    let sampler = {
        let (stop, most, pid) = (stop.clone(), most.clone(), nogap.pid());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                most.fetch_max(child_generations(pid).len(), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(2));
            }
        })
    };
    let n = reloads();
    let t0 = Instant::now();
    let mut times: Vec<Duration> = (0..n).map(|_| reload_wait(dir.path())).collect();
    let storm = t0.elapsed();
    must(LONG, "one generation left after the storm", || {
        child_generations(nogap.pid()).len() == 1
    });
    // The last old generation's socket closes once it is gone.
    crate::common::wait_until(LONG, || fd_count(nogap.pid()) <= fds0);
    stop.store(true, Ordering::Relaxed);
    sampler.join().expect("sampler");
    assert!(ka.wait_for_more_ok(50, LONG) && nc.wait_for_more_ok(50, LONG));
    let (ka, nc) = (ka.stop(), nc.stop());
    eprintln!("{}\n{}", ka.summary(), nc.summary());
    ka.assert_no_failures();
    nc.assert_no_failures();

    times.sort();
    let (fds1, rss1) = (fd_count(nogap.pid()), rss_kib(nogap.pid()));
    let most = most.load(Ordering::Relaxed);
    eprintln!(
        "{n} reloads in {storm:?}: p50 {:?} p99 {:?}; most generations alive {most}; fds {fds0} -> {fds1}; RSS {rss0} -> {rss1} KiB",
        times[n / 2],
        times[n * 99 / 100]
    );
    assert!(most <= 3, "{most} generations alive at once");
    assert!(most >= 2, "the sampler never saw a hand-over ({most})");
    assert_eq!(fds1, fds0, "nogap's descriptors after {n} reloads");
    assert!(
        rss1 <= rss0 + 1024,
        "nogap's RSS grew from {rss0} to {rss1} KiB over {n} reloads"
    );
    assert_eq!(nogap.count_log("reload failed"), 0);
}
