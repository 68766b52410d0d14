//! Command-line interface: clap structs only. Values arrive typed (see the
//! `spec::parse_*` value parsers); `config` resolves them into a `RunConfig`.

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use nix::sys::signal::Signal;

use crate::spec::{self, HandOff, Handover, ListenArg, Principal};

const AFTER_HELP: &str = "\
Signals: HUP reloads (a new generation starts; the old one drains once it is ready);
TERM, INT and QUIT stop gracefully; USR1 is passed on to every ready worker (log
reopen); USR2 upgrades nogap in place (as nogap upgrade); every other signal that would
stop or terminate a process (ALRM, TTIN, TSTP, real-time signals...) is ignored with a
log line.

Exit codes: 0 stopped cleanly; 1 runtime failure (or a failed reload, or a refused upgrade, with --wait);
2 usage error; 3 sockets cannot be set up; 4 command not found or not executable;
5 control socket unreachable; 6 no worker could start (--start-limit); 7 runtime directory
not nogap's own.

Logs go to journald when stderr is the journal, otherwise to stderr; NOGAP_LOG sets the
level (error, warn, info, debug, trace; default info).";

#[derive(Debug, Parser)]
#[command(
    name = "nogap",
    version,
    about = "Hold listening sockets and keep a server available through reloads and dead accept loops",
    after_help = AFTER_HELP
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

