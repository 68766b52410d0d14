//! What a reload deploys: the `--config` file, read again.
//!
//! Every reload (SIGHUP, `nogap reload`, `systemctl reload`) re-reads the
//! file nogap was started with and resolves it as at start: the same
//! command line, whose options still win over the file's
//! ([`file::run_args`]), then every check of [`RunConfig::from_args`]. A new
//! generation then runs with the new command, arguments, environment,
//! workers, user, ready mode and timeouts; the generations already running
//! keep theirs until they leave.
//!
//! `listen` changes too: the `deploy` module binds new addresses and keeps
//! the sockets that stay (see `sockets::set`). What nogap cannot change
//! while it runs (how the sockets are set up and handed over, the control
//! socket, the health checks) is refused by [`reread`], naming the key: the
//! reload fails and the serving generation keeps serving.

use std::ffi::OsString;

use clap::Parser;

use super::{file, RunConfig};
use crate::cli::{Cli, Command, RunArgs};
use crate::error::Error;

/// The command line nogap was started with, and the `PATH` it resolves the
/// command in: what a reload resolves again.
#[derive(Clone, Debug)]
pub struct Origin {
    pub argv: Vec<OsString>,
    pub path_var: Option<OsString>,
    /// The `--config` file's text this configuration was resolved from (a
    /// self-upgrade carries it: the new image runs what was deployed, not
    /// what the file says now).
    pub text: Option<String>,
}

/// Resolve `args` (as parsed from `origin.argv`) with the file's text
/// `origin.text` merged in: the `run` options as they apply, and the
/// validated configuration, which remembers `origin`.
pub fn resolve(origin: Origin, args: RunArgs) -> Result<(RunArgs, RunConfig), Error> {
    let args = match (&args.config, &origin.text) {
        (Some(path), Some(text)) => file::merge(&origin.argv, path, text)?,
        _ => args,
    };
    let mut config = RunConfig::from_args(&args, origin.path_var.as_ref())?;
    config.origin = Some(origin);
    Ok((args, config))
}

/// Parse `text` again as the config file of `current`'s command line: the
/// configuration a generation was deployed with.
pub fn from_text(current: &Origin, text: String) -> Result<RunConfig, Error> {
    let origin = Origin {
        text: Some(text),
        ..current.clone()
    };
    Ok(resolve(origin, run_args_of(&current.argv)?)?.1)
}

/// The `run` options of `argv`, as clap parses them.
fn run_args_of(argv: &[OsString]) -> Result<RunArgs, Error> {
    let cli = Cli::try_parse_from(argv)
        .map_err(|e| Error::Usage(format!("the command line no longer parses: {e}")))?;
    match cli.command {
        Command::Run(args) => Ok(args),
        _ => Err(Error::Usage("nogap was not started with 'run'".into())),
    }
}

/// The configuration a reload deploys: None without `--config` (a reload
/// starts the same command again), else the file resolved again, or why it
/// cannot be deployed.
pub fn reread(current: &RunConfig) -> Result<Option<RunConfig>, Error> {
    let (Some(origin), Some(path)) = (&current.origin, &current.config_file) else {
        return Ok(None);
    };
    let args = run_args_of(&origin.argv)?;
    let origin = Origin {
        text: file::read(&args)?,
        ..origin.clone()
    };
    let (_, new) = resolve(origin, args)?;
    if let Some(key) = fixed_key_changed(current, &new) {
        return Err(Error::Usage(format!(
            "{}: key '{key}' cannot change while nogap runs (restart nogap to change it)",
            path.display()
        )));
    }
    Ok(Some(new))
}

