//! A booted container: systemd as PID 1 of `systemd-nspawn --boot`, entered
//! with `nsenter`, torn down (and checked to be gone) on drop.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Once;
use std::thread;
use std::time::{Duration, Instant};

use nix::fcntl::{Flock, FlockArg};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tempfile::TempDir;

use super::cgroup::{sweep_stale, Cgroups};
use super::process::{progress, run, try_wait_for, wait_for, OutputExt, RunError};
use super::rootfs::{host_tool, mounts_under, tail, Release, Rootfs, PATH};

/// Where the host directory of [`Container::share_dir`] appears inside.
pub const SHARE: &str = "/opt/nogap";

/// From starting nspawn to `systemctl is-system-running` answering.
const BOOT_TIMEOUT: Duration = Duration::from_secs(60);
/// Default limit for one command run inside.
pub const EXEC_TIMEOUT: Duration = Duration::from_secs(30);
/// For the orderly shutdown nspawn asks PID 1 for on SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(20);
/// For processes to die after SIGKILL, and for their cgroups to empty.
const KILL_TIMEOUT: Duration = Duration::from_secs(10);
/// Lines of the console log shown when something fails.
const LOG_LINES: usize = 60;

/// How boot ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootState {
    /// Every unit started.
    Running,
    /// Booted, but some unit failed (listed on stderr at boot).
    Degraded,
}

/// What teardown took and left.
#[derive(Debug)]
pub struct Teardown {
    /// From asking for shutdown to everything checked.
    pub took: Duration,
    /// The orderly shutdown did not finish in time; processes were killed.
    pub forced: bool,
    /// Processes, cgroups, mounts or directories still there: should be empty.
    pub leftovers: Vec<String>,
}

/// A process, told apart from a later one with the same pid by its start time.
#[derive(Clone, Copy, Debug)]
struct Process {
    pid: i32,
    start: u64,
}

impl Process {
    fn of(pid: i32) -> Option<Process> {
        Process::stat(pid).map(|(process, _)| process)
    }

    /// The process and its state letter, from `/proc/<pid>/stat`.
    fn stat(pid: i32) -> Option<(Process, char)> {
        let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // pid (comm) state ppid ... starttime is field 22; comm may hold
        // spaces and parentheses, so count from the last ')'.
        let mut fields = stat[stat.rfind(')')? + 2..].split(' ');
        let state = fields.next()?.chars().next()?;
        let start = fields.nth(18)?.parse().ok()?;
        Some((Process { pid, start }, state))
    }

    /// Still running: a zombie has ended, only its parent has not reaped it
    /// yet (after nspawn is killed, that parent is the host's PID 1).
    fn alive(self) -> bool {
        Process::stat(self.pid).is_some_and(|(p, state)| p.start == self.start && state != 'Z')
    }
}

/// A running container. Dropping it shuts it down and removes every trace,
/// also when the test panicked; [`Container::shutdown`] does the same and
/// reports.
pub struct Container {
    name: String,
    rootfs: Rootfs,
    nspawn: Child,
    leader: Option<Process>,
    cgroups: Cgroups,
    work: TempDir,
    state: Option<BootState>,
    done: bool,
}

