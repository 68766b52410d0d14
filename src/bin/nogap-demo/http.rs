//! One HTTP/1.1 server connection: read a request head (and a
//! Content-Length body, discarded), answer with a fixed body, repeat while
//! the connection is kept alive.
//!
//! Draining: a response written once draining has started carries
//! `Connection: close` and ends the connection; a connection waiting for
//! (the rest of) a request gives up 1s after the drain started. Every close
//! is a lingering close: shut down our side, then read until the client
//! closes (at most 1s), so unread request bytes cannot turn our close into a
//! reset that destroys the response in flight.

use std::io;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::{sleep, timeout, timeout_at, Instant};

use crate::phase::PhaseWatch;

/// How long after the start of a drain a connection may still send a request.
pub const DRAIN_IDLE: Duration = Duration::from_secs(1);

/// How long a closing connection waits for the client to close its side.
const LINGER: Duration = Duration::from_secs(1);

/// Largest accepted request head (request line and headers).
const MAX_HEAD: usize = 16 * 1024;

/// What a listener answers.
#[derive(Debug)]
pub struct Responder {
    /// Response body, the same for every request.
    pub body: String,
    /// Time spent on each request before answering (`--work`) ...
    pub work: Duration,
    /// ... on these listeners only (`--work-on`); empty: on every one.
    pub work_on: Vec<String>,
    /// The status line's code and reason (`--status`), `200 OK` by default.
    pub status: String,
    /// `--status-after`: `200 OK` until then, `status` from then on.
    pub status_from: Option<std::time::Instant>,
}

/// The parts of a request that matter to the connection.
#[derive(Debug, PartialEq, Eq)]
struct Request {
    head_only: bool,
    keep_alive: bool,
    body: Body,
}

#[derive(Debug, PartialEq, Eq)]
enum Body {
    Length(u64),
    /// Transfer-Encoding we do not decode: answer, then close.
    Unframed,
}

impl Responder {
    /// How long a request on the listener `name` takes (`--work`, `--work-on`).
    pub fn work_on(&self, name: &str) -> Duration {
        match self.work_on.is_empty() || self.work_on.iter().any(|n| n == name) {
            true => self.work,
            false => Duration::ZERO,
        }
    }
}

/// Serves one connection until it closes, spending `work` on each request;
/// `answered` is called after each `200 OK` is written.
pub async fn serve<S>(
    stream: S,
    responder: &Responder,
    work: Duration,
    phase: PhaseWatch,
    mut answered: impl FnMut(),
) -> io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut conn = Connection {
        stream,
        buf: Vec::with_capacity(1024),
        phase,
    };
    let result = conn.serve(responder, work, &mut answered).await;
    conn.linger_close().await;
    result
}

struct Connection<S> {
    stream: S,
    /// Bytes read but not consumed yet (the start of a pipelined request).
    buf: Vec<u8>,
    phase: PhaseWatch,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Connection<S> {
    async fn serve(
        &mut self,
        responder: &Responder,
        work: Duration,
        answered: &mut impl FnMut(),
    ) -> io::Result<()> {
        loop {
            let request = match self.read_request().await? {
                Some(Ok(request)) => request,
                Some(Err(reason)) => {
                    self.stream.write_all(&bad_request(reason)).await?;
                    return Ok(());
                }
                None => return Ok(()),
            };
            if let Body::Length(length) = request.body {
                if !self.skip_body(length).await? {
                    return Ok(());
                }
            }
            if !work.is_zero() {
                sleep(work).await;
            }
            let close = !request.keep_alive
                || request.body == Body::Unframed
                || self.phase.draining_since().is_some();
            self.stream
                .write_all(&ok(responder, request.head_only, close))
                .await?;
            answered();
            if close {
                return Ok(());
            }
        }
    }

    /// The next request head, `None` at EOF or when draining ends the wait.
    async fn read_request(&mut self) -> io::Result<Option<Result<Request, &'static str>>> {
        loop {
            if let Some(end) = find_head_end(&self.buf) {
                let request = parse_head(&self.buf[..end]);
                self.buf.drain(..end);
                return Ok(Some(request));
            }
            if self.buf.len() > MAX_HEAD {
                return Ok(Some(Err("request head too large")));
            }
            if !self.fill().await? {
                return Ok(None);
            }
        }
    }

    /// Reads and discards `length` body bytes; false if the client went away.
    async fn skip_body(&mut self, mut length: u64) -> io::Result<bool> {
        loop {
            let buffered = self
                .buf
                .len()
                .min(usize::try_from(length).unwrap_or(usize::MAX));
            self.buf.drain(..buffered);
            length -= buffered as u64;
            if length == 0 {
                return Ok(true);
            }
            if !self.fill().await? {
                return Ok(false);
            }
        }
    }

    /// Reads more bytes into `buf`. False at EOF, or when the drain has gone
    /// on for `DRAIN_IDLE` without the client completing a request.
    async fn fill(&mut self) -> io::Result<bool> {
        let deadline = match self.phase.draining_since() {
            Some(since) => since,
            None => tokio::select! {
                read = self.stream.read_buf(&mut self.buf) => return Ok(read? > 0),
                since = self.phase.drain_started() => since,
            },
        };
        let deadline = Instant::from_std(deadline) + DRAIN_IDLE;
        match timeout_at(deadline, self.stream.read_buf(&mut self.buf)).await {
            Ok(read) => Ok(read? > 0),
            Err(_elapsed) => Ok(false),
        }
    }

