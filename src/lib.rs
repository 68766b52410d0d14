//! nogap: a supervisor that holds a server's listening sockets and keeps it
//! available through reloads, crashes and dead accept loops.
//!
//! # Invariants
//! * While `nogap run` runs, every socket it holds stays open: connections
//!   that arrive during a hand-off or a restart wait in the kernel's queue.
//! * A new generation serves only once every one of its workers is ready;
//!   only then does the old one get the stop signal (with steering: once
//!   nothing is queued for it any more). A generation that fails
//!   to start is stopped and the old one keeps serving.
//! * No worker outlives nogap: workers die with it (parent-death signal) and
//!   every worker's process group is killed when its main process is gone.
//!
//! # Layout
//! * [`cli`]: command-line structs; [`config`]: typed, validated config.
//! * [`sockets`]: binding, inheriting and validating the listening sockets.
//! * [`steer`]: a socket per generation, new connections steered to the
//!   serving one, so old workers stop only once their queues are empty.
//! * [`handoff`]: how workers learn their sockets (LISTEN_FDS, einhorn,
//!   Server::Starter, nginx, argv templates); [`einhorn`]: einhorn's
//!   command socket, whose `worker:ack` counts as READY=1.
//! * [`launch`]: worker process settings (user, groups, env, limits, pid file).
//! * [`daemon`]: following servers that daemonize; no orphan outlives nogap.
//! * [`sys`]: every `unsafe` block: fork/exec with the fd hand-off, TCP_INFO.
//! * [`worker`]: a worker's state; [`policy`]: state × event → actions.
//! * [`health`]: accept-queue stall detection and fd-exhaustion checks.
//! * [`diag`]: which accept-queue connections wait (sock_diag), for progress.
//! * [`notify`]: per-worker notify sockets and nogap's own sd_notify.
//! * [`supervisor`]: the event loop that executes the policy's actions.
//! * [`error`]: fatal errors and the exit-code table.

pub mod cli;
pub mod config;
pub mod control;
pub mod daemon;
pub mod diag;
pub mod einhorn;
pub mod error;
pub mod handoff;
pub mod health;
pub mod launch;
pub mod notify;
pub mod policy;
pub mod sockets;
pub mod steer;
pub mod supervisor;
pub mod sys;
pub mod worker;
