//! Length-prefixed protobuf frames over a byte stream (the agent and VMM control protocols).
//!
//! A frame is a 4-byte big-endian length followed by that many bytes of one encoded message.
//! Frames longer than [`MAX_FRAME_LEN`] are refused on both sides, so a hostile peer cannot make
//! the reader allocate without bound.

use std::io::{self, Read, Write};

use prost::Message;

/// The largest frame either side accepts: 1 MiB.
pub const MAX_FRAME_LEN: usize = 1 << 20;

/// Encodes `message` into one frame (length prefix included).
pub fn encode<M: Message>(message: &M) -> io::Result<Vec<u8>> {
    let len = message.encoded_len();
    if len > MAX_FRAME_LEN {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("frame of {len} bytes exceeds the {MAX_FRAME_LEN}-byte limit"),
        ));
    }
    let mut buf = Vec::with_capacity(4 + len);
    buf.extend_from_slice(&(len as u32).to_be_bytes());
    message
        .encode(&mut buf)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    Ok(buf)
}

/// Writes `message` as one frame.
pub fn write<M: Message, W: Write>(writer: &mut W, message: &M) -> io::Result<()> {
    writer.write_all(&encode(message)?)?;
    writer.flush()
}

/// Checks a frame's length prefix; the caller then reads that many bytes.
pub fn checked_len(prefix: [u8; 4]) -> io::Result<usize> {
    let len = u32::from_be_bytes(prefix) as usize;
    if len > MAX_FRAME_LEN {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("peer sent a frame of {len} bytes, over the {MAX_FRAME_LEN}-byte limit"),
        ));
    }
    Ok(len)
}

/// Decodes one frame's body.
pub fn decode<M: Message + Default>(body: &[u8]) -> io::Result<M> {
    M::decode(body).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// Reads one frame. `Ok(None)` when the stream ended cleanly before a frame began; a stream that
/// ends inside a frame is an `UnexpectedEof` error.
pub fn read<M: Message + Default, R: Read>(reader: &mut R) -> io::Result<Option<M>> {
    let mut prefix = [0u8; 4];
    let mut got = 0;
    while got < prefix.len() {
        match reader.read(&mut prefix[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    let mut body = vec![0u8; checked_len(prefix)?];
    reader.read_exact(&mut body)?;
    decode(&body).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::{host_message, HostMessage};

    #[test]
    fn frames_round_trip_back_to_back() {
        let a = HostMessage {
            msg: Some(host_message::Msg::Stdin(b"hello".to_vec())),
        };
        let b = HostMessage {
            msg: Some(host_message::Msg::CloseStdin(true)),
        };
        let mut wire = Vec::new();
        write(&mut wire, &a).unwrap();
        write(&mut wire, &b).unwrap();
        let mut reader = &wire[..];
        assert_eq!(read::<HostMessage, _>(&mut reader).unwrap(), Some(a));
        assert_eq!(read::<HostMessage, _>(&mut reader).unwrap(), Some(b));
        assert_eq!(read::<HostMessage, _>(&mut reader).unwrap(), None);
    }

    #[test]
    fn oversized_truncated_and_garbage_frames_are_errors() {
        let mut huge = &((MAX_FRAME_LEN as u32 + 1).to_be_bytes())[..];
        let err = read::<HostMessage, _>(&mut huge).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);

        let mut cut = &[0u8, 0, 0, 9, 1, 2][..];
        let err = read::<HostMessage, _>(&mut cut).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);

        let mut half_prefix = &[0u8, 0][..];
        assert!(read::<HostMessage, _>(&mut half_prefix).is_err());

        let mut garbage = &[0u8, 0, 0, 2, 0xff, 0xff][..];
        let err = read::<HostMessage, _>(&mut garbage).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }
}
