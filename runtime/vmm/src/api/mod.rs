//! The control socket (`--api-sock PATH`, protocol `husk.vmm.v1`, see proto/husk/vmm/v1/vmm.proto):
//! describe, pause, resume and stop one running VM, snapshot it, change its rate limits, fill
//! and empty its disk slots, set its balloon's target.
//!
//! - [`frame_reader`]: frames assembled from non-blocking reads;
//! - [`fd_reader`]: those reads made with recvmsg, keeping the one fd a request may carry;
//! - [`disk_slots`]: `attach_disk` and `detach_disk`;
//! - [`balloon`]: `set_balloon` and the balloon part of `describe`;
//! - [`socket`]: the listening socket (mode 0600, stale sockets replaced, removed at the end);
//! - [`server`]: the "vmm-api" thread that reads framed requests and writes responses;
//! - [`vm_handle`]: what a request does to the running VM;
//! - [`handle_request`] (here): a request against a [`VmControl`], as a response.

pub mod balloon;
pub mod disk_slots;
pub mod fd_reader;
pub mod frame_reader;
pub mod server;
pub mod socket;
pub mod vm_handle;

use std::os::fd::OwnedFd;

use husk_proto::vmm::{
    info, vmm_request, vmm_response, AttachDisk, DetachDisk, ErrorKind, Info, SetBalloon,
    SetRateLimits, Snapshot, SnapshotDone, VmmRequest, VmmResponse,
};

use disk_slots::DiskSlotError;

