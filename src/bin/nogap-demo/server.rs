//! The lifecycle loop. Signals, timers and the connection count become one
//! `Event`; `Server::handle` applies it to the stage and says when to exit.
//!
//! | event                 | effect                                               |
//! |-----------------------|------------------------------------------------------|
//! | start delay over      | `--fail-at-start`: exit 3; else accept, READY=1      |
//! | stop signal           | drain: close listeners, STOPPING=1 (ignored if draining) |
//! | crash (timer, count)  | exit 3 at once                                       |
//! | stall timer           | phase `Stalled`: listeners stay open, no accept      |
//! | leak timer            | open /dev/null until EMFILE, keep the fds            |
//! | watchdog tick         | WATCHDOG=1, next tick in WATCHDOG_USEC/2             |
//! | watchdog stop timer   | no more ticks                                        |
//! | all connections done  | exit 0, or after `--drain-delay`                     |
//!
//! All timers count from process start (`Setup::started`).

use std::fs::File;
use std::io;
use std::sync::Arc;
use std::time::Instant;

use nix::sys::resource::{getrlimit, setrlimit, Resource};
use nix::sys::signal::Signal as NixSignal;
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::sync::{mpsc, watch};

use crate::cli::Knobs;
use crate::http::Responder;
use crate::listeners::{self, Service, Tracker};
use crate::notify::Notifier;
use crate::phase::{Phase, PhaseWatch};
use crate::sockets::Socket;
use crate::{sys, Exit};

/// `--leak-fds-after` first lowers the soft fd limit to this, if higher, so
/// that the leak is quick and bounded.
const LEAK_NOFILE: u64 = 4096;

/// What `main` prepared before the runtime started.
pub struct Setup {
    pub sockets: Vec<Socket>,
    pub health: Option<std::net::TcpListener>,
    pub notifier: Notifier,
    pub generation: String,
    pub started: Instant,
}

/// Runs the demo until it exits; returns the exit code.
pub async fn run(knobs: Knobs, setup: Setup) -> Exit {
    match Server::new(knobs, setup) {
        Ok(mut server) => server.run().await,
        Err(e) => {
            say!("error: {e}");
            Exit::Setup
        }
    }
}

/// Where the server is in its life; the data each stage needs is inside it.
enum Stage {
    /// Waiting for `--start-delay`; the sockets are open but not accepted on.
    Starting {
        ready_at: Instant,
        sockets: Vec<Socket>,
        tracker: Tracker,
    },
    /// Accept loops running. Our own tracker is only held: dropping it when
    /// draining starts is what lets `connections_done` finish.
    Serving { _tracker: Tracker },
    /// Listeners closed; waiting for connections, then for `exit_at`
    /// (`--drain-delay`) once they are all done.
    Draining { exit_at: Option<Instant> },
}

