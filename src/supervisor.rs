//! The event loop: turns signals, child exits, worker notifications, control
//! requests, health samples and timers into [`Event`]s, feeds them to the
//! [`State`], and carries out the [`Action`]s it returns. Policy lives in
//! `policy`, sampling in `monitor`; this module only translates and executes.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt};
use sd_notify::NotifyState;
use signal_hook::consts::{SIGCHLD, SIGHUP, SIGUSR2};
use tokio::sync::mpsc;

use crate::config::{Environment, RunConfig};
use crate::control::{Request, StatusReport, Waiters};
use crate::error::Error;
use crate::metrics::{Published, Publisher};
use crate::monitor::{Integrity, Monitor, Sockets};
use crate::policy::{Action, Event, ExitStatus, Settings, State, WaiterId, WorkerId};
use crate::probe::Prober;
use crate::sockets::steer::Steering;
use crate::sockets::{Listener, Listeners};
use crate::upgrade::{self, Begin};
use crate::worker::leftover::{self, Leftovers, Record};
use crate::worker::notify::{self, Upstream};
use crate::worker::{daemon, Launcher, Notification};

pub struct Supervisor {
    state: State,
    launcher: Launcher,
    listeners: Listeners,
    /// Per-slot SO_REUSEPORT copies (`--reuseport-per-worker`), held open.
    copies: Vec<Vec<Option<Listener>>>,
    /// A socket per generation, and where new connections go (see `steer`).
    steering: Steering,
    /// Undoes what workers do to the shared sockets (see `monitor`).
    integrity: Integrity,
    /// Bad notify messages, logged a few per worker and period.
    bad_notify: crate::logs::Limiter<WorkerId>,
    upstream: Upstream,
    waiters: Waiters,
    started: Instant,
    /// Events from helper tasks (the pid-file follower).
    events: mpsc::Sender<Event>,
    /// A dead nogap's workers and output pipes (fd store); our record.
    leftovers: Leftovers,
    record: Record,
    /// `--metrics`: where the state is published after each batch of events.
    metrics: Option<Publisher>,
    /// Canary probes of starting generations (`--ready ...+http:PATH`).
    prober: Prober,
    /// Self-upgrades asked for, and what they carry (see `upgrade`).
    upgrading: upgrade::Hold,
}

/// The signals `run` acts on, as the OS delivers them: every signal whose
/// default action would terminate or stop nogap, except faults and ABRT
/// (the table is in `spec::signals`). SIGCHLD reaps; the policy decides the
/// rest.
pub fn os_signals() -> Result<signal_hook_tokio::Signals, Error> {
    signal_hook_tokio::Signals::new(crate::spec::signals::caught())
        .map_err(|e| Error::system("cannot install signal handlers", e))
}

/// systemd's notify socket, from the environment nogap was started with.
pub fn systemd(env: &Environment) -> Result<Upstream, Error> {
    Upstream::new(env.get("NOTIFY_SOCKET").map(|s| s.as_os_str()))
        .map_err(|e| Error::system("bad NOTIFY_SOCKET", e))
}

