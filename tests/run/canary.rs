//! Progressive hand-over (`--canary PCT:DURATION`): a reload's ready
//! generation gets PCT% of new connections for DURATION, watched; a worker
//! exit or a failing probe rolls back, and the serving generation serves on.

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use crate::common::load::{FailureKind, Load, LoadConfig, Mode, Report};
use crate::common::{free_addr, nogap_bin, process_exists, Nogap, LONG};
use crate::util::{
    client, scratch, script, set_worker_args, start, status_json, switchable_worker, text,
};

/// `nogap reload --wait`, and when it was asked and answered.
fn reload_wait(dir: &Path) -> (Output, Instant, Instant) {
    let asked = Instant::now();
    let out = client(dir, &["reload", "--wait"]);
    (out, asked, Instant::now())
}

fn status_text(dir: &Path) -> String {
    text(&client(dir, &["status"]))
}

/// New-connection load, bounded in time and count.
fn load(addr: std::net::SocketAddr) -> Load {
    let load = Load::start(
        LoadConfig::new(addr, Mode::NewConnection)
            .connections(4)
            .pause(Duration::from_millis(2))
            .duration(Duration::from_secs(120))
            .max_requests(1_000_000),
    );
    assert!(load.wait_for_more_ok(20, LONG), "the load gets no answers");
    load
}

/// The generations that answered requests started in `[from, to)`, with
/// how many each.
fn answered(r: &Report, from: Instant, to: Instant) -> std::collections::BTreeMap<u32, u64> {
    let (from, to) = (from - r.start, to.saturating_duration_since(r.start));
    let mut by = std::collections::BTreeMap::new();
    for s in r
        .samples
        .iter()
        .filter(|s| s.started >= from && s.started < to)
    {
        *by.entry(s.gen).or_default() += 1;
    }
    by
}

/// A healthy canary under new-connection load: both generations answer
/// during it, the new one roughly its share; then only the new one, and
/// not one request fails.
#[test]
fn a_healthy_canary_shares_then_hands_over_without_a_failure() {
    let dir = scratch();
    let addr = free_addr();
    let demo = crate::common::demo_bin();
    let nogap = start(
        dir.path(),
        addr,
        &["-w", "2", "--canary", "30%:3s"],
        &[demo],
    );
    let load = load(addr);
    let control = dir.path().to_path_buf();
    let reload = std::thread::spawn(move || reload_wait(&control));
    // Status says so while it runs, in text and JSON.
    let mut shown = String::new();
    crate::common::must(LONG, "status shows the canary", || {
        shown = status_text(dir.path());
        shown.contains("canary: 30% to generation 2, ")
    });
    eprintln!("status during the canary: {shown}");
    assert!(
        shown.contains("generation 2 canary (30% of new connections)"),
        "{shown}"
    );
    let json = status_json(dir.path());
    assert_eq!(json["canary"]["generation"], 2, "{json}");
    assert_eq!(json["canary"]["percent"], 30, "{json}");
    let (out, asked, answered_at) = reload.join().expect("reload thread");
    assert!(out.status.success(), "{}", text(&out));
    let took = answered_at - asked;
    assert!(
        took >= Duration::from_secs(3),
        "answered before the canary ended: {took:?}"
    );
    nogap.wait_for_log("canary passed generation=2", LONG);
    assert!(load.wait_for_more_ok(200, LONG));
    let r = load.stop();
    eprintln!(
        "healthy canary: reload --wait took {took:?}; {}",
        r.summary()
    );
    // Well inside the canary: from 1 s after the reload was asked (the new
    // generation is ready within it) to its answer.
    let during = answered(&r, asked + Duration::from_secs(1), answered_at);
    let total: u64 = during.values().sum();
    let new = during.get(&2).copied().unwrap_or(0);
    let share = new as f64 * 100.0 / total.max(1) as f64;
    eprintln!("during the canary: {during:?}, generation 2 answered {share:.1}%");
    assert!(
        during.contains_key(&1) && new > 0,
        "both answer: {during:?}"
    );
    assert!(
        (5.0..=70.0).contains(&share),
        "share {share:.1}% (want about 30%)"
    );
    let after = answered(&r, answered_at, Instant::now());
    assert_eq!(
        after.keys().copied().collect::<Vec<_>>(),
        vec![2],
        "{after:?}"
    );
    r.assert_no_failures();
    assert_eq!(nogap.count_log("canary failed"), 0);
}

