//! The shim's side of huskd: where it is, connecting, and the few calls a container needs.
//!
//! The shim never starts huskd itself: huskd owns every VM on the host (state, supervision,
//! reattach after restarts) and is meant to run as a system service; a shim that started one
//! would tie it to a container's lifetime. With no huskd listening, Create fails with
//! UNAVAILABLE and a message naming the socket and `$HUSK_HOST`.

use husk_proto::v1::husk_client::HuskClient;
use husk_proto::v1::{
    network, CreateVmRequest, DeleteVmRequest, GetVmRequest, Network, StartVmRequest,
    StopVmRequest, StreamConsoleRequest, Vm, VmSpec,
};
use tonic::transport::Channel;

/// huskd's address when `$HUSK_HOST` is not set (the same default as the `husk` CLI).
pub const DEFAULT_HOST: &str = "unix:///run/husk/huskd.sock";

#[derive(Debug, thiserror::Error)]
pub enum HuskdError {
    #[error("cannot reach huskd at {host} (is huskd running? set $HUSK_HOST for another socket): {message}")]
    Unreachable { host: String, message: String },
    #[error("huskd address {0:?}: use unix:///path/to/huskd.sock or http://HOST:PORT")]
    BadAddress(String),
    #[error("huskd: {0}")]
    Call(#[from] tonic::Status),
    /// huskd did not take `rootfs_copy_on_write` (a huskd older than the field): the VM was
    /// removed before it started, so the shared base was never written.
    #[error("huskd does not support rootfs_copy_on_write (an older huskd)")]
    NoCopyOnWrite,
}

/// huskd's address: `$HUSK_HOST` (set in containerd's environment, which shims inherit) or the
/// default socket.
pub fn host() -> String {
    std::env::var("HUSK_HOST")
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| DEFAULT_HOST.to_string())
}

pub async fn connect(host: &str) -> Result<HuskClient<Channel>, HuskdError> {
    use husk_proto::client::{channel, ConnectError};
    match channel(host).await {
        Ok(channel) => Ok(HuskClient::new(channel)),
        Err(ConnectError::BadAddress(host)) => Err(HuskdError::BadAddress(host)),
        Err(ConnectError::Unreachable { host, message }) => {
            Err(HuskdError::Unreachable { host, message })
        }
    }
}

/// What the VM of one container is made of.
#[derive(Debug, Clone, Default)]
pub struct VmPlan {
    pub name: String,
    pub rootfs_image: String,
    /// `rootfs_image` is a shared read-only base: the VM gets its own copy-on-write overlay.
    pub rootfs_copy_on_write: bool,
    pub memory_mib: Option<u32>,
    pub vcpus: Option<u32>,
    pub labels: Vec<(String, String)>,
    /// The container's network namespace, set up by CNI: the VM joins it (MODE_NETNS).
    pub netns: Option<String>,
    /// Host directories bound into the container: the VM's shared directories.
    pub mounts: Vec<crate::oci::BindMount>,
    /// Empty disk slots for the containers of a pod (its sandbox's VM), 0 otherwise.
    pub disk_slots: u32,
    /// The guest's host name (the pod's, for a sandbox).
    pub hostname: Option<String>,
}

/// Creates and starts the container's VM: a sandbox (no boot command) with the rootfs image as
/// its root, so every process, the container's own included, runs through Exec.
///
/// With a shared base (`rootfs_copy_on_write`) the VM is created stopped and started only once
/// huskd's answer shows that it took the field: an older huskd drops unknown fields and would
/// attach the base writable; that VM is removed unstarted and [`HuskdError::NoCopyOnWrite`]
/// returned.
pub async fn create_vm(client: &mut HuskClient<Channel>, plan: &VmPlan) -> Result<Vm, HuskdError> {
    let spec = VmSpec {
        name: plan.name.clone(),
        rootfs: plan.rootfs_image.clone(),
        rootfs_copy_on_write: plan.rootfs_copy_on_write,
        network: Some(match &plan.netns {
            Some(netns) => Network {
                mode: network::Mode::Netns as i32,
                netns: netns.clone(),
                ..Default::default()
            },
            None => Network {
                mode: network::Mode::None as i32,
                ..Default::default()
            },
        }),
        vcpus: plan.vcpus.unwrap_or(0),
        memory_mib: plan.memory_mib.unwrap_or(0),
        labels: plan.labels.iter().cloned().collect(),
        disk_slots: plan.disk_slots,
        hostname: plan.hostname.clone().unwrap_or_default(),
        mounts: plan
            .mounts
            .iter()
            .map(|m| husk_proto::v1::Mount {
                host_path: m.source.clone(),
                guest_path: m.destination.clone(),
                read_only: m.read_only,
            })
            .collect(),
        ..Default::default()
    };
    let vm = client
        .create_vm(CreateVmRequest {
            spec: Some(spec),
            start: !plan.rootfs_copy_on_write,
            ..Default::default()
        })
        .await?
        .into_inner();
    if !plan.rootfs_copy_on_write {
        return Ok(vm);
    }
    if !vm.spec.as_ref().is_some_and(|s| s.rootfs_copy_on_write) {
        let _ = delete_vm(client, &plan.name).await;
        return Err(HuskdError::NoCopyOnWrite);
    }
    match client
        .start_vm(StartVmRequest {
            vm: plan.name.clone(),
        })
        .await
    {
        Ok(started) => Ok(started.into_inner()),
        Err(s) => {
            // Not left behind created-but-stopped.
            let _ = delete_vm(client, &plan.name).await;
            Err(s.into())
        }
    }
}

