//! The control channel: a unix stream socket (mode 0600) that `nogap reload`
//! and `nogap status` talk to.
//!
//! Protocol, version 1: the client sends one JSON line, the server answers one
//! JSON line and closes.
//!
//! | request | answer |
//! |---------|--------|
//! | `{"version":1,"command":"reload"}` | `{"ok":true}` once the reload is asked for |
//! | `{"version":1,"command":"reload","wait":true}` | `{"ok":true,"generation":N}` once generation N serves, or `{"ok":false,"error":"..."}` |
//! | `{"version":1,"command":"status"}` | `{"ok":true,"status":{...}}` |
//! | anything else | `{"ok":false,"error":"..."}` |
//!
//! Only root and nogap's own uid may ask (`SO_PEERCRED`). A bad request gets
//! an error answer and never touches the supervisor.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};

use crate::cli::{ReloadArgs, StatusArgs};
use crate::error::Error;
use crate::supervisor::{Environment, Request};

pub const VERSION: u64 = 1;
const MAX_REQUEST: u64 = 4096;

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
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let tx = tx.clone();
            tokio::spawn(async move {
                if let Err(e) = connection(stream, tx).await {
                    tracing::debug!(error = %e, "control connection");
                }
            });
        }
    });
    Ok(Some(Control { path, task }))
}

#[derive(Deserialize)]
struct RequestLine {
    version: u64,
    command: String,
    #[serde(default)]
    wait: bool,
}

async fn connection(stream: UnixStream, tx: mpsc::Sender<Request>) -> std::io::Result<()> {
    let me = nix::unistd::geteuid().as_raw();
    let uid = stream.peer_cred()?.uid();
    let (rd, mut wr) = stream.into_split();
    let answer = if uid != 0 && uid != me {
        tracing::warn!(uid, "control request refused: not root or nogap's uid");
        json!({"ok": false, "error": format!("permission denied for uid {uid}")})
    } else {
        let mut line = String::new();
        let mut rd = tokio::io::BufReader::new(tokio::io::AsyncReadExt::take(rd, MAX_REQUEST));
        match tokio::time::timeout(Duration::from_secs(5), rd.read_line(&mut line)).await {
            Ok(Ok(_)) => handle(&line, &tx).await,
            Ok(Err(e)) => json!({"ok": false, "error": format!("bad request: {e}")}),
            Err(_) => json!({"ok": false, "error": "timed out reading the request"}),
        }
    };
    wr.write_all(format!("{answer}\n").as_bytes()).await?;
    wr.shutdown().await
}

async fn handle(line: &str, tx: &mpsc::Sender<Request>) -> Value {
    let req: RequestLine = match serde_json::from_str(line.trim()) {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(error = %e, "bad control request ignored");
            return json!({"ok": false, "error": format!("bad request: {e}")});
        }
    };
    if req.version != VERSION {
        return json!({"ok": false, "error": format!("unsupported protocol version {} (this nogap speaks {VERSION})", req.version)});
    }
    let gone = || json!({"ok": false, "error": "nogap is shutting down"});
    match req.command.as_str() {
        "reload" if req.wait => {
            let (reply, rx) = oneshot::channel();
            if tx
                .send(Request::Reload { reply: Some(reply) })
                .await
                .is_err()
            {
                return gone();
            }
            match rx.await {
                Ok(Ok(generation)) => json!({"ok": true, "generation": generation}),
                Ok(Err(error)) => json!({"ok": false, "error": error}),
                Err(_) => gone(),
            }
        }
        "reload" => match tx.send(Request::Reload { reply: None }).await {
            Ok(()) => json!({"ok": true}),
            Err(_) => gone(),
        },
        "status" => {
            let (reply, rx) = oneshot::channel();
            if tx.send(Request::Status { reply }).await.is_err() {
                return gone();
            }
            match rx.await {
                Ok(status) => json!({"ok": true, "status": status}),
                Err(_) => gone(),
            }
        }
        other => json!({"ok": false, "error": format!("unknown command '{other}'")}),
    }
}

