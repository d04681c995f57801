//! A minimal i8042 keyboard controller at ports 0x60 (data) and 0x64 (status/command).
//!
//! Enough for Linux's i8042 and atkbd probes to finish without waiting for timeouts (controller
//! commands answered, keyboard commands acknowledged through IRQ 1), and for the reset line:
//! command 0xfe on port 0x64 (what `reboot=k` does) stops the VM. There is no mouse port.
//! Commands: "8042 keyboard controller" (IBM PC/AT technical reference), Linux
//! drivers/input/serio/i8042.h and drivers/input/keyboard/atkbd.c.

use std::collections::VecDeque;
use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

use crate::devices::bus::BusDevice;
use crate::stop::{StopReason, StopState};

/// Data port.
pub const I8042_DATA_PORT: u64 = 0x60;
/// Status/command port.
pub const I8042_COMMAND_PORT: u64 = 0x64;
/// The bus range covers 0x60..=0x64; 0x61 (speaker, handled by KVM's PIT) is never routed here
/// because KVM consumes it in the kernel, and 0x62/0x63 read as all-ones.
pub const I8042_PORT_LEN: u64 = 5;
/// Keyboard interrupt.
pub const KBD_IRQ: u32 = 1;

const STATUS_OUTPUT_FULL: u8 = 0x01;
const STATUS_SYSTEM_FLAG: u8 = 0x04;
const STATUS_LAST_WAS_COMMAND: u8 = 0x08;
/// Keyboard inhibit switch off ("unlocked"); Linux warns "Keylock active" without it.
const STATUS_UNLOCKED: u8 = 0x10;

const CTR_KBD_INT: u8 = 0x01;
const CTR_SYSTEM_FLAG: u8 = 0x04;
const CTR_KBD_DISABLED: u8 = 0x10;
const CTR_AUX_DISABLED: u8 = 0x20;

const CMD_READ_CTR: u8 = 0x20;
const CMD_WRITE_CTR: u8 = 0x60;
const CMD_AUX_DISABLE: u8 = 0xa7;
const CMD_AUX_ENABLE: u8 = 0xa8;
const CMD_SELF_TEST: u8 = 0xaa;
const CMD_KBD_TEST: u8 = 0xab;
const CMD_KBD_DISABLE: u8 = 0xad;
const CMD_KBD_ENABLE: u8 = 0xae;
const CMD_READ_OUTPUT: u8 = 0xd0;
const CMD_WRITE_OUTPUT: u8 = 0xd1;
const CMD_WRITE_KBD_OUTPUT: u8 = 0xd2;
const CMD_RESET_CPU: u8 = 0xfe;

const SELF_TEST_OK: u8 = 0x55;
const KBD_ACK: u8 = 0xfa;
const KBD_SELF_TEST_OK: u8 = 0xaa;
const KBD_CMD_GET_ID: u8 = 0xf2;
const KBD_CMD_RESET: u8 = 0xff;
/// Keyboard commands followed by one parameter byte (set LEDs, scan code set, typematic rate).
const KBD_CMDS_WITH_PARAM: [u8; 3] = [0xed, 0xf0, 0xf3];
/// MF2 keyboard id, in translated mode.
const KBD_ID: [u8; 2] = [0xab, 0x83];
/// Bound on queued output bytes; a guest flooding commands cannot grow it further.
const OUTPUT_CAPACITY: usize = 16;

/// What the next data-port write means.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pending {
    None,
    WriteCtr,
    WriteOutput,
    WriteKbdOutput,
    KbdParam,
}

/// The controller.
pub struct I8042 {
    ctr: u8,
    output_port: u8,
    status_command: bool,
    pending: Pending,
    output: VecDeque<u8>,
    last_output: u8,
    kbd_irq: EventFd,
    stop: Arc<StopState>,
}

impl I8042 {
    /// A controller raising IRQ 1 through `kbd_irq`; a reset request goes to `stop`.
    pub fn new(kbd_irq: EventFd, stop: Arc<StopState>) -> Self {
        I8042 {
            ctr: CTR_KBD_INT | CTR_SYSTEM_FLAG,
            output_port: 0x01,
            status_command: false,
            pending: Pending::None,
            output: VecDeque::new(),
            last_output: 0,
            kbd_irq,
            stop,
        }
    }

    fn status(&self) -> u8 {
        let mut s = STATUS_UNLOCKED;
        if !self.output.is_empty() {
            s |= STATUS_OUTPUT_FULL;
        }
        if self.ctr & CTR_SYSTEM_FLAG != 0 {
            s |= STATUS_SYSTEM_FLAG;
        }
        if self.status_command {
            s |= STATUS_LAST_WAS_COMMAND;
        }
        s
    }

    fn push(&mut self, byte: u8) {
        if self.output.len() < OUTPUT_CAPACITY {
            self.output.push_back(byte);
        }
    }

    /// Keyboard bytes interrupt when the keyboard interrupt is enabled.
    fn push_kbd(&mut self, bytes: &[u8]) {
        let was_empty = self.output.is_empty();
        for b in bytes {
            self.push(*b);
        }
        if was_empty {
            self.raise_kbd_irq();
        }
    }

    fn raise_kbd_irq(&self) {
        if self.ctr & CTR_KBD_INT != 0 && !self.output.is_empty() {
            if let Err(e) = self.kbd_irq.write(1) {
                husk_devices::warn_limited!("i8042: cannot raise IRQ 1: {e}");
            }
        }
    }

