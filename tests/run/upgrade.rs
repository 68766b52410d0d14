//! Self-upgrade in place: `nogap upgrade` and SIGUSR2 execute the binary at
//! the path nogap was started from, in the same process, under load.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use nix::sys::signal::Signal;

use crate::common::{demo_bin, free_addr, must, nogap_bin, process_exists, Nogap, LONG};
use crate::util::{
    both_loads, code, fd_count, reload, scratch, status_json, steady_fd_count, upgrade_wait,
};

/// A copy of the nogap binary at `dir/bin/nogap`, to be replaced.
fn install(dir: &Path) -> PathBuf {
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).expect("bin dir");
    let path = bin.join("nogap");
    replace(&path, &std::fs::read(nogap_bin()).expect("read nogap"));
    path
}

/// Replace the file at `path` as a package upgrade does: a new file
/// renamed over the old one (a new inode).
fn replace(path: &Path, bytes: &[u8]) {
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, bytes).expect("write binary");
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    std::fs::rename(&tmp, path).expect("rename binary");
}

/// `EXE run -l web=ADDR -w 2 --ready notify -- nogap-demo`, ready.
fn start_from(exe: &Path, dir: &Path, addr: std::net::SocketAddr) -> Nogap {
    let mut cmd = Command::new(exe);
    cmd.arg("run")
        .env("RUNTIME_DIRECTORY", dir)
        .args(["-l", &format!("web={addr}"), "-w", "2", "--ready", "notify"])
        .args(["--", demo_bin()]);
    let nogap = Nogap::spawn("nogap", cmd);
    nogap.wait_for_log("generation ready generation=1", LONG);
    nogap
}

fn exe_of(pid: i32) -> PathBuf {
    std::fs::read_link(format!("/proc/{pid}/exe")).expect("readlink exe")
}

fn inode(path: &Path) -> u64 {
    std::fs::metadata(path).expect("stat").ino()
}

#[test]
fn an_upgrade_under_load_keeps_pid_workers_and_sockets_and_loses_nothing() {
    let dir = scratch();
    let addr = free_addr();
    let exe = install(dir.path());
    let nogap = start_from(&exe, dir.path(), addr);
    let workers = nogap.started_pids(Some(1));
    let (ka, nc) = both_loads(addr, 4, Duration::from_millis(1));
    let fds_before = steady_fd_count(nogap.pid());

    // A package upgrade: a new file at the same path.
    let old_inode = inode(&exe);
    replace(&exe, &std::fs::read(nogap_bin()).unwrap());
    assert_ne!(inode(&exe), old_inode, "the binary was not replaced");
    let out = upgrade_wait(dir.path());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        code(out.status),
        0,
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains(&format!("runs as pid {}", nogap.pid())),
        "{stdout}"
    );
    nogap.wait_for_log("upgraded in place workers=2 generation=1", LONG);

    // The same process, now running the new file; the same workers serve.
    assert!(process_exists(nogap.pid()));
    assert_eq!(exe_of(nogap.pid()), exe);
    assert_eq!(
        inode(format!("/proc/{}/exe", nogap.pid()).as_ref()),
        inode(&exe)
    );
    assert!(
        workers.iter().all(|&p| process_exists(p)),
        "workers {workers:?} left"
    );
    assert_eq!(nogap.started_pids(None).len(), 2, "no worker was started");
    assert!(ka.wait_for_more_ok(200, LONG) && nc.wait_for_more_ok(200, LONG));
    // Equal once what the new image opens for an instant is closed again.
    must(LONG, "as many descriptors as before the upgrade", || {
        fd_count(nogap.pid()) == fds_before
    });

    // The new image reloads as the old did, and its status reads the same.
    reload(&nogap, 2);
    must(LONG, "generation 1 exits after the reload", || {
        workers.iter().all(|&p| !process_exists(p))
    });
    assert!(ka.wait_for_more_ok(100, LONG) && nc.wait_for_more_ok(100, LONG));
    let (ka, nc) = (ka.stop(), nc.stop());
    eprintln!("{}\n{}", ka.summary(), nc.summary());
    ka.assert_no_failures();
    nc.assert_no_failures();
    assert_eq!(
        nogap.count_log("worker exited"),
        2,
        "only generation 1 left"
    );
}

