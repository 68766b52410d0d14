//! `systemctl restart` under load and `systemctl stop`, with the socket held
//! by a `.socket` unit or by systemd's fd store.

use super::fixture::{every_kind, Nogap, Traffic, FDSTORE_SERVICE};
use super::harness::{progress, Release};

/// `example.service` + `example.socket`: systemd holds the socket, so no
/// connection is refused while nogap restarts; stop leaves nothing behind.
pub fn with_socket_unit(release: Release) {
    let n = Nogap::boot(release);
    n.install_socket_pair();
    n.systemctl(&["start", "example.socket", "example.service"]);
    restart_under_load(&n, "example.service");
    // Without load: a connection would start the service again through the
    // socket, which stays.
    stop_leaves_nothing(&n, "example.service");
    // The socket unit still answers: the next connection starts nogap again.
    assert_eq!(n.serving_generation(), 1);
}

/// `example-fdstore.service` alone: nogap binds the port, stores it in
/// systemd's fd store and takes it back after a restart, so no connection
/// is refused; stop empties the store and closes the port.
pub fn with_fd_store(release: Release) {
    let n = Nogap::boot(release);
    const UNIT: &str = "example-fdstore.service";
    n.install(UNIT, &n.on_port(FDSTORE_SERVICE));
    n.systemctl(&["start", UNIT]);
    // The socket, and the output pipe of each of the 2 workers.
    assert_eq!(n.show(UNIT, "NFileDescriptorStore"), "3");
    restart_under_load(&n, UNIT);
    assert_eq!(n.show(UNIT, "NFileDescriptorStore"), "3");
    let main = n.main_pid(UNIT).expect("a main process");
    let journal = n.journal(UNIT);
    assert!(
        journal.contains(&format!("nogap[{main}]: taking the inherited socket back")),
        "the restarted nogap ({main}) did not take the stored socket:\n{journal}"
    );
    stop_leaves_nothing(&n, UNIT);
    assert_eq!(n.show(UNIT, "NFileDescriptorStore"), "0");
    let refused = std::net::TcpStream::connect(n.addr())
        .expect_err("the port is closed once the service is stopped");
    assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused);
}

/// [`RESTARTS`] × `systemctl restart UNIT` under load: each time a new
/// nogap (new main pid, generation 1 again) serves, and no request failed,
/// of any kind: the socket outlives nogap (no refusal) and every worker
/// drains (no reset, no EOF before a response, no timeout).
pub fn restart_under_load(n: &Nogap, unit: &str) {
    let traffic = Traffic::start(n.addr(), 3);
    for _ in 0..RESTARTS {
        let before = n.main_pid(unit).expect("a main process");
        n.systemctl(&["restart", unit]);
        let after = n.main_pid(unit).expect("a main process after restart");
        assert_ne!(before, after, "systemctl restart kept the main process");
        assert!(!n.alive(before), "the old nogap {before} still runs");
        assert_eq!(n.serving_generation(), 1);
        traffic.wait_for_answers(50);
    }
    let reports = traffic.stop();
    progress(format!(
        "{}: {RESTARTS} restarts of {unit}: keep-alive [{}], new-connection [{}]",
        n.release().codename(),
        every_kind(&reports.keep_alive),
        every_kind(&reports.new_conn),
    ));
    reports.assert_no_failures();
}

const RESTARTS: usize = 3;

/// `systemctl stop UNIT`: nogap drains and exits 0, and nothing of the unit
/// runs any more.
fn stop_leaves_nothing(n: &Nogap, unit: &str) {
    let cgroup = n.show(unit, "ControlGroup");
    let procs = n.procs_in(&cgroup);
    assert_eq!(
        procs.len(),
        3,
        "nogap and two workers in {cgroup}: {procs:?}"
    );
    n.systemctl(&["stop", unit]);
    assert_eq!(n.show(unit, "ActiveState"), "inactive");
    assert_eq!(n.show(unit, "Result"), "success");
    assert_eq!(n.show(unit, "ExecMainStatus"), "0", "nogap's exit status");
    let left = n.procs_in(&cgroup);
    assert!(left.is_empty(), "left in {cgroup}: {left:?}");
    for pid in procs {
        assert!(!n.alive(pid), "process {pid} of {unit} survived the stop");
    }
}
