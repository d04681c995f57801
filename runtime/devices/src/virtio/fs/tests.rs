use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use vm_memory::{FileOffset, GuestAddress};

use super::vhost_user::tests::{backend, well_behaved, Received};
use super::vhost_user::F_PROTOCOL_FEATURES;
use super::*;
use crate::virtio::test_utils::{CountingLine, Driver};
use crate::virtio::{VirtioInterrupt, INTERRUPT_USED_RING};

const FEATURES: u64 = features::VERSION_1
    | F_PROTOCOL_FEATURES
    | features::RING_EVENT_IDX
    | features::RING_INDIRECT_DESC
    | 1; // VIRTIO_FS_F_NOTIFICATION: not passed on

/// 1 MiB of guest memory from a memfd, as the VMM gives a VM with shared directories.
fn shared_memory() -> GuestMemoryMmap {
    let fd = rustix::fs::memfd_create("test", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
    rustix::fs::ftruncate(&fd, 0x10_0000).unwrap();
    let file = FileOffset::new(std::fs::File::from(fd), 0);
    GuestMemoryMmap::from_ranges_with_files([(GuestAddress(0), 0x10_0000, Some(file))]).unwrap()
}

#[test]
fn the_device_offers_the_backends_ring_features_and_its_tag() {
    let (sock, _rx) = backend(well_behaved(FEATURES));
    let fs = Fs::new("husk-fs0", sock).unwrap();
    assert_eq!(fs.device_type(), device_id::FS);
    assert_eq!(
        fs.offered_features(),
        features::VERSION_1 | features::RING_EVENT_IDX | features::RING_INDIRECT_DESC
    );
    let mut config = [0xffu8; 40];
    fs.read_config(0, &mut config);
    assert_eq!(&config[..8], b"husk-fs0");
    assert!(config[8..36].iter().all(|b| *b == 0));
    assert_eq!(config[36..], 1u32.to_le_bytes());
    for bad in ["", "a b", "x/y", &"t".repeat(37)] {
        let (sock, _rx) = backend(well_behaved(FEATURES));
        assert!(
            matches!(Fs::new(bad, sock), Err(FsError::Tag(_))),
            "{bad:?}"
        );
    }
}

#[test]
fn activation_hands_memory_rings_and_events_over_and_relays_both_ways() {
    let (sock, rx) = backend(well_behaved(FEATURES));
    let mut fs = Fs::new("data", sock).unwrap();
    let _: Vec<Received> = rx.try_iter().collect();
    let mem = shared_memory();
    let hiprio = Driver::new_at(&mem, 16, 0x1000, 0x4_0000);
    let requests = Driver::new_at(&mem, 16, 0x2000, 0x8_0000);
    let line = CountingLine::default();
    let interrupt = Arc::new(VirtioInterrupt::new(Box::new(line.clone())));
    fs.activate(ActivateContext {
        mem: mem.clone(),
        queues: vec![hiprio.queue(), requests.queue()],
        interrupt: interrupt.clone(),
        acked_features: features::VERSION_1 | features::RING_EVENT_IDX,
    })
    .unwrap();
    let seen: Vec<Received> = rx.try_iter().collect();
    let order: Vec<u32> = seen.iter().map(|m| m.request).collect();
    // SET_FEATURES, SET_MEM_TABLE, then per ring NUM, BASE, ADDR, KICK, CALL, ENABLE.
    assert_eq!(
        order,
        [2, 5, 8, 10, 9, 12, 13, 18, 8, 10, 9, 12, 13, 18],
        "{order:?}"
    );
    assert_eq!(
        seen[0].payload,
        (features::VERSION_1 | features::RING_EVENT_IDX | F_PROTOCOL_FEATURES).to_le_bytes()
    );
    // The memory table: one region, its fd, guest address 0, the host address of guest 0.
    let table = &seen[1].payload;
    assert_eq!(table[..4], 1u32.to_le_bytes());
    assert_eq!(seen[1].fds.len(), 1);
    let host0 = mem.get_host_address(GuestAddress(0)).unwrap() as u64;
    assert_eq!(table[8..16], 0u64.to_le_bytes());
    assert_eq!(table[16..24], 0x10_0000u64.to_le_bytes());
    assert_eq!(table[24..32], host0.to_le_bytes());
    // The request ring's descriptor table, as a host address.
    let addr = &seen[10].payload;
    assert_eq!(addr[..4], 1u32.to_le_bytes());
    assert_eq!(addr[8..16], (host0 + 0x2000).to_le_bytes());

    // Guest notifies queue 1: the backend's kick event for ring 1 fires.
    let kick = &seen[11].fds[0];
    fs.process_queue(1).unwrap();
    let mut count = [0u8; 8];
    assert_eq!(rustix::io::read(kick, &mut count).unwrap(), 8);
    assert_eq!(u64::from_ne_bytes(count), 1);
    // The backend signals its call event: the guest gets the used-ring interrupt.
    let call = &seen[12].fds[0];
    rustix::io::write(call, &1u64.to_ne_bytes()).unwrap();
    assert_eq!(fs.backend_fd(), Some(fs.call.as_raw_fd()));
    fs.process_backend().unwrap();
    assert_eq!(line.0.load(Ordering::SeqCst), 1);
    assert_eq!(
        interrupt.status() & INTERRUPT_USED_RING,
        INTERRUPT_USED_RING
    );

    // A reset stops both rings.
    fs.reset();
    let stops: Vec<u32> = rx.try_iter().map(|m| m.request).collect();
    assert_eq!(stops, [11, 11]);
}

#[test]
fn private_memory_or_a_refusing_backend_fails_activation_without_panic() {
    let (sock, _rx) = backend(well_behaved(FEATURES));
    let mut fs = Fs::new("data", sock).unwrap();
    let mem = crate::virtio::test_utils::guest_memory(); // anonymous: nothing to share
    let d = Driver::new(&mem, 16);
    let interrupt = Arc::new(VirtioInterrupt::new(Box::new(CountingLine::default())));
    let ctx = ActivateContext {
        mem: mem.clone(),
        queues: vec![d.queue(), d.queue()],
        interrupt,
        acked_features: features::VERSION_1,
    };
    assert!(fs.activate(ctx).is_err());

    let (sock, _rx) = backend(Box::new(|m: &Received| match m.request {
        5 => super::vhost_user::tests::reply(5, &1u64.to_le_bytes()),
        _ => (well_behaved(FEATURES))(m),
    }));
    let mut fs = Fs::new("data", sock).unwrap();
    let mem = shared_memory();
    let d = Driver::new(&mem, 16);
    let interrupt = Arc::new(VirtioInterrupt::new(Box::new(CountingLine::default())));
    let ctx = ActivateContext {
        mem: mem.clone(),
        queues: vec![d.queue(), d.queue()],
        interrupt,
        acked_features: features::VERSION_1,
    };
    assert!(fs.activate(ctx).is_err());
    // Inactive: a stray call event is drained, no interrupt, no panic.
    fs.drain_backend();
    fs.process_queue(7).unwrap();
}
