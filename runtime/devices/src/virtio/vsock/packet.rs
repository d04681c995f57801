//! virtio-vsock packets (virtio 1.2 §5.10.6): the 44-byte little-endian header, reading a
//! guest tx packet out of a descriptor chain with every field checked, and writing an rx packet
//! into one. Framing is not assumed (§2.7.4): header and payload may be split across
//! descriptors in any way.

use std::io::{Read, Write};

use crate::virtio::queue_worker::Chain;
use crate::GuestMemoryMmap;

/// Size of struct virtio_vsock_hdr (§5.10.6).
pub const HDR_LEN: usize = 44;
/// The host's CID (§5.10.4: 2 is reserved for the host).
pub const HOST_CID: u64 = 2;
/// Largest payload accepted from the guest or sent to it in one packet. Linux sends at most
/// 64 KiB (VIRTIO_VSOCK_MAX_PKT_BUF_SIZE); anything larger is refused unread.
pub const MAX_PAYLOAD: usize = 64 * 1024;

/// Socket type (§5.10.6): only stream sockets are implemented.
pub const TYPE_STREAM: u16 = 1;

/// Operations (§5.10.6).
pub mod op {
    pub const REQUEST: u16 = 1;
    pub const RESPONSE: u16 = 2;
    pub const RST: u16 = 3;
    pub const SHUTDOWN: u16 = 4;
    pub const RW: u16 = 5;
    pub const CREDIT_UPDATE: u16 = 6;
    pub const CREDIT_REQUEST: u16 = 7;
}

/// SHUTDOWN flags (§5.10.6.5).
pub mod shutdown {
    /// The sender will receive no more data.
    pub const RCV: u32 = 1;
    /// The sender will send no more data.
    pub const SEND: u32 = 2;
    pub const BOTH: u32 = RCV | SEND;
}

/// Why a packet could not be read from or written to the guest.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PacketError {
    #[error("descriptor chain does not describe guest memory")]
    BadChain,
    #[error("header is {0} bytes, shorter than {HDR_LEN}")]
    ShortHeader(usize),
    #[error("payload length {0} exceeds the {MAX_PAYLOAD}-byte limit")]
    TooLong(u32),
    #[error("payload length {len} exceeds the {avail} bytes the chain holds")]
    Truncated { len: u32, avail: usize },
    #[error("socket type {0} is not stream")]
    BadType(u16),
    #[error("unknown operation {0}")]
    BadOp(u16),
    #[error("payload on a {0} packet")]
    UnexpectedPayload(u16),
    #[error("rx buffer of {0} bytes cannot hold a header")]
    SmallRxBuffer(usize),
    #[error("cannot copy the packet into guest memory")]
    GuestWrite,
}

/// struct virtio_vsock_hdr, decoded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Header {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub type_: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

