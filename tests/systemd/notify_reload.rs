//! `Type=notify-reload` (systemd 253 and later, so trixie only): the shipped
//! `example-notify-reload.service`, installed as `example.service` beside
//! the shipped `example.socket`, as its comment says.

use super::fixture::{Nogap, EXAMPLE_SOCKET, NOTIFY_RELOAD_SERVICE};
use super::harness::{progress, Release};
use super::reload::{failing_reload_under_load, reloads_under_load, with_failing_workers, UNIT};

/// 20 × `systemctl reload` (SIGHUP, RELOADING=1 … READY=1) under load: no
/// request fails, and each returns once the new generation serves.
pub fn reload_under_load(release: Release) {
    let n = Nogap::boot(release);
    n.install("example.socket", &n.on_port(EXAMPLE_SOCKET));
    // Changed: the name (see above).
    n.install(UNIT, NOTIFY_RELOAD_SERVICE);
    n.systemctl(&["start", "example.socket", UNIT]);
    assert_eq!(n.show(UNIT, "Type"), "notify-reload");
    reloads_under_load(&n);
}

/// A reload whose workers fail: as documented in the unit, `systemctl
/// reload` cannot fail in this mode (it exits 0), but the old generation
/// serves every request and the status text says why.
pub fn failed_reload(release: Release) {
    let n = Nogap::boot(release);
    n.install("example.socket", &n.on_port(EXAMPLE_SOCKET));
    // Changed: the name, and the worker wrapper of `with_failing_workers`.
    n.install(UNIT, &with_failing_workers(&n, NOTIFY_RELOAD_SERVICE));
    n.systemctl(&["start", "example.socket", UNIT]);
    let status = failing_reload_under_load(&n, false);
    progress(format!(
        "{} (notify-reload): status after the failed reload: {status:?}",
        release.codename()
    ));
}
