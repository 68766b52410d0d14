//! Errors and exit codes.
//!
//! A [`Error`] is fatal for the command that hit it and maps to one documented
//! exit code. Failures of a single worker are not errors of this kind: they are
//! events the supervisor handles (see `supervisor`), and they never stop it.
//!
//! | code | meaning |
//! |------|---------|
//! | 0 | success: `run` stopped cleanly, a client command succeeded |
//! | 1 | runtime failure; for `reload --wait`, the reload failed (old generation still serving); for `upgrade --wait`, the new binary was refused (the old image runs on) |
//! | 2 | usage: unknown option, bad value (address, duration, signal, mode), missing command |
//! | 3 | sockets: cannot bind, port in use, inherited fds that are not usable sockets |
//! | 4 | command not found or not executable |
//! | 5 | control: cannot reach nogap's control socket, or it refused the request |
//! | 6 | no worker could start: the first generation hit the start limit (`--start-limit`) |
//! | 7 | unsafe: a runtime directory nogap must own belongs to someone else, is a symlink, or lets others in |

use std::io;
use std::process::ExitCode;

/// Exit codes, as documented in the table above and in nogap(1) (EXIT STATUS).
pub mod exit {
    pub const OK: u8 = 0;
    pub const FAILURE: u8 = 1;
    pub const USAGE: u8 = 2;
    pub const SOCKETS: u8 = 3;
    pub const COMMAND: u8 = 4;
    pub const CONTROL: u8 = 5;
    pub const NO_WORKER: u8 = 6;
    pub const UNSAFE: u8 = 7;
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A bad option or value; the message names it.
    #[error("{0}")]
    Usage(String),

    /// A socket nogap was asked to bind could not be set up.
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: String, source: io::Error },

    /// Sockets handed to nogap (LISTEN_FDS) that it cannot use.
    #[error("inherited socket: {0}")]
    Inherited(String),

    /// The worker command cannot be run.
    #[error("{0}")]
    Command(String),

    /// The control socket could not be reached or refused the request.
    #[error("{0}")]
    Control(String),

    /// A reload asked for with `--wait` failed; the old generation serves.
    #[error("reload failed: {0}")]
    ReloadFailed(String),

    /// The first generation hit the start limit: the message says why
    /// its workers failed.
    #[error("no worker could start: {0}")]
    NoWorker(String),

    /// A self-upgrade asked for with `--wait` was refused or failed; the old
    /// image runs on.
    #[error("upgrade refused: {0}")]
    UpgradeFailed(String),

    /// A path nogap must own is not safe to use (someone else's, a
    /// symlink, open to others).
    #[error("{0}")]
    Unsafe(String),

    /// A system call nogap needs failed.
    #[error("{what}: {source}")]
    System { what: String, source: io::Error },
}

impl Error {
    pub fn system(what: impl Into<String>, source: io::Error) -> Self {
        Error::System {
            what: what.into(),
            source,
        }
    }

    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Usage(_) => exit::USAGE,
            Error::Bind { .. } | Error::Inherited(_) => exit::SOCKETS,
            Error::Command(_) => exit::COMMAND,
            Error::Control(_) => exit::CONTROL,
            Error::NoWorker(_) => exit::NO_WORKER,
            Error::Unsafe(_) => exit::UNSAFE,
            Error::ReloadFailed(_) | Error::UpgradeFailed(_) | Error::System { .. } => {
                exit::FAILURE
            }
        }
    }
}

impl From<&Error> for ExitCode {
    fn from(e: &Error) -> ExitCode {
        ExitCode::from(e.exit_code())
    }
}
