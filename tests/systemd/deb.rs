//! The Debian package in a booted release: `packaging/build-deb` builds it
//! (once per test process), `dpkg -i` installs it, and `nogap@demo` runs
//! the shipped example configuration as an operator would (README,
//! docs/systemd.md): start, reload under load, a broken configuration,
//! `nogap status demo`, and `dpkg --purge`.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use super::fixture::{Nogap, Traffic, SOON};
use super::harness::{free_port, progress, wait_for, Container, OutputExt, Release, SHARE};

const UNIT: &str = "nogap@demo.service";
const CONFIG: &str = "/etc/nogap/demo.toml";
const EXAMPLE: &str = "/usr/share/doc/nogap/examples/demo.toml";
/// The address in the shipped example configuration.
const SHIPPED_ADDR: &str = "127.0.0.1:8080";

/// What the tree looks like, for the purge check: every path under the
/// directories a package, its units and its instances can touch, except
/// what systemd and the journal change on their own.
const SNAPSHOT: &str = "find /etc /usr /opt /srv /run /var/lib /var/cache/debconf -xdev \
    -not -path '/run/systemd/*' -not -path '/run/user/*' -not -path '/run/log/*' \
    -not -path '/run/udev/*' -not -path '/run/dbus/*' -not -path '/run/nogap-test*' \
    -not -path '/var/lib/systemd/*' -not -path '/opt/nogap/*' \
    -not -path '/run/credentials/*' -not -path '/run/lock/*' \
    -not -name 'ld.so.cache*' -not -path '/etc/machine-id' | sort";

/// The package, built once per test process (both releases share it) with
/// `packaging/build-deb` into `<target>/systemd-deb`, under a file lock
/// against other test processes.
fn package() -> &'static Path {
    static DEB: OnceLock<PathBuf> = OnceLock::new();
    DEB.get_or_init(|| {
        let target = Path::new(env!("CARGO_BIN_EXE_nogap"))
            .ancestors()
            .nth(2)
            .expect("the target directory")
            .to_path_buf();
        let out = target.join("systemd-deb");
        std::fs::create_dir_all(&out).expect("create the package directory");
        let lock = std::fs::File::create(target.join("systemd-deb.lock")).expect("lock file");
        let _lock = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, e)| e)
            .expect("lock the package build");
        progress("building the package (packaging/build-deb, a release build)");
        let started = std::time::Instant::now();
        let built = std::process::Command::new("bash")
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/build-deb"))
            .arg(&out)
            .stderr(std::process::Stdio::inherit())
            .output()
            .expect("run packaging/build-deb");
        let stdout = String::from_utf8_lossy(&built.stdout);
        assert!(built.status.success(), "build-deb failed: {stdout}");
        let deb = PathBuf::from(stdout.lines().last().expect("build-deb printed the path"));
        progress(format!(
            "package {} built in {:.0?}",
            deb.display(),
            started.elapsed()
        ));
        deb
    })
}

/// Install, serve, reload under load, refuse a broken configuration while
/// serving on, answer `nogap status demo`, and purge without a trace.
pub fn install_serve_reload_purge(release: Release) {
    let deb = package();
    let n = Nogap {
        c: Container::boot(release),
        port: free_port(),
    };
    let c = &n.c;
    let before = c.sh(SNAPSHOT).expect_success("snapshot before install");

    std::fs::copy(deb, c.share_dir().join("nogap.deb")).expect("copy the package");
    c.exec(&["dpkg", "-i", &format!("{SHARE}/nogap.deb")])
        .expect_success("dpkg -i nogap.deb");
    // The operator's steps, with the port moved to a free one.
    let example = c.exec(&["cat", EXAMPLE]).expect_success("read the example");
    assert!(example.contains(SHIPPED_ADDR), "{EXAMPLE}:\n{example}");
    let config = example.replace(SHIPPED_ADDR, &n.addr().to_string());
    c.write_file(CONFIG, config.as_bytes(), 0o644);
    n.systemctl(&["enable", "--now", "nogap@demo"]);
    assert_eq!(n.show(UNIT, "ActiveState"), "active");
    assert_eq!(n.serving_generation(), 1);

    // Reloads under load: each returns once the new generation serves.
    let traffic = Traffic::start(n.addr(), 3);
    for gen in 2..=4 {
        n.systemctl(&["reload", "nogap@demo"]);
        assert_eq!(n.serving_generation(), gen);
        traffic.wait_for_answers(10);
    }
    // A broken configuration: the reload fails, generation 4 serves on.
    c.write_file(CONFIG, format!("{config}\nwrokers = 3\n").as_bytes(), 0o644);
    let failed = c.systemctl(&["reload", "nogap@demo"]);
    assert!(
        !failed.status.success(),
        "a broken config reloaded: {failed:?}"
    );
    let status = n.show(UNIT, "StatusText");
    assert!(
        status.starts_with("generation 4: 2/2 workers ready")
            && status.contains(&format!("{CONFIG}:"))
            && status.contains("unknown key 'wrokers'"),
        "StatusText={status:?}"
    );
    assert_eq!(n.show(UNIT, "ActiveState"), "active");
    traffic.wait_for_answers(10);
    assert_eq!(n.serving_generation(), 4);
    let out = c.exec(&["nogap", "status", "demo"]);
    let text = out.expect_success("nogap status demo");
    assert!(text.contains("unknown key 'wrokers'"), "{text}");
    // Repaired, with one more worker: deployed by the next reload.
    let three = config.replace("workers = 2", "workers = 3");
    assert_ne!(three, config, "the example no longer says workers = 2");
    c.write_file(CONFIG, three.as_bytes(), 0o644);
    n.systemctl(&["reload", "nogap@demo"]);
    assert!(
        n.show(UNIT, "StatusText")
            .starts_with("generation 5: 3/3 workers ready"),
        "{}",
        n.show(UNIT, "StatusText")
    );
    traffic.wait_for_answers(10);
    traffic.stop().assert_no_failures();

    // Purge: the instance stops, and nothing is left but what the operator
    // wrote (the configuration, which dpkg does not own).
    c.exec(&["dpkg", "--purge", "nogap"])
        .expect_success("dpkg --purge nogap");
    wait_for("the instance to stop", SOON, || {
        (n.show(UNIT, "ActiveState") != "active").then_some(())
    });
    assert!(n.cgroup_procs(UNIT).is_empty(), "processes left in {UNIT}");
    c.exec(&["rm", CONFIG])
        .expect_success("rm the configuration");
    c.exec(&["rmdir", "/etc/nogap"])
        .expect_success("rmdir /etc/nogap");
    let after = c.sh(SNAPSHOT).expect_success("snapshot after purge");
    let diff = |a: &str, b: &str| -> Vec<String> {
        let b: std::collections::BTreeSet<&str> = b.lines().collect();
        a.lines()
            .filter(|l| !b.contains(l))
            .map(str::to_owned)
            .collect()
    };
    let (left, gone) = (diff(&after, &before), diff(&before, &after));
    assert!(
        left.is_empty() && gone.is_empty(),
        "dpkg --purge left {left:#?}\nand removed {gone:#?}"
    );
}
