//! A stock lighttpd from Debian with `server.systemd-socket-activation`,
//! stopped gracefully with INT, 10 reloads under load.

use std::path::{Path, PathBuf};

use crate::common::free_addr;
use crate::util::{
    assert_runs_as_test_user, reloads_under_load, require_setup, scratch, start, worker_pids,
    LIGHTTPD, TEST_USER,
};

/// lighttpd.conf serving DIR's files; `X-Pid` is the pid (lighttpd's
/// `LISTEN_PID`, which is its own pid, read when it parses the file).
fn lighttpd_conf(dir: &Path) -> PathBuf {
    std::fs::write(dir.join("index.html"), "hello from lighttpd\n").unwrap();
    let conf = format!(
        r#"server.modules += ("mod_setenv")
server.document-root = "{d}"
server.systemd-socket-activation = "enable"
server.graceful-shutdown-timeout = 15
index-file.names = ("index.html")
setenv.add-response-header = ("X-Pid" => env.LISTEN_PID)
"#,
        d = dir.display()
    );
    let path = dir.join("lighttpd.conf");
    std::fs::write(&path, conf).unwrap();
    path
}

#[test]
fn lighttpd_socket_activation_int_10_reloads() {
    require_setup();
    let dir = scratch();
    let addr = free_addr();
    let conf = lighttpd_conf(dir.path());
    let args: Vec<String> = [
        "-l",
        &format!("http={addr}"),
        "--stop-signal",
        "INT",
        "--user",
        TEST_USER,
        "--nofile",
        "4096",
        "--ready",
        "alive:500ms",
        "--drain-timeout",
        "20s",
        "--",
        LIGHTTPD,
        "-D",
        "-f",
        conf.to_str().unwrap(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let nogap = start(dir.path(), &args);
    let out = reloads_under_load(&nogap, addr, 10);
    out.assert_clean();
    let last = worker_pids(&nogap, 11);
    assert_eq!(
        out.last_pids.iter().map(|&p| p as i32).collect::<Vec<_>>(),
        last
    );
    assert_runs_as_test_user(last, 4096);
}
