//! Integration tests of nogap's accept health: the real binary, the demo
//! worker made to fail the way real servers do, real sockets on loopback,
//! every request counted. Topic modules live in `tests/health/`.
//!
//! Each failure mode runs under a keep-alive and a new-connection load with
//! a generous client timeout, and must cost no request: none refused, none
//! reset, each answered, those made while nobody accepted included. The time
//! from the stall to the first answer of the replacement is printed, never
//! asserted (run with `--nocapture` to see it).

mod common;

#[path = "health/fixture.rs"]
mod fixture;

#[path = "health/scenario.rs"]
mod scenario;

#[path = "health/serial.rs"]
mod serial;

#[path = "health/stall.rs"]
mod stall;

#[path = "health/fds.rs"]
mod fds;

#[path = "health/watchdog.rs"]
mod watchdog;

#[path = "health/busy.rs"]
mod busy;

#[path = "health/storm.rs"]
mod storm;

/// Not a test: the entry point of the serial worker (`serial`), which the
/// busy tests run as `<this binary> serial_worker_process --exact` with
/// `serial::ENV` set. Without it, it returns at once.
#[test]
fn serial_worker_process() {
    serial::run_if_asked();
}
