//! Canary probes (`--ready notify+http:PATH`, `tcp`): before a starting
//! generation counts as ready, nogap sends it a real request itself, on the
//! real address, and no client connection reaches it first.
//!
//! With the steered hand-over every generation accepts from its own socket
//! (`sockets::steer`). For a probe nogap binds a client socket to a local
//! address and a port the kernel picks, adds a route for exactly that source
//! to the reuseport program (it sends the connection to the starting
//! generation's socket; every other one still goes to the serving
//! generation's), connects, and asks:
//!
//! * `http:PATH`: `GET PATH HTTP/1.1` with `Connection: close`; a `2xx`
//!   status line passes, any other status fails with it.
//! * `tcp`: a worker accepts the connection (the generation's own queue,
//!   which only the probe reaches, is empty again).
//!
//! One attempt per [`Prober::start`], bounded by the worker's start
//! deadline; the policy decides about retries. The route goes when the
//! result is in ([`Prober::over`]). The probed socket is the first TCP
//! listener of the newest deployed ones; it must be steered, or probes cannot run ([`Prober::usable`]).

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsFd, OwnedFd};
use std::time::{Duration, Instant};

use socket2::{Domain, SockAddr, Socket, Type};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

use crate::error::Error;
use crate::policy::{Event, ProbeOrder, WorkerId};
use crate::sockets::steer::Steering;
use crate::sockets::Listeners;
use crate::spec::{Canary, Check, Probe};

/// Longest status line read from a probe's answer.
const MAX_STATUS_LINE: usize = 8 * 1024;

/// How often a `tcp` probe looks whether its connection was accepted.
const ACCEPT_POLL: Duration = Duration::from_millis(5);

/// The probes in flight, and where their results go.
pub struct Prober {
    /// The listener probes go to, or why there is none.
    socket: Result<usize, String>,
    /// Each probing worker's source address (its route in the program).
    in_flight: HashMap<WorkerId, SocketAddr>,
    events: mpsc::Sender<Event>,
}

impl Prober {
    pub fn new(listeners: &Listeners, steering: &Steering, events: mpsc::Sender<Event>) -> Prober {
        Prober {
            socket: target(listeners, steering, &listeners.open()),
            in_flight: HashMap::new(),
            events,
        }
    }

    /// A reload deploys the listeners `set`: the next generation is probed
    /// through the first TCP one of them.
    pub fn deployed(&mut self, listeners: &Listeners, steering: &Steering, set: &[usize]) {
        self.socket = target(listeners, steering, set);
    }

    /// Whether `probe` (a config's `--ready` probe) can run here: a usage
    /// error naming it if not.
    pub fn usable(&self, probe: Option<&Probe>) -> Result<(), Error> {
        usable(probe, &self.socket)
    }

    /// Whether `probe` can run on the listeners `set` (see [`Prober::usable`]).
    pub fn usable_on(
        probe: Option<&Probe>,
        listeners: &Listeners,
        steering: &Steering,
        set: &[usize],
    ) -> Result<(), Error> {
        usable(probe, &target(listeners, steering, set))
    }
}

impl Prober {
    /// Whether `canary` (`--canary`) can split new connections here: it
    /// needs what a probe needs, a steered first TCP socket; a usage error
    /// naming it if not.
    pub fn usable_canary(&self, canary: Option<&Canary>) -> Result<(), Error> {
        usable_canary(canary, &self.socket)
    }

    /// Whether `canary` can run on the listeners `set` (see [`Prober::usable_canary`]).
    pub fn usable_canary_on(
        canary: Option<&Canary>,
        listeners: &Listeners,
        steering: &Steering,
        set: &[usize],
    ) -> Result<(), Error> {
        usable_canary(canary, &target(listeners, steering, set))
    }
}

fn usable_canary(canary: Option<&Canary>, socket: &Result<usize, String>) -> Result<(), Error> {
    match (canary, socket) {
        (Some(c), Err(e)) => Err(Error::Usage(format!("--canary {c}: {e}"))),
        _ => Ok(()),
    }
}

/// A usage error naming `probe` if it cannot run on `socket` (see `target`).
fn usable(probe: Option<&Probe>, socket: &Result<usize, String>) -> Result<(), Error> {
    match (probe, socket) {
        (Some(p), Err(e)) => Err(Error::Usage(format!(
            "--ready with a probe ({}): {e}",
            p.check
        ))),
        _ => Ok(()),
    }
}

