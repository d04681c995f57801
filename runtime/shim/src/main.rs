//! containerd-shim-husk-v2: containerd's runtime v2 shim for husk (runtime `io.containerd.husk.v2`).
//!
//! containerd runs this binary three ways (flags first, Go `flag` style, then the action):
//! - `... start`: spawn the long-lived shim for one container, print its ttrpc address, exit;
//! - `... delete`: clean up after a shim that is gone (VM, image, mounts), print a
//!   `DeleteResponse`;
//! - `prune-bases` (an operator's, not containerd's): remove the shared base images of OCI
//!   images that no live container uses;
//! - no action: the long-lived shim itself (spawned by `start`), serving `containerd.task.v2.Task`
//!   over ttrpc on the socket it inherits as fd 3.
//!
//! Every container runs in its own husk micro-VM, created through huskd's gRPC API. This file
//! is the binary's edge: errors become one line on stderr (which containerd shows) and an exit
//! code.

mod args;
mod base;
mod events;
mod huskd;
mod lifecycle;
mod logging;
mod oci;
mod process;
mod rootfs;
mod service;
mod stats;

use std::process::ExitCode;

use anyhow::Context;
use args::{Action, ArgsError, ShimArgs};
use clap::error::ErrorKind;

fn main() -> ExitCode {
    let args = match ShimArgs::parse(std::env::args_os().skip(1)) {
        Ok(a) => a,
        Err(ArgsError::Usage(e))
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) =>
        {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("containerd-shim-husk-v2: {}", one_line(&e.into()));
            return ExitCode::from(2);
        }
    };
    logging::init(args.debug);
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("containerd-shim-husk-v2: {}", one_line(&e));
            ExitCode::FAILURE
        }
    }
}

fn run(args: &ShimArgs) -> anyhow::Result<()> {
    match args.action {
        Some(Action::Start) => lifecycle::start(args).context("start"),
        Some(Action::Delete) => lifecycle::delete(args).context("delete"),
        Some(Action::PruneBases) => lifecycle::prune_bases().context("prune-bases"),
        None => lifecycle::serve(args).context("serve"),
    }
}

/// An error and its causes on one line, clap's trailing newline and hints trimmed.
fn one_line(e: &anyhow::Error) -> String {
    format!("{e:#}").trim_end().to_string()
}
