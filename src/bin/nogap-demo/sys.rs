//! The only `unsafe` code of the demo: taking ownership of inherited fds,
//! borrowing fds for the report, ignoring signals, and recording the SIGPIPE
//! disposition inherited at exec.

#![allow(unsafe_code)]

use std::io;
use std::os::fd::{BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};

use nix::fcntl::{fcntl, FcntlArg};
use nix::sys::signal::{SigHandler, Signal};

/// Takes ownership of `fd`, which this process inherited (LISTEN_FDS, --fd).
///
/// The caller must take each fd at most once; `sockets::collect` rejects
/// duplicates before calling this.
pub fn own_inherited_fd(fd: RawFd) -> io::Result<OwnedFd> {
    // An fd that is not open would make the OwnedFd close some later,
    // unrelated fd that happens to get this number.
    fcntl(fd, FcntlArg::F_GETFD)?;
    // SAFETY: `fd` is open (checked just above), it was handed to this
    // process by its parent, and nothing else in the process owns it: the
    // caller takes each inherited fd once, and std only ever owns 0-2 through
    // the `Stdin`/`Stdout`/`Stderr` handles, which never close them.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Sets the disposition of `signal` to SIG_IGN.
pub fn ignore_signal(signal: Signal) -> io::Result<()> {
    // SAFETY: SIG_IGN installs no handler code, so there is no
    // async-signal-safety requirement to uphold.
    unsafe { nix::sys::signal::signal(signal, SigHandler::SigIgn) }?;
    Ok(())
}

/// Whether SIGPIPE was ignored when the program was exec'd.
///
/// Rust's runtime sets SIGPIPE to SIG_IGN before `main`, so /proc/self/status
/// always shows it ignored; a supervisor that leaks its own SIG_IGN to its
/// workers would go unnoticed. This is read before the runtime starts.
pub fn sigpipe_ignored_at_exec() -> bool {
    SIGPIPE_IGNORED_AT_EXEC.load(Ordering::Relaxed)
}

static SIGPIPE_IGNORED_AT_EXEC: AtomicBool = AtomicBool::new(false);

/// Runs `record_sigpipe` as an ELF constructor, before Rust's `lang_start`
/// (which is where the runtime ignores SIGPIPE).
#[used]
#[link_section = ".init_array"]
static RECORD_SIGPIPE: extern "C" fn() = record_sigpipe;

extern "C" fn record_sigpipe() {
    let mut old = std::mem::MaybeUninit::<libc::sigaction>::zeroed();
    // SAFETY: a null `act` only queries the current disposition into `old`,
    // which is valid for writes; sigaction is async-signal-safe and needs no
    // runtime, so it may run before main.
    let rc = unsafe { libc::sigaction(libc::SIGPIPE, std::ptr::null(), old.as_mut_ptr()) };
    if rc == 0 {
        // SAFETY: sigaction succeeded, so it filled in `old`.
        let old = unsafe { old.assume_init() };
        SIGPIPE_IGNORED_AT_EXEC.store(old.sa_sigaction == libc::SIG_IGN, Ordering::Relaxed);
    }
}

/// Runs `f` with a borrow of `fd`, which must be open (the report checks it
/// with F_GETFD first); the borrow cannot escape `f`.
pub fn with_borrowed_fd<R>(fd: RawFd, f: impl FnOnce(BorrowedFd<'_>) -> R) -> R {
    // SAFETY: the fd is open, and nothing closes it while `f` runs: the
    // report is taken on the only thread, before any fd is taken over.
    let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
    f(borrowed)
}

/// One hostile act on an inherited socket `fd` (see `abuse`).
pub fn abuse_fd(fd: RawFd, abuse: crate::abuse::Abuse) -> io::Result<()> {
    use crate::abuse::Abuse;
    // SAFETY: plain system calls on an integer fd; a bad fd fails with EBADF.
    let rc = unsafe {
        match abuse {
            Abuse::Shutdown => libc::shutdown(fd, libc::SHUT_RDWR),
            Abuse::Backlog1 => libc::listen(fd, 1),
            Abuse::Blocking => {
                let flags = libc::fcntl(fd, libc::F_GETFL);
                if flags < 0 {
                    flags
                } else {
                    libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK)
                }
            }
            _ => 0,
        }
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Send `data` to `addr` with `fds` attached (SCM_RIGHTS).
pub fn send_with_fds(
    sock: &std::os::unix::net::UnixDatagram,
    addr: &nix::sys::socket::UnixAddr,
    data: &[u8],
    fds: &[RawFd],
) -> io::Result<()> {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
    use std::os::fd::AsRawFd;
    let iov = [io::IoSlice::new(data)];
    let cmsgs: Vec<ControlMessage> = match fds.is_empty() {
        true => Vec::new(),
        false => vec![ControlMessage::ScmRights(fds)],
    };
    sendmsg(
        sock.as_raw_fd(),
        &iov,
        &cmsgs,
        MsgFlags::empty(),
        Some(addr),
    )?;
    Ok(())
}

/// Fork: the child sleeps for an hour holding every fd; the parent returns.
pub fn fork_and_linger() -> io::Result<()> {
    // SAFETY: the child only calls async-signal-safe functions (sleep,
    // _exit) before it ends.
    match unsafe { libc::fork() } {
        -1 => Err(io::Error::last_os_error()),
        0 => unsafe {
            libc::sleep(3600);
            libc::_exit(0)
        },
        _ => Ok(()),
    }
}
