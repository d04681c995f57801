//! The seam between the daemon's state machine and the host: what it asks of the machine to
//! run a VM (a tap and its firewall rules, the VMM's directory handed to its uid, the VMM
//! process, a watch on its end, a kill, the jail's cleanup). [`SystemHost`] does it for real; the state machine's unit tests
//! use a recording stand-in (see `tests.rs`), so they run without root, KVM or a guest.

use std::future::Future;
use std::io;
use std::os::fd::BorrowedFd;
use std::path::Path;
use std::pin::Pin;

use husk_host::firewall::{self, VmRules};
use husk_host::jail::JailConfig;
use husk_host::net::VmLink;

use crate::store;
use crate::vmm_process::{Launch, ProcessHandle};

/// Resolves when a watched VMM ends: its wait status when huskd could reap it (its child),
/// None otherwise (a VMM adopted after a restart).
pub type ExitWait = Pin<Box<dyn Future<Output = Option<i32>> + Send>>;

/// What failed on the host.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// The VM's tap could not be created or addressed (the message says why and what helps).
    #[error("{0}")]
    Link(String),
    /// The VMM could not be started.
    #[error("{0}")]
    Spawn(String),
    /// The jail's cgroup or directory could not be removed.
    #[error("cleaning up the jail: {0}")]
    Jail(String),
    /// The VM's firewall rules could not be applied or removed.
    #[error("{0}")]
    Firewall(String),
}

/// The host operations of the VM state machine.
pub trait VmmHost: Send + Sync {
    /// Creates and addresses a tap for one VM.
    fn create_link(&self) -> Result<VmLink, HostError>;
    /// Joins a VM to `interface` of the named network namespace at `netns` (MODE_NETNS).
    fn join_netns(&self, netns: &Path, interface: &str) -> Result<VmLink, HostError>;
    /// Gives `interface` of the namespace back to the namespace (its VM has ended).
    fn leave_netns(&self, netns: &Path, interface: &str) -> Result<(), HostError>;
    /// The host's resolver that guests' DNS goes to; None when the host has only loopback ones.
    fn dns_upstream(&self) -> Option<std::net::Ipv4Addr>;
    /// Installs the firewall rules of one VM (dropping those of taps that are gone).
    fn apply_firewall(&self, rules: &VmRules) -> Result<(), HostError>;
    /// Removes the firewall rules of every tap that no longer exists (VMs that ended).
    fn collect_firewall_garbage(&self) -> Result<(), HostError>;
    /// Gives the VMM's directory to the uid (and gid) it runs as.
    fn give_dir(&self, dir: BorrowedFd<'_>, uid: u32) -> io::Result<()>;
    /// Starts the VMM of `launch`; its pid.
    fn spawn(&self, launch: &Launch<'_>) -> Result<u32, HostError>;
    /// Watches `pid` end; `Ok(None)` when it is gone already.
    fn watch(&self, pid: u32) -> io::Result<Option<ExitWait>>;
    /// SIGKILLs `pid` (a VMM that did not stop); one that is gone already is no error.
    fn kill(&self, pid: u32);
    /// Removes what the jail of VM `id` left: its cgroup (killing anything still in it) and
    /// directory.
    fn release_jail(&self, jail: &JailConfig, id: &str) -> Result<(), HostError>;
}

/// The real host: taps through /dev/net/tun, husk-vmm (through husk-jailer) as processes.
pub struct SystemHost;

impl VmmHost for SystemHost {
    fn create_link(&self) -> Result<VmLink, HostError> {
        VmLink::create().map_err(|e| HostError::Link(e.to_string()))
    }

    fn join_netns(&self, netns: &Path, interface: &str) -> Result<VmLink, HostError> {
        husk_host::netns::connect(netns, interface).map_err(|e| HostError::Link(e.to_string()))
    }

    fn leave_netns(&self, netns: &Path, interface: &str) -> Result<(), HostError> {
        husk_host::netns::disconnect(netns, interface).map_err(|e| HostError::Link(e.to_string()))
    }

    fn dns_upstream(&self) -> Option<std::net::Ipv4Addr> {
        firewall::resolv::upstream()
    }

    fn apply_firewall(&self, rules: &VmRules) -> Result<(), HostError> {
        firewall::apply(rules).map_err(|e| HostError::Firewall(e.to_string()))
    }

    fn collect_firewall_garbage(&self) -> Result<(), HostError> {
        firewall::collect_garbage().map_err(|e| HostError::Firewall(e.to_string()))
    }

    fn give_dir(&self, dir: BorrowedFd<'_>, uid: u32) -> io::Result<()> {
        husk_host::confined::chown_fd(dir, uid, uid)
    }

    fn spawn(&self, launch: &Launch<'_>) -> Result<u32, HostError> {
        launch.spawn().map_err(|e| HostError::Spawn(e.to_string()))
    }

    fn watch(&self, pid: u32) -> io::Result<Option<ExitWait>> {
        Ok(ProcessHandle::open(pid)?.map(|handle| Box::pin(handle.exited()) as ExitWait))
    }

    fn kill(&self, pid: u32) {
        if let Some(pid) = i32::try_from(pid)
            .ok()
            .and_then(rustix::process::Pid::from_raw)
        {
            // Already gone (ESRCH) is what a kill is for.
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
        }
    }

    fn release_jail(&self, jail: &JailConfig, id: &str) -> Result<(), HostError> {
        husk_host::jail::cleanup(&jail.jailer, id).map_err(|e| HostError::Jail(e.to_string()))
    }
}

/// Whether `pid` is still the process huskd recorded (same start time), for adoption.
pub(super) fn recorded_pid_alive(dir: &std::path::Path) -> Option<u32> {
    store::load_pid(dir)
        .filter(|&(pid, ticks)| store::process_start_ticks(pid) == Some(ticks))
        .map(|(pid, _)| pid)
}
