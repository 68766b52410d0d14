//! Command-line interface: clap structs only. Values arrive typed (see the
//! `config::parse_*` value parsers); `config` turns them into a `RunConfig`.

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use nix::sys::signal::Signal;

use crate::config::{self, Handover, ListenSpec, ReadyMode};
use crate::handoff::{self, HandOff};
use crate::launch::{self, GroupSpec, UserSpec};

const AFTER_HELP: &str = "\
Signals: HUP reloads (a new generation starts; the old one drains once it is ready),
TERM and INT stop gracefully.

Exit codes: 0 stopped cleanly; 1 runtime failure (or a failed reload, for reload --wait);
2 usage error; 3 sockets cannot be set up; 4 command not found or not executable;
5 control socket unreachable.

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
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Listen on ADDR: HOST:PORT, tcp://HOST:PORT, [::]:PORT, udp://HOST:PORT or
    /// unix:/path[?mode=0660&owner=USER:GROUP]. NAME is what workers see in LISTEN_FDNAMES
    /// (default derived from ADDR, e.g. tcp-127.0.0.1-8080). Repeatable. Sockets passed to
    /// nogap by systemd (LISTEN_FDS) are used too, with their names.
    #[arg(short, long, value_name = "[NAME=]ADDR", value_parser = config::parse_listen)]
    pub listen: Vec<ListenSpec>,

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
    #[arg(long, value_name = "MODE", default_value = "steer", value_parser = config::parse_handover)]
    pub handover: Handover,

    /// Workers per generation.
    #[arg(short, long, value_name = "N", default_value = "1",
          value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub workers: u32,

    /// When a new worker is ready: 'notify' (it sends READY=1 on NOTIFY_SOCKET) or
    /// 'alive:DURATION' (it stayed alive that long, or sent READY=1 earlier).
    #[arg(long, value_name = "MODE", default_value = "alive:1s", value_parser = config::parse_ready)]
    pub ready: ReadyMode,

    /// A new worker that is not ready by then has failed.
    #[arg(long, value_name = "DUR", default_value = "60s", value_parser = config::parse_duration)]
    pub start_timeout: Duration,

    /// Signal that asks a worker to drain and exit.
    #[arg(long, value_name = "SIG", default_value = "TERM", value_parser = config::parse_signal)]
    pub stop_signal: Signal,

    /// After the stop signal, SIGKILL the worker's process group after this long.
    #[arg(long, value_name = "DUR", default_value = "30s", value_parser = config::parse_duration)]
    pub drain_timeout: Duration,

    /// Control socket for `nogap reload` and `nogap status`
    /// [default: $RUNTIME_DIRECTORY/control.sock, else /run/nogap/control.sock].
    #[arg(long, value_name = "PATH")]
    pub control: Option<PathBuf>,

    /// Check the configuration and exit without starting anything.
    #[arg(long)]
    pub check: bool,

    /// How often nogap samples each TCP socket's accept queue.
    #[arg(long, value_name = "DUR", default_value = "250ms", value_parser = config::parse_duration,
          help_heading = "Health")]
    pub health_interval: Duration,

    /// A queue that stays non-empty while nobody accepts from it for this long is
    /// stalled: a replacement worker starts, then the stalled one drains. 0 = off.
    #[arg(long, value_name = "DUR", default_value = "2s", value_parser = config::parse_duration,
          help_heading = "Health")]
    pub stall_timeout: Duration,

    /// Workers must send WATCHDOG=1 at least this often (they get WATCHDOG_USEC);
    /// a silent worker is replaced. Off by default.
    #[arg(long, value_name = "DUR", value_parser = config::parse_duration, help_heading = "Health")]
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

#[derive(Debug, Args)]
pub struct ReloadArgs {
    /// Wait until the new generation serves; exit 1 with the reason if it failed.
    #[arg(long)]
    pub wait: bool,

    /// Control socket of the nogap to talk to.
    #[arg(long, value_name = "PATH")]
    pub control: Option<PathBuf>,

    /// Give up waiting after this long (exit 1).
    #[arg(long, value_name = "DUR", default_value = "5m", value_parser = config::parse_duration)]
    pub timeout: Duration,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,

    /// Control socket of the nogap to talk to.
    #[arg(long, value_name = "PATH")]
    pub control: Option<PathBuf>,
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
    #[arg(long, value_name = "MODE", value_delimiter = ',', value_parser = handoff::parse_handoff,
          help_heading = "Hand-off", verbatim_doc_comment)]
    pub fds_as: Vec<HandOff>,

    /// Run workers as USER (name or uid), with its primary group and its
    /// supplementary groups, and USER, LOGNAME, HOME set. nogap binds the
    /// sockets first, so a worker can serve a privileged port unprivileged.
    #[arg(long, value_name = "USER", value_parser = launch::parse_user,
          help_heading = "Worker process")]
    pub user: Option<UserSpec>,

    /// Run workers with this primary group (name or gid) [default: USER's group].
    #[arg(long, value_name = "GROUP", value_parser = launch::parse_group,
          help_heading = "Worker process")]
    pub group: Option<GroupSpec>,

    /// Working directory of the workers.
    #[arg(long, value_name = "DIR", help_heading = "Worker process")]
    pub chdir: Option<PathBuf>,

    /// Set a variable for the workers (repeatable); the value may use templates.
    #[arg(long, value_name = "KEY=VALUE", value_parser = launch::parse_env,
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
    #[arg(long, value_name = "MODE", value_parser = launch::parse_umask,
          help_heading = "Worker process")]
    pub umask: Option<libc::mode_t>,

    /// The server daemonizes (forks and its first process exits 0): follow the
    /// process whose pid it writes to PATH, a direct or adopted child of nogap,
    /// as the worker. PATH may use {worker} and {generation}; with --workers > 1 it
    /// must contain {worker}. nogap removes PATH before each start.
    #[arg(long, value_name = "PATH", help_heading = "Worker process")]
    pub pidfile: Option<OsString>,
}
