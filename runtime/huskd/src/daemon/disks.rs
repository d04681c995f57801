//! AttachDisk and DetachDisk: filling and emptying a running VM's disk slots
//! (`VmSpec.disk_slots`). huskd opens the image under its path policy and hands the open file
//! to the VMM over the control socket (SCM_RIGHTS with `attach_disk`): the jailed VMM can open
//! no host path itself. What is in the slots is kept in `VmStatus.attached_disks`; slots are
//! empty again at every start.

use std::io::{self, IoSlice};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use husk_proto::frame;
use husk_proto::v1::{AttachDiskRequest, AttachedDisk, DetachDiskRequest, Vm, VmState};
use husk_proto::vmm::{
    vmm_request, vmm_response, AttachDisk, DetachDisk, ErrorKind, VmmRequest, VmmResponse,
};
use rustix::net::{sendmsg, SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
use tokio::io::{AsyncWriteExt, Interest};
use tonic::{Code, Status};

use husk_host::confined::Dir;

use super::{policy_status, run_disks, vmm_call, Daemon, VmEntry, VmmCallError};
use crate::validate;
use crate::wire::{self, VmSocket};

/// How long one attach may take on the control socket.
const CALL_LIMIT: Duration = Duration::from_secs(5);

impl Daemon {
    /// Puts `request.disk` into slot `request.slot` (see AttachDisk in husk.proto).
    pub async fn attach_disk(
        &self,
        entry: &Arc<VmEntry>,
        request: &AttachDiskRequest,
    ) -> Result<Vm, Status> {
        let disk = validate::attached_disk(request.disk.as_ref())?;
        let _op = entry.op.lock().await;
        let vm = live_vm(entry, "AttachDisk")?;
        check_slot(&vm, request.slot)?;
        let attached = vm.status.as_ref().map(|s| s.attached_disks.as_slice());
        if attached
            .unwrap_or_default()
            .iter()
            .any(|a| a.slot == request.slot)
        {
            return Err(Status::already_exists(format!(
                "AttachDisk: disk slot {} holds a disk already",
                request.slot
            )));
        }
        let dir = Dir::open(&entry.dir)
            .map_err(|e| Status::internal(format!("AttachDisk: the VM's directory: {e}")))?;
        // The policy first: outside it PERMISSION_DENIED, a missing file NOT_FOUND.
        let writable = !disk.read_only && !disk.copy_on_write;
        self.config
            .policy
            .check_file("disk.path", Path::new(&disk.path), writable)
            .map_err(|e| policy_status(e, Status::not_found))?;
        let overlay = run_disks::slot_overlay_name(request.slot);
        if disk.copy_on_write {
            // A VM that stopped with a disk attached left its overlay: this attach starts anew.
            let _ = dir.remove_file(&overlay);
        }
        let opened = run_disks::open_one(
            &self.config.policy,
            &dir,
            &overlay,
            &run_disks::DiskRequest {
                what: "disk".into(),
                path: &disk.path,
                format: &disk.format,
                read_only: disk.read_only,
                copy_on_write: disk.copy_on_write,
            },
        )?;
        let msg = vmm_request::Msg::AttachDisk(AttachDisk {
            slot: request.slot,
            read_only: disk.read_only,
            format: opened.config.format.to_string(),
            backing_formats: opened
                .config
                .backing
                .iter()
                .map(|(_, f)| f.to_string())
                .collect(),
        });
        let fds: Vec<BorrowedFd<'_>> = opened.files.iter().map(|f| f.as_fd()).collect();
        let sent = call_with_fds(&entry.api_socket(), msg, &fds).await;
        drop(fds);
        drop(opened);
        if let Err(e) = sent {
            if disk.copy_on_write {
                let _ = dir.remove_file(&overlay);
            }
            return Err(vmm_status("AttachDisk", e));
        }
        tracing::info!(vm_id = %entry.id, slot = request.slot, path = %disk.path, "disk attached");
        Ok(entry.update(|vm| {
            let status = VmEntry::status_mut(vm);
            status.attached_disks.push(AttachedDisk {
                slot: request.slot,
                disk: Some(disk),
                container: String::new(),
            });
            status.attached_disks.sort_by_key(|a| a.slot);
        }))
    }

    /// Empties slot `request.slot` (see DetachDisk in husk.proto). A slot that holds a pod
    /// container's root is emptied by RemoveContainer, which unmounts it in the guest first.
    pub async fn detach_disk(
        &self,
        entry: &Arc<VmEntry>,
        request: &DetachDiskRequest,
    ) -> Result<Vm, Status> {
        let holder = entry.snapshot().status.and_then(|s| {
            s.attached_disks
                .into_iter()
                .find(|a| a.slot == request.slot && !a.container.is_empty())
                .map(|a| a.container)
        });
        if let Some(container) = holder {
            return Err(Status::failed_precondition(format!(
                "DetachDisk: slot {} holds the root of container {container}: use \
                 RemoveContainer",
                request.slot
            )));
        }
        self.detach_slot(entry, request).await
    }

    /// Empties a slot, whatever it holds.
    pub(super) async fn detach_slot(
        &self,
        entry: &Arc<VmEntry>,
        request: &DetachDiskRequest,
    ) -> Result<Vm, Status> {
        let _op = entry.op.lock().await;
        let vm = live_vm(entry, "DetachDisk")?;
        check_slot(&vm, request.slot)?;
        let msg = vmm_request::Msg::DetachDisk(DetachDisk { slot: request.slot });
        vmm_call(&entry.api_socket(), msg)
            .await
            .map_err(|e| vmm_status("DetachDisk", e))?;
        // A copy-on-write disk's overlay goes with it (the VMM has closed it).
        let cow = vm.status.as_ref().is_some_and(|s| {
            s.attached_disks
                .iter()
                .any(|a| a.slot == request.slot && a.disk.as_ref().is_some_and(|d| d.copy_on_write))
        });
        if cow {
            if let Ok(dir) = Dir::open(&entry.dir) {
                let _ = dir.remove_file(&run_disks::slot_overlay_name(request.slot));
            }
        }
        tracing::info!(vm_id = %entry.id, slot = request.slot, "disk detached");
        Ok(entry.update(|vm| {
            VmEntry::status_mut(vm)
                .attached_disks
                .retain(|a| a.slot != request.slot);
        }))
    }
}

/// The VM's record, if it is RUNNING or PAUSED (its VMM serves the control socket).
fn live_vm(entry: &VmEntry, call: &str) -> Result<Vm, Status> {
    if !matches!(entry.state(), VmState::Running | VmState::Paused) {
        return Err(entry.wrong_state(call));
    }
    Ok(entry.snapshot())
}

fn check_slot(vm: &Vm, slot: u32) -> Result<(), Status> {
    let slots = vm.spec.as_ref().map_or(0, |s| s.disk_slots);
    if slot >= slots {
        return Err(Status::invalid_argument(format!(
            "slot: the VM has {slots} disk slots (0..{slots}), not slot {slot}"
        )));
    }
    Ok(())
}

/// The gRPC status of a refused or failed control call: the VMM's kind picks the code.
fn vmm_status(call: &str, e: VmmCallError) -> Status {
    let code = match &e {
        VmmCallError::Refused { kind, .. } => match kind {
            ErrorKind::NoSuchSlot => Code::InvalidArgument,
            ErrorKind::SlotOccupied => Code::AlreadyExists,
            ErrorKind::SlotEmpty | ErrorKind::BadDisk => Code::FailedPrecondition,
            _ => Code::Internal,
        },
        _ => Code::Internal,
    };
    Status::new(code, format!("{call}: husk-vmm: {e}"))
}

/// One control request with `fds` sent along (SCM_RIGHTS on the frame's first bytes).
async fn call_with_fds(
    api: &VmSocket,
    msg: vmm_request::Msg,
    fds: &[BorrowedFd<'_>],
) -> Result<(), VmmCallError> {
    let request = VmmRequest { msg: Some(msg) };
    let reply: VmmResponse = tokio::time::timeout(CALL_LIMIT, async {
        let mut stream = api.connect().await?;
        let bytes = frame::encode(&request)?;
        let sent = stream
            .async_io(Interest::WRITABLE, || {
                let mut space = [MaybeUninit::<u8>::uninit();
                    rustix::cmsg_space!(ScmRights(husk_host::vmm_args::MAX_CHAIN))];
                let mut control = SendAncillaryBuffer::new(&mut space);
                control.push(SendAncillaryMessage::ScmRights(fds));
                sendmsg(
                    &stream,
                    &[IoSlice::new(&bytes)],
                    &mut control,
                    SendFlags::NOSIGNAL | SendFlags::DONTWAIT,
                )
                .map_err(io::Error::from)
            })
            .await?;
        // The fd went with the first bytes; the rest of a long frame follows plainly.
        stream.write_all(&bytes[sent..]).await?;
        wire::read_frame(&mut stream)
            .await?
            .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "no reply"))
    })
    .await
    .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "the VMM did not answer in time"))??;
    let kind = reply.error_kind();
    match reply.msg {
        Some(vmm_response::Msg::Error(message)) => Err(VmmCallError::Refused { message, kind }),
        Some(vmm_response::Msg::Info(_)) => Ok(()),
        Some(vmm_response::Msg::Snapshot(_)) => Err(VmmCallError::Unexpected),
        None => Err(VmmCallError::Empty),
    }
}
