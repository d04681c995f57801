//! AddContainer and RemoveContainer: the containers of a pod inside the pod's one VM.
//!
//! A container's root filesystem goes into a free disk slot (the same path as AttachDisk: path
//! policy, backing chain, copy-on-write overlay in the VM's directory) and the guest agent
//! mounts it by the slot's virtio serial; Exec with `container` runs inside it. The slot's
//! `AttachedDisk.container` names the container, so RemoveContainer finds its disk and GetVm
//! shows which container holds which slot.

use std::sync::Arc;
use std::time::Duration;

use husk_init::pod::{
    valid_container_path, valid_name, valid_relative_path, MAX_CONTAINER_ID, MAX_FILES,
    MAX_FILE_BYTES, MAX_VOLUME_NAME,
};
use husk_proto::agent::{self, guest_message, host_message, HostMessage};
use husk_proto::v1::{
    AddContainerRequest, AttachDiskRequest, ContainerStats, DetachDiskRequest,
    GetContainerStatsRequest, PodFile, PodVolume, RemoveContainerRequest, Vm,
};
use tonic::Status;

use super::{Daemon, VmEntry};
use crate::agent_client::{self, AgentError};

/// How long the guest agent may take to mount (or unmount) a container's root.
const AGENT_LIMIT: Duration = Duration::from_secs(30);
/// How long AddContainer waits for a booting VM's agent.
const AGENT_READY_WAIT: Duration = Duration::from_secs(60);
fn check_container(id: &str) -> Result<(), Status> {
    if valid_name(id, MAX_CONTAINER_ID) {
        Ok(())
    } else {
        Err(Status::invalid_argument(format!(
            "container: {id:?} must be 1..={MAX_CONTAINER_ID} of A-Z a-z 0-9 _ . -"
        )))
    }
}

/// Volumes and files as the guest agent will take them (see husk_init::pod).
fn check_contents(volumes: &[PodVolume], files: &[PodFile]) -> Result<(), Status> {
    for v in volumes {
        if !valid_container_path(&v.path) {
            return Err(Status::invalid_argument(format!(
                "volumes: path {:?} must be absolute, below /, without . or ..",
                v.path
            )));
        }
        let named = !v.name.is_empty() && valid_name(&v.name, MAX_VOLUME_NAME);
        let shared = !v.pod_path.is_empty() && valid_relative_path(&v.pod_path);
        if named == shared || (!v.name.is_empty() && !v.pod_path.is_empty()) {
            return Err(Status::invalid_argument(format!(
                "volumes: {}: give a name (1..={MAX_VOLUME_NAME} of A-Z a-z 0-9 _ . -) or a \
                 pod_path (relative, without . or ..), not {:?} and {:?}",
                v.path, v.name, v.pod_path
            )));
        }
    }
    if files.len() > MAX_FILES {
        return Err(Status::invalid_argument(format!(
            "files: {}, at most {MAX_FILES}",
            files.len()
        )));
    }
    for f in files {
        if !valid_container_path(&f.path) || f.content.len() > MAX_FILE_BYTES {
            return Err(Status::invalid_argument(format!(
                "files: {:?} ({} bytes) must be an absolute path without . or .., at most \
                 {MAX_FILE_BYTES} bytes",
                f.path,
                f.content.len()
            )));
        }
    }
    Ok(())
}

/// The virtio serial of disk slot `slot`: block devices are numbered rootfs, disks, slots.
fn slot_serial(vm: &Vm, slot: u32) -> String {
    let spec = vm.spec.clone().unwrap_or_default();
    let index = usize::from(!spec.rootfs.is_empty()) + spec.disks.len() + slot as usize;
    format!("husk-disk{index}")
}

/// The slot that holds container `id`'s root, if any.
fn slot_of(vm: &Vm, id: &str) -> Option<u32> {
    vm.status
        .as_ref()?
        .attached_disks
        .iter()
        .find(|a| a.container == id)
        .map(|a| a.slot)
}

/// The first empty slot.
fn free_slot(vm: &Vm) -> Option<u32> {
    let slots = vm.spec.as_ref().map_or(0, |s| s.disk_slots);
    let used = vm
        .status
        .as_ref()
        .map(|s| s.attached_disks.as_slice())
        .unwrap_or_default();
    (0..slots).find(|slot| !used.iter().any(|a| a.slot == *slot))
}

fn agent_status(call: &str, e: AgentError) -> Status {
    match e {
        AgentError::Refused(message) => Status::failed_precondition(format!("{call}: {message}")),
        other => Status::unavailable(format!("{call}: {other}")),
    }
}

