//! The load generator against a tiny in-process server with scripted
//! misbehaviour: the tests of nogap are only as good as their client.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::thread;
use std::time::Duration;

use crate::common::free_addr;
use crate::common::load::{get_once, Client, FailureKind, Load, LoadConfig, Mode, Target};

/// What the scripted server does with the n-th request (0-based) of a connection.
#[derive(Clone, Copy)]
enum Script {
    /// 200 keep-alive; every 3rd response says `Connection: close`.
    CloseEvery3,
    /// Closes without answering.
    Eof,
    /// Answers garbage.
    Garbage,
    /// Answers 503.
    Status503,
    /// Never answers.
    Silent,
    /// 200 without Content-Length (close-delimited body), HTTP/1.0.
    Http10,
}

fn serve(script: Script) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { break };
            thread::spawn(move || handle(conn, script));
        }
    });
    addr
}

fn handle(conn: TcpStream, script: Script) {
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut out = conn;
    let mut n = 0u32;
    loop {
        // Read one request head.
        let mut close_requested = false;
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            if line.to_ascii_lowercase().starts_with("connection: close") {
                close_requested = true;
            }
            if line == "\r\n" {
                break;
            }
        }
        let pid = 4000 + n;
        let body = format!("pid {pid} gen 7\n");
        let close = close_requested || n % 3 == 2;
        let resp = match script {
            Script::CloseEvery3 => format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nX-Pid: {pid}\r\n{}\r\n{body}",
                body.len(),
                if close { "Connection: close\r\n" } else { "" }
            ),
            Script::Eof => return,
            Script::Garbage => "SMTP ready\r\n\r\n".to_string(),
            Script::Status503 => {
                "HTTP/1.1 503 Busy\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_string()
            }
            Script::Silent => {
                thread::sleep(Duration::from_secs(3));
                return;
            }
            Script::Http10 => format!("HTTP/1.0 200 OK\r\n\r\n{body}"),
        };
        if out.write_all(resp.as_bytes()).is_err() {
            return;
        }
        n += 1;
        if close || matches!(script, Script::Http10) {
            return;
        }
    }
}

#[test]
fn load_keep_alive_reconnects_on_connection_close_without_failure() {
    let addr = serve(Script::CloseEvery3);
    let report = Load::start(
        LoadConfig::new(addr, Mode::KeepAlive)
            .connections(3)
            .max_requests(300),
    )
    .join();
    report.assert_no_failures();
    assert_eq!(report.ok(), 300);
    // Every connection answers 3 requests, then closes; the 3 threads
    // share the 300 requests, so each may end with a partly used connection.
    assert!(
        (100..=102).contains(&report.connects),
        "{}",
        report.summary()
    );
    assert_eq!(report.pids(), [4000, 4001, 4002].into());
    assert!(report.samples.iter().all(|s| s.gen == 7));
}

#[test]
fn load_new_connection_mode_connects_per_request() {
    let addr = serve(Script::CloseEvery3);
    let report = Load::start(
        LoadConfig::new(addr, Mode::NewConnection)
            .connections(2)
            .max_requests(50),
    )
    .join();
    report.assert_no_failures();
    assert_eq!(report.ok(), 50);
    assert_eq!(report.connects, 50);
    assert_eq!(report.pids(), [4000].into());
}

#[test]
fn load_stops_at_the_duration_bound() {
    let addr = serve(Script::CloseEvery3);
    let report = Load::start(
        LoadConfig::new(addr, Mode::KeepAlive)
            .connections(1)
            .duration(Duration::from_millis(300))
            .pause(Duration::from_millis(10)),
    )
    .join();
    report.assert_no_failures();
    assert!(report.ok() > 0);
    assert!(report.elapsed < Duration::from_secs(10), "{report:?}");
}

#[test]
fn load_classifies_failures() {
    let refused = free_addr();
    let cases = [
        (Target::Tcp(refused), FailureKind::Refused),
        (
            Target::Tcp(serve(Script::Eof)),
            FailureKind::EofBeforeResponse,
        ),
        (
            Target::Tcp(serve(Script::Garbage)),
            FailureKind::BadResponse,
        ),
        (Target::Tcp(serve(Script::Status503)), FailureKind::Non2xx),
        (Target::Tcp(serve(Script::Silent)), FailureKind::Timeout),
    ];
    for (target, kind) in cases {
        for mode in [Mode::KeepAlive, Mode::NewConnection] {
            let report = Load::start(
                LoadConfig::new(target.clone(), mode)
                    .connections(1)
                    .max_requests(2)
                    .timeout(Duration::from_millis(300)),
            )
            .join();
            assert_eq!(report.ok(), 0, "{kind} {mode}: {}", report.summary());
            assert_eq!(
                report.failures_of(kind),
                2,
                "{kind} {mode}: {}",
                report.summary()
            );
            assert_eq!(report.failed(), 2, "{kind} {mode}: {}", report.summary());
        }
    }
}

#[test]
fn client_reads_close_delimited_http10_body() {
    let addr = serve(Script::Http10);
    let resp = get_once(&Target::Tcp(addr), Duration::from_secs(5)).unwrap();
    assert_eq!(
        (resp.status, resp.pid, resp.gen),
        (200, Some(4000), Some(7))
    );
    let mut client = Client::new(Target::Tcp(addr), Duration::from_secs(5));
    for _ in 0..3 {
        let resp = client.get().unwrap();
        assert!(resp.close);
        assert!(!client.is_connected());
    }
    assert_eq!(client.connects, 3);
}

#[test]
fn log_patterns_and_fields() {
    use crate::common::{field, LogPattern};
    let line = "2026-11-22T10:26:45.237060Z ERROR reload failed generation=2 \
                reason=worker 0 (pid 9425) exited with status 3 before it was ready";
    assert_eq!(field(line, "generation").as_deref(), Some("2"));
    assert_eq!(
        field(line, "reason").as_deref(),
        Some("worker 0 (pid 9425) exited with status 3 before it was ready")
    );
    assert_eq!(field(line, "pid"), None);
    assert!(LogPattern::parse("reload failed generation=2").matches(line));
    assert!(!LogPattern::parse("reload failed generation=20").matches(line));
    assert!(!LogPattern::parse("reload started").matches(line));
    assert!(LogPattern::parse("reload failed reason=*").matches(line));

    let quoted = r#"INFO worker exited pid=7 status="signal: 9 (SIGKILL)" worker=0"#;
    assert_eq!(
        field(quoted, "status").as_deref(),
        Some("signal: 9 (SIGKILL)")
    );
    assert_eq!(field(quoted, "worker").as_deref(), Some("0"));
    assert!(LogPattern::parse("worker exited pid=7").matches(quoted));
    assert!(!LogPattern::parse("worker exited pid=70").matches(quoted));
    // A message only matches at word boundaries.
    assert!(!LogPattern::parse("generation ready").matches("INFO regeneration ready"));
}
