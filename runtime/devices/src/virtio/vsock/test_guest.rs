//! The guest side of the vsock tests: a driver for the three split queues in plain memory
//! (descriptors recycled, rings laid out by hand), a temporary directory for the Unix
//! sockets, and a pump that runs the device's event loop until a condition holds.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{HashMap, VecDeque};
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use super::packet::{op, Header, HDR_LEN, HOST_CID, TYPE_STREAM};
use super::Vsock;
use crate::virtio::test_utils::{activate_ctx, CountingLine, NEXT, WRITE};
use crate::virtio::VirtioDevice;
use crate::GuestMemoryMmap;

pub(super) const CID: u64 = 3;
pub(super) const QSIZE: u16 = 32;
pub(super) const RX_BUF: u32 = 4096 + HDR_LEN as u32;
pub(super) const TX_SLOT: u64 = 0x1_1000;

/// vsock tests create and count sockets; they run one at a time so the fd census is exact.
pub(super) static SERIAL: Mutex<()> = Mutex::new(());

pub(super) fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

pub(super) struct TempDir(pub(super) PathBuf);

impl TempDir {
    pub(super) fn new() -> Self {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let dir = std::env::temp_dir().join(format!("husk-vsock-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
    pub(super) fn uds(&self) -> PathBuf {
        self.0.join("v.sock")
    }
    pub(super) fn listen(&self, port: u32) -> UnixListener {
        UnixListener::bind(self.0.join(format!("v.sock_{port}"))).unwrap()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// One split queue of the guest driver, recycling its descriptors: rings laid out from
/// `ring` (desc table, avail ring, used ring, each 4 KiB apart; virtio-queue's mock lays the
/// used ring over the avail ring's tail for queues this long), one buffer slot of `slot` bytes
/// per descriptor from `bufs` up.
pub(super) struct GuestQueue<'a> {
    mem: &'a GuestMemoryMmap,
    ring: u64,
    bufs: u64,
    slot: u64,
    free: Vec<u16>,
    chains: HashMap<u16, Vec<(u16, u32)>>,
    avail_idx: u16,
    seen: u16,
}

impl<'a> GuestQueue<'a> {
    pub(super) fn new(mem: &'a GuestMemoryMmap, ring: u64, bufs: u64, slot: u64) -> Self {
        for off in (0..0x3000).step_by(8) {
            mem.write_obj(0u64, GuestAddress(ring + off)).unwrap();
        }
        Self {
            mem,
            ring,
            bufs,
            slot,
            free: (0..QSIZE).rev().collect(),
            chains: HashMap::new(),
            avail_idx: 0,
            seen: 0,
        }
    }

    pub(super) fn avail(&self) -> u64 {
        self.ring + 0x1000
    }

    pub(super) fn used(&self) -> u64 {
        self.ring + 0x2000
    }

    pub(super) fn queue(&self) -> Queue {
        let mut q = Queue::new(QSIZE).unwrap();
        q.set_size(QSIZE);
        let split = |a: u64| (Some(a as u32), Some((a >> 32) as u32));
        let (lo, hi) = split(self.ring);
        q.set_desc_table_address(lo, hi);
        let (lo, hi) = split(self.avail());
        q.set_avail_ring_address(lo, hi);
        let (lo, hi) = split(self.used());
        q.set_used_ring_address(lo, hi);
        q.set_ready(true);
        q
    }

    pub(super) fn addr(&self, desc: u16) -> u64 {
        self.bufs + u64::from(desc) * self.slot
    }

    /// Makes a chain available: each part is (data, len, device-writable), one slot each;
    /// `addrs` replaces parts' buffer addresses (hostile drivers).
    pub(super) fn push_with(&mut self, parts: &[(&[u8], u32, bool)], addrs: &[Option<u64>]) -> u16 {
        let descs: Vec<u16> = (0..parts.len()).map(|_| self.free.pop().unwrap()).collect();
        for (i, &(data, len, writable)) in parts.iter().enumerate() {
            let d = descs[i];
            let addr = addrs
                .get(i)
                .copied()
                .flatten()
                .unwrap_or_else(|| self.addr(d));
            if !data.is_empty() {
                self.mem.write_slice(data, GuestAddress(addr)).unwrap();
            }
            let last = i + 1 == parts.len();
            let flags = if last { 0 } else { NEXT } | if writable { WRITE } else { 0 };
            let next = if last { 0 } else { descs[i + 1] };
            let at = self.ring + 16 * u64::from(d);
            self.mem.write_obj(addr.to_le(), GuestAddress(at)).unwrap();
            self.mem
                .write_obj(len.to_le(), GuestAddress(at + 8))
                .unwrap();
            self.mem
                .write_obj(flags.to_le(), GuestAddress(at + 12))
                .unwrap();
            self.mem
                .write_obj(next.to_le(), GuestAddress(at + 14))
                .unwrap();
        }
        let head = descs[0];
        let lens = parts.iter().map(|p| p.1);
        self.chains
            .insert(head, descs.iter().copied().zip(lens).collect());
        let slot = self.avail() + 4 + 2 * u64::from(self.avail_idx % QSIZE);
        self.mem
            .write_obj(head.to_le(), GuestAddress(slot))
            .unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        let idx = GuestAddress(self.avail() + 2);
        self.mem.write_obj(self.avail_idx.to_le(), idx).unwrap();
        head
    }

    pub(super) fn push(&mut self, parts: &[(&[u8], u32, bool)]) -> u16 {
        self.push_with(parts, &[])
    }

    /// Chains the device returned since the last call, as the bytes it wrote (in chain
    /// order); their descriptors are free again.
    pub(super) fn take_used(&mut self) -> Vec<Vec<u8>> {
        let idx: u16 = self.mem.read_obj(GuestAddress(self.used() + 2)).unwrap();
        let mut out = Vec::new();
        while self.seen != u16::from_le(idx) {
            let elem = self.used() + 4 + 8 * u64::from(self.seen % QSIZE);
            let id: u32 = self.mem.read_obj(GuestAddress(elem)).unwrap();
            let len: u32 = self.mem.read_obj(GuestAddress(elem + 4)).unwrap();
            self.seen = self.seen.wrapping_add(1);
            let descs = self.chains.remove(&(u32::from_le(id) as u16)).unwrap();
            let mut left = u32::from_le(len) as usize;
            let mut bytes = Vec::new();
            for &(d, dlen) in &descs {
                let n = left.min(dlen as usize);
                let mut buf = vec![0; n];
                self.mem
                    .read_slice(&mut buf, GuestAddress(self.addr(d)))
                    .unwrap();
                bytes.extend(buf);
                left -= n;
                self.free.push(d);
            }
            out.push(bytes);
        }
        out
    }
}

/// The guest side: the three queues, packets received, and rx buffers kept posted.
pub(super) struct Guest<'a> {
    pub(super) rx: GuestQueue<'a>,
    pub(super) tx: GuestQueue<'a>,
    pub(super) inbox: VecDeque<(Header, Vec<u8>)>,
    /// rx buffers posted at a time (fewer models a slow guest).
    pub(super) rx_target: usize,
}

pub(super) fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x80_0000)]).unwrap()
}

