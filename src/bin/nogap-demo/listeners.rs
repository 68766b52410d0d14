//! The per-socket tasks: accept loops for stream listeners (each accepted
//! connection served by `http`), echo loops for datagram sockets.
//!
//! Each task follows the phase: serving, stalled (keeps its socket open but
//! stops accepting), draining (drops its socket, which closes our fd only:
//! never `shutdown()`, the socket is shared with the supervisor and other
//! workers). Accept errors such as EMFILE are retried with a backoff of 5ms
//! doubling to 1s, like Go's net/http; the loop never gives up.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream, UdpSocket, UnixDatagram, UnixListener, UnixStream};
use tokio::sync::{mpsc, Notify};
use tokio::time::sleep;

use crate::http::{self, Responder};
use crate::phase::PhaseWatch;
use crate::sockets::{Kind, Socket};

/// What connections of one kind of listener share.
#[derive(Debug)]
pub struct Service {
    pub responder: Responder,
    /// `200 OK`s written so far.
    answered: AtomicU64,
    /// `--crash-after-requests`.
    crash_after: Option<u64>,
    /// Notified once `crash_after` responses have been written.
    pub crash: Notify,
}

impl Service {
    pub fn new(responder: Responder, crash_after: Option<u64>) -> Service {
        Service {
            responder,
            answered: AtomicU64::new(0),
            crash_after,
            crash: Notify::new(),
        }
    }

    fn answered(&self) {
        let count = self.answered.fetch_add(1, Ordering::Relaxed) + 1;
        if Some(count) == self.crash_after {
            self.crash.notify_one();
        }
    }
}

/// Held by every accept loop and connection; the lifecycle loop knows all
/// connections are closed when every clone is dropped.
pub type Tracker = mpsc::Sender<()>;

/// Starts the task serving `socket`. Stream listeners hand `tracker` to
/// each connection; datagram sockets have nothing to drain.
pub fn spawn(
    socket: Socket,
    service: Arc<Service>,
    phase: PhaseWatch,
    tracker: Tracker,
) -> io::Result<()> {
    let name = socket.name;
    let listener = match socket.kind {
        Kind::Tcp(l) => Listener::Tcp(TcpListener::from_std(l)?),
        Kind::Unix(l) => Listener::Unix(UnixListener::from_std(l)?),
        Kind::Udp(s) => {
            tokio::spawn(echo_loop(
                Datagram::Udp(UdpSocket::from_std(s)?),
                name,
                phase,
            ));
            return Ok(());
        }
        Kind::UnixDatagram(s) => {
            tokio::spawn(echo_loop(
                Datagram::Unix(UnixDatagram::from_std(s)?),
                name,
                phase,
            ));
            return Ok(());
        }
    };
    let accept = AcceptLoop {
        listener,
        name,
        service,
        phase,
        tracker: Some(tracker),
    };
    tokio::spawn(accept.run());
    Ok(())
}

/// Starts the `--health` listener: always serving, never drained, not
/// tracked (the process exits without waiting for its connections).
pub fn spawn_health(listener: std::net::TcpListener, service: Arc<Service>) -> io::Result<()> {
    let accept = AcceptLoop {
        listener: Listener::Tcp(TcpListener::from_std(listener)?),
        name: "health".to_owned(),
        service,
        phase: PhaseWatch::always_serving(),
        tracker: None,
    };
    tokio::spawn(accept.run());
    Ok(())
}

enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Listener {
    /// The same socket on a new descriptor, registered afresh with the
    /// reactor. After another process shut the socket down (EINVAL from
    /// accept), the old registration may report the hang-up for ever, and
    /// accept would spin; once the socket listens again (its supervisor
    /// makes it), the fresh one works.
    fn fresh(&self) -> io::Result<Listener> {
        use std::os::fd::AsFd;
        Ok(match self {
            Listener::Tcp(l) => {
                let fd = l.as_fd().try_clone_to_owned()?;
                Listener::Tcp(TcpListener::from_std(fd.into())?)
            }
            Listener::Unix(l) => {
                let fd = l.as_fd().try_clone_to_owned()?;
                Listener::Unix(UnixListener::from_std(fd.into())?)
            }
        })
    }

    async fn accept(&self) -> io::Result<Stream> {
        match self {
            Listener::Tcp(l) => {
                let (stream, _) = l.accept().await?;
                // One write per response: no reason to wait for Nagle.
                stream.set_nodelay(true)?;
                Ok(Stream::Tcp(stream))
            }
            Listener::Unix(l) => Ok(Stream::Unix(l.accept().await?.0)),
        }
    }
}

