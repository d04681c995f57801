//! The guest-to-host half of a connection, shared by the threads of one exec session: whole
//! frames never interleave, and once the session has said its last word nothing else is sent.

use std::fs::File;
use std::sync::Mutex;

use husk_proto::agent::{guest_message::Msg, GuestMessage};
use husk_proto::frame;

/// Longest text of an `error` frame; longer messages (an echoed argument) are cut.
const MAX_ERROR_LEN: usize = 4096;

#[derive(Debug)]
struct State {
    conn: File,
    /// False after the last frame, or once the host stopped taking frames.
    open: bool,
}

/// Frames to the host; see the module comment.
#[derive(Debug)]
pub struct Sink {
    state: Mutex<State>,
}

impl Sink {
    pub fn new(conn: File) -> Self {
        Self {
            state: Mutex::new(State { conn, open: true }),
        }
    }

    /// Sends one frame; false when the sink is closed or the host is gone (the frame is then
    /// dropped: output of a process nobody listens to any more is discarded).
    pub fn send(&self, msg: Msg) -> bool {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if !state.open {
            return false;
        }
        let message = GuestMessage { msg: Some(msg) };
        if frame::write(&mut state.conn, &message).is_err() {
            state.open = false;
        }
        state.open
    }

    /// Sends the `error` frame, the last one of the connection.
    pub fn fail(&self, message: &str) {
        self.send(Msg::Error(shorten(message)));
        self.close();
    }

    /// Shuts the connection down both ways: wakes a thread blocked reading it.
    pub fn shutdown(&self) {
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        super::fd::shutdown_socket(&state.conn);
    }

    /// Sends nothing more.
    pub fn close(&self) {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).open = false;
    }
}

/// `message` cut to [`MAX_ERROR_LEN`] bytes at a character boundary.
pub fn shorten(message: &str) -> String {
    if message.len() <= MAX_ERROR_LEN {
        return message.to_string();
    }
    let mut end = MAX_ERROR_LEN;
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &message[..end])
}

#[cfg(test)]
mod tests {
    use super::*;
    use husk_proto::agent::GuestMessage;
    use std::os::unix::net::UnixStream;

    #[test]
    fn nothing_is_sent_after_the_last_frame() {
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        let sink = Sink::new(File::from(std::os::fd::OwnedFd::from(ours)));
        assert!(sink.send(Msg::Stdout(b"a".to_vec())));
        sink.fail("boom");
        assert!(!sink.send(Msg::Stdout(b"b".to_vec())));
        drop(sink);
        let first: GuestMessage = frame::read(&mut theirs).unwrap().unwrap();
        assert_eq!(first.msg, Some(Msg::Stdout(b"a".to_vec())));
        let second: GuestMessage = frame::read(&mut theirs).unwrap().unwrap();
        assert_eq!(second.msg, Some(Msg::Error("boom".into())));
        assert_eq!(frame::read::<GuestMessage, _>(&mut theirs).unwrap(), None);
    }

    #[test]
    fn long_messages_are_cut_on_a_character_boundary() {
        let long = "é".repeat(MAX_ERROR_LEN);
        let short = shorten(&long);
        assert!(short.len() <= MAX_ERROR_LEN + 3);
        assert!(short.ends_with("..."));
        assert_eq!(shorten("fine"), "fine");
    }
}
