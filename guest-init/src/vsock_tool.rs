//! Diagnostic vsock subcommands of the husk-init binary (run as `husk-init vsock-...` inside the
//! guest, never as PID 1): the smallest client and server that show the vsock path works.
//!
//!   husk-init vsock-echo PORT        accept one connection on PORT, echo it back until EOF
//!   husk-init vsock-cat CID PORT     connect, send stdin, half-close, print the reply

use std::io::{self, Read, Write};

use crate::vsock;

fn echo(port: u32) -> io::Result<()> {
    let listener = vsock::listen(port, 1)?;
    println!("vsock-echo: listening on port {port}");
    let mut conn = std::fs::File::from(vsock::accept(&listener)?);
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
    let mut conn = std::fs::File::from(vsock::connect(cid, port)?);
    let mut input = Vec::new();
    io::stdin().read_to_end(&mut input)?;
    conn.write_all(&input)?;
    rustix::net::shutdown(&conn, rustix::net::Shutdown::Write)?;
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
