//! `--metrics ADDR`: a small HTTP server for Prometheus and for probes.
//!
//! | path | answer |
//! |------|--------|
//! | `GET /metrics` | the metrics below: OpenMetrics text when the client accepts it (Prometheus does), else the classic text format 0.0.4 |
//! | `GET /healthz` | 200 `ok` while healthy; 503 and the reason when UNHEALTHY |
//! | `GET /readyz` | 200 once a generation serves; 503 before and while stopping |
//!
//! The loop never waits for it: after each batch of events it publishes a
//! [`Published`] copy (the policy's `Snapshot` and the sockets' queue depths,
//! a few hundred bytes) through a `watch` channel, replacing the last one.
//! The server runs as its own task, reads only that copy (and each worker's
//! descriptors from /proc, at most once a second), and serves at most [`MAX_CONNECTIONS`] clients
//! at a time, each for at most [`TIMEOUT`]: a slow or hostile client can
//! neither hold a lock nor queue work for the loop.
//!
//! Metrics (counters since nogap started):
//!
//! | name | type | labels | meaning |
//! |------|------|--------|---------|
//! | `nogap_generation` | gauge | | the serving generation (0 before the first) |
//! | `nogap_healthy` | gauge | | 1, or 0 while UNHEALTHY |
//! | `nogap_ready` | gauge | | 1 while a generation serves and nogap is not stopping |
//! | `nogap_workers` | gauge | `state` | workers by state (waiting ... killed) |
//! | `nogap_canary_percent` | gauge | | during a canary (`--canary`): the share of new connections the new generation gets; 0 otherwise |
//! | `nogap_reloads_total` | counter | `result` (`ok`, `failed`) | reloads |
//! | `nogap_reload_duration_seconds` | histogram | | from the reload request to serving or failure |
//! | `nogap_worker_restarts_total` | counter | | workers started again after an exit |
//! | `nogap_worker_replacements_total` | counter | `reason` (`stall`, `watchdog`, `fds`) | health replacements |
//! | `nogap_accept_queue_depth` | gauge | `socket` | connections waiting in the serving socket's queue (TCP) |
//! | `nogap_accept_queue_backlog` | gauge | `socket` | that queue's limit |
//! | `nogap_accept_stalls_total` | counter | `socket` | stalls seen on the socket's queues |
//! | `nogap_worker_fds` | gauge | `slot`, `generation` | a worker's open descriptors |
//! | `nogap_worker_fds_limit` | gauge | `slot`, `generation` | its soft RLIMIT_NOFILE |
//! | `nogap_worker_output_dropped_lines_total` | counter | | worker output lines dropped (see `worker::output`) |

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};

use crate::error::Error;
use crate::monitor::Sockets;
use crate::policy::{QueueId, Snapshot, RELOAD_BUCKETS};

/// Clients served at once; more are closed at once.
pub const MAX_CONNECTIONS: usize = 16;
/// A request must arrive, and its answer leave, within this.
pub const TIMEOUT: Duration = Duration::from_secs(5);
/// The longest request head read.
const MAX_REQUEST: usize = 8192;

/// The worker states, in the order of their life.
const STATES: &[&str] = &[
    "waiting", "spawning", "starting", "ready", "draining", "killed",
];
/// The health-replacement reasons (`UnhealthyReason::label`).
const REASONS: &[&str] = &["stall", "watchdog", "fds"];

/// What the loop publishes after each batch of events.
#[derive(Clone, Debug)]
pub struct Published {
    pub snapshot: Snapshot,
    pub sockets: Vec<SocketSample>,
    /// Worker output lines dropped since nogap started.
    pub dropped_lines: u64,
}

/// One socket's serving queue, sampled when published.
#[derive(Clone, Debug)]
pub struct SocketSample {
    pub name: String,
    pub depth: Option<u32>,
    pub backlog: Option<u32>,
    pub stalls: u64,
}

impl Published {
    pub fn new(snapshot: Snapshot, sockets: &Sockets, dropped_lines: u64) -> Published {
        let sockets = sockets
            .listeners
            .iter()
            .map(|(i, l)| {
                let q = sockets.queue(QueueId {
                    listener: i,
                    slot: None,
                });
                SocketSample {
                    name: l.name.clone(),
                    depth: q.map(|q| q.depth),
                    backlog: q.map(|q| q.backlog),
                    stalls: snapshot.stalls(i),
                }
            })
            .collect();
        Published {
            snapshot,
            sockets,
            dropped_lines,
        }
    }

