//! Integration tests of `nogap run`: the real binary, the real demo worker,
//! real sockets on loopback. Topic modules live in `tests/run/`.

mod common;

#[path = "run/selftest.rs"]
mod selftest;

#[path = "run/util.rs"]
mod util;

#[path = "run/reload.rs"]
mod reload;

#[path = "run/restart.rs"]
mod restart;

#[path = "run/stop.rs"]
mod stop;

#[path = "run/worker_env.rs"]
mod worker_env;

#[path = "run/sockets.rs"]
mod sockets;

#[path = "run/errors.rs"]
mod errors;
