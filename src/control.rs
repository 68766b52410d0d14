//! The control channel: a unix stream socket (mode 0600) that `nogap reload`
//! and `nogap status` talk to.
//!
//! Protocol, version 1: the client sends one JSON line, the server answers one
//! JSON line and closes. Both ends use the types below; no untyped JSON.
//!
//! | request | answer |
//! |---------|--------|
//! | `{"version":1,"command":"reload"}` | `{"ok":true}` once the reload is asked for |
//! | `{"version":1,"command":"reload","wait":true}` | `{"ok":true,"generation":N}` once generation N serves, or `{"ok":false,"error":"..."}` |
//! | `{"version":1,"command":"reload","wait":true,"progress":true}` | `{"progress":{...}}` lines ([`Progress`]) as the reload goes on, then the answer above |
//! | `{"version":1,"command":"upgrade"}` | `{"ok":true}` once the upgrade is asked for |
//! | `{"version":1,"command":"upgrade","wait":true}` | `{"ok":true,"generation":N,"upgraded":{"pid":P,"version":"V"}}` from the new image, or `{"ok":false,"error":"..."}` from the old one |
//! | `{"version":1,"command":"status"}` | `{"ok":true,"status":{...}}` ([`StatusReport`]) |
//! | anything else | `{"ok":false,"error":"..."}` |
//!
//! A server older than `progress` ignores the key and answers with one line;
//! a client that does not ask gets none: both keep working.
//!
//! A request of another `version` is refused with an error that names both
//! versions, before its command is looked at. Only root and nogap's own uid
//! may ask (`SO_PEERCRED`). A bad request gets an error answer and never
//! touches the supervisor.
//!
//! Bounds: at most [`MAX_CONNECTIONS`] connections are served at once (more
//! are closed at once, unanswered); a request line must come within 5 s and
//! 4 KiB; a client that closes its connection while it waits for a reload
//! is forgotten (keep the write side open while waiting); the accept loop
//! backs off (10 ms doubling to 1 s) when nogap is out of descriptors or
//! memory instead of spinning.

use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};

use crate::cli::{ReloadArgs, StatusArgs, Target, UpgradeArgs};
use crate::config::Environment;
use crate::error::Error;
use crate::monitor::Sockets;
use crate::policy::{QueueId, ReloadOutcome, Snapshot};

pub const VERSION: u64 = 1;
const MAX_REQUEST: u64 = 4096;

/// Control connections served at once; further ones are closed unanswered.
pub const MAX_CONNECTIONS: usize = 64;

/// What a client asks, on the wire.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestLine {
    pub version: u64,
    #[serde(flatten)]
    pub command: Command,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "lowercase")]
pub enum Command {
    /// Start a new generation; with `wait`, answer once it serves or failed.
    Reload {
        #[serde(default)]
        wait: bool,
        /// With `wait`: stream [`Progress`] lines before the answer.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        progress: bool,
    },
    Status,
    /// Re-execute nogap in place; with `wait`, answered by the new image
    /// (or refused by this one).
    Upgrade {
        #[serde(default)]
        wait: bool,
    },
}

/// What the new image says to `upgrade --wait`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Upgraded {
    pub pid: u32,
    pub version: String,
}

/// How a waited-for reload is getting on, on the wire as
/// `{"progress":{...}}`, sent when it changes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    /// The generation the line is about.
    pub generation: u64,
    /// `starting` (its workers come up), `steering` (new connections go
    /// to it) or `draining` (the generation it replaced stops).
    pub stage: String,
    /// Starting: its workers ready, and all of them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workers: Option<u32>,
    /// The line a person reads.
    pub text: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProgressLine {
    pub progress: Progress,
}

/// How often a waiting reload's progress is looked at.
const PROGRESS_EVERY: Duration = Duration::from_millis(100);

/// The answer, on the wire.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<Box<StatusReport>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upgraded: Option<Upgraded>,
}

impl Response {
    fn failed(error: impl Into<String>) -> Response {
        Response {
            ok: false,
            error: Some(error.into()),
            ..Response::default()
        }
    }
}

/// `nogap status --json`: the supervisor's state at one instant.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StatusReport {
    pub version: u64,
    pub pid: u32,
    pub uptime_secs: u64,
    /// The serving generation; None until the first one is ready.
    pub generation: Option<u64>,
    /// The generation a reload is starting.
    pub reloading: Option<u64>,
    pub stopping: bool,
    /// The line nogap also sends as systemd's `STATUS=`.
    pub status: String,
    pub last_reload: Option<LastReload>,
    pub healthy: bool,
    pub workers: Vec<WorkerStatus>,
    pub sockets: Vec<SocketStatus>,
    /// With the steered hand-over: the pools per socket and where new
    /// connections go.
    pub steering: Option<SteeringStatus>,
    /// The recent reloads, replacements and restarts, oldest first.
    #[serde(default)]
    pub events: Vec<EventStatus>,
    /// The progressive hand-over under way (`--canary`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary: Option<CanaryStatus>,
}

