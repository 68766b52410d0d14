//! A first generation that can never start is not retried in silence
//! forever (issue #10 item 5): nogap gives up after `--start-limit` failed
//! starts, exits 6, and says why in one line.

use std::net::TcpStream;
use std::time::{Duration, Instant};

use crate::common::{free_addr, Nogap, LONG};
use crate::util::{code, scratch, script};

const NO_WORKER: i32 = 6;

#[test]
fn a_worker_that_exits_2_at_once_makes_nogap_exit_6_and_say_why() {
    let dir = scratch();
    let addr = free_addr();
    let worker = script(
        dir.path(),
        "bad-flag.sh",
        "echo \"myserver: unknown flag --nope\" >&2\nexit 2",
    );
    let listen = format!("web={addr}");
    let t0 = Instant::now();
    let mut nogap = Nogap::run(dir.path(), &["-l", &listen, "--", worker.to_str().unwrap()]);
    let status = nogap.wait_exit(LONG);
    let took = t0.elapsed();
    assert_eq!(code(status), NO_WORKER, "{status:?}");
    // Defaults: 5 failures within 10s. With the backoff (0, 100, 200,
    // 400 ms) that is well under the interval.
    assert!(took < Duration::from_secs(10), "took {took:?}");
    assert_eq!(nogap.count_log("worker started"), 5);
    let lines = nogap.wait_output_closed(LONG);
    let last = lines.last().expect("output");
    assert!(
        last.starts_with("nogap: no worker could start: ")
            && last.contains("exited with status 2 before it was ready")
            && last.contains("5 failed starts within 10s"),
        "{last:?}"
    );
    // Never "stalled" while nothing runs.
    assert_eq!(nogap.count_log("accept queue stalled"), 0, "{lines:?}");
    // The socket is closed: nobody waits on a port nobody will serve.
    assert!(TcpStream::connect_timeout(&addr, Duration::from_secs(2)).is_err());
}

#[test]
fn start_limit_is_configurable_and_0_retries_forever() {
    let dir = scratch();
    let addr = free_addr();
    let worker = script(dir.path(), "bad.sh", "exit 2");
    let listen = format!("web={addr}");
    let mut nogap = Nogap::run(
        dir.path(),
        &[
            "-l",
            &listen,
            "--start-limit",
            "2",
            "--start-limit-interval",
            "1m",
            "--",
            worker.to_str().unwrap(),
        ],
    );
    assert_eq!(code(nogap.wait_exit(LONG)), NO_WORKER);
    assert_eq!(nogap.count_log("worker started"), 2);
    assert!(nogap
        .lines()
        .last()
        .is_some_and(|l| l.contains("2 failed starts within 1m")));

    // --start-limit 0: retried; a waiting client makes the queue
    // non-empty, and nogap says that no worker runs, not that the queue
    // is stalled.
    let mut nogap = Nogap::run(
        dir.path(),
        &[
            "-l",
            &listen,
            "--start-limit",
            "0",
            "--stall-timeout",
            "500ms",
            "--",
            worker.to_str().unwrap(),
        ],
    );
    nogap.wait_for_count("restart scheduled", 6, LONG);
    let _waiting = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).expect("queued");
    nogap.wait_for_log("connections are waiting: no worker is running", LONG);
    assert_eq!(nogap.count_log("accept queue stalled"), 0);
    assert!(nogap.exited().is_none());
}
