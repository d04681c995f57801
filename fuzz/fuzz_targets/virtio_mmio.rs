//! A guest driver's register accesses to one virtio device (blk, net, vsock, rng or balloon, picked by
//! the first byte) through the virtio-mmio transport, interleaved with writes to guest memory,
//! queue notifications and backend events. Nothing the guest does may panic the VMM.

#![no_main]

use std::collections::VecDeque;

use husk_fuzz::{poke, read32, reg, start, transport, write32, Input, Kind, RAM0};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let kind = Kind::from_byte(input.u8());
    let mem = husk_fuzz::guest_memory();
    let frames = VecDeque::from([vec![0u8; 64], vec![0xff; 1600]]);
    let mut t = transport(kind.device(frames), &mem);
    for _ in 0..256 {
        if input.is_empty() {
            break;
        }
        match input.u8() % 9 {
            0 => {
                let offset = reg::ALL[usize::from(input.u8()) % reg::ALL.len()];
                write32(&mut t, offset, input.u32());
            }
            1 => {
                let offset = reg::ALL[usize::from(input.u8()) % reg::ALL.len()];
                read32(&mut t, offset);
            }
            2 => {
                // Any offset and width: misaligned, short, long, past the window.
                let offset = u64::from(input.u16() & 0x1fff);
                let len = usize::from(input.u8() % 9);
                let value = input.bytes(len).to_vec();
                t.write(offset, &value);
                let mut back = vec![0u8; len];
                t.read(offset, &mut back);
            }
            3 => {
                let addr = u64::from(input.u32()) % RAM0.1 as u64;
                let len = usize::from(input.u8());
                poke(&mem, addr, input.bytes(len));
            }
            4 => t.notify(u32::from(input.u8() % 5)),
            5 => t.process_backend(),
            6 => {
                start(&mut t, input.u64());
            }
            7 => {
                // A snapshot of the transport restored in place, as a restore would.
                let saved = t.save_state();
                let _ = t.restore_state(&saved);
            }
            _ => {
                let offset = reg::CONFIG + u64::from(input.u8());
                let len = usize::from(input.u8() % 9);
                let mut buf = vec![0u8; len];
                t.read(offset, &mut buf);
            }
        }
    }
    // The transport still answers: a broken device only ever asks for a reset.
    assert_eq!(read32(&mut t, 0), 0x7472_6976);
    write32(&mut t, reg::STATUS, 0);
    assert_eq!(read32(&mut t, reg::STATUS), 0);
});
