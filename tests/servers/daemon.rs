//! A double-forking daemon: followed through its pid file, reloaded 10
//! times; its intermediate processes are reaped; nothing outlives nogap.

use nix::sys::signal::Signal;

use crate::common::{free_addr, process_exists, LONG};
use crate::util::{
    assert_runs_as_test_user, reloads_under_load, require_setup, scratch, start, user_dir,
    worker_pids, TEST_USER,
};

#[test]
fn double_forking_daemon_10_reloads() {
    require_setup();
    let dir = scratch();
    let addr = free_addr();
    let run = user_dir(dir.path(), "run");
    let pidfile = format!("{}/daemon-{{generation}}.pid", run.display());
    let args: Vec<String> = [
        "-l",
        &addr.to_string(),
        "--user",
        TEST_USER,
        "--nofile",
        "1500",
        "--pidfile",
        &pidfile,
        "--ready",
        "alive:300ms",
        "--drain-timeout",
        "20s",
        "--",
        "/usr/bin/python3",
        dir.path().join("daemon.py").to_str().unwrap(),
        &pidfile,
        "{fd}",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut nogap = start(dir.path(), &args);
    let first = nogap.started_pids(Some(1));
    let daemon = worker_pids(&nogap, 1);
    assert_ne!(
        first, daemon,
        "nogap should follow the daemon, not its first process"
    );
    // The daemon is in its own session, adopted by nogap.
    assert_eq!(crate::common::parent_of(daemon[0]), Some(nogap.pid()));
    let out = reloads_under_load(&nogap, addr, 10);
    out.assert_clean();
    let last = worker_pids(&nogap, 11);
    assert_eq!(
        out.last_pids.iter().map(|&p| p as i32).collect::<Vec<_>>(),
        last
    );
    assert_runs_as_test_user(last.clone(), 1500);
    assert_eq!(nogap.count_log("worker exited before it was ready"), 0);
    // The first and intermediate processes of every generation were reaped:
    // nogap's only child is the last daemon, and no zombie is left.
    assert_eq!(crate::common::pids_of_children(nogap.pid()), last);
    let me = nogap.pid();
    crate::common::must(LONG, "no zombie children", || {
        zombie_children(me).is_empty()
    });
    nogap.signal(Signal::SIGTERM);
    let status = nogap.wait_exit(LONG);
    assert_eq!(status.code(), Some(0), "{}", nogap.log_text());
    assert!(!process_exists(last[0]), "the daemon outlived nogap");
}

/// Children of `pid` that exited and were not reaped.
fn zombie_children(pid: i32) -> Vec<i32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&p| {
            let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).unwrap_or_default();
            let Some(i) = stat.rfind(')') else {
                return false;
            };
            let f: Vec<&str> = stat[i + 1..].split_whitespace().collect();
            f.first() == Some(&"Z") && f.get(1) == Some(&pid.to_string().as_str())
        })
        .collect()
}

/// A process a worker started in a session of its own outlives the worker
/// (its process group is killed, not its session), becomes nogap's child
/// (nogap is a subreaper), and dies when nogap exits.
#[test]
fn orphans_in_their_own_session_die_with_nogap() {
    require_setup();
    let dir = scratch();
    let out = user_dir(dir.path(), "out");
    let orphan_file = out.join("orphan.pid");
    let script = format!(
        "setsid sleep 1000 & echo $! > {}; exec /usr/bin/python3 {} {}",
        orphan_file.display(),
        dir.path().join("probe.py").display(),
        out.join("probe.json").display()
    );
    let args: Vec<String> = [
        "-l",
        &free_addr().to_string(),
        "--ready",
        "notify",
        "--user",
        TEST_USER,
        "--",
        "/bin/sh",
        "-c",
        &script,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut nogap = start(dir.path(), &args);
    let orphan: i32 = std::fs::read_to_string(&orphan_file)
        .expect("orphan pid")
        .trim()
        .parse()
        .unwrap();
    assert!(process_exists(orphan));
    nogap.signal(Signal::SIGTERM);
    let status = nogap.wait_exit(LONG);
    assert_eq!(status.code(), Some(0), "{}", nogap.log_text());
    crate::common::must(LONG, "the orphan is gone", || !process_exists(orphan));
}
