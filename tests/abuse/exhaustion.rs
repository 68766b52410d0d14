//! Exhaustion: descriptors, abandoned clients, a full log pipe, an unsafe
//! runtime directory, limits nogap cannot give.

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::{demo_bin, free_addr, must, nogap_bin, nogap_command, Nogap, LONG};
use crate::fixture::{scratch, start, status};
use crate::support::{cpu, fds, reload_wait, slow_second_generation};

/// Defect 4: under a descriptor limit, idle control connections made the
/// accept loop spin at EMFILE (3.3 s of CPU in 5 s). Now it backs off, and
/// once the idle clients are gone, status answers.
#[test]
fn idle_control_connections_at_emfile_do_not_spin() {
    let dir = scratch();
    let addr = free_addr();
    let mut cmd = Command::new("prlimit");
    cmd.args(["--nofile=40:40", nogap_bin(), "run"])
        .env("RUNTIME_DIRECTORY", dir.path())
        .arg("-l")
        .arg(format!("web={addr}"))
        .args(["--ready", "notify", "--", demo_bin()]);
    let nogap = Nogap::spawn("nogap", cmd);
    nogap.wait_for_log("generation ready generation=1", LONG);
    let control = dir.path().join("control.sock");
    let idle: Vec<UnixStream> = (0..300)
        .filter_map(|_| UnixStream::connect(&control).ok())
        .collect();
    assert!(idle.len() >= 100, "{} idle connections", idle.len());
    let (c0, t0) = (cpu(nogap.pid()), Instant::now());
    must(LONG, "5 s pass", || t0.elapsed() >= Duration::from_secs(5));
    let used = cpu(nogap.pid()) - c0;
    println!(
        "CPU {used:?} in {:?} with {} idle control connections at nofile 40",
        t0.elapsed(),
        idle.len()
    );
    assert!(
        used < Duration::from_millis(1500),
        "nogap burned {used:?} of CPU in 5 s"
    );
    drop(idle);
    must(LONG, "status answers once the idle clients left", || {
        Command::new(nogap_bin())
            .args(["status", "--control"])
            .arg(&control)
            .output()
            .is_ok_and(|o| o.status.success())
    });
    assert!(fds(nogap.pid()) <= 40);
}

/// Defect 5: each abandoned `reload --wait` kept a descriptor, unbounded.
/// Now a waiter whose client left is dropped, and waiters are capped.
#[test]
fn abandoned_reload_waits_keep_nothing() {
    let dir = scratch();
    let addr = free_addr();
    // Generation 2 never becomes ready within the test: the waits stay open.
    let script = slow_second_generation(dir.path());
    let nogap = start(dir.path(), addr, &[], &[script.to_str().unwrap()], &[]);
    let fd0 = fds(nogap.pid());
    let control = dir.path().join("control.sock");
    for _ in 0..200 {
        let mut c = UnixStream::connect(&control).unwrap();
        c.write_all(b"{\"version\":1,\"command\":\"reload\",\"wait\":true}\n")
            .unwrap();
        // and go away
    }
    // Connections are accepted in order: once status answers, nogap has
    // taken every abandoned one (those beyond the connection cap were
    // closed unanswered, as a status asked in the burst may be).
    must(LONG, "status answers after the burst", || {
        Command::new(nogap_bin())
            .args(["status", "--control"])
            .arg(&control)
            .output()
            .is_ok_and(|o| o.status.success())
    });
    must(LONG, "nogap's fds back near where they were", || {
        fds(nogap.pid()) <= fd0 + 8
    });
    // More waiters than the cap, all kept open: the extra ones are answered.
    let mut open: Vec<UnixStream> = Vec::new();
    for _ in 0..40 {
        let mut c = UnixStream::connect(&control).unwrap();
        c.write_all(b"{\"version\":1,\"command\":\"reload\",\"wait\":true}\n")
            .unwrap();
        open.push(c);
    }
    let mut refused = 0;
    let mut answers = Vec::new();
    for c in &mut open {
        c.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let mut s = String::new();
        let r = c.read_to_string(&mut s);
        if s.contains("clients wait for a reload already") {
            refused += 1;
        }
        answers.push(format!("{:?} {s:?}", r.map_err(|e| e.kind())));
    }
    answers.dedup();
    println!(
        "fds {fd0} -> {} after 200 abandoned waits; {refused} of 40 open waits answered at once",
        fds(nogap.pid())
    );
    assert!(
        refused >= 8,
        "the waiters beyond 32 are answered: {refused}: {answers:?}"
    );
    assert_eq!(status(dir.path())["generation"], 1);
}