// Parsed once at start-up; boxing RunArgs would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Supervise COMMAND: hold the sockets, run workers, reload on SIGHUP.
    #[command(after_help = AFTER_HELP)]
    Run(RunArgs),
    /// Ask a running nogap to reload (start a new generation).
    Reload(ReloadArgs),
    /// Show generation, workers, sockets and the last reload.
    Status(StatusArgs),
    /// Re-execute the nogap binary in place (same pid, same workers, same sockets).
    ///
    /// The running nogap runs the binary at the path it was started from (as
    /// it is now: a package upgrade replaces the file) with a probe first;
    /// a binary that cannot take over is refused and the old one keeps
    /// running. Then it executes it in its own process, handing over its
    /// sockets, workers and state. SIGUSR2 does the same.
    Upgrade(UpgradeArgs),
    /// Print the state format versions this binary can take over (used by
    /// a running nogap before it upgrades to this binary).
    #[command(hide = true, name = "upgrade-probe")]
    UpgradeProbe,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Listen on ADDR: HOST:PORT, tcp://HOST:PORT, [::]:PORT, udp://HOST:PORT or
    /// unix:/path[?mode=0660&owner=USER:GROUP]. NAME is what workers see in LISTEN_FDNAMES
    /// (default derived from ADDR, e.g. tcp-127.0.0.1-8080). Repeatable. Sockets passed to
    /// nogap by systemd (LISTEN_FDS) are used too, with their names.
    #[arg(short, long, value_name = "[NAME=]ADDR", value_parser = spec::parse_listen)]
    pub listen: Vec<ListenArg>,

    /// Listen backlog [default: net.core.somaxconn]
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=(i32::MAX as i64)))]
    pub backlog: Option<u32>,

    /// Set SO_REUSEPORT on the sockets nogap binds, and let other sockets (of the
    /// same user) listen on their addresses too.
    #[arg(long)]
    pub reuseport: bool,

    /// How a reload hands TCP sockets over: 'steer' gives each generation its own
    /// SO_REUSEPORT socket on the address and steers new connections to the serving
    /// one, so an old generation gets its stop signal only once its queue is empty;
    /// 'shared' lets every generation accept from one socket. Sockets that cannot be
    /// steered (UDP, unix, inherited without SO_REUSEPORT) are shared either way, and
    /// so are all with --reuseport or --reuseport-per-worker.
    #[arg(long, value_name = "MODE", default_value = "steer", value_parser = spec::parse_handover)]
    pub handover: Handover,

    /// Workers per generation.
    #[arg(short, long, value_name = "N", default_value = "1",
          value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub workers: u32,

    /// When a new worker is ready: 'notify' (it sends READY=1 on NOTIFY_SOCKET) or
    /// 'alive:DURATION' (it stayed alive that long, or sent READY=1 earlier). Add a
    /// probe to check a new generation before any client reaches it: 'notify+http:PATH'
    /// (after READY=1 nogap sends GET PATH through the generation's own socket and
    /// needs a 2xx answer), '+tcp' (a connection it accepts); alone, 'http:PATH' or
    /// 'tcp' probe from the start until one passes. Probes need the steered hand-over.
    #[arg(long, value_name = "MODE", default_value = "alive:1s", value_parser = spec::parse_ready_probe)]
    pub ready: spec::Ready,

    /// A new worker that is not ready by then has failed.
    #[arg(long, value_name = "DUR", default_value = "60s", value_parser = spec::parse_duration)]
    pub start_timeout: Duration,

    /// Progressive hand-over: once a reload's new generation is ready (after its
    /// probe, if any), send it only PCT% of new connections for DURATION (e.g.
    /// 10%:30s; PCT from 1 to 99), the rest to the serving one, and watch it. A
    /// worker of it that exits or turns unhealthy, or (with a probe in --ready) a
    /// probe repeated every second that fails, rolls back: every new connection
    /// goes to the serving generation again, the new one is stopped once its queue
    /// is empty, and the reload fails ('canary failed: ...'). Needs the steered
    /// hand-over. Read from the new configuration at each reload. [default: off]
    #[arg(long, value_name = "PCT:DURATION", value_parser = spec::parse_canary)]
    pub canary: Option<spec::Canary>,

    /// Give up, and exit with status 6, once a worker of the first generation failed
    /// to start N times within --start-limit-interval (exited, could not be run, or
    /// missed --start-timeout): a command that can never start is not retried forever.
    /// Only before the first generation serves; 0 retries forever.
    #[arg(long, value_name = "N", default_value_t = 5)]
    pub start_limit: u32,

    /// The window of --start-limit.
    #[arg(long, value_name = "DUR", default_value = "10s", value_parser = spec::parse_duration)]
    pub start_limit_interval: Duration,

    /// Signal that asks a worker to drain and exit.
    #[arg(long, value_name = "SIG", default_value = "TERM", value_parser = spec::parse_signal)]
    pub stop_signal: Signal,

    /// After the stop signal, SIGKILL the worker's process group after this long. Also
    /// how long the workers of a nogap that died (found at start) may drain.
    #[arg(long, value_name = "DUR", default_value = "30s", value_parser = spec::parse_duration)]
    pub drain_timeout: Duration,

    /// Control socket for `nogap reload` and `nogap status`
    /// [default: $RUNTIME_DIRECTORY/control.sock, else /run/nogap/control.sock].
    #[arg(long, value_name = "PATH")]
    pub control: Option<PathBuf>,

    /// Check the configuration (and that its sockets can be bound) and exit
    /// without starting anything.
    #[arg(long)]
    pub check: bool,

    /// Serve Prometheus metrics (GET /metrics) and probes (GET /healthz: 200 while
    /// healthy, 503 with the reason when UNHEALTHY; GET /readyz: 200 once a generation
    /// serves) over HTTP on ADDR, e.g. 127.0.0.1:9464. Off by default.
    #[arg(long, value_name = "ADDR", value_parser = spec::parse_metrics_addr)]
    pub metrics: Option<std::net::SocketAddr>,

    /// Read options from FILE (TOML): each key is the long name of an option
    /// above, e.g. `workers = 4`, `listen = ["http=0.0.0.0:80"]`,
    /// `env = { KEY = "v" }`, plus `command = ["/usr/bin/server", "--flag"]`.
    /// Options given on the command line win over the file's. Every reload
    /// reads the file again.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// How often nogap samples each TCP socket's accept queue.
    #[arg(long, value_name = "DUR", default_value = "100ms", value_parser = spec::parse_duration,
          help_heading = "Health")]
    pub health_interval: Duration,

    /// A queue nobody accepts from is stalled after 150 ms when no worker is in a
    /// request (a dead accept loop: a replacement starts on the same socket, then the
    /// stalled worker drains), or after this long while a worker is busy in a request
    /// (pinned, not dead: an extra worker starts and nobody is stopped). 0 = off.
    #[arg(long, value_name = "DUR", default_value = "2s", value_parser = spec::parse_duration,
          help_heading = "Health")]
    pub stall_timeout: Duration,

    /// Workers must send WATCHDOG=1 at least this often (they get WATCHDOG_USEC);
    /// a silent worker is replaced. Off by default.
    #[arg(long, value_name = "DUR", value_parser = spec::parse_duration, help_heading = "Health")]
    pub worker_watchdog: Option<Duration>,

    /// Replace a worker whose open descriptors reach PCT% of its RLIMIT_NOFILE
    /// soft limit, before accept fails with EMFILE. 0 = off.
    #[arg(long, value_name = "PCT", default_value = "90",
          value_parser = clap::value_parser!(u8).range(0..=100), help_heading = "Health")]
    pub fd_high: u8,

    /// At most N health replacements per minute; past that nogap reports itself
    /// unhealthy (logs, STATUS=) instead of replacing more.
    #[arg(long, value_name = "N", default_value = "5", help_heading = "Health")]
    pub max_replacements: u32,

    /// Stop pinging systemd's watchdog (WatchdogSec=) while unhealthy, so that
    /// systemd restarts nogap; the socket unit or the fd store keeps the port.
    #[arg(long, help_heading = "Health")]
    pub watchdog_follows_health: bool,

    /// Give every worker slot its own SO_REUSEPORT copy of each TCP socket nogap
    /// binds (implies --reuseport), so that a stalled queue names its worker. A
    /// replacement or a new generation's worker takes over its slot's copy, with
    /// the connections waiting in it.
    #[arg(long, help_heading = "Health")]
    pub reuseport_per_worker: bool,

    /// Hand the sockets nogap binds to systemd's fd store (FDSTORE=1, FDNAME=) and
    /// take them back by name on start, so a restart of nogap keeps the port open.
    /// Needs FileDescriptorStoreMax= in the unit.
    #[arg(long)]
    pub fd_store: bool,

    #[command(flatten)]
    pub worker: WorkerArgs,

    /// The server to run, and its arguments (after `--`).
    #[arg(value_name = "COMMAND", trailing_var_arg = true)]
    pub command: Vec<OsString>,
}

