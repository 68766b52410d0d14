//! Servers that daemonize, and the orphans of every worker.
//!
//! nogap makes itself a child subreaper at start-up
//! (`sys::set_child_subreaper`): a process whose parent exits while nogap
//! runs becomes nogap's child. So a server that daemonizes (forks, maybe
//! twice, and lets its first process exit) stays nogap's child, and every
//! orphan a worker leaves behind is reaped by nogap's `waitpid(-1)` loop.
//!
//! With `--pidfile PATH`, a worker's first process exiting with status 0 is
//! not a failure: [`follow`] polls PATH until the start timeout and yields
//! `MainPid` for the process named there, which must be a running child of
//! nogap (so a pid file can never make nogap signal an unrelated process).
//! If there is none, it yields the first process's `Exited`, late, so the
//! worker fails as usual. nogap removes PATH before it starts each worker,
//! so what it reads was written by that worker.
//!
//! When nogap exits, [`kill_descendants`] SIGKILLs whatever of its process
//! tree is left, adopted orphans included.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::policy::Event;
use crate::worker::WorkerId;

/// Wait for the daemon of `worker` (whose first process `first_pid` exited
/// with status 0) to name itself in `path`; the event says what became of it.
pub async fn follow(worker: WorkerId, first_pid: i32, path: PathBuf, timeout: Duration) -> Event {
    let deadline = Instant::now() + timeout;
    let me = std::process::id() as i32;
    let mut pause = Duration::from_millis(1);
    let mut problem = format!("wrote no pid to {}", path.display());
    loop {
        if let Some(pid) = read_pid(&path) {
            match process_of(pid, me) {
                Process::OurChild => return Event::MainPid { worker, pid },
                Process::Gone => {
                    return Event::Exited {
                        pid: first_pid,
                        status: format!(
                            "exited with status 0, and pid {pid} in {} is not running",
                            path.display()
                        ),
                    }
                }
                // Its parent may be an intermediate process, still exiting.
                Process::NotOurs => {
                    problem = format!(
                        "named pid {pid} in {}, not a child of nogap",
                        path.display()
                    )
                }
            }
        }
        if Instant::now() >= deadline {
            return Event::Exited {
                pid: first_pid,
                status: format!(
                    "exited with status 0 and {problem} within {}",
                    humantime::format_duration(timeout)
                ),
            };
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(20));
    }
}

/// The pid in a pid file: decimal, surrounding white space allowed. None
/// while the file is missing, empty or partly written.
pub fn read_pid(path: &Path) -> Option<i32> {
    let text = std::fs::read_to_string(path).ok()?;
    let text = text.trim();
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok().filter(|&p| p > 1)
}

#[derive(Debug, PartialEq, Eq)]
enum Process {
    /// Running, and nogap is its parent.
    OurChild,
    /// Running, with another parent.
    NotOurs,
    /// No such process, or a zombie.
    Gone,
}

fn process_of(pid: i32, parent: i32) -> Process {
    match stat(pid) {
        Some((state, ppid)) if state != 'Z' && state != 'X' => {
            if ppid == parent {
                Process::OurChild
            } else {
                Process::NotOurs
            }
        }
        _ => Process::Gone,
    }
}

/// State letter and parent pid from /proc/PID/stat.
fn stat(pid: i32) -> Option<(char, i32)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may contain anything.
    let rest = &text[text.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    Some((state, ppid))
}

/// Every live process below `root` in the process tree (by parent pid).
fn descendants(root: i32) -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let procs: Vec<(i32, i32)> = dir
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(|pid| match stat(pid) {
            Some((state, ppid)) if state != 'Z' && state != 'X' => Some((pid, ppid)),
            _ => None,
        })
        .collect();
    let mut out = vec![root];
    let mut i = 0;
    while i < out.len() {
        let parent = out[i];
        out.extend(
            procs
                .iter()
                .filter(|(_, pp)| *pp == parent)
                .map(|(p, _)| *p),
        );
        i += 1;
    }
    out.remove(0);
    out
}

/// SIGKILL every process below nogap: on exit, so that neither a worker nor
/// anything it forked (in whatever process group or session) outlives nogap.
pub fn kill_descendants() {
    let me = std::process::id() as i32;
    for pid in descendants(me) {
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pid_files() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.pid");
        assert_eq!(read_pid(&p), None);
        std::fs::write(&p, "").unwrap();
        assert_eq!(read_pid(&p), None);
        std::fs::write(&p, "12").unwrap();
        assert_eq!(read_pid(&p), Some(12));
        std::fs::write(&p, " 4321\n").unwrap();
        assert_eq!(read_pid(&p), Some(4321));
        std::fs::write(&p, "12a\n").unwrap();
        assert_eq!(read_pid(&p), None);
        std::fs::write(&p, "1\n").unwrap();
        assert_eq!(read_pid(&p), None, "never follow init");
    }

    #[test]
    fn processes() {
        let me = std::process::id() as i32;
        let parent = nix::unistd::getppid().as_raw();
        assert_eq!(process_of(me, parent), Process::OurChild);
        assert_eq!(process_of(me, 1_000_000_000), Process::NotOurs);
        assert_eq!(process_of(i32::MAX, parent), Process::Gone);
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let c = child.id() as i32;
        assert!(descendants(me).contains(&c));
        assert_eq!(process_of(c, me), Process::OurChild);
        child.kill().unwrap();
        child.wait().unwrap();
        assert_eq!(process_of(c, me), Process::Gone);
    }

    #[tokio::test]
    async fn follow_waits_for_a_child_of_ours() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.pid");
        // A pid file naming a process that is not our child times out.
        std::fs::write(&p, "1").unwrap();
        let ev = follow(7, 42, p.clone(), Duration::from_millis(30)).await;
        assert!(
            matches!(&ev, Event::Exited { pid: 42, status } if status.contains("wrote no pid")),
            "{ev:?}"
        );
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        std::fs::write(&p, format!("{}\n", child.id())).unwrap();
        let ev = follow(7, 42, p.clone(), Duration::from_secs(5)).await;
        assert!(
            matches!(ev, Event::MainPid { worker: 7, pid } if pid == child.id() as i32),
            "{ev:?}"
        );
        child.kill().unwrap();
        child.wait().unwrap();
        let ev = follow(7, 42, p, Duration::from_secs(5)).await;
        assert!(
            matches!(&ev, Event::Exited { pid: 42, status } if status.contains("is not running")),
            "{ev:?}"
        );
    }
}
