//! VM-wide state kept inside KVM: the two PICs, the IOAPIC, the PIT and the kvmclock.

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::VmFd;

use super::state::{pod_bytes, pod_from, StateError, VmState};

/// Errors reading or writing VM state.
#[derive(Debug, thiserror::Error)]
pub enum VmStateError {
    /// A VM ioctl failed.
    #[error("cannot {0}")]
    Ioctl(&'static str, #[source] kvm_ioctls::Error),
    /// The state in the file does not fit this KVM.
    #[error(transparent)]
    State(#[from] StateError),
}

fn get_chip(fd: &VmFd, chip_id: u32, what: &'static str) -> Result<Vec<u8>, VmStateError> {
    let mut chip = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    fd.get_irqchip(&mut chip)
        .map_err(|e| VmStateError::Ioctl(what, e))?;
    Ok(pod_bytes(&chip))
}

/// Reads the irqchip, PIT and clock of a paused VM.
pub fn save(fd: &VmFd) -> Result<VmState, VmStateError> {
    let clock = fd
        .get_clock()
        .map_err(|e| VmStateError::Ioctl("get the KVM clock", e))?;
    Ok(VmState {
        pic_master: get_chip(fd, KVM_IRQCHIP_PIC_MASTER, "get the master PIC")?,
        pic_slave: get_chip(fd, KVM_IRQCHIP_PIC_SLAVE, "get the slave PIC")?,
        ioapic: get_chip(fd, KVM_IRQCHIP_IOAPIC, "get the IOAPIC")?,
        pit: pod_bytes(
            &fd.get_pit2()
                .map_err(|e| VmStateError::Ioctl("get the PIT", e))?,
        ),
        clock_ns: clock.clock,
    })
}

fn set_chip(fd: &VmFd, bytes: &[u8], chip_id: u32, what: &'static str) -> Result<(), VmStateError> {
    let chip: kvm_irqchip = pod_from(what, bytes)?;
    if chip.chip_id != chip_id {
        return Err(StateError::Size {
            what,
            actual: chip.chip_id as usize,
            expected: chip_id as usize,
        }
        .into());
    }
    fd.set_irqchip(&chip)
        .map_err(|e| VmStateError::Ioctl(what, e))
}

/// Writes `state` into a new VM (irqchip and PIT created, no vCPU run yet).
pub fn restore(fd: &VmFd, state: &VmState) -> Result<(), VmStateError> {
    let pit = pod_from("pit", &state.pit)?;
    set_chip(
        fd,
        &state.pic_master,
        KVM_IRQCHIP_PIC_MASTER,
        "set the master PIC",
    )?;
    set_chip(
        fd,
        &state.pic_slave,
        KVM_IRQCHIP_PIC_SLAVE,
        "set the slave PIC",
    )?;
    set_chip(fd, &state.ioapic, KVM_IRQCHIP_IOAPIC, "set the IOAPIC")?;
    fd.set_pit2(&pit)
        .map_err(|e| VmStateError::Ioctl("set the PIT", e))?;
    // The guest's monotonic clock continues from the snapshot: the time spent parked on disk
    // does not pass for it (the wall clock is corrected afterwards through the guest agent).
    let clock = kvm_clock_data {
        clock: state.clock_ns,
        ..Default::default()
    };
    fd.set_clock(&clock)
        .map_err(|e| VmStateError::Ioctl("set the KVM clock", e))
}
