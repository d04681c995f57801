//! virtio-net driven through its queues as the guest driver would, on a scripted backend (the
//! queue logic is what is under test), plus one test on a real tap device.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use super::*;
use crate::virtio::test_utils::{activate_ctx, guest_memory, CountingLine, Driver, WRITE};

#[derive(Default)]
struct Wire {
    to_guest: VecDeque<Vec<u8>>,
    from_guest: Vec<Vec<u8>>,
    offloads: Option<u32>,
    /// The backend takes no offloads (as passt's stream).
    no_offloads: bool,
}

#[derive(Clone, Default)]
struct FakeBackend(Arc<Mutex<Wire>>);

impl NetBackend for FakeBackend {
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let frame = self
            .0
            .lock()
            .unwrap()
            .to_guest
            .pop_front()
            .ok_or(io::ErrorKind::WouldBlock)?;
        buf[..frame.len()].copy_from_slice(&frame);
        Ok(frame.len())
    }
    fn send(&mut self, frame: &[u8]) -> io::Result<()> {
        self.0.lock().unwrap().from_guest.push(frame.to_vec());
        Ok(())
    }
    fn set_offloads(&mut self, flags: u32) -> io::Result<()> {
        self.0.lock().unwrap().offloads = Some(flags);
        Ok(())
    }
    fn takes_vnet_offloads(&self) -> bool {
        !self.0.lock().unwrap().no_offloads
    }
    fn fd(&self) -> Option<std::os::unix::io::RawFd> {
        None
    }
}

fn frame(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed))
        .collect()
}

/// A net device activated on rx queue `rx` and tx queue `tx` with `acked` features.
fn active_net(
    mem: &GuestMemoryMmap,
    rx: Queue,
    tx: Queue,
    acked: u64,
) -> (Net, FakeBackend, CountingLine) {
    let wire = FakeBackend::default();
    let line = CountingLine::default();
    let mut net = Net::new(Box::new(wire.clone()), [2, 0, 0, 0, 0, 1]);
    let mut ctx = activate_ctx(mem, vec![rx, tx], line.clone());
    ctx.acked_features = acked;
    net.activate(ctx).unwrap();
    (net, wire, line)
}

const MRG: u64 = features::VERSION_1 | feature::MRG_RXBUF;

#[test]
fn transmits_the_guests_frame_byte_exact() {
    let mem = guest_memory();
    let rx = Driver::new(&mem, 16);
    let mut tx = Driver::new_at(&mem, 16, 0x8000, 0xa_0000);
    let f = frame(1500 + VNET_HDR_LEN, 1);
    tx.chain(&[
        (&f[..VNET_HDR_LEN], VNET_HDR_LEN as u32, false),
        (&f[VNET_HDR_LEN..], 1500, false),
    ]);
    let (mut net, wire, line) = active_net(&mem, rx.queue(), tx.queue(), MRG);

    net.process_queue(TX).unwrap();

    assert_eq!(wire.0.lock().unwrap().from_guest, vec![f]);
    assert_eq!(tx.used(), vec![(0, 0)]);
    assert_eq!(line.0.load(std::sync::atomic::Ordering::SeqCst), 1);
    assert_eq!(net.counters().snapshot().bytes_read, 1512);
}

#[test]
fn a_large_frame_spreads_over_mergeable_buffers_with_num_buffers_set() {
    let mem = guest_memory();
    let mut rx = Driver::new(&mem, 16);
    let tx = Driver::new_at(&mem, 16, 0x8000, 0xa_0000);
    for _ in 0..4 {
        rx.chain(&[(&[], 1024, true)]);
    }
    let f = frame(3000, 9);
    let (mut net, wire, _) = active_net(&mem, rx.queue(), tx.queue(), MRG);
    wire.0.lock().unwrap().to_guest.push_back(f.clone());

    net.process_backend().unwrap();

    assert_eq!(rx.used(), vec![(0, 1024), (1, 1024), (2, 952)]);
    let mut got = Vec::new();
    for d in 0..3 {
        got.extend(rx.read(rx.desc_addr(d), 1024));
    }
    got.truncate(3000);
    assert_eq!(u16::from_le_bytes([got[10], got[11]]), 3, "num_buffers");
    assert_eq!(&got[12..], &f[12..]);
}

