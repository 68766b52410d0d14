//! Sockets of every kind reach the workers: TCP v4/v6, UDP, unix, several
//! workers per generation, and sockets passed by a socket activator.

use std::collections::BTreeSet;
use std::net::{SocketAddr, UdpSocket};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use crate::common::load::{get_once, Client, Load, LoadConfig, Mode, Target};
use crate::common::{demo_bin, free_addr, free_port, must, nogap_bin, read_json, Nogap, LONG};
use crate::util::scratch;

const SOCKET_ACTIVATE: &str = "/usr/bin/systemd-socket-activate";

/// Sends `payload` to the UDP socket and returns the reply.
fn udp_echo(addr: SocketAddr, payload: &str) -> String {
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let deadline = Instant::now() + LONG;
    let mut buf = [0u8; 2048];
    // Datagrams can be dropped; resend until answered, within the deadline.
    while Instant::now() < deadline {
        sock.send_to(payload.as_bytes(), addr).unwrap();
        if let Ok((n, _)) = sock.recv_from(&mut buf) {
            return String::from_utf8_lossy(&buf[..n]).into_owned();
        }
    }
    panic!("no UDP echo from {addr} within {LONG:?}");
}

#[test]
fn four_workers_serve_tcp_udp_unix_and_ipv6() {
    let dir = scratch();
    let tcp = free_addr();
    let udp = free_addr();
    let v6: SocketAddr = format!("[::1]:{}", free_port()).parse().unwrap();
    let unix = dir.path().join("s.sock");
    let args = [
        "-w".to_string(),
        "4".into(),
        "--ready".into(),
        "notify".into(),
        "-l".into(),
        format!("web={tcp}"),
        "-l".into(),
        format!("echo=udp://{udp}"),
        "-l".into(),
        format!("v6={v6}"),
        "-l".into(),
        format!("local=unix:{}", unix.display()),
        "--".into(),
        demo_bin().into(),
    ];
    let nogap = Nogap::run(dir.path(), &args);
    nogap.wait_for_log("generation ready generation=1", LONG);
    assert_eq!(nogap.count_log("worker ready"), 4);
    let pids: BTreeSet<u32> = nogap
        .wait_workers(1, 4, LONG)
        .into_iter()
        .map(|p| p as u32)
        .collect();
    assert_eq!(pids.len(), 4, "4 distinct workers");

    // Every worker takes connections from the one shared socket.
    let mut seen = BTreeSet::new();
    let deadline = Instant::now() + LONG;
    while seen.len() < 4 && Instant::now() < deadline {
        let report = Load::start(
            LoadConfig::new(tcp, Mode::NewConnection)
                .connections(8)
                .max_requests(400),
        )
        .join();
        report.assert_no_failures();
        seen.extend(report.pids());
    }
    assert_eq!(seen, pids, "answers came from these workers");

    for target in [Target::Tcp(v6), Target::Unix(unix.clone())] {
        let mut client = Client::new(target.clone(), Duration::from_secs(5));
        for _ in 0..3 {
            let resp = client.get().unwrap_or_else(|f| panic!("{target}: {f}"));
            assert!(pids.contains(&resp.pid.unwrap()), "{target}: {resp:?}");
            assert_eq!(resp.gen, Some(1));
        }
    }
    let reply = udp_echo(udp, "hello");
    let mut words = reply.split_whitespace();
    assert_eq!(words.next(), Some("pid"), "{reply:?}");
    let pid: u32 = words.next().and_then(|p| p.parse().ok()).unwrap();
    assert!(pids.contains(&pid), "{reply:?}");
    assert_eq!(words.next(), Some("hello"));
}

