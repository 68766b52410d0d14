//! Which connections in a listener's accept queue are still waiting.
//!
//! `TCP_INFO` on a listener gives only the length of its accept queue, which
//! cannot tell a full queue that workers drain (and clients refill) from one
//! nobody drains. A queued connection is a full TCP socket in the established
//! hash (ESTABLISHED, or CLOSE_WAIT once the client has sent FIN) that has no
//! file yet, so `inet_diag` reports it with inode 0; `accept()` gives it an
//! inode, or it disappears if it is served and closed quickly. [`queued`]
//! samples those connections by socket cookie over a `NETLINK_SOCK_DIAG`
//! socket, and [`QueueProgress`] calls it progress when a cookie of the
//! previous sample has left the queue. Cookies are unique per boot, so a
//! cookie never comes back as a different connection.
//!
//! # Cost
//! A call opens a netlink socket (about 2 µs with its close), sends one
//! dump request per address family it needs, which the kernel filters on the
//! local port, and parses the replies; it blocks for that long. Whatever the
//! filter, the kernel walks every bucket of the established hash (262144 on
//! the test host), which sets a floor of a few hundred µs per dump; each
//! socket on the port adds an entry to copy. Means over 1000 calls, release
//! build, Linux 6.18, 2 shared vCPUs, 1000 unrelated established connections
//! plus 2000 to 9000 other sockets present; ranges are over four runs on a
//! busy host (ignored test `cost`):
//!
//! | queued on the port               | IPv4 listener | `[::]` listener |
//! |----------------------------------|--------------:|----------------:|
//! | 0                                |  0.29–0.86 ms |    0.29–0.59 ms |
//! | 100                              |  0.27–0.80 ms |    0.32–0.63 ms |
//! | 1000                             |  0.55–0.81 ms |    0.47–0.81 ms |
//! | 0, IPv4 dump with no port filter |  0.49–1.36 ms |                 |
//!
//! For 16 listeners (8 per family, 10 queued on each) 16 calls of [`queued`]
//! take 4.3–11 ms, one [`queued_each`] 0.57–1.7 ms: sample every listener
//! with one `queued_each` per round.
//!
//! # Limits
//! * A queued connection does not name its listener, only its local address.
//!   Two listeners that share an address and port (`SO_REUSEPORT`) share one
//!   answer, and so do a wildcard listener and a specific one on the port.
//! * A queued connection the client resets (RST, not FIN) leaves the
//!   established hash while still in the queue: that reads as progress.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsRawFd, OwnedFd};

use nix::sys::socket::{
    recv, sendto, setsockopt, socket, sockopt, AddressFamily, MsgFlags, NetlinkAddr, SockFlag,
    SockProtocol, SockType,
};
use nix::sys::time::TimeVal;

// From <linux/netlink.h>, <linux/sock_diag.h>, <linux/inet_diag.h> and
// <netinet/tcp.h>; the layouts are described where they are built and parsed.
const NLMSG_HDRLEN: usize = 16;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_DUMP: u16 = 0x300;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const INET_DIAG_REQ_V2_LEN: usize = 56;
const INET_DIAG_MSG_LEN: usize = 72;
const INET_DIAG_NOCOOKIE: u32 = !0;
const INET_DIAG_REQ_BYTECODE: u16 = 1;
const INET_DIAG_INFO: u16 = 2;
const INET_DIAG_BC_JMP: u8 = 1;
const INET_DIAG_BC_S_EQ: u8 = 11;
const TCP_ESTABLISHED: u8 = 1;
const TCP_CLOSE_WAIT: u8 = 8;
const TCP_LISTEN: u8 = 10;
/// The states of a connection in an accept queue.
const QUEUED_STATES: u32 = (1 << TCP_ESTABLISHED) | (1 << TCP_CLOSE_WAIT);
const AF_INET: u8 = libc::AF_INET as u8;
const AF_INET6: u8 = libc::AF_INET6 as u8;
const IPPROTO_TCP: u8 = libc::IPPROTO_TCP as u8;

/// A dump reply is at most 32 KiB: the kernel sizes its messages to the
/// largest read it has seen, capped at 32 KiB (`netlink_recvmsg`).
const RECV_BUF: usize = 32 * 1024;
/// A dump is produced while we read, so a reply never takes long; this only
/// bounds the wait should the kernel not answer at all.
const RECV_TIMEOUT_SECS: i64 = 1;

