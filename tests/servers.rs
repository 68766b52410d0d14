//! Real third-party servers behind nogap, each reloaded 10 times under
//! keep-alive and new-connection load, with workers running as an
//! unprivileged user with a set fd limit: nginx and lighttpd (C, Debian),
//! gunicorn, uvicorn, hypercorn and daphne (Python, PyPI), puma and unicorn
//! (Ruby, Debian), a Go `net/http` server (built with Debian's Go), a
//! Node.js `http` server and an Express app (npm), and a double-forking
//! daemon; the other hand-off forms, worker settings, unix sockets and bad
//! input. `docs/handoff.md` is the recipe for each.
//!
//! Needs root and `tests/setup-servers.sh` (the servers, the user
//! `nogap-test`); node must be on PATH. A missing server fails its test.

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

#[path = "servers/ruby.rs"]
mod ruby;

#[path = "servers/go.rs"]
mod go;

#[path = "servers/lighttpd.rs"]
mod lighttpd;

#[path = "servers/daemon.rs"]
mod daemon;

#[path = "servers/forms.rs"]
mod forms;

#[path = "servers/settings.rs"]
mod settings;

#[path = "servers/errors.rs"]
mod errors;
