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

use super::ExitStatus;

/// Wait for the daemon of a worker (whose first process exited with status
/// 0) to name itself in `path`: its pid, or how the first process's exit
/// stands after all.
pub async fn follow(path: PathBuf, timeout: Duration) -> Result<i32, ExitStatus> {
    let deadline = Instant::now() + timeout;
    let me = std::process::id() as i32;
    let mut pause = Duration::from_millis(1);
    // Why the daemon cannot be followed (yet): nothing named, or not ours.
    let mut not_ours = None;
    loop {
        if let Some(pid) = read_pid(&path) {
            match process_of(pid, me) {
                Process::OurChild => return Ok(pid),
                Process::Gone => return Err(ExitStatus::DaemonNotRunning { pid, pidfile: path }),
                // Its parent may be an intermediate process, still exiting.
                Process::NotOurs => not_ours = Some(pid),
            }
        }
        if Instant::now() >= deadline {
            let status = match not_ours {
                Some(pid) => ExitStatus::DaemonNotOurs {
                    pid,
                    pidfile: path,
                    within: timeout,
                },
                None => ExitStatus::DaemonNoPid {
                    pidfile: path,
                    within: timeout,
                },
            };
            return Err(status);
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(20));
    }
}

/// [`follow`] in a task of its own; what it found, made an event by
/// `event`, is sent on `tx`.
pub fn watch<E: Send + 'static>(
    path: PathBuf,
    timeout: Duration,
    tx: tokio::sync::mpsc::Sender<E>,
    event: impl FnOnce(Result<i32, ExitStatus>) -> E + Send + 'static,
) {
    tokio::spawn(async move {
        let _ = tx.send(event(follow(path, timeout).await)).await;
    });
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

/// Reap every exited child: pids and how they ended.
pub fn reap() -> Vec<(i32, ExitStatus)> {
    use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
    let mut out = Vec::new();
    loop {
        let (pid, status) = match waitpid(None::<Pid>, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(pid, code)) => (pid, ExitStatus::Exited(code)),
            Ok(WaitStatus::Signaled(pid, sig, _)) => (pid, ExitStatus::Signaled(sig)),
            Ok(WaitStatus::StillAlive) | Err(_) => return out,
            Ok(_) => continue,
        };
        out.push((pid.as_raw(), status));
    }
}

/// SIGKILL each of `pids` and its process group (nogap leaves), then
/// every process left below nogap.
pub fn kill_all(pids: impl Iterator<Item = i32>) {
    for pid in pids {
        let _ = nix::sys::signal::killpg(Pid::from_raw(pid), Signal::SIGKILL);
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    }
    kill_descendants();
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
        // No pid at all, within the time.
        let ev = follow(p.clone(), Duration::from_millis(30)).await;
        assert!(matches!(&ev, Err(ExitStatus::DaemonNoPid { .. })), "{ev:?}");
        // A pid file naming a process that is not our child (our parent)
        // times out.
        let parent = nix::unistd::getppid().as_raw();
        std::fs::write(&p, parent.to_string()).unwrap();
        let ev = follow(p.clone(), Duration::from_millis(30)).await;
        assert!(
            matches!(&ev, Err(ExitStatus::DaemonNotOurs { pid, .. }) if *pid == parent),
            "{ev:?}"
        );
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        std::fs::write(&p, format!("{}\n", child.id())).unwrap();
        let ev = follow(p.clone(), Duration::from_secs(5)).await;
        assert_eq!(ev, Ok(child.id() as i32));
        child.kill().unwrap();
        child.wait().unwrap();
        let ev = follow(p, Duration::from_secs(5)).await;
        assert!(
            matches!(&ev, Err(ExitStatus::DaemonNotRunning { .. })),
            "{ev:?}"
        );
    }
}
