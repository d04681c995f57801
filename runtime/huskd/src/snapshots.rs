//! SnapshotVm and RestoreVm: a VM's snapshot in a directory on huskd's host, and new VMs made
//! from it (see docs/snapshots.md).
//!
//! A snapshot directory holds `vm.state` and `vm.mem` (written by husk-vmm, see its control
//! socket's `snapshot` request) and `vm.pb`, the VM record (its spec) at snapshot time. A
//! restore is a new VM (new id, name, vsock CID and tap) that starts where the snapshot was
//! taken; its guest wall clock is set through the guest agent as soon as the agent answers.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use husk_host::net::VmLink;
use husk_proto::agent::{host_message, HostMessage, SetTime};
use husk_proto::v1::{
    event, network, RestoreVmRequest, SnapshotVmRequest, SnapshotVmResponse, Vm, VmState,
};
use husk_proto::vmm::{vmm_request, vmm_response, Snapshot, VmmRequest, VmmResponse};
use prost::Message;
use tokio::sync::watch;
use tonic::Status;

use super::{lock, now_ms, vmm_call, Daemon, VmEntry};
use crate::agent_client;
use crate::snapshot_files;
use crate::store;
use crate::validate;
use crate::vmm_process::{self, Launch, ProcessHandle};
use crate::wire;

/// Files of a snapshot directory.
pub const STATE_FILE: &str = "vm.state";
/// Guest memory.
pub const MEM_FILE: &str = "vm.mem";
/// The VM record at snapshot time.
pub const RECORD_FILE: &str = "vm.pb";
/// A diff's base memory file (its path, as text).
pub const BASE_FILE: &str = "vm.base";
/// Longest a snapshot may take (a large guest's memory file is written meanwhile).
const SNAPSHOT_LIMIT: Duration = Duration::from_secs(600);

fn absolute_dir(dir: &str, what: &str) -> Result<PathBuf, Status> {
    let path = PathBuf::from(dir);
    if dir.is_empty() || !path.is_absolute() {
        return Err(Status::invalid_argument(format!(
            "{what}: an absolute directory is needed, got {dir:?}"
        )));
    }
    Ok(path)
}

/// Asks the VMM to write its snapshot.
async fn vmm_snapshot(
    api: &Path,
    dir: &Path,
    diff: bool,
) -> Result<husk_proto::vmm::SnapshotDone, String> {
    let msg = vmm_request::Msg::Snapshot(Snapshot {
        state_path: dir.join(STATE_FILE).display().to_string(),
        mem_path: dir.join(MEM_FILE).display().to_string(),
        diff,
    });
    let reply: VmmResponse =
        wire::request_reply(api, &VmmRequest { msg: Some(msg) }, SNAPSHOT_LIMIT)
            .await
            .map_err(|e| e.to_string())?;
    match reply.msg {
        Some(vmm_response::Msg::Snapshot(done)) => Ok(done),
        Some(vmm_response::Msg::Error(e)) => Err(e),
        _ => Err("unexpected reply".into()),
    }
}

