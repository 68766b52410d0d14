//! nogap's death cuts no request (issue #10 item 2): SIGKILL and SIGABRT of
//! nogap's main process under load, with the shipped units as they are
//! (`KillMode=process`): its workers drain (their parent-death signal is
//! the stop signal), systemd restarts nogap, which takes back the sockets
//! it held (socket unit or fd store, and every steered pool from the fd
//! store), serves on the one that served, and stops what its predecessor
//! left. Also after a reload, when the serving socket is a pool nogap bound
//! itself, not the socket unit's.

use std::time::Duration;

use super::fixture::{every_kind, Nogap, Traffic, FDSTORE_SERVICE, LOAD_TIMEOUT};
use super::harness::{progress, wait_for, OutputExt, Release};
use super::load::{get_once, Target};

/// From the kill to the next nogap serving: RestartSec= (1 s), start, with
/// room for a busy box.
const RESTART_DEADLINE: Duration = Duration::from_secs(30);

/// The bound for the dead nogap's workers (they drain at once: the
/// demo has nothing slow to finish), plus room for a busy box.
const LEFTOVERS_GONE: Duration = Duration::from_secs(20);

/// Connections of each load (keep-alive and new-connection).
const CLIENTS: usize = 10;

/// Requests of the test's own that wait in the queue when nogap dies.
const QUEUED: usize = 5;

/// `example.service` + `example.socket`.
pub fn with_socket_unit(release: Release) {
    let n = Nogap::boot(release);
    n.install_socket_pair();
    n.systemctl(&["start", "example.socket", "example.service"]);
    deaths_under_load(&n, "example.service");
}

/// `example-fdstore.service`.
pub fn with_fd_store(release: Release) {
    let n = Nogap::boot(release);
    const UNIT: &str = "example-fdstore.service";
    n.install(UNIT, &n.on_port(FDSTORE_SERVICE));
    n.systemctl(&["start", UNIT]);
    deaths_under_load(&n, UNIT);
}

/// Under load: SIGKILL (pool 0 serves), reload + SIGABRT (a pool nogap
/// bound serves, and connections wait in its queue: see below), SIGKILL
/// again (the adopted pool serves), reload + SIGKILL (back on pool 0). No
/// request lost, of any kind; every time a new nogap serves and the dead
/// one's workers are gone within [`LEFTOVERS_GONE`].
///
/// In the second round nogap and its workers are frozen (SIGSTOP) and
/// [`QUEUED`] requests of the test's own wait in the serving pool's queue;
/// then nogap is killed and the workers continued: they drain and close the
/// pool. Only the fd store keeps it open then; without it, those
/// connections are reset (`net.ipv4.tcp_migrate_req=0`, the default). Each
/// of them must be answered 200.
fn deaths_under_load(n: &Nogap, unit: &str) {
    let traffic = Traffic::start(n.addr(), CLIENTS);
    // (reload first, signal, with requests queued)
    let rounds: [(bool, &str, bool); 4] = [
        (false, "KILL", false),
        (true, "ABRT", true),
        (false, "KILL", false),
        (true, "KILL", false),
    ];
    for (i, (reload, signal, queued)) in rounds.into_iter().enumerate() {
        if reload {
            n.systemctl(&["reload", unit]);
            n.wait_generation(2);
            traffic.wait_for_answers(50);
        }
        let dead = n.main_pid(unit).expect("a main process");
        if queued {
            // Freeze nogap first: a live nogap would see the stalled queue
            // and start a worker that empties it. Frozen, it starts no
            // worker after the list below is read either.
            n.c.sh(&format!("kill -STOP {dead}"))
                .expect_success("stop nogap");
        }
        let workers: Vec<u32> = n
            .cgroup_procs(unit)
            .into_iter()
            .filter(|&p| p != dead)
            .collect();
        assert!(!workers.is_empty(), "no workers in the cgroup");
        let pids: Vec<String> = workers.iter().map(u32::to_string).collect();
        let mut waiting = Vec::new();
        if queued {
            // (Workers of the generation before the reload may be gone.)
            n.c.sh(&format!("kill -STOP {} 2>/dev/null; true", pids.join(" ")))
                .expect_success("stop the workers");
            // Requests of our own, sure to wait in the queue: nobody can
            // accept them now (the load's may be stuck in a frozen worker).
            waiting = (0..QUEUED)
                .map(|_| {
                    let target = Target::Tcp(n.addr());
                    std::thread::spawn(move || get_once(&target, LOAD_TIMEOUT))
                })
                .collect();
            wait_for(
                format!("{QUEUED} connections waiting in the queue"),
                RESTART_DEADLINE,
                || (queue_depth(n.port) >= QUEUED as u32).then_some(()),
            );
        }
        // A frozen nogap takes the signal when continued, before it runs
        // again (nogap leaves SIGABRT's default action in place).
        let kill = if queued {
            format!("kill -{signal} {dead} && kill -CONT {dead}")
        } else {
            format!("kill -{signal} {dead}")
        };
        n.c.sh(&kill).expect_success("kill nogap");
        if queued {
            n.c.sh(&format!("kill -CONT {} 2>/dev/null; true", pids.join(" ")))
                .expect_success("continue the workers");
        }
        let next = wait_for(
            format!("{unit} to run a new nogap after SIG{signal}"),
            RESTART_DEADLINE,
            || {
                let pid = n.main_pid(unit)?;
                (pid != dead && n.show(unit, "ActiveState") == "active").then_some(pid)
            },
        );
        traffic.wait_for_answers(50);
        for request in waiting {
            let answer = request.join().expect("a queued request's thread");
            match answer {
                Ok(r) if r.status == 200 => {}
                other => panic!("a request that waited in the queue while nogap died: {other:?}"),
            }
        }
        wait_for(
            format!("the workers {workers:?} of the dead nogap {dead} to exit"),
            LEFTOVERS_GONE,
            || workers.iter().all(|&p| !n.alive(p)).then_some(()),
        );
        progress(format!(
            "{}: round {}: SIG{signal} of nogap {dead} (after a reload: {reload}) -> {next}",
            n.release().codename(),
            i + 1
        ));
        assert_eq!(n.show(unit, "NRestarts"), (i + 1).to_string());
    }
    traffic.wait_for_answers(50);
    let reports = traffic.stop();
    progress(format!(
        "{}: 4 deaths of {unit}: keep-alive [{}], new-connection [{}]",
        n.release().codename(),
        every_kind(&reports.keep_alive),
        every_kind(&reports.new_conn),
    ));
    let journal = n.journal(unit);
    assert!(
        journal.contains("took back the pools a previous nogap stored"),
        "no nogap adopted a stored pool:\n{journal}"
    );
    reports.assert_no_failures();
}

/// Connections waiting to be accepted on every socket listening on `port`
/// (the containers share the host's network namespace).
fn queue_depth(port: u16) -> u32 {
    let out = std::process::Command::new("ss")
        .args(["-Hltn", &format!("( sport = :{port} )")])
        .output()
        .expect("run ss");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u32>().ok())
        .sum()
}
