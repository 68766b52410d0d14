//! The man pages. clap_mangen renders what the clap definitions know (name,
//! synopsis, description, options, subcommands); the sections here add what
//! they cannot say: exit status, signals, environment, files, systemd and the
//! control protocol. Every subcommand gets a page, whether or not it has an
//! entry in [`extra`]: a new one gets the sections every page has.

use std::borrow::Cow;
use std::io::{self, Write};

use clap::Command;
use clap_mangen::Man;
use nogap::error::exit;
use roff::{bold, roman, Roff};

/// The exit-code table, from the constants nogap exits with.
const EXIT_CODES: &[(u8, &str)] = &[
    (exit::OK, "Stopped cleanly (run), or the command succeeded."),
    (
        exit::FAILURE,
        "Runtime failure. For reload --wait: the reload failed (the old generation \
         still serves) or --timeout ran out.",
    ),
    (
        exit::USAGE,
        "Usage: unknown option, bad value (address, duration, signal, mode), \
         missing COMMAND, a --control path in use.",
    ),
    (
        exit::SOCKETS,
        "The sockets cannot be set up: bind failed (port in use, permission), or \
         inherited fds that are not usable sockets.",
    ),
    (exit::COMMAND, "COMMAND not found or not executable."),
    (
        exit::CONTROL,
        "The control socket cannot be reached, or it refused the request.",
    ),
    (
        exit::NO_WORKER,
        "No worker could start (run): a worker of the first generation failed to start \
         --start-limit times within --start-limit-interval. The last line says why: \
         \"no worker could start: worker 0 (pid N) of generation 1 exited with status 2 \
         before it was ready (5 failed starts within 10s, --start-limit)\".",
    ),
    (
        exit::UNSAFE,
        "A runtime directory nogap must own (the /tmp/nogap-UID fallback) belongs to \
         another user, is a symlink, or lets others in: refused, nothing started.",
    ),
];

/// One block of an extra section.
enum Block {
    /// A paragraph.
    P(String),
    /// A tagged paragraph (a table row): the tag in bold, then the text.
    Item(Cow<'static, str>, &'static str),
    /// Lines shown as they are (commands, protocol exchanges).
    Literal(&'static [&'static str]),
}
use Block::Literal;

#[allow(non_snake_case)]
fn P(text: &str) -> Block {
    Block::P(text.to_owned())
}

#[allow(non_snake_case)]
fn Item(tag: &'static str, text: &'static str) -> Block {
    Block::Item(Cow::Borrowed(tag), text)
}

struct Section {
    title: &'static str,
    blocks: Vec<Block>,
}

fn section(title: &'static str, blocks: Vec<Block>) -> Section {
    Section { title, blocks }
}

/// Paragraphs appended to clap's DESCRIPTION, by page.
fn description(page: &str) -> Vec<Block> {
    match page {
        "nogap" | "nogap-run" => {
            vec![
            P("nogap run binds the sockets given with --listen and takes the ones systemd \
               passes it (LISTEN_FDS with LISTEN_PID = nogap's pid, names from \
               LISTEN_FDNAMES). It then starts --workers copies of COMMAND, a generation. \
               Each worker gets the sockets at fd 3, 4, ... in a stable order: inherited \
               sockets first, then --listen in command-line order. It also gets LISTEN_FDS, \
               LISTEN_PID (its own pid), LISTEN_FDNAMES, and NOTIFY_SOCKET, a datagram \
               socket nogap owns for that worker."),
            P("A reload starts a new generation on the same sockets. Once every new worker \
               is ready, new connections are steered to it (--handover steer); the old \
               generation gets --stop-signal once nothing is queued for it any more, and \
               SIGKILL to its process groups after --drain-timeout. If a new worker exits, \
               cannot be executed, or is not ready within --start-timeout, the new \
               generation is stopped and the old one keeps serving. Reloads asked for \
               during a reload are coalesced into one more reload afterwards. At most \
               three generations are alive at once (two with --handover steer): a reload \
               asked for at that bound waits, coalesced, until the oldest is gone. The \
               sockets stay open the whole time."),
            P("Durations read like 500ms, 2s, 1m, 1h30m. Signals read like TERM, SIGQUIT, 15."),
        ]
        }
        "nogap-reload" => vec![P(
            "The nogap to talk to is found by its control socket (see FILES). Without \
             --wait, the command returns once the reload is requested.",
        )],
        "nogap-upgrade" => vec![
            P(
                "The nogap to talk to is found by its control socket (see FILES). Without \
               --wait, the command returns once the upgrade is requested.",
            ),
            P(
                "The running nogap first waits until no generation starts or is handed \
               over. A refused binary makes --wait exit 1, naming why. Otherwise the \
               pid, the workers and every socket stay, systemd sees RELOADING=1 then \
               READY=1 and no restart, and the new nogap answers --wait. A package \
               upgrade followed by nogap upgrade NAME --wait replaces nogap without \
               restarting a worker.",
            ),
        ],
        "nogap-status" => vec![P(
            "The nogap to talk to is found by its control socket (see FILES).",
        )],
        _ => vec![],
    }
}

