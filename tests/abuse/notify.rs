//! Forged and flooded notify messages, and descriptors attached to them.

use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;

use crate::common::{free_addr, must, wait_until, LONG};
use crate::fixture::{loads, pid_of, scratch, start, status};
use crate::support::{fds, print, rss_kb, slow_second_generation, start_with_slot_0_misbehaving};

/// The NOTIFY_SOCKET a worker was started with. "worker started" is logged
/// right after the fork, so the child may not have exec'd yet (until then
/// its environ is nogap's), and /proc cannot be read during an exec (the
/// script's exec of the demo): wait for the first read that has it.
fn notify_socket_of(pid: i32) -> PathBuf {
    let mut found = None;
    let read = || {
        let env = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
        env.split(|b| *b == 0)
            .find_map(|kv| kv.strip_prefix(b"NOTIFY_SOCKET="))
            .map(|v| PathBuf::from(String::from_utf8_lossy(v).into_owned()))
    };
    assert!(
        wait_until(LONG, || {
            found = read();
            found.is_some()
        }),
        "pid {pid} never had NOTIFY_SOCKET"
    );
    found.expect("NOTIFY_SOCKET set")
}

/// Defect 2: any process that could write a worker's notify socket could
/// send READY=1 for it, and a reload "succeeded" with a generation that did
/// not accept. Now only the worker and its process group count.
#[test]
fn a_forged_ready_does_not_make_a_generation_serve() {
    let dir = scratch();
    let addr = free_addr();
    let script = slow_second_generation(dir.path());
    let nogap = start(dir.path(), addr, &[], &[script.to_str().unwrap()], &[]);
    let (ka, nc) = loads(addr, 2);
    nogap.signal(nix::sys::signal::Signal::SIGHUP);
    let line = nogap.wait_for_log("worker started generation=2", LONG);
    let path = notify_socket_of(pid_of(&line));
    // The test process (root, not in the worker's group) forges it.
    let forger = UnixDatagram::unbound().unwrap();
    let at = nogap.log_len();
    for _ in 0..20 {
        forger.send_to(b"READY=1\n", &path).unwrap();
    }
    nogap.wait_for_log_from(
        at,
        "notification ignored: not sent by the worker or its process group",
        LONG,
    );
    // Rate-limited: 20 forgeries, a few lines.
    let lines = nogap.count_log("notification ignored");
    assert!(lines <= 3, "{lines} lines for 20 forgeries");
    let st = status(dir.path());
    assert_eq!(st["generation"], 1, "generation 1 still serves: {st}");
    assert_eq!(st["reloading"], 2, "generation 2 is still starting: {st}");
    assert!(nc.wait_for_more_ok(50, LONG));
    let (ka, nc) = (ka.stop(), nc.stop());
    print("keep-alive", &ka);
    print("new-connection", &nc);
    assert_eq!(
        ka.failed() + nc.failed(),
        0,
        "{:?} {:?}",
        ka.failures,
        nc.failures
    );
    assert_eq!(nc.pids().len(), 1, "only generation 1 answered");
}

/// A worker floods its notify socket with garbage, another sends READY=1
/// with 16 descriptors each time: nothing is lost, nogap keeps no
/// descriptor and writes a few log lines, not one per datagram.
#[test]
fn notify_floods_and_attached_descriptors_cost_nothing() {
    for kind in ["flood-notify", "notify-fds"] {
        let dir = scratch();
        let addr = free_addr();
        let knobs = format!("--abuse {kind} --abuse-after 500ms");
        let nogap = start_with_slot_0_misbehaving(dir.path(), addr, &knobs, &["-w", "2"]);
        let (fd0, rss0) = (fds(nogap.pid()), rss_kb(nogap.pid()));
        let (ka, nc) = loads(addr, 2);
        nogap.wait_for_log("bad notify message ignored", LONG);
        // Let the flood run while the load counts (bounded by answers).
        assert!(nc.wait_for_more_ok(500, LONG));
        let (ka, nc) = (ka.stop(), nc.stop());
        print(kind, &nc);
        assert_eq!(
            ka.failed() + nc.failed(),
            0,
            "{kind}: {:?} {:?}",
            ka.failures,
            nc.failures
        );
        let lines = nogap.count_log("bad notify message ignored");
        assert!(lines <= 20, "{kind}: {lines} log lines for the flood");
        // While datagrams with 16 descriptors each arrive, up to 16 are
        // open between receipt and close. Once the flooder is gone (killed,
        // replaced by a worker that behaves), nothing may be left.
        let hi = (0..50).map(|_| fds(nogap.pid())).max().unwrap();
        let line = nogap.wait_for_log("worker started worker=0 generation=1", LONG);
        let flooder = crate::fixture::pid_of(&line);
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(flooder),
            nix::sys::signal::Signal::SIGKILL,
        );
        must(LONG, "slot 0 replaced", || {
            nogap.started_pids(Some(1)).len() >= 3
        });
        must(LONG, "nogap's fds back where they were", || {
            fds(nogap.pid()) <= fd0 + 2
        });
        let lo = fds(nogap.pid());
        let rss1 = rss_kb(nogap.pid());
        println!("{kind}: fds {fd0} -> at most {hi} during the flood, {lo} after it; RSS {rss0} -> {rss1} kB, {lines} log lines");
        assert!(hi <= fd0 + 20, "{kind}: nogap's fds {fd0} -> {hi}");
        assert!(rss1 < rss0 + 20_000, "{kind}: RSS {rss0} -> {rss1} kB");
    }
}
