//! virtio-vsock driven through its three queues as a guest driver would, against real Unix
//! sockets in a temporary directory: both connection directions, credit, shutdown, hostile
//! packets, fd cleanup and reset. No KVM.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Read, Write};

use super::connection::CONN_BUF_SIZE;
use super::packet::{op, shutdown, Header, HDR_LEN};
use super::test_guest::*;
use super::*;

#[test]
fn device_identity_and_construction_checks() {
    let _s = serial();
    let dir = TempDir::new();
    let dev = new_device(&dir);
    assert_eq!(dev.device_type(), 19);
    assert_eq!(dev.queue_max_sizes().len(), 3);
    assert_ne!(dev.offered_features() & features::VERSION_1, 0);
    let mut cid = [0u8; 8];
    dev.read_config(0, &mut cid);
    assert_eq!(u64::from_le_bytes(cid), CID);
    assert!(dev.backend_fd().is_some());
    assert!(matches!(
        Vsock::new(2, &dir.0.join("other")),
        Err(VsockError::ReservedCid(2))
    ));
    assert!(
        Vsock::new(CID, &dir.uds()).is_err(),
        "a path in use is refused"
    );
    drop(dev);
    assert!(!dir.uds().exists(), "the socket file is removed on drop");
}

#[test]
fn host_initiated_connection_carries_data_both_ways() {
    let _s = serial();
    let (dir, mem) = (TempDir::new(), memory());
    let mut dev = new_device(&dir);
    let mut g = Guest::new(&mem);
    g.activate(&mut dev, &mem);

    let mut c = client(&dir);
    c.write_all(b"CONNECT 52\n").unwrap();
    let req = g.expect(&mut dev, op::REQUEST);
    assert_eq!(
        (req.dst_port, req.len, req.buf_alloc),
        (52, 0, CONN_BUF_SIZE)
    );
    let local = req.src_port;
    g.send(&mut dev, hdr(op::RESPONSE, 52, local), &[]);
    let mut reader = BufReader::new(c.try_clone().unwrap());
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    assert_eq!(line, format!("OK {local}\n"));

    let to_guest = pattern(10_000, 1);
    c.write_all(&to_guest).unwrap();
    assert_eq!(g.read_data(&mut dev, 52, to_guest.len()), to_guest);
    let to_host = pattern(3000, 2);
    g.send(&mut dev, hdr(op::RW, 52, local), &to_host);
    let mut got = vec![0u8; to_host.len()];
    reader.read_exact(&mut got).unwrap();
    assert_eq!(got, to_host);

    // The host client closes: the guest hears SHUTDOWN of both directions, the device
    // forgets the connection, and the guest's answering RST is ignored.
    drop((c, reader));
    let sd = g.expect(&mut dev, op::SHUTDOWN);
    assert_eq!(sd.flags, shutdown::BOTH);
    assert_eq!(dev.connection_count(), 0);
    g.send(&mut dev, hdr(op::RST, 52, local), &[]);
    assert!(g.inbox.is_empty());
    let c = dev.counters().snapshot();
    assert_eq!(c.errors, 0);
    assert!(c.bytes_written >= 10_000 && c.bytes_read >= 3000, "{c:?}");
}