// ---- clients -------------------------------------------------------------------

fn ask(path: &Path, request: Value, timeout: Duration) -> Result<Value, Error> {
    let unreachable = |e: std::io::Error| {
        Error::Control(format!("cannot reach nogap at {}: {e}", path.display()))
    };
    let mut stream = std::os::unix::net::UnixStream::connect(path).map_err(unreachable)?;
    stream
        .set_read_timeout(Some(timeout))
        .map_err(unreachable)?;
    // A server that refuses the peer answers without reading the request, so
    // the write can fail (EPIPE) while the answer is waiting: read it anyway.
    let written = stream.write_all(format!("{request}\n").as_bytes());
    let mut line = String::new();
    let read = BufReader::new(stream).read_line(&mut line);
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
    let answer: Value = serde_json::from_str(&line).map_err(|_| {
        Error::Control(format!(
            "bad answer from {}: {:?}",
            path.display(),
            line.trim()
        ))
    })?;
    Ok(answer)
}

fn error_of(answer: &Value) -> String {
    answer["error"]
        .as_str()
        .unwrap_or("unknown error")
        .to_string()
}

pub fn client_reload(args: &ReloadArgs, env: &Environment) -> Result<(), Error> {
    let path = default_path(args.control.as_deref(), env);
    let answer = ask(
        &path,
        json!({"version": VERSION, "command": "reload", "wait": args.wait}),
        args.timeout,
    )?;
    if answer["ok"] != json!(true) {
        let error = error_of(&answer);
        return Err(if args.wait {
            Error::ReloadFailed(error)
        } else {
            Error::Control(error)
        });
    }
    match answer["generation"].as_u64() {
        Some(g) => println!("generation {g} is serving"),
        None => println!("reload requested"),
    }
    Ok(())
}

pub fn client_status(args: &StatusArgs, env: &Environment) -> Result<(), Error> {
    let path = default_path(args.control.as_deref(), env);
    let answer = ask(
        &path,
        json!({"version": VERSION, "command": "status"}),
        Duration::from_secs(10),
    )?;
    if answer["ok"] != json!(true) {
        return Err(Error::Control(error_of(&answer)));
    }
    let s = &answer["status"];
    if args.json {
        println!("{s}");
        return Ok(());
    }
    println!(
        "nogap pid {}: {}",
        s["pid"],
        s["status"].as_str().unwrap_or("")
    );
    for sock in s["sockets"].as_array().into_iter().flatten() {
        let mut line = format!(
            "  socket {} {}",
            sock["name"].as_str().unwrap_or(""),
            sock["address"].as_str().unwrap_or("")
        );
        if let Some(mode) = sock["handover"].as_str() {
            line.push_str(&format!("  {mode}"));
        }
        if let (Some(q), Some(b)) = (sock["queue"].as_u64(), sock["backlog"].as_u64()) {
            line.push_str(&format!("  queue {q}/{b}  stalls {}", sock["stalls"]));
        }
        if sock["stalled"] == json!(true) {
            line.push_str("  STALLED");
        }
        println!("{line}");
    }
    for w in s["workers"].as_array().into_iter().flatten() {
        let mut line = format!(
            "  worker {} gen {} pid {} {} restarts {}",
            w["slot"],
            w["generation"],
            w["pid"],
            w["state"].as_str().unwrap_or(""),
            w["restarts"]
        );
        if let (Some(open), Some(limit)) = (w["fds_open"].as_u64(), w["fds_limit"].as_u64()) {
            line.push_str(&format!("  fds {open}/{limit}"));
        }
        if let Some(ago) = w["last_ping_secs_ago"].as_f64() {
            line.push_str(&format!("  ping {ago:.1}s ago"));
        }
        line.push_str(&format!(
            "  unhealthy seen {} replaced {}",
            w["slot_unhealthy_seen"], w["slot_replacements"]
        ));
        if let Some(why) = w["unhealthy"].as_str() {
            line.push_str(&format!("  UNHEALTHY: {why}"));
        }
        println!("{line}");
    }
    Ok(())
}