impl Container {
    /// Boots `release` (building its root filesystem first if needed) and
    /// waits until systemd reports the boot finished. Panics, showing the
    /// console, if it does not within a minute.
    pub fn boot(release: Release) -> Container {
        static COUNTER: AtomicU32 = AtomicU32::new(0);

        let rootfs = Rootfs::ensure(release);
        let name = format!(
            "nogap-{}-{}-{}",
            release.codename(),
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let work = tempfile::Builder::new()
            .prefix(&format!("{name}."))
            .tempdir()
            .unwrap_or_else(|e| panic!("temporary directory for {name}: {e}"));
        let share = work.path().join("share");
        fs::create_dir(&share).unwrap_or_else(|e| panic!("create {}: {e}", share.display()));
        // Services inside may run as other users.
        fs::set_permissions(&share, fs::Permissions::from_mode(0o755))
            .unwrap_or_else(|e| panic!("chmod: {e}"));
        let log = fs::File::create(work.path().join("console.log"))
            .unwrap_or_else(|e| panic!("console log: {e}"));
        let log_err = log
            .try_clone()
            .unwrap_or_else(|e| panic!("console log: {e}"));
        let cgroups =
            Cgroups::create(&name).unwrap_or_else(|e| panic!("create cgroups for {name}: {e}"));

        let nspawn = host_tool("systemd-nspawn").expect("systemd-nspawn is installed");
        let mut cmd = cgroups.command(nspawn);
        cmd.args([
            "--quiet",
            "--boot",
            "--register=no",
            "--keep-unit",
            "--console=read-only",
            "--volatile=overlay",
            "--link-journal=no",
            "--resolv-conf=off",
            "--timezone=off",
        ])
        .arg(format!("--machine={name}"))
        .arg(format!("--directory={}", rootfs.path().display()))
        .arg(format!("--bind={}:{SHARE}", share.display()))
        .env_clear()
        .env("PATH", PATH)
        // Whole cgroup2 inside, also on a hybrid host: systemd 257 taints
        // itself on cgroup v1, and production hosts are cgroup2.
        .env("SYSTEMD_NSPAWN_UNIFIED_HIERARCHY", "1")
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err);
        let started = Instant::now();
        let nspawn = match cmd.spawn() {
            Ok(child) => child,
            Err(e) => {
                cgroups.remove(KILL_TIMEOUT);
                panic!("cannot start systemd-nspawn: {e}");
            }
        };
        // From here on, Drop cleans up whatever happens.
        let mut c = Container {
            name,
            rootfs,
            nspawn,
            leader: None,
            cgroups,
            work,
            state: None,
            done: false,
        };
        let what = format!("PID 1 of {}", c.name);
        let leader = wait_for(what, BOOT_TIMEOUT, || c.probe_leader());
        c.leader = Some(leader);
        let deadline = started + BOOT_TIMEOUT;
        let left = || deadline.saturating_duration_since(Instant::now());
        let state = try_wait_for(left(), || c.probe_booted(left())).unwrap_or_else(|| {
            c.fail(&format!(
                "systemd in {} did not finish booting within {BOOT_TIMEOUT:?}",
                c.name
            ))
        });
        c.state = Some(state);
        if state == BootState::Degraded {
            let failed = c.systemctl(&["--failed", "--no-legend"]).stdout_text();
            eprintln!("{} booted degraded; failed units:\n{failed}", c.name);
        }
        progress(format!(
            "booted {} in {:.0?} ({state:?})",
            c.name,
            started.elapsed()
        ));
        c
    }

    /// The container's PID 1, once it is systemd: a child of nspawn that is
    /// pid 1 in its own pid namespace. Panics if nspawn has exited.
    fn probe_leader(&mut self) -> Option<Process> {
        if let Ok(Some(status)) = self.nspawn.try_wait() {
            self.fail(&format!("systemd-nspawn exited during boot ({status})"));
        }
        let nspawn = self.nspawn.id() as i32;
        fs::read_dir("/proc").ok()?.flatten().find_map(|entry| {
            let pid: i32 = entry.file_name().to_str()?.parse().ok()?;
            let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
            let field = |key: &str| {
                status
                    .lines()
                    .find_map(|l| l.strip_prefix(key))
                    .map(str::trim)
            };
            let is_pid1 = field("NSpid:")?.split_whitespace().last() == Some("1");
            let is_child = field("PPid:")?.parse::<i32>().ok()? == nspawn;
            (is_child && is_pid1 && field("Name:")? == "systemd").then(|| Process::of(pid))?
        })
    }

