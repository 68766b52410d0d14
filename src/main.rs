//! `nogap`: parse arguments, set up logging, run, map the result to an exit
//! code (the table is in `error`).

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use nogap::cli::{Cli, Command, RunArgs};
use nogap::config::RunConfig;
use nogap::error::{exit, Error};
use nogap::supervisor::{self, Environment};
use nogap::{control, handoff, sockets};

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage_error(e),
    };
    let env = Environment::capture();
    init_logging(&env);
    let result = match cli.command {
        Command::Run(args) => run(args, env),
        Command::Reload(args) => control::client_reload(&args, &env),
        Command::Status(args) => control::client_status(&args, &env),
    };
    match result {
        Ok(()) => ExitCode::from(exit::OK),
        Err(e) => {
            eprintln!("nogap: {e}");
            ExitCode::from(&e)
        }
    }
}

/// clap's errors, in one line; help and version as usual.
fn usage_error(e: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    if matches!(
        e.kind(),
        ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    ) {
        let _ = e.print();
        return ExitCode::from(
            if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
                exit::USAGE
            } else {
                exit::OK
            },
        );
    }
    let text = e.render().to_string();
    let first = text
        .lines()
        .next()
        .unwrap_or("bad usage")
        .trim_start_matches("error: ");
    eprintln!("nogap: {first} (see 'nogap --help')");
    ExitCode::from(exit::USAGE)
}

fn run(args: RunArgs, env: Environment) -> Result<(), Error> {
    let config = RunConfig::from_args(&args, env.get("PATH"))?;
    let inherited = sockets::take_inherited(&env, args.fd_store)?;
    let mut names: Vec<handoff::Socket> =
        inherited.iter().map(handoff::Socket::of_listener).collect();
    for spec in &config.listen {
        names.retain(|s| s.name != spec.name);
        names.push(handoff::Socket::of_spec(spec));
    }
    config.launch.check(&config.command.argv, &names)?;
    if args.check {
        let n = inherited.len() + config.listen.len();
        println!(
            "configuration ok: {n} socket(s), {} worker(s), command {}",
            config.workers,
            config.command.path.display()
        );
        return Ok(());
    }
    let listeners = sockets::open_all(
        inherited,
        &config.listen,
        config.backlog,
        config.reuseport,
        config.steer,
        config.fd_store,
    )?;
    // One thread: nogap is not in the data path, and workers are forked from
    // this (the main) thread, which lives as long as nogap — the
    // parent-death signal is tied to the forking thread.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::system("cannot start the event loop", e))?;
    runtime.block_on(async {
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let _control = control::serve(args.control.as_deref(), &env, tx)?;
        supervisor::run(config, listeners, env, rx).await
    })
}

/// journald when stderr is the journal (JOURNAL_STREAM), else readable stderr.
fn init_logging(env: &Environment) {
    use tracing_subscriber::prelude::*;
    let filter = tracing_subscriber::EnvFilter::try_new(
        env.get("NOGAP_LOG")
            .and_then(|s| s.to_str())
            .unwrap_or("info"),
    )
    .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let registry = tracing_subscriber::registry().with(filter);
    if stderr_is_journal(env) {
        if let Ok(layer) = tracing_journald::layer() {
            registry
                .with(
                    layer
                        .with_syslog_identifier("nogap".into())
                        .with_field_prefix(None),
                )
                .init();
            return;
        }
    }
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::stderr().is_terminal());
    registry.with(fmt).init();
}

fn stderr_is_journal(env: &Environment) -> bool {
    use std::os::unix::fs::MetadataExt;
    let Some(stream) = env.get("JOURNAL_STREAM").and_then(|s| s.to_str()) else {
        return false;
    };
    let Some((dev, ino)) = stream.split_once(':') else {
        return false;
    };
    let Ok(meta) = std::fs::metadata("/proc/self/fd/2") else {
        return false;
    };
    dev.parse() == Ok(meta.dev()) && ino.parse() == Ok(meta.ino())
}
