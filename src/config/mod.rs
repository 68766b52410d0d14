//! The validated configuration: every check, and the only place that asks
//! the system about what an operator wrote (host names, users and groups,
//! the command, limits, nogap's environment).
//!
//! `cli` gives typed but unresolved values (see `spec`);
//! [`RunConfig::from_args`] resolves and checks them and yields the config
//! the supervisor runs with. A bad value is an [`Error::Usage`] that names
//! it.

use std::ffi::{CString, OsStr, OsString};
use std::net::ToSocketAddrs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::unistd::{Gid, Group, Uid, User};

use crate::cli::{RunArgs, WorkerArgs};
use crate::error::Error;
use crate::spec::template;
use crate::spec::{
    AddressArg, Endpoint, HandOff, Handover, HostPort, ListenArg, Principal, ReadyMode, StartLimit,
    StopPolicy,
};
use crate::sys::{Credentials, ProcessSettings};

pub mod file;
pub mod reload;

/// The protocol variables addressed to a process (sd_listen_fds(3),
/// sd_notify(3), sd_watchdog_enabled(3)): nogap consumes its own and never
/// passes them on; it sets the workers' own.
const PROTOCOL_VARS: &[&str] = &[
    "NOGAP_UPGRADE_FD",
    "LISTEN_PID",
    "LISTEN_FDS",
    "LISTEN_FDNAMES",
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
];

/// Variables nogap sets for every worker besides the protocol ones.
const NOGAP_VARS: &[&str] = &["NOGAP_GENERATION", "NOGAP_WORKER"];

/// nogap's environment, read once at start-up.
#[derive(Clone, Debug)]
pub struct Environment {
    vars: Vec<(OsString, OsString)>,
}

impl Environment {
    pub fn capture() -> Environment {
        Environment {
            vars: std::env::vars_os().collect(),
        }
    }

    /// An environment given explicitly (tests, in-process runs).
    pub fn from_vars(vars: Vec<(OsString, OsString)>) -> Environment {
        Environment { vars }
    }

    /// Every variable, as captured.
    pub fn vars(&self) -> &[(OsString, OsString)] {
        &self.vars
    }

