//! virtio-fs (virtio 1.2 §5.11) as a vhost-user device: the guest's FUSE requests are served by
//! a vhost-user-fs backend (virtiofsd, started and sandboxed per share by the launcher) that
//! reads the queues straight from guest memory. This device only
//! - offers the backend's ring features and the configuration space (tag, one request queue);
//! - hands the backend the guest memory (shared memfd regions) and the rings on DRIVER_OK;
//! - relays the guest's queue notifications to the backend's kick events, and the backend's
//!   call event to the guest's interrupt;
//! - stops the rings when the driver resets the device.
//!
//! Nothing a guest writes is parsed here: descriptors are the backend's to validate, against
//! the memory table it was given (so a hostile guest can reach only its own memory through it).
//! A VM with this device cannot be snapshotted (the backend's open files are not saveable).

pub mod vhost_user;

use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};

use virtio_queue::QueueT;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{
    device_id, features, ActivateContext, BackendTrigger, DeviceCounters, DeviceError, VirtioDevice,
};
use crate::GuestMemoryMmap;
use vhost_user::{Frontend, MemoryRegion, VhostUserError, VringAddrs};

/// The high-priority queue (FUSE_INTERRUPT, FUSE_FORGET) and one request queue.
const QUEUE_SIZES: [u16; 2] = [256, 256];
/// Length of the tag field in the configuration space.
const TAG_LEN: usize = 36;
/// Ring features passed through from the backend when it offers them.
const PASSED_FEATURES: u64 = features::RING_INDIRECT_DESC | features::RING_EVENT_IDX;

/// Why a virtio-fs device could not be created.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error("virtio-fs tag {0:?}: use 1 to 36 of A-Z a-z 0-9 - _")]
    Tag(String),
    #[error("cannot create an event for virtio-fs")]
    EventFd(#[source] std::io::Error),
    #[error("the vhost-user-fs backend for {tag} failed")]
    Backend {
        tag: String,
        #[source]
        source: VhostUserError,
    },
}

enum State {
    Inactive,
    /// Rings handed to the backend; `started` lists their indices (to stop them on reset).
    Active {
        ctx: ActivateContext,
        started: Vec<u32>,
    },
}

/// A virtio-fs device backed by a vhost-user-fs backend.
pub struct Fs {
    tag: String,
    frontend: Frontend,
    /// One kick event per queue: written when the guest notifies the queue.
    kicks: Vec<EventFd>,
    /// The backend signals used buffers on every queue through this one event.
    call: EventFd,
    state: State,
    counters: DeviceCounters,
}

impl Fs {
    /// A device for the share the guest mounts as `tag`, whose backend is at the other end
    /// of `backend` (a connected stream socket).
    pub fn new(tag: &str, backend: OwnedFd) -> Result<Self, FsError> {
        if tag.is_empty()
            || tag.len() > TAG_LEN
            || !tag
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(FsError::Tag(tag.into()));
        }
        let frontend = Frontend::connect(backend).map_err(|source| FsError::Backend {
            tag: tag.into(),
            source,
        })?;
        let event = || EventFd::new(EFD_NONBLOCK).map_err(FsError::EventFd);
        Ok(Self {
            tag: tag.into(),
            frontend,
            kicks: vec![event()?, event()?],
            call: event()?,
            state: State::Inactive,
            counters: DeviceCounters::default(),
        })
    }

    /// The tag the guest mounts.
    pub fn tag(&self) -> &str {
        &self.tag
    }

    fn start(&mut self, ctx: &ActivateContext) -> Result<Vec<u32>, VhostUserError> {
        self.frontend.set_features(ctx.acked_features)?;
        let regions = memory_regions(&ctx.mem).ok_or(VhostUserError::PrivateMemory)?;
        let with_fds: Vec<_> = regions.iter().map(|(r, file)| (*r, file.as_fd())).collect();
        self.frontend.set_mem_table(&with_fds)?;
        let mut started = Vec::new();
        for (index, queue) in ctx.queues.iter().enumerate() {
            if !queue.ready() {
                continue;
            }
            let index = index as u32;
            let addrs =
                vring_addrs(&ctx.mem, queue).ok_or(VhostUserError::RingOutsideMemory(index))?;
            self.frontend.start_vring(
                index,
                queue.size(),
                addrs,
                self.kicks[index as usize].as_fd_borrowed(),
                self.call.as_fd_borrowed(),
            )?;
            started.push(index);
        }
        Ok(started)
    }

    fn stop_all(&mut self) {
        if let State::Active { started, .. } = std::mem::replace(&mut self.state, State::Inactive) {
            for index in started {
                if let Err(e) = self.frontend.stop_vring(index) {
                    log::warn!("virtio-fs {}: cannot stop ring {index}: {e}", self.tag);
                }
            }
        }
    }
}

