//! `nogap`: parse arguments, set up logging, run, map the result to an exit
//! code (the table is in `error`).

use std::ffi::OsString;
use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use nogap::cli::{Cli, Command, RunArgs};
use nogap::config::{self, Environment};
use nogap::error::{exit, Error};
use nogap::worker::{handoff, launch};
use nogap::{control, metrics, sockets, supervisor, upgrade};

fn main() -> ExitCode {
    let argv: Vec<OsString> = std::env::args_os().collect();
    let cli = match Cli::try_parse_from(&argv) {
        Ok(cli) => cli,
        Err(e) => return usage_error(e),
    };
    let env = Environment::capture();
    let log = init_logging(&env);
    let result = match cli.command {
        Command::Run(args) => run(args, &argv, env),
        Command::Reload(args) => control::client_reload(&args, &env),
        Command::Status(args) => control::client_status(&args, &env),
        Command::Upgrade(args) => control::client_upgrade(&args, &env),
        Command::UpgradeProbe => upgrade::probe_main(),
    };
    // The log lines still queued (see `logs`) go out first.
    if let Some(log) = &log {
        log.flush(std::time::Duration::from_secs(1));
    }
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

fn run(args: RunArgs, argv: &[OsString], env: Environment) -> Result<(), Error> {
    // A reload resolves the same command line again, with the file re-read.
    let mut origin = config::reload::Origin {
        argv: argv.to_vec(),
        path_var: env.get("PATH").cloned(),
        text: None,
    };
    if let Some(carried) = upgrade::take(&env) {
        // An earlier image of this process handed over (self-upgrade): its
        // sockets, workers, state and metrics listener, not LISTEN_FDS,
        // --listen or --metrics; the configuration it had deployed, not
        // what the file says now.
        let carried = carried?;
        origin.text = carried.config.clone();
        let (args, config) = config::reload::resolve(origin, args)?;
        let metrics = upgrade::metrics_listener(&carried)?;
        return in_runtime(|| async {
            let (tx, rx) = tokio::sync::mpsc::channel(64);
            let _control = control::serve(args.control.as_deref(), &env, tx)?;
            let (signals, upstream) = (supervisor::os_signals()?, supervisor::systemd(&env)?);
            // The handlers are in place: signals that came during the exec
            // (blocked across it) are delivered now.
            upgrade::unblock_signals();
            let from = upgrade::Begin::Upgrade(Box::new(carried));
            supervisor::run(config, from, env, rx, signals, upstream, metrics).await
        });
    }
    origin.text = config::file::read(&args)?;
    let (args, config) = config::reload::resolve(origin, args)?;
    let metrics = config.metrics.map(metrics::bind).transpose()?;
    let inherited = sockets::take_inherited(&env, args.fd_store)?;
    // Pools a dead nogap stored (see `sockets::steer`): the supervisor's.
    let (stored, inherited): (Vec<_>, Vec<_>) = inherited
        .into_iter()
        .partition(sockets::steer::is_stored_pool);
    let planned: Vec<handoff::Socket> = sockets::planned(&inherited, &config.listen)
        .into_iter()
        .map(|(name, endpoint)| handoff::Socket::new(name, endpoint))
        .collect();
    launch::check(&config.launch, &config.command.argv, &planned)?;
    let mut listeners = sockets::open_all(
        inherited,
        &config.listen,
        config.backlog,
        config.reuseport,
        config.steer,
        config.fd_store,
    )?;
    if args.check {
        // The sockets could be bound (or were inherited): nothing to start.
        println!(
            "configuration ok: {} socket(s), {} worker(s), command {}",
            listeners.len(),
            config.workers,
            config.command.path.display()
        );
        return Ok(());
    }
    listeners.extend(stored);
    in_runtime(|| async {
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let _control = control::serve(args.control.as_deref(), &env, tx)?;
        let (signals, upstream) = (supervisor::os_signals()?, supervisor::systemd(&env)?);
        supervisor::run(config, listeners, env, rx, signals, upstream, metrics).await
    })
}

/// One thread: nogap is not in the data path, and workers are forked from
/// this (the main) thread, which lives as long as nogap — the parent-death
/// signal is tied to the forking thread, and a self-upgrade's execve, called
/// from it too, does not end it.
fn in_runtime<F: std::future::Future<Output = Result<(), Error>>>(
    f: impl FnOnce() -> F,
) -> Result<(), Error> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::system("cannot start the event loop", e))?;
    runtime.block_on(f())
}

/// journald when stderr is the journal (JOURNAL_STREAM), else readable
/// stderr through a bounded queue and a thread of its own (returned, to be
/// flushed at exit): a full stderr pipe never blocks the event loop.
fn init_logging(env: &Environment) -> Option<nogap::logs::NonBlocking> {
    use tracing_subscriber::prelude::*;
    let filter = tracing_subscriber::EnvFilter::try_new(
        env.get("NOGAP_LOG")
            .and_then(|s| s.to_str())
            .unwrap_or("info"),
    )
    .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let registry = tracing_subscriber::registry().with(filter);
    if env.stderr_is_journal() {
        if let Ok(layer) = tracing_journald::layer() {
            registry
                .with(
                    layer
                        .with_syslog_identifier("nogap".into())
                        .with_field_prefix(None),
                )
                .init();
            return None;
        }
    }
    let out = nogap::logs::NonBlocking::new(std::io::stderr());
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(out.clone())
        .with_target(false)
        .with_ansi(std::io::stderr().is_terminal());
    registry.with(fmt).init();
    Some(out)
}
