//! Host processes with a deadline, and polling a condition with one.
//!
//! Everything the harness runs goes through [`run`] or [`run_logged`]: the
//! command gets its own process group, and when the deadline passes the whole
//! group is killed, so a hung `nsenter` takes its forked child with it.

use std::fmt;
use std::fs::File;
use std::io::{self, Read, Write};
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;

/// How long a killed process group gets to be reaped and close its pipes.
const REAP_GRACE: Duration = Duration::from_secs(5);
/// The longest pause between two probes of [`try_wait_for`].
const MAX_POLL_INTERVAL: Duration = Duration::from_millis(100);

/// Why a command did not produce a result.
#[derive(Debug)]
pub enum RunError {
    /// The program could not be started at all.
    Spawn { command: String, source: io::Error },
    /// The deadline passed; the process group was killed.
    TimedOut { command: String, after: Duration },
    /// Waiting for the process failed (should not happen).
    Wait { command: String, source: io::Error },
}

impl fmt::Display for RunError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RunError::Spawn { command, source } => write!(f, "cannot start `{command}`: {source}"),
            RunError::TimedOut { command, after } => {
                write!(f, "`{command}` still running after {after:?}; killed")
            }
            RunError::Wait { command, source } => {
                write!(f, "cannot wait for `{command}`: {source}")
            }
        }
    }
}

impl std::error::Error for RunError {}

/// Runs `cmd` to completion with `stdin` as its input, capturing its output;
/// kills its process group if it is not done within `timeout`.
pub fn run(cmd: &mut Command, stdin: Option<&[u8]>, timeout: Duration) -> Result<Output, RunError> {
    let command = describe(cmd);
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .process_group(0);
    let mut child = cmd.spawn().map_err(|source| RunError::Spawn {
        command: command.clone(),
        source,
    })?;
    if let (Some(data), Some(mut pipe)) = (stdin, child.stdin.take()) {
        let data = data.to_vec();
        // A child that does not read its input must not block us: write from
        // a thread, and close the pipe (EOF) when done.
        thread::spawn(move || {
            let _ = pipe.write_all(&data);
        });
    }
    let stdout = collect(child.stdout.take());
    let stderr = collect(child.stderr.take());
    let status = wait_deadline(child, &command, timeout)?;
    // Readers end when every holder of the pipes is gone; a grandchild that
    // left the process group could keep them open, so bound this wait too.
    let reap_deadline = Instant::now() + REAP_GRACE;
    let take = |rx: mpsc::Receiver<Vec<u8>>| {
        rx.recv_timeout(reap_deadline.saturating_duration_since(Instant::now()))
            .unwrap_or_default()
    };
    Ok(Output {
        status,
        stdout: take(stdout),
        stderr: take(stderr),
    })
}

/// Runs `cmd` to completion with its output appended to `log`; kills its
/// process group if it is not done within `timeout`.
pub fn run_logged(
    cmd: &mut Command,
    log: &Path,
    timeout: Duration,
) -> Result<ExitStatus, RunError> {
    let command = describe(cmd);
    let spawn_error = |source| RunError::Spawn {
        command: command.clone(),
        source,
    };
    let out = File::options()
        .create(true)
        .append(true)
        .open(log)
        .map_err(spawn_error)?;
    let err = out.try_clone().map_err(spawn_error)?;
    cmd.stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .process_group(0);
    let child = cmd.spawn().map_err(spawn_error)?;
    wait_deadline(child, &command, timeout)
}

/// Waits for `child` (the leader of its own process group) until `timeout`,
/// then kills the group and reaps the child.
fn wait_deadline(
    mut child: Child,
    command: &str,
    timeout: Duration,
) -> Result<ExitStatus, RunError> {
    let group = Pid::from_raw(child.id() as i32);
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let _ = tx.send(child.wait());
    });
    let wait_error = |source| RunError::Wait {
        command: command.to_owned(),
        source,
    };
    match rx.recv_timeout(timeout) {
        Ok(status) => status.map_err(wait_error),
        Err(_) => {
            // The waiter has not reaped the leader, so the group id is still ours.
            let _ = killpg(group, Signal::SIGKILL);
            let _ = rx.recv_timeout(REAP_GRACE);
            Err(RunError::TimedOut {
                command: command.to_owned(),
                after: timeout,
            })
        }
    }
}

fn collect(pipe: Option<impl Read + Send + 'static>) -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel();
    if let Some(mut pipe) = pipe {
        thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = pipe.read_to_end(&mut buf);
            let _ = tx.send(buf);
        });
    } else {
        let _ = tx.send(Vec::new());
    }
    rx
}

/// The command line, for messages.
pub fn describe(cmd: &Command) -> String {
    let mut words = vec![cmd.get_program().to_string_lossy().into_owned()];
    words.extend(cmd.get_args().map(|a| a.to_string_lossy().into_owned()));
    words.join(" ")
}

/// Calls `probe` until it returns `Some`, at most until `timeout` has passed.
/// Probes at growing intervals (5 ms up to 100 ms).
pub fn try_wait_for<T>(timeout: Duration, mut probe: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(5);
    loop {
        if let Some(value) = probe() {
            return Some(value);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return None;
        }
        thread::sleep(pause.min(left));
        pause = (pause * 2).min(MAX_POLL_INTERVAL);
    }
}

/// Like [`try_wait_for`], but panics naming `what` when time runs out.
pub fn wait_for<T>(
    what: impl fmt::Display,
    timeout: Duration,
    probe: impl FnMut() -> Option<T>,
) -> T {
    try_wait_for(timeout, probe)
        .unwrap_or_else(|| panic!("timed out after {timeout:?} waiting for {what}"))
}

/// A TCP port on 127.0.0.1 that was free a moment ago (the host and the
/// containers share the network namespace, so this is free for both).
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener
        .local_addr()
        .expect("local address of a bound socket")
        .port()
}

/// Shorthands for looking at an [`Output`].
pub trait OutputExt {
    /// Standard output, lossily decoded.
    fn stdout_text(&self) -> String;
    /// Standard error, lossily decoded.
    fn stderr_text(&self) -> String;
    /// Panics, showing both streams, unless the command exited with 0;
    /// returns standard output.
    fn expect_success(&self, what: &str) -> String;
}

impl OutputExt for Output {
    fn stdout_text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    fn stderr_text(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }

    fn expect_success(&self, what: &str) -> String {
        assert!(
            self.status.success(),
            "{what} failed ({}):\n--- stdout\n{}--- stderr\n{}",
            self.status,
            self.stdout_text(),
            self.stderr_text()
        );
        self.stdout_text()
    }
}

/// Writes one progress line straight to the standard error file descriptor,
/// past libtest's output capture: slow steps should be visible as they happen.
pub fn progress(line: impl fmt::Display) {
    let _ = writeln!(io::stderr().lock(), "[systemd harness] {line}");
}