struct AcceptLoop {
    listener: Listener,
    name: String,
    service: Arc<Service>,
    phase: PhaseWatch,
    tracker: Option<Tracker>,
}

impl AcceptLoop {
    /// Accepts until draining; the listener is dropped on return.
    async fn run(mut self) {
        let mut backoff = Backoff::default();
        while self.phase.serving().await {
            tokio::select! {
                () = self.phase.changed() => {}
                accepted = self.listener.accept() => match accepted {
                    Ok(stream) => {
                        if backoff.reset() {
                            say!("accept on {:?} recovered", self.name);
                        }
                        self.spawn_connection(stream);
                    }
                    Err(e) => {
                        let delay = backoff.next();
                        if delay == Backoff::FIRST {
                            say!("accept on {:?} failed: {e}; retrying with backoff", self.name);
                        }
                        tokio::select! {
                            () = self.phase.changed() => {}
                            () = sleep(delay) => {}
                        }
                        if e.raw_os_error() == Some(libc::EINVAL) {
                            match self.listener.fresh() {
                                Ok(l) => self.listener = l,
                                Err(e) => say!("cannot register {:?} again: {e}", self.name),
                            }
                        }
                    }
                },
            }
        }
    }

    fn spawn_connection(&self, stream: Stream) {
        let service = Arc::clone(&self.service);
        let phase = self.phase.clone();
        let tracker = self.tracker.clone();
        let work = service.responder.work_on(&self.name);
        tokio::spawn(async move {
            let _tracker = tracker;
            let responder = &service.responder;
            let answered = || service.answered();
            // Errors here are the client's business (reset, gone away).
            let _ = match stream {
                Stream::Tcp(s) => http::serve(s, responder, work, phase, answered).await,
                Stream::Unix(s) => http::serve(s, responder, work, phase, answered).await,
            };
        });
    }
}

/// Accept retry delay: 5ms doubling to 1s, reset by a successful accept.
#[derive(Debug, Default)]
struct Backoff {
    current: Option<Duration>,
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(5);
    const MAX: Duration = Duration::from_secs(1);

    fn next(&mut self) -> Duration {
        let next = self.current.map_or(Self::FIRST, |d| (d * 2).min(Self::MAX));
        self.current = Some(next);
        next
    }

    /// Resets; true if it was backing off.
    fn reset(&mut self) -> bool {
        self.current.take().is_some()
    }
}

enum Datagram {
    Udp(UdpSocket),
    Unix(UnixDatagram),
}

impl Datagram {
    /// Receives one datagram and sends it back after `prefix`. Replies to
    /// unnamed unix peers are impossible and skipped.
    async fn echo_one(&self, prefix: &[u8], buf: &mut Vec<u8>) -> io::Result<()> {
        buf.truncate(prefix.len());
        match self {
            Datagram::Udp(s) => {
                let (_, peer) = s.recv_buf_from(buf).await?;
                s.send_to(buf, peer).await?;
            }
            Datagram::Unix(s) => {
                let (_, peer) = s.recv_buf_from(buf).await?;
                if let Some(path) = peer.as_pathname() {
                    s.send_to(buf, path).await?;
                }
            }
        }
        Ok(())
    }
}

/// Echoes datagrams until draining; the socket is dropped on return.
async fn echo_loop(socket: Datagram, name: String, mut phase: PhaseWatch) {
    let prefix = format!("pid {} ", std::process::id()).into_bytes();
    let mut buf = Vec::with_capacity(prefix.len() + 65536);
    buf.extend_from_slice(&prefix);
    let mut backoff = Backoff::default();
    while phase.serving().await {
        tokio::select! {
            () = phase.changed() => {}
            echoed = socket.echo_one(&prefix, &mut buf) => match echoed {
                Ok(()) => {
                    backoff.reset();
                }
                Err(e) => {
                    let delay = backoff.next();
                    if delay == Backoff::FIRST {
                        say!("echo on {name:?} failed: {e}; retrying with backoff");
                    }
                    sleep(delay).await;
                }
            },
        }
    }
}
