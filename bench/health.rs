//! Accept-health benchmark: how long a dead accept loop costs clients, what
//! watching the queues costs nogap, and whether a saturated worker is ever
//! mistaken for a dead one. Run with `cargo bench --bench health`; see
//! bench/README.md. It measures and prints; it never asserts.
//!
//! 1. Failure modes under load (4 keep-alive and NOGAP_BENCH_CONNS, 50,
//!    new-connection clients, 1 s client timeout: a request not answered
//!    within 1 s fails), NOGAP_BENCH_RUNS runs each: the time from the stall
//!    onset (the first new connection the failing worker did not take) to
//!    the first answer from its replacement, with nogap's default settings
//!    unless the row says otherwise.
//! 2. nogap's CPU (utime+stime from /proc/PID/stat) over
//!    NOGAP_BENCH_CPU_SECS with 64 workers and 16 sockets at the default
//!    health interval, idle and under load, health checks on and off.
//! 3. False positives during NOGAP_BENCH_BUSY_SECS of saturating load:
//!    serial workers (one connection at a time, this binary re-executed)
//!    whose queue never empties, and the demo flooded with new connections.

#[path = "../tests/common/mod.rs"]
mod common;

#[path = "../tests/health/fixture.rs"]
mod fixture;

#[path = "../tests/health/serial.rs"]
mod serial;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use common::load::{Load, LoadConfig, Mode};
use common::{demo_bin, free_addr, Nogap, LONG};
use fixture::{
    misbehave_once, queue_depth, scratch, start, Outage, QueueSamples, Which, CLIENT_TIMEOUT,
};

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Stops nogap (SIGTERM, bounded wait) and returns its log.
fn finish(mut nogap: Nogap) -> Vec<String> {
    nogap.signal(Signal::SIGTERM);
    if nogap.try_wait_exit(LONG).is_none() {
        eprintln!("nogap did not stop within {LONG:?}; killing it");
    }
    nogap.lines()
}

fn count(log: &[String], what: &str) -> usize {
    log.iter().filter(|l| l.contains(what)).count()
}

// ---- 1. failure modes --------------------------------------------------------

struct FailureMode {
    name: &'static str,
    settings: &'static str,
    workers: u32,
    knobs: &'static str,
    nogap_args: &'static [&'static str],
    /// Start the new-connection clients once this log line appeared.
    new_connections_after: Option<&'static str>,
}

const MODES: &[FailureMode] = &[
    FailureMode {
        name: "accept loop stops, 1 worker",
        settings: "defaults (interval 100ms, first sign 150ms)",
        workers: 1,
        knobs: "--stall-accept-after 3s",
        nogap_args: &[],
        new_connections_after: None,
    },
    FailureMode {
        name: "accept loops stop, 4 of 4 workers",
        settings: "defaults (interval 100ms, first sign 150ms)",
        workers: 4,
        knobs: "--stall-accept-after 3s",
        nogap_args: &[],
        new_connections_after: None,
    },
    FailureMode {
        name: "fd leak, EMFILE retried like Go",
        settings: "defaults (--fd-high 90)",
        workers: 1,
        knobs: "--leak-fds-after 3s",
        nogap_args: &[],
        new_connections_after: None,
    },
    FailureMode {
        name: "fd leak, EMFILE retried like Go, no new connection in flight at the leak",
        settings: "--fd-high 0 (queue detector)",
        workers: 1,
        knobs: "--leak-fds-after 3s",
        nogap_args: &["--fd-high", "0"],
        new_connections_after: Some("leaked"),
    },
    FailureMode {
        name: "fd leak, EMFILE retried like Go, new connections in flight at the leak",
        settings: "--fd-high 0 (queue detector)",
        workers: 1,
        knobs: "--leak-fds-after 3s",
        nogap_args: &["--fd-high", "0"],
        new_connections_after: None,
    },
    FailureMode {
        name: "wedged: no WATCHDOG=1, no accept",
        settings: "--worker-watchdog 1s --stall-timeout 0",
        workers: 1,
        knobs: "--stop-watchdog-after 3s --stall-accept-after 3s",
        nogap_args: &["--worker-watchdog", "1s", "--stall-timeout", "0"],
        new_connections_after: None,
    },
];

