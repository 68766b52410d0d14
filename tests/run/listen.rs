//! A reload changes `listen`: a new address is bound before the new
//! generation starts and only that generation gets it; a dropped one is
//! closed once no generation has it; a kept one is the same socket
//! throughout (no failed request on it). A self-upgrade in between changes
//! none of that.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::Duration;

use crate::common::load::{get_once, Target};
use crate::common::{demo_bin, free_addr, must, process_exists, read_json, LONG};
use crate::util::{
    both_loads, client, code, scratch, start_with_config, text, upgrade_wait, write_config,
};

/// The file: `listen` as given, the demo writing a report per worker to
/// `DIR/TAG-{pid}.json`.
fn config(dir: &Path, listen: &[String], tag: &str) -> String {
    config_with(dir, listen, tag, &[])
}

/// [`config`] with more arguments for the demo.
fn config_with(dir: &Path, listen: &[String], tag: &str, demo_args: &[&str]) -> String {
    let report = dir.join(format!("{tag}-{{pid}}.json"));
    let quote = |v: &[&str]| {
        v.iter()
            .map(|a| format!("\"{a}\""))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let listen: Vec<&str> = listen.iter().map(String::as_str).collect();
    let report = report.display().to_string();
    let mut command = vec![demo_bin(), "--report", &report];
    command.extend_from_slice(demo_args);
    format!(
        "listen = [{}]\nworkers = 2\nready = \"notify\"\ncommand = [{}]\n",
        quote(&listen),
        quote(&command)
    )
}

fn env_of(dir: &Path, tag: &str, pid: i32, var: &str) -> String {
    let path = dir.join(format!("{tag}-{pid}.json"));
    must(LONG, &format!("{} written", path.display()), || {
        path.exists()
    });
    let r = read_json(&path);
    r["env"]["all"][var]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

fn serves(addr: SocketAddr) -> bool {
    get_once(&Target::Tcp(addr), Duration::from_secs(5)).is_ok_and(|r| r.status == 200)
}

fn refused(addr: SocketAddr) -> bool {
    matches!(TcpStream::connect_timeout(&addr, Duration::from_secs(1)),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused)
}

/// `admin` is added under load on `web`: nothing fails on web, admin
/// serves, and only the new generation has it (`LISTEN_FDNAMES=web:admin`).
#[test]
fn a_reload_adds_a_listener() {
    let dir = scratch();
    let (web, admin) = (free_addr(), free_addr());
    let file = dir.path().join("app.toml");
    write_config(&file, &config(dir.path(), &[format!("web={web}")], "a"));
    let nogap = start_with_config(dir.path(), &file);
    let (ka, nc) = both_loads(web, 4, Duration::from_millis(2));
    let gen1 = nogap.wait_workers(1, 2, LONG);
    assert!(refused(admin), "nothing listens on {admin} yet");

    let both = [format!("web={web}"), format!("admin={admin}")];
    write_config(&file, &config(dir.path(), &both, "b"));
    let out = client(dir.path(), &["reload", "--wait"]);
    assert!(out.status.success(), "{}", text(&out));
    let gen2 = nogap.wait_workers(2, 2, LONG);
    for pid in &gen2 {
        assert_eq!(env_of(dir.path(), "b", *pid, "LISTEN_FDNAMES"), "web:admin");
        assert_eq!(env_of(dir.path(), "b", *pid, "LISTEN_FDS"), "2");
    }
    for pid in &gen1 {
        assert_eq!(env_of(dir.path(), "a", *pid, "LISTEN_FDNAMES"), "web");
    }
    must(LONG, "admin serves", || serves(admin));
    let status = text(&client(dir.path(), &["status"]));
    assert!(status.contains(&admin.to_string()), "{status}");
    assert_eq!(nogap.count_log("socket closed"), 0, "web is kept");

    assert!(ka.wait_for_more_ok(50, LONG) && nc.wait_for_more_ok(50, LONG));
    let (ka, nc) = (ka.stop(), nc.stop());
    eprintln!("{}\n{}", ka.summary(), nc.summary());
    ka.assert_no_failures();
    nc.assert_no_failures();
}

/// `admin` is dropped under load on `web`: it stays open until the old
/// generation is gone, then is closed (refused), and nothing fails on web.
/// Added back, it is bound again.
#[test]
fn a_reload_removes_a_listener_once_no_generation_has_it() {
    let dir = scratch();
    let (web, admin) = (free_addr(), free_addr());
    let file = dir.path().join("app.toml");
    let both = [format!("web={web}"), format!("admin={admin}")];
    write_config(&file, &config(dir.path(), &both, "a"));
    let nogap = start_with_config(dir.path(), &file);
    let (ka, nc) = both_loads(web, 4, Duration::from_millis(2));
    let gen1 = nogap.wait_workers(1, 2, LONG);
    assert!(serves(admin));

    write_config(&file, &config(dir.path(), &both[..1], "b"));
    let out = client(dir.path(), &["reload", "--wait"]);
    assert!(out.status.success(), "{}", text(&out));
    let gen2 = nogap.wait_workers(2, 2, LONG);
    for pid in &gen2 {
        assert_eq!(env_of(dir.path(), "b", *pid, "LISTEN_FDNAMES"), "web");
    }
    let closed = nogap.wait_for_log("socket closed: no generation uses it", LONG);
    assert!(closed.contains("socket=admin"), "{closed}");
    // Closed only once the old generation's workers were gone.
    let lines = nogap.lines();
    let at = |pred: &dyn Fn(&str) -> bool| lines.iter().position(|l| pred(l));
    let closed_at = at(&|l| l.contains("socket closed")).unwrap();
    for pid in &gen1 {
        let pid = format!("pid={pid}");
        let exited = at(&|l| l.contains("exited") && l.contains(&pid));
        assert!(
            exited.is_some_and(|e| e < closed_at),
            "{pid} exited before:\n{}",
            lines.join("\n")
        );
    }
    must(LONG, "admin refused", || refused(admin));
    let status = text(&client(dir.path(), &["status"]));
    assert!(!status.contains(&admin.to_string()), "{status}");
    assert!(ka.wait_for_more_ok(50, LONG) && nc.wait_for_more_ok(50, LONG));

    write_config(&file, &config(dir.path(), &both, "c"));
    let out = client(dir.path(), &["reload", "--wait"]);
    assert!(out.status.success(), "{}", text(&out));
    must(LONG, "admin serves again", || serves(admin));

    assert!(ka.wait_for_more_ok(50, LONG) && nc.wait_for_more_ok(50, LONG));
    let (ka, nc) = (ka.stop(), nc.stop());
    eprintln!("{}\n{}", ka.summary(), nc.summary());
    ka.assert_no_failures();
    nc.assert_no_failures();
}

/// The inodes of TCP sockets with local port `port` in `state`
/// (`listening`, `established`), from `ss`: a sock_diag dump the kernel
/// filters. Not /proc/net/tcp: with the tens of thousands of TIME_WAIT
/// entries a concurrent load test leaves, reading it took seconds.
fn tcp_inodes(port: u16, state: &str) -> BTreeSet<u64> {
    let out = std::process::Command::new("ss")
        .args(["-Htne", "state", state, &format!("( sport = :{port} )")])
        .output()
        .expect("run ss");
    assert!(out.status.success(), "ss: {out:?}");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|w| w.strip_prefix("ino:")?.parse().ok())
        .collect()
}

/// The socket inodes process `pid` holds.
fn held_sockets(pid: i32) -> BTreeSet<u64> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return BTreeSet::new();
    };
    dir.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter_map(|l| {
            let l = l.display().to_string();
            l.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()
        })
        .collect()
}

