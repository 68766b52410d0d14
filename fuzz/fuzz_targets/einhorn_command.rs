//! One line on einhorn's command socket (YAML or JSON, %-escaped), and the
//! answer to it. Never a panic; answers are one line.
#![no_main]
use libfuzzer_sys::fuzz_target;
use nogap::worker::einhorn;

fuzz_target!(|data: &[u8]| {
    if let Ok(einhorn::Request::Other { command, id }) = einhorn::parse(data) {
        let answer = einhorn::reply(command.as_deref(), id.as_ref());
        assert_eq!(answer.iter().filter(|b| **b == b'\n').count(), 1);
    }
});