#[test]
fn a_frame_waits_for_buffers_and_goes_out_when_the_guest_adds_them() {
    let mem = guest_memory();
    let mut rx = Driver::new(&mem, 16);
    let tx = Driver::new_at(&mem, 16, 0x8000, 0xa_0000);
    rx.chain(&[(&[], 512, true)]); // too small for the frame alone
    let (mut net, wire, _) = active_net(&mem, rx.queue(), tx.queue(), MRG);
    wire.0.lock().unwrap().to_guest.push_back(frame(1000, 3));
    net.process_backend().unwrap();
    assert!(rx.used().is_empty(), "nothing delivered half-way");

    // The guest adds a buffer and kicks the rx queue.
    rx.chain(&[(&[], 1024, true)]);
    net.process_queue(RX).unwrap();

    assert_eq!(rx.used(), vec![(0, 512), (1, 488)]);
}

#[test]
fn without_mergeable_buffers_a_frame_needs_one_big_enough_chain() {
    let mem = guest_memory();
    let mut rx = Driver::new(&mem, 16);
    let tx = Driver::new_at(&mem, 16, 0x8000, 0xa_0000);
    rx.chain(&[(&[], 256, true)]);
    rx.chain(&[(&[], 2048, true)]);
    let (mut net, wire, _) = active_net(&mem, rx.queue(), tx.queue(), features::VERSION_1);
    wire.0
        .lock()
        .unwrap()
        .to_guest
        .extend([frame(1000, 1), frame(1000, 2)]);
    net.process_backend().unwrap();
    let used = rx.used();
    assert_eq!(
        used,
        vec![(0, 0), (1, 1000)],
        "first frame dropped, second delivered whole"
    );
    assert_eq!(net.counters().snapshot().errors, 1);
}

#[test]
fn offloads_follow_what_the_guest_accepted() {
    let mem = guest_memory();
    let rx = Driver::new(&mem, 16);
    let tx = Driver::new_at(&mem, 16, 0x8000, 0xa_0000);
    let acked = MRG | feature::GUEST_CSUM | feature::GUEST_TSO4;
    let (_, wire, _) = active_net(&mem, rx.queue(), tx.queue(), acked);
    assert_eq!(
        wire.0.lock().unwrap().offloads,
        Some(TUN_F_CSUM | TUN_F_TSO4)
    );
    let (_, wire, _) = active_net(&mem, rx.queue(), tx.queue(), MRG | feature::GUEST_TSO4);
    assert_eq!(
        wire.0.lock().unwrap().offloads,
        Some(0),
        "TSO without checksum offload is not enabled"
    );
}

#[test]
fn a_backend_without_offloads_is_offered_none_and_asked_for_none() {
    let offload = feature::CSUM
        | feature::GUEST_CSUM
        | feature::GUEST_TSO4
        | feature::GUEST_TSO6
        | feature::HOST_TSO4
        | feature::HOST_TSO6;
    let wire = FakeBackend::default();
    assert_eq!(
        Net::new(Box::new(wire.clone()), [2, 0, 0, 0, 0, 1]).offered_features() & offload,
        offload
    );
    wire.0.lock().unwrap().no_offloads = true;
    let net = Net::new(Box::new(wire.clone()), [2, 0, 0, 0, 0, 1]);
    assert_eq!(net.offered_features() & offload, 0);
    assert_ne!(net.offered_features() & feature::MRG_RXBUF, 0);
    // Even a context claiming them (the transport never acks what was not offered).
    let mem = guest_memory();
    let rx = Driver::new(&mem, 16);
    let tx = Driver::new_at(&mem, 16, 0x8000, 0xa_0000);
    let mut net = Net::new(Box::new(wire.clone()), [2, 0, 0, 0, 0, 1]);
    let mut ctx = activate_ctx(&mem, vec![rx.queue(), tx.queue()], CountingLine::default());
    ctx.acked_features = MRG | feature::GUEST_CSUM | feature::GUEST_TSO4;
    net.activate(ctx).unwrap();
    assert_eq!(wire.0.lock().unwrap().offloads, Some(0));
}

