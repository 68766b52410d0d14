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
use std::os::unix::ffi::{OsStrExt, OsStringExt};

use crate::spec::template::{scan, Token};
use crate::spec::{Endpoint, HandOff};

/// One socket as the worker sees it: its fd is `3 + index`.
#[derive(Clone, Debug)]
pub struct Socket {
    pub name: String,
    pub endpoint: Endpoint,
}

impl Socket {
    pub fn new(name: &str, endpoint: &Endpoint) -> Socket {
        Socket {
            name: name.to_string(),
            endpoint: endpoint.clone(),
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
        (HandOff::Nginx, Endpoint::UnixUnnamed { .. }) => {
            Some("nginx only inherits unix sockets that have a path (not abstract or unnamed ones)")
        }
        (HandOff::ServerStarter, Endpoint::Udp(_)) => {
            Some("SERVER_STARTER_PORT has no form for UDP sockets")
        }
        (HandOff::ServerStarter, Endpoint::UnixUnnamed { .. }) => {
            Some("SERVER_STARTER_PORT needs a path for a unix socket")
        }
        (HandOff::ServerStarter, Endpoint::Unix(p) | Endpoint::UnixDatagram(p))
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
                            Endpoint::Unix(p) | Endpoint::UnixDatagram(p) => {
                                p.to_string_lossy().into_owned()
                            }
                            Endpoint::Udp(_) | Endpoint::UnixUnnamed { .. } => return None,
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
    scan(text, |token| value(token, sockets, worker)).map(OsString::from_vec)
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

/// What a template stands for in this worker.
fn value(token: Token<'_>, sockets: &[Socket], worker: &WorkerInfo) -> Result<String, String> {
    match token {
            Token::OnlyFd if sockets.len() == 1 => Ok(FIRST_FD.to_string()),
            Token::OnlyFd => Err(format!(
                "template {{fd}} needs exactly one socket, there are {}: use {{fd:NAME}} with one of {}",
                sockets.len(),
                names(sockets)
            )),
            Token::Fd(name) => sockets
                .iter()
                .position(|s| s.name.as_bytes() == name)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::template::has_fd_template;

    fn sockets() -> Vec<Socket> {
        vec![
            Socket {
                name: "http".into(),
                endpoint: Endpoint::Tcp("127.0.0.1:8080".parse().unwrap()),
            },
            Socket {
                name: "api".into(),
                endpoint: Endpoint::Unix("/run/app/api.sock".into()),
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
            endpoint: Endpoint::UnixUnnamed { datagram: false },
        }];
        let e = check(&[HandOff::Nginx], none, &abstract_).unwrap_err();
        assert!(
            e.starts_with("--fds-as nginx cannot pass socket 'priv'"),
            "{e}"
        );
        let odd = [Socket {
            name: "odd".into(),
            endpoint: Endpoint::Unix("/tmp/a=b.sock".into()),
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
    }
}