#[test]
fn guest_initiated_connection_reaches_the_port_socket() {
    let _s = serial();
    let (dir, mem) = (TempDir::new(), memory());
    let mut dev = new_device(&dir);
    let listener = dir.listen(1234);
    let mut g = Guest::new(&mem);
    g.activate(&mut dev, &mem);

    g.send(&mut dev, hdr(op::REQUEST, 5000, 1234), &[]);
    let resp = g.expect(&mut dev, op::RESPONSE);
    assert_eq!((resp.src_port, resp.dst_port), (1234, 5000));
    let mut host = accept(&listener);

    let to_host = pattern(70_000, 3);
    for chunk in to_host.chunks(20_000) {
        g.send(&mut dev, hdr(op::RW, 5000, 1234), chunk);
    }
    let mut got = vec![0u8; to_host.len()];
    host.read_exact(&mut got).unwrap();
    assert_eq!(got, to_host);
    let to_guest = pattern(5000, 4);
    host.write_all(&to_guest).unwrap();
    assert_eq!(g.read_data(&mut dev, 5000, to_guest.len()), to_guest);

    // Host half-closes: the guest hears SHUTDOWN(SEND) only and may still send.
    host.shutdown(std::net::Shutdown::Write).unwrap();
    assert_eq!(g.expect(&mut dev, op::SHUTDOWN).flags, shutdown::SEND);
    g.send(&mut dev, hdr(op::RW, 5000, 1234), b"last words");
    let mut buf = [0u8; 10];
    host.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"last words");
    // The guest closes: the device answers RST and closes the host socket.
    let mut sd = hdr(op::SHUTDOWN, 5000, 1234);
    sd.flags = shutdown::BOTH;
    g.send(&mut dev, sd, &[]);
    let rst = g.expect(&mut dev, op::RST);
    assert_eq!((rst.src_port, rst.dst_port), (1234, 5000));
    assert!(closed(&mut host));
    assert_eq!(dev.connection_count(), 0);
    assert_eq!(dev.counters().snapshot().errors, 0);
}

#[test]
fn guest_connect_to_a_port_nobody_listens_on_is_reset() {
    let _s = serial();
    let (dir, mem) = (TempDir::new(), memory());
    let mut dev = new_device(&dir);
    let mut g = Guest::new(&mem);
    g.activate(&mut dev, &mem);

    g.send(&mut dev, hdr(op::REQUEST, 7000, 9999), &[]);

    let rst = g.expect(&mut dev, op::RST);
    assert_eq!((rst.src_port, rst.dst_port), (9999, 7000));
    assert_eq!(dev.connection_count(), 0);
}

#[test]
fn host_data_never_exceeds_the_guest_credit() {
    let _s = serial();
    let (dir, mem) = (TempDir::new(), memory());
    let mut dev = new_device(&dir);
    let listener = dir.listen(80);
    let mut g = Guest::new(&mem);
    g.activate(&mut dev, &mem);
    let mut req = hdr(op::REQUEST, 4000, 80);
    req.buf_alloc = 100;
    g.send(&mut dev, req, &[]);
    g.expect(&mut dev, op::RESPONSE);
    let mut host = accept(&listener);
    let data = pattern(1000, 5);
    host.write_all(&data).unwrap();

    let mut received = Vec::new();
    let mut fwd = 0usize;
    while received.len() < data.len() {
        // The device sends what fits, then asks for credit instead of sending more.
        g.pump_until(&mut dev, |g| {
            g.inbox.iter().any(|(h, _)| h.op == op::CREDIT_REQUEST)
        });
        for (h, p) in g.inbox.drain(..) {
            if h.op == op::RW {
                received.extend(p);
            }
        }
        assert!(
            received.len() <= fwd + 100,
            "{} bytes sent with {fwd} consumed of a 100-byte buffer",
            received.len()
        );
        fwd = received.len();
        let mut up = hdr(op::CREDIT_UPDATE, 4000, 80);
        up.buf_alloc = 100;
        up.fwd_cnt = fwd as u32;
        g.send(&mut dev, up, &[]);
    }
    assert_eq!(received, data);
}

