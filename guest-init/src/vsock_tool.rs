//! Diagnostic vsock subcommands of the husk-init binary (run as `husk-init vsock-...` inside the
//! guest, never as PID 1): the smallest client and server that show the vsock path works.
//!
//!   husk-init vsock-echo PORT        accept one connection on PORT, echo it back until EOF
//!   husk-init vsock-cat CID PORT     connect, send stdin, half-close, print the reply

use std::io::{self, Read, Write};
use std::os::unix::io::{FromRawFd, OwnedFd, RawFd};

fn vsock_addr(cid: u32, port: u32) -> libc::sockaddr_vm {
    // SAFETY: sockaddr_vm is plain data; all-zero is valid before the fields are set.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    addr.svm_cid = cid;
    addr.svm_port = port;
    addr
}

fn socket() -> io::Result<OwnedFd> {
    // SAFETY: creating a socket has no memory preconditions.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh socket we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn check(rc: libc::c_int) -> io::Result<()> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn as_file(fd: OwnedFd) -> std::fs::File {
    std::fs::File::from(fd)
}

fn raw(fd: &OwnedFd) -> RawFd {
    std::os::unix::io::AsRawFd::as_raw_fd(fd)
}

fn echo(port: u32) -> io::Result<()> {
    let listener = socket()?;
    let addr = vsock_addr(libc::VMADDR_CID_ANY, port);
    let len = std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;
    // SAFETY: addr is a valid sockaddr_vm of `len` bytes.
    check(unsafe { libc::bind(raw(&listener), std::ptr::addr_of!(addr).cast(), len) })?;
    // SAFETY: listen on a bound socket we own.
    check(unsafe { libc::listen(raw(&listener), 1) })?;
    println!("vsock-echo: listening on port {port}");
    // SAFETY: null address pointers are allowed by accept.
    let conn = unsafe { libc::accept(raw(&listener), std::ptr::null_mut(), std::ptr::null_mut()) };
    check(conn)?;
    // SAFETY: conn is a fresh connected socket we own.
    let mut conn = as_file(unsafe { OwnedFd::from_raw_fd(conn) });
    let mut buf = [0u8; 4096];
    loop {
        let n = conn.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        conn.write_all(&buf[..n])?;
    }
}

fn cat(cid: u32, port: u32) -> io::Result<()> {
    let sock = socket()?;
    let addr = vsock_addr(cid, port);
    let len = std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;
    // SAFETY: addr is a valid sockaddr_vm of `len` bytes.
    check(unsafe { libc::connect(raw(&sock), std::ptr::addr_of!(addr).cast(), len) })?;
    let fd = raw(&sock);
    let mut conn = as_file(sock);
    let mut input = Vec::new();
    io::stdin().read_to_end(&mut input)?;
    conn.write_all(&input)?;
    // SAFETY: half-closing a connected socket we own.
    check(unsafe { libc::shutdown(fd, libc::SHUT_WR) })?;
    let mut reply = Vec::new();
    conn.read_to_end(&mut reply)?;
    io::stdout().write_all(&reply)
}

/// Runs a `vsock-*` subcommand; `None` when `args` is not one.
pub fn run(args: &[String]) -> Option<i32> {
    let number = |s: &String| s.parse::<u32>().ok();
    let result = match args {
        [cmd, port] if cmd == "vsock-echo" => number(port).map(echo),
        [cmd, cid, port] if cmd == "vsock-cat" => {
            number(cid).zip(number(port)).map(|(c, p)| cat(c, p))
        }
        [cmd, ..] if cmd.starts_with("vsock-") => {
            eprintln!("usage: husk-init vsock-echo PORT | husk-init vsock-cat CID PORT");
            return Some(2);
        }
        _ => return None,
    };
    Some(match result {
        Some(Ok(())) => 0,
        Some(Err(e)) => {
            eprintln!("husk-init: {}: {e}", args[0]);
            1
        }
        None => {
            eprintln!("husk-init: {}: bad number", args[0]);
            2
        }
    })
}