/// Why a request failed; the client gets [`error_chain`] of it as the response's message.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("the VM is stopping")]
    Stopping,
    #[error(transparent)]
    Pause(#[from] crate::pause::PauseError),
    #[error("snapshot needs a state_path and a mem_path")]
    SnapshotPaths,
    #[error(transparent)]
    Snapshot(#[from] crate::snapshot::SnapshotError),
    #[error("this VM cannot take snapshots")]
    NoSnapshots,
    #[error(transparent)]
    RateLimit(#[from] crate::devices::rate_limits::RateLimitError),
    #[error("this VM cannot change rate limits")]
    NoRateLimits,
    #[error(transparent)]
    DiskSlot(#[from] DiskSlotError),
    #[error("disk slot {0} holds a disk: a snapshot cannot record it; detach it first")]
    DiskAttached(u32),
    #[error("this VM has no disk slots")]
    NoDiskSlots,
    #[error("flushing {device} before the snapshot: {cause}")]
    DiskFlush {
        device: String,
        cause: std::io::Error,
    },
    #[error(transparent)]
    Balloon(#[from] balloon::BalloonError),
    #[error("a file descriptor came with a request that takes none")]
    UnexpectedFd,
    #[error("{0} file descriptors came with one request (at most 1); all were closed")]
    TooManyFds(usize),
    #[error(
        "empty or unknown request (describe, pause, resume, stop, snapshot, set_rate_limits, \
         attach_disk, detach_disk, set_balloon)"
    )]
    UnknownRequest,
}

impl ControlError {
    /// The kind a client acts on (see `ErrorKind` in the protocol).
    pub fn kind(&self) -> ErrorKind {
        use crate::devices::rate_limits::RateLimitError;
        use crate::snapshot::memory::MemoryFileError;
        use crate::snapshot::SnapshotError;
        match self {
            Self::Snapshot(SnapshotError::NoBase) => ErrorKind::NoBase,
            Self::Snapshot(SnapshotError::Memory(MemoryFileError::BaseUnavailable { .. })) => {
                ErrorKind::BaseUnavailable
            }
            Self::RateLimit(RateLimitError::NoSuchDisk(_) | RateLimitError::NoNet) => {
                ErrorKind::NoSuchDevice
            }
            Self::RateLimit(RateLimitError::ZeroRate) => ErrorKind::InvalidLimit,
            Self::DiskSlot(DiskSlotError::NoSuchSlot { .. }) | Self::NoDiskSlots => {
                ErrorKind::NoSuchSlot
            }
            Self::DiskSlot(DiskSlotError::Occupied(_)) => ErrorKind::SlotOccupied,
            Self::DiskSlot(DiskSlotError::Empty(_)) => ErrorKind::SlotEmpty,
            Self::Balloon(balloon::BalloonError::NoBalloon) => ErrorKind::NoBalloon,
            Self::Balloon(balloon::BalloonError::TargetTooLarge { .. }) => ErrorKind::InvalidTarget,
            Self::DiskSlot(
                DiskSlotError::NoFd
                | DiskSlotError::Image(..)
                | DiskSlotError::FdCount { .. }
                | DiskSlotError::Format(_),
            ) => ErrorKind::BadDisk,
            _ => ErrorKind::Unspecified,
        }
    }
}

/// What the control socket can do to a VM.
pub trait VmControl {
    /// The VM as it is now.
    fn describe(&self) -> Info;
    /// Parks every vCPU and the device event loop; returns once they are parked.
    fn pause(&self) -> Result<Info, ControlError>;
    /// Lets a paused VM run again.
    fn resume(&self) -> Result<Info, ControlError>;
    /// Asks the VM to stop; the VMM exits soon after.
    fn stop(&self) -> Info;
    /// Writes a snapshot of the paused VM.
    fn snapshot(&self, _request: &Snapshot) -> Result<SnapshotDone, ControlError> {
        Err(ControlError::NoSnapshots)
    }
    /// Replaces devices' rate limits (all or nothing); answers with the VM as it is now.
    fn set_rate_limits(&self, _request: &SetRateLimits) -> Result<Info, ControlError> {
        Err(ControlError::NoRateLimits)
    }
    /// Fills an empty disk slot with the image `disk` (the fd sent with the request).
    fn attach_disk(
        &self,
        _request: &AttachDisk,
        _disk: Vec<OwnedFd>,
    ) -> Result<Info, ControlError> {
        Err(ControlError::NoDiskSlots)
    }
    /// Empties a disk slot.
    fn detach_disk(&self, _request: &DetachDisk) -> Result<Info, ControlError> {
        Err(ControlError::NoDiskSlots)
    }
    /// Sets the balloon's target.
    fn set_balloon(&self, _request: &SetBalloon) -> Result<Info, ControlError> {
        Err(ControlError::Balloon(balloon::BalloonError::NoBalloon))
    }
}

/// Answers one request; `fds` is what came with it (see [`fd_reader::ReceivedFds::take`]):
/// only `attach_disk` takes them (an image and its backing chain), every other request that
/// carries one is refused.
pub fn handle_request(
    request: &VmmRequest,
    fds: Result<Vec<OwnedFd>, usize>,
    vm: &dyn VmControl,
) -> VmmResponse {
    use vmm_request::Msg;
    let fds = match fds {
        Ok(fds) => fds,
        Err(n) => return refusal(&ControlError::TooManyFds(n)),
    };
    if let Some(Msg::AttachDisk(attach)) = &request.msg {
        return match vm.attach_disk(attach, fds) {
            Ok(info) => info_response(info),
            Err(e) => refusal(&e),
        };
    }
    if !fds.is_empty() {
        return refusal(&ControlError::UnexpectedFd);
    }
    if let Some(Msg::Snapshot(snapshot)) = &request.msg {
        return match vm.snapshot(snapshot) {
            Ok(done) => VmmResponse {
                msg: Some(vmm_response::Msg::Snapshot(done)),
                ..VmmResponse::default()
            },
            Err(e) => refusal(&e),
        };
    }
    let result = match request.msg {
        Some(Msg::Describe(_)) => Ok(vm.describe()),
        Some(Msg::Pause(_)) => vm.pause(),
        Some(Msg::Resume(_)) => vm.resume(),
        Some(Msg::Stop(_)) => Ok(vm.stop()),
        Some(Msg::SetRateLimits(ref limits)) => vm.set_rate_limits(limits),
        Some(Msg::DetachDisk(ref detach)) => vm.detach_disk(detach),
        Some(Msg::SetBalloon(ref target)) => vm.set_balloon(target),
        Some(Msg::Snapshot(_) | Msg::AttachDisk(_)) | None => Err(ControlError::UnknownRequest),
    };
    match result {
        Ok(info) => info_response(info),
        Err(e) => refusal(&e),
    }
}

fn info_response(info: Info) -> VmmResponse {
    VmmResponse {
        msg: Some(vmm_response::Msg::Info(info)),
        ..VmmResponse::default()
    }
}

/// The error response for `e`: its message chain and its kind.
fn refusal(e: &ControlError) -> VmmResponse {
    VmmResponse {
        msg: Some(vmm_response::Msg::Error(error_chain(e))),
        error_kind: e.kind() as i32,
    }
}

/// An error and its causes on one line (`error: cause: cause`), for a client.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        source = cause.source();
    }
    s
}

/// A response carrying only an error message.
pub fn error_response(message: impl Into<String>) -> VmmResponse {
    VmmResponse {
        msg: Some(vmm_response::Msg::Error(message.into())),
        ..VmmResponse::default()
    }
}

