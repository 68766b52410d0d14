//! Fixtures of the health tests (and the health benchmark): nogap running a
//! worker that misbehaves once, loads with a generous client timeout, the
//! outage as the clients saw it, and `nogap status --json`.
#![allow(dead_code)]

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::common::load::{Load, LoadConfig, Mode, Report};
use crate::common::{demo_bin, field, nogap_bin, nogap_command, Nogap, LONG};

/// Client timeout: connections made while nobody accepts must wait for the
/// replacement, not give up.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(20);

/// A fresh directory for one test (runtime dir, scripts, notify sockets).
pub fn scratch() -> TempDir {
    tempfile::Builder::new()
        .prefix("nogap-health-")
        .tempdir()
        .expect("temp dir")
}

/// `nogap run -l web=ADDR --ready notify NOGAP_ARGS -- WORKER...` with extra
/// environment, waiting for `generation ready generation=1`.
pub fn start(
    dir: &Path,
    addr: SocketAddr,
    nogap_args: &[&str],
    worker: &[&str],
    env: &[(&str, &str)],
) -> Nogap {
    let mut cmd = nogap_command(dir);
    cmd.arg("-l")
        .arg(format!("web={addr}"))
        .args(["--ready", "notify"])
        .args(nogap_args)
        .arg("--")
        .args(worker);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let nogap = Nogap::spawn("nogap", cmd);
    nogap.wait_for_log("generation ready generation=1", LONG);
    nogap
}

/// Which processes get the failure knobs of [`misbehave_once`].
#[derive(Clone, Copy, Debug)]
pub enum Which {
    /// The first process of every slot; its replacements behave.
    FirstOfEachSlot,
    /// Only the first process of this slot.
    FirstOfSlot(u32),
    /// Every process, replacements included.
    Every,
}

/// A worker script that execs the demo with `knobs` for the processes
/// `which` names and without them for the others (a marker directory per
/// slot, created atomically with `mkdir`, tells the first process from its
/// replacements). `exec` keeps the worker's pid, and LISTEN_PID, its own.
pub fn misbehave_once(dir: &Path, knobs: &str, which: Which) -> PathBuf {
    let condition = match which {
        Which::FirstOfEachSlot => r#"mkdir "$DIR/misbehaved-$NOGAP_WORKER" 2>/dev/null"#.into(),
        Which::FirstOfSlot(n) => {
            format!(
                r#"[ "$NOGAP_WORKER" = {n} ] && mkdir "$DIR/misbehaved-$NOGAP_WORKER" 2>/dev/null"#
            )
        }
        Which::Every => "true".to_string(),
    };
    let body = format!(
        "#!/bin/sh\nDEMO='{}'\nDIR='{}'\nif {condition}; then exec \"$DEMO\" {knobs}; fi\nexec \"$DEMO\"\n",
        demo_bin(),
        dir.display()
    );
    let path = dir.join("worker.sh");
    std::fs::write(&path, body).expect("write worker script");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    path
}

/// A load of `mode` on `addr`: `conns` connections, 2 ms between requests,
/// [`CLIENT_TIMEOUT`]. Does not wait for answers.
pub fn load(addr: SocketAddr, mode: Mode, conns: usize) -> Load {
    Load::start(
        LoadConfig::new(addr, mode)
            .connections(conns)
            .pause(Duration::from_millis(2))
            .timeout(CLIENT_TIMEOUT)
            .duration(Duration::from_secs(300)),
    )
}

/// A keep-alive and a new-connection [`load`]; waits until both got
/// answers.
pub fn loads(addr: SocketAddr, conns: usize) -> (Load, Load) {
    let ka = load(addr, Mode::KeepAlive, conns);
    let nc = load(addr, Mode::NewConnection, conns);
    assert!(
        ka.wait_for_more_ok(20, LONG),
        "keep-alive load gets no answers"
    );
    assert!(
        nc.wait_for_more_ok(20, LONG),
        "new-connection load gets no answers"
    );
    (ka, nc)
}

