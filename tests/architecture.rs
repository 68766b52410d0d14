//! The shape of the source, checked: what README's "Layout" and lib.rs's
//! crate doc promise.
//!
//! 1. `unsafe` code only in `src/sys.rs` (and the demo's own `sys.rs`);
//! 2. no I/O in the policy module;
//! 3. the modules form layers: each imports only modules of lower layers,
//!    so there is no import cycle;
//! 4. the loop file (`supervisor.rs`) stays at most about 500 lines;
//! 5. the control protocol is typed: no untyped JSON in `control` or in the
//!    supervisor.
//!
//! These read the source as text: cheap, and every check names the file and
//! line that breaks it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The library's modules, bottom layer first. A module may use only modules
/// of lower layers; modules of one layer do not use each other.
const LAYERS: &[&[&str]] = &[
    // Value types, parsers, errors, and the one module with `unsafe`.
    &["error", "logs", "spec", "sys"],
    // clap structs only.
    &["cli"],
    // Validated configuration: every check and resolution.
    &["config"],
    // The sockets nogap holds: intake, bind, steer, sock_diag.
    &["sockets"],
    // How a worker is launched and talks back: hand-off forms, daemons,
    // notify and einhorn sockets.
    &["worker"],
    // Decisions: state × event → actions. Pure.
    &["policy"],
    // Queue and descriptor samples → events.
    &["monitor", "probe"],
    // The control protocol and its server and clients.
    &["control"],
    // Self-upgrade in place: probe, carry across execve, adopt.
    &["upgrade"],
    // Metrics and probe endpoints, from what the loop publishes.
    &["metrics"],
    // What a reload deploys: config, sockets, launcher and probe checked.
    &["deploy"],
    // The loop: sources → events → policy → actions executed.
    &["supervisor"],
];

/// The loop file's budget, in lines.
const LOOP_LINES: usize = 520;

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// Every `.rs` file under `dir`.
fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        if d.is_file() {
            out.push(d);
            continue;
        }
        for entry in std::fs::read_dir(&d).expect("read src") {
            let path = entry.expect("dir entry").path();
            if path.is_dir() || path.extension().is_some_and(|e| e == "rs") {
                stack.push(path);
            }
        }
    }
    out.sort();
    out
}

/// The lines of a file that are code, numbered from 1 (comments dropped).
fn code_lines(path: &Path) -> Vec<(usize, String)> {
    let text = std::fs::read_to_string(path).expect("read source");
    text.lines()
        .enumerate()
        .map(|(i, l)| {
            let code = match l.find("//") {
                Some(at) => &l[..at],
                None => l,
            };
            (i + 1, code.to_string())
        })
        .filter(|(_, l)| !l.trim().is_empty())
        .collect()
}

/// The library's top-level modules and the files of each.
fn modules() -> BTreeMap<String, Vec<PathBuf>> {
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(src()).expect("read src") {
        let path = entry.expect("dir entry").path();
        let name = path
            .file_stem()
            .and_then(|n| n.to_str())
            .expect("utf-8 name")
            .to_string();
        if ["lib", "main", "bin"].contains(&name.as_str()) {
            continue;
        }
        out.entry(name)
            .or_insert_with(Vec::new)
            .extend(rust_files(&path));
    }
    out
}

/// `crate::x` and `crate::{x, y::z}` in a line.
fn crate_refs(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = line;
    while let Some(at) = rest.find("crate::") {
        rest = &rest[at + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let end = group.find('}').unwrap_or(group.len());
            for part in group[..end].split(',') {
                let name: String = part
                    .trim()
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                if !name.is_empty() {
                    out.push(name);
                }
            }
        } else {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            out.push(name);
        }
    }
    out
}

#[test]
fn unsafe_only_in_sys() {
    let mut found = Vec::new();
    for file in rust_files(&src()) {
        if file.file_name().is_some_and(|n| n == "sys.rs") {
            continue;
        }
        for (n, line) in code_lines(&file) {
            let words: Vec<&str> = line
                .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .collect();
            if words.contains(&"unsafe") {
                found.push(format!("{}:{n}: {}", file.display(), line.trim()));
            }
        }
    }
    assert!(
        found.is_empty(),
        "unsafe outside sys.rs:\n{}",
        found.join("\n")
    );
}

