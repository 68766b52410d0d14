//! nogap: a supervisor that holds a server's listening sockets and keeps it
//! available through reloads, crashes and dead accept loops.
//!
//! # Invariants
//! * While `nogap run` runs, every socket it holds stays open: connections
//!   that arrive during a hand-off or a restart wait in the kernel's queue.
//! * A new generation serves only once every one of its workers is ready
//!   (with a probe: and nogap's own request to it, which no client
//!   connection precedes, passed);
//!   only then does the old one get the stop signal (with steering: once
//!   nothing is queued for it any more). A generation that fails
//!   to start is stopped and the old one keeps serving. With `--canary`
//!   a ready generation first gets a share of new connections, watched;
//!   if it fails, it is stopped once its queue is empty, and the old one,
//!   never signalled, keeps serving.
//! * No worker outlives nogap for longer than a drain: when nogap dies its
//!   workers get the stop signal (parent-death signal) and drain, and the
//!   next nogap stops what is left after `--drain-timeout`
//!   (`worker::leftover`); every worker's process group is killed when its
//!   main process is gone.
//!
//! # Layout
//! Data flows one way: each module uses only the ones above it in this
//! list (`tests/architecture.rs` checks it, with the other rules of shape).
//! * [`error`]: fatal errors and the exit-code table. [`logs`]: nogap's own
//!   log output, rate-limited and never blocking. [`spec`]: value types
//!   and their pure parsers (addresses, durations, signals, modes, the
//!   template grammar). [`sys`]: every `unsafe` block: fork/exec with the fd
//!   hand-off, inherited fds, TCP_INFO, the reuseport BPF program.
//! * [`cli`]: the clap structs, nothing else.
//! * [`config`]: the validated `RunConfig`: every check, the only place that
//!   resolves hosts and users; nogap's `Environment`; the `--config` file.
//! * [`sockets`]: the sockets nogap holds (`Listener { name, endpoint,
//!   origin, fd }`, by a stable index in `Listeners`): intake of
//!   `LISTEN_FDS`, binding, steering a socket per generation, sock_diag,
//!   what a reload's `listen` changes.
//! * [`worker`]: launching a worker (environment, fds, hand-off forms),
//!   following daemons, what workers say back (notify, einhorn), and what
//!   a dead nogap left running (`leftover`).
//! * [`policy`]: state × event → actions, pure: the `Phase`, each worker's
//!   state with its health inside, typed event data, the canary's phase
//!   (`--canary`); read through a `Snapshot`.
//! * [`monitor`]: turns accept-queue and descriptor samples into events.
//!   [`probe`]: canary probes of a starting generation through its own
//!   socket (`--ready notify+http:PATH`), results as events.
//! * [`control`]: the typed control protocol (`Request`, `Response`,
//!   `StatusReport`), its server and its clients.
//! * [`upgrade`]: self-upgrade in place: probe the new binary, carry
//!   sockets, state and the waiting client across `execve` in a memfd.
//! * [`metrics`]: `--metrics`: Prometheus metrics and probe endpoints over
//!   HTTP, served from a copy the loop publishes (never from the state).
//! * [`deploy`]: what a reload deploys: the config file read again, its
//!   sockets bound or kept, checked; the sockets no generation uses closed.
//! * [`supervisor`]: the loop: sources → events → policy → actions executed.

#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod cli;
pub mod config;
pub mod control;
pub mod deploy;
pub mod error;
pub mod logs;
pub mod metrics;
pub mod monitor;
pub mod policy;
pub mod probe;
pub mod sockets;
pub mod spec;
pub mod supervisor;
pub mod sys;
pub mod upgrade;
pub mod worker;
