//! One virtio-blk request (virtio 1.2 §5.2.6): parsed from a descriptor chain and checked
//! completely (header, direction, lengths, sector range) before any I/O touches the backend.
//! Framing is not assumed (§2.7.4): the header, data and status may be split across
//! descriptors in any way, as long as device-readable ones come before device-writable ones.
//! Data moves between the disk and guest memory with one preadv/pwritev, without a copy.

use vm_memory::ByteValued;

use super::backend::DiskBackend;
use super::guest_buffers::GuestBuffers;
use crate::virtio::queue_worker::Chain;
use crate::virtio::DeviceCounters;
use crate::GuestMemoryMmap;

pub const SECTOR_SIZE: u64 = 512;
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

#[derive(Clone, Copy, Default, Debug)]
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

/// A request split into its parts; every range is inside guest memory.
struct Request {
    header: RequestHeader,
    /// Device-readable bytes after the header (OUT data, discard segments).
    payload: GuestBuffers,
    /// Device-writable bytes before the status byte (IN data, the GET_ID answer).
    data_in: GuestBuffers,
    status: GuestBuffers,
}

/// Serves one chain and returns the number of bytes written into guest buffers (used length).
pub fn serve(
    chain: Chain<'_>,
    mem: &GuestMemoryMmap,
    disk: &dyn DiskBackend,
    limits: &DiskLimits,
    counters: &DeviceCounters,
) -> u32 {
    let Some(mut request) = parse(chain, mem, limits) else {
        // No header or no status byte to answer in: return the chain untouched.
        counters.add(&counters.errors, 1);
        return 0;
    };
    let (code, written) = match execute(&mut request, mem, disk, limits, counters) {
        Ok(written) => (status::OK, written),
        Err(code) => {
            counters.add(&counters.errors, 1);
            (code, 0)
        }
    };
    if request.status.write_from(mem, &[code]).is_none() {
        counters.add(&counters.errors, 1);
        return 0;
    }
    counters.add(&counters.requests, 1);
    (written + 1) as u32
}

/// Splits a chain into header, payload, data and status byte (the last writable byte).
/// `None` when the chain is malformed beyond answering: too many descriptors, a readable
/// descriptor after a writable one (§2.7.4.2), a buffer outside guest memory, no room for the
/// header or the status byte.
fn parse(chain: Chain<'_>, mem: &GuestMemoryMmap, limits: &DiskLimits) -> Option<Request> {
    let (mut readable, mut writable) = (GuestBuffers::default(), GuestBuffers::default());
    for (count, desc) in chain.enumerate() {
        if count >= limits.max_descriptors {
            return None;
        }
        let len = usize::try_from(desc.len()).ok()?;
        if desc.is_write_only() {
            writable.push(mem, desc.addr(), len)?;
        } else if writable.is_empty() {
            readable.push(mem, desc.addr(), len)?;
        } else {
            return None;
        }
    }
    let mut header = RequestHeader::default();
    readable
        .split_front(header.as_slice().len())?
        .read_into(mem, header.as_mut_slice())?;
    let status = writable.split_back(1)?;
    Some(Request {
        header,
        payload: readable,
        data_in: writable,
        status,
    })
}

/// Carries out a parsed request; returns the bytes written into `data_in`.
fn execute(
    request: &mut Request,
    mem: &GuestMemoryMmap,
    disk: &dyn DiskBackend,
    limits: &DiskLimits,
    counters: &DeviceCounters,
) -> Result<usize, u8> {
    let header = request.header;
    match header.kind {
        kind::IN => {
            let len = request.data_in.len();
            let offset = checked_range(header.sector, len as u64, limits)?;
            let mut iovecs = request.data_in.iovecs(mem).ok_or(status::IOERR)?;
            disk.read_vectored_at(&mut iovecs, offset)
                .map_err(|_| status::IOERR)?;
            counters.add(&counters.bytes_written, len as u64);
            Ok(len)
        }
        kind::OUT => {
            if limits.read_only {
                return Err(status::IOERR);
            }
            let len = request.payload.len();
            let offset = checked_range(header.sector, len as u64, limits)?;
            let mut iovecs = request.payload.iovecs(mem).ok_or(status::IOERR)?;
            disk.write_vectored_at(&mut iovecs, offset)
                .map_err(|_| status::IOERR)?;
            counters.add(&counters.bytes_read, len as u64);
            Ok(0)
        }
        kind::FLUSH => disk.flush().map(|()| 0).map_err(|_| status::IOERR),
        kind::GET_ID => {
            let n = ID_BYTES.min(request.data_in.len());
            request
                .data_in
                .write_from(mem, &limits.id[..n])
                .ok_or(status::IOERR)?;
            Ok(n)
        }
        kind::DISCARD | kind::WRITE_ZEROES => {
            if limits.read_only {
                return Err(status::IOERR);
            }
            // One segment per request: the device advertises max_*_seg = 1.
            let mut seg = DiscardSegment::default();
            if request.payload.len() != seg.as_slice().len() {
                return Err(status::UNSUPP);
            }
            request
                .payload
                .read_into(mem, seg.as_mut_slice())
                .ok_or(status::IOERR)?;
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
            result.map(|()| 0).map_err(|e| {
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
