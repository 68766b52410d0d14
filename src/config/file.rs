//! `nogap run --config FILE`: options from a TOML file.
//!
//! Each key is the long name of a `nogap run` option, and `command` is the
//! server and its arguments. The file is turned into the command-line words
//! those options would be (`workers = 4` is `--workers=4`, `env = { K =
//! "v" }` is `--env=K=v`, `reuseport = true` is `--reuseport`), so a value in
//! the file goes through the same parser, with the same checks, as on the
//! command line. Options the command line gives win: the file's are left out.
//!
//! An unknown key or a bad value is an error that names the file, the line
//! and the key.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use clap::parser::ValueSource;
use clap::{CommandFactory, FromArgMatches};
use toml::{Spanned, Value};

use crate::cli::{Cli, Command, RunArgs};
use crate::error::Error;

/// The key for the server command.
const COMMAND_KEY: &str = "command";

/// `nogap run` as the command line `argv` gives it, with the options of the
/// `--config` file it names (if any) added where the command line has none.
pub fn run_args(argv: &[OsString], args: RunArgs) -> Result<RunArgs, Error> {
    let Some(path) = args.config.clone() else {
        return Ok(args);
    };
    let text = read(&args)?.unwrap_or_default();
    merge(argv, &path, &text)
}

/// The text of the `--config` file `args` name, if they name one.
pub fn read(args: &RunArgs) -> Result<Option<String>, Error> {
    let Some(path) = &args.config else {
        return Ok(None);
    };
    std::fs::read_to_string(path)
        .map(Some)
        .map_err(|e| Error::Usage(format!("--config {}: {e}", path.display())))
}

/// The words of the file's options, each checked alone; then the command
/// line's words after them, so that those win. Pure (the file's `text` is
/// given): what the config fuzz target drives.
pub fn merge(argv: &[OsString], path: &Path, text: &str) -> Result<RunArgs, Error> {
    let file = FileWords::parse(path, text)?;
    let given = given_on_command_line(argv)?;
    let (head, run_words) = split_at_run(argv)?;
    let mut words: Vec<OsString> = head;
    for (key, key_words) in &file.options {
        if !given.contains(key) {
            words.extend(key_words.iter().map(OsString::from));
        }
    }
    let has_command =
        run_words.iter().any(|w| w == "--") || !parse(&words_with(&run_words))?.command.is_empty();
    words.extend(run_words);
    if !has_command && !file.command.is_empty() {
        words.push("--".into());
        words.extend(file.command.iter().map(OsString::from));
    }
    parse(&words)
}

/// What a config file says, as command-line words per key.
struct FileWords {
    options: Vec<(String, Vec<String>)>,
    command: Vec<String>,
}

impl FileWords {
    fn parse(path: &Path, text: &str) -> Result<FileWords, Error> {
        let table: toml::map::Map<String, Value> = toml::from_str(text).map_err(|e| {
            let line = e.span().map(|s| line_of(text, s.start));
            Error::Usage(format!(
                "{}{}: {}",
                path.display(),
                line.map_or(String::new(), |l| format!(":{l}")),
                first_line(e.message())
            ))
        })?;
        // Spans are only on the typed parse; read the keys' lines from it.
        let spanned: std::collections::BTreeMap<String, Spanned<Value>> =
            toml::from_str(text).map_err(|e| Error::Usage(format!("{}: {e}", path.display())))?;
        let run = Cli::command();
        let run = run
            .find_subcommand("run")
            .ok_or_else(|| Error::Usage("no run subcommand".into()))?;
        let mut options = Vec::new();
        let mut command = Vec::new();
        for (key, value) in &table {
            let line = spanned
                .get(key)
                .map(|v| line_of(text, v.span().start))
                .unwrap_or(1);
            let bad =
                |e: String| Error::Usage(format!("{}:{line}: key '{key}': {e}", path.display()));
            if key == COMMAND_KEY {
                command = strings(value).map_err(bad)?;
                if command.is_empty() {
                    return Err(bad("the command is empty".into()));
                }
                continue;
            }
            let arg = run
                .get_arguments()
                .find(|a| a.get_long() == Some(key.as_str()) && key != "config")
                .ok_or_else(|| {
                    Error::Usage(format!(
                        "{}:{line}: unknown key '{key}' (keys are the long options of 'nogap run', and 'command')",
                        path.display()
                    ))
                })?;
            let takes_value = arg.get_action().takes_values();
            let words = words_for(key, value, takes_value).map_err(bad)?;
            // The value alone, through clap's parser for it.
            let mut check: Vec<OsString> = vec!["nogap".into(), "run".into()];
            check.extend(words.iter().map(OsString::from));
            if let Err(e) = parse(&check) {
                return Err(bad(e.to_string()));
            }
            options.push((arg.get_id().to_string(), words));
        }
        Ok(FileWords { options, command })
    }
}

/// The command-line words for one key.
fn words_for(key: &str, value: &Value, takes_value: bool) -> Result<Vec<String>, String> {
    if !takes_value {
        return match value {
            Value::Boolean(true) => Ok(vec![format!("--{key}")]),
            Value::Boolean(false) => Ok(Vec::new()),
            _ => Err("expected true or false".into()),
        };
    }
    match value {
        Value::Table(t) => t
            .iter()
            .map(|(k, v)| scalar(v).map(|v| format!("--{key}={k}={v}")))
            .collect(),
        Value::Array(_) => Ok(strings(value)?
            .into_iter()
            .map(|v| format!("--{key}={v}"))
            .collect()),
        v => Ok(vec![format!("--{key}={}", scalar(v)?)]),
    }
}