/// Cookies of connections to `local` (the listener's bound address; for a
/// wildcard listener `0.0.0.0`/`[::]` match any local IP on that port) that are
/// waiting in an accept queue: TCP, not yet accepted (inode 0). IPv4 and IPv6.
///
/// An IPv4 client of a dual-stack `[::]` listener is an IPv6 socket with a
/// v4-mapped address, so one IPv6 dump covers it; an IPv4 listener is
/// answered by an IPv4 dump only.
pub fn queued(local: SocketAddr) -> io::Result<Vec<u64>> {
    Ok(queued_each(&[local])?.pop().unwrap_or_default())
}

/// [`queued`] for several listeners at once: the `i`-th list holds the
/// cookies for `locals[i]`. One dump per address family, filtered in the
/// kernel on the listeners' ports, so it costs about as much as a single
/// [`queued`] (see Cost in the module doc).
pub fn queued_each(locals: &[SocketAddr]) -> io::Result<Vec<Vec<u64>>> {
    let mut out = vec![Vec::new(); locals.len()];
    if locals.is_empty() {
        return Ok(out);
    }
    let diag = Diag::open()?;
    for (seq, family) in [(1, AF_INET), (2, AF_INET6)] {
        let mut ports: Vec<u16> = locals
            .iter()
            .filter(|l| family_of(**l) == family)
            .map(|l| l.port())
            .collect();
        if ports.is_empty() {
            continue;
        }
        ports.sort_unstable();
        ports.dedup();
        diag.dump(family, &ports, QUEUED_STATES, seq, |e| {
            if !e.is_queued() {
                return;
            }
            for (local, cookies) in locals.iter().zip(out.iter_mut()) {
                let ip = local.ip();
                if family_of(*local) == family
                    && local.port() == e.local_port
                    && (ip.is_unspecified() || ip == e.local)
                {
                    cookies.push(e.cookie);
                }
            }
        })?;
    }
    Ok(out)
}

/// Whether a worker is in the middle of a request on `local`'s port: an
/// accepted connection (it has a file) that received data at least
/// [`IN_REQUEST_FOR`] ago and sent none yet, or none since
/// (`tcpi_last_data_recv` < `tcpi_last_data_sent`, in ms; a request that
/// arrives within the millisecond of the previous answer is missed).
/// A busy server (a serial worker at work, a thread per connection with
/// every thread in a request) has one nearly all the time; a worker whose
/// accept loop died while it answers its keep-alive clients at once has
/// none: its answers take far less than [`IN_REQUEST_FOR`]. One dump with
/// `tcp_info` (`INET_DIAG_INFO`) per call: only called while a queue is
/// suspect.
pub fn in_request(local: SocketAddr) -> io::Result<bool> {
    let diag = Diag::open()?;
    let mut busy = false;
    let family = family_of(local);
    diag.dump_with_info(
        family,
        &[local.port()],
        QUEUED_STATES,
        1,
        true,
        |e, info| {
            let ip = local.ip();
            let mine = e.local_port == local.port() && (ip.is_unspecified() || ip == e.local);
            if mine && !e.is_queued() {
                if let Some(i) = info {
                    busy |= i.received > 0
                        && (i.sent == 0 || i.last_recv < i.last_sent)
                        && i.last_recv >= IN_REQUEST_FOR;
                }
            }
        },
    )?;
    Ok(busy)
}

/// How long (ms) a request must have waited for its answer to count in
/// [`in_request`]: longer than a keep-alive answer takes, which a worker
/// whose accept loop died still gives at once (seen in CI: a stalled
/// worker's keep-alive traffic made it look pinned), shorter than
/// the 100 ms without one after which the monitor calls a queue stalled at
/// the first sign (`monitor::IDLE_FOR`), so a long request is seen first.
pub const IN_REQUEST_FOR: u32 = 50;

/// How many TCP sockets listen on exactly `local` (same family, address and
/// port): more than one means they share a `SO_REUSEPORT` group.
pub fn listeners_at(local: SocketAddr) -> io::Result<usize> {
    let diag = Diag::open()?;
    let family = family_of(local);
    let mut n = 0;
    diag.dump(family, &[local.port()], 1 << TCP_LISTEN, 1, |e| {
        if e.state == TCP_LISTEN && e.local_port == local.port() && e.local == local.ip() {
            n += 1;
        }
    })?;
    Ok(n)
}

/// Tracks one listener's queue between samples.
#[derive(Debug, Default)]
pub struct QueueProgress {
    /// The previous sample, sorted.
    previous: Vec<u64>,
    /// Spare buffer, so that a sample does not allocate.
    scratch: Vec<u64>,
}

impl QueueProgress {
    pub fn new() -> Self {
        Self::default()
    }