impl Daemon {
    /// See AddContainer in husk.proto.
    pub async fn add_container(
        &self,
        entry: &Arc<VmEntry>,
        request: &AddContainerRequest,
    ) -> Result<Vm, Status> {
        check_container(&request.container)?;
        check_contents(&request.volumes, &request.files)?;
        let rootfs = request
            .rootfs
            .clone()
            .ok_or_else(|| Status::invalid_argument("rootfs: missing"))?;
        if rootfs.read_only {
            return Err(Status::invalid_argument(
                "rootfs.read_only: a container's root must be writable (use copy_on_write \
                 over a shared image)",
            ));
        }
        let socket = self
            .agent_socket(entry, "AddContainer", AGENT_READY_WAIT)
            .await?;
        // Two AddContainer calls may pick the same free slot: the loser's attach finds it
        // taken (ALREADY_EXISTS) and tries the next one.
        let slot = loop {
            let vm = entry.snapshot();
            if slot_of(&vm, &request.container).is_some() {
                return Err(Status::already_exists(format!(
                    "AddContainer: container {} exists in VM {}",
                    request.container,
                    entry.name()
                )));
            }
            let Some(slot) = free_slot(&vm) else {
                let slots = vm.spec.as_ref().map_or(0, |s| s.disk_slots);
                return Err(Status::resource_exhausted(format!(
                    "AddContainer: every disk slot of VM {} is taken ({slots} slots; \
                     VmSpec.disk_slots sets how many containers a VM can hold)",
                    entry.name()
                )));
            };
            let attach = AttachDiskRequest {
                vm: entry.id.clone(),
                slot,
                disk: Some(rootfs.clone()),
            };
            match self.attach_disk(entry, &attach).await {
                Ok(_) => break slot,
                Err(s) if s.code() == tonic::Code::AlreadyExists => continue,
                Err(s) => return Err(s),
            }
        };
        entry.update(|vm| {
            if let Some(a) = VmEntry::status_mut(vm)
                .attached_disks
                .iter_mut()
                .find(|a| a.slot == slot)
            {
                a.container = request.container.clone();
            }
        });
        let serial = slot_serial(&entry.snapshot(), slot);
        let message = HostMessage {
            msg: Some(host_message::Msg::AddContainer(agent::AddContainer {
                id: request.container.clone(),
                disk_serial: serial,
                volumes: request
                    .volumes
                    .iter()
                    .map(|v| agent::PodVolume {
                        name: v.name.clone(),
                        path: v.path.clone(),
                        read_only: v.read_only,
                        pod_path: v.pod_path.clone(),
                    })
                    .collect(),
                files: request
                    .files
                    .iter()
                    .map(|f| agent::PodFile {
                        path: f.path.clone(),
                        content: f.content.clone(),
                        read_only: f.read_only,
                    })
                    .collect(),
            })),
        };
        if let Err(e) = agent_client::request(&socket, &message, AGENT_LIMIT).await {
            // Nothing is mounted (the agent unmounts on its own failure): free the slot.
            let detach = DetachDiskRequest {
                vm: entry.id.clone(),
                slot,
            };
            if let Err(d) = self.detach_slot(entry, &detach).await {
                tracing::warn!(vm_id = %entry.id, slot, error = %d, "freeing a slot after a failed AddContainer");
            }
            return Err(agent_status("AddContainer", e));
        }
        tracing::info!(vm_id = %entry.id, slot, container = %request.container, "container added");
        Ok(entry.snapshot())
    }

    /// See RemoveContainer in husk.proto.
    pub async fn remove_container(
        &self,
        entry: &Arc<VmEntry>,
        request: &RemoveContainerRequest,
    ) -> Result<Vm, Status> {
        check_container(&request.container)?;
        let Some(slot) = slot_of(&entry.snapshot(), &request.container) else {
            return Err(Status::not_found(format!(
                "RemoveContainer: no container {} in VM {}",
                request.container,
                entry.name()
            )));
        };
        let socket = self
            .agent_socket(entry, "RemoveContainer", AGENT_READY_WAIT)
            .await?;
        let message = HostMessage {
            msg: Some(host_message::Msg::RemoveContainer(agent::RemoveContainer {
                id: request.container.clone(),
            })),
        };
        agent_client::request(&socket, &message, AGENT_LIMIT)
            .await
            .map_err(|e| agent_status("RemoveContainer", e))?;
        let detach = DetachDiskRequest {
            vm: entry.id.clone(),
            slot,
        };
        let vm = self.detach_slot(entry, &detach).await?;
        tracing::info!(vm_id = %entry.id, slot, container = %request.container, "container removed");
        Ok(vm)
    }
}

