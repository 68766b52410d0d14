//! Fixtures for the real-server tests: prerequisites, scratch directories a
//! worker running as the test user can read, the reload-under-load scenario,
//! and checks of a worker's user and fd limit.

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use nix::sys::signal::Signal;
use tempfile::TempDir;

use crate::common::load::{Client, Failure, Load, LoadConfig, Mode, Report, Response, Target};
use crate::common::{field, proc_status, process_exists, Nogap, LONG};
use crate::traffic::{KeepAlive, KeepAliveReport};

/// The unprivileged user `tests/setup-servers.sh` creates, and a
/// supplementary group it is in.
pub const TEST_USER: &str = "nogap-test";
pub const TEST_EXTRA_GROUP: &str = "nogap-test-extra";

/// The venv with gunicorn and uvicorn.
pub fn venv() -> PathBuf {
    std::env::var_os("NOGAP_TEST_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/var/cache/nogap-test/venv".into())
}

/// Where `tests/setup-servers.sh` installs Express.
pub fn node_modules() -> PathBuf {
    std::env::var_os("NOGAP_TEST_NODE_MODULES")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/var/cache/nogap-test/node/node_modules".into())
}

pub const NGINX: &str = "/usr/sbin/nginx";
pub const LIGHTTPD: &str = "/usr/sbin/lighttpd";
pub const PUMA: &str = "/usr/bin/puma";
pub const UNICORN: &str = "/usr/bin/unicorn";
pub const GO: &str = "/usr/bin/go";

/// Panics with what to do when the machine is not set up for these tests.
pub fn require_setup() {
    let missing = |what: &str| -> ! {
        panic!("{what}: run `sudo tests/setup-servers.sh` first (the real-server tests need it)")
    };
    if !nix::unistd::geteuid().is_root() {
        missing("these tests run nogap as root to start workers as another user");
    }
    if nix::unistd::User::from_name(TEST_USER)
        .ok()
        .flatten()
        .is_none()
    {
        missing(&format!("no user {TEST_USER}"));
    }
    for bin in [NGINX, LIGHTTPD, PUMA, UNICORN, GO] {
        if !Path::new(bin).exists() {
            missing(&format!("{bin} is not installed"));
        }
    }
    if !node_modules().join("express/package.json").exists() {
        missing(&format!("express is not in {}", node_modules().display()));
    }
    for bin in ["gunicorn", "uvicorn", "hypercorn", "daphne"] {
        if !venv().join("bin").join(bin).exists() {
            missing(&format!("{bin} is not in {}", venv().display()));
        }
    }
}

/// The test user's uid and primary gid, and the extra group's gid.
pub fn test_ids() -> (u32, u32, u32) {
    let u = nix::unistd::User::from_name(TEST_USER)
        .unwrap()
        .expect("test user");
    let g = nix::unistd::Group::from_name(TEST_EXTRA_GROUP)
        .unwrap()
        .expect("test group");
    (u.uid.as_raw(), u.gid.as_raw(), g.gid.as_raw())
}

/// A scratch directory the test user can read and traverse (0755), with the
/// test apps copied in.
pub fn scratch() -> TempDir {
    let dir = tempfile::Builder::new()
        .prefix("nogap-srv-")
        .tempdir()
        .expect("temp dir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let apps = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/servers/apps");
    for entry in std::fs::read_dir(&apps).expect("tests/servers/apps") {
        let entry = entry.unwrap();
        let to = dir.path().join(entry.file_name());
        std::fs::copy(entry.path(), &to).unwrap();
        std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    dir
}

/// A directory inside `dir` owned by the test user (for files a worker
/// writes: pid files, nginx's temp files).
pub fn user_dir(dir: &Path, name: &str) -> PathBuf {
    let (uid, gid, _) = test_ids();
    let p = dir.join(name);
    std::fs::create_dir_all(&p).unwrap();
    std::os::unix::fs::chown(&p, Some(uid), Some(gid)).unwrap();
    p
}

/// `nogap run ARGS...`, waiting for generation 1 to be ready.
pub fn start(dir: &Path, args: &[String]) -> Running {
    let nogap = Nogap::run(dir, args);
    nogap.wait_for_log("generation ready generation=1", LONG);
    Running(nogap)
}

/// A nogap that is stopped with SIGTERM when dropped, before its guard
/// SIGKILLs what is left. Servers' own children (nginx or Starman workers)
/// do not die with their master; a nogap that stops takes them down (it
/// stops the workers, then kills what is left below it), a SIGKILLed one
/// cannot.
pub struct Running(pub Nogap);

impl std::ops::Deref for Running {
    type Target = Nogap;
    fn deref(&self) -> &Nogap {
        &self.0
    }
}

impl std::ops::DerefMut for Running {
    fn deref_mut(&mut self) -> &mut Nogap {
        &mut self.0
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if self.0.exited().is_none() {
            let _ =
                nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.0.pid()), Signal::SIGTERM);
            let _ = self.0.try_wait_exit(LONG);
        }
    }
}

