//! nogap's death cuts no request (issue #10 item 2), outside systemd: its
//! workers get the stop signal as their parent-death signal, finish what
//! they serve and exit; the next nogap with the same runtime directory
//! finds what is left (the record next to the control socket) and stops it
//! after --drain-timeout, once it serves itself.

use std::net::SocketAddr;
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use crate::common::load::{get_once, Target};
use crate::common::{free_addr, must, process_exists, LONG};
use crate::util::{scratch, start_demo};

/// `ss`: (accept queue depth of the listener on `addr`, established
/// connections to it).
fn queue_and_established(addr: SocketAddr) -> (u32, usize) {
    let port = addr.port();
    let out = |args: &[&str]| {
        let o = Command::new("ss").args(args).output().expect("run ss");
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let filter = format!("( sport = :{port} )");
    let listen = out(&["-Hltn", &filter]);
    let depth = listen
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u32>().ok())
        .sum();
    let est = out(&["-Htn", "state", "established", &filter])
        .lines()
        .count();
    (depth, est)
}

#[test]
fn sigkill_of_nogap_lets_workers_finish_their_requests() {
    let dir = scratch();
    let addr = free_addr();
    let mut nogap = start_demo(dir.path(), addr, &["-w", "2"], &["--work", "2s"]);
    let workers = nogap.started_pids(Some(1));
    const CLIENTS: usize = 4;
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| thread::spawn(move || get_once(&Target::Tcp(addr), LONG)))
        .collect();
    // Every request accepted by a worker, none waiting in the queue.
    must(LONG, "requests in flight", || {
        queue_and_established(addr) == (0, CLIENTS)
    });
    let killed = Instant::now();
    nogap.signal(Signal::SIGKILL);
    nogap.wait_exit(LONG);
    for c in clients {
        let resp = c.join().unwrap().unwrap_or_else(|f| panic!("cut: {f}"));
        assert_eq!(resp.status, 200);
    }
    assert!(killed.elapsed() < Duration::from_secs(10));
    // They were told to stop (SIGTERM, the stop signal), not killed.
    for pid in &workers {
        nogap.wait_for_log(&format!("nogap-demo[{pid}]: draining (SIGTERM)"), LONG);
    }
    must(LONG, "workers exit once drained", || {
        workers.iter().all(|&p| !process_exists(p))
    });
}

#[test]
fn the_next_nogap_stops_what_a_dead_one_left_once_it_serves() {
    let dir = scratch();
    let (a, b) = (free_addr(), free_addr());
    // Workers that ignore the stop signal outlive a SIGKILLed nogap.
    let mut first = start_demo(
        dir.path(),
        a,
        &["-w", "2", "--drain-timeout", "2s"],
        &["--ignore-term"],
    );
    let left = first.started_pids(Some(1));
    first.signal(Signal::SIGKILL);
    first.wait_exit(LONG);
    get_once(&Target::Tcp(a), LONG).expect("the leftovers still serve");
    assert!(left.iter().all(|&p| process_exists(p)));

    let t0 = Instant::now();
    let second = start_demo(dir.path(), b, &["--drain-timeout", "2s"], &[]);
    second.wait_for_log("a previous nogap's workers are still running count=2", LONG);
    must(
        LONG,
        "the leftovers are killed after the drain timeout",
        || left.iter().all(|&p| !process_exists(p)),
    );
    assert!(t0.elapsed() >= Duration::from_secs(2), "{:?}", t0.elapsed());
    let lines = second.lines();
    let pos = |pat: &str| {
        lines
            .iter()
            .position(|l| l.contains(pat))
            .unwrap_or_else(|| panic!("no {pat:?}"))
    };
    assert!(pos("generation ready") < pos("telling the previous nogap's workers to stop"));
    second.wait_for_log("the previous nogap's workers are gone killed=2", LONG);
    get_once(&Target::Tcp(b), LONG).expect("the second serves");
}

#[test]
fn a_second_nogap_with_the_same_runtime_directory_leaves_a_live_ones_workers_alone() {
    let dir = scratch();
    let (a, b) = (free_addr(), free_addr());
    let first = start_demo(dir.path(), a, &["-w", "2"], &[]);
    let workers = first.started_pids(Some(1));
    assert!(dir.path().join("control.workers").exists());
    let second = start_demo(dir.path(), b, &["--drain-timeout", "1s"], &[]);
    assert_eq!(second.count_log("a previous nogap's workers"), 0);
    get_once(&Target::Tcp(b), LONG).expect("the second serves");
    get_once(&Target::Tcp(a), LONG).expect("the first still serves");
    assert!(workers.iter().all(|&p| process_exists(p)));
    assert_eq!(first.count_log("worker exited"), 0);
}
