//! Every signal has a meaning and none kills by accident (issue #10 item 1):
//! each one sent to nogap under new-connection load costs no request, keeps
//! every worker, and USR1 reaches every worker.

use std::collections::BTreeSet;
use std::process::Command;
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::common::load::{Load, LoadConfig, Mode, Target};
use crate::common::{demo_bin, free_addr, must, nogap_bin, process_exists, Nogap, LONG};
use crate::util::{scratch, start_demo};

/// The signals sent, by number and name: every one whose default action
/// terminates or stops a process and that nogap does not use to stop,
/// reload or upgrade (USR2, tested in `upgrade`), a few harmless ones, and
/// real-time signals. USR1 is forwarded.
fn stray_signals() -> Vec<(i32, String)> {
    let mut sigs: Vec<(i32, String)> = [
        Signal::SIGUSR1,
        Signal::SIGTTIN,
        Signal::SIGTTOU,
        Signal::SIGTSTP,
        Signal::SIGPIPE,
        Signal::SIGALRM,
        Signal::SIGWINCH,
        Signal::SIGPWR,
        Signal::SIGURG,
        Signal::SIGVTALRM,
        Signal::SIGPROF,
        Signal::SIGIO,
        Signal::SIGSYS,
        Signal::SIGXCPU,
        Signal::SIGXFSZ,
        Signal::SIGSTKFLT,
        Signal::SIGCONT,
    ]
    .iter()
    .map(|s| (*s as i32, s.as_str().to_string()))
    .collect();
    let (min, max) = (libc::SIGRTMIN(), libc::SIGRTMAX());
    sigs.extend([
        (min, "SIGRTMIN".to_string()),
        (min + 5, "SIGRTMIN+5".to_string()),
        (max, "SIGRTMAX".to_string()),
    ]);
    sigs
}

/// Sends every stray signal to `target` (nogap's pid as the sender sees
/// it) under new-connection load, each after nogap logged the previous
/// one; then checks: 0 failures, the same workers, nogap alive, and a
/// `SIGUSR1: reopening logs` line from every worker.
fn stray_signals_cost_nothing(nogap: &Nogap, target: i32, addr: std::net::SocketAddr) {
    let workers: BTreeSet<u32> = nogap
        .started_pids(Some(1))
        .iter()
        .map(|&p| p as u32)
        .collect();
    assert_eq!(workers.len(), 2, "{workers:?}");
    let load = Load::start(
        LoadConfig::new(Target::Tcp(addr), Mode::NewConnection)
            .connections(4)
            .duration(Duration::from_secs(60))
            .max_requests(2_000_000),
    );
    assert!(load.wait_for_more_ok(200, LONG), "no traffic before");
    for (signo, name) in stray_signals() {
        let from = nogap.log_len();
        send(target, signo);
        if signo != libc::SIGPIPE {
            // PIPE is SIG_IGN: no line.
            nogap.wait_for_log_from(from, &format!("signal={name}"), LONG);
        }
        assert!(
            load.wait_for_more_ok(50, LONG),
            "traffic stopped after {name}"
        );
        assert!(process_exists(target), "nogap died of {name}");
    }
    for pid in &workers {
        nogap.wait_for_log(&format!("nogap-demo[{pid}]: SIGUSR1: reopening logs"), LONG);
    }
    assert!(load.wait_for_more_ok(200, LONG), "no traffic after");
    let report = load.stop();
    assert_eq!(report.failed(), 0, "{}", report.summary());
    assert!(report.ok() > 1000, "{}", report.summary());
    assert_eq!(report.pids(), workers, "the same workers served throughout");
    assert_eq!(nogap.count_log("worker exited"), 0);
}

/// `kill -N PID`: nix's enum has no real-time signals.
fn send(pid: i32, signo: i32) {
    let status = Command::new("kill")
        .arg(format!("-{signo}"))
        .arg(pid.to_string())
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -{signo} {pid}: {status}");
}

#[test]
fn stray_signals_under_load_cost_nothing() {
    let dir = scratch();
    let addr = free_addr();
    let nogap = start_demo(dir.path(), addr, &["-w", "2"], &[]);
    stray_signals_cost_nothing(&nogap, nogap.pid(), addr);
    // And the meaningful ones still work: HUP reloads, QUIT stops.
    nogap.signal(Signal::SIGHUP);
    nogap.wait_for_log("generation ready generation=2", LONG);
    let mut nogap = nogap;
    nogap.signal(Signal::SIGQUIT);
    assert_eq!(nogap.wait_exit(LONG).code(), Some(0));
}

/// The same with nogap as PID 1 of a PID namespace, where the kernel
/// drops every signal without a handler, and nogap's death would kill
/// every process in the namespace.
#[test]
fn stray_signals_cost_nothing_when_nogap_is_pid_1() {
    let dir = scratch();
    let addr = free_addr();
    let mut cmd = Command::new("unshare");
    cmd.args(["--pid", "--fork", "--mount-proc", nogap_bin(), "run"])
        .env("RUNTIME_DIRECTORY", dir.path())
        .args(["-l", &format!("web={addr}"), "-w", "2", "--ready", "notify"])
        .args(["--", demo_bin()]);
    let nogap = Nogap::spawn_in_pid_namespace("unshare nogap", cmd);
    nogap.wait_for_log("generation ready generation=1", LONG);
    let mut inner = Vec::new();
    must(LONG, "nogap runs below unshare", || {
        inner = nogap.children();
        inner.len() == 1
    });
    stray_signals_cost_nothing(&nogap, inner[0], addr);
    kill(Pid::from_raw(inner[0]), Signal::SIGTERM).expect("TERM");
    nogap.wait_for_log("stopped", LONG);
}
