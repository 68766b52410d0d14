//! Self-upgrade in place: nogap executes a new binary in its own process.
//!
//! The pid stays (systemd's MainPID does not change, the unit is not
//! restarted), and so do the workers: they are nogap's children, and stay so
//! across `execve`. Their parent-death signal is tied to the thread that
//! forked them, nogap's main thread, which `execve` (called from it) does
//! not end. What crosses:
//!
//! * every socket nogap holds ([`sockets::carry`]): bound and inherited ones,
//!   the steered pools, per-slot copies; close-on-exec is cleared for them
//!   just for the exec;
//! * the supervisor's state ([`State::export`]): generations, workers with
//!   their health, slots, reload history;
//! * the `upgrade --wait` client's connection, which the new image answers,
//!   and the connections of waiting `reload --wait` clients;
//! * the `--metrics` listener (scrapers see no gap, no re-bind), the
//!   workers' output pipes (captured output: a worker writing across the
//!   exec never gets EPIPE; a line cut by the exec is lost), and the count
//!   of output lines dropped;
//! * the configuration each generation was deployed with, as the config
//!   file's text: the new image parses it again with the same command line
//!   and derives each generation's `Settings` and launch configuration
//!   from it (so an edited, not yet deployed, file changes nothing; and
//!   `Settings` need not be serde);
//!
//! as one JSON document ([`Carried`], versioned by [`STATE_FORMAT`]) in a
//! memfd whose number is in `NOGAP_UPGRADE_FD`. Workers' notify (and
//! einhorn) sockets are bound again at the same paths, so what a worker
//! says next reaches the new image. The control socket is bound again at
//! its path: for the few milliseconds of the exec a client finds nobody.
//!
//! Before the exec the new binary is probed: `nogap upgrade-probe` gets the
//! very state it would take on its standard input, parses it, and prints
//! the state formats it reads. A binary that does not run, fails, cannot
//! parse the state or does not read this image's format is refused, and
//! nothing changes.
//! Signals are blocked across the exec (the mask survives it) and unblocked
//! once the new image handles them, so a HUP in between is not lost and
//! does not kill nogap. An upgrade waits until the state is quiet (see
//! `policy`): nothing starts, nothing is handed over.

