//! virtio-rng (virtio 1.2 §5.4): fills the guest's buffers with bytes from the host's
//! getrandom(2). One queue; no configuration space; no features beyond VERSION_1.

use std::io::Write;

use virtio_queue::Queue;

use super::queue_worker::{serve_queue_bounded, Chain, Progress};
use super::{
    device_id, features, ActivateContext, DeviceCounters, DeviceError, QueueSet, VirtioDevice,
    WORK_BUDGET,
};

const QUEUE_SIZE: u16 = 256;
/// Most bytes served per request: a guest cannot make the VMM generate unbounded entropy in one go.
const MAX_BYTES_PER_REQUEST: usize = 64 * 1024;

/// Where entropy comes from (the host's getrandom in production).
pub trait EntropySource: Send {
    fn fill(&mut self, buf: &mut [u8]) -> std::io::Result<()>;
}

/// The host's getrandom(2).
pub struct HostRandom;

impl EntropySource for HostRandom {
    fn fill(&mut self, buf: &mut [u8]) -> std::io::Result<()> {
        let mut done = 0;
        while done < buf.len() {
            match rustix::rand::getrandom(&mut buf[done..], rustix::rand::GetRandomFlags::empty()) {
                Ok(n) => done += n,
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }
}

enum State {
    Inactive,
    Active { ctx: ActivateContext },
}

/// The virtio-rng device.
pub struct Rng {
    source: Box<dyn EntropySource>,
    state: State,
    counters: DeviceCounters,
    /// Queues left with work when the budget ran out.
    unfinished: QueueSet,
}

impl Rng {
    pub fn new(source: Box<dyn EntropySource>) -> Self {
        Self {
            source,
            state: State::Inactive,
            counters: DeviceCounters::default(),
            unfinished: QueueSet::default(),
        }
    }

    fn serve(
        source: &mut dyn EntropySource,
        counters: &DeviceCounters,
        mem: &crate::GuestMemoryMmap,
        chain: Chain<'_>,
    ) -> u32 {
        let mut writer = match chain.writer(mem) {
            Ok(w) => w,
            Err(_) => {
                counters.add(&counters.errors, 1);
                return 0;
            }
        };
        let len = writer.available_bytes().min(MAX_BYTES_PER_REQUEST);
        let mut bytes = vec![0u8; len];
        if source.fill(&mut bytes).is_err() || writer.write_all(&bytes).is_err() {
            counters.add(&counters.errors, 1);
            return 0;
        }
        counters.add(&counters.requests, 1);
        counters.add(&counters.bytes_written, len as u64);
        len as u32
    }
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        device_id::RNG
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }
    fn offered_features(&self) -> u64 {
        features::VERSION_1 | features::RING_EVENT_IDX | features::RING_INDIRECT_DESC
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_bytes(&[], offset, data);
    }
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), DeviceError> {
        self.state = State::Active { ctx };
        Ok(())
    }
    fn process_queue(&mut self, index: usize) -> Result<(), DeviceError> {
        let State::Active { ctx } = &mut self.state else {
            return Ok(());
        };
        let Some(queue): Option<&mut Queue> = ctx.queues.get_mut(index) else {
            return Ok(());
        };
        let (source, counters) = (self.source.as_mut(), &self.counters);
        let mem = &ctx.mem;
        let progress =
            serve_queue_bounded(queue, index, mem, &ctx.interrupt, WORK_BUDGET, |chain| {
                Self::serve(source, counters, mem, chain)
            })?;
        if progress == Progress::More {
            self.unfinished.insert(index);
        }
        Ok(())
    }
    fn take_unfinished(&mut self) -> QueueSet {
        std::mem::take(&mut self.unfinished)
    }
    fn reset(&mut self) {
        self.state = State::Inactive;
        self.unfinished = QueueSet::default();
    }
    fn counters(&self) -> &DeviceCounters {
        &self.counters
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::test_utils::{activate_ctx, guest_memory, CountingLine, Driver, WRITE};

    /// An rng on `driver`'s queue, activated, filling buffers with `byte`.
    fn active_rng(driver: &Driver<'_>, byte: u8, line: CountingLine) -> Rng {
        let mut rng = Rng::new(Box::new(Pattern(byte)));
        rng.activate(activate_ctx(driver.mem, vec![driver.queue()], line))
            .unwrap();
        rng
    }

    struct Pattern(u8);
    impl EntropySource for Pattern {
        fn fill(&mut self, buf: &mut [u8]) -> std::io::Result<()> {
            buf.fill(self.0);
            Ok(())
        }
    }

    #[test]
    fn fills_every_writable_buffer_and_reports_the_length() {
        let mem = guest_memory();
        let mut driver = Driver::new(&mem, 16);
        let head = driver.chain(&[(&[], 100, true), (&[], 28, true)]);
        let line = CountingLine::default();
        let mut rng = active_rng(&driver, 0x5a, line.clone());

        rng.process_queue(0).unwrap();

        assert_eq!(driver.used(), vec![(u32::from(head), 128)]);
        assert_eq!(driver.read(driver.desc_addr(head), 100), vec![0x5a; 100]);
        assert_eq!(line.0.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert_eq!(rng.counters().snapshot().bytes_written, 128);
    }

    #[test]
    fn host_random_gives_bytes_that_differ() {
        let mut a = [0u8; 32];
        let mut b = [0u8; 32];
        HostRandom.fill(&mut a).unwrap();
        HostRandom.fill(&mut b).unwrap();
        assert_ne!(a, b);
    }

    #[test]
    fn hostile_chains_are_answered_without_panicking() {
        let mem = guest_memory();
        let mut driver = Driver::new(&mem, 16);
        // Read-only buffer (wrong direction), out-of-range address, zero length, and a
        // self-referencing loop.
        driver.raw_chain(&[(0x4_0000, 64, 0, 0)]);
        driver.raw_chain(&[(u64::MAX - 8, 64, WRITE, 0)]);
        driver.raw_chain(&[(0x4_0000, 0, WRITE, 0)]);
        driver.raw_chain(&[(0x4_0000, 16, WRITE | 1, 3)]);
        let mut rng = active_rng(&driver, 1, CountingLine::default());

        rng.process_queue(0).unwrap();

        let used = driver.used();
        assert_eq!(used.len(), 4, "every chain is returned: {used:?}");
        assert_eq!(used[0].1, 0, "nothing written into a read-only buffer");
        assert_eq!(used[1].1, 0, "nothing written outside guest memory");
        assert_eq!(used[2].1, 0);
        assert!(
            used[3].1 <= 16 * 16,
            "a looping chain is cut at the queue size"
        );
    }

    #[test]
    fn an_available_index_beyond_the_ring_is_a_broken_queue() {
        let mem = guest_memory();
        let mut driver = Driver::new(&mem, 16);
        driver.chain(&[(&[], 8, true)]);
        driver.set_avail_idx(1000);
        let mut rng = active_rng(&driver, 1, CountingLine::default());
        assert!(matches!(
            rng.process_queue(0),
            Err(DeviceError::BrokenQueue(0))
        ));
    }

    #[test]
    fn requests_are_capped() {
        let mem = guest_memory();
        let mut driver = Driver::new(&mem, 16);
        driver.chain(&[(&[], 0x8_0000, true)]);
        let mut rng = active_rng(&driver, 1, CountingLine::default());
        rng.process_queue(0).unwrap();
        assert_eq!(driver.used()[0].1 as usize, MAX_BYTES_PER_REQUEST);
    }

    #[test]
    fn a_full_queue_is_served_and_every_used_entry_is_intact() {
        // Regression for the ring layout of the test driver: with virtio-queue's own mock,
        // used entries past half the queue landed on top of the available ring.
        let mem = guest_memory();
        let mut driver = Driver::new(&mem, 16);
        let heads: Vec<u16> = (0..16).map(|_| driver.chain(&[(&[], 8, true)])).collect();
        let mut rng = active_rng(&driver, 1, CountingLine::default());
        rng.process_queue(0).unwrap();
        let used = driver.used();
        assert_eq!(
            used,
            heads.iter().map(|&h| (u32::from(h), 8)).collect::<Vec<_>>()
        );
    }
}
