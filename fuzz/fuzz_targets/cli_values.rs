//! Every CLI value parser (`spec::parse_*`), chosen by the first byte: the
//! `--listen` address and the others. Never a panic; errors name the value.
#![no_main]
use libfuzzer_sys::fuzz_target;
use nogap::spec;

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    let Ok(s) = std::str::from_utf8(rest) else {
        return;
    };
    match which % 12 {
        0 => drop(spec::parse_listen(s)),
        1 => drop(spec::parse_duration(s)),
        2 => drop(spec::parse_signal(s)),
        3 => drop(spec::parse_ready(s)),
        4 => drop(spec::parse_principal(s)),
        5 => drop(spec::parse_env(s)),
        6 => drop(spec::parse_octal_mode(s)),
        7 => drop(spec::parse_umask(s)),
        8 => drop(spec::parse_handoff(s)),
        9 => drop(spec::parse_handover(s)),
        10 => drop(spec::parse_instance(s)),
        _ => drop(spec::check_fd_name(s)),
    }
});
