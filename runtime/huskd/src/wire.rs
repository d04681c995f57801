//! Async framing for the agent and VMM control protocols (husk_proto::frame on tokio streams),
//! and the vsock handshake of husk-vmm's Unix socket.

use std::io;
use std::path::Path;
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

/// Connects to guest vsock `port` through husk-vmm's vsock Unix socket at `uds`: sends
/// `CONNECT <port>\n` and expects `OK <n>\n`. Fails when the guest does not listen (yet).
pub async fn connect_vsock(uds: &Path, port: u32, limit: Duration) -> io::Result<UnixStream> {
    tokio::time::timeout(limit, async {
        let mut stream = UnixStream::connect(uds).await?;
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
    socket: &Path,
    request: &Q,
    limit: Duration,
) -> io::Result<A> {
    tokio::time::timeout(limit, async {
        let mut stream = UnixStream::connect(socket).await?;
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
        let mut stream = connect_vsock(&path, 1024, Duration::from_secs(5))
            .await
            .unwrap();
        let mut rest = [0u8; 5];
        stream.read_exact(&mut rest).await.unwrap();
        assert_eq!(
            &rest, b"hello",
            "bytes after the handshake line belong to the guest"
        );
        let err = connect_vsock(&path, 1024, Duration::from_secs(5))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused);
        server.await.unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
