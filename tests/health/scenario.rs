//! One failure mode under load, from start to recovery, shared by the
//! tests and the benchmark.
#![allow(dead_code)]

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use crate::common::load::{get_once, Mode, Report};
use crate::common::{free_addr, must, process_exists, Nogap, LONG};
use crate::fixture::{load, misbehave_once, pid_of, scratch, start, Outage, Which};

/// A worker failure to run under load.
#[derive(Clone, Debug)]
pub struct Failure<'a> {
    pub workers: u32,
    /// Demo arguments that make a worker fail (counted from its start).
    pub knobs: &'a str,
    pub which: Which,
    /// nogap's options besides the socket, ready mode and workers.
    pub nogap_args: &'a [&'a str],
    /// Load connections per mode (keep-alive and new-connection).
    pub conns: usize,
    /// The failing worker's `--health` port: it must answer while the
    /// worker's accept loop is stalled (the process looks alive).
    pub health: Option<SocketAddr>,
    /// Start the new-connection load only once this log line appeared
    /// (the keep-alive load runs from the start).
    pub new_connections_after: Option<&'a str>,
}

/// What happened.
pub struct Recovery {
    pub outage: Outage,
    /// The `reason=` of the first `replacing unhealthy worker` line.
    pub reason: String,
    pub keep_alive: Report,
    pub new_connection: Report,
    /// The whole nogap log (nogap and its workers).
    pub log: Vec<String>,
}

/// Starts nogap with `failure`, puts it under load, waits (with deadlines)
/// until a replacement took over and traffic flows again, then asserts that
/// no request failed: none refused, none reset, every one answered with a
/// 2xx, those made while nobody accepted included.
pub fn recover_under_load(failure: &Failure) -> Recovery {
    let dir = scratch();
    let addr: SocketAddr = free_addr();
    let script = misbehave_once(dir.path(), failure.knobs, failure.which);
    let workers = failure.workers.to_string();
    let mut args = vec!["-w", &workers, "--drain-timeout", "20s"];
    args.extend_from_slice(failure.nogap_args);
    let nogap = start(dir.path(), addr, &args, &[script.to_str().unwrap()], &[]);
    let original: BTreeSet<u32> = nogap
        .wait_workers(1, failure.workers as usize, LONG)
        .into_iter()
        .map(|p| p as u32)
        .collect();
    let ka = load(addr, Mode::KeepAlive, failure.conns);
    assert!(
        ka.wait_for_more_ok(20, LONG),
        "keep-alive load gets no answers"
    );
    if let Some(line) = failure.new_connections_after {
        nogap.wait_for_log(line, LONG);
    }
    let nc = load(addr, Mode::NewConnection, failure.conns);
    if failure.new_connections_after.is_none() {
        assert!(
            nc.wait_for_more_ok(20, LONG),
            "new-connection load gets no answers"
        );
    }
    if let Some(health) = failure.health {
        nogap.wait_for_log("stalled accept", LONG);
        let answer = get_once(&health.into(), Duration::from_secs(5))
            .unwrap_or_else(|f| panic!("the stalled worker's health port: {f}"));
        assert_eq!(answer.body, b"ok\n", "health port body");
    }

    // Nobody touches nogap from here on: it has to notice by itself.
    let replacing = nogap.wait_for_log("replacing unhealthy worker", LONG);
    // The reason is the last field, and tracing does not quote it.
    let reason = replacing
        .split_once(" reason=")
        .map_or("", |(_, r)| r)
        .to_string();
    let replaced = nogap.wait_for_log("unhealthy worker replaced", LONG);
    let (old, new) = (pid_of_field(&replaced, "old_pid"), pid_of(&replaced));
    must(LONG, "the unhealthy worker drains and exits", || {
        !process_exists(old)
    });
    assert!(
        !original.contains(&(new as u32)),
        "the replacement has a pid of its own"
    );
    // Traffic flows again, on new connections too.
    assert!(
        nc.wait_for_more_ok(50, LONG),
        "new connections are not answered after the replacement"
    );
    assert!(
        ka.wait_for_more_ok(50, LONG),
        "keep-alive clients are not answered after the replacement"
    );
    let keep_alive = ka.stop();
    let new_connection = nc.stop();
    let log = finish(nogap);
    for r in [&keep_alive, &new_connection] {
        r.assert_no_failures();
    }
    let outage =
        Outage::of(&new_connection, &original).expect("a replacement answered new connections");
    if failure.new_connections_after.is_none() {
        assert!(
            outage.before > 0,
            "the failure came before any load was answered: {}",
            new_connection.summary()
        );
    }
    assert!(
        outage.made_during > 0,
        "no connection was made while nobody accepted"
    );
    Recovery {
        outage,
        reason,
        keep_alive,
        new_connection,
        log,
    }
}

fn pid_of_field(line: &str, key: &str) -> i32 {
    crate::common::field(line, key)
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no {key}= in {line:?}"))
}

/// Stops nogap (SIGTERM, bounded wait) and returns its whole log.
pub fn finish(mut nogap: Nogap) -> Vec<String> {
    nogap.signal(nix::sys::signal::Signal::SIGTERM);
    nogap.wait_exit(LONG);
    nogap.lines()
}

/// One line for the test output: what was measured, never asserted.
pub fn report(name: &str, r: &Recovery) {
    eprintln!(
        "{name}: stall onset -> first answer from the replacement: {:.0} ms; \
         {} connections made meanwhile, all answered; detector: {}",
        r.outage.duration().as_secs_f64() * 1000.0,
        r.outage.made_during,
        r.reason
    );
    eprintln!("  {}", r.keep_alive.summary());
    eprintln!("  {}", r.new_connection.summary());
}