    fn command(&mut self, cmd: u8) {
        self.status_command = true;
        self.pending = Pending::None;
        match cmd {
            CMD_READ_CTR => self.push(self.ctr),
            CMD_WRITE_CTR => self.pending = Pending::WriteCtr,
            CMD_AUX_DISABLE => self.ctr |= CTR_AUX_DISABLED,
            CMD_AUX_ENABLE => self.ctr &= !CTR_AUX_DISABLED,
            CMD_SELF_TEST => self.push(SELF_TEST_OK),
            CMD_KBD_TEST => self.push(0),
            CMD_KBD_DISABLE => self.ctr |= CTR_KBD_DISABLED,
            CMD_KBD_ENABLE => self.ctr &= !CTR_KBD_DISABLED,
            CMD_READ_OUTPUT => self.push(self.output_port),
            CMD_WRITE_OUTPUT => self.pending = Pending::WriteOutput,
            CMD_WRITE_KBD_OUTPUT => self.pending = Pending::WriteKbdOutput,
            CMD_RESET_CPU => {
                log::info!("i8042: guest requested a reset");
                self.stop.request(StopReason::GuestReset);
            }
            other => log::debug!("i8042: ignoring command {other:#x}"),
        }
    }

    fn data(&mut self, byte: u8) {
        self.status_command = false;
        match std::mem::replace(&mut self.pending, Pending::None) {
            Pending::WriteCtr => self.ctr = byte,
            Pending::WriteOutput => {
                self.output_port = byte;
                // Output port bit 0 low asserts the CPU reset line.
                if byte & 1 == 0 {
                    self.stop.request(StopReason::GuestReset);
                }
            }
            Pending::WriteKbdOutput => self.push_kbd(&[byte]),
            Pending::KbdParam => self.push_kbd(&[KBD_ACK]),
            Pending::None => match byte {
                KBD_CMD_GET_ID => self.push_kbd(&[KBD_ACK, KBD_ID[0], KBD_ID[1]]),
                KBD_CMD_RESET => self.push_kbd(&[KBD_ACK, KBD_SELF_TEST_OK]),
                b if KBD_CMDS_WITH_PARAM.contains(&b) => {
                    self.pending = Pending::KbdParam;
                    self.push_kbd(&[KBD_ACK]);
                }
                _ => self.push_kbd(&[KBD_ACK]),
            },
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let [b] = data else {
            data.fill(0xff);
            return;
        };
        *b = match offset {
            0 => {
                if let Some(v) = self.output.pop_front() {
                    self.last_output = v;
                    // One byte per interrupt: re-raise while more are queued.
                    self.raise_kbd_irq();
                }
                self.last_output
            }
            4 => self.status(),
            _ => 0xff,
        };
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let [b] = data else { return };
        match offset {
            0 => self.data(*b),
            4 => self.command(*b),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev() -> (I8042, Arc<StopState>) {
        let stop = Arc::new(StopState::new().unwrap());
        (I8042::new(EventFd::new(0).unwrap(), stop.clone()), stop)
    }

    fn rd(d: &mut I8042, off: u64) -> u8 {
        let mut b = [0];
        d.read(off, &mut b);
        b[0]
    }

    #[test]
    fn reset_command_stops_the_vm() {
        let (mut d, stop) = dev();
        d.write(4, &[0x20]);
        assert!(!stop.is_stopping());
        d.write(4, &[0xfe]);
        assert_eq!(stop.reason(), Some(StopReason::GuestReset));
    }

    #[test]
    fn controller_commands_answer_through_the_data_port() {
        let (mut d, _) = dev();
        assert_eq!(rd(&mut d, 4) & STATUS_OUTPUT_FULL, 0);
        d.write(4, &[CMD_SELF_TEST]);
        assert_eq!(rd(&mut d, 4) & STATUS_OUTPUT_FULL, 1);
        assert_eq!(rd(&mut d, 0), 0x55);
        d.write(4, &[CMD_WRITE_CTR]);
        d.write(0, &[0x45]);
        d.write(4, &[CMD_READ_CTR]);
        assert_eq!(rd(&mut d, 0), 0x45);
        assert_eq!(rd(&mut d, 4) & STATUS_OUTPUT_FULL, 0);
    }

    #[test]
    fn keyboard_commands_are_acknowledged_with_an_interrupt() {
        let (mut d, _) = dev();
        d.write(0, &[KBD_CMD_GET_ID]);
        assert_eq!(d.kbd_irq.read().unwrap(), 1);
        assert_eq!(
            [rd(&mut d, 0), rd(&mut d, 0), rd(&mut d, 0)],
            [0xfa, 0xab, 0x83]
        );
        d.write(0, &[0xed]);
        d.write(0, &[KBD_CMD_GET_ID]); // LED parameter, not a command
        assert_eq!([rd(&mut d, 0), rd(&mut d, 0)], [0xfa, 0xfa]);
        assert_eq!(rd(&mut d, 4) & STATUS_OUTPUT_FULL, 0);
    }

    #[test]
    fn hostile_input_is_bounded_and_ignored() {
        let (mut d, stop) = dev();
        for _ in 0..1000 {
            d.write(0, &[KBD_CMD_GET_ID]);
        }
        assert!(d.output.len() <= OUTPUT_CAPACITY);
        d.write(0, &[1, 2]);
        d.write(2, &[0xfe]);
        let mut w = [0u8; 4];
        d.read(0, &mut w);
        assert_eq!(w, [0xff; 4]);
        assert!(!stop.is_stopping());
    }
}