#[test]
fn a_broken_binary_is_refused_and_nogap_keeps_serving() {
    let dir = scratch();
    let addr = free_addr();
    let exe = install(dir.path());
    let nogap = start_from(&exe, dir.path(), addr);
    let workers = nogap.started_pids(Some(1));
    let (ka, nc) = both_loads(addr, 2, Duration::from_millis(2));
    let cases: [(&str, &[u8]); 2] = [
        (
            "fails its probe",
            b"#!/bin/sh\necho 'no such subcommand' >&2\nexit 1\n",
        ),
        ("cannot run", b"\x7fELF garbage, not a program"),
    ];
    for (i, (why, bytes)) in cases.iter().enumerate() {
        replace(&exe, bytes);
        let out = upgrade_wait(dir.path());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(code(out.status), 1, "{stderr}");
        assert!(stderr.starts_with("nogap: upgrade refused: "), "{stderr}");
        assert!(stderr.contains(&exe.display().to_string()), "{stderr}");
        assert!(
            stderr.contains(why) || stderr.contains("failed its probe"),
            "{why}: {stderr}"
        );
        nogap.wait_for_count("upgrade refused", i + 1, LONG);
        assert!(ka.wait_for_more_ok(50, LONG) && nc.wait_for_more_ok(50, LONG));
    }
    // A binary that reads another state format is refused too.
    replace(&exe, b"#!/bin/sh\necho 'nogap-state 999'\n");
    let out = upgrade_wait(dir.path());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(code(out.status), 1, "{stderr}");
    assert!(stderr.contains("cannot take over"), "{stderr}");

    // Still the old image, the same workers; a reload still works.
    assert_ne!(exe_of(nogap.pid()), exe, "exe: {:?}", exe_of(nogap.pid()));
    assert!(workers.iter().all(|&p| process_exists(p)));
    assert_eq!(nogap.count_log("upgraded in place"), 0);
    reload(&nogap, 2);
    let (ka, nc) = (ka.stop(), nc.stop());
    ka.assert_no_failures();
    nc.assert_no_failures();
}

#[test]
fn sigusr2_upgrades_in_place_and_a_second_upgrade_works_too() {
    let dir = scratch();
    let addr = free_addr();
    let exe = install(dir.path());
    let nogap = start_from(&exe, dir.path(), addr);
    let workers = nogap.started_pids(Some(1));
    nogap.signal(Signal::SIGUSR2);
    nogap.wait_for_log("upgraded in place workers=2", LONG);
    // Signals work in the new image (USR2 again), and so does the control
    // socket.
    nogap.signal(Signal::SIGUSR2);
    nogap.wait_for_count("upgraded in place workers=2", 2, LONG);
    let out = upgrade_wait(dir.path());
    assert_eq!(
        code(out.status),
        0,
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    nogap.wait_for_count("upgraded in place workers=2", 3, LONG);
    assert!(workers.iter().all(|&p| process_exists(p)));
    assert_eq!(nogap.started_pids(None).len(), 2, "no worker was started");
    // HUP still reloads.
    reload(&nogap, 2);
}

/// An upgrade asked for during a reload goes before the reloads asked for
/// after it; a `reload --wait` client waiting then is carried across the
/// exec (its connection too), and the new image answers it once its reload
/// serves.
#[test]
fn a_waiting_reload_client_is_carried_and_answered_by_the_new_image() {
    let dir = scratch();
    let addr = free_addr();
    let exe = install(dir.path());
    let mut cmd = Command::new(&exe);
    cmd.arg("run")
        .env("RUNTIME_DIRECTORY", dir.path())
        .args(["-l", &format!("web={addr}"), "-w", "2", "--ready", "notify"])
        .args(["--", demo_bin(), "--start-delay", "1s"]);
    let nogap = Nogap::spawn("nogap", cmd);
    nogap.wait_for_log("generation ready generation=1", LONG);
    let (ka, nc) = both_loads(addr, 2, Duration::from_millis(2));

    nogap.signal(Signal::SIGHUP);
    nogap.wait_for_log("reload started generation=2", LONG);
    let control = dir.path().join("control.sock");
    let client = |command: &'static str| {
        let control = control.clone();
        std::thread::spawn(move || {
            Command::new(nogap_bin())
                .args([command, "--wait", "--control"])
                .arg(&control)
                .output()
                .expect("run the client")
        })
    };
    let upgrade = client("upgrade");
    nogap.wait_for_log("upgrade asked for", LONG);
    let reload = client("reload");
    nogap.wait_for_log(
        "reload deferred: the self-upgrade asked for goes first",
        LONG,
    );
    assert_eq!(nogap.count_log("reload started generation=3"), 0);

    let up = upgrade.join().expect("upgrade client");
    assert_eq!(
        code(up.status),
        0,
        "{}",
        String::from_utf8_lossy(&up.stderr)
    );
    let re = reload.join().expect("reload client");
    let said = String::from_utf8_lossy(&re.stdout);
    assert_eq!(
        code(re.status),
        0,
        "{}",
        String::from_utf8_lossy(&re.stderr)
    );
    assert!(said.starts_with("generation 3 is serving"), "{said}");
    // The reload ran in the new image, after the upgrade.
    let lines = nogap.lines();
    let at = |p: &str| {
        lines
            .iter()
            .position(|l| l.contains(p))
            .unwrap_or(usize::MAX)
    };
    assert!(
        at("upgraded in place") < at("reload started generation=3"),
        "{lines:#?}"
    );
    assert!(ka.wait_for_more_ok(50, LONG) && nc.wait_for_more_ok(50, LONG));
    let (ka, nc) = (ka.stop(), nc.stop());
    ka.assert_no_failures();
    nc.assert_no_failures();
}