/// Which running nogap a client command talks to.
#[derive(Debug, Args)]
pub struct Target {
    /// The instance: nogap@NAME.service, whose control socket is
    /// /run/nogap/NAME/control.sock. Without NAME (and without --control):
    /// the one instance that runs.
    #[arg(value_name = "NAME", value_parser = spec::parse_instance)]
    pub name: Option<String>,

    /// Control socket of the nogap to talk to.
    #[arg(long, value_name = "PATH", conflicts_with = "name")]
    pub control: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct ReloadArgs {
    /// Wait until the new generation serves; exit 1 with the reason if it failed.
    #[arg(long)]
    pub wait: bool,

    #[command(flatten)]
    pub target: Target,

    /// Give up waiting after this long (exit 1).
    #[arg(long, value_name = "DUR", default_value = "5m", value_parser = spec::parse_duration)]
    pub timeout: Duration,
}

#[derive(Debug, Args)]
pub struct UpgradeArgs {
    /// Wait until the new binary runs; exit 1 with the reason if it was refused.
    #[arg(long)]
    pub wait: bool,

    #[command(flatten)]
    pub target: Target,

    /// Give up waiting after this long (exit 1).
    #[arg(long, value_name = "DUR", default_value = "5m", value_parser = spec::parse_duration)]
    pub timeout: Duration,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,

