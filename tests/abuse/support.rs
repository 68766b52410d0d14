//! What the abuse tests measure besides the clients: nogap's own fds and
//! memory, its CPU time, reloads through the control socket.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::common::load::{FailureKind, Report};
use crate::common::{nogap_bin, proc_status, Nogap};
use crate::fixture::{misbehave_once, start, Which};

/// nogap with `nogap_args` on `addr`, whose slot 0 worker misbehaves once
/// with the demo's `knobs` (`--abuse KIND --abuse-after T`); its
/// replacement and every other worker behave.
pub fn start_with_slot_0_misbehaving(
    dir: &Path,
    addr: SocketAddr,
    knobs: &str,
    nogap_args: &[&str],
) -> Nogap {
    let worker = misbehave_once(dir, knobs, Which::FirstOfSlot(0));
    start(dir, addr, nogap_args, &[worker.to_str().unwrap()], &[])
}

/// A worker script whose generation 1 is the demo and whose later
/// generations take 60 s to be ready: a reload that stays in progress.
pub fn slow_second_generation(dir: &Path) -> std::path::PathBuf {
    let script = dir.join("slow.sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\nif [ \"$NOGAP_GENERATION\" = 1 ]; then exec '{0}'; fi\nexec '{0}' --start-delay 60s\n",
            crate::common::demo_bin()
        ),
    )
    .expect("write slow.sh");
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod slow.sh");
    script
}

/// Open descriptors of `pid`.
pub fn fds(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// VmRSS of `pid`, in kB.
pub fn rss_kb(pid: i32) -> u64 {
    proc_status(pid, "VmRSS")
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// CPU time (user + system) `pid` has used so far.
pub fn cpu(pid: i32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    // utime and stime: fields 14 and 15 of proc(5), 11 and 12 after ')'.
    let ticks = f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0);
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as u64;
    Duration::from_millis(ticks * 1000 / hz)
}

/// `nogap reload --wait` on the control socket in `dir`: how long it took
/// and whether it succeeded (exit 0).
pub fn reload_wait(dir: &Path, timeout: Duration) -> (Duration, bool, String) {
    let t = Instant::now();
    let out = Command::new(nogap_bin())
        .args(["reload", "--wait", "--timeout"])
        .arg(format!("{}s", timeout.as_secs().max(1)))
        .arg("--control")
        .arg(dir.join("control.sock"))
        .output()
        .expect("run nogap reload");
    let text =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    (t.elapsed(), out.status.success(), text)
}

/// Failures of `report` that started after `t`.
pub fn failures_after(report: &Report, t: Instant) -> Vec<(FailureKind, String)> {
    report
        .failure_log
        .iter()
        .filter(|f| f.at > t)
        .map(|f| (f.kind, f.detail.clone()))
        .collect()
}

/// One line per load, for `--nocapture`.
pub fn print(label: &str, r: &Report) {
    println!(
        "{label}: {} ok, failures {:?}, {} connects",
        r.ok(),
        r.failures,
        r.connects
    );
}