    /// Serving, and not stopping.
    pub fn ready(&self) -> bool {
        self.snapshot.generation.is_some() && !self.snapshot.stopping
    }

    /// The OpenMetrics text of this state; `fds` reads a worker's open
    /// descriptors and limit by pid.
    pub fn encode(&self, fds: impl Fn(i32) -> Option<(u64, u64)>) -> String {
        let workers = self
            .snapshot
            .workers
            .iter()
            .filter_map(|w| {
                let (open, limit) = fds(w.pid?)?;
                Some((w.slot, w.generation, open, limit))
            })
            .collect();
        let mut registry = Registry::default();
        registry.register_collector(Box::new(Encoder {
            state: self.clone(),
            fds: workers,
        }));
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
        out
    }
}

/// A scrape's view: the published state and the descriptors read for it.
#[derive(Debug)]
struct Encoder {
    state: Published,
    /// (slot, generation, open, limit) per live worker.
    fds: Vec<(u32, u64, u64, u64)>,
}

/// A histogram from counts kept elsewhere (the policy's).
#[derive(Debug)]
struct ConstHistogram {
    sum: f64,
    count: u64,
    buckets: Vec<(f64, u64)>,
}

impl EncodeMetric for ConstHistogram {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::MetricEncoder,
    ) -> Result<(), std::fmt::Error> {
        encoder.encode_histogram::<NoLabelSet>(self.sum, self.count, &self.buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

impl Collector for Encoder {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = &self.state.snapshot;
        let c = &s.counters;
        let gauge = |e: &mut DescriptorEncoder, name: &str, help: &str, v: i64| {
            ConstGauge::new(v).encode(e.encode_descriptor(name, help, None, MetricType::Gauge)?)
        };
        gauge(
            &mut e,
            "nogap_generation",
            "The serving generation (0 before the first serves)",
            s.generation.unwrap_or(0) as i64,
        )?;
        gauge(
            &mut e,
            "nogap_healthy",
            "1, or 0 while UNHEALTHY (replacing workers did not help)",
            s.healthy as i64,
        )?;
        gauge(
            &mut e,
            "nogap_ready",
            "1 while a generation serves and nogap is not stopping",
            self.state.ready() as i64,
        )?;
        gauge(
            &mut e,
            "nogap_canary_percent",
            "During a canary (--canary): the percentage of new connections the new generation gets; 0 otherwise",
            s.canary.as_ref().map_or(0, |c| c.percent as i64),
        )?;

        let mut m =
            e.encode_descriptor("nogap_workers", "Workers by state", None, MetricType::Gauge)?;
        for state in STATES {
            let n = s.workers.iter().filter(|w| w.state == *state).count() as i64;
            ConstGauge::new(n).encode(m.encode_family(&[("state", *state)])?)?;
        }

        let mut m = e.encode_descriptor(
            "nogap_reloads",
            "Reloads, by result (failed: the old generation kept serving)",
            None,
            MetricType::Counter,
        )?;
        for (result, n) in [("ok", c.reloads_ok), ("failed", c.reloads_failed)] {
            ConstCounter::new(n).encode(m.encode_family(&[("result", result)])?)?;
        }

        let buckets = c.reload_seconds.buckets();
        debug_assert_eq!(buckets.len(), RELOAD_BUCKETS.len() + 1);
        ConstHistogram {
            sum: c.reload_seconds.sum,
            count: c.reload_seconds.count,
            buckets,
        }
        .encode(e.encode_descriptor(
            "nogap_reload_duration_seconds",
            "How long reloads took, from the request to serving or failure",
            None,
            MetricType::Histogram,
        )?)?;

        ConstCounter::new(c.restarts).encode(e.encode_descriptor(
            "nogap_worker_restarts",
            "Workers started again in their slot after an exit or a failed start",
            None,
            MetricType::Counter,
        )?)?;

        let mut m = e.encode_descriptor(
            "nogap_worker_replacements",
            "Health replacements started, by reason",
            None,
            MetricType::Counter,
        )?;
        for reason in REASONS {
            let n = c.replacements.get(reason).copied().unwrap_or(0);
            ConstCounter::new(n).encode(m.encode_family(&[("reason", *reason)])?)?;
        }

        let socks = &self.state.sockets;
        let mut m = e.encode_descriptor(
            "nogap_accept_queue_depth",
            "Connections waiting in the serving socket's accept queue (TCP sockets)",
            None,
            MetricType::Gauge,
        )?;
        for sk in socks.iter().filter(|s| s.depth.is_some()) {
            let v = sk.depth.unwrap_or(0) as i64;
            ConstGauge::new(v).encode(m.encode_family(&[("socket", sk.name.as_str())])?)?;
        }
        let mut m = e.encode_descriptor(
            "nogap_accept_queue_backlog",
            "The accept queue's limit (TCP sockets)",
            None,
            MetricType::Gauge,
        )?;
        for sk in socks.iter().filter(|s| s.backlog.is_some()) {
            let v = sk.backlog.unwrap_or(0) as i64;
            ConstGauge::new(v).encode(m.encode_family(&[("socket", sk.name.as_str())])?)?;
        }
        let mut m = e.encode_descriptor(
            "nogap_accept_stalls",
            "Stalls seen on the socket's accept queues",
            None,
            MetricType::Counter,
        )?;
        for sk in socks {
            ConstCounter::new(sk.stalls)
                .encode(m.encode_family(&[("socket", sk.name.as_str())])?)?;
        }

        for (name, help, limit) in [
            (
                "nogap_worker_fds",
                "A worker's open file descriptors",
                false,
            ),
            (
                "nogap_worker_fds_limit",
                "A worker's soft RLIMIT_NOFILE",
                true,
            ),
        ] {
            let mut m = e.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for (slot, generation, open, max) in &self.fds {
                let v = if limit { *max } else { *open };
                let labels = [
                    ("slot", slot.to_string()),
                    ("generation", generation.to_string()),
                ];
                ConstGauge::new(v as i64).encode(m.encode_family(&labels)?)?;
            }
        }

        ConstCounter::new(self.state.dropped_lines).encode(e.encode_descriptor(
            "nogap_worker_output_dropped_lines",
            "Worker output lines dropped: too much output, or a line too long",
            None,
            MetricType::Counter,
        )?)?;
        Ok(())
    }
}

/// What the loop holds: publish after each batch of events.
pub struct Publisher {
    tx: watch::Sender<Option<Arc<Published>>>,
    task: tokio::task::JoinHandle<()>,
    /// The listener's descriptor (a self-upgrade carries it).
    fd: std::os::fd::RawFd,
}

impl Drop for Publisher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Publisher {
    /// The listener's descriptor, for a self-upgrade to carry.
    pub fn raw_fd(&self) -> std::os::fd::RawFd {
        self.fd
    }

    /// Replace what the server shows.
    pub fn publish(&self, p: Published) {
        self.tx.send_replace(Some(Arc::new(p)));
    }
}

/// Bind `addr` (`--metrics`), before anything starts: a port in use is an
/// error of the sockets (exit 3), like a `--listen` one.
pub fn bind(addr: SocketAddr) -> Result<std::net::TcpListener, Error> {
    let bind = |e| Error::Bind {
        addr: format!("{addr} (--metrics)"),
        source: e,
    };
    let listener = std::net::TcpListener::bind(addr).map_err(bind)?;
    listener.set_nonblocking(true).map_err(bind)?;
    Ok(listener)
}

/// Serve `listener` (see [`bind`]) from a task of the current runtime.
pub fn serve(listener: std::net::TcpListener) -> Result<Publisher, Error> {
    let listener = TcpListener::from_std(listener)
        .map_err(|e| Error::system("cannot serve the metrics endpoint", e))?;
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "metrics and health endpoints");
    }
    let (tx, rx) = watch::channel(None);
    let fd = std::os::fd::AsRawFd::as_raw_fd(&listener);
    let task = tokio::spawn(accept_loop(listener, rx));
    Ok(Publisher { tx, task, fd })
}

