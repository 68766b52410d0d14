//! A Node.js `http` server that listens with `listen({fd})`, 10 reloads.

use crate::common::free_addr;
use crate::util::{
    assert_runs_as_test_user, reloads_under_load, require_setup, scratch, start, worker_pids,
    TEST_USER,
};

#[test]
fn node_listen_fd_10_reloads() {
    require_setup();
    let node = which("node").expect("node is not on PATH");
    let dir = scratch();
    let addr = free_addr();
    let server = dir.path().join("server.js");
    let args: Vec<String> = [
        "-l",
        &format!("web={addr}"),
        "-w",
        "2",
        "--user",
        TEST_USER,
        "--nofile",
        "3000",
        "--env",
        "SERVER_FD={fd:web}",
        "--ready",
        "alive:500ms",
        "--drain-timeout",
        "20s",
        "--",
        node.to_str().unwrap(),
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
    assert_runs_as_test_user(last, 3000);
}

pub fn which(name: &str) -> Option<std::path::PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}
