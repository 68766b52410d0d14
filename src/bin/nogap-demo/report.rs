//! `--report FILE`: a JSON snapshot of what the process inherited from its
//! supervisor (ids, environment, fds and their flags, signal mask and
//! dispositions, limits), taken before any fd is touched.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::io::{self, Write};
use std::os::fd::RawFd;
use std::path::{Path, PathBuf};

use nix::fcntl::{fcntl, FcntlArg, FdFlag};
use nix::sys::resource::{getrlimit, Resource};
use nix::unistd;
use serde::Serialize;
use socket2::{Domain, SockRef, Type};

use crate::sockets::{is_nonblocking, local_address};
use crate::sys;

/// The variables a supervisor of this demo is expected to set.
const WATCHED_VARS: [&str; 8] = [
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "NOGAP_GENERATION",
    "NOGAP_WORKER",
];

#[derive(Debug, Serialize)]
struct Report {
    pid: u32,
    ppid: i32,
    pgid: i32,
    sid: Option<i32>,
    uid: u32,
    euid: u32,
    gid: u32,
    egid: u32,
    cwd: Option<String>,
    /// Octal, e.g. "0022"; from /proc/self/status.
    umask: Option<String>,
    argv: Vec<String>,
    env: Env,
    fds: Vec<Fd>,
    /// SigBlk from /proc/self/status.
    sig_blocked: String,
    /// SigIgn from /proc/self/status, SIGPIPE bit as inherited at exec.
    sig_ignored: String,
    nofile_soft: u64,
    nofile_hard: u64,
}

#[derive(Debug, Serialize)]
struct Env {
    /// The watched variables, `null` when unset.
    #[serde(flatten)]
    watched: BTreeMap<&'static str, Option<String>>,
    /// The whole environment.
    all: BTreeMap<String, String>,
}

#[derive(Debug, Serialize)]
struct Fd {
    fd: RawFd,
    /// readlink of /proc/self/fd/N, e.g. "socket:[1234]", "/dev/null".
    target: String,
    cloexec: bool,
    nonblock: bool,
    socket: Option<SocketInfo>,
}

#[derive(Debug, Serialize)]
struct SocketInfo {
    /// "stream", "dgram", "seqpacket", "raw" or "other".
    #[serde(rename = "type")]
    ty: &'static str,
    /// "inet", "inet6", "unix" or "other".
    family: &'static str,
    listening: bool,
    /// "127.0.0.1:8080", "/path", "@abstract", "(unnamed)" or "?".
    local: String,
}

/// Writes the report to `path` (`{pid}` replaced by the pid), through
/// `path.tmp` and a rename, and returns the final path.
pub fn write(path: &Path) -> io::Result<PathBuf> {
    let report = collect()?;
    let path = expand_pid(path);
    let mut tmp = path.clone().into_os_string();
    tmp.push(".tmp");
    let mut file = std::fs::File::create(&tmp)?;
    serde_json::to_writer_pretty(&mut file, &report)?;
    file.write_all(b"\n")?;
    file.sync_all()?;
    std::fs::rename(&tmp, &path)?;
    Ok(path)
}

fn expand_pid(path: &Path) -> PathBuf {
    match path.to_str() {
        Some(s) => PathBuf::from(s.replace("{pid}", &std::process::id().to_string())),
        None => path.to_owned(),
    }
}

fn collect() -> io::Result<Report> {
    // fds first: everything below may open files.
    let fds = list_fds()?;
    let status = std::fs::read_to_string("/proc/self/status")?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
            .map(|value| value.trim().to_owned())
    };
    let sig_blocked = field("SigBlk").unwrap_or_default();
    let sig_ignored = field("SigIgn")
        .map(|ign| with_inherited_sigpipe(&ign))
        .unwrap_or_default();
    let (nofile_soft, nofile_hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    let lossy = |s: &OsStr| s.to_string_lossy().into_owned();
    Ok(Report {
        pid: std::process::id(),
        ppid: unistd::getppid().as_raw(),
        pgid: unistd::getpgrp().as_raw(),
        sid: unistd::getsid(None).ok().map(|p| p.as_raw()),
        uid: unistd::getuid().as_raw(),
        euid: unistd::geteuid().as_raw(),
        gid: unistd::getgid().as_raw(),
        egid: unistd::getegid().as_raw(),
        cwd: std::env::current_dir()
            .ok()
            .map(|p| p.display().to_string()),
        umask: field("Umask"),
        argv: std::env::args_os().map(|a| lossy(&a)).collect(),
        env: Env {
            watched: WATCHED_VARS
                .iter()
                .map(|&var| (var, std::env::var(var).ok()))
                .collect(),
            all: std::env::vars_os()
                .map(|(k, v)| (lossy(&k), lossy(&v)))
                .collect(),
        },
        fds,
        sig_blocked,
        sig_ignored,
        nofile_soft,
        nofile_hard,
    })
}

/// Every open fd. The directory handle used to list /proc/self/fd is closed
/// by the time the entries are inspected, so it is the one entry that no
/// longer resolves, and is skipped.
fn list_fds() -> io::Result<Vec<Fd>> {
    let mut numbers: Vec<RawFd> = std::fs::read_dir("/proc/self/fd")?
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    numbers.sort_unstable();
    Ok(numbers.into_iter().filter_map(describe_fd).collect())
}

fn describe_fd(fd: RawFd) -> Option<Fd> {
    let fd_flags = fcntl(fd, FcntlArg::F_GETFD).ok()?;
    let target = std::fs::read_link(format!("/proc/self/fd/{fd}")).ok()?;
    let target = target.to_string_lossy().into_owned();
    let socket = target
        .starts_with("socket:")
        .then(|| sys::with_borrowed_fd(fd, |fd| describe_socket(&SockRef::from(&fd))));
    Some(Fd {
        fd,
        target,
        cloexec: FdFlag::from_bits_truncate(fd_flags).contains(FdFlag::FD_CLOEXEC),
        nonblock: is_nonblocking(fd).unwrap_or(false),
        socket,
    })
}

fn describe_socket(sock: &SockRef<'_>) -> SocketInfo {
    let ty = match sock.r#type() {
        Ok(Type::STREAM) => "stream",
        Ok(Type::DGRAM) => "dgram",
        Ok(Type::SEQPACKET) => "seqpacket",
        Ok(Type::RAW) => "raw",
        _ => "other",
    };
    let family = match sock.domain() {
        Ok(Domain::IPV4) => "inet",
        Ok(Domain::IPV6) => "inet6",
        Ok(Domain::UNIX) => "unix",
        _ => "other",
    };
    SocketInfo {
        ty,
        family,
        listening: sock.is_listener().unwrap_or(false),
        local: local_address(sock),
    }
}

/// SigIgn with the SIGPIPE bit replaced by the disposition at exec (see
/// `sys::sigpipe_ignored_at_exec`), in the same 16-hex-digit format.
fn with_inherited_sigpipe(sig_ignored: &str) -> String {
    let Ok(mask) = u64::from_str_radix(sig_ignored, 16) else {
        return sig_ignored.to_owned();
    };
    let bit = 1u64 << (libc::SIGPIPE - 1);
    let mask = if sys::sigpipe_ignored_at_exec() {
        mask | bit
    } else {
        mask & !bit
    };
    format!("{mask:016x}")
}
