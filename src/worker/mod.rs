//! How a worker is launched and how it talks back.
//!
//! * [`Launcher`]: everything a worker process gets, per worker: its
//!   environment, its fds in hand-off order, its notify socket (and
//!   einhorn's command socket), its pid file; then `sys::ExecPlan` forks and
//!   execs it.
//! * [`handoff`]: the forms in which workers learn their sockets
//!   (LISTEN_FDS, einhorn, Server::Starter, nginx, argv templates).
//! * [`notify`]: per-worker notify sockets, and nogap's own sd_notify;
//!   [`einhorn`]: einhorn's command socket, whose `worker:ack` counts as
//!   READY=1.
//! * [`daemon`]: following servers that daemonize; no orphan outlives nogap.
//! * [`launch`]: the template check and environment helpers.
//! * [`leftover`]: the workers a dead nogap left draining, found and stopped
//!   by the next one.
//! * [`output`]: workers' stdout and stderr, line by line with their names.

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsString;
use std::fmt;
use std::os::fd::RawFd;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::Signal;
use tokio::sync::mpsc;

use crate::config::{Environment, RunConfig};
use crate::error::Error;
use crate::sockets::Listener;
use crate::spec::HandOff;
use crate::sys::ExecPlan;

pub mod daemon;
pub mod einhorn;
pub mod handoff;
pub mod launch;
pub mod leftover;
pub mod notify;
pub mod output;

use launch::set_var;
use notify::WorkerSocket;

/// A worker's identity for its whole life (a slot's replacement is a new
/// worker).
pub type WorkerId = u64;

/// What a worker's notify and einhorn sockets deliver: who sent it, and its
/// messages or why a datagram could not be read.
pub type Notification = notify::Delivery<WorkerId>;

/// How a process ended, as reaped (or, for a daemonizing worker whose daemon
/// could not be followed, as [`daemon::follow`] found out later).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExitStatus {
    Exited(i32),
    Signaled(Signal),
    /// Exited 0, and its pid file names a process that is not running.
    DaemonNotRunning {
        pid: i32,
        pidfile: PathBuf,
    },
    /// Exited 0, and no pid was written to the pid file in time.
    DaemonNoPid {
        pidfile: PathBuf,
        within: Duration,
    },
    /// Exited 0, and the pid file names a process that is not nogap's child.
    DaemonNotOurs {
        pid: i32,
        pidfile: PathBuf,
        within: Duration,
    },
}

impl fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let t = |d: &Duration| humantime::format_duration(*d);
        match self {
            ExitStatus::Exited(code) => write!(f, "exited with status {code}"),
            ExitStatus::Signaled(sig) => write!(f, "was killed by signal {sig}"),
            ExitStatus::DaemonNotRunning { pid, pidfile } => write!(
                f,
                "exited with status 0, and pid {pid} in {} is not running",
                pidfile.display()
            ),
            ExitStatus::DaemonNoPid { pidfile, within } => write!(
                f,
                "exited with status 0 and wrote no pid to {} within {}",
                pidfile.display(),
                t(within)
            ),
            ExitStatus::DaemonNotOurs {
                pid,
                pidfile,
                within,
            } => write!(
                f,
                "exited with status 0 and named pid {pid} in {}, not a child of nogap within {}",
                pidfile.display(),
                t(within)
            ),
        }
    }
}

/// A directory of per-worker notify sockets, removed with nogap.
struct NotifyDir(PathBuf);

impl NotifyDir {
    fn create(base: &Path) -> Result<NotifyDir, Error> {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(base)
            .map_err(|e| Error::system(format!("cannot create {}", base.display()), e))?;
        let dir = base.join(format!("notify-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::DirBuilder::new()
            .mode(0o711)
            .create(&dir)
            .map_err(|e| Error::system(format!("cannot create {}", dir.display()), e))?;
        let _ = std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o711));
        Ok(NotifyDir(dir))
    }
}

impl Drop for NotifyDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// What a live worker holds besides its process.
struct Held {
    _notify: WorkerSocket,
    _einhorn: Option<einhorn::EinhornSocket>,
    pidfile: Option<PathBuf>,
    /// Its stdout and stderr, when captured.
    output: Option<output::Capture>,
    /// Its output pipe is in systemd's fd store under this pid.
    stored: Option<i32>,
}

