//! The VMM's event-loop thread ("vmm-events"): waits on every virtio queue's notification
//! event and every device backend, and runs the device work they call for, so vCPU threads
//! never do device I/O. One thread, one epoll set, stopped through an EventFd.
//!
//! While the VM is paused the loop parks in the [`PauseGate`] between two batches of events and
//! leaves its epoll set alone, so no device touches guest memory. Nothing is lost meanwhile:
//! queue notifications are level-triggered eventfds that stay readable, and an edge-triggered
//! backend's readiness stays queued in the epoll set until the loop waits on it again.

use std::os::unix::io::AsRawFd;
use std::sync::{Arc, PoisonError};
use std::thread::JoinHandle;

use husk_devices::virtio::{BackendTrigger, QueueSet};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::devices::virtio::VirtioSlot;
use crate::pause::{GateMember, PauseGate};
use crate::seccomp::{Filters, ThreadKind};

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

/// What an epoll token stands for: `STOP`, `PAUSE`, or (device, queue), or (device, backend).
const STOP: u64 = u64::MAX;
const PAUSE: u64 = u64::MAX - 1;
const BACKEND: u64 = 0xffff;
const TIMER: u64 = 0xfffe;

fn token(device: usize, what: u64) -> u64 {
    ((device as u64) << 16) | what
}

/// A running event loop.
pub struct EventLoop {
    stop: EventFd,
    pause: EventFd,
    thread: JoinHandle<()>,
}

impl EventLoop {
    /// Starts the loop over `devices`; the loop is a member of `gate` (see [`PauseGate`]). The
    /// thread installs its seccomp filter from `seccomp` before it touches any device.
    pub fn start(
        devices: Arc<Vec<VirtioSlot>>,
        gate: Arc<PauseGate>,
        seccomp: Arc<Filters>,
    ) -> Result<Self, EventLoopError> {
        let epoll = Epoll::new().map_err(EventLoopError::Setup)?;
        let stop = EventFd::new(EFD_NONBLOCK).map_err(EventLoopError::Setup)?;
        let pause = EventFd::new(EFD_NONBLOCK).map_err(EventLoopError::Setup)?;
        let add = |fd: i32, events: EventSet, data: u64| {
            epoll
                .ctl(ControlOperation::Add, fd, EpollEvent::new(events, data))
                .map_err(EventLoopError::Setup)
        };
        add(stop.as_raw_fd(), EventSet::IN, STOP)?;
        add(pause.as_raw_fd(), EventSet::IN, PAUSE)?;
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
            // Level-triggered: a timerfd stays readable until the device reads it.
            if let Some(fd) = slot.timer_fd {
                add(fd, EventSet::IN, token(d, TIMER))?;
            }
        }
        let stop_copy = stop.try_clone().map_err(EventLoopError::Setup)?;
        let pause_copy = pause.try_clone().map_err(EventLoopError::Setup)?;
        let thread = std::thread::Builder::new()
            .name("vmm-events".into())
            .spawn(move || {
                let _member = GateMember(&gate);
                // A thread that could not be confined serves nothing: the devices stay idle.
                if let Err(e) = seccomp.install(ThreadKind::Events) {
                    log::error!("device event loop: {e}; no device is served");
                    return;
                }
                run(epoll, stop_copy, pause_copy, devices, &gate)
            })
            .map_err(EventLoopError::Spawn)?;
        Ok(Self {
            stop,
            pause,
            thread,
        })
    }

    /// An event that makes the loop look at its pause gate (for whoever pauses the VM).
    pub fn pause_waker(&self) -> std::io::Result<EventFd> {
        self.pause.try_clone()
    }

    /// Stops the loop and waits for its thread.
    pub fn stop(self) {
        let _ = self.stop.write(1);
        if self.thread.join().is_err() {
            log::error!("the device event loop panicked");
        }
    }
}