pub async fn get_vm(client: &mut HuskClient<Channel>, vm: &str) -> Result<Vm, HuskdError> {
    Ok(client
        .get_vm(GetVmRequest { vm: vm.into() })
        .await?
        .into_inner())
}

/// The last `lines` lines of the VM's console (for logs when something went wrong).
pub async fn console_tail(client: &mut HuskClient<Channel>, vm: &str, lines: usize) -> String {
    let Ok(response) = client
        .stream_console(StreamConsoleRequest {
            vm: vm.into(),
            follow: false,
        })
        .await
    else {
        return String::new();
    };
    let mut stream = response.into_inner();
    let mut data = Vec::new();
    while let Some(Ok(chunk)) = tokio_stream::StreamExt::next(&mut stream).await {
        data.extend_from_slice(&chunk.data);
    }
    let text = String::from_utf8_lossy(&data);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Stops the VM at once (the container's processes are already gone or must go).
pub async fn stop_vm(client: &mut HuskClient<Channel>, vm: &str) -> Result<(), HuskdError> {
    client
        .stop_vm(StopVmRequest {
            vm: vm.into(),
            timeout_ms: 0,
            force: true,
        })
        .await?;
    Ok(())
}

/// Removes the VM (stopping it first); an unknown VM counts as removed.
pub async fn delete_vm(client: &mut HuskClient<Channel>, vm: &str) -> Result<(), HuskdError> {
    match client
        .delete_vm(DeleteVmRequest {
            vm: vm.into(),
            force: true,
        })
        .await
    {
        Ok(_) => Ok(()),
        Err(s) if s.code() == tonic::Code::NotFound => Ok(()),
        Err(s) => Err(s.into()),
    }
}

/// A huskd VM name for a container: `<namespace>-<id>` when that is a valid name (letters,
/// digits, `-_.`, at most 63), else `ctr-` and a hash of both (CRI ids are 64 hex digits).
pub fn vm_name(namespace: &str, id: &str) -> String {
    let plain = format!("{namespace}-{id}");
    let valid = |s: &str| {
        !s.is_empty()
            && s.len() <= 63
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    };
    if valid(&plain) {
        return plain;
    }
    // FNV-1a: stable across builds and Rust versions (the name is looked up again by `delete`).
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in plain.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    let prefix: String = id
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .take(20)
        .collect();
    format!("ctr-{prefix}-{h:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_names_are_valid_huskd_names_and_stable() {
        assert_eq!(vm_name("default", "web"), "default-web");
        let long = "a".repeat(64);
        let n = vm_name("k8s.io", &long);
        assert!(n.len() <= 63 && n.starts_with("ctr-aaaa"), "{n}");
        assert_eq!(n, vm_name("k8s.io", &long));
        assert_ne!(n, vm_name("other", &long));
        let odd = vm_name("default", "a/b c");
        assert!(odd.starts_with("ctr-abc-"), "{odd}");
    }

    #[tokio::test]
    async fn no_huskd_is_a_clear_error() {
        let err = connect("unix:///nonexistent/huskd.sock").await.unwrap_err();
        let text = err.to_string();
        assert!(text.contains("is huskd running"), "{text}");
        assert!(text.contains("/nonexistent/huskd.sock"), "{text}");
        assert!(matches!(
            connect("tcp://x").await,
            Err(HuskdError::BadAddress(_))
        ));
    }
}
