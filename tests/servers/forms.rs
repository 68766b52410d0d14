//! The other hand-off forms with real consumers: einhorn's conventions,
//! Server::Starter (Starman), nginx on a unix socket with mode and owner,
//! UDP by template, and `{generation}`/`{worker}` templates.

use std::collections::BTreeMap;
use std::net::UdpSocket;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::time::{Duration, Instant};

use crate::common::load::{get_once, Target};
use crate::common::{free_addr, read_json, LONG};
use crate::nginx::nginx_conf_for;
use crate::util::{
    assert_runs_as_test_user, children_of, reload, reloads_under_load, require_setup, scratch,
    start, test_ids, user_dir, worker_pids, Running, NGINX, TEST_USER,
};

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// The environment of a running process.
fn environ(pid: i32) -> BTreeMap<String, String> {
    let raw = std::fs::read(format!("/proc/{pid}/environ")).expect("environ");
    raw.split(|&b| b == 0)
        .filter_map(|kv| {
            let kv = String::from_utf8_lossy(kv);
            let (k, v) = kv.split_once('=')?;
            Some((k.to_string(), v.to_string()))
        })
        .collect()
}

#[test]
fn einhorn_workers_find_their_socket() {
    require_setup();
    let dir = scratch();
    let addr = free_addr();
    let nogap = start_einhorn_worker(dir.path(), &addr.to_string(), "2", &[]);
    let out = reloads_under_load(&nogap, addr, 3);
    out.assert_clean();
    assert_eq!(out.stale_closes, 0);
    let pids = worker_pids(&nogap, 4);
    let mut slots = Vec::new();
    for pid in &pids {
        let env = environ(*pid);
        assert_eq!(env["EINHORN_FD_COUNT"], "1");
        assert_eq!(env["EINHORN_FD_0"], "3");
        assert_eq!(env["EINHORN_FDS"], "3");
        assert_eq!(env["EINHORN_MASTER_PID"], nogap.pid().to_string());
        slots.push(env["EINHORN_CHILD_INDEX"].clone());
        // LISTEN_FDS is set as well.
        assert_eq!(env["LISTEN_FDS"], "1");
        assert_eq!(env["LISTEN_PID"], pid.to_string());
    }
    slots.sort();
    assert_eq!(slots, ["0", "1"]);
}

/// `nogap run --fds-as einhorn --ready notify -- einhorn_worker.py FLAGS`,
/// `workers` workers as the test user. With `--ack` the worker sends no
/// READY=1 but einhorn's manual ACK, as `Einhorn::Worker.ack!` sends it, on
/// EINHORN_SOCK_PATH.
fn start_einhorn_worker(
    dir: &std::path::Path,
    addr: &str,
    workers: &str,
    flags: &[&str],
) -> Running {
    let worker = dir.join("einhorn_worker.py");
    let mut args = strings(&[
        "-l",
        addr,
        "-w",
        workers,
        "--fds-as",
        "einhorn",
        "--ready",
        "notify",
        "--user",
        TEST_USER,
        "--",
        "/usr/bin/python3",
        worker.to_str().unwrap(),
    ]);
    args.extend(strings(flags));
    start(dir, &args)
}

#[test]
fn einhorn_manual_ack_makes_a_worker_ready() {
    require_setup();
    let dir = scratch();
    let addr = free_addr();
    let nogap = start_einhorn_worker(dir.path(), &addr.to_string(), "2", &["--ack"]);
    let first: Vec<String> = worker_pids(&nogap, 1)
        .iter()
        .map(|&pid| environ(pid)["EINHORN_SOCK_PATH"].clone())
        .collect();
    let out = reloads_under_load(&nogap, addr, 3);
    out.assert_clean();
    assert_eq!(out.stale_closes, 0);
    let (uid, _, _) = test_ids();
    let mut paths = Vec::new();
    for pid in worker_pids(&nogap, 4) {
        let path = environ(pid)["EINHORN_SOCK_PATH"].clone();
        assert!(path.ends_with(".einhorn.sock"), "{path}");
        let meta = std::fs::metadata(&path).expect("EINHORN_SOCK_PATH exists");
        assert_eq!(meta.uid(), uid, "{path} is the worker user's");
        paths.push(path);
    }
    paths.sort();
    paths.dedup();
    assert_eq!(paths.len(), 2, "one socket per worker: {paths:?}");
    assert!(nogap.matching("bad notify message ignored").is_empty());
    // A forgotten worker's socket goes with it.
    crate::common::must(LONG, "generation 1's einhorn sockets are removed", || {
        first.iter().all(|p| !std::path::Path::new(p).exists())
    });
}