/// The first option whose value a reload cannot deploy, if it changed.
pub fn fixed_key_changed(old: &RunConfig, new: &RunConfig) -> Option<&'static str> {
    let (h, n) = (&old.health, &new.health);
    [
        ("backlog", old.backlog != new.backlog),
        ("reuseport", old.reuseport != new.reuseport),
        (
            "reuseport-per-worker",
            old.per_worker_sockets != new.per_worker_sockets,
        ),
        ("handover", old.steer != new.steer),
        ("fd-store", old.fd_store != new.fd_store),
        ("control", old.control != new.control),
        ("metrics", old.metrics != new.metrics),
        ("health-interval", h.interval != n.interval),
        ("stall-timeout", h.stall_timeout != n.stall_timeout),
        ("worker-watchdog", h.worker_watchdog != n.worker_watchdog),
        ("fd-high", h.fd_high != n.fd_high),
        ("max-replacements", h.max_replacements != n.max_replacements),
        (
            "watchdog-follows-health",
            h.watchdog_follows_health != n.watchdog_follows_health,
        ),
    ]
    .into_iter()
    .find(|(_, changed)| *changed)
    .map(|(key, _)| key)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &std::path::Path, text: &str) -> std::path::PathBuf {
        let path = dir.join("app.toml");
        std::fs::write(&path, text).unwrap();
        path
    }

    fn start(path: &std::path::Path, extra: &[&str]) -> RunConfig {
        let mut argv: Vec<OsString> = vec!["nogap".into(), "run".into(), "--config".into()];
        argv.push(path.into());
        argv.extend(extra.iter().map(OsString::from));
        let Command::Run(args) = Cli::try_parse_from(&argv).unwrap().command else {
            panic!("run")
        };
        let args = file::run_args(&argv, args).unwrap();
        let mut config = RunConfig::from_args(&args, None).unwrap();
        config.origin = Some(Origin {
            argv,
            path_var: None,
            text: None,
        });
        config
    }

    const FILE: &str =
        "listen = [\"127.0.0.1:8080\"]\nworkers = 2\ncommand = [\"/bin/sleep\", \"1\"]\n";

    #[test]
    fn a_reload_reads_the_file_again_and_the_command_line_still_wins() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), FILE);
        let config = start(&path, &["--drain-timeout", "7s"]);
        assert_eq!(config.workers, 2);
        write(
            dir.path(),
            &FILE
                .replace("workers = 2", "workers = 3\ndrain-timeout = \"1s\"")
                .replace("\"1\"", "\"2\""),
        );
        let new = reread(&config).unwrap().expect("a file to re-read");
        assert_eq!(new.workers, 3);
        assert_eq!(new.command.argv, ["/bin/sleep", "2"]);
        assert_eq!(new.stop.grace, std::time::Duration::from_secs(7));
    }

    #[test]
    fn a_bad_file_or_a_fixed_key_fails_the_reload_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), FILE);
        let config = start(&path, &[]);
        write(
            dir.path(),
            &FILE.replace("workers = 2", "workers = 2\nwrokers = 3"),
        );
        let e = reread(&config).unwrap_err().to_string();
        assert!(e.contains("app.toml:3: unknown key 'wrokers'"), "{e}");
        write(dir.path(), &format!("{FILE}fd-store = true\n"));
        let e = reread(&config).unwrap_err().to_string();
        assert!(e.ends_with("app.toml: key 'fd-store' cannot change while nogap runs (restart nogap to change it)"), "{e}");
    }

    #[test]
    fn listen_may_change_it_is_deployed_not_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), FILE);
        let config = start(&path, &[]);
        let both = "listen = [\"127.0.0.1:8080\", \"admin=127.0.0.1:9001\"]";
        write(
            dir.path(),
            &FILE.replace("listen = [\"127.0.0.1:8080\"]", both),
        );
        let new = reread(&config).unwrap().expect("a file to re-read");
        let names: Vec<_> = new.listen.iter().map(|l| l.name.as_str()).collect();
        assert_eq!(names.len(), 2);
        assert_eq!(names[1], "admin");
        assert_eq!(fixed_key_changed(&config, &new), None);
    }

    #[test]
    fn without_a_file_a_reload_keeps_the_configuration() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = start(&write(dir.path(), FILE), &[]);
        config.config_file = None;
        assert!(reread(&config).unwrap().is_none());
    }
}