impl<'a> Guest<'a> {
    pub(super) fn new(mem: &'a GuestMemoryMmap) -> Self {
        Self {
            rx: GuestQueue::new(mem, 0x1000, 0x10_0000, 0x2000),
            tx: GuestQueue::new(mem, 0x4000, 0x20_0000, TX_SLOT),
            inbox: VecDeque::new(),
            rx_target: 8,
        }
    }

    pub(super) fn activate(&mut self, dev: &mut Vsock, mem: &GuestMemoryMmap) {
        let event = GuestQueue::new(mem, 0x7000, 0x70_0000, 0x100);
        let queues = vec![self.rx.queue(), self.tx.queue(), event.queue()];
        dev.activate(activate_ctx(mem, queues, CountingLine::default()))
            .unwrap();
        self.refill(dev);
    }

    /// Collects rx packets and posts buffers back up to `rx_target`.
    pub(super) fn refill(&mut self, dev: &mut Vsock) {
        self.collect();
        let posted = self.rx.chains.len();
        if posted < self.rx_target {
            for _ in posted..self.rx_target {
                self.rx.push(&[(&[], RX_BUF, true)]);
            }
            dev.process_queue(0).unwrap();
            self.collect();
        }
    }

    pub(super) fn collect(&mut self) {
        for bytes in self.rx.take_used() {
            assert!(
                bytes.len() >= HDR_LEN,
                "rx packet without a header: {bytes:?}"
            );
            let hdr = Header::from_bytes(bytes[..HDR_LEN].try_into().unwrap());
            assert_eq!(
                hdr.len as usize,
                bytes.len() - HDR_LEN,
                "len matches the used length"
            );
            assert_eq!(
                (hdr.src_cid, hdr.dst_cid, hdr.type_),
                (HOST_CID, CID, TYPE_STREAM)
            );
            self.inbox.push_back((hdr, bytes[HDR_LEN..].to_vec()));
        }
    }

