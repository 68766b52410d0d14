//! Replacement storms are bounded: when every worker stalls, replacements
//! included, nogap replaces at most `--max-replacements` per minute, then
//! says it is unhealthy (log, `nogap status`, STATUS=) and, with
//! `--watchdog-follows-health`, stops pinging systemd's watchdog.

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::common::load::{Load, LoadConfig, Mode};
use crate::common::{free_addr, must, LONG};
use crate::fixture::{misbehave_once, scratch, start, status, Which};

/// A fake systemd: a NOTIFY_SOCKET whose datagrams a thread reads at once
/// (a unix datagram queue holds only a few, and nogap does not block on it).
struct FakeSystemd {
    path: PathBuf,
    got: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    reader: Option<JoinHandle<()>>,
}

impl FakeSystemd {
    fn bind(dir: &Path) -> FakeSystemd {
        let path = dir.join("systemd-notify.sock");
        let socket = UnixDatagram::bind(&path).expect("bind fake NOTIFY_SOCKET");
        socket
            .set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let got = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let reader = {
            let (got, stop) = (got.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 4096];
                while !stop.load(Ordering::Relaxed) {
                    if let Ok(n) = socket.recv(&mut buf) {
                        let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                        got.lock().unwrap().push(text);
                    }
                }
            })
        };
        FakeSystemd {
            path,
            got,
            stop,
            reader: Some(reader),
        }
    }

    fn received(&self) -> Vec<String> {
        self.got.lock().unwrap().clone()
    }

    /// Sends a marker datagram and waits until the reader got it: every
    /// datagram nogap sent before is received then (one FIFO queue).
    /// Returns the number of datagrams received up to the marker.
    fn sync(&self, marker: &str) -> usize {
        UnixDatagram::unbound()
            .unwrap()
            .send_to(marker.as_bytes(), &self.path)
            .expect("send marker");
        let mut at = 0;
        must(LONG, "the fake systemd reads its marker", || {
            match self.received().iter().position(|d| d == marker) {
                Some(i) => {
                    at = i;
                    true
                }
                None => false,
            }
        });
        at
    }
}

impl Drop for FakeSystemd {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
    }
}

fn is_ping(datagram: &str) -> bool {
    datagram.lines().any(|l| l == "WATCHDOG=1")
}

#[test]
fn a_storm_of_stalls_is_bounded_and_reported() {
    let dir = scratch();
    let addr = free_addr();
    let systemd = FakeSystemd::bind(dir.path());
    let script = misbehave_once(dir.path(), "--stall-accept-after 300ms", Which::Every);
    let notify = systemd.path.to_str().unwrap().to_string();
    let nogap = start(
        dir.path(),
        addr,
        &[
            "--health-interval",
            "100ms",
            "--stall-timeout",
            "500ms",
            "--max-replacements",
            "3",
            "--watchdog-follows-health",
        ],
        &[script.to_str().unwrap()],
        &[("NOTIFY_SOCKET", &notify), ("WATCHDOG_USEC", "400000")],
    );
    // Failures are expected here: nobody accepts for long stretches.
    let load = Load::start(
        LoadConfig::new(addr, Mode::NewConnection)
            .connections(4)
            .timeout(Duration::from_secs(3))
            .duration(Duration::from_secs(120)),
    );

    let unhealthy = nogap.wait_for_log("UNHEALTHY", LONG);
    let replacing = nogap.count_log("replacing unhealthy worker");
    assert_eq!(replacing, 3, "replacements before {unhealthy:?}");

    // From the first tick that skipped its ping on, none is sent.
    let from = nogap.log_len();
    nogap.wait_for_log_from(from, "unhealthy: not pinging systemd's watchdog", LONG);
    let quiet_from = systemd.sync("MARK-1");
    // The stall goes on and is reported again, but nothing is replaced.
    for _ in 0..3 {
        let from = nogap.log_len();
        nogap.wait_for_log_from(from, "accept queue stalled", LONG);
    }
    let quiet_to = systemd.sync("MARK-2");
    assert_eq!(
        nogap.count_log("replacing unhealthy worker"),
        3,
        "replaced past --max-replacements"
    );
    let status = status(dir.path());
    let text = status["status"].as_str().unwrap_or_default().to_string();
    assert!(text.contains("UNHEALTHY"), "nogap status: {status}");

    let got = systemd.received();
    assert!(
        got[..quiet_from].iter().any(|d| is_ping(d)),
        "nogap pinged while healthy: {got:?}"
    );
    let late: Vec<&String> = got[quiet_from..quiet_to]
        .iter()
        .filter(|d| is_ping(d))
        .collect();
    assert!(late.is_empty(), "pinged while unhealthy: {got:?}");
    assert!(
        got.iter()
            .any(|d| d.starts_with("STATUS=") && d.contains("UNHEALTHY")),
        "no STATUS= with UNHEALTHY: {got:?}"
    );
    eprintln!("storm: {replacing} replacements, then: {text}");
    // Stop nogap first: its workers' queue dies with it, so the clients
    // still waiting fail at once instead of after their timeout.
    drop(nogap);
    let report = load.stop();
    eprintln!("  {}", report.summary());
}
