//! `nogap-demo`: the demo server nogap ships, and the worker of its
//! integration tests.
//!
//! It serves HTTP/1.1 on stream sockets and echoes datagrams on UDP sockets,
//! speaks sd_notify, drains on SIGTERM/SIGINT/SIGQUIT, and has knobs to
//! misbehave (slow start, crash, ignore SIGTERM, stall its accept loop, leak
//! fds, stop its watchdog) so that nogap can be tested against each failure.
//!
//! Layout, one module per concept:
//! - `cli`: the command line, typed by clap value parsers.
//! - `report`: the `--report` JSON snapshot of what the process inherited.
//! - `sockets`: sockets from `LISTEN_FDS`, `--fd` and `--listen`, typed and named.
//! - `notify`: sd_notify datagrams to `NOTIFY_SOCKET`.
//! - `phase`: the serving / stalled / draining phase shared with every task.
//! - `http`: one HTTP/1.1 connection (keep-alive, drain, lingering close).
//! - `server`: the lifecycle loop (start delay, ready, knobs, signals, drain)
//!   and the accept and echo loops.
//! - `sys`: the only `unsafe` code.
//!
//! Everything the process inherited (environment, fds, signal dispositions)
//! is read once, in `main`, before the tokio runtime exists.

use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;

/// One lifecycle line on stderr: `nogap-demo[<pid>]: <message>`.
macro_rules! say {
    ($($arg:tt)*) => {
        {
            // One write: stderr is unbuffered, and a line written in pieces
            // interleaves with nogap's own lines on a shared pipe.
            let line = format!("nogap-demo[{}]: {}\n", std::process::id(), format_args!($($arg)*));
            let _ = std::io::Write::write_all(&mut std::io::stderr(), line.as_bytes());
        }
    };
}

mod abuse;
mod cli;
mod http;
mod listeners;
mod notify;
mod phase;
mod report;
mod server;
mod sockets;
mod sys;

/// Exit codes; the table is repeated in `--help`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    /// Stopped by a signal and drained every connection.
    Clean = 0,
    /// Could not set up: bad inherited fds, bind failure, unwritable report.
    Setup = 1,
    /// Bad command line (clap exits with 2 itself).
    Usage = 2,
    /// A simulated failure: `--fail-at-start`, `--crash-after`,
    /// `--crash-after-requests`.
    Simulated = 3,
}

fn main() -> ExitCode {
    let started = Instant::now();
    let args = cli::Args::parse();
    let code = match run(args, started) {
        Ok(exit) => exit,
        Err(message) => {
            say!("error: {message}");
            Exit::Setup
        }
    };
    say!("exit {}", code as u8);
    ExitCode::from(code as u8)
}

/// How many sockets LISTEN_FDS passed (read before they were taken).
fn inherited_count() -> i32 {
    std::env::var("LISTEN_FDS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// Snapshot, take the sockets, then hand over to the async server.
fn run(args: cli::Args, started: Instant) -> Result<Exit, String> {
    // The report must see the inherited fds exactly as they were passed, so
    // it comes before anything that takes or changes them.
    if let Some(path) = &args.report {
        let written = report::write(path).map_err(|e| format!("--report: {e}"))?;
        say!("report written to {}", written.display());
    }
    let inherited = sockets::Inherited::from_env().map_err(|e| e.to_string())?;
    let notifier = notify::Notifier::from_env();
    let generation = std::env::var("NOGAP_GENERATION").unwrap_or_else(|_| "0".to_owned());

    let sockets =
        sockets::collect(&inherited, &args.fds, &args.listen).map_err(|e| e.to_string())?;
    if sockets.is_empty() {
        say!("error: no sockets: run under a socket-passing supervisor (LISTEN_FDS) or pass --listen or --fd");
        return Ok(Exit::Usage);
    }
    for socket in &sockets {
        say!("listening on {socket}");
    }
    if let Some(kind) = args.knobs.abuse {
        let fds = (0..inherited_count()).map(|i| 3 + i).collect();
        abuse::schedule(kind, args.knobs.abuse_after, started, fds);
    }
    let health = match args.knobs.health {
        Some(addr) => {
            let listener = sockets::bind_health(addr).map_err(|e| e.to_string())?;
            say!("health check on http://{addr}/");
            Some(listener)
        }
        None => None,
    };

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the tokio runtime: {e}"))?;
    let setup = server::Setup {
        sockets,
        health,
        notifier,
        generation,
        started,
    };
    Ok(runtime.block_on(server::run(args.knobs, setup)))
}
