//! Reload-storm and self-upgrade benchmark. Run with `cargo bench --bench
//! storm`; see bench/README.md.
//!
//! 1. The soak: NOGAP_BENCH_RELOADS (1000) back-to-back `nogap reload
//!    --wait` under keep-alive and new-connection load. It prints failed
//!    requests by kind, the most generations alive at once (sampled from
//!    nogap's children every 2 ms), nogap's descriptors and RSS before and
//!    after, and the time each `reload --wait` took (p50/p99/max).
//! 2. The upgrade window: NOGAP_BENCH_UPGRADES (10) `nogap upgrade --wait`,
//!    one every 2 s, under the same load; the maximum latency of requests
//!    started inside an upgrade (from the request to `--wait` returning,
//!    plus 50 ms) against the steady state between upgrades.
//!
//! It measures and prints; it never asserts.

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use common::load::{ms, Latencies, Load, LoadConfig, Mode, Report};
use common::{demo_bin, free_addr, nogap_bin, proc_status, Nogap};

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn fd_count(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

fn rss_kib(pid: i32) -> u64 {
    proc_status(pid, "VmRSS")
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// The generations of `pid`'s live children (their `NOGAP_GENERATION`).
fn child_generations(pid: i32) -> BTreeSet<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|c| std::fs::read(format!("/proc/{c}/environ")).ok())
        .filter_map(|env| {
            env.split(|&b| b == 0)
                .find_map(|kv| kv.strip_prefix(b"NOGAP_GENERATION="))
                .and_then(|g| std::str::from_utf8(g).ok()?.parse().ok())
        })
        .collect()
}

/// `nogap COMMAND --wait --control DIR/control.sock`: how long it took, and
/// whether it succeeded.
fn client(dir: &Path, command: &str) -> (Duration, bool) {
    let t = Instant::now();
    let ok = Command::new(nogap_bin())
        .args([command, "--wait", "--control"])
        .arg(dir.join("control.sock"))
        .output()
        .is_ok_and(|o| o.status.success());
    (t.elapsed(), ok)
}

fn loads(addr: std::net::SocketAddr, conns: usize) -> [Load; 2] {
    [Mode::KeepAlive, Mode::NewConnection].map(|mode| {
        Load::start(
            LoadConfig::new(addr, mode)
                .connections(conns)
                .duration(Duration::from_secs(3600)),
        )
    })
}

fn start(exe: &Path, dir: &Path, addr: std::net::SocketAddr) -> Nogap {
    let mut cmd = Command::new(exe);
    cmd.arg("run")
        .env("RUNTIME_DIRECTORY", dir)
        .args(["-l", &format!("web={addr}"), "-w", "2", "--ready", "notify"])
        .args(["--", demo_bin()]);
    let nogap = Nogap::spawn("nogap", cmd);
    nogap.wait_for_log("generation ready generation=1", Duration::from_secs(30));
    nogap
}

fn failures(r: &Report) -> String {
    format!("{} {}", r.failed(), r.failure_summary())
}