    /// `Some` once `systemctl is-system-running --wait` reports the end of
    /// boot; `None` while systemd is not answering yet.
    fn probe_booted(&self, timeout: Duration) -> Option<BootState> {
        let out = self
            .try_exec(&["systemctl", "is-system-running", "--wait"], None, timeout)
            .ok()?;
        match out.stdout_text().trim() {
            "running" => Some(BootState::Running),
            "degraded" => Some(BootState::Degraded),
            state @ ("maintenance" | "stopping") => {
                self.fail(&format!("{} is {state} instead of booting", self.name))
            }
            _ => None, // "offline", "initializing", "starting", or not reachable yet
        }
    }

    /// The machine name (also its hostname), unique per test process.
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn release(&self) -> Release {
        self.rootfs.release()
    }

    pub fn boot_state(&self) -> BootState {
        self.state.expect("booted")
    }

    /// The container's PID 1 as the host sees it.
    pub fn leader_pid(&self) -> i32 {
        self.leader.expect("booted").pid
    }

    /// A host directory, empty at boot, that appears inside as [`SHARE`]
    /// (read-write). Put binaries and data here.
    pub fn share_dir(&self) -> PathBuf {
        self.work.path().join("share")
    }

    /// The container's console output (boot and shutdown messages).
    pub fn console_log(&self) -> PathBuf {
        self.work.path().join("console.log")
    }

    /// Runs `args` inside (all of PID 1's namespaces, its root, a clean
    /// environment), within [`EXEC_TIMEOUT`].
    pub fn exec(&self, args: &[&str]) -> Output {
        self.exec_timeout(args, EXEC_TIMEOUT)
    }

    /// [`Container::exec`] with another time limit. Panics if it is exceeded.
    pub fn exec_timeout(&self, args: &[&str], timeout: Duration) -> Output {
        self.try_exec(args, None, timeout)
            .unwrap_or_else(|e| self.fail(&e.to_string()))
    }

    /// [`Container::exec`] with `input` on standard input.
    pub fn exec_input(&self, args: &[&str], input: &[u8]) -> Output {
        self.try_exec(args, Some(input), EXEC_TIMEOUT)
            .unwrap_or_else(|e| self.fail(&e.to_string()))
    }

    fn try_exec(
        &self,
        args: &[&str],
        input: Option<&[u8]>,
        timeout: Duration,
    ) -> Result<Output, RunError> {
        let leader = self.leader.expect("PID 1 is known");
        let mut cmd = Command::new(host_tool("nsenter").expect("nsenter is installed"));
        // The net namespace is the host's; nsenter skips what is shared.
        // The process stays in the host's cgroup: systemd inside does not
        // track it, and teardown relies on the pid namespace to end it.
        cmd.arg(format!("--target={}", leader.pid))
            .args(["--all", "--root", "--wd", "--"])
            .args(args)
            .env_clear()
            .env("PATH", PATH)
            .env("LANG", "C.UTF-8")
            .env("TERM", "dumb")
            .env("SYSTEMD_PAGER", "")
            .env("SYSTEMD_COLORS", "0");
        run(&mut cmd, input, timeout)
    }

    /// `sh -c script` inside.
    pub fn sh(&self, script: &str) -> Output {
        self.exec(&["sh", "-c", script])
    }

    /// `systemctl args...` inside.
    pub fn systemctl(&self, args: &[&str]) -> Output {
        let mut all = vec!["systemctl", "--no-pager"];
        all.extend_from_slice(args);
        self.exec(&all)
    }

    /// `journalctl --no-pager args...` inside.
    pub fn journalctl(&self, args: &[&str]) -> Output {
        let mut all = vec!["journalctl", "--no-pager"];
        all.extend_from_slice(args);
        self.exec(&all)
    }

