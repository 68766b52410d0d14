//! Value types and their parsers: the bottom layer.
//!
//! Everything an operator writes (an address, a duration, a signal, a
//! readiness mode, a user name) becomes a type here, by a parser that is a
//! pure function of the text: no system calls, no DNS, no user database. The
//! clap structs in `cli` use these parsers, so a malformed value is reported
//! in one line that names it. What needs the system (a host name to
//! resolve, a user to look up, a command to find) is resolved in `config`.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use nix::sys::signal::Signal;

pub mod signals;
pub mod template;

/// Where a socket lives: the one description of a socket's address, used
/// for the sockets nogap binds, the ones it inherits and what workers see.
#[derive(Clone, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Endpoint {
    Tcp(SocketAddr),
    Udp(SocketAddr),
    /// A unix stream (or seqpacket) socket with a path.
    Unix(PathBuf),
    /// A unix datagram socket with a path (only inherited).
    UnixDatagram(PathBuf),
    /// A unix socket without a path: abstract or unnamed (only inherited).
    UnixUnnamed {
        datagram: bool,
    },
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Tcp(a) => write!(f, "tcp://{a}"),
            Endpoint::Udp(a) => write!(f, "udp://{a}"),
            Endpoint::Unix(p) | Endpoint::UnixDatagram(p) => write!(f, "unix:{}", p.display()),
            Endpoint::UnixUnnamed { .. } => f.write_str("unix:(unnamed)"),
        }
    }
}

impl Endpoint {
    /// The name a worker sees in LISTEN_FDNAMES when `--listen` gives none:
    /// stable for the same address, and free of ':' (the name separator).
    pub fn default_name(&self) -> String {
        match self {
            Endpoint::Tcp(a) => format!("tcp-{}-{}", a.ip(), a.port()),
            Endpoint::Udp(a) => format!("udp-{}-{}", a.ip(), a.port()),
            Endpoint::Unix(p) | Endpoint::UnixDatagram(p) => format!("unix-{}", p.display()),
            Endpoint::UnixUnnamed { .. } => "unix".to_string(),
        }
    }

    /// A stream socket that listens: it has an accept queue.
    pub fn listens(&self) -> bool {
        match self {
            Endpoint::Tcp(_) | Endpoint::Unix(_) => true,
            Endpoint::Udp(_) | Endpoint::UnixDatagram(_) => false,
            Endpoint::UnixUnnamed { datagram } => !datagram,
        }
    }

    /// The address of a TCP listener, whose queue `TCP_INFO` and sock_diag read.
    pub fn tcp(&self) -> Option<SocketAddr> {
        match self {
            Endpoint::Tcp(a) => Some(*a),
            _ => None,
        }
    }

    /// The IP address and port, for TCP and UDP.
    pub fn inet(&self) -> Option<SocketAddr> {
        match self {
            Endpoint::Tcp(a) | Endpoint::Udp(a) => Some(*a),
            _ => None,
        }
    }

    /// The file system path of a unix socket.
    pub fn path(&self) -> Option<&Path> {
        match self {
            Endpoint::Unix(p) | Endpoint::UnixDatagram(p) => Some(p),
            _ => None,
        }
    }
}

/// A host and port as written: an IP address, or a name `config` resolves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HostPort {
    Addr(SocketAddr),
    Name { host: String, port: u16 },
}

/// An address as `--listen` writes it, before names are resolved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AddressArg {
    Tcp(HostPort),
    Udp(HostPort),
    Unix(PathBuf),
}

/// `--user NAME|UID` or `--group NAME|GID`, before the lookup.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Principal {
    Name(String),
    Id(u32),
}

impl fmt::Display for Principal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Principal::Name(n) => f.write_str(n),
            Principal::Id(id) => write!(f, "{id}"),
        }
    }
}

/// `?mode=0660&owner=USER:GROUP` of a unix socket nogap binds.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UnixOptionsArg {
    pub mode: Option<u32>,
    pub user: Option<Principal>,
    pub group: Option<Principal>,
}

/// One `--listen [NAME=]ADDR`, as written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListenArg {
    /// The text as given, for error messages.
    pub text: String,
    pub name: Option<String>,
    pub address: AddressArg,
    pub unix: UnixOptionsArg,
}

/// When a new worker counts as ready.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadyMode {
    /// When it sends `READY=1` on its notify socket.
    Notify,
    /// Once it has stayed alive this long (or sent `READY=1` earlier).
    Alive(Duration),
}

