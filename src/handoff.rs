//! How a worker learns which of its fds are which sockets.
//!
//! Every worker gets nogap's sockets as fds 3, 4, ... (in nogap's socket
//! order) and the systemd variables `LISTEN_FDS`, `LISTEN_FDNAMES` and
//! `LISTEN_PID`. Most servers do not read those, so on top of them:
//!
//! * `--fds-as MODE` (repeatable) adds the variables another ecosystem uses:
//!   [`HandOff::Einhorn`], [`HandOff::ServerStarter`], [`HandOff::Nginx`].
//! * Templates in the command line (and in `--env` values and `--pidfile`)
//!   are replaced per worker: `{fd}` (the fd of the only socket),
//!   `{fd:NAME}` (the fd of socket NAME), `{generation}`, `{worker}` (the
//!   slot, 0..N). `{{fd}}` stands for a literal `{fd}`; any other text in
//!   braces is left alone.
//!
//! When the command line passes an fd by template, the systemd variables are
//! left out (unless `--fds-as systemd` is given): a server that reads both
//! takes the socket twice — gunicorn with `--bind fd://3` and `LISTEN_FDS=1`
//! closes fd 3 after its first use and fails on the second with EBADF.
//!
//! [`check`] runs at start-up (a template naming an unknown socket, or a
//! socket a form cannot express, is a usage error); [`render`] runs for each
//! worker and is pure, so both are unit-tested here.

use std::ffi::{OsStr, OsString};
use std::fmt;
use std::net::SocketAddr;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::PathBuf;

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

/// `--fds-as` value parser: `systemd`, `einhorn`, `server-starter` or `nginx`.
pub fn parse_handoff(s: &str) -> Result<HandOff, String> {
    HandOff::ALL
        .into_iter()
        .find(|h| h.name() == s)
        .ok_or_else(|| "expected systemd, einhorn, server-starter or nginx".to_string())
}

/// Where a socket is bound, as far as the hand-off forms care.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    Tcp(SocketAddr),
    Udp(SocketAddr),
    /// A unix socket with a path in the file system.
    UnixPath(PathBuf),
    /// A unix socket without a path: abstract (`@name`) or unnamed.
    UnixOther,
}

/// One socket as the worker sees it: its fd is `3 + index`.
#[derive(Clone, Debug)]
pub struct Socket {
    pub name: String,
    pub endpoint: Endpoint,
}

impl Socket {
    /// A socket nogap holds.
    pub fn of_listener(l: &crate::sockets::Listener) -> Socket {
        use crate::sockets::Kind;
        let endpoint = match (l.local, l.kind) {
            (Some(a), Kind::Listener) => Endpoint::Tcp(a),
            (Some(a), Kind::Datagram) => Endpoint::Udp(a),
            (None, _) => match l.address.strip_prefix("unix:") {
                Some(p) if p.starts_with('/') => Endpoint::UnixPath(p.into()),
                _ => Endpoint::UnixOther,
            },
        };
        Socket {
            name: l.name.clone(),
            endpoint,
        }
    }

    /// A socket `--listen` will bind.
    pub fn of_spec(spec: &crate::config::ListenSpec) -> Socket {
        use crate::config::Address;
        let endpoint = match &spec.address {
            Address::Tcp(a) => Endpoint::Tcp(*a),
            Address::Udp(a) => Endpoint::Udp(*a),
            Address::Unix(p) => Endpoint::UnixPath(p.clone()),
        };
        Socket {
            name: spec.name.clone(),
            endpoint,
        }
    }
}

/// What differs from one worker to the next.
#[derive(Clone, Copy, Debug)]
pub struct WorkerInfo {
    pub generation: u64,
    /// The worker's slot in its generation, 0..workers.
    pub slot: u32,
    /// nogap's pid: the worker's parent.
    pub parent_pid: u32,
}

/// The first fd a worker's sockets occupy.
const FIRST_FD: usize = 3;

/// Check the templates in `texts` and that every form in `modes` can express
/// every socket. The error names the bad value in one line.
pub fn check<'a>(
    modes: &[HandOff],
    texts: impl IntoIterator<Item = &'a OsStr>,
    sockets: &[Socket],
) -> Result<(), String> {
    let dummy = WorkerInfo {
        generation: 1,
        slot: 0,
        parent_pid: 1,
    };
    for text in texts {
        expand(text, sockets, &dummy)?;
    }
    for &mode in modes {
        for s in sockets {
            if let Some(why) = cannot_express(mode, s) {
                return Err(format!(
                    "--fds-as {mode} cannot pass socket '{}': {why}",
                    s.name
                ));
            }
        }
    }
    Ok(())
}