    /// Feed one sample of [`queued`]; returns true if at least one connection
    /// queued in the previous sample has left the queue since (accepted, or
    /// gone). The first sample never shows progress.
    pub fn observe(&mut self, queued: &[u64]) -> bool {
        let now = &mut self.scratch;
        now.clear();
        now.extend_from_slice(queued);
        now.sort_unstable();
        let progressed = self.previous.iter().any(|c| now.binary_search(c).is_err());
        std::mem::swap(&mut self.previous, &mut self.scratch);
        progressed
    }
}

fn family_of(addr: SocketAddr) -> u8 {
    match addr {
        SocketAddr::V4(_) => AF_INET,
        SocketAddr::V6(_) => AF_INET6,
    }
}

/// One `inet_diag_msg`, as far as we use it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Entry {
    state: u8,
    local: IpAddr,
    local_port: u16,
    inode: u32,
    cookie: u64,
}

impl Entry {
    /// In an accept queue: established (or half-closed by the client) and
    /// without a file.
    fn is_queued(&self) -> bool {
        self.inode == 0 && matches!(self.state, TCP_ESTABLISHED | TCP_CLOSE_WAIT)
    }
}

/// A `NETLINK_SOCK_DIAG` socket.
struct Diag {
    fd: OwnedFd,
}

impl Diag {
    fn open() -> io::Result<Diag> {
        let fd = socket(
            AddressFamily::Netlink,
            SockType::Datagram,
            SockFlag::SOCK_CLOEXEC,
            SockProtocol::NetlinkSockDiag,
        )?;
        setsockopt(
            &fd,
            sockopt::ReceiveTimeout,
            &TimeVal::new(RECV_TIMEOUT_SECS, 0),
        )?;
        Ok(Diag { fd })
    }

    /// Dump the TCP sockets of `family` in one of `states` (a bit per
    /// state) whose local port is one of `ports` (none: every port), calling
    /// `each` for every entry the kernel returns. The kernel filters on the
    /// states and ports; nothing else is filtered here.
    fn dump(
        &self,
        family: u8,
        ports: &[u16],
        states: u32,
        seq: u32,
        mut each: impl FnMut(Entry),
    ) -> io::Result<()> {
        self.dump_with_info(family, ports, states, seq, false, |e, _| each(e))
    }

    /// [`Diag::dump`]; with `info`, each socket's `tcpi_last_data_recv` and
    /// `tcpi_last_data_sent` (ms) too, when it has a `tcp_info`.
    fn dump_with_info(
        &self,
        family: u8,
        ports: &[u16],
        states: u32,
        seq: u32,
        info: bool,
        mut each: impl FnMut(Entry, Option<Activity>),
    ) -> io::Result<()> {
        let mut req = request(family, ports, states, seq)?;
        if info {
            // idiag_ext: ask for INET_DIAG_INFO (bit INET_DIAG_INFO - 1).
            req[NLMSG_HDRLEN + 2] = 1 << (INET_DIAG_INFO - 1);
        }
        let to = NetlinkAddr::new(0, 0);
        // A socket with a receive timeout is not restarted after a signal
        // handler even with SA_RESTART, so EINTR is retried here.
        retry(|| sendto(self.fd.as_raw_fd(), &req, &to, MsgFlags::empty()))?;
        let mut buf = vec![0u8; RECV_BUF];
        loop {
            // MSG_TRUNC: the length of the datagram even if it did not fit.
            let n = retry(|| recv(self.fd.as_raw_fd(), &mut buf, MsgFlags::MSG_TRUNC))?;
            if n > buf.len() {
                return Err(invalid("sock_diag: reply larger than the receive buffer"));
            }
            if parse(&buf[..n], seq, &mut each)? {
                return Ok(());
            }
        }
    }
}

