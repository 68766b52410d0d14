//! puma and unicorn from Debian, serving `apps/config.ru`, each reading
//! `LISTEN_FDS` natively, 10 reloads under load.

use crate::common::{free_addr, LONG};
use crate::util::{
    assert_runs_as_test_user, children_of, reloads_under_load, require_setup, scratch,
    slow_request_across_reload, start, worker_pids, Outcome, Running, PUMA, TEST_USER, UNICORN,
};

/// The server's own workers (children of the process nogap follows for
/// generation `gen`) answered the last requests, all as the test user.
fn check_workers(nogap: &Running, out: &Outcome, gen: u32, count: usize, nofile: u64) {
    let master = worker_pids(nogap, gen);
    let workers: Vec<i32> = master.iter().flat_map(|&p| children_of(p)).collect();
    assert_eq!(workers.len(), count, "workers of {master:?}: {workers:?}");
    for pid in &out.last_pids {
        assert!(
            workers.contains(&(*pid as i32)),
            "pid {pid} answered, not a worker of the last master ({workers:?})"
        );
    }
    assert_runs_as_test_user(master.into_iter().chain(workers), nofile);
}

/// puma in cluster mode takes the socket from `LISTEN_FDS` only when `-b`
/// names its address (else it binds 0.0.0.0:9292 and closes the inherited
/// one), sends READY=1 through the sd_notify gem, and stops gracefully on
/// TERM.
///
/// Each worker has more threads (16) than the load has connections (8):
/// puma 5.6's accept thread reads its stop command only after it finds a
/// free thread, so a worker whose threads all serve keep-alive clients that
/// keep sending never sees TERM and held the 20 s drain timeout (thread
/// dumps: `wait_until_not_full` in the accept thread, every pool thread in
/// `process_client`). docs/handoff.md tells operators the same.
#[test]
fn puma_listen_fds_10_reloads() {
    require_setup();
    let dir = scratch();
    let addr = free_addr();
    let args: Vec<String> = [
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
        "--chdir",
        dir.path().to_str().unwrap(),
        "--",
        PUMA,
        "--workers",
        "2",
        "--threads",
        "1:16",
        "--environment",
        "production",
        "--bind",
        &format!("tcp://{addr}"),
        "config.ru",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let nogap = start(dir.path(), &args);
    // puma's master says READY=1 before its cluster workers have booted:
    // reload once both answer, so the load reaches both.
    both_cluster_workers_answer(addr);
    // (puma's log goes to stdout, which Ruby buffers in a pipe: what it
    // says about the socket is seen only at exit. That it serves on it is
    // what counts.)
    let out = reloads_under_load(&nogap, addr, 10);
    out.assert_clean();
    check_workers(&nogap, &out, 11, 2, 4096);
    // TERM is puma's graceful stop: a request in progress is answered.
    slow_request_across_reload(&nogap, addr, 11).assert_answered_by(11);
}

/// Waits (at most [`LONG`]) until requests on fresh connections have been
/// answered by two different puma cluster workers.
fn both_cluster_workers_answer(addr: std::net::SocketAddr) {
    let target = crate::common::load::Target::Tcp(addr);
    let mut seen = std::collections::BTreeSet::new();
    crate::common::must(LONG, "both puma cluster workers answer", || {
        if let Ok(r) = crate::common::load::get_once(&target, std::time::Duration::from_secs(5)) {
            seen.extend(r.pid);
        }
        seen.len() >= 2
    });
}

/// unicorn inherits `LISTEN_FDS` sockets (as "immortal" listeners it never
/// closes); its graceful stop is QUIT, TERM kills the workers at once.
#[test]
fn unicorn_listen_fds_quit_10_reloads() {
    require_setup();
    let dir = scratch();
    let addr = free_addr();
    let conf = dir.path().join("unicorn.conf.rb");
    std::fs::write(&conf, "worker_processes 2\ntimeout 30\n").unwrap();
    let args: Vec<String> = [
        "-l",
        &format!("http={addr}"),
        "--stop-signal",
        "QUIT",
        "--user",
        TEST_USER,
        "--nofile",
        "4096",
        "--ready",
        "alive:1s",
        "--drain-timeout",
        "20s",
        "--chdir",
        dir.path().to_str().unwrap(),
        "--",
        UNICORN,
        "--env",
        "deployment",
        "-c",
        conf.to_str().unwrap(),
        "config.ru",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let nogap = start(dir.path(), &args);
    nogap.wait_for_log(&format!("inherited addr={addr} fd=3"), LONG);
    let out = reloads_under_load(&nogap, addr, 10);
    out.assert_clean();
    // unicorn answers every request with `Connection: close`: no keep-alive
    // connection to close under a request.
    assert_eq!(out.stale_closes, 0);
    check_workers(&nogap, &out, 11, 2, 4096);
    assert_eq!(nogap.count_log("master complete"), 10);
    // QUIT lets a worker finish the request in progress (TERM would not).
    slow_request_across_reload(&nogap, addr, 11).assert_answered_by(11);
}