fn soak(reloads: usize, conns: usize) {
    let dir = tempfile::tempdir().expect("temp dir");
    let addr = free_addr();
    let mut nogap = start(Path::new(nogap_bin()), dir.path(), addr);
    let pid = nogap.pid();
    let [ka, nc] = loads(addr, conns);
    ka.wait_for_more_ok(100, Duration::from_secs(30));
    nc.wait_for_more_ok(100, Duration::from_secs(30));
    let (fds0, rss0) = (fd_count(pid), rss_kib(pid));
    let stop = Arc::new(AtomicBool::new(false));
    let most = Arc::new(AtomicUsize::new(0));
    let sampler = {
        let (stop, most) = (stop.clone(), most.clone());
        thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                most.fetch_max(child_generations(pid).len(), Ordering::Relaxed);
                thread::sleep(Duration::from_millis(2));
            }
        })
    };
    let t0 = Instant::now();
    let mut times = Vec::new();
    let mut failed = 0;
    for _ in 0..reloads {
        let (took, ok) = client(dir.path(), "reload");
        times.push(took);
        failed += usize::from(!ok);
    }
    let storm = t0.elapsed();
    common::wait_until(Duration::from_secs(30), || {
        child_generations(pid).len() == 1 && fd_count(pid) <= fds0
    });
    stop.store(true, Ordering::Relaxed);
    let _ = sampler.join();
    let (fds1, rss1) = (fd_count(pid), rss_kib(pid));
    let (ka, nc) = (ka.stop(), nc.stop());
    let t = Latencies::of(times);
    println!("\n## reload storm: {reloads} x `nogap reload --wait`, back to back, {conns}+{conns} clients\n");
    println!("| measure | value |\n|---|--:|");
    println!(
        "| reloads (failed) | {reloads} ({failed}) in {:.1} s |",
        storm.as_secs_f64()
    );
    println!(
        "| reload --wait p50 / p99 / max | {:.0} / {:.0} / {:.0} ms |",
        ms(t.p50),
        ms(t.p99),
        ms(t.max)
    );
    println!(
        "| most generations alive at once | {} |",
        most.load(Ordering::Relaxed)
    );
    println!("| nogap fds before / after | {fds0} / {fds1} |");
    println!("| nogap RSS before / after | {rss0} / {rss1} KiB |");
    for r in [&ka, &nc] {
        println!(
            "| {} requests ok / failed | {} / {} |",
            r.mode,
            r.ok(),
            failures(r)
        );
    }
    nogap.signal(Signal::SIGTERM);
    nogap.try_wait_exit(Duration::from_secs(30));
}

fn upgrades(n: usize, conns: usize) {
    let dir = tempfile::tempdir().expect("temp dir");
    let exe = dir.path().join("nogap");
    std::fs::copy(nogap_bin(), &exe).expect("copy nogap");
    let addr = free_addr();
    let mut nogap = start(&exe, dir.path(), addr);
    let [ka, nc] = loads(addr, conns);
    thread::sleep(Duration::from_secs(2));
    let mut windows = Vec::new();
    let mut took = Vec::new();
    let mut failed = 0;
    for _ in 0..n {
        let from = Instant::now();
        let (t, ok) = client(dir.path(), "upgrade");
        failed += usize::from(!ok);
        took.push(t);
        windows.push((from, Instant::now() + Duration::from_millis(50)));
        thread::sleep(Duration::from_secs(2));
    }
    let (ka, nc) = (ka.stop(), nc.stop());
    let t = Latencies::of(took);
    println!(
        "\n## upgrade window: {n} x `nogap upgrade --wait`, 2 s apart, {conns}+{conns} clients\n"
    );
    println!(
        "upgrade --wait took p50 {:.1} ms, max {:.1} ms; {failed} refused; pid kept: {}\n",
        ms(t.p50),
        ms(t.max),
        nogap.count_log("upgraded in place") == n
    );
    println!("| load | requests | failed | steady p99 | steady max | in upgrades: n | p99 | max |");
    println!("|---|--:|--:|--:|--:|--:|--:|--:|");
    for r in [&ka, &nc] {
        let inside = |s: Duration| {
            let at = r.start + s;
            windows.iter().any(|&(a, b)| at >= a && at < b)
        };
        let steady = r.latencies_where(|s| !inside(s.started));
        let during = r.latencies_where(|s| inside(s.started));
        println!(
            "| {} | {} | {} | {:.2} ms | {:.2} ms | {} | {:.2} ms | {:.2} ms |",
            r.mode,
            r.ok(),
            failures(r),
            ms(steady.p99),
            ms(steady.max),
            during.count,
            ms(during.p99),
            ms(during.max)
        );
    }
    nogap.signal(Signal::SIGTERM);
    nogap.try_wait_exit(Duration::from_secs(30));
}

fn main() {
    // `cargo bench` passes `--bench`; nothing else is taken.
    let reloads = env_u64("NOGAP_BENCH_RELOADS", 1000) as usize;
    let n = env_u64("NOGAP_BENCH_UPGRADES", 10) as usize;
    let conns = env_u64("NOGAP_BENCH_CONNS", 8) as usize;
    soak(reloads, conns);
    upgrades(n, conns);
}
