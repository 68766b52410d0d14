//! nogap under a real systemd. Each test boots Debian in a `systemd-nspawn`
//! container (systemd as PID 1) with the harness in `systemd/harness.rs`;
//! see `systemd/README.md`. Needs root; the first run builds the root
//! filesystems (about a minute each).
//!
//! The scenarios (`systemd/*.rs`, listed in the README) run the shipped
//! units with the host-built binaries under load from the host, on bookworm
//! (systemd 252) and trixie (257); this file also tests the harness itself.

use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::time::Duration;

use harness::{free_port, progress, wait_for, BootState, Container, OutputExt, Release, SHARE};

#[path = "systemd/harness.rs"]
mod harness;

#[path = "common/load.rs"]
mod load;

#[path = "systemd/activation.rs"]
mod activation;
#[path = "systemd/bad_input.rs"]
mod bad_input;
#[path = "systemd/death.rs"]
mod death;
#[path = "systemd/deb.rs"]
mod deb;
#[path = "systemd/fixture.rs"]
mod fixture;
#[path = "systemd/journal.rs"]
mod journal;
#[path = "systemd/listen.rs"]
mod listen;
#[path = "systemd/notify_reload.rs"]
mod notify_reload;
#[path = "systemd/reload.rs"]
mod reload;
#[path = "systemd/restart.rs"]
mod restart;
#[path = "systemd/slow_start.rs"]
mod slow_start;
#[path = "systemd/upgrade.rs"]
mod upgrade;
#[path = "systemd/verify.rs"]
mod verify;
#[path = "systemd/watchdog.rs"]
mod watchdog;

/// One test per release, `NAME::bookworm` and `NAME::trixie`, each in its
/// own container.
macro_rules! on_both {
    ($name:ident => $scenario:path) => {
        mod $name {
            use crate::harness::Release;

            #[test]
            fn bookworm() {
                $scenario(Release::Bookworm)
            }

            #[test]
            fn trixie() {
                $scenario(Release::Trixie)
            }
        }
    };
}

on_both!(socket_activation => crate::activation::first_connection_starts_the_service);
on_both!(reload_under_load => crate::reload::under_load);
on_both!(reload_that_fails => crate::reload::failed);
on_both!(restart_with_socket_unit => crate::restart::with_socket_unit);
on_both!(restart_with_fd_store => crate::restart::with_fd_store);
on_both!(watchdog_with_socket_unit => crate::watchdog::with_socket_unit);
on_both!(watchdog_with_fd_store => crate::watchdog::with_fd_store);
on_both!(death_with_socket_unit => crate::death::with_socket_unit);
on_both!(death_with_fd_store => crate::death::with_fd_store);
on_both!(journal_fields => crate::journal::structured_fields);
on_both!(slow_start_is_not_killed => crate::slow_start::extends_the_start_timeout);
on_both!(verify_units => crate::verify::shipped_units);
on_both!(upgrade_in_place => crate::upgrade::in_place_under_load);
on_both!(debian_package => crate::deb::install_serve_reload_purge);
on_both!(listen_change_by_reload => crate::listen::added_by_reload_and_refused_in_use);
on_both!(bad_exec_start => crate::bad_input::bad_exec_start);
on_both!(worker_never_starts => crate::bad_input::worker_never_starts);
on_both!(unauthorised_control => crate::bad_input::unauthorised_control);
on_both!(garbage_on_control_socket => crate::bad_input::garbage_on_control_socket);

// `systemd-notify --fd= --fdname=` needs systemd 254: trixie only.
mod stored_fd_not_a_socket {
    #[test]
    fn trixie() {
        crate::bad_input::stored_fd_not_a_socket(crate::harness::Release::Trixie)
    }
}

// Type=notify-reload needs systemd 253: trixie only.
mod notify_reload_under_load {
    #[test]
    fn trixie() {
        crate::notify_reload::reload_under_load(crate::harness::Release::Trixie)
    }
}

mod notify_reload_that_fails {
    #[test]
    fn trixie() {
        crate::notify_reload::failed_reload(crate::harness::Release::Trixie)
    }
}

const IO_TIMEOUT: Duration = Duration::from_secs(10);

#[test]
fn harness_boots_bookworm_and_socket_activates() {
    harness_works(Release::Bookworm);
}

#[test]
fn harness_boots_trixie_and_socket_activates() {
    harness_works(Release::Trixie);
}

