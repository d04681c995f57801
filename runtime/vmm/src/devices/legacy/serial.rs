//! The 8250/16550 UART at 0x3f8 (COM1, IRQ 4), emulated by vm-superio. Its interrupt line is an
//! EventFd registered with KVM as an irqfd.

use std::io::{self, Write};

use vm_superio::{serial::NoEvents, Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::devices::bus::BusDevice;

pub mod persist;

/// COM1 port base.
pub const SERIAL_PORT_BASE: u64 = 0x3f8;
/// Number of UART registers.
pub const SERIAL_PORT_LEN: u64 = 8;
/// COM1's ISA interrupt.
pub const SERIAL_IRQ: u32 = 4;

/// Raises an interrupt by writing to an irqfd.
pub struct EventFdTrigger(pub EventFd);

impl Trigger for EventFdTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// Where console output goes.
pub type ConsoleOut = Box<dyn Write + Send>;

/// Console output that survives its reader going away (`husk run ... | head`, a closed console
/// socket): the first failure is reported once and later output is discarded, instead of an
/// error (and a log line) for every byte the guest writes.
struct DiscardAfterFailure {
    inner: ConsoleOut,
    failed: bool,
}

impl DiscardAfterFailure {
    fn wrap(inner: ConsoleOut) -> ConsoleOut {
        Box::new(DiscardAfterFailure {
            inner,
            failed: false,
        })
    }
}

impl Write for DiscardAfterFailure {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if !self.failed {
            if let Err(e) = self.inner.write_all(buf) {
                self.failed = true;
                log::warn!("console output failed ({e}); further console output is discarded");
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        if !self.failed {
            let _ = self.inner.flush();
        }
        Ok(())
    }
}

/// The serial port as a bus device.
pub struct SerialDevice {
    serial: Serial<EventFdTrigger, NoEvents, ConsoleOut>,
}

impl SerialDevice {
    /// A UART that interrupts through `irq` and writes to `out`.
    pub fn new(irq: EventFd, out: ConsoleOut) -> Self {
        SerialDevice {
            serial: Serial::new(EventFdTrigger(irq), DiscardAfterFailure::wrap(out)),
        }
    }

    /// Flushes console output.
    pub fn flush(&mut self) {
        let _ = self.serial.writer_mut().flush();
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match (u8::try_from(offset), data) {
            (Ok(off), [b]) if u64::from(off) < SERIAL_PORT_LEN => *b = self.serial.read(off),
            (_, data) => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Ok(off), [b]) = (u8::try_from(offset), data) {
            if u64::from(off) < SERIAL_PORT_LEN {
                if let Err(e) = self.serial.write(off, *b) {
                    husk_devices::warn_limited!("serial write failed: {e:?}");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn transmits_bytes_and_ignores_odd_access_sizes() {
        let sink = Sink::default();
        let mut s = SerialDevice::new(EventFd::new(0).unwrap(), Box::new(sink.clone()));
        s.write(0, b"h");
        s.write(0, b"i");
        s.write(0, &[1, 2]);
        s.write(99, b"x");
        assert_eq!(&*sink.0.lock().unwrap(), b"hi");
        let mut two = [0u8; 2];
        s.read(5, &mut two);
        assert_eq!(two, [0xff, 0xff]);
        let mut lsr = [0u8];
        s.read(5, &mut lsr);
        assert_ne!(lsr[0] & 0x20, 0, "transmit holding register empty");
    }

    #[test]
    fn a_failing_console_is_tried_once_then_output_is_dropped_quietly() {
        struct Broken(Arc<AtomicUsize>);
        impl Write for Broken {
            fn write(&mut self, _: &[u8]) -> io::Result<usize> {
                self.0.fetch_add(1, Ordering::SeqCst);
                Err(io::ErrorKind::BrokenPipe.into())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let attempts = Arc::new(AtomicUsize::new(0));
        let mut dev =
            SerialDevice::new(EventFd::new(0).unwrap(), Box::new(Broken(attempts.clone())));
        for b in b"hello" {
            dev.write(0, &[*b]);
        }
        assert_eq!(attempts.load(Ordering::SeqCst), 1);
    }
}