/// Run until stopped. Returns once every worker is gone.
///
/// `signals` are signal numbers (see [`os_signals`]); `upstream` is where
/// nogap's own readiness goes (see [`systemd`]); `metrics` is the bound
/// `--metrics` socket (see `metrics::bind`); `from`: the sockets, or what an
/// earlier image of this process carried (see `upgrade`). This owns the process: it
/// makes it a child subreaper, reaps every child on SIGCHLD, and when it
/// returns it SIGKILLs whatever is left below the process (see `daemon`).
pub async fn run(
    config: RunConfig,
    from: impl Into<Begin>,
    env: Environment,
    mut requests: mpsc::Receiver<Request>,
    mut signals: impl Stream<Item = i32> + Unpin,
    upstream: Upstream,
    metrics: Option<std::net::TcpListener>,
) -> Result<(), Error> {
    // Orphans of workers, and daemonizing servers, become nogap's children.
    crate::sys::set_child_subreaper()
        .map_err(|e| Error::system("cannot become a child subreaper", e))?;
    let (events, mut events_rx) = mpsc::channel(64);
    let (notify_tx, mut notify_rx) = mpsc::channel(1024);
    let control = crate::control::default_path(config.control.as_deref(), &env);
    let record = Record::next_to(&control);
    let upgrade::Opened {
        listeners,
        steering,
        copies,
        keep_home,
        resume,
    } = upgrade::open(from.into(), &config, control.with_extension("steer"))?;
    let integrity = Integrity::new(config.backlog, config.health.stall_timeout);
    let health = config.health;
    let mut settings = Settings::new(&config, steering.active(), listeners.names());
    settings.listeners = listeners.open();
    let mut monitor = Monitor::new(&listeners, &copies, config.workers, &health);
    // An upgraded image's workers are its own, not a predecessor's.
    let leftovers = match resume {
        Some(_) => Default::default(),
        None => Leftovers::at_start(&env, record.path()),
    };
    let metrics = metrics.map(crate::metrics::serve).transpose()?;
    let prober = Prober::new(&listeners, &steering, events.clone());
    prober.usable(config.probe.as_ref())?;
    prober.usable_canary(config.canary.as_ref())?;
    let mut sup = Supervisor {
        state: State::new(settings),
        launcher: Launcher::new(config, &env, notify_tx)?.storing_output(keep_home),
        listeners,
        copies,
        steering,
        integrity,
        bad_notify: crate::logs::Limiter::new(Duration::from_secs(10), 3),
        upstream,
        waiters: Waiters::new(),
        started: upgrade::Resume::started(resume.as_ref()),
        events,
        leftovers,
        record,
        metrics,
        prober,
        upgrading: upgrade::Hold::new(env),
    };

    let mut health_tick = tokio::time::interval(health.interval);
    health_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Faster while a queue is non-empty (see `monitor`).
    let mut hurried_tick = tokio::time::interval(crate::monitor::HURRIED);
    hurried_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Due from this loop only, so a wedged nogap stops pinging.
    let watchdog = sup.upgrading.env().watchdog();
    let mut watchdog_tick =
        tokio::time::interval(watchdog.map_or(Duration::from_secs(3600), |d| d / 2));
    if let Some(d) = watchdog {
        tracing::info!(period = %humantime::format_duration(d), "systemd watchdog enabled");
    }
    // Runs only while a hand-over waits for old queues to drain; Delay, so
    // that the ticks missed while it did not run are not fired in a burst.
    let mut steer_tick = tokio::time::interval(crate::sockets::steer::POLL);
    steer_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    let mut events = match resume {
        None => vec![
            Event::Leftovers {
                count: sup.leftovers.workers.len(),
            },
            Event::Start,
        ],
        Some(r) => sup.resumed(r),
    };
    while !sup.process_all(events) {
        if sup.upgrading.asked() && sup.state.quiet() {
            sup.upgrade();
        }
        sup.publish();
        let deadline = sup.state.next_deadline();
        let sleep = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(tokio::time::Instant::from_std(d)).await,
                None => std::future::pending().await,
            }
        };
        events = tokio::select! {
            Some(sig) = signals.next() => match sig {
                SIGHUP => sup.reload(None),
                SIGCHLD => daemon::reap().into_iter().map(Event::from).collect(),
                SIGUSR2 => sup.request(Request::Upgrade { reply: None, client: None }),
                sig => vec![Event::Signal(sig)],
            },
            Some((worker, from, parsed)) = notify_rx.recv() => sup.notified(worker, from, parsed),
            Some(event) = events_rx.recv() => vec![event],
            Some(req) = requests.recv() => sup.request(req),
            // Notifications that already arrived (a WATCHDOG=1, a READY=1)
            // count before the deadline they would have met.
            () = sleep => pending(&mut notify_rx).chain([Event::Tick]).collect(),
            _ = health_tick.tick() => sup.sample(&mut monitor),
            _ = hurried_tick.tick(), if monitor.hurried() => {
                let pids = || crate::monitor::ready_pids(&sup.state.snapshot(Instant::now()));
                monitor.sample_queues(&sup.sockets(), &pids, Instant::now())
            }
            _ = steer_tick.tick(), if sup.steering.waiting() => sup.poll_steering(),
            _ = watchdog_tick.tick(), if watchdog.is_some() => vec![Event::WatchdogDue],
        };
    }
    match sup.state.no_worker() {
        Some(why) => Err(Error::NoWorker(why.to_string())),
        None => Ok(()),
    }
}

/// The well-formed notifications already received.
fn pending(rx: &mut mpsc::Receiver<Notification>) -> impl Iterator<Item = Event> + '_ {
    let received = std::iter::from_fn(move || rx.try_recv().ok());
    received.filter_map(|(worker, from, m)| {
        Some(Event::Notify {
            worker,
            from,
            messages: m.ok()?,
        })
    })
}

