//! Worker output with names: each worker's stdout and stderr through a pipe
//! that nogap reads, line by line, into the journal or its own stderr.
//!
//! * Under journald (nogap's stderr is the journal), each line becomes a
//!   journal entry with `WORKER`, `GENERATION`, `WORKER_PID` and the
//!   command's `SYSLOG_IDENTIFIER`; a leading sd-daemon `<N>` prefix
//!   (sd-daemon(3)) sets its `PRIORITY` (default 6, info).
//! * Otherwise each line goes to nogap's stderr as
//!   `[gen 3 worker 1 pid 1234] line`.
//!
//! Bounded: the pipe is read without blocking, at most [`CHUNK`] bytes per
//! wake-up before the task yields to the loop; a line longer than
//! [`MAX_LINE`] is cut there (the rest of it is dropped); each worker may
//! emit [`LINES_PER_SEC`] lines a second (a burst of as many), and lines
//! over that, or that the journal socket cannot take right now, are dropped,
//! counted ([`Capture::dropped`]), and said so in a notice at most once a
//! second. A worker's last [`TAIL`] lines are kept, for the reason of a
//! failed start.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixDatagram;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::unix::pipe;

/// The longest line passed on, in bytes; the rest is cut.
pub const MAX_LINE: usize = 4096;
/// Lines a worker may write per second (and in a burst).
pub const LINES_PER_SEC: f64 = 2000.0;
/// Lines kept per worker for a failed start's reason.
pub const TAIL: usize = 20;
/// Bytes read per wake-up before yielding to the loop.
pub const CHUNK: usize = 64 * 1024;
/// Each kept line at most this long (in characters).
const TAIL_LINE: usize = 200;
/// journald's socket for the native protocol.
const JOURNAL: &str = "/run/systemd/journal/socket";

/// Where lines go.
#[derive(Clone, Debug)]
pub enum Sink {
    /// journald's native socket; `identifier`: SYSLOG_IDENTIFIER.
    Journal {
        socket: Arc<UnixDatagram>,
        identifier: String,
    },
    /// nogap's stderr, each line prefixed, through a writer thread of its
    /// own: a full stderr pipe never stalls the loop (lines are dropped and
    /// counted instead).
    Stderr(crate::logs::NonBlocking),
}

impl Sink {
    /// The journal when nogap's stderr is it (and its socket can be used),
    /// else stderr.
    pub fn new(journal: bool, identifier: String) -> Sink {
        if journal {
            let socket = UnixDatagram::unbound().and_then(|s| {
                s.connect(JOURNAL)?;
                s.set_nonblocking(true)?;
                Ok(s)
            });
            match socket {
                Ok(socket) => {
                    return Sink::Journal {
                        socket: Arc::new(socket),
                        identifier,
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot write worker output to the journal: to stderr instead")
                }
            }
        }
        Sink::Stderr(crate::logs::NonBlocking::new(io::stderr()))
    }
}

/// Who wrote a line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Origin {
    pub generation: u64,
    pub slot: u32,
    pub pid: i32,
}

/// One worker's pipe and what was read of it.
pub struct Capture {
    inner: Arc<Mutex<Reader>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for Capture {
    /// The worker is gone: what its pipe still holds is read (bounded).
    fn drop(&mut self) {
        if let Some(t) = &self.task {
            t.abort();
        }
        if let Ok(mut r) = self.inner.lock() {
            if r.read_pipe(4 * CHUNK) != Read::Closed && !r.line.is_empty() {
                r.end_line(Instant::now());
            }
            if r.unreported > 0 {
                r.notice();
            }
        }
    }
}

/// The pipe for a worker about to start: the write end goes to the child.
pub struct Pipe {
    read: OwnedFd,
    pub write: OwnedFd,
}

impl Pipe {
    pub fn new() -> io::Result<Pipe> {
        let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
        // Only nogap's end is non-blocking: the worker's writes block as
        // usual when the pipe is full.
        let flags = nix::fcntl::fcntl(read.as_raw_fd(), nix::fcntl::FcntlArg::F_GETFL)?;
        let flags = nix::fcntl::OFlag::from_bits_truncate(flags) | nix::fcntl::OFlag::O_NONBLOCK;
        nix::fcntl::fcntl(read.as_raw_fd(), nix::fcntl::FcntlArg::F_SETFL(flags))?;
        Ok(Pipe { read, write })
    }

