//! `WatchdogSec=`: systemd kills and restarts a frozen nogap, and the socket
//! it holds (socket unit or fd store) refuses no connection meanwhile, and
//! no request is lost of any kind: the workers drain (issue #10 item 2).

use std::time::Duration;

use super::fixture::{every_kind, Loss, Nogap, Traffic, FDSTORE_SERVICE};
use super::harness::{progress, wait_for, OutputExt, Release};

/// The test's only change to the shipped units, as a drop-in: a short
/// watchdog, and SIGKILL as the watchdog signal. The default (SIGABRT)
/// would also work, since systemd sends SIGCONT after it, but would dump
/// core; SIGKILL ends a stopped process at once.
const FAST_WATCHDOG: &str = "[Service]\nWatchdogSec=2s\nWatchdogSignal=SIGKILL\n";

/// From `kill -STOP` to the restarted nogap: watchdog (2 s), RestartSec=
/// (1 s), start, with room for a busy box.
const RESTART_DEADLINE: Duration = Duration::from_secs(30);

/// Connections of each load (keep-alive and new-connection).
const CLIENTS: usize = 3;

/// What each load may lose when the watchdog kills nogap: nothing (issue
/// #10 item 2). The workers' parent-death signal is the stop signal, so
/// they drain instead of dying with nogap, and `KillMode=process` keeps
/// systemd from killing them; the next nogap takes the sockets back and
/// stops what is left after its drain timeout. (With the parent-death
/// signal SIGKILL and `KillMode=mixed`, keep-alive lost exactly one request
/// per client every time, new-connection 0 to 2: reset or EOF before a
/// response.)
const CUT_BY_SIGKILL: Loss = Loss::NONE;

/// `example.service` + `example.socket`.
pub fn with_socket_unit(release: Release) {
    let n = Nogap::boot(release);
    n.install_socket_pair();
    n.drop_in("example.service", "watchdog", FAST_WATCHDOG);
    n.systemctl(&["start", "example.socket", "example.service"]);
    frozen_nogap_is_replaced(&n, "example.service");
}

/// `example-fdstore.service`: the socket survives in the fd store.
pub fn with_fd_store(release: Release) {
    let n = Nogap::boot(release);
    const UNIT: &str = "example-fdstore.service";
    n.install(UNIT, &n.on_port(FDSTORE_SERVICE));
    n.drop_in(UNIT, "watchdog", FAST_WATCHDOG);
    n.systemctl(&["start", UNIT]);
    frozen_nogap_is_replaced(&n, UNIT);
    // The socket and the 2 workers' output pipes, once the dead nogap's
    // workers' pipes are taken out (after the drain timeout, 20s).
    n.wait_property(UNIT, "NFileDescriptorStore", "3", Duration::from_secs(60));
}

/// Under load, `kill -STOP` nogap: systemd's watchdog kills it, restarts the
/// unit, and the new nogap serves. No connection is refused, no request
/// times out, gets a bad answer or is cut ([`CUT_BY_SIGKILL`]).
fn frozen_nogap_is_replaced(n: &Nogap, unit: &str) {
    assert_eq!(n.show(unit, "WatchdogUSec"), "2s");
    let frozen = n.main_pid(unit).expect("a main process");
    let traffic = Traffic::start(n.addr(), CLIENTS);
    n.c.sh(&format!("kill -STOP {frozen}"))
        .expect_success("kill -STOP nogap");
    let restarted = wait_for(
        format!("{unit} to run a new nogap after the watchdog"),
        RESTART_DEADLINE,
        || {
            let pid = n.main_pid(unit)?;
            (pid != frozen && n.show(unit, "ActiveState") == "active").then_some(pid)
        },
    );
    assert_eq!(n.show(unit, "NRestarts"), "1");
    assert!(!n.alive(frozen), "the frozen nogap {frozen} survived");
    assert_eq!(n.serving_generation(), 1);
    traffic.wait_for_answers(50);
    let reports = traffic.stop();
    let journal = n.journal(unit);
    assert!(
        journal.contains("Watchdog timeout"),
        "no watchdog timeout in the journal:\n{journal}"
    );
    progress(format!(
        "{}: watchdog restart of {unit} (nogap {frozen} -> {restarted}): keep-alive [{}], \
         new-connection [{}]",
        n.release().codename(),
        every_kind(&reports.keep_alive),
        every_kind(&reports.new_conn),
    ));
    reports.assert_losses(CUT_BY_SIGKILL, CUT_BY_SIGKILL);
}
