//! Bad input under systemd: a bad `ExecStart=` line, control requests from a
//! stranger, garbage on the control socket, a stored fd that is not a socket.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use super::fixture::{Nogap, Traffic, EXAMPLE_SERVICE, EXAMPLE_SOCKET, FDSTORE_SERVICE, SOON};
use super::harness::{progress, wait_for, OutputExt, Release};
use super::restart::restart_under_load;

const UNIT: &str = "example.service";
/// nogap's default control socket under the shipped units.
const CONTROL: &str = "/run/nogap-example/control.sock";

/// An unknown nogap option in `ExecStart=`: nogap exits 2 (usage), the unit
/// fails with that status, and `RestartPreventExitStatus=2 3 4` keeps systemd
/// from restarting it: the unit is `failed`, not waiting to restart.
pub fn bad_exec_start(release: Release) {
    let n = Nogap::boot(release);
    // Changed besides the port: an unknown option.
    let service = EXAMPLE_SERVICE.replace(
        "/usr/bin/nogap run --workers 2",
        "/usr/bin/nogap run --no-such-option --workers 2",
    );
    assert_ne!(service, EXAMPLE_SERVICE);
    n.install("example.socket", &n.on_port(EXAMPLE_SOCKET));
    n.install(UNIT, &service);
    let start = n.c.systemctl(&["start", UNIT]);
    assert!(!start.status.success(), "the start succeeded: {start:?}");
    // systemd decides on a restart when the main process exits: a unit that
    // will restart is in `auto-restart`, not `failed`.
    assert_eq!(n.show(UNIT, "ActiveState"), "failed");
    assert_eq!(n.show(UNIT, "SubState"), "failed");
    assert_eq!(n.show(UNIT, "Result"), "exit-code");
    assert_eq!(n.show(UNIT, "ExecMainStatus"), "2");
    assert_eq!(n.show(UNIT, "NRestarts"), "0");
    let journal = n.journal(UNIT);
    assert!(
        journal.contains("nogap: unexpected argument '--no-such-option'"),
        "nogap's one-line error is not in the journal:\n{journal}"
    );
}

/// A worker command that can never start (it exits 2 at once): nogap gives
/// up after its start limit (5 failed starts within 10s) and exits 6, and
/// `RestartPreventExitStatus=... 6` keeps systemd from restarting it in a
/// loop: the unit is `failed`, and the journal says why in one line.
pub fn worker_never_starts(release: Release) {
    let n = Nogap::boot(release);
    // Changed besides the port: the worker exits 2 at once.
    let service = EXAMPLE_SERVICE.replace(
        "-- /usr/bin/nogap-demo",
        "-- /bin/sh -c 'echo myserver: unknown flag >&2; exit 2'",
    );
    assert_ne!(service, EXAMPLE_SERVICE);
    n.install("example.socket", &n.on_port(EXAMPLE_SOCKET));
    n.install(UNIT, &service);
    let start = n.c.systemctl(&["start", UNIT]);
    assert!(!start.status.success(), "the start succeeded: {start:?}");
    assert_eq!(n.show(UNIT, "ActiveState"), "failed");
    assert_eq!(n.show(UNIT, "Result"), "exit-code");
    assert_eq!(n.show(UNIT, "ExecMainStatus"), "6");
    assert_eq!(n.show(UNIT, "NRestarts"), "0");
    let journal = n.journal(UNIT);
    assert!(
        journal.contains("nogap: no worker could start: worker ")
            && journal.contains("exited with status 2 before it was ready (5 failed starts")
            && journal.contains("its last output: myserver: unknown flag"),
        "nogap's one-line reason is not in the journal:\n{journal}"
    );
    assert!(journal.contains("myserver: unknown flag"), "{journal}");
}

