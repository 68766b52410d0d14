//! A netlink datagram as sock_diag answers a dump: the first 4 bytes are
//! the request's sequence number. Never a panic, never an endless loop.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 4 {
        return;
    }
    let seq = u32::from_ne_bytes([data[0], data[1], data[2], data[3]]);
    let _ = nogap::sockets::diag::parse_reply(&data[4..], seq);
});
