//! The command line. Every value is typed by its parser (durations, socket
//! addresses, listen specs), so the parsed `Args` is already the validated
//! configuration; there is no cross-field validation that would need a
//! second stage.

use std::net::{SocketAddr, ToSocketAddrs};
use std::os::fd::RawFd;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use clap::{Args as ClapArgs, Parser};

const ABOUT: &str = "Demo HTTP server and test worker for nogap";

const LONG_ABOUT: &str = "\
Demo HTTP server and test worker for nogap.

Sockets come from the systemd socket-passing protocol (LISTEN_FDS, LISTEN_PID, \
LISTEN_FDNAMES; LISTEN_PID must equal our pid or the variables are ignored), \
from --fd, or from --listen; all three can be combined. Listening TCP and unix \
stream sockets serve HTTP/1.1; UDP and unix datagram sockets echo each datagram \
back prefixed with 'pid <pid> '.

Every HTTP request gets '200 OK' with body 'pid <pid> gen <NOGAP_GENERATION or 0>\\n' \
and header 'X-Pid: <pid>'. Connections are kept alive (HTTP/1.1 default, \
'Connection: close' honoured; HTTP/1.0 only with 'Connection: keep-alive'); \
pipelined requests are answered one at a time; request bodies are read and \
discarded when they have a Content-Length.

Inherited sockets are switched to O_NONBLOCK, like Go, node and tokio servers \
do. O_NONBLOCK belongs to the open file description, so this also changes the \
supervisor's copy and every other process sharing the socket.

If NOTIFY_SOCKET is set: READY=1 and STATUS=serving once accepting (after \
--start-delay), WATCHDOG=1 every WATCHDOG_USEC/2 when WATCHDOG_USEC is set \
(and WATCHDOG_PID is unset or our pid), STOPPING=1 when draining. The \
watchdog ping is a plain timer on purpose: it keeps going while the accept \
loop is stalled or out of fds, like in most real servers.

On SIGTERM, SIGINT or SIGQUIT the server drains: it closes its listener fds at \
once (never shutdown(): the sockets are shared), finishes requests in flight, \
answers the next request on each keep-alive connection with 'Connection: close', \
closes connections that send nothing within 1s of the drain start, and exits 0 \
once every connection is closed (plus --drain-delay). Further signals while \
draining are ignored. On SIGUSR1 it says 'SIGUSR1: reopening logs' on stderr \
and goes on; SIGHUP is reported and ignored the same way.

All '--*-after' durations count from process start. Durations are humantime: \
500ms, 2s, 1m30s.";

const AFTER_LONG_HELP: &str = "\
Exit codes:
  0  stopped by a signal, every connection drained
  1  setup failed (bad inherited fds, bind failure, unwritable report)
  2  usage error, or no socket at all
  3  simulated failure (--fail-at-start, --crash-after, --crash-after-requests)

Environment:
  LISTEN_FDS, LISTEN_PID, LISTEN_FDNAMES   sockets at fds 3.. (sd_listen_fds)
  NOTIFY_SOCKET                            sd_notify target (path or @abstract)
  WATCHDOG_USEC, WATCHDOG_PID              watchdog interval and owner
  NOGAP_GENERATION                         echoed in every response body

Report (--report FILE), one JSON object, written before any fd is touched:
  pid, ppid, pgid, sid, uid, euid, gid, egid, cwd, umask ('0022'), argv,
  env { LISTEN_FDS, LISTEN_PID, LISTEN_FDNAMES, NOTIFY_SOCKET, WATCHDOG_USEC,
        WATCHDOG_PID, NOGAP_GENERATION, NOGAP_WORKER (string or null), all {..} },
  fds [ { fd, target, cloexec, nonblock,
          socket: null | { type, family, listening, local } } ],
  sig_blocked, sig_ignored (16 hex digits, as in /proc/self/status; the
  SIGPIPE bit is the disposition inherited at exec, before Rust's runtime
  ignores SIGPIPE), nofile_soft, nofile_hard.

Examples:
  nogap-demo --listen 127.0.0.1:8080
  systemd-socket-activate -l 127.0.0.1:8080 --fdname=http nogap-demo --report /tmp/r-{pid}.json
  nogap-demo --listen 127.0.0.1:8080 --health 127.0.0.1:8081 --stall-accept-after 5s";

/// Parsed command line.
#[derive(Debug, Parser)]
#[command(
    name = "nogap-demo",
    version,
    about = ABOUT,
    long_about = LONG_ABOUT,
    after_long_help = AFTER_LONG_HELP
)]
pub struct Args {
    /// Bind ADDR and serve it: HOST:PORT or tcp:HOST:PORT (TCP, SO_REUSEADDR),
    /// udp:HOST:PORT, unix:PATH (PATH must not exist; it is left behind).
    /// Repeatable.
    #[arg(long, value_name = "ADDR")]
    pub listen: Vec<ListenSpec>,

    /// Serve the already open socket at fd N (for servers that get fds by argv
    /// templating). Repeatable.
    #[arg(long = "fd", value_name = "N", value_parser = clap::value_parser!(RawFd).range(0..))]
    pub fds: Vec<RawFd>,

    /// Write a JSON report of what the process inherited to FILE (via FILE.tmp
    /// and rename) before touching any fd. '{pid}' in FILE is replaced by the pid.
    #[arg(long, value_name = "FILE")]
    pub report: Option<PathBuf>,

    #[command(flatten)]
    pub knobs: Knobs,
}

/// Timing and failure knobs; everything the server loop needs to know.
#[derive(Debug, Clone, ClapArgs)]
#[command(next_help_heading = "Timing and failure knobs")]
pub struct Knobs {
    /// Wait DUR before accepting and before READY=1.
    #[arg(long, value_name = "DUR", value_parser = parse_duration, default_value = "0s")]
    pub start_delay: Duration,