/// The probe parses the state it is given: garbage is refused with a
/// reason, nothing on standard input only asks for the formats.
#[test]
fn the_probe_reads_the_state_it_is_given() {
    use std::io::Write;
    use std::process::Stdio;
    let probe = |input: &[u8]| {
        let mut child = Command::new(nogap_bin())
            .arg("upgrade-probe")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run the probe");
        child.stdin.take().unwrap().write_all(input).unwrap();
        child.wait_with_output().unwrap()
    };
    let out = probe(b"");
    assert_eq!(code(out.status), 0);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "nogap-state 1");
    let out = probe(b"{\"format\":1,\"state\":\"not a state\"}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(code(out.status), 1, "{stderr}");
    assert!(
        stderr.contains("cannot read the running nogap's state"),
        "{stderr}"
    );
}

/// Every kind of socket crosses: a TCP socket with per-slot copies
/// (`--reuseport-per-worker`), a unix socket with its lock, a UDP socket.
/// The new image holds exactly the descriptors the old one held, and
/// status reads the same.
#[test]
fn every_kind_of_socket_crosses_an_upgrade() {
    let dir = scratch();
    let addr = free_addr();
    let exe = install(dir.path());
    let unix = dir.path().join("web.sock");
    let udp = free_addr();
    let mut cmd = Command::new(&exe);
    cmd.arg("run")
        .env("RUNTIME_DIRECTORY", dir.path())
        .args(["-l", &format!("web={addr}"), "-l"])
        .arg(format!("local=unix:{}", unix.display()))
        .args([
            "-l",
            &format!("dgram=udp://{udp}"),
            "-w",
            "2",
            "--ready",
            "notify",
        ])
        .args(["--reuseport-per-worker", "--", demo_bin()]);
    let nogap = Nogap::spawn("nogap", cmd);
    nogap.wait_for_log("generation ready generation=1", LONG);
    let status = || {
        let mut v = status_json(dir.path());
        v["uptime_secs"] = serde_json::Value::Null;
        for w in v["workers"].as_array_mut().unwrap() {
            w["ready_for_secs"] = serde_json::Value::Null;
            w["last_ping_secs_ago"] = serde_json::Value::Null;
            w["fds_open"] = serde_json::Value::Null;
        }
        // Queue depths are the load's at that instant (CI once read 1).
        for s in v["sockets"].as_array_mut().unwrap() {
            s["queue"] = serde_json::Value::Null;
            s["slot_queues"] = serde_json::Value::Null;
        }
        v
    };
    let fds = |pid: i32| {
        let mut v: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
            .map(|l| l.display().to_string())
            .filter(|l| l.starts_with("socket:") || l.ends_with(".lock"))
            .collect();
        v.sort();
        v
    };
    let (before, sockets) = (status(), fds(nogap.pid()));
    let (ka, nc) = both_loads(addr, 2, Duration::from_millis(2));
    let out = upgrade_wait(dir.path());
    assert_eq!(
        code(out.status),
        0,
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    nogap.wait_for_log("upgraded in place workers=2", LONG);
    // The same sockets (by inode), the lock file still held, and the same
    // view in status; a new control socket and notify sockets are the only
    // changes, and those are not listening sockets of the server.
    let after = fds(nogap.pid());
    let kept: Vec<&String> = sockets.iter().filter(|s| after.contains(s)).collect();
    assert!(sockets.iter().any(|s| s.ends_with(".lock")), "{sockets:?}");
    // 3 listeners, slot 1's copy of the TCP one (slot 0 uses the original;
    // per-slot copies turn steering off), the unix socket's lock.
    assert_eq!(
        kept.len(),
        3 + 1 + 1,
        "kept {kept:?} of {sockets:?}, now {after:?}"
    );
    assert_eq!(status()["sockets"], before["sockets"]);
    assert_eq!(status()["workers"], before["workers"]);
    let stream = std::os::unix::net::UnixStream::connect(&unix);
    assert!(
        stream.is_ok(),
        "the unix socket does not accept: {stream:?}"
    );
    let (ka, nc) = (ka.stop(), nc.stop());
    ka.assert_no_failures();
    nc.assert_no_failures();
}
