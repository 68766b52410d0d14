//! Typed, validated configuration.
//!
//! Command-line strings become types here (durations, signals, socket
//! addresses, readiness modes) through the `parse_*` functions that `cli` uses
//! as clap value parsers, so a bad value is reported by clap in one line that
//! names it. [`RunConfig::from_args`] then checks what needs the system
//! (the command exists and is executable) and yields the config the
//! supervisor runs with.

use std::ffi::OsString;
use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use nix::sys::signal::Signal;

use crate::cli::RunArgs;
use crate::error::Error;
use crate::launch::Launch;

/// Where a socket nogap binds itself lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Address {
    Tcp(SocketAddr),
    Udp(SocketAddr),
    Unix(PathBuf),
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Address::Tcp(a) => write!(f, "tcp://{a}"),
            Address::Udp(a) => write!(f, "udp://{a}"),
            Address::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

impl Address {
    /// The name a worker sees in LISTEN_FDNAMES when `--listen` gives none:
    /// stable for the same address, and free of ':' (the name separator).
    pub fn default_name(&self) -> String {
        match self {
            Address::Tcp(a) => format!("tcp-{}-{}", a.ip(), a.port()),
            Address::Udp(a) => format!("udp-{}-{}", a.ip(), a.port()),
            Address::Unix(p) => format!("unix-{}", p.display()),
        }
    }
}

/// One `--listen [NAME=]ADDR`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListenSpec {
    pub name: String,
    pub address: Address,
    /// `?mode=&owner=` of a unix socket.
    pub unix: UnixOptions,
}

/// Permissions nogap gives a unix socket file it binds:
/// `unix:/path?mode=0660&owner=USER:GROUP` (owner `USER`, `USER:GROUP` or
/// `:GROUP`, names or ids).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UnixOptions {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
}

/// When a new worker counts as ready.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadyMode {
    /// When it sends `READY=1` on its notify socket.
    Notify,
    /// Once it has stayed alive this long (or sent `READY=1` earlier).
    Alive(Duration),
}

/// How a worker is asked to stop, and how long it gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StopPolicy {
    pub signal: Signal,
    pub grace: Duration,
}

/// The program a worker runs: `path` is resolved (execve does not search
/// PATH), `argv[0]` is as the operator wrote it.
#[derive(Clone, Debug)]
pub struct CommandSpec {
    pub path: PathBuf,
    pub argv: Vec<OsString>,
}

/// Everything `nogap run` needs, validated.
#[derive(Clone, Debug)]
pub struct RunConfig {
    pub listen: Vec<ListenSpec>,
    pub backlog: i32,
    pub reuseport: bool,
    pub workers: u32,
    pub ready: ReadyMode,
    pub start_timeout: Duration,
    pub stop: StopPolicy,
    pub command: CommandSpec,
    pub health: HealthConfig,
    pub fd_store: bool,
    /// One SO_REUSEPORT copy of each bound TCP socket per worker slot.
    pub per_worker_sockets: bool,
    /// Steer new connections to the serving generation's own sockets (see
    /// `steer`); off with `--handover shared`, `--reuseport` (the port is
    /// shared with others) and `--reuseport-per-worker`.
    pub steer: bool,
    /// Hand-off forms and worker process settings.
    pub launch: Launch,
}

/// Accept-health monitoring (see `health`).
#[derive(Clone, Copy, Debug)]
pub struct HealthConfig {
    pub interval: Duration,
    /// None: the queue check is off.
    pub stall_timeout: Option<Duration>,
    pub worker_watchdog: Option<Duration>,
    /// Percent of RLIMIT_NOFILE; None: off.
    pub fd_high: Option<u8>,
    pub max_replacements: u32,
    pub watchdog_follows_health: bool,
}

