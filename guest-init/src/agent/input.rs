//! The host-to-process half of an exec session: stdin bytes, end of stdin, window sizes and
//! signals, read from the connection until it ends.
//!
//! Stdin is written without blocking and buffered up to [`MAX_PENDING`] bytes, so a process that
//! does not read its stdin cannot stop a later `signal` or `resize` frame, nor hide that the
//! host went away. Past that bound no more frames are read until the process takes some bytes.

use std::fs::File;
use std::io;
use std::os::unix::io::OwnedFd;

use husk_proto::agent::{host_message::Msg, HostMessage};
use husk_proto::frame;
use rustix::event::{PollFd, PollFlags};

use super::fd;
use super::stdio;

/// Stdin bytes held for a process that does not read them yet, before frames are left unread.
pub const MAX_PENDING: usize = 1 << 20;
/// Highest signal number (SIGRTMAX on Linux).
const MAX_SIGNAL: i32 = 64;

/// Why the loop ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InputEnd {
    /// The host closed the connection (or its sending half), or it failed.
    HostGone,
    /// The host sent something that does not belong on an exec connection.
    Malformed(String),
}

/// What the loop acts on besides stdin.
pub trait Process {
    /// Delivers `sig` (1..=64) to the process.
    fn signal(&self, sig: i32);
}

/// The process's stdin as the loop drives it.
struct Stdin {
    fd: Option<OwnedFd>,
    /// The pty master when the process runs on a terminal.
    terminal: Option<OwnedFd>,
    pending: Vec<u8>,
    /// close_stdin arrived: close once `pending` is written.
    closing: bool,
}

impl Stdin {
    fn accepts(&self) -> bool {
        self.fd.is_some() && !self.closing
    }

    /// Writes what the process takes without blocking. A process that closed its stdin gets
    /// nothing more.
    fn flush(&mut self) {
        let mut failed = false;
        if let Some(fd) = &self.fd {
            while !self.pending.is_empty() {
                match fd::write(fd, &self.pending) {
                    Ok(n) => {
                        self.pending.drain(..n);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(_) => {
                        failed = true;
                        break;
                    }
                }
            }
        }
        if failed || self.fd.is_none() {
            self.pending.clear();
            self.fd = None;
        }
        if self.closing && self.pending.is_empty() {
            // A pipe's reader sees EOF once our end closes; a terminal's reader got the EOF
            // character (the master itself stays open for the output).
            self.fd = None;
        }
    }

    fn close(&mut self) {
        if !self.accepts() {
            return;
        }
        if let Some(master) = &self.terminal {
            self.pending.push(stdio::eof_char(master));
        }
        self.closing = true;
    }
}

/// Runs the loop on `conn` until the host is gone or misbehaves.
pub fn run(
    conn: &mut File,
    stdin: OwnedFd,
    terminal: Option<OwnedFd>,
    process: &dyn Process,
) -> InputEnd {
    let mut stdin = Stdin {
        fd: Some(stdin),
        terminal,
        pending: Vec::new(),
        closing: false,
    };
    loop {
        stdin.flush();
        let reading = stdin.pending.len() < MAX_PENDING;
        let writing = !stdin.pending.is_empty();
        let host_events = if reading {
            PollFlags::IN
        } else {
            PollFlags::empty()
        } | PollFlags::RDHUP;
        let host_fd = PollFd::new(&*conn, host_events);
        // Stdin is only watched while bytes wait for it.
        let (mut one, mut two);
        let fds: &mut [PollFd<'_>] = match (&stdin.fd, writing) {
            (Some(fd), true) => {
                two = [host_fd, PollFd::new(fd, PollFlags::OUT)];
                &mut two
            }
            _ => {
                one = [host_fd];
                &mut one
            }
        };
        if fd::poll(fds).is_err() {
            return InputEnd::HostGone;
        }
        let host = fds[0].revents();
        if host.is_empty() {
            continue; // only stdin became writable
        }
        if !reading {
            // Paused: only an end of the connection matters now.
            if host.intersects(PollFlags::RDHUP | PollFlags::HUP | PollFlags::ERR) {
                return InputEnd::HostGone;
            }
            continue;
        }
        let message = match frame::read::<HostMessage, _>(conn) {
            Ok(Some(message)) => message,
            Ok(None) => return InputEnd::HostGone,
            Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                return InputEnd::Malformed(format!("bad frame: {e}"))
            }
            Err(_) => return InputEnd::HostGone,
        };
        match message.msg {
            Some(Msg::Stdin(bytes)) => {
                if stdin.accepts() {
                    stdin.pending.extend_from_slice(&bytes);
                }
            }
            Some(Msg::CloseStdin(close)) => {
                if close {
                    stdin.close();
                }
            }
            Some(Msg::Resize(window)) => {
                if let Some(master) = &stdin.terminal {
                    // A size the terminal refuses changes nothing; the session goes on.
                    let _ = stdio::set_window_size(master, window);
                }
            }
            Some(Msg::Signal(sig)) if (1..=MAX_SIGNAL).contains(&sig) => process.signal(sig),
            Some(Msg::Signal(sig)) => {
                return InputEnd::Malformed(format!("signal {sig} is not a signal number"))
            }
            Some(other) => {
                return InputEnd::Malformed(format!(
                "{} is not allowed on an exec connection (only stdin, close_stdin, resize, signal)",
                super::request_name(&other)
            ))
            }
            None => return InputEnd::Malformed("empty frame".into()),
        }
    }
}