fn scalar(v: &Value) -> Result<String, String> {
    match v {
        Value::String(s) => Ok(s.clone()),
        Value::Integer(i) => Ok(i.to_string()),
        Value::Boolean(b) => Ok(b.to_string()),
        Value::Float(f) => Ok(f.to_string()),
        _ => Err("expected a string or a number".into()),
    }
}

fn strings(v: &Value) -> Result<Vec<String>, String> {
    match v {
        Value::Array(items) => items.iter().map(scalar).collect(),
        v => scalar(v).map(|s| vec![s]),
    }
}

/// The ids of the `run` options the command line sets itself.
fn given_on_command_line(argv: &[OsString]) -> Result<Vec<String>, Error> {
    let matches = Cli::command()
        .try_get_matches_from(argv)
        .map_err(|e| Error::Usage(first_line(&e.to_string()).to_string()))?;
    let Some(run) = matches.subcommand_matches("run") else {
        return Ok(Vec::new());
    };
    Ok(run
        .ids()
        .filter(|id| run.value_source(id.as_str()) == Some(ValueSource::CommandLine))
        .map(|id| id.to_string())
        .collect())
}

/// `argv` up to and including `run`, and the words after it.
fn split_at_run(argv: &[OsString]) -> Result<(Vec<OsString>, Vec<OsString>), Error> {
    let at = argv
        .iter()
        .position(|w| w == "run")
        .ok_or_else(|| Error::Usage("--config belongs to 'nogap run'".into()))?;
    Ok((argv[..=at].to_vec(), argv[at + 1..].to_vec()))
}

/// `nogap run` with these words.
fn words_with(rest: &[OsString]) -> Vec<OsString> {
    let mut words: Vec<OsString> = vec!["nogap".into(), "run".into()];
    words.extend(rest.iter().cloned());
    words
}

fn parse(words: &[OsString]) -> Result<RunArgs, Error> {
    let matches = Cli::command().try_get_matches_from(words).map_err(|e| {
        Error::Usage(
            first_line(&e.to_string())
                .trim_start_matches("error: ")
                .to_string(),
        )
    })?;
    let cli = Cli::from_arg_matches(&matches)
        .map_err(|e| Error::Usage(first_line(&e.to_string()).to_string()))?;
    match cli.command {
        Command::Run(args) => Ok(args),
        _ => Err(Error::Usage("--config belongs to 'nogap run'".into())),
    }
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or("").trim()
}

/// The 1-based line of byte offset `at`.
fn line_of(text: &str, at: usize) -> usize {
    text.as_bytes()[..at.min(text.len())]
        .iter()
        .filter(|b| **b == b'\n')
        .count()
        + 1
}

/// Where a config file lives by default: `/etc/nogap/NAME.toml`.
pub fn default_path(name: &str) -> PathBuf {
    PathBuf::from("/etc/nogap").join(format!("{name}.toml"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(words: &[&str]) -> Vec<OsString> {
        words.iter().map(OsString::from).collect()
    }

    const FILE: &str = r#"
listen = ["http=127.0.0.1:8080"]
workers = 4
ready = "notify"
drain-timeout = "20s"
reuseport = false
env = { KEY = "v", N = 1 }
command = ["/bin/true", "--flag"]
"#;

    #[test]
    fn the_file_gives_options_and_the_command_line_wins() {
        let args = merge(
            &argv(&["nogap", "run", "--config", "x.toml", "-w", "2"]),
            Path::new("x.toml"),
            FILE,
        )
        .unwrap();
        assert_eq!(args.workers, 2, "the command line wins");
        assert_eq!(args.listen.len(), 1);
        assert_eq!(args.ready.mode, crate::spec::ReadyMode::Notify);
        assert_eq!(args.drain_timeout, std::time::Duration::from_secs(20));
        assert_eq!(args.worker.env.len(), 2);
        assert_eq!(args.command, argv(&["/bin/true", "--flag"]));
        let args = merge(
            &argv(&["nogap", "run", "--config", "x.toml", "--", "/bin/false"]),
            Path::new("x.toml"),
            FILE,
        )
        .unwrap();
        assert_eq!(args.command, argv(&["/bin/false"]));
        assert_eq!(args.workers, 4);
    }

    #[test]
    fn errors_name_the_file_line_and_key() {
        let run = argv(&["nogap", "run", "--config", "x.toml"]);
        let e = merge(&run, Path::new("x.toml"), "workers = 2\nwrokers = 4\n")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("x.toml:2: unknown key 'wrokers'"), "{e}");
        let e = merge(&run, Path::new("x.toml"), "\n\ndrain-timeout = \"soon\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("x.toml:3: key 'drain-timeout'"), "{e}");
        assert!(e.contains("soon"), "{e}");
        let e = merge(&run, Path::new("x.toml"), "workers = [\n")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("x.toml:"), "{e}");
        let e = merge(&run, Path::new("x.toml"), "reuseport = \"yes\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("key 'reuseport'"), "{e}");
    }
}