/// HUP, then wait for `generation ready generation=GEN`.
pub fn reload(nogap: &Nogap, gen: u32) {
    let from = nogap.log_len();
    nogap.signal(Signal::SIGHUP);
    nogap.wait_for_log_from(from, &format!("generation ready generation={gen}"), LONG);
}

/// The pid nogap follows as worker `slot` of `gen`: the one it started or,
/// for a daemonizing server, the one it followed.
pub fn worker_pids(nogap: &Nogap, gen: u32) -> Vec<i32> {
    let followed = nogap.matching(&format!("worker daemonized generation={gen}"));
    let lines = if followed.is_empty() {
        nogap.matching(&format!("worker started generation={gen}"))
    } else {
        followed
    };
    lines
        .iter()
        .map(|l| field(l, "pid").and_then(|p| p.parse().ok()).expect("pid="))
        .collect()
}

/// What became of a request in progress on the serving generation when a
/// reload stopped it: see [`slow_request_across_reload`].
pub struct SlowRequest {
    /// The answer, or how the request failed.
    pub result: Result<Response, Failure>,
}

/// `GET /slow` (the test apps answer it after 6 s, the Ruby one after 3 s: longer than a reload takes on a busy machine) on generation `gen`,
/// then a reload: nogap sends `gen` its stop signal while the request is in
/// progress (checked). A graceful stop answers it; an immediate one loses
/// it.
pub fn slow_request_across_reload(
    nogap: &Nogap,
    target: impl Into<Target>,
    gen: u32,
) -> SlowRequest {
    let target = target.into();
    let from = nogap.log_len();
    let slow = std::thread::spawn(move || {
        Client::new(target, Duration::from_secs(30))
            .with_path("/slow")
            .get()
    });
    nogap.wait_for_log_from(from, "slow request started", LONG);
    reload(nogap, gen + 1);
    nogap.wait_for_log_from(
        from,
        &format!("draining worker worker=0 generation={gen} "),
        LONG,
    );
    assert!(
        !slow.is_finished(),
        "the slow request ended before generation {gen} got its stop signal"
    );
    SlowRequest {
        result: slow.join().expect("slow request thread"),
    }
}

impl SlowRequest {
    /// Answered 200 by generation `gen` after its stop signal.
    pub fn assert_answered_by(&self, gen: u32) {
        match &self.result {
            Ok(resp) => {
                assert_eq!(resp.status, 200, "slow request answered {}", resp.status);
                assert_eq!(resp.gen, Some(gen), "slow request answered by {resp:?}");
            }
            Err(f) => panic!("the request in progress at the stop signal was lost: {f}"),
        }
    }
}

/// What a reload run saw.
pub struct Outcome {
    pub keep_alive: Report,
    pub new_conn: Report,
    /// Idle keep-alive connections the server closed under a request, which
    /// the client retried (see `traffic`).
    pub stale_closes: usize,
    /// Pids that answered after the last reload completed and the old
    /// generation was gone.
    pub last_pids: BTreeSet<u32>,
}

/// Keep-alive connections of [`reloads_under_load`].
pub const CONNECTIONS: usize = 4;

