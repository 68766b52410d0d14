//! The workers a dead nogap left behind, found and stopped by the next one.
//!
//! When nogap dies (SIGKILL, a crash, the SIGABRT of systemd's watchdog),
//! its workers get their parent-death signal, which is the stop signal
//! (`sys::ProcessSettings::death_signal`): they drain, finishing what they
//! serve, instead of being killed mid-request. With `KillMode=process` (the
//! shipped units) systemd leaves them alone and starts the next nogap at
//! once. That one finds them:
//!
//! * under systemd (`INVOCATION_ID`, and nogap's cgroup is a `.service`):
//!   every process of its own cgroup (`cgroup.procs`) but itself;
//! * otherwise, and as well: the [`Record`] its predecessor kept next to the
//!   control socket (`control.workers`: pid and start time of each worker);
//!
//! keeping only processes whose environment has `NOGAP_GENERATION` (what
//! every worker, and its children, inherit; not `nogap reload` from
//! `ExecReload=`). The policy decides when to stop them: the stop signal
//! again once the new first generation is ready, SIGKILL to their process
//! groups after `--drain-timeout`, never before the new generation serves.
//! A leftover is signalled only while its start time is the one found, so a
//! reused pid is never hit.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};

use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;

use crate::config::Environment;

/// A process of the dead nogap's, as found at start-up.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Leftover {
    pub pid: i32,
    /// Start time in clock ticks since boot (`/proc/PID/stat` field 22).
    start: u64,
}

impl Leftover {
    /// Still the process that was found.
    pub fn alive(&self) -> bool {
        start_time(self.pid) == Some(self.start)
    }
}

/// What a previous nogap left: its workers and the names of their output
/// pipes in systemd's fd store.
#[derive(Default)]
pub struct Leftovers {
    pub workers: Vec<Leftover>,
    pub outputs: Vec<String>,
}

impl Leftovers {
    /// The leftovers at start (see [`find`]). Without workers, the pipes
    /// are stale and taken out of the store at once.
    pub fn at_start(env: &Environment, record: &Path) -> Leftovers {
        let workers = find(env, record);
        let mut outputs = crate::sockets::intake::stored_outputs(env);
        if workers.is_empty() {
            outputs
                .drain(..)
                .for_each(|n| crate::sockets::intake::unstore(&n));
        }
        Leftovers { workers, outputs }
    }

    /// SIGKILL the workers (see [`kill_all`]) and take their pipes out of
    /// the fd store: they are gone for good.
    pub fn end(self) {
        let n = kill_all(&self.workers);
        tracing::info!(killed = n, "the previous nogap's workers are gone");
        (self.outputs.iter()).for_each(|n| crate::sockets::intake::unstore(n));
    }
}

/// The leftovers of a previous nogap: its workers and their children.
pub fn find(env: &Environment, record: &Path) -> Vec<Leftover> {
    let me = std::process::id() as i32;
    let mut pids: BTreeSet<i32> = read_record(record).into_iter().collect();
    if env.get("INVOCATION_ID").is_some() {
        pids.extend(cgroup_procs());
    }
    pids.into_iter()
        .filter(|&pid| pid != me && is_worker(pid))
        .filter_map(|pid| {
            Some(Leftover {
                pid,
                start: start_time(pid)?,
            })
        })
        .collect()
}

/// Send `signal` to every leftover still running; how many got it.
pub fn signal(leftovers: &[Leftover], signal: Signal) -> usize {
    leftovers
        .iter()
        .filter(|l| l.alive() && kill(Pid::from_raw(l.pid), signal).is_ok())
        .count()
}

/// SIGKILL every leftover still running, and the process group each one
/// leads (a worker leads its own); how many were running.
pub fn kill_all(leftovers: &[Leftover]) -> usize {
    let mut n = 0;
    for l in leftovers.iter().filter(|l| l.alive()) {
        n += 1;
        let pid = Pid::from_raw(l.pid);
        if nix::unistd::getpgid(Some(pid)) == Ok(pid) {
            let _ = killpg(pid, Signal::SIGKILL);
        }
        let _ = kill(pid, Signal::SIGKILL);
    }
    n
}

/// The record of the running workers, for the next nogap: a line `nogap
/// PID START` for nogap itself, then a line `PID START` per worker.
/// Rewritten (atomically) when the set changes; removed when nogap exits on
/// its own. A record whose nogap still runs (a second nogap started with
/// the same runtime directory) names no leftovers.
#[derive(Debug)]
pub struct Record {
    path: PathBuf,
    written: Vec<i32>,
}

