//! The whole supervisor loop, in this process: `supervisor::run` with a real
//! demo worker on a real socket, driven through its signal stream, talking
//! to a fake systemd (a datagram socket as `NOTIFY_SOCKET`).
//!
//! Its own test target: `run` makes the process a child subreaper, reaps
//! every child and kills every descendant when it returns, which would take
//! other tests' children with it.

mod common;

use clap::Parser;
use futures::channel::mpsc;
use signal_hook::consts::{SIGCHLD, SIGHUP, SIGTERM};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixDatagram};

use common::{demo_bin, free_addr, LONG};
use nogap::cli::{Cli, Command};
use nogap::config::{Environment, RunConfig};
use nogap::sockets;
use nogap::supervisor;
use nogap::worker::notify::Upstream;

/// Reads the fake systemd's datagrams until a line `want` arrives (within
/// [`LONG`]); every line of interest is kept in `seen`, in order.
async fn expect(systemd: &UnixDatagram, want: &str, seen: &mut Vec<String>) {
    let mut buf = vec![0u8; 16 * 1024];
    let deadline = tokio::time::Instant::now() + LONG;
    loop {
        let n = tokio::time::timeout_at(deadline, systemd.recv(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("no {want} within {LONG:?}; saw {seen:?}"))
            .expect("recv");
        let text = String::from_utf8_lossy(&buf[..n]).to_string();
        let mut found = false;
        for line in text.lines() {
            if ["READY=1", "RELOADING=1", "STOPPING=1"].contains(&line) {
                seen.push(line.to_string());
                found |= line == want;
            }
        }
        if found {
            return;
        }
    }
}

/// `GET /` with `Connection: close`: the demo answers `pid P gen G`.
async fn get(addr: std::net::SocketAddr) -> String {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .expect("write");
    let mut answer = String::new();
    s.read_to_string(&mut answer).await.expect("read");
    answer
}

#[tokio::test(flavor = "current_thread")]
async fn reload_and_stop_reach_a_fake_systemd() {
    let dir = tempfile::tempdir().expect("temp dir");
    let notify = dir.path().join("notify.sock");
    let systemd = UnixDatagram::bind(&notify).expect("bind fake systemd");
    let addr = free_addr();
    let listen = format!("web={addr}");
    let argv = [
        "nogap",
        "run",
        "-l",
        &listen,
        "--ready",
        "notify",
        "--",
        demo_bin(),
    ];
    let Command::Run(args) = Cli::try_parse_from(argv).expect("arguments").command else {
        panic!("not a run command");
    };
    let config = RunConfig::from_args(&args, None).expect("config");
    let listeners = sockets::open_all(
        Vec::new(),
        &config.listen,
        config.backlog,
        config.reuseport,
        config.steer,
        config.fd_store,
    )
    .expect("listen");
    let upstream = Upstream::new(Some(notify.as_os_str())).expect("upstream");
    // SIGCHLD from the OS (workers must be reaped); HUP and TERM from the test.
    let (send, sent) = mpsc::unbounded::<i32>();
    let chld = signal_hook_tokio::Signals::new([SIGCHLD]).expect("SIGCHLD handler");
    let signals = futures::stream::select(chld, sent);
    let (_requests, requests) = tokio::sync::mpsc::channel(8);
    let run = supervisor::run(
        config,
        listeners,
        Environment::capture(),
        requests,
        signals,
        upstream,
        None,
    );

    let drive = async {
        let mut seen = Vec::new();
        expect(&systemd, "READY=1", &mut seen).await;
        assert!(get(addr).await.contains("gen 1"));
        send.unbounded_send(SIGHUP).expect("send HUP");
        expect(&systemd, "RELOADING=1", &mut seen).await;
        expect(&systemd, "READY=1", &mut seen).await;
        assert!(get(addr).await.contains("gen 2"));
        send.unbounded_send(SIGTERM).expect("send TERM");
        expect(&systemd, "STOPPING=1", &mut seen).await;
        seen
    };
    let (result, seen) = tokio::time::timeout(LONG * 2, async { tokio::join!(run, drive) })
        .await
        .expect("nogap stopped in time");
    result.expect("run returns Ok");
    assert_eq!(seen, ["READY=1", "RELOADING=1", "READY=1", "STOPPING=1"]);
    // Stopped means every worker is gone.
    assert!(common::pids_of_children(std::process::id() as i32).is_empty());
}
