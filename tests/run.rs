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

#[path = "run/operator.rs"]
mod operator;

#[path = "run/signals.rs"]
mod signals;

#[path = "run/start_limit.rs"]
mod start_limit;

#[path = "run/death.rs"]
mod death;

#[path = "run/storm.rs"]
mod storm;

#[path = "run/upgrade.rs"]
mod upgrade;

#[path = "run/deploy.rs"]
mod deploy;
#[path = "run/listen.rs"]
mod listen;

#[path = "run/observe.rs"]
mod observe;
#[path = "run/pid1.rs"]
mod pid1;

#[path = "run/probe.rs"]
mod probe;

#[path = "run/canary.rs"]
mod canary;
