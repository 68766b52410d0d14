//! Every `unsafe` block of nogap lives here, each with a `SAFETY:` note.
//!
//! The heart is [`ExecPlan::spawn`]: fork, then in the child only
//! async-signal-safe system calls on memory prepared before the fork (no
//! allocation, no locks, no logging), then execve. That is what lets the
//! worker's `LISTEN_PID` be its own pid, which std's `Command` cannot do.

#![allow(unsafe_code)]

use std::ffi::{CString, OsString};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use libc::{c_char, c_int};
use nix::unistd::Pid;

const LISTEN_PID_PREFIX: &[u8] = b"LISTEN_PID=";

/// The steps of `child_after_fork` that can fail, reported to the parent.
const STEP_SETPGID: c_int = 1;
const STEP_RLIMIT: c_int = 2;
const STEP_GROUPS: c_int = 3;
const STEP_UID: c_int = 4;
const STEP_CHDIR: c_int = 5;
const STEP_FDS: c_int = 6;
const STEP_EXEC: c_int = 7;

/// Credentials a worker runs with, resolved before fork.
#[derive(Clone, Debug, Default)]
pub struct Credentials {
    pub uid: Option<libc::uid_t>,
    pub gid: Option<libc::gid_t>,
    /// Supplementary groups; set only when `gid` is.
    pub groups: Vec<libc::gid_t>,
}

/// Per-process settings applied in the child before exec.
#[derive(Clone, Debug, Default)]
pub struct ProcessSettings {
    pub credentials: Credentials,
    pub chdir: Option<std::path::PathBuf>,
    pub umask: Option<libc::mode_t>,
    /// RLIMIT_NOFILE, soft and hard.
    pub nofile: Option<u64>,
    /// Leave LISTEN_PID out of the environment even though there are fds.
    pub no_listen_pid: bool,
    /// The parent-death signal (`PR_SET_PDEATHSIG`); None: SIGKILL.
    pub death_signal: Option<c_int>,
}

/// Everything a fork+exec needs, allocated before the fork.
pub struct ExecPlan {
    path: CString,
    _argv: Vec<CString>,
    argv_ptrs: Vec<*const c_char>,
    _envp: Vec<CString>,
    /// `LISTEN_PID=` followed by room for the digits and a NUL, filled in by
    /// the child with its own pid. Boxed so its address is stable.
    listen_pid: Box<[u8; 32]>,
    envp_ptrs: Vec<*const c_char>,
    /// Sockets in hand-off order: they become fds 3, 4, ... in the child.
    fds: Vec<RawFd>,
    /// Scratch for the child's fd shuffle.
    scratch: Vec<RawFd>,
    chdir: Option<CString>,
    settings: ProcessSettings,
    nofile: libc::rlimit,
    /// The worker's stdout and stderr, when captured (see [`ExecPlan::output_to`]).
    output: Option<RawFd>,
}

