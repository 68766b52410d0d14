//! `systemctl reload` of the shipped `example.service` (+ `example.socket`):
//! under load, and when the new generation cannot start. The loops here also
//! serve the `Type=notify-reload` variant (`notify_reload.rs`).

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use super::fixture::{Nogap, Traffic, EXAMPLE_SERVICE, EXAMPLE_SOCKET};
use super::harness::{progress, OutputExt, Release};
use super::load::Report;

/// The name the services are installed under: `example.socket` triggers it.
pub const UNIT: &str = "example.service";
const RELOADS: u32 = 20;

/// 20 × `systemctl reload` of `example.service` under load.
pub fn under_load(release: Release) {
    let n = Nogap::boot(release);
    n.install_socket_pair();
    n.systemctl(&["start", "example.socket", UNIT]);
    reloads_under_load(&n);
}

/// 20 × `systemctl reload` of the running `example.service` (generation 1)
/// under keep-alive and new-connection load: no request fails, and each
/// reload returns only once the new generation serves: systemd's status
/// text names it, and every new connection from then on is answered by it
/// (the socket unit has `ReusePort=yes`, so nogap steers new connections to
/// the new generation before it answers the reload).
pub fn reloads_under_load(n: &Nogap) {
    assert_eq!(n.serving_generation(), 1);
    assert!(
        n.journal(UNIT).contains("hand-over: steered"),
        "the socket from example.socket is not steered"
    );
    let traffic = Traffic::start(n.addr(), 3);
    let mut took = Vec::new();
    let mut returned = Vec::new();
    for gen in 2..=RELOADS + 1 {
        let t = Instant::now();
        n.systemctl(&["reload", UNIT]);
        returned.push((Instant::now(), gen));
        took.push(t.elapsed());
        let status = n.show(UNIT, "StatusText");
        assert!(
            status.starts_with(&format!("generation {gen}: 2/2 workers ready")),
            "after reload to generation {gen} returned: StatusText={status:?}"
        );
        let answered = n.serving_generation();
        assert_eq!(
            answered, gen,
            "after reload to generation {gen} returned, generation {answered} answered"
        );
        // Traffic flows between reloads, not only around them.
        traffic.wait_for_answers(10);
    }
    let reports = traffic.stop();
    reports.assert_no_failures();
    took.sort();
    let late = late_answers(&reports.new_conn, &returned);
    progress(format!(
        "{} ({}): {RELOADS} reloads, systemctl reload took {:.0?} (median) to {:.0?} (max)",
        n.release().codename(),
        n.show(UNIT, "Type"),
        took[took.len() / 2],
        took[took.len() - 1],
    ));
    // A new connection started after a reload returned is the new
    // generation's: steered there before the reload was answered.
    assert!(
        late.is_empty(),
        "{} new connections started after a reload returned were answered by an older \
         generation, up to {:?} after it",
        late.len(),
        late.iter().max()
    );
    assert_eq!(n.serving_generation(), RELOADS + 1);
    assert_eq!(n.show(UNIT, "ActiveState"), "active");
}

/// For each request of `report` answered by an older generation than the
/// last reload that had returned when the request started: how long after
/// that return it started.
fn late_answers(report: &Report, returned: &[(Instant, u32)]) -> Vec<Duration> {
    report
        .samples
        .iter()
        .filter_map(|s| {
            let started = report.start + s.started;
            let (at, gen) = returned.iter().rev().find(|(at, _)| *at <= started)?;
            (s.gen < *gen).then(|| started - *at)
        })
        .collect()
}

/// The flag file that makes new workers fail (see [`with_failing_workers`]).
const FAIL_FLAG: &str = "/run/fail-workers";

