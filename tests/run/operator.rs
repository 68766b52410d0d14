//! The operator's path: a config file, and instances found by name.

use std::process::Command;

use crate::common::{demo_bin, free_addr, nogap_bin, Nogap, LONG};
use crate::util::{scratch, text};

fn client(args: &[&str]) -> std::process::Output {
    Command::new(nogap_bin())
        .args(args)
        .env_remove("RUNTIME_DIRECTORY")
        .output()
        .expect("run nogap client")
}

/// `nogap run --config FILE` serves what the file says; the command line
/// wins over the file; `nogap status NAME` and `nogap reload NAME --wait`
/// find an instance by its runtime directory; a bare `nogap status` lists
/// several instances and a bare reload refuses to guess.
#[test]
fn a_config_file_and_instances_by_name() {
    let dir = scratch();
    let addr = free_addr();
    let config = dir.path().join("app.toml");
    std::fs::write(
        &config,
        format!(
            "listen = [\"web={addr}\"]\nworkers = 3\nready = \"notify\"\ncommand = [\"{}\"]\n",
            demo_bin()
        ),
    )
    .expect("write config");
    // Two instances under /run/nogap/NAME, as nogap@NAME.service has them.
    let pid = std::process::id();
    let (a, b) = (format!("test-{pid}-a"), format!("test-{pid}-b"));
    let run_dir = |name: &str| std::path::Path::new("/run/nogap").join(name);
    let start = |name: &str, extra: &[&str]| {
        let mut cmd = Command::new(nogap_bin());
        cmd.arg("run")
            .env("RUNTIME_DIRECTORY", run_dir(name))
            .arg("--config")
            .arg(&config)
            .args(extra);
        let nogap = Nogap::spawn(name, cmd);
        nogap.wait_for_log("generation ready generation=1", LONG);
        nogap
    };
    std::fs::create_dir_all(run_dir(&a)).expect("runtime dir a");
    std::fs::create_dir_all(run_dir(&b)).expect("runtime dir b");
    let first = start(&a, &[]);
    // The second instance cannot share the port: it gets its own, and one
    // worker, on the command line.
    let other = free_addr();
    let listen = format!("web={other}");
    let second = start(&b, &["-l", &listen, "-w", "1"]);

    let status = client(&["status", &a]);
    assert!(status.status.success(), "{}", text(&status));
    assert!(
        text(&status).contains("generation 1: 3/3 workers ready"),
        "the file's workers = 3:\n{}",
        text(&status)
    );
    assert!(
        text(&status).contains(&addr.to_string()),
        "{}",
        text(&status)
    );
    let status = client(&["status", &b]);
    assert!(
        text(&status).contains("generation 1: 1/1 workers ready")
            && text(&status).contains(&other.to_string()),
        "the command line wins over the file:\n{}",
        text(&status)
    );

    let reload = client(&["reload", &a, "--wait"]);
    assert!(reload.status.success(), "{}", text(&reload));
    assert!(
        text(&reload).contains("generation 2 is serving"),
        "{}",
        text(&reload)
    );

    let all = client(&["status"]);
    assert!(all.status.success(), "{}", text(&all));
    for name in [&a, &b] {
        assert!(
            text(&all)
                .lines()
                .any(|l| l.starts_with(&format!("{name}: pid"))),
            "bare status lists {name}:\n{}",
            text(&all)
        );
    }
    let guess = client(&["reload", "--wait"]);
    assert_eq!(guess.status.code(), Some(2), "{}", text(&guess));
    assert!(
        text(&guess).contains("several nogap instances"),
        "{}",
        text(&guess)
    );

    let missing = client(&["status", &format!("test-{pid}-none")]);
    assert_eq!(missing.status.code(), Some(5), "{}", text(&missing));
    let bad = client(&["status", "../etc"]);
    assert_eq!(bad.status.code(), Some(2), "{}", text(&bad));
    drop(first);
    drop(second);
    let _ = std::fs::remove_dir_all(run_dir(&a));
    let _ = std::fs::remove_dir_all(run_dir(&b));
}

/// A bad config file: one line naming the file, the line and the key; exit 2;
/// nothing started.
#[test]
fn a_bad_config_file_names_file_line_and_key() {
    let dir = scratch();
    let config = dir.path().join("bad.toml");
    std::fs::write(&config, "workers = 2\ndrain-timeout = \"later\"\n").expect("write");
    let out = Command::new(nogap_bin())
        .arg("run")
        .env("RUNTIME_DIRECTORY", dir.path())
        .arg("--config")
        .arg(&config)
        .output()
        .expect("run nogap");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains(&format!("{}:2: key 'drain-timeout'", config.display()))
            && err.contains("later"),
        "{err}"
    );
}