    /// Writes `contents` to `path` inside (parents created), with `mode`.
    pub fn write_file(&self, path: &str, contents: &[u8], mode: u32) {
        let mode = format!("{mode:o}");
        self.exec_input(
            &[
                "sh",
                "-c",
                r#"mkdir -p -- "$(dirname -- "$1")" && cat > "$1" && chmod "$2" -- "$1""#,
                "sh",
                path,
                &mode,
            ],
            contents,
        )
        .expect_success(&format!("write {path} in {}", self.name));
    }

    /// Copies a host file to `container_path`, keeping its permission bits.
    pub fn copy_in(&self, host_path: &Path, container_path: &str) {
        let contents =
            fs::read(host_path).unwrap_or_else(|e| panic!("read {}: {e}", host_path.display()));
        let mode = fs::metadata(host_path)
            .unwrap_or_else(|e| panic!("stat {}: {e}", host_path.display()))
            .permissions()
            .mode()
            & 0o7777;
        self.write_file(container_path, &contents, mode);
    }

    /// Writes `/etc/systemd/system/<name>` and reloads systemd.
    pub fn install_unit(&self, name: &str, text: &str) {
        self.write_file(
            &format!("/etc/systemd/system/{name}"),
            text.as_bytes(),
            0o644,
        );
        self.systemctl(&["daemon-reload"])
            .expect_success(&format!("daemon-reload after installing {name}"));
    }

    /// Shuts the container down (orderly, killing after a deadline), removes
    /// its cgroups and nspawn's per-machine directories, and checks nothing
    /// is left. Dropping does the same, but panics on leftovers.
    pub fn shutdown(mut self) -> Teardown {
        self.teardown()
    }

    fn teardown(&mut self) -> Teardown {
        let started = Instant::now();
        if self.done {
            return Teardown {
                took: Duration::ZERO,
                forced: false,
                leftovers: Vec::new(),
            };
        }
        self.done = true;
        if thread::panicking() && self.leader.is_some() {
            self.dump_journal();
        }
        let nspawn = Pid::from_raw(self.nspawn.id() as i32);
        let mut forced = false;
        let mut leftovers = Vec::new();
        if matches!(self.nspawn.try_wait(), Ok(None)) {
            // nspawn answers SIGTERM by sending PID 1 SIGRTMIN+3 (halt).
            let _ = kill(nspawn, Signal::SIGTERM);
            if try_wait_for(STOP_TIMEOUT, || self.nspawn.try_wait().ok().flatten()).is_none() {
                forced = true;
                // Killing nspawn alone would leave the container running.
                self.kill_everything();
                let _ = kill(nspawn, Signal::SIGKILL);
                if try_wait_for(KILL_TIMEOUT, || self.nspawn.try_wait().ok().flatten()).is_none() {
                    leftovers.push(format!("systemd-nspawn pid {nspawn} survives SIGKILL"));
                }
            }
        }
        if try_wait_for(KILL_TIMEOUT, || (!self.cgroups.populated()).then_some(())).is_none() {
            forced = true;
            self.kill_everything();
            let _ = try_wait_for(KILL_TIMEOUT, || (!self.cgroups.populated()).then_some(()));
        }
        leftovers.extend(self.cgroups.remove(KILL_TIMEOUT));
        leftovers.extend(remove_nspawn_run_dirs(&self.name));
        if let Some(leader) = self.leader {
            if try_wait_for(KILL_TIMEOUT, || (!leader.alive()).then_some(())).is_none() {
                leftovers.push(format!(
                    "container PID 1 (host pid {}) still alive",
                    leader.pid
                ));
            }
        }
        leftovers.extend(release_image_lock(self.rootfs.path()));
        if matches!(self.nspawn.try_wait(), Ok(None)) {
            leftovers.push(format!("systemd-nspawn pid {nspawn} still running"));
        }
        for dir in [self.rootfs.path(), self.work.path()] {
            for mount in mounts_under(dir) {
                leftovers.push(format!("mount {mount}"));
            }
        }
        let took = started.elapsed();
        if forced || !leftovers.is_empty() {
            eprintln!(
                "{}: teardown forced={forced} leftovers={leftovers:?}; console:\n{}",
                self.name,
                tail(&self.console_log(), LOG_LINES)
            );
        }
        Teardown {
            took,
            forced,
            leftovers,
        }
    }