fn cannot_express(mode: HandOff, s: &Socket) -> Option<&'static str> {
    match (mode, &s.endpoint) {
        (HandOff::Nginx, Endpoint::UnixOther) => {
            Some("nginx only inherits unix sockets that have a path (not abstract or unnamed ones)")
        }
        (HandOff::ServerStarter, Endpoint::Udp(_)) => {
            Some("SERVER_STARTER_PORT has no form for UDP sockets")
        }
        (HandOff::ServerStarter, Endpoint::UnixOther) => {
            Some("SERVER_STARTER_PORT needs a path for a unix socket")
        }
        (HandOff::ServerStarter, Endpoint::UnixPath(p))
            if p.as_os_str().as_bytes().iter().any(|b| b";=".contains(b)) =>
        {
            Some("a path with ';' or '=' cannot be written in SERVER_STARTER_PORT")
        }
        _ => None,
    }
}

/// The variables a form adds, in a stable order.
pub fn env_for(
    modes: &[HandOff],
    sockets: &[Socket],
    worker: &WorkerInfo,
) -> Vec<(OsString, OsString)> {
    let fds = || (0..sockets.len()).map(|i| FIRST_FD + i);
    let mut env: Vec<(OsString, OsString)> = Vec::new();
    let mut push = |k: &str, v: String| env.push((k.into(), v.into()));
    for &mode in modes {
        match mode {
            HandOff::Systemd => {}
            HandOff::Einhorn => {
                push("EINHORN_MASTER_PID", worker.parent_pid.to_string());
                push("EINHORN_CHILD_INDEX", worker.slot.to_string());
                push("EINHORN_FD_COUNT", sockets.len().to_string());
                for (i, fd) in fds().enumerate() {
                    push(&format!("EINHORN_FD_{i}"), fd.to_string());
                }
                let all: Vec<String> = fds().map(|fd| fd.to_string()).collect();
                push("EINHORN_FDS", all.join(" "));
            }
            HandOff::ServerStarter => {
                let specs: Vec<String> = sockets
                    .iter()
                    .zip(fds())
                    .filter_map(|(s, fd)| {
                        let what = match &s.endpoint {
                            Endpoint::Tcp(a) => a.to_string(),
                            Endpoint::UnixPath(p) => p.to_string_lossy().into_owned(),
                            Endpoint::Udp(_) | Endpoint::UnixOther => return None,
                        };
                        Some(format!("{what}={fd}"))
                    })
                    .collect();
                push("SERVER_STARTER_PORT", specs.join(";"));
                push("SERVER_STARTER_GENERATION", worker.generation.to_string());
            }
            HandOff::Nginx => {
                let v: String = fds().map(|fd| format!("{fd};")).collect();
                push("NGINX", v);
            }
        }
    }
    env
}

/// Every template in `text` replaced for this worker.
pub fn expand(text: &OsStr, sockets: &[Socket], worker: &WorkerInfo) -> Result<OsString, String> {
    scan(text, |token| token.value(sockets, worker)).map(OsString::from_vec)
}

/// True if `text` passes an fd by template (`{fd}` or `{fd:NAME}`).
pub fn has_fd_template(text: &OsStr) -> bool {
    let mut found = false;
    let _ = scan(text, |token| {
        found |= matches!(token, Token::OnlyFd | Token::Fd(_));
        Ok(String::new())
    });
    found
}

/// `text` with each template replaced by what `value` says.
fn scan(
    text: &OsStr,
    mut value: impl FnMut(Token<'_>) -> Result<String, String>,
) -> Result<Vec<u8>, String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] != b'{' {
            out.push(bytes[i]);
            i += 1;
            continue;
        }
        let rest = &bytes[i..];
        // `{{TOKEN}}`: the token, literally.
        if let Some(inner) = rest.strip_prefix(b"{{") {
            if let Some(end) = find(inner, b"}}") {
                if Token::parse(&inner[..end]).is_some() {
                    out.push(b'{');
                    out.extend_from_slice(&inner[..end]);
                    out.push(b'}');
                    i += 2 + end + 2;
                    continue;
                }
            }
        }
        let Some(end) = find(&rest[1..], b"}") else {
            out.extend_from_slice(rest);
            break;
        };
        match Token::parse(&rest[1..1 + end]) {
            Some(token) => {
                out.extend_from_slice(value(token)?.as_bytes());
                i += end + 2;
            }
            None => {
                out.push(b'{');
                i += 1;
            }
        }
    }
    Ok(out)
}