use std::collections::HashMap;
use std::ffi::{CString, OsString};
use std::io::{Read, Seek, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{sigprocmask, SigSet, SigmaskHow};
use serde::{Deserialize, Serialize};

use crate::config::{Environment, RunConfig};
use crate::control::Waiters;
use crate::error::Error;
use crate::policy::{Exported, Settings, State, Upstream, WaiterId, STATE_FORMAT};
use crate::sockets::carry::{self, keep_across_exec};
use crate::sockets::{steer, Listener, Listeners};
use crate::sys;
use crate::worker::notify::Upstream as Systemd;
use crate::worker::Launcher;

/// The environment variable that names the memfd with the carried state.
pub const ENV: &str = "NOGAP_UPGRADE_FD";

/// The hidden subcommand that prints the formats a binary reads.
pub const PROBE: &str = "upgrade-probe";

/// How long the probe may take.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// Where a run begins: fresh, on these sockets, or where an earlier image
/// of this process left off (self-upgrade, from [`take`]).
pub enum Begin {
    Fresh(Vec<Listener>),
    Upgrade(Box<Carried>),
}

impl From<Vec<Listener>> for Begin {
    fn from(listeners: Vec<Listener>) -> Begin {
        Begin::Fresh(listeners)
    }
}

/// What the loop keeps for self-upgrades.
pub struct Hold {
    /// nogap's environment as captured at start (the new image gets it).
    env: Environment,
    /// The executable's path, read at start (an upgrade runs what is there).
    exe: Option<PathBuf>,
    /// An upgrade is asked for and waits for a quiet state.
    wanted: bool,
    /// Its `upgrade --wait` clients: who to tell of a refusal, and the
    /// connection the new image answers.
    asked: Vec<(tokio::sync::oneshot::Sender<String>, Option<OwnedFd>)>,
    /// The connections of `reload --wait` clients, by waiter id: carried
    /// by an upgrade, a new image answers on them directly.
    conns: HashMap<u64, OwnedFd>,
}

impl Hold {
    pub fn new(env: Environment) -> Hold {
        Hold {
            env,
            exe: own_exe(),
            wanted: false,
            asked: Vec::new(),
            conns: HashMap::new(),
        }
    }

    /// An upgrade is asked for; it runs once the state is `quiet`.
    pub fn ask(
        &mut self,
        reply: Option<tokio::sync::oneshot::Sender<String>>,
        client: Option<OwnedFd>,
        quiet: bool,
    ) {
        if !self.wanted && !quiet {
            tracing::info!("upgrade asked for: it runs once nothing starts or is handed over");
        }
        self.wanted = true;
        self.asked.extend(reply.map(|r| (r, client)));
    }

    /// An upgrade waits to run.
    pub fn asked(&self) -> bool {
        self.wanted
    }

    /// Probe and execute the new binary with everything in `from` (see
    /// [`attempt`]). Returns only if it was refused: whoever asked hears why.
    pub fn run(&mut self, from: Source<'_>, systemd: &Systemd) {
        self.wanted = false;
        let (replies, clients): (Vec<_>, Vec<_>) =
            std::mem::take(&mut self.asked).into_iter().unzip();
        let clients = clients.into_iter().flatten().collect();
        let why = attempt(self, from, clients, systemd);
        for reply in replies {
            let _ = reply.send(why.clone());
        }
    }

    /// `waiter`'s `reload --wait` client is on `client` (kept, to be carried
    /// by an upgrade); the connections of clients that left go.
    pub fn keep_client(&mut self, waiters: &Waiters, waiter: WaiterId, client: Option<OwnedFd>) {
        self.forget_left(waiters);
        self.conns.extend(client.map(|c| (waiter, c)));
    }

    /// Closes the kept connections of clients that went away: reload
    /// waiters no longer in `waiters`, and upgrade clients (their upgrade
    /// still runs).
    pub fn forget_left(&mut self, waiters: &Waiters) {
        self.conns.retain(|id, _| waiters.contains(*id));
        self.asked.retain(|(reply, _)| !reply.is_closed());
    }

    /// Answer `waiter`: on its carried connection when it came from an
    /// earlier image, else through `waiters`.
    pub fn reply(&mut self, waiters: &mut Waiters, waiter: WaiterId, result: Result<u64, String>) {
        match self.conns.remove(&waiter) {
            Some(c) if !waiters.contains(waiter) => crate::control::answer_reload(c, result),
            _ => drop(waiters.answer(waiter, result)),
        }
    }

    /// In a new image: the carried `reload --wait` connections kept; the
    /// next waiter id.
    pub fn resume_waiters(&mut self, waiters: Vec<(u64, OwnedFd)>) -> u64 {
        let next = waiters.iter().map(|(id, _)| id + 1).max().unwrap_or(1);
        self.conns = waiters.into_iter().collect();
        next
    }

    pub fn env(&self) -> &Environment {
        &self.env
    }
}

/// A run that resumes where an earlier image left off: what it carried,
/// and the client connections taken back.
pub struct Resume {
    pub carried: Carried,
    pub clients: Vec<OwnedFd>,
    pub waiters: Vec<(u64, OwnedFd)>,
}

impl Resume {
    /// When this nogap started, as the first image saw it.
    pub fn started(r: Option<&Resume>) -> Instant {
        let uptime = Duration::from_micros(r.map_or(0, |r| r.carried.uptime_us));
        Instant::now()
            .checked_sub(uptime)
            .unwrap_or_else(Instant::now)
    }
}

/// The sockets a run begins with, and what it resumes.
pub struct Opened {
    pub listeners: Listeners,
    pub steering: steer::Steering,
    pub copies: Vec<Vec<Option<Listener>>>,
    /// The original sockets outlive nogap (socket unit or fd store).
    pub keep_home: bool,
    pub resume: Option<Resume>,
}

/// Fresh sockets set up (see `sockets::assemble`), or the carried ones
/// taken back; steering writes the pool that serves to `steer_record`.
pub fn open(from: Begin, config: &RunConfig, steer_record: PathBuf) -> Result<Opened, Error> {
    let opened = open_sockets(from, config, steer_record)?;
    for (_, l) in opened.listeners.iter() {
        tracing::info!(socket = %l.name, addr = %l.endpoint, inherited = l.inherited(), "listening");
    }
    Ok(opened)
}

fn open_sockets(from: Begin, config: &RunConfig, steer_record: PathBuf) -> Result<Opened, Error> {
    Ok(match from {
        Begin::Fresh(listeners) => {
            let a = crate::sockets::assemble(listeners, config, steer_record)?;
            Opened {
                listeners: a.listeners,
                steering: a.steering,
                copies: a.copies,
                keep_home: a.keep_home,
                resume: None,
            }
        }
        Begin::Upgrade(c) => {
            let a = adopt(&c, steer_record)?;
            Opened {
                keep_home: config.fd_store || a.listeners.iter().any(|(_, l)| l.inherited()),
                listeners: a.listeners,
                steering: a.steering,
                copies: a.copies,
                resume: Some(Resume {
                    carried: *c,
                    clients: a.clients,
                    waiters: a.waiters,
                }),
            }
        }
    })
}

/// What one image hands the next.
#[derive(Debug, Serialize, Deserialize)]
pub struct Carried {
    pub format: u32,
    /// The version of the nogap that wrote it.
    pub from_version: String,
    pub state: Exported,
    /// By index; None: closed (see `sockets::set`).
    pub listeners: Vec<Option<carry::Carried>>,
    pub steering: steer::Carried,
    /// Per-slot copies (`--reuseport-per-worker`), by slot and listener.
    pub copies: Vec<Vec<Option<carry::Carried>>>,
    /// The `upgrade --wait` connections to answer.
    pub clients: Vec<RawFd>,
    /// The connections of `reload --wait` clients, by waiter id (those of
    /// the deferred reload in `state`).
    pub waiters: Vec<(u64, RawFd)>,
    pub uptime_us: u64,
    /// The config file's text of the newest deployed configuration, and of
    /// each generation's (None, empty: no `--config`).
    pub config: Option<String>,
    pub configs: Vec<(u64, String)>,
    /// The `--metrics` listener.
    pub metrics: Option<RawFd>,
    /// Each worker's output pipe (nogap's read end), by worker id.
    pub outputs: Vec<(u64, RawFd)>,
    /// Worker output lines dropped so far.
    pub output_dropped: u64,
}

/// `nogap upgrade-probe`: print the state formats this binary reads; with
/// a state on standard input (not a terminal), parse it first and fail,
/// saying why, if it cannot be read.
pub fn probe_main() -> Result<(), Error> {
    use std::io::IsTerminal;
    let stdin = std::io::stdin();
    if !stdin.is_terminal() {
        let mut text = String::new();
        stdin
            .lock()
            .take(MAX_STATE)
            .read_to_string(&mut text)
            .map_err(|e| Error::system("cannot read the state to probe", e))?;
        if !text.trim().is_empty() {
            let carried: Carried = serde_json::from_str(&text).map_err(|e| {
                Error::UpgradeFailed(format!("cannot read the running nogap's state: {e}"))
            })?;
            if carried.format != STATE_FORMAT {
                return Err(Error::UpgradeFailed(format!(
                    "state format {} is not {STATE_FORMAT}",
                    carried.format
                )));
            }
        }
    }
    println!("nogap-state {STATE_FORMAT}");
    Ok(())
}

/// The largest state a probe reads.
const MAX_STATE: u64 = 64 << 20;

/// The path of the running executable, read at start: an upgrade runs what
/// is at that path then, not the old inode.
pub fn own_exe() -> Option<PathBuf> {
    std::fs::read_link("/proc/self/exe").ok()
}

/// Run `path upgrade-probe` with the state it would take (`json`) on its
/// standard input: Ok when it reads this image's state format and could
/// parse that very state.
pub fn probe(path: &Path, json: &[u8]) -> Result<(), String> {
    let mut child = Command::new(path)
        .arg(PROBE)
        .env_remove(ENV)
        .env_remove("NOTIFY_SOCKET")
        .env_remove("LISTEN_FDS")
        .env_remove("LISTEN_PID")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", path.display()))?;
    // Written from a thread: a probe that does not read must not block
    // the loop (it is killed at the deadline, and the write fails).
    if let Some(mut stdin) = child.stdin.take() {
        let json = json.to_vec();
        std::thread::spawn(move || {
            let _ = stdin.write_all(&json);
        });
    }
    // The loop waits for it (it takes milliseconds), bounded.
    let deadline = Instant::now() + PROBE_TIMEOUT;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "{} did not answer its probe within {}",
                    path.display(),
                    humantime::format_duration(PROBE_TIMEOUT)
                ));
            }
            Err(e) => return Err(format!("cannot wait for {}: {e}", path.display())),
        }
    };
    let mut out = String::new();
    let mut err = String::new();
    if let Some(mut s) = child.stdout.take() {
        let _ = s.by_ref().take(4096).read_to_string(&mut out);
    }
    if let Some(mut s) = child.stderr.take() {
        let _ = s.by_ref().take(4096).read_to_string(&mut err);
    }
    if !status.success() {
        let why = err.lines().next().unwrap_or("").trim();
        return Err(format!(
            "{} failed its probe ({status}){}",
            path.display(),
            match why.is_empty() {
                true => String::new(),
                false => format!(": {}", crate::spec::truncate(why)),
            }
        ));
    }
    let formats: Vec<u32> = out
        .trim()
        .strip_prefix("nogap-state ")
        .map(|rest| {
            rest.split_whitespace()
                .filter_map(|v| v.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    if !formats.contains(&STATE_FORMAT) {
        return Err(format!(
            "{} cannot take over: it reads state format(s) {:?}, this nogap writes {STATE_FORMAT}",
            path.display(),
            formats
        ));
    }
    Ok(())
}

/// What an upgrade carries, as the loop holds it.
pub struct Source<'a> {
    pub state: &'a State,
    pub listeners: &'a Listeners,
    pub steering: &'a steer::Steering,
    pub copies: &'a [Vec<Option<Listener>>],
    pub uptime: Duration,
    pub launcher: &'a Launcher,
    /// The `--metrics` listener.
    pub metrics: Option<RawFd>,
}

/// Probe the binary at the start path and execute it with everything in
/// `from`, the `upgrade --wait` connections `clients` and the waiting
/// reloads' connections, telling systemd `RELOADING=1` before and (if the
/// exec failed) `READY=1` after. Returns only if it was refused or failed:
/// why.
fn attempt(hold: &Hold, from: Source<'_>, clients: Vec<OwnedFd>, systemd: &Systemd) -> String {
    let why = match &hold.exe {
        None => "cannot tell which binary nogap was started from".to_string(),
        Some(exe) => {
            let mut keep = Vec::new();
            let carried = carry(&from, &clients, &hold.conns, &mut keep);
            match serde_json::to_vec(&carried).map_err(|e| format!("cannot write the state: {e}")) {
                Err(why) => why,
                Ok(json) => match probe(exe, &json) {
                    Err(why) => why,
                    Ok(()) => {
                        tracing::info!(exe = %exe.display(), "upgrading in place");
                        systemd.tell(&[
                            Upstream::Reloading,
                            Upstream::Status("upgrading nogap in place".into()),
                        ]);
                        let why = exec(exe, &json, &keep, &hold.env);
                        systemd
                            .tell(&[Upstream::Ready, Upstream::Status(from.state.status_line())]);
                        why
                    }
                },
            }
        }
    };
    tracing::error!(reason = %why, "upgrade refused: this nogap runs on");
    why
}

/// Describe everything for the new image; the descriptors to keep open
/// across the exec go to `keep`.
pub fn carry(
    from: &Source<'_>,
    clients: &[OwnedFd],
    conns: &HashMap<u64, OwnedFd>,
    keep: &mut Vec<RawFd>,
) -> Carried {
    let clients: Vec<RawFd> = clients.iter().map(|c| c.as_raw_fd()).collect();
    keep.extend(&clients);
    let waiters: Vec<(u64, RawFd)> = conns.iter().map(|(id, c)| (*id, c.as_raw_fd())).collect();
    keep.extend(waiters.iter().map(|(_, fd)| *fd));
    keep.extend(from.metrics);
    let (config, configs) = from.launcher.config_texts();
    Carried {
        format: STATE_FORMAT,
        from_version: env!("CARGO_PKG_VERSION").to_string(),
        state: from.state.export(Instant::now()),
        listeners: (0..from.listeners.len())
            .map(|i| from.listeners.get(i).map(|l| l.carry(keep)))
            .collect(),
        steering: from.steering.carry(keep),
        copies: from
            .copies
            .iter()
            .map(|row| {
                row.iter()
                    .map(|c| c.as_ref().map(|c| c.carry(keep)))
                    .collect()
            })
            .collect(),
        clients,
        waiters,
        uptime_us: from.uptime.as_micros() as u64,
        config,
        configs,
        metrics: from.metrics,
        outputs: from.launcher.carry_outputs(keep),
        output_dropped: from.launcher.dropped_lines(),
    }
}

/// In a new image: the `--metrics` listener the old one carried.
pub fn metrics_listener(c: &Carried) -> Result<Option<std::net::TcpListener>, Error> {
    c.metrics
        .map(|fd| {
            sys::own_carried_fd(fd)
                .map(std::net::TcpListener::from)
                .map_err(|e| Error::system("the carried metrics listener is not open", e))
        })
        .transpose()
}

/// In the new image: each generation's configuration rebuilt from its
/// carried text, the state rebuilt with the settings of each (`newest`:
/// the steering and socket names), each live worker's notify (and einhorn)
/// socket bound again at its path and its output pipe read again, and the
/// waiting clients answered.
pub fn resume(
    c: Carried,
    newest: &Settings,
    launcher: &mut Launcher,
    clients: Vec<OwnedFd>,
    systemd: &Systemd,
) -> State {
    let now = Instant::now();
    let configs = c
        .configs
        .into_iter()
        .filter_map(|(g, text)| {
            let origin = launcher.config().origin.clone()?;
            match crate::config::reload::from_text(&origin, text) {
                Ok(config) => Some((g, config)),
                Err(error) => {
                    tracing::warn!(generation = g, %error, "a generation's configuration cannot be read again: it runs the newest");
                    None
                }
            }
        })
        .collect();
    launcher.restore_generations(configs);
    launcher.add_dropped(c.output_dropped);
    let state = State::import(c.state, now, |g| {
        let config = g.map_or(launcher.config(), |g| launcher.config_of(g));
        Settings::new(config, newest.steered, newest.sockets.clone())
    });
    let snapshot = state.snapshot(now);
    let mut outputs: HashMap<u64, RawFd> = c.outputs.into_iter().collect();
    let live: Vec<_> = snapshot
        .workers
        .iter()
        .filter(|w| w.pid.is_some())
        .collect();
    for w in &live {
        let output = outputs
            .remove(&w.id)
            .and_then(|fd| sys::own_carried_fd(fd).ok());
        let origin = crate::worker::output::Origin {
            generation: w.generation,
            slot: w.slot,
            pid: w.pid.unwrap_or(0),
        };
        if let Err(error) = launcher.adopt(w.id, origin, output) {
            tracing::warn!(worker = w.slot, generation = w.generation, %error, "worker's notify socket lost: it cannot be heard until replaced");
        }
    }
    // Pipes of workers that are gone meanwhile.
    for fd in outputs.into_values() {
        drop(sys::own_carried_fd(fd));
    }
    tracing::info!(from = %c.from_version, workers = live.len(), generation = snapshot.generation, "upgraded in place: sockets, workers and state taken over");
    for client in clients {
        crate::control::answer_upgraded(client, snapshot.generation);
    }
    systemd.tell(&[Upstream::Ready, Upstream::Status(state.status_line())]);
    state
}

/// Execute `path` in this process with the carried state `json`. Returns only if that
/// failed, with why; then everything is as before (descriptors
/// close-on-exec again, signals unblocked).
pub fn exec(path: &Path, json: &[u8], keep: &[RawFd], env: &Environment) -> String {
    let memfd = match write_memfd(json) {
        Ok(f) => f,
        Err(e) => return format!("cannot write the state to a memfd: {e}"),
    };
    let cstr = |s: &[u8]| CString::new(s.to_vec()).ok();
    let Some(path_c) = cstr(path.as_os_str().as_bytes()) else {
        return format!("bad path {}", path.display());
    };
    let argv: Vec<CString> = std::env::args_os()
        .filter_map(|a| cstr(a.as_bytes()))
        .collect();
    let mut vars: Vec<(OsString, OsString)> = env
        .vars()
        .iter()
        .filter(|(k, _)| k != ENV)
        .cloned()
        .collect();
    vars.push((ENV.into(), memfd.as_raw_fd().to_string().into()));
    let envp: Vec<CString> = vars
        .iter()
        .filter_map(|(k, v)| cstr(&[k.as_bytes(), b"=", v.as_bytes()].concat()))
        .collect();
    let mut kept = Vec::new();
    for &fd in keep.iter().chain([&memfd.as_raw_fd()]) {
        if let Err(e) = keep_across_exec(fd, true) {
            restore(&kept);
            return format!("cannot keep descriptor {fd} open across exec: {e}");
        }
        kept.push(fd);
    }
    let mut old = SigSet::empty();
    let blocked = sigprocmask(SigmaskHow::SIG_BLOCK, Some(&SigSet::all()), Some(&mut old));
    let err = match nix::unistd::execve(&path_c, &argv, &envp) {
        Err(e) => e,
        Ok(never) => match never {},
    };
    if blocked.is_ok() {
        let _ = sigprocmask(SigmaskHow::SIG_SETMASK, Some(&old), None);
    }
    restore(&kept);
    format!("cannot execute {}: {err}", path.display())
}

fn restore(kept: &[RawFd]) {
    for &fd in kept {
        let _ = keep_across_exec(fd, false);
    }
}

fn write_memfd(json: &[u8]) -> std::io::Result<std::fs::File> {
    use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
    let name = c"nogap-upgrade";
    let fd: OwnedFd = memfd_create(name, MemFdCreateFlag::MFD_CLOEXEC)?;
    let mut f = std::fs::File::from(fd);
    f.write_all(json)?;
    f.rewind()?;
    Ok(f)
}

/// In a new image: the state the old one carried, if this start is an
/// upgrade (`NOGAP_UPGRADE_FD` set). Reads and closes the memfd.
pub fn take(env: &Environment) -> Option<Result<Carried, Error>> {
    let raw = env.get(ENV)?;
    let bad = |what: String| Error::system(what, std::io::Error::other("self-upgrade"));
    let result = (|| {
        let fd: RawFd = raw
            .to_str()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| bad(format!("bad {ENV}={raw:?}")))?;
        let fd = sys::own_carried_fd(fd)
            .map_err(|e| Error::system(format!("cannot open the carried state (fd {fd})"), e))?;
        let mut text = String::new();
        std::fs::File::from(fd)
            .read_to_string(&mut text)
            .map_err(|e| Error::system("cannot read the carried state", e))?;
        let carried: Carried = serde_json::from_str(&text)
            .map_err(|e| bad(format!("cannot parse the carried state: {e}")))?;
        if carried.format != STATE_FORMAT {
            return Err(bad(format!(
                "carried state format {} is not {STATE_FORMAT}",
                carried.format
            )));
        }
        Ok(carried)
    })();
    Some(result)
}

