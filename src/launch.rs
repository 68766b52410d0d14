//! How each worker process is launched: hand-off forms, user and groups,
//! working directory, environment, fd limit, umask and, for a server that
//! daemonizes, its pid file.
//!
//! Everything is resolved once at start-up, before any fork: user and group
//! names become ids (supplementary groups from `getgrouplist`), the working
//! directory is checked, the fd limit is computed. The result is the
//! [`Launch`] the supervisor applies to every worker (see
//! [`Launch::process_settings`] and `sys::ProcessSettings`).

use std::ffi::{CString, OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::unistd::{Gid, Group, Uid, User};

use crate::cli::WorkerArgs;
use crate::error::Error;
use crate::handoff::{self, HandOff};
use crate::sys::{Credentials, ProcessSettings};

/// Variables nogap sets for every worker; `--env` cannot override them.
pub const RESERVED_VARS: &[&str] = &[
    "LISTEN_PID",
    "LISTEN_FDS",
    "LISTEN_FDNAMES",
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "NOGAP_GENERATION",
    "NOGAP_WORKER",
];

/// `--user NAME|UID`, looked up in the user database.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UserSpec {
    pub name: String,
    pub uid: u32,
    /// The primary group, if the user has a database entry.
    pub gid: Option<u32>,
    pub home: Option<PathBuf>,
}

/// `--group NAME|GID`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GroupSpec {
    pub gid: u32,
}

/// Everything that shapes a worker process, resolved.
#[derive(Clone, Debug)]
pub struct Launch {
    /// Forms besides systemd's (`--fds-as`), without duplicates.
    pub fds_as: Vec<HandOff>,
    /// Whether workers get LISTEN_FDS, LISTEN_FDNAMES and LISTEN_PID: yes,
    /// unless the command line passes fds by template and `--fds-as
    /// systemd` is not given (see `handoff`).
    pub listen_fds: bool,
    pub user: Option<UserSpec>,
    pub credentials: Credentials,
    pub chdir: Option<PathBuf>,
    /// `--env K=V`, in order; values may hold templates (see `handoff`).
    pub env: Vec<(OsString, OsString)>,
    pub env_clear: bool,
    /// RLIMIT_NOFILE (soft and hard) every worker gets.
    pub nofile: u64,
    pub umask: Option<libc::mode_t>,
    /// The pid file of a daemonizing server (a template).
    pub pidfile: Option<OsString>,
}

impl Launch {
    /// Resolve and check `--user`, `--group`, `--chdir`, `--env`,
    /// `--nofile` and `--pidfile`. Errors are usage errors naming the value.
    pub fn from_args(args: &WorkerArgs, workers: u32, argv: &[OsString]) -> Result<Launch, Error> {
        let usage = |m: String| Error::Usage(m);
        let mut fds_as = Vec::new();
        for m in &args.fds_as {
            if !fds_as.contains(m) && *m != HandOff::Systemd {
                fds_as.push(*m);
            }
        }
        let listen_fds = args.fds_as.contains(&HandOff::Systemd)
            || !argv.iter().any(|a| handoff::has_fd_template(a));
        let credentials = credentials(args.user.as_ref(), args.group)?;
        if let Some(dir) = &args.chdir {
            if !dir.is_dir() {
                return Err(usage(format!(
                    "--chdir {}: no such directory",
                    dir.display()
                )));
            }
        }
        for (k, _) in &args.env {
            if let Some(r) = RESERVED_VARS.iter().find(|r| OsStr::new(r) == k) {
                return Err(usage(format!("--env {r}=...: nogap sets {r} itself")));
            }
        }
        let nofile = nofile(args.nofile)?;
        if let Some(p) = &args.pidfile {
            let path = Path::new(p);
            if !path.is_absolute() {
                return Err(usage(format!(
                    "--pidfile {}: the path must be absolute",
                    path.display()
                )));
            }
            if workers > 1 && !p.as_bytes().windows(8).any(|w| w == b"{worker}") {
                return Err(usage(format!(
                    "--pidfile {}: with --workers {workers} the path must contain {{worker}}",
                    path.display()
                )));
            }
        }
        Ok(Launch {
            fds_as,
            listen_fds,
            user: args.user.clone(),
            credentials,
            chdir: args.chdir.clone(),
            env: args.env.clone(),
            env_clear: args.env_clear,
            nofile,
            umask: args.umask,
            pidfile: args.pidfile.clone(),
        })
    }

