//! Crashing workers are replaced with exponential backoff while the
//! sockets stay open.

use std::thread;
use std::time::Duration;

use crate::common::load::{get_once, FailureKind, Load, LoadConfig, Mode, Target};
use crate::common::{field, free_addr, LONG};
use crate::util::{scratch, script, start};

#[test]
fn crashing_worker_restarts_with_growing_backoff_and_queued_connections_are_served() {
    let dir = scratch();
    let addr = free_addr();
    // The first 4 workers crash 300ms after start, the 5th is stable.
    let worker = script(
        dir.path(),
        "crashy.sh",
        r#"n=$(cat "$DIR/count" 2>/dev/null || echo 0)
n=$((n + 1))
echo $n > "$DIR/count"
if [ $n -le 4 ]; then exec "$DEMO" --crash-after 300ms; fi
exec "$DEMO""#,
    );
    let nogap = start(dir.path(), addr, &[], &[worker.to_str().unwrap()]);
    let load = Load::start(
        LoadConfig::new(addr, Mode::NewConnection)
            .connections(2)
            .pause(Duration::from_millis(20))
            .timeout(Duration::from_secs(20)),
    );

    // Right after the 4th crash no worker runs for the backoff: a request
    // sent now waits in the listen queue and the next worker answers it.
    nogap.wait_for_count("restart scheduled", 4, LONG);
    let probe = thread::spawn(move || get_once(&Target::Tcp(addr), Duration::from_secs(30)));
    let stable = nogap.wait_workers(1, 5, LONG)[4] as u32;
    let resp = probe
        .join()
        .unwrap()
        .unwrap_or_else(|f| panic!("request sent while no worker ran failed: {f}"));
    assert_eq!(resp.pid, Some(stable), "answered by the restarted worker");
    assert!(load.wait_for_more_ok(20, LONG));
    let report = load.stop();
    eprintln!("{}", report.summary());

    let backoffs: Vec<u64> = nogap
        .matching("restart scheduled")
        .iter()
        .map(|l| {
            field(l, "backoff_ms")
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("no backoff_ms= in {l:?}"))
        })
        .collect();
    assert!(
        backoffs.windows(2).all(|w| w[1] > w[0]),
        "backoff must grow: {backoffs:?}"
    );
    let exits = nogap.matching("worker exited");
    assert!(exits.len() >= 4, "{exits:?}");
    for l in &exits[..4] {
        assert!(
            field(l, "status").is_some_and(|s| s.contains('3')),
            "exit status 3 of --crash-after expected in {l:?}"
        );
    }
    // The socket stayed open through every crash: never refused, never a
    // request left unanswered. (A crash can still cut a connection the dying
    // worker had accepted: reset or EOF are the worker's doing.)
    assert_eq!(
        report.failures_of(FailureKind::Refused),
        0,
        "{}",
        report.summary()
    );
    assert_eq!(
        report.failures_of(FailureKind::Timeout),
        0,
        "{}",
        report.summary()
    );
    assert!(report.pids().contains(&stable));
    // Last, as the most specific: the first restart is immediate (one crash
    // recovers at once), then quick failures back off 100ms, doubling.
    assert_eq!(
        backoffs,
        [0, 100, 200, 400],
        "backoff: 0, then 100ms doubling"
    );
}
