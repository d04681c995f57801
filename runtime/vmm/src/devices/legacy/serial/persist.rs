//! The UART in a snapshot: its one state type, [`SerialState`] (the protobuf message the
//! snapshot file holds; field tags are part of the file format), saved and restored here.

use prost::Message;
use vm_superio::serial::NoEvents;
use vm_superio::Serial;
use vmm_sys_util::eventfd::EventFd;

use super::{ConsoleOut, DiscardAfterFailure, EventFdTrigger, SerialDevice};

/// The 16550 UART registers and its unread input (vm-superio's `SerialState`).
#[derive(Clone, PartialEq, Message)]
pub struct SerialState {
    /// DLL.
    #[prost(uint32, tag = "1")]
    pub baud_divisor_low: u32,
    /// DLM.
    #[prost(uint32, tag = "2")]
    pub baud_divisor_high: u32,
    /// IER.
    #[prost(uint32, tag = "3")]
    pub interrupt_enable: u32,
    /// IIR.
    #[prost(uint32, tag = "4")]
    pub interrupt_identification: u32,
    /// LCR.
    #[prost(uint32, tag = "5")]
    pub line_control: u32,
    /// LSR.
    #[prost(uint32, tag = "6")]
    pub line_status: u32,
    /// MCR.
    #[prost(uint32, tag = "7")]
    pub modem_control: u32,
    /// MSR.
    #[prost(uint32, tag = "8")]
    pub modem_status: u32,
    /// SCR.
    #[prost(uint32, tag = "9")]
    pub scratch: u32,
    /// Input bytes the guest has not read yet.
    #[prost(bytes = "vec", tag = "10")]
    pub in_buffer: Vec<u8>,
}

/// Why a saved UART state cannot be put back.
#[derive(Debug, thiserror::Error)]
#[error("invalid serial state")]
pub struct SerialStateError(#[source] vm_superio::serial::Error<std::io::Error>);

impl SerialDevice {
    /// The UART's registers and unread input, for a snapshot.
    pub fn save_state(&self) -> SerialState {
        let s = self.serial.state();
        SerialState {
            baud_divisor_low: s.baud_divisor_low.into(),
            baud_divisor_high: s.baud_divisor_high.into(),
            interrupt_enable: s.interrupt_enable.into(),
            interrupt_identification: s.interrupt_identification.into(),
            line_control: s.line_control.into(),
            line_status: s.line_status.into(),
            modem_control: s.modem_control.into(),
            modem_status: s.modem_status.into(),
            scratch: s.scratch.into(),
            in_buffer: s.in_buffer,
        }
    }

    /// A UART in the state a snapshot recorded. Registers are 8-bit: a wider value in the file
    /// (damage) is truncated rather than trusted; an overfull input FIFO is refused.
    pub fn from_state(
        irq: EventFd,
        out: ConsoleOut,
        state: &SerialState,
    ) -> Result<Self, SerialStateError> {
        let r = |v: u32| v as u8;
        let s = vm_superio::serial::SerialState {
            baud_divisor_low: r(state.baud_divisor_low),
            baud_divisor_high: r(state.baud_divisor_high),
            interrupt_enable: r(state.interrupt_enable),
            interrupt_identification: r(state.interrupt_identification),
            line_control: r(state.line_control),
            line_status: r(state.line_status),
            modem_control: r(state.modem_control),
            modem_status: r(state.modem_status),
            scratch: r(state.scratch),
            in_buffer: state.in_buffer.clone(),
        };
        let out = DiscardAfterFailure::wrap(out);
        let serial =
            Serial::from_state(&s, EventFdTrigger(irq), NoEvents, out).map_err(SerialStateError)?;
        Ok(SerialDevice { serial })
    }
}

#[cfg(test)]
mod tests {
    use std::io;

    use super::*;
    use crate::devices::bus::BusDevice;

    #[test]
    fn state_round_trips_and_an_overfull_fifo_is_refused() {
        let mut dev = SerialDevice::new(EventFd::new(0).unwrap(), Box::new(io::sink()));
        dev.write(3, &[0x83]); // LCR: DLAB on, 8 data bits
        dev.write(0, &[0x0c]); // DLL: 9600 baud
        dev.write(3, &[0x03]); // DLAB off
        dev.write(7, &[0x5a]); // scratch
        let state = dev.save_state();
        assert_eq!(
            (state.line_control, state.baud_divisor_low, state.scratch),
            (3, 0x0c, 0x5a)
        );
        let back = SerialDevice::from_state(EventFd::new(0).unwrap(), Box::new(io::sink()), &state)
            .unwrap();
        assert_eq!(back.save_state(), state);
        let mut full = state.clone();
        full.in_buffer = vec![0; 4096];
        assert!(
            SerialDevice::from_state(EventFd::new(0).unwrap(), Box::new(io::sink()), &full)
                .is_err()
        );
    }
}
