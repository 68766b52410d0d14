//! Guarding the sockets nogap holds against what a worker does to them.
//!
//! A worker holds the same open socket as nogap (and as its siblings and the
//! other generations that share it), so it can damage it for everyone:
//!
//! * `shutdown(SHUT_RDWR)` on a listening TCP socket stops it listening:
//!   every later connect is refused, and it leaves its `SO_REUSEPORT` group.
//!   The port stays bound to the socket (it was bound explicitly), so nogap
//!   calls `listen()` on its own descriptor again: the same socket listens
//!   again, for every process that holds it.
//! * `listen(fd, 1)` shrinks the backlog for everyone: nogap calls `listen()`
//!   again with the backlog the socket had when nogap first saw it. Servers
//!   set their own backlog on an inherited socket (uvicorn and gunicorn
//!   2048, node 511), which is their choice: only a backlog below
//!   [`MIN_BACKLOG`] (and below the first one) counts as damage.
//! * Clearing `O_NONBLOCK` (a file status flag, shared by every holder)
//!   leaves a sibling that was woken for a connection another worker took
//!   blocked in `accept()`. Once a socket has been seen non-blocking (nogap
//!   hands them over as they came; servers like Go, node and tokio set the
//!   flag themselves), clearing it again is undone.
//!
//! Each round reads `SO_ACCEPTCONN`, `TCP_INFO`'s backlog and `F_GETFL`: a
//! few system calls per socket. A [`Finding`] says what was found and
//! whether it was undone; the policy reports it.

use std::collections::BTreeMap;
use std::os::fd::RawFd;

use socket2::SockRef;

use super::Listener;

/// Something a worker did to a socket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Tamper {
    /// It does not listen any more (`shutdown()` by a worker).
    NotListening,
    /// Its backlog is smaller than it was.
    Backlog { found: u32, restored: u32 },
    /// `O_NONBLOCK` was cleared.
    Blocking,
}

impl std::fmt::Display for Tamper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Tamper::NotListening => f.write_str("not listening (a worker shut it down)"),
            Tamper::Backlog { found, restored } => {
                write!(f, "backlog shrunk to {found} (restored to {restored})")
            }
            Tamper::Blocking => f.write_str("O_NONBLOCK cleared by a worker"),
        }
    }
}

/// A backlog below this (and below what nogap first saw) is damage.
pub const MIN_BACKLOG: u32 = 64;

/// One tampered socket, and whether nogap undid it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finding {
    /// The socket's name (`--listen NAME=`).
    pub socket: String,
    pub tamper: Tamper,
    /// Why it could not be undone, if it could not.
    pub repaired: Result<(), String>,
}

/// What a socket looked like when nogap first saw it.
#[derive(Clone, Copy, Debug)]
struct Baseline {
    backlog: u32,
    nonblocking: bool,
}

/// The baselines, per descriptor nogap holds (it never closes one while it
/// runs, so a descriptor number names one socket).
#[derive(Debug)]
pub struct Guard {
    /// The backlog nogap binds with (`--backlog`), for a socket first seen
    /// not listening.
    backlog: i32,
    seen: BTreeMap<RawFd, Baseline>,
}

impl Guard {
    pub fn new(backlog: i32) -> Guard {
        Guard {
            backlog,
            seen: BTreeMap::new(),
        }
    }

    /// A socket nogap closed: its descriptor number may come back for
    /// another socket, which starts with a baseline of its own.
    pub fn forget(&mut self, fd: RawFd) {
        self.seen.remove(&fd);
    }