#[test]
fn frames_cross_a_stream_backend_both_ways_in_passts_framing() {
    use std::io::{Read, Write};
    let mem = guest_memory();
    let mut rx = Driver::new(&mem, 16);
    let mut tx = Driver::new_at(&mem, 16, 0x8000, 0xa_0000);
    let (ours, mut peer) = std::os::unix::net::UnixStream::pair().unwrap();
    let backend = stream::StreamBackend::new(ours.into(), MAX_ETHERNET_FRAME).unwrap();
    let mut net = Net::new(Box::new(backend), [2, 0, 0, 0, 0, 1]);
    let mut ctx = activate_ctx(&mem, vec![rx.queue(), tx.queue()], CountingLine::default());
    ctx.acked_features = MRG;
    net.activate(ctx).unwrap();

    // Guest to peer: the virtio-net header goes, a length prefix comes.
    let f = frame(60 + VNET_HDR_LEN, 4);
    tx.chain(&[(&f[..], f.len() as u32, false)]);
    net.process_queue(TX).unwrap();
    let mut got = vec![0; 64];
    peer.read_exact(&mut got).unwrap();
    assert_eq!(&got[..4], &60u32.to_be_bytes());
    assert_eq!(&got[4..], &f[VNET_HDR_LEN..]);

    // Peer to guest: in two pieces; the frame arrives once whole, with a zeroed header.
    rx.chain(&[(&[], 2048, true)]);
    let payload = frame(100, 8);
    let mut wire = 100u32.to_be_bytes().to_vec();
    wire.extend_from_slice(&payload);
    peer.write_all(&wire[..50]).unwrap();
    net.process_backend().unwrap();
    assert_eq!(rx.used(), vec![]);
    peer.write_all(&wire[50..]).unwrap();
    net.process_backend().unwrap();
    assert_eq!(rx.used(), vec![(0, (VNET_HDR_LEN + 100) as u32)]);
    let got = rx.read(rx.desc_addr(0), VNET_HDR_LEN + 100);
    assert_eq!(
        &got[..10],
        &[0; 10],
        "header zeroed (num_buffers set after)"
    );
    assert_eq!(&got[VNET_HDR_LEN..], &payload[..]);

    // A hostile length takes the link down; the device keeps working (nothing delivered).
    peer.write_all(&u32::MAX.to_be_bytes()).unwrap();
    rx.chain(&[(&[], 2048, true)]);
    net.process_backend().unwrap();
    assert_eq!(rx.used().len(), 1);
}

#[test]
fn hostile_tx_and_rx_chains_are_counted_not_fatal() {
    let mem = guest_memory();
    let mut rx = Driver::new(&mem, 16);
    let mut tx = Driver::new_at(&mem, 16, 0x8000, 0xa_0000);
    tx.raw_chain(&[(0x4_0000, 64, WRITE, 0)]); // only device-writable: no frame
    tx.raw_chain(&[(0x4_0000, 4, 0, 0)]); // shorter than the header
    tx.raw_chain(&[(0x4_0000, 0x10_0000, 0, 0)]); // larger than any frame
    tx.raw_chain(&[(u64::MAX - 100, 64, 0, 0)]); // outside guest memory
    rx.raw_chain(&[(0x4_0000, 2048, 0, 0)]); // rx buffer the device may not write
    rx.chain(&[(&[], 2048, true)]);
    let (mut net, wire, _) = active_net(&mem, rx.queue(), tx.queue(), MRG);
    wire.0.lock().unwrap().to_guest.push_back(frame(100, 0));

    net.process_queue(TX).unwrap();
    net.process_backend().unwrap();

    assert!(wire.0.lock().unwrap().from_guest.is_empty());
    assert_eq!(tx.used().len(), 4);
    assert_eq!(rx.used(), vec![(0, 0), (1, 100)]);
    assert_eq!(net.counters().snapshot().errors, 5);
}

#[test]
fn config_space_has_the_mac_and_link_up() {
    let net = Net::new(Box::new(FakeBackend::default()), [0x06, 1, 2, 3, 4, 5]);
    let mut c = [0u8; 8];
    net.read_config(0, &mut c);
    assert_eq!(c, [0x06, 1, 2, 3, 4, 5, 1, 0]);
    assert_eq!(
        net.offered_features() & feature::MTU,
        0,
        "no MTU unless given"
    );
}

#[test]
fn an_mtu_is_announced_in_config_space_with_its_feature() {
    let net = Net::new(Box::new(FakeBackend::default()), [0x06, 1, 2, 3, 4, 5]).with_mtu(1450);
    assert_ne!(net.offered_features() & feature::MTU, 0);
    let mut mtu = [0u8; 2];
    net.read_config(10, &mut mtu);
    assert_eq!(u16::from_le_bytes(mtu), 1450);
    let mut pairs = [0xffu8; 2];
    net.read_config(8, &mut pairs);
    assert_eq!(pairs, [0, 0], "max_virtqueue_pairs: unused, zero");
}

