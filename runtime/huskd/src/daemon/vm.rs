//! One VM as the daemon holds it: its record (persisted on every change), its operation lock
//! and, while its VMM runs, the handle on that run.

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use husk_proto::v1::{Vm, VmState, VmStatus};
use tokio::sync::watch;
use tonic::Status;

use crate::store;
use crate::wire::VmSocket;

/// One VM.
#[derive(Debug)]
pub struct VmEntry {
    pub id: String,
    pub dir: PathBuf,
    /// Serializes the VM's lifecycle calls (held across awaits).
    pub(super) op: tokio::sync::Mutex<()>,
    /// The record; never held across an await.
    pub(super) record: Mutex<Vm>,
    /// The current run, while a VMM runs.
    pub(super) run: Mutex<Option<RunHandle>>,
    /// The virtiofsd of each shared directory (VmSpec.mounts) of the current run: they quit
    /// when the VMM does; dropping them (when its end is recorded) reaps them.
    pub(super) shares: Mutex<Vec<husk_host::virtiofs::Virtiofsd>>,
}

/// The VMM process of a running VM.
#[derive(Clone, Debug)]
pub(super) struct RunHandle {
    pub(super) pid: u32,
    /// Becomes true once the monitor has recorded the VMM's end.
    pub(super) ended: watch::Receiver<bool>,
    /// Set by StopVm: the end that follows is a stop, not a failure.
    pub(super) stop_requested: Arc<AtomicBool>,
}

pub(super) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Locks a std mutex; a panic elsewhere does not make the daemon's state unreachable.
pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

pub(super) fn state_of(vm: &Vm) -> VmState {
    VmState::try_from(vm.state).unwrap_or(VmState::Unspecified)
}

fn state_name(state: VmState) -> &'static str {
    match state {
        VmState::Unspecified => "UNSPECIFIED",
        VmState::Created => "CREATED",
        VmState::Running => "RUNNING",
        VmState::Paused => "PAUSED",
        VmState::Stopping => "STOPPING",
        VmState::Stopped => "STOPPED",
        VmState::Failed => "FAILED",
        VmState::Starting => "STARTING",
    }
}

/// A fresh VM id: 16 hex digits.
pub(super) fn random_id() -> String {
    let mut bytes = [0u8; 8];
    if std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes))
        .is_err()
    {
        // Not secret, only unique: fall back to time and pid.
        let t = now_ms() as u64 ^ (u64::from(std::process::id()) << 40);
        bytes = t.to_be_bytes();
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The lowest uid of `range` (first, count) that no VM uses.
pub(super) fn allocate_uid(range: (u32, u32), used: &[u32]) -> Option<u32> {
    let (first, count) = range;
    (0..count)
        .filter_map(|i| first.checked_add(i))
        .find(|uid| !used.contains(uid))
}

impl VmEntry {
    pub(super) fn new(id: String, dir: PathBuf, vm: Vm) -> Self {
        Self {
            id,
            dir,
            op: tokio::sync::Mutex::new(()),
            record: Mutex::new(vm),
            run: Mutex::new(None),
            shares: Mutex::new(Vec::new()),
        }
    }

    /// A copy of the record.
    pub(super) fn snapshot(&self) -> Vm {
        lock(&self.record).clone()
    }

    pub(super) fn state(&self) -> VmState {
        state_of(&lock(&self.record))
    }

    pub(super) fn name(&self) -> String {
        lock(&self.record)
            .spec
            .as_ref()
            .map(|s| s.name.clone())
            .unwrap_or_default()
    }

    /// Changes the record and persists it.
    pub(super) fn update(&self, change: impl FnOnce(&mut Vm)) -> Vm {
        let mut record = lock(&self.record);
        change(&mut record);
        if let Err(e) = store::save(&self.dir, &record) {
            tracing::warn!(vm_id = %self.id, error = %e, "cannot save the VM record");
        }
        record.clone()
    }

    /// The uid the VM's VMM runs as (huskd's own when VMMs are not jailed).
    pub(super) fn vmm_uid(&self) -> u32 {
        match lock(&self.record).status.as_ref().map(|s| s.jail_uid) {
            Some(uid) if uid != 0 => uid,
            _ => rustix::process::geteuid().as_raw(),
        }
    }

    /// The VMM's control socket.
    pub(super) fn api_socket(&self) -> VmSocket {
        VmSocket {
            path: self.dir.join(store::API_SOCK),
            peer_uid: self.vmm_uid(),
        }
    }

    /// The VMM's vsock socket (the guest agent's way in).
    pub(super) fn vsock_socket(&self) -> VmSocket {
        VmSocket {
            path: self.dir.join(store::VSOCK_SOCK),
            peer_uid: self.vmm_uid(),
        }
    }

    pub(super) fn status_mut(vm: &mut Vm) -> &mut VmStatus {
        vm.status.get_or_insert_with(Default::default)
    }

    /// FAILED_PRECONDITION for `call` in the VM's current state.
    pub(super) fn wrong_state(&self, call: &str) -> Status {
        Status::failed_precondition(format!(
            "{call}: VM {} is {}",
            self.name(),
            state_name(self.state())
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lowest_free_uid_of_the_range_is_allocated() {
        assert_eq!(allocate_uid((100, 3), &[]), Some(100));
        assert_eq!(allocate_uid((100, 3), &[100, 102]), Some(101));
        assert_eq!(allocate_uid((100, 3), &[100, 101, 102]), None);
        assert_eq!(allocate_uid((u32::MAX, 3), &[u32::MAX]), None);
    }

    #[test]
    fn ids_are_sixteen_hex_digits() {
        let id = random_id();
        assert_eq!(id.len(), 16);
        assert!(id.bytes().all(|b| b.is_ascii_hexdigit()));
    }
}