fn exit_status() -> Section {
    let mut blocks: Vec<Block> = EXIT_CODES
        .iter()
        .map(|&(code, text)| Block::Item(Cow::Owned(code.to_string()), text))
        .collect();
    blocks.push(P(
        "The shipped units set RestartPreventExitStatus=2 3 4 6: restarting \
                   does not fix a bad configuration, nor a command that cannot start.",
    ));
    section("EXIT STATUS", blocks)
}

fn signals() -> Section {
    section(
        "SIGNALS",
        vec![
            Item("HUP", "Reload: start a new generation."),
            Item(
                "USR2",
                "Upgrade in place, as nogap upgrade: execute the binary at the path nogap \
                 was started from, in the same process.",
            ),
            Item(
                "TERM, INT, QUIT",
                "Graceful stop: the stop signal to every worker, SIGKILL to what is left \
                 after --drain-timeout, then exit 0.",
            ),
            Item(
                "USR1",
                "Passed on to every ready or draining worker (servers reopen their log \
                 files on it). Workers still starting are skipped: they may not handle it yet.",
            ),
            Item(
                "TTIN, TTOU",
                "Ignored, with a log line: nogap does not change the number of workers \
                 at run time (change --workers and reload).",
            ),
            Item(
                "ALRM, WINCH, PWR, URG, VTALRM, PROF, IO, SYS, TSTP, XCPU, XFSZ, STKFLT, CONT, \
                 SIGRTMIN..SIGRTMAX",
                "Ignored, with a log line. PIPE is ignored silently. None of them stops \
                 nogap or a worker, also when nogap is PID 1 of a PID namespace.",
            ),
            Item(
                "KILL",
                "The workers get the stop signal (parent-death signal), drain and exit; \
                 the next nogap of the unit stops what is left after --drain-timeout, once \
                 it serves. The sockets close with nogap unless systemd holds them \
                 (socket unit or fd store, where nogap also keeps its steered pools).",
            ),
            Item(
                "ABRT, SEGV, BUS, ILL, FPE, TRAP",
                "Default action (nogap is broken; ABRT is what systemd's watchdog sends).",
            ),
        ],
    )
}