impl Header {
    pub fn from_bytes(b: &[u8; HDR_LEN]) -> Self {
        let u64_at = |i: usize| u64::from_le_bytes(array(&b[i..i + 8]));
        let u32_at = |i: usize| u32::from_le_bytes(array(&b[i..i + 4]));
        let u16_at = |i: usize| u16::from_le_bytes(array(&b[i..i + 2]));
        Self {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            type_: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }

    pub fn to_bytes(&self) -> [u8; HDR_LEN] {
        let mut b = [0u8; HDR_LEN];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }

    /// A header for a packet from the host to the guest; `len` is filled in when the payload
    /// is known.
    pub fn to_guest(guest_cid: u64, host_port: u32, guest_port: u32, op: u16) -> Self {
        Self {
            src_cid: HOST_CID,
            dst_cid: guest_cid,
            src_port: host_port,
            dst_port: guest_port,
            type_: TYPE_STREAM,
            op,
            ..Self::default()
        }
    }

    /// The RST answering this guest packet (ports swapped, no credit).
    pub fn reset_reply(&self) -> Self {
        Self::to_guest(self.src_cid, self.dst_port, self.src_port, op::RST)
    }
}

fn array<const N: usize>(s: &[u8]) -> [u8; N] {
    let mut a = [0u8; N];
    a.copy_from_slice(s);
    a
}

/// A guest packet whose header passed the structural checks.
pub struct TxPacket {
    pub hdr: Header,
    pub payload: Vec<u8>,
}

/// A guest packet that was refused: its header when one could be read (so that the connection
/// it names can be answered with RST), and why.
#[derive(Debug)]
pub struct Rejected {
    pub hdr: Option<Header>,
    pub err: PacketError,
}

/// Reads and checks one tx packet: header complete, stream type, known op, payload only on RW
/// and no longer than the limit and than the chain. Addresses are checked by the caller.
pub fn read_tx(chain: Chain<'_>, mem: &GuestMemoryMmap) -> Result<TxPacket, Rejected> {
    let reject = |hdr, err| Rejected { hdr, err };
    let mut reader = chain
        .reader(mem)
        .map_err(|_| reject(None, PacketError::BadChain))?;
    let avail = reader.available_bytes();
    if avail < HDR_LEN {
        return Err(reject(None, PacketError::ShortHeader(avail)));
    }
    let mut raw = [0u8; HDR_LEN];
    reader
        .read_exact(&mut raw)
        .map_err(|_| reject(None, PacketError::BadChain))?;
    let hdr = Header::from_bytes(&raw);
    let err = |e| reject(Some(hdr), e);
    if hdr.type_ != TYPE_STREAM {
        return Err(err(PacketError::BadType(hdr.type_)));
    }
    if !(op::REQUEST..=op::CREDIT_REQUEST).contains(&hdr.op) {
        return Err(err(PacketError::BadOp(hdr.op)));
    }
    if hdr.op != op::RW && hdr.len != 0 {
        return Err(err(PacketError::UnexpectedPayload(hdr.op)));
    }
    if hdr.len as usize > MAX_PAYLOAD {
        return Err(err(PacketError::TooLong(hdr.len)));
    }
    let rest = reader.available_bytes();
    if hdr.len as usize > rest {
        return Err(err(PacketError::Truncated {
            len: hdr.len,
            avail: rest,
        }));
    }
    let mut payload = vec![0u8; hdr.len as usize];
    reader
        .read_exact(&mut payload)
        .map_err(|_| err(PacketError::BadChain))?;
    Ok(TxPacket { hdr, payload })
}

/// Writes `hdr` and `payload` into an rx chain and returns the bytes written. The caller sized
/// the payload with [`rx_capacity`], so a short chain here is a driver error.
pub fn write_rx(
    chain: Chain<'_>,
    mem: &GuestMemoryMmap,
    hdr: &Header,
    payload: &[u8],
) -> Result<u32, PacketError> {
    let mut writer = chain.writer(mem).map_err(|_| PacketError::BadChain)?;
    let avail = writer.available_bytes();
    if avail < HDR_LEN + payload.len() {
        return Err(PacketError::SmallRxBuffer(avail));
    }
    let mut hdr = *hdr;
    hdr.len = payload.len() as u32;
    writer
        .write_all(&hdr.to_bytes())
        .and_then(|()| writer.write_all(payload))
        .map_err(|_| PacketError::GuestWrite)?;
    Ok((HDR_LEN + payload.len()) as u32)
}

/// Payload bytes an rx chain can carry after the header (at most [`MAX_PAYLOAD`]).
pub fn rx_capacity(chain: &Chain<'_>, mem: &GuestMemoryMmap) -> Result<usize, PacketError> {
    let writer = chain
        .clone()
        .writer(mem)
        .map_err(|_| PacketError::BadChain)?;
    let avail = writer.available_bytes();
    avail
        .checked_sub(HDR_LEN)
        .map(|n| n.min(MAX_PAYLOAD))
        .ok_or(PacketError::SmallRxBuffer(avail))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_little_endian() {
        let hdr = Header {
            src_cid: 3,
            dst_cid: 2,
            src_port: 0x1122_3344,
            dst_port: 80,
            len: 5,
            type_: TYPE_STREAM,
            op: op::RW,
            flags: shutdown::SEND,
            buf_alloc: 65536,
            fwd_cnt: 7,
        };
        let b = hdr.to_bytes();
        assert_eq!(&b[0..8], &3u64.to_le_bytes());
        assert_eq!(&b[16..20], &[0x44, 0x33, 0x22, 0x11]);
        assert_eq!(u16::from_le_bytes([b[30], b[31]]), op::RW);
        assert_eq!(Header::from_bytes(&b), hdr);
    }

    #[test]
    fn reset_reply_swaps_ports_and_addresses_the_sender() {
        let hdr = Header {
            src_cid: 9,
            dst_cid: HOST_CID,
            src_port: 1000,
            dst_port: 52,
            ..Header::default()
        };
        let rst = hdr.reset_reply();
        assert_eq!((rst.src_cid, rst.dst_cid), (HOST_CID, 9));
        assert_eq!((rst.src_port, rst.dst_port), (52, 1000));
        assert_eq!((rst.op, rst.type_, rst.len), (op::RST, TYPE_STREAM, 0));
    }
}
