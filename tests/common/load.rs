//! HTTP/1.1 load generator for the integration tests and the reload benchmark.
//!
//! Plain std threads and blocking sockets: every connection is one thread, and
//! every loop is bounded by a duration *and* a total request count. Every
//! request either yields a [`Sample`] (a 2xx response, with its latency and the
//! pid that answered) or a [`Failure`] of exactly one [`FailureKind`]; nothing
//! is dropped silently. A server-sent `Connection: close` on a keep-alive
//! connection is not a failure: the client reconnects for the next request.
//!
//! This file depends on std only, so the benchmark can include it with
//! `#[path = "../tests/common/load.rs"] mod load;`.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// Default per-operation timeout (connect, write, read of one response).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// Largest response head or body the client accepts.
const MAX_RESPONSE: usize = 1 << 20;

/// At most this many failures are kept with their details; all are counted.
const MAX_FAILURE_LOG: usize = 1000;

/// Where to send requests.
#[derive(Clone, Debug)]
pub enum Target {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Tcp(addr) => write!(f, "{addr}"),
            Target::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

impl From<SocketAddr> for Target {
    fn from(addr: SocketAddr) -> Self {
        Target::Tcp(addr)
    }
}

/// How each load thread uses connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// One connection per thread, reused; reconnect only when the server
    /// answers with `Connection: close` or after a failure.
    KeepAlive,
    /// Connect, send one request with `Connection: close`, read the response,
    /// read to the server's EOF, close.
    NewConnection,
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::KeepAlive => "keep-alive",
            Mode::NewConnection => "new-connection",
        })
    }
}

/// Every way a request can fail. Each failed request has exactly one kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FailureKind {
    /// connect() answered ECONNREFUSED: nobody held the listening socket.
    Refused,
    /// ECONNRESET / EPIPE / ECONNABORTED while connecting, writing or reading.
    Reset,
    /// connect, write or read did not complete within the timeout.
    Timeout,
    /// The server closed the connection before a complete response.
    EofBeforeResponse,
    /// The response was not parseable HTTP/1.x, or carried no pid.
    BadResponse,
    /// A complete response with a status outside 200..=299.
    Non2xx,
    /// Any other I/O error (e.g. EADDRNOTAVAIL when out of ephemeral ports).
    OtherIo,
}

impl FailureKind {
    pub const ALL: [FailureKind; 7] = [
        FailureKind::Refused,
        FailureKind::Reset,
        FailureKind::Timeout,
        FailureKind::EofBeforeResponse,
        FailureKind::BadResponse,
        FailureKind::Non2xx,
        FailureKind::OtherIo,
    ];

    pub fn name(self) -> &'static str {
        match self {
            FailureKind::Refused => "refused",
            FailureKind::Reset => "reset",
            FailureKind::Timeout => "timeout",
            FailureKind::EofBeforeResponse => "eof-before-response",
            FailureKind::BadResponse => "bad-response",
            FailureKind::Non2xx => "non-2xx",
            FailureKind::OtherIo => "other-io",
        }
    }
}

impl fmt::Display for FailureKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One failed request.
#[derive(Clone, Debug)]
pub struct Failure {
    pub kind: FailureKind,
    /// When the failure was observed.
    pub at: Instant,
    /// Which step failed and the error, for test messages.
    pub detail: String,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind, self.detail)
    }
}

impl Failure {
    fn new(kind: FailureKind, detail: impl Into<String>) -> Self {
        Failure {
            kind,
            at: Instant::now(),
            detail: detail.into(),
        }
    }

    fn io(step: &str, err: &io::Error) -> Self {
        let kind = match err.kind() {
            io::ErrorKind::ConnectionRefused => FailureKind::Refused,
            io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe => FailureKind::Reset,
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => FailureKind::Timeout,
            io::ErrorKind::UnexpectedEof => FailureKind::EofBeforeResponse,
            _ => FailureKind::OtherIo,
        };
        Failure::new(kind, format!("{step}: {err}"))
    }
}

