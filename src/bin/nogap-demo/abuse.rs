//! `--abuse KIND`: what a hostile or buggy worker does to what it shares
//! with nogap, its siblings and the other generations, at `--abuse-after`
//! (from a thread of its own; the server keeps serving as it can).

use std::io::Write;
use std::os::fd::RawFd;
use std::str::FromStr;
use std::time::{Duration, Instant};

use crate::sys;

/// One hostile act.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Abuse {
    /// `shutdown(SHUT_RDWR)` every inherited stream socket: it stops
    /// listening, for every process that holds it.
    Shutdown,
    /// `listen(fd, 1)` on every inherited stream socket.
    Backlog1,
    /// Clear `O_NONBLOCK` on every inherited socket (a file status flag:
    /// shared with every holder).
    Blocking,
    /// Write to stdout without end.
    FloodStdout,
    /// Send garbage datagrams to NOTIFY_SOCKET, as fast as it takes them.
    FloodNotify,
    /// Send `READY=1` datagrams carrying 16 descriptors each.
    NotifyFds,
    /// Fork a child that keeps the sockets and exits itself at once.
    ForkExit,
}

impl FromStr for Abuse {
    type Err = String;

    fn from_str(s: &str) -> Result<Abuse, String> {
        Ok(match s {
            "shutdown" => Abuse::Shutdown,
            "backlog1" => Abuse::Backlog1,
            "blocking" => Abuse::Blocking,
            "flood-stdout" => Abuse::FloodStdout,
            "flood-notify" => Abuse::FloodNotify,
            "notify-fds" => Abuse::NotifyFds,
            "fork-exit" => Abuse::ForkExit,
            _ => return Err(format!("unknown abuse '{s}' (shutdown, backlog1, blocking, flood-stdout, flood-notify, notify-fds, fork-exit)")),
        })
    }
}

/// Do `abuse` at `after` from `started`, on `fds`, from a new thread.
pub fn schedule(abuse: Abuse, after: Duration, started: Instant, fds: Vec<RawFd>) {
    std::thread::spawn(move || {
        let wait = (started + after).saturating_duration_since(Instant::now());
        std::thread::sleep(wait);
        say!("abuse: {abuse:?}");
        run(abuse, &fds);
    });
}

fn run(abuse: Abuse, fds: &[RawFd]) {
    match abuse {
        Abuse::Shutdown | Abuse::Backlog1 | Abuse::Blocking => {
            for &fd in fds {
                if let Err(e) = sys::abuse_fd(fd, abuse) {
                    say!("abuse on fd {fd}: {e}");
                }
            }
        }
        Abuse::FloodStdout => {
            let line = [b'x'; 1023];
            let mut out = std::io::stdout().lock();
            loop {
                if out
                    .write_all(&line)
                    .and_then(|()| out.write_all(b"\n"))
                    .is_err()
                {
                    return;
                }
            }
        }
        Abuse::FloodNotify | Abuse::NotifyFds => {
            let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
                return;
            };
            let Ok(sock) = std::os::unix::net::UnixDatagram::unbound() else {
                return;
            };
            let addr = nix::sys::socket::UnixAddr::new(std::path::Path::new(&path));
            let Ok(addr) = addr else { return };
            let devnull: Vec<std::fs::File> = (0..16)
                .filter_map(|_| std::fs::File::open("/dev/null").ok())
                .collect();
            let raw: Vec<RawFd> = devnull
                .iter()
                .map(std::os::fd::AsRawFd::as_raw_fd)
                .collect();
            for i in 0u64.. {
                let r = match abuse {
                    Abuse::FloodNotify => {
                        let msg = format!("GARBAGE {i}\n\u{1}\u{2}");
                        sys::send_with_fds(&sock, &addr, msg.as_bytes(), &[])
                    }
                    _ => sys::send_with_fds(&sock, &addr, b"READY=1", &raw),
                };
                if r.is_err() && !std::path::Path::new(&path).exists() {
                    return;
                }
            }
        }
        Abuse::ForkExit => {
            // The child keeps every inherited fd and sleeps; the worker
            // process itself exits.
            match sys::fork_and_linger() {
                Ok(()) => std::process::exit(3),
                Err(e) => say!("abuse: fork failed: {e}"),
            }
        }
    }
}