/// A worker that crashes `--crash-after` when it is slot 0 of a
/// generation started with `crash` in its mode file; the others serve.
fn crashing_slot0(dir: &Path) -> std::path::PathBuf {
    script(
        dir,
        "crash0.sh",
        r#"args=$(cat "$DIR/mode-args" 2>/dev/null)
if [ "$NOGAP_WORKER" = 0 ]; then args="$args $(cat "$DIR/crash-args" 2>/dev/null)"; fi
exec "$DEMO" $args"#,
    )
}

/// A reload whose canary is rolled back: `reload --wait` exits 1 saying
/// `failed`, long before the canary's end; generation 2 serves what was
/// queued for it and is gone; generation 1 (`old`) serves on, unchanged
/// and never signalled, and alone answers from then on; nothing is
/// refused and no answer is a non-2xx. The load's report, and when the
/// reload was asked and answered.
fn rolled_back(
    nogap: &Nogap,
    dir: &Path,
    old: &[i32],
    load: Load,
    failed: &str,
) -> (Report, Instant, Instant) {
    let (out, asked, answered_at) = reload_wait(dir);
    let said = text(&out);
    let took = answered_at - asked;
    eprintln!("rolled back: reload --wait took {took:?}: {said}");
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(said.contains(failed), "{said}");
    assert!(
        took < Duration::from_secs(10),
        "rolled back long before the canary's end"
    );
    let gen2 = nogap.started_pids(Some(2));
    crate::common::must(LONG, "generation 2 gone", || {
        gen2.iter().all(|p| !process_exists(*p))
    });
    let gone = Instant::now();
    assert!(load.wait_for_more_ok(200, LONG));
    let r = load.stop();
    eprintln!("  {}", r.summary());
    for p in old {
        assert!(process_exists(*p), "generation 1 (pid {p}) serves on");
    }
    assert_eq!(
        nogap.wait_workers(1, 2, LONG),
        old,
        "generation 1 unchanged"
    );
    assert_eq!(
        nogap.count_log("draining worker generation=1"),
        0,
        "generation 1 never got the stop signal"
    );
    let after = answered(&r, gone, Instant::now());
    assert_eq!(
        after.keys().copied().collect::<Vec<_>>(),
        vec![1],
        "{after:?}"
    );
    assert_eq!(r.failures_of(FailureKind::Refused), 0);
    assert_eq!(r.failures_of(FailureKind::Non2xx), 0);
    let status = status_text(dir);
    assert!(
        status.contains("last reload failed: canary failed"),
        "{status}"
    );
    (r, asked, answered_at)
}

/// A new generation whose worker exits during the canary: rolled back (see
/// [`rolled_back`]). No request times out, and what fails is bounded by
/// what the dying worker had accepted.
#[test]
fn a_worker_exit_in_the_canary_rolls_back_and_the_old_generation_serves_on() {
    let dir = scratch();
    let addr = free_addr();
    let worker = crashing_slot0(dir.path());
    let nogap = start(
        dir.path(),
        addr,
        &["-w", "2", "--canary", "50%:20s"],
        &[worker.to_str().unwrap()],
    );
    let old = nogap.wait_workers(1, 2, LONG);
    let load = load(addr);
    std::fs::write(dir.path().join("crash-args"), "--crash-after 1500ms").unwrap();
    let failed = "canary failed: worker 0 (pid";
    let (r, asked, answered_at) = rolled_back(&nogap, dir.path(), &old, load, failed);
    let during = answered(&r, asked, answered_at);
    assert!(
        during.get(&2).copied().unwrap_or(0) > 0,
        "generation 2 had its share: {during:?}"
    );
    assert_eq!(
        r.failures_of(FailureKind::Timeout),
        0,
        "{}",
        r.failure_summary()
    );
    // Only what the crashing worker had accepted (4 clients: at most 4).
    let lost = r.failures_of(FailureKind::Reset) + r.failures_of(FailureKind::EofBeforeResponse);
    assert!(lost <= 4, "{}", r.failure_summary());
    assert_eq!(r.failed(), lost, "{}", r.failure_summary());
}

/// A new generation whose accept loops die during the canary: its own
/// queue stalls (the monitor watches the canary's socket by its depth),
/// and the canary is rolled back at the stall timeout (see
/// [`rolled_back`]). What fails is what was queued for the dead workers:
/// at most one stuck connection per client (4 clients).
#[test]
fn a_stalled_canary_rolls_back_at_the_stall_timeout() {
    let dir = scratch();
    let addr = free_addr();
    let worker = switchable_worker(dir.path());
    let nogap = start(
        dir.path(),
        addr,
        &["-w", "2", "--canary", "50%:30s"],
        &[worker.to_str().unwrap()],
    );
    let old = nogap.wait_workers(1, 2, LONG);
    let load = load(addr);
    // 1 s until the accept loops stop, then the 2 s stall timeout.
    set_worker_args(dir.path(), "--stall-accept-after 1s");
    let failed = "canary failed: its accept queue on socket web stalled";
    let (r, _, _) = rolled_back(&nogap, dir.path(), &old, load, failed);
    assert!(r.failed() <= 4, "{}", r.failure_summary());
}

