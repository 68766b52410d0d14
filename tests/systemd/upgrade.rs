//! `nogap upgrade` of the shipped `example.service` (+ `example.socket`)
//! under load: a package upgrade replaces `/usr/bin/nogap`, and the running
//! nogap executes the new file in place. systemd sees the same MainPID, no
//! restart, the same workers; `systemctl reload` works afterwards.

use std::collections::BTreeSet;

use super::fixture::{Nogap, Traffic};
use super::harness::{progress, OutputExt, Release};
use super::reload::UNIT;

const CONTROL: &str = "/run/nogap-example/control.sock";

pub fn in_place_under_load(release: Release) {
    let n = Nogap::boot(release);
    n.install_socket_pair();
    n.systemctl(&["start", "example.socket", UNIT]);
    assert_eq!(n.serving_generation(), 1);
    let pid = n.main_pid(UNIT).expect("example.service has a MainPID");
    let procs: BTreeSet<u32> = n.cgroup_procs(UNIT).into_iter().collect();
    assert_eq!(procs.len(), 3, "nogap and 2 workers: {procs:?}");
    let traffic = Traffic::start(n.addr(), 3);
    traffic.wait_for_answers(20);

    // The package upgrade: a new file (a new inode) at the unit's path.
    n.c.sh("cp /usr/bin/nogap /usr/bin/nogap.new && mv /usr/bin/nogap.new /usr/bin/nogap")
        .expect_success("replace /usr/bin/nogap");
    let stale = n.c.sh(&format!("test /proc/{pid}/exe -ef /usr/bin/nogap"));
    assert!(!stale.status.success(), "the running nogap is the old file");
    let said =
        n.c.exec(&["/usr/bin/nogap", "upgrade", "--wait", "--control", CONTROL])
            .expect_success("nogap upgrade --wait");
    assert!(said.contains(&format!("runs as pid {pid}")), "{said}");

    // The same process runs the new file; systemd saw nothing restart.
    let now = n.c.sh(&format!("test /proc/{pid}/exe -ef /usr/bin/nogap"));
    assert!(now.status.success(), "nogap does not run the new file");
    assert_eq!(n.main_pid(UNIT), Some(pid));
    assert_eq!(n.show(UNIT, "ActiveState"), "active");
    assert_eq!(n.show(UNIT, "NRestarts"), "0");
    let after: BTreeSet<u32> = n.cgroup_procs(UNIT).into_iter().collect();
    assert_eq!(after, procs, "the same processes serve");
    assert!(n.journal(UNIT).contains("upgraded in place"));
    traffic.wait_for_answers(20);

    // The new image reloads as systemd asks.
    n.systemctl(&["reload", UNIT]);
    assert_eq!(n.serving_generation(), 2);
    assert_eq!(n.main_pid(UNIT), Some(pid));
    assert_eq!(n.show(UNIT, "ActiveState"), "active");
    traffic.wait_for_answers(20);
    let reports = traffic.stop();
    reports.assert_no_failures();
    progress(format!(
        "{}: upgraded in place under load, pid {pid} kept, then reloaded",
        release.codename()
    ));
}