#[test]
fn a_real_tap_is_created_configured_and_gone_when_closed() {
    if !std::path::Path::new("/dev/net/tun").exists() {
        eprintln!("SKIPPED: /dev/net/tun is absent");
        return;
    }
    let mut t = match tap::Tap::open("husktest%d") {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
            eprintln!("SKIPPED: creating a tap needs CAP_NET_ADMIN ({e})");
            return;
        }
        Err(e) => panic!("cannot create a tap: {e}"),
    };
    let name = t.name().to_string();
    assert!(name.starts_with("husktest"));
    let sys = std::path::PathBuf::from("/sys/class/net").join(&name);
    assert!(sys.exists());
    t.set_offloads(TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6)
        .unwrap();
    let mut buf = vec![0u8; MAX_FRAME];
    assert_eq!(
        t.recv(&mut buf).unwrap_err().kind(),
        io::ErrorKind::WouldBlock
    );
    drop(t);
    assert!(
        !sys.exists(),
        "a non-persistent tap disappears with its last fd"
    );
}

#[test]
fn an_unwritable_chain_between_usable_ones_is_returned_once_after_a_rollback() {
    let mem = guest_memory();
    let mut rx = Driver::new(&mem, 16);
    let tx = Driver::new_at(&mem, 16, 0x8000, 0xa_0000);
    rx.chain(&[(&[], 1024, true)]);
    rx.raw_chain(&[(0x4_0000, 1024, 0, 0)]); // read-only: the device cannot use it
    let (mut net, wire, _) = active_net(&mem, rx.queue(), tx.queue(), MRG);
    wire.0.lock().unwrap().to_guest.push_back(frame(1500, 4));
    net.process_backend().unwrap();
    assert!(rx.used().is_empty(), "the frame waits, nothing is used yet");

    rx.chain(&[(&[], 1024, true)]);
    net.process_queue(RX).unwrap();

    let used = rx.used();
    assert_eq!(used, vec![(0, 1024), (2, 476), (1, 0)]);
    assert_eq!(net.counters().snapshot().errors, 1);
}

#[test]
fn a_frame_the_whole_ring_cannot_hold_is_dropped_and_rx_goes_on() {
    let mem = guest_memory();
    let mut rx = Driver::new(&mem, 4);
    let tx = Driver::new_at(&mem, 16, 0x8000, 0xa_0000);
    for _ in 0..4 {
        rx.chain(&[(&[], 100, true)]);
    }
    let (mut net, wire, _) = active_net(&mem, rx.queue(), tx.queue(), MRG);
    wire.0
        .lock()
        .unwrap()
        .to_guest
        .extend([frame(1000, 1), frame(50, 2)]);

    net.process_backend().unwrap();

    assert_eq!(
        rx.used(),
        vec![(0, 50)],
        "the big frame dropped, the next delivered"
    );
    assert_eq!(net.counters().snapshot().errors, 1);
}

/// A backend that lies: it claims frames longer than the buffer it was given, or empty ones.
struct LyingBackend(usize);

impl NetBackend for LyingBackend {
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        Ok(buf.len() + self.0)
    }
    fn send(&mut self, _: &[u8]) -> io::Result<()> {
        Ok(())
    }
    fn set_offloads(&mut self, _: u32) -> io::Result<()> {
        Ok(())
    }
    fn takes_vnet_offloads(&self) -> bool {
        true
    }
    fn fd(&self) -> Option<std::os::unix::io::RawFd> {
        None
    }
}

#[test]
fn a_backend_claiming_more_than_the_buffer_is_dropped_and_cannot_hold_the_device() {
    let mem = guest_memory();
    let mut rx = Driver::new(&mem, 16);
    let tx = Driver::new_at(&mem, 16, 0x8000, 0xa_0000);
    rx.chain(&[(&[], 2048, true)]);
    let mut net = Net::new(Box::new(LyingBackend(10)), [2, 0, 0, 0, 0, 1]);
    let ctx = activate_ctx(&mem, vec![rx.queue(), tx.queue()], CountingLine::default());
    // Activation reads the backend: it must return although the backend never runs dry.
    net.activate(ctx).unwrap();
    assert!(rx.used().is_empty());
    assert_eq!(net.counters().snapshot().errors, WORK_BUDGET as u64);
    assert!(net.take_unfinished().contains(RX), "comes back next turn");
}

#[test]
fn rx_stops_at_the_budget_and_finishes_on_later_turns() {
    let mem = guest_memory();
    let mut rx = Driver::new(&mem, 128);
    let tx = Driver::new_at(&mem, 16, 0x8000, 0xa_0000);
    let frames = WORK_BUDGET + 10;
    for _ in 0..frames {
        rx.chain(&[(&[], 256, true)]);
    }
    let (mut net, wire, _) = active_net(&mem, rx.queue(), tx.queue(), MRG);
    wire.0
        .lock()
        .unwrap()
        .to_guest
        .extend((0..frames).map(|i| frame(100, i as u8)));

    net.process_backend().unwrap();
    assert_eq!(rx.used().len(), WORK_BUDGET);
    let unfinished = net.take_unfinished();
    assert!(unfinished.contains(RX));
    assert!(net.take_unfinished().is_empty(), "taking clears the set");

    net.process_queue(RX).unwrap();
    assert_eq!(rx.used().len(), frames);
    assert!(net.take_unfinished().is_empty());
}

