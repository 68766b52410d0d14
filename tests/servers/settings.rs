//! Worker process settings (user and groups, working directory, environment,
//! umask, fd limit, notify socket of an unprivileged worker) and unix socket
//! files (mode and owner, stale files, a live owner, racing starts).

use std::collections::BTreeSet;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::process::Command;

use crate::common::load::{get_once, Target};
use crate::common::{nogap_command, read_json, Nogap, LONG};
use crate::util::{require_setup, scratch, start, test_ids, user_dir, Running, TEST_USER};

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// `nogap run -l unix:DIR/s.sock --ready notify ARGS -- python3 probe.py OUT`
/// and the probe's report.
fn probe(dir: &Path, args: &[&str]) -> (Running, serde_json::Value) {
    let out = user_dir(dir, "out").join("probe.json");
    let sock = format!("unix:{}/s.sock", dir.display());
    let mut all = strings(&["-l", &sock, "--ready", "notify"]);
    all.extend(strings(args));
    all.extend(strings(&[
        "--",
        "/usr/bin/python3",
        dir.join("probe.py").to_str().unwrap(),
        out.to_str().unwrap(),
    ]));
    let nogap = start(dir, &all);
    let report = read_json(&out);
    (nogap, report)
}

fn set(v: &serde_json::Value) -> BTreeSet<u64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect()
}

#[test]
fn user_groups_chdir_env_umask_nofile_apply() {
    require_setup();
    let dir = scratch();
    let work = user_dir(dir.path(), "work");
    let (nogap, p) = probe(
        dir.path(),
        &[
            "--user",
            TEST_USER,
            "--chdir",
            work.to_str().unwrap(),
            "--env",
            "APP_MODE=test",
            "--env",
            "HOME=/srv/app",
            "--umask",
            "027",
            "--nofile",
            "777",
        ],
    );
    let (uid, gid, extra) = test_ids();
    assert_eq!(p["uid"], uid);
    assert_eq!(p["gid"], gid);
    assert_eq!(
        set(&p["groups"]),
        BTreeSet::from([gid as u64, extra as u64])
    );
    assert_eq!(p["cwd"], work.to_str().unwrap());
    assert_eq!(p["umask"], 0o27);
    assert_eq!(p["nofile"], serde_json::json!([777, 777]));
    assert_eq!(p["env"]["APP_MODE"], "test");
    assert_eq!(p["env"]["USER"], TEST_USER);
    assert_eq!(p["env"]["LOGNAME"], TEST_USER);
    // --env wins over --user's HOME.
    assert_eq!(p["env"]["HOME"], "/srv/app");
    // It became ready by READY=1 on its notify socket, as the test user.
    let notify = Path::new(p["env"]["NOTIFY_SOCKET"].as_str().unwrap());
    assert_eq!(std::fs::metadata(notify).unwrap().uid(), uid);
    assert_eq!(nogap.count_log("worker ready"), 1);
}

#[test]
fn env_clear_leaves_only_what_nogap_sets() {
    require_setup();
    let dir = scratch();
    let (_nogap, p) = probe(
        dir.path(),
        &["--env-clear", "--env", "ONLY=1", "--user", TEST_USER],
    );
    let keys: BTreeSet<String> = p["env"]
        .as_object()
        .unwrap()
        .keys()
        // Python sets LC_CTYPE itself when there is no locale (PEP 538).
        .filter(|k| *k != "LC_CTYPE")
        .cloned()
        .collect();
    let want: BTreeSet<String> = [
        "ONLY",
        "USER",
        "LOGNAME",
        "HOME",
        "LISTEN_FDS",
        "LISTEN_FDNAMES",
        "LISTEN_PID",
        "NOTIFY_SOCKET",
        "NOGAP_GENERATION",
        "NOGAP_WORKER",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    assert_eq!(keys, want);
}

#[test]
fn fd_limit_defaults_to_the_hard_limit_and_group_alone_works() {
    require_setup();
    let dir = scratch();
    let (_, hard) =
        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).unwrap();
    let (_nogap, p) = probe(dir.path(), &["--group", "nogap-test-extra"]);
    assert_eq!(p["nofile"], serde_json::json!([hard, hard]));
    let (_, _, extra) = test_ids();
    assert_eq!(p["uid"], 0);
    assert_eq!(p["gid"], extra);
    assert_eq!(set(&p["groups"]), BTreeSet::from([extra as u64]));
}

