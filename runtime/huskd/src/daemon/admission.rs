//! `--memory-overcommit RATIO`: a start (StartVm, CreateVm with start, RestoreVm) is refused
//! with RESOURCE_EXHAUSTED when the guest memory of the live VMs and the new one would pass
//! RATIO times the host's memory (MemTotal). Off unless set. See
//! docs/capacity.md#overcommit-policy.

use husk_proto::v1::{VmSpec, VmState};
use tonic::Status;

use super::vm::lock;
use super::{Daemon, VmEntry};

/// Guest memory a VM of `spec` commits, in MiB (the default size when unset).
fn spec_mib(spec: &VmSpec) -> u64 {
    match spec.memory_mib {
        0 => husk_host::vmm_args::DEFAULT_MEM_MIB,
        m => u64::from(m),
    }
}

/// Whether `asked` MiB more fit beside `committed` MiB under `ratio` of `host` MiB.
pub fn fits(committed: u64, asked: u64, ratio: f64, host: u64) -> bool {
    (committed + asked) as f64 <= ratio * host as f64
}

/// A start admitted and not yet counted by its VM's state; dropping it gives the room back to
/// the next admission check.
pub struct Admitted<'a> {
    daemon: &'a Daemon,
    mib: u64,
}

impl Drop for Admitted<'_> {
    fn drop(&mut self) {
        let mut admitted = lock(&self.daemon.admitted_mib);
        *admitted = admitted.saturating_sub(self.mib);
    }
}

/// The host's MemTotal in MiB (0 when /proc/meminfo cannot be read: every start is refused).
fn host_mib() -> u64 {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    super::usage::host_memory(&meminfo).0 >> 20
}

impl Daemon {
    /// Admits the start of `entry` with `spec`, or refuses it (see the module documentation).
    pub(super) fn admit_memory(
        &self,
        entry: &VmEntry,
        spec: &VmSpec,
    ) -> Result<Admitted<'_>, Status> {
        let asked = spec_mib(spec);
        let Some(ratio) = self.config.memory_overcommit else {
            return Ok(Admitted {
                daemon: self,
                mib: 0,
            });
        };
        let live: u64 = lock(&self.vms)
            .values()
            .filter(|e| e.id != entry.id)
            .filter(|e| {
                matches!(
                    e.state(),
                    VmState::Starting | VmState::Running | VmState::Paused | VmState::Stopping
                )
            })
            .map(|e| spec_mib(&e.snapshot().spec.unwrap_or_default()))
            .sum();
        let mut admitted = lock(&self.admitted_mib);
        let committed = live + *admitted;
        let host = host_mib();
        if !fits(committed, asked, ratio, host) {
            return Err(Status::resource_exhausted(format!(
                "memory overcommit: {committed} MiB of guest memory committed and {asked} MiB \
                 asked would pass {ratio} x the host's {host} MiB (huskd --memory-overcommit)"
            )));
        }
        *admitted += asked;
        Ok(Admitted {
            daemon: self,
            mib: asked,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ratio_bounds_committed_plus_asked() {
        assert!(fits(0, 1024, 1.0, 1024));
        assert!(!fits(1, 1024, 1.0, 1024));
        assert!(fits(1536, 512, 2.0, 1024));
        assert!(!fits(1537, 512, 2.0, 1024));
        assert!(fits(100, 100, 0.5, 400));
        assert!(host_mib() > 0);
        assert_eq!(
            spec_mib(&VmSpec::default()),
            husk_host::vmm_args::DEFAULT_MEM_MIB
        );
    }
}
