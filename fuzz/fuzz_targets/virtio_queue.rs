//! Queue processing of one virtio device (blk, net, vsock, rng or balloon, picked by the first byte):
//! the device is started as a Linux driver would, then the descriptor tables, available rings
//! and buffers laid out from the input are handed to it, and its queues are notified in an
//! order the input picks. Descriptors may point anywhere, chain anywhere, loop, be indirect or
//! straddle the hole in guest memory: nothing may panic, and the device must stay resettable.

#![no_main]

use std::collections::VecDeque;

use husk_fuzz::{
    poke, read32, reg, rings, start, transport, write32, Input, Kind, BUFFERS, QUEUE_SIZE, RAM1,
};
use libfuzzer_sys::fuzz_target;

/// A descriptor address: mostly in the buffer area, sometimes anywhere (the second region, the
/// hole, past the end of memory).
fn address(sel: u16) -> u64 {
    if sel & 0x8000 == 0 {
        BUFFERS + u64::from(sel) * 8
    } else {
        RAM1.0 - 0x1000 + u64::from(sel & 0x7fff) * 8
    }
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let kind = Kind::from_byte(input.u8());
    let features = input.u64();
    let mem = husk_fuzz::guest_memory();
    // What the host sends a net device.
    let frames: VecDeque<Vec<u8>> = (0..input.u8() % 4)
        .map(|_| {
            let len = usize::from(input.u16() % 2048);
            input.bytes(len).to_vec()
        })
        .collect();
    let mut t = transport(kind.device(frames), &mem);
    if !start(&mut t, features) {
        return;
    }
    let queues = t.device().queue_max_sizes().len();
    for q in 0..queues {
        let (desc, driver, _) = rings(q);
        for i in 0..u64::from(QUEUE_SIZE) {
            let mut d = [0u8; 16];
            d[..8].copy_from_slice(&address(input.u16()).to_le_bytes());
            d[8..12].copy_from_slice(&u32::from(input.u16()).to_le_bytes());
            d[12..14].copy_from_slice(&u16::from(input.u8() & 7).to_le_bytes());
            d[14..16].copy_from_slice(&u16::from(input.u8() % 20).to_le_bytes());
            poke(&mem, desc + 16 * i, &d);
        }
        // The driver ring: flags, idx, then the heads.
        let count = input.u8() % (QUEUE_SIZE as u8 + 1);
        poke(&mem, driver, &[input.u8() & 1, 0, count, 0]);
        for i in 0..u64::from(count) {
            let head = u16::from(input.u8() % 20);
            poke(&mem, driver + 4 + 2 * i, &head.to_le_bytes());
        }
    }
    let schedule = input.bytes(8).to_vec();
    // Request headers and payloads.
    poke(&mem, BUFFERS, input.rest());
    for step in schedule {
        match step % 8 {
            0..=5 => write32(&mut t, reg::QUEUE_NOTIFY, u32::from(step) % queues as u32),
            6 => t.process_backend(),
            _ => {
                // The driver adds the same heads again (idx moves on).
                let (_, driver, _) = rings(usize::from(step >> 3) % queues);
                poke(&mem, driver + 2, &[QUEUE_SIZE as u8 * 2, 0]);
                t.notify(0);
            }
        }
    }
    // Whatever happened, a reset brings the device back to a state a driver can start again.
    write32(&mut t, reg::STATUS, 0);
    assert_eq!(read32(&mut t, reg::STATUS), 0);
    assert!(!t.is_active());
});