/// `nogap status` and `nogap reload` as `nobody`: refused (exit 5), and the
/// service serves on, unreloaded. First with the socket as nogap makes it
/// (mode 0600: the kernel refuses the connection), then with its mode
/// loosened to 0666, so that nogap's own check (`SO_PEERCRED`) refuses.
pub fn unauthorised_control(release: Release) {
    let n = Nogap::boot(release);
    n.install_socket_pair();
    n.systemctl(&["start", "example.socket", UNIT]);
    let main = n.main_pid(UNIT).expect("a main process");
    let traffic = Traffic::start(n.addr(), 3);
    let as_nobody = |command: &str| {
        n.c.exec(&[
            "setpriv",
            "--reuid=nobody",
            "--regid=nogroup",
            "--clear-groups",
            "/usr/bin/nogap",
            command,
            "--control",
            CONTROL,
        ])
    };
    let mode = n.c.exec(&["stat", "-c", "%a %U", CONTROL]);
    assert_eq!(
        mode.expect_success("stat the control socket").trim(),
        "600 root"
    );
    for command in ["status", "reload"] {
        let out = as_nobody(command);
        assert_eq!(
            out.status.code(),
            Some(5),
            "nogap {command} as nobody: {out:?}"
        );
        assert!(
            out.stderr_text().contains("Permission denied"),
            "nogap {command} as nobody: {}",
            out.stderr_text()
        );
    }

    n.c.exec(&["chmod", "0666", CONTROL])
        .expect_success("loosen the control socket's mode");
    for command in ["status", "reload"] {
        let out = as_nobody(command);
        assert_eq!(
            out.status.code(),
            Some(5),
            "nogap {command} as nobody: {out:?}"
        );
        // nogap answers a stranger without reading the request, and closes;
        // the client may see that answer, or EPIPE while still writing.
        let err = out.stderr_text();
        if !err.contains("permission denied for uid 65534") {
            progress(format!(
                "{}: nogap {command} as nobody, socket mode 0666, did not show the refusal: {}",
                release.codename(),
                err.trim()
            ));
        }
    }
    // nogap's own check refused both.
    let refusals = wait_for("nogap's log of both refusals", SOON, || {
        let journal = n.journal(UNIT);
        let count = journal
            .matches("control request refused: not root or nogap's uid")
            .count();
        (count == 2).then_some(count)
    });
    assert_eq!(refusals, 2);

    traffic.wait_for_answers(20);
    let reports = traffic.stop();
    reports.assert_no_failures();
    assert_eq!(n.serving_generation(), 1, "a stranger's reload ran");
    assert_eq!(n.main_pid(UNIT), Some(main));
    // Root still may.
    let status = n.c.exec(&["nogap", "status", "--control", CONTROL]);
    assert!(
        status
            .expect_success("nogap status as root")
            .contains("generation 1: 2/2 workers ready"),
        "{}",
        status.stdout_text()
    );
}

