//! How each worker process is launched: its environment and the template
//! check that runs once the sockets are known. The settings themselves are
//! resolved once at start-up, before any fork, into `config::Launch`; `sys`
//! applies them in the child between fork and exec.

use std::ffi::OsString;

use super::handoff;
use crate::config::Launch;
use crate::error::Error;

/// Check the templates in `argv`, `--env` and `--pidfile`, and that the
/// `--fds-as` forms can pass every socket.
pub fn check(launch: &Launch, argv: &[OsString], sockets: &[handoff::Socket]) -> Result<(), Error> {
    let texts = argv
        .iter()
        .chain(launch.env.iter().map(|(_, v)| v))
        .chain(launch.pidfile.iter())
        .map(|s| s.as_os_str());
    handoff::check(&launch.fds_as, texts, sockets).map_err(Error::Usage)
}

/// Set `key` to `value` in `env`, replacing an earlier value.
pub fn set_var(env: &mut Vec<(OsString, OsString)>, key: OsString, value: OsString) {
    match env.iter_mut().find(|(k, _)| *k == key) {
        Some(slot) => slot.1 = value,
        None => env.push((key, value)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_var_replaces() {
        let mut env = vec![("A".into(), "1".into()), ("B".into(), "2".into())];
        set_var(&mut env, "A".into(), "3".into());
        set_var(&mut env, "C".into(), "4".into());
        assert_eq!(
            env,
            vec![
                ("A".into(), "3".into()),
                ("B".into(), "2".into()),
                ("C".into(), "4".into())
            ]
        );
    }
}