/// The scenario: keep-alive and new-connection load on `addr`,
/// `reloads` reloads (HUP, wait for `generation ready`), traffic flowing
/// between them; then the old generations must be gone. Every load is
/// bounded (duration and request count).
pub fn reloads_under_load(nogap: &Nogap, target: impl Into<Target>, reloads: u32) -> Outcome {
    let target = target.into();
    let anchor = (Instant::now(), SystemTime::now());
    let pause = Duration::from_millis(1);
    let ka = KeepAlive::start(
        target.clone(),
        CONNECTIONS,
        pause,
        Duration::from_secs(300),
        2_000_000,
    );
    let nc = Load::start(
        LoadConfig::new(target, Mode::NewConnection)
            .connections(CONNECTIONS)
            .pause(pause)
            .duration(Duration::from_secs(300))
            .max_requests(2_000_000),
    );
    assert!(
        ka.wait_for_more_ok(20, LONG),
        "keep-alive load gets no answers"
    );
    assert!(
        nc.wait_for_more_ok(20, LONG),
        "new-connection load gets no answers"
    );
    for gen in 2..=reloads + 1 {
        reload(nogap, gen);
        assert!(
            ka.wait_for_more_ok(20, LONG),
            "keep-alive stalled after generation {gen}"
        );
        assert!(
            nc.wait_for_more_ok(20, LONG),
            "new-connection stalled after generation {gen}"
        );
    }
    let last = reloads + 1;
    let older: Vec<i32> = (1..last).flat_map(|g| worker_pids(nogap, g)).collect();
    crate::common::must(LONG, "old generations exit", || {
        older.iter().all(|&p| !process_exists(p))
    });
    let t = Instant::now();
    assert!(ka.wait_for_more_ok(50, LONG));
    assert!(nc.wait_for_more_ok(50, LONG));
    let KeepAliveReport {
        report: keep_alive,
        stale,
    } = ka.stop();
    let new_conn = nc.stop();
    let mut last_pids = keep_alive.pids_since(t);
    last_pids.extend(new_conn.pids_since(t));
    eprintln!(
        "{} stale-keep-alive-closes-retried={}\n{}",
        keep_alive.summary(),
        stale.len(),
        new_conn.summary()
    );
    assert_eq!(nogap.count_log("reload failed"), 0, "a reload failed");
    // Every old generation left on its stop signal, not at the drain timeout.
    assert_eq!(
        nogap.count_log("drain timeout"),
        0,
        "a worker hung on its stop signal"
    );
    // Stale closes come from servers stopping: each within a moment of a
    // stop signal, about one per connection and stop (a retry can land on
    // the old generation once more before it stops accepting).
    let stops = stop_times(nogap);
    for &at in &stale {
        let when = anchor.1 + at.saturating_duration_since(anchor.0);
        assert!(
            stops.iter().any(|&s| when
                .duration_since(s)
                .is_ok_and(|d| d <= Duration::from_secs(2))),
            "a keep-alive connection was closed under a request {:?} after the loads \
             started, not right after a stop signal",
            at.saturating_duration_since(anchor.0)
        );
    }
    assert!(
        stale.len() <= 2 * CONNECTIONS * reloads as usize,
        "{} stale keep-alive closes in {reloads} reloads of {CONNECTIONS} connections",
        stale.len()
    );
    Outcome {
        keep_alive,
        new_conn,
        stale_closes: stale.len(),
        last_pids,
    }
}

impl Outcome {
    /// 0 failed connections and 0 non-2xx, in both modes.
    pub fn assert_clean(&self) {
        self.keep_alive.assert_no_failures();
        self.new_conn.assert_no_failures();
    }
}

/// When nogap sent a stop signal (`draining worker` lines, by their time
/// stamp).
pub fn stop_times(nogap: &Nogap) -> Vec<SystemTime> {
    nogap
        .matching("draining worker")
        .iter()
        .map(|l| {
            let stamp = l.split_whitespace().next().unwrap_or("");
            humantime::parse_rfc3339(stamp)
                .unwrap_or_else(|e| panic!("no time stamp in {l:?}: {e}"))
        })
        .collect()
}

/// `Uid:`/`Gid:` (real ids) and `Groups:` of a process.
pub fn ids_of(pid: i32) -> (u32, u32, BTreeSet<u32>) {
    let first = |key| -> u32 {
        proc_status(pid, key)
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or_else(|| panic!("no {key} for pid {pid}"))
    };
    let groups = proc_status(pid, "Groups")
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|g| g.parse().ok())
        .collect();
    (first("Uid"), first("Gid"), groups)
}

/// The soft and hard `Max open files` of a process.
pub fn nofile_of(pid: i32) -> (u64, u64) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("limits");
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("Max open files");
    let v: Vec<u64> = line
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    (v[0], v[1])
}

/// Every pid in `pids` (still alive) runs as the test user, in its groups,
/// with fd limit `nofile` (soft and hard).
pub fn assert_runs_as_test_user(pids: impl IntoIterator<Item = i32>, nofile: u64) {
    let (uid, gid, extra) = test_ids();
    let mut checked = 0;
    for pid in pids {
        if !process_exists(pid) {
            continue;
        }
        let (u, g, groups) = ids_of(pid);
        assert_eq!((u, g), (uid, gid), "pid {pid} runs as {u}:{g}");
        assert!(
            groups.contains(&gid) && groups.contains(&extra),
            "pid {pid} has groups {groups:?}, expected {gid} and {extra}"
        );
        assert_eq!(
            nofile_of(pid),
            (nofile, nofile),
            "RLIMIT_NOFILE of pid {pid}"
        );
        checked += 1;
    }
    assert!(checked > 0, "no live process to check");
}

/// Children of `pid` (e.g. a server's own workers).
pub fn children_of(pid: i32) -> Vec<i32> {
    crate::common::pids_of_children(pid)
}