impl ExecPlan {
    /// Prepare a plan. `env` must not contain LISTEN_PID: when `fds` is not
    /// empty the plan adds it, set to the child's pid.
    pub fn new(
        path: &Path,
        argv: &[OsString],
        env: &[(OsString, OsString)],
        fds: &[RawFd],
        settings: ProcessSettings,
    ) -> io::Result<ExecPlan> {
        let cstr = |b: &[u8]| {
            CString::new(b).map_err(|_| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "NUL byte in argument or environment",
                )
            })
        };
        let path = cstr(path.as_os_str().as_bytes())?;
        let argv: Vec<CString> = argv
            .iter()
            .map(|a| cstr(a.as_bytes()))
            .collect::<Result<_, _>>()?;
        let envp: Vec<CString> = env
            .iter()
            .map(|(k, v)| {
                let mut kv = k.as_bytes().to_vec();
                kv.push(b'=');
                kv.extend_from_slice(v.as_bytes());
                cstr(&kv)
            })
            .collect::<Result<_, _>>()?;
        let mut listen_pid = Box::new([0u8; 32]);
        listen_pid[..LISTEN_PID_PREFIX.len()].copy_from_slice(LISTEN_PID_PREFIX);

        let mut argv_ptrs: Vec<*const c_char> = argv.iter().map(|a| a.as_ptr()).collect();
        argv_ptrs.push(std::ptr::null());
        let mut envp_ptrs: Vec<*const c_char> = envp.iter().map(|e| e.as_ptr()).collect();
        if !fds.is_empty() && !settings.no_listen_pid {
            envp_ptrs.push(listen_pid.as_ptr() as *const c_char);
        }
        envp_ptrs.push(std::ptr::null());
        let chdir = match &settings.chdir {
            Some(d) => Some(cstr(d.as_os_str().as_bytes())?),
            None => None,
        };
        let nofile = settings.nofile.map(nofile_limit).unwrap_or(libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        });
        Ok(ExecPlan {
            path,
            _argv: argv,
            argv_ptrs,
            _envp: envp,
            listen_pid,
            envp_ptrs,
            fds: fds.to_vec(),
            scratch: vec![-1; fds.len()],
            chdir,
            settings,
            nofile,
            output: None,
        })
    }

    /// Give the child `fd` (the write end of a pipe, open in the parent
    /// until `spawn` returns) as its stdout and stderr.
    pub fn output_to(&mut self, fd: BorrowedFd<'_>) {
        self.output = Some(fd.as_raw_fd());
    }

    /// Fork and exec. Returns the child's pid once it has exec'd, or the
    /// error that stopped it (the child is reaped then).
    pub fn spawn(&mut self) -> io::Result<Pid> {
        let (rd, wr) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
        let parent = std::process::id() as libc::pid_t;
        // SAFETY: the child runs only `child_after_fork`, which makes
        // async-signal-safe calls on memory prepared before the fork and ends
        // in execve or _exit. The parent continues normally.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            return Err(io::Error::last_os_error());
        }
        if pid == 0 {
            // SAFETY: see above; this never returns.
            unsafe { self.child_after_fork(wr.as_raw_fd(), parent) }
        }
        drop(wr);
        // The child writes the step that failed and errno, 4 bytes each.
        let mut buf = [0u8; 8];
        let mut got = 0;
        loop {
            match nix::unistd::read(rd.as_raw_fd(), &mut buf[got..]) {
                Ok(0) => break,
                Ok(n) => {
                    got += n;
                    if got == buf.len() {
                        break;
                    }
                }
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        if got == 0 {
            return Ok(Pid::from_raw(pid));
        }
        let _ = nix::sys::wait::waitpid(Pid::from_raw(pid), None);
        let step = i32::from_ne_bytes(buf[..4].try_into().expect("4 bytes"));
        let errno =
            io::Error::from_raw_os_error(i32::from_ne_bytes(buf[4..].try_into().expect("4 bytes")));
        Err(match self.step_name(step) {
            None => errno,
            Some(what) => io::Error::new(errno.kind(), format!("{what}: {errno}")),
        })
    }

    /// What the child was doing at `step` (see `child_after_fork`); None
    /// for execve itself, whose error speaks for itself.
    fn step_name(&self, step: i32) -> Option<String> {
        let creds = &self.settings.credentials;
        Some(match step {
            STEP_SETPGID => "setpgid".into(),
            STEP_RLIMIT => format!("setrlimit(RLIMIT_NOFILE, {})", self.nofile.rlim_cur),
            STEP_CHDIR => format!(
                "chdir {}",
                self.settings
                    .chdir
                    .as_deref()
                    .unwrap_or(Path::new("?"))
                    .display()
            ),
            STEP_GROUPS => format!("setgid {}", creds.gid.unwrap_or(0)),
            STEP_UID => format!("setuid {}", creds.uid.unwrap_or(0)),
            STEP_FDS => "passing the sockets".into(),
            _ => return None,
        })
    }

    /// The child between fork and exec.
    ///
    /// # Safety
    /// Must be called only in a freshly forked child. Only async-signal-safe
    /// functions are called; memory is only read, except the pre-allocated
    /// `listen_pid` and `scratch` buffers (the child's own copies).
    unsafe fn child_after_fork(&mut self, err_fd: RawFd, parent: libc::pid_t) -> ! {
        let n = self.fds.len() as c_int;
        // Keep the error pipe above the range the sockets will occupy.
        let err_fd = libc::fcntl(err_fd, libc::F_DUPFD_CLOEXEC, 3 + n);
        if err_fd < 0 {
            libc::_exit(127);
        }
        let fail = |fd: RawFd, step: c_int| -> ! {
            let report = [step, *libc::__errno_location()];
            libc::write(fd, report.as_ptr() as *const libc::c_void, 8);
            libc::_exit(127)
        };

        // Own process group, default signal mask and dispositions.
        if libc::setpgid(0, 0) != 0 {
            fail(err_fd, STEP_SETPGID);
        }
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
        // The raw system call: glibc's sigaction refuses signals 32 and 33
        // (its own), which posix_spawn leaves ignored in the processes it
        // starts. An all-zero kernel sigaction is SIG_DFL, no flags, no mask.
        let dfl = [0u64; 4];
        for sig in 1..=64 {
            if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                libc::syscall(
                    libc::SYS_rt_sigaction,
                    sig,
                    dfl.as_ptr(),
                    std::ptr::null_mut::<u64>(),
                    8usize,
                );
            }
        }

        // Limits and process settings, then credentials (which clear the
        // parent-death signal, so that comes after), then the working
        // directory as the worker's user (as systemd does: the directory
        // must be one that user can enter).
        if self.settings.nofile.is_some() && libc::setrlimit(libc::RLIMIT_NOFILE, &self.nofile) != 0
        {
            fail(err_fd, STEP_RLIMIT);
        }
        if let Some(mask) = self.settings.umask {
            libc::umask(mask);
        }
        let creds = &self.settings.credentials;
        if let Some(gid) = creds.gid {
            if libc::setgroups(creds.groups.len(), creds.groups.as_ptr()) != 0
                || libc::setgid(gid) != 0
            {
                fail(err_fd, STEP_GROUPS);
            }
        }
        if let Some(uid) = creds.uid {
            if libc::setuid(uid) != 0 {
                fail(err_fd, STEP_UID);
            }
        }
        if let Some(dir) = &self.chdir {
            if libc::chdir(dir.as_ptr()) != 0 {
                fail(err_fd, STEP_CHDIR);
            }
        }
        // Told when nogap dies, even if it is SIGKILLed: nogap passes the
        // stop signal, so that the worker drains rather than cutting its
        // requests (the next nogap stops what is left, see
        // `worker::leftover`). The signal fires when the forking *thread*
        // exits: nogap forks from its main thread only.
        let death = self.settings.death_signal.unwrap_or(libc::SIGKILL);
        libc::prctl(libc::PR_SET_PDEATHSIG, death);
        if libc::getppid() != parent {
            libc::_exit(1);
        }

        // Captured output to 1 and 2 first: the pipe's fd may lie in the
        // range the sockets take next (its own copy is close-on-exec).
        if let Some(out) = self.output {
            if libc::dup2(out, 1) < 0 || libc::dup2(out, 2) < 0 {
                fail(err_fd, STEP_FDS);
            }
        }
        // Sockets to 3, 4, ...: first copy them above the target range so no
        // source is overwritten, then dup2 into place (dup2 clears CLOEXEC).
        for i in 0..self.fds.len() {
            let t = libc::fcntl(self.fds[i], libc::F_DUPFD_CLOEXEC, 3 + n);
            if t < 0 {
                fail(err_fd, STEP_FDS);
            }
            self.scratch[i] = t;
        }
        for i in 0..self.fds.len() {
            if libc::dup2(self.scratch[i], 3 + i as c_int) < 0 {
                fail(err_fd, STEP_FDS);
            }
        }
        // Nothing else of nogap's crosses exec: everything above the sockets
        // becomes close-on-exec (including the scratch copies).
        if libc::syscall(
            libc::SYS_close_range,
            (3 + n) as libc::c_uint,
            libc::c_uint::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        ) != 0
        {
            fail(err_fd, STEP_FDS);
        }

        if n > 0 {
            write_pid(
                &mut self.listen_pid[LISTEN_PID_PREFIX.len()..],
                libc::getpid(),
            );
        }
        libc::execve(
            self.path.as_ptr(),
            self.argv_ptrs.as_ptr(),
            self.envp_ptrs.as_ptr(),
        );
        fail(err_fd, STEP_EXEC)
    }
}

