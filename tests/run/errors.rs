//! Bad input: one line on stderr naming the bad value, the documented exit
//! code, and no worker started.

use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use crate::common::{demo_bin, free_addr, nogap_bin, Nogap, LONG};
use crate::util::scratch;

const USAGE: i32 = 2;
const SOCKETS: i32 = 3;
const COMMAND: i32 = 4;

/// Runs `cmd` (a nogap invocation whose worker, if it ever ran, would write
/// `DIR/started`) and checks the exit code, the one error line naming
/// `names`, and that no worker started. Returns what is wrong, if anything.
fn check_error(dir: &Path, cmd: Command, exit: i32, names: &[&str]) -> Result<(), String> {
    let shown = format!("{cmd:?}");
    let mut nogap = Nogap::spawn("nogap", cmd);
    let status = nogap.wait_exit(LONG);
    let lines = nogap.wait_output_closed(LONG);
    let stderr: Vec<&String> = lines
        .iter()
        .filter(|l| !l.starts_with("stdout: ") && !l.trim().is_empty())
        .collect();
    let mut wrong = Vec::new();
    if status.code() != Some(exit) {
        wrong.push(format!("exit {status} (want {exit})"));
    }
    if stderr.len() != 1 {
        wrong.push(format!("{} lines on stderr (want 1)", stderr.len()));
    }
    for name in names {
        if !stderr.first().is_some_and(|l| l.contains(name)) {
            wrong.push(format!("error does not name {name:?}"));
        }
    }
    if dir.join("started").exists() || nogap.count_log("worker started") > 0 {
        wrong.push("a worker was started".to_string());
    }
    if wrong.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "{shown}\n    {}\n    output: {lines:?}",
            wrong.join("; ")
        ))
    }
}

/// Panics listing every case that went wrong.
fn all_ok(results: Vec<Result<(), String>>) {
    let errors: Vec<String> = results.into_iter().filter_map(Result::err).collect();
    assert!(
        errors.is_empty(),
        "{} case(s) wrong:\n{}",
        errors.len(),
        errors.join("\n")
    );
}

fn expect_error(dir: &Path, cmd: Command, exit: i32, names: &[&str]) {
    all_ok(vec![check_error(dir, cmd, exit, names)]);
}

/// `nogap run ARGS...` whose worker would leave `DIR/started` behind.
fn run(dir: &Path, args: &[&str], listen: bool) -> Command {
    let mut cmd = Command::new(nogap_bin());
    cmd.arg("run").env("RUNTIME_DIRECTORY", dir);
    if listen {
        cmd.args(["-l", &free_addr().to_string()]);
    }
    cmd.args(args);
    cmd
}

fn worker(dir: &Path) -> Vec<String> {
    let report = dir.join("started").display().to_string();
    vec!["--".into(), demo_bin().into(), "--report".into(), report]
}

fn with_worker<'a>(args: &[&'a str], worker: &'a [String]) -> Vec<&'a str> {
    let mut v = args.to_vec();
    v.extend(worker.iter().map(String::as_str));
    v
}

#[test]
fn usage_errors_exit_2_naming_the_bad_value() {
    let cases: &[(&[&str], &[&str])] = &[
        (&["--frobnicate"], &["--frobnicate"]),
        (&["-l", "127.0.0.1"], &["127.0.0.1"]),
        (&["-l", "tcp://127.0.0.1:notaport"], &["notaport"]),
        (&["-l", "web=udp://127.0.0.1:99999"], &["99999"]),
        (&["-l", "sctp://127.0.0.1:80"], &["sctp"]),
        (&["--drain-timeout", "5parsecs"], &["5parsecs"]),
        (&["--start-timeout", "soon"], &["soon"]),
        (&["--ready", "alive:forever"], &["forever"]),
        (&["--ready", "psychic"], &["psychic"]),
        (&["--stop-signal", "SIGFOO"], &["FOO"]),
        (&["--stop-signal", "99"], &["99"]),
        (&["-w", "many"], &["many"]),
        (&["--metrics", "nowhere"], &["--metrics", "nowhere"]),
        (&["--metrics", "127.0.0.1"], &["127.0.0.1"]),
        (&["--ready", "notify+http:healthz"], &["http:healthz"]),
        (&["--ready", "notify+udp"], &["udp"]),
        (
            &["--ready", "notify+http:/healthz", "--handover", "shared"],
            &["GET /healthz", "--handover shared"],
        ),
        (&["--ready", "tcp", "--reuseport"], &["--reuseport"]),
    ];
    let mut results = Vec::new();
    for (args, names) in cases {
        let dir = scratch();
        let worker = worker(dir.path());
        let cmd = run(dir.path(), &with_worker(args, &worker), true);
        results.push(check_error(dir.path(), cmd, USAGE, names));
        // The same without a valid -l before it.
        let cmd = run(dir.path(), &with_worker(args, &worker), false);
        results.push(check_error(dir.path(), cmd, USAGE, names));
    }
    all_ok(results);
}

