//! Hostile workers, forged messages, floods and exhaustion (issue #11): the
//! real binary, the demo worker made hostile (`--abuse KIND`), real sockets,
//! every request counted. For each case: what happens to the other workers,
//! the other generations and the clients, and nogap's own descriptors and
//! memory stay bounded. Topic modules live in `tests/abuse/`.

mod common;

#[path = "health/fixture.rs"]
mod fixture;

#[path = "abuse/support.rs"]
mod support;

#[path = "abuse/sockets.rs"]
mod sockets;

#[path = "abuse/notify.rs"]
mod notify;

#[path = "abuse/workers.rs"]
mod workers;

#[path = "abuse/exhaustion.rs"]
mod exhaustion;
