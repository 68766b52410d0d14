//! `systemd-analyze verify` of every shipped unit, verbatim, inside the
//! release that runs it (the host's systemd may be another version).

use super::fixture::{
    Nogap, EXAMPLE_SERVICE, EXAMPLE_SOCKET, FDSTORE_SERVICE, NOTIFY_RELOAD_SERVICE,
};
use super::harness::{OutputExt, Release};

/// The template unit the package ships, verified as an instance
/// (`nogap@demo.service`: `%i` is `demo`).
const TEMPLATE: &str = include_str!("../../units/nogap@.service");

const DIR: &str = "/opt/units";

/// Every unit verifies without a word on trixie; on bookworm every unit but
/// the `Type=notify-reload` variant, which systemd 252 does not know (that
/// it says so is checked too). A unit with a missing binary fails, so the
/// check is not vacuous.
pub fn shipped_units(release: Release) {
    let n = Nogap::boot(release);
    for (name, text) in [
        ("example.service", EXAMPLE_SERVICE),
        ("example.socket", EXAMPLE_SOCKET),
        ("example-fdstore.service", FDSTORE_SERVICE),
        ("example-notify-reload.service", NOTIFY_RELOAD_SERVICE),
        ("nogap@demo.service", TEMPLATE),
        (
            "broken.service",
            &EXAMPLE_SERVICE.replace("/usr/bin/nogap run", "/usr/bin/no-such-nogap run"),
        ),
    ] {
        n.c.write_file(&format!("{DIR}/{name}"), text.as_bytes(), 0o644);
    }
    let verify = |units: &[&str]| {
        let mut args = vec!["systemd-analyze".to_owned(), "verify".to_owned()];
        args.extend(units.iter().map(|u| match u.starts_with("--") {
            true => u.to_string(),
            false => format!("{DIR}/{u}"),
        }));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        n.c.exec(&args)
    };

    let mut clean = vec![
        &["example.service", "example.socket"][..],
        &["example-fdstore.service"],
        // Its Documentation= names man:nogap-run(1), which the package
        // installs; the container has no man to look it up.
        &["--man=no", "nogap@demo.service"],
    ];
    if release.systemd_version() >= 253 {
        clean.push(&["example-notify-reload.service"]);
    } else {
        let out = verify(&["example-notify-reload.service"]);
        assert!(
            out.stderr_text()
                .contains("Failed to parse service type, ignoring: notify-reload"),
            "systemd {} accepts Type=notify-reload? {out:?}",
            release.systemd_version()
        );
    }
    for units in clean {
        let out = verify(units);
        assert!(
            out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
            "systemd-analyze verify {units:?} ({}): {}\n{}{}",
            release.codename(),
            out.status,
            out.stdout_text(),
            out.stderr_text()
        );
    }

    let out = verify(&["broken.service", "example.socket"]);
    assert!(
        !out.status.success() && out.stderr_text().contains("/usr/bin/no-such-nogap"),
        "verify of a unit with a missing binary: {out:?}"
    );
}