#[derive(Debug)]
enum Event {
    Stop(&'static str),
    /// SIGUSR1: what servers use to reopen their log files.
    ReopenLogs,
    /// SIGHUP: reported, never fatal (also what the kernel sends a stopped
    /// process whose process group is orphaned, with SIGCONT).
    Hangup,
    StartDelayOver,
    Crash(&'static str),
    StallAccept,
    LeakFds,
    WatchdogTick,
    StopWatchdog,
    ConnectionsDone,
    DrainDelayOver,
}

/// Deadlines of the knobs; `None` once fired or when not configured.
#[derive(Debug, Default)]
struct Timers {
    crash: Option<Instant>,
    stall: Option<Instant>,
    leak: Option<Instant>,
    watchdog: Option<Instant>,
    stop_watchdog: Option<Instant>,
}

struct Server {
    knobs: Knobs,
    notifier: Notifier,
    stage: Stage,
    phase: watch::Sender<Phase>,
    service: Arc<Service>,
    signals: Signals,
    /// SIGUSR1 (log reopen) and SIGHUP: reported, never fatal.
    usr1: Signal,
    hup: Signal,
    timers: Timers,
    /// Receives nothing; yields `None` once every `Tracker` is dropped.
    connections_done: mpsc::Receiver<()>,
    /// The fds opened by `--leak-fds-after`, kept open.
    leaked: Vec<File>,
}

impl Server {
    fn new(knobs: Knobs, setup: Setup) -> io::Result<Server> {
        let Setup {
            sockets,
            health,
            notifier,
            generation,
            started,
        } = setup;
        let after = |knob: Option<std::time::Duration>| knob.map(|d| started + d);
        let pid = std::process::id();
        let body = format!("pid {pid} gen {generation}\n");
        let service = Arc::new(Service::new(
            Responder {
                body,
                work: knobs.work,
                work_on: knobs.work_on.clone(),
                status: status_line(knobs.status),
                status_from: after(knobs.status_after),
            },
            knobs.crash_after_requests,
        ));
        if let Some(health) = health {
            let ok = Responder {
                body: "ok\n".to_owned(),
                work: std::time::Duration::ZERO,
                work_on: Vec::new(),
                status: "200 OK".into(),
                status_from: None,
            };
            listeners::spawn_health(health, Arc::new(Service::new(ok, None)))?;
        }
        let (tracker, connections_done) = mpsc::channel(1);
        let timers = Timers {
            crash: after(knobs.crash_after),
            stall: after(knobs.stall_accept_after),
            leak: after(knobs.leak_fds_after),
            watchdog: notifier
                .watchdog_interval()
                .map(|interval| Instant::now() + interval),
            stop_watchdog: after(knobs.stop_watchdog_after),
        };
        Ok(Server {
            stage: Stage::Starting {
                ready_at: started + knobs.start_delay,
                sockets,
                tracker,
            },
            phase: watch::Sender::new(Phase::Serving),
            signals: Signals::new(knobs.ignore_term)?,
            usr1: signal(SignalKind::user_defined1())?,
            hup: signal(SignalKind::hangup())?,
            knobs,
            notifier,
            service,
            timers,
            connections_done,
            leaked: Vec::new(),
        })
    }

    async fn run(&mut self) -> Exit {
        loop {
            let event = self.next_event().await;
            if let Some(exit) = self.handle(event) {
                return exit;
            }
        }
    }

    /// Translates the first source that fires into an event; no policy here.
    async fn next_event(&mut self) -> Event {
        let (ready_at, waiting_for_connections, exit_at) = match &self.stage {
            Stage::Starting { ready_at, .. } => (Some(*ready_at), false, None),
            Stage::Serving { .. } => (None, false, None),
            Stage::Draining { exit_at } => (None, exit_at.is_none(), *exit_at),
        };
        let t = &self.timers;
        tokio::select! {
            signal = self.signals.recv() => Event::Stop(signal),
            Some(()) = self.usr1.recv() => Event::ReopenLogs,
            Some(()) = self.hup.recv() => Event::Hangup,
            () = at(ready_at) => Event::StartDelayOver,
            () = at(t.crash) => Event::Crash("--crash-after"),
            () = self.service.crash.notified() => Event::Crash("--crash-after-requests"),
            () = at(t.stall) => Event::StallAccept,
            () = at(t.leak) => Event::LeakFds,
            () = at(t.watchdog) => Event::WatchdogTick,
            () = at(t.stop_watchdog) => Event::StopWatchdog,
            None = self.connections_done.recv(), if waiting_for_connections => Event::ConnectionsDone,
            () = at(exit_at) => Event::DrainDelayOver,
        }
    }

    /// Applies one event; `Some` means exit with that code.
    fn handle(&mut self, event: Event) -> Option<Exit> {
        match event {
            Event::Stop(signal) => self.drain(signal),
            Event::ReopenLogs => say!("SIGUSR1: reopening logs (nothing to reopen)"),
            Event::Hangup => say!("SIGHUP: ignored (nothing to reload)"),
            Event::StartDelayOver => return self.start_serving(),
            Event::Crash(knob) => {
                say!("crashing ({knob})");
                return Some(Exit::Simulated);
            }
            Event::StallAccept => {
                self.timers.stall = None;
                let stalled = self.phase.send_if_modified(|phase| {
                    let serving = *phase == Phase::Serving;
                    if serving {
                        *phase = Phase::Stalled;
                    }
                    serving
                });
                if stalled {
                    say!("stalled accept (--stall-accept-after)");
                }
            }
            Event::LeakFds => {
                self.timers.leak = None;
                self.leak_fds();
            }
            Event::WatchdogTick => {
                self.notifier.send("WATCHDOG=1");
                self.timers.watchdog = self
                    .notifier
                    .watchdog_interval()
                    .map(|interval| Instant::now() + interval);
            }
            Event::StopWatchdog => {
                self.timers.stop_watchdog = None;
                if self.timers.watchdog.take().is_some() {
                    say!("watchdog stopped (--stop-watchdog-after)");
                }
            }
            Event::ConnectionsDone => {
                if self.knobs.drain_delay.is_zero() {
                    say!("drained");
                    return Some(Exit::Clean);
                }
                say!(
                    "drained; exiting in {}",
                    humantime::format_duration(self.knobs.drain_delay)
                );
                self.stage = Stage::Draining {
                    exit_at: Some(Instant::now() + self.knobs.drain_delay),
                };
            }
            Event::DrainDelayOver => return Some(Exit::Clean),
        }
        None
    }

    /// Starts the accept loops and tells the supervisor we are ready.
    fn start_serving(&mut self) -> Option<Exit> {
        if self.knobs.fail_at_start {
            say!("error: failing at start (--fail-at-start)");
            return Some(Exit::Simulated);
        }
        let Stage::Starting {
            sockets, tracker, ..
        } = std::mem::replace(&mut self.stage, Stage::Draining { exit_at: None })
        else {
            unreachable!("the start delay only fires while starting");
        };
        for socket in sockets {
            let name = socket.name.clone();
            let phase = PhaseWatch::new(self.phase.subscribe());
            if let Err(e) =
                listeners::spawn(socket, Arc::clone(&self.service), phase, tracker.clone())
            {
                say!("error: cannot serve {name:?}: {e}");
                return Some(Exit::Setup);
            }
        }
        self.stage = Stage::Serving { _tracker: tracker };
        if self.knobs.no_ready {
            say!("serving, not sending READY=1 (--no-ready)");
        } else {
            self.notifier.send("READY=1\nSTATUS=serving");
            say!("ready");
        }
        None
    }

    /// Closes the listeners and lets connections finish.
    fn drain(&mut self, signal: &str) {
        if let Stage::Draining { .. } = self.stage {
            say!("{signal} while draining: ignored");
            return;
        }
        // Dropping the stage drops the sockets not yet served, and our
        // tracker, so that only connections keep `connections_done` open.
        self.stage = Stage::Draining { exit_at: None };
        self.phase.send_replace(Phase::Draining {
            since: Instant::now(),
        });
        self.notifier.send("STOPPING=1\nSTATUS=draining");
        say!("draining ({signal})");
    }

    /// Opens /dev/null until EMFILE and keeps every fd.
    fn leak_fds(&mut self) {
        match getrlimit(Resource::RLIMIT_NOFILE) {
            Ok((soft, hard)) if soft > LEAK_NOFILE => {
                if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, LEAK_NOFILE, hard) {
                    say!("cannot lower RLIMIT_NOFILE to {LEAK_NOFILE}: {e}");
                }
            }
            _ => {}
        }
        let before = self.leaked.len();
        // Bounded: the limit is at most LEAK_NOFILE when lowering worked.
        let outcome = loop {
            match File::open("/dev/null") {
                Ok(file) => self.leaked.push(file),
                Err(e) => break e,
            }
        };
        let leaked = self.leaked.len() - before;
        say!("leaked {leaked} fds (--leak-fds-after), stopped by: {outcome}");
    }
}

/// Sleeps until `deadline`; never returns for `None`.
async fn at(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline.into()).await,
        None => std::future::pending().await,
    }
}

