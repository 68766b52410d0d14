//! einhorn's command socket, for `--fds-as einhorn`: the unix stream socket
//! a worker finds in `EINHORN_SOCK_PATH` and sends its manual ACK to
//! (`Einhorn::Worker.ack!`).
//!
//! The protocol, as einhorn speaks it (`lib/einhorn/client.rb`,
//! `lib/einhorn/command/interface.rb`): one request per line, a mapping
//! serialized as YAML (Ruby's client) or JSON (einhorn's README, for other
//! languages), with `%` written `%25` and newlines `%0A`. `worker:ack` with
//! the worker's `pid` gets no answer, and einhorn closes the connection after
//! it. Any other command gets einhorn's answer to a command it does not
//! know, `{"message": ...}` (plus `request_id` when the request had an `id`).
//!
//! Each worker has its own socket, so an ACK counts for the worker whose
//! socket it came on, whatever `pid` it names: a worker's child (a wrapper,
//! a preforking server) may ACK for it. Who connected is what counts
//! (`SO_PEERCRED`, forwarded as the [`Sender`]): the policy takes the ACK
//! only from the worker or a process of its process group. An ACK without an integer `pid` is
//! rejected, as einhorn rejects it. An ACK is forwarded as
//! [`Message::Ready`], the same as `READY=1` on the worker's notify socket;
//! a malformed request is forwarded as an error (logged, then ignored).

use crate::spec::truncate;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc;
use tokio::task::{JoinHandle, JoinSet};

use super::notify::{Delivery, Message, Sender};

/// One request a worker sent.
#[derive(Clone, Debug, PartialEq)]
pub enum Request {
    /// `worker:ack`: the worker is up. `pid` is the one it sent.
    Ack { pid: i64 },
    /// Anything else (einhornsh's `ehlo`, `upgrade`...): answered as einhorn
    /// answers a command it does not know. `id` is the request's `id`.
    Other {
        command: Option<String>,
        id: Option<Value>,
    },
}

/// Parse one line, without its newline.
pub fn parse(line: &[u8]) -> Result<Request, String> {
    let text = String::from_utf8(unescape(line)).map_err(|_| "not UTF-8".to_string())?;
    let map = if text.trim_start().starts_with('{') {
        serde_json::from_str::<Map<String, Value>>(&text)
            .map_err(|e| format!("bad JSON ({e}): {:?}", truncate(&text)))?
    } else {
        parse_yaml(&text)?
    };
    let command = match map.get("command") {
        Some(Value::String(c)) => Some(c.clone()),
        _ => None,
    };
    if command.as_deref() == Some("worker:ack") {
        return match map.get("pid").and_then(Value::as_i64) {
            Some(pid) => Ok(Request::Ack { pid }),
            None => Err(format!(
                "worker:ack without an integer pid: {:?}",
                truncate(&text)
            )),
        };
    }
    Ok(Request::Other {
        command,
        id: map.get("id").cloned(),
    })
}

/// einhorn's answer to a request nogap does not serve, as a line.
pub fn reply(command: Option<&str>, id: Option<&Value>) -> Vec<u8> {
    let message = match command {
        Some(c) => format!(
            "Unrecognized command: {c:?}\n\nnogap's einhorn socket only takes worker:ack.\n"
        ),
        None => "No \"command\" parameter provided; not sure what you want me to do.".into(),
    };
    let mut response = Map::new();
    response.insert("message".into(), message.into());
    if let Some(id) = id {
        response.insert("request_id".into(), id.clone());
    }
    // JSON is the YAML einhorn's client reads.
    let line = Value::Object(response).to_string();
    let mut out = line.replace('%', "%25").replace('\n', "%0A").into_bytes();
    out.push(b'\n');
    out
}

/// `%25` → `%` and `%0A` → newline, in one pass; any other `%` stays.
fn unescape(line: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(line.len());
    let mut i = 0;
    while i < line.len() {
        let rest = &line[i..];
        if rest.starts_with(b"%25") {
            out.push(b'%');
            i += 3;
        } else if rest.starts_with(b"%0A") {
            out.push(b'\n');
            i += 3;
        } else {
            out.push(rest[0]);
            i += 1;
        }
    }
    out
}

/// The YAML Ruby's `YAML.dump` writes for a flat hash: an optional `---`,
/// then `key: value` lines. Nested values (indented or `- ` lines) are
/// skipped: nogap needs only `command`, `pid` and `id`.
fn parse_yaml(text: &str) -> Result<Map<String, Value>, String> {
    let mut map = Map::new();
    let mut first = true;
    for line in text.lines().map(str::trim_end) {
        if line.is_empty() || line.starts_with('#') || line == "..." {
            continue;
        }
        if std::mem::take(&mut first) && line == "---" {
            continue;
        }
        if line.starts_with([' ', '\t', '-']) && !map.is_empty() {
            continue;
        }
        let (key, value) = match line.split_once(": ") {
            Some((k, v)) => (k, v.trim_start()),
            None => match line.strip_suffix(':') {
                Some(k) => (k, ""),
                None => return Err(format!("not a YAML or JSON mapping: {:?}", truncate(text))),
            },
        };
        let key = match scalar(key)? {
            Value::String(k) => k,
            other => other.to_string(),
        };
        map.insert(key, scalar(value)?);
    }
    if map.is_empty() {
        return Err(format!("empty request: {:?}", truncate(text)));
    }
    Ok(map)
}

