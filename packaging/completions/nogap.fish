# Print an optspec for argparse to handle cmd's options that are independent of any subcommand.
function __fish_nogap_global_optspecs
    string join \n h/help V/version
end

function __fish_nogap_needs_command
    # Figure out if the current invocation already has a command.
    set -l cmd (commandline -opc)
    set -e cmd[1]
    argparse -s (__fish_nogap_global_optspecs) -- $cmd 2>/dev/null
    or return
    if set -q argv[1]
        # Also print the command, so this can be used to figure out what it is.
        echo $argv[1]
        return 1
    end
    return 0
end

function __fish_nogap_using_subcommand
    set -l cmd (__fish_nogap_needs_command)
    test -z "$cmd"
    and return 1
    contains -- $cmd[1] $argv
end

complete -c nogap -n "__fish_nogap_needs_command" -s h -l help -d 'Print help'
complete -c nogap -n "__fish_nogap_needs_command" -s V -l version -d 'Print version'
complete -c nogap -n "__fish_nogap_needs_command" -f -a "run" -d 'Supervise COMMAND: hold the sockets, run workers, reload on SIGHUP'
complete -c nogap -n "__fish_nogap_needs_command" -f -a "reload" -d 'Ask a running nogap to reload (start a new generation)'
complete -c nogap -n "__fish_nogap_needs_command" -f -a "status" -d 'Show generation, workers, sockets and the last reload'
complete -c nogap -n "__fish_nogap_needs_command" -f -a "upgrade" -d 'Re-execute the nogap binary in place (same pid, same workers, same sockets)'
complete -c nogap -n "__fish_nogap_needs_command" -f -a "upgrade-probe" -d 'Print the state format versions this binary can take over (used by a running nogap before it upgrades to this binary)'
complete -c nogap -n "__fish_nogap_needs_command" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c nogap -n "__fish_nogap_using_subcommand run" -s l -l listen -d 'Listen on ADDR: HOST:PORT, tcp://HOST:PORT, [::]:PORT, udp://HOST:PORT or unix:/path[?mode=0660&owner=USER:GROUP]. NAME is what workers see in LISTEN_FDNAMES (default derived from ADDR, e.g. tcp-127.0.0.1-8080). Repeatable. Sockets passed to nogap by systemd (LISTEN_FDS) are used too, with their names' -r
complete -c nogap -n "__fish_nogap_using_subcommand run" -l backlog -d 'Listen backlog [default: net.core.somaxconn]' -r
complete -c nogap -n "__fish_nogap_using_subcommand run" -l handover -d 'How a reload hands TCP sockets over: \'steer\' gives each generation its own SO_REUSEPORT socket on the address and steers new connections to the serving one, so an old generation gets its stop signal only once its queue is empty; \'shared\' lets every generation accept from one socket. Sockets that cannot be steered (UDP, unix, inherited without SO_REUSEPORT) are shared either way, and so are all with --reuseport or --reuseport-per-worker' -r
complete -c nogap -n "__fish_nogap_using_subcommand run" -s w -l workers -d 'Workers per generation' -r
complete -c nogap -n "__fish_nogap_using_subcommand run" -l ready -d 'When a new worker is ready: \'notify\' (it sends READY=1 on NOTIFY_SOCKET) or \'alive:DURATION\' (it stayed alive that long, or sent READY=1 earlier). Add a probe to check a new generation before any client reaches it: \'notify+http:PATH\' (after READY=1 nogap sends GET PATH through the generation\'s own socket and needs a 2xx answer), \'+tcp\' (a connection it accepts); alone, \'http:PATH\' or \'tcp\' probe from the start until one passes. Probes need the steered hand-over' -r
complete -c nogap -n "__fish_nogap_using_subcommand run" -l start-timeout -d 'A new worker that is not ready by then has failed' -r
complete -c nogap -n "__fish_nogap_using_subcommand run" -l canary -d 'Progressive hand-over: once a reload\'s new generation is ready (after its probe, if any), send it only PCT% of new connections for DURATION (e.g. 10%:30s; PCT from 1 to 99), the rest to the serving one, and watch it. A worker of it that exits or turns unhealthy, or (with a probe in --ready) a probe repeated every second that fails, rolls back: every new connection goes to the serving generation again, the new one is stopped once its queue is empty, and the reload fails (\'canary failed: ...\'). Needs the steered hand-over. Read from the new configuration at each reload. [default: off]' -r
complete -c nogap -n "__fish_nogap_using_subcommand run" -l start-limit -d 'Give up, and exit with status 6, once a worker of the first generation failed to start N times within --start-limit-interval (exited, could not be run, or missed --start-timeout): a command that can never start is not retried forever. Only before the first generation serves; 0 retries forever' -r
complete -c nogap -n "__fish_nogap_using_subcommand run" -l start-limit-interval -d 'The window of --start-limit' -r
complete -c nogap -n "__fish_nogap_using_subcommand run" -l stop-signal -d 'Signal that asks a worker to drain and exit' -r
complete -c nogap -n "__fish_nogap_using_subcommand run" -l drain-timeout -d 'After the stop signal, SIGKILL the worker\'s process group after this long. Also how long the workers of a nogap that died (found at start) may drain' -r
complete -c nogap -n "__fish_nogap_using_subcommand run" -l control -d 'Control socket for `nogap reload` and `nogap status` [default: $RUNTIME_DIRECTORY/control.sock, else /run/nogap/control.sock]' -r -F
complete -c nogap -n "__fish_nogap_using_subcommand run" -l metrics -d 'Serve Prometheus metrics (GET /metrics) and probes (GET /healthz: 200 while healthy, 503 with the reason when UNHEALTHY; GET /readyz: 200 once a generation serves) over HTTP on ADDR, e.g. 127.0.0.1:9464. Off by default' -r
complete -c nogap -n "__fish_nogap_using_subcommand run" -l config -d 'Read options from FILE (TOML): each key is the long name of an option above, e.g. `workers = 4`, `listen = ["http=0.0.0.0:80"]`, `env = { KEY = "v" }`, plus `command = ["/usr/bin/server", "--flag"]`. Options given on the command line win over the file\'s. Every reload reads the file again' -r -F
complete -c nogap -n "__fish_nogap_using_subcommand run" -l health-interval -d 'How often nogap samples each TCP socket\'s accept queue' -r
complete -c nogap -n "__fish_nogap_using_subcommand run" -l stall-timeout -d 'A queue nobody accepts from is stalled after 150 ms when no worker is in a request (a dead accept loop: a replacement starts on the same socket, then the stalled worker drains), or after this long while a worker is busy in a request (pinned, not dead: an extra worker starts and nobody is stopped). 0 = off' -r
complete -c nogap -n "__fish_nogap_using_subcommand run" -l worker-watchdog -d 'Workers must send WATCHDOG=1 at least this often (they get WATCHDOG_USEC); a silent worker is replaced. Off by default' -r
complete -c nogap -n "__fish_nogap_using_subcommand run" -l fd-high -d 'Replace a worker whose open descriptors reach PCT% of its RLIMIT_NOFILE soft limit, before accept fails with EMFILE. 0 = off' -r
complete -c nogap -n "__fish_nogap_using_subcommand run" -l max-replacements -d 'At most N health replacements per minute; past that nogap reports itself unhealthy (logs, STATUS=) instead of replacing more' -r
complete -c nogap -n "__fish_nogap_using_subcommand run" -l fds-as -d 'Also pass the sockets the way another family of servers expects (repeatable or comma-separated). LISTEN_FDS, LISTEN_FDNAMES and LISTEN_PID are set too, unless COMMAND or ARGS pass an fd by template (then only with --fds-as systemd): gunicorn, for one, would take the socket twice.' -r
complete -c nogap -n "__fish_nogap_using_subcommand run" -l user -d 'Run workers as USER (name or uid), with its primary group and its supplementary groups, and USER, LOGNAME, HOME set. nogap binds the sockets first, so a worker can serve a privileged port unprivileged' -r
complete -c nogap -n "__fish_nogap_using_subcommand run" -l group -d 'Run workers with this primary group (name or gid) [default: USER\'s group]' -r
complete -c nogap -n "__fish_nogap_using_subcommand run" -l chdir -d 'Working directory of the workers' -r -F
complete -c nogap -n "__fish_nogap_using_subcommand run" -l env -d 'Set a variable for the workers (repeatable); the value may use templates' -r
complete -c nogap -n "__fish_nogap_using_subcommand run" -l nofile -d 'RLIMIT_NOFILE of the workers, soft and hard (like systemd\'s LimitNOFILE=N) [default: nogap\'s hard limit, so the soft limit is raised to it]' -r
complete -c nogap -n "__fish_nogap_using_subcommand run" -l umask -d 'File mode creation mask of the workers, in octal (e.g. 027)' -r
complete -c nogap -n "__fish_nogap_using_subcommand run" -l worker-output -d 'Where workers\' stdout and stderr go: \'capture\' reads them line by line and writes each with the worker\'s name: to the journal with WORKER, GENERATION and WORKER_PID fields (and <N> priority prefixes honoured) when nogap\'s stderr is the journal, else to nogap\'s stderr as \'[gen 3 worker 1 pid 1234] line\'; \'inherit\' lets workers write to nogap\'s stdout and stderr; \'auto\' captures under journald and inherits otherwise' -r
complete -c nogap -n "__fish_nogap_using_subcommand run" -l pidfile -d 'The server daemonizes (forks and its first process exits 0): follow the process whose pid it writes to PATH, a direct or adopted child of nogap, as the worker. PATH may use {worker} and {generation}; with --workers > 1 it must contain {worker}. nogap removes PATH before each start' -r
complete -c nogap -n "__fish_nogap_using_subcommand run" -l reuseport -d 'Set SO_REUSEPORT on the sockets nogap binds, and let other sockets (of the same user) listen on their addresses too'
complete -c nogap -n "__fish_nogap_using_subcommand run" -l check -d 'Check the configuration (and that its sockets can be bound) and exit without starting anything'
complete -c nogap -n "__fish_nogap_using_subcommand run" -l watchdog-follows-health -d 'Stop pinging systemd\'s watchdog (WatchdogSec=) while unhealthy, so that systemd restarts nogap; the socket unit or the fd store keeps the port'
complete -c nogap -n "__fish_nogap_using_subcommand run" -l reuseport-per-worker -d 'Give every worker slot its own SO_REUSEPORT copy of each TCP socket nogap binds (implies --reuseport), so that a stalled queue names its worker. A replacement or a new generation\'s worker takes over its slot\'s copy, with the connections waiting in it'
complete -c nogap -n "__fish_nogap_using_subcommand run" -l fd-store -d 'Hand the sockets nogap binds to systemd\'s fd store (FDSTORE=1, FDNAME=) and take them back by name on start, so a restart of nogap keeps the port open. Needs FileDescriptorStoreMax= in the unit'
complete -c nogap -n "__fish_nogap_using_subcommand run" -l env-clear -d 'Start workers with an empty environment: only nogap\'s variables, the --fds-as ones, --user\'s and --env\'s'
complete -c nogap -n "__fish_nogap_using_subcommand run" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c nogap -n "__fish_nogap_using_subcommand reload" -l control -d 'Control socket of the nogap to talk to' -r -F
complete -c nogap -n "__fish_nogap_using_subcommand reload" -l timeout -d 'Give up waiting after this long (exit 1)' -r
complete -c nogap -n "__fish_nogap_using_subcommand reload" -l wait -d 'Wait until the new generation serves; exit 1 with the reason if it failed'
complete -c nogap -n "__fish_nogap_using_subcommand reload" -s h -l help -d 'Print help'
complete -c nogap -n "__fish_nogap_using_subcommand status" -l control -d 'Control socket of the nogap to talk to' -r -F
complete -c nogap -n "__fish_nogap_using_subcommand status" -l json -d 'Print JSON instead of text'
complete -c nogap -n "__fish_nogap_using_subcommand status" -s h -l help -d 'Print help'
complete -c nogap -n "__fish_nogap_using_subcommand upgrade" -l control -d 'Control socket of the nogap to talk to' -r -F
complete -c nogap -n "__fish_nogap_using_subcommand upgrade" -l timeout -d 'Give up waiting after this long (exit 1)' -r
complete -c nogap -n "__fish_nogap_using_subcommand upgrade" -l wait -d 'Wait until the new binary runs; exit 1 with the reason if it was refused'
complete -c nogap -n "__fish_nogap_using_subcommand upgrade" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c nogap -n "__fish_nogap_using_subcommand upgrade-probe" -s h -l help -d 'Print help'
complete -c nogap -n "__fish_nogap_using_subcommand help; and not __fish_seen_subcommand_from run reload status upgrade upgrade-probe help" -f -a "run" -d 'Supervise COMMAND: hold the sockets, run workers, reload on SIGHUP'
complete -c nogap -n "__fish_nogap_using_subcommand help; and not __fish_seen_subcommand_from run reload status upgrade upgrade-probe help" -f -a "reload" -d 'Ask a running nogap to reload (start a new generation)'
complete -c nogap -n "__fish_nogap_using_subcommand help; and not __fish_seen_subcommand_from run reload status upgrade upgrade-probe help" -f -a "status" -d 'Show generation, workers, sockets and the last reload'
complete -c nogap -n "__fish_nogap_using_subcommand help; and not __fish_seen_subcommand_from run reload status upgrade upgrade-probe help" -f -a "upgrade" -d 'Re-execute the nogap binary in place (same pid, same workers, same sockets)'
complete -c nogap -n "__fish_nogap_using_subcommand help; and not __fish_seen_subcommand_from run reload status upgrade upgrade-probe help" -f -a "upgrade-probe" -d 'Print the state format versions this binary can take over (used by a running nogap before it upgrades to this binary)'
complete -c nogap -n "__fish_nogap_using_subcommand help; and not __fish_seen_subcommand_from run reload status upgrade upgrade-probe help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
