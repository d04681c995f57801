//! What the daemon asks of a VM's guest agent on its own: readiness after a start, a graceful
//! shutdown, and after a restore the wall clock and the network identity of the clone.

use std::sync::Arc;
use std::time::Duration;

use husk_host::net::VmLink;
use husk_proto::agent::{self, host_message, HostMessage, SetNetwork, SetTime};
use husk_proto::v1::{event, VmState};
use tokio::sync::watch;

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

    /// Once the restored guest's agent answers: sets its wall clock (it stood still while the
    /// snapshot lay on disk) and, with a new tap, moves eth0 to the new MAC and addresses.
    /// Waits as long as the VM runs or is paused.
    pub(super) async fn after_restore(
        &self,
        entry: &Arc<VmEntry>,
        ended: watch::Receiver<bool>,
        net_config: Option<SetNetwork>,
    ) {
        if !self.send_when_running(entry, &ended, set_time_now).await {
            return;
        }
        if let Some(net) = net_config {
            let message = move || HostMessage {
                msg: Some(host_message::Msg::SetNetwork(net.clone())),
            };
            self.send_when_running(entry, &ended, message).await;
        }
    }

    /// Sends the request `message` makes to the agent once the VM runs and the agent answers;
    /// false if the VM ended first. A refusal by the agent is logged, not retried.
    async fn send_when_running(
        &self,
        entry: &Arc<VmEntry>,
        ended: &watch::Receiver<bool>,
        message: impl Fn() -> HostMessage,
    ) -> bool {
        let socket = entry.vsock_socket();
        while !*ended.borrow() {
            if entry.state() == VmState::Running {
                let message = message();
                match agent_client::request(&socket, &message, Duration::from_secs(2)).await {
                    Ok(_) => return true,
                    Err(agent_client::AgentError::Refused(e)) => {
                        tracing::warn!(
                            vm_id = %entry.id,
                            request = request_name(&message),
                            error = %e,
                            "the guest agent refused a request after restore"
                        );
                        return true;
                    }
                    Err(_) => {}
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        false
    }
}

/// A `set_time` to the host's current wall clock.
fn set_time_now() -> HostMessage {
    let unix_ns = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i64);
    HostMessage {
        msg: Some(host_message::Msg::SetTime(SetTime { unix_ns })),
    }
}

fn request_name(message: &HostMessage) -> &'static str {
    match message.msg {
        Some(host_message::Msg::SetTime(_)) => "set_time",
        Some(host_message::Msg::SetNetwork(_)) => "set_network",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

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