/// `--ready`: the worker's own signal, then, optionally, a probe that nogap
/// sends to the starting generation itself (see `probe`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ready {
    pub mode: ReadyMode,
    pub probe: Option<Probe>,
}

/// A check of a starting generation through its own socket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Probe {
    pub check: Check,
    /// Probe from the start and again until it passes (the bare form,
    /// `http:PATH` or `tcp`, the only sign of readiness). After `READY=1`
    /// or the alive time, the first answer decides.
    pub retry: bool,
}

/// `--canary PCT:DURATION`: a new generation that is ready first gets
/// `percent`% of new connections for `duration`, then all (see
/// `policy::canary`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Canary {
    /// 1 to 99.
    pub percent: u8,
    pub duration: Duration,
}

impl std::fmt::Display for Canary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let d = humantime::format_duration(self.duration);
        write!(f, "{}%:{d}", self.percent)
    }
}

/// `10%:30s` or `10:30s`: a percentage from 1 to 99, and a duration.
pub fn parse_canary(s: &str) -> Result<Canary, String> {
    let expected = "expected PCT:DURATION, a percentage from 1 to 99 and a duration (e.g. 10%:30s)";
    let Some((pct, d)) = s.split_once(':') else {
        return Err(expected.to_string());
    };
    let percent = pct
        .strip_suffix('%')
        .unwrap_or(pct)
        .parse::<u8>()
        .ok()
        .filter(|p| (1..=99).contains(p))
        .ok_or_else(|| format!("{pct}: {expected}"))?;
    let duration = parse_duration(d).map_err(|e| format!("{d}: {e}"))?;
    if duration.is_zero() {
        return Err(format!("{d}: {expected}"));
    }
    Ok(Canary { percent, duration })
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Check {
    /// A connection a worker accepts.
    Tcp,
    /// `GET PATH` answered with a 2xx status.
    Http { path: String },
}

impl fmt::Display for Check {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Check::Tcp => write!(f, "tcp"),
            Check::Http { path } => write!(f, "GET {path}"),
        }
    }
}

/// How a worker is asked to stop, and how long it gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StopPolicy {
    pub signal: Signal,
    pub grace: Duration,
}

/// `--start-limit N --start-limit-interval DUR`: nogap gives up when one
/// slot of the first generation failed to start `burst` times within
/// `interval` (systemd's `StartLimitBurst=` / `StartLimitIntervalSec=`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StartLimit {
    pub burst: u32,
    pub interval: Duration,
}

/// `--handover`: how reloads hand TCP sockets over (see `sockets::steer`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Handover {
    Steer,
    Shared,
}

/// `--worker-output`: where workers' stdout and stderr go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WorkerOutput {
    /// Capture under journald, inherit otherwise.
    Auto,
    /// The workers share nogap's stdout and stderr.
    Inherit,
    /// Through a pipe, line by line, with the worker's name (`worker::output`).
    Capture,
}

/// A socket-passing convention besides systemd's, chosen with `--fds-as`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum HandOff {
    /// `LISTEN_FDS`/`LISTEN_PID`/`LISTEN_FDNAMES` only (always set anyway).
    Systemd,
    /// `EINHORN_FD_COUNT`, `EINHORN_FD_<i>`, `EINHORN_FDS`,
    /// `EINHORN_MASTER_PID`, `EINHORN_CHILD_INDEX`.
    Einhorn,
    /// `SERVER_STARTER_PORT` (`host:port=fd;path=fd`) and
    /// `SERVER_STARTER_GENERATION`, as Server::Starter sets them.
    ServerStarter,
    /// `NGINX=fd;fd;`, the variable nginx reads on binary upgrade.
    Nginx,
}

impl HandOff {
    pub const ALL: [HandOff; 4] = [
        HandOff::Systemd,
        HandOff::Einhorn,
        HandOff::ServerStarter,
        HandOff::Nginx,
    ];

    pub fn name(self) -> &'static str {
        match self {
            HandOff::Systemd => "systemd",
            HandOff::Einhorn => "einhorn",
            HandOff::ServerStarter => "server-starter",
            HandOff::Nginx => "nginx",
        }
    }
}

