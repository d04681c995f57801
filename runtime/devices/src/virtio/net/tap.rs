//! Linux tap devices: the host end of virtio-net. Frames carry a 12-byte virtio-net header
//! (IFF_VNET_HDR), so checksum and segmentation offloads pass between guest and host kernel
//! without the VMM touching packet contents.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::io::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// Size of struct virtio_net_hdr_v1 (virtio 1.2 §5.1.6), the header every frame carries.
pub const VNET_HDR_LEN: usize = 12;

// From <linux/if_tun.h>.
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
pub const TUN_F_CSUM: u32 = 0x01;
pub const TUN_F_TSO4: u32 = 0x02;
pub const TUN_F_TSO6: u32 = 0x04;

/// Where a virtio-net device sends and receives frames.
pub trait NetBackend: Send {
    /// Reads one frame (virtio-net header first). `WouldBlock` when none is waiting.
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize>;
    /// Sends one frame (virtio-net header first).
    fn send(&mut self, frame: &[u8]) -> io::Result<()>;
    /// Tells the host which offloads the guest accepts in received frames (TUN_F_*).
    fn set_offloads(&mut self, flags: u32) -> io::Result<()>;
    /// Whether the backend takes and gives frames with checksum offload and segmentation
    /// pending (the virtio-net header's flags and GSO fields honoured). When not, the device
    /// offers the guest no CSUM, GUEST_CSUM or TSO feature, so every frame is whole.
    fn takes_vnet_offloads(&self) -> bool;
    /// The fd to watch for readability, if any.
    fn fd(&self) -> Option<RawFd>;
}

/// An open tap device.
pub struct Tap {
    file: File,
    name: String,
}

#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

impl Tap {
    /// Creates (or attaches to, when it exists and we may) the tap `name`, with virtio-net
    /// headers. A tap created this way is not persistent: it vanishes when the last fd closes.
    pub fn open(name: &str) -> io::Result<Self> {
        if name.is_empty() || name.len() >= libc::IFNAMSIZ {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("bad tap name {name:?}"),
            ));
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")?;
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF reads and writes an ifreq, which IfReq matches in size and layout.
        if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF as _, &mut req) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let len = req
            .name
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(req.name.len());
        let name = String::from_utf8_lossy(&req.name[..len]).into_owned();
        Self::configure(file, name)
    }

    /// Adopts an already-configured tap fd (handed over by the process that created it).
    ///
    /// # Safety
    /// `fd` must be an open tap fd that nothing else will close.
    pub unsafe fn from_raw_fd(fd: RawFd, name: String) -> io::Result<Self> {
        // SAFETY: the caller guarantees fd is an open tap fd we now own.
        let file = unsafe { File::from_raw_fd(fd) };
        Self::configure(file, name)
    }

    fn configure(file: File, name: String) -> io::Result<Self> {
        let hdr_len = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads an int through the pointer.
        if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETVNETHDRSZ as _, &hdr_len) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let flags = rustix::fs::fcntl_getfl(&file)?;
        rustix::fs::fcntl_setfl(&file, flags | rustix::fs::OFlags::NONBLOCK)?;
        Ok(Self { file, name })
    }

    /// Interface name on the host.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Gives up ownership of the fd (to pass it to another process).
    pub fn into_fd(self) -> OwnedFd {
        self.file.into()
    }
}

impl NetBackend for Tap {
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.file.read(buf)
    }
    fn send(&mut self, frame: &[u8]) -> io::Result<()> {
        // A tap takes a whole frame per write or none of it.
        let n = self.file.write(frame)?;
        if n != frame.len() {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "short write to tap",
            ));
        }
        Ok(())
    }
    fn set_offloads(&mut self, flags: u32) -> io::Result<()> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value.
        if unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                TUNSETOFFLOAD as _,
                flags as libc::c_ulong,
            )
        } != 0
        {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
    fn takes_vnet_offloads(&self) -> bool {
        true
    }
    fn fd(&self) -> Option<RawFd> {
        Some(self.file.as_raw_fd())
    }
}