fn run(
    epoll: Epoll,
    stop: EventFd,
    pause: EventFd,
    devices: Arc<Vec<VirtioSlot>>,
    gate: &PauseGate,
) {
    let mut events = vec![EpollEvent::default(); 64];
    loop {
        // Between batches: every event taken from epoll so far has been handled.
        if gate.pause_requested() {
            gate.park();
        }
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
            if data == PAUSE {
                // Only a wake-up: the gate is looked at once this batch is done.
                let _ = pause.read();
                continue;
            }
            let (d, what) = ((data >> 16) as usize, data & 0xffff);
            let Some(slot) = devices.get(d) else { continue };
            let mut transport = slot
                .transport
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if what == BACKEND {
                transport.process_backend();
            } else if what == TIMER {
                transport.process_timer();
            } else if let Some(evt) = slot.queue_events.get(what as usize) {
                // Reset the counter first: a notification arriving during the work re-arms it.
                let _ = evt.read();
                transport.notify(what as u32);
            }
            requeue_unfinished(slot, transport.take_unfinished());
        }
    }
}

/// Work a device cut short at its budget is done on a later turn: its queue's eventfd (watched
/// level-triggered) is signalled, so epoll reports it again after the events already ready.
fn requeue_unfinished(slot: &VirtioSlot, unfinished: QueueSet) {
    for q in unfinished.iter() {
        if let Some(evt) = slot.queue_events.get(q) {
            let _ = evt.write(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::io::RawFd;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Mutex;
    use std::time::{Duration, Instant};

    use husk_devices::virtio::mmio::MmioTransport;
    use husk_devices::virtio::{
        device_id, features, status, ActivateContext, DeviceCounters, DeviceError, VirtioDevice,
        VirtioInterrupt,
    };
    use vm_memory::GuestAddress;

    const LONG: Duration = Duration::from_secs(10);

    /// Counts queue notifications and backend wake-ups; its backend is an eventfd watched
    /// edge-triggered, like a tap. Each queue call leaves work over (as a device at its budget
    /// does) for `unfinished_turns` more calls.
    struct Counting {
        queue_calls: Arc<AtomicU32>,
        backend_calls: Arc<AtomicU32>,
        backend: EventFd,
        unfinished_turns: u32,
        counters: DeviceCounters,
    }

    impl VirtioDevice for Counting {
        fn device_type(&self) -> u32 {
            device_id::RNG
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16]
        }
        fn offered_features(&self) -> u64 {
            features::VERSION_1
        }
        fn read_config(&self, _: u64, data: &mut [u8]) {
            data.fill(0);
        }
        fn activate(&mut self, _: ActivateContext) -> Result<(), DeviceError> {
            Ok(())
        }
        fn process_queue(&mut self, _: usize) -> Result<(), DeviceError> {
            self.queue_calls.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
        fn backend_fd(&self) -> Option<RawFd> {
            Some(self.backend.as_raw_fd())
        }
        fn backend_trigger(&self) -> BackendTrigger {
            BackendTrigger::Edge
        }
        fn process_backend(&mut self) -> Result<(), DeviceError> {
            let _ = self.backend.read();
            self.backend_calls.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
        fn take_unfinished(&mut self) -> QueueSet {
            let mut set = QueueSet::default();
            if self.unfinished_turns > 0 {
                self.unfinished_turns -= 1;
                set.insert(0);
            }
            set
        }
        fn reset(&mut self) {}
        fn counters(&self) -> &DeviceCounters {
            &self.counters
        }
    }

    fn write32(t: &mut MmioTransport, offset: u64, value: u32) {
        t.write(offset, &value.to_le_bytes());
    }

    /// The driver's bring-up (virtio 1.2 §3.1.1, register offsets §4.2.2), one queue.
    fn activate(t: &mut MmioTransport) {
        let ack_driver = status::ACKNOWLEDGE | status::DRIVER;
        write32(t, 0x70, ack_driver);
        write32(t, 0x24, 1); // DriverFeaturesSel: high word
        write32(t, 0x20, 1); // DriverFeatures: VERSION_1
        write32(t, 0x70, ack_driver | status::FEATURES_OK);
        write32(t, 0x30, 0); // QueueSel
        write32(t, 0x38, 16); // QueueNum
        write32(t, 0x80, 0x1000); // QueueDescLow
        write32(t, 0x90, 0x2000); // QueueDriverLow
        write32(t, 0xa0, 0x3000); // QueueDeviceLow
        write32(t, 0x44, 1); // QueueReady
        write32(
            t,
            0x70,
            ack_driver | status::FEATURES_OK | status::DRIVER_OK,
        );
        assert!(t.is_active());
    }

    fn wait_for(what: &str, done: impl Fn() -> bool) {
        let deadline = Instant::now() + LONG;
        while !done() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn a_paused_loop_leaves_devices_alone_and_catches_up_on_resume() {
        let queue_calls = Arc::new(AtomicU32::new(0));
        let backend_calls = Arc::new(AtomicU32::new(0));
        let backend = EventFd::new(EFD_NONBLOCK).unwrap();
        let backend_writer = backend.try_clone().unwrap();
        let device = Counting {
            queue_calls: queue_calls.clone(),
            backend_calls: backend_calls.clone(),
            backend,
            unfinished_turns: 0,
            counters: DeviceCounters::default(),
        };
        let mem =
            husk_devices::GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let irq = Arc::new(VirtioInterrupt::new(Box::new(
            EventFd::new(EFD_NONBLOCK).unwrap(),
        )));
        let backend_fd = device.backend_fd().map(|fd| (fd, BackendTrigger::Edge));
        let mut transport = MmioTransport::new(Box::new(device), mem, irq).unwrap();
        activate(&mut transport);
        let queue_event = EventFd::new(EFD_NONBLOCK).unwrap();
        let notify = queue_event.try_clone().unwrap();
        let slot = VirtioSlot {
            name: "counting0".into(),
            transport: Arc::new(Mutex::new(transport)),
            queue_events: vec![queue_event],
            backend_fd,
            timer_fd: None,
            cmdline: String::new(),
        };
        let gate = Arc::new(PauseGate::new(1));
        let event_loop =
            EventLoop::start(Arc::new(vec![slot]), gate.clone(), Arc::new(Filters::off())).unwrap();
        let waker = event_loop.pause_waker().unwrap();

        notify.write(1).unwrap();
        wait_for("the first notification", || {
            queue_calls.load(Ordering::SeqCst) == 1
        });

        gate.pause(LONG, || {
            let _ = waker.write(1);
        })
        .unwrap();
        notify.write(1).unwrap();
        backend_writer.write(1).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(
            queue_calls.load(Ordering::SeqCst),
            1,
            "queue served while paused"
        );
        assert_eq!(
            backend_calls.load(Ordering::SeqCst),
            0,
            "backend served while paused"
        );

        gate.resume().unwrap();
        wait_for("the queued notification after resume", || {
            queue_calls.load(Ordering::SeqCst) == 2
        });
        wait_for("the edge-triggered backend event after resume", || {
            backend_calls.load(Ordering::SeqCst) == 1
        });

        // Stop while paused: closing the gate lets the loop see its stop event.
        gate.pause(LONG, || {
            let _ = waker.write(1);
        })
        .unwrap();
        gate.close();
        event_loop.stop();
    }

    fn slot_for(device: Box<dyn VirtioDevice>, activated: bool) -> (VirtioSlot, EventFd) {
        let mem =
            husk_devices::GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        slot_on(device, activated, mem)
    }

    /// [`slot_for`] on the given guest memory (a test that plays the driver writes into it).
    fn slot_on(
        device: Box<dyn VirtioDevice>,
        activated: bool,
        mem: husk_devices::GuestMemoryMmap,
    ) -> (VirtioSlot, EventFd) {
        let irq = Arc::new(VirtioInterrupt::new(Box::new(
            EventFd::new(EFD_NONBLOCK).unwrap(),
        )));
        let backend_fd = device.backend_fd().map(|fd| (fd, device.backend_trigger()));
        let timer_fd = device.timer_fd();
        let queues = device.queue_max_sizes().len();
        let mut transport = MmioTransport::new(device, mem, irq).unwrap();
        if activated {
            activate(&mut transport);
        }
        let queue_events: Vec<EventFd> = (0..queues)
            .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
            .collect();
        let notify = queue_events[0].try_clone().unwrap();
        let slot = VirtioSlot {
            name: "test0".into(),
            transport: Arc::new(Mutex::new(transport)),
            queue_events,
            backend_fd,
            timer_fd,
            cmdline: String::new(),
        };
        (slot, notify)
    }

    #[test]
    fn work_left_at_the_budget_is_finished_on_later_turns_without_a_new_kick() {
        let calls = Arc::new(AtomicU32::new(0));
        let device = Counting {
            queue_calls: calls.clone(),
            backend_calls: Arc::new(AtomicU32::new(0)),
            backend: EventFd::new(EFD_NONBLOCK).unwrap(),
            unfinished_turns: 4,
            counters: DeviceCounters::default(),
        };
        let (slot, notify) = slot_for(Box::new(device), true);
        let gate = Arc::new(PauseGate::new(1));
        let event_loop =
            EventLoop::start(Arc::new(vec![slot]), gate, Arc::new(Filters::off())).unwrap();

        notify.write(1).unwrap();
        wait_for("the four follow-up turns", || {
            calls.load(Ordering::SeqCst) == 5
        });
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(
            calls.load(Ordering::SeqCst),
            5,
            "no call once the work is done"
        );
        event_loop.stop();
    }

    /// CPU time the thread behind `handle` has used.
    fn thread_cpu_time(handle: &JoinHandle<()>) -> Duration {
        use std::os::unix::thread::JoinHandleExt;
        let mut clock: libc::clockid_t = 0;
        // SAFETY: the thread is alive (joined only later) and `clock` is a valid out pointer.
        let rc = unsafe { libc::pthread_getcpuclockid(handle.as_pthread_t(), &mut clock) };
        assert_eq!(rc, 0);
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `ts` is a valid out pointer for the call.
        assert_eq!(unsafe { libc::clock_gettime(clock, &mut ts) }, 0);
        Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
    }

    #[test]
    fn host_clients_of_an_inactive_vsock_device_cost_the_event_thread_no_cpu() {
        let dir = std::env::temp_dir().join(format!("husk-evloop-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let uds = dir.join("vsock");
        let _ = std::fs::remove_file(&uds);
        let device = husk_devices::virtio::vsock::Vsock::new(3, &uds).unwrap();
        let (slot, _) = slot_for(Box::new(device), false);
        let gate = Arc::new(PauseGate::new(1));
        let event_loop =
            EventLoop::start(Arc::new(vec![slot]), gate, Arc::new(Filters::off())).unwrap();

        let start = thread_cpu_time(&event_loop.thread);
        // Like huskd waiting for the guest agent: a connection every 10 ms, each left open.
        let mut clients = Vec::new();
        for _ in 0..30 {
            clients.push(std::os::unix::net::UnixStream::connect(&uds).unwrap());
            std::thread::sleep(Duration::from_millis(10));
        }
        let used = thread_cpu_time(&event_loop.thread) - start;
        eprintln!("event thread CPU over ~300 ms with clients of an inactive vsock: {used:?}");
        assert!(
            used < Duration::from_millis(60),
            "the event thread spins: {used:?}"
        );
        event_loop.stop();
        drop(clients);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A device whose queue is parked on a timer (as a rate limiter parks it): the timer's
    /// expiry must bring the queue back without any guest notification.
    struct Timed {
        queue_calls: Arc<AtomicU32>,
        timer: std::os::fd::OwnedFd,
        expired: bool,
        counters: DeviceCounters,
    }

    impl VirtioDevice for Timed {
        fn device_type(&self) -> u32 {
            device_id::BLOCK
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16]
        }
        fn offered_features(&self) -> u64 {
            features::VERSION_1
        }
        fn read_config(&self, _: u64, data: &mut [u8]) {
            data.fill(0);
        }
        fn activate(&mut self, _: ActivateContext) -> Result<(), DeviceError> {
            Ok(())
        }
        fn process_queue(&mut self, _: usize) -> Result<(), DeviceError> {
            self.queue_calls.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
        fn timer_fd(&self) -> Option<RawFd> {
            Some(self.timer.as_raw_fd())
        }
        fn timer_expired(&mut self) {
            let mut buf = [0u8; 8];
            let _ = rustix::io::read(&self.timer, &mut buf);
            self.expired = true;
        }
        fn take_unfinished(&mut self) -> QueueSet {
            let mut set = QueueSet::default();
            if std::mem::take(&mut self.expired) {
                set.insert(0);
            }
            set
        }
        fn reset(&mut self) {}
        fn counters(&self) -> &DeviceCounters {
            &self.counters
        }
    }

    #[test]
    fn a_device_timer_firing_runs_its_parked_queue_once_without_a_kick() {
        use rustix::time::{
            timerfd_create, timerfd_settime, Itimerspec, TimerfdClockId, TimerfdFlags,
            TimerfdTimerFlags, Timespec,
        };
        let timer = timerfd_create(TimerfdClockId::Monotonic, TimerfdFlags::NONBLOCK).unwrap();
        let calls = Arc::new(AtomicU32::new(0));
        let device = Timed {
            queue_calls: calls.clone(),
            timer,
            expired: false,
            counters: DeviceCounters::default(),
        };
        let spec = Itimerspec {
            it_interval: Timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: Timespec {
                tv_sec: 0,
                tv_nsec: 20_000_000,
            },
        };
        timerfd_settime(&device.timer, TimerfdTimerFlags::empty(), &spec).unwrap();
        let (slot, _notify) = slot_for(Box::new(device), true);
        let gate = Arc::new(PauseGate::new(1));
        let event_loop =
            EventLoop::start(Arc::new(vec![slot]), gate, Arc::new(Filters::off())).unwrap();
        wait_for("the parked queue to run", || {
            calls.load(Ordering::SeqCst) == 1
        });
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(
            calls.load(Ordering::SeqCst),
            1,
            "a read timer does not fire again"
        );
        event_loop.stop();
    }

    #[test]
    fn a_rate_limited_disk_serves_its_requests_at_the_limit_through_the_loop() {
        use husk_devices::rate_limiter::{BucketConfig, RateLimitConfig};
        use vm_memory::Bytes;
        const REQUESTS: u16 = 5;
        const DATA: u32 = 64 << 10;
        let image = std::env::temp_dir().join(format!("husk-evloop-disk-{}", std::process::id()));
        std::fs::write(&image, vec![0u8; 1 << 20]).unwrap();
        // 512 KiB/s with a 64 KiB burst: the first read at once, the other four over 0.5 s.
        let limit = RateLimitConfig {
            bandwidth: Some(BucketConfig {
                rate: 512 << 10,
                burst: u64::from(DATA),
            }),
            ops: None,
        };
        let device = husk_devices::virtio::block::Block::open(&image, false, "d")
            .unwrap()
            .with_rate_limit(limit);
        let mem =
            husk_devices::GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let (slot, notify) = slot_on(Box::new(device), true, mem.clone());
        // The driver's side (split ring as `activate` placed it): REQUESTS reads of DATA bytes,
        // each a header, a data buffer and a status byte.
        let desc = |i: u16, addr: u64, len: u32, flags: u16| {
            let at = 0x1000 + u64::from(i) * 16;
            mem.write_obj(addr, GuestAddress(at)).unwrap();
            mem.write_obj(len, GuestAddress(at + 8)).unwrap();
            mem.write_obj(flags, GuestAddress(at + 12)).unwrap();
            mem.write_obj(i + 1, GuestAddress(at + 14)).unwrap();
        };
        for r in 0..REQUESTS {
            let header = 0x8000 + u64::from(r) * 16;
            mem.write_obj(0u32, GuestAddress(header)).unwrap(); // VIRTIO_BLK_T_IN
            mem.write_obj(u64::from(r) * 128, GuestAddress(header + 8))
                .unwrap();
            desc(r * 3, header, 16, 1);
            desc(
                r * 3 + 1,
                0x2_0000 + u64::from(r) * u64::from(DATA),
                DATA,
                1 | 2,
            );
            desc(r * 3 + 2, 0x9000 + u64::from(r), 1, 2);
            mem.write_obj(r * 3, GuestAddress(0x2004 + u64::from(r) * 2))
                .unwrap();
        }
        mem.write_obj(REQUESTS, GuestAddress(0x2002)).unwrap();
        let used = || mem.read_obj::<u16>(GuestAddress(0x3002)).unwrap();

        let gate = Arc::new(PauseGate::new(1));
        // Under the event loop's real filter: arming and reading the timer must be allowed.
        let filters = Filters::new(crate::seccomp::Mode::Kill).unwrap();
        let event_loop = EventLoop::start(Arc::new(vec![slot]), gate, Arc::new(filters)).unwrap();
        let start = Instant::now();
        notify.write(1).unwrap();
        wait_for("every read", || used() == REQUESTS);
        let took = start.elapsed();
        event_loop.stop();
        let _ = std::fs::remove_file(&image);
        eprintln!("{REQUESTS} reads of {DATA} bytes at 512 KiB/s: {took:?}");
        assert!(
            (Duration::from_millis(450)..Duration::from_millis(900)).contains(&took),
            "expected about 0.5 s, took {took:?}"
        );
    }
}
