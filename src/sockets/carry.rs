//! Sockets across a self-upgrade: each one nogap holds is described by
//! name, address, origin and descriptor number, kept open across `execve`
//! (close-on-exec cleared just for it), and taken back by the new image.

use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};

use nix::fcntl::{fcntl, FcntlArg, FdFlag, Flock, FlockArg};
use serde::{Deserialize, Serialize};

use super::{Listener, Origin};
use crate::spec::Endpoint;
use crate::sys;

/// One socket as the new image finds it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Carried {
    pub name: String,
    pub endpoint: Endpoint,
    pub origin: Origin,
    pub fd: RawFd,
    /// The lock on `PATH.lock` of a unix socket nogap bound.
    pub lock: Option<RawFd>,
}

impl Listener {
    /// Describe this socket for the new image; its descriptors go to `keep`.
    pub fn carry(&self, keep: &mut Vec<RawFd>) -> Carried {
        let lock = self.lock.as_ref().map(|l| l.as_raw_fd());
        keep.push(self.raw_fd());
        keep.extend(lock);
        Carried {
            name: self.name.clone(),
            endpoint: self.endpoint.clone(),
            origin: self.origin,
            fd: self.raw_fd(),
            lock,
        }
    }

    /// Take back a socket the old image carried. Fails when its descriptor
    /// is not open; a lock that cannot be taken again is logged and dropped.
    pub fn adopt(c: Carried) -> std::io::Result<Listener> {
        let fd = sys::own_carried_fd(c.fd)?;
        let mut l = Listener::new(c.name, c.endpoint, c.origin, fd);
        if let Some(raw) = c.lock {
            let file = File::from(sys::own_carried_fd(raw)?);
            // The same open file holds the lock already: taking it again
            // succeeds at once.
            match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                Ok(lock) => l.lock = Some(lock),
                Err((_, e)) => {
                    tracing::warn!(socket = %l.name, error = %e, "cannot take the socket's lock back")
                }
            }
        }
        Ok(l)
    }
}

/// Let `fd`, one nogap holds, cross `execve` (`keep`), or not.
pub fn keep_across_exec(fd: RawFd, keep: bool) -> std::io::Result<()> {
    let flags = match keep {
        true => FdFlag::empty(),
        false => FdFlag::FD_CLOEXEC,
    };
    fcntl(fd, FcntlArg::F_SETFD(flags))?;
    Ok(())
}
