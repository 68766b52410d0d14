//! A guard around a running `nogap` (or any other process under test).
//!
//! Its stderr and stdout are read line by line by threads into a shared log;
//! tests wait for log lines with a deadline. Dropping the guard kills the
//! process, every process whose parent it was (found in /proc *before* it is
//! killed), every worker it logged as started, and their process groups; it
//! prints the captured log when the test is failing.

use std::ffi::OsStr;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use super::{pids_of_children, process_exists, start_time, wait_until};

/// Path of the `nogap` binary under test.
pub fn nogap_bin() -> &'static str {
    env!("CARGO_BIN_EXE_nogap")
}

/// Path of the demo worker.
pub fn demo_bin() -> &'static str {
    env!("CARGO_BIN_EXE_nogap-demo")
}

/// `nogap run` with `RUNTIME_DIRECTORY` set to a directory of the test, so
/// that parallel tests never share nogap's default control socket path.
pub fn nogap_command(runtime_dir: &Path) -> Command {
    let mut cmd = Command::new(nogap_bin());
    cmd.arg("run").env("RUNTIME_DIRECTORY", runtime_dir);
    cmd
}

/// A log line pattern: words without `=` form the message, which must occur
/// in the line at word boundaries; each `key=value` must be a field of the
/// line exactly (a quoted value matches unquoted); `key=*` only needs the key.
///
/// `"generation ready generation=3"` matches `INFO generation ready
/// generation=3` but not `... generation=30`.
#[derive(Clone, Debug)]
pub struct LogPattern {
    message: String,
    fields: Vec<(String, String)>,
}

impl LogPattern {
    pub fn parse(pattern: &str) -> LogPattern {
        let mut message = Vec::new();
        let mut fields = Vec::new();
        for tok in tokens(pattern) {
            match tok.split_once('=') {
                Some((k, v)) => fields.push((k.to_string(), unquote(v))),
                None => message.push(tok),
            }
        }
        LogPattern {
            message: message.join(" "),
            fields,
        }
    }

    pub fn matches(&self, line: &str) -> bool {
        if !self.message.is_empty() && !contains_words(line, &self.message) {
            return false;
        }
        self.fields.iter().all(|(k, v)| match field(line, k) {
            Some(actual) => v == "*" || actual == *v,
            None => false,
        })
    }
}

fn contains_words(line: &str, words: &str) -> bool {
    let bytes = line.as_bytes();
    let mut from = 0;
    while let Some(i) = line[from..].find(words) {
        let start = from + i;
        let end = start + words.len();
        let before = start == 0 || bytes[start - 1] == b' ';
        let after = end == bytes.len() || matches!(bytes[end], b' ' | b':' | b',');
        if before && after {
            return true;
        }
        from = start + 1;
    }
    false
}

