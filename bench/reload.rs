//! Reload benchmark: what nogap costs, and what a reload costs, seen from
//! clients. Run with `cargo bench --bench reload`; see bench/README.md.
//!
//! For keep-alive and new-connection load (NOGAP_BENCH_CONNS connections,
//! NOGAP_BENCH_SECS seconds each) it runs the demo bare, then the same demo
//! under nogap with a reload every second, and prints requests, failures by
//! kind, latency percentiles, the throughput ratio nogap/bare, and p99 in
//! steady state versus inside reload windows (HUP until the old generation
//! has exited). Then nogap's RSS with 4 workers, and its idle CPU and
//! wake-ups over NOGAP_BENCH_IDLE_SECS. It measures and prints; it never
//! asserts.

#[path = "../tests/common/mod.rs"]
mod common;

use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use common::load::{ms, FailureKind, Latencies, Load, LoadConfig, Mode, Report};
use common::{demo_bin, field, free_addr, proc_status, process_exists, wait_until, Nogap};

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

struct Settings {
    secs: u64,
    conns: usize,
    idle_secs: u64,
}

/// One load run and what happened around it.
struct Run {
    label: String,
    report: Report,
    /// Reload windows: from the HUP to the old generation's exit.
    windows: Vec<(Instant, Instant)>,
    reloads_ok: u32,
    reloads_failed: u32,
    /// nogap's VmRSS after the run, in kB.
    rss_after_kb: Option<u64>,
}

impl Run {
    fn in_window(&self, started: Duration) -> bool {
        let t = self.report.start + started;
        self.windows.iter().any(|&(a, b)| t >= a && t < b)
    }

    fn steady(&self) -> Latencies {
        self.report.latencies_where(|s| !self.in_window(s.started))
    }

    fn during(&self) -> Latencies {
        self.report.latencies_where(|s| self.in_window(s.started))
    }
}

fn wait_accepting(addr: SocketAddr) -> bool {
    wait_until(Duration::from_secs(30), || {
        TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok()
    })
}

fn load_config(addr: SocketAddr, mode: Mode, s: &Settings) -> LoadConfig {
    LoadConfig::new(addr, mode)
        .connections(s.conns)
        .duration(Duration::from_secs(s.secs))
}

