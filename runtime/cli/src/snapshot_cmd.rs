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

use crate::opts::{self, flag, value, Opt};
use crate::remote::{absolute, disk_arg};
use crate::tty::is_terminal;

/// Renders the progress line until `work` finishes.
async fn with_progress<T>(
    what: &str,
    file: &Path,
    work: impl std::future::Future<Output = T>,
) -> T {
    if !is_terminal(2) {
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

const SNAPSHOT_OPTS: &[Opt] = &[flag(&["--leave-paused"]), flag(&["--diff"])];

/// `husk snapshot [--leave-paused] [--diff] VM DIR`.
pub async fn snapshot(client: &mut HuskClient<Channel>, args: &[String]) -> Result<i32, String> {
    let p = opts::parse(args, SNAPSHOT_OPTS, None)?;
    let [vm, dir] = p.positional.as_slice() else {
        return Err("snapshot: usage: husk snapshot [--leave-paused] [--diff] VM DIR".into());
    };
    let dir = absolute(dir);
    let request = SnapshotVmRequest {
        vm: vm.clone(),
        dir: dir.clone(),
        leave_paused: p.has("--leave-paused"),
        diff: p.has("--diff"),
    };
    let tmp = Path::new(&dir).join("vm.mem.tmp");
    let done = with_progress("snapshot", &tmp, client.snapshot_vm(request))
        .await
        .map_err(|s| format!("{} ({:?})", s.message(), s.code()))?
        .into_inner();
    println!(
        "{dir}: {:.1} MiB of {:.0} MiB guest memory written in {} ms",
        done.memory_written as f64 / f64::from(1 << 20),
        done.memory_bytes as f64 / f64::from(1 << 20),
        done.duration_ms
    );
    Ok(0)
}

const RESTORE_OPTS: &[Opt] = &[
    value(&["--name"]),
    value(&["--mac"]),
    value(&["--disk"]),
    value(&["--label", "-l"]),
    flag(&["--paused"]),
];

/// The RestoreVm request of `husk restore` (also used by the parser's tests).
pub fn restore_request(args: &[String]) -> Result<RestoreVmRequest, String> {
    let p = opts::parse(args, RESTORE_OPTS, None)?;
    let [dir] = p.positional.as_slice() else {
        return Err(
            "restore: usage: husk restore [--name N] [--mac M] [--disk P[:ro]]... [--label K=V]... [--paused] DIR"
                .into(),
        );
    };
    let mut labels = std::collections::HashMap::new();
    for kv in p.values("--label") {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| format!("--label {kv:?}: expected K=V"))?;
        labels.insert(k.to_string(), v.to_string());
    }
    Ok(RestoreVmRequest {
        dir: absolute(dir),
        name: p.value("--name").unwrap_or_default().to_string(),
        mac: p.value("--mac").unwrap_or_default().to_string(),
        disks: p.values("--disk").iter().map(|d| disk_arg(d)).collect(),
        start_paused: p.has("--paused"),
        labels: labels.into_iter().collect(),
    })
}

/// `husk restore [OPTIONS] DIR`: prints the new VM's id.
pub async fn restore(client: &mut HuskClient<Channel>, args: &[String]) -> Result<i32, String> {
    let request = restore_request(args)?;
    let vm = client
        .restore_vm(request)
        .await
        .map_err(|s| format!("{} ({:?})", s.message(), s.code()))?
        .into_inner();
    println!("{}", vm.id);
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use husk_proto::v1::Disk;

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn restore_options_become_the_request() {
        let r = restore_request(&args(&[
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
        ]))
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
                read_only: true
            }]
        );
        assert!(r.start_paused);
        assert_eq!(r.labels.get("k").map(String::as_str), Some("v"));
        assert!(restore_request(&args(&[])).is_err());
        assert!(restore_request(&args(&["a", "b"])).is_err());
        assert!(restore_request(&args(&["--label", "novalue", "/d"])).is_err());
    }
}