/// Junk on the control socket (written from the host, through the
/// container's root): each connection gets one `{"ok":false,...}` line, and
/// the service serves on, unreloaded.
pub fn garbage_on_control_socket(release: Release) {
    let n = Nogap::boot(release);
    n.install_socket_pair();
    n.systemctl(&["start", "example.socket", UNIT]);
    let main = n.main_pid(UNIT).expect("a main process");
    let path = format!("/proc/{}/root{CONTROL}", n.c.leader_pid());
    let traffic = Traffic::start(n.addr(), 3);
    let long = vec![b'x'; 100_000];
    let junk: [&[u8]; 7] = [
        b"garbage\n",
        b"\x00\xff\xfe\x01\n",
        b"{\"version\":1}\n",
        b"{\"version\":1,\"command\":\"explode\"}\n",
        b"{\"version\":99,\"command\":\"reload\"}\n",
        b"[1,2,3]\n",
        &long,
    ];
    for bytes in junk {
        let mut s = UnixStream::connect(&path).unwrap_or_else(|e| panic!("connect {path}: {e}"));
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("read timeout");
        s.set_write_timeout(Some(Duration::from_secs(10)))
            .expect("write timeout");
        // nogap reads one bounded line (4 KiB) and may answer and close
        // before we are done writing; closing with unread bytes resets the
        // connection, after its answer: read that one line.
        let _ = s.write_all(bytes);
        let mut answer = String::new();
        BufReader::new(s)
            .read_line(&mut answer)
            .unwrap_or_else(|e| panic!("answer to {:?}: {e}", short(bytes)));
        let reply: serde_json::Value = serde_json::from_str(answer.trim())
            .unwrap_or_else(|e| panic!("answer {answer:?} to {:?}: {e}", short(bytes)));
        assert_eq!(reply["ok"], false, "answer to {:?}: {reply}", short(bytes));
        assert!(reply["error"].is_string(), "{reply}");
        progress(format!("{:?} -> {}", short(bytes), answer.trim()));
    }
    // A client that connects and says nothing.
    drop(UnixStream::connect(&path).expect("connect"));

    traffic.wait_for_answers(20);
    let reports = traffic.stop();
    reports.assert_no_failures();
    assert_eq!(n.serving_generation(), 1, "junk reloaded");
    assert_eq!(n.main_pid(UNIT), Some(main));
    let status = n.c.exec(&["nogap", "status", "--control", CONTROL]);
    status.expect_success("nogap status after the junk");
}

fn short(bytes: &[u8]) -> String {
    let s = String::from_utf8_lossy(&bytes[..bytes.len().min(40)]).into_owned();
    if bytes.len() > 40 {
        format!("{s}... ({} bytes)", bytes.len())
    } else {
        s
    }
}

/// A non-socket under nogap's socket name in the fd store (a FIFO, stored
/// with `systemd-notify --fd= --fdname=`, systemd 254 and later): nogap
/// drops it from the store (`FDSTOREREMOVE=1`), binds the port itself,
/// stores that socket, and serves; the next restarts refuse no connection.
pub fn stored_fd_not_a_socket(release: Release) {
    let n = Nogap::boot(release);
    const FDSTORE_UNIT: &str = "example-fdstore.service";
    // Changed besides the port: ExecStart= goes through a wrapper. On the
    // first start it is the main process that stores a FIFO as "http" and
    // fails; systemd keeps the store for the automatic restart, where the
    // wrapper runs nogap.
    n.script(
        "/usr/local/bin/poison-fd-store",
        "#!/bin/sh\n\
         if [ ! -e /run/poisoned ]; then\n\
         \x20   touch /run/poisoned\n\
         \x20   mkfifo /run/not-a-socket\n\
         \x20   exec 3<>/run/not-a-socket\n\
         \x20   exec systemd-notify --fd=3 --fdname=http --exec -- FDSTORE=1 ';' /bin/false\n\
         fi\n\
         exec \"$@\"\n",
    );
    let service = n.on_port(FDSTORE_SERVICE).replace(
        "ExecStart=/usr/bin/nogap run",
        "ExecStart=/usr/local/bin/poison-fd-store /usr/bin/nogap run",
    );
    n.install(FDSTORE_UNIT, &service);
    let _ = n.c.systemctl(&["start", FDSTORE_UNIT]);
    n.wait_property(
        FDSTORE_UNIT,
        "ActiveState",
        "active",
        Duration::from_secs(30),
    );
    eprintln!("{}", n.journal(FDSTORE_UNIT));
    assert_eq!(n.show(FDSTORE_UNIT, "NRestarts"), "1");
    // The socket, and the output pipe of each of the 2 workers.
    assert_eq!(n.show(FDSTORE_UNIT, "NFileDescriptorStore"), "3");
    let journal = n.journal(FDSTORE_UNIT);
    assert!(
        journal.contains("dropping unusable fd from the fd store"),
        "{journal}"
    );
    assert_eq!(n.serving_generation(), 1);
    restart_under_load(&n, FDSTORE_UNIT);
}