#[test]
fn einhorn_bad_line_then_ack_still_ready() {
    require_setup();
    let dir = scratch();
    let addr = free_addr();
    // start() waits for generation 1 to be ready: the ACK after the bad line.
    let nogap = start_einhorn_worker(
        dir.path(),
        &addr.to_string(),
        "1",
        &["--ack", "--bad-line-first"],
    );
    let bad = nogap.matching("bad notify message ignored");
    assert_eq!(bad.len(), 1, "{bad:?}");
    assert!(
        bad[0].contains("einhorn command socket")
            && bad[0].contains("this is not einhorn's protocol"),
        "{}",
        bad[0]
    );
    reload(&nogap, 2);
    assert_eq!(nogap.matching("bad notify message ignored").len(), 2);
    assert!(get_once(&Target::from(addr), LONG).is_ok_and(|r| r.status == 200));
}

/// Starman reads SERVER_STARTER_PORT through Server::Starter. It is served
/// and reloaded here without concurrent load: Net::Server::PreFork, under
/// Starman, has a child that gets HUP between accept() and marking itself
/// busy exit with the accepted connection (a reset), which nogap cannot
/// prevent (see docs/handoff.md).
#[test]
fn server_starter_with_starman() {
    require_setup();
    let dir = scratch();
    let addr = free_addr();
    let app = dir.path().join("app.psgi");
    let nogap = start(
        dir.path(),
        &strings(&[
            "-l",
            &format!("http={addr}"),
            "--fds-as",
            "server-starter",
            "--stop-signal",
            "QUIT",
            "--user",
            TEST_USER,
            "--nofile",
            "2500",
            "--ready",
            "alive:1s",
            "--",
            "/usr/bin/starman",
            "--workers",
            "2",
            app.to_str().unwrap(),
        ]),
    );
    for gen in 1..=4 {
        if gen > 1 {
            reload(&nogap, gen);
        }
        let master = worker_pids(&nogap, gen)[0];
        let workers = children_of(master);
        crate::common::must(LONG, "the old generation exits", || {
            (1..gen).all(|g| !crate::common::process_exists(worker_pids(&nogap, g)[0]))
        });
        for _ in 0..20 {
            let r = get_once(&Target::Tcp(addr), LONG).expect("Starman answers");
            assert_eq!(r.status, 200);
            assert_eq!(r.gen, Some(gen));
            assert!(workers.contains(&(r.pid.unwrap() as i32)));
            // What the app saw (Starman rewrites its /proc/PID/environ).
            let port = format!("{addr}=3");
            assert_eq!(r.header("X-Server-Starter-Port"), Some(port.as_str()));
            let g = gen.to_string();
            assert_eq!(r.header("X-Server-Starter-Generation"), Some(g.as_str()));
        }
        if gen == 4 {
            assert_runs_as_test_user(std::iter::once(master).chain(workers), 2500);
        }
    }
}

#[test]
fn nginx_serves_a_unix_socket_with_mode_and_owner() {
    require_setup();
    let dir = scratch();
    let tcp = free_addr();
    let run = user_dir(dir.path(), "sock");
    let path = run.join("api.sock");
    let conf = nginx_conf_for(
        dir.path(),
        &[&tcp.to_string(), &format!("unix:{}", path.display())],
    );
    let pid = format!("pid {}/run/nginx-{{generation}}.pid;", dir.path().display());
    let nogap = start(
        dir.path(),
        &strings(&[
            "-l",
            &format!("http={tcp}"),
            "-l",
            &format!(
                "api=unix:{}?mode=0660&owner={TEST_USER}:nogap-test-extra",
                path.display()
            ),
            "--fds-as",
            "nginx",
            "--stop-signal",
            "QUIT",
            "--user",
            TEST_USER,
            "--ready",
            "alive:500ms",
            "--",
            NGINX,
            "-e",
            "stderr",
            "-p",
            dir.path().to_str().unwrap(),
            "-c",
            conf.to_str().unwrap(),
            "-g",
            &pid,
        ]),
    );
    let (uid, _, extra) = test_ids();
    let check_file = || {
        let meta = std::fs::symlink_metadata(&path).expect("the socket file is there");
        assert_eq!(meta.permissions().mode() & 0o777, 0o660);
        assert_eq!((meta.uid(), meta.gid()), (uid, extra));
    };
    check_file();
    let out = reloads_under_load(&nogap, Target::Unix(path.clone()), 3);
    out.assert_clean();
    // nginx leaves the inherited socket file alone when a generation exits.
    check_file();
    assert_eq!(
        nogap.count_log("using inherited sockets from \"3;4;\""),
        4,
        "each generation got both sockets in NGINX"
    );
    let t = crate::common::load::get_once(&Target::Tcp(tcp), LONG).expect("tcp still served");
    assert_eq!(t.status, 200);
}

