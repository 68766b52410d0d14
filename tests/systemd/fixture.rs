//! What the scenarios share: a booted container with the host-built `nogap`
//! and `nogap-demo` in `/usr/bin`, the shipped units (`units/`) on a free
//! port, the service's processes and properties, and load from the host.

use std::net::SocketAddr;
use std::time::Duration;

use super::harness::{free_port, progress, wait_for, Container, OutputExt, Release, SHARE};
use super::load::{get_once, FailureKind, Load, LoadConfig, Mode, Report, Response, Target};

/// The shipped units, as in the repository.
pub const EXAMPLE_SERVICE: &str = include_str!("../../units/example.service");
pub const EXAMPLE_SOCKET: &str = include_str!("../../units/example.socket");
pub const FDSTORE_SERVICE: &str = include_str!("../../units/example-fdstore.service");
pub const NOTIFY_RELOAD_SERVICE: &str = include_str!("../../units/example-notify-reload.service");

/// The address in the shipped units; tests replace it with a free port.
const SHIPPED_ADDR: &str = "127.0.0.1:8080";

/// Per-request timeout of the load: generous, a 2-CPU box runs two
/// containers and the load at once. A connection waiting in a held socket's
/// queue across a restart waits this long before it counts as a timeout.
pub const LOAD_TIMEOUT: Duration = Duration::from_secs(30);
/// Upper bound of every load run (they are stopped much earlier).
const LOAD_MAX: Duration = Duration::from_secs(300);
/// For things that should happen soon.
pub const SOON: Duration = Duration::from_secs(30);

/// A container with nogap installed and a free port for its service.
pub struct Nogap {
    pub c: Container,
    pub port: u16,
}

impl Nogap {
    /// Boots `release` and installs the host-built binaries as
    /// `/usr/bin/nogap` and `/usr/bin/nogap-demo`, where the units expect them.
    pub fn boot(release: Release) -> Nogap {
        let c = Container::boot(release);
        for (bin, host) in [
            ("nogap", env!("CARGO_BIN_EXE_nogap")),
            ("nogap-demo", env!("CARGO_BIN_EXE_nogap-demo")),
        ] {
            std::fs::copy(host, c.share_dir().join(bin))
                .unwrap_or_else(|e| panic!("copy {host} into the shared directory: {e}"));
            c.exec(&["cp", &format!("{SHARE}/{bin}"), &format!("/usr/bin/{bin}")])
                .expect_success(&format!("install {bin}"));
        }
        Nogap {
            c,
            port: free_port(),
        }
    }

