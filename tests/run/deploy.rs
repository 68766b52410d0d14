//! A reload deploys the `--config` file: the new generation runs what the
//! file says now; a file that is invalid, or changes what cannot change
//! while nogap runs, fails the reload and the serving generation serves on.

use std::path::Path;
use std::time::Duration;

use crate::common::{demo_bin, free_addr, must, read_json, LONG};
use crate::util::{both_loads, client, scratch, start_with_config, text, write_config};

/// The file: the demo, writing a report per worker to `DIR/TAG-{pid}.json`,
/// with `TAG` in its environment too.
fn config(dir: &Path, listen: &str, workers: u32, tag: &str) -> String {
    let report = dir.join(format!("{tag}-{{pid}}.json"));
    format!(
        "listen = [\"{listen}\"]\nworkers = {workers}\nready = \"notify\"\nenv = {{ TAG = \"{tag}\" }}\ncommand = [\"{}\", \"--report\", \"{}\"]\n",
        demo_bin(),
        report.display()
    )
}

/// The reports `DIR/TAG-PID.json` of these pids, once written.
fn reports(dir: &Path, tag: &str, pids: &[i32]) -> Vec<serde_json::Value> {
    pids.iter()
        .map(|pid| {
            let path = dir.join(format!("{tag}-{pid}.json"));
            must(LONG, &format!("{} written", path.display()), || {
                path.exists()
            });
            read_json(&path)
        })
        .collect()
}

/// Workers 2 → 3 and new arguments and environment, under load: the new
/// generation runs the new file, nothing fails.
#[test]
fn a_reload_deploys_workers_args_and_env_from_the_file() {
    let dir = scratch();
    let addr = free_addr();
    let file = dir.path().join("app.toml");
    let listen = format!("web={addr}");
    write_config(&file, &config(dir.path(), &listen, 2, "a"));
    let nogap = start_with_config(dir.path(), &file);
    let (ka, nc) = both_loads(addr, 4, Duration::from_millis(2));
    let gen1 = nogap.wait_workers(1, 2, LONG);
    for r in reports(dir.path(), "a", &gen1) {
        assert_eq!(r["env"]["all"]["TAG"], "a", "{r}");
    }

    write_config(&file, &config(dir.path(), &listen, 3, "b"));
    let out = client(dir.path(), &["reload", "--wait"]);
    assert!(out.status.success(), "{}", text(&out));
    let gen2 = nogap.wait_workers(2, 3, LONG);
    assert_eq!(gen2.len(), 3, "workers = 3 now");
    for r in reports(dir.path(), "b", &gen2) {
        assert_eq!(r["env"]["all"]["TAG"], "b", "{r}");
        let report = dir.path().join("b-{pid}.json");
        assert_eq!(r["argv"][2], report.display().to_string(), "{r}");
    }
    let status = client(dir.path(), &["status"]);
    assert!(
        text(&status).contains("generation 2: 3/3 workers ready"),
        "{}",
        text(&status)
    );
    assert!(ka.wait_for_more_ok(50, LONG) && nc.wait_for_more_ok(50, LONG));
    let (ka, nc) = (ka.stop(), nc.stop());
    eprintln!("{}\n{}", ka.summary(), nc.summary());
    ka.assert_no_failures();
    nc.assert_no_failures();
}

/// A broken file (an unknown key), a key that cannot change while nogap
/// runs, a new address in use: `reload --wait` exits 1 naming the file, line and key, status
/// says so, nothing starts, and not one request fails. Fixed, it deploys.
#[test]
fn a_broken_config_fails_the_reload_while_serving_continues() {
    let dir = scratch();
    let addr = free_addr();
    let file = dir.path().join("app.toml");
    let listen = format!("web={addr}");
    let good = config(dir.path(), &listen, 2, "a");
    write_config(&file, &good);
    let nogap = start_with_config(dir.path(), &file);
    let (ka, nc) = both_loads(addr, 4, Duration::from_millis(2));
    let holder = std::net::TcpListener::bind(free_addr()).expect("bind");
    let taken = holder.local_addr().expect("address");

    let bad_cases = [
        (
            good.replace("workers = 2", "workers = 2\nwrokers = 3"),
            format!("{}:3: unknown key 'wrokers'", file.display()),
        ),
        (
            good.replace("workers = 2", "workers = 2\ndrain-timeout = \"soon\""),
            format!("{}:3: key 'drain-timeout'", file.display()),
        ),
        (
            format!("{good}fd-store = true\n"),
            format!("{}: key 'fd-store' cannot change", file.display()),
        ),
        // A new address that another process holds: the reload fails
        // naming it, and nogap's sockets stay as they were.
        (
            good.replace(&listen, &format!("{listen}\", \"admin={taken}")),
            format!("cannot listen on tcp://{taken}: Address already in use"),
        ),
    ];
    for (text_of_file, error) in &bad_cases {
        write_config(&file, text_of_file);
        let out = client(dir.path(), &["reload", "--wait"]);
        assert_eq!(out.status.code(), Some(1), "{}", text(&out));
        assert!(
            text(&out).contains(error.as_str()),
            "{error}: {}",
            text(&out)
        );
        let status = client(dir.path(), &["status"]);
        assert!(
            text(&status).contains("generation 1: 2/2 workers ready")
                && text(&status).contains("last reload failed")
                && text(&status).contains(error.as_str()),
            "{}",
            text(&status)
        );
        let sockets: Vec<String> = (text(&status).lines())
            .filter(|l| l.trim_start().starts_with("socket "))
            .map(String::from)
            .collect();
        assert_eq!(sockets.len(), 1, "web alone: {sockets:?}");
        assert!(ka.wait_for_more_ok(20, LONG) && nc.wait_for_more_ok(20, LONG));
    }
    assert_eq!(nogap.started_pids(None).len(), 2, "nothing else started");
    assert_eq!(nogap.count_log("reload started"), 0);

    write_config(&file, &good.replace("workers = 2", "workers = 1"));
    let out = client(dir.path(), &["reload", "--wait"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("generation 2 is serving"),
        "{}",
        text(&out)
    );
    assert!(ka.wait_for_more_ok(50, LONG) && nc.wait_for_more_ok(50, LONG));
    let (ka, nc) = (ka.stop(), nc.stop());
    eprintln!("{}\n{}", ka.summary(), nc.summary());
    ka.assert_no_failures();
    nc.assert_no_failures();
}
