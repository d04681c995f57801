//! AF_VSOCK stream sockets: the guest agent's listener and the diagnostic tools' client/server.

use std::io;
use std::os::unix::io::OwnedFd;

use rustix::ioctl::{opcode, Getter, Opcode};
use rustix::net::addr::{SocketAddrArg, SocketAddrLen, SocketAddrOpaque};
use rustix::net::AddressFamily;
use rustix::net::{SocketFlags, SocketType};

/// `IOCTL_VM_SOCKETS_GET_LOCAL_CID` (linux/vm_sockets.h): `_IO(7, 0xb9)`, on /dev/vsock.
const IOCTL_VM_SOCKETS_GET_LOCAL_CID: Opcode = opcode::none(7, 0xb9);
/// `VMADDR_CID_ANY` (linux/vm_sockets.h).
const VMADDR_CID_ANY: u32 = u32::MAX;

/// `struct sockaddr_vm` (linux/vm_sockets.h); rustix has no vsock address type.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct VsockAddr {
    family: u16,
    reserved1: u16,
    port: u32,
    cid: u32,
    flags: u8,
    zero: [u8; 3],
}

impl VsockAddr {
    fn new(cid: u32, port: u32) -> Self {
        Self {
            family: AddressFamily::VSOCK.as_raw(),
            reserved1: 0,
            port,
            cid,
            flags: 0,
            zero: [0; 3],
        }
    }
}

// SAFETY: `with_sockaddr` passes a pointer to the whole struct, readable for its size, and the
// struct has the layout of the kernel's sockaddr_vm (checked by a test against libc's).
unsafe impl SocketAddrArg for VsockAddr {
    unsafe fn with_sockaddr<R>(
        &self,
        f: impl FnOnce(*const SocketAddrOpaque, SocketAddrLen) -> R,
    ) -> R {
        f(
            std::ptr::from_ref(self).cast(),
            std::mem::size_of::<Self>() as SocketAddrLen,
        )
    }
}

/// A new vsock stream socket (close-on-exec: started processes must not inherit it).
pub fn socket() -> io::Result<OwnedFd> {
    Ok(rustix::net::socket_with(
        AddressFamily::VSOCK,
        SocketType::STREAM,
        SocketFlags::CLOEXEC,
        None,
    )?)
}

/// The guest's own CID; `None` when it has no vsock device (the transport answers
/// VMADDR_CID_ANY then) or the kernel has no vsock at all.
pub fn local_cid() -> Option<u32> {
    let dev = std::fs::File::open("/dev/vsock").ok()?;
    // SAFETY: this ioctl writes one u32, the type the getter reads back.
    let getter = unsafe { Getter::<IOCTL_VM_SOCKETS_GET_LOCAL_CID, u32>::new() };
    // SAFETY: the opcode is the one named above, on /dev/vsock, which takes it.
    let cid = unsafe { rustix::ioctl::ioctl(&dev, getter) }.ok()?;
    (cid != VMADDR_CID_ANY).then_some(cid)
}

/// A socket listening on `port` of every local CID.
pub fn listen(port: u32, backlog: i32) -> io::Result<OwnedFd> {
    let sock = socket()?;
    rustix::net::bind(&sock, &VsockAddr::new(VMADDR_CID_ANY, port))?;
    rustix::net::listen(&sock, backlog)?;
    Ok(sock)
}

/// Accepts one connection (close-on-exec), retrying on EINTR.
pub fn accept(listener: &OwnedFd) -> io::Result<OwnedFd> {
    loop {
        match rustix::net::accept_with(listener, SocketFlags::CLOEXEC) {
            Ok(conn) => return Ok(conn),
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
}

/// Connects to `port` on `cid`.
pub fn connect(cid: u32, port: u32) -> io::Result<OwnedFd> {
    let sock = socket()?;
    rustix::net::connect(&sock, &VsockAddr::new(cid, port))?;
    Ok(sock)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_address_and_constants_match_the_kernel_headers() {
        assert_eq!(
            std::mem::size_of::<VsockAddr>(),
            std::mem::size_of::<libc::sockaddr_vm>()
        );
        assert_eq!(
            std::mem::offset_of!(VsockAddr, port),
            std::mem::offset_of!(libc::sockaddr_vm, svm_port)
        );
        assert_eq!(
            std::mem::offset_of!(VsockAddr, cid),
            std::mem::offset_of!(libc::sockaddr_vm, svm_cid)
        );
        assert_eq!(VMADDR_CID_ANY, libc::VMADDR_CID_ANY);
        assert_eq!(IOCTL_VM_SOCKETS_GET_LOCAL_CID, 0x7b9);
        assert_eq!(
            VsockAddr::new(3, 5).family,
            libc::AF_VSOCK as libc::sa_family_t
        );
    }
}