impl Daemon {
    /// See GetContainerStats in husk.proto.
    pub async fn container_stats(
        &self,
        entry: &Arc<VmEntry>,
        request: &GetContainerStatsRequest,
    ) -> Result<ContainerStats, Status> {
        check_container(&request.container)?;
        if slot_of(&entry.snapshot(), &request.container).is_none() {
            return Err(Status::not_found(format!(
                "GetContainerStats: no container {} in VM {}",
                request.container,
                entry.name()
            )));
        }
        let socket = self
            .agent_socket(entry, "GetContainerStats", AGENT_READY_WAIT)
            .await?;
        let message = HostMessage {
            msg: Some(host_message::Msg::ContainerStats(
                agent::ContainerStatsRequest {
                    id: request.container.clone(),
                },
            )),
        };
        let reply = agent_client::request(&socket, &message, AGENT_LIMIT)
            .await
            .map_err(|e| agent_status("GetContainerStats", e))?;
        match reply.msg {
            Some(guest_message::Msg::ContainerStats(s)) => Ok(ContainerStats {
                cpu_user_ns: s.cpu_user_ns,
                cpu_system_ns: s.cpu_system_ns,
                memory_rss_bytes: s.memory_rss_bytes,
                processes: s.processes,
            }),
            other => Err(Status::internal(format!(
                "GetContainerStats: unexpected reply from the guest agent: {other:?}"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use husk_proto::v1::{AttachedDisk, Disk, VmSpec, VmStatus};

    fn vm(rootfs: bool, disks: usize, slots: u32, attached: &[(u32, &str)]) -> Vm {
        Vm {
            spec: Some(VmSpec {
                rootfs: if rootfs {
                    "/r.ext4".into()
                } else {
                    String::new()
                },
                disks: vec![Disk::default(); disks],
                disk_slots: slots,
                ..Default::default()
            }),
            status: Some(VmStatus {
                attached_disks: attached
                    .iter()
                    .map(|(slot, c)| AttachedDisk {
                        slot: *slot,
                        disk: None,
                        container: (*c).into(),
                    })
                    .collect(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn slot_serials_count_the_rootfs_and_disks_first() {
        assert_eq!(slot_serial(&vm(true, 0, 4, &[]), 0), "husk-disk1");
        assert_eq!(slot_serial(&vm(true, 2, 4, &[]), 3), "husk-disk6");
        assert_eq!(slot_serial(&vm(false, 0, 4, &[]), 0), "husk-disk0");
    }

    #[test]
    fn the_first_empty_slot_is_taken_and_containers_are_found_by_name() {
        let v = vm(true, 0, 3, &[(0, "a"), (2, "")]);
        assert_eq!(free_slot(&v), Some(1));
        assert_eq!(slot_of(&v, "a"), Some(0));
        assert_eq!(slot_of(&v, "b"), None);
        assert_eq!(free_slot(&vm(true, 0, 1, &[(0, "a")])), None);
    }

    #[test]
    fn container_ids_volumes_and_files_are_checked() {
        assert!(check_container("a1b2-c.d_e").is_ok());
        for bad in ["", "..", "a/b", "x y"] {
            assert_eq!(
                check_container(bad).unwrap_err().code(),
                tonic::Code::InvalidArgument
            );
        }
        let v = |name: &str, pod_path: &str, path: &str| PodVolume {
            name: name.into(),
            path: path.into(),
            read_only: false,
            pod_path: pod_path.into(),
        };
        assert!(check_contents(&[v("cache", "", "/var/cache")], &[]).is_ok());
        assert!(check_contents(&[v("", "volumes/x~y/cfg", "/etc/cfg")], &[]).is_ok());
        for (name, pod_path, path) in [
            ("x", "", "rel"),
            ("x", "", "/a/../b"),
            ("x", "", "/a//b"),
            ("a/b", "", "/x"),
            ("", "", "/x"),
            ("a", "b", "/x"),
            ("", "../up", "/x"),
        ] {
            assert!(
                check_contents(&[v(name, pod_path, path)], &[]).is_err(),
                "{name} {pod_path} {path}"
            );
        }
        let f = |path: &str, len: usize| PodFile {
            path: path.into(),
            content: vec![0; len],
            read_only: false,
        };
        assert!(check_contents(&[], &[f("/etc/hosts", 100)]).is_ok());
        assert!(check_contents(&[], &[f("/etc/hosts", MAX_FILE_BYTES + 1)]).is_err());
        assert!(check_contents(&[], &vec![f("/a", 1); MAX_FILES + 1]).is_err());
    }
}