/// `nogap run -l unix:PATH -- python3 einhorn-free HTTP worker`.
fn serve_unix(dir: &Path, path: &Path) -> Command {
    let mut cmd = nogap_command(dir);
    cmd.args(strings(&[
        "-l",
        &format!("web=unix:{}", path.display()),
        "--ready",
        "notify",
        "--fds-as",
        "einhorn",
        "--",
        "/usr/bin/python3",
        dir.join("einhorn_worker.py").to_str().unwrap(),
    ]));
    cmd
}

fn answers(path: &Path) -> bool {
    get_once(&Target::Unix(path.to_path_buf()), LONG).is_ok_and(|r| r.status == 200)
}

#[test]
fn stale_socket_file_is_replaced() {
    require_setup();
    let dir = scratch();
    let path = dir.path().join("app.sock");
    // A socket file nobody listens on any more (its owner is gone).
    drop(UnixListener::bind(&path).unwrap());
    assert!(path.exists());
    let nogap = Nogap::spawn("nogap", serve_unix(dir.path(), &path));
    nogap.wait_for_log("generation ready generation=1", LONG);
    assert!(answers(&path));
}

#[test]
fn a_live_socket_is_never_stolen() {
    require_setup();
    let dir = scratch();
    // Another server owns the path.
    let path = dir.path().join("other.sock");
    let _other = UnixListener::bind(&path).unwrap();
    let mut second = Nogap::spawn("nogap", serve_unix(dir.path(), &path));
    let status = second.wait_exit(LONG);
    assert_eq!(status.code(), Some(3), "{}", second.log_text());
    assert!(path.exists());

    // Another nogap owns it.
    let path = dir.path().join("app.sock");
    let first = Nogap::spawn("first", serve_unix(dir.path(), &path));
    first.wait_for_log("generation ready generation=1", LONG);
    let other_dir = scratch();
    let mut second = Nogap::spawn("second", serve_unix(other_dir.path(), &path));
    let status = second.wait_exit(LONG);
    assert_eq!(status.code(), Some(3), "{}", second.log_text());
    let lines = second.wait_output_closed(LONG);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(lines[0].contains(&path.display().to_string()), "{lines:?}");
    assert!(answers(&path), "the first nogap's socket still works");
}

#[test]
fn racing_starts_on_a_stale_socket_leave_one_working_owner() {
    require_setup();
    for round in 0..5 {
        let dir = scratch();
        let path = dir.path().join("race.sock");
        drop(UnixListener::bind(&path).unwrap());
        let a_dir = scratch();
        let b_dir = scratch();
        let mut a = Nogap::spawn("a", serve_unix(a_dir.path(), &path));
        let mut b = Nogap::spawn("b", serve_unix(b_dir.path(), &path));
        // One of them fails with exit 3; the other serves on the path.
        let mut winner = None;
        crate::common::must(LONG, "one nogap gives up", || {
            if a.exited().is_some() {
                winner = Some(false);
            } else if b.exited().is_some() {
                winner = Some(true);
            }
            winner.is_some()
        });
        let (won, lost) = if winner == Some(true) {
            (&a, &mut b)
        } else {
            (&b, &mut a)
        };
        assert_eq!(
            lost.exited().unwrap().code(),
            Some(3),
            "round {round}: {}",
            lost.log_text()
        );
        won.wait_for_log("generation ready generation=1", LONG);
        assert!(
            answers(&path),
            "round {round}: the winner's socket file is in place"
        );
    }
}

/// The working directory is entered as the worker's user (as systemd does),
/// and a failure names the step.
#[test]
fn a_directory_the_user_cannot_enter_is_reported() {
    require_setup();
    let dir = scratch();
    let private = dir.path().join("private");
    std::fs::create_dir(&private).unwrap();
    std::fs::set_permissions(
        &private,
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )
    .unwrap();
    let nogap = Nogap::run(
        dir.path(),
        &strings(&[
            "-l",
            &format!("unix:{}/s.sock", dir.path().display()),
            "--user",
            TEST_USER,
            "--chdir",
            private.to_str().unwrap(),
            "--",
            "/bin/true",
        ]),
    );
    let line = nogap.wait_for_log("worker cannot start", LONG);
    assert!(
        line.contains(&format!("chdir {}: Permission denied", private.display())),
        "{line}"
    );
}