    pub fn release(&self) -> Release {
        self.c.release()
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// A shipped unit with its address moved to this test's port (the only
    /// change). Panics if the text does not contain the shipped address.
    pub fn on_port(&self, shipped: &str) -> String {
        assert!(
            shipped.contains(SHIPPED_ADDR),
            "the shipped unit no longer listens on {SHIPPED_ADDR}:\n{shipped}"
        );
        shipped.replace(SHIPPED_ADDR, &format!("127.0.0.1:{}", self.port))
    }

    /// Writes `/etc/systemd/system/<name>` and reloads systemd.
    pub fn install(&self, name: &str, text: &str) {
        self.c.install_unit(name, text);
    }

    /// Writes the drop-in `/etc/systemd/system/<unit>.d/<name>.conf` and
    /// reloads systemd.
    pub fn drop_in(&self, unit: &str, name: &str, text: &str) {
        self.c.write_file(
            &format!("/etc/systemd/system/{unit}.d/{name}.conf"),
            text.as_bytes(),
            0o644,
        );
        self.systemctl(&["daemon-reload"]);
    }

    /// `example.socket` on this port and `example.service`, both as shipped.
    pub fn install_socket_pair(&self) {
        self.install("example.socket", &self.on_port(EXAMPLE_SOCKET));
        self.install("example.service", EXAMPLE_SERVICE);
    }

    /// Whether a process inside still exists (zombies count as gone).
    pub fn alive(&self, pid: u32) -> bool {
        let out = self.c.sh(&format!(
            "grep -q '^State:[[:space:]]*[^Z]' /proc/{pid}/status 2>/dev/null"
        ));
        out.status.success()
    }

    /// Writes an executable script inside.
    pub fn script(&self, path: &str, body: &str) {
        self.c.write_file(path, body.as_bytes(), 0o755);
    }

    /// `systemctl args...`, which must succeed.
    pub fn systemctl(&self, args: &[&str]) -> String {
        self.c
            .systemctl(args)
            .expect_success(&format!("systemctl {}", args.join(" ")))
    }

    /// One property of a unit (`systemctl show -p NAME --value`).
    pub fn show(&self, unit: &str, property: &str) -> String {
        self.systemctl(&["show", "-p", property, "--value", unit])
            .trim()
            .to_owned()
    }

    /// The unit's main process, if it has one.
    pub fn main_pid(&self, unit: &str) -> Option<u32> {
        let pid: u32 = self
            .show(unit, "MainPID")
            .parse()
            .expect("MainPID is a number");
        (pid != 0).then_some(pid)
    }

    /// Every process in the unit's cgroup (inside pids). Empty when the
    /// cgroup is gone.
    pub fn cgroup_procs(&self, unit: &str) -> Vec<u32> {
        let cgroup = self.show(unit, "ControlGroup");
        if cgroup.is_empty() {
            return Vec::new();
        }
        self.procs_in(&cgroup)
    }

    /// Every process in the cgroup `path` (as in `ControlGroup=`); empty
    /// when it is gone.
    pub fn procs_in(&self, cgroup: &str) -> Vec<u32> {
        assert!(cgroup.starts_with('/'), "cgroup path {cgroup:?}");
        // A cgroup systemd removed has no cgroup.procs: nothing is in it.
        let out = self.c.sh(&format!(
            "cat /sys/fs/cgroup{cgroup}/cgroup.procs 2>/dev/null || true"
        ));
        out.expect_success("read cgroup.procs")
            .split_whitespace()
            .map(|p| p.parse().expect("a pid in cgroup.procs"))
            .collect()
    }

    /// The environment of a process inside, as `KEY=VALUE` strings.
    pub fn environ(&self, pid: u32) -> Vec<String> {
        let out = self.c.exec(&["cat", &format!("/proc/{pid}/environ")]);
        assert!(out.status.success(), "read environ of {pid}: {out:?}");
        out.stdout
            .split(|&b| b == 0)
            .filter(|v| !v.is_empty())
            .map(|v| String::from_utf8_lossy(v).into_owned())
            .collect()
    }

    /// One request on a new connection to the service's port.
    pub fn probe(&self) -> Response {
        get_once(&Target::Tcp(self.addr()), LOAD_TIMEOUT)
            .unwrap_or_else(|f| panic!("request to {}: {f}", self.addr()))
    }

    /// The generation that answers a new connection.
    pub fn serving_generation(&self) -> u32 {
        let r = self.probe();
        r.gen
            .unwrap_or_else(|| panic!("no generation in the answer {:?}", r.body))
    }

    /// Waits until a new connection is answered by generation `gen`. Right
    /// after a reload, an old worker that has not handled its stop signal yet
    /// may still accept one (see `reload::reloads_under_load`).
    pub fn wait_generation(&self, gen: u32) {
        wait_for(format!("generation {gen} to answer"), SOON, || {
            (self.serving_generation() == gen).then_some(())
        });
    }

    /// `journalctl -u UNIT -o json`, one object per entry.
    pub fn journal_json(&self, unit: &str) -> Vec<serde_json::Value> {
        self.c
            .journalctl(&["-u", unit, "-o", "json"])
            .expect_success("journalctl -o json")
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("journal line {l}: {e}")))
            .collect()
    }

    /// `journalctl -u UNIT` as text, for messages.
    pub fn journal(&self, unit: &str) -> String {
        self.c.journalctl(&["-u", unit]).stdout_text()
    }

    /// Waits until `systemctl show` says `property` of `unit` is `value`.
    pub fn wait_property(&self, unit: &str, property: &str, value: &str, timeout: Duration) {
        wait_for(format!("{property}={value} of {unit}"), timeout, || {
            (self.show(unit, property) == value).then_some(())
        });
    }
}

/// Keep-alive and new-connection load on one address at once.
pub struct Traffic {
    keep_alive: Load,
    new_conn: Load,
}

/// Both reports of a [`Traffic`] run.
pub struct Reports {
    pub keep_alive: Report,
    pub new_conn: Report,
}

