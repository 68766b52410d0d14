//! gunicorn (sync workers) and uvicorn from PyPI, 10 reloads under load.

use crate::common::free_addr;
use crate::util::{
    assert_runs_as_test_user, children_of, reloads_under_load, require_setup, scratch, start, venv,
    worker_pids, TEST_USER,
};

fn gunicorn(bind: &[&str]) {
    require_setup();
    let dir = scratch();
    let addr = free_addr();
    let mut args: Vec<String> = [
        "-l",
        &format!("http={addr}"),
        "--user",
        TEST_USER,
        "--nofile",
        "4096",
        "--ready",
        "notify",
        "--drain-timeout",
        "20s",
        "--",
        venv().join("bin/gunicorn").to_str().unwrap(),
        "--chdir",
        dir.path().to_str().unwrap(),
        "--workers",
        "2",
        "--worker-class",
        "sync",
        "--no-control-socket",
        "--graceful-timeout",
        "15",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(bind.iter().map(|s| s.to_string()));
    args.push("wsgi_app:app".into());
    let nogap = start(dir.path(), &args);
    let out = reloads_under_load(&nogap, addr, 10);
    out.assert_clean();
    // The arbiter and its workers (who answered) run as the test user.
    let arbiter = worker_pids(&nogap, 11);
    let workers: Vec<i32> = arbiter.iter().flat_map(|&p| children_of(p)).collect();
    assert_eq!(workers.len(), 2, "gunicorn should have 2 workers");
    for pid in &out.last_pids {
        assert!(
            workers.contains(&(*pid as i32)),
            "pid {pid} answered, not a worker of the last arbiter"
        );
    }
    assert_runs_as_test_user(arbiter.into_iter().chain(workers), 4096);
}

#[test]
fn gunicorn_bind_fd_template_10_reloads() {
    gunicorn(&["--bind", "fd://{fd:http}"]);
}

#[test]
fn gunicorn_listen_fds_10_reloads() {
    gunicorn(&[]);
}

#[test]
fn uvicorn_fd_10_reloads() {
    require_setup();
    let dir = scratch();
    let addr = free_addr();
    let args: Vec<String> = [
        "-l",
        &addr.to_string(),
        "--user",
        TEST_USER,
        "--nofile",
        "2048",
        "--ready",
        "alive:500ms",
        "--drain-timeout",
        "20s",
        "--",
        venv().join("bin/uvicorn").to_str().unwrap(),
        "--fd",
        "{fd}",
        "--app-dir",
        dir.path().to_str().unwrap(),
        "--no-access-log",
        "--timeout-graceful-shutdown",
        "15",
        "asgi_app:app",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let nogap = start(dir.path(), &args);
    let out = reloads_under_load(&nogap, addr, 10);
    // uvicorn's graceful stop (server.py `shutdown`) closes every connection
    // whose request it has not started, including ones it accepted an
    // instant before and has not read yet. With steering, nothing new
    // reaches the old generation and it gets its stop signal only once its
    // queue is empty: no new connection is reset.
    out.assert_clean();
    let last = worker_pids(&nogap, 11);
    assert_eq!(
        out.last_pids.iter().map(|&p| p as i32).collect::<Vec<_>>(),
        last
    );
    assert_runs_as_test_user(last, 2048);
}
