//! What the containerd fixtures share (tests/tests/containerd.rs and [`crate::cri`]): starting
//! Debian's containerd with containerd-shim-husk-v2 on its PATH, `ctr`, stopping it with its
//! shims, and finding what a test left behind (shims, mounts, per-container images,
//! interfaces).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use husk_proto::v1::{ListVmsRequest, Vm};

use crate::huskd::Huskd;
use crate::{bin, run_with_timeout, Finished};

/// containerd's runtime name for containerd-shim-husk-v2.
pub const RUNTIME: &str = "io.containerd.husk.v2";
/// Where Debian's CNI plugins are (package containernetworking-plugins).
pub const CNI_PLUGINS: &str = "/usr/lib/cni";
/// The limit of one `ctr` call (one that boots a guest included).
pub const CTR_LIMIT: Duration = Duration::from_secs(240);

/// Starts containerd with `DIR/config.toml`, its output in `DIR/containerd.log`, and
/// containerd-shim-husk-v2 on its PATH; its shims inherit `HUSK_HOST=husk_host` and
/// `HUSK_SHIM_STATE_DIR=DIR/images`.
pub fn spawn_containerd(dir: &Path, husk_host: &str) -> Child {
    let shim_dir = bin("containerd-shim-husk-v2")
        .parent()
        .unwrap()
        .to_path_buf();
    let path = format!(
        "{}:{}",
        shim_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let log = std::fs::File::create(dir.join("containerd.log")).unwrap();
    Command::new("containerd")
        .arg("--config")
        .arg(dir.join("config.toml"))
        .arg("--log-level")
        .arg("debug")
        .env("PATH", path)
        .env("HUSK_HOST", husk_host)
        .env("HUSK_SHIM_STATE_DIR", dir.join("images"))
        // Where a pod's kubelet directory is looked for (CRI tests make one there).
        .env("HUSK_SHIM_KUBELET_ROOT", dir.join("kubelet"))
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("containerd (Debian package containerd) must be installed: scripts/setup")
}

/// `ctr --address SOCKET --namespace NAMESPACE ARGS`, within [`CTR_LIMIT`].
pub fn ctr(socket: &Path, namespace: &str, args: &[&str]) -> Finished {
    run_with_timeout(
        Command::new("ctr")
            .arg("--address")
            .arg(socket)
            .arg("--namespace")
            .arg(namespace)
            .args(args),
        CTR_LIMIT,
    )
}

/// Waits up to 60 s for the containerd at `socket` to answer `ctr version`; panics with
/// `logs()` when it does not.
pub fn wait_for_containerd(socket: &Path, namespace: &str, logs: impl FnOnce() -> String) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if ctr(socket, namespace, &["version"]).code() == Some(0) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "containerd did not answer within 60 s:\n{}",
            logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Kills containerd (`child`), then the shims it started (those of its `socket`), which
/// outlive it.
pub fn stop_containerd(child: Option<Child>, socket: &Path) {
    if let Some(mut child) = child {
        let _ = child.kill();
        let _ = child.wait();
    }
    for pid in shim_pids(socket) {
        // A process this fixture's containerd started.
        let _ = crate::signal(pid, rustix::process::Signal::KILL);
    }
}

/// PIDs of the live processes whose command line (arguments joined by NULs) `matches`.
pub fn live_pids_where(matches: impl Fn(&str) -> bool) -> Vec<u32> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        if matches(&String::from_utf8_lossy(&cmdline)) {
            if let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() {
                if process_alive(pid) {
                    pids.push(pid);
                }
            }
        }
    }
    pids
}

/// PIDs of the live containerd-shim-husk-v2 processes of the containerd at `socket` (their
/// `-address` flag names it).
pub fn shim_pids(socket: &Path) -> Vec<i32> {
    let socket = socket.to_string_lossy();
    live_pids_where(|cmdline| {
        cmdline.contains("containerd-shim-husk-v2") && cmdline.contains(&*socket)
    })
    .into_iter()
    .map(|pid| pid as i32)
    .collect()
}

/// Whether the process `pid` runs; a zombie counts as gone (its parent reaps it).
pub fn process_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s.contains(") Z "))
        .unwrap_or(false)
}

/// The mount points below `dir`, in mount order.
pub fn mounts_below(dir: &Path) -> Vec<String> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    mounts
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .filter(|target| Path::new(target).starts_with(dir))
        .map(str::to_string)
        .collect()
}

/// Detaches (`umount -l`) every mount below `dir`, the last mounted first.
pub fn unmount_below(dir: &Path) {
    for target in mounts_below(dir).into_iter().rev() {
        let _ = Command::new("umount").arg("-l").arg(target).status();
    }
}

/// The per-container image files a shim left in its state directory `images` (the shared
/// bases in `images/_bases` stay by design).
pub fn leftover_images(images: &Path) -> Vec<PathBuf> {
    let bases = images.join("_bases");
    let mut found = Vec::new();
    let mut stack = vec![images.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            if e.path() == bases {
                continue;
            }
            if e.path().is_dir() {
                stack.push(e.path());
            } else {
                found.push(e.path());
            }
        }
    }
    found
}

/// The VMs `huskd` has.
pub fn list_vms(huskd: &Huskd) -> Vec<Vm> {
    let mut c = huskd.client();
    huskd
        .block_on(c.list_vms(ListVmsRequest::default()))
        .unwrap()
        .into_inner()
        .vms
}

/// How many VMs `huskd` has.
pub fn vm_count(huskd: &Huskd) -> usize {
    list_vms(huskd).len()
}

/// The host's network interfaces, sorted.
pub fn interfaces() -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir("/sys/class/net")
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// The last `lines` lines of `text`.
pub fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