/// Boot, check the systemd version, run a host-built binary inside, socket
/// activate a service from the host, tear down and find nothing left.
fn harness_works(release: Release) {
    let c = Container::boot(release);
    if c.boot_state() != BootState::Running {
        let failed = c.systemctl(&["--failed"]).stdout_text();
        panic!(
            "{} booted {:?}, expected a clean boot:\n{failed}",
            c.name(),
            c.boot_state()
        );
    }

    let version = c
        .systemctl(&["--version"])
        .expect_success("systemctl --version");
    let want = format!("systemd {} (", release.systemd_version());
    assert!(
        version.starts_with(&want),
        "expected {want:?}, got:\n{version}"
    );

    // Host-built binaries run inside: this test binary lists its tests,
    // once copied in and once through the shared directory.
    let me = std::env::current_exe().expect("path of the test binary");
    c.copy_in(&me, "/usr/local/bin/harness-probe");
    let listed = c
        .exec(&["harness-probe", "--list"])
        .expect_success("copied-in binary");
    assert!(
        listed.contains("harness_boots_trixie_and_socket_activates: test"),
        "{listed}"
    );
    fs::copy(&me, c.share_dir().join("harness-probe")).expect("copy into the shared directory");
    c.exec(&[&format!("{SHARE}/harness-probe"), "--list"])
        .expect_success("binary in the shared directory");

    socket_activation(&c);

    let name = c.name().to_owned();
    let teardown = c.shutdown();
    progress(format!("{name} torn down in {:.0?}", teardown.took));
    assert!(!teardown.forced, "{name} needed killing");
    assert!(
        teardown.leftovers.is_empty(),
        "{name} left {:?}",
        teardown.leftovers
    );
    assert_no_trace(&name);
}

/// A `.socket` (Accept=no) on a free loopback port and a service that takes
/// the listening socket by LISTEN_FDS: `systemd-socket-proxyd`, in every
/// systemd, forwarding to a listener of this test. A connection from the host
/// starts the service, and bytes make the round trip.
fn socket_activation(c: &Container) {
    let upstream = TcpListener::bind("127.0.0.1:0").expect("bind upstream");
    upstream
        .set_nonblocking(true)
        .expect("non-blocking upstream");
    let upstream_port = upstream.local_addr().expect("upstream address").port();
    let port = free_port();
    c.install_unit(
        "harness-proxy.socket",
        &format!("[Socket]\nListenStream=127.0.0.1:{port}\nAccept=no\n"),
    );
    c.install_unit(
        "harness-proxy.service",
        &format!("[Service]\nExecStart=/usr/lib/systemd/systemd-socket-proxyd 127.0.0.1:{upstream_port}\n"),
    );
    c.systemctl(&["start", "harness-proxy.socket"])
        .expect_success("start harness-proxy.socket");
    let active = |unit: &str| {
        c.systemctl(&["is-active", unit])
            .stdout_text()
            .trim()
            .to_owned()
    };
    assert_eq!(
        active("harness-proxy.service"),
        "inactive",
        "started before any connection"
    );

    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut client =
        TcpStream::connect_timeout(&addr, IO_TIMEOUT).expect("connect to the socket unit");
    client
        .set_read_timeout(Some(IO_TIMEOUT))
        .expect("read timeout");
    client.write_all(b"ping\n").expect("send ping");
    let (mut backend, _) = wait_for("the proxied connection", IO_TIMEOUT, || {
        upstream.accept().ok()
    });
    backend.set_nonblocking(false).expect("blocking backend");
    backend
        .set_read_timeout(Some(IO_TIMEOUT))
        .expect("read timeout");
    let mut got = [0; 5];
    backend
        .read_exact(&mut got)
        .expect("ping through the proxy");
    assert_eq!(&got, b"ping\n");
    backend.write_all(b"pong\n").expect("send pong");
    client.read_exact(&mut got).expect("pong through the proxy");
    assert_eq!(&got, b"pong\n");

    assert_eq!(active("harness-proxy.service"), "active");
    let main_pid = c
        .systemctl(&[
            "show",
            "--property=MainPID",
            "--value",
            "harness-proxy.service",
        ])
        .stdout_text();
    assert_ne!(
        main_pid.trim(),
        "0",
        "socket-activated service has no main process"
    );
    let journal = c.journalctl(&["-u", "harness-proxy.service"]).stdout_text();
    assert!(
        journal.contains("Started harness-proxy.service"),
        "journal:\n{journal}"
    );
}

/// Independently of the harness's own checks: no process, mount, cgroup or
/// nspawn directory mentions the machine any more.
fn assert_no_trace(name: &str) {
    for entry in fs::read_dir("/proc").expect("read /proc").flatten() {
        let cmdline = fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        assert!(
            !cmdline.contains(name),
            "process {:?} left: {cmdline}",
            entry.file_name()
        );
    }
    let mounts = fs::read_to_string("/proc/self/mountinfo").expect("read mountinfo");
    assert!(!mounts.contains(name), "mount left:\n{mounts}");
    for dir in [
        "/sys/fs/cgroup",
        "/sys/fs/cgroup/unified",
        "/sys/fs/cgroup/systemd",
        "/run/systemd/nspawn/propagate",
        "/run/systemd/nspawn/unix-export",
    ] {
        let left = Path::new(dir).join(name);
        assert!(!left.exists(), "{} left", left.display());
    }
}