impl Daemon {
    /// SnapshotVm (see husk.proto).
    pub async fn snapshot_vm(
        &self,
        entry: &Arc<VmEntry>,
        request: &SnapshotVmRequest,
    ) -> Result<SnapshotVmResponse, Status> {
        let dir = absolute_dir(&request.dir, "dir")?;
        let _op = entry.op.lock().await;
        let was_running = match entry.state() {
            VmState::Running => true,
            VmState::Paused => false,
            _ => return Err(entry.wrong_state("SnapshotVm")),
        };
        if dir.join(STATE_FILE).exists() || dir.join(RECORD_FILE).exists() {
            return Err(Status::already_exists(format!(
                "dir: {} holds a snapshot already",
                dir.display()
            )));
        }
        std::fs::create_dir_all(&dir).map_err(|e| {
            Status::failed_precondition(format!("dir: cannot create {}: {e}", dir.display()))
        })?;
        let api = entry.dir.join(store::API_SOCK);
        // A jailed VMM writes into its own directory; the files are moved into `dir` after.
        let staging = match self.config.jail.as_ref() {
            Some(jail) => Some(
                snapshot_files::prepare_staging(
                    &entry.dir.join(store::VMM_DIR),
                    (jail.uid, jail.gid),
                )
                .map_err(|e| {
                    Status::internal(format!(
                        "SnapshotVm: cannot prepare the jail's staging: {e}"
                    ))
                })?,
            ),
            None => None,
        };
        if was_running {
            vmm_call(&api, vmm_request::Msg::Pause(Default::default()))
                .await
                .map_err(|e| Status::internal(format!("SnapshotVm: cannot pause: {e}")))?;
        }
        let mut result = vmm_snapshot(&api, staging.as_deref().unwrap_or(&dir), request.diff).await;
        if let (Ok(_), Some(staging)) = (&result, staging.clone()) {
            let target = dir.clone();
            let moved = tokio::task::spawn_blocking(move || {
                snapshot_files::move_files(&staging, &target, &[STATE_FILE, MEM_FILE])
            })
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r.map_err(|e| format!("cannot move the snapshot out of the jail: {e}")));
            if let Err(e) = moved {
                result = Err(e);
            }
        }
        if let (Err(_), Some(staging)) = (&result, &staging) {
            // What a failed snapshot left in the jail (a partial memory file can be large).
            let _ = std::fs::remove_dir_all(staging);
        }
        let record = entry.snapshot();
        let saved = result.as_ref().ok().map(|done| {
            // A diff names its base, which a restore must see (and a jail must mirror).
            if done.base_path.is_empty() {
                Ok(())
            } else {
                store::write_atomic(&dir.join(BASE_FILE), done.base_path.as_bytes())
            }
            .and_then(|()| store::write_atomic(&dir.join(RECORD_FILE), &record.encode_to_vec()))
        });
        if was_running && (!request.leave_paused || result.is_err()) {
            if let Err(e) = vmm_call(&api, vmm_request::Msg::Resume(Default::default())).await {
                eprintln!(
                    "huskd: warning: VM {} stays paused after its snapshot: {e}",
                    entry.id
                );
                entry.update(|vm| vm.state = VmState::Paused as i32);
            }
        } else if was_running {
            entry.update(|vm| vm.state = VmState::Paused as i32);
            self.emit(entry, event::Kind::Paused, None, String::new());
        }
        let done = result.map_err(|e| {
            if e.contains("needs a base") {
                Status::failed_precondition(format!("SnapshotVm: {e}"))
            } else if request.diff
                && staging
                    .as_ref()
                    .is_some_and(|s| e.contains(&*s.to_string_lossy()))
            {
                // The jailed VMM's last full snapshot was moved out of its jail (see
                // snapshot_files); a VM restored from a full snapshot diffs against that one.
                Status::failed_precondition(format!(
                    "SnapshotVm: {e} (a jailed VM takes diffs against the snapshot it was \
                     restored from: restore from a full snapshot first)"
                ))
            } else {
                Status::internal(format!("SnapshotVm: husk-vmm: {e}"))
            }
        })?;
        if let Some(Err(e)) = saved {
            return Err(Status::internal(format!(
                "SnapshotVm: cannot write {RECORD_FILE}: {e}"
            )));
        }
        Ok(SnapshotVmResponse {
            vm: Some(entry.snapshot()),
            memory_bytes: done.memory_bytes,
            memory_written: done.memory_written,
            duration_ms: done.total_us / 1000,
        })
    }

    /// RestoreVm (see husk.proto).
    pub async fn restore_vm(self: &Arc<Self>, request: RestoreVmRequest) -> Result<Vm, Status> {
        let dir = absolute_dir(&request.dir, "dir")?;
        let bytes = std::fs::read(dir.join(RECORD_FILE)).map_err(|e| {
            Status::not_found(format!(
                "dir: no snapshot in {} ({RECORD_FILE}: {e})",
                dir.display()
            ))
        })?;
        let source = Vm::decode(&bytes[..]).map_err(|e| {
            Status::invalid_argument(format!("dir: {RECORD_FILE} is not a VM record: {e}"))
        })?;
        for file in [STATE_FILE, MEM_FILE] {
            if !dir.join(file).is_file() {
                return Err(Status::not_found(format!(
                    "dir: {} lacks {file}",
                    dir.display()
                )));
            }
        }
        let mut spec = source.spec.unwrap_or_default();
        spec.name = request.name.clone();
        if !request.labels.is_empty() {
            spec.labels = request.labels.clone();
        }
        let tap = spec
            .network
            .as_ref()
            .is_some_and(|n| n.mode == network::Mode::Tap as i32);
        if !request.mac.is_empty() {
            if !tap {
                return Err(Status::invalid_argument(
                    "mac: the snapshot's VM has no network device",
                ));
            }
            if validate::parse_mac(&request.mac).is_none() {
                return Err(Status::invalid_argument(format!(
                    "mac: {:?} is not a MAC address",
                    request.mac
                )));
            }
            if let Some(n) = spec.network.as_mut() {
                n.mac = request.mac.clone();
            }
        }
        if !request.disks.is_empty() {
            let count = usize::from(!spec.rootfs.is_empty()) + spec.disks.len();
            if request.disks.len() != count {
                return Err(Status::invalid_argument(format!(
                    "disks: the snapshot has {count} disks, {} were given",
                    request.disks.len()
                )));
            }
            let mut given = request.disks.clone().into_iter();
            if !spec.rootfs.is_empty() {
                spec.rootfs = given.next().map(|d| d.path).unwrap_or_default();
            }
            spec.disks = given.collect();
        }
        let entry = self.create(spec)?;
        let spec = entry.snapshot().spec.unwrap_or_default();
        let link = if tap {
            let mut link = VmLink::create().map_err(Status::unavailable)?;
            if let Some(mac) = spec
                .network
                .as_ref()
                .and_then(|n| validate::parse_mac(&n.mac))
            {
                link.mac = mac;
            }
            Some(link)
        } else {
            None
        };
        let cid = entry.snapshot().status.as_ref().map_or(3, |s| s.vsock_cid);
        let owner = self.config.jail.as_ref().map(|j| (j.uid, j.gid));
        if let Err(e) = vmm_process::reset_console_log(&entry.dir, owner) {
            let _ = self.delete(&entry, true).await;
            return Err(Status::internal(format!(
                "cannot create the console log: {e}"
            )));
        }
        let launch = Launch {
            jail: self.config.jail.as_ref(),
            id: &entry.id,
            vmm: &self.config.vmm,
            dir: &entry.dir,
            spec: &spec,
            vsock_cid: cid,
            link: link.as_ref(),
            restore: Some((&dir, request.start_paused)),
        };
        let pid = match self.spawn_vmm(&entry, &launch) {
            Ok(pid) => pid,
            Err(e) => {
                let _ = self.delete(&entry, true).await;
                return Err(Status::internal(e));
            }
        };
        let (tap_name, host_ip, guest_ip) = super::link_addresses(link.as_ref());
        // The guest kept the snapshot's MAC and addresses: give it the new link's.
        let net_script = link.as_ref().map(|l| {
            let m = l.mac;
            format!(
                "ip link set dev eth0 down && \
                 ip link set dev eth0 address {:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x} && \
                 ip addr flush dev eth0 && ip addr add {}/30 dev eth0 && \
                 ip link set dev eth0 up && ip route replace default via {}",
                m[0], m[1], m[2], m[3], m[4], m[5], l.guest_ip, l.host_ip
            )
        });
        drop(link);
        let state = if request.start_paused {
            VmState::Paused
        } else {
            VmState::Running
        };
        let vm = entry.update(|vm| {
            vm.state = state as i32;
            let status = VmEntry::status_mut(vm);
            status.vmm_pid = pid;
            status.started_unix_ms = now_ms();
            status.tap = tap_name;
            status.host_ip = host_ip;
            status.guest_ip = guest_ip;
        });
        self.emit(&entry, event::Kind::Started, None, String::new());
        match ProcessHandle::open(pid) {
            Ok(Some(handle)) => {
                self.watch_run(&entry, pid, handle);
                let ended = lock(&entry.run).as_ref().map(|r| r.ended.clone());
                if let Some(ended) = ended {
                    let daemon = self.clone();
                    let entry = entry.clone();
                    tokio::spawn(
                        async move { daemon.after_restore(&entry, ended, net_script).await },
                    );
                }
            }
            _ => self.record_end(&entry, None, false),
        }
        Ok(vm)
    }

    /// Once the restored guest's agent answers: sets its wall clock (it stood still while the
    /// snapshot lay on disk) and, with a new tap, moves eth0 to the new MAC and addresses.
    /// Waits as long as the VM runs or is paused.
    async fn after_restore(
        &self,
        entry: &Arc<VmEntry>,
        ended: watch::Receiver<bool>,
        net_script: Option<String>,
    ) {
        if !self.correct_clock(entry, &ended).await {
            return;
        }
        if let Some(script) = net_script {
            let socket = entry.dir.join(store::VSOCK_SOCK);
            let argv = vec!["sh".to_string(), "-c".to_string(), script];
            match guest_run(&socket, argv, Duration::from_secs(30)).await {
                Ok(0) => {}
                Ok(code) => eprintln!(
                    "huskd: warning: VM {}: reconfiguring eth0 after restore exited {code}",
                    entry.id
                ),
                Err(e) => eprintln!(
                    "huskd: warning: VM {}: cannot reconfigure eth0 after restore: {e}",
                    entry.id
                ),
            }
        }
    }

    /// Sets the guest's wall clock through the agent; false if the VM ended first.
    async fn correct_clock(&self, entry: &Arc<VmEntry>, ended: &watch::Receiver<bool>) -> bool {
        let socket = entry.dir.join(store::VSOCK_SOCK);
        while !*ended.borrow() {
            if entry.state() == VmState::Running {
                let now_ns = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos() as i64);
                let message = HostMessage {
                    msg: Some(host_message::Msg::SetTime(SetTime { unix_ns: now_ns })),
                };
                match agent_client::request(&socket, &message, Duration::from_secs(2)).await {
                    Ok(_) => return true,
                    Err(e) if e.to_string().contains("guest agent:") => {
                        eprintln!(
                            "huskd: warning: VM {}: cannot set the guest clock: {e}",
                            entry.id
                        );
                        return true;
                    }
                    Err(_) => {}
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        false
    }
}

/// Runs `argv` in the guest through the agent; its exit code.
async fn guest_run(socket: &Path, argv: Vec<String>, limit: Duration) -> std::io::Result<i32> {
    use husk_proto::agent::{guest_message, Exec, GuestMessage};
    let mut stream = agent_client::connect(socket, limit).await?;
    let exec = HostMessage {
        msg: Some(host_message::Msg::Exec(Exec {
            argv,
            ..Default::default()
        })),
    };
    wire::write_frame(&mut stream, &exec).await?;
    loop {
        let reply: Option<GuestMessage> =
            tokio::time::timeout(limit, wire::read_frame(&mut stream))
                .await
                .map_err(|_| std::io::Error::other("the guest command timed out"))??;
        match reply.and_then(|r| r.msg) {
            Some(guest_message::Msg::Exit(exit)) => return Ok(exit.code),
            Some(guest_message::Msg::Error(e)) => return Err(std::io::Error::other(e)),
            None => return Err(std::io::Error::other("the agent closed the connection")),
            Some(_) => {}
        }
    }
}
