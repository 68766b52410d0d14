//! nogap as PID 1 of a container without systemd, in a fresh PID namespace
//! (`unshare --pid --fork --mount-proc`): it reaps every orphan, reloads on
//! SIGHUP and `nogap reload`, stops on TERM within its drain timeout, and
//! logs to stderr.

use std::process::Command;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::common::{
    free_addr, must, nogap_bin, parent_of, pids_of_children, process_exists, LONG,
};
use crate::util::{both_loads, client, scratch, script};

/// `unshare` with nogap as its child, stderr in a file. The pids nogap logs
/// are the namespace's, so the usual guard (which kills logged workers by
/// pid) must not see them. Dropping kills unshare, and with it
/// (`--kill-child`) nogap and the whole namespace.
struct Namespace {
    child: std::process::Child,
    log: std::path::PathBuf,
}

impl Namespace {
    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn wait_for_count(&self, words: &str, n: usize) {
        must(LONG, &format!("{n} × '{words}' in nogap's stderr"), || {
            self.log_text()
                .lines()
                .filter(|l| l.contains(words))
                .count()
                >= n
        });
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("---- nogap's stderr ----\n{}", self.log_text());
        }
    }
}

/// Zombie children of `pid`: exited, not reaped.
fn zombies_of(pid: i32) -> usize {
    std::fs::read_dir("/proc")
        .map(|dir| {
            dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
                .filter(|&p| parent_of(p) == Some(pid) && !process_exists(p))
                .count()
        })
        .unwrap_or(0)
}

#[test]
fn as_pid_1_it_reaps_orphans_reloads_and_stops_on_term() {
    let dir = scratch();
    let addr = free_addr();
    // Each worker leaves five orphans behind that exit at once: their
    // parent is nogap now, PID 1 and a subreaper, and only it can reap them.
    let worker = script(
        dir.path(),
        "orphans.sh",
        r#"for i in 1 2 3 4 5; do ( sleep 0.05 & ); done
exec "$DEMO""#,
    );
    let listen = format!("web={addr}");
    let mut cmd = Command::new("unshare");
    cmd.args(["--pid", "--fork", "--mount-proc", "--kill-child"])
        .arg(nogap_bin())
        .args(["run", "-l", &listen, "--ready", "notify", "-w", "2"])
        .args(["--drain-timeout", "10s", "--"])
        .arg(&worker)
        .env("RUNTIME_DIRECTORY", dir.path())
        .env("NOGAP_LOG", "debug");
    let log = dir.path().join("stderr.log");
    cmd.stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log file"));
    let mut unshare = Namespace {
        child: cmd.spawn().expect("run unshare"),
        log,
    };
    unshare.wait_for_count("generation ready generation=1", 1);
    let pid1 = pids_of_children(unshare.child.id() as i32);
    assert_eq!(pid1.len(), 1, "unshare's child is nogap: {pid1:?}");
    let nogap = pid1[0];
    let status = std::fs::read_to_string(format!("/proc/{nogap}/status")).unwrap();
    let nspid = status.lines().find(|l| l.starts_with("NSpid:")).unwrap();
    assert!(nspid.ends_with("\t1"), "nogap is PID 1 inside: {nspid}");
    let (ka, nc) = both_loads(addr, 2, Duration::from_millis(5));

    // SIGHUP, then `nogap reload --wait`: each starts a generation, each
    // generation's workers leave orphans.
    kill(Pid::from_raw(nogap), Signal::SIGHUP).expect("HUP nogap");
    unshare.wait_for_count("generation ready generation=2", 1);
    let out = client(dir.path(), &["reload", "--wait"]);
    assert!(out.status.success(), "{out:?}");
    unshare.wait_for_count("generation ready generation=3", 1);
    // 3 generations × 2 workers × 5 orphans, all reaped by nogap.
    unshare.wait_for_count("reaped a process that is not a worker", 30);
    must(LONG, "no zombie left below nogap", || {
        zombies_of(nogap) == 0
    });
    assert!(ka.wait_for_more_ok(20, LONG) && nc.wait_for_more_ok(20, LONG));
    let (ka, nc) = (ka.stop(), nc.stop());
    ka.assert_no_failures();
    nc.assert_no_failures();

    // TERM: every worker drains, nogap exits 0 well within the drain timeout.
    let workers = pids_of_children(nogap);
    assert_eq!(workers.len(), 2, "generation 3's workers: {workers:?}");
    let t = Instant::now();
    kill(Pid::from_raw(nogap), Signal::SIGTERM).expect("TERM nogap");
    let mut status = None;
    must(LONG, "nogap exits", || {
        status = unshare.child.try_wait().expect("wait unshare");
        status.is_some()
    });
    let status = status.expect("exited");
    assert!(status.success(), "unshare (nogap's status): {status:?}");
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    assert!(unshare.log_text().contains("stopped"));
    for w in workers {
        assert!(!process_exists(w), "worker {w} outlived nogap");
    }
}