/// `nlmsghdr`, `inet_diag_req_v2` and, for more than one port, a bytecode
/// filter. One port goes in `idiag_sport`, which the kernel compares itself.
fn request(family: u8, ports: &[u16], states: u32, seq: u32) -> io::Result<Vec<u8>> {
    let bytecode = match ports {
        [] | [_] => Vec::new(),
        _ => any_local_port(ports),
    };
    let attr_len = if bytecode.is_empty() {
        0
    } else {
        4 + bytecode.len()
    };
    let len = NLMSG_HDRLEN + INET_DIAG_REQ_V2_LEN + attr_len;
    if attr_len > usize::from(u16::MAX) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "sock_diag: too many ports for one request",
        ));
    }
    let mut b = Vec::with_capacity(len);
    // nlmsghdr: len u32, type u16, flags u16, seq u32, pid u32.
    b.extend_from_slice(&(len as u32).to_ne_bytes());
    b.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    b.extend_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    b.extend_from_slice(&seq.to_ne_bytes());
    b.extend_from_slice(&0u32.to_ne_bytes());
    // inet_diag_req_v2: family u8, protocol u8, ext u8, pad u8, states u32,
    // then inet_diag_sockid: sport be16, dport be16, src [be32; 4],
    // dst [be32; 4], if u32, cookie [u32; 2].
    b.extend_from_slice(&[family, IPPROTO_TCP, 0, 0]);
    b.extend_from_slice(&states.to_ne_bytes());
    let sport = match ports {
        [port] => *port,
        _ => 0,
    };
    b.extend_from_slice(&sport.to_be_bytes());
    b.extend_from_slice(&[0; 2 + 16 + 16 + 4]);
    b.extend_from_slice(&INET_DIAG_NOCOOKIE.to_ne_bytes());
    b.extend_from_slice(&INET_DIAG_NOCOOKIE.to_ne_bytes());
    if !bytecode.is_empty() {
        // nlattr: len u16, type u16; the bytecode is a multiple of 4 long.
        b.extend_from_slice(&(attr_len as u16).to_ne_bytes());
        b.extend_from_slice(&INET_DIAG_REQ_BYTECODE.to_ne_bytes());
        b.extend_from_slice(&bytecode);
    }
    debug_assert_eq!(b.len(), len);
    Ok(b)
}

/// Bytecode accepting a socket whose local port is one of `ports`.
///
/// An op is `inet_diag_bc_op { code u8, yes u8, no u16 }`: the kernel moves
/// `yes` bytes on when the condition holds and `no` bytes when it does not,
/// and accepts the socket if it lands exactly on the end. A port comparison
/// takes the port from the `no` field of a second op. The kernel's audit
/// follows the `yes` jumps, and every `no` target must be on that path, so
/// each test falls through on a match into an unconditional jump to the end
/// (as `ss` compiles "or"):
///
/// ```text
/// S_EQ yes=8 no=12 | port | JMP yes=4 no=<to end> | ... | S_EQ yes=8 no=12 | port
/// ```
///
/// The last test's `no` lands 4 bytes past the end: reject.
fn any_local_port(ports: &[u16]) -> Vec<u8> {
    let op = |code: u8, yes: u8, no: u16, b: &mut Vec<u8>| {
        b.extend_from_slice(&[code, yes]);
        b.extend_from_slice(&no.to_ne_bytes());
    };
    let len = 12 * ports.len() - 4;
    let mut b = Vec::with_capacity(len);
    for (i, &port) in ports.iter().enumerate() {
        op(INET_DIAG_BC_S_EQ, 8, 12, &mut b);
        // The port in host order, as the kernel compares it.
        op(0, 0, port, &mut b);
        if i + 1 < ports.len() {
            let to_end = (len - b.len()) as u16;
            op(INET_DIAG_BC_JMP, 4, to_end, &mut b);
        }
    }
    b
}

/// One socket of a dump reply: its local address, TCP state and cookie.
pub type Listed = (SocketAddr, u8, u64);

/// Parse one datagram of a dump reply of request `seq`: true once the dump
/// is done, and each socket's local address, state and cookie. Pure: what
/// the sock_diag fuzz target drives.
pub fn parse_reply(buf: &[u8], seq: u32) -> io::Result<(bool, Vec<Listed>)> {
    let mut out = Vec::new();
    let done = parse(buf, seq, &mut |e: Entry, _| {
        out.push((SocketAddr::new(e.local, e.local_port), e.state, e.cookie))
    })?;
    Ok((done, out))
}

/// Parse one datagram of a dump reply; true once the dump is done.
fn parse(
    mut buf: &[u8],
    seq: u32,
    each: &mut impl FnMut(Entry, Option<Activity>),
) -> io::Result<bool> {
    while buf.len() >= NLMSG_HDRLEN {
        let len = u32_at(buf, 0) as usize;
        if len < NLMSG_HDRLEN || len > buf.len() {
            return Err(invalid("sock_diag: malformed netlink message"));
        }
        let kind = u16::from_ne_bytes([buf[4], buf[5]]);
        let payload = &buf[NLMSG_HDRLEN..len];
        // A fresh socket gets no other replies; checked all the same.
        if u32_at(buf, 8) == seq {
            match kind {
                NLMSG_DONE => {
                    // The payload is 0 or, if the dump failed, -errno.
                    return match payload.get(..4).map(|e| i32_at(e, 0)) {
                        Some(e) if e < 0 => Err(io::Error::from_raw_os_error(-e)),
                        _ => Ok(true),
                    };
                }
                NLMSG_ERROR => {
                    let e = payload
                        .get(..4)
                        .map(|e| i32_at(e, 0))
                        .ok_or_else(|| invalid("sock_diag: short error message"))?;
                    if e < 0 {
                        return Err(io::Error::from_raw_os_error(-e));
                    }
                }
                SOCK_DIAG_BY_FAMILY => each(entry(payload)?, last_data(payload)),
                _ => {}
            }
        }
        // Messages are 4-byte aligned; the last one may lack its padding.
        buf = buf.get((len + 3) & !3..).unwrap_or(&[]);
    }
    Ok(false)
}