impl RunConfig {
    /// Validate what clap could not: names unique, the command runnable.
    pub fn from_args(args: &RunArgs, path_var: Option<&OsString>) -> Result<RunConfig, Error> {
        if args.reuseport_per_worker && args.fd_store {
            return Err(Error::Usage(
                "--reuseport-per-worker does not combine with --fd-store (only one socket per name can be stored)".into(),
            ));
        }
        let mut names = std::collections::HashSet::new();
        for spec in &args.listen {
            if !names.insert(spec.name.as_str()) {
                return Err(Error::Usage(format!(
                    "socket name '{}' is given twice; names must be unique",
                    spec.name
                )));
            }
        }
        let launch = Launch::from_args(&args.worker, args.workers, &args.command)?;
        let program = args.command.first().ok_or_else(|| {
            Error::Usage("missing command: nogap run [OPTIONS] -- COMMAND [ARGS...]".into())
        })?;
        let path = resolve_command(Path::new(program), path_var)?;
        Ok(RunConfig {
            listen: args.listen.clone(),
            backlog: match args.backlog {
                Some(n) => n as i32,
                None => somaxconn(),
            },
            reuseport: args.reuseport || args.reuseport_per_worker,
            workers: args.workers,
            ready: args.ready,
            start_timeout: args.start_timeout,
            stop: StopPolicy {
                signal: args.stop_signal,
                grace: args.drain_timeout,
            },
            command: CommandSpec {
                path,
                argv: args.command.clone(),
            },
            health: HealthConfig {
                interval: args.health_interval.max(Duration::from_millis(10)),
                stall_timeout: Some(args.stall_timeout).filter(|d| !d.is_zero()),
                worker_watchdog: args.worker_watchdog.filter(|d| !d.is_zero()),
                fd_high: Some(args.fd_high).filter(|p| *p > 0),
                max_replacements: args.max_replacements,
                watchdog_follows_health: args.watchdog_follows_health,
            },
            fd_store: args.fd_store,
            per_worker_sockets: args.reuseport_per_worker,
            steer: args.handover == Handover::Steer
                && !args.reuseport
                && !args.reuseport_per_worker,
            launch,
        })
    }
}

/// `--handover`: how reloads hand TCP sockets over (see `steer`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Handover {
    Steer,
    Shared,
}

/// `--handover` value parser.
pub fn parse_handover(s: &str) -> Result<Handover, String> {
    match s {
        "steer" => Ok(Handover::Steer),
        "shared" => Ok(Handover::Shared),
        _ => Err("expected steer or shared".into()),
    }
}

/// The kernel's cap on listen backlogs, which is also our default.
fn somaxconn() -> i32 {
    std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(4096)
}

/// Find the program like execvp would, and check that it can be executed.
fn resolve_command(program: &Path, path_var: Option<&OsString>) -> Result<PathBuf, Error> {
    if program.as_os_str().as_bytes().contains(&b'/') {
        return check_executable(program).map(|()| program.to_path_buf());
    }
    let dirs = path_var
        .cloned()
        .unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
    let mut found_not_executable = None;
    for dir in std::env::split_paths(&dirs) {
        let candidate = dir.join(program);
        match check_executable(&candidate) {
            Ok(()) => return Ok(candidate),
            Err(e) if candidate.exists() => found_not_executable = Some(e),
            Err(_) => {}
        }
    }
    Err(found_not_executable
        .unwrap_or_else(|| Error::Command(format!("command not found: {}", program.display()))))
}

fn check_executable(path: &Path) -> Result<(), Error> {
    let meta = std::fs::metadata(path)
        .map_err(|e| Error::Command(format!("command not found: {}: {e}", path.display())))?;
    if !meta.is_file() {
        return Err(Error::Command(format!(
            "command is not a file: {}",
            path.display()
        )));
    }
    let executable = meta.permissions().mode() & 0o111 != 0
        && nix::unistd::access(path, nix::unistd::AccessFlags::X_OK).is_ok();
    if !executable {
        return Err(Error::Command(format!(
            "command is not executable: {}",
            path.display()
        )));
    }
    Ok(())
}

// ---- value parsers (used by clap) -------------------------------------------

/// `500ms`, `2s`, `1m`, `1h30m`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|_| "expected a duration like 500ms, 2s or 1m".to_string())
}