/// Workers' descriptor counts, read from /proc at most once per
/// [`FD_CACHE`]: frequent scrapes cost no more /proc reads.
#[derive(Default)]
pub struct FdCache {
    read_at: Option<std::time::Instant>,
    usage: std::collections::HashMap<i32, Option<(u64, u64)>>,
}

/// How long descriptor counts are reused.
pub const FD_CACHE: Duration = Duration::from_secs(1);

impl FdCache {
    /// Open descriptors and limit of `pid`, at most [`FD_CACHE`] old.
    pub fn get(&mut self, pid: i32) -> Option<(u64, u64)> {
        let now = std::time::Instant::now();
        if self
            .read_at
            .map_or(true, |t| now.duration_since(t) >= FD_CACHE)
        {
            self.usage.clear();
            self.read_at = Some(now);
        }
        *self
            .usage
            .entry(pid)
            .or_insert_with(|| crate::monitor::fd_usage(pid))
    }
}

type Shared = (
    watch::Receiver<Option<Arc<Published>>>,
    Arc<std::sync::Mutex<FdCache>>,
);

async fn accept_loop(listener: TcpListener, rx: watch::Receiver<Option<Arc<Published>>>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let fds = Arc::new(std::sync::Mutex::new(FdCache::default()));
    // EMFILE and the like: back off as every accept loop of nogap does.
    let mut backoff = crate::worker::notify::Backoff::default();
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            backoff.wait().await;
            continue;
        };
        backoff.reset();
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            continue; // too many at once: closed
        };
        let shared = (rx.clone(), fds.clone());
        tokio::spawn(async move {
            let _ = tokio::time::timeout(TIMEOUT, connection(stream, shared)).await;
            drop(permit);
        });
    }
}