impl Traffic {
    /// `n` connections of each mode, each request with [`LOAD_TIMEOUT`].
    /// Waits until both have had some answers.
    pub fn start(addr: SocketAddr, n: usize) -> Traffic {
        let config = |mode| {
            LoadConfig::new(addr, mode)
                .connections(n)
                .duration(LOAD_MAX)
                .timeout(LOAD_TIMEOUT)
                .pause(Duration::from_millis(2))
        };
        let t = Traffic {
            keep_alive: Load::start(config(Mode::KeepAlive)),
            new_conn: Load::start(config(Mode::NewConnection)),
        };
        t.wait_for_answers(20);
        t
    }

    /// Both loads got `n` more answers: traffic flows now.
    pub fn wait_for_answers(&self, n: u64) {
        for load in [&self.keep_alive, &self.new_conn] {
            assert!(
                load.wait_for_more_ok(n, SOON),
                "the load got no answers for {SOON:?} ({} ok, {} failed so far)",
                load.ok(),
                load.failed()
            );
        }
    }

    pub fn stop(self) -> Reports {
        let reports = Reports {
            keep_alive: self.keep_alive.stop(),
            new_conn: self.new_conn.stop(),
        };
        progress(format!("load: {}", reports.keep_alive.summary()));
        progress(format!("load: {}", reports.new_conn.summary()));
        reports
    }
}

/// What a load of a scenario may lose today: at most `at_most` requests
/// failed with one of `kinds`, together. Every kind not named must be 0.
/// Each use says why it is not 0 yet and what will bring it there.
#[derive(Clone, Copy, Debug)]
pub struct Loss {
    pub kinds: &'static [FailureKind],
    pub at_most: u64,
}

impl Loss {
    /// Nothing, of any kind.
    pub const NONE: Loss = Loss {
        kinds: &[],
        at_most: 0,
    };
}

/// Every failure kind with its count, zeros included: `refused=0 reset=1 ...`.
pub fn every_kind(report: &Report) -> String {
    FailureKind::ALL
        .iter()
        .map(|&k| format!("{k}={}", report.failures_of(k)))
        .collect::<Vec<_>>()
        .join(" ")
}

impl Reports {
    /// Panics, with both summaries and the first failures, unless both
    /// loads lost nothing, of any kind (refused, reset, timeout, EOF before
    /// a response, bad response, non-2xx, other I/O errors).
    pub fn assert_no_failures(&self) {
        self.assert_losses(Loss::NONE, Loss::NONE);
    }

    /// Panics, with every kind's count and the first failures, if a load
    /// lost a request of a kind its [`Loss`] does not name, or more than
    /// its bound of the kinds it names.
    pub fn assert_losses(&self, keep_alive: Loss, new_conn: Loss) {
        let mut wrong = Vec::new();
        for (report, loss) in [(&self.keep_alive, keep_alive), (&self.new_conn, new_conn)] {
            for kind in FailureKind::ALL {
                let n = report.failures_of(kind);
                if n > 0 && !loss.kinds.contains(&kind) {
                    wrong.push(format!("{}: {n} {kind}, allowed 0", report.mode));
                }
            }
            let allowed: u64 = loss.kinds.iter().map(|&k| report.failures_of(k)).sum();
            if allowed > loss.at_most {
                let names: Vec<&str> = loss.kinds.iter().map(|k| k.name()).collect();
                wrong.push(format!(
                    "{}: {allowed} of {} together, allowed at most {}",
                    report.mode,
                    names.join(" + "),
                    loss.at_most
                ));
            }
        }
        if wrong.is_empty() {
            return;
        }
        let first: Vec<String> = self
            .both()
            .iter()
            .flat_map(|r| {
                r.failure_log.iter().take(10).map(move |f| {
                    format!(
                        "  {} +{:.3}s {f}",
                        r.mode,
                        f.at.saturating_duration_since(r.start).as_secs_f64()
                    )
                })
            })
            .collect();
        panic!(
            "the load lost requests:\n{}\n{}: {}\n{}: {}\n{}\n{}\nfirst failures:\n{}",
            wrong.join("\n"),
            self.keep_alive.mode,
            every_kind(&self.keep_alive),
            self.new_conn.mode,
            every_kind(&self.new_conn),
            self.keep_alive.summary(),
            self.new_conn.summary(),
            first.join("\n")
        );
    }

    pub fn both(&self) -> [&Report; 2] {
        [&self.keep_alive, &self.new_conn]
    }
}
