//! What the daemon asks of a VM's guest agent on its own: readiness after a start, a graceful
//! shutdown, and after a restore the clone's own identity (entropy, clock, host name, network).

use std::sync::Arc;
use std::time::Duration;

use husk_host::net::VmLink;
use husk_proto::agent::{self, host_message, HostMessage, Reidentify, SetNetwork, SetTime};
use husk_proto::v1::{event, VmState};
use tokio::sync::{oneshot, watch};

use super::vm::VmEntry;
use super::Daemon;
use crate::agent_client;

/// How long huskd keeps trying to reach the guest agent after a start.
const AGENT_WAIT: Duration = Duration::from_secs(120);
/// The `set_network` that gives a restored guest's eth0 the identity of its new link.
pub(super) fn net_config(link: &VmLink) -> SetNetwork {
    SetNetwork {
        interface: "eth0".into(),
        mac: link.mac.to_vec(),
        address: link.guest_ip.to_string(),
        prefix_len: u32::from(link.prefix_len),
        gateway: if link.host_ip.is_unspecified() {
            String::new()
        } else {
            link.host_ip.to_string()
        },
    }
}

impl Daemon {
    /// Tries the guest agent until it answers (AGENT_READY) or the VM ends; with `ready_kind`,
    /// the time since the VMM's start goes to the `husk_vm_ready_seconds` histogram.
    pub(super) async fn await_agent(
        &self,
        entry: &Arc<VmEntry>,
        ended: watch::Receiver<bool>,
        ready_kind: Option<&'static str>,
    ) {
        let started = std::time::Instant::now();
        let socket = entry.vsock_socket();
        let deadline = tokio::time::Instant::now() + AGENT_WAIT;
        while tokio::time::Instant::now() < deadline && !*ended.borrow() {
            if agent_client::hello(&socket, Duration::from_secs(2))
                .await
                .is_ok()
            {
                entry.update(|vm| VmEntry::status_mut(vm).agent_ready = true);
                if let Some(kind) = ready_kind {
                    self.metrics
                        .observe_ready(kind, started.elapsed().as_secs_f64());
                }
                tracing::info!(vm_id = %entry.id, "guest agent ready");
                self.emit(entry, event::Kind::AgentReady, None, String::new());
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Asks the guest to shut down (its application gets SIGTERM); whether the agent took it.
    pub(super) async fn request_guest_shutdown(&self, entry: &VmEntry) -> bool {
        let shutdown = HostMessage {
            msg: Some(host_message::Msg::Shutdown(agent::Shutdown { signal: 0 })),
        };
        agent_client::request(&entry.vsock_socket(), &shutdown, Duration::from_secs(2))
            .await
            .is_ok()
    }

    /// Once the restored guest's agent answers, gives the clone its own identity in one
    /// `reidentify`: fresh entropy for its kernel's random generator, the wall clock (it stood
    /// still while the snapshot lay on disk), the host name when `hostname` is given and, with
    /// a new tap, eth0's new MAC and addresses. Only then is the VM agent-ready (AGENT_READY),
    /// so nothing is handed a clone that still has the snapshot's identity. An agent that
    /// predates `reidentify` gets `set_time` and `set_network` as before. Waits as long as the
    /// VM runs or is paused; `done` hears whether the identity was taken.
    pub(super) async fn after_restore(
        &self,
        entry: &Arc<VmEntry>,
        ended: watch::Receiver<bool>,
        identity: CloneIdentity,
        done: Option<oneshot::Sender<Result<(), String>>>,
    ) {
        let started = std::time::Instant::now();
        let strict = done.is_some();
        let result = match self.reidentify(entry, &ended, &identity).await {
            // RestoreVm's VM answered but refused part of it (a snapshot whose guest lost its
            // eth0, say): as before `reidentify`, it is usable, with the warning logged. A
            // template's clone is not handed out (`strict`).
            Err(Sent::Refused(e)) if !strict => {
                tracing::warn!(vm_id = %entry.id, error = %e, "the restored VM keeps part of the snapshot's identity");
                Ok(())
            }
            Err(Sent::Refused(e)) => Err(e),
            Err(_) => Err("the VM ended before its agent answered".to_string()),
            Ok(()) => Ok(()),
        };
        if result.is_ok() {
            entry.update(|vm| VmEntry::status_mut(vm).agent_ready = true);
            self.metrics
                .observe_ready("restore", started.elapsed().as_secs_f64());
            tracing::info!(vm_id = %entry.id, "restored guest reidentified; agent ready");
            self.emit(entry, event::Kind::AgentReady, None, String::new());
        }
        if let Some(done) = done {
            let _ = done.send(result);
        }
    }

    /// Sends the clone its `reidentify` (or, to an older agent, `set_time` and `set_network`);
    /// the error is how the last request ended.
    async fn reidentify(
        &self,
        entry: &Arc<VmEntry>,
        ended: &watch::Receiver<bool>,
        identity: &CloneIdentity,
    ) -> Result<(), Sent> {
        let request = || HostMessage {
            msg: Some(host_message::Msg::Reidentify(identity.request())),
        };
        match self.send_when_running(entry, ended, request).await {
            Sent::Taken => Ok(()),
            // An agent older than `reidentify` decodes it as an empty request (prost skips the
            // unknown field): the parts it knows, one by one.
            Sent::Refused(e) if e == "empty request" || e.contains("expected a request") => {
                tracing::warn!(
                    vm_id = %entry.id,
                    "the restored guest's agent predates reidentify: its random state is \
                     not reseeded; rebuild the snapshot with a current husk-init"
                );
                let message = || HostMessage {
                    msg: Some(host_message::Msg::SetTime(SetTime {
                        unix_ns: unix_ns_now(),
                    })),
                };
                self.send_when_running(entry, ended, message)
                    .await
                    .into_result()?;
                if let Some(net) = &identity.network {
                    let message = || HostMessage {
                        msg: Some(host_message::Msg::SetNetwork(net.clone())),
                    };
                    self.send_when_running(entry, ended, message)
                        .await
                        .into_result()?;
                }
                Ok(())
            }
            other => Err(other),
        }
    }

    /// Sends the request `message` makes to the agent once the VM runs and the agent answers.
    /// The first tries follow each other closely (a restored agent answers within
    /// milliseconds), later ones every 100 ms.
    async fn send_when_running(
        &self,
        entry: &Arc<VmEntry>,
        ended: &watch::Receiver<bool>,
        message: impl Fn() -> HostMessage,
    ) -> Sent {
        let socket = entry.vsock_socket();
        let mut pause = Duration::from_millis(1);
        while !*ended.borrow() {
            if entry.state() == VmState::Running {
                match agent_client::request(&socket, &message(), Duration::from_secs(2)).await {
                    Ok(_) => return Sent::Taken,
                    Err(agent_client::AgentError::Refused(e)) => return Sent::Refused(e),
                    Err(e) => {
                        tracing::debug!(vm_id = %entry.id, error = %e, "agent not reached yet")
                    }
                }
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(100));
        }
        Sent::Ended
    }
}

/// How a request sent once the VM runs ended.
enum Sent {
    Taken,
    Refused(String),
    Ended,
}

impl Sent {
    fn into_result(self) -> Result<(), Sent> {
        match self {
            Sent::Taken => Ok(()),
            other => Err(other),
        }
    }
}

/// What a restored clone is told about itself (see [`Daemon::after_restore`]).
#[derive(Debug, Clone, Default)]
pub(super) struct CloneIdentity {
    /// With a new tap: eth0's new MAC and addresses.
    pub network: Option<SetNetwork>,
    /// A new host name; empty: the snapshot's.
    pub hostname: String,
}

/// Bytes of entropy a clone gets: twice the CRNG key.
const CLONE_ENTROPY: usize = 64;

impl CloneIdentity {
    /// The agent request, with fresh entropy and the current time.
    fn request(&self) -> Reidentify {
        Reidentify {
            entropy: host_entropy(),
            unix_ns: unix_ns_now(),
            hostname: self.hostname.clone(),
            network: self.network.clone(),
        }
    }
}

/// [`CLONE_ENTROPY`] bytes from the host kernel's random source; empty (no reseed, logged)
/// if it cannot be read, which a working host never sees.
fn host_entropy() -> Vec<u8> {
    let mut bytes = vec![0u8; CLONE_ENTROPY];
    match rustix::rand::getrandom(&mut bytes, rustix::rand::GetRandomFlags::empty()) {
        Ok(n) if n == CLONE_ENTROPY => bytes,
        other => {
            tracing::error!(result = ?other, "cannot read the host's random source: the clone is not reseeded");
            Vec::new()
        }
    }
}

/// The host's wall clock in nanoseconds since the Unix epoch.
fn unix_ns_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    #[test]
    fn every_reidentify_carries_fresh_entropy_and_the_current_time() {
        let identity = CloneIdentity {
            network: None,
            hostname: "clone-1".into(),
        };
        let (a, b) = (identity.request(), identity.request());
        assert_eq!(a.entropy.len(), CLONE_ENTROPY);
        assert_ne!(
            a.entropy, b.entropy,
            "two clones must never get the same bytes"
        );
        assert_eq!(a.hostname, "clone-1");
        assert!(a.network.is_none());
        // Within a minute of now (2020-09-13 is 1.6e18 ns).
        assert!(a.unix_ns > 1_600_000_000_000_000_000, "{}", a.unix_ns);
    }

    #[test]
    fn a_restored_clone_is_sent_its_new_links_mac_address_and_gateway() {
        let (tap_fd, _other) = rustix::pipe::pipe().unwrap();
        let link = VmLink {
            tap_fd,
            tap_name: "husk7".into(),
            host_ip: Ipv4Addr::new(169, 254, 128, 29),
            guest_ip: Ipv4Addr::new(169, 254, 128, 30),
            mac: [6, 0, 169, 254, 128, 30],
            prefix_len: husk_host::net::LINK_PREFIX_LEN,
            mtu: None,
            kind: husk_host::net::LinkKind::Tap,
        };
        let sent = net_config(&link);
        assert_eq!(sent.interface, "eth0");
        assert_eq!(sent.mac, vec![6, 0, 169, 254, 128, 30]);
        assert_eq!(sent.address, "169.254.128.30");
        assert_eq!(sent.prefix_len, 30);
        assert_eq!(sent.gateway, "169.254.128.29");
    }
}
