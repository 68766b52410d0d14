//! The man pages (`docs/man/`) and shell completions (`packaging/completions/`)
//! are generated from the clap definitions, `nogap::cli::Cli`, the same ones
//! that make `--help`, and checked in so that packaging needs no build step.
//! This test generates them in memory and fails when a checked-in file
//! differs, is missing, or is left over. To rewrite them:
//!
//! ```sh
//! NOGAP_UPDATE_DOCS=1 cargo test --test docs
//! ```

use std::fs;
use std::path::{Path, PathBuf};

use clap::CommandFactory;
use clap_complete::Shell;
use nogap::cli::Cli;

#[path = "docs/man.rs"]
mod man;

const MAN_DIR: &str = "docs/man";
const COMPLETIONS_DIR: &str = "packaging/completions";
const UPDATE_VAR: &str = "NOGAP_UPDATE_DOCS";

/// Every generated file: path relative to the repository root, and contents.
fn generate() -> Vec<(PathBuf, String)> {
    let mut files: Vec<(PathBuf, String)> = man::pages(Cli::command())
        .into_iter()
        .map(|(name, text)| (Path::new(MAN_DIR).join(name), text))
        .collect();
    for (shell, name) in [
        (Shell::Bash, "nogap.bash"),
        (Shell::Zsh, "_nogap"),
        (Shell::Fish, "nogap.fish"),
    ] {
        let mut buf = Vec::new();
        clap_complete::generate(shell, &mut Cli::command(), "nogap", &mut buf);
        let text = String::from_utf8(buf).expect("completions are UTF-8");
        files.push((Path::new(COMPLETIONS_DIR).join(name), text));
    }
    files
}

/// Checked-in files in the generated directories that nothing generates any
/// more (a removed subcommand's page, say).
fn left_over(root: &Path, generated: &[(PathBuf, String)]) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for dir in [MAN_DIR, COMPLETIONS_DIR] {
        let Ok(entries) = fs::read_dir(root.join(dir)) else {
            continue;
        };
        for entry in entries {
            let rel = Path::new(dir).join(entry.expect("readdir").file_name());
            if !generated.iter().any(|(p, _)| *p == rel) {
                out.push(rel);
            }
        }
    }
    out.sort();
    out
}

#[test]
fn checked_in_docs_match_the_clap_definitions() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let generated = generate();
    let update = std::env::var_os(UPDATE_VAR).is_some_and(|v| !v.is_empty() && v != "0");
    if update {
        for (rel, text) in &generated {
            let path = root.join(rel);
            fs::create_dir_all(path.parent().expect("a file has a directory")).expect("mkdir");
            fs::write(&path, text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        }
        for rel in left_over(root, &generated) {
            fs::remove_file(root.join(&rel)).expect("remove a left-over file");
        }
        eprintln!("docs: rewrote {} files", generated.len());
        return;
    }
    let mut drift = Vec::new();
    for (rel, text) in &generated {
        match fs::read_to_string(root.join(rel)) {
            Ok(old) if old == *text => {}
            Ok(_) => drift.push(format!("{} differs", rel.display())),
            Err(e) => drift.push(format!("{}: {e}", rel.display())),
        }
    }
    for rel in left_over(root, &generated) {
        drift.push(format!("{} is not generated any more", rel.display()));
    }
    assert!(
        drift.is_empty(),
        "the man pages and completions no longer match the clap definitions:\n  {}\n\
         regenerate them with `{UPDATE_VAR}=1 cargo test --test docs` and commit the result",
        drift.join("\n  ")
    );
}

/// One page per subcommand, found by walking the clap tree (so a new
/// subcommand gets its page without a change here), and every page has the
/// sections a reader looks for.
#[test]
fn every_command_has_a_page_with_the_usual_sections() {
    let pages = man::pages(Cli::command());
    let names: Vec<&str> = pages.iter().map(|(n, _)| n.as_str()).collect();
    let mut expected = vec!["nogap.1".to_owned()];
    expected.extend(
        Cli::command()
            .get_subcommands()
            .filter(|s| !s.is_hide_set())
            .map(|s| format!("nogap-{}.1", s.get_name())),
    );
    assert_eq!(names, expected);
    for (name, text) in &pages {
        for heading in [
            "NAME",
            "SYNOPSIS",
            "DESCRIPTION",
            "EXIT STATUS",
            "ENVIRONMENT",
            "SEE ALSO",
        ] {
            let line = if heading.contains(' ') {
                format!(".SH \"{heading}\"\n")
            } else {
                format!(".SH {heading}\n")
            };
            assert!(text.contains(&line), "{name} has no {heading} section");
        }
    }
    let run = &pages.iter().find(|(n, _)| n == "nogap-run.1").unwrap().1;
    for heading in ["OPTIONS", "SIGNALS", "FILES", "SYSTEMD"] {
        assert!(
            run.contains(heading),
            "nogap-run.1 has no {heading} section"
        );
    }
}