    /// Check the templates in `argv`, `--env` and `--pidfile`, and that the
    /// `--fds-as` forms can pass every socket.
    pub fn check(&self, argv: &[OsString], sockets: &[handoff::Socket]) -> Result<(), Error> {
        let texts = argv
            .iter()
            .chain(self.env.iter().map(|(_, v)| v))
            .chain(self.pidfile.iter())
            .map(|s| s.as_os_str());
        handoff::check(&self.fds_as, texts, sockets).map_err(Error::Usage)
    }

    /// What `sys` applies in the child between fork and exec.
    pub fn process_settings(&self) -> ProcessSettings {
        ProcessSettings {
            credentials: self.credentials.clone(),
            chdir: self.chdir.clone(),
            umask: self.umask,
            nofile: Some(self.nofile),
            no_listen_pid: !self.listen_fds,
        }
    }

    /// `USER`, `LOGNAME` and `HOME` of `--user`, as login and systemd's
    /// `User=` set them.
    pub fn user_env(&self) -> Vec<(OsString, OsString)> {
        let Some(u) = &self.user else {
            return Vec::new();
        };
        let mut env = vec![
            ("USER".into(), u.name.clone().into()),
            ("LOGNAME".into(), u.name.clone().into()),
        ];
        if let Some(home) = &u.home {
            env.push(("HOME".into(), home.clone().into()));
        }
        env
    }
}

/// Set `key` to `value` in `env`, replacing an earlier value.
pub fn set_var(env: &mut Vec<(OsString, OsString)>, key: OsString, value: OsString) {
    match env.iter_mut().find(|(k, _)| *k == key) {
        Some(slot) => slot.1 = value,
        None => env.push((key, value)),
    }
}

fn credentials(user: Option<&UserSpec>, group: Option<GroupSpec>) -> Result<Credentials, Error> {
    if user.is_none() && group.is_none() {
        return Ok(Credentials::default());
    }
    let gid = match (group, user) {
        (Some(g), _) => g.gid,
        (None, Some(u)) => u.gid.ok_or_else(|| {
            Error::Usage(format!(
                "--user {}: no such user in the user database; give --group too",
                u.name
            ))
        })?,
        (None, None) => unreachable!("one of them is set"),
    };
    let groups = match user {
        Some(u) if u.gid.is_some() => {
            let name = CString::new(u.name.as_str())
                .map_err(|_| Error::Usage(format!("--user {}: bad name", u.name)))?;
            nix::unistd::getgrouplist(&name, Gid::from_raw(gid))
                .map_err(|e| {
                    Error::Usage(format!("--user {}: cannot list its groups: {e}", u.name))
                })?
                .into_iter()
                .map(Gid::as_raw)
                .collect()
        }
        _ => vec![gid],
    };
    let uid = user.map(|u| u.uid);
    let (euid, egid) = (Uid::effective(), Gid::effective());
    if !euid.is_root() {
        if uid.unwrap_or(euid.as_raw()) == euid.as_raw() && gid == egid.as_raw() {
            return Ok(Credentials::default());
        }
        return Err(Error::Usage(format!(
            "--user/--group: nogap runs as uid {euid}, only root can run workers as another user or group"
        )));
    }
    Ok(Credentials {
        uid,
        gid: Some(gid),
        groups,
    })
}

/// The fd limit for workers: `--nofile N`, or nogap's hard limit.
fn nofile(requested: Option<u64>) -> Result<u64, Error> {
    let (_, hard) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map_err(|e| Error::system("cannot read RLIMIT_NOFILE", e.into()))?;
    let Some(n) = requested else {
        return Ok(hard);
    };
    if n > hard {
        let nr_open: u64 = std::fs::read_to_string("/proc/sys/fs/nr_open")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(1 << 20);
        if !Uid::effective().is_root() {
            return Err(Error::Usage(format!(
                "--nofile {n}: above the hard limit {hard}, which only root can raise"
            )));
        }
        if n > nr_open {
            return Err(Error::Usage(format!(
                "--nofile {n}: above the kernel's maximum fs.nr_open = {nr_open}"
            )));
        }
    }
    Ok(n)
}

