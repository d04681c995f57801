//! huskd's side of the guest agent protocol (husk.agent.v1) over husk-vmm's vsock socket.

use std::io;
use std::time::Duration;

use husk_proto::agent::{self, guest_message, host_message, GuestMessage, HostMessage, AGENT_PORT};
use tokio::net::UnixStream;

use crate::wire::{self, VmSocket};

/// Why a request to the guest agent failed.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The agent could not be reached or the connection broke (it may not listen yet).
    #[error("guest agent unreachable: {0}")]
    Io(#[from] io::Error),
    /// The agent answered with an `error` frame.
    #[error("guest agent: {0}")]
    Refused(String),
    /// The agent speaks another protocol version.
    #[error("guest agent speaks protocol version {guest}, huskd {host}")]
    Version { guest: u32, host: u32 },
    /// The agent answered with something else than the request calls for.
    #[error("unexpected reply from the guest agent: {0}")]
    Unexpected(String),
}

/// Connects to the agent.
pub async fn connect(vsock_socket: &VmSocket, limit: Duration) -> io::Result<UnixStream> {
    wire::connect_vsock(vsock_socket, AGENT_PORT, limit).await
}

/// Sends one request that is answered by a single frame (`hello`, `shutdown`, `set_time`,
/// `set_network`), and returns that frame; an `error` frame becomes [`AgentError::Refused`].
pub async fn request(
    vsock_socket: &VmSocket,
    message: &HostMessage,
    limit: Duration,
) -> Result<GuestMessage, AgentError> {
    let mut stream = connect(vsock_socket, limit).await?;
    let reply: GuestMessage = wire::exchange(&mut stream, message, limit).await?;
    match reply.msg {
        Some(guest_message::Msg::Error(e)) => Err(AgentError::Refused(e)),
        _ => Ok(reply),
    }
}

/// Checks that the agent answers and speaks our protocol version.
pub async fn hello(vsock_socket: &VmSocket, limit: Duration) -> Result<agent::Hello, AgentError> {
    let message = HostMessage {
        msg: Some(host_message::Msg::Hello(agent::Hello {
            version: agent::PROTOCOL_VERSION,
            uptime_ms: 0,
        })),
    };
    match request(vsock_socket, &message, limit).await?.msg {
        Some(guest_message::Msg::Hello(hello)) if hello.version == agent::PROTOCOL_VERSION => {
            Ok(hello)
        }
        Some(guest_message::Msg::Hello(hello)) => Err(AgentError::Version {
            guest: hello.version,
            host: agent::PROTOCOL_VERSION,
        }),
        other => Err(AgentError::Unexpected(format!("{other:?}"))),
    }
}