fn environment(page: &str) -> Section {
    let mut blocks = Vec::new();
    if page == "nogap" || page == "nogap-run" {
        blocks.extend([
            Item(
                "LISTEN_FDS, LISTEN_PID, LISTEN_FDNAMES",
                "Sockets passed to nogap (consumed, not passed on).",
            ),
            Item(
                "NOTIFY_SOCKET, WATCHDOG_USEC, WATCHDOG_PID",
                "nogap's own systemd channel (consumed, not passed on).",
            ),
            Item(
                "NOGAP_UPGRADE_FD",
                "Set by nogap for its own next image on a self-upgrade: the descriptor \
                 of the state it carries (consumed, not passed on).",
            ),
        ]);
    }
    blocks.extend([
        Item(
            "RUNTIME_DIRECTORY",
            "Where the control socket (and, for run, the per-worker notify sockets) live.",
        ),
        Item(
            "XDG_RUNTIME_DIR",
            "Used instead, in a nogap subdirectory, when not root and RUNTIME_DIRECTORY is unset.",
        ),
    ]);
    if page == "nogap" || page == "nogap-run" {
        blocks.extend([
            Item(
                "JOURNAL_STREAM",
                "When it names stderr, logs go to journald with fields (WORKER, \
                 GENERATION, PID, SOCKET).",
            ),
            Item("PATH", "To find COMMAND."),
        ]);
    }
    blocks.push(Item(
        "NOGAP_LOG",
        "Log level or filter: error, warn, info (the default), debug, trace.",
    ));
    if page == "nogap" || page == "nogap-run" {
        blocks.push(P(
            "Workers get the rest of the environment unchanged (or none of it \
                       with --env-clear), plus NOGAP_GENERATION (1, 2, ...) and \
                       NOGAP_WORKER (the slot, 0..N-1).",
        ));
    }
    section("ENVIRONMENT", blocks)
}

fn files() -> Section {
    section(
        "FILES",
        vec![
            Item(
                "control socket",
                "--control, else $RUNTIME_DIRECTORY/control.sock, else \
                 /run/nogap/control.sock for root, else \
                 $XDG_RUNTIME_DIR/nogap/control.sock. Mode 0600; only root and nogap's \
                 own uid are served. If the default path is in use by another live nogap, \
                 run goes on without a control channel and logs a warning; a path given \
                 with --control that is in use is an error. reload, upgrade and status without \
                 NAME or --control use $RUNTIME_DIRECTORY's socket (ExecReload= has \
                 it), else the one nogap that runs: the default socket or one instance \
                 under /run/nogap.",
            ),
            Item(
                "/run/nogap/NAME/control.sock",
                "The control socket of the packaged unit nogap@NAME.service \
                 (RuntimeDirectory=nogap/NAME); nogap status NAME and nogap reload \
                 NAME find it.",
            ),
            Item(
                "/etc/nogap/NAME.toml",
                "The configuration of nogap@NAME.service.",
            ),
            Item(
                "notify-PID/",
                "Per-worker notify sockets, in the runtime directory; removed on exit.",
            ),
        ],
    )
}

fn systemd() -> Section {
    section(
        "SYSTEMD",
        vec![
            P(
                "When NOTIFY_SOCKET is set, nogap sends READY=1 once the first generation is \
               ready. At the start of a reload it sends RELOADING=1 with MONOTONIC_USEC= \
               and EXTEND_TIMEOUT_USEC= (start timeout + 5 s), then READY=1 at the end, \
               whether the reload succeeded or failed. It sends a one-line STATUS= and \
               STOPPING=1 on shutdown.",
            ),
            P(
                "With WATCHDOG_USEC (and WATCHDOG_PID = nogap or unset), it sends WATCHDOG=1 \
               at half the period from its event loop; with --watchdog-follows-health only \
               while healthy.",
            ),
            P(
                "With --fd-store it sends FDSTORE=1 and FDNAME= for every socket it bound \
               itself, and takes them back by name on start. A stored fd that is not a \
               usable socket is logged and removed with FDSTOREREMOVE=1.",
            ),
        ],
    )
}

fn control_protocol() -> Section {
    section(
        "CONTROL PROTOCOL",
        vec![
            P(
                "Version 1: one JSON line in, one JSON line out, over the control socket. \
               Only root and nogap's own uid are served (SO_PEERCRED).",
            ),
            Literal(&[
                r#"{"version":1,"command":"reload"}  ->  {"ok":true}"#,
                r#"{"version":1,"command":"reload","wait":true}"#,
                r#"    ->  {"ok":true,"generation":N} | {"ok":false,"error":"..."}"#,
                r#"{"version":1,"command":"status"}  ->  {"ok":true,"status":{...}}"#,
                r#"{"version":1,"command":"reload","wait":true,"progress":true}"#,
                r#"    ->  {"progress":{"generation":N,"stage":"starting",...}} ... then the answer"#,
            ]),
            P(
                "nogap reload --wait asks for progress only when its output is a terminal;                an older nogap ignores the key and answers in one line.",
            ),
        ],
    )
}

