//! Walking a queue: pop each available chain, let the device handle it, return it on the used
//! ring, and interrupt the driver when it asked to be (EVENT_IDX aware). Shared by every device
//! so that the hostile-driver cases (bad available index, broken rings) are handled once.

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};

use super::{DeviceError, VirtioInterrupt};
use crate::GuestMemoryMmap;

/// A chain as a device handler receives it.
pub type Chain<'a> = DescriptorChain<&'a GuestMemoryMmap>;

/// Serves every available chain of `queue` (number `index`) with `handle`, which returns how
/// many bytes it wrote into the chain's buffers. A driver that corrupts the ring indices gets
/// [`DeviceError::BrokenQueue`] (the transport then marks the device NEEDS_RESET).
pub fn serve_queue(
    queue: &mut Queue,
    index: usize,
    mem: &GuestMemoryMmap,
    interrupt: &VirtioInterrupt,
    mut handle: impl FnMut(Chain<'_>) -> u32,
) -> Result<(), DeviceError> {
    let broken = |_| DeviceError::BrokenQueue(index);
    let mut served = false;
    loop {
        queue.disable_notification(mem).map_err(broken)?;
        loop {
            // iter() fails when the available index runs more than a ring ahead: a broken driver.
            let chain = queue.iter(mem).map_err(broken)?.next();
            let Some(chain) = chain else { break };
            let head = chain.head_index();
            let written = handle(chain);
            queue.add_used(mem, head, written).map_err(broken)?;
            served = true;
        }
        // Re-enable and re-check: a chain that arrived meanwhile would otherwise wait forever.
        if !queue.enable_notification(mem).map_err(broken)? {
            break;
        }
    }
    if served && queue.needs_notification(mem).map_err(broken)? {
        interrupt.signal_used_queue();
    }
    Ok(())
}