/// Starts workers: the plan that is the same for every worker, prepared
/// once, and what each live worker holds. Each generation runs the
/// configuration that was the newest when its first worker started (a
/// reload deploys a new one, see [`Launcher::deploy`]), until it leaves.
pub struct Launcher {
    /// The newest configuration: what the next generation runs.
    config: Rc<RunConfig>,
    /// The configuration of each generation that started workers.
    generations: BTreeMap<u64, Rc<RunConfig>>,
    /// nogap's environment as workers inherit it.
    base_env: Vec<(OsString, OsString)>,
    dir: NotifyDir,
    notify_tx: mpsc::Sender<Notification>,
    held: HashMap<WorkerId, Held>,
    /// Where captured worker output goes; None: workers inherit nogap's.
    output: Option<output::Sink>,
    /// Where the output of workers a self-upgrade carried goes when this
    /// image does not capture: made once.
    adopted_sink: Option<output::Sink>,
    /// Worker output lines dropped, all workers.
    dropped: Arc<AtomicU64>,
    /// Keep output pipes in systemd's fd store (see [`Launcher::store_output`]).
    store_output: bool,
}

impl Launcher {
    pub fn new(
        config: RunConfig,
        env: &Environment,
        notify_tx: mpsc::Sender<Notification>,
    ) -> Result<Launcher, Error> {
        let journal = env.stderr_is_journal();
        let capture = match config.launch.output {
            crate::spec::WorkerOutput::Auto => journal,
            crate::spec::WorkerOutput::Inherit => false,
            crate::spec::WorkerOutput::Capture => true,
        };
        let identifier = config
            .command
            .argv
            .first()
            .map(|a| Path::new(a).file_name().unwrap_or(a.as_os_str()))
            .unwrap_or(config.command.path.as_os_str())
            .to_string_lossy()
            .into_owned();
        Ok(Launcher {
            output: capture.then(|| output::Sink::new(journal, identifier)),
            adopted_sink: None,
            dropped: Arc::new(AtomicU64::new(0)),
            store_output: false,
            base_env: env.for_workers(),
            dir: NotifyDir::create(&env.runtime_dir()?)?,
            notify_tx,
            held: HashMap::new(),
            config: Rc::new(config),
            generations: BTreeMap::new(),
        })
    }

    /// The newest configuration.
    pub fn config(&self) -> &RunConfig {
        &self.config
    }

    /// The configuration `generation` runs.
    pub fn config_of(&self, generation: u64) -> &RunConfig {
        self.generations.get(&generation).unwrap_or(&self.config)
    }

    /// Whether `config`'s templates and hand-off forms fit `sockets` (the
    /// name and address of each, in hand-off order).
    pub fn check(
        config: &RunConfig,
        sockets: &[(&str, &crate::spec::Endpoint)],
    ) -> Result<(), Error> {
        let sockets: Vec<handoff::Socket> = sockets
            .iter()
            .map(|(name, endpoint)| handoff::Socket::new(name, endpoint))
            .collect();
        launch::check(&config.launch, &config.command.argv, &sockets)
    }

    /// Make `config` the one the next generation runs (see [`Launcher::check`]).
    pub fn deploy(&mut self, config: RunConfig) {
        self.config = Rc::new(config);
    }

    /// Forget the configurations of the generations that are gone.
    pub fn retire(&mut self, alive: impl Fn(u64) -> bool) {
        self.generations.retain(|g, _| alive(*g));
    }

