//! Assembles length-prefixed frames (husk_proto::frame) from a non-blocking stream, a piece at a
//! time, never reading past the end of the current frame: a client that pipelines requests gets
//! them answered one by one, and the server's poll loop is never blocked by a slow client.

use std::io::{self, Read};
use std::time::Instant;

use husk_proto::frame;

/// What a read produced.
#[derive(Debug, PartialEq, Eq)]
pub enum Progress {
    /// One complete frame body.
    Frame(Vec<u8>),
    /// Nothing more to read now.
    Pending,
    /// The peer closed the stream between frames.
    Closed,
}

/// The frame being received on one connection.
#[derive(Debug, Default)]
pub struct FrameReader {
    /// The length prefix while it is incomplete, then the body.
    buf: Vec<u8>,
    /// The body length, once the prefix is complete.
    body_len: Option<usize>,
    /// When the first byte of the current frame arrived.
    started: Option<Instant>,
}

impl FrameReader {
    /// When the frame in progress began, if one is.
    pub fn started(&self) -> Option<Instant> {
        self.started
    }

    /// Reads what `stream` has, up to the end of one frame. A length over
    /// [`frame::MAX_FRAME_LEN`] is an `InvalidData` error, a stream that ends inside a frame an
    /// `UnexpectedEof` one; the connection cannot be used after either.
    pub fn read_from(&mut self, stream: &mut impl Read, now: Instant) -> io::Result<Progress> {
        let mut chunk = [0u8; 4096];
        loop {
            let want = match self.body_len {
                None => 4 - self.buf.len(),
                Some(len) => len - self.buf.len(),
            };
            if want == 0 {
                self.body_len = None;
                self.started = None;
                return Ok(Progress::Frame(std::mem::take(&mut self.buf)));
            }
            let n = want.min(chunk.len());
            match stream.read(&mut chunk[..n]) {
                Ok(0) if self.started.is_none() => return Ok(Progress::Closed),
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the client closed the connection inside a frame",
                    ))
                }
                Ok(n) => {
                    self.started.get_or_insert(now);
                    self.buf.extend_from_slice(&chunk[..n]);
                    if let (None, Ok(prefix)) =
                        (self.body_len, <[u8; 4]>::try_from(self.buf.as_slice()))
                    {
                        self.body_len = Some(frame::checked_len(prefix)?);
                        self.buf.clear();
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Progress::Pending),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stream that returns the given pieces one read at a time, then WouldBlock (or EOF).
    struct Pieces {
        pieces: Vec<Vec<u8>>,
        eof: bool,
        biggest_read: usize,
    }

    impl Pieces {
        fn new(pieces: &[&[u8]], eof: bool) -> Self {
            Pieces {
                pieces: pieces.iter().rev().map(|p| p.to_vec()).collect(),
                eof,
                biggest_read: 0,
            }
        }
    }

    impl Read for Pieces {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.biggest_read = self.biggest_read.max(buf.len());
            let Some(mut piece) = self.pieces.pop() else {
                return if self.eof {
                    Ok(0)
                } else {
                    Err(io::ErrorKind::WouldBlock.into())
                };
            };
            let n = piece.len().min(buf.len());
            buf[..n].copy_from_slice(&piece[..n]);
            if n < piece.len() {
                self.pieces.push(piece.split_off(n));
            }
            Ok(n)
        }
    }

    #[test]
    fn frames_split_anywhere_are_reassembled_one_at_a_time() {
        let now = Instant::now();
        let mut r = FrameReader::default();
        let mut s = Pieces::new(&[&[0, 0], &[0, 3, b'a'], &[b'b', b'c', 0, 0, 0, 0]], false);
        assert_eq!(
            r.read_from(&mut s, now).unwrap(),
            Progress::Frame(b"abc".to_vec())
        );
        assert!(r.started().is_none());
        // The next frame (empty body) was not read together with the first.
        assert_eq!(r.read_from(&mut s, now).unwrap(), Progress::Frame(vec![]));
        assert_eq!(r.read_from(&mut s, now).unwrap(), Progress::Pending);
        assert!(r.started().is_none());

        let mut partial = Pieces::new(&[&[0, 0, 0, 9, 1]], false);
        assert_eq!(r.read_from(&mut partial, now).unwrap(), Progress::Pending);
        assert_eq!(r.started(), Some(now));
    }

    #[test]
    fn end_of_stream_is_clean_only_between_frames() {
        let now = Instant::now();
        let mut clean = Pieces::new(&[], true);
        assert_eq!(
            FrameReader::default().read_from(&mut clean, now).unwrap(),
            Progress::Closed
        );
        let mut cut = Pieces::new(&[&[0, 0, 0, 5, 1, 2]], true);
        let err = FrameReader::default().read_from(&mut cut, now).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn an_oversized_length_is_refused_before_any_body_is_read() {
        let huge = ((frame::MAX_FRAME_LEN + 1) as u32).to_be_bytes();
        let mut s = Pieces::new(&[&huge, &[0; 64]], false);
        let err = FrameReader::default()
            .read_from(&mut s, Instant::now())
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert_eq!(s.biggest_read, 4, "read past the length prefix");
    }
}
