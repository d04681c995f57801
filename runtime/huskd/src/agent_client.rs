//! huskd's side of the guest agent protocol (husk.agent.v1) over husk-vmm's vsock socket.

use std::io;
use std::time::Duration;

use husk_proto::agent::{self, guest_message, host_message, GuestMessage, HostMessage, AGENT_PORT};
use tokio::net::UnixStream;

use crate::wire::{self, VmSocket};

/// Connects to the agent.
pub async fn connect(vsock_socket: &VmSocket, limit: Duration) -> io::Result<UnixStream> {
    wire::connect_vsock(vsock_socket, AGENT_PORT, limit).await
}

/// Sends one request that is answered by a single frame (`hello`, `shutdown`, `set_time`), and
/// returns that frame; an `error` frame becomes an error.
pub async fn request(
    vsock_socket: &VmSocket,
    message: &HostMessage,
    limit: Duration,
) -> io::Result<GuestMessage> {
    let mut stream = connect(vsock_socket, limit).await?;
    let reply: GuestMessage = wire::exchange(&mut stream, message, limit).await?;
    match reply.msg {
        Some(guest_message::Msg::Error(e)) => Err(io::Error::other(format!("guest agent: {e}"))),
        _ => Ok(reply),
    }
}

/// Checks that the agent answers and speaks our protocol version.
pub async fn hello(vsock_socket: &VmSocket, limit: Duration) -> io::Result<agent::Hello> {
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
        Some(guest_message::Msg::Hello(hello)) => Err(io::Error::other(format!(
            "guest agent speaks protocol version {}, huskd {}",
            hello.version,
            agent::PROTOCOL_VERSION
        ))),
        other => Err(io::Error::other(format!(
            "unexpected reply to hello: {other:?}"
        ))),
    }
}
