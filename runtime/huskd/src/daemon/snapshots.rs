//! SnapshotVm and RestoreVm: a VM's snapshot in a directory on huskd's host, and new VMs made
//! from it (see docs/snapshots.md).
//!
//! A snapshot directory holds `vm.state` and `vm.mem` (written by husk-vmm, see its control
//! socket's `snapshot` request) and `vm.pb`, the VM record (its spec) at snapshot time. A
//! restore is a new VM (new id, name, vsock CID and tap) that starts where the snapshot was
//! taken, through the same [`Daemon::launch`] as a boot; as soon as its guest agent answers,
//! its wall clock and, with a tap, its eth0 are set anew (see `agent.rs`).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use husk_host::confined::Dir;
use husk_host::policy::PolicyError;
use husk_proto::v1::{
    event, network, RestoreVmRequest, SnapshotVmRequest, SnapshotVmResponse, Vm, VmState,
};
use husk_proto::vmm::{vmm_request, vmm_response, ErrorKind, Snapshot, VmmRequest, VmmResponse};
use prost::Message;
use tonic::Status;

use super::launch::RestoreLaunch;
use super::run_disks;
use super::vm::VmEntry;
use super::{policy_status, vmm_call, Daemon, VmmCallError};
use crate::snapshot_files;
use crate::store;
use crate::validate;
use crate::vmm_process::Restore;
use crate::wire::{self, VmSocket};

/// Files of a snapshot directory.
pub(super) const STATE_FILE: &str = "vm.state";
/// Guest memory.
pub(super) const MEM_FILE: &str = "vm.mem";
/// The VM record at snapshot time.
pub(super) const RECORD_FILE: &str = "vm.pb";
/// A diff's base memory file (its path, as text).
pub(super) const BASE_FILE: &str = "vm.base";
/// Longest a snapshot may take (a large guest's memory file is written meanwhile).
const SNAPSHOT_LIMIT: Duration = Duration::from_secs(600);

/// The request's snapshot directory, which must be an absolute path (huskd does not share the
/// caller's working directory).
fn absolute_dir(dir: &str) -> Result<PathBuf, Status> {
    let path = PathBuf::from(dir);
    if !path.is_absolute() {
        return Err(Status::invalid_argument(format!(
            "dir: an absolute directory is needed, got {dir:?}"
        )));
    }
    Ok(path)
}

/// The status for a snapshot directory the policy refused.
fn dir_status(e: PolicyError) -> Status {
    match &e {
        PolicyError::Io { source, .. } if source.kind() == std::io::ErrorKind::AlreadyExists => {
            Status::already_exists(e.to_string())
        }
        _ => policy_status(e, |m: String| Status::not_found(m)),
    }
}

/// Asks the VMM to write its snapshot.
/// Why a snapshot failed: the VMM refused or broke, or huskd could not keep its files.
#[derive(Debug, thiserror::Error)]
enum SnapshotFailure {
    #[error(transparent)]
    Vmm(VmmCallError),
    #[error("{0}")]
    Files(String),
}

async fn vmm_snapshot(
    api: &VmSocket,
    dir: &Path,
    diff: bool,
) -> Result<husk_proto::vmm::SnapshotDone, VmmCallError> {
    let msg = vmm_request::Msg::Snapshot(Snapshot {
        state_path: dir.join(STATE_FILE).display().to_string(),
        mem_path: dir.join(MEM_FILE).display().to_string(),
        diff,
    });
    let reply: VmmResponse =
        wire::request_reply(api, &VmmRequest { msg: Some(msg) }, SNAPSHOT_LIMIT).await?;
    let kind = reply.error_kind();
    match reply.msg {
        Some(vmm_response::Msg::Snapshot(done)) => Ok(done),
        Some(vmm_response::Msg::Error(message)) => Err(VmmCallError::Refused { message, kind }),
        Some(_) => Err(VmmCallError::Unexpected),
        None => Err(VmmCallError::Empty),
    }
}