    pub fn get(&self, key: &str) -> Option<&OsString> {
        self.vars.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// What every worker inherits: everything but nogap's own protocol vars.
    pub fn for_workers(&self) -> Vec<(OsString, OsString)> {
        self.vars
            .iter()
            .filter(|(k, _)| !PROTOCOL_VARS.iter().any(|o| k == o))
            .cloned()
            .collect()
    }

    /// systemd's watchdog period for nogap, if it is addressed to nogap.
    pub fn watchdog(&self) -> Option<Duration> {
        let usec: u64 = self.get("WATCHDOG_USEC")?.to_str()?.parse().ok()?;
        if let Some(pid) = self.get("WATCHDOG_PID") {
            if pid.to_str()?.parse::<u32>().ok()? != std::process::id() {
                return None;
            }
        }
        Some(Duration::from_micros(usec)).filter(|d| !d.is_zero())
    }

    /// Where nogap keeps its runtime files (notify sockets, control socket):
    /// systemd's `RUNTIME_DIRECTORY`, else [`Environment::instances_dir`].
    pub fn runtime_base(&self) -> PathBuf {
        if let Some(dir) = self.get("RUNTIME_DIRECTORY") {
            let first = dir
                .to_string_lossy()
                .split(':')
                .next()
                .unwrap_or("")
                .to_string();
            if !first.is_empty() {
                return PathBuf::from(first);
            }
        }
        self.instances_dir()
    }

    /// [`Environment::runtime_base`], made safe to use: when it is the
    /// shared-`/tmp` fallback (`/tmp/nogap-UID`: not root, and neither
    /// `RUNTIME_DIRECTORY` nor `XDG_RUNTIME_DIR`), anyone could have made
    /// it first, so nogap creates it with mode 0700 and refuses it unless
    /// it is a real directory (no symlink) owned by nogap's uid that no one
    /// else can enter ([`private_dir`]).
    pub fn runtime_dir(&self) -> Result<PathBuf, Error> {
        let base = self.runtime_base();
        let shared_tmp = !self.has_runtime_directory()
            && !nix::unistd::geteuid().is_root()
            && self.get("XDG_RUNTIME_DIR").is_none();
        if shared_tmp {
            private_dir(&base)?;
        }
        Ok(base)
    }

    /// Whether nogap's stderr is the journal (`JOURNAL_STREAM` names it).
    pub fn stderr_is_journal(&self) -> bool {
        use std::os::unix::fs::MetadataExt;
        let Some(stream) = self.get("JOURNAL_STREAM").and_then(|s| s.to_str()) else {
            return false;
        };
        let Some((dev, ino)) = stream.split_once(':') else {
            return false;
        };
        let Ok(meta) = std::fs::metadata("/proc/self/fd/2") else {
            return false;
        };
        dev.parse() == Ok(meta.dev()) && ino.parse() == Ok(meta.ino())
    }

    /// Whether systemd gave nogap a runtime directory (a unit's
    /// `RuntimeDirectory=`).
    pub fn has_runtime_directory(&self) -> bool {
        self.get("RUNTIME_DIRECTORY").is_some_and(|d| !d.is_empty())
    }

    /// Where instances keep their runtime directories (`nogap@NAME` uses
    /// `NAME/` below it): `/run/nogap` for root, else
    /// `$XDG_RUNTIME_DIR/nogap`, else `/tmp/nogap-UID`.
    pub fn instances_dir(&self) -> PathBuf {
        if nix::unistd::geteuid().is_root() {
            return PathBuf::from("/run/nogap");
        }
        match self.get("XDG_RUNTIME_DIR") {
            Some(d) => PathBuf::from(d).join("nogap"),
            None => std::env::temp_dir().join(format!("nogap-{}", nix::unistd::geteuid())),
        }
    }
}

/// Make `dir` nogap's private directory, or refuse it: created with mode
/// 0700 if missing; then (without following a symlink) it must be a
/// directory, owned by nogap's effective uid, with no access for group or
/// others. A directory someone else made in a shared place is refused
/// ([`Error::Unsafe`]), never used: its owner could swap in their own
/// notify or control socket.
pub fn private_dir(dir: &Path) -> Result<(), Error> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(Error::system(format!("cannot create {}", dir.display()), e)),
    }
    let meta = std::fs::symlink_metadata(dir)
        .map_err(|e| Error::system(format!("cannot inspect {}", dir.display()), e))?;
    let me = nix::unistd::geteuid().as_raw();
    let refuse = |why: String| {
        Err(Error::Unsafe(format!(
            "refusing runtime directory {}: {why} (remove it, or set RUNTIME_DIRECTORY or XDG_RUNTIME_DIR)",
            dir.display()
        )))
    };
    if !meta.file_type().is_dir() {
        return refuse("not a directory (a symlink?)".into());
    }
    if meta.uid() != me {
        return refuse(format!("owned by uid {}, not nogap's uid {me}", meta.uid()));
    }
    if meta.mode() & 0o077 != 0 {
        return refuse(format!(
            "mode {:04o} lets others in (nogap makes it 0700)",
            meta.mode() & 0o7777
        ));
    }
    Ok(())
}

/// One `--listen`, resolved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListenSpec {
    pub name: String,
    pub endpoint: Endpoint,
    /// `?mode=&owner=` of a unix socket.
    pub unix: UnixOptions,
}

/// Permissions nogap gives a unix socket file it binds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UnixOptions {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
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
    /// `--ready ...+http:PATH`: the check of a starting generation.
    pub probe: Option<crate::spec::Probe>,
    /// `--canary PCT:DURATION`: a reload's progressive hand-over.
    pub canary: Option<crate::spec::Canary>,
    pub start_timeout: Duration,
    /// None: the first generation is retried forever.
    pub start_limit: Option<StartLimit>,
    pub stop: StopPolicy,
    pub command: CommandSpec,
    pub health: HealthConfig,
    pub fd_store: bool,
    /// One SO_REUSEPORT copy of each bound TCP socket per worker slot.
    pub per_worker_sockets: bool,
    /// Where the metrics and health endpoints listen (`--metrics`).
    pub metrics: Option<std::net::SocketAddr>,
    /// Steer new connections to the serving generation's own sockets (see
    /// `sockets::steer`); off with `--handover shared`, `--reuseport` (the
    /// port is shared with others) and `--reuseport-per-worker`.
    pub steer: bool,
    /// Hand-off forms and worker process settings.
    pub launch: Launch,
    /// `--control`, as given.
    pub control: Option<PathBuf>,
    /// `--config`, as given: every reload reads it again (see [`reload`]).
    pub config_file: Option<PathBuf>,
    /// What a reload re-reads the configuration from (see [`reload`]); None:
    /// a reload keeps this configuration.
    pub origin: Option<reload::Origin>,
}

/// Accept-health monitoring (see `monitor`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
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

/// A worker's user, looked up in the user database.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UserSpec {
    pub name: String,
    pub uid: u32,
    /// The primary group, if the user has a database entry.
    pub gid: Option<u32>,
    pub home: Option<PathBuf>,
}

