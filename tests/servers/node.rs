//! A Node.js `http` server and an Express app, each listening with
//! `listen({fd})`, 10 reloads under load.

use crate::common::free_addr;
use crate::util::{
    assert_runs_as_test_user, node_modules, reloads_under_load, require_setup, scratch,
    slow_request_across_reload, start, worker_pids, CONNECTIONS, TEST_USER,
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

/// Express, stopped the usual way (`server.close()`, which closes idle
/// keep-alive connections since Node 19): every reload closes each
/// keep-alive connection under at most one request, which the client
/// retries; nothing fails.
#[test]
fn express_listen_fd_10_reloads() {
    require_setup();
    let node = which("node").expect("node is not on PATH");
    let dir = scratch();
    let addr = free_addr();
    let app = dir.path().join("express_app.js");
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
        "--env",
        &format!("NODE_PATH={}", node_modules().display()),
        "--ready",
        "alive:500ms",
        "--drain-timeout",
        "20s",
        "--",
        node.to_str().unwrap(),
        app.to_str().unwrap(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let nogap = start(dir.path(), &args);
    let out = reloads_under_load(&nogap, addr, 10);
    out.assert_clean();
    assert!(
        out.stale_closes <= CONNECTIONS * 10,
        "{} stale closes",
        out.stale_closes
    );
    let last = worker_pids(&nogap, 11);
    assert_eq!(last.len(), 2);
    assert!(out.last_pids.iter().all(|p| last.contains(&(*p as i32))));
    assert_runs_as_test_user(last, 3000);
    // server.close() waits for the request in progress.
    slow_request_across_reload(&nogap, addr, 11).assert_answered_by(11);
}

pub fn which(name: &str) -> Option<std::path::PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}