    #[command(flatten)]
    pub target: Target,
}

/// How workers get their sockets and what process they run as (see `launch`).
#[derive(Debug, Args)]
pub struct WorkerArgs {
    /// Also pass the sockets the way another family of servers expects
    /// (repeatable or comma-separated). LISTEN_FDS, LISTEN_FDNAMES and LISTEN_PID are set
    /// too, unless COMMAND or ARGS pass an fd by template (then only with --fds-as systemd):
    /// gunicorn, for one, would take the socket twice.
    ///
    ///   systemd         only LISTEN_FDS, LISTEN_FDNAMES, LISTEN_PID (the default)
    ///   einhorn         EINHORN_FD_COUNT, EINHORN_FD_0.., EINHORN_FDS, EINHORN_MASTER_PID,
    ///                   EINHORN_CHILD_INDEX, and EINHORN_SOCK_PATH, a command socket per
    ///                   worker: einhorn's manual ACK (worker:ack) counts as READY=1
    ///   server-starter  SERVER_STARTER_PORT=127.0.0.1:8080=3;/run/app.sock=4 and
    ///                   SERVER_STARTER_GENERATION (no UDP sockets)
    ///   nginx           NGINX=3;4; as on an nginx binary upgrade (no abstract unix sockets);
    ///                   nginx.conf has 'daemon off;' and a listen directive per socket
    ///
    /// Templates in COMMAND and ARGS, in --env values and in --pidfile are replaced per
    /// worker: {fd} (the fd of the only socket), {fd:NAME}, {generation}, {worker};
    /// {{fd}} stands for a literal {fd}. Sockets are fds 3, 4, ... in --listen order
    /// (sockets inherited from systemd first). Examples (more in docs/handoff.md):
    ///
    ///   nogap run -l http=127.0.0.1:8000 -- gunicorn --bind fd://{fd:http} app:app
    ///   nogap run -l 127.0.0.1:8000 -- uvicorn --fd {fd} app:app
    ///   nogap run -l 127.0.0.1:8000 --env SERVER_FD={fd} -- node server.js
    ///   nogap run -l 0.0.0.0:80 --fds-as nginx --stop-signal QUIT --user www-data \
    ///       -- nginx -g 'daemon off;'
    ///   nogap run -l 127.0.0.1:8000 --fds-as einhorn -- ./einhorn-worker
    ///   nogap run -l 127.0.0.1:8000 --fds-as server-starter --stop-signal QUIT \
    ///       -- starman --workers 8 app.psgi
    #[arg(long, value_name = "MODE", value_delimiter = ',', value_parser = spec::parse_handoff,
          help_heading = "Hand-off", verbatim_doc_comment)]
    pub fds_as: Vec<HandOff>,

    /// Run workers as USER (name or uid), with its primary group and its
    /// supplementary groups, and USER, LOGNAME, HOME set. nogap binds the
    /// sockets first, so a worker can serve a privileged port unprivileged.
    #[arg(long, value_name = "USER", value_parser = spec::parse_principal,
          help_heading = "Worker process")]
    pub user: Option<Principal>,

    /// Run workers with this primary group (name or gid) [default: USER's group].
    #[arg(long, value_name = "GROUP", value_parser = spec::parse_principal,
          help_heading = "Worker process")]
    pub group: Option<Principal>,

    /// Working directory of the workers.
    #[arg(long, value_name = "DIR", help_heading = "Worker process")]
    pub chdir: Option<PathBuf>,

    /// Set a variable for the workers (repeatable); the value may use templates.
    #[arg(long, value_name = "KEY=VALUE", value_parser = spec::parse_env,
          help_heading = "Worker process")]
    pub env: Vec<(OsString, OsString)>,

    /// Start workers with an empty environment: only nogap's variables, the
    /// --fds-as ones, --user's and --env's.
    #[arg(long, help_heading = "Worker process")]
    pub env_clear: bool,

    /// RLIMIT_NOFILE of the workers, soft and hard (like systemd's LimitNOFILE=N)
    /// [default: nogap's hard limit, so the soft limit is raised to it].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..),
          help_heading = "Worker process")]
    pub nofile: Option<u64>,

    /// File mode creation mask of the workers, in octal (e.g. 027).
    #[arg(long, value_name = "MODE", value_parser = spec::parse_umask,
          help_heading = "Worker process")]
    pub umask: Option<u32>,

    /// Where workers' stdout and stderr go: 'capture' reads them line by line and
    /// writes each with the worker's name: to the journal with WORKER, GENERATION
    /// and WORKER_PID fields (and <N> priority prefixes honoured) when nogap's stderr
    /// is the journal, else to nogap's stderr as '[gen 3 worker 1 pid 1234] line';
    /// 'inherit' lets workers write to nogap's stdout and stderr; 'auto' captures
    /// under journald and inherits otherwise.
    #[arg(long, value_name = "MODE", default_value = "auto", value_parser = spec::parse_worker_output,
          help_heading = "Worker process")]
    pub worker_output: spec::WorkerOutput,

    /// The server daemonizes (forks and its first process exits 0): follow the
    /// process whose pid it writes to PATH, a direct or adopted child of nogap,
    /// as the worker. PATH may use {worker} and {generation}; with --workers > 1 it
    /// must contain {worker}. nogap removes PATH before each start.
    #[arg(long, value_name = "PATH", help_heading = "Worker process")]
    pub pidfile: Option<OsString>,
}