/// The state field of [`Info`] for a VM that is `paused` and/or `stopping`.
pub fn state(paused: bool, stopping: bool) -> info::State {
    match (paused, stopping) {
        (_, true) => info::State::Stopping,
        (true, false) => info::State::Paused,
        (false, false) => info::State::Running,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use husk_proto::vmm::{Describe, Pause, Resume, Stop};
    use std::sync::Mutex;

    /// A VM that only keeps its state, with the same rules as the real one.
    #[derive(Default)]
    pub(crate) struct FakeVm {
        pub(crate) state: Mutex<(bool, bool)>,
    }

    impl FakeVm {
        fn info(&self) -> Info {
            let (paused, stopping) = *self.state.lock().unwrap();
            Info {
                state: state(paused, stopping) as i32,
                vcpus: 2,
                memory_mib: 128,
                ..Default::default()
            }
        }
    }

    impl VmControl for FakeVm {
        fn describe(&self) -> Info {
            self.info()
        }
        fn pause(&self) -> Result<Info, ControlError> {
            {
                let mut s = self.state.lock().unwrap();
                if s.0 {
                    return Err(crate::pause::PauseError::AlreadyPaused.into());
                }
                s.0 = true;
            }
            Ok(self.info())
        }
        fn resume(&self) -> Result<Info, ControlError> {
            {
                let mut s = self.state.lock().unwrap();
                if !s.0 {
                    return Err(crate::pause::PauseError::NotPaused.into());
                }
                s.0 = false;
            }
            Ok(self.info())
        }
        fn stop(&self) -> Info {
            self.state.lock().unwrap().1 = true;
            self.info()
        }
    }

    pub(crate) fn request(msg: vmm_request::Msg) -> VmmRequest {
        VmmRequest { msg: Some(msg) }
    }

    /// The state a response reports, or the message it carries instead.
    #[derive(Debug, PartialEq)]
    enum Answer {
        State(info::State),
        Error(String),
        Other,
    }

    fn state_of(response: &VmmResponse) -> Answer {
        match &response.msg {
            Some(vmm_response::Msg::Info(i)) => Answer::State(i.state()),
            Some(vmm_response::Msg::Error(e)) => Answer::Error(e.clone()),
            Some(vmm_response::Msg::Snapshot(_)) | None => Answer::Other,
        }
    }

    fn error_of(response: &VmmResponse) -> String {
        match state_of(response) {
            Answer::Error(e) => e,
            other => panic!("expected an error, got {other:?}"),
        }
    }

    #[test]
    fn requests_map_to_the_vm_and_errors_to_error_responses() {
        let vm = FakeVm::default();
        let describe = request(vmm_request::Msg::Describe(Describe {}));
        let pause = request(vmm_request::Msg::Pause(Pause {}));
        let resume = request(vmm_request::Msg::Resume(Resume {}));
        let stop = request(vmm_request::Msg::Stop(Stop {}));

        assert_eq!(
            state_of(&handle_request(&describe, Ok(Vec::new()), &vm)),
            Answer::State(info::State::Running)
        );
        let err = error_of(&handle_request(&resume, Ok(Vec::new()), &vm));
        assert!(err.contains("not paused"), "{err}");
        assert_eq!(
            state_of(&handle_request(&pause, Ok(Vec::new()), &vm)),
            Answer::State(info::State::Paused)
        );
        let err = error_of(&handle_request(&pause, Ok(Vec::new()), &vm));
        assert!(err.contains("already paused"), "{err}");
        assert_eq!(
            state_of(&handle_request(&resume, Ok(Vec::new()), &vm)),
            Answer::State(info::State::Running)
        );
        assert_eq!(
            state_of(&handle_request(&stop, Ok(Vec::new()), &vm)),
            Answer::State(info::State::Stopping)
        );
        let err = error_of(&handle_request(&VmmRequest::default(), Ok(Vec::new()), &vm));
        assert!(err.contains("empty or unknown request"), "{err}");
        let snapshot = request(vmm_request::Msg::Snapshot(Snapshot::default()));
        let err = error_of(&handle_request(&snapshot, Ok(Vec::new()), &vm));
        assert_eq!(err, "this VM cannot take snapshots");
    }

    /// A VM whose snapshots fail with one fixed error.
    struct RefusingVm(fn() -> ControlError);

    impl VmControl for RefusingVm {
        fn describe(&self) -> Info {
            Info::default()
        }
        fn pause(&self) -> Result<Info, ControlError> {
            Err((self.0)())
        }
        fn resume(&self) -> Result<Info, ControlError> {
            Ok(Info::default())
        }
        fn stop(&self) -> Info {
            Info::default()
        }
        fn snapshot(&self, _request: &Snapshot) -> Result<SnapshotDone, ControlError> {
            Err((self.0)())
        }
        fn set_rate_limits(&self, _request: &SetRateLimits) -> Result<Info, ControlError> {
            Err((self.0)())
        }
    }

    #[test]
    fn rate_limit_refusals_say_whether_the_device_or_the_limit_was_wrong() {
        use crate::devices::rate_limits::RateLimitError;
        let set = request(vmm_request::Msg::SetRateLimits(SetRateLimits::default()));
        let cases: [(fn() -> ControlError, ErrorKind); 4] = [
            (
                || RateLimitError::NoSuchDisk(3).into(),
                ErrorKind::NoSuchDevice,
            ),
            (|| RateLimitError::NoNet.into(), ErrorKind::NoSuchDevice),
            (|| RateLimitError::ZeroRate.into(), ErrorKind::InvalidLimit),
            (|| ControlError::Stopping, ErrorKind::Unspecified),
        ];
        for (error, kind) in cases {
            let response = handle_request(&set, Ok(Vec::new()), &RefusingVm(error));
            assert_eq!(response.error_kind(), kind, "{response:?}");
            assert_eq!(error_of(&response), error_chain(&error()));
        }
        // A VM without the call refuses it by name.
        let err = error_of(&handle_request(&set, Ok(Vec::new()), &FakeVm::default()));
        assert_eq!(err, "this VM cannot change rate limits");
    }

    #[test]
    fn refusals_a_client_acts_on_carry_their_kind_and_others_none() {
        use crate::snapshot::memory::MemoryFileError;
        use crate::snapshot::SnapshotError;
        let snapshot = request(vmm_request::Msg::Snapshot(Snapshot::default()));
        let pause = request(vmm_request::Msg::Pause(Pause {}));
        let cases: [(fn() -> ControlError, ErrorKind); 4] = [
            (|| SnapshotError::NoBase.into(), ErrorKind::NoBase),
            (
                || {
                    SnapshotError::Memory(MemoryFileError::BaseUnavailable {
                        path: "/gone/mem".into(),
                        source: std::io::ErrorKind::NotFound.into(),
                    })
                    .into()
                },
                ErrorKind::BaseUnavailable,
            ),
            (|| SnapshotError::NotPaused.into(), ErrorKind::Unspecified),
            (|| ControlError::Stopping, ErrorKind::Unspecified),
        ];
        for (error, kind) in cases {
            let response = handle_request(&snapshot, Ok(Vec::new()), &RefusingVm(error));
            assert_eq!(response.error_kind(), kind, "{response:?}");
            assert_eq!(error_of(&response), error_chain(&error()));
        }
        // Outside snapshots too: the kind follows the error, not the request.
        let response = handle_request(
            &pause,
            Ok(Vec::new()),
            &RefusingVm(|| SnapshotError::NoBase.into()),
        );
        assert_eq!(response.error_kind(), ErrorKind::NoBase);
        // Successes carry no kind.
        let ok = handle_request(
            &request(vmm_request::Msg::Describe(Describe {})),
            Ok(Vec::new()),
            &FakeVm::default(),
        );
        assert_eq!(ok.error_kind(), ErrorKind::Unspecified);
    }

    #[test]
    fn only_attach_disk_takes_an_fd_and_slot_refusals_carry_their_kind() {
        let vm = FakeVm::default();
        let null = || vec![OwnedFd::from(std::fs::File::open("/dev/null").unwrap())];
        let describe = request(vmm_request::Msg::Describe(Describe {}));
        let response = handle_request(&describe, Ok(null()), &vm);
        assert_eq!(
            error_of(&response),
            "a file descriptor came with a request that takes none"
        );
        let response = handle_request(&describe, Err(3), &vm);
        assert!(error_of(&response).starts_with("3 file descriptors"));

        let attach = request(vmm_request::Msg::AttachDisk(AttachDisk::default()));
        let detach = request(vmm_request::Msg::DetachDisk(DetachDisk::default()));
        // A VM without slots refuses both by kind.
        for (req, fd) in [(&attach, null()), (&detach, Vec::new())] {
            let response = handle_request(req, Ok(fd), &vm);
            assert_eq!(response.error_kind(), ErrorKind::NoSuchSlot, "{response:?}");
        }
        let kinds: [(ControlError, ErrorKind); 5] = [
            (DiskSlotError::Occupied(0).into(), ErrorKind::SlotOccupied),
            (DiskSlotError::Empty(1).into(), ErrorKind::SlotEmpty),
            (
                DiskSlotError::NoSuchSlot { slot: 2, slots: 1 }.into(),
                ErrorKind::NoSuchSlot,
            ),
            (DiskSlotError::NoFd.into(), ErrorKind::BadDisk),
            (ControlError::DiskAttached(0), ErrorKind::Unspecified),
        ];
        for (e, kind) in kinds {
            assert_eq!(e.kind(), kind, "{e}");
        }
    }

    #[test]
    fn stopping_wins_over_paused() {
        assert_eq!(state(true, true), info::State::Stopping);
        assert_eq!(state(true, false), info::State::Paused);
        assert_eq!(state(false, false), info::State::Running);
    }
}