impl Prober {
    /// Send the order's probe to its generation's socket; its result comes
    /// back as [`Event::Probed`], which is also what this returns at once
    /// when the probe cannot be sent.
    pub fn start(
        &mut self,
        listeners: &Listeners,
        steering: &mut Steering,
        order: ProbeOrder,
    ) -> Option<Event> {
        let worker = order.worker;
        let sent = self.send(listeners, steering, order);
        let result = Err(format!("cannot probe: {}", sent.err()?));
        Some(Event::Probed { worker, result })
    }

    fn send(
        &mut self,
        listeners: &Listeners,
        steering: &mut Steering,
        order: ProbeOrder,
    ) -> Result<(), String> {
        let ProbeOrder {
            worker,
            generation,
            check,
            deadline,
        } = order;
        let i = self.socket.clone()?;
        let Some(addr) = listeners.get(i).and_then(|l| l.endpoint.tcp()) else {
            return Err("not an open TCP socket".into());
        };
        let to = destination(addr);
        let socket = bound_socket(to).map_err(|e| format!("cannot open a probe socket: {e}"))?;
        let source = socket
            .local_addr()
            .ok()
            .and_then(|a| a.as_socket())
            .ok_or("a probe socket without an address")?;
        let pool = steering.route_probe(listeners, i, source, generation)?;
        // `tcp`: the generation's own queue tells when its worker accepted.
        let queue = match check {
            Check::Tcp => steering
                .pool_socket(listeners, i, pool)
                .and_then(|l| l.as_fd().try_clone_to_owned().ok()),
            Check::Http { .. } => None,
        };
        self.in_flight.insert(worker, source);
        tracing::info!(worker, generation, check = %check, from = %source, to = %to, "probing the new generation");
        let events = self.events.clone();
        tokio::spawn(async move {
            let result = attempt(socket, to, &check, queue, deadline).await;
            let _ = events.send(Event::Probed { worker, result }).await;
        });
        Ok(())
    }

    /// `event` may end a probe: its route goes.
    pub fn over(&mut self, listeners: &Listeners, steering: &mut Steering, event: &Event) {
        if let Event::Probed { worker, .. } = event {
            if let Some(source) = self.in_flight.remove(worker) {
                steering.unroute_probe(listeners, source);
            }
        }
    }
}

/// The listener of `set` probes go to: the first TCP one, which must be
/// steered.
fn target(listeners: &Listeners, steering: &Steering, set: &[usize]) -> Result<usize, String> {
    match set.iter().find(|&&i| listeners[i].endpoint.tcp().is_some()) {
        None => Err("it needs a TCP socket, and nogap has none".to_string()),
        Some(&i) if !steering.steers(i) => Err(format!(
            "it needs socket {} steered, and its hand-over is shared by every generation (see nogap's log for why): nothing can reach the new generation alone",
            listeners[i].name
        )),
        Some(&i) => Ok(i),
    }
}

/// Where a probe connects: the socket's own address, or loopback when it
/// listens on every address.
fn destination(addr: SocketAddr) -> SocketAddr {
    let ip = match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, addr.port())
}

/// A client socket bound to `to`'s address (one of this host's) and a port
/// the kernel picks: a source no other connection can have.
fn bound_socket(to: SocketAddr) -> std::io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(to), Type::STREAM.cloexec(), None)?;
    socket.bind(&SockAddr::from(SocketAddr::new(to.ip(), 0)))?;
    socket.set_nonblocking(true)?;
    Ok(socket)
}

