//! What `--metrics` costs nogap: its CPU (utime+stime from /proc/PID/stat)
//! over NOGAP_BENCH_SECS (default 20) with 4 workers and 4 sockets, without
//! scrapes and with 100 scrapes of /metrics a second (one client, a new
//! connection each, as Prometheus-style scrapers do at most). Run with
//! `cargo bench --bench metrics`; it measures and prints, never asserts.

#[path = "../tests/common/mod.rs"]
mod common;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use common::{demo_bin, free_addr, Nogap, LONG};

fn cpu_secs(pid: i32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = stat.rfind(')').map_or("", |i| &stat[i + 1..]);
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    let ticks = f.get(11).unwrap_or(&0) + f.get(12).unwrap_or(&0);
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100)
        .max(1);
    ticks as f64 / hz as f64
}

/// One scrape; its size in bytes, or None on any failure.
fn scrape(addr: SocketAddr) -> Option<usize> {
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .ok()?;
    let mut body = Vec::new();
    s.read_to_end(&mut body).ok()?;
    body.starts_with(b"HTTP/1.1 200").then_some(body.len())
}

fn main() {
    let secs: u64 = std::env::var("NOGAP_BENCH_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let dir = tempfile::tempdir().expect("temp dir");
    let metrics = free_addr();
    let mut args: Vec<String> = Vec::new();
    for i in 0..4 {
        args.extend(["-l".into(), format!("s{i}={}", free_addr())]);
    }
    args.extend(
        [
            "-w",
            "4",
            "--ready",
            "notify",
            "--metrics",
            &metrics.to_string(),
            "--",
        ]
        .map(String::from),
    );
    args.push(demo_bin().into());
    let mut nogap = Nogap::run(dir.path(), &args);
    nogap.wait_for_log("generation ready generation=1", LONG);
    let pid = nogap.pid();

    println!("| scrapes/s | scrapes | failed | bytes each | nogap CPU s | of one core |");
    println!("|--:|--:|--:|--:|--:|--:|");
    for rate in [0u32, 100] {
        let t = Instant::now();
        let c0 = cpu_secs(pid);
        let (mut n, mut failed, mut size) = (0u64, 0u64, 0usize);
        while t.elapsed() < Duration::from_secs(secs) {
            if rate == 0 {
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
            match scrape(metrics) {
                Some(b) => size = b,
                None => failed += 1,
            }
            n += 1;
            // Paced to `rate` a second.
            let due = t + Duration::from_secs_f64(n as f64 / rate as f64);
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
        }
        let cpu = cpu_secs(pid) - c0;
        let wall = t.elapsed().as_secs_f64();
        println!(
            "| {rate} | {n} | {failed} | {size} | {cpu:.2} | {:.2}% |",
            100.0 * cpu / wall
        );
    }
    nogap.signal(Signal::SIGTERM);
    nogap.wait_exit(LONG);
}