impl fmt::Display for HandOff {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

// ---- parsers ------------------------------------------------------------------

/// `--fds-as`: `systemd`, `einhorn`, `server-starter` or `nginx`.
pub fn parse_handoff(s: &str) -> Result<HandOff, String> {
    HandOff::ALL
        .into_iter()
        .find(|h| h.name() == s)
        .ok_or_else(|| "expected systemd, einhorn, server-starter or nginx".to_string())
}

/// `--handover`: `steer` or `shared`.
pub fn parse_handover(s: &str) -> Result<Handover, String> {
    match s {
        "steer" => Ok(Handover::Steer),
        "shared" => Ok(Handover::Shared),
        _ => Err("expected steer or shared".into()),
    }
}

pub fn parse_worker_output(s: &str) -> Result<WorkerOutput, String> {
    match s {
        "auto" => Ok(WorkerOutput::Auto),
        "inherit" => Ok(WorkerOutput::Inherit),
        "capture" => Ok(WorkerOutput::Capture),
        _ => Err("expected auto, inherit or capture".into()),
    }
}

/// `--metrics`: an IP address and a port, e.g. `127.0.0.1:9464`, `[::1]:9464`.
pub fn parse_metrics_addr(s: &str) -> Result<std::net::SocketAddr, String> {
    s.parse().map_err(|_| {
        format!(
            "'{}' is not IP:PORT (e.g. 127.0.0.1:9464 or [::]:9464)",
            truncate(s)
        )
    })
}

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

/// `--ready`: `notify`, `alive:DURATION`, a probe alone (`http:PATH`,
/// `tcp`), or a signal then a probe (`notify+http:/healthz`, `alive:2s+tcp`).
pub fn parse_ready_probe(s: &str) -> Result<Ready, String> {
    let probe = |p: &str, retry: bool| -> Result<Option<Probe>, String> {
        let check = match p.split_once(':') {
            None if p == "tcp" => Check::Tcp,
            Some(("http", path)) => {
                let ok = path.starts_with('/')
                    && path.len() <= 1024
                    && path.bytes().all(|b| b.is_ascii_graphic());
                if !ok {
                    return Err(format!(
                        "http:{path}: the path must start with '/' and have no spaces or control characters (e.g. http:/healthz)"
                    ));
                }
                Check::Http {
                    path: path.to_string(),
                }
            }
            _ => return Err(format!("'{p}': expected a probe, 'http:PATH' or 'tcp'")),
        };
        Ok(Some(Probe { check, retry }))
    };
    let expected = "expected 'notify', 'alive:DURATION', 'http:PATH', 'tcp', or one of the first two, '+', then a probe (e.g. notify+http:/healthz)";
    match s.split_once('+') {
        Some((mode, p)) => Ok(Ready {
            mode: parse_ready(mode).map_err(|_| expected.to_string())?,
            probe: probe(p, false)?,
        }),
        None if s == "tcp" || s.starts_with("http:") => Ok(Ready {
            mode: ReadyMode::Alive(Duration::ZERO),
            probe: probe(s, true)?,
        }),
        None => Ok(Ready {
            mode: parse_ready(s).map_err(|_| expected.to_string())?,
            probe: None,
        }),
    }
}

/// `NAME` or a numeric id.
pub fn parse_principal(s: &str) -> Result<Principal, String> {
    if let Ok(id) = s.parse::<u32>() {
        return Ok(Principal::Id(id));
    }
    let ok =
        !s.is_empty() && s.len() <= 256 && s.bytes().all(|b| b.is_ascii_graphic() && b != b':');
    if ok {
        Ok(Principal::Name(s.to_string()))
    } else {
        Err("expected a name or a numeric id".to_string())
    }
}

/// `KEY=VALUE`; the key is not empty and has no `=`.
pub fn parse_env(s: &str) -> Result<(std::ffi::OsString, std::ffi::OsString), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() && !k.contains('\0') && !v.contains('\0') => {
            Ok((k.into(), v.into()))
        }
        _ => Err("expected KEY=VALUE".to_string()),
    }
}

/// A file mode or umask in octal: `022`, `0660` or `0o027`, at most 0777.
pub fn parse_octal_mode(s: &str) -> Option<u32> {
    let digits = s.strip_prefix("0o").unwrap_or(s);
    u32::from_str_radix(digits, 8)
        .ok()
        .filter(|m| *m <= 0o777 && !digits.is_empty())
}

/// `--umask`: an octal mode like `022` or `0o027`.
pub fn parse_umask(s: &str) -> Result<u32, String> {
    parse_octal_mode(s)
        .ok_or_else(|| "expected an octal mode from 000 to 777, e.g. 027".to_string())
}