/// Helper: an EventFd as a borrowed fd.
trait AsFdBorrowed {
    fn as_fd_borrowed(&self) -> std::os::fd::BorrowedFd<'_>;
}

impl AsFdBorrowed for EventFd {
    fn as_fd_borrowed(&self) -> std::os::fd::BorrowedFd<'_> {
        // SAFETY: the EventFd owns this fd and outlives the returned borrow.
        unsafe { std::os::fd::BorrowedFd::borrow_raw(self.as_raw_fd()) }
    }
}

/// The guest memory as the backend must map it; `None` if a region is not backed by a file
/// (the VMM must give such a VM shared memory) or there are too many.
fn memory_regions(mem: &GuestMemoryMmap) -> Option<Vec<(MemoryRegion, &std::fs::File)>> {
    let mut out = Vec::new();
    for region in mem.iter() {
        let file = region.file_offset()?;
        let host = region
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .ok()?;
        out.push((
            MemoryRegion {
                guest_phys_addr: region.start_addr().0,
                size: region.len(),
                user_addr: host as u64,
                mmap_offset: file.start(),
            },
            file.file(),
        ));
    }
    (!out.is_empty() && out.len() <= vhost_user::MAX_REGIONS).then_some(out)
}

/// The host addresses of `queue`'s rings; `None` unless each ring lies inside one region.
fn vring_addrs(mem: &GuestMemoryMmap, queue: &virtio_queue::Queue) -> Option<VringAddrs> {
    let size = u64::from(queue.size());
    let host = |addr: GuestAddress, len: u64| -> Option<u64> {
        let (region, offset) = mem.to_region_addr(addr)?;
        let end = offset.0.checked_add(len)?;
        (end <= region.len()).then_some(())?;
        region.get_host_address(offset).ok().map(|p| p as u64)
    };
    Some(VringAddrs {
        desc: host(GuestAddress(queue.desc_table()), 16 * size)?,
        avail: host(GuestAddress(queue.avail_ring()), 6 + 2 * size)?,
        used: host(GuestAddress(queue.used_ring()), 6 + 8 * size)?,
    })
}

impl VirtioDevice for Fs {
    fn device_type(&self) -> u32 {
        device_id::FS
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn offered_features(&self) -> u64 {
        features::VERSION_1 | (self.frontend.backend_features() & PASSED_FEATURES)
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut config = [0u8; TAG_LEN + 4];
        config[..self.tag.len()].copy_from_slice(self.tag.as_bytes());
        config[TAG_LEN..].copy_from_slice(&1u32.to_le_bytes()); // num_request_queues
        super::read_config_bytes(&config, offset, data);
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), DeviceError> {
        self.stop_all();
        let started = self
            .start(&ctx)
            .map_err(|e| DeviceError::Backend(e.into()))?;
        self.state = State::Active { ctx, started };
        Ok(())
    }

    fn process_queue(&mut self, index: usize) -> Result<(), DeviceError> {
        // The guest notified the queue: pass it on to the backend, which reads the ring itself.
        if let Some(kick) = self.kicks.get(index) {
            kick.write(1).map_err(DeviceError::Backend)?;
        }
        Ok(())
    }

    fn backend_fd(&self) -> Option<RawFd> {
        Some(self.call.as_raw_fd())
    }

    fn backend_trigger(&self) -> BackendTrigger {
        // Readable while the counter is non-zero; reading it clears it.
        BackendTrigger::Level
    }

    fn process_backend(&mut self) -> Result<(), DeviceError> {
        if let Ok(n) = self.call.read() {
            self.counters.add(&self.counters.requests, n);
            if let State::Active { ctx, .. } = &self.state {
                ctx.interrupt.signal_used_queue();
            }
        }
        Ok(())
    }

    fn drain_backend(&mut self) {
        let _ = self.call.read();
    }

    fn reset(&mut self) {
        self.stop_all();
    }

    fn counters(&self) -> &DeviceCounters {
        &self.counters
    }
}

#[cfg(test)]
mod tests;