/// `TERM`, `SIGTERM`, `term` or `15`.
pub fn parse_signal(s: &str) -> Result<Signal, String> {
    let bad = || "expected a signal name like TERM, QUIT or INT".to_string();
    if let Ok(n) = s.parse::<i32>() {
        return Signal::try_from(n).map_err(|_| bad());
    }
    let upper = s.to_ascii_uppercase();
    let name = if upper.starts_with("SIG") {
        upper
    } else {
        format!("SIG{upper}")
    };
    Signal::from_str(&name).map_err(|_| bad())
}

/// `notify` or `alive:DURATION`.
pub fn parse_ready(s: &str) -> Result<ReadyMode, String> {
    match s.split_once(':') {
        None if s == "notify" => Ok(ReadyMode::Notify),
        Some(("alive", d)) => parse_duration(d).map(ReadyMode::Alive),
        _ => Err("expected 'notify' or 'alive:DURATION' (e.g. alive:1s)".to_string()),
    }
}

/// `[NAME=]ADDR` where ADDR is `HOST:PORT`, `tcp://HOST:PORT`, `[::]:PORT`,
/// `udp://HOST:PORT` or `unix:/path`.
pub fn parse_listen(s: &str) -> Result<ListenSpec, String> {
    let (name, addr) = match s.split_once('=') {
        Some((name, addr)) if !name.contains([':', '/']) => (Some(name), addr),
        _ => (None, s),
    };
    let (addr, unix) = match addr.split_once('?') {
        Some((a, query)) if a.starts_with("unix:") => (a, parse_unix_options(query)?),
        _ => (addr, UnixOptions::default()),
    };
    let address = parse_address(addr)?;
    let name = match name {
        Some(n) => {
            check_fd_name(n)?;
            n.to_string()
        }
        None => address.default_name(),
    };
    Ok(ListenSpec {
        name,
        address,
        unix,
    })
}

/// `mode=0660&owner=www-data:www-data`.
fn parse_unix_options(query: &str) -> Result<UnixOptions, String> {
    let mut o = UnixOptions::default();
    for kv in query.split('&') {
        match kv.split_once('=') {
            Some(("mode", m)) => {
                let digits = m.strip_prefix("0o").unwrap_or(m);
                o.mode = Some(
                    u32::from_str_radix(digits, 8)
                        .ok()
                        .filter(|m| *m <= 0o777 && !digits.is_empty())
                        .ok_or_else(|| format!("bad mode '{m}': expected octal, e.g. 0660"))?,
                );
            }
            Some(("owner", owner)) => {
                let (user, group) = match owner.split_once(':') {
                    Some((u, g)) => (u, Some(g)),
                    None => (owner, None),
                };
                if !user.is_empty() {
                    let u = crate::launch::parse_user(user)
                        .map_err(|e| format!("bad owner '{owner}': {e}"))?;
                    o.uid = Some(u.uid);
                    o.gid = u.gid;
                }
                if let Some(g) = group.filter(|g| !g.is_empty()) {
                    let g = crate::launch::parse_group(g)
                        .map_err(|e| format!("bad owner '{owner}': {e}"))?;
                    o.gid = Some(g.gid);
                }
                if o.uid.is_none() && o.gid.is_none() {
                    return Err(format!(
                        "bad owner '{owner}': expected USER, USER:GROUP or :GROUP"
                    ));
                }
            }
            _ => {
                return Err(format!(
                    "unknown unix socket option '{kv}': use mode=OCTAL and owner=USER:GROUP"
                ))
            }
        }
    }
    Ok(o)
}

fn parse_address(s: &str) -> Result<Address, String> {
    if let Some(path) = s.strip_prefix("unix:") {
        let path = path.strip_prefix("//").unwrap_or(path);
        if !path.starts_with('/') {
            return Err("a unix socket path must be absolute, e.g. unix:/run/app.sock".into());
        }
        return Ok(Address::Unix(PathBuf::from(path)));
    }
    if let Some(rest) = s.strip_prefix("udp://") {
        return parse_host_port(rest).map(Address::Udp);
    }
    let rest = s.strip_prefix("tcp://").unwrap_or(s);
    if rest.contains("://") {
        return Err("unknown scheme; use tcp://, udp:// or unix:".into());
    }
    parse_host_port(rest).map(Address::Tcp)
}