/// Host-bound data waits in a bounded buffer while the host does not read; the guest that
/// keeps to its credit is never reset, and gets its credit back (CREDIT_UPDATE) once the host
/// drains the socket. A guest that ignores its credit is reset.
#[test]
fn guest_data_is_held_within_credit_and_credit_returns() {
    let _s = serial();
    let (dir, mem) = (TempDir::new(), memory());
    let mut dev = new_device(&dir);
    let listener = dir.listen(81);
    let mut g = Guest::new(&mem);
    g.activate(&mut dev, &mem);
    g.send(&mut dev, hdr(op::REQUEST, 4001, 81), &[]);
    let resp = g.expect(&mut dev, op::RESPONSE);
    let mut host = accept(&listener);

    // Send as long as the device's advertised credit allows; the host reads nothing.
    let (mut sent, mut fwd, mut buf_alloc) = (0usize, resp.fwd_cnt, resp.buf_alloc);
    let mut all = Vec::new();
    loop {
        let free = buf_alloc as usize - (sent - fwd as usize);
        if free == 0 {
            break;
        }
        let chunk = pattern(free.min(32 * 1024), sent as u8);
        g.send(&mut dev, hdr(op::RW, 4001, 81), &chunk);
        sent += chunk.len();
        all.extend(chunk);
        for (h, _) in g.inbox.drain(..) {
            assert_ne!(h.op, op::RST, "a guest within its credit is never reset");
            fwd = h.fwd_cnt;
            buf_alloc = h.buf_alloc;
        }
        assert!(
            sent < 4 << 20,
            "credit never ran out: the buffer is not bounded"
        );
    }
    assert_eq!(dev.counters().snapshot().errors, 0);

    // The host drains everything; the device announces the forwarded bytes.
    let mut got = vec![0u8; sent];
    let mut done = 0;
    while done < sent {
        done += host.read(&mut got[done..]).unwrap();
        dev.process_backend().unwrap();
    }
    assert_eq!(got, all);
    g.pump_until(&mut dev, |g| {
        g.inbox
            .iter()
            .any(|(h, _)| h.op == op::CREDIT_UPDATE && h.fwd_cnt as usize == sent)
    });

    // Now ignore credit while the host stops reading again: the device resets rather than
    // buffer without bound.
    let junk = vec![0u8; 64 * 1024];
    let mut reset = false;
    for _ in 0..64 {
        g.send(&mut dev, hdr(op::RW, 4001, 81), &junk);
        if g.inbox.iter().any(|(h, _)| h.op == op::RST) {
            reset = true;
            break;
        }
    }
    assert!(reset, "a guest overrunning its credit is reset");
    assert_eq!(dev.connection_count(), 0);
    assert!(dev.counters().snapshot().errors >= 1);
}