impl Daemon {
    /// SnapshotVm (see husk.proto).
    pub async fn snapshot_vm(
        &self,
        entry: &Arc<VmEntry>,
        request: &SnapshotVmRequest,
    ) -> Result<SnapshotVmResponse, Status> {
        let path = absolute_dir(&request.dir)?;
        let _op = entry.op.lock().await;
        self.check_snapshot_allowed(entry)?;
        let target = self
            .config
            .policy
            .create_dir("dir", &path)
            .map_err(dir_status)?;
        let (done, vm) = self
            .snapshot_into(entry, target, request.leave_paused, request.diff)
            .await?;
        Ok(SnapshotVmResponse {
            vm: Some(vm),
            memory_bytes: done.memory_bytes,
            memory_written: done.memory_written,
            duration_ms: done.total_us / 1000,
        })
    }

    /// Whether the VM's state and spec allow a snapshot (FAILED_PRECONDITION otherwise).
    fn check_snapshot_allowed(&self, entry: &VmEntry) -> Result<(), Status> {
        if !matches!(entry.state(), VmState::Running | VmState::Paused) {
            return Err(entry.wrong_state("SnapshotVm"));
        }
        let mounts = entry.snapshot().spec.map(|s| s.mounts).unwrap_or_default();
        if !mounts.is_empty() {
            let dirs: Vec<&str> = mounts.iter().map(|m| m.guest_path.as_str()).collect();
            return Err(Status::failed_precondition(format!(
                "SnapshotVm: the VM shares host directories ({}): the files virtiofsd holds \
                 open for the guest and its FUSE session cannot be saved; a VM with mounts \
                 cannot be snapshotted",
                dirs.join(", ")
            )));
        }
        Ok(())
    }