fn metrics() -> Section {
    section(
        "METRICS",
        vec![
            P(
                "With --metrics ADDR, nogap serves over HTTP: GET /metrics (OpenMetrics text                when the client accepts it, else the classic text format), GET /healthz                (200 while healthy, 503 with the reason when UNHEALTHY) and GET /readyz                (200 once a generation serves, 503 before and while stopping).",
            ),
            Item("nogap_generation", "Gauge: the serving generation (0 before the first)."),
            Item("nogap_healthy", "Gauge: 1, or 0 while UNHEALTHY."),
            Item("nogap_ready", "Gauge: 1 while a generation serves and nogap is not stopping."),
            Item("nogap_workers{state}", "Gauge: workers by state (waiting, spawning, starting, ready, draining, killed)."),
            Item("nogap_reloads_total{result}", "Counter: reloads, result ok or failed."),
            Item("nogap_reload_duration_seconds", "Histogram: from the reload request to serving or failure."),
            Item("nogap_worker_restarts_total", "Counter: workers started again after an exit or a failed start."),
            Item("nogap_worker_replacements_total{reason}", "Counter: health replacements, reason stall, watchdog or fds."),
            Item("nogap_accept_queue_depth{socket}", "Gauge: connections waiting in the serving socket's queue (TCP)."),
            Item("nogap_accept_queue_backlog{socket}", "Gauge: that queue's limit."),
            Item("nogap_accept_stalls_total{socket}", "Counter: stalls seen on the socket's queues."),
            Item("nogap_worker_fds{slot,generation}", "Gauge: a worker's open descriptors."),
            Item("nogap_worker_fds_limit{slot,generation}", "Gauge: its soft RLIMIT_NOFILE."),
            Item("nogap_worker_output_dropped_lines_total", "Counter: captured worker output lines dropped."),
        ],
    )
}

fn worker_output() -> Section {
    section(
        "WORKER OUTPUT",
        vec![P(
            "With --worker-output capture (the default when nogap's stderr is the journal),            each line a worker writes to stdout or stderr becomes a journal entry with the            fields WORKER, GENERATION and WORKER_PID, SYSLOG_IDENTIFIER set to the command's            name and PRIORITY from an sd-daemon <N> prefix (default 6); without the journal            it goes to nogap's stderr as [gen G worker W pid P] line. Lines are cut at 4 KiB;            over 2000 lines a second per worker are dropped, counted and reported. A worker            that fails to start has its last 20 lines in the reload's failure.",
        )],
    )
}

fn see_also(page: &str, pages: &[String]) -> Section {
    let mut refs: Vec<String> = pages
        .iter()
        .filter(|p| p.as_str() != page)
        .map(|p| format!("{p}(1)"))
        .collect();
    refs.extend(
        [
            "systemd.service(5)",
            "systemd.socket(5)",
            "sd_notify(3)",
            "sd_listen_fds(3)",
        ]
        .map(String::from),
    );
    section(
        "SEE ALSO",
        vec![
            Block::P(refs.join(", ")),
            P(
                "/usr/share/doc/nogap/: systemd.md (the nogap@.service template unit, \
                 its sandboxing, socket activation), README.md, examples/demo.toml. \
                 docs/handoff.md in nogap's source: a working example per server family.",
            ),
        ],
    )
}

/// Sections after OPTIONS and SUBCOMMANDS, by page.
fn extra(page: &str, pages: &[String]) -> Vec<Section> {
    let mut out = vec![exit_status()];
    match page {
        "nogap" | "nogap-run" => {
            out.extend([
                signals(),
                environment(page),
                files(),
                systemd(),
                control_protocol(),
                metrics(),
                worker_output(),
            ]);
        }
        "nogap-reload" | "nogap-status" => {
            out.extend([environment(page), files(), control_protocol()]);
        }
        _ => out.push(environment(page)),
    }
    out.push(see_also(page, pages));
    out
}

