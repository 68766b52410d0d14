//! Integration tests of `nogap run`: the real binary, the real demo worker,
//! real sockets on loopback. Topic modules live in `tests/run/`.

mod common;

#[path = "run/selftest.rs"]
mod selftest;
