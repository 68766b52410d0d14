//! One control protocol line, as a client sends it. Errors are one line
//! that fits a log (bounded length), never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(line) = std::str::from_utf8(data) else {
        return;
    };
    if let Err(e) = nogap::control::parse_request(line) {
        assert!(e.len() < 4096 + 200, "error too long: {} bytes", e.len());
    }
});