/// Which of `pids` holds a connection accepted on 127.0.0.1:`port`.
fn accepted_by(pids: &[i32], port: u16) -> Option<i32> {
    let conns = tcp_inodes(port, "established");
    pids.iter()
        .copied()
        .find(|&pid| !held_sockets(pid).is_disjoint(&conns))
}

/// `admin` is dropped while a generation 1 worker still serves a slow
/// request on it, and nogap upgrades itself in place during that drain:
/// the request is answered, admin is closed (by the new image) only once
/// generation 1 is gone, and not one request fails on `web` throughout.
#[test]
fn a_removed_listener_still_drains_across_an_upgrade_and_is_closed_after_it() {
    let dir = scratch();
    let (web, admin) = (free_addr(), free_addr());
    let file = dir.path().join("app.toml");
    let both = [format!("web={web}"), format!("admin={admin}")];
    // Generation 1 takes 8 s over each admin request, none over web's.
    let slow = ["--work", "8s", "--work-on", "admin"];
    write_config(&file, &config_with(dir.path(), &both, "a", &slow));
    let nogap = start_with_config(dir.path(), &file);
    let (ka, nc) = both_loads(web, 4, Duration::from_millis(2));
    let gen1 = nogap.wait_workers(1, 2, LONG);

    let sent = std::time::Instant::now();
    let inflight = std::thread::spawn(move || {
        let r = get_once(&Target::Tcp(admin), Duration::from_secs(30));
        (r, sent.elapsed())
    });
    let mut holder = None;
    must(
        LONG,
        "a generation 1 worker accepted the admin request",
        || {
            holder = accepted_by(&gen1, admin.port());
            holder.is_some()
        },
    );
    let holder = holder.unwrap();
    let other = *gen1.iter().find(|&&p| p != holder).unwrap();

    write_config(&file, &config(dir.path(), &both[..1], "b"));
    let out = client(dir.path(), &["reload", "--wait"]);
    assert!(out.status.success(), "{}", text(&out));
    nogap.wait_workers(2, 2, LONG);
    // Generation 1 drains: the worker without the slow request is gone.
    must(LONG, "the other generation 1 worker exits", || {
        !process_exists(other)
    });
    assert!(process_exists(holder), "the slow request holds {holder}");
    // A new connection to admin now waits in the queue nogap still holds:
    // no serving worker can take it, so none is added for it.
    let mut late = TcpStream::connect(admin).expect("admin is still open");
    late.write_all(b"GET / HTTP/1.1\r\n\r\n").expect("send");
    nogap.wait_for_log("connections wait on a socket a reload removed", LONG);

    let out = upgrade_wait(dir.path());
    assert_eq!(code(out.status), 0, "{}", text(&out));
    nogap.wait_for_log("upgraded in place", LONG);
    assert!(
        !inflight.is_finished() && process_exists(holder),
        "the upgrade came after the slow request ended: make --work longer"
    );
    assert_eq!(nogap.count_log("socket closed"), 0, "admin is still used");
    let status = text(&client(dir.path(), &["status"]));
    assert!(status.contains(&admin.to_string()), "{status}");

    let (answer, took) = inflight.join().unwrap();
    let answer = answer.unwrap_or_else(|f| panic!("the request in flight on admin: {f}"));
    assert_eq!((answer.status, answer.gen), (200, Some(1)), "{answer:?}");
    eprintln!("the admin request in flight took {took:?}");
    let closed = nogap.wait_for_log("socket closed: no generation uses it", LONG);
    assert!(closed.contains("socket=admin"), "{closed}");
    let lines = nogap.lines();
    let at = |pred: &dyn Fn(&str) -> bool| lines.iter().position(|l| pred(l));
    let closed_at = at(&|l| l.contains("socket closed")).unwrap();
    let upgraded_at = at(&|l| l.contains("upgraded in place")).unwrap();
    let holder_pid = format!("pid={holder}");
    let exited_at = at(&|l| l.contains("worker exited") && l.contains(&holder_pid));
    assert!(
        upgraded_at < closed_at && exited_at.is_some_and(|e| upgraded_at < e && e < closed_at),
        "upgrade, then {holder_pid} exits, then admin closes:\n{}",
        lines.join("\n")
    );
    must(LONG, "admin refused", || refused(admin));
    late.set_read_timeout(Some(LONG)).unwrap();
    let mut got = Vec::new();
    let ended = late.read_to_end(&mut got);
    assert!(got.is_empty(), "{:?}", String::from_utf8_lossy(&got));
    eprintln!("the connection queued on admin after the reload: {ended:?}");
    assert_eq!(nogap.count_log("adding an extra worker"), 0);
    assert_eq!(nogap.started_pids(Some(2)).len(), 2);
    let status = text(&client(dir.path(), &["status"]));
    assert!(!status.contains(&admin.to_string()), "{status}");
    assert!(
        tcp_inodes(admin.port(), "listening").is_empty(),
        "nothing listens on admin"
    );

    assert!(ka.wait_for_more_ok(50, LONG) && nc.wait_for_more_ok(50, LONG));
    let (ka, nc) = (ka.stop(), nc.stop());
    eprintln!("{}\n{}", ka.summary(), nc.summary());
    ka.assert_no_failures();
    nc.assert_no_failures();
}