/// A parsed response.
#[derive(Clone, Debug)]
pub struct Response {
    pub status: u16,
    /// From the `X-Pid` header, else from a body `pid <pid> gen <gen>`.
    pub pid: Option<u32>,
    /// From a body `pid <pid> gen <gen>`.
    pub gen: Option<u32>,
    /// The server will close the connection after this response.
    pub close: bool,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    fn connect(target: &Target, timeout: Duration) -> io::Result<Stream> {
        match target {
            Target::Tcp(addr) => {
                let s = TcpStream::connect_timeout(addr, timeout)?;
                s.set_nodelay(true)?;
                s.set_read_timeout(Some(timeout))?;
                s.set_write_timeout(Some(timeout))?;
                Ok(Stream::Tcp(s))
            }
            Target::Unix(path) => {
                let s = UnixStream::connect(path)?;
                s.set_read_timeout(Some(timeout))?;
                s.set_write_timeout(Some(timeout))?;
                Ok(Stream::Unix(s))
            }
        }
    }

    fn shutdown_write(&self) {
        let _ = match self {
            Stream::Tcp(s) => s.shutdown(Shutdown::Write),
            Stream::Unix(s) => s.shutdown(Shutdown::Write),
        };
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// One HTTP/1.1 client connection; reconnects lazily.
pub struct Client {
    target: Target,
    timeout: Duration,
    path: String,
    conn: Option<Stream>,
    buf: Vec<u8>,
    /// Connections opened so far.
    pub connects: u64,
    /// When the last complete response had been read (before waiting for
    /// the server's EOF after a `Connection: close`).
    pub last_response_at: Option<Instant>,
}

impl Client {
    pub fn new(target: Target, timeout: Duration) -> Client {
        Client {
            target,
            timeout,
            path: "/".to_string(),
            conn: None,
            buf: Vec::with_capacity(4096),
            connects: 0,
            last_response_at: None,
        }
    }

    pub fn with_path(mut self, path: &str) -> Client {
        self.path = path.to_string();
        self
    }

    /// Opens the connection now (otherwise the next request does).
    pub fn connect(&mut self) -> Result<(), Failure> {
        if self.conn.is_none() {
            let s = Stream::connect(&self.target, self.timeout)
                .map_err(|e| Failure::io("connect", &e))?;
            self.connects += 1;
            self.conn = Some(s);
            self.buf.clear();
        }
        Ok(())
    }

    pub fn is_connected(&self) -> bool {
        self.conn.is_some()
    }

    /// Drops the connection.
    pub fn close(&mut self) {
        self.conn = None;
        self.buf.clear();
    }

    /// One request on the kept-alive connection (opened if needed). The
    /// connection is dropped after a failure or a `Connection: close`.
    pub fn get(&mut self) -> Result<Response, Failure> {
        self.request(false)
    }

    /// One request with `Connection: close` on a fresh connection; reads to
    /// the server's EOF so the server, not the client, holds TIME_WAIT.
    pub fn get_once(&mut self) -> Result<Response, Failure> {
        self.close();
        self.request(true)
    }

    fn request(&mut self, close: bool) -> Result<Response, Failure> {
        self.connect()?;
        let result = self.exchange(close);
        if result.is_ok() {
            self.last_response_at = Some(Instant::now());
        }
        match &result {
            Ok(resp) if !resp.close && !close => {}
            Ok(_) => {
                if let Some(conn) = self.conn.as_mut() {
                    // Wait for the server's FIN (bounded by the read
                    // timeout); any error here is after a full response.
                    conn.shutdown_write();
                    let mut sink = [0u8; 512];
                    while let Ok(n) = conn.read(&mut sink) {
                        if n == 0 {
                            break;
                        }
                    }
                }
                self.close();
            }
            Err(_) => self.close(),
        }
        result
    }

    fn exchange(&mut self, close: bool) -> Result<Response, Failure> {
        let conn = self.conn.as_mut().expect("connected");
        let req = format!(
            "GET {} HTTP/1.1\r\nHost: localhost\r\nUser-Agent: nogap-load\r\n{}\r\n",
            self.path,
            if close { "Connection: close\r\n" } else { "" }
        );
        conn.write_all(req.as_bytes())
            .map_err(|e| Failure::io("write", &e))?;
        read_response(conn, &mut self.buf)
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Reads more into `buf`; EOF is an error of kind EofBeforeResponse.
fn fill(conn: &mut Stream, buf: &mut Vec<u8>, what: &str) -> Result<(), Failure> {
    let mut chunk = [0u8; 8192];
    loop {
        match conn.read(&mut chunk) {
            Ok(0) => {
                let detail = if buf.is_empty() {
                    format!("read {what}: EOF, no byte received")
                } else {
                    format!("read {what}: EOF after {} bytes", buf.len())
                };
                return Err(Failure::new(FailureKind::EofBeforeResponse, detail));
            }
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                if buf.len() > MAX_RESPONSE {
                    return Err(Failure::new(
                        FailureKind::BadResponse,
                        format!("response larger than {MAX_RESPONSE} bytes"),
                    ));
                }
                return Ok(());
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(Failure::io(&format!("read {what}"), &e)),
        }
    }
}

fn bad(detail: impl Into<String>) -> Failure {
    Failure::new(FailureKind::BadResponse, detail)
}

/// Reads one response; bytes after it stay in `buf`.
fn read_response(conn: &mut Stream, buf: &mut Vec<u8>) -> Result<Response, Failure> {
    let head_end = loop {
        if let Some(i) = find(buf, b"\r\n\r\n") {
            break i;
        }
        fill(conn, buf, "head")?;
    };
    let head = std::str::from_utf8(&buf[..head_end])
        .map_err(|_| bad("head is not UTF-8"))?
        .to_string();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or("").to_string();
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or("").to_string();
    if version != "HTTP/1.1" && version != "HTTP/1.0" {
        return Err(bad(format!("bad status line {status_line:?}")));
    }
    let status: u16 = parts
        .next()
        .and_then(|s| s.parse().ok())
        .filter(|s| (100..600).contains(s))
        .ok_or_else(|| bad(format!("bad status line {status_line:?}")))?;
    let mut headers = Vec::new();
    for line in lines {
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| bad(format!("bad header line {line:?}")))?;
        headers.push((name.trim().to_string(), value.trim().to_string()));
    }
    let get = |n: &str| {
        headers
            .iter()
            .find(|(h, _)| h.eq_ignore_ascii_case(n))
            .map(|(_, v)| v.as_str())
    };
    if get("transfer-encoding").is_some() {
        return Err(bad("Transfer-Encoding is not supported by this client"));
    }
    let connection = get("connection").unwrap_or("").to_ascii_lowercase();
    let mut close = if version == "HTTP/1.0" {
        !connection.contains("keep-alive")
    } else {
        connection.contains("close")
    };
    let content_length = match get("content-length") {
        Some(v) => Some(
            v.parse::<usize>()
                .map_err(|_| bad(format!("bad Content-Length {v:?}")))?,
        ),
        None => None,
    };
    let body_start = head_end + 4;
    let body = match content_length {
        Some(len) => {
            if len > MAX_RESPONSE {
                return Err(bad(format!("Content-Length {len} too large")));
            }
            while buf.len() < body_start + len {
                fill(conn, buf, "body")?;
            }
            let body = buf[body_start..body_start + len].to_vec();
            buf.drain(..body_start + len);
            body
        }
        None => {
            // Body delimited by the end of the connection.
            close = true;
            loop {
                match fill(conn, buf, "body") {
                    Ok(()) => {}
                    Err(f) if f.kind == FailureKind::EofBeforeResponse => break,
                    Err(f) => return Err(f),
                }
            }
            let body = buf[body_start..].to_vec();
            buf.clear();
            body
        }
    };
    let mut resp = Response {
        status,
        pid: None,
        gen: None,
        close,
        headers,
        body,
    };
    parse_identity(&mut resp);
    if !(200..300).contains(&resp.status) {
        return Err(Failure::new(
            FailureKind::Non2xx,
            format!("status {status_line:?}"),
        ));
    }
    if resp.pid.is_none() {
        return Err(bad(format!(
            "no X-Pid header and no `pid N` in body {:?}",
            String::from_utf8_lossy(&resp.body)
        )));
    }
    Ok(resp)
}

/// Fills `pid` and `gen` from `X-Pid` and a body `pid <pid> gen <gen>`.
fn parse_identity(resp: &mut Response) {
    let body = String::from_utf8_lossy(&resp.body).into_owned();
    let mut words = body.split_whitespace();
    while let Some(w) = words.next() {
        match w {
            "pid" => resp.pid = words.next().and_then(|v| v.parse().ok()),
            "gen" => resp.gen = words.next().and_then(|v| v.parse().ok()),
            _ => {}
        }
    }
    if let Some(pid) = resp.header("x-pid").and_then(|v| v.parse().ok()) {
        resp.pid = Some(pid);
    }
}

/// One request on a new connection, with `Connection: close`.
pub fn get_once(target: &Target, timeout: Duration) -> Result<Response, Failure> {
    Client::new(target.clone(), timeout).get_once()
}

/// Configuration of a [`Load`] run.
#[derive(Clone, Debug)]
pub struct LoadConfig {
    pub target: Target,
    pub mode: Mode,
    /// Threads, each with its own connection.
    pub connections: usize,
    /// Upper bound on the run time.
    pub duration: Duration,
    /// Upper bound on the number of requests, over all threads.
    pub max_requests: u64,
    /// Per-operation timeout.
    pub timeout: Duration,
    /// Pause of each thread between two requests (zero: full speed).
    pub pause: Duration,
    pub path: String,
}

impl LoadConfig {
    pub fn new(target: impl Into<Target>, mode: Mode) -> LoadConfig {
        LoadConfig {
            target: target.into(),
            mode,
            connections: 4,
            duration: Duration::from_secs(120),
            max_requests: 10_000_000,
            timeout: DEFAULT_TIMEOUT,
            pause: Duration::ZERO,
            path: "/".to_string(),
        }
    }
    pub fn connections(mut self, n: usize) -> Self {
        self.connections = n;
        self
    }
    pub fn duration(mut self, d: Duration) -> Self {
        self.duration = d;
        self
    }
    pub fn max_requests(mut self, n: u64) -> Self {
        self.max_requests = n;
        self
    }
    pub fn timeout(mut self, d: Duration) -> Self {
        self.timeout = d;
        self
    }
    pub fn pause(mut self, d: Duration) -> Self {
        self.pause = d;
        self
    }
}

/// One successful request.
#[derive(Clone, Copy, Debug)]
pub struct Sample {
    /// When the request was started, relative to [`Report::start`].
    pub started: Duration,
    pub latency: Duration,
    pub pid: u32,
    /// 0 when the response did not say.
    pub gen: u32,
}

impl Sample {
    /// When the response was complete, relative to [`Report::start`].
    pub fn done(&self) -> Duration {
        self.started + self.latency
    }
}

struct Shared {
    stop: AtomicBool,
    claimed: AtomicU64,
    ok: AtomicU64,
    failed: AtomicU64,
}

struct ThreadResult {
    samples: Vec<Sample>,
    failures: BTreeMap<FailureKind, u64>,
    failure_log: Vec<Failure>,
    connects: u64,
}

/// A running load; [`Load::stop`] ends it and returns the [`Report`].
/// Dropping it stops the threads too.
pub struct Load {
    config: LoadConfig,
    start: Instant,
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<ThreadResult>>,
}

impl Load {
    pub fn start(config: LoadConfig) -> Load {
        assert!(config.connections > 0, "load needs at least one connection");
        let shared = Arc::new(Shared {
            stop: AtomicBool::new(false),
            claimed: AtomicU64::new(0),
            ok: AtomicU64::new(0),
            failed: AtomicU64::new(0),
        });
        let start = Instant::now();
        let threads = (0..config.connections)
            .map(|i| {
                let shared = shared.clone();
                let config = config.clone();
                thread::Builder::new()
                    .name(format!("load-{}-{i}", config.mode))
                    .spawn(move || run_thread(&config, &shared, start))
                    .expect("spawn load thread")
            })
            .collect();
        Load {
            config,
            start,
            shared,
            threads,
        }
    }

    pub fn start_instant(&self) -> Instant {
        self.start
    }

    /// Successful requests so far.
    pub fn ok(&self) -> u64 {
        self.shared.ok.load(Ordering::Relaxed)
    }

    /// Failed requests so far.
    pub fn failed(&self) -> u64 {
        self.shared.failed.load(Ordering::Relaxed)
    }

    /// Waits until `n` more requests succeeded than when called; false if
    /// the deadline passed or the load ended first.
    pub fn wait_for_more_ok(&self, n: u64, timeout: Duration) -> bool {
        let target = self.ok() + n;
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.ok() >= target {
                return true;
            }
            if self.threads.iter().all(|t| t.is_finished()) {
                return self.ok() >= target;
            }
            thread::sleep(Duration::from_millis(5));
        }
        self.ok() >= target
    }

    /// Stops the threads (each finishes its request in flight, bounded by
    /// the timeout) and returns the report.
    pub fn stop(mut self) -> Report {
        self.shared.stop.store(true, Ordering::Relaxed);
        self.collect()
    }

    /// Waits for the load to end by itself (duration or request count).
    pub fn join(mut self) -> Report {
        self.collect()
    }

    fn collect(&mut self) -> Report {
        let mut report = Report {
            mode: self.config.mode,
            target: self.config.target.to_string(),
            start: self.start,
            elapsed: Duration::ZERO,
            samples: Vec::new(),
            failures: BTreeMap::new(),
            failure_log: Vec::new(),
            connects: 0,
        };
        for t in self.threads.drain(..) {
            let r = t.join().expect("load thread panicked");
            report.samples.extend(r.samples);
            for (k, n) in r.failures {
                *report.failures.entry(k).or_default() += n;
            }
            report.failure_log.extend(r.failure_log);
            report.connects += r.connects;
        }
        report.elapsed = self.start.elapsed();
        report.samples.sort_by_key(|s| s.started);
        report.failure_log.sort_by_key(|f| f.at);
        report.failure_log.truncate(MAX_FAILURE_LOG);
        report
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn run_thread(config: &LoadConfig, shared: &Shared, start: Instant) -> ThreadResult {
    let deadline = start + config.duration;
    let mut client = Client::new(config.target.clone(), config.timeout).with_path(&config.path);
    let mut result = ThreadResult {
        samples: Vec::new(),
        failures: BTreeMap::new(),
        failure_log: Vec::new(),
        connects: 0,
    };
    loop {
        if shared.stop.load(Ordering::Relaxed) || Instant::now() >= deadline {
            break;
        }
        if shared.claimed.fetch_add(1, Ordering::Relaxed) >= config.max_requests {
            break;
        }
        let t0 = Instant::now();
        let outcome = match config.mode {
            Mode::KeepAlive => client.get(),
            Mode::NewConnection => client.get_once(),
        };
        match outcome {
            Ok(resp) => {
                let latency = client
                    .last_response_at
                    .map_or_else(|| t0.elapsed(), |t| t.saturating_duration_since(t0));
                result.samples.push(Sample {
                    started: t0 - start,
                    latency,
                    pid: resp.pid.unwrap_or(0),
                    gen: resp.gen.unwrap_or(0),
                });
                shared.ok.fetch_add(1, Ordering::Relaxed);
            }
            Err(f) => {
                *result.failures.entry(f.kind).or_default() += 1;
                if result.failure_log.len() < MAX_FAILURE_LOG {
                    result.failure_log.push(f);
                }
                shared.failed.fetch_add(1, Ordering::Relaxed);
            }
        }
        if !config.pause.is_zero() {
            thread::sleep(config.pause);
        }
    }
    result.connects = client.connects;
    result
}

/// Latency summary.
#[derive(Clone, Copy, Debug, Default)]
pub struct Latencies {
    pub count: usize,
    pub p50: Duration,
    pub p99: Duration,
    pub max: Duration,
}

impl Latencies {
    pub fn of(mut v: Vec<Duration>) -> Latencies {
        if v.is_empty() {
            return Latencies::default();
        }
        v.sort_unstable();
        let pct = |p: f64| v[((v.len() as f64 * p).ceil() as usize).clamp(1, v.len()) - 1];
        Latencies {
            count: v.len(),
            p50: pct(0.50),
            p99: pct(0.99),
            max: v[v.len() - 1],
        }
    }
}

impl fmt::Display for Latencies {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "p50={:.2}ms p99={:.2}ms max={:.2}ms (n={})",
            ms(self.p50),
            ms(self.p99),
            ms(self.max),
            self.count
        )
    }
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// The outcome of a [`Load`] run.
#[derive(Debug)]
pub struct Report {
    pub mode: Mode,
    pub target: String,
    pub start: Instant,
    pub elapsed: Duration,
    /// Successful requests, ordered by start time.
    pub samples: Vec<Sample>,
    /// Failed requests by kind.
    pub failures: BTreeMap<FailureKind, u64>,
    /// The first failures with details, ordered by time.
    pub failure_log: Vec<Failure>,
    pub connects: u64,
}

impl Report {
    pub fn ok(&self) -> u64 {
        self.samples.len() as u64
    }

    pub fn failed(&self) -> u64 {
        self.failures.values().sum()
    }

    pub fn failures_of(&self, kind: FailureKind) -> u64 {
        self.failures.get(&kind).copied().unwrap_or(0)
    }

    pub fn latencies(&self) -> Latencies {
        Latencies::of(self.samples.iter().map(|s| s.latency).collect())
    }

    /// Latencies of the requests for which `filter` holds.
    pub fn latencies_where(&self, filter: impl Fn(&Sample) -> bool) -> Latencies {
        Latencies::of(
            self.samples
                .iter()
                .filter(|s| filter(s))
                .map(|s| s.latency)
                .collect(),
        )
    }

    /// Every pid that answered.
    pub fn pids(&self) -> BTreeSet<u32> {
        self.samples.iter().map(|s| s.pid).collect()
    }

    /// The pids whose response was complete at or after `t`.
    pub fn pids_since(&self, t: Instant) -> BTreeSet<u32> {
        let t = t.saturating_duration_since(self.start);
        self.samples
            .iter()
            .filter(|s| s.done() >= t)
            .map(|s| s.pid)
            .collect()
    }

    /// The generations (from the body) of responses complete at or after `t`.
    pub fn gens_since(&self, t: Instant) -> BTreeSet<u32> {
        let t = t.saturating_duration_since(self.start);
        self.samples
            .iter()
            .filter(|s| s.done() >= t)
            .map(|s| s.gen)
            .collect()
    }

    /// Requests whose response was complete at or after `t`.
    pub fn ok_since(&self, t: Instant) -> u64 {
        let t = t.saturating_duration_since(self.start);
        self.samples.iter().filter(|s| s.done() >= t).count() as u64
    }

    /// Requests per second.
    pub fn throughput(&self) -> f64 {
        self.ok() as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// `kind=count` for every kind that occurred, or `none`.
    pub fn failure_summary(&self) -> String {
        if self.failures.is_empty() {
            return "none".to_string();
        }
        self.failures
            .iter()
            .map(|(k, n)| format!("{k}={n}"))
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// One line: mode, counts, failures, latencies.
    pub fn summary(&self) -> String {
        format!(
            "{} {} over {:.1}s: ok={} failed={} [{}] connects={} {}",
            self.mode,
            self.target,
            self.elapsed.as_secs_f64(),
            self.ok(),
            self.failed(),
            self.failure_summary(),
            self.connects,
            self.latencies()
        )
    }

    /// Panics with the summary and the first failures if any request failed.
    pub fn assert_no_failures(&self) {
        if self.failed() == 0 {
            return;
        }
        let first: Vec<String> = self
            .failure_log
            .iter()
            .take(20)
            .map(|f| {
                format!(
                    "  +{:.3}s {f}",
                    f.at.saturating_duration_since(self.start).as_secs_f64()
                )
            })
            .collect();
        panic!(
            "load had failures: {}\nfirst failures:\n{}",
            self.summary(),
            first.join("\n")
        );
    }
}