#[test]
fn hostile_tx_packets_are_dropped_counted_and_reset() {
    let _s = serial();
    let (dir, mem) = (TempDir::new(), memory());
    let mut dev = new_device(&dir);
    let listener = dir.listen(1234);
    listener.set_nonblocking(true).unwrap();
    let mut g = Guest::new(&mem);
    g.activate(&mut dev, &mem);
    let rst_for = |g: &mut Guest<'_>, guest_port: u32, host_port: u32| {
        let n = g.inbox.len();
        let found = g
            .inbox
            .drain(..)
            .any(|(h, _)| h.op == op::RST && h.dst_port == guest_port && h.src_port == host_port);
        found && n == 1
    };
    let mut errors = 0;
    let mut check = |dev: &Vsock, what: &str| {
        errors += 1;
        assert_eq!(
            dev.counters().snapshot().errors,
            errors,
            "{what} is counted"
        );
    };

    // Short header: nothing names a connection, nothing is answered.
    g.send_raw(&mut dev, &[(&[1u8; 20], 20, false)]);
    check(&dev, "short header");
    assert!(g.inbox.is_empty());
    // len beyond the buffer, wrong type, unknown ops, huge len, payload on a REQUEST.
    let mut h = hdr(op::RW, 10, 1234);
    h.len = 100;
    let bytes = [&h.to_bytes()[..], &[0u8; 10]].concat();
    g.send_raw(&mut dev, &[(&bytes, bytes.len() as u32, false)]);
    check(&dev, "len beyond the chain");
    assert!(rst_for(&mut g, 10, 1234));
    for (field, value) in [("type", 2u32), ("op", 0), ("op", 99), ("len", u32::MAX)] {
        let mut h = hdr(op::REQUEST, 11, 1234);
        match field {
            "type" => h.type_ = value as u16,
            "op" => h.op = value as u16,
            _ => h.len = value,
        }
        g.send_raw(&mut dev, &[(&h.to_bytes(), HDR_LEN as u32, false)]);
        check(&dev, field);
        assert!(
            rst_for(&mut g, 11, 1234),
            "{field}={value} is answered with RST"
        );
    }
    g.send(&mut dev, hdr(op::REQUEST, 12, 1234), b"payload");
    check(&dev, "payload on REQUEST");
    assert!(rst_for(&mut g, 12, 1234));
    // Spoofed source CID: dropped unanswered, and no connection is attempted.
    let mut spoof = hdr(op::REQUEST, 13, 1234);
    spoof.src_cid = 7;
    g.send(&mut dev, spoof, &[]);
    check(&dev, "spoofed CID");
    assert!(g.inbox.is_empty());
    assert!(
        listener.accept().is_err(),
        "no connection for a spoofed packet"
    );
    // A destination other than the host.
    let mut other = hdr(op::REQUEST, 14, 1234);
    other.dst_cid = 5;
    g.send(&mut dev, other, &[]);
    check(&dev, "guest-to-guest");
    assert!(rst_for(&mut g, 14, 1234));
    // Hostile descriptors: device-writable, outside guest memory, zero length.
    g.send_raw(&mut dev, &[(&[], 64, true)]);
    check(&dev, "writable tx buffer");
    g.tx.push_with(&[(&[], 64, false)], &[Some(u64::MAX - 8)]);
    dev.process_queue(1).unwrap();
    assert_eq!(g.tx.take_used().len(), 1);
    check(&dev, "buffer outside memory");
    g.send_raw(&mut dev, &[(&[], 0, false)]);
    check(&dev, "zero-length buffer");
    // Packets for connections that do not exist: RST, except for an RST.
    g.send(&mut dev, hdr(op::RW, 15, 1234), b"x");
    assert!(rst_for(&mut g, 15, 1234));
    g.send(&mut dev, hdr(op::RST, 15, 1234), &[]);
    assert!(g.inbox.is_empty());

    // A malformed packet naming a live connection resets it, both ways.
    g.send(&mut dev, hdr(op::REQUEST, 16, 1234), &[]);
    g.expect(&mut dev, op::RESPONSE);
    listener.set_nonblocking(false).unwrap();
    let mut host = accept(&listener);
    let mut h = hdr(op::RW, 16, 1234);
    h.len = 5000;
    g.send_raw(&mut dev, &[(&h.to_bytes(), HDR_LEN as u32, false)]);
    check(&dev, "truncated RW on a live connection");
    assert!(rst_for(&mut g, 16, 1234));
    assert!(closed(&mut host));
    assert_eq!(dev.connection_count(), 0);

    // Still serving well-formed packets.
    g.send(&mut dev, hdr(op::REQUEST, 17, 1234), &[]);
    g.expect(&mut dev, op::RESPONSE);
    assert_eq!(dev.connection_count(), 1);
}

#[test]
fn split_header_and_payload_descriptors_are_accepted() {
    let _s = serial();
    let (dir, mem) = (TempDir::new(), memory());
    let mut dev = new_device(&dir);
    let listener = dir.listen(90);
    let mut g = Guest::new(&mem);
    g.activate(&mut dev, &mem);
    g.send(&mut dev, hdr(op::REQUEST, 30, 90), &[]);
    g.expect(&mut dev, op::RESPONSE);
    let mut host = accept(&listener);
    let mut h = hdr(op::RW, 30, 90);
    h.len = 11;
    let bytes = [&h.to_bytes()[..], b"hello world"].concat();
    // Header split mid-field, payload in two more pieces.
    g.send_raw(
        &mut dev,
        &[
            (&bytes[..30], 30, false),
            (&bytes[30..50], 20, false),
            (&bytes[50..], 5, false),
        ],
    );
    let mut buf = [0u8; 11];
    host.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"hello world");
}

