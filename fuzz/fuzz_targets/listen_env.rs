//! The LISTEN_* variables nogap reads at start-up (sd_listen_fds(3)):
//! LISTEN_PID, LISTEN_FDS and LISTEN_FDNAMES from the input, split at NUL
//! bytes. Whatever it accepts names fds 3.. with one name each.
#![no_main]
use libfuzzer_sys::fuzz_target;
use nogap::config::Environment;
use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;

fuzz_target!(|data: &[u8]| {
    let mut parts = data.splitn(3, |b| *b == 0);
    let keys = ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"];
    let vars: Vec<(OsString, OsString)> = keys
        .iter()
        .zip(parts.by_ref())
        .map(|(k, v)| (OsString::from(k), OsString::from_vec(v.to_vec())))
        .collect();
    let env = Environment::from_vars(vars);
    if let Ok(fds) = nogap::sockets::intake::listen_fds_for(&env, 4242) {
        for (i, (fd, _)) in fds.iter().enumerate() {
            assert_eq!(*fd, 3 + i as i32);
        }
        assert!(fds.len() <= 4096);
    }
});
