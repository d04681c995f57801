//! Live KVM objects: the KVM handle, the VM and its vCPUs.

pub mod kvm;
pub mod vcpu;
pub mod vm;