    /// Writes a snapshot of the VM into the directory `target` (vm.state, vm.mem, vm.pb, the
    /// copy-on-write overlays). The caller holds the VM's operation lock and checked
    /// [`Self::check_snapshot_allowed`].
    pub(super) async fn snapshot_into(
        &self,
        entry: &Arc<VmEntry>,
        target: Dir,
        leave_paused: bool,
        diff: bool,
    ) -> Result<(husk_proto::vmm::SnapshotDone, Vm), Status> {
        let was_running = match entry.state() {
            VmState::Running => true,
            VmState::Paused => false,
            _ => return Err(entry.wrong_state("SnapshotVm")),
        };
        let api = entry.api_socket();
        // A jailed VMM writes into a staging directory of its own `vmm/` (all its jail lets it
        // write); huskd then moves the files out without following anything the VMM could have
        // planted there. An unjailed VMM is root like huskd: it writes straight into the
        // directory huskd opened, named through huskd's own fd (no rename of a path component
        // can redirect that), and its memory file stays where later diffs look for their base.
        let vmm_uid = entry.vmm_uid();
        let staging_path = entry
            .dir
            .join(store::VMM_DIR)
            .join(snapshot_files::STAGING_DIR);
        let jailed = self.config.jail.is_some();
        let write_to = if jailed {
            snapshot_files::prepare_staging(&entry.dir, vmm_uid).map_err(|e| {
                Status::internal(format!(
                    "SnapshotVm: cannot prepare the staging directory: {e}"
                ))
            })?;
            staging_path.clone()
        } else {
            use std::os::fd::AsRawFd;
            PathBuf::from(format!(
                "/proc/{}/fd/{}",
                std::process::id(),
                target.fd().as_raw_fd()
            ))
        };
        if was_running {
            vmm_call(&api, vmm_request::Msg::Pause(Default::default()))
                .await
                .map_err(|e| Status::internal(format!("SnapshotVm: cannot pause: {e}")))?;
        }
        let mut result = vmm_snapshot(&api, &write_to, diff)
            .await
            .map_err(SnapshotFailure::Vmm);
        if result.is_ok() {
            let vm_dir = entry.dir.clone();
            let moved = tokio::task::spawn_blocking(move || {
                let files = [STATE_FILE, MEM_FILE];
                if jailed {
                    snapshot_files::move_out(&vm_dir, &target, vmm_uid, &files)
                } else {
                    snapshot_files::seal(&target, &files)
                }
                .map(|()| target)
            })
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r.map_err(|e| format!("cannot move the snapshot out of the jail: {e}")));
            match moved {
                Ok(target) => {
                    let record = entry.snapshot();
                    let base = result
                        .as_ref()
                        .map(|done| done.base_path.clone())
                        .unwrap_or_default();
                    // A diff names its base, which a restore must see (and a jail mirror).
                    let saved = if base.is_empty() {
                        Ok(())
                    } else {
                        target.write_new(BASE_FILE, base.as_bytes(), store::FILE_MODE)
                    }
                    .and_then(|()| {
                        target.write_new(RECORD_FILE, &record.encode_to_vec(), store::FILE_MODE)
                    })
                    .and_then(|()| copy_overlays(&entry.dir, &target, record.spec.as_ref()));
                    if let Err(e) = saved {
                        result = Err(SnapshotFailure::Files(format!(
                            "cannot write {RECORD_FILE}: {e}"
                        )));
                    }
                }
                Err(e) => result = Err(SnapshotFailure::Files(e)),
            }
        }
        // Whatever happened, nothing stays behind in the VMM's directory (a partial memory
        // file can be large).
        snapshot_files::remove_staging(&entry.dir);
        if was_running && (!leave_paused || result.is_err()) {
            if let Err(e) = vmm_call(&api, vmm_request::Msg::Resume(Default::default())).await {
                tracing::warn!(
                    vm_id = %entry.id,
                    error = %e,
                    "the VM stays paused after its snapshot"
                );
                entry.update(|vm| vm.state = VmState::Paused as i32);
            }
        } else if was_running {
            entry.update(|vm| vm.state = VmState::Paused as i32);
            self.emit(entry, event::Kind::Paused, None, String::new());
        }
        let done = result.map_err(|e| {
            let kind = match &e {
                SnapshotFailure::Vmm(VmmCallError::Refused { kind, .. }) => *kind,
                _ => ErrorKind::Unspecified,
            };
            if kind == ErrorKind::NoBase {
                Status::failed_precondition(format!("SnapshotVm: {e}"))
            } else if kind == ErrorKind::BaseUnavailable {
                // The VMM's last full snapshot was moved out of its directory (see
                // snapshot_files); a VM restored from a full snapshot diffs against that one.
                Status::failed_precondition(format!(
                    "SnapshotVm: {e} (a VM takes diffs against the snapshot it was restored \
                     from: restore from a full snapshot first)"
                ))
            } else {
                Status::internal(format!("SnapshotVm: husk-vmm: {e}"))
            }
        })?;
        Ok((done, entry.snapshot()))
    }

    /// RestoreVm (see husk.proto).
    pub async fn restore_vm(self: &Arc<Self>, request: RestoreVmRequest) -> Result<Vm, Status> {
        let path = absolute_dir(&request.dir)?;
        let policy = &self.config.policy;
        let dir = policy.open_dir("dir", &path).map_err(dir_status)?;
        let bytes = dir
            .read_bounded(RECORD_FILE, store::MAX_RECORD)
            .map_err(|e| Status::invalid_argument(format!("dir: {RECORD_FILE}: {e}")))?
            .ok_or_else(|| {
                Status::not_found(format!(
                    "dir: no snapshot in {} (no {RECORD_FILE})",
                    path.display()
                ))
            })?;
        let source = Vm::decode(&bytes[..]).map_err(|e| {
            Status::invalid_argument(format!("dir: {RECORD_FILE} is not a VM record: {e}"))
        })?;
        let state = open_snapshot_file(&dir, &path, STATE_FILE)?;
        let mem = open_snapshot_file(&dir, &path, MEM_FILE)?;
        let base = match dir.read_bounded(BASE_FILE, 4096) {
            Ok(None) => None,
            Ok(Some(text)) => {
                let base = PathBuf::from(String::from_utf8_lossy(&text).trim_end());
                let opened = policy
                    .open_file("vm.base", &base, false)
                    .map_err(|e| policy_status(e, |m: String| Status::failed_precondition(m)))?;
                Some(opened.file)
            }
            Err(e) => return Err(Status::invalid_argument(format!("dir: {BASE_FILE}: {e}"))),
        };
        let spec = restored_spec(source, &request)?;
        let options = CloneOptions {
            keep_disks: request.disks.is_empty(),
            start_paused: request.start_paused,
            hostname: String::new(),
            template: None,
            identity_taken: None,
        };
        let files = SnapshotFiles {
            dir,
            path: &path,
            state,
            mem,
            base,
        };
        self.restore_snapshot(files, spec, options).await
    }

    /// A new VM of `spec` from the snapshot `files`, launched (see RestoreVm). Copy-on-write
    /// disks go on from the snapshot's copy of their overlay unless the disks were replaced.
    pub(super) async fn restore_snapshot(
        self: &Arc<Self>,
        files: SnapshotFiles<'_>,
        spec: husk_proto::v1::VmSpec,
        options: CloneOptions,
    ) -> Result<Vm, Status> {
        let SnapshotFiles {
            dir,
            path,
            state,
            mem,
            base,
        } = files;
        // Checked before the VM exists.
        let overlays = if options.keep_disks {
            snapshot_overlays(&dir, path, &spec)?
        } else {
            Vec::new()
        };
        let entry = self.create(spec)?;
        if let Some((name, build)) = &options.template {
            entry.update(|vm| {
                let status = VmEntry::status_mut(vm);
                status.template = name.clone();
                status.template_build = build.clone();
            });
        }
        if let Err(status) = self.clone_overlays(&entry, path, &overlays) {
            let _ = self.delete(&entry, true).await;
            return Err(status);
        }
        let spec = entry.snapshot().spec.unwrap_or_default();
        let lexical = husk_host::jail::normalize(path);
        let restore = RestoreLaunch {
            files: Restore {
                state,
                mem,
                mem_name: lexical.join(MEM_FILE),
                base,
                start_paused: options.start_paused,
            },
            hostname: options.hostname,
            identity_taken: options.identity_taken,
        };
        let launched = {
            let _op = entry.op.lock().await;
            self.launch(&entry, &spec, Some(restore)).await
        };
        match launched {
            Ok(vm) => Ok(vm),
            Err(status) => {
                let _ = self.delete(&entry, true).await;
                Err(status)
            }
        }
    }
}