    /// After --start-delay, print an error and exit 3 instead of becoming ready.
    #[arg(long)]
    pub fail_at_start: bool,

    /// Exit 3 at DUR after start, without draining.
    #[arg(long, value_name = "DUR", value_parser = parse_duration)]
    pub crash_after: Option<Duration>,

    /// Exit 3, without draining, once N requests have been answered.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub crash_after_requests: Option<u64>,

    /// Ignore SIGTERM and SIGINT entirely (SIG_IGN); SIGQUIT still drains.
    #[arg(long)]
    pub ignore_term: bool,

    /// Never send READY=1, but serve anyway.
    #[arg(long)]
    pub no_ready: bool,

    /// At DUR after start, stop calling accept (and recv on datagram sockets)
    /// but keep the listeners open and serve existing connections.
    #[arg(long, value_name = "DUR", value_parser = parse_duration)]
    pub stall_accept_after: Option<Duration>,

    /// Also bind ADDR (HOST:PORT, TCP) and answer every request there with
    /// 200 'ok\n' until exit, also while starting, stalled or draining (its
    /// connections do not hold up the exit). Not a shared socket.
    #[arg(long, value_name = "ADDR", value_parser = parse_socket_addr)]
    pub health: Option<SocketAddr>,

    /// At DUR after start, open /dev/null until EMFILE and keep the fds
    /// (the soft RLIMIT_NOFILE is first lowered to 4096 if higher, to bound
    /// the leak). Accept then retries with backoff 5ms doubling to 1s.
    #[arg(long, value_name = "DUR", value_parser = parse_duration)]
    pub leak_fds_after: Option<Duration>,

    /// At DUR after start, stop sending WATCHDOG=1.
    #[arg(long, value_name = "DUR", value_parser = parse_duration)]
    pub stop_watchdog_after: Option<Duration>,

    /// Answer every HTTP request with this status code instead of 200 (e.g. 500: a
    /// bad deploy that starts and says READY=1). The --health port still says 200.
    #[arg(long, value_name = "CODE", default_value = "200",
          value_parser = clap::value_parser!(u16).range(100..=599))]
    pub status: u16,

    /// Answer 200 until DUR after start, and the --status code from then on (a
    /// deploy that passes its first checks, then breaks).
    #[arg(long, value_name = "DUR", value_parser = parse_duration)]
    pub status_after: Option<Duration>,

    /// Sleep DUR in each request before answering.
    #[arg(long, value_name = "DUR", value_parser = parse_duration, default_value = "0s")]
    pub work: Duration,

    /// Sleep --work only in requests on the listener named NAME
    /// (LISTEN_FDNAMES; a --listen socket is named as in the log,
    /// tcp:HOST:PORT; a --fd one fdN). Repeatable; without it, on every listener.
    #[arg(long, value_name = "NAME")]
    pub work_on: Vec<String>,

    /// Misbehave at --abuse-after: shutdown (shutdown(SHUT_RDWR) the inherited
    /// sockets), backlog1 (listen(fd, 1) on them), blocking (clear their
    /// O_NONBLOCK), flood-stdout, flood-notify (garbage datagrams), notify-fds
    /// (READY=1 datagrams carrying 16 fds), fork-exit (a child keeps the
    /// sockets, the worker exits 3).
    #[arg(long, value_name = "KIND")]
    pub abuse: Option<crate::abuse::Abuse>,

    /// When --abuse acts, from start.
    #[arg(long, value_name = "DUR", value_parser = parse_duration, default_value = "0s")]
    pub abuse_after: Duration,

    /// Once every connection is drained, stay alive DUR longer before exiting.
    #[arg(long, value_name = "DUR", value_parser = parse_duration, default_value = "0s")]
    pub drain_delay: Duration,
}

/// A socket to bind ourselves (`--listen`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenSpec {
    Tcp(SocketAddr),
    Udp(SocketAddr),
    Unix(PathBuf),
}

impl FromStr for ListenSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err("unix: needs a path".to_owned());
            }
            Ok(ListenSpec::Unix(PathBuf::from(path)))
        } else if let Some(addr) = s.strip_prefix("udp:") {
            parse_socket_addr(addr).map(ListenSpec::Udp)
        } else {
            parse_socket_addr(s.strip_prefix("tcp:").unwrap_or(s)).map(ListenSpec::Tcp)
        }
    }
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (examples: 500ms, 2s, 1m)"))
}

/// `HOST:PORT`; a host name resolves to its first address.
fn parse_socket_addr(s: &str) -> Result<SocketAddr, String> {
    s.to_socket_addrs()
        .map_err(|e| format!("{s}: {e} (expected HOST:PORT)"))?
        .next()
        .ok_or_else(|| format!("{s}: resolves to no address"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_specs() {
        let tcp: SocketAddr = "127.0.0.1:80".parse().unwrap();
        assert_eq!("127.0.0.1:80".parse(), Ok(ListenSpec::Tcp(tcp)));
        assert_eq!("tcp:127.0.0.1:80".parse(), Ok(ListenSpec::Tcp(tcp)));
        assert_eq!("udp:127.0.0.1:80".parse(), Ok(ListenSpec::Udp(tcp)));
        assert_eq!("unix:/tmp/s".parse(), Ok(ListenSpec::Unix("/tmp/s".into())));
        assert!("unix:".parse::<ListenSpec>().is_err());
        assert!("nonsense".parse::<ListenSpec>().is_err());
    }

    #[test]
    fn command_line_is_consistent() {
        use clap::CommandFactory;
        Args::command().debug_assert();
    }
}