/// Clients that leave while they wait (`reload --wait`, `upgrade --wait`)
/// take along what nogap kept for them, at once: their connection, and the
/// copy of it kept for an upgrade to carry. (The copies used to stay until
/// the next `reload --wait` arrived: up to 32 descriptors.)
#[test]
fn waiting_clients_that_leave_take_their_descriptors_along() {
    let dir = scratch();
    let addr = free_addr();
    let script = slow_second_generation(dir.path());
    let nogap = start(dir.path(), addr, &[], &[script.to_str().unwrap()], &[]);
    let control = dir.path().join("control.sock");
    let ask = |command: &str| {
        let mut c = UnixStream::connect(&control).unwrap();
        let line = format!("{{\"version\":1,\"command\":\"{command}\",\"wait\":true}}\n");
        c.write_all(line.as_bytes()).unwrap();
        c
    };
    let mut waiting = vec![ask("reload")];
    nogap.wait_for_log("worker started generation=2", LONG);
    let base = fds(nogap.pid());
    // Each waiting client: its connection and the copy nogap keeps.
    waiting.extend((0..8).map(|_| ask("reload")));
    waiting.extend((0..8).map(|_| ask("upgrade")));
    must(LONG, "16 more clients wait", || {
        fds(nogap.pid()) >= base + 32
    });
    let most = fds(nogap.pid());
    drop(waiting);
    must(
        LONG,
        "nogap's fds below where the first client waited",
        || fds(nogap.pid()) <= base,
    );
    println!(
        "fds {base} -> {most} with 17 waiting clients -> {} once they left",
        fds(nogap.pid())
    );
    assert_eq!(status(dir.path())["generation"], 1);
}