/// The files of a snapshot, opened.
pub(super) struct SnapshotFiles<'a> {
    pub dir: Dir,
    pub path: &'a Path,
    pub state: std::fs::File,
    pub mem: std::fs::File,
    /// A diff's base memory file.
    pub base: Option<std::fs::File>,
}

impl<'a> SnapshotFiles<'a> {
    /// The state and memory files of the full snapshot in `dir` (at `path`).
    pub fn open_full(dir: Dir, path: &'a Path) -> Result<Self, Status> {
        let state = open_snapshot_file(&dir, path, STATE_FILE)?;
        let mem = open_snapshot_file(&dir, path, MEM_FILE)?;
        Ok(Self {
            dir,
            path,
            state,
            mem,
            base: None,
        })
    }
}

/// How a VM restored from a snapshot differs from the snapshot's.
pub(super) struct CloneOptions {
    /// The snapshot's disks are used (false: the request replaced them).
    pub keep_disks: bool,
    pub start_paused: bool,
    /// The clone's host name; empty: the snapshot's.
    pub hostname: String,
    /// The template (name, build) it is a clone of.
    pub template: Option<(String, String)>,
    /// Hears whether the clone took its new identity.
    pub identity_taken: Option<tokio::sync::oneshot::Sender<Result<(), String>>>,
}

