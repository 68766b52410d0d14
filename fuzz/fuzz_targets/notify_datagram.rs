//! A worker's notify datagram: the first byte says whether the kernel gave
//! credentials and how many descriptors came with it (as `notify::recv`
//! reports them); the rest is the datagram. Must never panic; anything it
//! accepts has no descriptors and a sender.
#![no_main]
use libfuzzer_sys::fuzz_target;
use nogap::worker::notify;

fuzz_target!(|data: &[u8]| {
    let Some((&meta, datagram)) = data.split_first() else {
        return;
    };
    let pid = (meta & 1 == 1).then_some(4242);
    let fds = usize::from(meta >> 1) % 4;
    if let Ok(messages) = notify::receive(datagram, pid, fds) {
        assert!(pid.is_some() && fds == 0);
        assert!(!messages.is_empty());
    }
    let _ = notify::parse(datagram);
});