#[test]
fn host_clients_that_misbehave_or_are_refused_are_closed() {
    let _s = serial();
    let (dir, mem) = (TempDir::new(), memory());
    let mut dev = new_device(&dir);
    let mut g = Guest::new(&mem);
    g.activate(&mut dev, &mem);

    let mut bad = client(&dir);
    bad.write_all(b"HELLO 1\n").unwrap();
    let mut long = client(&dir);
    long.write_all(&[b'9'; 100]).unwrap();
    let quitter = client(&dir);
    drop(quitter);
    g.pump_until(&mut dev, |_| true);
    assert!(closed(&mut bad));
    assert!(closed(&mut long));
    assert_eq!(dev.pending_host_clients(), 0);

    // The guest refuses: the client is closed, without an OK line.
    let mut refused = client(&dir);
    refused.write_all(b"CONNECT 77\n").unwrap();
    let req = g.expect(&mut dev, op::REQUEST);
    g.send(&mut dev, hdr(op::RST, 77, req.src_port), &[]);
    assert!(closed(&mut refused));
    assert_eq!(dev.connection_count(), 0);

    // A client that goes away before the guest answers: the guest gets RST.
    let mut gone = client(&dir);
    gone.write_all(b"CONNECT 78\n").unwrap();
    let req = g.expect(&mut dev, op::REQUEST);
    drop(gone);
    let rst = g.expect(&mut dev, op::RST);
    assert_eq!((rst.src_port, rst.dst_port), (req.src_port, 78));
    assert_eq!(dev.connection_count(), 0);
}

/// Socket inodes this process has open.
fn open_sockets() -> HashSet<String> {
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .map(|l| l.to_string_lossy().into_owned())
        .filter(|l| l.starts_with("socket:"))
        .collect()
}

#[test]
fn closed_connections_release_their_sockets() {
    let _s = serial();
    let (dir, mem) = (TempDir::new(), memory());
    let mut dev = new_device(&dir);
    let listener = dir.listen(60);
    let mut g = Guest::new(&mem);
    g.activate(&mut dev, &mem);
    let before = open_sockets();

    // Ended every way there is: guest RST, guest full shutdown, host close, refused connect,
    // guest refusing a host client, a malformed packet.
    for (i, how) in ["rst", "shutdown", "host-close", "malformed"]
        .iter()
        .enumerate()
    {
        let port = 100 + i as u32;
        g.send(&mut dev, hdr(op::REQUEST, port, 60), &[]);
        g.expect(&mut dev, op::RESPONSE);
        let host = accept(&listener);
        match *how {
            "rst" => g.send(&mut dev, hdr(op::RST, port, 60), &[]),
            "shutdown" => {
                let mut sd = hdr(op::SHUTDOWN, port, 60);
                sd.flags = shutdown::BOTH;
                g.send(&mut dev, sd, &[]);
            }
            "host-close" => {
                drop(host);
                g.expect(&mut dev, op::SHUTDOWN);
                continue;
            }
            _ => g.send_raw(
                &mut dev,
                &[(&hdr(op::RW, port, 60).to_bytes()[..10], 10, false)],
            ),
        }
        if *how == "malformed" {
            // A short header names no connection: the guest then resets it properly.
            g.send(&mut dev, hdr(op::RST, port, 60), &[]);
        }
        drop(host);
    }
    g.send(&mut dev, hdr(op::REQUEST, 200, 61), &[]);
    let mut c = client(&dir);
    c.write_all(b"CONNECT 201\n").unwrap();
    let req = g.expect(&mut dev, op::REQUEST);
    g.send(&mut dev, hdr(op::RST, 201, req.src_port), &[]);
    assert!(closed(&mut c));
    drop(c);
    g.pump_until(&mut dev, |_| true);

    assert_eq!(dev.connection_count(), 0);
    let leaked: Vec<_> = open_sockets().difference(&before).cloned().collect();
    assert!(leaked.is_empty(), "sockets left open: {leaked:?}");
}