/// The stop signals: SIGTERM, SIGINT and SIGQUIT, or only SIGQUIT with
/// `--ignore-term` (SIGTERM and SIGINT are then set to SIG_IGN).
struct Signals {
    term: Option<Signal>,
    int: Option<Signal>,
    quit: Signal,
}

impl Signals {
    fn new(ignore_term: bool) -> io::Result<Signals> {
        let quit = signal(SignalKind::quit())?;
        if ignore_term {
            sys::ignore_signal(NixSignal::SIGTERM)?;
            sys::ignore_signal(NixSignal::SIGINT)?;
            say!("ignoring SIGTERM and SIGINT (--ignore-term)");
            return Ok(Signals {
                term: None,
                int: None,
                quit,
            });
        }
        let term = Some(signal(SignalKind::terminate())?);
        let int = Some(signal(SignalKind::interrupt())?);
        Ok(Signals { term, int, quit })
    }

    async fn recv(&mut self) -> &'static str {
        async fn recv(signal: &mut Option<Signal>) -> Option<()> {
            match signal {
                Some(signal) => signal.recv().await,
                None => std::future::pending().await,
            }
        }
        tokio::select! {
            Some(()) = recv(&mut self.term) => "SIGTERM",
            Some(()) = recv(&mut self.int) => "SIGINT",
            Some(()) = self.quit.recv() => "SIGQUIT",
            else => std::future::pending().await,
        }
    }
}

/// `--status CODE` as a status line's code and reason.
fn status_line(code: u16) -> String {
    let reason = match code {
        200 => "OK",
        204 => "No Content",
        404 => "Not Found",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Status",
    };
    format!("{code} {reason}")
}
