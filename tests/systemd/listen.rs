//! `listen` changed by `systemctl reload` of the shipped `nogap@.service`
//! (as in the repository, with the host-built binaries in `/usr/bin`): a
//! second listener added to `/etc/nogap/web.toml` serves once the reload
//! returns, and the first loses nothing across it; an address that another
//! process in the container holds fails the reload, and serving goes on.

use std::net::SocketAddr;
use std::time::Instant;

use super::fixture::{Nogap, Traffic, LOAD_TIMEOUT, SOON};
use super::harness::{free_port, progress, wait_for, OutputExt, Release};
use super::load::{get_once, Target};

/// The template unit, as shipped.
const TEMPLATE: &str = include_str!("../../units/nogap@.service");
const UNIT: &str = "nogap@web.service";
const CONFIG: &str = "/etc/nogap/web.toml";
/// A transient unit holding an address nogap is then asked to listen on.
const HOLDER: &str = "nogap-test-holder.service";

/// `/etc/nogap/web.toml` with these `listen` entries.
fn config(listen: &[String]) -> String {
    let listen: Vec<String> = listen.iter().map(|l| format!("\"{l}\"")).collect();
    format!(
        "listen = [{}]\nworkers = 2\nready = \"notify\"\nuser = \"nobody\"\ncommand = [\"/usr/bin/nogap-demo\"]\n",
        listen.join(", ")
    )
}

fn generation_on(addr: SocketAddr) -> Option<u32> {
    get_once(&Target::Tcp(addr), LOAD_TIMEOUT).ok()?.gen
}

pub fn added_by_reload_and_refused_in_use(release: Release) {
    let n = Nogap::boot(release);
    let c = &n.c;
    n.install("nogap@.service", TEMPLATE);
    let (web, admin) = (n.addr(), SocketAddr::from(([127, 0, 0, 1], free_port())));
    let taken = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let one = [format!("web={web}")];
    c.write_file(CONFIG, config(&one).as_bytes(), 0o644);
    n.systemctl(&["start", UNIT]);
    assert_eq!(n.serving_generation(), 1);
    assert_eq!(generation_on(admin), None, "nothing listens on {admin} yet");
    let traffic = Traffic::start(web, 3);
    traffic.wait_for_answers(200);

    // Add `admin`: the reload binds it, and the new generation serves it.
    let two = [format!("web={web}"), format!("admin={admin}")];
    c.write_file(CONFIG, config(&two).as_bytes(), 0o644);
    let t = Instant::now();
    n.systemctl(&["reload", UNIT]);
    let took = t.elapsed();
    assert_eq!(generation_on(admin), Some(2), "admin after the reload");
    assert!(
        n.show(UNIT, "StatusText")
            .starts_with("generation 2: 2/2 workers ready"),
        "{}",
        n.show(UNIT, "StatusText")
    );
    n.wait_generation(2);
    assert!(
        n.journal(UNIT).contains("listening (added by a reload)"),
        "{}",
        n.journal(UNIT)
    );
    traffic.wait_for_answers(200);

    // A third address that a process in the container holds: the reload
    // fails naming it, nothing changes, both listeners serve on.
    c.exec(&[
        "systemd-run",
        &format!("--unit={HOLDER}"),
        "/usr/bin/nogap-demo",
        "--listen",
        &taken.to_string(),
    ])
    .expect_success("systemd-run the holder");
    wait_for(format!("the holder to listen on {taken}"), SOON, || {
        generation_on(taken).map(|_| ())
    });
    let three = [two[0].clone(), two[1].clone(), format!("extra={taken}")];
    c.write_file(CONFIG, config(&three).as_bytes(), 0o644);
    let failed = c.systemctl(&["reload", UNIT]);
    assert!(!failed.status.success(), "reloaded with {taken} in use");
    let status = n.show(UNIT, "StatusText");
    let error = format!("cannot listen on tcp://{taken}: Address already in use");
    assert!(
        status.starts_with("generation 2: 2/2 workers ready")
            && status.contains("last reload failed")
            && status.contains(&error),
        "StatusText={status:?}"
    );
    assert_eq!(n.show(UNIT, "ActiveState"), "active");
    assert_eq!(n.show(UNIT, "NRestarts"), "0");
    assert_eq!(n.serving_generation(), 2);
    assert_eq!(generation_on(admin), Some(2));
    assert_eq!(
        generation_on(taken),
        Some(0),
        "the holder still has {taken}"
    );
    traffic.wait_for_answers(20);
    let reports = traffic.stop();
    reports.assert_no_failures();
    n.systemctl(&["stop", HOLDER, UNIT]);
    progress(format!(
        "{}: admin added by a reload in {took:.0?}, a reload onto an address in use refused; web lost nothing",
        release.codename()
    ));
}
