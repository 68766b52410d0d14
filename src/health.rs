//! Accept health, as the kernel sees it.
//!
//! nogap holds every listening socket, so it can watch the accept queue that
//! workers drain. For each TCP listener, every `interval`:
//!
//! 1. Read the queue depth (`TCP_INFO`, well under a microsecond).
//! 2. An empty queue is healthy.
//! 3. A non-empty queue is *progressing* when it got shorter since the last
//!    sample, or when a connection that was queued at the last sample has
//!    left the queue since (it was accepted: `diag` tells queued connections
//!    apart from accepted ones). A busy, even saturated, server accepts now and
//!    then, so its queue makes progress at times; a dead accept loop never does.
//! 4. A queue that stays non-empty without any progress for `stall_timeout`
//!    is **stalled**: [`Verdict::Stalled`] is reported then, and again every
//!    further `stall_timeout` while it lasts (so workers can be replaced one
//!    at a time); [`Verdict::Recovered`] once the queue empties or progresses.
//!
//! Per worker, nogap also reads its open descriptors against its
//! `RLIMIT_NOFILE` soft limit ([`fd_usage`]): a worker near the limit is about
//! to fail `accept4` with EMFILE.

use std::time::{Duration, Instant};

use crate::diag::QueueProgress;

/// What one sample says about a queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Nothing new: healthy, or still stalled since the last report.
    Quiet,
    /// No progress for the stall timeout (again).
    Stalled {
        depth: u32,
    },
    Recovered,
}

/// One listener's history.
pub struct QueueWatch {
    stall_timeout: Duration,
    last_depth: u32,
    /// Since when the queue has been non-empty without progress.
    stuck_since: Option<Instant>,
    stalled: bool,
    progress: QueueProgress,
}

impl QueueWatch {
    pub fn new(stall_timeout: Duration) -> QueueWatch {
        QueueWatch {
            stall_timeout,
            last_depth: 0,
            stuck_since: None,
            stalled: false,
            progress: QueueProgress::new(),
        }
    }

    pub fn is_stalled(&self) -> bool {
        self.stalled
    }

    /// Feed one sample. `queued` lists the queued connections (diag cookies)
    /// when they could be read; it is only needed when `depth > 0`.
    pub fn sample(&mut self, now: Instant, depth: u32, queued: Option<&[u64]>) -> Verdict {
        let shrank = depth < self.last_depth;
        self.last_depth = depth;
        let left = match queued {
            Some(q) => self.progress.observe(q),
            None => {
                self.progress.observe(&[]);
                false
            }
        };
        if depth == 0 || shrank || left {
            self.stuck_since = None;
            if std::mem::take(&mut self.stalled) {
                return Verdict::Recovered;
            }
            return Verdict::Quiet;
        }
        let since = *self.stuck_since.get_or_insert(now);
        if now.saturating_duration_since(since) >= self.stall_timeout {
            self.stalled = true;
            self.stuck_since = Some(now);
            return Verdict::Stalled { depth };
        }
        Verdict::Quiet
    }
}

/// Open descriptors of `pid` and its soft `RLIMIT_NOFILE`.
pub fn fd_usage(pid: i32) -> Option<(u64, u64)> {
    let open = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count() as u64;
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).ok()?;
    let soft = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))?
        .split_whitespace()
        .nth(3)?
        .parse()
        .ok()?;
    Some((open, soft))
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Duration = Duration::from_secs(2);

    #[test]
    fn a_dead_queue_stalls_and_recovers() {
        let t0 = Instant::now();
        let mut q = QueueWatch::new(T);
        let ms = |n| t0 + Duration::from_millis(n);
        assert_eq!(q.sample(ms(0), 1, Some(&[1])), Verdict::Quiet);
        assert_eq!(q.sample(ms(1000), 3, Some(&[1, 2, 3])), Verdict::Quiet);
        assert_eq!(
            q.sample(ms(2000), 5, Some(&[1, 2, 3, 4, 5])),
            Verdict::Stalled { depth: 5 }
        );
        assert_eq!(
            q.sample(ms(3000), 6, Some(&[1, 2, 3, 4, 5, 6])),
            Verdict::Quiet
        );
        assert_eq!(
            q.sample(ms(4000), 6, Some(&[1, 2, 3, 4, 5, 6])),
            Verdict::Stalled { depth: 6 }
        );
        // Someone accepts again.
        assert_eq!(
            q.sample(ms(4100), 6, Some(&[2, 3, 4, 5, 6, 7])),
            Verdict::Recovered
        );
        assert_eq!(q.sample(ms(4200), 0, Some(&[])), Verdict::Quiet);
    }

    #[test]
    fn a_full_but_progressing_queue_is_not_stalled() {
        let t0 = Instant::now();
        let mut q = QueueWatch::new(T);
        // Depth pinned at the backlog, but the head keeps changing.
        for i in 0..100u64 {
            let queued: Vec<u64> = (i..i + 128).collect();
            let v = q.sample(t0 + Duration::from_millis(100 * i), 128, Some(&queued));
            assert_eq!(v, Verdict::Quiet, "sample {i}");
        }
    }

    #[test]
    fn without_diag_a_shrinking_depth_is_progress() {
        let t0 = Instant::now();
        let mut q = QueueWatch::new(T);
        let s = |q: &mut QueueWatch, ms: u64, d| q.sample(t0 + Duration::from_millis(ms), d, None);
        assert_eq!(s(&mut q, 0, 4), Verdict::Quiet);
        assert_eq!(s(&mut q, 1500, 3), Verdict::Quiet);
        assert_eq!(s(&mut q, 3000, 3), Verdict::Quiet);
        assert_eq!(s(&mut q, 4000, 3), Verdict::Quiet);
        assert_eq!(s(&mut q, 5000, 3), Verdict::Stalled { depth: 3 });
    }

    #[test]
    fn own_fd_usage() {
        let (open, soft) = fd_usage(std::process::id() as i32).unwrap();
        assert!(open >= 3 && soft >= open);
    }
}
