//! `husk snapshot VM DIR` and `husk restore DIR`: SnapshotVm and RestoreVm of huskd.
//!
//! While huskd writes the memory file, a progress line on stderr (only when stderr is a
//! terminal) shows how much page data has reached `DIR/vm.mem.tmp` and for how long: the CLI
//! watches the file when it shares huskd's filesystem (the usual unix:// socket case).

use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant};

use husk_proto::v1::husk_client::HuskClient;
use husk_proto::v1::{RestoreVmRequest, SnapshotVmRequest};
use tonic::transport::Channel;

use crate::remote::{absolute, disk_arg, RemoteError};
use crate::tty::is_terminal;

/// Renders the progress line until `work` finishes.
async fn with_progress<T>(
    what: &str,
    file: &Path,
    work: impl std::future::Future<Output = T>,
) -> T {
    if !is_terminal(std::io::stderr()) {
        return work.await;
    }
    let started = Instant::now();
    tokio::pin!(work);
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    loop {
        tokio::select! {
            result = &mut work => {
                eprint!("\r\x1b[2K");
                return result;
            }
            _ = tick.tick() => {
                let written = std::fs::metadata(file).map_or(0, |m| m.blocks() * 512);
                eprint!(
                    "\r\x1b[2K{what}: {:.1} MiB of memory written, {:.1} s",
                    written as f64 / f64::from(1 << 20),
                    started.elapsed().as_secs_f64()
                );
                let _ = std::io::stderr().flush();
            }
        }
    }
}

/// Snapshot a running or paused VM into DIR.
#[derive(Debug, clap::Args)]
#[command(args_override_self = true)]
pub struct SnapshotArgs {
    /// Leave the VM paused afterwards (default: it runs on)
    #[arg(long)]
    pub leave_paused: bool,
    /// Write only the pages dirtied since the last snapshot
    #[arg(long)]
    pub diff: bool,
    #[arg(value_name = "VM")]
    pub vm: String,
    #[arg(value_name = "DIR")]
    pub dir: String,
}

/// `husk snapshot [--leave-paused] [--diff] VM DIR`.
pub async fn snapshot(
    client: &mut HuskClient<Channel>,
    args: &SnapshotArgs,
) -> Result<i32, RemoteError> {
    let dir = absolute(&args.dir);
    let request = SnapshotVmRequest {
        vm: args.vm.clone(),
        dir: dir.clone(),
        leave_paused: args.leave_paused,
        diff: args.diff,
    };
    let tmp = Path::new(&dir).join("vm.mem.tmp");
    let done = with_progress("snapshot", &tmp, client.snapshot_vm(request))
        .await?
        .into_inner();
    println!(
        "{dir}: {:.1} MiB of {:.0} MiB guest memory written in {} ms",
        done.memory_written as f64 / f64::from(1 << 20),
        done.memory_bytes as f64 / f64::from(1 << 20),
        done.duration_ms
    );
    Ok(0)
}

/// A new VM from the snapshot in DIR.
#[derive(Debug, clap::Args)]
#[command(args_override_self = true)]
pub struct RestoreArgs {
    /// The new VM's name
    #[arg(long, value_name = "N")]
    pub name: Option<String>,
    /// The new VM's MAC address (a clone beside its origin needs its own)
    #[arg(long, value_name = "M")]
    pub mac: Option<String>,
    /// Replace the snapshot's disks, in order (repeatable)
    #[arg(long = "disk", value_name = "P[:ro]")]
    pub disks: Vec<String>,
    /// A label (repeatable)
    #[arg(short = 'l', long = "label", value_name = "K=V", value_parser = label)]
    pub labels: Vec<(String, String)>,
    /// Leave the new VM paused
    #[arg(long)]
    pub paused: bool,
    #[arg(value_name = "DIR")]
    pub dir: String,
}

/// A restore `--label` without `=`.
#[derive(Debug, thiserror::Error)]
#[error("{0:?}: expected K=V")]
pub struct NotALabel(String);

/// A restore `--label K=V` (the key may be empty, as it always could).
fn label(kv: &str) -> Result<(String, String), NotALabel> {
    kv.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| NotALabel(kv.to_string()))
}

/// The RestoreVm request of `husk restore` (also used by the parser's tests).
pub fn restore_request(args: &RestoreArgs) -> RestoreVmRequest {
    RestoreVmRequest {
        dir: absolute(&args.dir),
        name: args.name.clone().unwrap_or_default(),
        mac: args.mac.clone().unwrap_or_default(),
        disks: args.disks.iter().map(|d| disk_arg(d)).collect(),
        start_paused: args.paused,
        labels: args.labels.iter().cloned().collect(),
    }
}

/// `husk restore [OPTIONS] DIR`: prints the new VM's id.
pub async fn restore(
    client: &mut HuskClient<Channel>,
    args: &RestoreArgs,
) -> Result<i32, RemoteError> {
    let vm = client.restore_vm(restore_request(args)).await?.into_inner();
    println!("{}", vm.id);
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use husk_proto::v1::Disk;

    #[derive(Debug, Parser)]
    struct Harness {
        #[command(flatten)]
        restore: RestoreArgs,
    }

    fn restore_request_of(a: &[&str]) -> Result<RestoreVmRequest, clap::Error> {
        Harness::try_parse_from(std::iter::once("restore").chain(a.iter().copied()))
            .map(|h| restore_request(&h.restore))
    }

    #[test]
    fn restore_options_become_the_request() {
        let r = restore_request_of(&[
            "--name",
            "clone1",
            "--mac",
            "06:00:00:00:00:01",
            "--disk",
            "/d/a.img:ro",
            "--label",
            "k=v",
            "--paused",
            "/snap/dir",
        ])
        .unwrap();
        assert_eq!(r.dir, "/snap/dir");
        assert_eq!(
            (r.name.as_str(), r.mac.as_str()),
            ("clone1", "06:00:00:00:00:01")
        );
        assert_eq!(
            r.disks,
            vec![Disk {
                path: "/d/a.img".into(),
                read_only: true,
                rate_limit: None,
                ..Default::default()
            }]
        );
        assert!(r.start_paused);
        assert_eq!(r.labels.get("k").map(String::as_str), Some("v"));
        assert!(restore_request_of(&[]).is_err());
        assert!(restore_request_of(&["a", "b"]).is_err());
        let e = restore_request_of(&["--label", "novalue", "/d"]).unwrap_err();
        assert!(e.to_string().contains("expected K=V"), "{e}");
    }
}
