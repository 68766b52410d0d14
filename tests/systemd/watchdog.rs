//! `WatchdogSec=`: systemd kills and restarts a frozen nogap, and the socket
//! it holds (socket unit or fd store) refuses no connection meanwhile.

use std::time::Duration;

use super::fixture::{Nogap, Traffic, FDSTORE_SERVICE};
use super::harness::{progress, wait_for, OutputExt, Release};

/// The test's only change to the shipped units, as a drop-in: a short
/// watchdog, and SIGKILL as the watchdog signal. The default (SIGABRT)
/// would also work, since systemd sends SIGCONT after it, but would dump
/// core; SIGKILL ends a stopped process at once.
const FAST_WATCHDOG: &str = "[Service]\nWatchdogSec=2s\nWatchdogSignal=SIGKILL\n";

/// From `kill -STOP` to the restarted nogap: watchdog (2 s), RestartSec=
/// (1 s), start, with room for a busy box.
const RESTART_DEADLINE: Duration = Duration::from_secs(30);

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
    assert_eq!(n.show(UNIT, "NFileDescriptorStore"), "1");
}

/// Under load, `kill -STOP` nogap: systemd's watchdog kills it, restarts the
/// unit, and the new nogap serves. No connection is refused; requests in
/// flight on the killed workers' connections may fail (reported).
fn frozen_nogap_is_replaced(n: &Nogap, unit: &str) {
    assert_eq!(n.show(unit, "WatchdogUSec"), "2s");
    let frozen = n.main_pid(unit).expect("a main process");
    let traffic = Traffic::start(n.addr(), 3);
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
        "{}: watchdog restart of {unit} (nogap {frozen} -> {restarted}): refused={}, \
         other failures={} [{} | {}]",
        n.release().codename(),
        reports.refused(),
        reports.failed() - reports.refused(),
        reports.keep_alive.failure_summary(),
        reports.new_conn.failure_summary(),
    ));
    reports.assert_none_refused();
}
