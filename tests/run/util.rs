//! Fixtures shared by the topic modules: scratch directories, nogap running
//! the demo, wrapper scripts that change the worker between generations.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::signal::Signal;
use tempfile::TempDir;

use crate::common::load::{Load, LoadConfig, Mode};
use crate::common::{demo_bin, field, Nogap, LONG};

/// A fresh directory for one test (runtime dir, scripts, reports).
pub fn scratch() -> TempDir {
    tempfile::Builder::new()
        .prefix("nogap-test-")
        .tempdir()
        .expect("temp dir")
}

/// `nogap run -l web=ADDR --ready notify NOGAP_ARGS -- WORKER...`, waiting
/// for `generation ready generation=1`.
pub fn start(dir: &Path, addr: SocketAddr, nogap_args: &[&str], worker: &[&str]) -> Nogap {
    let mut args = vec!["--ready", "notify"];
    args.extend_from_slice(nogap_args);
    start_as_given(dir, addr, &args, worker)
}

/// [`start`] without its `--ready notify`: NOGAP_ARGS says how workers
/// become ready.
pub fn start_as_given(dir: &Path, addr: SocketAddr, nogap_args: &[&str], worker: &[&str]) -> Nogap {
    let listen = format!("web={addr}");
    let mut args = vec!["-l", &listen];
    args.extend_from_slice(nogap_args);
    args.push("--");
    args.extend_from_slice(worker);
    let nogap = Nogap::run(dir, &args);
    nogap.wait_for_log("generation ready generation=1", LONG);
    nogap
}

/// `nogap run --config FILE`, waiting for generation 1.
pub fn start_with_config(dir: &Path, file: &Path) -> Nogap {
    let nogap = Nogap::run(dir, &["--config".as_ref(), file.as_os_str()]);
    nogap.wait_for_log("generation ready generation=1", LONG);
    nogap
}

/// Replaces a config file whole (write, then rename), as deploy tools do,
/// so a reload never reads half a file.
pub fn write_config(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).expect("write config");
    std::fs::rename(&tmp, path).expect("rename config");
}

/// [`start`] with the demo as worker.
pub fn start_demo(dir: &Path, addr: SocketAddr, nogap_args: &[&str], demo_args: &[&str]) -> Nogap {
    let mut worker = vec![demo_bin()];
    worker.extend_from_slice(demo_args);
    start(dir, addr, nogap_args, &worker)
}

/// Writes an executable `#!/bin/sh` script `DIR/NAME` whose body can use
/// `$DEMO` (the demo binary) and `$DIR` (the scratch directory). A script
/// must `exec` the demo, so the worker pid (and LISTEN_PID) stay its own.
pub fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
    let path = dir.join(name);
    let text = format!(
        "#!/bin/sh\nDEMO='{}'\nDIR='{}'\n{body}\n",
        demo_bin(),
        dir.display()
    );
    std::fs::write(&path, text).expect("write script");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    path
}

/// A worker script that runs `$DEMO $(cat $DIR/mode-args)`: tests change the
/// next generation's behaviour by writing demo arguments to that file.
pub fn switchable_worker(dir: &Path) -> PathBuf {
    script(
        dir,
        "worker.sh",
        r#"args=$(cat "$DIR/mode-args" 2>/dev/null)
exec "$DEMO" $args"#,
    )
}

/// Sets the arguments the next worker of a [`switchable_worker`] gets.
pub fn set_worker_args(dir: &Path, args: &str) {
    let tmp = dir.join("mode-args.tmp");
    std::fs::write(&tmp, args).expect("write mode-args");
    std::fs::rename(&tmp, dir.join("mode-args")).expect("rename mode-args");
}

/// Sends HUP and returns the generation of the reload it started (from the
/// `reload started` line after the HUP).
pub fn hup(nogap: &Nogap) -> u32 {
    let from = nogap.log_len();
    nogap.signal(Signal::SIGHUP);
    let line = nogap.wait_for_log_from(from, "reload started", LONG);
    field(&line, "generation")
        .and_then(|g| g.parse().ok())
        .unwrap_or_else(|| panic!("no generation= in {line:?}"))
}

/// Sends HUP, checks the reload is for `gen`, waits for it to be ready.
pub fn reload(nogap: &Nogap, gen: u32) {
    let from = nogap.log_len();
    let started = hup(nogap);
    assert_eq!(started, gen, "reload started for an unexpected generation");
    nogap.wait_for_log_from(from, &format!("generation ready generation={gen}"), LONG);
}

/// A keep-alive and a new-connection load on `addr`, each with `conns`
/// connections pausing `pause` between requests. Waits until both served
/// some requests.
pub fn both_loads(addr: SocketAddr, conns: usize, pause: Duration) -> (Load, Load) {
    let ka = Load::start(
        LoadConfig::new(addr, Mode::KeepAlive)
            .connections(conns)
            .pause(pause)
            .duration(Duration::from_secs(600)),
    );
    let nc = Load::start(
        LoadConfig::new(addr, Mode::NewConnection)
            .connections(conns)
            .pause(pause)
            .duration(Duration::from_secs(600)),
    );
    assert!(
        ka.wait_for_more_ok(20, LONG),
        "keep-alive load does not get answers"
    );
    assert!(
        nc.wait_for_more_ok(20, LONG),
        "new-connection load does not get answers"
    );
    (ka, nc)
}

/// The exit code, or panics on a death by signal.
pub fn code(status: std::process::ExitStatus) -> i32 {
    status
        .code()
        .unwrap_or_else(|| panic!("killed by a signal: {status:?}"))
}

/// `nogap ARGS --control DIR/control.sock`, run to its end.
pub fn client(dir: &Path, args: &[&str]) -> std::process::Output {
    std::process::Command::new(crate::common::nogap_bin())
        .args(args)
        .arg("--control")
        .arg(dir.join("control.sock"))
        .output()
        .expect("run nogap client")
}

/// Open descriptors of `pid`.
pub fn fd_count(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// `pid`'s descriptors without those it holds for an instant (a sock_diag
/// query, a /proc read by the health checks): the fewest of 50 reads.
pub fn steady_fd_count(pid: i32) -> usize {
    (0..50).map(|_| fd_count(pid)).min().unwrap_or(0)
}

/// `nogap status --json`, which must succeed.
pub fn status_json(dir: &Path) -> serde_json::Value {
    let out = client(dir, &["status", "--json"]);
    assert!(out.status.success(), "status --json: {}", text(&out));
    serde_json::from_slice(&out.stdout).expect("status JSON")
}

/// `nogap upgrade --wait`.
pub fn upgrade_wait(dir: &Path) -> std::process::Output {
    client(dir, &["upgrade", "--wait"])
}

/// A client's stdout and stderr, as one text.
pub fn text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}
