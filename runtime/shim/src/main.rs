//! containerd-shim-husk-v2: containerd's runtime v2 shim for husk (runtime `io.containerd.husk.v2`).
//!
//! containerd runs this binary three ways (flags first, Go `flag` style, then the action):
//! - `... start`: spawn the long-lived shim for one container, print its ttrpc address, exit;
//! - `... delete`: clean up after a shim that is gone (VM, image, mounts), print a
//!   `DeleteResponse`;
//! - no action: the long-lived shim itself (spawned by `start`), serving `containerd.task.v2.Task`
//!   over ttrpc on the socket it inherits as fd 3.
//!
//! Every container runs in its own husk micro-VM, created through huskd's gRPC API.

mod args;
mod events;
mod huskd;
mod lifecycle;
mod oci;
mod process;
mod rootfs;
mod service;
mod stats;

use std::process::ExitCode;

fn main() -> ExitCode {
    let args = match args::ShimArgs::parse(std::env::args().skip(1)) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("containerd-shim-husk-v2: {e}");
            return ExitCode::from(2);
        }
    };
    let result = match args.action.as_deref() {
        Some("start") => lifecycle::start(&args),
        Some("delete") => lifecycle::delete(&args),
        None => lifecycle::serve(&args),
        Some(other) => Err(format!("unknown action {other:?} (start, delete, or none)")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("containerd-shim-husk-v2: {e}");
            ExitCode::FAILURE
        }
    }
}
