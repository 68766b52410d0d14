//! One cgroup per container, in every hierarchy nspawn writes to.
//!
//! `systemd-nspawn --keep-unit --register=no` without systemd on the host moves
//! itself to `<own cgroup>/supervisor` and the container to
//! `<own cgroup>/payload`. Two containers started from the same cgroup would
//! share those, so each container's nspawn is started in a cgroup of its own,
//! named after the machine, in the unified (cgroup2) hierarchy and, on a
//! hybrid host, in the legacy `name=systemd` one. The directory is also how
//! teardown finds, kills and accounts for everything the container ran.
//! Root filesystem builds run in one too, so a build orphaned by a killed test
//! process can be stopped before its tree is removed.
//!
//! Names are `nogap-<release>-<owner pid>-<what>`: when the owner is gone,
//! [`sweep_stale`] kills and removes what it left.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use super::process::try_wait_for;

/// A container's cgroup directories, unified hierarchy first (when mounted).
pub struct Cgroups {
    dirs: Vec<PathBuf>,
    unified: Option<PathBuf>,
}

/// A cgroup hierarchy nspawn uses: where it is mounted and where this process sits in it.
struct Hierarchy {
    mount: PathBuf,
    own: String,
    unified: bool,
}

impl Cgroups {
    /// Creates `<own cgroup>/<name>` in each hierarchy.
    pub fn create(name: &str) -> io::Result<Cgroups> {
        let mut dirs = Vec::new();
        let mut unified = None;
        for h in hierarchies()? {
            let dir = h.mount.join(h.own.trim_start_matches('/')).join(name);
            fs::create_dir(&dir)?;
            if h.unified {
                unified = Some(dir.clone());
            }
            dirs.push(dir);
        }
        Ok(Cgroups { dirs, unified })
    }

    /// A command that runs `program` in these cgroups: a shell writes its
    /// pid to every `cgroup.procs`, then execs `program` (no `unsafe`
    /// pre-exec hook needed).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        const ENTER: &str =
            r#"while [ "$1" != -- ]; do echo $$ > "$1" || exit 1; shift; done; shift; exec "$@""#;
        let mut cmd = Command::new("/bin/sh");
        cmd.args(["-c", ENTER, "sh"])
            .args(self.dirs.iter().map(|d| d.join("cgroup.procs")))
            .arg("--")
            .arg(program);
        cmd
    }

    /// Kills what is left, waits for it to be gone and removes the trees;
    /// returns what could not be removed.
    pub fn kill_and_remove(&self, timeout: Duration) -> Vec<String> {
        self.kill_all();
        let _ = try_wait_for(timeout, || (!self.populated()).then_some(()));
        self.remove(timeout)
    }

    /// Whether any process is left in any of the trees.
    pub fn populated(&self) -> bool {
        self.dirs.iter().any(|d| tree_populated(d))
    }

    /// Kills every process in the trees: `cgroup.kill` where the kernel has
    /// it, SIGKILL to each listed pid otherwise.
    pub fn kill_all(&self) {
        if let Some(dir) = &self.unified {
            if fs::write(dir.join("cgroup.kill"), "1").is_ok() {
                return;
            }
        }
        for dir in &self.dirs {
            for pid in tree_pids(dir) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::SIGKILL,
                );
            }
        }
    }

    /// Removes the trees, deepest first. A cgroup with processes in it cannot
    /// be removed, so this retries until `timeout`; returns what is left.
    pub fn remove(&self, timeout: Duration) -> Vec<String> {
        let mut left = Vec::new();
        for dir in &self.dirs {
            let gone = try_wait_for(timeout, || remove_tree(dir).then_some(()));
            if gone.is_none() {
                left.push(format!(
                    "cgroup {} (pids {:?})",
                    dir.display(),
                    tree_pids(dir)
                ));
            }
        }
        left
    }

    pub fn dirs(&self) -> &[PathBuf] {
        &self.dirs
    }
}

