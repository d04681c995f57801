//! SetMemoryTarget and GetVmMemory: a running VM's balloon (its VMM's `set_balloon`) and its
//! memory as the host (VMM RSS) and the guest (balloon statistics) see it. See docs/balloon.md.

use std::sync::Arc;

use husk_proto::v1::{GetVmMemoryRequest, SetMemoryTargetRequest, VmMemory, VmState};
use husk_proto::vmm::{vmm_request, Describe, ErrorKind, Info, SetBalloon};
use tonic::Status;

use super::{vmm_call, Daemon, VmEntry, VmmCallError};

/// The VM's memory from its VMM's description `info`, and its process `pid`.
fn vm_memory(info: &Info, pid: u32) -> VmMemory {
    let rss = (pid != 0)
        .then(|| std::fs::read_to_string(format!("/proc/{pid}/status")).ok())
        .flatten()
        .and_then(|status| husk_init::procfs::rss_bytes(&status))
        .unwrap_or(0);
    let mut memory = VmMemory {
        memory_mib: u64::from(info.memory_mib),
        vmm_rss_bytes: rss,
        ..VmMemory::default()
    };
    if let Some(b) = &info.balloon {
        memory.balloon = true;
        memory.balloon_target_mib = b.target_mib;
        memory.balloon_actual_mib = b.actual_mib;
        memory.free_page_reporting = b.free_page_reporting;
        memory.reported_bytes = b.reported_bytes;
        memory.guest_stats = b.stats.clone();
        memory.stats_age_ms = b.stats_age_ms;
    }
    memory
}

impl Daemon {
    /// See SetMemoryTarget in husk.proto.
    pub async fn set_memory_target(
        &self,
        entry: &Arc<VmEntry>,
        request: &SetMemoryTargetRequest,
    ) -> Result<VmMemory, Status> {
        let _op = entry.op.lock().await;
        let msg = vmm_request::Msg::SetBalloon(SetBalloon {
            target_mib: request.target_mib,
        });
        let memory = self.memory_call(entry, "SetMemoryTarget", msg).await?;
        tracing::info!(vm_id = %entry.id, target_mib = request.target_mib, "memory target set");
        Ok(memory)
    }

    /// See GetVmMemory in husk.proto.
    pub async fn vm_memory(
        &self,
        entry: &Arc<VmEntry>,
        _request: &GetVmMemoryRequest,
    ) -> Result<VmMemory, Status> {
        let msg = vmm_request::Msg::Describe(Describe::default());
        self.memory_call(entry, "GetVmMemory", msg).await
    }

    async fn memory_call(
        &self,
        entry: &Arc<VmEntry>,
        call: &str,
        msg: vmm_request::Msg,
    ) -> Result<VmMemory, Status> {
        if !matches!(entry.state(), VmState::Running | VmState::Paused) {
            return Err(entry.wrong_state(call));
        }
        let info = vmm_call(&entry.api_socket(), msg)
            .await
            .map_err(|e| match &e {
                VmmCallError::Refused {
                    kind: ErrorKind::NoBalloon,
                    ..
                } => Status::failed_precondition(format!("{call}: {e}")),
                VmmCallError::Refused {
                    kind: ErrorKind::InvalidTarget,
                    ..
                } => Status::invalid_argument(format!("{call}: {e}")),
                _ => Status::internal(format!("{call}: husk-vmm: {e}")),
            })?
            .ok_or_else(|| Status::internal(format!("{call}: husk-vmm answered without the VM")))?;
        let pid = entry.snapshot().status.map_or(0, |s| s.vmm_pid);
        Ok(vm_memory(&info, pid))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_balloon_fills_the_memory_view_and_its_absence_leaves_zeros() {
        let mut info = Info {
            memory_mib: 256,
            ..Info::default()
        };
        let plain = vm_memory(&info, 0);
        assert_eq!(
            (plain.memory_mib, plain.balloon, plain.vmm_rss_bytes),
            (256, false, 0)
        );
        info.balloon = Some(husk_proto::vmm::Balloon {
            target_mib: 64,
            actual_mib: 32,
            free_page_reporting: true,
            stats: [("free_memory".to_string(), 5u64)].into(),
            ..Default::default()
        });
        let with = vm_memory(&info, std::process::id());
        assert!(with.balloon && with.free_page_reporting);
        assert_eq!((with.balloon_target_mib, with.balloon_actual_mib), (64, 32));
        assert_eq!(with.guest_stats["free_memory"], 5);
        assert!(with.vmm_rss_bytes > 0, "this process's own RSS");
    }
}