// ---- value parsers (used by clap) -------------------------------------------

/// `NAME` or `UID`.
pub fn parse_user(s: &str) -> Result<UserSpec, String> {
    let found = match s.parse::<u32>() {
        Ok(uid) => User::from_uid(Uid::from_raw(uid)),
        Err(_) => User::from_name(s),
    }
    .map_err(|e| format!("cannot look up user: {e}"))?;
    match (found, s.parse::<u32>()) {
        (Some(u), _) => Ok(UserSpec {
            name: u.name,
            uid: u.uid.as_raw(),
            gid: Some(u.gid.as_raw()),
            home: Some(u.dir),
        }),
        (None, Ok(uid)) => Ok(UserSpec {
            name: s.to_string(),
            uid,
            gid: None,
            home: None,
        }),
        (None, Err(_)) => Err("no such user".to_string()),
    }
}

/// `NAME` or `GID`.
pub fn parse_group(s: &str) -> Result<GroupSpec, String> {
    if let Ok(gid) = s.parse::<u32>() {
        return Ok(GroupSpec { gid });
    }
    match Group::from_name(s) {
        Ok(Some(g)) => Ok(GroupSpec {
            gid: g.gid.as_raw(),
        }),
        Ok(None) => Err("no such group".to_string()),
        Err(e) => Err(format!("cannot look up group: {e}")),
    }
}

/// `KEY=VALUE`; the key is not empty and has no `=`.
pub fn parse_env(s: &str) -> Result<(OsString, OsString), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() && !k.contains('\0') && !v.contains('\0') => {
            Ok((k.into(), v.into()))
        }
        _ => Err("expected KEY=VALUE".to_string()),
    }
}

/// An octal mode like `022` or `0o027`.
pub fn parse_umask(s: &str) -> Result<libc::mode_t, String> {
    let digits = s.strip_prefix("0o").unwrap_or(s);
    match libc::mode_t::from_str_radix(digits, 8) {
        Ok(m) if m <= 0o777 && !digits.is_empty() => Ok(m),
        _ => Err("expected an octal mode from 000 to 777, e.g. 027".to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn value_parsers() {
        let root = parse_user("root").unwrap();
        assert_eq!((root.uid, root.gid), (0, Some(0)));
        assert_eq!(parse_user("0").unwrap().name, "root");
        let anon = parse_user("4000123").unwrap();
        assert_eq!((anon.uid, anon.gid), (4000123, None));
        assert_eq!(parse_user("no-such-user-here").unwrap_err(), "no such user");
        assert_eq!(parse_group("root").unwrap().gid, 0);
        assert_eq!(parse_group("123").unwrap().gid, 123);
        assert!(parse_group("no-such-group-here").is_err());
        assert_eq!(
            parse_env("A=b=c").unwrap(),
            (OsString::from("A"), OsString::from("b=c"))
        );
        assert_eq!(parse_env("A=").unwrap().1, OsString::new());
        assert!(parse_env("=x").is_err());
        assert!(parse_env("A").is_err());
        assert_eq!(parse_umask("022").unwrap(), 0o22);
        assert_eq!(parse_umask("0o027").unwrap(), 0o27);
        assert!(parse_umask("999").is_err());
        assert!(parse_umask("1777").is_err());
        assert!(parse_umask("").is_err());
    }

    #[test]
    fn set_var_replaces() {
        let mut env = vec![("A".into(), "1".into()), ("B".into(), "2".into())];
        set_var(&mut env, "A".into(), "3".into());
        set_var(&mut env, "C".into(), "4".into());
        assert_eq!(
            env,
            vec![
                ("A".into(), "3".into()),
                ("B".into(), "2".into()),
                ("C".into(), "4".into())
            ]
        );
    }

    #[test]
    fn nofile_defaults_to_the_hard_limit() {
        let (_, hard) =
            nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).unwrap();
        assert_eq!(nofile(None).unwrap(), hard);
        assert_eq!(nofile(Some(64)).unwrap(), 64);
    }
}