/// Splits on spaces, keeping double-quoted stretches (with `\"`) together.
fn tokens(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut escaped = false;
    for c in s.chars() {
        if escaped {
            cur.push(c);
            escaped = false;
        } else if quoted && c == '\\' {
            cur.push(c);
            escaped = true;
        } else if c == '"' {
            cur.push(c);
            quoted = !quoted;
        } else if c == ' ' && !quoted {
            if !cur.is_empty() {
                out.push(std::mem::take(&mut cur));
            }
        } else {
            cur.push(c);
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

fn unquote(v: &str) -> String {
    if v.len() >= 2 && v.starts_with('"') && v.ends_with('"') {
        v[1..v.len() - 1]
            .replace("\\\"", "\"")
            .replace("\\\\", "\\")
    } else {
        v.to_string()
    }
}

/// True for a token that starts a field: `ident=...`.
fn is_field_start(token: &str) -> bool {
    match token.split_once('=') {
        Some((k, _)) => {
            !k.is_empty()
                && k.chars()
                    .next()
                    .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && k.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.')
        }
        None => false,
    }
}

/// The value of field `key` in a `LEVEL message key=value...` line, unquoted.
/// An unquoted value runs up to the next `key=` token, so a logger that
/// prints `reason=worker 0 exited with status 3` unquoted is read whole.
pub fn field(line: &str, key: &str) -> Option<String> {
    let toks = tokens(line);
    let start = toks
        .iter()
        .position(|t| is_field_start(t) && t.split_once('=').is_some_and(|(k, _)| k == key))?;
    let first = toks[start].split_once('=').map(|(_, v)| v).unwrap_or("");
    if first.starts_with('"') {
        return Some(unquote(first));
    }
    let mut value = vec![first.to_string()];
    value.extend(
        toks[start + 1..]
            .iter()
            .take_while(|t| !is_field_start(t))
            .cloned(),
    );
    Some(value.join(" ").trim().to_string())
}

/// Strips ANSI colour sequences (in case the logger colours its output).
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' && chars.peek() == Some(&'[') {
            chars.next();
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[derive(Default)]
struct LogState {
    lines: Vec<String>,
    /// Workers seen in `worker started` lines: (pid, start time in /proc).
    workers: Vec<(i32, Option<u64>)>,
    /// Readers still running.
    open_streams: usize,
    /// The pids in the log are another PID namespace's: not ours to track.
    foreign_pids: bool,
}

struct Log {
    state: Mutex<LogState>,
    changed: Condvar,
}

/// A process under test; see the module doc.
pub struct Nogap {
    label: String,
    child: Child,
    pid: i32,
    log: Arc<Log>,
    status: Option<ExitStatus>,
}

impl Nogap {
    /// Starts `nogap run ARGS...` with [`nogap_command`].
    pub fn run<S: AsRef<OsStr>>(runtime_dir: &Path, args: &[S]) -> Nogap {
        let mut cmd = nogap_command(runtime_dir);
        cmd.args(args);
        Nogap::spawn("nogap", cmd)
    }

    /// Starts `cmd` (e.g. `systemd-socket-activate ... nogap run ...` or a
    /// `sh -c '...; exec nogap ...'`) with stdin from /dev/null and stdout
    /// and stderr captured. The guard's pid is the spawned process's.
    pub fn spawn(label: &str, mut cmd: Command) -> Nogap {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {label} ({cmd:?}): {e}"));
        let pid = child.id() as i32;
        let log = Arc::new(Log {
            state: Mutex::new(LogState {
                open_streams: 2,
                ..LogState::default()
            }),
            changed: Condvar::new(),
        });
        let echo = std::env::var_os("NOGAP_TEST_ECHO").is_some();
        let stderr = child.stderr.take().expect("piped stderr");
        let stdout = child.stdout.take().expect("piped stdout");
        spawn_reader(format!("{label}[{pid}]"), "", stderr, log.clone(), echo);
        spawn_reader(
            format!("{label}[{pid}]"),
            "stdout: ",
            stdout,
            log.clone(),
            echo,
        );
        Nogap {
            label: label.to_string(),
            child,
            pid,
            log,
            status: None,
        }
    }

    /// [`Nogap::spawn`] for a process that runs nogap in a PID namespace
    /// of its own (`unshare --pid --fork`): the worker pids it logs are not
    /// this namespace's, so the guard does not track them; killing the
    /// process (the namespace's PID 1 with it) kills them all.
    pub fn spawn_in_pid_namespace(label: &str, cmd: Command) -> Nogap {
        let nogap = Nogap::spawn(label, cmd);
        let mut state = nogap.log.state.lock().unwrap();
        state.foreign_pids = true;
        state.workers.clear();
        drop(state);
        nogap
    }

    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// All lines captured so far.
    pub fn lines(&self) -> Vec<String> {
        self.log.state.lock().unwrap().lines.clone()
    }

    /// The captured log as one string, for messages.
    pub fn log_text(&self) -> String {
        self.lines().join("\n")
    }

    /// Number of lines captured so far (to wait for lines after this point).
    pub fn log_len(&self) -> usize {
        self.log.state.lock().unwrap().lines.len()
    }

    /// Lines matching `pattern` (see [`LogPattern`]).
    pub fn matching(&self, pattern: &str) -> Vec<String> {
        let p = LogPattern::parse(pattern);
        self.lines().into_iter().filter(|l| p.matches(l)).collect()
    }

    pub fn count_log(&self, pattern: &str) -> usize {
        self.matching(pattern).len()
    }

    /// Waits for a line matching `pattern`; panics with the log on timeout.
    pub fn wait_for_log(&self, pattern: &str, timeout: Duration) -> String {
        self.wait_for_log_from(0, pattern, timeout)
    }

    /// Like [`Nogap::wait_for_log`], among lines at index `from` or later.
    pub fn wait_for_log_from(&self, from: usize, pattern: &str, timeout: Duration) -> String {
        match self.try_wait_for_log_from(from, pattern, timeout) {
            Some(line) => line,
            None => panic!(
                "{}: no log line matching {pattern:?} within {timeout:?}; log:\n{}",
                self.label,
                self.log_text()
            ),
        }
    }

    pub fn try_wait_for_log(&self, pattern: &str, timeout: Duration) -> Option<String> {
        self.try_wait_for_log_from(0, pattern, timeout)
    }

    pub fn try_wait_for_log_from(
        &self,
        from: usize,
        pattern: &str,
        timeout: Duration,
    ) -> Option<String> {
        let p = LogPattern::parse(pattern);
        self.wait_log(timeout, |lines| {
            lines.iter().skip(from).find(|l| p.matches(l)).cloned()
        })
    }

    /// Waits until `n` lines match `pattern`; returns them.
    pub fn wait_for_count(&self, pattern: &str, n: usize, timeout: Duration) -> Vec<String> {
        let p = LogPattern::parse(pattern);
        let found = self.wait_log(timeout, |lines| {
            let m: Vec<String> = lines.iter().filter(|l| p.matches(l)).cloned().collect();
            (m.len() >= n).then_some(m)
        });
        found.unwrap_or_else(|| {
            panic!(
                "{}: fewer than {n} log lines matching {pattern:?} within {timeout:?}; log:\n{}",
                self.label,
                self.log_text()
            )
        })
    }

    /// Waits (on the log's condition variable) until `check` finds something
    /// or the deadline passes or both output streams closed.
    fn wait_log<T>(&self, timeout: Duration, check: impl Fn(&[String]) -> Option<T>) -> Option<T> {
        let deadline = Instant::now() + timeout;
        let mut state = self.log.state.lock().unwrap();
        loop {
            if let Some(v) = check(&state.lines) {
                return Some(v);
            }
            let now = Instant::now();
            if now >= deadline || state.open_streams == 0 {
                return None;
            }
            state = self
                .log
                .changed
                .wait_timeout(state, deadline - now)
                .unwrap()
                .0;
        }
    }

    /// Pids from `worker started` lines, optionally of one generation.
    pub fn started_pids(&self, generation: Option<u32>) -> Vec<i32> {
        let pattern = match generation {
            Some(g) => format!("worker started generation={g}"),
            None => "worker started".to_string(),
        };
        self.matching(&pattern)
            .iter()
            .filter_map(|l| field(l, "pid")?.parse().ok())
            .collect()
    }

    /// Waits for `n` workers of `generation` to be started; returns their pids.
    pub fn wait_workers(&self, generation: u32, n: usize, timeout: Duration) -> Vec<i32> {
        self.wait_for_count(
            &format!("worker started generation={generation}"),
            n,
            timeout,
        )
        .iter()
        .map(|l| {
            field(l, "pid")
                .and_then(|p| p.parse().ok())
                .unwrap_or_else(|| panic!("no pid= in {l:?}"))
        })
        .collect()
    }

    /// Current children of the process (from /proc).
    pub fn children(&self) -> Vec<i32> {
        pids_of_children(self.pid)
    }

    /// Sends `sig` to the process.
    pub fn signal(&self, sig: Signal) {
        if self.status.is_none() {
            kill(Pid::from_raw(self.pid), sig)
                .unwrap_or_else(|e| panic!("kill({}, {sig}): {e}", self.pid));
        }
    }

    /// Waits for the process to exit; panics with the log on timeout.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        match self.try_wait_exit(timeout) {
            Some(s) => s,
            None => panic!(
                "{} (pid {}) did not exit within {timeout:?}; log:\n{}",
                self.label,
                self.pid,
                self.log_text()
            ),
        }
    }

    pub fn try_wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        if let Some(s) = self.status {
            return Some(s);
        }
        let child = &mut self.child;
        let mut status = None;
        wait_until(timeout, || {
            status = child.try_wait().expect("try_wait");
            status.is_some()
        });
        self.status = status;
        status
    }

    /// Exit status if the process has exited (reaps it).
    pub fn exited(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().expect("try_wait");
        }
        self.status
    }

    /// Waits until both output streams are closed (every process holding
    /// them exited) and returns all lines.
    pub fn wait_output_closed(&self, timeout: Duration) -> Vec<String> {
        self.wait_log(timeout, |_| None::<()>);
        let state = self.log.state.lock().unwrap();
        assert_eq!(
            state.open_streams, 0,
            "{}: output still open after {timeout:?}",
            self.label
        );
        state.lines.clone()
    }

    /// Worker pids logged as started that are still alive (not zombies) and
    /// are still the same process.
    pub fn live_logged_workers(&self) -> Vec<i32> {
        let workers = self.log.state.lock().unwrap().workers.clone();
        workers
            .into_iter()
            .filter(|&(pid, st)| process_exists(pid) && (st.is_none() || start_time(pid) == st))
            .map(|(pid, _)| pid)
            .collect()
    }
}

