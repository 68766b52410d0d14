//! Real third-party servers behind nogap: nginx (Debian), gunicorn and
//! uvicorn (PyPI), a Node.js `http` server and a double-forking daemon, each
//! reloaded 10 times under keep-alive and new-connection load, with workers
//! running as an unprivileged user with a set fd limit; the other hand-off
//! forms, worker settings, unix sockets and bad input.
//!
//! Needs root and `tests/setup-servers.sh` (nginx, a venv with gunicorn and
//! uvicorn, the user `nogap-test`); node must be on PATH.

mod common;

#[path = "servers/util.rs"]
mod util;

#[path = "servers/traffic.rs"]
mod traffic;

#[path = "servers/nginx.rs"]
mod nginx;

#[path = "servers/python.rs"]
mod python;

#[path = "servers/node.rs"]
mod node;

#[path = "servers/daemon.rs"]
mod daemon;

#[path = "servers/forms.rs"]
mod forms;

#[path = "servers/settings.rs"]
mod settings;

#[path = "servers/errors.rs"]
mod errors;