    /// Keep a copy of the read end in systemd's fd store, as
    /// `nogap.output.PID`, while worker `pid` lives: if nogap dies, the
    /// draining worker's writes still have a reader (systemd, which never
    /// reads: the pipe's 64 KiB buffer) instead of failing with EPIPE or
    /// SIGPIPE. [`unstore`] takes it out when the worker is gone.
    pub fn store(&self, pid: i32) {
        let name = format!("{}{pid}", crate::sockets::intake::OUTPUT_PREFIX);
        let states = [
            sd_notify::NotifyState::FdStore,
            sd_notify::NotifyState::FdName(&name),
        ];
        if let Err(e) = sd_notify::notify_with_fds(&states, &[self.read.as_fd()]) {
            tracing::debug!(pid, error = %e, "cannot store the output pipe");
        }
    }

    /// Read the pipe (whose write end the worker `origin` has now) into
    /// `sink`, from a task; `dropped` counts lines dropped, for all workers.
    pub fn capture(self, origin: Origin, sink: Sink, dropped: Arc<AtomicU64>) -> Capture {
        Capture::adopt(self.read, origin, sink, dropped)
    }
}

impl Capture {
    /// Read the pipe whose read end is `read` (non-blocking; a new pipe's,
    /// or one an earlier image of nogap carried across a self-upgrade).
    pub fn adopt(read: OwnedFd, origin: Origin, sink: Sink, dropped: Arc<AtomicU64>) -> Capture {
        // A second handle for `Capture::tail`'s reads; same pipe.
        let own = read.try_clone().ok();
        let inner = Arc::new(Mutex::new(Reader::new(origin, sink, dropped, own)));
        let task = match pipe::Receiver::from_owned_fd(read) {
            Ok(rx) => Some(tokio::spawn(read_loop(rx, inner.clone()))),
            Err(e) => {
                tracing::warn!(worker = origin.slot, generation = origin.generation, error = %e, "cannot watch worker output");
                None
            }
        };
        Capture { inner, task }
    }
}

/// What one round of reading found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Read {
    /// The pipe is empty for now.
    Drained,
    /// The budget is spent; there may be more.
    More,
    /// EOF (every writer is gone) or an error: done.
    Closed,
}

async fn read_loop(rx: pipe::Receiver, inner: Arc<Mutex<Reader>>) {
    loop {
        if rx.readable().await.is_err() {
            return;
        }
        // try_read clears the readiness when the pipe is empty.
        let read = match inner.lock() {
            Ok(mut r) => r.read_some(CHUNK, |buf| rx.try_read(buf)),
            Err(_) => Read::Closed,
        };
        if read == Read::Closed {
            return;
        }
        // Let the loop run between chunks, however fast the worker writes.
        tokio::task::yield_now().await;
    }
}

impl Capture {
    /// nogap's read end of the pipe, until EOF: what a self-upgrade carries.
    pub fn raw_fd(&self) -> Option<std::os::fd::RawFd> {
        let r = self.inner.lock().ok()?;
        r.fd.as_ref().map(|f| f.as_raw_fd())
    }

    /// Read what the pipe holds now (without waiting), then the last lines.
    pub fn tail(&self) -> Vec<String> {
        match self.inner.lock() {
            Ok(mut r) => {
                // Bounded: a worker still writing cannot keep this here.
                r.read_pipe(16 * CHUNK);
                r.tail.iter().cloned().collect()
            }
            Err(_) => Vec::new(),
        }
    }
}

/// The reading state of one pipe.
struct Reader {
    /// The pipe, until EOF.
    fd: Option<OwnedFd>,
    origin: Origin,
    sink: Sink,
    /// The line so far (at most MAX_LINE bytes).
    line: Vec<u8>,
    /// The current line was cut: drop up to its end.
    cutting: bool,
    tail: VecDeque<String>,
    limit: RateLimit,
    dropped: Arc<AtomicU64>,
    /// Dropped since the last notice.
    unreported: u64,
    last_notice: Option<Instant>,
}

impl Reader {
    fn new(origin: Origin, sink: Sink, dropped: Arc<AtomicU64>, fd: Option<OwnedFd>) -> Reader {
        Reader {
            fd,
            origin,
            sink,
            line: Vec::with_capacity(256),
            cutting: false,
            tail: VecDeque::with_capacity(TAIL),
            limit: RateLimit::new(LINES_PER_SEC),
            dropped,
            unreported: 0,
            last_notice: None,
        }
    }

