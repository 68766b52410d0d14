//! Keep-alive load as a conforming HTTP/1.1 client sends it.
//!
//! A server may close an idle keep-alive connection at any time; a request
//! that was on its way then gets EOF or a reset before any byte of a
//! response, and clients retry it on a new connection (RFC 9112, 9.3.1; curl,
//! browsers, Go's net/http and urllib3 do, for idempotent requests). nginx,
//! lighttpd, uvicorn, hypercorn, daphne and Express close their idle
//! keep-alive connections when they start a graceful stop, so every reload
//! does this once on each connection (docs/handoff.md, "Keep-alive
//! connections at a graceful stop").
//!
//! [`KeepAlive`] runs `common::load::Client`s and does the same: such a
//! request is retried once on a new connection and counted as a *stale
//! close*, separately from failures. Anything else (a failure on a fresh
//! connection, a retry that fails, a non-2xx) is a failure. The result is a
//! `common::load::Report`, so the usual checks apply.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crate::common::load::{
    Client, Failure, FailureKind, Mode, Report, Sample, Target, DEFAULT_TIMEOUT,
};

struct Shared {
    stop: AtomicBool,
    requests: AtomicU64,
    ok: AtomicU64,
    stale: AtomicU64,
}

struct ThreadResult {
    samples: Vec<Sample>,
    failures: Vec<Failure>,
    stale: Vec<Instant>,
    connects: u64,
}

/// A running keep-alive load; see the module doc.
pub struct KeepAlive {
    target: Target,
    start: Instant,
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<ThreadResult>>,
}

/// What [`KeepAlive::stop`] returns: the report and when stale closes were
/// seen.
pub struct KeepAliveReport {
    pub report: Report,
    pub stale: Vec<Instant>,
}

impl KeepAlive {
    /// `connections` threads, each pausing `pause` between requests, for at
    /// most `duration` and `max_requests` requests in all.
    pub fn start(
        target: impl Into<Target>,
        connections: usize,
        pause: Duration,
        duration: Duration,
        max_requests: u64,
    ) -> KeepAlive {
        let shared = Arc::new(Shared {
            stop: AtomicBool::new(false),
            requests: AtomicU64::new(0),
            ok: AtomicU64::new(0),
            stale: AtomicU64::new(0),
        });
        let target = target.into();
        let start = Instant::now();
        let threads = (0..connections)
            .map(|i| {
                let shared = shared.clone();
                let target = target.clone();
                thread::Builder::new()
                    .name(format!("keep-alive-{i}"))
                    .spawn(move || {
                        run(
                            target,
                            &shared,
                            start,
                            pause,
                            start + duration,
                            max_requests,
                        )
                    })
                    .expect("spawn load thread")
            })
            .collect();
        KeepAlive {
            target,
            start,
            shared,
            threads,
        }
    }

    pub fn ok(&self) -> u64 {
        self.shared.ok.load(Ordering::Relaxed)
    }

    /// Waits until `n` more requests succeeded; false on timeout or when
    /// the load ended.
    pub fn wait_for_more_ok(&self, n: u64, timeout: Duration) -> bool {
        let target = self.ok() + n;
        crate::common::wait_until(timeout, || {
            self.ok() >= target || self.threads.iter().all(|t| t.is_finished())
        }) && self.ok() >= target
    }

    pub fn stop(mut self) -> KeepAliveReport {
        self.shared.stop.store(true, Ordering::Relaxed);
        let mut report = Report {
            mode: Mode::KeepAlive,
            target: self.target.to_string(),
            start: self.start,
            elapsed: Duration::ZERO,
            samples: Vec::new(),
            failures: BTreeMap::new(),
            failure_log: Vec::new(),
            connects: 0,
        };
        let mut stale = Vec::new();
        for t in self.threads.drain(..) {
            let r = t.join().expect("load thread panicked");
            report.samples.extend(r.samples);
            for f in r.failures {
                *report.failures.entry(f.kind).or_default() += 1;
                report.failure_log.push(f);
            }
            stale.extend(r.stale);
            report.connects += r.connects;
        }
        report.elapsed = self.start.elapsed();
        report.samples.sort_by_key(|s| s.started);
        report.failure_log.sort_by_key(|f| f.at);
        stale.sort();
        KeepAliveReport { report, stale }
    }
}

impl Drop for KeepAlive {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// The connection was closed under a request before any byte of a
/// response: what a client may retry.
fn is_stale_close(f: &Failure) -> bool {
    match f.kind {
        FailureKind::EofBeforeResponse => f.detail.contains("no byte received"),
        FailureKind::Reset => f.detail.starts_with("write") || f.detail.starts_with("read head"),
        _ => false,
    }
}

fn run(
    target: Target,
    shared: &Shared,
    start: Instant,
    pause: Duration,
    deadline: Instant,
    max_requests: u64,
) -> ThreadResult {
    let mut client = Client::new(target, DEFAULT_TIMEOUT);
    let mut out = ThreadResult {
        samples: Vec::new(),
        failures: Vec::new(),
        stale: Vec::new(),
        connects: 0,
    };
    while !shared.stop.load(Ordering::Relaxed)
        && Instant::now() < deadline
        && shared.requests.fetch_add(1, Ordering::Relaxed) < max_requests
    {
        let t0 = Instant::now();
        let reused = client.is_connected();
        let mut result = client.get();
        if let Err(f) = &result {
            if reused && is_stale_close(f) {
                out.stale.push(f.at);
                shared.stale.fetch_add(1, Ordering::Relaxed);
                result = client.get();
            }
        }
        match result {
            Ok(resp) => {
                out.samples.push(Sample {
                    started: t0 - start,
                    latency: t0.elapsed(),
                    pid: resp.pid.unwrap_or(0),
                    gen: resp.gen.unwrap_or(0),
                });
                shared.ok.fetch_add(1, Ordering::Relaxed);
            }
            Err(f) => out.failures.push(f),
        }
        if !pause.is_zero() {
            thread::sleep(pause);
        }
    }
    out.connects = client.connects;
    out
}