/// The environment and argv a worker gets on top of nogap's base
/// environment: the forms' variables, then `extra` (`--env`, templated).
pub struct Rendered {
    pub env: Vec<(OsString, OsString)>,
    pub argv: Vec<OsString>,
}

/// [`env_for`] plus the templated argv and `extra` variables.
pub fn render(
    modes: &[HandOff],
    argv: &[OsString],
    extra: &[(OsString, OsString)],
    sockets: &[Socket],
    worker: &WorkerInfo,
) -> Result<Rendered, String> {
    let mut env = env_for(modes, sockets, worker);
    for (k, v) in extra {
        env.push((k.clone(), expand(v, sockets, worker)?));
    }
    let argv = argv
        .iter()
        .map(|a| expand(a, sockets, worker))
        .collect::<Result<_, _>>()?;
    Ok(Rendered { env, argv })
}

enum Token<'a> {
    /// `{fd}`
    OnlyFd,
    /// `{fd:NAME}`
    Fd(&'a [u8]),
    Generation,
    Worker,
}

impl<'a> Token<'a> {
    fn parse(inner: &'a [u8]) -> Option<Token<'a>> {
        match inner {
            b"fd" => Some(Token::OnlyFd),
            b"generation" => Some(Token::Generation),
            b"worker" => Some(Token::Worker),
            _ => inner.strip_prefix(b"fd:").map(Token::Fd),
        }
    }

    fn value(&self, sockets: &[Socket], worker: &WorkerInfo) -> Result<String, String> {
        match self {
            Token::OnlyFd if sockets.len() == 1 => Ok(FIRST_FD.to_string()),
            Token::OnlyFd => Err(format!(
                "template {{fd}} needs exactly one socket, there are {}: use {{fd:NAME}} with one of {}",
                sockets.len(),
                names(sockets)
            )),
            Token::Fd(name) => sockets
                .iter()
                .position(|s| s.name.as_bytes() == *name)
                .map(|i| (FIRST_FD + i).to_string())
                .ok_or_else(|| {
                    format!(
                        "template {{fd:{}}} names no socket; sockets are {}",
                        String::from_utf8_lossy(name),
                        names(sockets)
                    )
                }),
            Token::Generation => Ok(worker.generation.to_string()),
            Token::Worker => Ok(worker.slot.to_string()),
        }
    }
}

fn names(sockets: &[Socket]) -> String {
    if sockets.is_empty() {
        return "(none)".into();
    }
    sockets
        .iter()
        .map(|s| s.name.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sockets() -> Vec<Socket> {
        vec![
            Socket {
                name: "http".into(),
                endpoint: Endpoint::Tcp("127.0.0.1:8080".parse().unwrap()),
            },
            Socket {
                name: "api".into(),
                endpoint: Endpoint::UnixPath("/run/app/api.sock".into()),
            },
            Socket {
                name: "dns".into(),
                endpoint: Endpoint::Udp("[::1]:53".parse().unwrap()),
            },
        ]
    }

    const W: WorkerInfo = WorkerInfo {
        generation: 7,
        slot: 2,
        parent_pid: 100,
    };

    fn x(s: &str, sockets: &[Socket]) -> Result<String, String> {
        expand(OsStr::new(s), sockets, &W).map(|o| o.into_string().unwrap())
    }

    #[test]
    fn templates() {
        let all = sockets();
        assert_eq!(x("fd://{fd:http}", &all).unwrap(), "fd://3");
        assert_eq!(x("{fd:api},{fd:dns}", &all).unwrap(), "4,5");
        assert_eq!(x("--fd={fd}", &all[..1]).unwrap(), "--fd=3");
        assert_eq!(
            x("/run/app/{generation}-{worker}.pid", &all).unwrap(),
            "/run/app/7-2.pid"
        );
        // Escapes and text that is not a template.
        assert_eq!(x("{{fd}}", &all).unwrap(), "{fd}");
        assert_eq!(x("{{fd:nope}}", &all).unwrap(), "{fd:nope}");
        assert_eq!(x("{\"a\":{}}", &all).unwrap(), "{\"a\":{}}");
        assert_eq!(
            x("${HOME} {x} {{y}} {", &all).unwrap(),
            "${HOME} {x} {{y}} {"
        );
        assert_eq!(x("plain", &all).unwrap(), "plain");
        assert!(has_fd_template(OsStr::new("fd://{fd:http}")));
        assert!(has_fd_template(OsStr::new("--fd={fd}")));
        assert!(!has_fd_template(OsStr::new("{{fd}} {generation} {x}")));
    }

    #[test]
    fn template_errors_name_the_value() {
        let all = sockets();
        let e = x("fd://{fd:web}", &all).unwrap_err();
        assert!(
            e.contains("{fd:web}") && e.contains("http, api, dns"),
            "{e}"
        );
        let e = x("{fd}", &all).unwrap_err();
        assert!(e.contains("exactly one socket, there are 3"), "{e}");
        let e = check(&[], [OsStr::new("a"), OsStr::new("{fd:x}")], &all).unwrap_err();
        assert!(e.contains("{fd:x}"), "{e}");
    }

    #[test]
    fn forms() {
        let all = sockets();
        let env = env_for(
            &[HandOff::Einhorn, HandOff::Nginx, HandOff::Systemd],
            &all,
            &W,
        );
        let get = |k: &str| {
            env.iter()
                .find(|(n, _)| n == k)
                .map(|(_, v)| v.to_str().unwrap().to_string())
        };
        assert_eq!(get("EINHORN_FD_COUNT").as_deref(), Some("3"));
        assert_eq!(get("EINHORN_FD_0").as_deref(), Some("3"));
        assert_eq!(get("EINHORN_FD_2").as_deref(), Some("5"));
        assert_eq!(get("EINHORN_FDS").as_deref(), Some("3 4 5"));
        assert_eq!(get("EINHORN_MASTER_PID").as_deref(), Some("100"));
        assert_eq!(get("EINHORN_CHILD_INDEX").as_deref(), Some("2"));
        assert_eq!(get("NGINX").as_deref(), Some("3;4;5;"));
        assert_eq!(get("SERVER_STARTER_PORT"), None);

        let two = &all[..2];
        let env = env_for(&[HandOff::ServerStarter], two, &W);
        assert_eq!(
            env,
            vec![
                (
                    "SERVER_STARTER_PORT".into(),
                    "127.0.0.1:8080=3;/run/app/api.sock=4".into()
                ),
                ("SERVER_STARTER_GENERATION".into(), "7".into()),
            ]
        );
        let v6 = [Socket {
            name: "a".into(),
            endpoint: Endpoint::Tcp("[::]:80".parse().unwrap()),
        }];
        let env = env_for(&[HandOff::ServerStarter], &v6, &W);
        assert_eq!(env[0].1, "[::]:80=3");
        assert!(env_for(&[HandOff::Systemd], &all, &W).is_empty());
    }

    #[test]
    fn what_forms_cannot_express() {
        let all = sockets();
        let none: [&OsStr; 0] = [];
        assert!(check(&[HandOff::Nginx, HandOff::Einhorn], none, &all).is_ok());
        let e = check(&[HandOff::ServerStarter], none, &all).unwrap_err();
        assert!(e.contains("socket 'dns'") && e.contains("UDP"), "{e}");
        let abstract_ = [Socket {
            name: "priv".into(),
            endpoint: Endpoint::UnixOther,
        }];
        let e = check(&[HandOff::Nginx], none, &abstract_).unwrap_err();
        assert!(
            e.starts_with("--fds-as nginx cannot pass socket 'priv'"),
            "{e}"
        );
        let odd = [Socket {
            name: "odd".into(),
            endpoint: Endpoint::UnixPath("/tmp/a=b.sock".into()),
        }];
        assert!(check(&[HandOff::ServerStarter], none, &odd).is_err());
        assert!(check(&[HandOff::Nginx], none, &odd).is_ok());
    }

    #[test]
    fn render_applies_everything() {
        let all = sockets();
        let r = render(
            &[HandOff::Nginx],
            &["gunicorn".into(), "--bind".into(), "fd://{fd:http}".into()],
            &[("APP_FD".into(), "{fd:api}".into())],
            &all,
            &W,
        )
        .unwrap();
        assert_eq!(r.argv, ["gunicorn", "--bind", "fd://3"]);
        assert_eq!(
            r.env,
            vec![
                ("NGINX".into(), "3;4;5;".into()),
                ("APP_FD".into(), "4".into())
            ]
        );
        assert_eq!(parse_handoff("server-starter"), Ok(HandOff::ServerStarter));
        assert!(parse_handoff("upstart").is_err());
    }
}