impl Record {
    /// The record next to the control socket `control` (`control.workers`).
    pub fn next_to(control: &Path) -> Record {
        Record {
            path: control.with_extension("workers"),
            written: Vec::new(),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Record `pids` (the live workers), if they changed.
    pub fn update(&mut self, mut pids: Vec<i32>) {
        pids.sort_unstable();
        if pids == self.written {
            return;
        }
        let me = std::process::id() as i32;
        let header = format!("nogap {me} {}\n", start_time(me).unwrap_or(0));
        let text: String = std::iter::once(header)
            .chain(
                pids.iter()
                    .filter_map(|&p| Some(format!("{p} {}\n", start_time(p)?))),
            )
            .collect();
        let tmp = self.path.with_extension("workers.tmp");
        let written = std::fs::File::create(&tmp)
            .and_then(|mut f| f.write_all(text.as_bytes()))
            .and_then(|()| std::fs::rename(&tmp, &self.path));
        match written {
            Ok(()) => self.written = pids,
            Err(e) => {
                tracing::debug!(path = %self.path.display(), error = %e, "cannot record the workers")
            }
        }
    }

    pub fn remove(&self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The pids of a record whose start times still match, if the nogap that
/// wrote it is gone.
fn read_record(path: &Path) -> Vec<i32> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Vec::new();
    };
    let same = |l: &str| -> Option<i32> {
        let (pid, start) = l.split_once(' ')?;
        let (pid, start): (i32, u64) = (pid.parse().ok()?, start.parse().ok()?);
        (pid > 1 && start_time(pid) == Some(start)).then_some(pid)
    };
    let mut lines = text.lines();
    match lines.next().and_then(|l| l.strip_prefix("nogap ")) {
        Some(owner) if same(owner).is_none() => lines.filter_map(same).collect(),
        _ => Vec::new(),
    }
}

/// Every process of nogap's own cgroup, when it is a service's.
fn cgroup_procs() -> Vec<i32> {
    let Ok(text) = std::fs::read_to_string("/proc/self/cgroup") else {
        return Vec::new();
    };
    // cgroup v2: the one line "0::/system.slice/NAME.service".
    let Some(path) = text.lines().find_map(|l| l.strip_prefix("0::")) else {
        return Vec::new();
    };
    if !path.ends_with(".service") {
        return Vec::new();
    }
    std::fs::read_to_string(format!("/sys/fs/cgroup{path}/cgroup.procs"))
        .map(|t| t.lines().filter_map(|l| l.trim().parse().ok()).collect())
        .unwrap_or_default()
}

/// A worker of some nogap, or a child of one: `NOGAP_GENERATION` is in its
/// environment.
fn is_worker(pid: i32) -> bool {
    std::fs::read(format!("/proc/{pid}/environ")).is_ok_and(|env| {
        env.split(|&b| b == 0)
            .any(|kv| kv.starts_with(b"NOGAP_GENERATION="))
    })
}

/// A live process's start time (not a zombie's).
fn start_time(pid: i32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may contain anything.
    let mut fields = text[text.rfind(')')? + 1..].split_whitespace();
    let state = fields.next()?;
    if state == "Z" || state == "X" {
        return None;
    }
    // Fields 4..: starttime is field 22, the 19th after the state.
    fields.nth(18)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_times_and_records() {
        let me = std::process::id() as i32;
        assert!(start_time(me).is_some());
        assert_eq!(start_time(i32::MAX), None);
        let dir = tempfile::tempdir().unwrap();
        let mut record = Record::next_to(&dir.path().join("control.sock"));
        assert_eq!(record.path(), dir.path().join("control.workers"));
        record.update(vec![me, i32::MAX]);
        // Its nogap (this process) runs: nothing is left over.
        assert_eq!(read_record(record.path()), Vec::<i32>::new());
        let start = start_time(me).unwrap();
        let dead_owner = format!("nogap {} 0\n", i32::MAX);
        std::fs::write(record.path(), format!("{dead_owner}{me} {start}\n")).unwrap();
        assert_eq!(read_record(record.path()), vec![me]);
        std::fs::write(record.path(), format!("{dead_owner}{me} 1\n")).unwrap();
        assert!(read_record(record.path()).is_empty(), "another start time");
        record.remove();
        assert!(!record.path().exists());
    }
}