/// Everything that shapes a worker process, resolved.
#[derive(Clone, Debug)]
pub struct Launch {
    /// Forms besides systemd's (`--fds-as`), without duplicates.
    pub fds_as: Vec<HandOff>,
    /// Whether workers get LISTEN_FDS, LISTEN_FDNAMES and LISTEN_PID: yes,
    /// unless the command line passes fds by template and `--fds-as
    /// systemd` is not given (see `worker::handoff`).
    pub listen_fds: bool,
    pub user: Option<UserSpec>,
    pub credentials: Credentials,
    pub chdir: Option<PathBuf>,
    /// `--env K=V`, in order; values may hold templates (see `worker::handoff`).
    pub env: Vec<(OsString, OsString)>,
    pub env_clear: bool,
    /// RLIMIT_NOFILE (soft and hard) every worker gets.
    pub nofile: u64,
    pub umask: Option<libc::mode_t>,
    /// The pid file of a daemonizing server (a template).
    pub pidfile: Option<OsString>,
    /// `--worker-output`.
    pub output: crate::spec::WorkerOutput,
}

impl RunConfig {
    /// Resolve and validate what clap could not: names unique, hosts and
    /// users known, the command runnable.
    pub fn from_args(args: &RunArgs, path_var: Option<&OsString>) -> Result<RunConfig, Error> {
        if args.reuseport_per_worker && args.fd_store {
            return Err(Error::Usage(
                "--reuseport-per-worker does not combine with --fd-store (only one socket per name can be stored)".into(),
            ));
        }
        // The option that turns the steered hand-over off, if any.
        let unsteered = match () {
            _ if args.handover == Handover::Shared => Some("--handover shared"),
            _ if args.reuseport_per_worker => Some("--reuseport-per-worker"),
            _ if args.reuseport => Some("--reuseport"),
            _ => None,
        };
        if let (Some(p), Some(why)) = (&args.ready.probe, unsteered) {
            return Err(Error::Usage(format!(
                "--ready with a probe ({}): the probe must reach the new generation alone, which needs the steered hand-over, and {why} turns it off",
                p.check
            )));
        }
        if let (Some(c), Some(why)) = (&args.canary, unsteered) {
            return Err(Error::Usage(format!(
                "--canary {c}: a share of new connections can go to the new generation only with the steered hand-over, and {why} turns it off"
            )));
        }
        let listen = args
            .listen
            .iter()
            .map(resolve_listen)
            .collect::<Result<Vec<_>, _>>()?;
        let mut names = std::collections::HashSet::new();
        for spec in &listen {
            if !names.insert(spec.name.as_str()) {
                return Err(Error::Usage(format!(
                    "socket name '{}' is given twice; names must be unique",
                    spec.name
                )));
            }
        }
        if args.start_limit > 0 && args.start_limit_interval.is_zero() {
            return Err(Error::Usage(
                "--start-limit-interval 0 counts no failure: give a window like 10s, or --start-limit 0 to retry forever".into(),
            ));
        }
        let launch = Launch::from_args(&args.worker, args.workers, &args.command)?;
        let program = args.command.first().ok_or_else(|| {
            Error::Usage("missing command: nogap run [OPTIONS] -- COMMAND [ARGS...]".into())
        })?;
        let path = resolve_command(Path::new(program), path_var)?;
        Ok(RunConfig {
            listen,
            backlog: match args.backlog {
                Some(n) => n as i32,
                None => somaxconn(),
            },
            reuseport: args.reuseport || args.reuseport_per_worker,
            workers: args.workers,
            ready: args.ready.mode,
            probe: args.ready.probe.clone(),
            canary: args.canary,
            start_timeout: args.start_timeout,
            start_limit: (args.start_limit > 0).then_some(StartLimit {
                burst: args.start_limit,
                interval: args.start_limit_interval,
            }),
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
            metrics: args.metrics,
            steer: args.handover == Handover::Steer
                && !args.reuseport
                && !args.reuseport_per_worker,
            launch,
            control: args.control.clone(),
            config_file: args.config.clone(),
            origin: None,
        })
    }
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
            || !argv.iter().any(|a| template::has_fd_template(a));
        let user = match &args.user {
            Some(u) => Some(resolve_user(u).map_err(|e| usage(format!("--user {u}: {e}")))?),
            None => None,
        };
        let group = match &args.group {
            Some(g) => Some(resolve_group(g).map_err(|e| usage(format!("--group {g}: {e}")))?),
            None => None,
        };
        let credentials = credentials(user.as_ref(), group)?;
        if let Some(dir) = &args.chdir {
            if !dir.is_dir() {
                return Err(usage(format!(
                    "--chdir {}: no such directory",
                    dir.display()
                )));
            }
        }
        for (k, _) in &args.env {
            let mut reserved = PROTOCOL_VARS.iter().chain(NOGAP_VARS);
            if let Some(r) = reserved.find(|r| OsStr::new(r) == k) {
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
            user,
            credentials,
            chdir: args.chdir.clone(),
            env: args.env.clone(),
            env_clear: args.env_clear,
            nofile,
            umask: args.umask.map(|m| m as libc::mode_t),
            pidfile: args.pidfile.clone(),
            output: args.worker_output,
        })
    }

    /// What `sys` applies in the child between fork and exec.
    pub fn process_settings(&self) -> ProcessSettings {
        ProcessSettings {
            credentials: self.credentials.clone(),
            chdir: self.chdir.clone(),
            umask: self.umask,
            nofile: Some(self.nofile),
            no_listen_pid: !self.listen_fds,
            death_signal: None,
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

/// `--listen`: resolve the host name and the socket file's owner.
fn resolve_listen(arg: &ListenArg) -> Result<ListenSpec, Error> {
    let bad = |e: String| Error::Usage(format!("--listen {}: {e}", arg.text));
    let endpoint = match &arg.address {
        AddressArg::Tcp(h) => Endpoint::Tcp(resolve_host(h).map_err(bad)?),
        AddressArg::Udp(h) => Endpoint::Udp(resolve_host(h).map_err(bad)?),
        AddressArg::Unix(p) => Endpoint::Unix(p.clone()),
    };
    let owner = |e: String| {
        let user = arg.unix.user.as_ref().map(|u| u.to_string());
        let group = arg.unix.group.as_ref().map(|g| format!(":{g}"));
        bad(format!(
            "bad owner '{}{}': {e}",
            user.unwrap_or_default(),
            group.unwrap_or_default()
        ))
    };
    let mut unix = UnixOptions {
        mode: arg.unix.mode,
        ..UnixOptions::default()
    };
    if let Some(u) = &arg.unix.user {
        let u = resolve_user(u).map_err(owner)?;
        unix.uid = Some(u.uid);
        unix.gid = u.gid;
    }
    if let Some(g) = &arg.unix.group {
        unix.gid = Some(resolve_group(g).map_err(owner)?);
    }
    let name = arg.name.clone().unwrap_or_else(|| endpoint.default_name());
    Ok(ListenSpec {
        name,
        endpoint,
        unix,
    })
}

fn resolve_host(h: &HostPort) -> Result<std::net::SocketAddr, String> {
    match h {
        HostPort::Addr(a) => Ok(*a),
        HostPort::Name { host, port } => (host.as_str(), *port)
            .to_socket_addrs()
            .map_err(|e| format!("cannot resolve '{host}': {e}"))?
            .next()
            .ok_or_else(|| format!("'{host}' has no address")),
    }
}

/// A user by name or uid; an unknown uid is allowed (without a group).
pub fn resolve_user(p: &Principal) -> Result<UserSpec, String> {
    let found = match p {
        Principal::Id(uid) => User::from_uid(Uid::from_raw(*uid)),
        Principal::Name(name) => User::from_name(name),
    }
    .map_err(|e| format!("cannot look up user: {e}"))?;
    match (found, p) {
        (Some(u), _) => Ok(UserSpec {
            name: u.name,
            uid: u.uid.as_raw(),
            gid: Some(u.gid.as_raw()),
            home: Some(u.dir),
        }),
        (None, Principal::Id(uid)) => Ok(UserSpec {
            name: uid.to_string(),
            uid: *uid,
            gid: None,
            home: None,
        }),
        (None, Principal::Name(_)) => Err("no such user".to_string()),
    }
}

/// A group by name or gid.
pub fn resolve_group(p: &Principal) -> Result<u32, String> {
    match p {
        Principal::Id(gid) => Ok(*gid),
        Principal::Name(name) => match Group::from_name(name) {
            Ok(Some(g)) => Ok(g.gid.as_raw()),
            Ok(None) => Err("no such group".to_string()),
            Err(e) => Err(format!("cannot look up group: {e}")),
        },
    }
}

fn credentials(user: Option<&UserSpec>, group: Option<u32>) -> Result<Credentials, Error> {
    if user.is_none() && group.is_none() {
        return Ok(Credentials::default());
    }
    let gid = match (group, user) {
        (Some(g), _) => g,
        (None, Some(u)) => u.gid.ok_or_else(|| {
            Error::Usage(format!(
                "--user {}: no such user in the user database; give --group too",
                u.name
            ))
        })?,
        (None, None) => return Ok(Credentials::default()),
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
        // Raising a hard limit takes CAP_SYS_RESOURCE, which root may lack
        // (a container, a unit's CapabilityBoundingSet=): workers would
        // fail setrlimit and crash-loop.
        if !can_raise_limits() {
            return Err(Error::Usage(format!(
                "--nofile {n}: above the hard limit {hard}, which nogap cannot raise (no CAP_SYS_RESOURCE)"
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

/// Whether nogap has CAP_SYS_RESOURCE in its effective set (from
/// /proc/self/status; root without it cannot raise a hard limit).
fn can_raise_limits() -> bool {
    const CAP_SYS_RESOURCE: u32 = 24;
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            let hex = s
                .lines()
                .find_map(|l| l.strip_prefix("CapEff:"))?
                .trim()
                .to_string();
            u64::from_str_radix(&hex, 16).ok()
        })
        .is_some_and(|caps| caps & (1 << CAP_SYS_RESOURCE) != 0)
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

#[cfg(test)]
mod tests {
    #[test]
    fn a_runtime_directory_made_by_someone_else_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let t = tempfile::tempdir().unwrap();
        // Made by nogap: 0700.
        let mine = t.path().join("mine");
        super::private_dir(&mine).unwrap();
        let mode = std::fs::metadata(&mine).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        super::private_dir(&mine).unwrap();
        // World-writable.
        let open = t.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = super::private_dir(&open).unwrap_err();
        assert_eq!(e.exit_code(), crate::error::exit::UNSAFE);
        assert!(e.to_string().contains("0777"), "{e}");
        // A symlink to a directory of ours.
        let link = t.path().join("link");
        std::os::unix::fs::symlink(&mine, &link).unwrap();
        assert!(super::private_dir(&link)
            .unwrap_err()
            .to_string()
            .contains("symlink"));
        // Someone else's (as root: chown it away).
        if nix::unistd::geteuid().is_root() {
            let theirs = t.path().join("theirs");
            std::fs::create_dir(&theirs).unwrap();
            std::fs::set_permissions(&theirs, std::fs::Permissions::from_mode(0o700)).unwrap();
            std::os::unix::fs::chown(&theirs, Some(65534), Some(65534)).unwrap();
            let e = super::private_dir(&theirs).unwrap_err().to_string();
            assert!(e.contains("owned by uid 65534"), "{e}");
        }
    }

    use super::*;

    #[test]
    fn users_and_groups_resolve() {
        let root = resolve_user(&Principal::Name("root".into())).unwrap();
        assert_eq!((root.uid, root.gid), (0, Some(0)));
        assert_eq!(resolve_user(&Principal::Id(0)).unwrap().name, "root");
        let anon = resolve_user(&Principal::Id(4000123)).unwrap();
        assert_eq!((anon.uid, anon.gid), (4000123, None));
        assert_eq!(
            resolve_user(&Principal::Name("no-such-user-here".into())).unwrap_err(),
            "no such user"
        );
        assert_eq!(resolve_group(&Principal::Name("root".into())).unwrap(), 0);
        assert_eq!(resolve_group(&Principal::Id(123)).unwrap(), 123);
        assert!(resolve_group(&Principal::Name("no-such-group-here".into())).is_err());
    }

    #[test]
    fn listen_resolves_names_and_owners() {
        let arg = crate::spec::parse_listen("localhost:8080").unwrap();
        let spec = resolve_listen(&arg).unwrap();
        assert!(matches!(spec.endpoint, Endpoint::Tcp(a) if a.port() == 8080));
        assert!(spec.name.starts_with("tcp-"));
        let arg = crate::spec::parse_listen("api=unix:/run/x.sock?owner=root:root").unwrap();
        let spec = resolve_listen(&arg).unwrap();
        assert_eq!(spec.name, "api");
        assert_eq!(
            spec.unix,
            UnixOptions {
                mode: None,
                uid: Some(0),
                gid: Some(0)
            }
        );
        let arg = crate::spec::parse_listen("unix:/a?owner=no-such-user-here").unwrap();
        let e = resolve_listen(&arg).unwrap_err().to_string();
        assert!(e.contains("no-such-user-here"), "{e}");
    }

    #[test]
    fn nofile_defaults_to_the_hard_limit() {
        let (_, hard) =
            nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).unwrap();
        assert_eq!(nofile(None).unwrap(), hard);
        assert_eq!(nofile(Some(64)).unwrap(), 64);
    }
}
