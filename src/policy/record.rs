//! What nogap has done since it started, as metrics and `nogap status` read
//! it: counters, the durations of reloads, and a bounded ring of the recent
//! events (reloads, replacements, restarts) with their reasons. Kept by the
//! policy as it decides (this module is part of it); plain data, no I/O.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

/// How many recent events the state keeps.
pub const RECENT_EVENTS: usize = 20;

/// Upper bounds (seconds) of the reload-duration histogram's buckets: from a
/// worker that is ready at once to one that warms up for minutes.
pub const RELOAD_BUCKETS: &[f64] = &[
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
];

/// Counters since nogap started.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct Counters {
    /// Reloads whose new generation came to serve.
    pub reloads_ok: u64,
    /// Reloads whose new generation failed to start (the old one kept serving).
    pub reloads_failed: u64,
    /// Restarts of a worker that exited (or could not start) in its slot.
    pub restarts: u64,
    /// Health replacements started, by reason (`UnhealthyReason::label`).
    pub replacements: BTreeMap<&'static str, u64>,
    /// How long reloads took, from the request to serving or failure.
    pub reload_seconds: Histogram,
}

/// A fixed-bucket histogram of seconds (bounds: [`RELOAD_BUCKETS`]).
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Histogram {
    /// Observations per bucket (not cumulative); the last counts those
    /// above every bound.
    pub counts: Vec<u64>,
    pub sum: f64,
    pub count: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            counts: vec![0; RELOAD_BUCKETS.len() + 1],
            sum: 0.0,
            count: 0,
        }
    }
}

impl Histogram {
    pub fn observe(&mut self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = RELOAD_BUCKETS
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(RELOAD_BUCKETS.len());
        self.counts[i] += 1;
        self.sum += secs;
        self.count += 1;
    }

    /// (upper bound, observations in that bucket alone) per bucket, ending
    /// with +Inf: as prometheus-client's encoder takes them (it adds up).
    pub fn buckets(&self) -> Vec<(f64, u64)> {
        RELOAD_BUCKETS
            .iter()
            .copied()
            .chain([f64::INFINITY])
            .zip(self.counts.iter().copied())
            .collect()
    }
}

/// What kind of thing happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum EventKind {
    /// A reload's new generation serves.
    Reload,
    /// A reload's new generation failed; the old one kept serving.
    ReloadFailed,
    /// An unhealthy worker is being replaced.
    Replacement,
    /// A worker that exited or could not start is started again.
    Restart,
}

impl EventKind {
    pub fn name(self) -> &'static str {
        match self {
            EventKind::Reload => "reload",
            EventKind::ReloadFailed => "reload-failed",
            EventKind::Replacement => "replacement",
            EventKind::Restart => "restart",
        }
    }
}

/// One recent event.
#[derive(Clone, Debug, PartialEq)]
pub struct Recorded {
    pub at: Instant,
    pub kind: EventKind,
    pub generation: u64,
    /// The worker slot it concerns, if one.
    pub worker: Option<u32>,
    /// Why, or what came of it, in a line.
    pub reason: String,
}

/// The counters and the ring of recent events.
#[derive(Clone, Debug, Default)]
pub struct Record {
    pub counters: Counters,
    recent: VecDeque<Recorded>,
}

impl Record {
    pub fn push(&mut self, event: Recorded) {
        if self.recent.len() == RECENT_EVENTS {
            self.recent.pop_front();
        }
        self.recent.push_back(event);
    }

    /// Oldest first.
    pub fn recent(&self) -> impl Iterator<Item = &Recorded> {
        self.recent.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_end_at_infinity() {
        let mut h = Histogram::default();
        h.observe(Duration::from_millis(50));
        h.observe(Duration::from_millis(700));
        h.observe(Duration::from_secs(1000));
        let c = h.buckets();
        assert_eq!(c.len(), RELOAD_BUCKETS.len() + 1);
        assert_eq!(c[0], (0.1, 1));
        assert_eq!(c[2], (0.5, 0));
        assert_eq!(c[3], (1.0, 1));
        assert_eq!(c[RELOAD_BUCKETS.len() - 1], (300.0, 0));
        assert_eq!(c.last(), Some(&(f64::INFINITY, 1)));
        assert_eq!(h.count, 3);
        assert!((h.sum - 1000.75).abs() < 1e-9);
    }

    #[test]
    fn the_ring_keeps_the_last_events() {
        let t = Instant::now();
        let mut r = Record::default();
        for g in 0..(RECENT_EVENTS as u64 + 5) {
            r.push(Recorded {
                at: t,
                kind: EventKind::Reload,
                generation: g,
                worker: None,
                reason: String::new(),
            });
        }
        let gens: Vec<u64> = r.recent().map(|e| e.generation).collect();
        assert_eq!(gens.len(), RECENT_EVENTS);
        assert_eq!(gens[0], 5);
        assert_eq!(*gens.last().unwrap(), RECENT_EVENTS as u64 + 4);
    }
}
