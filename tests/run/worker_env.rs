//! What a worker inherits: exactly the sockets at fd 3.., the socket
//! protocol variables addressed to itself, a clean signal state, its own
//! process group, and nogap's environment minus nogap's own protocol
//! variables. Checked with `nogap-demo --report`.

use std::collections::BTreeSet;
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::CommandExt;
use std::path::Path;

use serde_json::Value;

use crate::common::{demo_bin, free_port, must, nogap_command, read_json, Nogap, LONG};
use crate::util::{reload, scratch};

/// Waits for the report of every worker of `gen` (written to
/// `DIR/r-<pid>.json`) and returns them in slot order.
fn reports(nogap: &Nogap, dir: &Path, gen: u32, n: usize) -> Vec<Value> {
    let pids = nogap.wait_workers(gen, n, LONG);
    let mut out: Vec<Value> = pids
        .iter()
        .map(|pid| {
            let path = dir.join(format!("r-{pid}.json"));
            must(LONG, &format!("report {} written", path.display()), || {
                path.exists()
            });
            let r = read_json(&path);
            assert_eq!(r["pid"], *pid, "report of another process in {path:?}");
            r
        })
        .collect();
    out.sort_by_key(|r| r["env"]["NOGAP_WORKER"].as_str().unwrap_or("").to_string());
    out
}

fn env<'a>(r: &'a Value, var: &str) -> Option<&'a str> {
    r["env"]["all"][var].as_str()
}

fn fd_numbers(r: &Value) -> Vec<i64> {
    r["fds"]
        .as_array()
        .expect("fds")
        .iter()
        .map(|f| f["fd"].as_i64().unwrap())
        .collect()
}

fn fd(r: &Value, n: i64) -> &Value {
    r["fds"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["fd"] == n)
        .unwrap_or_else(|| panic!("no fd {n} in {}", r["fds"]))
}

fn hex_mask(r: &Value, key: &str) -> u64 {
    let s = r[key].as_str().unwrap_or_else(|| panic!("no {key}"));
    u64::from_str_radix(s, 16).unwrap_or_else(|_| panic!("bad {key} {s:?}"))
}

fn report_arg(dir: &Path) -> String {
    dir.join("r-{pid}.json").display().to_string()
}