/// `admin`, added by a reload, crosses an upgrade as the same socket (its
/// inode; never bound again) and serves under load throughout; the next
/// reload, in the new image, keeps it too.
#[test]
fn a_listener_added_by_a_reload_is_the_same_socket_after_an_upgrade() {
    let dir = scratch();
    let (web, admin) = (free_addr(), free_addr());
    let file = dir.path().join("app.toml");
    let both = [format!("web={web}"), format!("admin={admin}")];
    write_config(&file, &config(dir.path(), &both[..1], "a"));
    let nogap = start_with_config(dir.path(), &file);
    let (ka, nc) = both_loads(web, 4, Duration::from_millis(2));

    write_config(&file, &config(dir.path(), &both, "b"));
    let out = client(dir.path(), &["reload", "--wait"]);
    assert!(out.status.success(), "{}", text(&out));
    must(LONG, "admin serves", || serves(admin));
    let sockets = tcp_inodes(admin.port(), "listening");
    assert!(!sockets.is_empty());
    assert!(
        sockets.is_subset(&held_sockets(nogap.pid())),
        "nogap holds admin's sockets {sockets:?}"
    );
    let (aka, anc) = both_loads(admin, 2, Duration::from_millis(2));

    let out = upgrade_wait(dir.path());
    assert_eq!(code(out.status), 0, "{}", text(&out));
    nogap.wait_for_log("upgraded in place", LONG);
    assert!(aka.wait_for_more_ok(50, LONG) && anc.wait_for_more_ok(50, LONG));
    assert_eq!(
        tcp_inodes(admin.port(), "listening"),
        sockets,
        "admin was bound again"
    );
    assert!(sockets.is_subset(&held_sockets(nogap.pid())));

    // The next reload, in the new image, keeps it.
    write_config(&file, &config(dir.path(), &both, "c"));
    let out = client(dir.path(), &["reload", "--wait"]);
    assert!(out.status.success(), "{}", text(&out));
    let gen3 = nogap.wait_workers(3, 2, LONG);
    for pid in &gen3 {
        assert_eq!(env_of(dir.path(), "c", *pid, "LISTEN_FDNAMES"), "web:admin");
    }
    assert!(aka.wait_for_more_ok(50, LONG) && anc.wait_for_more_ok(50, LONG));
    must(LONG, "generation 3 answers on admin", || {
        get_once(&Target::Tcp(admin), Duration::from_secs(5)).is_ok_and(|r| r.gen == Some(3))
    });
    assert_eq!(
        tcp_inodes(admin.port(), "listening"),
        sockets,
        "admin was bound again"
    );
    assert_eq!(nogap.count_log("listening (added by a reload)"), 1);
    assert_eq!(nogap.count_log("socket closed"), 0);

    assert!(ka.wait_for_more_ok(50, LONG) && nc.wait_for_more_ok(50, LONG));
    for load in [ka, nc, aka, anc] {
        let report = load.stop();
        eprintln!("{}", report.summary());
        report.assert_no_failures();
    }
}