/// Decode an `inet_diag_msg`: family u8, state u8, timer u8, retrans u8,
/// inet_diag_sockid (48 bytes from offset 4), expires, rqueue, wqueue, uid,
/// inode (u32 each).
fn entry(m: &[u8]) -> io::Result<Entry> {
    if m.len() < INET_DIAG_MSG_LEN {
        return Err(invalid("sock_diag: short inet_diag_msg"));
    }
    let src: [u8; 16] = m[8..24].try_into().expect("16 bytes");
    let local = match m[0] {
        AF_INET => IpAddr::V4(Ipv4Addr::new(src[0], src[1], src[2], src[3])),
        AF_INET6 => IpAddr::V6(Ipv6Addr::from(src)),
        _ => return Err(invalid("sock_diag: unexpected address family")),
    };
    Ok(Entry {
        state: m[1],
        local,
        local_port: u16::from_be_bytes([m[4], m[5]]),
        inode: u32_at(m, 68),
        // sock_diag_save_cookie: low half first, each in host order.
        cookie: u64::from(u32_at(m, 44)) | u64::from(u32_at(m, 48)) << 32,
    })
}

/// What a connection's `tcp_info` says of its traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Activity {
    /// Bytes received and sent (`tcpi_bytes_received`, `tcpi_bytes_sent`).
    received: u64,
    sent: u64,
    /// Milliseconds since data was last received and sent.
    last_recv: u32,
    last_sent: u32,
}

/// The `INET_DIAG_INFO` attribute after an `inet_diag_msg`, if present.
fn last_data(m: &[u8]) -> Option<Activity> {
    let mut attrs = m.get(INET_DIAG_MSG_LEN..)?;
    // nlattr: len u16, type u16, then the payload, 4-byte aligned.
    while attrs.len() >= 4 {
        let len = u16::from_ne_bytes([attrs[0], attrs[1]]) as usize;
        let kind = u16::from_ne_bytes([attrs[2], attrs[3]]);
        if len < 4 || len > attrs.len() {
            return None;
        }
        if kind == INET_DIAG_INFO {
            let info = &attrs[4..len];
            use std::mem::offset_of;
            let u64_at = |at: usize| {
                let b = info.get(at..at + 8)?;
                Some(u64::from_ne_bytes(b.try_into().ok()?))
            };
            let u32_at = |at: usize| {
                let b = info.get(at..at + 4)?;
                Some(u32::from_ne_bytes(b.try_into().ok()?))
            };
            return Some(Activity {
                received: u64_at(offset_of!(libc::tcp_info, tcpi_bytes_received))?,
                sent: u64_at(offset_of!(libc::tcp_info, tcpi_bytes_sent))?,
                last_recv: u32_at(offset_of!(libc::tcp_info, tcpi_last_data_recv))?,
                last_sent: u32_at(offset_of!(libc::tcp_info, tcpi_last_data_sent))?,
            });
        }
        attrs = attrs.get((len + 3) & !3..).unwrap_or(&[]);
    }
    None
}

