//! Bad input for hand-off forms and worker settings: one line naming the bad
//! value, the documented exit code (2 usage, 3 sockets), nothing started.

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixStream};
use std::path::Path;
use std::process::Command;

use crate::common::{free_addr, nogap_bin, nogap_command, Nogap, LONG};
use crate::util::{require_setup, scratch};

const USAGE: i32 = 2;
const SOCKETS: i32 = 3;

/// A worker that would leave `DIR/started` behind if it ever ran.
fn marker_worker(dir: &Path) -> Vec<String> {
    vec![
        "/bin/sh".into(),
        "-c".into(),
        format!("touch {}/started; exec sleep 60", dir.display()),
    ]
}

/// Runs `cmd`, checks exit code, exactly one `nogap:` line naming `names`
/// (other lines come from a socket activator in front, if any), and that
/// nothing started. Returns what is wrong.
fn check(dir: &Path, cmd: Command, exit: i32, names: &[&str]) -> Result<(), String> {
    let shown = format!("{cmd:?}");
    let mut nogap = Nogap::spawn("nogap", cmd);
    check_running(dir, &shown, &mut nogap, exit, names)
}

fn check_running(
    dir: &Path,
    shown: &str,
    nogap: &mut Nogap,
    exit: i32,
    names: &[&str],
) -> Result<(), String> {
    let status = nogap.wait_exit(LONG);
    let lines = nogap.wait_output_closed(LONG);
    let ours: Vec<&String> = lines
        .iter()
        .filter(|l| !l.starts_with("stdout: ") && !l.trim().is_empty())
        .filter(|l| {
            !l.contains("Listening on")
                && !l.contains("Communication attempt")
                && !l.contains("Execing")
        })
        .collect();
    let mut wrong = Vec::new();
    if status.code() != Some(exit) {
        wrong.push(format!("exit {status} (want {exit})"));
    }
    if ours.len() != 1 || !ours[0].starts_with("nogap: ") {
        wrong.push(format!("{} lines (want one 'nogap: ...' line)", ours.len()));
    }
    for name in names {
        if !ours.first().is_some_and(|l| l.contains(name)) {
            wrong.push(format!("error does not name {name:?}"));
        }
    }
    if dir.join("started").exists() || nogap.count_log("worker started") > 0 {
        wrong.push("a worker was started".into());
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

fn run(dir: &Path, args: &[&str]) -> Command {
    let mut cmd = nogap_command(dir);
    cmd.args(args).arg("--").args(marker_worker(dir));
    cmd
}

#[test]
fn bad_handoff_and_worker_settings() {
    require_setup();
    let dir = scratch();
    let d = dir.path();
    let web = format!("web={}", free_addr());
    let api = format!("api={}", free_addr());
    let udp = format!("dns=udp://{}", free_addr());
    let missing = format!("unix:{}/no/such/dir/app.sock", d.display());
    let mut results = Vec::new();
    let mut case = |args: &[&str], exit: i32, names: &[&str]| {
        results.push(check(d, run(d, args), exit, names));
    };
    // Templates that name an unknown socket, or are ambiguous.
    case(
        &["-l", &web, "--env", "FD={fd:http}"],
        USAGE,
        &["{fd:http}", "web"],
    );
    case(
        &["-l", &web, "-l", &api, "--env", "FD={fd}"],
        USAGE,
        &["{fd}", "web, api"],
    );
    case(
        &["-l", &web, "--pidfile", "/tmp/{fd:nope}.pid"],
        USAGE,
        &["{fd:nope}"],
    );
    case(
        &["-l", &web, "--check", "--env", "X={fd:www}"],
        USAGE,
        &["{fd:www}"],
    );
    // Users and groups that do not exist.
    case(
        &["-l", &web, "--user", "no-such-user-nogap"],
        USAGE,
        &["no-such-user-nogap"],
    );
    case(
        &["-l", &web, "--group", "no-such-group-nogap"],
        USAGE,
        &["no-such-group-nogap"],
    );
    // Forms that cannot express a socket.
    case(
        &["-l", &udp, "--fds-as", "server-starter"],
        USAGE,
        &["server-starter", "dns"],
    );
    case(&["-l", &web, "--fds-as", "upstart"], USAGE, &["upstart"]);
    // Unix sockets: missing directory, bad options.
    case(
        &["-l", &missing],
        SOCKETS,
        &["no/such/dir", "does not exist"],
    );
    case(
        &["-l", &format!("unix:{}/a.sock?mode=0999", d.display())],
        USAGE,
        &["0999"],
    );
    case(
        &[
            "-l",
            &format!("unix:{}/a.sock?owner=no-such-user-nogap", d.display()),
        ],
        USAGE,
        &["no-such-user-nogap"],
    );
    // Other settings.
    case(
        &["-l", &web, "--chdir", "/no/such/dir"],
        USAGE,
        &["/no/such/dir"],
    );
    case(
        &["-l", &web, "-w", "2", "--pidfile", "/tmp/x.pid"],
        USAGE,
        &["/tmp/x.pid", "{worker}"],
    );
    case(
        &["-l", &web, "--env", "LISTEN_FDS=2"],
        USAGE,
        &["LISTEN_FDS"],
    );
    case(&["-l", &web, "--env", "NOEQUALS"], USAGE, &["NOEQUALS"]);
    case(&["-l", &web, "--umask", "888"], USAGE, &["888"]);
    case(
        &["-l", &web, "--nofile", "99999999999"],
        USAGE,
        &["99999999999"],
    );
    let errors: Vec<String> = results.into_iter().filter_map(Result::err).collect();
    assert!(
        errors.is_empty(),
        "{} case(s) wrong:\n{}",
        errors.len(),
        errors.join("\n")
    );
}

/// nginx cannot inherit an abstract unix socket: a socket activator hands
/// nogap one, and `--fds-as nginx` refuses it before starting anything.
#[test]
fn nginx_form_refuses_an_abstract_socket() {
    require_setup();
    let dir = scratch();
    let d = dir.path();
    let name = format!("nogap-test-abstract-{}", std::process::id());
    let mut cmd = Command::new("/usr/bin/systemd-socket-activate");
    cmd.arg("-l")
        .arg(format!("@{name}"))
        .arg("--fdname=priv")
        .arg(format!("--setenv=RUNTIME_DIRECTORY={}", d.display()))
        .arg(nogap_bin())
        .args(["run", "--fds-as", "nginx", "--"])
        .args(marker_worker(d));
    let shown = format!("{cmd:?}");
    let mut nogap = Nogap::spawn("socket-activate+nogap", cmd);
    nogap.wait_for_log(&format!("Listening on @{name}"), LONG);
    // systemd-socket-activate starts nogap on the first connection.
    let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
    let _conn = UnixStream::connect_addr(&addr).unwrap();
    check_running(
        d,
        &shown,
        &mut nogap,
        USAGE,
        &["--fds-as nginx", "'priv'", "abstract"],
    )
    .unwrap();
}
