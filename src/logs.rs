//! nogap's own logs, as workers cannot harm them.
//!
//! * [`Limiter`]: repeated lines (per worker and kind) are rate-limited: a
//!   flood of 10,000 bad datagrams writes a few lines, then one that says
//!   how many were suppressed.
//! * [`NonBlocking`]: log lines go through a bounded queue to a writer
//!   thread, so a full stderr pipe (shared with a worker that floods it)
//!   never blocks the event loop; lines that do not fit are dropped and
//!   counted, and the count is written once the pipe drains.

use std::collections::HashMap;
use std::hash::Hash;
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Per key: at most `burst` lines per `window`; the rest are counted.
#[derive(Debug)]
pub struct Limiter<K> {
    window: Duration,
    burst: u32,
    keys: HashMap<K, Window>,
}

#[derive(Debug)]
struct Window {
    start: Instant,
    logged: u32,
    suppressed: u64,
}

/// Keys kept at most; older windows are forgotten first.
const MAX_KEYS: usize = 4096;

impl<K: Hash + Eq + Clone> Limiter<K> {
    pub fn new(window: Duration, burst: u32) -> Limiter<K> {
        Limiter {
            window,
            burst,
            keys: HashMap::new(),
        }
    }

    /// Whether to log this occurrence of `key`: `Some(n)` with the number
    /// of lines suppressed since the last logged one (say so), or `None`
    /// (suppressed and counted).
    pub fn allow(&mut self, key: K, now: Instant) -> Option<u64> {
        if self.keys.len() >= MAX_KEYS && !self.keys.contains_key(&key) {
            let window = self.window;
            self.keys
                .retain(|_, w| now.saturating_duration_since(w.start) < window);
            if self.keys.len() >= MAX_KEYS {
                self.keys.clear();
            }
        }
        let w = self.keys.entry(key).or_insert(Window {
            start: now,
            logged: 0,
            suppressed: 0,
        });
        if now.saturating_duration_since(w.start) >= self.window {
            w.start = now;
            w.logged = 0;
        }
        if w.logged < self.burst {
            w.logged += 1;
            return Some(std::mem::take(&mut w.suppressed));
        }
        w.suppressed += 1;
        None
    }
}

/// Lines queued at most for the writer thread.
const QUEUE: usize = 4096;

/// A `MakeWriter` for tracing-subscriber: each line is handed to a writer
/// thread through a bounded queue, never written by the caller.
#[derive(Clone)]
pub struct NonBlocking {
    tx: SyncSender<Vec<u8>>,
    dropped: Arc<AtomicU64>,
    /// Lines queued and lines the thread is done with, for `flush`.
    queued: Arc<AtomicU64>,
    done: Arc<AtomicU64>,
}

impl std::fmt::Debug for NonBlocking {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NonBlocking")
    }
}

impl NonBlocking {
    /// Lines go to `out` from a thread of their own.
    pub fn new<W: Write + Send + 'static>(mut out: W) -> NonBlocking {
        let (tx, rx) = sync_channel::<Vec<u8>>(QUEUE);
        let dropped = Arc::new(AtomicU64::new(0));
        let (queued, done) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let seen = dropped.clone();
        let finished = done.clone();
        let spawned = std::thread::Builder::new()
            .name("nogap-log".into())
            .spawn(move || {
                for line in rx {
                    let lost = seen.swap(0, Ordering::Relaxed);
                    if lost > 0 {
                        let _ = writeln!(
                            out,
                            "WARN nogap: {lost} log lines dropped: the log output was full"
                        );
                    }
                    let _ = out.write_all(&line);
                    finished.fetch_add(1, Ordering::Release);
                }
            });
        if spawned.is_err() {
            // No thread: every line counts as dropped rather than block.
            dropped.fetch_add(1, Ordering::Relaxed);
        }
        NonBlocking {
            tx,
            dropped,
            queued,
            done,
        }
    }

    /// Wait (at most `timeout`) until the lines queued so far are written:
    /// before nogap exits.
    pub fn flush(&self, timeout: Duration) {
        let target = self.queued.load(Ordering::Acquire);
        let deadline = Instant::now() + timeout;
        while self.done.load(Ordering::Acquire) < target && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Queue one whole line for the writer thread; false (and counted as
    /// dropped) when the queue is full.
    pub fn send(&self, line: Vec<u8>) -> bool {
        match self.tx.try_send(line) {
            Ok(()) => {
                self.queued.fetch_add(1, Ordering::Release);
                true
            }
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                false
            }
        }
    }

    /// Lines dropped so far that were not reported yet.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

/// One line being formatted; queued when dropped.
pub struct Line {
    buf: Vec<u8>,
    to: NonBlocking,
}

impl Write for Line {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(b);
        Ok(b.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for Line {
    fn drop(&mut self) {
        if self.buf.is_empty() {
            return;
        }
        self.to.send(std::mem::take(&mut self.buf));
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for NonBlocking {
    type Writer = Line;

    fn make_writer(&'a self) -> Line {
        Line {
            buf: Vec::new(),
            to: self.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_is_cut_to_a_burst_and_a_count() {
        let t0 = Instant::now();
        let mut l = Limiter::new(Duration::from_secs(10), 3);
        let logged: Vec<Option<u64>> = (0..10_000).map(|_| l.allow("bad", t0)).collect();
        assert_eq!(logged.iter().filter(|x| x.is_some()).count(), 3);
        // Another key is not held up.
        assert_eq!(l.allow("other", t0), Some(0));
        // The next window says how many were suppressed.
        assert_eq!(l.allow("bad", t0 + Duration::from_secs(10)), Some(9_997));
        assert_eq!(l.allow("bad", t0 + Duration::from_secs(10)), Some(0));
    }

    #[test]
    fn keys_are_bounded() {
        let t0 = Instant::now();
        let mut l = Limiter::new(Duration::from_secs(10), 1);
        for k in 0..(MAX_KEYS * 3) {
            l.allow(k, t0);
        }
        assert!(l.keys.len() <= MAX_KEYS);
    }

    /// A writer that never returns from a write, as a full pipe.
    struct Stuck(std::sync::mpsc::Receiver<()>);

    impl Write for Stuck {
        fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
            let _ = self.0.recv();
            Err(std::io::Error::other("released"))
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_stuck_output_never_blocks_the_caller() {
        let (release, rx) = std::sync::mpsc::channel();
        let w = NonBlocking::new(Stuck(rx));
        let t0 = Instant::now();
        for _ in 0..(QUEUE * 3) {
            let mut line = tracing_subscriber::fmt::MakeWriter::make_writer(&w);
            line.write_all(b"a line\n").unwrap();
        }
        assert!(t0.elapsed() < Duration::from_secs(5));
        // The writer thread holds at most one line (it is stuck writing the
        // first it took), so all but QUEUE + 1 were dropped. (`dropped()`
        // alone would race: the thread resets it when it reports drops,
        // which it does once it starts, however late.)
        let queued = w.queued.load(Ordering::Acquire);
        assert!(queued <= QUEUE as u64 + 1, "queued {queued}");
        drop(release);
    }
}