/// One run of a failure mode.
struct Outcome {
    /// The slowest answer to a new connection.
    max_latency: Duration,
    outage: Option<Duration>,
    made_during: usize,
    failed: u64,
    note: Option<String>,
}

/// The clients' timeout in the failure modes: what a client waits at most.
const FAILURE_CLIENT_TIMEOUT: Duration = Duration::from_secs(1);

/// A load of the failure modes: `conns` clients, 2 ms between requests,
/// [`FAILURE_CLIENT_TIMEOUT`].
fn impatient(addr: SocketAddr, mode: Mode, conns: usize) -> Load {
    Load::start(
        LoadConfig::new(addr, mode)
            .connections(conns)
            .pause(Duration::from_millis(2))
            .timeout(FAILURE_CLIENT_TIMEOUT)
            .duration(Duration::from_secs(300)),
    )
}

fn run_mode(m: &FailureMode) -> Outcome {
    let dir = scratch();
    let addr = free_addr();
    let script = misbehave_once(dir.path(), m.knobs, Which::FirstOfEachSlot);
    let workers = m.workers.to_string();
    let mut args = vec!["-w", &workers, "--drain-timeout", "20s"];
    args.extend_from_slice(m.nogap_args);
    let nogap = start(dir.path(), addr, &args, &[script.to_str().unwrap()], &[]);
    let original: BTreeSet<u32> = nogap
        .wait_workers(1, m.workers as usize, LONG)
        .into_iter()
        .map(|p| p as u32)
        .collect();
    let ka = impatient(addr, Mode::KeepAlive, 4);
    ka.wait_for_more_ok(20, LONG);
    if let Some(line) = m.new_connections_after {
        nogap.try_wait_for_log(line, LONG);
    }
    let nc = impatient(
        addr,
        Mode::NewConnection,
        env_u64("NOGAP_BENCH_CONNS", 50) as usize,
    );
    let mut note = None;
    let waiting_from = nc.ok();
    if nogap
        .try_wait_for_log("unhealthy worker replaced", LONG)
        .is_none()
    {
        note = Some(format!(
            "no replacement within {LONG:?}: {} new connections answered by the \
             failing worker meanwhile",
            nc.ok() - waiting_from
        ));
    } else if !(nc.wait_for_more_ok(50, LONG) && ka.wait_for_more_ok(50, LONG)) {
        note = Some("traffic did not resume".into());
    }
    let (ka, nc) = (ka.stop(), nc.stop());
    finish(nogap);
    let outage = Outage::of(&nc, &original);
    for r in [&ka, &nc] {
        if r.failed() > 0 {
            eprintln!("  failures: {}", r.summary());
            for f in r.failure_log.iter().take(5) {
                eprintln!("    {f}");
            }
        }
    }
    Outcome {
        max_latency: nc.latencies().max,
        outage: outage.as_ref().map(Outage::duration),
        made_during: outage.map_or(0, |o| o.made_during),
        failed: ka.failed() + nc.failed(),
        note,
    }
}

