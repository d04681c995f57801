//! The local terminal for `husk exec -t`: raw mode while the remote process runs, and its size.

use std::io;
use std::os::fd::AsFd;

use rustix::termios::{self, OptionalActions, Termios};

/// Puts stdin's terminal in raw mode until dropped.
pub struct RawMode {
    saved: Termios,
}

impl RawMode {
    /// `Ok(None)` when stdin is not a terminal.
    pub fn enable() -> io::Result<Option<Self>> {
        let stdin = io::stdin();
        if !is_terminal(&stdin) {
            return Ok(None);
        }
        let saved = termios::tcgetattr(&stdin)?;
        let mut raw = saved.clone();
        raw.make_raw();
        termios::tcsetattr(&stdin, OptionalActions::Now, &raw)?;
        Ok(Some(Self { saved }))
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        // Nothing to do if the terminal is gone by now.
        let _ = termios::tcsetattr(io::stdin(), OptionalActions::Now, &self.saved);
    }
}

pub fn is_terminal(fd: impl AsFd) -> bool {
    termios::isatty(fd)
}

/// The size of the terminal on stdout (rows, cols), if it is one.
pub fn window_size() -> Option<(u32, u32)> {
    let ws = termios::tcgetwinsize(io::stdout()).ok()?;
    (ws.ws_row > 0).then_some((u32::from(ws.ws_row), u32::from(ws.ws_col)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_is_not_a_terminal_and_has_no_size() {
        let file = tempfile_like();
        assert!(!is_terminal(&file));
        assert!(termios::tcgetwinsize(&file).is_err());
    }

    fn tempfile_like() -> std::fs::File {
        std::fs::File::open("/proc/self/status").unwrap_or_else(|e| panic!("{e}"))
    }
}
