//! Guest agent messages as husk-init reads them from its vsock connection (framed
//! `HostMessage`s) and as the host reads the guest's answers (framed `GuestMessage`s): a
//! stream of frames, cut anywhere. Reading must never panic or allocate past the frame limit,
//! and every message re-encodes to itself.

#![no_main]

use husk_proto::agent::{GuestMessage, HostMessage};
use husk_proto::frame;
use libfuzzer_sys::fuzz_target;
use prost::Message;

/// Reads frames of `M` off `wire` until it ends or breaks; each must round-trip.
fn read_all<M: Message + Default + PartialEq + std::fmt::Debug>(mut wire: &[u8]) {
    for _ in 0..64 {
        let Ok(Some(message)) = frame::read::<M, _>(&mut wire) else {
            return;
        };
        let encoded = frame::encode(&message).unwrap_or_else(|e| panic!("cannot re-encode: {e}"));
        let back = frame::read::<M, _>(&mut &encoded[..]).ok().flatten();
        assert_eq!(back.as_ref(), Some(&message));
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, wire)) = data.split_first() else {
        return;
    };
    if which & 1 == 0 {
        read_all::<HostMessage>(wire);
    } else {
        read_all::<GuestMessage>(wire);
    }
    // A body without its length prefix, as a single message.
    let _ = frame::decode::<HostMessage>(wire);
});