async fn connection(mut stream: TcpStream, (rx, fds): Shared) -> std::io::Result<()> {
    let mut buf = vec![0u8; MAX_REQUEST];
    let mut got = 0;
    while !buf[..got].windows(4).any(|w| w == b"\r\n\r\n") {
        if got == buf.len() {
            return respond(&mut stream, 431, "text/plain", "request too large\n").await;
        }
        let n = stream.read(&mut buf[got..]).await?;
        if n == 0 {
            return Ok(());
        }
        got += n;
    }
    let head = String::from_utf8_lossy(&buf[..got]);
    let openmetrics = head.lines().skip(1).any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("accept:") && l.contains("application/openmetrics-text")
    });
    let published = rx.borrow().clone();
    let line = head.lines().next().unwrap_or("");
    let read_fds = |pid| fds.lock().ok().and_then(|mut c| c.get(pid));
    let (code, kind, body) = answer(line, openmetrics, published.as_deref(), read_fds);
    respond(&mut stream, code, kind, &body).await
}

/// The answer to a request line (`openmetrics`: the client accepts it):
/// status code, content type, body.
pub fn answer(
    request_line: &str,
    openmetrics: bool,
    p: Option<&Published>,
    fds: impl Fn(i32) -> Option<(u64, u64)>,
) -> (u16, &'static str, String) {
    const TEXT: &str = "text/plain; charset=utf-8";
    const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
    const CLASSIC: &str = "text/plain; version=0.0.4; charset=utf-8";
    let mut words = request_line.split_whitespace();
    let (method, target) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    if !matches!(path, "/metrics" | "/healthz" | "/readyz") {
        return (
            404,
            TEXT,
            "not found: try /metrics, /healthz or /readyz\n".into(),
        );
    }
    if method != "GET" {
        return (405, TEXT, "only GET\n".into());
    }
    let Some(p) = p else {
        return (503, TEXT, "starting\n".into());
    };
    match path {
        "/metrics" if openmetrics => (200, OPENMETRICS, p.encode(fds)),
        "/metrics" => (200, CLASSIC, classic(&p.encode(fds))),
        "/healthz" if p.snapshot.healthy => (200, TEXT, "ok\n".into()),
        "/healthz" => (503, TEXT, format!("{}\n", p.snapshot.status)),
        _ if p.ready() => (
            200,
            TEXT,
            format!("generation {} serves\n", p.snapshot.generation.unwrap_or(0)),
        ),
        _ => (503, TEXT, format!("{}\n", p.snapshot.phase)),
    }
}