    /// Start `worker` with `handed` (each socket's descriptor for this
    /// worker, and the socket) at fd 3, 4, ... Its pid, or why it cannot run.
    pub fn spawn(
        &mut self,
        worker: WorkerId,
        generation: u64,
        slot: u32,
        handed: &[(RawFd, &Listener)],
    ) -> Result<i32, String> {
        let fds: Vec<RawFd> = handed.iter().map(|(fd, _)| *fd).collect();
        let sockets: Vec<handoff::Socket> = (handed.iter())
            .map(|(_, l)| handoff::Socket::new(&l.name, &l.endpoint))
            .collect();
        let config = Rc::clone(
            self.generations
                .entry(generation)
                .or_insert_with(|| Rc::clone(&self.config)),
        );
        let launch = &config.launch;
        let (socket, einhorn) = self.worker_sockets(worker, &config)?;
        let mut env = if launch.env_clear {
            Vec::new()
        } else {
            self.base_env.clone()
        };
        for (k, v) in launch.user_env() {
            set_var(&mut env, k, v);
        }
        if launch.listen_fds {
            env.push(("LISTEN_FDS".into(), fds.len().to_string().into()));
            let names: Vec<&str> = handed.iter().map(|(_, l)| l.name.as_str()).collect();
            env.push(("LISTEN_FDNAMES".into(), names.join(":").into()));
        }
        env.push(("NOTIFY_SOCKET".into(), socket.path().into()));
        env.push(("NOGAP_GENERATION".into(), generation.to_string().into()));
        env.push(("NOGAP_WORKER".into(), slot.to_string().into()));
        if let Some(d) = config.health.worker_watchdog {
            env.push(("WATCHDOG_USEC".into(), d.as_micros().to_string().into()));
        }
        if let Some(sock) = &einhorn {
            set_var(&mut env, "EINHORN_SOCK_PATH".into(), sock.path().into());
        }
        let info = handoff::WorkerInfo {
            generation,
            slot,
            parent_pid: std::process::id(),
        };
        let cmd = &config.command;
        let rendered = handoff::render(&launch.fds_as, &cmd.argv, &launch.env, &sockets, &info)?;
        for (k, v) in rendered.env {
            set_var(&mut env, k, v);
        }
        let pidfile = match &launch.pidfile {
            Some(t) => {
                let p = PathBuf::from(handoff::expand(t, &sockets, &info)?);
                match std::fs::remove_file(&p) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                        return Err(format!("cannot remove old pid file {}: {e}", p.display()))
                    }
                    _ => Some(p),
                }
            }
            None => None,
        };
        let mut settings = launch.process_settings();
        // When nogap dies, its workers drain (see `leftover`).
        settings.death_signal = Some(self.config.stop.signal as i32);
        let mut plan = ExecPlan::new(&cmd.path, &rendered.argv, &env, &fds, settings)
            .map_err(|e| e.to_string())?;
        let pipe = match &self.output {
            Some(_) => Some(
                output::Pipe::new().map_err(|e| format!("cannot create the output pipe: {e}"))?,
            ),
            None => None,
        };
        if let Some(p) = &pipe {
            plan.output_to(output::write_end(p));
        }
        let pid = plan
            .spawn()
            .map_err(|e| format!("cannot execute {}: {e}", cmd.path.display()))?;
        let origin = output::Origin {
            generation,
            slot,
            pid: pid.as_raw(),
        };
        let stored = match &pipe {
            Some(p) if self.store_output => {
                p.store(pid.as_raw());
                Some(pid.as_raw())
            }
            _ => None,
        };
        let output = pipe
            .zip(self.output.clone())
            .map(|(pipe, sink)| pipe.capture(origin, sink, self.dropped.clone()));
        self.held.insert(
            worker,
            Held {
                _notify: socket,
                _einhorn: einhorn,
                pidfile,
                output,
                stored,
            },
        );
        Ok(pid.as_raw())
    }

    /// A worker's notify socket and, with the einhorn form, its command
    /// socket (a `worker:ack` counts as READY=1), at paths named after it.
    fn worker_sockets(
        &self,
        worker: WorkerId,
        config: &RunConfig,
    ) -> Result<(WorkerSocket, Option<einhorn::EinhornSocket>), String> {
        let path = self.dir.0.join(format!("w{worker}.sock"));
        let socket = WorkerSocket::bind(path, worker, self.notify_tx.clone())
            .map_err(|e| format!("cannot create notify socket: {e}"))?;
        // A worker running as another user must be able to connect.
        let creds = &config.launch.credentials;
        let foreign = creds.uid.is_some() || creds.gid.is_some();
        if foreign {
            std::os::unix::fs::chown(socket.path(), creds.uid, creds.gid)
                .map_err(|e| format!("cannot chown notify socket: {e}"))?;
        }
        if !config.launch.fds_as.contains(&HandOff::Einhorn) {
            return Ok((socket, None));
        }
        let path = self.dir.0.join(format!("w{worker}.einhorn.sock"));
        let sock = einhorn::EinhornSocket::bind(path, worker, self.notify_tx.clone())
            .map_err(|e| format!("cannot create einhorn command socket: {e}"))?;
        if foreign {
            std::os::unix::fs::chown(sock.path(), creds.uid, creds.gid)
                .map_err(|e| format!("cannot chown einhorn command socket: {e}"))?;
        }
        Ok((socket, Some(sock)))
    }

    /// A worker an earlier image of nogap started (self-upgrade): bind its
    /// notify (and einhorn) socket again at the path it was given, as its
    /// generation's configuration says, so what it says from now on reaches
    /// this image; and read its output pipe (`output`, carried) again.
    pub fn adopt(
        &mut self,
        worker: WorkerId,
        origin: output::Origin,
        output: Option<std::os::fd::OwnedFd>,
    ) -> Result<(), String> {
        let config = Rc::clone(
            self.generations
                .get(&origin.generation)
                .unwrap_or(&self.config),
        );
        let (notify, einhorn) = self.worker_sockets(worker, &config)?;
        // Not captured by this image: its lines go to nogap's stderr, through
        // one writer made for all such workers.
        let sink = match &self.output {
            Some(sink) => sink.clone(),
            None => self
                .adopted_sink
                .get_or_insert_with(|| output::Sink::new(false, String::new()))
                .clone(),
        };
        let output =
            output.map(|fd| output::Capture::adopt(fd, origin, sink, self.dropped.clone()));
        // The old image put its pipe in the fd store under its pid.
        let stored = (self.store_output && output.is_some()).then_some(origin.pid);
        let held = Held {
            _notify: notify,
            _einhorn: einhorn,
            pidfile: None,
            output,
            stored,
        };
        self.held.insert(worker, held);
        Ok(())
    }

    /// Each live worker's output pipe (nogap's read end), for a
    /// self-upgrade to carry; the descriptors go to `keep`.
    pub fn carry_outputs(&self, keep: &mut Vec<RawFd>) -> Vec<(WorkerId, RawFd)> {
        let out: Vec<_> = self
            .held
            .iter()
            .filter_map(|(id, h)| Some((*id, h.output.as_ref()?.raw_fd()?)))
            .collect();
        keep.extend(out.iter().map(|(_, fd)| *fd));
        out
    }

    /// The config file's text (as deployed) of the newest configuration and
    /// of each generation's: what a self-upgrade carries so that the new
    /// image runs each generation as it was deployed, whatever the file
    /// says now. None without `--config`.
    pub fn config_texts(&self) -> (Option<String>, Vec<(u64, String)>) {
        let text = |c: &RunConfig| c.origin.as_ref().and_then(|o| o.text.clone());
        let generations = self
            .generations
            .iter()
            .filter_map(|(g, c)| Some((*g, text(c)?)))
            .collect();
        (text(&self.config), generations)
    }

    /// In a new image: the configuration each generation runs, rebuilt
    /// from the texts an earlier image carried.
    pub fn restore_generations(&mut self, generations: Vec<(u64, RunConfig)>) {
        self.generations = generations
            .into_iter()
            .map(|(g, c)| (g, Rc::new(c)))
            .collect();
    }

    /// Worker output lines dropped so far, as an earlier image counted them.
    pub fn add_dropped(&self, n: u64) {
        self.dropped.fetch_add(n, Ordering::Relaxed);
    }

    /// The worker is gone: close its sockets.
    pub fn forget(&mut self, worker: WorkerId) {
        if let Some(pid) = self.held.remove(&worker).and_then(|h| h.stored) {
            output::unstore(pid);
        }
    }

    /// Keep each worker's output pipe in systemd's fd store while it lives
    /// (see [`output::Pipe::store`]): when the sockets outlive nogap too.
    pub fn storing_output(mut self, on: bool) -> Launcher {
        self.store_output = on;
        self
    }

    /// The last lines a worker wrote (with captured output), reading what
    /// its pipe holds now first.
    pub fn output_tail(&self, worker: WorkerId) -> Vec<String> {
        self.held
            .get(&worker)
            .and_then(|h| h.output.as_ref())
            .map(output::Capture::tail)
            .unwrap_or_default()
    }

    /// Worker output lines dropped since nogap started.
    pub fn dropped_lines(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// The pid file of a daemonizing worker, once: it is followed from now.
    pub fn take_pidfile(&mut self, worker: WorkerId) -> Option<PathBuf> {
        self.held.get_mut(&worker)?.pidfile.take()
    }
}