#[test]
fn reset_closes_every_connection_and_client() {
    let _s = serial();
    let (dir, mem) = (TempDir::new(), memory());
    let mut dev = new_device(&dir);
    let listener = dir.listen(70);
    let mut g = Guest::new(&mem);
    g.activate(&mut dev, &mem);
    let (mut a, _) = host_connect(&mut dev, &mut g, &dir, 1);
    let (mut b, _) = host_connect(&mut dev, &mut g, &dir, 2);
    g.send(&mut dev, hdr(op::REQUEST, 300, 70), &[]);
    g.expect(&mut dev, op::RESPONSE);
    let mut h = accept(&listener);
    let mut waiting = client(&dir);
    waiting.write_all(b"CONN").unwrap();
    g.pump_until(&mut dev, |_| true);
    assert_eq!((dev.connection_count(), dev.pending_host_clients()), (3, 1));

    dev.reset();

    assert_eq!((dev.connection_count(), dev.pending_host_clients()), (0, 0));
    for s in [&mut a, &mut b, &mut h, &mut waiting] {
        assert!(closed(s));
    }
    // Until the driver activates it again, host clients are turned away.
    let mut early = client(&dir);
    early.write_all(b"CONNECT 1\n").unwrap();
    dev.process_backend().unwrap();
    assert!(closed(&mut early));
    assert_eq!(dev.connection_count(), 0);
}

#[test]
fn rx_buffers_too_small_for_a_header_are_returned_and_counted() {
    let _s = serial();
    let (dir, mem) = (TempDir::new(), memory());
    let mut dev = new_device(&dir);
    let mut g = Guest::new(&mem);
    g.rx_target = 0;
    g.activate(&mut dev, &mem);
    g.rx.push(&[(&[], 20, true)]);
    g.rx.push(&[(&[], 64, false)]);
    let req = hdr(op::REQUEST, 1, 9).to_bytes(); // answered with RST
    g.tx.push(&[(&req, HDR_LEN as u32, false)]);

    dev.process_queue(1).unwrap();
    dev.process_queue(0).unwrap();

    let used = g.rx.take_used();
    assert_eq!(used.len(), 2);
    assert!(used.iter().all(Vec::is_empty));
    assert_eq!(dev.counters().snapshot().errors, 2);
    // The RST waits for a usable buffer.
    g.rx_target = 1;
    let rst = g.expect(&mut dev, op::RST);
    assert_eq!(rst.dst_port, 1);
}

/// Runs a loop like the VMM's event loop on `fd` (level-triggered) for `window`, calling
/// `serve` on each wake-up; returns how many wake-ups there were.
fn wakeups_over(fd: RawFd, window: std::time::Duration, mut serve: impl FnMut()) -> usize {
    use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
    let epoll = Epoll::new().unwrap();
    let event = EpollEvent::new(EventSet::IN, 0);
    epoll.ctl(ControlOperation::Add, fd, event).unwrap();
    let mut events = [EpollEvent::default(); 4];
    let deadline = std::time::Instant::now() + window;
    let mut wakeups = 0;
    while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
        let timeout = left.as_millis().clamp(1, 50) as i32;
        if epoll.wait(timeout, &mut events).unwrap() > 0 {
            wakeups += 1;
            serve();
        }
    }
    wakeups
}

const WINDOW: std::time::Duration = std::time::Duration::from_millis(200);

#[test]
fn a_client_of_a_device_the_driver_never_started_wakes_the_loop_once_not_forever() {
    use crate::virtio::mmio::MmioTransport;
    use crate::virtio::test_utils::CountingLine;
    use crate::virtio::VirtioInterrupt;
    let _s = serial();
    let (dir, mem) = (TempDir::new(), memory());
    let dev = new_device(&dir);
    let fd = dev.backend_fd().unwrap();
    let irq = std::sync::Arc::new(VirtioInterrupt::new(Box::new(CountingLine::default())));
    let mut transport = MmioTransport::new(Box::new(dev), mem, irq).unwrap();
    let mut c = client(&dir);
    c.write_all(b"CONNECT 1024\n").unwrap();

    let wakeups = wakeups_over(fd, WINDOW, || transport.process_backend());

    assert!(wakeups <= 2, "{wakeups} wake-ups: the loop spins");
    assert!(closed(&mut c), "the client is turned away at once");
}

