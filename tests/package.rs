//! The Debian package: `packaging/build-deb` builds it, lintian finds no
//! error in it, and it holds every file the package promises, with the
//! contents of their sources in the repository. Needs root (dpkg-deb's
//! ownership, apt-get for lintian); skipped with a message otherwise.
//! Installing it under a real systemd is for the systemd tests.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// Files the package ships besides the man pages (one per `docs/man/*.1`).
const FILES: &[&str] = &[
    "./usr/bin/nogap",
    "./usr/libexec/nogap/nogap-demo",
    "./usr/lib/systemd/system/nogap@.service",
    "./usr/share/bash-completion/completions/nogap",
    "./usr/share/zsh/vendor-completions/_nogap",
    "./usr/share/fish/vendor_completions.d/nogap.fish",
    "./usr/share/doc/nogap/examples/demo.toml",
    "./usr/share/doc/nogap/copyright",
    "./usr/share/doc/nogap/changelog.Debian.gz",
    "./usr/share/doc/nogap/systemd.md",
    "./etc/nogap/",
];

/// Shipped files that are copies of a repository file.
const COPIES: &[(&str, &str)] = &[
    (
        "./usr/lib/systemd/system/nogap@.service",
        "units/nogap@.service",
    ),
    (
        "./usr/share/doc/nogap/examples/demo.toml",
        "examples/demo.toml",
    ),
    (
        "./usr/share/bash-completion/completions/nogap",
        "packaging/completions/nogap.bash",
    ),
    (
        "./usr/share/zsh/vendor-completions/_nogap",
        "packaging/completions/_nogap",
    ),
    (
        "./usr/share/fish/vendor_completions.d/nogap.fish",
        "packaging/completions/nogap.fish",
    ),
];

fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Installs the Debian packages that provide `tools`, as tests/run-all.sh does.
fn ensure_tools(tools: &[(&str, &str)]) {
    let missing: Vec<&str> = tools
        .iter()
        .filter(|(tool, _)| which(tool).is_none())
        .map(|&(_, pkg)| pkg)
        .collect();
    if missing.is_empty() {
        return;
    }
    run(Command::new("apt-get").args(["update", "-qq"]));
    run(Command::new("apt-get")
        .args(["install", "-y", "-qq"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"));
}

fn which(tool: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join(tool))
            .find(|p| p.is_file())
    })
}

/// The contents of `member` in the package's data archive.
fn member(deb: &Path, member: &str) -> Vec<u8> {
    let tar = run(Command::new("dpkg-deb").arg("--fsys-tarfile").arg(deb)).stdout;
    let mut child = Command::new("tar")
        .args(["-xO", member])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("tar");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(&tar)
        .expect("feed tar");
    let out = child.wait_with_output().expect("tar");
    assert!(out.status.success(), "{member} is not in the package");
    out.stdout
}

fn gunzip(bytes: &[u8]) -> Vec<u8> {
    let mut child = Command::new("gzip")
        .arg("-dc")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("gzip");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(bytes)
        .expect("feed gzip");
    let out = child.wait_with_output().expect("gzip");
    assert!(out.status.success(), "not gzip");
    out.stdout
}

#[test]
fn build_deb_makes_a_lintian_clean_package_with_every_file() {
    if !nix::unistd::geteuid().is_root() {
        // Past the test harness's capture, so that the skip is seen.
        let _ = writeln!(
            std::io::stderr(),
            "tests/package.rs: SKIPPED, not root (building and checking the .deb needs root)"
        );
        return;
    }
    ensure_tools(&[
        ("lintian", "lintian"),
        ("dpkg-shlibdeps", "dpkg-dev"),
        ("strip", "binutils"),
    ]);
    let out_dir = tempfile::tempdir().expect("tempdir");

    let out = run(Command::new("bash")
        .arg(Path::new(ROOT).join("packaging/build-deb"))
        .arg(out_dir.path()));
    let stdout = text(&out.stdout);
    let last = stdout.lines().last().expect("build-deb printed nothing");
    let deb = Path::new(last);
    let arch = text(&run(Command::new("dpkg").arg("--print-architecture")).stdout);
    let name = format!("nogap_{}-1_{}.deb", env!("CARGO_PKG_VERSION"), arch.trim());
    assert_eq!(
        deb.file_name().and_then(|n| n.to_str()),
        Some(name.as_str()),
        "last line of stdout: {last}"
    );
    assert!(deb.is_file(), "{last} is not a file");

    // lintian: no error. Its exit status is 0 with warnings, 1 with errors.
    let lint = Command::new("lintian")
        .arg(deb)
        .output()
        .expect("run lintian");
    let report = text(&lint.stdout);
    let errors: Vec<&str> = report.lines().filter(|l| l.starts_with("E:")).collect();
    assert!(
        errors.is_empty(),
        "lintian errors:\n{report}{}",
        text(&lint.stderr)
    );

    // Every promised file, and no man page left behind.
    let listing = text(&run(Command::new("dpkg-deb").arg("-c").arg(deb)).stdout);
    let paths: Vec<&str> = listing
        .lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .collect();
    let mut expected: Vec<String> = FILES.iter().map(|f| f.to_string()).collect();
    let mut pages = 0;
    for entry in std::fs::read_dir(Path::new(ROOT).join("docs/man")).expect("docs/man") {
        let name = entry.expect("readdir").file_name();
        let name = name.to_str().expect("UTF-8 name");
        expected.push(format!("./usr/share/man/man1/{name}.gz"));
        pages += 1;
    }
    assert!(pages >= 4, "docs/man has {pages} pages");
    for file in &expected {
        assert!(
            paths.contains(&file.as_str()),
            "{file} is not in the package:\n{listing}"
        );
    }
    for file in [
        "./usr/share/man/man1/nogap.1.gz",
        "./usr/share/man/man1/nogap-run.1.gz",
    ] {
        assert!(paths.contains(&file), "{file} is not in the package");
    }

    // The shipped files are the repository's.
    for (shipped, source) in COPIES {
        let want = std::fs::read(Path::new(ROOT).join(source)).expect(source);
        assert!(
            member(deb, shipped) == want,
            "{shipped} differs from {source}"
        );
    }
    let page = gunzip(&member(deb, "./usr/share/man/man1/nogap-run.1.gz"));
    let want = std::fs::read(Path::new(ROOT).join("docs/man/nogap-run.1")).unwrap();
    assert!(
        page == want,
        "nogap-run.1.gz differs from docs/man/nogap-run.1"
    );

    // Dependencies as dpkg-shlibdeps computed them.
    let depends = text(&run(Command::new("dpkg-deb").arg("-f").arg(deb).arg("Depends")).stdout);
    assert!(depends.contains("libc6 (>= 2."), "Depends: {depends}");
}