    /// Check one listening socket and undo what was done to it. Sockets
    /// that do not listen by nature (UDP) are skipped.
    pub fn check(&mut self, l: &Listener) -> Vec<Finding> {
        if !l.endpoint.listens() {
            return Vec::new();
        }
        let sock = SockRef::from(l);
        let listening = sock.is_listener().unwrap_or(true);
        let nonblocking = sock.nonblocking().unwrap_or(false);
        let backlog = match listening {
            true => l.queue().map(|q| q.backlog),
            false => None,
        };
        let configured = self.backlog;
        let base = self.seen.entry(l.raw_fd()).or_insert(Baseline {
            backlog: backlog.unwrap_or(configured.max(0) as u32),
            nonblocking,
        });
        let mut out = Vec::new();
        let found = |tamper, repaired| Finding {
            socket: l.name.clone(),
            tamper,
            repaired,
        };
        if !listening {
            // A second shutdown() of a socket that no longer listens leaves
            // its shutdown flags set, and every connection accepted from it
            // after a plain listen() would be shut down at birth. A shutdown
            // of a listening socket clears them (the kernel's disconnect):
            // listen, shut down, listen.
            let b = base.backlog as i32;
            let relisten = sock
                .listen(b)
                .and_then(|()| sock.shutdown(std::net::Shutdown::Both))
                .and_then(|()| sock.listen(b));
            let r = match relisten {
                Err(e) => Err(format!("cannot listen on {} again: {e}", l.endpoint)),
                // A socket bound to port 0 lost its port with the shutdown:
                // listening again picked another one.
                Ok(()) => match (l.endpoint.tcp(), sock.local_addr()) {
                    (Some(want), Ok(got)) if got.as_socket() != Some(want) => Err(format!(
                        "it listens on {:?} now, not {want}",
                        got.as_socket()
                    )),
                    _ => Ok(()),
                },
            };
            out.push(found(Tamper::NotListening, r));
        } else if let Some(b) = backlog.filter(|b| *b < base.backlog.min(MIN_BACKLOG)) {
            let r = sock
                .listen(base.backlog as i32)
                .map_err(|e| format!("cannot restore the backlog: {e}"));
            let restored = base.backlog;
            out.push(found(Tamper::Backlog { found: b, restored }, r));
        }
        if nonblocking {
            base.nonblocking = true;
        } else if base.nonblocking {
            let r = sock
                .set_nonblocking(true)
                .map_err(|e| format!("cannot set O_NONBLOCK again: {e}"));
            out.push(found(Tamper::Blocking, r));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::Endpoint;

    fn listener(backlog: i32) -> Listener {
        // An explicit port, as `--listen` binds: it stays bound through a
        // shutdown.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        s.bind(&addr.into()).unwrap();
        s.listen(backlog).unwrap();
        let local = s.local_addr().unwrap().as_socket().unwrap();
        Listener::new(
            "web".into(),
            Endpoint::Tcp(local),
            super::super::Origin::Bound,
            s.into(),
        )
    }

    #[test]
    fn a_shut_down_socket_listens_again() {
        let l = listener(64);
        let mut g = Guard::new(64);
        assert!(g.check(&l).is_empty());
        SockRef::from(&l)
            .shutdown(std::net::Shutdown::Both)
            .unwrap();
        // Twice: the second one leaves the shutdown flags set.
        assert!(SockRef::from(&l)
            .shutdown(std::net::Shutdown::Both)
            .is_err());
        let addr = l.endpoint.tcp().unwrap();
        assert!(
            std::net::TcpStream::connect(addr).is_err(),
            "refused after shutdown"
        );
        let f = g.check(&l);
        assert_eq!(f.len(), 1);
        assert_eq!(f[0].tamper, Tamper::NotListening);
        assert_eq!(f[0].repaired, Ok(()));
        // Connections accepted now work both ways.
        let mut c = std::net::TcpStream::connect(addr).expect("listens again");
        let dup = SockRef::from(&l).try_clone().unwrap();
        let (mut a, _) = std::net::TcpListener::from(dup).accept().unwrap();
        use std::io::{Read, Write};
        c.write_all(b"hi").unwrap();
        let mut buf = [0u8; 2];
        a.read_exact(&mut buf).unwrap();
        a.write_all(b"ok").unwrap();
        c.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"ok");
        assert!(g.check(&l).is_empty());
    }

    #[test]
    fn a_shrunk_backlog_is_restored() {
        let l = listener(64);
        let mut g = Guard::new(64);
        assert!(g.check(&l).is_empty());
        // A server's own choice, above the floor: left alone.
        SockRef::from(&l).listen(48 + MIN_BACKLOG as i32).unwrap();
        assert!(g.check(&l).is_empty());
        SockRef::from(&l).listen(1).unwrap();
        let f = g.check(&l);
        assert_eq!(
            f[0].tamper,
            Tamper::Backlog {
                found: 1,
                restored: 64
            }
        );
        assert_eq!(l.queue().unwrap().backlog, 64);
    }

    #[test]
    fn cleared_nonblocking_is_set_again_once_seen() {
        let l = listener(64);
        let mut g = Guard::new(64);
        // Handed over blocking: blocking is what it should be.
        assert!(g.check(&l).is_empty());
        SockRef::from(&l).set_nonblocking(true).unwrap();
        assert!(g.check(&l).is_empty(), "a server made it non-blocking");
        SockRef::from(&l).set_nonblocking(false).unwrap();
        assert_eq!(g.check(&l)[0].tamper, Tamper::Blocking);
        assert!(SockRef::from(&l).nonblocking().unwrap());
    }
}