    /// Shuts down our side and waits (bounded) for the client to close.
    async fn linger_close(&mut self) {
        if self.stream.shutdown().await.is_err() {
            return;
        }
        let mut sink = [0u8; 1024];
        let _ = timeout(LINGER, async {
            while let Ok(1..) = self.stream.read(&mut sink).await {}
        })
        .await;
    }
}

/// Index just past the blank line ending the head, if complete.
fn find_head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4)
}

/// Parses a request head (without caring about method or target beyond HEAD).
fn parse_head(head: &[u8]) -> Result<Request, &'static str> {
    let head = std::str::from_utf8(head).map_err(|_| "request head is not UTF-8")?;
    let mut lines = head.split("\r\n");
    let request_line = lines.next().unwrap_or_default();
    let mut parts = request_line.split(' ');
    let (Some(method), Some(_target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err("malformed request line");
    };
    let mut keep_alive = match version {
        "HTTP/1.1" => true,
        "HTTP/1.0" => false,
        _ => return Err("unsupported HTTP version"),
    };
    let mut body = Body::Length(0);
    let mut length_seen = None;
    for line in lines.filter(|line| !line.is_empty()) {
        let (name, value) = line.split_once(':').ok_or("malformed header")?;
        let value = value.trim();
        if name.eq_ignore_ascii_case("connection") {
            for token in value.split(',').map(str::trim) {
                if token.eq_ignore_ascii_case("close") {
                    keep_alive = false;
                } else if token.eq_ignore_ascii_case("keep-alive") {
                    keep_alive = true;
                }
            }
        } else if name.eq_ignore_ascii_case("content-length") {
            let length: u64 = value.parse().map_err(|_| "bad Content-Length")?;
            if length_seen.is_some_and(|seen| seen != length) {
                return Err("conflicting Content-Length");
            }
            length_seen = Some(length);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            body = Body::Unframed;
        }
    }
    if let (Body::Length(_), Some(length)) = (&body, length_seen) {
        body = Body::Length(length);
    }
    Ok(Request {
        head_only: method == "HEAD",
        keep_alive,
        body,
    })
}

fn ok(responder: &Responder, head_only: bool, close: bool) -> Vec<u8> {
    let body = if head_only {
        ""
    } else {
        responder.body.as_str()
    };
    let status = match responder.status_from {
        Some(t) if std::time::Instant::now() < t => "200 OK",
        _ => responder.status.as_str(),
    };
    response(status, responder.body.len(), body, close)
}

fn bad_request(reason: &str) -> Vec<u8> {
    let body = format!("bad request: {reason}\n");
    response("400 Bad Request", body.len(), &body, true)
}

/// Always HTTP/1.1; `Connection: keep-alive` is spelled out too, for
/// HTTP/1.0 clients that asked for it.
fn response(status: &str, length: usize, body: &str, close: bool) -> Vec<u8> {
    let connection = if close { "close" } else { "keep-alive" };
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {length}\r\n\
         X-Pid: {}\r\nConnection: {connection}\r\n\r\n{body}",
        std::process::id()
    )
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(head: &str) -> Result<Request, &'static str> {
        parse_head(head.as_bytes())
    }

    #[test]
    fn keep_alive_defaults() {
        let r = parse("GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        assert_eq!(
            r,
            Request {
                head_only: false,
                keep_alive: true,
                body: Body::Length(0)
            }
        );
        assert!(
            !parse("GET / HTTP/1.1\r\nConnection: Close\r\n\r\n")
                .unwrap()
                .keep_alive
        );
        assert!(!parse("GET / HTTP/1.0\r\n\r\n").unwrap().keep_alive);
        assert!(
            parse("GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
                .unwrap()
                .keep_alive
        );
    }

    #[test]
    fn bodies() {
        let r = parse("POST / HTTP/1.1\r\ncontent-length: 5\r\n\r\n").unwrap();
        assert_eq!(r.body, Body::Length(5));
        let r = parse("POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n").unwrap();
        assert_eq!(r.body, Body::Unframed);
        assert!(
            parse("POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n").is_err()
        );
    }

    #[test]
    fn malformed() {
        assert!(parse("GET /\r\n\r\n").is_err());
        assert!(parse("GET / HTTP/2\r\n\r\n").is_err());
        assert!(parse("GET / HTTP/1.1\r\nnocolon\r\n\r\n").is_err());
    }

    #[test]
    fn head_end() {
        assert_eq!(find_head_end(b"GET / HTTP/1.1\r\n\r\nGET"), Some(18));
        assert_eq!(find_head_end(b"GET / HTTP/1.1\r\n"), None);
    }

    #[tokio::test]
    async fn pipelined_requests_then_close() {
        let (client, server) = tokio::io::duplex(4096);
        let responder = Responder {
            body: "hi\n".to_owned(),
            work: Duration::ZERO,
            work_on: Vec::new(),
            status: "200 OK".into(),
            status_from: None,
        };
        let (mut reader, mut writer) = tokio::io::split(client);
        writer
            .write_all(b"GET / HTTP/1.1\r\n\r\nGET / HTTP/1.1\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        writer.shutdown().await.unwrap();
        let mut count = 0;
        serve(
            server,
            &responder,
            Duration::ZERO,
            PhaseWatch::always_serving(),
            || count += 1,
        )
        .await
        .unwrap();
        let mut out = String::new();
        reader.read_to_string(&mut out).await.unwrap();
        assert_eq!(count, 2);
        assert_eq!(out.matches("HTTP/1.1 200 OK").count(), 2);
        assert!(out.ends_with("Connection: close\r\n\r\nhi\n"), "{out}");
    }
}