#[test]
fn missing_command_is_a_usage_error() {
    let mut results = Vec::new();
    for args in [&[][..], &["--"][..]] {
        let dir = scratch();
        results.push(check_error(
            dir.path(),
            run(dir.path(), args, true),
            USAGE,
            &[],
        ));
    }
    all_ok(results);
}

#[test]
fn port_in_use_exits_3_naming_the_address() {
    let dir = scratch();
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let worker = worker(dir.path());
    let cmd = run(dir.path(), &with_worker(&["-l", &addr], &worker), false);
    expect_error(dir.path(), cmd, SOCKETS, &[&addr]);
}

#[test]
fn metrics_port_in_use_exits_3_naming_the_address() {
    let dir = scratch();
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let worker = worker(dir.path());
    let cmd = run(
        dir.path(),
        &with_worker(&["--metrics", &addr], &worker),
        true,
    );
    expect_error(dir.path(), cmd, SOCKETS, &[&addr, "--metrics"]);
}

#[test]
fn command_not_found_or_not_executable_exits_4() {
    let dir = scratch();
    let plain = dir.path().join("not-executable");
    std::fs::write(&plain, "#!/bin/sh\ntouch \"$0.ran\"\n").unwrap();
    std::fs::set_permissions(&plain, std::fs::Permissions::from_mode(0o644)).unwrap();
    let plain = plain.display().to_string();
    let subdir = dir.path().display().to_string();
    let cases = [
        "/nonexistent/nogap-test-server".to_string(),
        "nogap-test-no-such-command".to_string(),
        plain.clone(),
        subdir,
    ];
    let mut results = Vec::new();
    for command in &cases {
        let cmd = run(dir.path(), &["--", command], true);
        results.push(check_error(dir.path(), cmd, COMMAND, &[command]));
    }
    all_ok(results);
    assert!(!Path::new(&format!("{plain}.ran")).exists());
}

/// `sh -c 'export LISTEN_PID=$$ ...; exec nogap run ...'`: the variables are
/// addressed to nogap, since exec keeps the shell's pid.
fn activated(dir: &Path, fds: &str, setup: &str) -> Command {
    let script = format!(
        "export LISTEN_PID=$$ LISTEN_FDS={fds} LISTEN_FDNAMES=web; {setup} exec \"$0\" run -- \"$1\" --report \"$2\""
    );
    let mut cmd = Command::new("/bin/sh");
    cmd.arg("-c")
        .arg(script)
        .arg(nogap_bin())
        .arg(demo_bin())
        .arg(dir.join("started"))
        .env("RUNTIME_DIRECTORY", dir);
    cmd
}

#[test]
fn inherited_fds_that_are_not_sockets_exit_3() {
    let dir = scratch();
    let file = dir.path().join("plain-file");
    std::fs::write(&file, "not a socket\n").unwrap();
    let open_file = format!("exec 3<'{}';", file.display());
    let cases = [
        // fd 3 is a regular file.
        ("1", open_file.as_str(), "3"),
        // fd 3 is not open at all.
        ("1", "exec 3<&-;", "3"),
        // LISTEN_FDS is not a number.
        ("abc", "", "abc"),
    ];
    let mut results = Vec::new();
    for (fds, setup, name) in cases {
        let d = scratch();
        results.push(check_error(
            d.path(),
            activated(d.path(), fds, setup),
            SOCKETS,
            &[name],
        ));
    }
    all_ok(results);
}

/// A probe that cannot reach the new generation alone (no TCP socket to
/// steer): a usage error at start, before any worker runs. The sockets are
/// known only once taken (LISTEN_FDS), so nogap's start-up lines come first.
#[test]
fn a_probe_without_a_steerable_socket_exits_2() {
    let dir = scratch();
    let worker = worker(dir.path());
    let udp = format!("udp://{}", free_addr());
    let args = with_worker(&["-l", &udp, "--ready", "notify+tcp"], &worker);
    let mut nogap = Nogap::spawn("nogap", run(dir.path(), &args, false));
    let status = nogap.wait_exit(LONG);
    let lines = nogap.wait_output_closed(LONG);
    assert_eq!(status.code(), Some(USAGE), "{lines:?}");
    let last = lines.last().cloned().unwrap_or_default();
    assert!(
        last.contains("--ready with a probe (tcp)") && last.contains("TCP socket"),
        "{lines:?}"
    );
    assert_eq!(nogap.count_log("worker started"), 0);
    assert!(!dir.path().join("started").exists());
}