/// Containers and builds whose test process is gone (killed before its
/// `Drop` ran): the cgroups named `nogap-<release>-<pid>-<what>` beside ours
/// whose pid no longer exists. Kills what is in them and removes them;
/// returns their names.
pub fn sweep_stale(timeout: Duration) -> Vec<String> {
    let Ok(hs) = hierarchies() else {
        return Vec::new();
    };
    let mut swept = Vec::new();
    for h in &hs {
        let parent = h.mount.join(h.own.trim_start_matches('/'));
        let Ok(entries) = fs::read_dir(&parent) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(owner) = owner_pid(&name) else {
                continue;
            };
            if Path::new(&format!("/proc/{owner}")).exists() || swept.contains(&name) {
                continue;
            }
            swept.push(name);
        }
    }
    for name in &swept {
        let cg = Cgroups {
            dirs: hs
                .iter()
                .map(|h| h.mount.join(h.own.trim_start_matches('/')).join(name))
                .filter(|d| d.is_dir())
                .collect(),
            unified: hs
                .iter()
                .find(|h| h.unified)
                .map(|h| h.mount.join(h.own.trim_start_matches('/')).join(name)),
        };
        cg.kill_and_remove(timeout);
    }
    swept
}

/// `nogap-<release>-<pid>-<what>` → pid.
fn owner_pid(name: &str) -> Option<u32> {
    let mut parts = name.split('-');
    if parts.next()? != "nogap" {
        return None;
    }
    let _release = parts.next()?;
    let pid = parts.next()?.parse().ok()?;
    let what = parts.next()?;
    let word = !what.is_empty() && what.bytes().all(|b| b.is_ascii_alphanumeric());
    (word && parts.next().is_none()).then_some(pid)
}

/// The unified hierarchy and the legacy `name=systemd` one, where mounted.
fn hierarchies() -> io::Result<Vec<Hierarchy>> {
    let own = fs::read_to_string("/proc/self/cgroup")?;
    let own_path = |key: &str| {
        own.lines().find_map(|l| {
            let (_, rest) = l.split_once(':')?;
            let (controllers, path) = rest.split_once(':')?;
            (controllers == key).then(|| path.to_owned())
        })
    };
    let mut found = Vec::new();
    for line in fs::read_to_string("/proc/self/mountinfo")?.lines() {
        // id parent major:minor root mount-point options [optional...] - fstype source super-options
        let fields: Vec<&str> = line.split(' ').collect();
        let Some(dash) = fields.iter().position(|f| *f == "-") else {
            continue;
        };
        let (Some(mount), Some(fstype), Some(options)) =
            (fields.get(4), fields.get(dash + 1), fields.get(dash + 3))
        else {
            continue;
        };
        let (unified, key) = match *fstype {
            "cgroup2" => (true, ""),
            "cgroup" if options.split(',').any(|o| o == "name=systemd") => (false, "name=systemd"),
            _ => continue,
        };
        if found.iter().any(|h: &Hierarchy| h.unified == unified) {
            continue;
        }
        let Some(own) = own_path(key) else {
            continue;
        };
        found.push(Hierarchy {
            mount: PathBuf::from(mount),
            own,
            unified,
        });
    }
    found.sort_by_key(|h| !h.unified);
    if found.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            "no cgroup2 or name=systemd hierarchy mounted",
        ));
    }
    Ok(found)
}

fn tree_populated(dir: &Path) -> bool {
    // cgroup2 keeps the answer for the whole subtree in cgroup.events.
    if let Ok(events) = fs::read_to_string(dir.join("cgroup.events")) {
        return events.lines().any(|l| l == "populated 1");
    }
    !tree_pids(dir).is_empty()
}

fn tree_pids(dir: &Path) -> Vec<i32> {
    let mut pids: Vec<i32> = fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect();
    for sub in subdirs(dir) {
        pids.extend(tree_pids(&sub));
    }
    pids
}

fn subdirs(dir: &Path) -> Vec<PathBuf> {
    fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default()
}

/// rmdir the tree, children first; true when `dir` is gone.
fn remove_tree(dir: &Path) -> bool {
    if !dir.exists() {
        return true;
    }
    for sub in subdirs(dir) {
        remove_tree(&sub);
    }
    fs::remove_dir(dir).is_ok() || !dir.exists()
}

#[cfg(test)]
mod tests {
    use super::owner_pid;

    #[test]
    fn machine_names_carry_the_owner_pid() {
        assert_eq!(owner_pid("nogap-trixie-123-4"), Some(123));
        assert_eq!(owner_pid("nogap-trixie-123-rootfs"), Some(123));
        assert_eq!(owner_pid("nogap-trixie-123"), None);
        assert_eq!(owner_pid("nogap-trixie-123-4-5"), None);
        assert_eq!(owner_pid("payload"), None);
        assert_eq!(owner_pid("nogap-trixie-x-4"), None);
    }
}
