//! Stopping: TERM/INT drain and exit 0; nothing outlives nogap, even when
//! nogap is SIGKILLed.

use std::net::TcpStream;
use std::time::Duration;

use nix::sys::signal::Signal;

use crate::common::load::{get_once, Client, Target};
use crate::common::{free_addr, must, process_exists, LONG};
use crate::util::{code, scratch, start_demo};

fn assert_all_gone(pids: &[i32], what: &str) {
    must(LONG, what, || pids.iter().all(|&p| !process_exists(p)));
}

#[test]
fn term_stops_workers_and_exits_0() {
    for sig in [Signal::SIGTERM, Signal::SIGINT] {
        let dir = scratch();
        let addr = free_addr();
        let mut nogap = start_demo(dir.path(), addr, &["-w", "2"], &[]);
        let workers = nogap.started_pids(Some(1));
        assert_eq!(workers.len(), 2);
        // A keep-alive connection in use is drained, not cut.
        let mut client = Client::new(Target::Tcp(addr), Duration::from_secs(5));
        client.get().expect("request before stop");
        nogap.signal(sig);
        let status = nogap.wait_exit(LONG);
        assert_eq!(code(status), 0, "{sig}: {status:?}");
        nogap.wait_for_log("stopped", LONG);
        assert!(nogap.children().is_empty());
        assert_all_gone(&workers, "workers exit with nogap");
        // Nobody holds the socket any more.
        assert!(
            TcpStream::connect_timeout(&addr, Duration::from_secs(5)).is_err(),
            "{sig}: {addr} still accepts after nogap stopped"
        );
    }
}

#[test]
fn term_kills_a_worker_that_ignores_the_stop_signal_after_the_drain_timeout() {
    let dir = scratch();
    let addr = free_addr();
    let mut nogap = start_demo(
        dir.path(),
        addr,
        &["--drain-timeout", "1s"],
        &["--ignore-term"],
    );
    let workers = nogap.started_pids(Some(1));
    nogap.signal(Signal::SIGTERM);
    let status = nogap.wait_exit(LONG);
    assert_eq!(code(status), 0, "{status:?}");
    assert_all_gone(&workers, "worker SIGKILLed after --drain-timeout");
    let exited = nogap.matching("worker exited");
    assert!(
        exited.iter().any(|l| l.contains("KILL") || l.contains('9')),
        "worker exit by SIGKILL not logged: {exited:?}"
    );
}

#[test]
fn custom_stop_signal_is_sent() {
    // The demo ignores TERM but drains on QUIT.
    let dir = scratch();
    let addr = free_addr();
    let mut nogap = start_demo(
        dir.path(),
        addr,
        &["--stop-signal", "QUIT", "--drain-timeout", "60s"],
        &["--ignore-term"],
    );
    let workers = nogap.started_pids(Some(1));
    nogap.signal(Signal::SIGTERM);
    assert_eq!(code(nogap.wait_exit(LONG)), 0);
    assert_all_gone(&workers, "worker drained on QUIT");
    let exited = nogap.matching("worker exited");
    assert!(
        exited.iter().all(|l| !l.contains("KILL")),
        "worker was killed, not stopped by QUIT: {exited:?}"
    );
}

#[test]
fn sigkill_of_nogap_leaves_no_worker_behind() {
    let dir = scratch();
    let addr = free_addr();
    let mut nogap = start_demo(dir.path(), addr, &["-w", "3"], &[]);
    let workers = nogap.started_pids(Some(1));
    assert_eq!(workers.len(), 3);
    get_once(&Target::Tcp(addr), Duration::from_secs(5)).expect("serving");
    nogap.signal(Signal::SIGKILL);
    nogap.wait_exit(LONG);
    assert_all_gone(&workers, "workers die with a SIGKILLed nogap");
    must(LONG, "the socket closes once all holders are gone", || {
        TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_err()
    });
}
