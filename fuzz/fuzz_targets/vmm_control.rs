//! The VMM control socket: a byte stream from a client, cut into reads of sizes the input
//! picks (with would-block pauses), reassembled into frames by the server's frame reader,
//! decoded and answered against a stand-in VM. Nothing a local client sends may panic the VMM,
//! every answer must be a frame the client can read, and requests re-encode to themselves.

#![no_main]

use std::cell::Cell;
use std::io::{self, Read};
use std::time::Instant;

use husk_proto::frame;
use husk_proto::vmm::{Info, Snapshot, SnapshotDone, VmmRequest, VmmResponse};
use husk_vmm::api::frame_reader::{FrameReader, Progress};
use husk_vmm::api::{handle_request, state, ControlError, VmControl};
use husk_vmm::snapshot::SnapshotError;
use libfuzzer_sys::fuzz_target;

/// A VM that only keeps its state, with the rules of the real one.
#[derive(Default)]
struct StandIn {
    paused: Cell<bool>,
    stopping: Cell<bool>,
}

impl VmControl for StandIn {
    fn describe(&self) -> Info {
        Info {
            state: state(self.paused.get(), self.stopping.get()) as i32,
            vcpus: 1,
            memory_mib: 256,
            ..Default::default()
        }
    }
    fn pause(&self) -> Result<Info, ControlError> {
        if self.stopping.get() {
            return Err(ControlError::Stopping);
        }
        self.paused.set(true);
        Ok(self.describe())
    }
    fn resume(&self) -> Result<Info, ControlError> {
        if self.stopping.get() {
            return Err(ControlError::Stopping);
        }
        self.paused.set(false);
        Ok(self.describe())
    }
    fn stop(&self) -> Info {
        self.stopping.set(true);
        self.describe()
    }
    fn snapshot(&self, request: &Snapshot) -> Result<SnapshotDone, ControlError> {
        if !self.paused.get() {
            return Err(SnapshotError::NotPaused.into());
        }
        Ok(SnapshotDone {
            base_path: request.state_path.clone(),
            ..Default::default()
        })
    }
}

/// The client's bytes, delivered in pieces whose sizes come from `cuts`.
struct Client<'a> {
    bytes: &'a [u8],
    cuts: &'a [u8],
}

impl Read for Client<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let (&cut, rest) = self.cuts.split_first().unwrap_or((&255, &[]));
        self.cuts = rest;
        if cut == 0 {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let n = usize::from(cut).min(buf.len()).min(self.bytes.len());
        buf[..n].copy_from_slice(&self.bytes[..n]);
        self.bytes = &self.bytes[n..];
        Ok(n)
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&ncuts, data)) = data.split_first() else {
        return;
    };
    let (cuts, bytes) = data.split_at(usize::from(ncuts % 32).min(data.len()));
    let vm = StandIn::default();
    let mut client = Client { bytes, cuts };
    let mut reader = FrameReader::default();
    for _ in 0..1000 {
        let body = match reader.read_from(&mut client, Instant::now()) {
            Ok(Progress::Frame(body)) => body,
            Ok(Progress::Pending) => continue,
            Ok(Progress::Closed) | Err(_) => break,
        };
        assert!(body.len() <= frame::MAX_FRAME_LEN);
        let response = match frame::decode::<VmmRequest>(&body) {
            Ok(request) => {
                let again = frame::encode(&request).map(|wire| frame::decode(&wire[4..]));
                assert_eq!(again.ok().and_then(Result::ok).as_ref(), Some(&request));
                handle_request(&request, Ok(Vec::new()), &vm)
            }
            Err(e) => husk_vmm::api::error_response(format!("malformed request: {e}")),
        };
        // Every answer fits a frame and reads back as itself.
        let wire = frame::encode(&response).unwrap_or_else(|e| panic!("unsendable answer: {e}"));
        let back: Option<VmmResponse> = frame::read(&mut &wire[..]).ok().flatten();
        assert_eq!(back.as_ref(), Some(&response));
    }
});
