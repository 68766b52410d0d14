//! The event loop: turns signals, child exits, worker notifications, control
//! requests and timers into [`Event`]s, feeds them to the [`State`], and
//! carries out the [`Action`]s it returns. Policy lives in `policy`; this
//! module only does I/O.

use std::collections::{HashMap, VecDeque};
use std::ffi::OsString;
use std::os::fd::RawFd;
use std::path::PathBuf;
use std::time::Instant;

use futures::StreamExt;
use nix::sys::signal::{kill, killpg, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use sd_notify::NotifyState;
use signal_hook::consts::{SIGCHLD, SIGHUP, SIGINT, SIGTERM};
use signal_hook_tokio::Signals;
use tokio::sync::{mpsc, oneshot};

use crate::config::{HealthConfig, RunConfig};
use crate::error::Error;
use crate::handoff;
use crate::health::{QueueWatch, Verdict};
use crate::launch::set_var;
use crate::notify::{Message, Upstream, WorkerSocket};
use crate::policy::{self, Action, Event, Settings, State, WaiterId};
use crate::sockets::Listener;
use crate::steer::Steering;
use crate::sys::ExecPlan;
use crate::worker::WorkerId;

/// Variables nogap consumes itself and never passes on.
const OWN_VARS: &[&str] = &[
    "LISTEN_PID",
    "LISTEN_FDS",
    "LISTEN_FDNAMES",
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
];

/// nogap's environment, read once at start-up.
#[derive(Clone, Debug)]
pub struct Environment {
    vars: Vec<(OsString, OsString)>,
}

impl Environment {
    pub fn capture() -> Environment {
        Environment {
            vars: std::env::vars_os().collect(),
        }
    }

    pub fn get(&self, key: &str) -> Option<&OsString> {
        self.vars.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// What every worker inherits: everything but nogap's own protocol vars.
    fn for_workers(&self) -> Vec<(OsString, OsString)> {
        self.vars
            .iter()
            .filter(|(k, _)| !OWN_VARS.iter().any(|o| k == o))
            .cloned()
            .collect()
    }

    /// systemd's watchdog period for nogap, if it is addressed to nogap.
    pub fn watchdog(&self) -> Option<std::time::Duration> {
        let usec: u64 = self.get("WATCHDOG_USEC")?.to_str()?.parse().ok()?;
        if let Some(pid) = self.get("WATCHDOG_PID") {
            if pid.to_str()?.parse::<u32>().ok()? != std::process::id() {
                return None;
            }
        }
        Some(std::time::Duration::from_micros(usec)).filter(|d| !d.is_zero())
    }

    /// Where nogap keeps its runtime files (notify sockets, control socket).
    pub fn runtime_base(&self) -> PathBuf {
        if let Some(dir) = self.get("RUNTIME_DIRECTORY") {
            let first = dir
                .to_string_lossy()
                .split(':')
                .next()
                .unwrap_or("")
                .to_string();
            if !first.is_empty() {
                return PathBuf::from(first);
            }
        }
        if nix::unistd::geteuid().is_root() {
            return PathBuf::from("/run/nogap");
        }
        match self.get("XDG_RUNTIME_DIR") {
            Some(d) => PathBuf::from(d).join("nogap"),
            None => std::env::temp_dir().join(format!("nogap-{}", nix::unistd::geteuid())),
        }
    }
}

/// A request from the control channel.
pub enum Request {
    Reload {
        reply: Option<oneshot::Sender<Result<u64, String>>>,
    },
    Status {
        reply: oneshot::Sender<serde_json::Value>,
    },
}

/// A directory of per-worker notify sockets, removed with nogap.
struct NotifyDir(PathBuf);

impl NotifyDir {
    fn create(base: &std::path::Path) -> Result<NotifyDir, Error> {
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

pub struct Supervisor {
    state: State,
    config: RunConfig,
    listeners: Vec<Listener>,
    fds: Vec<RawFd>,
    /// The fds of each worker slot (differs from `fds` only with per-slot copies).
    slot_fds: Vec<Vec<RawFd>>,
    /// Per-slot SO_REUSEPORT copies (`--reuseport-per-worker`), held open.
    copies: Vec<Vec<Option<Listener>>>,
    /// A socket per generation, and where new connections go (see `steer`).
    steering: Steering,
    fdnames: OsString,
    worker_env: Vec<(OsString, OsString)>,
    notify_dir: NotifyDir,
    notify_tx: mpsc::Sender<(WorkerId, Result<Vec<Message>, String>)>,
    sockets: HashMap<WorkerId, WorkerSocket>,
    /// With `--fds-as einhorn`: each worker's einhorn command socket.
    einhorn: HashMap<WorkerId, crate::einhorn::EinhornSocket>,
    upstream: Upstream,
    waiters: HashMap<WaiterId, oneshot::Sender<Result<u64, String>>>,
    next_waiter: WaiterId,
    started: Instant,
    /// The sockets as the hand-off forms describe them (fd = 3 + index).
    handoff: Vec<handoff::Socket>,
    /// Events from helper tasks (the pid-file follower).
    events: mpsc::Sender<Event>,
    /// With `--pidfile`: the first pid and pid file of workers that have not
    /// daemonized yet.
    daemons: HashMap<WorkerId, (i32, PathBuf)>,
}

/// Run until stopped. Returns once every worker is gone.
///
/// This owns the process: it makes it a child subreaper, and when it
/// returns it SIGKILLs whatever is left below the process (see `daemon`).
pub async fn run(
    config: RunConfig,
    listeners: Vec<Listener>,
    env: Environment,
    mut requests: mpsc::Receiver<Request>,
) -> Result<(), Error> {
    let mut signals = Signals::new([SIGHUP, SIGTERM, SIGINT, SIGCHLD])
        .map_err(|e| Error::system("cannot install signal handlers", e))?;
    // Orphans of workers, and daemonizing servers, become nogap's children.
    crate::sys::set_child_subreaper()
        .map_err(|e| Error::system("cannot become a child subreaper", e))?;
    let (events, mut events_rx) = mpsc::channel(64);
    let (notify_tx, mut notify_rx) = mpsc::channel(1024);
    let upstream = Upstream::new(env.get("NOTIFY_SOCKET").map(|s| s.as_os_str()))
        .map_err(|e| Error::system("bad NOTIFY_SOCKET", e))?;
    if config.launch.fds_as.contains(&handoff::HandOff::Nginx) {
        crate::sockets::nonblocking_for_nginx(&listeners);
    }
    let keep_home = config.fd_store || listeners.iter().any(|l| l.inherited);
    let steering = Steering::new(&listeners, config.steer, keep_home);
    let settings = Settings {
        workers: config.workers,
        ready: config.ready,
        start_timeout: config.start_timeout,
        stop: config.stop,
        backoff: policy::Backoff::default(),
        health: policy::HealthSettings {
            worker_watchdog: config.health.worker_watchdog,
            max_replacements: config.health.max_replacements,
            ..Default::default()
        },
        daemonizes: config.launch.pidfile.is_some(),
        steered: steering.active(),
    };
    let health = config.health;
    let config_workers = config.workers;
    if config.fd_store {
        crate::sockets::store(&listeners);
    }
    let fds = crate::sockets::raw_fds(&listeners);
    let copies = if config.per_worker_sockets {
        crate::sockets::slot_copies(&listeners, config.workers, config.backlog)?
    } else {
        Vec::new()
    };
    // Per slot, the fds a worker gets: the slot's own copies where there are.
    let slot_fds: Vec<Vec<RawFd>> = std::iter::once(fds.clone())
        .chain(copies.iter().map(|row| {
            row.iter()
                .zip(&fds)
                .map(|(c, fd)| c.as_ref().map_or(*fd, Listener::raw_fd))
                .collect()
        }))
        .collect();
    let fdnames = listeners
        .iter()
        .map(|l| l.name.as_str())
        .collect::<Vec<_>>()
        .join(":")
        .into();
    let mut sup = Supervisor {
        state: State::new(settings),
        notify_dir: NotifyDir::create(&env.runtime_base())?,
        worker_env: env.for_workers(),
        config,
        listeners,
        fds,
        slot_fds,
        copies,
        steering,
        fdnames,
        notify_tx,
        sockets: HashMap::new(),
        einhorn: HashMap::new(),
        upstream,
        waiters: HashMap::new(),
        next_waiter: 1,
        started: Instant::now(),
        handoff: Vec::new(),
        events,
        daemons: HashMap::new(),
    };
    sup.handoff = sup
        .listeners
        .iter()
        .map(handoff::Socket::of_listener)
        .collect();
    for l in &sup.listeners {
        tracing::info!(socket = %l.name, addr = %l.address, inherited = l.inherited, "listening");
    }

    let mut watches = Watches::new(&sup.listeners, &sup.copies, config_workers, &health);
    let mut health_tick = tokio::time::interval(health.interval);
    health_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Pinged from this loop only, so a wedged nogap stops pinging.
    let watchdog = env.watchdog();
    let mut watchdog_tick =
        tokio::time::interval(watchdog.map_or(std::time::Duration::from_secs(3600), |d| d / 2));
    if let Some(d) = watchdog {
        tracing::info!(period = %humantime::format_duration(d), "systemd watchdog enabled");
    }
    // Runs only while a hand-over waits for old queues to drain; Delay, so
    // that the ticks missed while it did not run are not fired in a burst.
    let mut steer_tick = tokio::time::interval(crate::steer::POLL);
    steer_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    if sup.process(Event::Start) {
        return Ok(());
    }
    loop {
        let deadline = sup.state.next_deadline();
        let sleep = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(tokio::time::Instant::from_std(d)).await,
                None => std::future::pending().await,
            }
        };
        let event = tokio::select! {
            Some(sig) = signals.next() => match sig {
                SIGHUP => Event::Reload { waiter: None },
                SIGTERM | SIGINT => Event::Stop,
                _ => {
                    if sup.reap() { return Ok(()); }
                    continue;
                }
            },
            Some((worker, parsed)) = notify_rx.recv() => match parsed {
                Ok(messages) => Event::Notify { worker, messages },
                Err(error) => {
                    let w = sup.state.workers.get(&worker);
                    tracing::warn!(worker = w.map(|w| w.slot), generation = w.map(|w| w.generation), %error, "bad notify message ignored");
                    continue;
                }
            },
            Some(event) = events_rx.recv() => event,
            Some(req) = requests.recv() => match req {
                Request::Reload { reply } => {
                    let waiter = reply.map(|r| {
                        let id = sup.next_waiter;
                        sup.next_waiter += 1;
                        sup.waiters.insert(id, r);
                        id
                    });
                    Event::Reload { waiter }
                }
                Request::Status { reply } => {
                    let _ = reply.send(sup.status_json());
                    continue;
                }
            },
                                    () = sleep => {
                // Notifications that already arrived (a WATCHDOG=1, a READY=1)
                // count before the deadline they would have met.
                while let Ok((worker, Ok(messages))) = notify_rx.try_recv() {
                    if sup.process(Event::Notify { worker, messages }) {
                        return Ok(());
                    }
                }
                Event::Tick
            }
            _ = health_tick.tick(), if watches.active() => {
                if sup.check_health(&mut watches) {
                    return Ok(());
                }
                continue;
            }
            _ = steer_tick.tick(), if sup.steering.waiting() => {
                if !sup.steering.poll(&sup.listeners, Instant::now()) {
                    continue;
                }
                Event::Drained
            }
            _ = watchdog_tick.tick(), if watchdog.is_some() => {
                if !health.watchdog_follows_health || sup.state.healthy() {
                    sup.upstream.send(&[NotifyState::Watchdog]);
                } else {
                    tracing::warn!("unhealthy: not pinging systemd's watchdog");
                }
                continue;
            }
        };
        if sup.process(event) {
            return Ok(());
        }
    }
}

impl Supervisor {
    /// Handle one event and everything it leads to. True when nogap is done.
    fn process(&mut self, event: Event) -> bool {
        let mut queue = VecDeque::from([event]);
        let mut done = false;
        while let Some(event) = queue.pop_front() {
            for action in self.state.handle(event, Instant::now()) {
                match action {
                    Action::Spawn {
                        worker,
                        generation,
                        slot,
                    } => queue.push_back(self.spawn(worker, generation, slot)),
                    Action::Signal { pid, signal } => {
                        if let Err(e) = kill(Pid::from_raw(pid), signal) {
                            tracing::debug!(pid, error = %e, "signal not delivered");
                        }
                    }
                    Action::KillGroup { pid } => {
                        let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
                        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                    }
                    Action::KillOrphans { pgid } => {
                        let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
                    }
                    Action::Forget { worker } => {
                        self.sockets.remove(&worker);
                        self.einhorn.remove(&worker);
                        self.daemons.remove(&worker);
                    }
                    Action::Steer { generation } => {
                        if self
                            .steering
                            .steer(&self.listeners, generation, Instant::now())
                        {
                            queue.push_back(Event::Drained);
                        }
                    }
                    Action::Upstream(msgs) => self.tell_systemd(&msgs),
                    Action::Reply { waiter, result } => {
                        if let Some(tx) = self.waiters.remove(&waiter) {
                            let _ = tx.send(result);
                        }
                    }
                    Action::Exit => done = true,
                }
            }
        }
        done
    }

    /// Reap every exited child. True when nogap is done.
    fn reap(&mut self) -> bool {
        loop {
            let (pid, status) = match waitpid(None::<Pid>, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) => {
                    if code == 0 && self.follow_daemon(pid.as_raw()) {
                        continue;
                    }
                    (pid, format!("exited with status {code}"))
                }
                Ok(WaitStatus::Signaled(pid, sig, _)) => {
                    (pid, format!("was killed by signal {sig}"))
                }
                Ok(WaitStatus::StillAlive) | Err(_) => return false,
                Ok(_) => continue,
            };
            if self.process(Event::Exited {
                pid: pid.as_raw(),
                status,
            }) {
                return true;
            }
        }
    }

    fn spawn(&mut self, worker: WorkerId, generation: u64, slot: u32) -> Event {
        match self.try_spawn(worker, generation, slot) {
            Ok(pid) => Event::Spawned { worker, pid },
            Err(error) => Event::SpawnFailed { worker, error },
        }
    }

    fn try_spawn(&mut self, worker: WorkerId, generation: u64, slot: u32) -> Result<i32, String> {
        let launch = &self.config.launch;
        let path = self.notify_dir.0.join(format!("w{worker}.sock"));
        let socket = WorkerSocket::bind(path, worker, self.notify_tx.clone())
            .map_err(|e| format!("cannot create notify socket: {e}"))?;
        // A worker running as another user must be able to connect.
        let creds = &launch.credentials;
        if creds.uid.is_some() || creds.gid.is_some() {
            std::os::unix::fs::chown(socket.path(), creds.uid, creds.gid)
                .map_err(|e| format!("cannot chown notify socket: {e}"))?;
        }
        let mut env = if launch.env_clear {
            Vec::new()
        } else {
            self.worker_env.clone()
        };
        for (k, v) in launch.user_env() {
            set_var(&mut env, k, v);
        }
        if launch.listen_fds {
            env.push(("LISTEN_FDS".into(), self.fds.len().to_string().into()));
            env.push(("LISTEN_FDNAMES".into(), self.fdnames.clone()));
        }
        env.push(("NOTIFY_SOCKET".into(), socket.path().into()));
        env.push(("NOGAP_GENERATION".into(), generation.to_string().into()));
        env.push(("NOGAP_WORKER".into(), slot.to_string().into()));
        if let Some(d) = self.config.health.worker_watchdog {
            env.push(("WATCHDOG_USEC".into(), d.as_micros().to_string().into()));
        }
        // einhorn's command socket: a worker's `worker:ack` counts as READY=1.
        let einhorn = if launch.fds_as.contains(&handoff::HandOff::Einhorn) {
            let path = self.notify_dir.0.join(format!("w{worker}.einhorn.sock"));
            let sock = crate::einhorn::EinhornSocket::bind(path, worker, self.notify_tx.clone())
                .map_err(|e| format!("cannot create einhorn command socket: {e}"))?;
            if creds.uid.is_some() || creds.gid.is_some() {
                std::os::unix::fs::chown(sock.path(), creds.uid, creds.gid)
                    .map_err(|e| format!("cannot chown einhorn command socket: {e}"))?;
            }
            set_var(&mut env, "EINHORN_SOCK_PATH".into(), sock.path().into());
            Some(sock)
        } else {
            None
        };
        let info = handoff::WorkerInfo {
            generation,
            slot,
            parent_pid: std::process::id(),
        };
        let cmd = &self.config.command;
        let rendered =
            handoff::render(&launch.fds_as, &cmd.argv, &launch.env, &self.handoff, &info)?;
        for (k, v) in rendered.env {
            set_var(&mut env, k, v);
        }
        let pidfile = match &launch.pidfile {
            Some(t) => {
                let p = PathBuf::from(handoff::expand(t, &self.handoff, &info)?);
                match std::fs::remove_file(&p) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                        return Err(format!("cannot remove old pid file {}: {e}", p.display()))
                    }
                    _ => Some(p),
                }
            }
            None => None,
        };
        let fds = if self.steering.active() {
            let live = self.state.workers.values().map(|w| w.generation).collect();
            // Nobody accepts from the serving socket: a new generation must
            // take over its queue, so it shares that socket.
            let stalled = (0..self.listeners.len()).any(|i| {
                self.steering.steers(i) && self.state.stalled.contains(&self.listeners[i].name)
            });
            self.steering
                .fds(&self.listeners, generation, &live, &self.fds, stalled)
        } else {
            self.slot_fds
                .get(slot as usize)
                .unwrap_or(&self.fds)
                .clone()
        };
        let mut plan = ExecPlan::new(
            &cmd.path,
            &rendered.argv,
            &env,
            &fds,
            launch.process_settings(),
        )
        .map_err(|e| e.to_string())?;
        let pid = plan
            .spawn()
            .map_err(|e| format!("cannot execute {}: {e}", cmd.path.display()))?;
        self.sockets.insert(worker, socket);
        if let Some(sock) = einhorn {
            self.einhorn.insert(worker, sock);
        }
        if let Some(p) = pidfile {
            self.daemons.insert(worker, (pid.as_raw(), p));
        }
        Ok(pid.as_raw())
    }

    /// `pid` exited with status 0: if it is the first process of a worker
    /// that daemonizes (`--pidfile`), follow the daemon instead of treating
    /// the exit as the worker's (see `daemon`).
    fn follow_daemon(&mut self, pid: i32) -> bool {
        let Some(worker) = self.state.worker_by_pid(pid).map(|w| w.id) else {
            return false;
        };
        match self.daemons.get(&worker) {
            Some((first, _)) if *first == pid => {}
            _ => return false,
        }
        let (first, path) = self.daemons.remove(&worker).expect("present");
        if let Some(w) = self.state.workers.get(&worker) {
            tracing::info!(worker = w.slot, generation = w.generation, pid, pidfile = %path.display(), "worker's first process exited: waiting for its pid file");
        }
        let timeout = self.config.start_timeout;
        let events = self.events.clone();
        tokio::spawn(async move {
            let event = crate::daemon::follow(worker, first, path, timeout).await;
            let _ = events.send(event).await;
        });
        true
    }

    fn tell_systemd(&self, msgs: &[policy::Upstream]) {
        if !self.upstream.enabled() {
            return;
        }
        let monotonic = NotifyState::monotonic_usec_now().ok();
        let mut states = Vec::new();
        for m in msgs {
            match m {
                policy::Upstream::Ready => states.push(NotifyState::Ready),
                policy::Upstream::Reloading => {
                    states.push(NotifyState::Reloading);
                    states.extend(monotonic.clone());
                }
                policy::Upstream::Stopping => states.push(NotifyState::Stopping),
                policy::Upstream::Status(s) => states.push(NotifyState::Status(s)),
                policy::Upstream::ExtendTimeout(d) => {
                    let usec = d.as_micros().min(u32::MAX as u128) as u32;
                    states.push(NotifyState::ExtendTimeoutUsec(usec));
                }
            }
        }
        self.upstream.send(&states);
    }

    /// The socket a queue entry watches: a slot's own copy, the serving
    /// generation's (steering), or the listener.
    fn socket(&self, listener: usize, slot: Option<u32>) -> &Listener {
        slot.filter(|s| *s > 0)
            .and_then(|s| self.copies.get(s as usize - 1))
            .and_then(|row| row[listener].as_ref())
            .unwrap_or_else(|| self.steering.serving(&self.listeners, listener))
    }

    /// One health round: sample every watched queue, and (less often) every
    /// serving worker's descriptors. True when nogap is done.
    fn check_health(&mut self, watches: &mut Watches) -> bool {
        let now = Instant::now();
        let mut events = Vec::new();
        // Depths first (TCP_INFO, cheap); then one sock_diag dump for all the
        // non-empty queues, to see which of their connections were accepted.
        let depths: Vec<u32> = watches
            .queues
            .iter()
            .map(|q| {
                self.socket(q.listener, q.slot)
                    .queue()
                    .map_or(0, |q| q.depth)
            })
            .collect();
        // Per-slot copies share their address and port: sock_diag cannot
        // tell their connections apart, so they are judged by depth alone.
        let busy: Vec<(usize, std::net::SocketAddr)> = watches
            .queues
            .iter()
            .enumerate()
            .filter(|(k, q)| depths[*k] > 0 && q.slot.is_none())
            .filter_map(|(k, q)| self.listeners[q.listener].local.map(|a| (k, a)))
            .collect();
        let mut queued: Vec<Option<Vec<u64>>> = vec![None; depths.len()];
        if !busy.is_empty() {
            let addrs: Vec<_> = busy.iter().map(|(_, a)| *a).collect();
            if let Ok(lists) = crate::diag::queued_each(&addrs) {
                for ((k, _), list) in busy.iter().zip(lists) {
                    queued[*k] = Some(list);
                }
            }
        }
        for (k, q) in watches.queues.iter_mut().enumerate() {
            let name = &self.listeners[q.listener].name;
            let socket = match q.slot {
                Some(slot) => format!("{name}/{slot}"),
                None => name.clone(),
            };
            match q.watch.sample(now, depths[k], queued[k].as_deref()) {
                Verdict::Stalled { depth } => events.push(Event::QueueStalled {
                    socket,
                    depth,
                    slot: q.slot,
                }),
                Verdict::Recovered => events.push(Event::QueueRecovered { socket }),
                Verdict::Quiet => {}
            }
        }
        watches.round += 1;
        if let Some(pct) = watches
            .fd_high
            .filter(|_| watches.round % watches.fd_every == 0)
        {
            for w in self.state.workers.values() {
                let crate::worker::WorkerState::Ready { pid, .. } = w.state else {
                    continue;
                };
                if w.replaced_by.is_some() || w.unhealthy.is_some() {
                    continue;
                }
                let Some((open, limit)) = crate::health::fd_usage(pid) else {
                    continue;
                };
                if limit > 0 && open * 100 >= limit * pct as u64 {
                    let reason =
                        format!("{open} of {limit} file descriptors open (--fd-high {pct}%)");
                    events.push(Event::Unhealthy {
                        worker: w.id,
                        reason,
                    });
                }
            }
        }
        events.into_iter().any(|e| self.process(e))
    }

    fn status_json(&self) -> serde_json::Value {
        let now = Instant::now();
        let workers: Vec<_> = self
            .state
            .workers
            .values()
            .map(|w| {
                let since = match w.state {
                    crate::worker::WorkerState::Ready { since, .. } => {
                        Some(now.duration_since(since).as_secs_f64())
                    }
                    _ => None,
                };
                let fds = w.state.pid().and_then(crate::health::fd_usage);
                let health = self
                    .state
                    .slot_health
                    .get(&w.slot)
                    .copied()
                    .unwrap_or_default();
                serde_json::json!({
                    "slot": w.slot,
                    "generation": w.generation,
                    "pid": w.state.pid(),
                    "state": w.state.name(),
                    "ready_for_secs": since,
                    "restarts": w.restarts,
                    "status": w.status,
                    "last_ping_secs_ago": w.last_ping.map(|t| now.duration_since(t).as_secs_f64()),
                    "fds_open": fds.map(|f| f.0),
                    "fds_limit": fds.map(|f| f.1),
                    "unhealthy": w.unhealthy,
                    "slot_unhealthy_seen": health.unhealthy,
                    "slot_replacements": health.replacements,
                })
            })
            .collect();
        let sockets: Vec<_> = self
            .listeners
            .iter()
            .enumerate()
            .map(|(i, l)| {
                let q = self.socket(i, None).queue();
                // With per-slot copies: the depth of each slot's own queue.
                let slots: Option<Vec<Option<u32>>> = self.copies.first().and_then(|row| row[i].as_ref()).map(|_| {
                    (0..=self.copies.len())
                        .map(|s| self.socket(i, Some(s as u32)).queue().map(|q| q.depth))
                        .collect()
                });
                let own = format!("{}/", l.name);
                let stalled = self.state.stalled.iter().any(|s| *s == l.name || s.starts_with(&own));
                serde_json::json!({
                    "name": l.name,
                    "address": l.address,
                    "inherited": l.inherited,
                    "handover": if self.steering.steers(i) { "steer" } else { "shared" },
                    "queue": q.map(|q| q.depth),
                    "backlog": q.map(|q| q.backlog),
                    "stalled": stalled,
                    "slot_queues": slots,
                    "stalls": self.state.stalls.iter().filter(|(s, _)| **s == l.name || s.starts_with(&own)).map(|(_, n)| n).sum::<u64>(),
                })
            })
            .collect();
        serde_json::json!({
            "version": 1,
            "pid": std::process::id(),
            "uptime_secs": now.duration_since(self.started).as_secs(),
            "generation": self.state.serving,
            "reloading": self.state.starting_generation().filter(|_| self.state.serving.is_some()),
            "stopping": self.state.stopping,
            "status": self.state.status_line(),
            "last_reload": self.state.last_reload,
            "healthy": self.state.healthy(),
            "workers": workers,
            "sockets": sockets,
            "steering": self.steering.active().then(|| {
                let (pools, target) = self.steering.pools();
                serde_json::json!({ "pools": pools, "target": target })
            }),
        })
    }
}