/// Reap every exited child (workers, their adopted orphans, daemons' first
/// processes): each pid with how it ended.
pub fn reap() -> Vec<(i32, ExitStatus)> {
    use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
    let mut out = Vec::new();
    loop {
        match waitpid(None::<nix::unistd::Pid>, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(pid, code)) => out.push((pid.as_raw(), ExitStatus::Exited(code))),
            Ok(WaitStatus::Signaled(pid, sig, _)) => {
                out.push((pid.as_raw(), ExitStatus::Signaled(sig)))
            }
            Ok(WaitStatus::StillAlive) | Err(_) => return out,
            Ok(_) => continue,
        }
    }
}

/// Send `signal` to the worker process `pid` (a failure is logged: it may
/// have exited already).
pub fn signal(pid: i32, signal: Signal) {
    if let Err(e) = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal) {
        tracing::debug!(pid, error = %e, "signal not delivered");
    }
}

/// SIGKILL the live process `pid` and the process group it leads.
pub fn kill_group(pid: i32) {
    let pid = nix::unistd::Pid::from_raw(pid);
    let _ = nix::sys::signal::killpg(pid, Signal::SIGKILL);
    let _ = nix::sys::signal::kill(pid, Signal::SIGKILL);
}

/// SIGKILL what is left of the process group of a reaped leader (only the
/// group: the leader's pid may belong to another process by now).
pub fn kill_orphans(pgid: i32) {
    let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pgid), Signal::SIGKILL);
}