fn render_blocks(roff: &mut Roff, blocks: &[Block]) {
    for block in blocks {
        match block {
            Block::P(text) => {
                roff.control("PP", []);
                roff.text([roman(text.as_str())]);
            }
            Block::Item(tag, text) => {
                roff.control("TP", []);
                roff.text([bold(tag.as_ref())]);
                roff.text([roman(*text)]);
            }
            Literal(lines) => {
                roff.control("PP", []);
                roff.control("RS", ["4"]);
                roff.control("nf", []);
                for line in *lines {
                    roff.text([roman(*line)]);
                }
                roff.control("fi", []);
                roff.control("RE", []);
            }
        }
    }
}

/// Every page: `nogap` and one per subcommand (recursively), as (file name, roff).
pub fn pages(cli: Command) -> Vec<(String, String)> {
    let mut cmd = cli.disable_help_subcommand(true);
    cmd.build();
    let mut cmds = Vec::new();
    collect(&cmd, &mut cmds);
    let names: Vec<String> = cmds.iter().map(page_name).collect();
    cmds.iter()
        .map(|c| {
            let name = page_name(c);
            (format!("{name}.1"), page(c, &name, &names))
        })
        .collect()
}

fn collect(cmd: &Command, out: &mut Vec<Command>) {
    out.push(cmd.clone());
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        collect(sub, out);
    }
}

/// `nogap`, `nogap-run`, ...: clap names a built subcommand after its parents.
fn page_name(cmd: &Command) -> String {
    cmd.get_display_name()
        .unwrap_or_else(|| cmd.get_name())
        .to_owned()
}

fn page(cmd: &Command, name: &str, pages: &[String]) -> String {
    let mut out = Vec::new();
    render_page(cmd, name, pages, &mut out).expect("rendering to memory");
    // Every part starts with roff's apostrophe preamble: keep the first only.
    let out = String::from_utf8(out).expect("roff is UTF-8");
    let preamble = Roff::new().render();
    let body = out
        .strip_prefix(&preamble)
        .expect("a page starts with the preamble");
    let body = body.replace(&preamble, "");
    format!("{preamble}{}", no_fill_indented(&body))
}

/// Help text written with `verbatim_doc_comment` keeps its indented lines (a
/// table, examples) as they are in `--help`; clap_mangen passes them on in
/// fill mode, where they would run together. Runs of indented lines are set
/// without filling.
fn no_fill_indented(roff: &str) -> String {
    let mut out = String::new();
    let mut in_run = false;
    for line in roff.lines() {
        let indented = line.starts_with(' ');
        if indented && !in_run {
            out.push_str(".nf\n");
        } else if !indented && in_run {
            out.push_str(".fi\n");
        }
        in_run = indented;
        out.push_str(line);
        out.push('\n');
    }
    if in_run {
        out.push_str(".fi\n");
    }
    out
}

fn render_page(cmd: &Command, name: &str, pages: &[String], w: &mut Vec<u8>) -> io::Result<()> {
    let man = Man::new(cmd.clone());
    // Written by hand: clap_mangen leaves an empty date unquoted, which
    // shifts the source and manual into the wrong fields. No date, so that
    // the pages change only when their content does.
    Roff::new().to_writer(w)?;
    writeln!(
        w,
        ".TH {} 1 \"\" \"nogap {}\" \"User Commands\"",
        name.to_uppercase(),
        env!("CARGO_PKG_VERSION")
    )?;
    man.render_name_section(w)?;
    man.render_synopsis_section(w)?;
    man.render_description_section(w)?;
    let mut roff = Roff::new();
    render_blocks(&mut roff, &description(name));
    roff.to_writer(w)?;
    if cmd.get_arguments().any(|a| !a.is_hide_set()) {
        man.render_options_section(w)?;
    }
    if cmd.has_subcommands() {
        man.render_subcommands_section(w)?;
    }
    // clap's after_help (a summary, for --help) is left out: the sections
    // below say it in full.
    for section in extra(name, pages) {
        let mut roff = Roff::new();
        roff.control("SH", [section.title]);
        render_blocks(&mut roff, &section.blocks);
        roff.to_writer(w)?;
    }
    if cmd.get_version().is_some() {
        man.render_version_section(w)?;
    }
    Ok(())
}