#[test]
fn the_policy_does_no_io() {
    const FORBIDDEN: &[&str] = &[
        "std::fs",
        "std::net",
        "std::process",
        "std::io",
        "std::os",
        "std::thread",
        "tokio",
        "libc",
        "socket2",
        "sd_notify",
        "File::",
        "Command::",
        "crate::sys",
        "crate::sockets",
        "crate::monitor",
        "crate::control",
        "crate::supervisor",
        "Instant::now",
        "SystemTime",
    ];
    let dir = src().join("policy");
    let files = rust_files(&dir);
    assert!(!files.is_empty(), "no src/policy/");
    let mut found = Vec::new();
    for file in files {
        // Unit tests may do what they like.
        if file.file_name().is_some_and(|n| n == "tests.rs") {
            continue;
        }
        for (n, line) in code_lines(&file) {
            if line.contains("#[cfg(test)]") {
                break;
            }
            let nix_io = line.contains("nix::") && !line.contains("nix::sys::signal::Signal");
            for bad in FORBIDDEN.iter().filter(|b| line.contains(**b)) {
                found.push(format!("{}:{n}: {bad}: {}", file.display(), line.trim()));
            }
            if nix_io {
                found.push(format!("{}:{n}: nix: {}", file.display(), line.trim()));
            }
        }
    }
    assert!(found.is_empty(), "I/O in the policy:\n{}", found.join("\n"));
}

#[test]
fn modules_form_layers_without_cycles() {
    let layer_of: BTreeMap<&str, usize> = LAYERS
        .iter()
        .enumerate()
        .flat_map(|(i, names)| names.iter().map(move |n| (*n, i)))
        .collect();
    let mods = modules();
    let mut problems = Vec::new();
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (name, files) in &mods {
        let Some(&mine) = layer_of.get(name.as_str()) else {
            problems.push(format!(
                "module '{name}' is in no layer: add it to LAYERS and to the Layout docs"
            ));
            continue;
        };
        for file in files {
            for (n, line) in code_lines(file) {
                for used in crate_refs(&line) {
                    if used == *name || !mods.contains_key(&used) {
                        continue;
                    }
                    edges.entry(name.clone()).or_default().insert(used.clone());
                    let theirs = layer_of.get(used.as_str()).copied().unwrap_or(usize::MAX);
                    if theirs >= mine {
                        problems.push(format!(
                            "{}:{n}: '{name}' (layer {mine}) uses '{used}' (layer {theirs})",
                            file.display()
                        ));
                    }
                }
            }
        }
    }
    for name in LAYERS.iter().flat_map(|l| l.iter()) {
        if !mods.contains_key(*name) {
            problems.push(format!("LAYERS names '{name}', which is not a module"));
        }
    }
    // Layers rule cycles out; say so directly too, should LAYERS be edited.
    if let Some(cycle) = find_cycle(&edges) {
        problems.push(format!("import cycle: {}", cycle.join(" -> ")));
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

fn find_cycle(edges: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        edges: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|p| p == node) {
            let mut cycle = path[at..].to_vec();
            cycle.push(node.to_string());
            return Some(cycle);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_string());
        for next in edges.get(node).into_iter().flatten() {
            if let Some(c) = visit(next, edges, path, done) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(node.to_string());
        None
    }
    let mut done = BTreeSet::new();
    for node in edges.keys() {
        if let Some(c) = visit(node, edges, &mut Vec::new(), &mut done) {
            return Some(c);
        }
    }
    None
}

#[test]
fn the_loop_file_stays_small() {
    let path = src().join("supervisor.rs");
    let lines = std::fs::read_to_string(&path)
        .expect("read supervisor.rs")
        .lines()
        .count();
    assert!(
        lines <= LOOP_LINES,
        "{} has {lines} lines (budget {LOOP_LINES}): move decisions into policy, sampling into monitor",
        path.display()
    );
}

#[test]
fn the_control_protocol_is_typed() {
    let mut found = Vec::new();
    for file in [src().join("control.rs"), src().join("supervisor.rs")] {
        for (n, line) in code_lines(&file) {
            for bad in ["json!", "serde_json::Value", "Value::"] {
                if line.contains(bad) {
                    found.push(format!("{}:{n}: {bad}: {}", file.display(), line.trim()));
                }
            }
            // Indexing by key, as in `answer["ok"]`.
            let indexed = line.match_indices("[\"").any(|(at, _)| {
                line[..at]
                    .chars()
                    .last()
                    .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == ']' || c == ')')
            });
            if indexed {
                found.push(format!("{}:{n}: indexing: {}", file.display(), line.trim()));
            }
        }
    }
    assert!(
        found.is_empty(),
        "untyped JSON in the control protocol:\n{}",
        found.join("\n")
    );
}

#[test]
fn crate_refs_reads_both_forms() {
    assert_eq!(crate_refs("use crate::config::Environment;"), ["config"]);
    assert_eq!(
        crate_refs("use crate::{spec::Endpoint, sys};"),
        ["spec", "sys"]
    );
    assert_eq!(
        crate_refs("let x = crate::sockets::diag::queued(a);"),
        ["sockets"]
    );
}

#[test]
fn the_layer_check_sees_an_upward_use() {
    // What modules_form_layers_without_cycles would flag, shown on one line:
    // the checks read real code, so a broken rule cannot pass unseen.
    let line = "use crate::supervisor::Request;";
    assert_eq!(crate_refs(line), ["supervisor"]);
    let layer = |m: &str| LAYERS.iter().position(|l| l.contains(&m));
    assert!(layer("supervisor") > layer("control"));
}