/// Defect 8: with stderr a full pipe shared with a worker that floods it,
/// nogap's own log writes blocked its loop (reloads took 0.5-1.2 s, or
/// hung). Now they never block: reloads answer at their usual pace.
#[test]
fn a_full_log_pipe_never_blocks_the_loop() {
    let dir = scratch();
    let addr = free_addr();
    // A pipe nobody reads: nogap's stdout and stderr, and the first
    // worker's, which floods it. The other workers write elsewhere: a
    // worker that logs to a full pipe blocks itself, which is its own
    // business; nogap's loop must not.
    let (rd, wr) = nix::unistd::pipe().unwrap();
    let script = dir.path().join("flood.sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh
if [ \"$NOGAP_GENERATION\" = 1 ]; then exec '{0}' --abuse flood-stdout; fi
exec '{0}' >/dev/null 2>&1
",
            demo_bin()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let wr2 = wr.try_clone().unwrap();
    let mut child = nogap_command(dir.path())
        .arg("-l")
        .arg(format!("web={addr}"))
        // Generation 1's worker, blocked writing to the full pipe, never
        // finishes its graceful stop: killed at the drain timeout, it lets
        // the reload that waits at the generation bound start.
        .args(["--ready", "notify", "--drain-timeout", "1s", "--"])
        .arg(&script)
        .stdin(Stdio::null())
        .stdout(Stdio::from(wr))
        .stderr(Stdio::from(wr2))
        .spawn()
        .unwrap();
    let pid = child.id() as i32;
    let guard = scopeguard(pid);
    let control = dir.path().join("control.sock");
    must(LONG, "nogap answers on its control socket", || {
        control.exists()
            && Command::new(nogap_bin())
                .args(["status", "--control"])
                .arg(&control)
                .output()
                .is_ok_and(|o| o.status.success())
    });
    let mut worst = Duration::ZERO;
    for _ in 0..5 {
        let (took, ok, text) = reload_wait(dir.path(), Duration::from_secs(20));
        assert!(ok, "reload failed after {took:?}: {text}");
        worst = worst.max(took);
    }
    println!("5 reloads with a full log pipe: slowest {worst:?}");
    assert!(worst < Duration::from_secs(3), "slowest reload {worst:?}");
    drop(guard);
    let _ = child.wait();
    drop(rd);
}

/// Kills `pid` (SIGTERM, then its workers die with it) when dropped.
fn scopeguard(pid: i32) -> impl Drop {
    struct G(i32);
    impl Drop for G {
        fn drop(&mut self) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(self.0),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
    G(pid)
}

/// Defect 3: the /tmp/nogap-UID fallback someone else made first is refused
/// with one line and exit code 7, before any worker starts.
#[test]
fn a_runtime_directory_made_by_someone_else_is_refused() {
    let dir = scratch();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let planted = dir.path().join("nogap-65534");
    std::fs::create_dir(&planted).unwrap();
    std::fs::set_permissions(&planted, std::fs::Permissions::from_mode(0o777)).unwrap();
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            nogap_bin(),
            "run",
        ])
        .arg("-l")
        .arg(format!("web={}", free_addr()))
        .args(["--", demo_bin()])
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("TMPDIR", dir.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(7), "{err}");
    let last = err.lines().last().unwrap_or_default();
    // Made by root, mode 0777: someone else's.
    assert!(
        last.contains("refusing runtime directory") && last.contains("owned by uid 0"),
        "{err}"
    );
    assert!(!err.contains("worker started"), "{err}");
}

/// `--nofile` above a hard limit nogap cannot raise (root without
/// CAP_SYS_RESOURCE) is refused at start, not a crash loop of workers.
#[test]
fn nofile_above_what_nogap_can_raise_is_refused() {
    let out = Command::new("prlimit")
        .args([
            "--nofile=1024:1024",
            "setpriv",
            "--bounding-set",
            "-sys_resource",
            nogap_bin(),
            "run",
            "--check",
            "--nofile",
            "4096",
        ])
        .arg("-l")
        .arg(format!("web={}", free_addr()))
        .args(["--", demo_bin()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("--nofile 4096") && err.contains("CAP_SYS_RESOURCE"),
        "{err}"
    );
}

/// A pids limit (a cgroup v1 `pids.max` made for the test) at what nogap
/// has: the reload's fork fails, the reload fails cleanly, the old
/// generation keeps serving; with room again, the next reload works.
#[test]
fn a_pids_limit_fails_a_reload_cleanly() {
    let root = std::path::Path::new("/sys/fs/cgroup/pids");
    if !root.join("cgroup.procs").exists() {
        println!("skipped: no cgroup v1 pids hierarchy at {}", root.display());
        return;
    }
    let cg = root.join(format!("nogap-abuse-{}", std::process::id()));
    std::fs::create_dir_all(&cg).unwrap();
    struct Remove(std::path::PathBuf);
    impl Drop for Remove {
        fn drop(&mut self) {
            let procs = self.0.join("cgroup.procs");
            let parent = self.0.parent().unwrap().join("cgroup.procs");
            for p in std::fs::read_to_string(&procs).unwrap_or_default().lines() {
                let _ = std::fs::write(&parent, p);
            }
            let _ = std::fs::remove_dir(&self.0);
        }
    }
    let _remove = Remove(cg.clone());
    let dir = scratch();
    let addr = free_addr();
    let nogap = start(dir.path(), addr, &[], &[demo_bin()], &[]);
    std::fs::write(cg.join("cgroup.procs"), nogap.pid().to_string()).unwrap();
    let current: u64 = std::fs::read_to_string(cg.join("pids.current"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    std::fs::write(cg.join("pids.max"), current.to_string()).unwrap();
    let (ka, nc) = crate::fixture::loads(addr, 2);
    let (took, ok, text) = reload_wait(dir.path(), LONG);
    println!(
        "reload at pids.max={current}: ok={ok} after {took:?}: {}",
        text.trim()
    );
    assert!(!ok, "the reload cannot fork: {text}");
    assert_eq!(status(dir.path())["generation"], 1);
    std::fs::write(cg.join("pids.max"), "max").unwrap();
    let (took, ok, text) = reload_wait(dir.path(), LONG);
    assert!(
        ok,
        "with room again the reload works (after {took:?}): {text}"
    );
    assert!(nc.wait_for_more_ok(100, LONG));
    let (ka, nc) = (ka.stop(), nc.stop());
    crate::support::print("keep-alive", &ka);
    crate::support::print("new-connection", &nc);
    assert_eq!(
        ka.failed() + nc.failed(),
        0,
        "{:?} {:?}",
        ka.failures,
        nc.failures
    );
    drop(nogap);
}

/// A 10 MB control request line, and a client that sends half a line and
/// waits: each gets an error answer, nogap keeps serving and keeps nothing.
#[test]
fn oversized_and_idle_control_requests_are_answered_and_forgotten() {
    let dir = scratch();
    let addr = free_addr();
    let nogap = start(dir.path(), addr, &[], &[demo_bin()], &[]);
    let control = dir.path().join("control.sock");
    let fd0 = fds(nogap.pid());
    let mut big = UnixStream::connect(&control).unwrap();
    big.set_read_timeout(Some(LONG)).unwrap();
    let mut writer = big.try_clone().unwrap();
    let sent = std::thread::spawn(move || {
        let chunk = vec![b'x'; 1 << 20];
        (0..10)
            .take_while(|_| writer.write_all(&chunk).is_ok())
            .count()
    });
    let mut answer = String::new();
    let _ = big.read_to_string(&mut answer);
    println!(
        "10 MB line: {} MB written before nogap closed; answer {answer:?}",
        sent.join().unwrap()
    );
    assert!(answer.contains("\"ok\":false"), "{answer}");
    let mut idle = UnixStream::connect(&control).unwrap();
    idle.write_all(b"{\"version\":1,").unwrap();
    idle.set_read_timeout(Some(LONG)).unwrap();
    let t = Instant::now();
    let mut answer = String::new();
    let _ = idle.read_to_string(&mut answer);
    println!("half a line: answered after {:?}: {answer:?}", t.elapsed());
    assert!(answer.contains("timed out"), "{answer}");
    assert_eq!(status(dir.path())["generation"], 1);
    must(LONG, "nogap's fds where they were", || {
        fds(nogap.pid()) <= fd0 + 2
    });
}