/// One probe, bounded by `deadline`.
async fn attempt(
    socket: Socket,
    to: SocketAddr,
    check: &Check,
    queue: Option<OwnedFd>,
    deadline: Instant,
) -> Result<(), String> {
    let budget = deadline.saturating_duration_since(Instant::now());
    let work = async {
        let socket = tokio::net::TcpSocket::from_std_stream(socket.into());
        let mut conn = socket
            .connect(to)
            .await
            .map_err(|e| format!("cannot connect to {to}: {e}"))?;
        match check {
            Check::Tcp => accepted(queue).await,
            Check::Http { path } => {
                let request = format!(
                    "GET {path} HTTP/1.1\r\nHost: {to}\r\nUser-Agent: nogap-probe\r\nConnection: close\r\n\r\n"
                );
                conn.write_all(request.as_bytes())
                    .await
                    .map_err(|e| format!("{check}: cannot send: {e}"))?;
                let status = status_line(&mut conn)
                    .await
                    .map_err(|e| format!("{check}: {e}"))?;
                // Let the worker finish its answer; nobody waits for this.
                tokio::spawn(drain(conn));
                judge(check, &status)
            }
        }
    };
    let deadline = tokio::time::Instant::from_std(deadline);
    match tokio::time::timeout_at(deadline, work).await {
        Ok(result) => result,
        Err(_) => Err(format!(
            "{check}: no answer within {}",
            humantime::format_duration(Duration::from_millis(budget.as_millis() as u64))
        )),
    }
}

/// Waits until the generation's queue, which only the probe reaches, is
/// empty: a worker accepted the probe.
async fn accepted(queue: Option<OwnedFd>) -> Result<(), String> {
    let queue = queue.ok_or("tcp: cannot watch the generation's queue")?;
    loop {
        match crate::sys::tcp_queue(queue.as_fd()) {
            Ok((0, _)) => return Ok(()),
            Ok(_) => tokio::time::sleep(ACCEPT_POLL).await,
            Err(e) => return Err(format!("tcp: cannot read the queue: {e}")),
        }
    }
}

/// The status line of the answer, without its line end.
async fn status_line(conn: &mut tokio::net::TcpStream) -> Result<String, String> {
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        if let Some(end) = got.windows(2).position(|w| w == b"\r\n") {
            return Ok(String::from_utf8_lossy(&got[..end]).into_owned());
        }
        if got.len() > MAX_STATUS_LINE {
            return Err("the answer's first line is too long".into());
        }
        match conn.read(&mut buf).await {
            Ok(0) if got.is_empty() => {
                return Err("the connection was closed without an answer".into())
            }
            Ok(0) => return Err("the connection was closed in the status line".into()),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) => return Err(format!("no answer: {e}")),
        }
    }
}

/// A 2xx status passes; anything else fails with what it said.
fn judge(check: &Check, status: &str) -> Result<(), String> {
    let mut words = status.splitn(3, ' ');
    let version = words.next().unwrap_or_default();
    let code = words.next().and_then(|c| c.parse::<u16>().ok());
    match code {
        Some(c) if version.starts_with("HTTP/") && (200..300).contains(&c) => Ok(()),
        Some(_) if version.starts_with("HTTP/") => Err(format!(
            "{check} answered {}",
            crate::spec::truncate(status.split_once(' ').map_or(status, |(_, s)| s))
        )),
        _ => Err(format!(
            "{check}: not an HTTP answer: {:?}",
            crate::spec::truncate(status)
        )),
    }
}

/// Reads what is left of an answer, for at most a second, then closes.
async fn drain(mut conn: tokio::net::TcpStream) {
    let mut buf = [0u8; 4096];
    let until = tokio::time::Instant::now() + Duration::from_secs(1);
    while let Ok(Ok(n)) = tokio::time::timeout_at(until, conn.read(&mut buf)).await {
        if n == 0 {
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_2xx_passes() {
        let c = Check::Http {
            path: "/healthz".into(),
        };
        assert_eq!(judge(&c, "HTTP/1.1 200 OK"), Ok(()));
        assert_eq!(judge(&c, "HTTP/1.0 204 No Content"), Ok(()));
        assert_eq!(
            judge(&c, "HTTP/1.1 500 Internal Server Error"),
            Err("GET /healthz answered 500 Internal Server Error".into())
        );
        assert!(judge(&c, "HTTP/1.1 302 Found").is_err());
        assert!(judge(&c, "SSH-2.0-OpenSSH").is_err());
    }

    #[test]
    fn destinations() {
        let d = |s: &str| destination(s.parse().unwrap()).to_string();
        assert_eq!(d("0.0.0.0:80"), "127.0.0.1:80");
        assert_eq!(d("[::]:80"), "[::1]:80");
        assert_eq!(d("10.1.2.3:8080"), "10.1.2.3:8080");
    }
}
