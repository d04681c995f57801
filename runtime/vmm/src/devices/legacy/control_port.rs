//! The husk control port: how the guest init tells the VMM about boot progress and the guest
//! application's exit code.
//!
//! # Contract with the guest (fixed; husk-init and the VMM depend on it)
//!
//! | port  | access        | meaning |
//! |-------|---------------|---------|
//! | 0x600 | 1-byte write  | value 0x01: "guest init started". The VMM records the time since the VMM process started (once; later writes are ignored). With `--report-boot-time` it prints exactly one line `husk-vmm: guest init after <N> us` to stderr. Other values are reserved and ignored. |
//! | 0x601 | 1-byte write  | the guest application's exit code (0..=255). The last value written wins; when the VM stops, husk-vmm exits with it. |
//!
//! Reads of either port return 0. Wider accesses are ignored (reads return all-ones).
//! From a shell in the guest: `printf '\x01' | dd of=/dev/port bs=1 seek=1536` or any `outb`.

use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use crate::devices::bus::BusDevice;

// The numbers are husk-init's (the host/guest contract crate): one definition for both sides.
/// First port of the control device: boot progress.
pub const CONTROL_PORT_BASE: u64 = husk_init::CONTROL_PORT_BOOT as u64;
/// Offset of the exit-code port in the device (fails to build if it comes before the base).
const EXIT_CODE_OFFSET: u64 = husk_init::CONTROL_PORT_EXIT_CODE as u64 - CONTROL_PORT_BASE;
/// Ports 0x600 (boot progress) and 0x601 (exit code).
pub const CONTROL_PORT_LEN: u64 = EXIT_CODE_OFFSET + 1;
/// Value written to 0x600 when the guest init starts.
pub const BOOT_INIT_STARTED: u8 = husk_init::CONTROL_INIT_STARTED;

const NO_EXIT_CODE: i32 = -1;
const NO_TIME: u64 = u64::MAX;

/// What the guest reported; shared between the device and the VMM.
#[derive(Debug)]
pub struct ControlState {
    exit_code: AtomicI32,
    init_us: AtomicU64,
}

impl Default for ControlState {
    fn default() -> Self {
        ControlState {
            exit_code: AtomicI32::new(NO_EXIT_CODE),
            init_us: AtomicU64::new(NO_TIME),
        }
    }
}

impl ControlState {
    /// The last exit code the guest reported.
    pub fn exit_code(&self) -> Option<u8> {
        u8::try_from(self.exit_code.load(Ordering::SeqCst)).ok()
    }

    /// Microseconds from VMM start to "guest init started", if reported.
    pub fn init_time_us(&self) -> Option<u64> {
        Some(self.init_us.load(Ordering::SeqCst)).filter(|t| *t != NO_TIME)
    }
}

/// The device on the port-I/O bus.
pub struct ControlPort {
    state: Arc<ControlState>,
    vmm_start: Instant,
    report_boot_time: bool,
}

impl ControlPort {
    /// A control port measuring from `vmm_start`.
    pub fn new(state: Arc<ControlState>, vmm_start: Instant, report_boot_time: bool) -> Self {
        ControlPort {
            state,
            vmm_start,
            report_boot_time,
        }
    }
}

impl BusDevice for ControlPort {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match data {
            [b] if offset < CONTROL_PORT_LEN => *b = 0,
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let [value] = data else { return };
        match offset {
            0 if *value == BOOT_INIT_STARTED => {
                let us =
                    u64::try_from(self.vmm_start.elapsed().as_micros()).unwrap_or(u64::MAX - 1);
                let first = self
                    .state
                    .init_us
                    .compare_exchange(NO_TIME, us, Ordering::SeqCst, Ordering::SeqCst)
                    .is_ok();
                if first && self.report_boot_time {
                    eprintln!("husk-vmm: guest init after {us} us");
                }
            }
            EXIT_CODE_OFFSET => self
                .state
                .exit_code
                .store(i32::from(*value), Ordering::SeqCst),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ports_are_the_documented_ones() {
        // The table above, the guest kernels' ioperm and existing guests rely on these.
        assert_eq!((CONTROL_PORT_BASE, CONTROL_PORT_LEN), (0x600, 2));
        assert_eq!((EXIT_CODE_OFFSET, BOOT_INIT_STARTED), (1, 0x01));
    }

    #[test]
    fn records_last_exit_code_and_first_init_time() {
        let state = Arc::new(ControlState::default());
        let mut p = ControlPort::new(state.clone(), Instant::now(), false);
        assert_eq!((state.exit_code(), state.init_time_us()), (None, None));
        p.write(1, &[3]);
        p.write(1, &[42]);
        assert_eq!(state.exit_code(), Some(42));
        p.write(0, &[0x02]);
        assert_eq!(state.init_time_us(), None, "reserved values are ignored");
        p.write(0, &[BOOT_INIT_STARTED]);
        let t = state.init_time_us().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(2));
        p.write(0, &[BOOT_INIT_STARTED]);
        assert_eq!(state.init_time_us(), Some(t));
    }

    #[test]
    fn reads_return_zero_and_wide_accesses_are_ignored() {
        let state = Arc::new(ControlState::default());
        let mut p = ControlPort::new(state.clone(), Instant::now(), false);
        let mut b = [9u8];
        p.read(1, &mut b);
        assert_eq!(b, [0]);
        p.write(1, &[7, 7]);
        assert_eq!(state.exit_code(), None);
        let mut w = [0u8; 2];
        p.read(0, &mut w);
        assert_eq!(w, [0xff, 0xff]);
    }
}