#[test]
fn worker_gets_exactly_the_sockets_at_fd_3_and_matching_listen_variables() {
    let dir = scratch();
    let (p1, p2, p3) = (free_port(), free_port(), free_port());
    let sock = dir.path().join("web.sock");
    let tcp4 = format!("web=127.0.0.1:{p1}");
    let tcp6 = format!("api=[::1]:{p2}");
    let udp = format!("dns=udp://127.0.0.1:{p3}");
    let unix = format!("unix:{}", sock.display());
    let report = report_arg(dir.path());
    let args = [
        "-l",
        &tcp4,
        "-l",
        &tcp6,
        "-l",
        &udp,
        "-l",
        &unix,
        "-w",
        "2",
        "--ready",
        "notify",
        "--",
        demo_bin(),
        "--report",
        &report,
    ];
    let nogap = Nogap::run(dir.path(), &args);
    nogap.wait_for_log("generation ready generation=1", LONG);
    let gen1 = reports(&nogap, dir.path(), 1, 2);

    let expected_sockets = [
        ("stream", "inet", true, format!("127.0.0.1:{p1}")),
        ("stream", "inet6", true, format!("[::1]:{p2}")),
        ("dgram", "inet", false, format!("127.0.0.1:{p3}")),
        ("stream", "unix", true, sock.display().to_string()),
    ];
    let mut default_name = String::new();
    for (slot, r) in gen1.iter().enumerate() {
        let pid = r["pid"].as_i64().unwrap();
        assert_eq!(
            fd_numbers(r),
            [0, 1, 2, 3, 4, 5, 6],
            "fd table of {pid}: {}",
            r["fds"]
        );
        assert_eq!(env(r, "LISTEN_PID"), Some(pid.to_string().as_str()));
        assert_eq!(env(r, "LISTEN_FDS"), Some("4"));
        let names: Vec<&str> = env(r, "LISTEN_FDNAMES")
            .expect("LISTEN_FDNAMES")
            .split(':')
            .collect();
        assert_eq!(names.len(), 4, "LISTEN_FDNAMES {names:?}");
        assert_eq!(names[..3], ["web", "api", "dns"]);
        assert!(!names[3].is_empty(), "a default name for the unix socket");
        if slot == 0 {
            default_name = names[3].to_string();
        }
        assert_eq!(
            names[3], default_name,
            "default name differs between workers"
        );
        for (i, (ty, family, listening, local)) in expected_sockets.iter().enumerate() {
            let f = fd(r, 3 + i as i64);
            let s = &f["socket"];
            assert_eq!(s["type"], *ty, "fd {}: {f}", 3 + i);
            assert_eq!(s["family"], *family, "fd {}: {f}", 3 + i);
            assert_eq!(s["listening"], *listening, "fd {}: {f}", 3 + i);
            assert_eq!(s["local"], *local, "fd {}: {f}", 3 + i);
        }
        assert_eq!(env(r, "NOGAP_GENERATION"), Some("1"));
        assert_eq!(env(r, "NOGAP_WORKER"), Some(slot.to_string().as_str()));
        assert!(env(r, "NOTIFY_SOCKET").is_some_and(|s| !s.is_empty()));
        assert_eq!(r["pgid"], r["pid"], "worker leads its own process group");
        assert_ne!(r["pgid"].as_i64(), Some(nogap.pid() as i64));
        assert_eq!(r["ppid"].as_i64(), Some(nogap.pid() as i64));
    }
    let notify: BTreeSet<&str> = gen1
        .iter()
        .filter_map(|r| env(r, "NOTIFY_SOCKET"))
        .collect();
    assert_eq!(notify.len(), 2, "one notify socket per worker: {notify:?}");

    // The next generation gets the same names and fd layout. Its TCP
    // sockets are its own (steered hand-over: same address, another socket
    // of the reuseport group); UDP and unix sockets are the very same. Once
    // generation 1 is gone its socket is closed (nogap bound it: nothing
    // outlives nogap), and generation 3 gets a socket of its own again.
    reload(&nogap, 2);
    let gen2 = reports(&nogap, dir.path(), 2, 2);
    for p in nogap.started_pids(Some(1)) {
        crate::common::must(LONG, "generation 1 exits", || {
            !crate::common::process_exists(p)
        });
    }
    reload(&nogap, 3);
    let gen3 = reports(&nogap, dir.path(), 3, 2);
    for ((a, b), c) in gen1.iter().zip(&gen2).zip(&gen3) {
        assert_eq!(env(b, "NOGAP_GENERATION"), Some("2"));
        assert_eq!(env(a, "LISTEN_FDNAMES"), env(b, "LISTEN_FDNAMES"));
        for n in 3..=6 {
            let steered = n <= 4;
            assert_eq!(fd(a, n)["socket"], fd(b, n)["socket"], "fd {n}");
            assert_eq!(
                fd(a, n)["target"] != fd(b, n)["target"],
                steered,
                "fd {n}: generation 2's socket (steered: {steered})"
            );
            assert_eq!(
                fd(b, n)["target"] != fd(c, n)["target"],
                steered,
                "fd {n} of generation 3 (steered: {steered})"
            );
            if !steered {
                assert_eq!(fd(a, n)["target"], fd(c, n)["target"], "fd {n}");
            }
        }
        assert_eq!(fd_numbers(b), [0, 1, 2, 3, 4, 5, 6]);
    }
}

#[test]
fn worker_env_is_nogaps_minus_nogaps_own_protocol_variables() {
    let dir = scratch();
    let port = free_port();
    let upstream = dir.path().join("upstream-notify.sock");
    // Plays systemd's notify socket, so nogap may talk to it.
    let _systemd = UnixDatagram::bind(&upstream).unwrap();
    let listen = format!("web=127.0.0.1:{port}");
    let report = report_arg(dir.path());
    let mut cmd = nogap_command(dir.path());
    cmd.args([
        "-l",
        &listen,
        "--ready",
        "notify",
        "--",
        demo_bin(),
        "--report",
        &report,
    ])
    .env("NOTIFY_SOCKET", &upstream)
    .env("WATCHDOG_USEC", "600000000")
    .env("WATCHDOG_PID", "1")
    .env("NOGAP_TEST_MARKER", "kept value");
    let nogap = Nogap::spawn("nogap", cmd);
    nogap.wait_for_log("generation ready generation=1", LONG);
    let r = &reports(&nogap, dir.path(), 1, 1)[0];
    let pid = r["pid"].as_i64().unwrap().to_string();
    assert_eq!(env(r, "NOGAP_TEST_MARKER"), Some("kept value"));
    assert_eq!(env(r, "LISTEN_FDS"), Some("1"));
    assert_eq!(env(r, "LISTEN_PID"), Some(pid.as_str()));
    assert_eq!(env(r, "LISTEN_FDNAMES"), Some("web"));
    assert_ne!(
        env(r, "NOTIFY_SOCKET"),
        Some(upstream.to_str().unwrap()),
        "worker got nogap's own NOTIFY_SOCKET"
    );
    assert!(env(r, "NOTIFY_SOCKET").is_some());
    assert_eq!(env(r, "WATCHDOG_USEC"), None);
    assert_eq!(env(r, "WATCHDOG_PID"), None);
    assert_eq!(env(r, "PATH"), std::env::var("PATH").ok().as_deref());
    assert_eq!(fd_numbers(r), [0, 1, 2, 3]);
}

