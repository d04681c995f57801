//! The local terminal for `husk exec -t`: raw mode while the remote process runs, and its size.

use std::io;

/// Puts stdin's terminal in raw mode until dropped.
pub struct RawMode {
    saved: libc::termios,
}

impl RawMode {
    /// `Ok(None)` when stdin is not a terminal.
    pub fn enable() -> io::Result<Option<Self>> {
        if !is_terminal(0) {
            return Ok(None);
        }
        // SAFETY: termios is plain data; tcgetattr fills it for fd 0.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: fd 0 is a terminal; the pointer is to a local.
        if unsafe { libc::tcgetattr(0, &mut saved) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let mut raw = saved;
        // SAFETY: cfmakeraw only edits the struct it is given.
        unsafe { libc::cfmakeraw(&mut raw) };
        // SAFETY: as above, with a valid termios.
        if unsafe { libc::tcsetattr(0, libc::TCSANOW, &raw) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Some(Self { saved }))
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        // SAFETY: restores the settings read in enable().
        unsafe { libc::tcsetattr(0, libc::TCSANOW, &self.saved) };
    }
}

pub fn is_terminal(fd: i32) -> bool {
    // SAFETY: isatty only inspects the fd.
    unsafe { libc::isatty(fd) == 1 }
}

/// The size of the terminal on stdout (rows, cols), if it is one.
pub fn window_size() -> Option<(u32, u32)> {
    // SAFETY: winsize is plain data; TIOCGWINSZ fills it.
    let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
    // SAFETY: the pointer is to a local winsize, as TIOCGWINSZ expects.
    let ok = unsafe { libc::ioctl(1, libc::TIOCGWINSZ, &mut ws) } == 0;
    (ok && ws.ws_row > 0).then_some((u32::from(ws.ws_row), u32::from(ws.ws_col)))
}
