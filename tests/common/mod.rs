//! Shared helpers of the integration tests: a process guard for `nogap`
//! ([`proc`]), a load generator ([`load`]), and small /proc and port helpers.
//!
//! Nothing here sleeps to synchronise: [`wait_until`] polls a condition until a
//! deadline, and the process guard waits on its log with a deadline.
#![allow(dead_code)]

pub mod load;
pub mod proc;

use std::net::{Ipv4Addr, SocketAddr, TcpListener, UdpSocket};
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant};

#[allow(unused_imports)]
pub use proc::{demo_bin, field, nogap_bin, nogap_command, LogPattern, Nogap};

/// Deadline for anything that should happen "soon" on a loaded 2-core box.
pub const LONG: Duration = Duration::from_secs(30);

/// Polls `cond` until it holds or `timeout` passed; true if it held. The poll
/// interval grows from 1 ms to 20 ms.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(1);
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return cond();
        }
        thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(20));
    }
}

/// Like [`wait_until`], but panics with `what` on timeout.
pub fn must(timeout: Duration, what: &str, cond: impl FnMut() -> bool) {
    assert!(
        wait_until(timeout, cond),
        "timed out after {timeout:?}: {what}"
    );
}

static NEXT_PORT: AtomicU32 = AtomicU32::new(0);

/// A loopback port free for both TCP and UDP right now. Ports come from
/// 20000..32000 (below Linux's ephemeral range, so the load generator's own
/// outgoing connections cannot take them) in an order derived from the pid,
/// so parallel tests and test binaries rarely collide.
pub fn free_port() -> u16 {
    const BASE: u32 = 20000;
    const SPAN: u32 = 12000;
    let seed = std::process::id().wrapping_mul(7919);
    for _ in 0..SPAN {
        let n = NEXT_PORT.fetch_add(1, Ordering::Relaxed);
        let port = (BASE + (seed.wrapping_add(n.wrapping_mul(13))) % SPAN) as u16;
        let tcp = TcpListener::bind((Ipv4Addr::LOCALHOST, port));
        let udp = UdpSocket::bind((Ipv4Addr::LOCALHOST, port));
        if tcp.is_ok() && udp.is_ok() {
            return port;
        }
    }
    panic!("no free port in {BASE}..{}", BASE + SPAN);
}

/// `127.0.0.1:<free port>`.
pub fn free_addr() -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()))
}

/// Fields of /proc/PID/stat after the command name: index 0 is the state
/// (field 3 of proc(5)), index 1 the ppid, index 2 the pgrp, index 19 the
/// start time.
fn stat_fields(pid: i32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    Some(rest.split_whitespace().map(str::to_string).collect())
}

/// True if `pid` exists and is not a zombie (a zombie has exited; it waits
/// for a parent, possibly an init that does not reap, to collect it).
pub fn process_exists(pid: i32) -> bool {
    match stat_fields(pid) {
        Some(f) => !matches!(f.first().map(String::as_str), Some("Z") | Some("X")),
        None => false,
    }
}

/// The process's start time (clock ticks since boot), to tell a pid from a
/// later reuse of it.
pub fn start_time(pid: i32) -> Option<u64> {
    stat_fields(pid)?.get(19)?.parse().ok()
}

/// Parent pid of `pid`.
pub fn parent_of(pid: i32) -> Option<i32> {
    stat_fields(pid)?.get(1)?.parse().ok()
}

/// Process group of `pid`.
pub fn pgid_of(pid: i32) -> Option<i32> {
    stat_fields(pid)?.get(2)?.parse().ok()
}

/// Live (non-zombie) processes whose parent is `pid`.
pub fn pids_of_children(pid: i32) -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut out: Vec<i32> = dir
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&p| parent_of(p) == Some(pid) && process_exists(p))
        .collect();
    out.sort_unstable();
    out
}

/// A `Key:` line of /proc/PID/status, e.g. `VmRSS` -> "1234 kB".
pub fn proc_status(pid: i32, key: &str) -> Option<String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| {
        l.strip_prefix(key)
            .and_then(|r| r.strip_prefix(':'))
            .map(|v| v.trim().to_string())
    })
}

/// Reads a JSON file (e.g. a `nogap-demo --report`).
pub fn read_json(path: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("bad JSON in {}: {e}", path.display()))
}
