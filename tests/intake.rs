//! Inherited descriptors are closed exactly once.
//!
//! An fd from systemd's fd store that is not a usable socket is dropped
//! (and removed from the store). A second close of its number would close
//! whatever nogap opened in between with the same, lowest free, number: here,
//! the file a log layer opens while the drop is logged.
//!
//! Its own test binary: nothing else in the process opens or closes fds
//! while it runs, so "the lowest free number" is deterministic.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::Mutex;

use tracing_subscriber::layer::{Context, Layer, SubscriberExt};

/// Every fd the layer opened, kept open on purpose.
static OPENED: Mutex<Vec<RawFd>> = Mutex::new(Vec::new());

/// Opens a file for each event, as a logger that opens its file lazily
/// would, and never closes it.
struct OpeningLayer;

impl<S: tracing::Subscriber> Layer<S> for OpeningLayer {
    fn on_event(&self, _event: &tracing::Event<'_>, _ctx: Context<'_, S>) {
        let file = std::fs::File::open("/dev/null").expect("open /dev/null");
        OPENED
            .lock()
            .expect("lock")
            .push(std::os::fd::IntoRawFd::into_raw_fd(file));
    }
}

fn is_open(fd: RawFd) -> bool {
    nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFD).is_ok()
}

#[test]
fn an_unusable_stored_fd_is_closed_exactly_once() {
    let subscriber = tracing_subscriber::registry().with(OpeningLayer);
    tracing::subscriber::set_global_default(subscriber).expect("one subscriber");
    // A stream socket that does not listen: unusable, found only after the
    // descriptor was taken over.
    let sock =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    let fd = OwnedFd::from(sock);
    let number = fd.as_raw_fd();
    let kept = nogap::sockets::intake::adopt(vec![(fd, "http".to_string())], true)
        .expect("an unusable fd from the store is dropped, not fatal");
    assert!(kept.is_empty());
    let opened = OPENED.lock().expect("lock").clone();
    assert!(
        !opened.is_empty(),
        "dropping the fd was not logged: the test proves nothing"
    );
    // The log line opened a file while the socket's number was free: it
    // got that number. A second close would have closed the log's file.
    assert_eq!(
        opened[0], number,
        "the log's file did not reuse the socket's number (fds {opened:?}, socket was {number})"
    );
    for fd in opened {
        assert!(is_open(fd), "fd {fd} of the log was closed behind its back");
    }
}
