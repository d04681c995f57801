//! The VMM's event-loop thread ("vmm-events"): waits on every virtio queue's notification
//! event and every device backend, and runs the device work they call for, so vCPU threads
//! never do device I/O. One thread, one epoll set, stopped through an EventFd.

use std::os::unix::io::AsRawFd;
use std::sync::{Arc, PoisonError};
use std::thread::JoinHandle;

use husk_devices::virtio::BackendTrigger;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::devices::virtio::VirtioSlot;

/// Errors while starting the event loop.
#[derive(Debug, thiserror::Error)]
pub enum EventLoopError {
    /// epoll or eventfd creation/registration failed.
    #[error("cannot set up the device event loop")]
    Setup(#[source] std::io::Error),
    /// The thread could not be spawned.
    #[error("cannot start the device event loop thread")]
    Spawn(#[source] std::io::Error),
}

/// What an epoll token stands for: `STOP`, or (device, queue), or (device, backend).
const STOP: u64 = u64::MAX;
const BACKEND: u64 = 0xffff;

fn token(device: usize, what: u64) -> u64 {
    ((device as u64) << 16) | what
}

/// A running event loop.
pub struct EventLoop {
    stop: EventFd,
    thread: JoinHandle<()>,
}

impl EventLoop {
    /// Starts the loop over `devices`.
    pub fn start(devices: Arc<Vec<VirtioSlot>>) -> Result<Self, EventLoopError> {
        let epoll = Epoll::new().map_err(EventLoopError::Setup)?;
        let stop = EventFd::new(EFD_NONBLOCK).map_err(EventLoopError::Setup)?;
        let add = |fd: i32, events: EventSet, data: u64| {
            epoll
                .ctl(ControlOperation::Add, fd, EpollEvent::new(events, data))
                .map_err(EventLoopError::Setup)
        };
        add(stop.as_raw_fd(), EventSet::IN, STOP)?;
        for (d, slot) in devices.iter().enumerate() {
            for (q, evt) in slot.queue_events.iter().enumerate() {
                add(evt.as_raw_fd(), EventSet::IN, token(d, q as u64))?;
            }
            if let Some((fd, trigger)) = slot.backend_fd {
                let events = match trigger {
                    BackendTrigger::Edge => EventSet::IN | EventSet::EDGE_TRIGGERED,
                    BackendTrigger::Level => EventSet::IN,
                };
                add(fd, events, token(d, BACKEND))?;
            }
        }
        let stop_copy = stop.try_clone().map_err(EventLoopError::Setup)?;
        let thread = std::thread::Builder::new()
            .name("vmm-events".into())
            .spawn(move || run(epoll, stop_copy, devices))
            .map_err(EventLoopError::Spawn)?;
        Ok(Self { stop, thread })
    }

    /// Stops the loop and waits for its thread.
    pub fn stop(self) {
        let _ = self.stop.write(1);
        if self.thread.join().is_err() {
            log::error!("the device event loop panicked");
        }
    }
}

fn run(epoll: Epoll, stop: EventFd, devices: Arc<Vec<VirtioSlot>>) {
    let mut events = vec![EpollEvent::default(); 64];
    loop {
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                log::error!("device event loop: epoll_wait failed: {e}");
                return;
            }
        };
        for event in &events[..n] {
            let data = event.data();
            if data == STOP {
                let _ = stop.read();
                return;
            }
            let (d, what) = ((data >> 16) as usize, data & 0xffff);
            let Some(slot) = devices.get(d) else { continue };
            let mut transport = slot
                .transport
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if what == BACKEND {
                transport.process_backend();
            } else if let Some(evt) = slot.queue_events.get(what as usize) {
                // Reset the counter first: a notification arriving during the work re-arms it.
                let _ = evt.read();
                transport.notify(what as u32);
            }
        }
    }
}