    fn kill_everything(&self) {
        self.cgroups.kill_all();
        if let Some(leader) = self.leader.filter(|l| l.alive()) {
            // SIGKILL to a pid namespace's init ends every process in it.
            let _ = kill(Pid::from_raw(leader.pid), Signal::SIGKILL);
        }
    }

    /// On a failing test: the journal, for the test output.
    fn dump_journal(&self) {
        if let Ok(out) = self.try_exec(
            &["journalctl", "--no-pager", "-b", "-n", "200"],
            None,
            Duration::from_secs(5),
        ) {
            eprintln!(
                "--- journal of {} (last 200 lines)\n{}",
                self.name,
                out.stdout_text()
            );
        }
    }

    /// Panics with `msg` and the end of the console log.
    fn fail(&self, msg: &str) -> ! {
        panic!(
            "{msg}\n--- console of {} (last {LOG_LINES} lines)\n{}",
            self.name,
            tail(&self.console_log(), LOG_LINES)
        )
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let teardown = self.teardown();
        if !teardown.leftovers.is_empty() && !thread::panicking() {
            panic!("{} left {:?}", self.name, teardown.leftovers);
        }
    }
}

/// Once per process, before the first build or boot: kill and remove what
/// test processes that were killed left behind (see [`sweep_stale`]).
pub fn sweep_once() {
    static SWEEP: Once = Once::new();
    SWEEP.call_once(|| {
        for name in sweep_stale(KILL_TIMEOUT) {
            progress(format!(
                "removed stale {name}, left by a killed test process"
            ));
            remove_nspawn_run_dirs(&name);
            remove_work_dirs(&name);
        }
    });
}

/// Directories nspawn keeps per machine under /run and does not always
/// remove (it refuses when /run is not a tmpfs, and cannot when killed).
/// Returns those it could not remove.
fn remove_nspawn_run_dirs(name: &str) -> Vec<String> {
    let mut left = Vec::new();
    for kind in ["propagate", "unix-export"] {
        let dir = Path::new("/run/systemd/nspawn").join(kind).join(name);
        if !dir.exists() {
            continue;
        }
        if !mounts_under(&dir).is_empty() {
            left.push(format!("mount under {}", dir.display()));
            continue;
        }
        if let Err(e) = fs::remove_dir_all(&dir) {
            left.push(format!("{}: {e}", dir.display()));
        }
    }
    left
}

/// nspawn locks the image it runs (shared, for `--volatile`) with
/// `/run/systemd/nspawn/locks/inode-<dev>:<ino>` and removes that file when
/// it is the last user; a killed nspawn cannot. Remove it the way nspawn
/// would: only if nobody holds it. Returns the file if that fails otherwise.
fn release_image_lock(image: &Path) -> Vec<String> {
    let Ok(meta) = fs::metadata(image) else {
        return Vec::new();
    };
    let lock = PathBuf::from(format!(
        "/run/systemd/nspawn/locks/inode-{}:{}",
        meta.dev(),
        meta.ino()
    ));
    let Ok(file) = fs::File::open(&lock) else {
        return Vec::new();
    };
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(_held) => match fs::remove_file(&lock) {
            Ok(()) => Vec::new(),
            Err(e) => vec![format!("{}: {e}", lock.display())],
        },
        // Another container of the same image still runs.
        Err(_) => Vec::new(),
    }
}

/// The temporary directories of a container whose test process was killed.
fn remove_work_dirs(name: &str) {
    let prefix = format!("{name}.");
    let Ok(entries) = fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if entry.file_name().to_string_lossy().starts_with(&prefix)
            && mounts_under(&path).is_empty()
        {
            let _ = fs::remove_dir_all(&path);
        }
    }
}