impl Supervisor {
    /// Handle events and everything they lead to. True when nogap is done.
    fn process_all(&mut self, events: Vec<Event>) -> bool {
        let mut queue = VecDeque::from(events);
        let mut done = false;
        let mut pids_changed = false;
        let mut gone = false;
        while let Some(event) = queue.pop_front() {
            pids_changed |= matches!(
                event,
                Event::Spawned { .. } | Event::Exited { .. } | Event::MainPid { .. }
            );
            self.pass_output(&event);
            self.prober
                .over(&self.listeners, &mut self.steering, &event);
            for action in self.state.handle(event, Instant::now()) {
                match action {
                    Action::Spawn {
                        worker,
                        generation,
                        slot,
                        share_serving,
                    } => queue.push_back(self.spawn(worker, generation, slot, &share_serving)),
                    Action::Signal { pid, signal } => crate::worker::signal(pid, signal),
                    Action::KillGroup { pid } => crate::worker::kill_group(pid),
                    Action::KillOrphans { pgid } => crate::worker::kill_orphans(pgid),
                    Action::Forget { worker } => {
                        self.launcher.forget(worker);
                        let state = &self.state;
                        self.launcher.retire(|g| {
                            state.phase().starting() == Some(g) || state.generation_alive(g)
                        });
                        gone = true;
                    }
                    Action::Steer { generation } => {
                        let drained =
                            self.steering
                                .steer(&self.listeners, generation, Instant::now());
                        queue.extend(drained.then_some(Event::Drained));
                    }
                    Action::Split {
                        generation,
                        percent,
                    } => self.steering.split(&self.listeners, generation, percent),
                    Action::CloseSockets { listeners } => crate::deploy::close(
                        &mut self.listeners,
                        &mut self.steering,
                        &mut self.integrity,
                        &listeners,
                        self.launcher.config().fd_store,
                    ),
                    Action::FollowDaemon { worker, pid } => queue.extend(self.follow(worker, pid)),
                    Action::Probe(order) => {
                        let (l, steering) = (&self.listeners, &mut self.steering);
                        queue.extend(self.prober.start(l, steering, order));
                    }
                    Action::PingWatchdog => self.upstream.send(&[NotifyState::Watchdog]),
                    Action::Upstream(msgs) => self.upstream.tell(&msgs),
                    Action::Reply { waiter, result } => {
                        self.upgrading.reply(&mut self.waiters, waiter, result)
                    }
                    Action::StopLeftovers { signal } => {
                        leftover::signal(&self.leftovers.workers, signal);
                    }
                    Action::KillLeftovers => std::mem::take(&mut self.leftovers).end(),
                    Action::Exit => done = true,
                }
            }
        }
        if pids_changed {
            self.record.update(self.state.pids());
        }
        if gone {
            self.release_pools();
        }
        done
    }

    /// Close the steered sockets no live generation uses (see `steer`).
    fn release_pools(&mut self) {
        if self.steering.active() && !self.state.phase().stopping() {
            let live = self.state.alive_generations();
            self.steering.release(&mut self.listeners, &live);
        }
    }

    fn notified(
        &mut self,
        worker: WorkerId,
        from: Option<notify::Sender>,
        parsed: Result<Vec<notify::Message>, String>,
    ) -> Vec<Event> {
        let w = self
            .state
            .worker(worker)
            .map(|w| (w.slot(), w.generation()));
        match notify::accepted(parsed, worker, from, w, &mut self.bad_notify) {
            Some(messages) => vec![Event::Notify {
                worker,
                from,
                messages,
            }],
            None => Vec::new(),
        }
    }

    fn request(&mut self, req: Request) -> Vec<Event> {
        match req {
            Request::Reload { reply, client } => {
                let Some(reply) = reply else {
                    return self.reload(None);
                };
                let Some(id) = self.waiters.add(reply) else {
                    return Vec::new();
                };
                self.upgrading.keep_client(&self.waiters, id, client);
                self.reload(Some(id))
            }
            Request::Status { reply } => {
                let _ = reply.send(self.status_report());
                Vec::new()
            }
            Request::Left => {
                self.waiters.forget_left();
                self.upgrading.forget_left(&self.waiters);
                Vec::new()
            }
            Request::Upgrade { reply, client } => {
                self.upgrading.ask(reply, client, self.state.quiet());
                vec![Event::UpgradeAsked]
            }
        }
    }

    /// A reload deploys the config file, read again (see `config::reload`):
    /// an invalid one fails the reload, and nothing starts.
    fn reload(&mut self, waiter: Option<WaiterId>) -> Vec<Event> {
        let parts = crate::deploy::Parts {
            listeners: &mut self.listeners,
            steering: &mut self.steering,
            launcher: &mut self.launcher,
            prober: &mut self.prober,
        };
        vec![crate::deploy::reload(parts, self.state.settings(), waiter)]
    }