fn retry<T>(mut f: impl FnMut() -> nix::Result<T>) -> io::Result<T> {
    loop {
        match f() {
            Err(nix::errno::Errno::EINTR) => continue,
            r => return r.map_err(io::Error::from),
        }
    }
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn i32_at(b: &[u8], at: usize) -> i32 {
    i32::from_ne_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn invalid(what: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what)
}

#[cfg(test)]
mod tests {
    use super::*;
    use socket2::{Domain, Socket, Type};
    use std::net::TcpStream;
    use std::time::{Duration, Instant};

    const DEADLINE: Duration = Duration::from_secs(5);

    /// A listener nobody accepts on (until a test does).
    fn listen(addr: &str, backlog: i32) -> (Socket, SocketAddr) {
        let addr: SocketAddr = addr.parse().unwrap();
        let s = Socket::new(Domain::for_address(addr), Type::STREAM, None).unwrap();
        if addr.is_ipv6() {
            s.set_only_v6(false).unwrap();
        }
        s.bind(&addr.into()).unwrap();
        s.listen(backlog).unwrap();
        let bound = s.local_addr().unwrap().as_socket().unwrap();
        (s, bound)
    }

    fn to(host: &str, port: u16) -> SocketAddr {
        SocketAddr::new(host.parse().unwrap(), port)
    }

    fn sorted(mut v: Vec<u64>) -> Vec<u64> {
        v.sort_unstable();
        v
    }

    /// Poll `cond` until it returns a value or the deadline passes. connect()
    /// returns once the client has sent its final ACK; the server side joins
    /// the queue when that ACK is processed, a moment later.
    fn wait_for<T>(what: &str, mut cond: impl FnMut() -> Option<T>) -> T {
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(v) = cond() {
                return v;
            }
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::yield_now();
        }
    }

    fn wait_queued(local: SocketAddr, n: usize) -> Vec<u64> {
        wait_for(&format!("{n} queued on {local}"), || {
            let q = sorted(queued(local).unwrap());
            (q.len() == n).then_some(q)
        })
    }

    /// Every entry the kernel returns for one dump.
    fn raw(family: u8, ports: &[u16]) -> Vec<Entry> {
        let mut all = Vec::new();
        Diag::open()
            .unwrap()
            .dump(family, ports, QUEUED_STATES, 7, |e| all.push(e))
            .unwrap();
        all
    }

    #[test]
    fn listeners_at_counts_a_reuseport_group() {
        let make = |addr: SocketAddr| {
            let s = Socket::new(Domain::for_address(addr), Type::STREAM, None).unwrap();
            s.set_reuse_port(true).unwrap();
            s.bind(&addr.into()).unwrap();
            s.listen(8).unwrap();
            s
        };
        let a = make("127.0.0.1:0".parse().unwrap());
        let addr = a.local_addr().unwrap().as_socket().unwrap();
        assert_eq!(listeners_at(addr).unwrap(), 1);
        let b = make(addr);
        assert_eq!(listeners_at(addr).unwrap(), 2);
        // Another address on the port is another group.
        let other: SocketAddr = format!("127.0.0.2:{}", addr.port()).parse().unwrap();
        assert_eq!(listeners_at(other).unwrap(), 0);
        drop(b);
        assert_eq!(listeners_at(addr).unwrap(), 1);
        drop(a);
        assert_eq!(listeners_at(addr).unwrap(), 0);
    }

    fn accept_two_of_five(host: &str) {
        let (l, addr) = listen(&format!("{}:0", host), 16);
        let _clients: Vec<TcpStream> = (0..5).map(|_| TcpStream::connect(addr).unwrap()).collect();
        let first = wait_queued(addr, 5);
        let mut progress = QueueProgress::new();
        assert!(!progress.observe(&first));
        for _ in 0..3 {
            let again = sorted(queued(addr).unwrap());
            assert_eq!(again, first, "cookies are stable across calls");
            assert!(!progress.observe(&again));
        }
        let _accepted: Vec<_> = (0..2).map(|_| l.accept().unwrap()).collect();
        // accept() gives the socket its file before it returns.
        let after = sorted(queued(addr).unwrap());
        assert_eq!(after.len(), 3);
        assert!(after.iter().all(|c| first.contains(c)));
        assert!(progress.observe(&after));
        assert!(!progress.observe(&sorted(queued(addr).unwrap())));
    }

    #[test]
    fn accepting_two_of_five_is_progress_v4() {
        accept_two_of_five("127.0.0.1");
    }

    #[test]
    fn accepting_two_of_five_is_progress_v6() {
        accept_two_of_five("[::1]");
    }

    #[test]
    fn client_that_closed_stays_queued_until_accepted() {
        for host in ["127.0.0.1", "[::1]"] {
            let (l, addr) = listen(&format!("{}:0", host), 16);
            let client = TcpStream::connect(addr).unwrap();
            let before = wait_queued(addr, 1);
            let mut progress = QueueProgress::new();
            progress.observe(&before);
            drop(client);
            wait_for("CLOSE_WAIT", || {
                raw(family_of(addr), &[addr.port()])
                    .iter()
                    .any(|e| e.cookie == before[0] && e.state == TCP_CLOSE_WAIT)
                    .then_some(())
            });
            let now = sorted(queued(addr).unwrap());
            assert_eq!(now, before);
            assert!(!progress.observe(&now));
            let _served = l.accept().unwrap();
            let now = queued(addr).unwrap();
            assert!(now.is_empty());
            assert!(progress.observe(&now));
        }
    }

    #[test]
    fn other_ports_and_addresses_are_not_reported() {
        let (_a, a) = listen("127.0.0.1:0", 16);
        let (_b, b) = listen("127.0.0.1:0", 16);
        // Same port as `a`, another local address.
        let (_c, c) = listen(&format!("127.0.0.2:{}", a.port()), 16);
        let _clients: Vec<TcpStream> = [(a, 3), (b, 2), (c, 4)]
            .iter()
            .flat_map(|&(to, n)| (0..n).map(move |_| TcpStream::connect(to).unwrap()))
            .collect();
        let qa = wait_queued(a, 3);
        let qb = wait_queued(b, 2);
        let qc = wait_queued(c, 4);
        assert!(qa.iter().all(|x| !qb.contains(x) && !qc.contains(x)));
        assert!(qb.iter().all(|x| !qc.contains(x)));
        // The wildcard query for the shared port sees both addresses.
        assert_eq!(queued(to("0.0.0.0", a.port())).unwrap().len(), 7);
    }

    #[test]
    fn wildcard_listeners_match_any_local_address() {
        let (_l4, any4) = listen("0.0.0.0:0", 16);
        let _clients4 = [
            TcpStream::connect(to("127.0.0.1", any4.port())).unwrap(),
            TcpStream::connect(to("127.0.0.2", any4.port())).unwrap(),
        ];
        wait_queued(any4, 2);

        let (_l6, any6) = listen("[::]:0", 16);
        let _clients6 = [
            TcpStream::connect(to("::1", any6.port())).unwrap(),
            TcpStream::connect(to("127.0.0.1", any6.port())).unwrap(),
        ];
        wait_queued(any6, 2);
        // The IPv4 client of the dual-stack listener is an IPv6 socket with a
        // v4-mapped address: an IPv4 dump does not see it.
        let mapped: IpAddr = "::ffff:127.0.0.1".parse().unwrap();
        assert!(raw(AF_INET6, &[any6.port()])
            .iter()
            .any(|e| e.local == mapped));
        assert!(raw(AF_INET, &[any6.port()]).is_empty());
    }

    #[test]
    fn kernel_filters_on_the_local_port() {
        let (_a, a) = listen("127.0.0.1:0", 16);
        let (b_listener, b) = listen("127.0.0.1:0", 64);
        let _ca: Vec<TcpStream> = (0..3).map(|_| TcpStream::connect(a).unwrap()).collect();
        let _cb: Vec<TcpStream> = (0..30).map(|_| TcpStream::connect(b).unwrap()).collect();
        let _accepted: Vec<_> = (0..20).map(|_| b_listener.accept().unwrap()).collect();
        wait_queued(a, 3);
        wait_queued(b, 10);
        let filtered = raw(AF_INET, &[a.port()]);
        assert_eq!(filtered.len(), 3, "{filtered:?}");
        assert!(filtered.iter().all(|e| e.local_port == a.port()));
        // Unfiltered, the same dump also returns b's 30 server-side sockets
        // (and every client socket), so the assertion above has teeth.
        let all = raw(AF_INET, &[]);
        assert!(all.iter().filter(|e| e.local_port == b.port()).count() >= 30);
    }

    #[test]
    fn several_listeners_in_one_call() {
        let (_a, a) = listen("127.0.0.1:0", 16);
        let (_b, b) = listen("127.0.0.1:0", 16);
        let (_c, c) = listen("[::1]:0", 16);
        let (_d, d) = listen("0.0.0.0:0", 16);
        let (_e, e) = listen("127.0.0.1:0", 16);
        let _clients: Vec<TcpStream> = [(a, 3), (b, 2), (c, 4), (d, 1), (e, 5)]
            .iter()
            .flat_map(|&(to, n)| (0..n).map(move |_| TcpStream::connect(to).unwrap()))
            .collect();
        let each: Vec<Vec<u64>> = [(a, 3), (b, 2), (c, 4), (d, 1), (e, 5)]
            .iter()
            .map(|&(l, n)| wait_queued(l, n))
            .collect();
        let together: Vec<Vec<u64>> = queued_each(&[a, b, c, d])
            .unwrap()
            .into_iter()
            .map(sorted)
            .collect();
        assert_eq!(together, each[..4]);
        assert!(queued_each(&[]).unwrap().is_empty());
        // The bytecode filter: only the listed ports come back, from the
        // first, a middle and the last test of the program.
        let ports = [a.port(), 1, d.port(), 2, b.port()];
        let got = raw(AF_INET, &ports);
        assert_eq!(got.len(), 3 + 1 + 2, "{got:?}");
        assert!(got.iter().all(|x| ports.contains(&x.local_port)));
        let ports: Vec<u16> = (1..=16).chain([e.port()]).collect();
        assert_eq!(raw(AF_INET, &ports).len(), 5);
    }

    /// Mean and 99th percentile of `f`, in microseconds, over `runs` calls.
    fn time(runs: usize, mut f: impl FnMut()) -> (f64, f64) {
        let mut t: Vec<Duration> = (0..runs)
            .map(|_| {
                let start = Instant::now();
                f();
                start.elapsed()
            })
            .collect();
        t.sort_unstable();
        let mean = t.iter().sum::<Duration>().as_secs_f64() / runs as f64;
        (mean * 1e6, t[runs * 99 / 100].as_secs_f64() * 1e6)
    }

    /// The numbers in the module doc. Needs about 5000 fds.
    #[test]
    #[ignore = "measurement: cargo test --release --lib diag::tests::cost -- --ignored --nocapture"]
    fn cost() {
        const RUNS: usize = 1000;
        let (bg, bg_addr) = listen("127.0.0.1:0", 1024);
        let _bg_clients: Vec<TcpStream> = (0..1000)
            .map(|_| TcpStream::connect(bg_addr).unwrap())
            .collect();
        let _bg_served: Vec<_> = (0..1000).map(|_| bg.accept().unwrap()).collect();
        let (mean, p99) = time(RUNS, || drop(Diag::open().unwrap()));
        println!("open+close the netlink socket: mean {mean:.1} us, p99 {p99:.1} us");
        for (host, client) in [("127.0.0.1", "127.0.0.1"), ("[::]", "::1")] {
            for n in [0, 100, 1000] {
                let (_l, addr) = listen(&format!("{host}:0"), 1024);
                let _clients: Vec<TcpStream> = (0..n)
                    .map(|_| TcpStream::connect(to(client, addr.port())).unwrap())
                    .collect();
                wait_queued(addr, n);
                let (mean, p99) = time(RUNS, || assert_eq!(queued(addr).unwrap().len(), n));
                let fam = family_of(addr);
                let (umean, _) = time(RUNS / 10, || drop(raw(fam, &[])));
                println!(
                    "{host} listener, {n:4} queued: queued() mean {mean:.1} us, p99 {p99:.1} us; \
                     same dump without the port filter: mean {umean:.1} us"
                );
            }
        }
        // 16 listeners, 8 per family, 10 queued on each.
        let listeners: Vec<_> = (0..16)
            .map(|i| listen(if i % 2 == 0 { "127.0.0.1:0" } else { "[::1]:0" }, 64))
            .collect();
        let addrs: Vec<SocketAddr> = listeners.iter().map(|(_, a)| *a).collect();
        let _clients: Vec<TcpStream> = addrs
            .iter()
            .flat_map(|&a| (0..10).map(move |_| TcpStream::connect(a).unwrap()))
            .collect();
        for &a in &addrs {
            wait_queued(a, 10);
        }
        let (mean, p99) = time(RUNS, || {
            for &a in &addrs {
                assert_eq!(queued(a).unwrap().len(), 10);
            }
        });
        println!("16 listeners x 10 queued, 16 x queued(): mean {mean:.1} us, p99 {p99:.1} us");
        let (mean, p99) = time(RUNS, || {
            assert!(queued_each(&addrs).unwrap().iter().all(|q| q.len() == 10));
        });
        println!("16 listeners x 10 queued, queued_each(): mean {mean:.1} us, p99 {p99:.1} us");
    }

    /// An accepted connection with an unanswered request makes the port
    /// busy; answered, or still queued, it does not.
    #[test]
    fn a_worker_in_a_request_is_seen() {
        use std::io::{Read, Write};
        let (l, addr) = listen("127.0.0.1:0", 8);
        let mut queued = std::net::TcpStream::connect(addr).unwrap();
        queued.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
        wait_queued(addr, 1);
        assert!(
            !in_request(addr).unwrap(),
            "a queued request is not a worker's"
        );
        let (server, _) = l.accept().unwrap();
        let mut server = std::net::TcpStream::from(server);
        let mut buf = [0u8; 64];
        let _ = server.read(&mut buf).unwrap();
        wait_for("the accepted request seen", || {
            in_request(addr).unwrap().then_some(())
        });
        server.write_all(b"HTTP/1.1 200 OK\r\n\r\n").unwrap();
        let _ = queued.read(&mut buf).unwrap();
        wait_for("the answer seen", || {
            (!in_request(addr).unwrap()).then_some(())
        });
    }

    #[test]
    fn progress_only_when_a_previous_cookie_left() {
        let mut p = QueueProgress::new();
        assert!(!p.observe(&[1, 2, 3]));
        assert!(!p.observe(&[3, 2, 1, 4]));
        assert!(p.observe(&[4, 3, 2]));
        assert!(p.observe(&[]));
        assert!(!p.observe(&[]));
        assert!(!p.observe(&[5]));
        assert!(p.observe(&[6]));
    }
}
