//! What nogap shows: the metrics and probe endpoints (`--metrics`), scraped
//! under load and through reloads.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use std::io::{Read, Write};

use crate::common::{free_addr, must, LONG};
use crate::util::{
    both_loads, client, reload, scratch, set_worker_args, start, status_json, switchable_worker,
};

/// An answer of the metrics endpoint.
struct Answer {
    status: u16,
    body: String,
}

/// `GET path` on a new connection, read to the server's EOF.
fn try_get(addr: SocketAddr, path: &str) -> Result<Answer, String> {
    let mut s = std::net::TcpStream::connect(addr).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").map_err(|e| format!("write: {e}"))?;
    let mut text = String::new();
    s.read_to_string(&mut text)
        .map_err(|e| format!("read: {e}"))?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or(format!("no head: {text:?}"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or(format!("bad status line: {head:?}"))?;
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("Content-Length: ")?.parse().ok())
        .ok_or(format!("no Content-Length: {head:?}"))?;
    if len != body.len() {
        return Err(format!("Content-Length {len}, body {}", body.len()));
    }
    Ok(Answer {
        status,
        body: body.to_string(),
    })
}

fn get(addr: SocketAddr, path: &str) -> Answer {
    try_get(addr, path).unwrap_or_else(|e| panic!("GET {path}: {e}"))
}

fn body(r: &Answer) -> String {
    r.body.clone()
}

/// The value of the sample `name` (with its labels, as written) in a scrape.
fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

#[test]
fn metrics_and_probes_under_load_and_through_reloads() {
    let dir = scratch();
    let addr = free_addr();
    let metrics = free_addr();
    let m = metrics.to_string();
    let worker = switchable_worker(dir.path());
    let w = worker.display().to_string();
    let nogap = start(dir.path(), addr, &["-w", "2", "--metrics", &m], &[&w]);
    let (ka, nc) = both_loads(addr, 4, Duration::from_millis(2));

    assert_eq!(get(metrics, "/readyz").status, 200);
    assert_eq!(get(metrics, "/healthz").status, 200);
    assert_eq!(get(metrics, "/nope").status, 404);

    // Scrape as fast as one client can while two reloads and a failed one
    // run: every scrape answers, and traffic loses nothing.
    let scrapes = std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(60);
        let (mut n, mut bad) = (0u32, Vec::new());
        while n < 400 && Instant::now() < deadline {
            for path in ["/metrics", "/readyz", "/healthz"] {
                match try_get(metrics, path) {
                    Ok(r) if r.status == 200 => {}
                    Ok(r) => bad.push(format!("{path}: status {}", r.status)),
                    Err(e) => bad.push(format!("{path}: {e}")),
                }
            }
            n += 1;
        }
        (n, bad)
    });
    reload(&nogap, 2);
    reload(&nogap, 3);
    set_worker_args(dir.path(), "--fail-at-start");
    let from = nogap.log_len();
    crate::util::hup(&nogap);
    nogap.wait_for_log_from(from, "reload failed", LONG);
    let (n, bad) = scrapes.join().unwrap();
    assert!(
        bad.is_empty(),
        "{} of {n} scrapes failed: {bad:?}",
        bad.len()
    );
    assert!(n >= 100, "only {n} scrapes");

    let text = body(&get(metrics, "/metrics"));
    for (name, want) in [
        ("nogap_generation", 3.0),
        ("nogap_healthy", 1.0),
        ("nogap_ready", 1.0),
        ("nogap_reloads_total{result=\"ok\"}", 2.0),
        ("nogap_reloads_total{result=\"failed\"}", 1.0),
        ("nogap_reload_duration_seconds_count", 3.0),
        ("nogap_worker_replacements_total{reason=\"stall\"}", 0.0),
        ("nogap_accept_stalls_total{socket=\"web\"}", 0.0),
        ("nogap_accept_queue_backlog{socket=\"web\"}", 0.0),
    ] {
        let got = sample(&text, name).unwrap_or_else(|| panic!("no {name} in\n{text}"));
        if name.contains("backlog") {
            assert!(got > want, "{name} = {got}\n{text}");
        } else {
            assert_eq!(got, want, "{name}\n{text}");
        }
    }
    assert!(sample(&text, "nogap_accept_queue_depth{socket=\"web\"}").is_some());
    must(
        LONG,
        "the old generations are gone from the worker gauges",
        || {
            let t = body(&get(metrics, "/metrics"));
            sample(&t, "nogap_workers{state=\"ready\"}") == Some(2.0)
                && sample(&t, "nogap_workers{state=\"draining\"}") == Some(0.0)
        },
    );
    let text = body(&get(metrics, "/metrics"));
    assert!(
        text.lines()
            .any(|l| l.starts_with("nogap_worker_fds{slot=\"1\",generation=\"3\"} ")),
        "{text}"
    );
    assert!(sample(&text, "nogap_worker_fds_limit{slot=\"0\",generation=\"3\"}").unwrap() > 0.0);
    promtool_check(&text);

    let ka = ka.stop();
    let nc = nc.stop();
    eprintln!("{}\n{}", ka.summary(), nc.summary());
    ka.assert_no_failures();
    nc.assert_no_failures();
}

