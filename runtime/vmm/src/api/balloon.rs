//! `set_balloon` and the balloon part of `describe`: the VMM's side of virtio-balloon
//! (husk_devices::virtio::balloon).

use std::sync::PoisonError;

use husk_devices::virtio::balloon::{Balloon, BalloonReport, STAT_NAMES};
use husk_devices::virtio::device_id;

use crate::devices::virtio::VirtioSlot;

/// Why a balloon request was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BalloonError {
    #[error("this VM has no balloon device (started with --no-balloon)")]
    NoBalloon,
    #[error("a balloon of {target_mib} MiB is more than the guest's {memory_mib} MiB")]
    TargetTooLarge { target_mib: u64, memory_mib: u64 },
}

/// 4 KiB pages per MiB.
const PAGES_PER_MIB: u64 = 256;

/// Runs `f` on the VM's balloon, with its transport locked (so that a configuration change
/// reaches the driver), or `None` without one.
fn with_balloon<R>(devices: &[VirtioSlot], f: impl FnOnce(&mut Balloon) -> R) -> Option<R> {
    let slot = devices
        .iter()
        .find(|d| d.device_type() == device_id::BALLOON)?;
    let mut transport = slot
        .transport
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    transport.update_device(|device| {
        device
            .as_any_mut()
            .and_then(|any| any.downcast_mut::<Balloon>())
            .map(f)
    })
}

/// Asks the guest to hold `target_mib` MiB in its balloon.
pub fn set_target(
    devices: &[VirtioSlot],
    target_mib: u64,
    memory_mib: u64,
) -> Result<(), BalloonError> {
    if target_mib > memory_mib {
        return Err(BalloonError::TargetTooLarge {
            target_mib,
            memory_mib,
        });
    }
    // memory_mib is at most MAX_MEM_MIB, so the page count fits in u32.
    let pages = u32::try_from(target_mib * PAGES_PER_MIB).unwrap_or(u32::MAX);
    with_balloon(devices, |b| b.set_target_pages(pages)).ok_or(BalloonError::NoBalloon)
}

/// The balloon's numbers for `describe`, and a request for fresh statistics (see the protocol's
/// `Balloon` message). `None` without a balloon.
pub fn describe(devices: &[VirtioSlot]) -> Option<husk_proto::vmm::Balloon> {
    with_balloon(devices, |b| {
        let report = b.report();
        if let Err(e) = b.request_stats() {
            log::warn!("balloon: cannot ask for statistics: {e}");
        }
        to_proto(&report)
    })
}

fn to_proto(r: &BalloonReport) -> husk_proto::vmm::Balloon {
    let stats = r
        .stats
        .iter()
        .filter_map(|(tag, value)| {
            let name = STAT_NAMES.iter().find(|(t, _)| t == tag)?.1;
            Some((name.to_string(), *value))
        })
        .collect();
    husk_proto::vmm::Balloon {
        target_mib: u64::from(r.target_pages) / PAGES_PER_MIB,
        actual_mib: u64::from(r.actual_pages) / PAGES_PER_MIB,
        stats,
        stats_age_ms: r.stats_age.map_or(0, |a| a.as_millis() as u64),
        inflated_bytes: r.inflated_pages * 4096,
        deflated_bytes: r.deflated_pages * 4096,
        reported_bytes: r.reported_bytes,
        stats_enabled: r.stats_enabled,
        free_page_reporting: r.reporting_enabled,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_become_mib_and_unknown_stats_are_left_out() {
        let report = BalloonReport {
            target_pages: 512,
            actual_pages: 300,
            stats: vec![(4, 10 << 20), (99, 1), (2, 7)],
            stats_age: Some(std::time::Duration::from_millis(1500)),
            inflated_pages: 3,
            ..Default::default()
        };
        let p = to_proto(&report);
        assert_eq!((p.target_mib, p.actual_mib), (2, 1));
        assert_eq!(p.stats.len(), 2);
        assert_eq!(p.stats["free_memory"], 10 << 20);
        assert_eq!(p.stats["major_faults"], 7);
        assert_eq!(p.stats_age_ms, 1500);
        assert_eq!(p.inflated_bytes, 3 * 4096);
    }

    #[test]
    fn a_vm_without_a_balloon_says_so_and_targets_are_bounded() {
        assert_eq!(set_target(&[], 10, 256), Err(BalloonError::NoBalloon));
        assert_eq!(
            set_target(&[], 257, 256),
            Err(BalloonError::TargetTooLarge {
                target_mib: 257,
                memory_mib: 256
            })
        );
        assert!(describe(&[]).is_none());
    }
}