/// What the health rounds keep between rounds.
struct Watches {
    /// Every watched accept queue: one per TCP listener, or one per slot
    /// with `--reuseport-per-worker`.
    queues: Vec<QueueEntry>,
    fd_high: Option<u8>,
    /// Check descriptors every this many rounds (about once a second).
    fd_every: u64,
    round: u64,
}

struct QueueEntry {
    /// Index into the listeners.
    listener: usize,
    /// The worker slot whose own copy this is, with `--reuseport-per-worker`.
    slot: Option<u32>,
    watch: QueueWatch,
}

impl Watches {
    /// Anything to check at all; with every check off, no wake-ups.
    fn active(&self) -> bool {
        !self.queues.is_empty() || self.fd_high.is_some()
    }

    fn new(
        listeners: &[Listener],
        copies: &[Vec<Option<Listener>>],
        workers: u32,
        health: &HealthConfig,
    ) -> Watches {
        let mut queues = Vec::new();
        if let Some(t) = health.stall_timeout {
            for (i, _) in listeners.iter().enumerate().filter(|(_, l)| l.tcp) {
                let per_slot = copies.first().is_some_and(|row| row[i].is_some());
                let slots: Vec<Option<u32>> = match per_slot {
                    true => (0..workers).map(Some).collect(),
                    false => vec![None],
                };
                for slot in slots {
                    queues.push(QueueEntry {
                        listener: i,
                        slot,
                        watch: QueueWatch::new(t),
                    });
                }
            }
        }
        let per_second = (1000 / health.interval.as_millis().max(1)).max(1) as u64;
        Watches {
            queues,
            fd_high: health.fd_high,
            fd_every: per_second,
            round: 0,
        }
    }
}

impl Drop for Supervisor {
    /// Whatever way nogap leaves, no worker stays behind.
    fn drop(&mut self) {
        for w in self.state.workers.values() {
            if let Some(pid) = w.state.pid() {
                let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
        // Adopted orphans and daemons' children too.
        crate::daemon::kill_descendants();
    }
}
