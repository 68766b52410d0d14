//! `systemctl reload` of the shipped `example.service` (+ `example.socket`):
//! under load, and when the new generation cannot start.

use std::time::{Duration, Instant};

use super::fixture::{Nogap, Traffic};
use super::harness::{progress, OutputExt, Release};
use super::load::Report;

const UNIT: &str = "example.service";
const RELOADS: u32 = 20;

/// 20 × `systemctl reload` under keep-alive and new-connection load: no
/// request fails, and each reload returns only once the new generation
/// serves: systemd's status text names it, and the next new connection is
/// answered by it, or by an old worker that got its stop signal but has not
/// closed its listener yet (nogap does not wait for that; counted, and
/// bounded below).
pub fn under_load(release: Release) {
    let n = Nogap::boot(release);
    n.install_socket_pair();
    n.systemctl(&["start", "example.socket", UNIT]);
    assert_eq!(n.serving_generation(), 1);

    let traffic = Traffic::start(n.addr(), 3);
    let mut took = Vec::new();
    let mut returned = Vec::new();
    let mut probes_old = 0;
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
        assert!(
            answered == gen || answered == gen - 1,
            "after reload to generation {gen} returned, generation {answered} answered"
        );
        if answered != gen {
            probes_old += 1;
        }
        // Traffic flows between reloads, not only around them.
        traffic.wait_for_answers(10);
    }
    let reports = traffic.stop();
    reports.assert_no_failures();
    took.sort();
    let late = late_answers(&reports.new_conn, &returned);
    progress(format!(
        "{}: {RELOADS} reloads, systemctl reload took {:.0?} (median) to {:.0?} (max); \
         the first new connection after return was answered by the old generation \
         {probes_old} times; under load {} new connections started after a reload \
         returned were answered by the old generation, at most {:.1?} after it",
        release.codename(),
        took[took.len() / 2],
        took[took.len() - 1],
        late.len(),
        late.iter().max().copied().unwrap_or_default(),
    ));
    // The old generation closes its listeners as soon as it handles its
    // stop signal: milliseconds, even on a busy box.
    assert!(
        late.iter().all(|lag| *lag < LATE_BOUND),
        "old workers accepted up to {:?} after the reload returned",
        late.iter().max()
    );
    let last = RELOADS + 1;
    assert_eq!(n.serving_generation(), last);
    assert_eq!(n.show(UNIT, "ActiveState"), "active");
}

/// How long after `systemctl reload` returned an old worker may still
/// accept a new connection.
const LATE_BOUND: Duration = Duration::from_secs(1);

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

/// A reload whose new workers exit before they are ready: `systemctl reload`
/// fails, the old generation keeps serving every request, and the status
/// text says why. The next good reload works.
pub fn failed(release: Release) {
    let n = Nogap::boot(release);
    // The only change besides the port: the worker is a wrapper that runs
    // the demo, or makes it fail at start while the flag file exists.
    n.script(
        "/usr/local/bin/demo-or-fail",
        "#!/bin/sh\n\
         if [ -e /run/fail-workers ]; then exec /usr/bin/nogap-demo --fail-at-start; fi\n\
         exec /usr/bin/nogap-demo\n",
    );
    let service = super::fixture::EXAMPLE_SERVICE
        .replace("-- /usr/bin/nogap-demo", "-- /usr/local/bin/demo-or-fail");
    assert_ne!(service, super::fixture::EXAMPLE_SERVICE);
    n.install("example.socket", &n.on_port(super::fixture::EXAMPLE_SOCKET));
    n.install(UNIT, &service);
    n.systemctl(&["start", "example.socket", UNIT]);
    assert_eq!(n.serving_generation(), 1);

    let traffic = Traffic::start(n.addr(), 3);
    n.systemctl(&["reload", UNIT]);
    assert_eq!(n.serving_generation(), 2);

    n.c.exec(&["touch", "/run/fail-workers"])
        .expect_success("touch the flag");
    let reload = n.c.systemctl(&["reload", UNIT]);
    assert!(
        !reload.status.success(),
        "systemctl reload succeeded although the new workers fail:\n{}",
        reload.stdout_text()
    );
    assert_eq!(n.serving_generation(), 2, "the old generation serves");
    traffic.wait_for_answers(20);
    let failed_status = n.show(UNIT, "StatusText");
    let status = &failed_status;
    assert!(
        status.starts_with("generation 2: 2/2 workers ready; last reload failed: worker ")
            && status.contains("of generation 3 exited with status 3 before it was ready"),
        "StatusText={status:?}"
    );
    // `systemctl status` shows the same text, and the unit stays active.
    let shown = n.c.systemctl(&["status", UNIT]).stdout_text();
    assert!(shown.contains(&format!("Status: \"{status}\"")), "{shown}");
    assert_eq!(n.show(UNIT, "ActiveState"), "active");
    // ExecReload's error line is in the unit's journal.
    let journal = n.journal(UNIT);
    assert!(
        journal.contains("nogap: reload failed: worker "),
        "journal:\n{journal}"
    );

    n.c.exec(&["rm", "/run/fail-workers"])
        .expect_success("remove the flag");
    n.systemctl(&["reload", UNIT]);
    assert_eq!(n.serving_generation(), 4);
    traffic.wait_for_answers(20);
    let reports = traffic.stop();
    reports.assert_no_failures();
    let gens: std::collections::BTreeSet<u32> = reports
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
    progress(format!(
        "{}: status after the failed reload: {failed_status:?}",
        release.codename()
    ));
}
