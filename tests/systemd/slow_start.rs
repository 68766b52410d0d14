//! A slow but legitimate start is not killed: while a generation starts,
//! nogap asks systemd for more time (`EXTEND_TIMEOUT_USEC=`, the start
//! timeout plus 5 s), at start-up and on reload, so a `TimeoutStartSec=`
//! shorter than the worker's start-up does not fail the unit.

use super::fixture::{Nogap, EXAMPLE_SERVICE, EXAMPLE_SOCKET};
use super::harness::{progress, Release};

const UNIT: &str = "example.service";

pub fn extends_the_start_timeout(release: Release) {
    let n = Nogap::boot(release);
    // Changed besides the port: the worker needs 4 s to become ready, and
    // systemd allows 2 s for a start or a reload.
    let service = EXAMPLE_SERVICE
        .replace(
            "-- /usr/bin/nogap-demo",
            "-- /usr/bin/nogap-demo --start-delay 4s",
        )
        .replace("TimeoutStartSec=90s", "TimeoutStartSec=2s");
    assert!(service.contains("--start-delay 4s") && service.contains("TimeoutStartSec=2s"));
    n.install("example.socket", &n.on_port(EXAMPLE_SOCKET));
    n.install(UNIT, &service);

    let start = n.c.systemctl(&["start", "example.socket", UNIT]);
    assert!(
        start.status.success(),
        "a 4 s start under TimeoutStartSec=2s failed: {start:?}\n{}",
        n.journal(UNIT)
    );
    assert_eq!(n.show(UNIT, "ActiveState"), "active");
    assert_eq!(n.show(UNIT, "NRestarts"), "0");
    assert_eq!(n.serving_generation(), 1);

    let reload = n.c.systemctl(&["reload", UNIT]);
    assert!(
        reload.status.success(),
        "a 4 s reload under TimeoutStartSec=2s failed: {reload:?}\n{}",
        n.journal(UNIT)
    );
    assert_eq!(n.serving_generation(), 2);
    assert_eq!(n.show(UNIT, "ActiveState"), "active");
    progress(format!(
        "{release:?}: 4 s start and reload under TimeoutStartSec=2s: ok"
    ));
}
