//! Socket activation of the shipped units, and what the workers inherit.

use std::collections::BTreeSet;

use super::fixture::{Nogap, Traffic, SOON};
use super::harness::Release;

const UNIT: &str = "example.service";

/// Only `example.socket` is started; the first connection starts
/// `example.service`, and every connection of the load is answered. nogap gets the socket by name and its
/// workers get it under the same name (`LISTEN_FDNAMES=http`), with
/// `LISTEN_PID` their own pid.
pub fn first_connection_starts_the_service(release: Release) {
    let n = Nogap::boot(release);
    n.install_socket_pair();
    n.systemctl(&["start", "example.socket"]);
    assert_eq!(n.show(UNIT, "ActiveState"), "inactive");
    assert_eq!(n.show("example.socket", "ActiveState"), "active");

    // Load from the start: the first connections wait in the socket's queue
    // while nogap and its workers start, and none is lost.
    let traffic = Traffic::start(n.addr(), 3);
    let reports = traffic.stop();
    reports.assert_no_failures();
    let first = n.probe();
    assert_eq!(first.gen, Some(1), "answer: {:?}", first.body);
    // Workers answer as soon as they are ready; READY=1 reaches systemd a
    // moment later.
    n.wait_property(UNIT, "ActiveState", "active", SOON);
    let journal = n.journal(UNIT);
    assert!(journal.contains("Started example.service"), "{journal}");

    let main = n
        .main_pid(UNIT)
        .expect("example.service has a main process");
    let env = n.environ(main);
    assert!(
        env.contains(&"LISTEN_FDNAMES=http".to_owned())
            && env.contains(&"LISTEN_FDS=1".to_owned())
            && env.contains(&format!("LISTEN_PID={main}")),
        "nogap's environment: {env:?}"
    );

    let workers: Vec<u32> = n
        .cgroup_procs(UNIT)
        .into_iter()
        .filter(|&p| p != main)
        .collect();
    assert_eq!(workers.len(), 2, "two workers besides nogap: {workers:?}");
    let mut slots = BTreeSet::new();
    for pid in &workers {
        let env = n.environ(*pid);
        let var = |key: &str| {
            env.iter()
                .find_map(|kv| kv.strip_prefix(&format!("{key}=")))
                .map(str::to_owned)
        };
        assert_eq!(var("LISTEN_FDNAMES").as_deref(), Some("http"), "{env:?}");
        assert_eq!(var("LISTEN_FDS").as_deref(), Some("1"), "{env:?}");
        assert_eq!(var("LISTEN_PID"), Some(pid.to_string()), "{env:?}");
        assert_eq!(var("NOGAP_GENERATION").as_deref(), Some("1"), "{env:?}");
        slots.insert(var("NOGAP_WORKER").expect("NOGAP_WORKER"));
        // systemd's channel is nogap's alone.
        let notify = var("NOTIFY_SOCKET").expect("NOTIFY_SOCKET");
        assert!(
            notify.starts_with("/run/nogap-example/"),
            "worker {pid} got NOTIFY_SOCKET={notify}"
        );
    }
    assert_eq!(slots, BTreeSet::from(["0".to_owned(), "1".to_owned()]));
    // The pid in the answer is one of them.
    assert!(
        first.pid.is_some_and(|p| workers.contains(&p)),
        "answered by {:?}, workers {workers:?}",
        first.pid
    );
}