#[test]
fn tx_stops_at_the_budget_and_finishes_on_later_turns() {
    let mem = guest_memory();
    let rx = Driver::new(&mem, 16);
    let mut tx = Driver::new_at(&mem, 128, 0x8000, 0x2_0000);
    let frames = WORK_BUDGET + 5;
    for i in 0..frames {
        tx.chain(&[(&frame(60, i as u8), 60, false)]);
    }
    let (mut net, wire, _) = active_net(&mem, rx.queue(), tx.queue(), MRG);

    net.process_queue(TX).unwrap();
    assert_eq!(wire.0.lock().unwrap().from_guest.len(), WORK_BUDGET);
    assert!(net.take_unfinished().contains(TX));
    net.process_queue(TX).unwrap();
    assert_eq!(wire.0.lock().unwrap().from_guest.len(), frames);
    assert!(net.take_unfinished().is_empty());
}

fn bw_limit(rate: u64) -> crate::rate_limiter::RateLimitConfig {
    crate::rate_limiter::RateLimitConfig {
        bandwidth: Some(crate::rate_limiter::BucketConfig { rate, burst: 0 }),
        ops: None,
    }
}

#[test]
fn rx_over_its_limit_leaves_frames_in_the_backend_until_the_timer_fires() {
    let mem = guest_memory();
    let mut rx = Driver::new(&mem, 16);
    let tx = Driver::new_at(&mem, 16, 0x8000, 0xa_0000);
    for _ in 0..4 {
        rx.chain(&[(&[], 2048, true)]);
    }
    let clock = crate::virtio::throttle::ManualClock::new();
    let wire = FakeBackend::default();
    let mut net = Net::new(Box::new(wire.clone()), [2, 0, 0, 0, 0, 1]);
    net.set_clock(clock.clock());
    let mut net = net.with_rate_limits(bw_limit(1000), Default::default());
    for seed in 0..3 {
        wire.0.lock().unwrap().to_guest.push_back(frame(1000, seed));
    }
    let mut ctx = activate_ctx(&mem, vec![rx.queue(), tx.queue()], CountingLine::default());
    ctx.acked_features = MRG;
    net.activate(ctx).unwrap();

    // One second's worth went in; the rest stays in the backend, none is dropped.
    assert_eq!(rx.used().len(), 1);
    assert_eq!(wire.0.lock().unwrap().to_guest.len(), 2);
    assert!(net.throttle.as_ref().unwrap().is_parked(RX));
    net.process_backend().unwrap();
    assert_eq!(
        rx.used().len(),
        1,
        "a backend event while parked reads nothing"
    );

    clock.advance(std::time::Duration::from_secs(1));
    net.timer_expired();
    assert!(net.take_unfinished().contains(RX));
    net.process_queue(RX).unwrap();
    assert_eq!(rx.used().len(), 2);
    assert_eq!(wire.0.lock().unwrap().to_guest.len(), 1);
    assert_eq!(net.counters().snapshot().errors, 0);
}

#[test]
fn tx_over_its_limit_keeps_the_guests_frames_on_the_ring() {
    let mem = guest_memory();
    let rx = Driver::new(&mem, 16);
    let mut tx = Driver::new_at(&mem, 16, 0x8000, 0xa_0000);
    for seed in 0..3 {
        tx.chain(&[(&frame(500, seed), 500, false)]);
    }
    let clock = crate::virtio::throttle::ManualClock::new();
    let wire = FakeBackend::default();
    let mut net = Net::new(Box::new(wire.clone()), [2, 0, 0, 0, 0, 1]);
    net.set_clock(clock.clock());
    let mut net = net.with_rate_limits(Default::default(), bw_limit(1000));
    let mut ctx = activate_ctx(&mem, vec![rx.queue(), tx.queue()], CountingLine::default());
    ctx.acked_features = MRG;
    net.activate(ctx).unwrap();

    net.process_queue(TX).unwrap();
    assert_eq!(wire.0.lock().unwrap().from_guest.len(), 2);
    assert!(net.throttle.as_ref().unwrap().is_armed());
    clock.advance(std::time::Duration::from_millis(500));
    net.timer_expired();
    net.process_queue(TX).unwrap();
    assert_eq!(wire.0.lock().unwrap().from_guest.len(), 3);
    assert_eq!(tx.used().len(), 3);
}
