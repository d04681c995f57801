//! A scripted vhost-user backend on a socket pair: what the frontend sends is recorded, what
//! it receives is chosen by the test (including replies a broken backend could send).

use std::mem::MaybeUninit;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::mpsc;
use std::thread;

use rustix::net::{
    recvmsg, socketpair, AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags,
    SocketFlags, SocketType,
};

use super::*;

/// One message as the backend received it.
#[derive(Debug)]
pub struct Received {
    pub request: u32,
    pub flags: u32,
    pub payload: Vec<u8>,
    pub fds: Vec<OwnedFd>,
}

/// What the backend answers to a message: raw bytes to write back (possibly nothing).
pub type Script = Box<dyn FnMut(&Received) -> Vec<u8> + Send>;

/// A proper reply to `request` carrying `payload`.
pub fn reply(request: u32, payload: &[u8]) -> Vec<u8> {
    let mut m = Vec::new();
    m.extend_from_slice(&request.to_le_bytes());
    m.extend_from_slice(&(VERSION | FLAG_REPLY).to_le_bytes());
    m.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    m.extend_from_slice(payload);
    m
}

/// A backend like virtiofsd: VERSION_1, indirect, event-idx, protocol features with REPLY_ACK
/// (and MQ, which the frontend must not take); acknowledges everything with status 0.
pub fn well_behaved(features: u64) -> Script {
    Box::new(move |m: &Received| match m.request {
        1 => reply(1, &features.to_le_bytes()),
        15 => reply(15, &(PROTOCOL_F_REPLY_ACK | 1).to_le_bytes()),
        11 => reply(11, &[m.payload[0], 0, 0, 0, 7, 0, 0, 0]),
        r if m.flags & FLAG_NEED_REPLY != 0 => reply(r, &0u64.to_le_bytes()),
        _ => Vec::new(),
    })
}

/// Starts a backend thread running `script`; returns the frontend's socket and the messages
/// the backend received (sent on as they arrive; the channel closes when the frontend does).
pub fn backend(mut script: Script) -> (OwnedFd, mpsc::Receiver<Received>) {
    let (ours, theirs) = socketpair(
        AddressFamily::UNIX,
        SocketType::STREAM,
        SocketFlags::CLOEXEC,
        None,
    )
    .unwrap();
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || loop {
        let mut header = [0u8; HEADER_LEN];
        let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(8))];
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let got = recvmsg(
            &theirs,
            &mut [io::IoSliceMut::new(&mut header)],
            &mut control,
            RecvFlags::WAITALL,
        );
        let Ok(msg) = got else { return };
        if msg.bytes < HEADER_LEN {
            return;
        }
        let mut fds = Vec::new();
        for c in control.drain() {
            if let RecvAncillaryMessage::ScmRights(r) = c {
                fds.extend(r);
            }
        }
        let word = |i: usize| u32::from_le_bytes(header[i..i + 4].try_into().unwrap());
        let mut payload = vec![0u8; word(8) as usize];
        if !payload.is_empty() && rustix::io::read(&theirs, &mut payload).is_err() {
            return;
        }
        let received = Received {
            request: word(0),
            flags: word(4),
            payload,
            fds,
        };
        let answer = script(&received);
        if tx.send(received).is_err() {
            return;
        }
        if !answer.is_empty() && rustix::io::write(theirs.as_fd(), &answer).is_err() {
            return;
        }
    });
    (ours, rx)
}

const FEATURES: u64 = crate::virtio::features::VERSION_1
    | F_PROTOCOL_FEATURES
    | crate::virtio::features::RING_INDIRECT_DESC;

#[test]
fn connecting_negotiates_reply_ack_only_and_takes_ownership() {
    let (sock, rx) = backend(well_behaved(FEATURES));
    let frontend = Frontend::connect(sock).unwrap();
    assert_eq!(frontend.backend_features(), FEATURES);
    let seen: Vec<Received> = rx.try_iter().collect();
    let requests: Vec<u32> = seen.iter().map(|m| m.request).collect();
    assert_eq!(requests, [1, 15, 16, 3]);
    assert_eq!(seen[2].payload, PROTOCOL_F_REPLY_ACK.to_le_bytes());
    assert!(
        seen[3].flags & FLAG_NEED_REPLY != 0,
        "SET_OWNER is acknowledged"
    );
    assert!(seen.iter().all(|m| m.flags & 0x3 == VERSION));
}

#[test]
fn a_backend_without_protocol_features_gets_no_acks_asked() {
    let (sock, rx) = backend(well_behaved(crate::virtio::features::VERSION_1));
    let mut frontend = Frontend::connect(sock).unwrap();
    frontend
        .set_features(crate::virtio::features::VERSION_1)
        .unwrap();
    // Nothing is acknowledged: wait for the backend to have read all three.
    let seen: Vec<Received> = (0..3)
        .filter_map(|_| rx.recv_timeout(std::time::Duration::from_secs(5)).ok())
        .collect();
    assert_eq!(
        seen.iter().map(|m| m.request).collect::<Vec<_>>(),
        [1, 3, 2]
    );
    assert!(seen.iter().all(|m| m.flags & FLAG_NEED_REPLY == 0));
    assert_eq!(
        seen[2].payload,
        crate::virtio::features::VERSION_1.to_le_bytes()
    );
}

#[test]
fn malformed_replies_are_errors_not_panics() {
    let cases: Vec<(&str, Script)> = vec![
        (
            "reply to another request",
            Box::new(|_: &Received| reply(2, &[0; 8])),
        ),
        (
            "not a reply",
            Box::new(|_: &Received| {
                let mut m = reply(1, &[0; 8]);
                m[4] = VERSION as u8;
                m
            }),
        ),
        (
            "payload too large",
            Box::new(|_: &Received| reply(1, &[0; 4096])),
        ),
        ("short u64", Box::new(|_: &Received| reply(1, &[0; 4]))),
        ("closed", Box::new(|_: &Received| vec![0xff; 3])),
    ];
    for (what, script) in cases {
        let (sock, _rx) = backend(script);
        let started = std::time::Instant::now();
        // "closed": three bytes then silence; the frontend waits at most its timeout.
        let timeout = std::time::Duration::from_secs(2);
        assert!(
            Frontend::connect_with_timeout(sock, timeout).is_err(),
            "{what}"
        );
        assert!(started.elapsed() < timeout * 2, "{what}");
    }
}

#[test]
fn a_backend_without_version_1_is_refused() {
    let (sock, _rx) = backend(well_behaved(F_PROTOCOL_FEATURES));
    assert!(matches!(
        Frontend::connect(sock),
        Err(VhostUserError::NoVersion1)
    ));
}

#[test]
fn a_refused_message_is_reported_with_its_status() {
    let (sock, _rx) = backend(Box::new(|m: &Received| match m.request {
        2 => reply(2, &1u64.to_le_bytes()),
        _ => (well_behaved(FEATURES))(m),
    }));
    let mut frontend = Frontend::connect(sock).unwrap();
    assert!(matches!(
        frontend.set_features(crate::virtio::features::VERSION_1),
        Err(VhostUserError::Refused(Request::SetFeatures, 1))
    ));
}