#[test]
fn listen_variables_addressed_to_another_process_are_ignored_and_not_passed_on() {
    // As when nogap is started by a socket-activated process that did not
    // unset its own LISTEN_* variables.
    let dir = scratch();
    let port = free_port();
    let listen = format!("web=127.0.0.1:{port}");
    let report = report_arg(dir.path());
    let mut cmd = nogap_command(dir.path());
    cmd.args([
        "-l",
        &listen,
        "--ready",
        "notify",
        "--",
        demo_bin(),
        "--report",
        &report,
    ])
    .env("LISTEN_FDS", "2")
    .env("LISTEN_PID", "1")
    .env("LISTEN_FDNAMES", "stale:names");
    let nogap = Nogap::spawn("nogap", cmd);
    nogap.wait_for_log("generation ready generation=1", LONG);
    let r = &reports(&nogap, dir.path(), 1, 1)[0];
    let pid = r["pid"].as_i64().unwrap().to_string();
    assert_eq!(env(r, "LISTEN_FDS"), Some("1"));
    assert_eq!(env(r, "LISTEN_PID"), Some(pid.as_str()));
    assert_eq!(env(r, "LISTEN_FDNAMES"), Some("web"));
    assert_eq!(fd_numbers(r), [0, 1, 2, 3]);
}

/// Signal numbers whose bit is set in a /proc mask.
fn signals_in(mask: u64) -> Vec<u32> {
    (0..64)
        .filter(|b| mask & (1 << b) != 0)
        .map(|b| b + 1)
        .collect()
}

#[test]
fn worker_signal_state_is_default_even_when_nogaps_is_not() {
    let dir = scratch();
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let report = report_arg(dir.path());
    let mut cmd = nogap_command(dir.path());
    cmd.args([
        "-l",
        &listen,
        "--ready",
        "notify",
        "--",
        demo_bin(),
        "--report",
        &report,
    ]);
    // SAFETY: only async-signal-safe calls (sigemptyset, sigaddset,
    // sigprocmask, signal, the rt_sigaction syscall) between fork and exec,
    // on stack memory, no allocation. (A test plays nogap's parent here;
    // the crate's unsafe_code lint is for nogap itself.)
    #[allow(unsafe_code)]
    unsafe {
        cmd.pre_exec(|| {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGUSR2);
            libc::sigaddset(&mut set, libc::SIGWINCH);
            libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
            libc::signal(libc::SIGUSR1, libc::SIG_IGN);
            libc::signal(libc::SIGALRM, libc::SIG_IGN);
            // 32 and 33 as glibc's posix_spawn leaves them (Rust's Command
            // uses it): SIG_IGN. glibc's sigaction() refuses them, hence the
            // kernel's struct sigaction (handler, flags, restorer, mask).
            let ignore: [usize; 4] = [libc::SIG_IGN, 0, 0, 0];
            for sig in [32, 33] {
                libc::syscall(
                    libc::SYS_rt_sigaction,
                    sig,
                    ignore.as_ptr(),
                    std::ptr::null_mut::<usize>(),
                    8,
                );
            }
            Ok(())
        });
    }
    let nogap = Nogap::spawn("nogap", cmd);
    nogap.wait_for_log("generation ready generation=1", LONG);
    let r = &reports(&nogap, dir.path(), 1, 1)[0];
    let blocked = signals_in(hex_mask(r, "sig_blocked"));
    let ignored = signals_in(hex_mask(r, "sig_ignored"));
    assert!(
        blocked.is_empty(),
        "worker has signals blocked: {blocked:?}"
    );
    // A supervisor must reset 32 and 33 too, with the raw syscall.
    assert!(
        ignored.is_empty(),
        "worker has signals ignored: {ignored:?}"
    );
}

#[test]
fn worker_does_not_inherit_stray_fds_of_nogap() {
    let dir = scratch();
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let report = report_arg(dir.path());
    let devnull = std::fs::File::open("/dev/null").unwrap();
    let raw = std::os::fd::AsRawFd::as_raw_fd(&devnull);
    let mut cmd = nogap_command(dir.path());
    cmd.args([
        "-l",
        &listen,
        "--ready",
        "notify",
        "--",
        demo_bin(),
        "--report",
        &report,
    ]);
    // SAFETY: dup2 is async-signal-safe; the new fds are not close-on-exec,
    // as if nogap's parent leaked them.
    #[allow(unsafe_code)]
    unsafe {
        cmd.pre_exec(move || {
            libc::dup2(raw, 9);
            libc::dup2(raw, 40);
            Ok(())
        });
    }
    let nogap = Nogap::spawn("nogap", cmd);
    nogap.wait_for_log("generation ready generation=1", LONG);
    let r = &reports(&nogap, dir.path(), 1, 1)[0];
    assert_eq!(fd_numbers(r), [0, 1, 2, 3], "fd table: {}", r["fds"]);
    drop(devnull);
}
