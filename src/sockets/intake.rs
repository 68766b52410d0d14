//! Sockets passed to nogap by systemd (or systemd-socket-activate): the
//! sd_listen_fds(3) protocol, read once at start-up.

use std::os::fd::{OwnedFd, RawFd};

use socket2::{SockRef, Type};

use super::{Listener, Origin};
use crate::config::Environment;
use crate::error::Error;
use crate::spec::{self, Endpoint};
use crate::sys;

/// Take the sockets systemd passed to nogap. None when LISTEN_FDS is not
/// addressed to this process.
///
/// An fd that is not a usable socket is an error, except with `from_store`
/// (nogap uses systemd's fd store): then it is logged, dropped from the store,
/// and nogap binds afresh, rather than never starting again.
pub fn take_inherited(env: &Environment, from_store: bool) -> Result<Vec<Listener>, Error> {
    let mut fds = Vec::new();
    for (raw, name) in listen_fds(env)? {
        if name.starts_with(OUTPUT_PREFIX) {
            // A dead nogap's worker output pipe: systemd's copy keeps it
            // open for that worker; nogap's is not needed.
            drop(sys::own_inherited_fd(raw));
            continue;
        }
        let fd = sys::own_inherited_fd(raw).map_err(|e| {
            Error::Inherited(format!("fd {raw} (name '{name}') cannot be used: {e}"))
        })?;
        fds.push((fd, name));
    }
    adopt(fds, from_store)
}

/// The fd-store name prefix of worker output pipes (`nogap.output.PID`, see
/// `worker::output`): not sockets.
pub const OUTPUT_PREFIX: &str = "nogap.output.";

/// The names of the worker output pipes a dead nogap left in the fd store.
pub fn stored_outputs(env: &Environment) -> Vec<String> {
    listen_fds(env)
        .unwrap_or_default()
        .into_iter()
        .map(|(_, name)| name)
        .filter(|n| n.starts_with(OUTPUT_PREFIX))
        .collect()
}

/// Take `name` out of systemd's fd store.
pub fn unstore(name: &str) {
    let _ = sd_notify::notify(&[
        sd_notify::NotifyState::Custom("FDSTOREREMOVE=1"),
        sd_notify::NotifyState::FdName(name),
    ]);
}

/// Validate the inherited sockets. Each fd is owned from the start, so an
/// unusable one is closed exactly once, when it is dropped.
pub fn adopt(fds: Vec<(OwnedFd, String)>, from_store: bool) -> Result<Vec<Listener>, Error> {
    let mut out = Vec::new();
    for (fd, name) in fds {
        let raw = std::os::fd::AsRawFd::as_raw_fd(&fd);
        match validate(fd, &name) {
            Ok(l) => out.push(l),
            Err(e) if from_store => {
                tracing::error!(fd = raw, socket = %name, error = %e, "dropping unusable fd from the fd store");
                let _ = sd_notify::notify(&[
                    sd_notify::NotifyState::Custom("FDSTOREREMOVE=1"),
                    sd_notify::NotifyState::FdName(&name),
                ]);
            }
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

/// The sd_listen_fds(3) protocol: fds 3.. with names, when LISTEN_PID is this
/// process (variables addressed to another process are ignored).
fn listen_fds(env: &Environment) -> Result<Vec<(RawFd, String)>, Error> {
    listen_fds_for(env, std::process::id())
}

/// [`listen_fds`] as process `me` reads them: pure, over the environment
/// (what the intake fuzz target drives).
pub fn listen_fds_for(env: &Environment, me: u32) -> Result<Vec<(RawFd, String)>, Error> {
    let var = |k: &str| env.get(k).map(|v| v.to_string_lossy().into_owned());
    let Some(pid) = var("LISTEN_PID") else {
        return Ok(Vec::new());
    };
    match pid.parse::<u32>() {
        Ok(p) if p == me => {}
        Ok(_) => return Ok(Vec::new()),
        Err(_) => {
            return Err(Error::Inherited(format!(
                "LISTEN_PID='{pid}' is not a process id"
            )))
        }
    }
    let Some(count) = var("LISTEN_FDS") else {
        return Ok(Vec::new());
    };
    let n: i32 = count
        .parse()
        .ok()
        .filter(|n| (0..=4096).contains(n))
        .ok_or_else(|| {
            Error::Inherited(format!(
                "LISTEN_FDS='{count}' is not a number of descriptors"
            ))
        })?;
    let names: Vec<String> = match var("LISTEN_FDNAMES") {
        Some(names) => {
            let list: Vec<String> = names.split(':').map(str::to_string).collect();
            if list.len() != n as usize {
                return Err(Error::Inherited(format!(
                    "LISTEN_FDNAMES='{names}' has {} names for LISTEN_FDS={n}",
                    list.len()
                )));
            }
            list
        }
        None => vec!["unknown".to_string(); n as usize],
    };
    Ok((3..3 + n).zip(names).collect())
}

fn validate(fd: OwnedFd, name: &str) -> Result<Listener, Error> {
    let raw = std::os::fd::AsRawFd::as_raw_fd(&fd);
    let what = |msg: &str| Error::Inherited(format!("fd {raw} (name '{name}') {msg}"));
    let stat = nix::sys::stat::fstat(raw).map_err(|e| what(&format!("cannot be used: {e}")))?;
    if stat.st_mode & libc::S_IFMT != libc::S_IFSOCK {
        return Err(what("is not a socket"));
    }
    let sock = SockRef::from(&fd);
    let ty = sock
        .r#type()
        .map_err(|e| what(&format!("has no socket type: {e}")))?;
    let local = sock
        .local_addr()
        .map_err(|e| what(&format!("has no address: {e}")))?;
    let stream = ty == Type::STREAM || ty == Type::SEQPACKET;
    if stream && !sock.is_listener().unwrap_or(false) {
        return Err(what("is a stream socket that is not listening"));
    }
    if !stream && ty != Type::DGRAM {
        return Err(what("has an unsupported socket type"));
    }
    spec::check_fd_name(name).map_err(|e| what(&e))?;
    let endpoint = match (local.as_socket(), local.as_pathname(), stream) {
        (Some(a), _, true) => Endpoint::Tcp(a),
        (Some(a), _, false) => Endpoint::Udp(a),
        (None, Some(p), true) => Endpoint::Unix(p.to_path_buf()),
        (None, Some(p), false) => Endpoint::UnixDatagram(p.to_path_buf()),
        (None, None, _) => Endpoint::UnixUnnamed { datagram: !stream },
    };
    Ok(Listener::new(
        name.to_string(),
        endpoint,
        Origin::Inherited,
        fd,
    ))
}
