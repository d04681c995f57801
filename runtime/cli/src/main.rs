//! `husk`: the command-line interface of husk.
//!
//! `husk run [OPTIONS] -- CMD` boots a micro-VM directly (no daemon needed); the other verbs
//! are a gRPC client of huskd (see `remote`). This file is the binary's edge: it parses the
//! command line (`opts`), sets up logging and turns every outcome into an exit code.

mod capacity_cmd;
mod disk_cmd;
mod image_cmd;
mod image_store;
mod memory_cmd;
mod opts;
mod output;
mod quick_launch;
mod rate_limit_cmd;
mod remote;
mod run_args;
mod run_disks;
mod run_image;
mod snapshot_cmd;
mod template_cmd;
mod top_cmd;
mod tty;

use clap::error::{ContextKind, ErrorKind};
use std::io::Write;

use clap::{CommandFactory, Parser};

use opts::{Cli, Verb};

fn main() {
    init_logging();
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let cli = match Cli::try_parse_from(&args) {
        Ok(cli) => cli,
        Err(e) => std::process::exit(usage_error(&e, &args)),
    };
    let code = match &cli.command {
        Verb::Run(run) => match run.check() {
            Ok(()) => quick_launch::run(run).unwrap_or_else(fail),
            Err(e) => fail(e),
        },
        Verb::Image(image) => image_cmd::run(image).unwrap_or_else(fail),
        Verb::Version => {
            println!("husk {}", env!("CARGO_PKG_VERSION"));
            0
        }
        Verb::Completions { shell } => {
            // Into memory first: clap_complete panics on a write error (e.g. `| head`).
            let mut script = Vec::new();
            clap_complete::generate(*shell, &mut Cli::command(), "husk", &mut script);
            match std::io::stdout().write_all(&script) {
                Ok(()) => 0,
                Err(e) => fail(format!("stdout: {e}")),
            }
        }
        verb => match remote::run_verb(&cli.host, verb) {
            Ok(code) => code,
            Err(e) => {
                eprintln!("husk: error: {}", chain(&e));
                remote::EXIT_API_ERROR
            }
        },
    };
    std::process::exit(code);
}

/// Logs (`tracing`) go to stderr, filtered by `$HUSK_LOG` (e.g. `debug`); by default only
/// husk's own warnings, so that library chatter never mixes with a command's output.
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("HUSK_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("husk=warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .without_time()
        .init();
}

/// Prints a command-line mistake as `husk: error: ...` and returns the exit code: 125 as for
/// any failure of husk itself, 1 for the daemon verbs (as their other failures), 0 for `--help`
/// and `--version`.
fn usage_error(e: &clap::Error, args: &[std::ffi::OsString]) -> i32 {
    match e.kind() {
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
            let _ = e.print();
            return 0;
        }
        ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            eprint!("{}", e.render());
            return quick_launch::EXIT_HUSK_ERROR;
        }
        ErrorKind::InvalidSubcommand => {
            let verb = e
                .get(ContextKind::InvalidSubcommand)
                .map(ToString::to_string)
                .unwrap_or_default();
            eprintln!(
                "husk: error: unknown command {verb:?}\n\n{}",
                Cli::command().render_help()
            );
            return quick_launch::EXIT_HUSK_ERROR;
        }
        _ => {}
    }
    let text = e.render().to_string();
    eprint!(
        "husk: error: {}",
        text.strip_prefix("error: ").unwrap_or(&text)
    );
    match verb_of(args) {
        Some(verb) if Verb::is_remote(verb) => remote::EXIT_API_ERROR,
        _ => quick_launch::EXIT_HUSK_ERROR,
    }
}

/// The verb of a command line: the first argument after `--host ADDR` (the only option before
/// it).
fn verb_of(args: &[std::ffi::OsString]) -> Option<&str> {
    let mut it = args.iter().skip(1).filter_map(|a| a.to_str());
    loop {
        match it.next()? {
            "--host" => {
                it.next();
            }
            a if a.starts_with("--host=") => {}
            verb => return Some(verb),
        }
    }
}

/// An error and its causes, `: `-separated.
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(&format!(": {s}"));
        source = s.source();
    }
    text
}

fn fail(message: impl std::fmt::Display) -> i32 {
    eprintln!("husk: error: {message}");
    quick_launch::EXIT_HUSK_ERROR
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(args: &[&str]) -> Vec<std::ffi::OsString> {
        args.iter().map(Into::into).collect()
    }

    #[test]
    fn the_verb_is_found_after_the_host_option() {
        assert_eq!(verb_of(&os(&["husk", "ps"])), Some("ps"));
        assert_eq!(
            verb_of(&os(&["husk", "--host", "unix:///s", "stop"])),
            Some("stop")
        );
        assert_eq!(
            verb_of(&os(&["husk", "--host=unix:///s", "run"])),
            Some("run")
        );
        assert_eq!(verb_of(&os(&["husk"])), None);
    }

    #[test]
    fn mistakes_exit_1_for_daemon_verbs_125_for_the_rest_and_0_for_help() {
        let code = |args: &[&str]| {
            let args = os(args);
            let e = Cli::try_parse_from(&args).unwrap_err();
            usage_error(&e, &args)
        };
        assert_eq!(
            code(&["husk", "stop", "--bogus", "a"]),
            remote::EXIT_API_ERROR
        );
        assert_eq!(code(&["husk", "--host", "unix:///s", "inspect"]), 1);
        assert_eq!(code(&["husk", "run", "--cpus", "x", "true"]), 125);
        assert_eq!(code(&["husk", "frob"]), 125);
        assert_eq!(code(&["husk"]), 125);
        assert_eq!(code(&["husk", "completions"]), 125);
        assert_eq!(code(&["husk", "ps", "--help"]), 0);
        assert_eq!(code(&["husk", "--version"]), 0);
    }

    #[test]
    fn causes_are_chained_into_one_line() {
        let e = remote::RemoteError::Runtime(std::io::Error::other("no threads"));
        assert_eq!(chain(&e), "cannot start the async runtime: no threads");
    }
}
