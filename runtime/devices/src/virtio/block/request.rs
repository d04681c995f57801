//! One virtio-blk request (virtio 1.2 §5.2.6): parsed from a descriptor chain and checked
//! completely (header, direction, lengths, sector range) before any I/O touches the backend.
//! Framing is not assumed (§2.7.4): the header, data and status may be split across
//! descriptors in any way, as long as device-readable ones come before device-writable ones.

use std::io::{Read, Write};

use virtio_queue::{Reader, Writer};
use vm_memory::ByteValued;

use super::backend::DiskBackend;
use crate::virtio::queue_worker::Chain;
use crate::virtio::DeviceCounters;
use crate::GuestMemoryMmap;

pub const SECTOR_SIZE: u64 = 512;
/// Bytes moved per backend call: requests stream through a buffer this large, never more.
const CHUNK: usize = 128 * 1024;
/// Length of the GET_ID answer (§5.2.6: VIRTIO_BLK_ID_BYTES).
pub const ID_BYTES: usize = 20;

/// Request types (§5.2.6).
mod kind {
    pub const IN: u32 = 0;
    pub const OUT: u32 = 1;
    pub const FLUSH: u32 = 4;
    pub const GET_ID: u32 = 8;
    pub const DISCARD: u32 = 11;
    pub const WRITE_ZEROES: u32 = 13;
}

/// Status byte values (§5.2.6).
pub mod status {
    pub const OK: u8 = 0;
    pub const IOERR: u8 = 1;
    pub const UNSUPP: u8 = 2;
}

#[derive(Clone, Copy, Default)]
#[repr(C)]
struct RequestHeader {
    kind: u32,
    reserved: u32,
    sector: u64,
}
// SAFETY: plain integers, no padding, any bit pattern is valid.
unsafe impl ByteValued for RequestHeader {}

#[derive(Clone, Copy, Default)]
#[repr(C)]
struct DiscardSegment {
    sector: u64,
    num_sectors: u32,
    flags: u32,
}
// SAFETY: plain integers, no padding, any bit pattern is valid.
unsafe impl ByteValued for DiscardSegment {}
const DISCARD_FLAG_UNMAP: u32 = 1;

/// What the device is and allows; fixed for the device's life.
pub struct DiskLimits {
    pub capacity_bytes: u64,
    pub read_only: bool,
    /// Most descriptors a request may use (seg_max + header + status).
    pub max_descriptors: usize,
    pub id: [u8; ID_BYTES],
}

/// Serves one chain and returns the number of bytes written into guest buffers (used length).
pub fn serve(
    chain: Chain<'_>,
    mem: &GuestMemoryMmap,
    disk: &dyn DiskBackend,
    limits: &DiskLimits,
    counters: &DeviceCounters,
) -> u32 {
    let Some((mut reader, mut data_out, mut status_out)) = split_chain(chain, mem, limits) else {
        // No status byte to answer in: return the chain untouched.
        counters.add(&counters.errors, 1);
        return 0;
    };
    let outcome = execute(&mut reader, &mut data_out, disk, limits, counters);
    let written = data_out.bytes_written();
    let code = match outcome {
        Ok(()) => status::OK,
        Err(code) => {
            counters.add(&counters.errors, 1);
            code
        }
    };
    if status_out.write_all(&[code]).is_err() {
        counters.add(&counters.errors, 1);
        return written as u32;
    }
    counters.add(&counters.requests, 1);
    (written + 1) as u32
}

/// Splits a chain into its readable part, its writable data part and the status byte (the
/// last writable byte). `None` when the chain is malformed beyond answering.
fn split_chain<'m>(
    chain: Chain<'m>,
    mem: &'m GuestMemoryMmap,
    limits: &DiskLimits,
) -> Option<(Reader<'m>, Writer<'m>, Writer<'m>)> {
    let mut seen_writable = false;
    let mut count = 0;
    for desc in chain.clone() {
        count += 1;
        if count > limits.max_descriptors {
            return None;
        }
        if desc.is_write_only() {
            seen_writable = true;
        } else if seen_writable {
            return None; // readable after writable (§2.7.4.2)
        }
    }
    let reader = chain.clone().reader(mem).ok()?;
    let mut writer = chain.writer(mem).ok()?;
    let data_len = writer.available_bytes().checked_sub(1)?;
    let status_out = writer.split_at(data_len).ok()?;
    Some((reader, writer, status_out))
}

