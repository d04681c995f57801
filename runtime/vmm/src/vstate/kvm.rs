//! Opening /dev/kvm with errors a user can act on, and facts about the host's KVM.

use std::path::Path;

use kvm_ioctls::{Cap, Kvm};

/// Where the KVM device lives.
pub const KVM_PATH: &str = "/dev/kvm";
/// Present when /dev/kvm comes from PVM (a software nested hypervisor; see TESTBED.md).
pub const PVM_MODULE_PATH: &str = "/sys/module/kvm_pvm";

/// Errors while opening KVM.
#[derive(Debug, thiserror::Error)]
pub enum KvmError {
    /// /dev/kvm does not exist.
    #[error("{KVM_PATH} does not exist: this host has no KVM (load kvm_intel/kvm_amd, or run inside scripts/testbed)")]
    NotFound,
    /// /dev/kvm exists but cannot be opened by this user.
    #[error("permission denied opening {KVM_PATH}: add this user to the 'kvm' group or grant access to the device")]
    PermissionDenied,
    /// Any other open failure.
    #[error("cannot open {KVM_PATH}")]
    Open(#[source] kvm_ioctls::Error),
    /// KVM_GET_API_VERSION is not the stable 12.
    #[error("unsupported KVM API version {0} (need 12)")]
    ApiVersion(i32),
    /// A capability husk needs is missing.
    #[error("this host's KVM lacks {0}")]
    MissingCapability(&'static str),
}

/// Opens /dev/kvm and checks the API version and capabilities husk relies on.
pub fn open_kvm() -> Result<Kvm, KvmError> {
    let kvm = Kvm::new().map_err(|e| match e.errno() {
        libc::ENOENT | libc::ENODEV | libc::ENXIO => KvmError::NotFound,
        libc::EACCES | libc::EPERM => KvmError::PermissionDenied,
        _ => KvmError::Open(e),
    })?;
    let version = kvm.get_api_version();
    if version != 12 {
        return Err(KvmError::ApiVersion(version));
    }
    for (cap, name) in [
        (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
        (Cap::Pit2, "KVM_CAP_PIT2"),
        (Cap::Irqfd, "KVM_CAP_IRQFD"),
        (Cap::ExtCpuid, "KVM_CAP_EXT_CPUID"),
        (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
        (Cap::SetTssAddr, "KVM_CAP_SET_TSS_ADDR"),
        (Cap::SetIdentityMapAddr, "KVM_CAP_SET_IDENTITY_MAP_ADDR"),
        (Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT"),
    ] {
        if !kvm.check_extension(cap) {
            return Err(KvmError::MissingCapability(name));
        }
    }
    Ok(kvm)
}

/// Whether this host's /dev/kvm is PVM, which runs only PVM-enabled guest kernels.
pub fn is_pvm_host() -> bool {
    Path::new(PVM_MODULE_PATH).exists()
}