/// Decimal digits of `pid` and a NUL into `buf`, without allocating.
fn write_pid(buf: &mut [u8], pid: libc::pid_t) {
    let mut digits = [0u8; 12];
    let mut len = 0;
    let mut v = pid as u32;
    loop {
        digits[len] = b'0' + (v % 10) as u8;
        len += 1;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    for i in 0..len {
        buf[i] = digits[len - 1 - i];
    }
    buf[len] = 0;
}

/// Soft and hard limit both `n`, as systemd's `LimitNOFILE=n`: a server
/// that raises its soft limit to the hard one (Node.js does) stays at `n`.
fn nofile_limit(n: u64) -> libc::rlimit {
    libc::rlimit {
        rlim_cur: n,
        rlim_max: n,
    }
}

/// Accept-queue length and backlog of a TCP listener (`TCP_INFO`).
pub fn tcp_queue(fd: BorrowedFd<'_>) -> io::Result<(u32, u32)> {
    // SAFETY: tcp_info is plain data; getsockopt writes at most `len` bytes.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: valid fd, pointer and length for the duration of the call.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            &mut info as *mut libc::tcp_info as *mut libc::c_void,
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((info.tcpi_unacked, info.tcpi_sacked))
}

/// `SO_ATTACH_REUSEPORT_CBPF` from <asm-generic/socket.h> (libc does not
/// export it for every Linux target).
const SO_ATTACH_REUSEPORT_CBPF: libc::c_int = 51;

/// Send every new connection of `fd`'s `SO_REUSEPORT` group to the socket at
/// `index` in the group: a classic BPF program that returns `index` (the
/// kernel falls back to its hash when there is no socket at `index`). The
/// program belongs to the group, so any member may set it, and a new one
/// replaces the old.
pub fn steer_reuseport(fd: BorrowedFd<'_>, index: u32) -> io::Result<()> {
    let mut code = [libc::sock_filter {
        code: (libc::BPF_RET | libc::BPF_K) as u16,
        jt: 0,
        jf: 0,
        k: index,
    }];
    let prog = libc::sock_fprog {
        len: code.len() as u16,
        filter: code.as_mut_ptr(),
    };
    // SAFETY: `prog` and the code it points to outlive the call; the kernel
    // copies the program.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_ATTACH_REUSEPORT_CBPF,
            &prog as *const libc::sock_fprog as *const libc::c_void,
            std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Attach `code`, a classic BPF program built by `sockets::steer`, to the
/// `SO_REUSEPORT` group of `fd`: it returns the index of the socket in the
/// group that gets each new connection (see [`steer_reuseport`]). The kernel
/// checks the program and copies it.
pub fn attach_reuseport_cbpf(fd: BorrowedFd<'_>, code: &[libc::sock_filter]) -> io::Result<()> {
    let len = u16::try_from(code.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "BPF program too long"))?;
    let prog = libc::sock_fprog {
        len,
        filter: code.as_ptr() as *mut libc::sock_filter,
    };
    // SAFETY: `prog` and the code it points to outlive the call; the kernel
    // only reads the program (the pointer is `*mut` by the C declaration)
    // and copies it.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_ATTACH_REUSEPORT_CBPF,
            &prog as *const libc::sock_fprog as *const libc::c_void,
            std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Take ownership of `raw`, one of the `LISTEN_FDS` descriptors (3..3+n)
/// that systemd's protocol hands to this process, and make it close-on-exec
/// before anything else: nothing of nogap's crosses exec except what the
/// hand-off plan puts at 3, 4, ... Fails, owning nothing, when `raw` is not
/// an open descriptor.
pub fn own_inherited_fd(raw: RawFd) -> io::Result<OwnedFd> {
    nix::fcntl::fcntl(
        raw,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    )?;
    // SAFETY: `raw` is open (F_SETFD succeeded) and, by the sd_listen_fds
    // protocol, owned by this process; `take_inherited` calls this once per
    // descriptor, at start-up, and nothing else in nogap refers to it by
    // number, so the OwnedFd is its only owner and closes it exactly once.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// Take ownership of `raw`, a descriptor the previous image of this process
/// carried across a self-upgrade's `execve` and named in its state, and make
/// it close-on-exec again. Fails, owning nothing, when `raw` is not open.
pub fn own_carried_fd(raw: RawFd) -> io::Result<OwnedFd> {
    nix::fcntl::fcntl(
        raw,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    )?;
    // SAFETY: `raw` is open (F_SETFD succeeded). The previous image kept it
    // open across execve for this image alone and named it once in the
    // carried state, which `upgrade` reads once at start-up; nothing else
    // refers to it by number, so the OwnedFd is its only owner.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// Make nogap the reaper of its workers' orphans (double-forking servers).
pub fn set_child_subreaper() -> io::Result<()> {
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pid_digits() {
        let mut b = [0xffu8; 16];
        write_pid(&mut b, 4194304);
        assert_eq!(&b[..8], b"4194304\0");
        write_pid(&mut b, 7);
        assert_eq!(&b[..2], b"7\0");
    }
}
