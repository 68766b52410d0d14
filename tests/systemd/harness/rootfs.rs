//! Debian root filesystems for the containers, built once with `debootstrap`
//! and cached outside the repository.
//!
//! `<cache>/rootfs-<release>` is complete or absent: it is built in
//! `rootfs-<release>.tmp-<pid>` and renamed into place, under the lock file
//! `rootfs-<release>.lock`, so parallel test processes build it once. The
//! stamp file inside names everything the build depends on; a different
//! stamp (a changed package list or configuration) rebuilds it.

use std::fs;
use std::io;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use nix::fcntl::{Flock, FlockArg};

use super::cgroup::Cgroups;
use super::container::sweep_once;
use super::process::{progress, run, run_logged, try_wait_for, OutputExt};

/// Where root filesystems are cached, unless `NOGAP_TEST_CACHE` says otherwise.
const DEFAULT_CACHE: &str = "/var/cache/nogap-tests";
/// Bump when [`configure`] changes in a way the stamp does not show.
const CONFIG_VERSION: u32 = 1;
/// Installed on top of `--variant=minbase`. Nothing else is needed inside:
/// load comes from the host over loopback, binaries are bind-mounted.
const PACKAGES: &[&str] = &["systemd", "systemd-sysv", "dbus"];
/// Units that are useless or slow in a test container: consoles, periodic
/// maintenance, first-boot prompts.
const MASKED: &[&str] = &[
    "console-getty.service",
    "container-getty@.service",
    "getty@.service",
    "serial-getty@.service",
    "getty.target",
    "systemd-firstboot.service",
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "dpkg-db-backup.timer",
    "e2scrub_all.timer",
    "e2scrub_reap.service",
    "fstrim.timer",
];
/// Journal settings: in memory, and no rate limit, so tests reading the
/// journal see every line.
const JOURNALD_CONF: &str = "[Journal]\nStorage=volatile\nRateLimitIntervalSec=0\n";
/// Host tools the harness runs, and the packages that provide them.
const HOST_TOOLS: &[&str] = &["debootstrap", "systemd-nspawn", "nsenter"];
const HOST_PACKAGES: &[&str] = &["debootstrap", "systemd-container", "debian-archive-keyring"];
/// PATH for every command the harness starts, on the host and inside.
pub const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

const BUILD_TIMEOUT: Duration = Duration::from_secs(20 * 60);
const LOCK_TIMEOUT: Duration = Duration::from_secs(25 * 60);
const APT_TIMEOUT: Duration = Duration::from_secs(10 * 60);
const UMOUNT_TIMEOUT: Duration = Duration::from_secs(30);
const KILL_TIMEOUT: Duration = Duration::from_secs(10);

/// A Debian release the containers can run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Release {
    /// Debian 12, systemd 252.
    Bookworm,
    /// Debian 13, systemd 257 (`Type=notify-reload`, `FileDescriptorStorePreserve=`).
    Trixie,
}

impl Release {
    pub const ALL: [Release; 2] = [Release::Bookworm, Release::Trixie];

    pub fn codename(self) -> &'static str {
        match self {
            Release::Bookworm => "bookworm",
            Release::Trixie => "trixie",
        }
    }

    /// The major systemd version the release ships.
    pub fn systemd_version(self) -> u32 {
        match self {
            Release::Bookworm => 252,
            Release::Trixie => 257,
        }
    }
}

/// A complete, cached root filesystem. Containers use it as the read-only
/// lower layer of an overlay; nothing writes to it after the build.
#[derive(Clone, Debug)]
pub struct Rootfs {
    release: Release,
    path: PathBuf,
}

