//! Reloads: zero downtime under load, failed reloads, HUP coalescing.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use crate::common::{field, free_addr, must, process_exists, LONG};
use crate::util::{
    both_loads, hup, reload, scratch, set_worker_args, start, start_demo, status_json,
    switchable_worker,
};

#[test]
fn twenty_reloads_under_load_lose_no_request() {
    let dir = scratch();
    let addr = free_addr();
    let nogap = start_demo(
        dir.path(),
        addr,
        &["-w", "2", "--drain-timeout", "20s"],
        &[],
    );
    let (ka, nc) = both_loads(addr, 4, Duration::from_millis(2));

    for gen in 2..=21 {
        reload(&nogap, gen);
        // Traffic flows between reloads, not only around them.
        assert!(
            ka.wait_for_more_ok(10, LONG),
            "keep-alive stalled after gen {gen}"
        );
        assert!(
            nc.wait_for_more_ok(10, LONG),
            "new-connection stalled after gen {gen}"
        );
    }

    // Once every older worker is gone, only generation 21 may answer.
    let newest: BTreeSet<u32> = nogap
        .started_pids(Some(21))
        .into_iter()
        .map(|p| p as u32)
        .collect();
    assert_eq!(newest.len(), 2, "generation 21 should have 2 workers");
    let older: Vec<i32> = (1..21).flat_map(|g| nogap.started_pids(Some(g))).collect();
    assert_eq!(
        older.len(),
        40,
        "generations 1..20 should have had 2 workers each"
    );
    must(LONG, "old generations exit after the last reload", || {
        older.iter().all(|&p| !process_exists(p))
    });
    let t = Instant::now();
    assert!(ka.wait_for_more_ok(100, LONG));
    assert!(nc.wait_for_more_ok(100, LONG));
    let ka = ka.stop();
    let nc = nc.stop();
    eprintln!("{}\n{}", ka.summary(), nc.summary());
    ka.assert_no_failures();
    nc.assert_no_failures();
    for report in [&ka, &nc] {
        let late = report.pids_since(t);
        assert!(
            late.is_subset(&newest),
            "{}: pids {late:?} answered after every old worker exited; newest are {newest:?}",
            report.mode
        );
        assert_eq!(
            report.gens_since(t),
            BTreeSet::from([21]),
            "{}",
            report.mode
        );
    }
    assert_eq!(nogap.count_log("reload started"), 20);
    assert_eq!(nogap.count_log("reload failed"), 0);
}

#[test]
fn failed_reloads_keep_the_old_generation_serving() {
    let dir = scratch();
    let addr = free_addr();
    let worker = switchable_worker(dir.path());
    let nogap = start(
        dir.path(),
        addr,
        &["--start-timeout", "3s", "--drain-timeout", "20s"],
        &[worker.to_str().unwrap()],
    );
    let old = nogap.started_pids(Some(1));
    assert_eq!(old.len(), 1);
    let old_pid = old[0] as u32;
    let (ka, nc) = both_loads(addr, 3, Duration::from_millis(2));

    // 1. The new worker exits at start.
    set_worker_args(dir.path(), "--fail-at-start");
    let gen = hup(&nogap);
    let line = nogap.wait_for_log(&format!("reload failed generation={gen}"), LONG);
    let reason = field(&line, "reason").unwrap_or_default();
    assert!(
        reason.contains('3'),
        "reason should carry the exit status 3 of --fail-at-start: {line:?}"
    );
    for p in nogap.started_pids(Some(gen)) {
        must(LONG, "the failed worker is gone", || !process_exists(p));
    }
    assert!(ka.wait_for_more_ok(50, LONG));
    assert!(nc.wait_for_more_ok(50, LONG));
    assert!(
        process_exists(old_pid as i32),
        "old worker stopped by a failed reload"
    );

    // 2. The new worker never becomes ready: --start-timeout. (It gets no
    // connection while it runs: they are steered to the serving socket.)
    set_worker_args(dir.path(), "--no-ready");
    let gen2 = hup(&nogap);
    assert!(gen2 > gen);
    let line = nogap.wait_for_log(&format!("reload failed generation={gen2}"), LONG);
    assert!(
        field(&line, "reason").is_some_and(|r| !r.is_empty()),
        "no reason= in {line:?}"
    );
    for p in nogap.started_pids(Some(gen2)) {
        must(LONG, "the never-ready worker is stopped", || {
            !process_exists(p)
        });
    }
    assert!(ka.wait_for_more_ok(50, LONG));
    assert!(nc.wait_for_more_ok(50, LONG));
    assert!(
        process_exists(old_pid as i32),
        "old worker stopped by a failed reload"
    );
    let h3 = Instant::now();

    // 3. A good reload still works afterwards.
    set_worker_args(dir.path(), "");
    let gen3 = hup(&nogap);
    nogap.wait_for_log(&format!("generation ready generation={gen3}"), LONG);
    must(LONG, "the old worker drains after a good reload", || {
        !process_exists(old_pid as i32)
    });
    assert!(ka.wait_for_more_ok(50, LONG));
    assert!(nc.wait_for_more_ok(50, LONG));

    let ka = ka.stop();
    let nc = nc.stop();
    eprintln!("{}\n{}", ka.summary(), nc.summary());
    ka.assert_no_failures();
    nc.assert_no_failures();
    for report in [&ka, &nc] {
        // Until the good reload, only the old worker answers: the failed
        // workers never got a connection.
        let before: BTreeSet<u32> = report
            .samples
            .iter()
            .filter(|s| report.start + s.done() < h3)
            .map(|s| s.pid)
            .collect();
        assert_eq!(before, BTreeSet::from([old_pid]), "{}", report.mode);
    }
    assert_eq!(nogap.count_log("reload failed"), 2);
}