/// After the new image installed its signal handlers: let the signals that
/// arrived during the exec in.
pub fn unblock_signals() {
    let _ = sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None);
}

/// The sockets, steering and per-slot copies a new image takes back.
pub struct Adopted {
    pub listeners: Listeners,
    pub steering: steer::Steering,
    pub copies: Vec<Vec<Option<Listener>>>,
    pub clients: Vec<OwnedFd>,
    pub waiters: Vec<(u64, OwnedFd)>,
}

/// Take back every descriptor the old image named.
pub fn adopt(c: &Carried, steer_record: PathBuf) -> Result<Adopted, Error> {
    let lost = |e: std::io::Error| Error::system("a carried socket is not open", e);
    let listeners = c
        .listeners
        .iter()
        .cloned()
        .map(|c| c.map(Listener::adopt).transpose())
        .collect::<std::io::Result<Vec<_>>>()
        .map_err(lost)?
        .into();
    let steering = steer::Steering::adopt(c.steering.clone(), Some(steer_record)).map_err(lost)?;
    let copies = c
        .copies
        .iter()
        .map(|row| {
            row.iter()
                .map(|x| x.clone().map(Listener::adopt).transpose())
                .collect::<std::io::Result<Vec<_>>>()
        })
        .collect::<std::io::Result<Vec<_>>>()
        .map_err(lost)?;
    let clients = c
        .clients
        .iter()
        .filter_map(|&fd| sys::own_carried_fd(fd).ok())
        .collect();
    let waiters = c
        .waiters
        .iter()
        .filter_map(|&(id, fd)| Some((id, sys::own_carried_fd(fd).ok()?)))
        .collect();
    Ok(Adopted {
        listeners,
        steering,
        copies,
        clients,
        waiters,
    })
}