fn failure_modes(runs: u64) {
    println!("\n## Stall onset -> traffic flowing again ({runs} run(s) each, under load)\n");
    println!(
        "| failure mode | settings | workers | onset -> first answer (min / median / max) | \
         made during the stall | slowest answer | failed requests |"
    );
    println!("|---|---|---:|---|---:|---:|---:|");
    for m in MODES {
        let outcomes: Vec<Outcome> = (0..runs).map(|_| run_mode(m)).collect();
        let mut times: Vec<Duration> = outcomes.iter().filter_map(|o| o.outage).collect();
        times.sort();
        let times = match times.len() {
            0 => "n/a".to_string(),
            n => format!(
                "{:.0} / {:.0} / {:.0} ms",
                ms(times[0]),
                ms(times[n / 2]),
                ms(times[n - 1])
            ),
        };
        let notes: Vec<String> = outcomes.iter().filter_map(|o| o.note.clone()).collect();
        let slowest = outcomes
            .iter()
            .map(|o| o.max_latency)
            .max()
            .unwrap_or_default();
        println!(
            "| {} | {} | {} | {times}{} | {} | {:.0} ms | {} |",
            m.name,
            m.settings,
            m.workers,
            if notes.is_empty() {
                String::new()
            } else {
                format!(" ({})", notes.join("; "))
            },
            outcomes.iter().map(|o| o.made_during).sum::<usize>(),
            ms(slowest),
            outcomes.iter().map(|o| o.failed).sum::<u64>(),
        );
    }
}

// ---- 2. cost of monitoring ---------------------------------------------------

/// utime+stime of `pid` (all its threads), in seconds.
fn cpu_secs(pid: i32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = stat.rfind(')').map_or("", |i| &stat[i + 1..]);
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    // After the command name: index 11 is utime (field 14), 12 stime.
    let ticks = f.get(11).unwrap_or(&0) + f.get(12).unwrap_or(&0);
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100)
        .max(1);
    ticks as f64 / hz as f64
}

fn cpu_row(secs: u64, health: bool, loaded: bool) {
    const WORKERS: u32 = 64;
    const SOCKETS: usize = 16;
    let dir = scratch();
    let addrs: Vec<SocketAddr> = (0..SOCKETS).map(|_| free_addr()).collect();
    let mut cmd = common::nogap_command(dir.path());
    for (i, a) in addrs.iter().enumerate() {
        cmd.arg("-l").arg(format!("s{i}={a}"));
    }
    cmd.args(["--ready", "notify", "-w", &WORKERS.to_string()]);
    if !health {
        cmd.args(["--stall-timeout", "0", "--fd-high", "0"]);
    }
    cmd.arg("--").arg(demo_bin());
    let nogap = Nogap::spawn("nogap", cmd);
    if nogap
        .try_wait_for_log("generation ready generation=1", Duration::from_secs(120))
        .is_none()
    {
        println!("| {WORKERS} | {SOCKETS} | ... | did not start |");
        return;
    }
    let clients: Vec<Load> = if loaded {
        addrs
            .iter()
            .map(|&a| {
                Load::start(
                    LoadConfig::new(a, Mode::NewConnection)
                        .connections(1)
                        .pause(Duration::from_millis(1))
                        .duration(Duration::from_secs(secs + 30)),
                )
            })
            .collect()
    } else {
        Vec::new()
    };
    for c in &clients {
        c.wait_for_more_ok(10, LONG);
    }
    let pid = nogap.pid();
    let (t0, c0) = (Instant::now(), cpu_secs(pid));
    // The measurement window itself.
    std::thread::sleep(Duration::from_secs(secs));
    let (t1, c1) = (Instant::now(), cpu_secs(pid));
    let answered: u64 = clients.into_iter().map(|c| c.stop().ok()).sum();
    let log = finish(nogap);
    let pct = (c1 - c0) / (t1 - t0).as_secs_f64() * 100.0;
    println!(
        "| {WORKERS} | {SOCKETS} | {} | {} | {:.2} s over {:.1} s | **{pct:.2}%** | {} | {} |",
        if health {
            "on (defaults)"
        } else {
            "off (--stall-timeout 0 --fd-high 0)"
        },
        if loaded {
            format!("{answered} new connections")
        } else {
            "idle".to_string()
        },
        c1 - c0,
        (t1 - t0).as_secs_f64(),
        count(&log, "accept queue stalled"),
        count(&log, "replacing unhealthy worker"),
    );
}