impl Rootfs {
    /// Returns the cached root filesystem of `release`, building it first
    /// (about a minute) if it is missing or stale. Installs the host tools if
    /// they are missing. Panics, with the build log, if that fails.
    pub fn ensure(release: Release) -> Rootfs {
        assert!(
            nix::unistd::geteuid().is_root(),
            "the systemd tests need root (apt-get, debootstrap, systemd-nspawn, cgroups)"
        );
        ensure_host_tools();
        sweep_once();
        let cache = cache_dir();
        fs::create_dir_all(&cache).unwrap_or_else(|e| panic!("create {}: {e}", cache.display()));
        let name = format!("rootfs-{}", release.codename());
        let path = cache.join(&name);
        let _lock = lock(&cache.join(format!("{name}.lock")));
        let want = stamp(release);
        if fs::read_to_string(path.join(STAMP_FILE)).is_ok_and(|have| have == want) {
            return Rootfs { release, path };
        }
        build(release, &cache, &path, &want);
        Rootfs { release, path }
    }

    pub fn release(&self) -> Release {
        self.release
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// The cache directory: `$NOGAP_TEST_CACHE`, or `/var/cache/nogap-tests`.
pub fn cache_dir() -> PathBuf {
    std::env::var_os("NOGAP_TEST_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_CACHE))
}

/// Lives at the top of the root filesystem, written last before the rename.
const STAMP_FILE: &str = ".nogap-rootfs-stamp";

fn stamp(release: Release) -> String {
    format!(
        "nogap test rootfs v{CONFIG_VERSION}\nrelease: {}\nvariant: minbase\npackages: {}\nmasked: {}\njournald: {JOURNALD_CONF:?}\n",
        release.codename(),
        PACKAGES.join(","),
        MASKED.join(","),
    )
}

/// Takes the exclusive lock `path`, waiting for another holder at most
/// [`LOCK_TIMEOUT`] (longer than a build takes).
fn lock(path: &Path) -> Flock<fs::File> {
    let open = || {
        fs::File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .unwrap_or_else(|e| panic!("open lock file {}: {e}", path.display()))
    };
    let mut announced = false;
    try_wait_for(LOCK_TIMEOUT, || {
        match Flock::lock(open(), FlockArg::LockExclusiveNonblock) {
            Ok(lock) => Some(lock),
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
                if !announced {
                    progress(format!(
                        "waiting for {} (another test process is building)",
                        path.display()
                    ));
                    announced = true;
                }
                None
            }
            Err((_, e)) => panic!("lock {}: {e}", path.display()),
        }
    })
    .unwrap_or_else(|| panic!("{} still locked after {LOCK_TIMEOUT:?}", path.display()))
}

/// Installs `debootstrap`, `systemd-nspawn` and `nsenter` if any is missing
/// (fresh CI machines), once per process and under a lock.
fn ensure_host_tools() {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| {
        if HOST_TOOLS.iter().all(|t| host_tool(t).is_some()) {
            return;
        }
        let cache = cache_dir();
        fs::create_dir_all(&cache).unwrap_or_else(|e| panic!("create {}: {e}", cache.display()));
        let _lock = lock(&cache.join("host-tools.lock"));
        if HOST_TOOLS.iter().all(|t| host_tool(t).is_some()) {
            return;
        }
        progress(format!(
            "installing {} with apt-get...",
            HOST_PACKAGES.join(" ")
        ));
        let apt = |args: &[&str]| {
            let mut cmd = Command::new("apt-get");
            cmd.args(["-o", "DPkg::Lock::Timeout=300"])
                .args(args)
                .env("PATH", PATH)
                .env("DEBIAN_FRONTEND", "noninteractive");
            run(&mut cmd, None, APT_TIMEOUT)
                .unwrap_or_else(|e| panic!("{e}"))
                .expect_success(&format!("apt-get {}", args.join(" ")));
        };
        apt(&["update"]);
        let mut install = vec!["install", "-y", "--no-install-recommends"];
        install.extend(HOST_PACKAGES);
        apt(&install);
        for tool in HOST_TOOLS {
            assert!(
                host_tool(tool).is_some(),
                "{tool} still missing after installing {HOST_PACKAGES:?}"
            );
        }
    });
}

/// The absolute path of a host program, looked up in [`PATH`].
pub fn host_tool(name: &str) -> Option<PathBuf> {
    PATH.split(':')
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
}

/// The Debian mirror apt on this host uses (`$NOGAP_TEST_MIRROR` overrides):
/// the first `URIs:` (deb822) or `deb` line whose URL ends in `/debian`.
fn debian_mirror() -> String {
    if let Ok(mirror) = std::env::var("NOGAP_TEST_MIRROR") {
        return mirror;
    }
    let mut files = vec![PathBuf::from("/etc/apt/sources.list")];
    if let Ok(entries) = fs::read_dir("/etc/apt/sources.list.d") {
        let mut more: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
        more.sort();
        files.extend(more);
    }
    for file in files {
        let Ok(text) = fs::read_to_string(&file) else {
            continue;
        };
        for line in text.lines().map(str::trim) {
            let uris: Vec<&str> = if let Some(rest) = line.strip_prefix("URIs:") {
                rest.split_whitespace().collect()
            } else if let Some(rest) = line.strip_prefix("deb ") {
                // deb [options] uri suite components
                rest.split_whitespace()
                    .skip_while(|w| w.starts_with('[') || !w.contains("://"))
                    .take(1)
                    .collect()
            } else {
                continue;
            };
            if let Some(uri) = uris
                .into_iter()
                .find(|u| u.trim_end_matches('/').ends_with("/debian"))
            {
                return uri.to_owned();
            }
        }
    }
    panic!("no Debian mirror in /etc/apt/sources.list*; set NOGAP_TEST_MIRROR");
}

/// Builds the root filesystem in a temporary directory beside `path` and
/// renames it into place.
fn build(release: Release, cache: &Path, path: &Path, stamp: &str) {
    let codename = release.codename();
    remove_leftovers(cache, codename);
    let mirror = debian_mirror();
    let tmp = cache.join(format!("rootfs-{codename}.tmp-{}", std::process::id()));
    let log = cache.join(format!("rootfs-{codename}.build.log"));
    let _ = fs::remove_file(&log);
    progress(format!(
        "building rootfs {codename} (about 1 minute) from {mirror}, log in {}...",
        log.display()
    ));
    let started = Instant::now();
    let debootstrap = host_tool("debootstrap").expect("debootstrap is installed");
    let cgroups = Cgroups::create(&format!("nogap-{codename}-{}-rootfs", std::process::id()))
        .unwrap_or_else(|e| panic!("create cgroups for the build: {e}"));
    let mut cmd = cgroups.command(debootstrap);
    cmd.arg("--variant=minbase")
        .arg(format!("--include={}", PACKAGES.join(",")))
        .args([codename, &tmp.to_string_lossy(), &mirror])
        .env_clear()
        .env("PATH", PATH)
        .env("LANG", "C.UTF-8");
    let result = run_logged(&mut cmd, &log, BUILD_TIMEOUT);
    // Whatever debootstrap left running (after a timeout) goes with its cgroup.
    let left = cgroups.kill_and_remove(KILL_TIMEOUT);
    assert!(left.is_empty(), "debootstrap left {left:?}");
    let failure = match result {
        Ok(status) if status.success() => None,
        Ok(status) => Some(format!("debootstrap {codename} failed ({status})")),
        Err(e) => Some(e.to_string()),
    };
    if let Some(failure) = failure {
        remove_dir_unmounted(&tmp);
        panic!(
            "{failure}; last lines of {}:\n{}",
            log.display(),
            tail(&log, 30)
        );
    }
    configure(&tmp).unwrap_or_else(|e| panic!("configure rootfs {}: {e}", tmp.display()));
    fs::write(tmp.join(STAMP_FILE), stamp).unwrap_or_else(|e| panic!("write stamp: {e}"));
    if path.exists() {
        // Stale: move it aside first; rename cannot replace a non-empty directory.
        let old = cache.join(format!("rootfs-{codename}.old-{}", std::process::id()));
        fs::rename(path, &old).unwrap_or_else(|e| panic!("move {} aside: {e}", path.display()));
        remove_dir_unmounted(&old);
    }
    fs::rename(&tmp, path).unwrap_or_else(|e| panic!("rename {} into place: {e}", tmp.display()));
    progress(format!(
        "built rootfs {codename} in {:.0?}",
        started.elapsed()
    ));
}

/// Makes the debootstrapped tree boot quickly and quietly in a container.
fn configure(root: &Path) -> io::Result<()> {
    // Empty machine-id: systemd makes up a transient one per boot, so
    // containers differ, and it is not a "first boot" (no firstboot prompts).
    fs::write(root.join("etc/machine-id"), "")?;
    replace_with_symlink("/etc/machine-id", &root.join("var/lib/dbus/machine-id"))?;
    // No /etc/hostname: the container keeps the machine name nspawn gives it.
    remove_if_exists(&root.join("etc/hostname"))?;
    // root without a password (console login, should anyone need it).
    let shadow = root.join("etc/shadow");
    let text = fs::read_to_string(&shadow)?;
    let text: Vec<String> = text
        .lines()
        .map(|line| {
            let mut fields: Vec<&str> = line.split(':').collect();
            if fields.len() > 1 && fields[0] == "root" {
                fields[1] = "";
            }
            fields.join(":")
        })
        .collect();
    fs::write(&shadow, text.join("\n") + "\n")?;
    let units = root.join("etc/systemd/system");
    for unit in MASKED {
        replace_with_symlink("/dev/null", &units.join(unit))?;
    }
    replace_with_symlink(
        "/lib/systemd/system/multi-user.target",
        &units.join("default.target"),
    )?;
    let journald = root.join("etc/systemd/journald.conf.d");
    fs::create_dir_all(&journald)?;
    fs::write(journald.join("nogap-tests.conf"), JOURNALD_CONF)?;
    // Downloaded packages and indexes are not needed inside.
    for dir in ["var/cache/apt/archives", "var/lib/apt/lists"] {
        for entry in fs::read_dir(root.join(dir))?.flatten() {
            if entry.file_type()?.is_file() && entry.file_name() != "lock" {
                fs::remove_file(entry.path())?;
            }
        }
    }
    Ok(())
}

fn replace_with_symlink(target: &str, link: &Path) -> io::Result<()> {
    if let Some(parent) = link.parent() {
        fs::create_dir_all(parent)?;
    }
    remove_if_exists(link)?;
    symlink(target, link)
}

fn remove_if_exists(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Removes half-built and replaced trees of `codename` left by killed test
/// processes. Only called under the rootfs lock, so none is in use, and after
/// [`sweep_once`] stopped their orphaned debootstrap.
fn remove_leftovers(cache: &Path, codename: &str) {
    let Ok(entries) = fs::read_dir(cache) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let prefix = format!("rootfs-{codename}.");
        if name.starts_with(&prefix)
            && (name[prefix.len()..].starts_with("tmp-")
                || name[prefix.len()..].starts_with("old-"))
        {
            progress(format!("removing leftover {}", entry.path().display()));
            remove_dir_unmounted(&entry.path());
        }
    }
}

/// `rm -rf dir`, after unmounting what an interrupted debootstrap may have
/// left mounted inside (`proc`, `sys`, ...): never delete through a mount.
fn remove_dir_unmounted(dir: &Path) {
    for mount in mounts_under(dir).into_iter().rev() {
        let mut cmd = Command::new("umount");
        cmd.args(["--lazy", &mount]).env("PATH", PATH);
        let _ = run(&mut cmd, None, UMOUNT_TIMEOUT);
    }
    let left = mounts_under(dir);
    assert!(
        left.is_empty(),
        "cannot unmount {left:?}; not removing {}",
        dir.display()
    );
    if let Err(e) = fs::remove_dir_all(dir) {
        if e.kind() != io::ErrorKind::NotFound {
            panic!("remove {}: {e}", dir.display());
        }
    }
}

/// Mount points at or below `dir`, in mount order.
pub fn mounts_under(dir: &Path) -> Vec<String> {
    let dir = dir.to_string_lossy();
    let inside = format!("{}/", dir.trim_end_matches('/'));
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|m| m.replace("\\040", " "))
        .filter(|m| *m == *dir || m.starts_with(&inside))
        .collect()
}

/// The last `n` lines of a file, for failure messages.
pub fn tail(path: &Path, n: usize) -> String {
    let text = fs::read_to_string(path)
        .unwrap_or_else(|e| format!("(cannot read {}: {e})", path.display()));
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