/// A canary under way: `percent`% of new connections go to `generation`
/// for `duration_secs`, `left_secs` of it left.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CanaryStatus {
    pub generation: u64,
    pub percent: u8,
    pub duration_secs: f64,
    pub left_secs: f64,
}

/// One recent event, as `nogap status` shows it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EventStatus {
    /// `reload`, `reload-failed`, `replacement` or `restart`.
    pub kind: String,
    pub generation: u64,
    pub worker: Option<u32>,
    pub reason: String,
    pub secs_ago: f64,
    /// When, as RFC 3339 UTC.
    pub at: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "lowercase")]
pub enum LastReload {
    Ok {
        generation: u64,
    },
    Failed {
        generation: u64,
        reason: String,
        /// The failing worker's last lines of output (with captured output).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        output: Vec<String>,
    },
}

impl From<&ReloadOutcome> for LastReload {
    fn from(o: &ReloadOutcome) -> LastReload {
        match o {
            ReloadOutcome::Ok { generation } => LastReload::Ok {
                generation: *generation,
            },
            ReloadOutcome::Failed {
                generation,
                reason,
                output,
            } => LastReload::Failed {
                generation: *generation,
                reason: reason.clone(),
                output: output.clone(),
            },
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WorkerStatus {
    pub slot: u32,
    pub generation: u64,
    pub pid: Option<i32>,
    /// waiting, spawning, starting, ready, draining or killed.
    pub state: String,
    pub ready_for_secs: Option<f64>,
    pub restarts: u32,
    /// The last `STATUS=` the worker sent.
    pub status: Option<String>,
    pub last_ping_secs_ago: Option<f64>,
    pub fds_open: Option<u64>,
    pub fds_limit: Option<u64>,
    /// Why the health checks gave up on it, if they did.
    pub unhealthy: Option<String>,
    /// Workers of this slot found unhealthy since nogap started.
    pub slot_unhealthy_seen: u64,
    /// Health replacements of this slot since nogap started.
    pub slot_replacements: u64,
    /// While draining: seconds left before SIGKILL.
    #[serde(default)]
    pub drain_left_secs: Option<f64>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SocketStatus {
    pub name: String,
    pub address: String,
    pub inherited: bool,
    /// `steer` or `shared`.
    pub handover: String,
    pub queue: Option<u32>,
    pub backlog: Option<u32>,
    pub stalled: bool,
    /// With per-slot copies: the depth of each slot's own queue.
    pub slot_queues: Option<Vec<Option<u32>>>,
    pub stalls: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SteeringStatus {
    pub pools: usize,
    pub target: usize,
}

/// A request from the control channel, as the supervisor gets it.
pub enum Request {
    Reload {
        reply: Option<oneshot::Sender<Result<u64, String>>>,
        /// With a reply: the asking connection, which a new image answers
        /// if nogap upgrades itself meanwhile.
        client: Option<OwnedFd>,
    },
    Status {
        reply: oneshot::Sender<StatusReport>,
    },
    /// `reply` (with `--wait`) hears a refusal; `client` is the asking
    /// connection, which the new image answers once it runs.
    Upgrade {
        reply: Option<oneshot::Sender<String>>,
        client: Option<OwnedFd>,
    },
    /// A client went away before its answer: whatever the loop keeps for
    /// it (a waiter, its connection for an upgrade) can go.
    Left,
}

/// The control socket's path: `--control`, else in nogap's runtime directory.
pub fn default_path(explicit: Option<&Path>, env: &Environment) -> PathBuf {
    match explicit {
        Some(p) => p.to_path_buf(),
        None => env.runtime_base().join("control.sock"),
    }
}

/// Serving control connections; the socket file goes with it.
pub struct Control {
    path: PathBuf,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Control {
    fn drop(&mut self) {
        self.task.abort();
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Start serving. A control path that another live nogap answers on is an
/// error when given explicitly; for the default path nogap runs without a
/// control channel and says so, rather than not serving at all.
pub fn serve(
    explicit: Option<&Path>,
    env: &Environment,
    tx: mpsc::Sender<Request>,
) -> Result<Option<Control>, Error> {
    use std::os::unix::fs::PermissionsExt;
    let path = default_path(explicit, env);
    if explicit.is_none() {
        env.runtime_dir()?;
    }
    if let Some(dir) = path.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    if std::os::unix::net::UnixStream::connect(&path).is_ok() {
        let msg = format!(
            "control socket {} is in use by another nogap",
            path.display()
        );
        if explicit.is_some() {
            return Err(Error::Usage(msg));
        }
        tracing::warn!(path = %path.display(), "{msg}; running without a control channel (use --control)");
        return Ok(None);
    }
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path)
        .map_err(|e| Error::system(format!("cannot bind control socket {}", path.display()), e))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| Error::system(format!("cannot chmod {}", path.display()), e))?;
    tracing::info!(path = %path.display(), "control socket");
    let task = tokio::spawn(async move {
        let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
        let mut backoff = crate::worker::notify::Backoff::default();
        let mut refused = crate::logs::Limiter::new(Duration::from_secs(10), 1);
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    if refused.allow("accept", std::time::Instant::now()).is_some() {
                        tracing::warn!(error = %e, "control socket: accept failed; backing off");
                    }
                    backoff.wait().await;
                    continue;
                }
            };
            backoff.reset();
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                if let Some(suppressed) = refused.allow("busy", std::time::Instant::now()) {
                    tracing::warn!(
                        max = MAX_CONNECTIONS,
                        suppressed,
                        "too many control connections: one closed"
                    );
                }
                continue;
            };
            let tx = tx.clone();
            tokio::spawn(async move {
                if let Err(e) = connection(stream, tx).await {
                    tracing::debug!(error = %e, "control connection");
                }
                drop(slot);
            });
        }
    });
    Ok(Some(Control { path, task }))
}

async fn connection(stream: UnixStream, tx: mpsc::Sender<Request>) -> std::io::Result<()> {
    let me = nix::unistd::geteuid().as_raw();
    let uid = stream.peer_cred()?.uid();
    // For an upgrade: the new image answers on this connection.
    let dup = stream.as_fd().try_clone_to_owned().ok();
    let (rd, mut wr) = stream.into_split();
    let answer = if uid != 0 && uid != me {
        tracing::warn!(uid, "control request refused: not root or nogap's uid");
        Response::failed(format!("permission denied for uid {uid}"))
    } else {
        let mut line = String::new();
        let mut rd = tokio::io::BufReader::new(tokio::io::AsyncReadExt::take(rd, MAX_REQUEST));
        match tokio::time::timeout(Duration::from_secs(5), rd.read_line(&mut line)).await {
            Ok(Ok(_)) => match parse_request(&line) {
                // A client that goes away while it waits is forgotten: its
                // waiter's channel closes as select! drops the request's
                // future, and the loop is told to let go of what it keeps.
                Ok(Command::Reload {
                    wait: true,
                    progress: true,
                }) => match tokio::select! {
                    r = reload_with_progress(&tx, &mut wr, dup) => Some(r?),
                    () = gone(&mut rd) => None,
                } {
                    Some(answer) => answer,
                    None => return left(&tx).await,
                },
                Ok(command) => match tokio::select! {
                    answer = handle(command, &tx, dup) => Some(answer),
                    () = gone(&mut rd) => None,
                } {
                    Some(answer) => answer,
                    None => return left(&tx).await,
                },
                Err(error) => {
                    tracing::warn!(%error, "bad control request ignored");
                    Response::failed(error)
                }
            },
            Ok(Err(e)) => Response::failed(format!("bad request: {e}")),
            Err(_) => Response::failed("timed out reading the request"),
        }
    };
    let mut text = serde_json::to_string(&answer).map_err(std::io::Error::other)?;
    text.push('\n');
    wr.write_all(text.as_bytes()).await?;
    wr.shutdown().await
}

/// Tells the loop that a client left before its answer.
async fn left(tx: &mpsc::Sender<Request>) -> std::io::Result<()> {
    // Fails only when nogap stops, and then nothing is kept anyway.
    let _ = tx.send(Request::Left).await;
    Ok(())
}

/// Returns when the client closed its connection (EOF or error); whatever
/// it sends after its request line is ignored.
async fn gone<R: tokio::io::AsyncRead + Unpin>(rd: &mut R) {
    let mut buf = [0u8; 256];
    while let Ok(n) = tokio::io::AsyncReadExt::read(rd, &mut buf).await {
        if n == 0 {
            return;
        }
    }
}

/// One request line: its version first, then its command.
pub fn parse_request(line: &str) -> Result<Command, String> {
    #[derive(Deserialize)]
    struct Versioned {
        version: u64,
    }
    let line = line.trim();
    let v: Versioned = serde_json::from_str(line).map_err(|e| format!("bad request: {e}"))?;
    if v.version != VERSION {
        return Err(format!(
            "unsupported protocol version {} (this nogap speaks {VERSION})",
            v.version
        ));
    }
    #[derive(Deserialize)]
    struct Named {
        command: Option<String>,
    }
    let req: RequestLine = serde_json::from_str(line).map_err(|e| {
        // serde calls an unknown command an "unknown variant": name it.
        match serde_json::from_str::<Named>(line)
            .ok()
            .and_then(|n| n.command)
        {
            Some(c) if !["reload", "status", "upgrade"].contains(&c.as_str()) => {
                format!("unknown command '{}'", crate::spec::truncate(&c))
            }
            _ => format!("bad request: {e}"),
        }
    })?;
    Ok(req.command)
}

async fn handle(command: Command, tx: &mpsc::Sender<Request>, conn: Option<OwnedFd>) -> Response {
    let gone = || Response::failed("nogap is shutting down");
    match command {
        Command::Upgrade { wait: true } => {
            let (reply, rx) = oneshot::channel();
            let request = Request::Upgrade {
                reply: Some(reply),
                client: conn,
            };
            if tx.send(request).await.is_err() {
                return gone();
            }
            // Success is answered by the new image; this one only refuses.
            match rx.await {
                Ok(error) => Response::failed(error),
                Err(_) => gone(),
            }
        }
        Command::Upgrade { wait: false } => {
            let request = Request::Upgrade {
                reply: None,
                client: None,
            };
            match tx.send(request).await {
                Ok(()) => Response {
                    ok: true,
                    ..Response::default()
                },
                Err(_) => gone(),
            }
        }
        Command::Reload { wait: true, .. } => {
            let (reply, rx) = oneshot::channel();
            if tx
                .send(Request::Reload {
                    reply: Some(reply),
                    client: conn,
                })
                .await
                .is_err()
            {
                return gone();
            }
            match rx.await {
                Ok(Ok(generation)) => Response {
                    ok: true,
                    generation: Some(generation),
                    ..Response::default()
                },
                Ok(Err(error)) => Response::failed(error),
                Err(_) => gone(),
            }
        }
        Command::Reload { wait: false, .. } => match tx
            .send(Request::Reload {
                reply: None,
                client: None,
            })
            .await
        {
            Ok(()) => Response {
                ok: true,
                ..Response::default()
            },
            Err(_) => gone(),
        },
        Command::Status => {
            let (reply, rx) = oneshot::channel();
            if tx.send(Request::Status { reply }).await.is_err() {
                return gone();
            }
            match rx.await {
                Ok(status) => Response {
                    ok: true,
                    status: Some(Box::new(status)),
                    ..Response::default()
                },
                Err(_) => gone(),
            }
        }
    }
}

/// A reload with `--wait`, streaming [`Progress`] lines while it runs: the
/// generation starting (workers ready of all), then, once it serves, the
/// steering and the draining of the generation it replaced.
async fn reload_with_progress(
    tx: &mpsc::Sender<Request>,
    wr: &mut tokio::net::unix::OwnedWriteHalf,
    conn: Option<OwnedFd>,
) -> std::io::Result<Response> {
    let gone = || Response::failed("nogap is shutting down");
    let Some(before) = status_now(tx).await else {
        return Ok(gone());
    };
    let (reply, mut rx) = oneshot::channel();
    if tx
        .send(Request::Reload {
            reply: Some(reply),
            client: conn,
        })
        .await
        .is_err()
    {
        return Ok(gone());
    }
    let mut last: Option<Progress> = None;
    let mut tick = tokio::time::interval(PROGRESS_EVERY);
    let result = loop {
        tokio::select! {
            r = &mut rx => break r,
            _ = tick.tick() => {
                if let Some(p) = status_now(tx).await.and_then(|s| s.starting_progress()) {
                    if last.as_ref() != Some(&p) {
                        send_progress(wr, &p).await?;
                        last = Some(p);
                    }
                }
            }
        }
    };
    Ok(match result {
        Ok(Ok(generation)) => {
            let replaced = before.generation.filter(|g| *g != generation);
            let lines = [
                before.steering.map(|_| Progress {
                    generation,
                    stage: "steering".into(),
                    ready: None,
                    workers: None,
                    text: format!("steering new connections to generation {generation}"),
                }),
                replaced.map(|old| Progress {
                    generation: old,
                    stage: "draining".into(),
                    ready: None,
                    workers: None,
                    text: format!("draining generation {old}"),
                }),
            ];
            for p in lines.iter().flatten() {
                send_progress(wr, p).await?;
            }
            Response {
                ok: true,
                generation: Some(generation),
                ..Response::default()
            }
        }
        Ok(Err(error)) => Response::failed(error),
        Err(_) => gone(),
    })
}

async fn status_now(tx: &mpsc::Sender<Request>) -> Option<StatusReport> {
    let (reply, rx) = oneshot::channel();
    tx.send(Request::Status { reply }).await.ok()?;
    rx.await.ok()
}

async fn send_progress(
    wr: &mut tokio::net::unix::OwnedWriteHalf,
    p: &Progress,
) -> std::io::Result<()> {
    let line = ProgressLine {
        progress: p.clone(),
    };
    let mut text = serde_json::to_string(&line).map_err(std::io::Error::other)?;
    text.push('\n');
    wr.write_all(text.as_bytes()).await
}

// ---- clients -------------------------------------------------------------------

fn ask(path: &Path, command: Command, timeout: Duration) -> Result<Response, Error> {
    ask_with(path, command, timeout, |_| {})
}

/// [`ask`], passing each [`Progress`] line that comes before the answer to
/// `progress`.
fn ask_with(
    path: &Path,
    command: Command,
    timeout: Duration,
    mut progress: impl FnMut(&Progress),
) -> Result<Response, Error> {
    let unreachable = |e: std::io::Error| {
        Error::Control(format!("cannot reach nogap at {}: {e}", path.display()))
    };
    let request = RequestLine {
        version: VERSION,
        command,
    };
    let mut line = serde_json::to_string(&request).map_err(|e| unreachable(e.into()))?;
    line.push('\n');
    let mut stream = std::os::unix::net::UnixStream::connect(path).map_err(unreachable)?;
    stream
        .set_read_timeout(Some(timeout))
        .map_err(unreachable)?;
    // A server that refuses the peer answers without reading the request, so
    // the write can fail (EPIPE) while the answer is waiting: read it anyway.
    let written = stream.write_all(line.as_bytes());
    let deadline = std::time::Instant::now() + timeout;
    let mut reader = BufReader::new(stream);
    let mut answer = String::new();
    let mut read = reader.read_line(&mut answer);
    while let Ok(p) = serde_json::from_str::<ProgressLine>(&answer) {
        progress(&p.progress);
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let _ = reader
            .get_ref()
            .set_read_timeout(Some(left.max(Duration::from_millis(1))));
        answer.clear();
        read = reader.read_line(&mut answer);
    }
    if let (Err(e), Ok(0) | Err(_)) = (written, &read) {
        return Err(unreachable(e));
    }
    read.map_err(|e| {
        if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut {
            Error::ReloadFailed(format!(
                "no answer within {}",
                humantime::format_duration(timeout)
            ))
        } else {
            unreachable(e)
        }
    })?;
    serde_json::from_str(&answer).map_err(|_| {
        Error::Control(format!(
            "bad answer from {}: {:?}",
            path.display(),
            answer.trim()
        ))
    })
}

fn error_of(answer: &Response) -> String {
    answer
        .error
        .clone()
        .unwrap_or_else(|| "unknown error".to_string())
}

/// The running nogaps a client command can mean.
enum Found {
    One(PathBuf),
    /// Several instances run; their names.
    Several(Vec<(String, PathBuf)>),
}

/// `--control PATH`, the instance NAME, the unit's own runtime directory
/// (`ExecReload=` runs with it), or else the one instance that runs.
fn find(target: &Target, env: &Environment) -> Found {
    if let Some(p) = &target.control {
        return Found::One(p.clone());
    }
    let base = env.instances_dir();
    if let Some(name) = &target.name {
        return Found::One(base.join(name).join("control.sock"));
    }
    if env.has_runtime_directory() {
        return Found::One(default_path(None, env));
    }
    let mut candidates = vec![("(default)".to_string(), base.join("control.sock"))];
    if let Ok(dirs) = std::fs::read_dir(&base) {
        let mut named: Vec<(String, PathBuf)> = dirs
            .filter_map(Result::ok)
            .filter(|d| d.path().is_dir())
            .map(|d| {
                let name = d.file_name().to_string_lossy().into_owned();
                (name, d.path().join("control.sock"))
            })
            .collect();
        named.sort();
        candidates.extend(named);
    }
    let mut live: Vec<(String, PathBuf)> = candidates
        .into_iter()
        .filter(|(_, p)| std::os::unix::net::UnixStream::connect(p).is_ok())
        .collect();
    match live.len() {
        0 => Found::One(base.join("control.sock")),
        1 => Found::One(live.remove(0).1),
        _ => Found::Several(live),
    }
}

fn names(several: &[(String, PathBuf)]) -> String {
    several
        .iter()
        .map(|(n, _)| n.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Answer a `reload --wait` client that an earlier image carried over.
pub fn answer_reload(client: OwnedFd, result: Result<u64, String>) {
    let answer = match result {
        Ok(generation) => Response {
            ok: true,
            generation: Some(generation),
            ..Response::default()
        },
        Err(error) => Response::failed(error),
    };
    write_answer(client, &answer);
}

fn write_answer(client: OwnedFd, answer: &Response) {
    let mut stream = std::os::unix::net::UnixStream::from(client);
    let text = serde_json::to_string(answer).unwrap_or_default() + "\n";
    if let Err(e) = stream.write_all(text.as_bytes()) {
        tracing::debug!(error = %e, "cannot answer a carried control client");
    }
}

/// Answer an `upgrade --wait` client that the old image carried over.
pub fn answer_upgraded(client: OwnedFd, generation: Option<u64>) {
    let answer = Response {
        ok: true,
        generation,
        upgraded: Some(Upgraded {
            pid: std::process::id(),
            version: env!("CARGO_PKG_VERSION").to_string(),
        }),
        ..Response::default()
    };
    write_answer(client, &answer);
}

pub fn client_upgrade(args: &UpgradeArgs, env: &Environment) -> Result<(), Error> {
    let path = match find(&args.target, env) {
        Found::One(p) => p,
        Found::Several(several) => {
            return Err(Error::Usage(format!(
                "several nogap instances run ({}): name one, e.g. nogap upgrade {} --wait",
                names(&several),
                several[0].0
            )))
        }
    };
    let answer = ask(&path, Command::Upgrade { wait: args.wait }, args.timeout)?;
    if !answer.ok {
        let error = error_of(&answer);
        return Err(if args.wait {
            Error::UpgradeFailed(error)
        } else {
            Error::Control(error)
        });
    }
    match answer.upgraded {
        Some(u) => println!(
            "nogap {} runs as pid {} (upgraded in place)",
            u.version, u.pid
        ),
        None => println!("upgrade requested"),
    }
    Ok(())
}

pub fn client_reload(args: &ReloadArgs, env: &Environment) -> Result<(), Error> {
    let path = match find(&args.target, env) {
        Found::One(p) => p,
        Found::Several(several) => {
            return Err(Error::Usage(format!(
                "several nogap instances run ({}): name one, e.g. nogap reload {} --wait",
                names(&several),
                several[0].0
            )))
        }
    };
    use std::io::IsTerminal;
    let terminal = std::io::stdout().is_terminal();
    let command = Command::Reload {
        wait: args.wait,
        progress: args.wait && terminal,
    };
    let started = std::time::Instant::now();
    let mut shown = false;
    let answer = ask_with(&path, command, args.timeout, |p| {
        // One line, rewritten in place.
        print!("\r\x1b[K{}", p.text);
        let _ = std::io::stdout().flush();
        shown = true;
    });
    if shown {
        print!("\r\x1b[K");
        let _ = std::io::stdout().flush();
    }
    let answer = answer?;
    if !answer.ok {
        let error = error_of(&answer);
        return Err(if args.wait {
            Error::ReloadFailed(error)
        } else {
            Error::Control(error)
        });
    }
    let took =
        humantime::format_duration(Duration::from_millis(started.elapsed().as_millis() as u64));
    match answer.generation {
        Some(g) => println!("generation {g} is serving (reload took {took})"),
        None => println!("reload requested"),
    }
    Ok(())
}

fn status_of(path: &Path) -> Result<Box<StatusReport>, Error> {
    let answer = ask(path, Command::Status, Duration::from_secs(10))?;
    match answer {
        Response {
            ok: true,
            status: Some(s),
            ..
        } => Ok(s),
        other => Err(Error::Control(error_of(&other))),
    }
}

pub fn client_status(args: &StatusArgs, env: &Environment) -> Result<(), Error> {
    let path = match find(&args.target, env) {
        Found::One(p) => p,
        Found::Several(several) => {
            // One line per instance; `nogap status NAME` tells more.
            for (name, path) in &several {
                match status_of(path) {
                    Ok(s) => println!("{name}: pid {}: {}", s.pid, s.status),
                    Err(e) => println!("{name}: {e}"),
                }
            }
            return Ok(());
        }
    };
    let status = status_of(&path)?;
    if args.json {
        let text = serde_json::to_string(&status)
            .map_err(|e| Error::Control(format!("cannot print the status: {e}")))?;
        println!("{text}");
        return Ok(());
    }
    print!("{}", status.text());
    Ok(())
}

impl StatusReport {
    /// The generation a reload starts, and how many of its workers are ready.
    pub fn starting_progress(&self) -> Option<Progress> {
        let g = self.reloading?;
        let of = self.workers.iter().filter(|w| w.generation == g);
        let workers = of.clone().count() as u32;
        let ready = of.filter(|w| w.state == "ready").count() as u32;
        Some(Progress {
            generation: g,
            stage: "starting".into(),
            ready: Some(ready),
            workers: Some(workers),
            text: format!("starting generation {g}: {ready}/{workers} ready"),
        })
    }
}

impl WorkerStatus {
    /// One line for `nogap status`.
    fn line(&self) -> String {
        let pid = self.pid.map_or("-".to_string(), |p| p.to_string());
        let mut line = format!(
            "worker {} pid {pid} {} restarts {}",
            self.slot, self.state, self.restarts
        );
        if let Some(left) = self.drain_left_secs {
            line.push_str(&format!(", SIGKILL in {left:.0}s"));
        }
        if let Some(r) = self.ready_for_secs {
            let up = humantime::format_duration(Duration::from_secs(r as u64));
            line.push_str(&format!("  up {up}"));
        }
        if let (Some(open), Some(limit)) = (self.fds_open, self.fds_limit) {
            line.push_str(&format!("  fds {open}/{limit}"));
        }
        if let Some(ago) = self.last_ping_secs_ago {
            line.push_str(&format!("  ping {ago:.1}s ago"));
        }
        if self.slot_unhealthy_seen > 0 || self.slot_replacements > 0 {
            line.push_str(&format!(
                "  unhealthy seen {} replaced {}",
                self.slot_unhealthy_seen, self.slot_replacements
            ));
        }
        if let Some(why) = &self.unhealthy {
            line.push_str(&format!("  UNHEALTHY: {why}"));
        }
        line
    }
}

impl StatusReport {
    /// The report of nogap's state (`snapshot`) and of its sockets' queues
    /// now; each worker's descriptors are read from /proc.
    pub fn new(snapshot: &Snapshot, sockets: &Sockets, uptime: Duration) -> StatusReport {
        let secs = |d: Duration| d.as_secs_f64();
        let workers = snapshot
            .workers
            .iter()
            .map(|w| {
                let fds = w.pid.and_then(crate::monitor::fd_usage);
                WorkerStatus {
                    slot: w.slot,
                    generation: w.generation,
                    pid: w.pid,
                    state: w.state.to_string(),
                    ready_for_secs: w.ready_for.map(secs),
                    restarts: w.restarts,
                    status: w.status.clone(),
                    last_ping_secs_ago: w.last_ping_ago.map(secs),
                    fds_open: fds.map(|f| f.0),
                    fds_limit: fds.map(|f| f.1),
                    unhealthy: w.unhealthy.as_ref().map(|u| u.to_string()),
                    slot_unhealthy_seen: w.slot_health.unhealthy,
                    slot_replacements: w.slot_health.replacements,
                    drain_left_secs: w.drain_left.map(secs),
                }
            })
            .collect();
        let sockets_status = sockets
            .listeners
            .iter()
            .map(|(i, l)| {
                let q = sockets.queue(QueueId {
                    listener: i,
                    slot: None,
                });
                SocketStatus {
                    name: l.name.clone(),
                    address: l.endpoint.to_string(),
                    inherited: l.inherited(),
                    handover: if sockets.steering.steers(i) {
                        "steer"
                    } else {
                        "shared"
                    }
                    .to_string(),
                    queue: q.map(|q| q.depth),
                    backlog: q.map(|q| q.backlog),
                    stalled: snapshot.stalled(i),
                    slot_queues: sockets.slot_depths(i),
                    stalls: snapshot.stalls(i),
                }
            })
            .collect();
        StatusReport {
            version: VERSION,
            pid: std::process::id(),
            uptime_secs: uptime.as_secs(),
            generation: snapshot.generation,
            reloading: snapshot.reloading,
            stopping: snapshot.stopping,
            status: snapshot.status.clone(),
            last_reload: snapshot.last_reload.as_ref().map(LastReload::from),
            healthy: snapshot.healthy,
            workers,
            sockets: sockets_status,
            steering: sockets.steering.active().then(|| {
                let (pools, target) = sockets.steering.pools();
                SteeringStatus { pools, target }
            }),
            events: snapshot
                .events
                .iter()
                .map(|e| {
                    let at = std::time::SystemTime::now()
                        .checked_sub(e.ago)
                        .unwrap_or(std::time::UNIX_EPOCH);
                    EventStatus {
                        kind: e.kind.name().to_string(),
                        generation: e.generation,
                        worker: e.worker,
                        reason: e.reason.clone(),
                        secs_ago: secs(e.ago),
                        at: humantime::format_rfc3339_seconds(at).to_string(),
                    }
                })
                .collect(),
            canary: snapshot.canary.as_ref().map(|c| CanaryStatus {
                generation: c.generation,
                percent: c.percent,
                duration_secs: secs(c.duration),
                left_secs: secs(c.left),
            }),
        }
    }

    /// `nogap status` for a person: a line for nogap, one per socket, the
    /// workers by generation (serving, starting, draining), and the recent
    /// events.
    pub fn text(&self) -> String {
        let mut out = format!("nogap pid {}: {}\n", self.pid, self.status);
        for sock in &self.sockets {
            let mut line = format!("  socket {} {}  {}", sock.name, sock.address, sock.handover);
            if let (Some(q), Some(b)) = (sock.queue, sock.backlog) {
                line.push_str(&format!("  queue {q}/{b}  stalls {}", sock.stalls));
            }
            if sock.stalled {
                line.push_str("  STALLED");
            }
            out.push_str(&line);
            out.push('\n');
        }
        // Workers by generation: the serving one, the one starting, then
        // the older ones draining.
        let mut generations: Vec<u64> = self.workers.iter().map(|w| w.generation).collect();
        generations.sort_by_key(|g| std::cmp::Reverse(*g));
        generations.dedup();
        for g in generations {
            let workers: Vec<&WorkerStatus> =
                self.workers.iter().filter(|w| w.generation == g).collect();
            let canary = self.canary.as_ref().filter(|c| c.generation == g);
            let role = if let Some(c) = canary {
                &*format!("canary ({}% of new connections)", c.percent)
            } else if Some(g) == self.reloading || (self.generation.is_none() && !self.stopping) {
                "starting"
            } else if Some(g) == self.generation && !self.stopping {
                "serving"
            } else {
                "draining"
            };
            out.push_str(&format!(
                "  generation {g} {role} ({} worker{})\n",
                workers.len(),
                if workers.len() == 1 { "" } else { "s" }
            ));
            for w in workers {
                out.push_str(&format!("    {}\n", w.line()));
            }
        }
        if !self.events.is_empty() {
            out.push_str("  recent events:\n");
            for e in &self.events {
                let ago = humantime::format_duration(Duration::from_secs(e.secs_ago as u64));
                let who = match e.worker {
                    Some(w) => format!("worker {w} of generation {}", e.generation),
                    None => format!("generation {}", e.generation),
                };
                out.push_str(&format!(
                    "    {} ({ago} ago) {} {who}: {}\n",
                    e.at, e.kind, e.reason
                ));
            }
        }
        out
    }
}

/// `reload --wait` clients waiting for the outcome of their reload, by
/// waiter id; bounded, so abandoned waits cannot pile up.
pub struct Waiters {
    waiting: std::collections::HashMap<u64, oneshot::Sender<Result<u64, String>>>,
    next: u64,
}

impl Waiters {
    /// Clients that may wait at once; more are answered at once.
    pub const MAX: usize = 32;

    pub fn new() -> Waiters {
        Waiters {
            waiting: std::collections::HashMap::new(),
            next: 1,
        }
    }

    /// Wait with `reply`: its id, or None (answered already) when
    /// [`Waiters::MAX`] wait. Clients that went away are forgotten first.
    pub fn add(&mut self, reply: oneshot::Sender<Result<u64, String>>) -> Option<u64> {
        self.forget_left();
        if self.waiting.len() >= Self::MAX {
            let max = Self::MAX;
            let _ = reply.send(Err(format!(
                "{max} clients wait for a reload already; try again later"
            )));
            return None;
        }
        let id = self.next;
        self.next += 1;
        self.waiting.insert(id, reply);
        Some(id)
    }

    /// Forgets the waiters whose clients went away.
    pub fn forget_left(&mut self) {
        self.waiting.retain(|_, tx| !tx.is_closed());
    }

    /// Answer waiter `id`; false if it does not wait here.
    pub fn answer(&mut self, id: u64, result: Result<u64, String>) -> bool {
        match self.waiting.remove(&id) {
            Some(tx) => {
                let _ = tx.send(result);
                true
            }
            None => false,
        }
    }

    pub fn contains(&self, id: u64) -> bool {
        self.waiting.contains_key(&id)
    }

    /// Ids from `next` on are free (waiters carried by a self-upgrade hold
    /// the ones below).
    pub fn start_at(&mut self, next: u64) {
        self.next = self.next.max(next);
    }
}

impl Default for Waiters {
    fn default() -> Self {
        Waiters::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_by_version_then_command() {
        assert_eq!(
            parse_request(r#"{"version":1,"command":"reload","wait":true}"#),
            Ok(Command::Reload {
                wait: true,
                progress: false
            })
        );
        assert_eq!(
            parse_request(r#"{"version":1,"command":"reload"}"#),
            Ok(Command::Reload {
                wait: false,
                progress: false
            })
        );
        assert_eq!(
            parse_request(r#"{"version":1,"command":"reload","wait":true,"progress":true}"#),
            Ok(Command::Reload {
                wait: true,
                progress: true
            })
        );
        assert_eq!(
            parse_request("{\"version\":1,\"command\":\"status\"}\n"),
            Ok(Command::Status)
        );
        let e = parse_request(r#"{"version":2,"command":"frobnicate"}"#).unwrap_err();
        assert!(e.contains("version 2"), "{e}");
        let e = parse_request(r#"{"version":1,"command":"frobnicate"}"#).unwrap_err();
        assert_eq!(e, "unknown command 'frobnicate'");
        assert!(parse_request("garbage")
            .unwrap_err()
            .starts_with("bad request"));
        assert!(parse_request(r#"{"command":"status"}"#).is_err());
    }

    #[test]
    fn requests_and_answers_keep_their_wire_form() {
        let line = serde_json::to_string(&RequestLine {
            version: VERSION,
            command: Command::Reload {
                wait: true,
                progress: false,
            },
        })
        .unwrap();
        // As version 1 always had it: older servers read it the same.
        assert_eq!(line, r#"{"version":1,"command":"reload","wait":true}"#);
        let p = ProgressLine {
            progress: Progress {
                generation: 4,
                stage: "starting".into(),
                ready: Some(2),
                workers: Some(4),
                text: "starting generation 4: 2/4 ready".into(),
            },
        };
        assert_eq!(
            serde_json::to_string(&p).unwrap(),
            r#"{"progress":{"generation":4,"stage":"starting","ready":2,"workers":4,"text":"starting generation 4: 2/4 ready"}}"#
        );
        // A final answer is never taken for a progress line.
        assert!(serde_json::from_str::<ProgressLine>(r#"{"ok":true,"generation":3}"#).is_err());
        let ok = Response {
            ok: true,
            generation: Some(3),
            ..Response::default()
        };
        assert_eq!(
            serde_json::to_string(&ok).unwrap(),
            r#"{"ok":true,"generation":3}"#
        );
        assert_eq!(
            serde_json::to_string(&Response::failed("no")).unwrap(),
            r#"{"ok":false,"error":"no"}"#
        );
        let last = LastReload::Failed {
            generation: 2,
            reason: "x".into(),
            output: Vec::new(),
        };
        assert_eq!(
            serde_json::to_string(&last).unwrap(),
            r#"{"result":"failed","generation":2,"reason":"x"}"#
        );
    }
}
