//! The standard streams of an exec'd process: three pipes, or a pseudo-terminal; and the pump
//! that turns one output stream into frames.

use std::io;
use std::os::unix::io::{AsFd, OwnedFd};

use rustix::pty::OpenptFlags;
use rustix::termios::{SpecialCodeIndex, Winsize};

use husk_proto::agent::guest_message::Msg;
use husk_proto::agent::WindowSize;

use super::fd;
use super::sink::Sink;

/// Largest chunk of output per frame.
pub const CHUNK: usize = 32 * 1024;

/// Which output frame a stream's bytes go into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

/// The agent's ends of a process's streams.
#[derive(Debug)]
pub struct ParentSide {
    /// Where the host's stdin bytes go (non-blocking).
    pub stdin: OwnedFd,
    /// What the process writes: stdout and stderr, or the terminal (as stdout).
    pub outputs: Vec<(Stream, OwnedFd)>,
    /// The pty master, for window sizes and the end-of-file character; `None` without a tty.
    pub terminal: Option<OwnedFd>,
}

/// The process's ends, for `Command::stdin/stdout/stderr`.
#[derive(Debug)]
pub struct ChildSide {
    pub stdin: OwnedFd,
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
}

/// Three pipes.
pub fn pipes() -> io::Result<(ParentSide, ChildSide)> {
    let (child_in, parent_in) = fd::pipe()?;
    let (parent_out, child_out) = fd::pipe()?;
    let (parent_err, child_err) = fd::pipe()?;
    // Our write end only: a process that does not read must not block the session.
    fd::set_nonblocking(&parent_in)?;
    Ok((
        ParentSide {
            stdin: parent_in,
            outputs: vec![(Stream::Stdout, parent_out), (Stream::Stderr, parent_err)],
            terminal: None,
        },
        ChildSide {
            stdin: child_in,
            stdout: child_out,
            stderr: child_err,
        },
    ))
}

/// A new pseudo-terminal of `window` size: the process gets the slave on all three streams.
pub fn pty(window: Option<WindowSize>) -> io::Result<(ParentSide, ChildSide)> {
    let flags = OpenptFlags::RDWR | OpenptFlags::NOCTTY | OpenptFlags::CLOEXEC;
    // posix_openpt: /dev/ptmx; unlockpt: TIOCSPTLCK with 0.
    let master = rustix::pty::openpt(flags)?;
    rustix::pty::unlockpt(&master)?;
    if let Some(window) = window {
        set_window_size(&master, window)?;
    }
    // TIOCGPTPEER opens the slave from the master itself: no path lookup in /dev/pts.
    let slave = rustix::pty::ioctl_tiocgptpeer(&master, flags)?;
    // The master is shared by the pump (reads) and the input loop (writes): neither may block
    // the other.
    fd::set_nonblocking(&master)?;
    Ok((
        ParentSide {
            stdin: master.try_clone()?,
            outputs: vec![(Stream::Stdout, master.try_clone()?)],
            terminal: Some(master),
        },
        ChildSide {
            stdin: slave.try_clone()?,
            stdout: slave.try_clone()?,
            stderr: slave,
        },
    ))
}

/// TIOCSWINSZ; the kernel sends SIGWINCH to the terminal's foreground process group.
pub fn set_window_size(master: &impl AsFd, window: WindowSize) -> io::Result<()> {
    let clamp = |v: u32| u16::try_from(v).unwrap_or(u16::MAX);
    let size = Winsize {
        ws_row: clamp(window.rows),
        ws_col: clamp(window.cols),
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    Ok(rustix::termios::tcsetwinsize(master, size)?)
}

/// The terminal's end-of-file character (VEOF, normally ^D).
pub fn eof_char(master: &impl AsFd) -> u8 {
    match rustix::termios::tcgetattr(master) {
        Ok(termios) => termios.special_codes[SpecialCodeIndex::VEOF],
        Err(_) => 0x04,
    }
}

/// Copies `source` into `stream` frames until it ends (EOF; EIO for a pty master once every
/// slave is closed). Output the host no longer takes is still read, and dropped, so the process
/// never blocks on a full pipe.
pub fn pump(source: OwnedFd, stream: Stream, sink: &Sink) {
    let mut buf = vec![0u8; CHUNK];
    loop {
        match fd::read(&source, &mut buf) {
            Ok(0) => return,
            Ok(n) => {
                let bytes = buf[..n].to_vec();
                sink.send(match stream {
                    Stream::Stdout => Msg::Stdout(bytes),
                    Stream::Stderr => Msg::Stderr(bytes),
                });
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if fd::wait_readable(&source).is_err() {
                    return;
                }
            }
            Err(_) => return,
        }
    }
}
