//! A worker that serves one connection at a time, like a prefork or "sync"
//! worker (Apache prefork, gunicorn sync, unicorn): accept one connection,
//! read its request, work on it for a fixed time, answer with
//! `Connection: close`, then accept the next one.
//!
//! Saturated by more concurrent clients than it serves at once, its accept
//! queue never empties, yet a queued connection leaves it every time the
//! worker finishes a request: the busy-but-healthy case the stall detector
//! must not mistake for a dead accept loop. The demo worker cannot play this
//! part: it accepts everything at once and works on the requests
//! concurrently, so its queue stays empty however slow its requests are.
//!
//! The test and bench binaries run as this worker when [`ENV`] is set (to
//! the per-request work in milliseconds): see [`run_if_asked`]. The socket
//! comes from `LISTEN_FDS` (validated by `listenfd`), `READY=1` goes to
//! `NOTIFY_SOCKET`. Depends on std and `listenfd` only.
#![allow(dead_code)]

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::net::UnixDatagram;
use std::time::Duration;

/// Set to the work per request in milliseconds to make the test or bench
/// binary run as the serial worker.
pub const ENV: &str = "NOGAP_SERIAL_WORKER_MS";

/// How long a connection may take to send its request, or to close after
/// the response.
const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// Largest request head read.
const MAX_HEAD: usize = 16 * 1024;

/// Runs the serial worker (and never returns) if [`ENV`] is set.
pub fn run_if_asked() {
    let Some(work) = std::env::var(ENV).ok().and_then(|v| v.parse::<u64>().ok()) else {
        return;
    };
    let code = match serve(Duration::from_millis(work)) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("serial-worker[{}]: error: {e}", std::process::id());
            1
        }
    };
    std::process::exit(code);
}

fn serve(work: Duration) -> io::Result<()> {
    let pid = std::process::id();
    let listener = listenfd::ListenFd::from_env()
        .take_tcp_listener(0)?
        .ok_or_else(|| io::Error::other("no TCP listener at LISTEN_FDS index 0"))?;
    // O_NONBLOCK belongs to the shared open file description: another worker
    // may have set it. This one blocks in accept.
    listener.set_nonblocking(false)?;
    let generation = std::env::var("NOGAP_GENERATION").unwrap_or_else(|_| "0".into());
    let body = format!("pid {pid} gen {generation}\n");
    notify("READY=1\nSTATUS=serving one connection at a time")?;
    eprintln!(
        "serial-worker[{pid}]: ready, {}ms per request",
        work.as_millis()
    );
    loop {
        match listener.accept() {
            Ok((conn, _)) => {
                // A client that misbehaves only loses its own request.
                let _ = answer(conn, work, &body);
            }
            Err(e) => {
                eprintln!("serial-worker[{pid}]: accept failed: {e}");
                // Do not spin on a persistent error (e.g. EMFILE).
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

/// Reads one request head, works, answers and closes gracefully.
fn answer(mut conn: TcpStream, work: Duration, body: &str) -> io::Result<()> {
    conn.set_read_timeout(Some(IO_TIMEOUT))?;
    conn.set_write_timeout(Some(IO_TIMEOUT))?;
    conn.set_nodelay(true)?;
    let mut head = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = conn.read(&mut chunk)?;
        if n == 0 || head.len() > MAX_HEAD {
            return Ok(());
        }
        head.extend_from_slice(&chunk[..n]);
    }
    // The request's cost: this worker does nothing else meanwhile.
    std::thread::sleep(work);
    let response = format!(
        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nX-Pid: {}\r\nConnection: close\r\n\r\n{body}",
        body.len(),
        std::process::id()
    );
    conn.write_all(response.as_bytes())?;
    // Lingering close: our FIN first, then wait for the client's, so that
    // nothing unread turns the close into a reset.
    conn.shutdown(Shutdown::Write)?;
    while conn.read(&mut chunk)? > 0 {}
    Ok(())
}

/// One sd_notify datagram to `NOTIFY_SOCKET` (a path or `@abstract`).
fn notify(state: &str) -> io::Result<()> {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return Ok(());
    };
    let socket = UnixDatagram::unbound()?;
    let text = path.to_string_lossy();
    if let Some(name) = text.strip_prefix('@') {
        use std::os::linux::net::SocketAddrExt;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
        socket.send_to_addr(state.as_bytes(), &addr)?;
    } else {
        socket.send_to(state.as_bytes(), &path)?;
    }
    Ok(())
}
