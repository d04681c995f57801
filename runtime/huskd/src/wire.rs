//! Async framing for the agent and VMM control protocols (husk_proto::frame on tokio streams),
//! and the vsock handshake of husk-vmm's Unix socket.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

use husk_proto::frame;
use prost::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// Writes one frame.
pub async fn write_frame<M: Message, W: AsyncWriteExt + Unpin>(
    writer: &mut W,
    message: &M,
) -> io::Result<()> {
    writer.write_all(&frame::encode(message)?).await?;
    writer.flush().await
}

/// Reads one frame; `Ok(None)` when the stream ended cleanly between frames.
pub async fn read_frame<M: Message + Default, R: AsyncReadExt + Unpin>(
    reader: &mut R,
) -> io::Result<Option<M>> {
    let mut prefix = [0u8; 4];
    let mut got = 0;
    while got < prefix.len() {
        match reader.read(&mut prefix[got..]).await? {
            0 if got == 0 => return Ok(None),
            0 => return Err(io::ErrorKind::UnexpectedEof.into()),
            n => got += n,
        }
    }
    let mut body = vec![0u8; frame::checked_len(prefix)?];
    reader.read_exact(&mut body).await?;
    frame::decode(&body).map(Some)
}

/// A Unix socket a VMM serves. It lies in the VM's `vmm/` directory, which the VMM's own
/// (unprivileged) user owns, so the last component of its path is the VMM's to change: a
/// symlink there could point huskd at another VM's socket or at a host service. Every
/// connection therefore checks who answers (SO_PEERCRED) before a byte is sent.
#[derive(Debug, Clone)]
pub struct VmSocket {
    pub path: PathBuf,
    /// The uid the VM's VMM runs as.
    pub peer_uid: u32,
}

impl VmSocket {
    /// Connects and checks that the VM's own VMM answered.
    pub async fn connect(&self) -> io::Result<UnixStream> {
        let stream = UnixStream::connect(&self.path).await?;
        let peer = stream.peer_cred()?.uid();
        if peer != self.peer_uid {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!(
                    "{} is served by uid {peer}, not by the VM's uid {}: refused",
                    self.path.display(),
                    self.peer_uid
                ),
            ));
        }
        Ok(stream)
    }
}

/// Connects to guest vsock `port` through husk-vmm's vsock Unix socket at `uds`: sends
/// `CONNECT <port>\n` and expects `OK <n>\n`. Fails when the guest does not listen (yet).
pub async fn connect_vsock(uds: &VmSocket, port: u32, limit: Duration) -> io::Result<UnixStream> {
    tokio::time::timeout(limit, async {
        let mut stream = uds.connect().await?;
        stream
            .write_all(format!("CONNECT {port}\n").as_bytes())
            .await?;
        // Read the reply byte by byte: anything after the newline belongs to the guest.
        let mut line = Vec::with_capacity(16);
        let mut byte = [0u8; 1];
        while line.len() < 32 {
            if stream.read(&mut byte).await? == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::ConnectionRefused,
                    format!("guest port {port} refused the connection"),
                ));
            }
            if byte[0] == b'\n' {
                break;
            }
            line.push(byte[0]);
        }
        if line.starts_with(b"OK ") {
            Ok(stream)
        } else {
            Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "unexpected vsock handshake reply {:?}",
                    String::from_utf8_lossy(&line)
                ),
            ))
        }
    })
    .await
    .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "vsock connect timed out"))?
}

/// Sends one request over a fresh Unix connection and reads one reply, within `limit`.
pub async fn request_reply<Q: Message, A: Message + Default>(
    socket: &VmSocket,
    request: &Q,
    limit: Duration,
) -> io::Result<A> {
    tokio::time::timeout(limit, async {
        let mut stream = socket.connect().await?;
        write_frame(&mut stream, request).await?;
        read_frame(&mut stream)
            .await?
            .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "no reply"))
    })
    .await
    .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no reply in time"))?
}

/// Like [`request_reply`] on an already connected stream.
pub async fn exchange<Q: Message, A: Message + Default>(
    stream: &mut UnixStream,
    request: &Q,
    limit: Duration,
) -> io::Result<A> {
    tokio::time::timeout(limit, async {
        write_frame(stream, request).await?;
        read_frame(stream)
            .await?
            .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "no reply"))
    })
    .await
    .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no reply in time"))?
}

#[cfg(test)]
mod tests {
    use super::*;
    use husk_proto::agent::{guest_message, GuestMessage};

    #[tokio::test]
    async fn frames_cross_a_socket_pair_and_bad_lengths_are_refused() {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        let msg = GuestMessage {
            msg: Some(guest_message::Msg::Stdout(b"out".to_vec())),
        };
        write_frame(&mut a, &msg).await.unwrap();
        assert_eq!(
            read_frame::<GuestMessage, _>(&mut b).await.unwrap(),
            Some(msg)
        );
        a.write_all(&u32::MAX.to_be_bytes()).await.unwrap();
        let err = read_frame::<GuestMessage, _>(&mut b).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        drop(a);
        assert!(read_frame::<GuestMessage, _>(&mut b)
            .await
            .unwrap()
            .is_none());
    }

    #[tokio::test]
    async fn vsock_handshake_accepts_ok_and_refuses_a_closed_port() {
        let dir = std::env::temp_dir().join(format!("huskd-wire-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("v.sock");
        let _ = std::fs::remove_file(&path);
        let _ = std::fs::remove_file(dir.join("other.sock"));
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let server = tokio::spawn(async move {
            for reply in [&b"OK 1073741824\nhello"[..], &b""[..]] {
                let (mut s, _) = listener.accept().await.unwrap();
                let mut buf = [0u8; 13];
                s.read_exact(&mut buf).await.unwrap();
                assert_eq!(&buf, b"CONNECT 1024\n");
                s.write_all(reply).await.unwrap();
            }
        });
        let socket = VmSocket {
            path: path.clone(),
            peer_uid: rustix::process::geteuid().as_raw(),
        };
        let mut stream = connect_vsock(&socket, 1024, Duration::from_secs(5))
            .await
            .unwrap();
        let mut rest = [0u8; 5];
        stream.read_exact(&mut rest).await.unwrap();
        assert_eq!(
            &rest, b"hello",
            "bytes after the handshake line belong to the guest"
        );
        let err = connect_vsock(&socket, 1024, Duration::from_secs(5))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused);
        server.await.unwrap();
        // A socket served by another uid (a link planted by a VMM's user) is refused before
        // anything is sent.
        let _listener = tokio::net::UnixListener::bind(dir.join("other.sock")).unwrap();
        let other = VmSocket {
            path: dir.join("other.sock"),
            peer_uid: socket.peer_uid + 1,
        };
        let err = other.connect().await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::PermissionDenied, "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