/// A YAML scalar: quoted string, integer, null or plain string.
fn scalar(s: &str) -> Result<Value, String> {
    if s.starts_with('"') {
        return serde_json::from_str::<String>(s)
            .map(Value::from)
            .map_err(|_| format!("bad quoted string {:?}", truncate(s)));
    }
    if let Some(inner) = s.strip_prefix('\'') {
        return match inner.strip_suffix('\'') {
            Some(inner) => Ok(inner.replace("''", "'").into()),
            None => Err(format!("bad quoted string {:?}", truncate(s))),
        };
    }
    Ok(match s {
        "" | "~" | "null" => Value::Null,
        _ => match s.parse::<i64>() {
            Ok(n) => n.into(),
            Err(_) => s.into(),
        },
    })
}

/// The longest line read; a longer one closes the connection.
const MAX_LINE: usize = 64 * 1024;

/// Connections served at once per worker; more are closed at once.
const MAX_CONNECTIONS: usize = 16;

/// A worker's einhorn command socket. Dropping it closes its connections
/// and removes the socket file.
pub struct EinhornSocket {
    path: PathBuf,
    acceptor: JoinHandle<()>,
}

impl EinhornSocket {
    /// Bind at `path` and forward each request as `(key, result)`: an ACK as
    /// `Ok([Ready])`, a malformed request as `Err`.
    pub fn bind<K: Copy + Send + fmt::Display + 'static>(
        path: PathBuf,
        key: K,
        tx: mpsc::Sender<Delivery<K>>,
    ) -> io::Result<EinhornSocket> {
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path)?;
        let acceptor = tokio::spawn(async move {
            // Dropped with this task: aborts the connections.
            let mut conns = JoinSet::new();
            let mut backoff = super::notify::Backoff::default();
            loop {
                tokio::select! {
                    accepted = listener.accept() => match accepted {
                        Ok((stream, _)) if conns.len() < MAX_CONNECTIONS => {
                            backoff.reset();
                            conns.spawn(serve(stream, key, tx.clone()));
                        }
                        Ok(_) => tracing::debug!(worker_id = %key, "too many einhorn connections: one closed"),
                        Err(e) => {
                            tracing::warn!(worker_id = %key, error = %e, "einhorn command socket: accept failed");
                            backoff.wait().await;
                            continue;
                        }
                    },
                    Some(_) = conns.join_next(), if !conns.is_empty() => {}
                }
            }
        });
        Ok(EinhornSocket { path, acceptor })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for EinhornSocket {
    fn drop(&mut self) {
        self.acceptor.abort();
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Read one connection's lines until EOF, an ACK or an over-long line.
async fn serve<K: Copy + fmt::Display>(stream: UnixStream, key: K, tx: mpsc::Sender<Delivery<K>>) {
    // Who connected, as the kernel says (SO_PEERCRED at connect time).
    let sender = stream
        .peer_cred()
        .ok()
        .and_then(|c| c.pid())
        .map(Sender::of);
    let (read, mut write) = stream.into_split();
    let mut read = BufReader::new(read);
    let mut line = Vec::new();
    loop {
        line.clear();
        let limit = (MAX_LINE + 1) as u64;
        match (&mut read).take(limit).read_until(b'\n', &mut line).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        if line.last() != Some(&b'\n') {
            if line.len() > MAX_LINE {
                let error = format!("einhorn command socket: line longer than {MAX_LINE} bytes");
                let _ = tx.send((key, sender, Err(error))).await;
            } else {
                tracing::debug!(worker_id = %key, "einhorn connection closed in a line");
            }
            return;
        }
        line.pop();
        match parse(&line) {
            Ok(Request::Ack { pid }) => {
                tracing::debug!(worker_id = %key, pid, "einhorn worker:ack");
                // einhorn closes the connection after an ACK, too.
                let _ = tx.send((key, sender, Ok(vec![Message::Ready]))).await;
                return;
            }
            Ok(Request::Other { command, id }) => {
                tracing::debug!(worker_id = %key, command = ?command, "einhorn command not served");
                let answer = reply(command.as_deref(), id.as_ref());
                if write.write_all(&answer).await.is_err() {
                    return;
                }
            }
            Err(e) => {
                let error = format!("einhorn command socket: {e}");
                if tx.send((key, sender, Err(error))).await.is_err() {
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `Einhorn::Client::Transport.serialize_message` writes.
    fn ruby_line(yaml: &str) -> Vec<u8> {
        yaml.replace('%', "%25").replace('\n', "%0A").into_bytes()
    }

    #[test]
    fn acks() {
        // Einhorn::Worker.ack! (YAML.dump of the hash).
        let line = ruby_line("---\ncommand: worker:ack\npid: 1234\n");
        assert_eq!(line, b"---%0Acommand: worker:ack%0Apid: 1234%0A");
        assert_eq!(parse(&line), Ok(Request::Ack { pid: 1234 }));
        // The JSON einhorn's README gives for other languages.
        assert_eq!(
            parse(br#"{"command":"worker:ack", "pid":99}"#),
            Ok(Request::Ack { pid: 99 })
        );
        // Any pid: the socket says whose ACK it is.
        assert_eq!(
            parse(b"command: 'worker:ack'%0Apid: 1"),
            Ok(Request::Ack { pid: 1 })
        );
        assert!(parse(br#"{"command":"worker:ack"}"#).is_err());
        assert!(parse(br#"{"command":"worker:ack","pid":"12"}"#).is_err());
        assert!(parse(b"---%0Acommand: worker:ack%0A").is_err());
    }

    #[test]
    fn unescapes() {
        assert_eq!(unescape(b"a%25b%0Ac%0a%41%"), b"a%b\nc%0a%41%");
        assert_eq!(unescape(b"%250A"), b"%0A");
        let line = ruby_line("---\ncommand: \"100%\"\nid: 3\n");
        assert_eq!(
            parse(&line),
            Ok(Request::Other {
                command: Some("100%".into()),
                id: Some(3.into())
            })
        );
    }

    #[test]
    fn other_commands_get_einhorns_answer() {
        let line = ruby_line("---\ncommand: ehlo\nuser: root\nid: 7\nargs:\n- a\n");
        let Ok(Request::Other { command, id }) = parse(&line) else {
            panic!("{:?}", parse(&line));
        };
        assert_eq!(command.as_deref(), Some("ehlo"));
        let answer = reply(command.as_deref(), id.as_ref());
        let text = String::from_utf8(answer).unwrap();
        assert!(text.ends_with('\n') && !text[..text.len() - 1].contains('\n'));
        let decoded = String::from_utf8(unescape(text.trim_end().as_bytes())).unwrap();
        let v: Value = serde_json::from_str(&decoded).unwrap();
        assert_eq!(v["request_id"], 7);
        assert!(v["message"]
            .as_str()
            .unwrap()
            .starts_with("Unrecognized command: \"ehlo\"\n"));
        assert_eq!(
            parse(br#"{"pid":1}"#),
            Ok(Request::Other {
                command: None,
                id: None
            })
        );
        let v: Value = serde_json::from_slice(reply(None, None).trim_ascii_end()).unwrap();
        assert!(v["message"].as_str().unwrap().starts_with("No \"command\""));
        assert_eq!(v.get("request_id"), None);
    }

    #[test]
    fn garbage() {
        assert!(parse(b"").is_err());
        assert!(parse(b"---").is_err());
        assert!(parse(b"hello").is_err());
        assert!(parse(b"{not json").is_err());
        assert!(parse(b"[1, 2]").is_err());
        assert!(parse(b"\xff\xfe: 1").is_err());
        assert!(parse(b"command: \"unterminated").is_err());
        let e = parse(&[b'x'; 1000]).unwrap_err();
        assert!(e.len() < 200, "{e}");
    }

    #[tokio::test]
    async fn socket_forwards_acks_and_answers() {
        use tokio::io::AsyncBufReadExt;
        let dir = tempfile::tempdir().unwrap();
        let (tx, mut rx) = mpsc::channel(8);
        let sock = EinhornSocket::bind(dir.path().join("e.sock"), 7u64, tx).unwrap();
        // A connection that says nothing holds up no other.
        let _idle = UnixStream::connect(sock.path()).await.unwrap();
        let mut c = UnixStream::connect(sock.path()).await.unwrap();
        c.write_all(b"garbage\n---%0Acommand: ehlo%0A\n")
            .await
            .unwrap();
        let (k, sender, r) = rx.recv().await.unwrap();
        assert_eq!(k, 7);
        // The kernel names the peer: this process.
        assert_eq!(sender.map(|s| s.pid), Some(std::process::id() as i32));
        assert!(r.unwrap_err().contains("garbage"));
        let mut answer = String::new();
        BufReader::new(&mut c).read_line(&mut answer).await.unwrap();
        assert!(answer.contains("Unrecognized command"), "{answer}");
        c.write_all(b"{\"command\":\"worker:ack\",\"pid\":1}\n")
            .await
            .unwrap();
        let (_, _, r) = rx.recv().await.unwrap();
        assert_eq!(r, Ok(vec![Message::Ready]));
        // einhorn closes the connection after an ACK.
        assert_eq!(c.read(&mut [0u8; 16]).await.unwrap(), 0);

        let mut long = UnixStream::connect(sock.path()).await.unwrap();
        let _ = long.write_all(&vec![b'x'; MAX_LINE + 10]).await;
        assert!(rx.recv().await.unwrap().2.unwrap_err().contains("longer"));

        let path = sock.path().to_path_buf();
        drop(sock);
        assert!(!path.exists());
    }
}