    /// Sends a raw tx chain and lets the device handle it.
    pub(super) fn send_raw(&mut self, dev: &mut Vsock, parts: &[(&[u8], u32, bool)]) {
        self.tx.push(parts);
        dev.process_queue(1).unwrap();
        assert_eq!(self.tx.take_used().len(), 1, "the tx chain is returned");
        self.refill(dev);
    }

    pub(super) fn send(&mut self, dev: &mut Vsock, hdr: Header, payload: &[u8]) {
        let mut hdr = hdr;
        hdr.len = payload.len() as u32;
        let mut bytes = hdr.to_bytes().to_vec();
        bytes.extend_from_slice(payload);
        self.send_raw(dev, &[(&bytes, bytes.len() as u32, false)]);
    }

    /// Runs the device's event loop until `done` holds (bounded: a test fails, never hangs).
    pub(super) fn pump_until(&mut self, dev: &mut Vsock, mut done: impl FnMut(&mut Self) -> bool) {
        for _ in 0..2000 {
            dev.process_backend().unwrap();
            self.refill(dev);
            if done(self) {
                return;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        panic!("condition not reached; inbox: {:?}", self.inbox);
    }

    /// Waits for the next packet with operation `op` and takes it (and what came before).
    pub(super) fn expect(&mut self, dev: &mut Vsock, op: u16) -> Header {
        self.pump_until(dev, |g| g.inbox.iter().any(|(h, _)| h.op == op));
        loop {
            let (h, _) = self.inbox.pop_front().unwrap();
            if h.op == op {
                return h;
            }
        }
    }

    /// Takes RW payload for `guest_port` until `n` bytes have arrived.
    pub(super) fn read_data(&mut self, dev: &mut Vsock, guest_port: u32, n: usize) -> Vec<u8> {
        let mut data = Vec::new();
        self.pump_until(dev, |g| {
            g.inbox.retain(|(h, p)| {
                let take = h.op == op::RW && h.dst_port == guest_port;
                if take {
                    data.extend_from_slice(p);
                }
                !take
            });
            data.len() >= n
        });
        data
    }
}

pub(super) fn hdr(op: u16, guest_port: u32, host_port: u32) -> Header {
    Header {
        src_cid: CID,
        dst_cid: HOST_CID,
        src_port: guest_port,
        dst_port: host_port,
        type_: TYPE_STREAM,
        op,
        buf_alloc: 256 * 1024,
        ..Header::default()
    }
}

pub(super) fn client(dir: &TempDir) -> UnixStream {
    let c = UnixStream::connect(dir.uds()).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    c
}

pub(super) fn accept(l: &UnixListener) -> UnixStream {
    let (s, _) = l.accept().unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s
}

/// True when the peer closed: a read sees EOF (or a reset).
pub(super) fn closed(s: &mut UnixStream) -> bool {
    let mut b = [0u8; 64];
    match s.read(&mut b) {
        Ok(0) => true,
        Err(e) => e.kind() == ErrorKind::ConnectionReset,
        Ok(_) => false,
    }
}

pub(super) fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n).map(|i| (i % 251) as u8 ^ seed).collect()
}

/// Host client connects to guest port `port`; the guest accepts. Returns the client and the
/// device's local port.
pub(super) fn host_connect(
    dev: &mut Vsock,
    g: &mut Guest<'_>,
    dir: &TempDir,
    port: u32,
) -> (UnixStream, u32) {
    let mut c = client(dir);
    c.write_all(format!("CONNECT {port}\n").as_bytes()).unwrap();
    let req = g.expect(dev, op::REQUEST);
    assert_eq!(req.dst_port, port);
    g.send(dev, hdr(op::RESPONSE, port, req.src_port), &[]);
    let mut line = String::new();
    BufReader::new(&mut c).read_line(&mut line).unwrap();
    assert_eq!(line, format!("OK {}\n", req.src_port));
    (c, req.src_port)
}

pub(super) fn new_device(dir: &TempDir) -> Vsock {
    Vsock::new(CID, &dir.uds()).unwrap()
}