fn spawn_reader(
    label: String,
    prefix: &'static str,
    stream: impl Read + Send + 'static,
    log: Arc<Log>,
    echo: bool,
) {
    thread::Builder::new()
        .name(format!("log-{label}"))
        .spawn(move || {
            let started = LogPattern::parse("worker started pid=*");
            let mut reader = BufReader::new(stream);
            let mut raw = Vec::new();
            loop {
                raw.clear();
                match reader.read_until(b'\n', &mut raw) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
                let text = String::from_utf8_lossy(&raw);
                let line = format!(
                    "{prefix}{}",
                    strip_ansi(text.trim_end_matches(['\n', '\r']))
                );
                if echo {
                    eprintln!("[{label}] {line}");
                }
                let mut state = log.state.lock().unwrap();
                if prefix.is_empty() && !state.foreign_pids && started.matches(&line) {
                    if let Some(pid) = field(&line, "pid").and_then(|p| p.parse().ok()) {
                        state.workers.push((pid, start_time(pid)));
                    }
                }
                state.lines.push(line);
                log.changed.notify_all();
            }
            let mut state = log.state.lock().unwrap();
            state.open_streams -= 1;
            log.changed.notify_all();
        })
        .expect("spawn log reader");
}

impl Drop for Nogap {
    fn drop(&mut self) {
        // Children first (found before the kill, while they still have this
        // process as parent), then the process, then the children and their
        // own process groups, then any worker it logged that is still alive.
        let children: Vec<(i32, Option<u64>)> = if self.status.is_none() {
            pids_of_children(self.pid)
                .into_iter()
                .map(|p| (p, start_time(p)))
                .collect()
        } else {
            Vec::new()
        };
        let _ = self.child.kill();
        let _ = self.child.wait();
        let logged = self.log.state.lock().unwrap().workers.clone();
        let mut victims = Vec::new();
        for (pid, st) in children.into_iter().chain(logged) {
            if process_exists(pid) && (st.is_none() || start_time(pid) == st) {
                victims.push(pid);
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                // Its own process group, if it leads one (never ours).
                if nix::unistd::getpgid(Some(Pid::from_raw(pid))) == Ok(Pid::from_raw(pid))
                    && nix::unistd::getpgrp() != Pid::from_raw(pid)
                {
                    let _ = kill(Pid::from_raw(-pid), Signal::SIGKILL);
                }
            }
        }
        let all_gone = wait_until(Duration::from_secs(10), || {
            victims.iter().all(|&p| !process_exists(p))
        });
        if thread::panicking() {
            let lines = self.lines();
            eprintln!(
                "---- {} (pid {}) log, {} lines ----",
                self.label,
                self.pid,
                lines.len()
            );
            for l in lines {
                eprintln!("[{}] {l}", self.label);
            }
            eprintln!("---- end of {} log ----", self.label);
        }
        if !all_gone && !thread::panicking() {
            panic!(
                "{}: processes still alive 10s after SIGKILL: {victims:?}",
                self.label
            );
        }
    }
}