#[test]
fn sockets_from_systemd_socket_activate_are_served_with_their_name() {
    let dir = scratch();
    let activated = free_addr();
    let own = free_addr();
    let report = dir.path().join("r-{pid}.json");
    let mut cmd = Command::new(SOCKET_ACTIVATE);
    cmd.arg("-l")
        .arg(activated.to_string())
        .arg("--fdname=web")
        // systemd-socket-activate passes on only the variables named here.
        .arg(format!(
            "--setenv=RUNTIME_DIRECTORY={}",
            dir.path().display()
        ))
        .arg(nogap_bin())
        .args([
            "run",
            "-l",
            &format!("extra={own}"),
            "--ready",
            "notify",
            "--",
        ])
        .arg(demo_bin())
        .arg("--report")
        .arg(&report);
    let nogap = Nogap::spawn("socket-activate+nogap", cmd);
    // systemd-socket-activate execs nogap on the first connection; that
    // first request must be answered by a worker.
    nogap.wait_for_log(&format!("Listening on {activated}"), LONG);
    let first = thread::spawn(move || get_once(&Target::Tcp(activated), LONG));
    nogap.wait_for_log("generation ready generation=1", LONG);
    let resp = first
        .join()
        .unwrap()
        .unwrap_or_else(|f| panic!("first request: {f}"));
    let pid = nogap.wait_workers(1, 1, LONG)[0];
    assert_eq!(resp.pid, Some(pid as u32));
    nogap.wait_for_log("listening socket=web", LONG);
    nogap.wait_for_log("listening socket=extra", LONG);

    let path = dir.path().join(format!("r-{pid}.json"));
    must(LONG, "report written", || path.exists());
    let r = read_json(&path);
    let env = &r["env"]["all"];
    assert_eq!(env["LISTEN_PID"], pid.to_string());
    assert_eq!(env["LISTEN_FDS"], "2");
    let names: Vec<&str> = env["LISTEN_FDNAMES"].as_str().unwrap().split(':').collect();
    let fds: Vec<i64> = r["fds"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["fd"].as_i64().unwrap())
        .collect();
    assert_eq!(fds, [0, 1, 2, 3, 4], "fd table: {}", r["fds"]);
    // Each name sits at the fd of its socket.
    for (i, name) in names.iter().enumerate() {
        let local = &r["fds"][3 + i]["socket"]["local"];
        let want = match *name {
            "web" => activated.to_string(),
            "extra" => own.to_string(),
            other => panic!("unexpected name {other:?} in {names:?}"),
        };
        assert_eq!(local, &want, "socket named {name} at fd {}", 3 + i);
    }
    assert_eq!(
        names.iter().copied().collect::<BTreeSet<_>>(),
        BTreeSet::from(["web", "extra"])
    );

    for addr in [activated, own] {
        let resp = get_once(&Target::Tcp(addr), Duration::from_secs(5))
            .unwrap_or_else(|f| panic!("{addr}: {f}"));
        assert_eq!(resp.pid, Some(pid as u32));
    }
}

/// The backlog of the listening socket on `addr`, from `ss` (its Send-Q).
fn listen_backlog(addr: SocketAddr) -> Option<u32> {
    let out = Command::new("ss")
        .args(["-ltnH", &format!("sport = :{}", addr.port())])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find(|l| l.contains(&addr.to_string()))?
        .split_whitespace()
        .nth(2)?
        .parse()
        .ok()
}

fn somaxconn() -> u32 {
    std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

#[test]
fn backlog_defaults_to_somaxconn_and_can_be_set() {
    for (args, want) in [(&[][..], somaxconn()), (&["--backlog", "17"][..], 17)] {
        let dir = scratch();
        let addr = free_addr();
        let nogap = crate::util::start_demo(dir.path(), addr, args, &[]);
        assert_eq!(listen_backlog(addr), Some(want), "{args:?}");
        drop(nogap);
    }
}

/// Only `--reuseport` shares the port with other listeners. Steering (the
/// default hand-over) sets SO_REUSEPORT on nogap's TCP sockets, so a raw
/// SO_REUSEPORT socket of the same user can bind; a second nogap still fails
/// as on a port in use.
#[test]
fn reuseport_lets_another_socket_bind_the_port() {
    use socket2::{Domain, Socket, Type};
    let try_bind = |addr: SocketAddr| {
        let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        s.set_reuse_port(true).unwrap();
        s.bind(&addr.into()).map(|_| s)
    };
    for (args, binds) in [
        (&["--reuseport"][..], true),
        (&["--handover", "shared"][..], false),
    ] {
        let dir = scratch();
        let addr = free_addr();
        let _nogap = crate::util::start_demo(dir.path(), addr, args, &[]);
        let second = try_bind(addr);
        assert_eq!(
            second.is_ok(),
            binds,
            "binding a second SO_REUSEPORT socket with {args:?}: {:?}",
            second.err()
        );
    }
    for args in [&[][..], &["--handover", "shared"][..]] {
        let dir = scratch();
        let addr = free_addr();
        let _first = crate::util::start_demo(dir.path(), addr, args, &[]);
        let listen = addr.to_string();
        let mut all = vec!["-l", &listen];
        all.extend_from_slice(args);
        all.extend_from_slice(&["--", crate::common::demo_bin()]);
        let out = crate::common::nogap_command(dir.path())
            .args(&all)
            .current_dir(dir.path())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(3), "second nogap {args:?}: {err}");
        assert!(err.contains("in use"), "{err}");
    }
}