fn rss_kb(pid: i32) -> Option<u64> {
    proc_status(pid, "VmRSS")?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

fn run_bare(mode: Mode, s: &Settings) -> Run {
    let addr = free_addr();
    let mut cmd = Command::new(demo_bin());
    cmd.arg("--listen").arg(addr.to_string());
    let mut demo = Nogap::spawn("demo", cmd);
    if !wait_accepting(addr) {
        eprintln!("bare demo does not accept on {addr}:\n{}", demo.log_text());
    }
    let report = Load::start(load_config(addr, mode, s)).join();
    demo.signal(Signal::SIGTERM);
    demo.try_wait_exit(Duration::from_secs(10));
    Run {
        label: "bare demo".into(),
        report,
        windows: Vec::new(),
        reloads_ok: 0,
        reloads_failed: 0,
        rss_after_kb: None,
    }
}

fn run_nogap(mode: Mode, s: &Settings) -> Run {
    let dir = tempfile::tempdir().expect("temp dir");
    let addr = free_addr();
    let listen = format!("web={addr}");
    let args = [
        "-l",
        &listen,
        "--ready",
        "notify",
        "--drain-timeout",
        "10s",
        "--",
        demo_bin(),
    ];
    let mut nogap = Nogap::run(dir.path(), &args);
    if nogap
        .try_wait_for_log("generation ready generation=1", Duration::from_secs(30))
        .is_none()
    {
        eprintln!("nogap did not become ready:\n{}", nogap.log_text());
    }
    let load = Load::start(load_config(addr, mode, s));
    let mut windows = Vec::new();
    let (mut ok, mut failed) = (0, 0);
    let mut gen = 1u32;
    let mut tick = Instant::now() + Duration::from_secs(1);
    let end = load.start_instant() + Duration::from_secs(s.secs);
    while tick + Duration::from_millis(500) < end {
        thread::sleep(tick.saturating_duration_since(Instant::now()));
        tick += Duration::from_secs(1);
        let old = nogap.started_pids(Some(gen));
        let from = nogap.log_len();
        let hup = Instant::now();
        nogap.signal(Signal::SIGHUP);
        let Some(started) =
            nogap.try_wait_for_log_from(from, "reload started", Duration::from_secs(10))
        else {
            failed += 1;
            continue;
        };
        let new_gen: u32 = field(&started, "generation")
            .and_then(|g| g.parse().ok())
            .unwrap_or(gen + 1);
        let ready = format!("generation ready generation={new_gen}");
        let failure = format!("reload failed generation={new_gen}");
        let outcome = wait_until(Duration::from_secs(10), || {
            nogap.count_log(&ready) + nogap.count_log(&failure) > 0
        });
        if outcome && nogap.count_log(&ready) > 0 {
            ok += 1;
            gen = new_gen;
            // The window closes when the old generation has exited (or at
            // the next tick, whichever is first).
            wait_until(tick.saturating_duration_since(Instant::now()), || {
                old.iter().all(|&p| !process_exists(p))
            });
        } else {
            failed += 1;
        }
        windows.push((hup, Instant::now()));
    }
    let report = load.join();
    let rss_after_kb = rss_kb(nogap.pid());
    nogap.signal(Signal::SIGTERM);
    nogap.try_wait_exit(Duration::from_secs(30));
    Run {
        label: "nogap + demo, HUP/s".into(),
        report,
        windows,
        reloads_ok: ok,
        reloads_failed: failed,
        rss_after_kb,
    }
}

/// utime + stime of a process, in clock ticks.
fn cpu_ticks(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// Voluntary and involuntary context switches summed over all threads.
fn ctxt_switches(pid: i32) -> (u64, u64) {
    let mut v = 0;
    let mut nv = 0;
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for t in tasks.flatten() {
            let status = std::fs::read_to_string(t.path().join("status")).unwrap_or_default();
            for line in status.lines() {
                let num = |l: &str| {
                    l.split_whitespace()
                        .last()
                        .and_then(|n| n.parse::<u64>().ok())
                        .unwrap_or(0)
                };
                if line.starts_with("voluntary_ctxt_switches") {
                    v += num(line);
                } else if line.starts_with("nonvoluntary_ctxt_switches") {
                    nv += num(line);
                }
            }
        }
    }
    (v, nv)
}

struct Idle {
    rss_kb: Option<u64>,
    threads: Option<String>,
    cpu_percent: Option<f64>,
    wakeups_per_s: f64,
    nonvoluntary: u64,
    secs: u64,
}

fn measure_idle(s: &Settings) -> Idle {
    let dir = tempfile::tempdir().expect("temp dir");
    let addr = free_addr();
    let listen = format!("web={addr}");
    let args = [
        "-l",
        &listen,
        "-w",
        "4",
        "--ready",
        "notify",
        "--",
        demo_bin(),
    ];
    let mut nogap = Nogap::run(dir.path(), &args);
    nogap.try_wait_for_log("generation ready generation=1", Duration::from_secs(30));
    let pid = nogap.pid();
    // Let start-up settle: every worker is ready.
    wait_until(Duration::from_secs(30), || {
        nogap.count_log("worker ready") >= 4
    });
    let rss_kb = rss_kb(pid);
    let threads = proc_status(pid, "Threads");
    let tick_hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64;
    let cpu0 = cpu_ticks(pid);
    let (v0, nv0) = ctxt_switches(pid);
    let t0 = Instant::now();
    thread::sleep(Duration::from_secs(s.idle_secs));
    let elapsed = t0.elapsed().as_secs_f64();
    let cpu1 = cpu_ticks(pid);
    let (v1, nv1) = ctxt_switches(pid);
    nogap.signal(Signal::SIGTERM);
    nogap.try_wait_exit(Duration::from_secs(30));
    Idle {
        rss_kb,
        threads,
        cpu_percent: match (cpu0, cpu1) {
            (Some(a), Some(b)) => Some((b - a) as f64 / tick_hz / elapsed * 100.0),
            _ => None,
        },
        wakeups_per_s: (v1 - v0) as f64 / elapsed,
        nonvoluntary: nv1 - nv0,
        secs: s.idle_secs,
    }
}

fn failures_cell(r: &Report) -> String {
    FailureKind::ALL
        .iter()
        .map(|k| r.failures_of(*k).to_string())
        .collect::<Vec<_>>()
        .join("/")
}

fn row(mode: Mode, run: &Run) {
    let r = &run.report;
    let l = r.latencies();
    println!(
        "| {:<14} | {:<20} | {:>9} | {:>9.0} | {:>16} | {:>8.2} | {:>8.2} | {:>8.2} |",
        mode.to_string(),
        run.label,
        r.ok(),
        r.throughput(),
        failures_cell(r),
        ms(l.p50),
        ms(l.p99),
        ms(l.max),
    );
}

fn main() {
    // `cargo bench` passes `--bench`; a filter argument is not supported.
    let s = Settings {
        secs: env_u64("NOGAP_BENCH_SECS", 30).max(2),
        conns: env_u64("NOGAP_BENCH_CONNS", 50).max(1) as usize,
        idle_secs: env_u64("NOGAP_BENCH_IDLE_SECS", 10).max(1),
    };
    println!(
        "nogap reload benchmark: {} connections, {} s per run, reload every 1 s; {} CPUs",
        s.conns,
        s.secs,
        thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "failures are refused/reset/timeout/eof-before-response/bad-response/non-2xx/other-io"
    );
    println!();
    println!(
        "| {:<14} | {:<20} | {:>9} | {:>9} | {:>16} | {:>8} | {:>8} | {:>8} |",
        "load", "server", "requests", "req/s", "failures", "p50 ms", "p99 ms", "max ms"
    );
    println!(
        "|{}|{}|{}|{}|{}|{}|{}|{}|",
        "-".repeat(16),
        "-".repeat(22),
        "-".repeat(10) + ":",
        "-".repeat(10) + ":",
        "-".repeat(17) + ":",
        "-".repeat(9) + ":",
        "-".repeat(9) + ":",
        "-".repeat(9) + ":"
    );
    let mut summaries = Vec::new();
    for mode in [Mode::KeepAlive, Mode::NewConnection] {
        let bare = run_bare(mode, &s);
        row(mode, &bare);
        let nogap = run_nogap(mode, &s);
        row(mode, &nogap);
        summaries.push((mode, bare, nogap));
    }
    println!();
    for (mode, bare, nogap) in &summaries {
        let ratio = nogap.report.throughput() / bare.report.throughput().max(1e-9);
        let steady = nogap.steady();
        let during = nogap.during();
        let window_ms: Vec<f64> = nogap
            .windows
            .iter()
            .map(|&(a, b)| ms(b.saturating_duration_since(a)))
            .collect();
        let mean_window = window_ms.iter().sum::<f64>() / window_ms.len().max(1) as f64;
        println!("{mode}:");
        println!("  throughput nogap/bare: {ratio:.3}");
        println!(
            "  reloads: {} ok, {} failed; mean window (HUP to old generation gone) {:.0} ms",
            nogap.reloads_ok, nogap.reloads_failed, mean_window
        );
        println!(
            "  p99 steady:         {:>8.2} ms ({} requests)",
            ms(steady.p99),
            steady.count
        );
        println!(
            "  p99 during reloads: {:>8.2} ms ({} requests)",
            ms(during.p99),
            during.count
        );
        println!(
            "  max steady / during reloads: {:.2} / {:.2} ms",
            ms(steady.max),
            ms(during.max)
        );
        if let Some(kb) = nogap.rss_after_kb {
            println!("  nogap VmRSS after {} reloads: {kb} kB", nogap.reloads_ok);
        }
        for f in nogap.report.failure_log.iter().take(5) {
            println!(
                "  failure at +{:.3}s: {f}",
                f.at.saturating_duration_since(nogap.report.start)
                    .as_secs_f64()
            );
        }
    }
    println!();
    let idle = measure_idle(&s);
    println!("nogap with 4 idle workers:");
    match idle.rss_kb {
        Some(kb) => println!("  VmRSS: {kb} kB"),
        None => println!("  VmRSS: unknown"),
    }
    println!("  threads: {}", idle.threads.as_deref().unwrap_or("?"));
    match idle.cpu_percent {
        Some(p) => println!("  CPU over {} s idle: {p:.3} %", idle.secs),
        None => println!("  CPU over {} s idle: unknown", idle.secs),
    }
    println!(
        "  wake-ups (voluntary context switches, all threads): {:.1}/s; involuntary: {}",
        idle.wakeups_per_s, idle.nonvoluntary
    );
}
