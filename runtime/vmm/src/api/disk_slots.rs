//! `attach_disk` and `detach_disk`: filling and emptying the VM's disk slots (`--disk-slots`,
//! virtio-blk devices created without a medium) while it runs.
//!
//! A slot is found by its index among the slots. The change happens under the device's
//! transport lock (the event loop holds it for one bounded turn at most), through
//! [`husk_devices::virtio::mmio::MmioTransport::update_device`], which tells the guest: the
//! driver gets a configuration-change interrupt and reads the new capacity.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::PoisonError;

use husk_devices::host_files::FD_PREFIX;
use husk_devices::virtio::block::backend::DiskBackend;
use husk_devices::virtio::block::format::{open_disk, DiskFormat};
use husk_devices::virtio::block::{Block, MediumError};
use husk_devices::virtio::device_id;

use crate::devices::virtio::VirtioSlot;

/// Why a slot could not be filled or emptied (nothing changed then).
#[derive(Debug, thiserror::Error)]
pub enum DiskSlotError {
    #[error("the VM has no disk slot {slot} (it has {slots})")]
    NoSuchSlot { slot: u32, slots: usize },
    #[error("disk slot {0} already holds a disk")]
    Occupied(u32),
    #[error("disk slot {0} is empty")]
    Empty(u32),
    #[error("attach_disk needs the disk image's file descriptor sent with the request")]
    NoFd,
    #[error("attach_disk: {fds} descriptors for an image with {backing} backing images (one each, the image's first)")]
    FdCount { fds: usize, backing: usize },
    #[error("attach_disk: {0:?} is not a disk format (raw or qcow2)")]
    Format(String),
    #[error("disk slot {0}: cannot use the image")]
    Image(u32, #[source] io::Error),
}

/// Runs `f` on the device of `slot` if it is a virtio-blk device, telling the driver when the
/// device's configuration changed.
fn with_block<R>(slot: &VirtioSlot, f: impl FnOnce(&mut Block) -> R) -> Option<R> {
    if slot.device_type() != device_id::BLOCK {
        return None;
    }
    let mut transport = slot
        .transport
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    transport.update_device(|dev| {
        dev.as_any_mut()
            .and_then(|any| any.downcast_mut::<Block>())
            .map(f)
    })
}

/// The VM's disk slots, in order.
fn disk_slots(devices: &[VirtioSlot]) -> Vec<&VirtioSlot> {
    devices
        .iter()
        .filter(|d| with_block(d, |b| b.is_slot()).unwrap_or(false))
        .collect()
}

fn find(devices: &[VirtioSlot], slot: u32) -> Result<&VirtioSlot, DiskSlotError> {
    let slots = disk_slots(devices);
    let count = slots.len();
    usize::try_from(slot)
        .ok()
        .and_then(|i| slots.get(i).copied())
        .ok_or(DiskSlotError::NoSuchSlot { slot, slots: count })
}

/// Puts the image of `request` into its slot: `fds` are the image and then its backing chain
/// (`request.backing_formats`, top down), opened as a `--disk` is (each duplicated and locked:
/// exclusive for a writable image, shared for read-only ones), then closed.
pub fn attach(
    devices: &[VirtioSlot],
    request: &husk_proto::vmm::AttachDisk,
    fds: Vec<OwnedFd>,
) -> Result<(), DiskSlotError> {
    let (slot, read_only) = (request.slot, request.read_only);
    let target = find(devices, slot)?;
    if with_block(target, |b| b.has_medium()).unwrap_or(false) {
        return Err(DiskSlotError::Occupied(slot));
    }
    let format = |f: &str| -> Result<DiskFormat, DiskSlotError> {
        if f.is_empty() {
            return Ok(DiskFormat::Raw);
        }
        f.parse().map_err(|_| DiskSlotError::Format(f.to_string()))
    };
    let top_format = format(&request.format)?;
    let backing_formats = request
        .backing_formats
        .iter()
        .map(|f| format(f))
        .collect::<Result<Vec<_>, _>>()?;
    if fds.is_empty() {
        return Err(DiskSlotError::NoFd);
    }
    if fds.len() != backing_formats.len() + 1 {
        return Err(DiskSlotError::FdCount {
            fds: fds.len(),
            backing: backing_formats.len(),
        });
    }
    let path = |fd: &OwnedFd| PathBuf::from(format!("{FD_PREFIX}{}", fd.as_raw_fd()));
    let backing: Vec<(PathBuf, DiskFormat)> =
        fds[1..].iter().map(path).zip(backing_formats).collect();
    let disk = open_disk(&path(&fds[0]), top_format, read_only, &backing)
        .map_err(|e| DiskSlotError::Image(slot, e))?;
    drop(fds);
    let inserted = with_block(target, |b| {
        let serial = b.serial();
        b.insert_medium(disk, read_only, &serial)
    });
    match inserted {
        Some(Ok(())) => {
            log::info!("disk slot {slot}: disk attached (read_only={read_only})");
            Ok(())
        }
        Some(Err(MediumError::Occupied)) => Err(DiskSlotError::Occupied(slot)),
        Some(Err(_)) | None => Err(DiskSlotError::NoSuchSlot {
            slot,
            slots: disk_slots(devices).len(),
        }),
    }
}

/// Empties slot `slot`; the image is synced (best effort) and closed, which releases its lock.
pub fn detach(devices: &[VirtioSlot], slot: u32) -> Result<(), DiskSlotError> {
    let target = find(devices, slot)?;
    let old: Box<dyn DiskBackend> = match with_block(target, |b| b.eject_medium()) {
        Some(Ok(old)) => old,
        Some(Err(MediumError::Empty)) => return Err(DiskSlotError::Empty(slot)),
        Some(Err(_)) | None => {
            return Err(DiskSlotError::NoSuchSlot {
                slot,
                slots: disk_slots(devices).len(),
            })
        }
    };
    if let Err(e) = old.flush() {
        log::warn!("disk slot {slot}: syncing the detached image failed: {e}");
    }
    log::info!("disk slot {slot}: disk detached");
    Ok(())
}

/// The first slot that holds a disk, if any (a snapshot cannot record it).
pub fn first_filled(devices: &[VirtioSlot]) -> Option<u32> {
    disk_slots(devices)
        .iter()
        .position(|d| with_block(d, |b| b.has_medium()).unwrap_or(false))
        .and_then(|i| u32::try_from(i).ok())
}
