//! Walking a queue: pop each available chain, let the device handle it, return it on the used
//! ring, and interrupt the driver when it asked to be (EVENT_IDX aware). Shared by every device
//! so that the hostile-driver cases (bad available index, broken rings) are handled once.

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};

use super::{DeviceError, VirtioInterrupt};
use crate::GuestMemoryMmap;

/// A chain as a device handler receives it.
pub type Chain<'a> = DescriptorChain<&'a GuestMemoryMmap>;

/// How far a bounded walk of a queue got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// Every available chain was served; the driver will notify when it adds more.
    Idle,
    /// The budget ran out with chains still available: call again (on a later turn).
    More,
}

/// Serves every available chain of `queue` (number `index`) with `handle`, which returns how
/// many bytes it wrote into the chain's buffers. A driver that corrupts the ring indices gets
/// [`DeviceError::BrokenQueue`] (the transport then marks the device NEEDS_RESET).
pub fn serve_queue(
    queue: &mut Queue,
    index: usize,
    mem: &GuestMemoryMmap,
    interrupt: &VirtioInterrupt,
    handle: impl FnMut(Chain<'_>) -> u32,
) -> Result<(), DeviceError> {
    serve_queue_bounded(queue, index, mem, interrupt, usize::MAX, handle).map(|_| ())
}

/// [`serve_queue`] that stops after `budget` chains. On [`Progress::More`] notifications stay
/// disabled (the device comes back by itself) and the chains served so far are signalled.
pub fn serve_queue_bounded(
    queue: &mut Queue,
    index: usize,
    mem: &GuestMemoryMmap,
    interrupt: &VirtioInterrupt,
    budget: usize,
    handle: impl FnMut(Chain<'_>) -> u32,
) -> Result<Progress, DeviceError> {
    let ungated = |_: &Chain<'_>| Ok(());
    match serve_queue_gated(queue, index, mem, interrupt, budget, ungated, handle)? {
        Gated::Done(progress) => Ok(progress),
        // The gate above never refuses.
        Gated::Parked(_) => Ok(Progress::More),
    }
}

/// How a gated walk ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gated {
    /// As [`serve_queue_bounded`] would have ended.
    Done(Progress),
    /// The gate refused a chain, which stays available: come back after this long. Guest
    /// notifications stay disabled meanwhile (a kick could not be served anyway).
    Parked(std::time::Duration),
}

/// [`serve_queue_bounded`] that asks `gate` before taking each chain (a rate limiter): a
/// refused chain is put back on the available ring untouched and the walk stops.
pub fn serve_queue_gated(
    queue: &mut Queue,
    index: usize,
    mem: &GuestMemoryMmap,
    interrupt: &VirtioInterrupt,
    budget: usize,
    mut gate: impl FnMut(&Chain<'_>) -> Result<(), std::time::Duration>,
    mut handle: impl FnMut(Chain<'_>) -> u32,
) -> Result<Gated, DeviceError> {
    let broken = |_| DeviceError::BrokenQueue(index);
    let mut served = 0usize;
    let outcome = 'walk: loop {
        queue.disable_notification(mem).map_err(broken)?;
        loop {
            if served >= budget {
                // Only "more" if a chain really waits: an exact fit ends idle.
                if !has_available(queue, mem).map_err(broken)? {
                    break;
                }
                break 'walk Gated::Done(Progress::More);
            }
            // iter() fails when the available index runs more than a ring ahead: a broken driver.
            let chain = queue.iter(mem).map_err(broken)?.next();
            let Some(chain) = chain else { break };
            if let Err(wait) = gate(&chain) {
                queue.go_to_previous_position();
                break 'walk Gated::Parked(wait);
            }
            let head = chain.head_index();
            let written = handle(chain);
            queue.add_used(mem, head, written).map_err(broken)?;
            served += 1;
        }
        // Re-enable and re-check: a chain that arrived meanwhile would otherwise wait forever.
        if !queue.enable_notification(mem).map_err(broken)? {
            break Gated::Done(Progress::Idle);
        }
    };
    if served > 0 && queue.needs_notification(mem).map_err(broken)? {
        interrupt.signal_used_queue();
    }
    Ok(outcome)
}

/// Bytes a chain's descriptors cover (what a rate limiter charges for it), without taking it.
pub fn chain_bytes(chain: &Chain<'_>) -> u64 {
    chain.clone().map(|d| u64::from(d.len())).sum()
}

/// Whether the driver made chains available that the device has not taken yet.
pub fn has_available(queue: &Queue, mem: &GuestMemoryMmap) -> Result<bool, virtio_queue::Error> {
    let idx = queue.avail_idx(mem, std::sync::atomic::Ordering::Acquire)?;
    Ok(idx.0 != queue.next_avail())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::virtio::test_utils::{guest_memory, CountingLine, Driver};

    fn fill(driver: &mut Driver<'_>, chains: usize) {
        for _ in 0..chains {
            driver.chain(&[(&[], 16, true)]);
        }
    }

    #[test]
    fn one_turn_stops_at_the_budget_and_says_more_work_is_left() {
        let mem = guest_memory();
        let mut driver = Driver::new(&mem, 16);
        fill(&mut driver, 10);
        let mut queue = driver.queue();
        let irq = VirtioInterrupt::new(Box::new(CountingLine::default()));
        let progress = serve_queue_bounded(&mut queue, 0, &mem, &irq, 4, |_| 1).unwrap();
        assert_eq!(progress, Progress::More);
        assert_eq!(driver.used().len(), 4);
    }

    #[test]
    fn a_queue_longer_than_the_budget_is_served_completely_across_turns() {
        let mem = guest_memory();
        let mut driver = Driver::new(&mem, 16);
        fill(&mut driver, 10);
        let mut queue = driver.queue();
        let line = CountingLine::default();
        let irq = VirtioInterrupt::new(Box::new(line.clone()));
        let mut turns = Vec::new();
        loop {
            let progress = serve_queue_bounded(&mut queue, 0, &mem, &irq, 4, |_| 1).unwrap();
            turns.push(driver.used().len());
            if progress == Progress::Idle {
                break;
            }
        }
        assert_eq!(turns, [4, 8, 10]);
        assert_eq!(line.0.load(std::sync::atomic::Ordering::SeqCst), 3);
    }

    #[test]
    fn a_queue_that_exactly_fills_the_budget_ends_idle() {
        let mem = guest_memory();
        let mut driver = Driver::new(&mem, 16);
        fill(&mut driver, 4);
        let mut queue = driver.queue();
        let irq = VirtioInterrupt::new(Box::new(CountingLine::default()));
        let progress = serve_queue_bounded(&mut queue, 0, &mem, &irq, 4, |_| 1).unwrap();
        assert_eq!(progress, Progress::Idle);
        assert!(!has_available(&queue, &mem).unwrap());
    }

    #[test]
    fn a_refused_chain_stays_available_and_the_walk_parks() {
        let mem = guest_memory();
        let mut driver = Driver::new(&mem, 16);
        fill(&mut driver, 5);
        let mut queue = driver.queue();
        let irq = VirtioInterrupt::new(Box::new(CountingLine::default()));
        let mut allowed = 2;
        let wait = std::time::Duration::from_millis(7);
        let gate = |chain: &Chain<'_>| {
            assert_eq!(chain_bytes(chain), 16);
            if allowed == 0 {
                return Err(wait);
            }
            allowed -= 1;
            Ok(())
        };
        let outcome = serve_queue_gated(&mut queue, 0, &mem, &irq, 64, gate, |_| 1).unwrap();
        assert_eq!(outcome, Gated::Parked(wait));
        assert_eq!(driver.used().len(), 2);
        assert!(
            has_available(&queue, &mem).unwrap(),
            "three chains still wait"
        );
        let rest = serve_queue_gated(&mut queue, 0, &mem, &irq, 64, |_| Ok(()), |_| 1).unwrap();
        assert_eq!(rest, Gated::Done(Progress::Idle));
        assert_eq!(driver.used().len(), 5);
    }
}