fn monitoring_cost(secs: u64) {
    println!("\n## nogap CPU, 64 workers x 16 sockets, health interval 100 ms ({secs} s each)\n");
    println!(
        "| workers | sockets | health checks | traffic | nogap utime+stime | of one core | \
         stalls reported | replacements |"
    );
    println!("|---:|---:|---|---|---|---:|---:|---:|");
    for (health, loaded) in [(true, false), (false, false), (true, true), (false, true)] {
        cpu_row(secs, health, loaded);
    }
}

// ---- 3. false positives --------------------------------------------------------

struct Busy {
    name: String,
    workers: u32,
    /// The worker command and its environment.
    worker: Vec<String>,
    env: Vec<(String, String)>,
    conns: usize,
}

fn busy_row(b: &Busy, secs: u64) {
    let dir = scratch();
    let addr = free_addr();
    let workers = b.workers.to_string();
    let worker: Vec<&str> = b.worker.iter().map(String::as_str).collect();
    let env: Vec<(&str, &str)> = b
        .env
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let nogap = start(dir.path(), addr, &["-w", &workers], &worker, &env);
    let load = Load::start(
        LoadConfig::new(addr, Mode::NewConnection)
            .connections(b.conns)
            .timeout(CLIENT_TIMEOUT)
            .duration(Duration::from_secs(secs + 60)),
    );
    load.wait_for_more_ok(1, LONG);
    let from = load.ok();
    let until = Instant::now() + Duration::from_secs(secs);
    let q = QueueSamples::watch(
        || queue_depth(dir.path()),
        Duration::from_millis(100),
        Duration::from_secs(secs + 5),
        |_| Instant::now() >= until,
    );
    let answered = load.ok() - from;
    let report = load.stop();
    let log = finish(nogap);
    println!(
        "| {} | {} | {:.0}% | {:.1} s | {:.1} | {answered} | {} | {} | **{}** |",
        b.name,
        b.conns,
        q.non_empty_share() * 100.0,
        q.longest_non_empty.as_secs_f64(),
        q.mean_depth,
        report.failed(),
        count(&log, "accept queue stalled"),
        count(&log, "replacing unhealthy worker"),
    );
}

fn false_positives(secs: u64) {
    println!("\n## False positives during {secs} s of saturating load (defaults)\n");
    println!(
        "| workers | clients | queue non-empty | longest non-empty | mean depth | answered | \
         failed | stalls reported | replacements |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    let exe = std::env::current_exe()
        .expect("current exe")
        .to_string_lossy()
        .into_owned();
    let serial = |work: u64| vec![(serial::ENV.to_string(), work.to_string())];
    let rows = [
        Busy {
            name: "1 serial, 300 ms/request".into(),
            workers: 1,
            worker: vec![exe.clone()],
            env: serial(300),
            conns: 8,
        },
        Busy {
            name: "4 serial, 100 ms/request".into(),
            workers: 4,
            worker: vec![exe.clone()],
            env: serial(100),
            conns: 48,
        },
        Busy {
            name: "1 demo, new-connection flood".into(),
            workers: 1,
            worker: vec![demo_bin().to_string()],
            env: Vec::new(),
            conns: 32,
        },
    ];
    for b in &rows {
        busy_row(b, secs);
    }
}

fn main() {
    // Re-executed by nogap as a serial worker (section 3)?
    serial::run_if_asked();
    let runs = env_u64("NOGAP_BENCH_RUNS", 3).max(1);
    let cpu_secs = env_u64("NOGAP_BENCH_CPU_SECS", 20).max(1);
    let busy_secs = env_u64("NOGAP_BENCH_BUSY_SECS", 20).max(3);
    println!("# nogap accept-health benchmark");
    println!(
        "\nnogap {} and nogap-demo {} on loopback, {} CPUs",
        common::nogap_bin(),
        demo_bin(),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    failure_modes(runs);
    monitoring_cost(cpu_secs);
    false_positives(busy_secs);
}