#[test]
fn a_client_after_a_device_reset_wakes_the_loop_once_not_forever() {
    let _s = serial();
    let (dir, mem) = (TempDir::new(), memory());
    let mut dev = new_device(&dir);
    let mut g = Guest::new(&mem);
    g.activate(&mut dev, &mem);
    dev.reset();
    let fd = dev.backend_fd().unwrap();
    let mut c = client(&dir);

    let wakeups = wakeups_over(fd, WINDOW, || dev.drain_backend());

    assert!(wakeups <= 2, "{wakeups} wake-ups: the loop spins");
    assert!(closed(&mut c));
}

#[test]
fn a_flood_of_clients_against_an_inactive_device_is_turned_away_in_bounded_batches() {
    let _s = serial();
    let dir = TempDir::new();
    let mut dev = new_device(&dir);
    let fd = dev.backend_fd().unwrap();
    let mut clients: Vec<std::os::unix::net::UnixStream> = (0..100).map(|_| client(&dir)).collect();

    let wakeups = wakeups_over(fd, WINDOW, || dev.drain_backend());

    assert!((1..=4).contains(&wakeups), "{wakeups} wake-ups");
    assert!(clients.iter_mut().all(closed));
}

#[test]
fn host_data_waiting_for_rx_buffers_does_not_wake_the_loop_again() {
    let _s = serial();
    let (dir, mem) = (TempDir::new(), memory());
    let mut dev = new_device(&dir);
    let mut g = Guest::new(&mem);
    g.activate(&mut dev, &mem);
    let (mut c, _) = host_connect(&mut dev, &mut g, &dir, 52);
    g.rx_target = 0; // the guest stops posting rx buffers
    c.write_all(&pattern(64 * 1024, 3)).unwrap();
    let fd = dev.backend_fd().unwrap();

    let wakeups = wakeups_over(fd, WINDOW, || dev.process_backend().unwrap());

    assert!(wakeups <= 2, "{wakeups} wake-ups: the loop spins");
    assert_eq!(dev.connection_count(), 1);
}

#[test]
fn a_restored_guest_answering_with_its_old_cid_gets_the_client_closed_at_once() {
    let _s = serial();
    let (dir, mem) = (TempDir::new(), memory());
    let mut dev = new_device(&dir);
    let mut g = Guest::new(&mem);
    g.activate(&mut dev, &mem);
    dev.restored();
    g.inbox.clear();

    // The driver has not handled TRANSPORT_RESET: it answers with the snapshot's CID.
    let mut c = client(&dir);
    c.write_all(b"CONNECT 52\n").unwrap();
    let req = g.expect(&mut dev, op::REQUEST);
    let old = Header {
        src_cid: CID + 1,
        ..hdr(op::RESPONSE, 52, req.src_port)
    };
    g.send(&mut dev, old, &[]);
    let rst = g.expect(&mut dev, op::RST);
    assert_eq!(rst.dst_port, 52);
    assert_eq!(dev.connection_count(), 0);
    let mut line = String::new();
    c.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    let n = BufReader::new(c).read_line(&mut line).unwrap();
    assert_eq!(
        (n, line.as_str()),
        (0, ""),
        "the client is closed, not answered"
    );

    // Once the guest speaks with its own CID, the old one is only dropped again.
    let mut c = client(&dir);
    c.write_all(b"CONNECT 53\n").unwrap();
    let req = g.expect(&mut dev, op::REQUEST);
    g.send(&mut dev, hdr(op::RESPONSE, 53, req.src_port), &[]);
    let mut reader = BufReader::new(c.try_clone().unwrap());
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    assert_eq!(line, format!("OK {}\n", req.src_port));
    let errors = dev.counters().snapshot().errors;
    g.send(
        &mut dev,
        Header {
            src_cid: CID + 1,
            ..hdr(op::RW, 53, req.src_port)
        },
        b"x",
    );
    assert_eq!(dev.counters().snapshot().errors, errors + 1);
    assert_eq!(
        dev.connection_count(),
        1,
        "the live connection is untouched"
    );
}