/// Sends `payload` until answered; the reply.
fn udp_ask(addr: std::net::SocketAddr, payload: &str) -> String {
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let deadline = Instant::now() + LONG;
    let mut buf = [0u8; 2048];
    while Instant::now() < deadline {
        sock.send_to(payload.as_bytes(), addr).unwrap();
        if let Ok((n, _)) = sock.recv_from(&mut buf) {
            return String::from_utf8_lossy(&buf[..n]).into_owned();
        }
    }
    panic!("no UDP answer from {addr}");
}

#[test]
fn udp_socket_by_template_across_reloads() {
    require_setup();
    let dir = scratch();
    let tcp = free_addr();
    let udp = free_addr();
    let echo = dir.path().join("udp_echo.py");
    let nogap = start(
        dir.path(),
        &strings(&[
            "-l",
            &format!("web={tcp}"),
            "-l",
            &format!("dns=udp://{udp}"),
            "--ready",
            "notify",
            "--user",
            TEST_USER,
            "--",
            "/usr/bin/python3",
            echo.to_str().unwrap(),
            "{fd:dns}",
        ]),
    );
    let first = worker_pids(&nogap, 1)[0];
    assert_eq!(udp_ask(udp, "a"), format!("pid {first} gen 1: a"));
    // An fd passed by template: no LISTEN_FDS (see handoff).
    let env = environ(first);
    assert!(!env.contains_key("LISTEN_FDS") && !env.contains_key("LISTEN_PID"));
    for gen in 2..=3 {
        reload(&nogap, gen);
        let pid = worker_pids(&nogap, gen)[0];
        crate::common::must(LONG, "the old generation exits", || {
            !crate::common::process_exists(worker_pids(&nogap, gen - 1)[0])
        });
        assert_eq!(udp_ask(udp, "b"), format!("pid {pid} gen {gen}: b"));
    }
}

#[test]
fn generation_and_worker_templates() {
    require_setup();
    let dir = scratch();
    let addr = free_addr();
    let out = user_dir(dir.path(), "out");
    let probe = dir.path().join("probe.py");
    let nogap = start(
        dir.path(),
        &strings(&[
            "-l",
            &format!("web={addr}"),
            "-w",
            "2",
            "--ready",
            "notify",
            "--user",
            TEST_USER,
            "--env",
            "WEB_FD={fd:web}",
            "--env",
            "TAG=g{generation}w{worker}",
            "--",
            "/usr/bin/python3",
            probe.to_str().unwrap(),
            &format!("{}/probe-{{generation}}-{{worker}}.json", out.display()),
            "--literal={{fd}}",
        ]),
    );
    reload(&nogap, 2);
    for gen in 1..=2 {
        for slot in 0..2 {
            let p = read_json(&out.join(format!("probe-{gen}-{slot}.json")));
            assert_eq!(p["env"]["WEB_FD"], "3");
            assert_eq!(p["env"]["TAG"], format!("g{gen}w{slot}"));
            assert_eq!(p["env"]["NOGAP_GENERATION"], gen.to_string());
            assert_eq!(p["argv"][2], "--literal={fd}");
            // No fd template in argv: LISTEN_FDS is set.
            assert_eq!(p["env"]["LISTEN_FDS"], "1");
            assert_eq!(p["env"]["LISTEN_PID"], p["pid"].to_string());
        }
    }
}
