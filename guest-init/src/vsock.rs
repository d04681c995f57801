//! AF_VSOCK stream sockets: the guest agent's listener and the diagnostic tools' client/server.

use std::io;
use std::os::unix::io::{AsRawFd, FromRawFd, OwnedFd};

/// `IOCTL_VM_SOCKETS_GET_LOCAL_CID` (linux/vm_sockets.h): `_IO(7, 0xb9)`, on /dev/vsock.
const IOCTL_VM_SOCKETS_GET_LOCAL_CID: libc::c_ulong = 0x7b9;

fn addr(cid: u32, port: u32) -> libc::sockaddr_vm {
    // SAFETY: sockaddr_vm is plain data; all-zero is valid before the fields are set.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    addr.svm_cid = cid;
    addr.svm_port = port;
    addr
}

const ADDR_LEN: libc::socklen_t = std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;

fn check(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// A new vsock stream socket (close-on-exec: started processes must not inherit it).
pub fn socket() -> io::Result<OwnedFd> {
    // SAFETY: creating a socket has no memory preconditions.
    let fd =
        check(unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: fd is a fresh socket we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The guest's own CID; `None` when it has no vsock device (the transport answers
/// VMADDR_CID_ANY then) or the kernel has no vsock at all.
pub fn local_cid() -> Option<u32> {
    let dev = std::fs::File::open("/dev/vsock").ok()?;
    let mut cid: u32 = libc::VMADDR_CID_ANY;
    // SAFETY: the ioctl writes one u32 into `cid`, which outlives the call.
    let rc = unsafe {
        libc::ioctl(
            dev.as_raw_fd(),
            IOCTL_VM_SOCKETS_GET_LOCAL_CID as _,
            &mut cid,
        )
    };
    (rc >= 0 && cid != libc::VMADDR_CID_ANY).then_some(cid)
}

/// A socket listening on `port` of every local CID.
pub fn listen(port: u32, backlog: libc::c_int) -> io::Result<OwnedFd> {
    let sock = socket()?;
    let addr = addr(libc::VMADDR_CID_ANY, port);
    // SAFETY: addr is a valid sockaddr_vm of ADDR_LEN bytes.
    check(unsafe { libc::bind(sock.as_raw_fd(), std::ptr::addr_of!(addr).cast(), ADDR_LEN) })?;
    // SAFETY: listen on a bound socket we own.
    check(unsafe { libc::listen(sock.as_raw_fd(), backlog) })?;
    Ok(sock)
}

/// Accepts one connection (close-on-exec), retrying on EINTR.
pub fn accept(listener: &OwnedFd) -> io::Result<OwnedFd> {
    loop {
        // SAFETY: null address pointers are allowed by accept4.
        let fd = unsafe {
            libc::accept4(
                listener.as_raw_fd(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_CLOEXEC,
            )
        };
        match check(fd) {
            // SAFETY: fd is a fresh connected socket we own.
            Ok(fd) => return Ok(unsafe { OwnedFd::from_raw_fd(fd) }),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// Connects to `port` on `cid`.
pub fn connect(cid: u32, port: u32) -> io::Result<OwnedFd> {
    let sock = socket()?;
    let addr = addr(cid, port);
    // SAFETY: addr is a valid sockaddr_vm of ADDR_LEN bytes.
    check(unsafe { libc::connect(sock.as_raw_fd(), std::ptr::addr_of!(addr).cast(), ADDR_LEN) })?;
    Ok(sock)
}