/// OpenMetrics text as the classic text format (0.0.4): a counter's HELP
/// and TYPE name its samples (`_total`), and there is no `# EOF`.
pub fn classic(openmetrics: &str) -> String {
    let counters: Vec<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len() + 16 * counters.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let meta = ["# HELP ", "# TYPE "]
            .iter()
            .find_map(|p| Some((*p, line.strip_prefix(p)?)));
        match meta {
            Some((prefix, rest)) => {
                let name = rest.split(' ').next().unwrap_or("");
                out.push_str(prefix);
                out.push_str(name);
                if counters.contains(&name) {
                    out.push_str("_total");
                }
                out.push_str(&rest[name.len()..]);
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

async fn respond(stream: &mut TcpStream, code: u16, kind: &str, body: &str) -> std::io::Result<()> {
    let reason = match code {
        200 => "OK",
        404 => "Not Found",
        405 => "Method Not Allowed",
        431 => "Request Header Fields Too Large",
        _ => "Service Unavailable",
    };
    let head = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{Settings, State};

    fn published(healthy_and_serving: bool) -> Published {
        let settings = Settings {
            workers: 1,
            ready: crate::spec::ReadyMode::Alive(Duration::ZERO),
            start_timeout: Duration::from_secs(5),
            start_limit: None,
            stop: crate::spec::StopPolicy {
                signal: nix::sys::signal::Signal::SIGTERM,
                grace: Duration::from_secs(1),
            },
            backoff: Default::default(),
            health: Default::default(),
            daemonizes: false,
            steered: false,
            sockets: vec!["http".into()],
            listeners: vec![0],
            probe: None,
            canary: None,
        };
        let t = std::time::Instant::now();
        let mut s = State::new(settings);
        if healthy_and_serving {
            for a in s.handle(crate::policy::Event::Start, t) {
                if let crate::policy::Action::Spawn { worker, .. } = a {
                    s.handle(crate::policy::Event::Spawned { worker, pid: 4242 }, t);
                }
            }
            s.handle(crate::policy::Event::Tick, t);
        }
        Published {
            snapshot: s.snapshot(t),
            sockets: vec![SocketSample {
                name: "http".into(),
                depth: Some(3),
                backlog: Some(128),
                stalls: 2,
            }],
            dropped_lines: 7,
        }
    }

    #[test]
    fn probes_answer_by_state() {
        let serving = published(true);
        let starting = published(false);
        assert_eq!(
            answer("GET /readyz HTTP/1.1", false, Some(&serving), |_| None).0,
            200
        );
        let (code, _, body) = answer("GET /readyz HTTP/1.1", false, Some(&starting), |_| None);
        assert_eq!((code, body.as_str()), (503, "starting\n"));
        assert_eq!(answer("GET /readyz HTTP/1.1", false, None, |_| None).0, 503);
        assert_eq!(
            answer("GET /healthz HTTP/1.0", false, Some(&serving), |_| None).0,
            200
        );
        assert_eq!(
            answer("GET /nope HTTP/1.1", false, Some(&serving), |_| None).0,
            404
        );
        assert_eq!(
            answer("POST /metrics HTTP/1.1", false, Some(&serving), |_| None).0,
            405
        );
        assert_eq!(answer("", false, Some(&serving), |_| None).0, 404);
    }

    #[test]
    fn metrics_name_every_family_in_both_formats() {
        let p = published(true);
        let om = p.encode(|pid| (pid == 4242).then_some((12, 1024)));
        for needle in [
            "nogap_generation 1\n",
            "nogap_healthy 1\n",
            "nogap_workers{state=\"ready\"} 1\n",
            "nogap_reloads_total{result=\"failed\"} 0\n",
            "nogap_reload_duration_seconds_bucket{le=\"+Inf\"} 0\n",
            "nogap_worker_restarts_total 0\n",
            "nogap_worker_replacements_total{reason=\"stall\"} 0\n",
            "nogap_accept_queue_depth{socket=\"http\"} 3\n",
            "nogap_accept_queue_backlog{socket=\"http\"} 128\n",
            "nogap_accept_stalls_total{socket=\"http\"} 2\n",
            "nogap_worker_fds{slot=\"0\",generation=\"1\"} 12\n",
            "nogap_worker_fds_limit{slot=\"0\",generation=\"1\"} 1024\n",
            "nogap_worker_output_dropped_lines_total 7\n",
            "# EOF",
        ] {
            assert!(om.contains(needle), "{needle} missing in\n{om}");
        }
        let text = classic(&om);
        assert!(
            text.contains("# TYPE nogap_reloads_total counter\n"),
            "{text}"
        );
        assert!(
            text.contains("# HELP nogap_accept_stalls_total Stalls"),
            "{text}"
        );
        assert!(text.contains("# TYPE nogap_generation gauge\n"), "{text}");
        assert!(text.contains("\nnogap_canary_percent 0\n"), "{text}");
        assert!(!text.contains("# EOF"));
    }
}