/// A deploy that passes its first probe, then answers 500: the probe
/// repeated every second during the canary fails it within about 1 s of
/// the first 500, naming the status; clients see 500s only during the
/// canary.
#[test]
fn a_failing_probe_in_the_canary_rolls_back_naming_the_status() {
    let dir = scratch();
    let addr = free_addr();
    let worker = switchable_worker(dir.path());
    let listen = format!("web={addr}");
    let args = [
        "-l",
        &listen,
        "--ready",
        "notify+http:/healthz",
        "--canary",
        "50%:8s",
    ];
    let nogap = Nogap::run(
        dir.path(),
        &[&args[..], &["--", worker.to_str().unwrap()]].concat(),
    );
    nogap.wait_for_log("generation ready generation=1", LONG);
    let old = nogap.wait_workers(1, 1, LONG);
    let load = load(addr);
    set_worker_args(dir.path(), "--status 500 --status-after 1500ms");
    let (out, asked, answered_at) = reload_wait(dir.path());
    let said = text(&out);
    let took = answered_at - asked;
    eprintln!("probe failing in the canary: reload --wait took {took:?}: {said}");
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(
        said.contains("canary failed: probe of generation 2: GET /healthz answered 500"),
        "{said}"
    );
    assert!(load.wait_for_more_ok(200, LONG));
    let r = load.stop();
    eprintln!("  {}", r.summary());
    let bad: Vec<Instant> = r
        .failure_log
        .iter()
        .filter(|f| f.kind == FailureKind::Non2xx)
        .map(|f| f.at)
        .collect();
    // With half the connections, clients saw the 500s first.
    let first = *bad.first().expect("clients saw generation 2's 500s");
    let late = answered_at.saturating_duration_since(first);
    eprintln!("  rolled back {late:?} after the first 500 a client saw");
    // A probe a second, and a loaded machine's timers: well within 3 s.
    assert!(late < Duration::from_secs(3), "{late:?}");
    // What was already queued for generation 2 it still answers, at once
    // (a second of slack for a loaded machine).
    assert!(
        bad.iter()
            .all(|t| *t <= answered_at + Duration::from_secs(1)),
        "500s only during the canary"
    );
    assert_eq!(
        r.failed(),
        r.failures_of(FailureKind::Non2xx),
        "{}",
        r.failure_summary()
    );
    assert_eq!(nogap.wait_workers(1, 1, LONG), old);
    let after = answered(&r, answered_at, Instant::now());
    assert_eq!(
        after.keys().copied().collect::<Vec<_>>(),
        vec![1],
        "{after:?}"
    );
}

/// Bad values, and a canary with no steered socket to split: exit 2 with
/// one line naming it.
#[test]
fn canary_usage_errors_exit_2_naming_the_value() {
    let dir = scratch();
    let tcp = format!("web={}", free_addr());
    let unix = format!("unix:{}", dir.path().join("s.sock").display());
    let demo = crate::common::demo_bin();
    let cases: &[(&[&str], &str)] = &[
        (&["-l", &tcp, "--canary", "0%:1s"], "0%:1s"),
        (&["-l", &tcp, "--canary", "100%:1s"], "100%:1s"),
        (&["-l", &tcp, "--canary", "abc"], "abc"),
        (
            &["-l", &tcp, "--canary", "10%:1s", "--handover", "shared"],
            "--handover shared",
        ),
        (
            &["-l", &unix, "--canary", "10%:1s"],
            "--canary 10%:1s: it needs a TCP socket",
        ),
    ];
    for (args, names) in cases {
        let mut cmd = Command::new(nogap_bin());
        cmd.arg("run").env("RUNTIME_DIRECTORY", dir.path());
        cmd.args(*args).args(["--", demo]);
        let mut nogap = Nogap::spawn("nogap", cmd);
        let status = nogap.wait_exit(LONG);
        let lines = nogap.wait_output_closed(LONG);
        let errors: Vec<&String> = lines
            .iter()
            .filter(|l| !l.starts_with("stdout: ") && !l.trim().is_empty())
            .filter(|l| !l.contains(" INFO "))
            .collect();
        assert_eq!(status.code(), Some(2), "{args:?}: {lines:?}");
        assert_eq!(errors.len(), 1, "{args:?}: {lines:?}");
        assert!(errors[0].contains(names), "{args:?}: {lines:?}");
    }
}