/// `promtool check metrics` on a scrape, where promtool is installed
/// (Debian: prometheus; tests/run-all.sh installs it).
fn promtool_check(text: &str) {
    use std::io::Write;
    let Ok(mut child) = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
    else {
        eprintln!("promtool not installed: output not checked by it");
        return;
    };
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && said.trim().is_empty(),
        "promtool check metrics: {said}\n{text}"
    );
}

#[test]
fn readyz_is_503_until_a_generation_serves_and_while_stopping() {
    let dir = scratch();
    let addr = free_addr();
    let metrics = free_addr();
    let listen = format!("web={addr}");
    let m = metrics.to_string();
    let demo = crate::common::demo_bin();
    let mut nogap = crate::common::Nogap::run(
        dir.path(),
        &[
            "-l",
            &listen,
            "--ready",
            "notify",
            "--metrics",
            &m,
            "--drain-timeout",
            "30s",
            "--",
            demo,
            "--start-delay",
            "2s",
            "--drain-delay",
            "2s",
        ],
    );
    must(LONG, "the metrics endpoint answers", || {
        std::net::TcpStream::connect(metrics).is_ok()
    });
    let r = get(metrics, "/readyz");
    assert_eq!((r.status, body(&r).as_str()), (503, "starting\n"));
    nogap.wait_for_log("generation ready generation=1", LONG);
    assert_eq!(get(metrics, "/readyz").status, 200);
    // Stopping: the worker drains for 2 s more; readyz says so meanwhile.
    nogap.signal(nix::sys::signal::Signal::SIGTERM);
    must(LONG, "readyz turns 503 while stopping", || {
        let r = get(metrics, "/readyz");
        r.status == 503 && body(&r) == "stopping\n"
    });
    nogap.wait_exit(LONG);
}

fn reload_wait(dir: &std::path::Path) -> std::process::Output {
    client(dir, &["reload", "--wait"])
}

/// `--worker-output capture` outside journald: each line on nogap's stderr
/// with the worker's name; a failed start's last lines in `reload --wait`'s
/// answer and in status.
#[test]
fn captured_output_names_its_worker_and_explains_a_failed_start() {
    let dir = scratch();
    let addr = free_addr();
    let worker = crate::util::script(
        dir.path(),
        "talker.sh",
        r#"echo "hello from $$ gen $NOGAP_GENERATION"
args=$(cat "$DIR/mode-args" 2>/dev/null)
[ -n "$args" ] && echo "config error: port plan 'x' is bad" >&2
exec "$DEMO" $args"#,
    );
    let w = worker.display().to_string();
    let nogap = start(dir.path(), addr, &["--worker-output", "capture"], &[&w]);
    let pid = nogap.started_pids(Some(1))[0];
    nogap.wait_for_log(
        &format!("[gen 1 worker 0 pid {pid}] hello from {pid} gen 1"),
        LONG,
    );

    set_worker_args(dir.path(), "--fail-at-start");
    let out = reload_wait(dir.path());
    let said = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(
        said.contains("before it was ready; its last output:"),
        "{said}"
    );
    assert!(
        said.contains("\n  config error: port plan 'x' is bad\n"),
        "{said}"
    );
    assert!(said.contains("failing at start"), "{said}");
    let json = status_json(dir.path());
    let output = &json["last_reload"]["output"];
    assert!(
        output
            .as_array()
            .is_some_and(|a| a.iter().any(|l| l == "config error: port plan 'x' is bad")),
        "{json}"
    );
    assert_eq!(json["generation"], 1);
}

/// A worker that floods its stdout: nogap drops lines, counts them, says
/// so, keeps its memory, and keeps serving and answering.
#[test]
fn a_flooding_worker_neither_grows_nogap_nor_stalls_it() {
    let dir = scratch();
    let addr = free_addr();
    let metrics = free_addr();
    let m = metrics.to_string();
    let worker = crate::util::script(
        dir.path(),
        "flood.sh",
        r#"yes 'flood flood flood flood flood flood flood flood flood flood' &
head -c 10000000 /dev/zero | tr '\0' x &
exec "$DEMO""#,
    );
    let w = worker.display().to_string();
    let nogap = start(
        dir.path(),
        addr,
        &["--worker-output", "capture", "--metrics", &m],
        &[&w],
    );
    let (ka, nc) = both_loads(addr, 2, Duration::from_millis(2));
    let rss = || {
        crate::common::proc_status(nogap.pid(), "VmRSS")
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .expect("VmRSS")
    };
    let before = rss();
    // Ten seconds of flood; the loop keeps answering status within a second.
    let t = Instant::now();
    let mut slowest = Duration::ZERO;
    while t.elapsed() < Duration::from_secs(10) {
        let asked = Instant::now();
        status_json(dir.path());
        slowest = slowest.max(asked.elapsed());
        assert!(ka.wait_for_more_ok(1, LONG));
    }
    let after = rss();
    let text = get(metrics, "/metrics").body;
    let dropped = sample(&text, "nogap_worker_output_dropped_lines_total").unwrap();
    eprintln!(
        "VmRSS {before} kB -> {after} kB; slowest status {slowest:?}; {dropped} lines dropped"
    );
    assert!(dropped > 10_000.0, "{dropped} lines dropped");
    assert!(
        after < before + 20_000,
        "nogap grew from {before} kB to {after} kB"
    );
    assert!(slowest < Duration::from_secs(1), "status took {slowest:?}");
    nogap.wait_for_log("line(s) of this worker's output dropped", LONG);
    // The 10 MB line was cut: no line longer than the limit plus its prefix.
    let longest = nogap.lines().iter().map(String::len).max().unwrap_or(0);
    assert!(longest < 4096 + 100, "a line of {longest} bytes");
    let ka = ka.stop();
    let nc = nc.stop();
    eprintln!("{}\n{}", ka.summary(), nc.summary());
    ka.assert_no_failures();
    nc.assert_no_failures();
}