fn execute(
    reader: &mut Reader<'_>,
    data_out: &mut Writer<'_>,
    disk: &dyn DiskBackend,
    limits: &DiskLimits,
    counters: &DeviceCounters,
) -> Result<(), u8> {
    let header: RequestHeader = reader.read_obj().map_err(|_| status::IOERR)?;
    match header.kind {
        kind::IN => {
            let len = data_out.available_bytes() as u64;
            let offset = checked_range(header.sector, len, limits)?;
            let mut buf = vec![0u8; CHUNK.min(len as usize)];
            let mut done = 0u64;
            while done < len {
                let n = (len - done).min(CHUNK as u64) as usize;
                disk.read_at(&mut buf[..n], offset + done)
                    .map_err(|_| status::IOERR)?;
                data_out.write_all(&buf[..n]).map_err(|_| status::IOERR)?;
                done += n as u64;
            }
            counters.add(&counters.bytes_written, len);
            Ok(())
        }
        kind::OUT => {
            if limits.read_only {
                return Err(status::IOERR);
            }
            let len = reader.available_bytes() as u64;
            let offset = checked_range(header.sector, len, limits)?;
            let mut buf = vec![0u8; CHUNK.min(len as usize)];
            let mut done = 0u64;
            while done < len {
                let n = (len - done).min(CHUNK as u64) as usize;
                reader
                    .read_exact(&mut buf[..n])
                    .map_err(|_| status::IOERR)?;
                disk.write_at(&buf[..n], offset + done)
                    .map_err(|_| status::IOERR)?;
                done += n as u64;
            }
            counters.add(&counters.bytes_read, len);
            Ok(())
        }
        kind::FLUSH => disk.flush().map_err(|_| status::IOERR),
        kind::GET_ID => {
            let n = ID_BYTES.min(data_out.available_bytes());
            data_out
                .write_all(&limits.id[..n])
                .map_err(|_| status::IOERR)
        }
        kind::DISCARD | kind::WRITE_ZEROES => {
            if limits.read_only {
                return Err(status::IOERR);
            }
            // One segment per request: the device advertises max_*_seg = 1.
            if reader.available_bytes() != std::mem::size_of::<DiscardSegment>() {
                return Err(status::UNSUPP);
            }
            let seg: DiscardSegment = reader.read_obj().map_err(|_| status::IOERR)?;
            let len = u64::from(seg.num_sectors) * SECTOR_SIZE;
            let offset = checked_range(seg.sector, len, limits)?;
            let result = if header.kind == kind::DISCARD {
                if seg.flags != 0 {
                    return Err(status::UNSUPP); // §5.2.6.2: flags are reserved for discard
                }
                disk.discard(offset, len)
            } else {
                if seg.flags & !DISCARD_FLAG_UNMAP != 0 {
                    return Err(status::UNSUPP);
                }
                disk.write_zeroes(offset, len, seg.flags & DISCARD_FLAG_UNMAP != 0)
            };
            result.map_err(|e| {
                if e.kind() == std::io::ErrorKind::Unsupported {
                    status::UNSUPP
                } else {
                    status::IOERR
                }
            })
        }
        _ => Err(status::UNSUPP),
    }
}

/// Byte offset of `sector` if `len` bytes from there lie within the disk and `len` is whole
/// sectors.
fn checked_range(sector: u64, len: u64, limits: &DiskLimits) -> Result<u64, u8> {
    if len % SECTOR_SIZE != 0 {
        return Err(status::IOERR);
    }
    let offset = sector.checked_mul(SECTOR_SIZE).ok_or(status::IOERR)?;
    let end = offset.checked_add(len).ok_or(status::IOERR)?;
    if end > limits.capacity_bytes {
        return Err(status::IOERR);
    }
    Ok(offset)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(sectors: u64) -> DiskLimits {
        DiskLimits {
            capacity_bytes: sectors * SECTOR_SIZE,
            read_only: false,
            max_descriptors: 8,
            id: [0; ID_BYTES],
        }
    }

    #[test]
    fn ranges_must_be_whole_sectors_inside_the_disk() {
        let l = limits(8);
        assert_eq!(checked_range(0, 8 * 512, &l), Ok(0));
        assert_eq!(checked_range(7, 512, &l), Ok(7 * 512));
        assert_eq!(checked_range(7, 1024, &l), Err(status::IOERR));
        assert_eq!(checked_range(8, 0, &l), Ok(8 * 512));
        assert_eq!(checked_range(0, 100, &l), Err(status::IOERR));
        assert_eq!(checked_range(u64::MAX, 512, &l), Err(status::IOERR));
        assert_eq!(checked_range(u64::MAX / 512, 512, &l), Err(status::IOERR));
    }
}