fn parse_host_port(s: &str) -> Result<SocketAddr, String> {
    let bad = || "expected HOST:PORT, e.g. 127.0.0.1:8080, [::]:8080 or localhost:8080".to_string();
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(a);
    }
    // A bare ":PORT" means every IPv4 and IPv6 address.
    if let Some(port) = s.strip_prefix(':') {
        let port: u16 = port.parse().map_err(|_| bad())?;
        return Ok(SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, port)));
    }
    let (host, port) = s.rsplit_once(':').ok_or_else(bad)?;
    let port: u16 = port.parse().map_err(|_| bad())?;
    if host.is_empty() || host.contains([' ', '/']) {
        return Err(bad());
    }
    (host, port)
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve '{host}': {e}"))?
        .next()
        .ok_or_else(|| format!("'{host}' has no address"))
}

/// The rules of sd_listen_fds_with_names(3): printable ASCII, no ':', at most
/// 255 characters.
pub fn check_fd_name(n: &str) -> Result<(), String> {
    let ok =
        !n.is_empty() && n.len() <= 255 && n.bytes().all(|b| b.is_ascii_graphic() && b != b':');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "bad socket name '{n}': use 1 to 255 printable characters without ':' or spaces"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_forms() {
        let l = parse_listen("web=127.0.0.1:8080").unwrap();
        assert_eq!(l.name, "web");
        assert_eq!(l.address, Address::Tcp("127.0.0.1:8080".parse().unwrap()));
        let l = parse_listen("tcp://[::1]:80").unwrap();
        assert_eq!(l.name, "tcp-::1-80");
        assert!(matches!(
            parse_listen("udp://127.0.0.1:53").unwrap().address,
            Address::Udp(_)
        ));
        let l = parse_listen("api=unix:/run/x.sock").unwrap();
        assert_eq!(l.address, Address::Unix("/run/x.sock".into()));
        assert_eq!(l.name, "api");
        assert!(parse_listen("127.0.0.1").is_err());
        assert!(parse_listen("127.0.0.1:99999").is_err());
        assert!(parse_listen("unix:relative.sock").is_err());
        assert!(parse_listen("http://1.2.3.4:80").is_err());
        assert!(parse_listen("a b=127.0.0.1:1").is_err());
        let l = parse_listen("api=unix:/run/x.sock?mode=0660&owner=root:root").unwrap();
        assert_eq!(l.address, Address::Unix("/run/x.sock".into()));
        assert_eq!(
            l.unix,
            UnixOptions {
                mode: Some(0o660),
                uid: Some(0),
                gid: Some(0)
            }
        );
        assert_eq!(parse_listen("unix:/a?owner=:0").unwrap().unix.gid, Some(0));
        assert!(parse_listen("unix:/a?mode=999").is_err());
        assert!(parse_listen("unix:/a?owner=no-such-user-here").is_err());
        assert!(parse_listen("unix:/a?color=red").is_err());
        assert!(parse_listen("127.0.0.1:80?mode=0660").is_err());
    }

    #[test]
    fn durations_signals_ready() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("1m").unwrap(), Duration::from_secs(60));
        assert!(parse_duration("fast").is_err());
        assert_eq!(parse_signal("term").unwrap(), Signal::SIGTERM);
        assert_eq!(parse_signal("SIGQUIT").unwrap(), Signal::SIGQUIT);
        assert_eq!(parse_signal("15").unwrap(), Signal::SIGTERM);
        assert!(parse_signal("NOPE").is_err());
        assert_eq!(parse_ready("notify").unwrap(), ReadyMode::Notify);
        assert_eq!(
            parse_ready("alive:2s").unwrap(),
            ReadyMode::Alive(Duration::from_secs(2))
        );
        assert!(parse_ready("alive").is_err());
    }
}