    fn sockets(&self) -> Sockets<'_> {
        Sockets {
            listeners: &self.listeners,
            copies: &self.copies,
            steering: &self.steering,
        }
    }

    /// A health round: the sockets' integrity first (a socket a worker shut
    /// down listens again before its queue is judged), then the monitor.
    fn sample(&mut self, monitor: &mut Monitor) -> Vec<Event> {
        // A pool whose queue was not yet empty when its generation left.
        self.release_pools();
        let now = Instant::now();
        let (socks, state) = (&self.listeners, &self.state);
        let mut events = self
            .integrity
            .round(&mut self.steering, socks, &self.copies, || {
                state.snapshot(now)
            });
        if monitor.active() {
            events.extend(monitor.sample(&self.sockets(), || self.state.snapshot(now), now));
        }
        events
    }

    fn poll_steering(&mut self) -> Vec<Event> {
        match self.steering.poll(&self.listeners, Instant::now()) {
            true => vec![Event::Drained],
            false => {
                self.release_pools();
                Vec::new()
            }
        }
    }

    fn spawn(&mut self, worker: WorkerId, generation: u64, slot: u32, share: &[usize]) -> Event {
        let base = self.listeners.raw_fds();
        let fds = if self.steering.active() {
            let live = self.state.alive_generations();
            // The policy names the stalled serving sockets; of them, the
            // steered ones are shared with the new generation.
            let stalled = share.iter().any(|&i| self.steering.steers(i));
            self.steering
                .fds(&self.listeners, generation, &live, &base, stalled)
        } else {
            let rows = crate::sockets::slot_fds(&base, &self.copies);
            rows.get(slot as usize).unwrap_or(&base).clone()
        };
        let set = &self.state.settings_of(generation).listeners;
        let handed = self.listeners.hand_off(set, &fds);
        match handed.and_then(|h| self.launcher.spawn(worker, generation, slot, &h)) {
            Ok(pid) => Event::Spawned { worker, pid },
            Err(error) => Event::SpawnFailed { worker, error },
        }
    }

    /// Watch the pid file of a worker whose first process `pid` exited
    /// with status 0 (see `daemon`). Without one, the exit stands.
    fn follow(&mut self, worker: WorkerId, pid: i32) -> Option<Event> {
        let Some(path) = self.launcher.take_pidfile(worker) else {
            let status = ExitStatus::Exited(0);
            return Some(Event::Exited { pid, status });
        };
        let (slot, generation) = self
            .state
            .worker(worker)
            .map_or((0, 0), |w| (w.slot(), w.generation()));
        tracing::info!(worker = slot, generation, pid, pidfile = %path.display(), "worker's first process exited: waiting for its pid file");
        let timeout = self.launcher.config_of(generation).start_timeout;
        daemon::watch(
            path,
            timeout,
            self.events.clone(),
            move |found| match found {
                Ok(main) => Event::MainPid { worker, pid: main },
                Err(status) => Event::Exited { pid, status },
            },
        );
        None
    }

    /// Before an event that may fail starting workers, their last output
    /// (with captured output), for the failure's reason.
    fn pass_output(&mut self, event: &Event) {
        let now = Instant::now();
        for worker in self.state.may_fail(event, now) {
            let lines = self.launcher.output_tail(worker);
            if !lines.is_empty() {
                self.state.handle(Event::Output { worker, lines }, now);
            }
        }
    }

    /// Probe the binary at the start path and execute it in this process
    /// (see `upgrade`). Returns only if it was refused: this image runs on.
    fn upgrade(&mut self) {
        let from = upgrade::Source {
            state: &self.state,
            listeners: &self.listeners,
            steering: &self.steering,
            copies: &self.copies,
            uptime: self.started.elapsed(),
            launcher: &self.launcher,
            metrics: self.metrics.as_ref().map(Publisher::raw_fd),
        };
        self.upgrading.run(from, &self.upstream);
        self.process_all(vec![Event::UpgradeRefused]);
    }

    /// The first events of an image that took over (self-upgrade).
    fn resumed(&mut self, r: upgrade::Resume) -> Vec<Event> {
        self.waiters
            .start_at(self.upgrading.resume_waiters(r.waiters));
        let newest = self.state.settings().clone();
        let (launcher, upstream) = (&mut self.launcher, &self.upstream);
        self.state = upgrade::resume(r.carried, &newest, launcher, r.clients, upstream);
        // Children that exited during the exec, and deadlines met meanwhile.
        let reaped = daemon::reap().into_iter().map(Event::from);
        reaped.chain([Event::Tick]).collect()
    }

    /// What `--metrics` serves, as of now.
    fn publish(&self) {
        if let Some(m) = &self.metrics {
            let snapshot = self.state.snapshot(Instant::now());
            let dropped = self.launcher.dropped_lines();
            m.publish(Published::new(snapshot, &self.sockets(), dropped));
        }
    }

    fn status_report(&self) -> StatusReport {
        let now = Instant::now();
        StatusReport::new(
            &self.state.snapshot(now),
            &self.sockets(),
            now.duration_since(self.started),
        )
    }
}

impl Drop for Supervisor {
    /// Whatever way nogap leaves, no worker stays behind (nor adopted
    /// orphans and daemons' children).
    fn drop(&mut self) {
        daemon::kill_all(self.state.pids().into_iter());
        self.record.remove();
    }
}