/// Steering: an old generation gets its stop signal only once nothing is
/// queued for it and it has read what it accepted. Even SIGKILL as the stop
/// signal then loses no new connection (with a shared socket it resets the
/// ones the old worker accepted last).
#[test]
fn steered_reloads_lose_nothing_even_when_the_stop_signal_is_sigkill() {
    let dir = scratch();
    let addr = free_addr();
    let nogap = start_demo(dir.path(), addr, &["-w", "2", "--stop-signal", "KILL"], &[]);
    let nc = crate::common::load::Load::start(
        crate::common::load::LoadConfig::new(addr, crate::common::load::Mode::NewConnection)
            .connections(4)
            .pause(Duration::from_micros(200))
            .duration(Duration::from_secs(300)),
    );
    assert!(nc.wait_for_more_ok(20, LONG));
    for gen in 2..=11 {
        reload(&nogap, gen);
        assert!(nc.wait_for_more_ok(20, LONG), "stalled after gen {gen}");
        let old = nogap.started_pids(Some(gen - 1));
        must(LONG, "the old generation is killed", || {
            old.iter().all(|&p| !process_exists(p))
        });
        // And reaped: until nogap has seen them exit, their generation
        // holds its pool, and the next reload would bind a third one.
        nogap.wait_for_count(&format!("worker exited generation={}", gen - 1), 2, LONG);
    }
    let nc = nc.stop();
    eprintln!("{}", nc.summary());
    nc.assert_no_failures();
    assert_eq!(nogap.count_log("new connections steered"), 10);
    // Two sockets on the address serve every reload; once the old
    // generation is gone its socket is closed, and the serving one is left
    // alone at index 0: as many sockets as at start. Status says so.
    let status = || status_json(dir.path());
    must(LONG, "one steered socket left", || {
        status()["steering"]["pools"] == 1
    });
    let status = status();
    assert_eq!(status["sockets"][0]["handover"], "steer", "{status}");
    assert_eq!(status["steering"]["target"], 0, "{status}");
}

/// A reload while nobody accepts from the serving socket (its accept loop
/// died, replacements used up): the new generation takes that socket, not a
/// fresh one, and serves the connections waiting in it.
#[test]
fn a_reload_over_a_stalled_socket_serves_its_queue() {
    let dir = scratch();
    let addr = free_addr();
    let worker = switchable_worker(dir.path());
    set_worker_args(dir.path(), "--stall-accept-after 300ms");
    let nogap = start(
        dir.path(),
        addr,
        &["--stall-timeout", "500ms", "--max-replacements", "0"],
        &[worker.to_str().unwrap()],
    );
    let nc = crate::common::load::Load::start(
        crate::common::load::LoadConfig::new(addr, crate::common::load::Mode::NewConnection)
            .connections(3)
            .pause(Duration::from_millis(2))
            .duration(Duration::from_secs(300)),
    );
    nogap.wait_for_log("accept queue stalled", LONG);
    set_worker_args(dir.path(), "");
    let gen = hup(&nogap);
    nogap.wait_for_log("shares it, to take over its queue", LONG);
    nogap.wait_for_log(&format!("generation ready generation={gen}"), LONG);
    assert!(nc.wait_for_more_ok(50, LONG), "the queue is served again");
    let nc = nc.stop();
    eprintln!("{}", nc.summary());
    nc.assert_no_failures();
}

#[test]
fn a_burst_of_hups_coalesces_into_at_most_two_reloads() {
    let dir = scratch();
    let addr = free_addr();
    // A slow start keeps the first reload open while the burst arrives.
    let mut nogap = start_demo(dir.path(), addr, &[], &["--start-delay", "500ms"]);
    for _ in 0..50 {
        nogap.signal(Signal::SIGHUP);
    }
    nogap.wait_for_log("generation ready generation=2", LONG);
    // A coalesced reload, if any, starts right after generation 2 is ready.
    if nogap
        .try_wait_for_log("reload started generation=3", Duration::from_secs(5))
        .is_some()
    {
        nogap.wait_for_log("generation ready generation=3", LONG);
    }
    // Still reloads afterwards.
    let next = nogap.count_log("reload started") as u32 + 2;
    reload(&nogap, next);

    nogap.signal(Signal::SIGTERM);
    let status = nogap.wait_exit(LONG);
    assert!(status.success(), "{status:?}");
    let reloads = nogap.count_log("reload started");
    assert!(
        (2..=3).contains(&reloads),
        "50 HUPs gave {} reloads (plus the final one); log:\n{}",
        reloads - 1,
        nogap.log_text()
    );
    assert_eq!(nogap.count_log("reload failed"), 0);
}

#[test]
fn ready_alive_mode_needs_no_notification() {
    let dir = scratch();
    let addr = free_addr();
    let listen = format!("web={addr}");
    let nogap = crate::common::Nogap::run(
        dir.path(),
        &[
            "-l",
            &listen,
            "--ready",
            "alive:300ms",
            "--",
            crate::common::demo_bin(),
            "--no-ready",
        ],
    );
    nogap.wait_for_log("generation ready generation=1", LONG);
    reload(&nogap, 2);
    let old = nogap.started_pids(Some(1));
    for p in old {
        must(LONG, "generation 1 drains", || !process_exists(p));
    }
}