/// An outage as the new-connection clients saw it.
#[derive(Clone, Debug)]
pub struct Outage {
    /// Start of the first request the misbehaving workers did not take
    /// (it was answered by a replacement): the stall onset, to within the
    /// clients' pause.
    pub onset: Instant,
    /// The first complete answer from a replacement.
    pub first_answer: Instant,
    /// Requests started between the two, all answered by a replacement.
    pub made_during: usize,
    /// Answers from the original workers before the onset.
    pub before: usize,
}

impl Outage {
    /// Finds the outage in a new-connection report: `original` are the pids
    /// of the workers started first. None if no replacement ever answered.
    pub fn of(report: &Report, original: &BTreeSet<u32>) -> Option<Outage> {
        let start = report.start;
        let replaced: Vec<_> = report
            .samples
            .iter()
            .filter(|s| !original.contains(&s.pid))
            .collect();
        let onset = replaced.iter().map(|s| s.started).min()?;
        let first_answer = replaced.iter().map(|s| s.done()).min()?;
        let made_during = report
            .samples
            .iter()
            .filter(|s| s.started >= onset && s.started < first_answer)
            .count();
        let before = report
            .samples
            .iter()
            .filter(|s| original.contains(&s.pid) && s.started < onset)
            .count();
        Some(Outage {
            onset: start + onset,
            first_answer: start + first_answer,
            made_during,
            before,
        })
    }

    /// Stall onset to the first answer from the replacement.
    pub fn duration(&self) -> Duration {
        self.first_answer.saturating_duration_since(self.onset)
    }
}

/// `nogap status --json` of the nogap whose runtime directory is `dir`.
pub fn status(dir: &Path) -> serde_json::Value {
    let out = Command::new(nogap_bin())
        .args(["status", "--json", "--control"])
        .arg(dir.join("control.sock"))
        .output()
        .expect("run nogap status");
    assert!(
        out.status.success(),
        "nogap status failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("status --json is JSON")
}

/// The accept queue depth of the first socket in `nogap status --json`.
pub fn queue_depth(dir: &Path) -> u64 {
    status(dir)["sockets"][0]["queue"]
        .as_u64()
        .expect("a TCP socket has a queue depth")
}

/// The `pid=` of a log line.
pub fn pid_of(line: &str) -> i32 {
    field(line, "pid")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no pid= in {line:?}"))
}

/// The depth of a listener's accept queue, sampled every `every` until
/// `until` says stop (bounded by `limit`): the longest stretch during which
/// every sample was non-empty, the share of non-empty samples, and the mean
/// depth.
#[derive(Clone, Copy, Debug, Default)]
pub struct QueueSamples {
    pub samples: usize,
    pub non_empty: usize,
    pub longest_non_empty: Duration,
    pub mean_depth: f64,
}

impl QueueSamples {
    pub fn watch(
        mut depth: impl FnMut() -> u64,
        every: Duration,
        limit: Duration,
        mut until: impl FnMut(&QueueSamples) -> bool,
    ) -> QueueSamples {
        let deadline = Instant::now() + limit;
        let mut q = QueueSamples::default();
        let mut total = 0u64;
        let mut run_start: Option<Instant> = None;
        while Instant::now() < deadline && !until(&q) {
            let now = Instant::now();
            let d = depth();
            q.samples += 1;
            total += d;
            if d > 0 {
                q.non_empty += 1;
                let since = *run_start.get_or_insert(now);
                q.longest_non_empty = q.longest_non_empty.max(now - since);
            } else {
                run_start = None;
            }
            q.mean_depth = total as f64 / q.samples as f64;
            // The sampling period of this observer, not a synchronisation.
            std::thread::sleep(every.saturating_sub(now.elapsed()));
        }
        q
    }

    pub fn non_empty_share(&self) -> f64 {
        self.non_empty as f64 / self.samples.max(1) as f64
    }
}