/// Copies the overlay of every copy-on-write disk of `spec` from the VM's directory into the
/// snapshot `target`, under the same name. The VMM flushed its disks for the snapshot and the
/// VM is paused, so each file is the disk as the saved guest left it; only the overlay is
/// copied (what the VM wrote), never its base.
fn copy_overlays(
    vm_dir: &Path,
    target: &Dir,
    spec: Option<&husk_proto::v1::VmSpec>,
) -> std::io::Result<()> {
    let Some(spec) = spec else {
        return Ok(());
    };
    let vm_dir = Dir::open(vm_dir)?;
    for (i, disk) in run_disks::requests(spec).iter().enumerate() {
        if !disk.copy_on_write {
            continue;
        }
        let name = run_disks::overlay_name(i);
        let mut from = match vm_dir.open_file(&name, rustix::fs::OFlags::RDONLY, 0) {
            Ok(f) => f,
            // Never started: nothing written yet, the clone starts from the base.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        let mut to = target.open_file(
            &name,
            rustix::fs::OFlags::WRONLY | rustix::fs::OFlags::CREATE | rustix::fs::OFlags::EXCL,
            store::FILE_MODE,
        )?;
        std::io::copy(&mut from, &mut to)?;
        to.sync_all()?;
    }
    Ok(())
}

/// The copy-on-write disks of a restored `spec` with the snapshot's copy of their overlay:
/// (disk index, what). A disk whose overlay the snapshot lacks (the VM had never started) goes
/// on from its base.
fn snapshot_overlays(
    dir: &Dir,
    path: &Path,
    spec: &husk_proto::v1::VmSpec,
) -> Result<Vec<(usize, String)>, Status> {
    let mut out = Vec::new();
    for (i, disk) in run_disks::requests(spec).iter().enumerate() {
        if !disk.copy_on_write {
            continue;
        }
        let name = run_disks::overlay_name(i);
        match dir.open_file(&name, rustix::fs::OFlags::RDONLY, 0) {
            Ok(_) => out.push((i, disk.what.clone())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(Status::invalid_argument(format!(
                    "dir: {}/{name}: {e}",
                    path.display()
                )))
            }
        }
    }
    Ok(out)
}

impl Daemon {
    /// Gives the restored VM `entry` an overlay of its own over each snapshot overlay in
    /// `overlays`: clones share the snapshot's disk state without copying it.
    fn clone_overlays(
        &self,
        entry: &VmEntry,
        snapshot: &Path,
        overlays: &[(usize, String)],
    ) -> Result<(), Status> {
        if overlays.is_empty() {
            return Ok(());
        }
        let vm_dir = Dir::open(&entry.dir)
            .map_err(|e| Status::internal(format!("the VM's directory: {e}")))?;
        let snapshot = husk_host::jail::normalize(snapshot);
        for (i, what) in overlays {
            let name = run_disks::overlay_name(*i);
            run_disks::create_overlay(
                &self.policy_for(entry),
                &vm_dir,
                &name,
                what,
                &snapshot.join(&name),
                husk_host::vmm_args::DiskFormat::Qcow2,
            )?;
        }
        Ok(())
    }
}

/// Opens a snapshot file: a regular file in the directory, never through a link.
fn open_snapshot_file(dir: &Dir, path: &Path, name: &str) -> Result<std::fs::File, Status> {
    match dir.open_file(name, rustix::fs::OFlags::RDONLY, 0) {
        Ok(file) => Ok(file),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(Status::not_found(format!(
            "dir: {} lacks {name}",
            path.display()
        ))),
        Err(e) if husk_host::confined::is_symlink_refusal(&e) => Err(Status::permission_denied(
            format!("dir: {}/{name} is a symbolic link: refused", path.display()),
        )),
        Err(e) => Err(Status::invalid_argument(format!(
            "dir: {}/{name}: {e}",
            path.display()
        ))),
    }
}

/// The spec of a VM restored from a snapshot of `source`: the request's name, labels, MAC
/// and disks over the snapshot's.
fn restored_spec(source: Vm, request: &RestoreVmRequest) -> Result<husk_proto::v1::VmSpec, Status> {
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
    Ok(spec)
}