/// `[NAME=]ADDR` where ADDR is `HOST:PORT`, `tcp://HOST:PORT`, `[::]:PORT`,
/// `udp://HOST:PORT` or `unix:/path[?mode=0660&owner=USER:GROUP]`.
pub fn parse_listen(s: &str) -> Result<ListenArg, String> {
    let (name, addr) = match s.split_once('=') {
        Some((name, addr)) if !name.contains([':', '/']) => (Some(name), addr),
        _ => (None, s),
    };
    let (addr, unix) = match addr.split_once('?') {
        Some((a, query)) if a.starts_with("unix:") => (a, parse_unix_options(query)?),
        _ => (addr, UnixOptionsArg::default()),
    };
    let address = parse_address(addr)?;
    if let Some(n) = name {
        check_fd_name(n)?;
    }
    Ok(ListenArg {
        text: s.to_string(),
        name: name.map(str::to_string),
        address,
        unix,
    })
}

/// `mode=0660&owner=www-data:www-data`.
fn parse_unix_options(query: &str) -> Result<UnixOptionsArg, String> {
    let mut o = UnixOptionsArg::default();
    for kv in query.split('&') {
        match kv.split_once('=') {
            Some(("mode", m)) => {
                o.mode = Some(
                    parse_octal_mode(m)
                        .ok_or_else(|| format!("bad mode '{m}': expected octal, e.g. 0660"))?,
                );
            }
            Some(("owner", owner)) => {
                let (user, group) = match owner.split_once(':') {
                    Some((u, g)) => (u, Some(g)),
                    None => (owner, None),
                };
                let bad = |e: String| format!("bad owner '{owner}': {e}");
                if !user.is_empty() {
                    o.user = Some(parse_principal(user).map_err(bad)?);
                }
                if let Some(g) = group.filter(|g| !g.is_empty()) {
                    o.group = Some(parse_principal(g).map_err(bad)?);
                }
                if o.user.is_none() && o.group.is_none() {
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

fn parse_address(s: &str) -> Result<AddressArg, String> {
    if let Some(path) = s.strip_prefix("unix:") {
        let path = path.strip_prefix("//").unwrap_or(path);
        if !path.starts_with('/') {
            return Err("a unix socket path must be absolute, e.g. unix:/run/app.sock".into());
        }
        return Ok(AddressArg::Unix(PathBuf::from(path)));
    }
    if let Some(rest) = s.strip_prefix("udp://") {
        return parse_host_port(rest).map(AddressArg::Udp);
    }
    let rest = s.strip_prefix("tcp://").unwrap_or(s);
    if rest.contains("://") {
        return Err("unknown scheme; use tcp://, udp:// or unix:".into());
    }
    parse_host_port(rest).map(AddressArg::Tcp)
}

fn parse_host_port(s: &str) -> Result<HostPort, String> {
    let bad = || "expected HOST:PORT, e.g. 127.0.0.1:8080, [::]:8080 or localhost:8080".to_string();
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(HostPort::Addr(a));
    }
    // A bare ":PORT" means every IPv4 and IPv6 address.
    if let Some(port) = s.strip_prefix(':') {
        let port: u16 = port.parse().map_err(|_| bad())?;
        return Ok(HostPort::Addr(SocketAddr::from((
            std::net::Ipv6Addr::UNSPECIFIED,
            port,
        ))));
    }
    let (host, port) = s.rsplit_once(':').ok_or_else(bad)?;
    let port: u16 = port.parse().map_err(|_| bad())?;
    if host.is_empty() || host.contains([' ', '/', '[', ']']) {
        return Err(bad());
    }
    Ok(HostPort::Name {
        host: host.to_string(),
        port,
    })
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

/// An instance name (`nogap@NAME`): what a file name and a systemd
/// instance can both be.
pub fn parse_instance(s: &str) -> Result<String, String> {
    let ok = !s.is_empty()
        && s.len() <= 64
        && !s.starts_with('.')
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.@".contains(&b));
    if ok {
        Ok(s.to_string())
    } else {
        Err("expected an instance name: letters, digits, '-', '_', '.' (as in nogap@NAME)".into())
    }
}

/// At most the first 80 characters of `s`, for logging untrusted text.
pub fn truncate(s: &str) -> &str {
    match s.char_indices().nth(80) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp(s: &str) -> AddressArg {
        AddressArg::Tcp(HostPort::Addr(s.parse().unwrap()))
    }

    #[test]
    fn listen_forms() {
        let l = parse_listen("web=127.0.0.1:8080").unwrap();
        assert_eq!(l.name.as_deref(), Some("web"));
        assert_eq!(l.address, tcp("127.0.0.1:8080"));
        let l = parse_listen("tcp://[::1]:80").unwrap();
        assert_eq!(l.name, None);
        assert!(matches!(
            parse_listen("udp://127.0.0.1:53").unwrap().address,
            AddressArg::Udp(_)
        ));
        let l = parse_listen("api=unix:/run/x.sock").unwrap();
        assert_eq!(l.address, AddressArg::Unix("/run/x.sock".into()));
        assert_eq!(l.name.as_deref(), Some("api"));
        assert_eq!(
            parse_listen("localhost:80").unwrap().address,
            AddressArg::Tcp(HostPort::Name {
                host: "localhost".into(),
                port: 80
            })
        );
        assert_eq!(parse_listen(":80").unwrap().address, tcp("[::]:80"));
        assert!(parse_listen("127.0.0.1").is_err());
        assert!(parse_listen("127.0.0.1:99999").is_err());
        assert!(parse_listen("unix:relative.sock").is_err());
        assert!(parse_listen("http://1.2.3.4:80").is_err());
        assert!(parse_listen("a b=127.0.0.1:1").is_err());
        let l = parse_listen("api=unix:/run/x.sock?mode=0660&owner=root:0").unwrap();
        assert_eq!(
            l.unix,
            UnixOptionsArg {
                mode: Some(0o660),
                user: Some(Principal::Name("root".into())),
                group: Some(Principal::Id(0)),
            }
        );
        assert_eq!(
            parse_listen("unix:/a?owner=:0").unwrap().unix.group,
            Some(Principal::Id(0))
        );
        assert!(parse_listen("unix:/a?mode=999").is_err());
        assert!(parse_listen("unix:/a?owner=:").is_err());
        assert!(parse_listen("unix:/a?color=red").is_err());
        assert!(parse_listen("127.0.0.1:80?mode=0660").is_err());
    }

    #[test]
    fn durations_signals_ready_modes() {
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
        let r = parse_ready_probe("notify+http:/healthz?x=1").unwrap();
        assert_eq!(r.mode, ReadyMode::Notify);
        let http = Check::Http {
            path: "/healthz?x=1".into(),
        };
        assert_eq!(
            r.probe,
            Some(Probe {
                check: http,
                retry: false
            })
        );
        let r = parse_ready_probe("tcp").unwrap();
        assert_eq!(r.mode, ReadyMode::Alive(Duration::ZERO));
        assert!(r.probe.is_some_and(|p| p.retry && p.check == Check::Tcp));
        let r = parse_ready_probe("alive:2s+tcp").unwrap();
        assert_eq!(r.mode, ReadyMode::Alive(Duration::from_secs(2)));
        assert!(r.probe.is_some_and(|p| !p.retry));
        assert_eq!(parse_ready_probe("notify").unwrap().probe, None);
        for bad in [
            "http:healthz",
            "http:/a b",
            "notify+udp",
            "nope+tcp",
            "notify+",
            "x",
        ] {
            assert!(parse_ready_probe(bad).is_err(), "{bad}");
        }
        let c = parse_canary("10%:30s").unwrap();
        assert_eq!((c.percent, c.duration), (10, Duration::from_secs(30)));
        assert_eq!(parse_canary("99:1m").unwrap().percent, 99);
        assert_eq!(parse_canary("1%:500ms").unwrap().to_string(), "1%:500ms");
        for bad in [
            "0%:1s", "100%:1s", "abc", "10%", "10%:x", "10%:0s", "-5:1s", ":1s",
        ] {
            assert!(parse_canary(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_umask("027"), Ok(0o027));
        assert_eq!(parse_umask("0o777"), Ok(0o777));
        assert!(parse_umask("1000").is_err());
        assert!(parse_umask("").is_err());
        assert!(parse_umask("8").is_err());
        assert_eq!(parse_handoff("server-starter"), Ok(HandOff::ServerStarter));
        assert!(parse_handoff("inetd").is_err());
        assert_eq!(parse_principal("0"), Ok(Principal::Id(0)));
        assert!(parse_principal("a:b").is_err());
    }

    #[test]
    fn endpoints() {
        let e = Endpoint::Tcp("127.0.0.1:8080".parse().unwrap());
        assert_eq!(e.to_string(), "tcp://127.0.0.1:8080");
        assert_eq!(e.default_name(), "tcp-127.0.0.1-8080");
        assert!(e.listens());
        let u = Endpoint::UnixDatagram("/run/a".into());
        assert_eq!(u.to_string(), "unix:/run/a");
        assert!(!u.listens());
        assert_eq!(
            Endpoint::Tcp("[::1]:80".parse().unwrap()).default_name(),
            "tcp-::1-80"
        );
    }
}