fn status(dir: &std::path::Path, json: bool) -> String {
    let out = client(
        dir,
        if json {
            &["status", "--json"]
        } else {
            &["status"]
        },
    );
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `nogap status` groups workers by generation (draining with its time
/// left) and lists the recent events with their reasons; `--json` too.
#[test]
fn status_groups_workers_by_generation_and_shows_recent_events() {
    let dir = scratch();
    let addr = free_addr();
    let worker = switchable_worker(dir.path());
    let w = worker.display().to_string();
    set_worker_args(dir.path(), "--drain-delay 20s");
    let nogap = start(
        dir.path(),
        addr,
        &["-w", "2", "--drain-timeout", "30s"],
        &[&w],
    );
    // A crash: a restart.
    let first = nogap.started_pids(Some(1))[0];
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(first),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    nogap.wait_for_log("restart scheduled", LONG);
    reload(&nogap, 2);
    must(LONG, "generation 1 drains, its time shown", || {
        let t = status(dir.path(), false);
        t.contains("generation 1 draining (2 workers)") && t.matches(", SIGKILL in 2").count() == 2
    });
    let text = status(dir.path(), false);
    eprintln!("{text}");
    assert!(
        text.contains("  generation 2 serving (2 workers)\n"),
        "{text}"
    );
    let g2 = text.find("generation 2 serving").unwrap();
    let g1 = text.find("generation 1 draining").unwrap();
    assert!(g2 < g1, "serving first:\n{text}");
    assert!(text.contains(", SIGKILL in 2"), "time left shown:\n{text}");
    assert!(text.contains("  recent events:\n"), "{text}");
    assert!(
        text.contains(&format!(
            "restart worker 0 of generation 1: worker 0 (pid {first}) of generation 1 was killed by signal SIGKILL"
        )),
        "{text}"
    );
    assert!(
        text.contains("reload generation 2: generation 2 serves (took "),
        "{text}"
    );
    let json: serde_json::Value = serde_json::from_str(&status(dir.path(), true)).unwrap();
    let kinds: Vec<&str> = json["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["restart", "reload"], "{json}");
    assert!(
        json["events"][1]["at"].as_str().unwrap().ends_with('Z'),
        "{json}"
    );
    assert!(json["workers"]
        .as_array()
        .unwrap()
        .iter()
        .any(|w| w["drain_left_secs"]
            .as_f64()
            .is_some_and(|s| s > 0.0 && s <= 30.0)));
}

/// `nogap reload --wait` on a terminal (a pty from script(1)) shows the
/// generation coming up, then steering and draining, and ends with one line;
/// with its output in a pipe it prints that one line only.
#[test]
fn reload_wait_shows_progress_on_a_terminal_and_one_line_otherwise() {
    let dir = scratch();
    let addr = free_addr();
    let worker = switchable_worker(dir.path());
    let w = worker.display().to_string();
    let _nogap = start(dir.path(), addr, &["-w", "3"], &[&w]);
    // Workers ready after 0.3 s: progress has a step to show.
    set_worker_args(dir.path(), "--start-delay 300ms");
    let control = dir.path().join("control.sock");
    let cmd = format!(
        "{} reload --wait --control {}",
        crate::common::nogap_bin(),
        control.display()
    );
    let out = std::process::Command::new("script")
        .args(["-qec", &cmd, "/dev/null"])
        .output()
        .expect("script(1)");
    let shown = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{shown}");
    assert!(
        shown.contains("starting generation 2: 0/3 ready"),
        "{shown:?}"
    );
    assert!(
        shown.contains("steering new connections to generation 2"),
        "{shown:?}"
    );
    assert!(shown.contains("draining generation 1"), "{shown:?}");
    let last = shown.trim_end().rsplit('\r').next().unwrap_or("");
    assert!(
        last.trim_start_matches("\x1b[K")
            .starts_with("generation 2 is serving (reload took "),
        "{shown:?}"
    );
    // Not a terminal: the one line.
    let out = reload_wait(dir.path());
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success());
    assert_eq!(text.lines().count(), 1, "{text:?}");
    assert!(
        text.starts_with("generation 3 is serving (reload took "),
        "{text:?}"
    );
}
