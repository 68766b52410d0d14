//! Boots a real systemd in a `systemd-nspawn` container, for the tests in
//! `tests/systemd.rs`. How it works, and what it costs: `README.md` here.
//!
//! - [`rootfs`]: cached Debian root filesystems ([`Rootfs::ensure`]).
//! - [`container`]: boot, run commands inside, tear down ([`Container`]).
//! - [`cgroup`]: one cgroup per container, so containers are independent and
//!   teardown can prove nothing is left.
//! - [`process`]: host commands with deadlines, polling with deadlines.

// Support code: each test uses another subset of it.
#![allow(dead_code, unused_imports)]

// Loaded with `#[path]`, this file resolves modules like a `mod.rs` would.
#[path = "harness/cgroup.rs"]
mod cgroup;
#[path = "harness/container.rs"]
mod container;
#[path = "harness/process.rs"]
mod process;
#[path = "harness/rootfs.rs"]
mod rootfs;

pub use container::{BootState, Container, Teardown, EXEC_TIMEOUT, SHARE};
pub use process::{free_port, progress, try_wait_for, wait_for, OutputExt};
pub use rootfs::{cache_dir, Release, Rootfs};
