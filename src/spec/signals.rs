//! What every signal means to `nogap run`: the table behind README's
//! "Signals", the man page and `--help`.
//!
//! | signal | meaning |
//! |--------|---------|
//! | HUP | reload: start a new generation |
//! | TERM, INT, QUIT | graceful stop: every worker drains, then nogap exits 0 |
//! | USR1 | forwarded to every ready or draining worker (log reopen) |
//! | USR2 | self-upgrade in place (as `nogap upgrade`) |
//! | TTIN, TTOU | ignored with a log line (no scaling at run time) |
//! | CHLD | reap |
//! | every other signal whose default action terminates or stops the process (ALRM, WINCH, PWR, URG, VTALRM, PROF, IO, SYS, TSTP, XCPU, XFSZ, STKFLT, the real-time signals) | ignored with a log line |
//! | PIPE | ignored (SIG_IGN: a write to a closed pipe fails with EPIPE) |
//! | ABRT, SEGV, BUS, ILL, FPE, TRAP | default action: they mean nogap itself is broken (ABRT is what systemd's watchdog sends); workers drain (parent-death signal = stop signal) |
//! | KILL, STOP | cannot be caught |
//!
//! Workers get the default disposition of every signal back before exec.

/// What nogap does on a signal.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Meaning {
    /// HUP: start a new generation.
    Reload,
    /// TERM, INT, QUIT: drain every worker and exit.
    Stop,
    /// USR1: forward to every ready or draining worker (log reopen).
    Forward,
    /// USR2: self-upgrade in place.
    Upgrade,
    /// TTIN, TTOU: one worker more or less, in servers that scale at run
    /// time; nogap does not, so they are ignored with a log line.
    Scale,
    /// CHLD: reap exited children.
    Reap,
    /// Anything else nogap catches: ignored with a log line.
    Ignore,
}

/// The meaning of signal number `signo`.
pub fn meaning(signo: i32) -> Meaning {
    match signo {
        libc::SIGHUP => Meaning::Reload,
        libc::SIGTERM | libc::SIGINT | libc::SIGQUIT => Meaning::Stop,
        libc::SIGUSR1 => Meaning::Forward,
        libc::SIGUSR2 => Meaning::Upgrade,
        libc::SIGTTIN | libc::SIGTTOU => Meaning::Scale,
        libc::SIGCHLD => Meaning::Reap,
        _ => Meaning::Ignore,
    }
}

/// Signals that keep their default action in nogap: faults (the process is
/// broken, and a handler that returns would re-run the faulting
/// instruction), ABRT (systemd's watchdog kill), the two that cannot be
/// caught, PIPE (ignored by the Rust runtime: a handler would turn a
/// failed write to a closed stderr into a log line, which writes again),
/// and 32, 33 (glibc's own).
const UNCAUGHT: [i32; 9] = [
    libc::SIGKILL,
    libc::SIGSTOP,
    libc::SIGABRT,
    libc::SIGSEGV,
    libc::SIGBUS,
    libc::SIGILL,
    libc::SIGFPE,
    libc::SIGTRAP,
    libc::SIGPIPE,
];

/// Every signal nogap installs a handler for: 1..=31 but [`UNCAUGHT`],
/// and the real-time signals SIGRTMIN..=SIGRTMAX. A handled signal is
/// never fatal, and also reaches nogap when it is PID 1 of a PID namespace
/// (the kernel drops signals without a handler there).
pub fn caught() -> Vec<i32> {
    (1..32)
        .filter(|s| !UNCAUGHT.contains(s))
        .chain(libc::SIGRTMIN()..=libc::SIGRTMAX())
        .collect()
}

/// A signal's name: `SIGTERM`, `SIGRTMIN`, `SIGRTMIN+3`, `SIGRTMAX`.
pub fn name(signo: i32) -> String {
    match nix::sys::signal::Signal::try_from(signo) {
        Ok(s) => s.as_str().to_string(),
        Err(_) if signo == libc::SIGRTMIN() => "SIGRTMIN".to_string(),
        Err(_) if signo == libc::SIGRTMAX() => "SIGRTMAX".to_string(),
        Err(_) if signo >= libc::SIGRTMIN() => format!("SIGRTMIN+{}", signo - libc::SIGRTMIN()),
        Err(_) => format!("signal {signo}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meanings() {
        assert_eq!(meaning(libc::SIGHUP), Meaning::Reload);
        for s in [libc::SIGTERM, libc::SIGINT, libc::SIGQUIT] {
            assert_eq!(meaning(s), Meaning::Stop);
        }
        assert_eq!(meaning(libc::SIGUSR1), Meaning::Forward);
        assert_eq!(meaning(libc::SIGUSR2), Meaning::Upgrade);
        assert_eq!(meaning(libc::SIGTTIN), Meaning::Scale);
        assert_eq!(meaning(libc::SIGALRM), Meaning::Ignore);
        assert_eq!(meaning(libc::SIGRTMIN() + 2), Meaning::Ignore);
    }

    #[test]
    fn everything_that_would_terminate_or_stop_is_caught() {
        let caught = caught();
        for s in [
            libc::SIGHUP,
            libc::SIGINT,
            libc::SIGQUIT,
            libc::SIGTERM,
            libc::SIGUSR1,
            libc::SIGUSR2,
            libc::SIGALRM,
            libc::SIGWINCH,
            libc::SIGPWR,
            libc::SIGURG,
            libc::SIGVTALRM,
            libc::SIGPROF,
            libc::SIGIO,
            libc::SIGSYS,
            libc::SIGTSTP,
            libc::SIGTTIN,
            libc::SIGTTOU,
            libc::SIGXCPU,
            libc::SIGXFSZ,
            libc::SIGSTKFLT,
            libc::SIGCHLD,
            libc::SIGRTMIN(),
            libc::SIGRTMAX(),
        ] {
            assert!(caught.contains(&s), "{} not caught", name(s));
        }
        for s in UNCAUGHT {
            assert!(!caught.contains(&s), "{} caught", name(s));
        }
        assert_eq!(name(libc::SIGRTMIN()), "SIGRTMIN");
        assert_eq!(name(libc::SIGRTMIN() + 3), "SIGRTMIN+3");
        assert_eq!(name(libc::SIGRTMAX()), "SIGRTMAX");
        assert_eq!(name(libc::SIGTERM), "SIGTERM");
    }
}
