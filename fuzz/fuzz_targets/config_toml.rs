//! A `--config` file: TOML text merged with a fixed command line into the
//! run arguments clap would parse. Never a panic; errors are usage errors.
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::ffi::OsString;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let argv: Vec<OsString> = ["nogap", "run", "--config", "/fuzz.toml"]
        .iter()
        .map(OsString::from)
        .collect();
    if let Err(e) = nogap::config::file::merge(&argv, Path::new("/fuzz.toml"), text) {
        assert_eq!(e.exit_code(), nogap::error::exit::USAGE, "{e}");
    }
});