    /// Read what the pipe holds (up to `budget` bytes) through nogap's own
    /// handle on it, without waiting.
    fn read_pipe(&mut self, budget: usize) -> Read {
        let Some(fd) = self.fd.as_ref().and_then(|f| f.try_clone().ok()) else {
            return Read::Closed;
        };
        self.read_some(budget, |buf| {
            nix::unistd::read(fd.as_raw_fd(), buf).map_err(io::Error::from)
        })
    }

    /// Read up to `budget` bytes with `read` (non-blocking).
    fn read_some(
        &mut self,
        budget: usize,
        mut read: impl FnMut(&mut [u8]) -> io::Result<usize>,
    ) -> Read {
        let mut buf = [0u8; 16 * 1024];
        let mut total = 0;
        while total < budget {
            if self.fd.is_none() {
                return Read::Closed;
            }
            let n = match read(&mut buf) {
                Ok(0) => {
                    self.finish();
                    return Read::Closed;
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Read::Drained,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => {
                    self.finish();
                    return Read::Closed;
                }
            };
            total += n;
            self.feed(&buf[..n], Instant::now());
        }
        Read::More
    }

    /// EOF: the last line without its newline, and the last notice.
    fn finish(&mut self) {
        self.fd = None;
        if !self.line.is_empty() {
            self.end_line(Instant::now());
        }
        if self.unreported > 0 {
            self.notice();
        }
    }

    fn feed(&mut self, mut bytes: &[u8], now: Instant) {
        while !bytes.is_empty() {
            let (part, rest, ends) = match bytes.iter().position(|b| *b == b'\n') {
                Some(i) => (&bytes[..i], &bytes[i + 1..], true),
                None => (bytes, &bytes[bytes.len()..], false),
            };
            if !self.cutting {
                let room = MAX_LINE - self.line.len();
                self.line.extend_from_slice(&part[..part.len().min(room)]);
                if part.len() > room {
                    // Cut: pass what there is, drop the rest of the line.
                    self.end_line(now);
                    self.cutting = true;
                }
            }
            if ends {
                if self.cutting {
                    self.cutting = false;
                } else {
                    self.end_line(now);
                }
            }
            bytes = rest;
        }
    }

    fn end_line(&mut self, now: Instant) {
        let line = String::from_utf8_lossy(&self.line).into_owned();
        self.line.clear();
        if self.tail.len() == TAIL {
            self.tail.pop_front();
        }
        self.tail
            .push_back(line.chars().take(TAIL_LINE).collect::<String>());
        if !self.limit.take(now) {
            self.drop_line();
            return;
        }
        if self.unreported > 0
            && self
                .last_notice
                .map_or(true, |t| now - t >= Duration::from_secs(1))
        {
            self.last_notice = Some(now);
            self.notice();
        }
        if !self.emit(&line, None) {
            self.drop_line();
        }
    }

    fn drop_line(&mut self) {
        self.dropped.fetch_add(1, Ordering::Relaxed);
        self.unreported += 1;
    }

    fn notice(&mut self) {
        let n = std::mem::take(&mut self.unreported);
        let text = format!(
            "nogap: {n} line(s) of this worker's output dropped (more than {LINES_PER_SEC} lines a second, or the journal was busy)"
        );
        self.emit(&text, Some(4));
    }

    /// Write one line; false if it could not be written now.
    fn emit(&self, line: &str, priority: Option<u8>) -> bool {
        let o = self.origin;
        match &self.sink {
            Sink::Journal { socket, identifier } => {
                let (prio, text) = match priority {
                    Some(p) => (p, line),
                    None => split_priority(line),
                };
                let msg = journal_entry(&[
                    ("MESSAGE", text),
                    ("PRIORITY", &prio.to_string()),
                    ("SYSLOG_IDENTIFIER", identifier),
                    ("WORKER", &o.slot.to_string()),
                    ("GENERATION", &o.generation.to_string()),
                    ("WORKER_PID", &o.pid.to_string()),
                ]);
                socket.send(&msg).is_ok()
            }
            Sink::Stderr(out) => {
                let text = format!(
                    "[gen {} worker {} pid {}] {line}\n",
                    o.generation, o.slot, o.pid
                );
                out.send(text.into_bytes())
            }
        }
    }
}

/// `<N>` at the start of a line (sd-daemon(3)): priority N and the rest;
/// else info (6) and the line.
pub fn split_priority(line: &str) -> (u8, &str) {
    let b = line.as_bytes();
    if b.len() >= 3 && b[0] == b'<' && b[2] == b'>' && (b'0'..=b'7').contains(&b[1]) {
        return (b[1] - b'0', &line[3..]);
    }
    (6, line)
}

/// journald's native protocol: `KEY=value\n` per field (values without a
/// newline; with one, `KEY\n`, its length as 64-bit little endian, the
/// value, `\n`).
pub fn journal_entry(fields: &[(&str, &str)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    for (k, v) in fields {
        out.extend_from_slice(k.as_bytes());
        if v.contains('\n') {
            out.push(b'\n');
            out.extend_from_slice(&(v.len() as u64).to_le_bytes());
        } else {
            out.push(b'=');
        }
        out.extend_from_slice(v.as_bytes());
        out.push(b'\n');
    }
    out
}

/// A token bucket of lines.
struct RateLimit {
    per_sec: f64,
    tokens: f64,
    at: Option<Instant>,
}

impl RateLimit {
    fn new(per_sec: f64) -> RateLimit {
        RateLimit {
            per_sec,
            tokens: per_sec,
            at: None,
        }
    }

    fn take(&mut self, now: Instant) -> bool {
        if let Some(at) = self.at {
            let add = now.saturating_duration_since(at).as_secs_f64() * self.per_sec;
            self.tokens = (self.tokens + add).min(self.per_sec);
        }
        self.at = Some(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Take worker `pid`'s output pipe out of systemd's fd store (see
/// [`Pipe::store`]).
pub fn unstore(pid: i32) {
    crate::sockets::intake::unstore(&format!("{}{pid}", crate::sockets::intake::OUTPUT_PREFIX));
}

/// A borrowed handle, for `ExecPlan::output_to`.
pub fn write_end(pipe: &Pipe) -> BorrowedFd<'_> {
    pipe.write.as_fd()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reader() -> Reader {
        let origin = Origin {
            generation: 3,
            slot: 1,
            pid: 1234,
        };
        Reader::new(
            origin,
            Sink::new(false, String::new()),
            Arc::new(AtomicU64::new(0)),
            None,
        )
    }

    #[test]
    fn priorities_follow_sd_daemon() {
        assert_eq!(split_priority("<3>disk full"), (3, "disk full"));
        assert_eq!(split_priority("<7>"), (7, ""));
        assert_eq!(split_priority("<8>x"), (6, "<8>x"));
        assert_eq!(split_priority("plain"), (6, "plain"));
        assert_eq!(split_priority("<3"), (6, "<3"));
    }

    #[test]
    fn journal_entries_use_the_binary_form_for_newlines() {
        let e = journal_entry(&[("MESSAGE", "hi"), ("X", "a\nb")]);
        let mut want = b"MESSAGE=hi\nX\n".to_vec();
        want.extend_from_slice(&3u64.to_le_bytes());
        want.extend_from_slice(b"a\nb\n");
        assert_eq!(e, want);
    }

    #[test]
    fn lines_are_split_cut_and_kept_bounded() {
        let mut r = reader();
        let t = Instant::now();
        r.feed(b"one\ntw", t);
        r.feed(b"o\n", t);
        let long = vec![b'x'; MAX_LINE * 3];
        r.feed(&long, t);
        r.feed(b"tail of the long line\nthree\n", t);
        let tail: Vec<String> = r.tail.iter().cloned().collect();
        assert_eq!(tail.len(), 4, "{tail:?}");
        assert_eq!(&tail[..2], ["one", "two"]);
        assert_eq!(tail[2].len(), TAIL_LINE, "kept lines are short");
        assert_eq!(tail[3], "three");
        assert!(
            r.line.capacity() <= MAX_LINE * 2,
            "the line buffer stays bounded"
        );
        for i in 0..100 {
            r.feed(format!("line {i}\n").as_bytes(), t);
        }
        assert_eq!(r.tail.len(), TAIL);
        assert_eq!(r.tail.back().map(String::as_str), Some("line 99"));
    }

    #[test]
    fn a_flood_is_dropped_counted_and_reported() {
        let mut r = reader();
        let t = Instant::now();
        let n = LINES_PER_SEC as u64 + 500;
        for _ in 0..n {
            r.feed(b"spam\n", t);
        }
        assert_eq!(r.dropped.load(Ordering::Relaxed), 500);
        assert_eq!(r.unreported, 500);
        // A second later a line passes, with the notice before it.
        r.feed(b"calm\n", t + Duration::from_secs(1));
        assert_eq!(r.unreported, 0);
        assert_eq!(r.dropped.load(Ordering::Relaxed), 500);
    }
}