/// `service` with its worker replaced by a wrapper that runs the demo, or
/// makes it fail at start while [`FAIL_FLAG`] exists; installs the wrapper.
pub fn with_failing_workers(n: &Nogap, service: &str) -> String {
    n.script(
        "/usr/local/bin/demo-or-fail",
        &format!(
            "#!/bin/sh\n\
             if [ -e {FAIL_FLAG} ]; then exec /usr/bin/nogap-demo --fail-at-start; fi\n\
             exec /usr/bin/nogap-demo\n"
        ),
    );
    let changed = service.replace("-- /usr/bin/nogap-demo", "-- /usr/local/bin/demo-or-fail");
    assert_ne!(
        changed, service,
        "the unit's worker is no longer nogap-demo"
    );
    changed
}

/// A reload of `example.service` whose new workers exit before they are
/// ready: `systemctl reload` fails, the old generation keeps serving every
/// request, and the status text says why. The next good reload works.
pub fn failed(release: Release) {
    let n = Nogap::boot(release);
    // The only change besides the port: the worker wrapper.
    let service = with_failing_workers(&n, EXAMPLE_SERVICE);
    n.install("example.socket", &n.on_port(EXAMPLE_SOCKET));
    n.install(UNIT, &service);
    n.systemctl(&["start", "example.socket", UNIT]);
    let status = failing_reload_under_load(&n, true);
    progress(format!(
        "{}: status after the failed reload: {status:?}",
        release.codename()
    ));
}

/// Under load, on the running `example.service`: a good reload (to
/// generation 2), one with failing workers (3), then a good one (4).
/// `systemctl reload` of the failing one exits non-zero if `reload_fails`,
/// else 0; either way generation 2 serves every request meanwhile, and the
/// status text says why generation 3 failed (returned).
pub fn failing_reload_under_load(n: &Nogap, reload_fails: bool) -> String {
    assert_eq!(n.serving_generation(), 1);
    let traffic = Traffic::start(n.addr(), 3);
    n.systemctl(&["reload", UNIT]);
    n.wait_generation(2);

    n.c.exec(&["touch", FAIL_FLAG])
        .expect_success("create the flag file");
    let reload = n.c.systemctl(&["reload", UNIT]);
    assert_eq!(
        reload.status.success(),
        !reload_fails,
        "systemctl reload with failing workers: {}\n{}",
        reload.status,
        reload.stderr_text()
    );
    assert_eq!(n.serving_generation(), 2, "the old generation serves");
    traffic.wait_for_answers(20);
    let failed_status = n.show(UNIT, "StatusText");
    assert!(
        failed_status.starts_with("generation 2: 2/2 workers ready; last reload failed: worker ")
            && failed_status.contains("of generation 3 exited with status 3 before it was ready"),
        "StatusText={failed_status:?}"
    );
    // `systemctl status` shows the same text, and the unit stays active.
    let shown = n.c.systemctl(&["status", UNIT]).stdout_text();
    assert!(
        shown.contains(&format!("Status: \"{failed_status}\"")),
        "{shown}"
    );
    assert_eq!(n.show(UNIT, "ActiveState"), "active");
    if reload_fails {
        // ExecReload's error line is in the unit's journal.
        let journal = n.journal(UNIT);
        assert!(
            journal.contains("nogap: reload failed: worker "),
            "journal:\n{journal}"
        );
    }

    n.c.exec(&["rm", FAIL_FLAG])
        .expect_success("remove the flag file");
    n.systemctl(&["reload", UNIT]);
    n.wait_generation(4);
    traffic.wait_for_answers(20);
    let reports = traffic.stop();
    reports.assert_no_failures();
    let gens: BTreeSet<u32> = reports
        .both()
        .iter()
        .flat_map(|r| r.samples.iter().map(|s| s.gen))
        .collect();
    assert!(
        !gens.contains(&3),
        "the failed generation answered: {gens:?}"
    );
    let status = n.show(UNIT, "StatusText");
    assert!(
        status.starts_with("generation 4: 2/2 workers ready; last reload ok (generation 4)"),
        "StatusText={status:?}"
    );
    failed_status
}
