//! A Go `net/http` server (`apps/go_server.go`, standard library only)
//! built with Debian's Go: `LISTEN_FDS` through `os.NewFile(3, …)` and
//! `net.FileListener`, READY=1, `Shutdown` on TERM; 10 reloads under load.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::common::free_addr;
use crate::util::{
    assert_runs_as_test_user, reloads_under_load, require_setup, scratch,
    slow_request_across_reload, start, worker_pids, GO, TEST_USER,
};

/// `go build` of `DIR/go_server.go` into `DIR/go_server`, with Go's build
/// cache in /var/cache/nogap-test (a test may run without HOME).
pub fn build_go_server(dir: &Path) -> PathBuf {
    let out = dir.join("go_server");
    let status = Command::new(GO)
        .args(["build", "-o"])
        .arg(&out)
        .arg(dir.join("go_server.go"))
        .env("GOCACHE", "/var/cache/nogap-test/go-build")
        .current_dir(dir)
        .status()
        .expect("run go build");
    assert!(status.success(), "go build go_server.go: {status}");
    out
}

#[test]
fn go_net_http_listen_fds_10_reloads() {
    require_setup();
    let dir = scratch();
    let server = build_go_server(dir.path());
    let addr = free_addr();
    let args: Vec<String> = [
        "-l",
        &format!("http={addr}"),
        "-w",
        "2",
        "--user",
        TEST_USER,
        "--nofile",
        "4096",
        "--ready",
        "notify",
        "--drain-timeout",
        "25s",
        "--",
        server.to_str().unwrap(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let nogap = start(dir.path(), &args);
    let out = reloads_under_load(&nogap, addr, 10);
    out.assert_clean();
    let last = worker_pids(&nogap, 11);
    assert_eq!(last.len(), 2);
    assert!(out.last_pids.iter().all(|p| last.contains(&(*p as i32))));
    assert_runs_as_test_user(last, 4096);
    // Shutdown lets the request in progress finish.
    slow_request_across_reload(&nogap, addr, 11).assert_answered_by(11);
}
