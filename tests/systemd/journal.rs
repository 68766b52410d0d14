//! nogap's log under systemd: journald entries of the unit, with nogap's
//! structured fields (`WORKER`, `GENERATION`, `PID`, `SOCKET`, no prefix),
//! and the workers' output lines with `WORKER`, `GENERATION`, `WORKER_PID`.

use std::collections::BTreeSet;

use serde_json::Value;

use super::fixture::{Nogap, SOON};
use super::harness::{wait_for, Release};

const UNIT: &str = "example.service";

/// Start and reload `example.service`: each worker's `worker ready` entry
/// carries its slot, generation and pid (the pids that run), each
/// generation's `generation ready` its number, and `listening` the socket's
/// name; all of them under the unit, from nogap.
pub fn structured_fields(release: Release) {
    let n = Nogap::boot(release);
    n.install_socket_pair();
    n.systemctl(&["start", "example.socket", UNIT]);
    n.systemctl(&["reload", UNIT]);
    let main = n.main_pid(UNIT).expect("a main process");
    // Generation 1 leaves once nothing is queued for it (steered hand-over).
    let workers: BTreeSet<String> = wait_for("generation 1 to leave", SOON, || {
        let w: BTreeSet<String> = n
            .cgroup_procs(UNIT)
            .into_iter()
            .filter(|&p| p != main)
            .map(|p| p.to_string())
            .collect();
        (w.len() == 2).then_some(w)
    });

    // nogap writes to journald's socket before it answers the reload;
    // journald may index the entries a moment later.
    let entries = wait_for("nogap's entries of generation 2", SOON, || {
        let entries = n.journal_json(UNIT);
        let ready2 = with(&entries, "worker ready")
            .filter(|e| field(e, "GENERATION") == Some("2"))
            .count();
        let said2 = entries
            .iter()
            .filter(|e| from_worker(e) && field(e, "GENERATION") == Some("2"))
            .filter(|e| field(e, "MESSAGE").is_some_and(|m| m.ends_with(": ready")))
            .count();
        (ready2 == 2 && said2 == 2 && with(&entries, "generation ready").count() == 2)
            .then_some(entries)
    });
    let from_nogap = |e: &&Value| {
        field(e, "SYSLOG_IDENTIFIER") == Some("nogap")
            && field(e, "_SYSTEMD_UNIT") == Some(UNIT)
            && field(e, "_PID") == Some(&main.to_string())
    };

    let generations: Vec<&str> = with(&entries, "generation ready")
        .filter(from_nogap)
        .filter_map(|e| field(e, "GENERATION"))
        .collect();
    assert_eq!(generations, ["1", "2"]);

    let ready: Vec<(&str, &str, &str)> = with(&entries, "worker ready")
        .filter(from_nogap)
        .map(|e| {
            let f = |k| field(e, k).unwrap_or_else(|| panic!("no {k} in {e}"));
            (f("GENERATION"), f("WORKER"), f("PID"))
        })
        .collect();
    assert_eq!(ready.len(), 4, "{ready:?}");
    let gen2: BTreeSet<String> = ready
        .iter()
        .filter(|(g, ..)| *g == "2")
        .map(|(_, _, pid)| pid.to_string())
        .collect();
    assert_eq!(gen2, workers, "pids of generation 2's `worker ready`");
    for gen in ["1", "2"] {
        let slots: BTreeSet<&str> = ready
            .iter()
            .filter(|(g, ..)| *g == gen)
            .map(|(_, w, _)| *w)
            .collect();
        assert_eq!(slots, BTreeSet::from(["0", "1"]), "slots of {gen}");
    }

    let listening: Vec<&Value> = with(&entries, "listening").filter(from_nogap).collect();
    assert_eq!(listening.len(), 1, "{listening:?}");
    assert_eq!(field(listening[0], "SOCKET"), Some("http"));

    // The workers' own lines (captured: nogap's stderr is the journal) come
    // with their names: each `ready` the demo prints carries the slot,
    // generation and pid of the worker that printed it.
    let said: Vec<(&str, &str, &str)> = entries
        .iter()
        .filter(|e| from_worker(e) && field(e, "_SYSTEMD_UNIT") == Some(UNIT))
        .filter(|e| field(e, "MESSAGE").is_some_and(|m| m.ends_with(": ready")))
        .map(|e| {
            let f = |k| field(e, k).unwrap_or_else(|| panic!("no {k} in {e}"));
            let (msg, pid) = (f("MESSAGE"), f("WORKER_PID"));
            assert_eq!(msg, format!("nogap-demo[{pid}]: ready"), "{e}");
            assert_eq!(f("PRIORITY"), "6", "{e}");
            (f("GENERATION"), f("WORKER"), pid)
        })
        .collect();
    let mut by_worker: Vec<(&str, &str, &str)> = ready.clone();
    by_worker.sort();
    let mut said_sorted = said.clone();
    said_sorted.sort();
    assert_eq!(said_sorted, by_worker, "worker lines vs `worker ready`");

    // nogap's own fields carry no prefix.
    for e in entries.iter().filter(from_nogap) {
        let fields = e.as_object().expect("an entry is an object");
        assert!(
            !fields.keys().any(|k| k.starts_with("F_")),
            "prefixed field in {e}"
        );
    }
}

/// An entry nogap wrote for a worker's output line.
fn from_worker(e: &Value) -> bool {
    field(e, "SYSLOG_IDENTIFIER") == Some("nogap-demo") && field(e, "WORKER_PID").is_some()
}

/// Entries whose MESSAGE is `message`.
fn with<'a>(entries: &'a [Value], message: &'a str) -> impl Iterator<Item = &'a Value> {
    entries
        .iter()
        .filter(move |e| field(e, "MESSAGE") == Some(message))
}

/// A field's value, when it is a single string (journald gives repeated
/// fields as arrays and binary ones as byte arrays).
fn field<'a>(entry: &'a Value, key: &str) -> Option<&'a str> {
    entry.get(key)?.as_str()
}
