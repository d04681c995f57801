//! The medium side of a disk slot: what an empty slot reads from, and why a change of medium
//! was refused.

use std::io;

use super::backend::DiskBackend;

/// Why [`super::Block::insert_medium`] or [`super::Block::eject_medium`] refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum MediumError {
    #[error("the disk was not declared as a slot")]
    NotASlot,
    #[error("the slot already holds a disk")]
    Occupied,
    #[error("the slot is empty")]
    Empty,
}

/// An empty slot: size 0, so every read, write, discard and write-zeroes is out of range
/// (IOERR) before it reaches here; a flush fails too.
pub(super) struct NoMedium;

fn no_medium() -> io::Error {
    io::Error::new(io::ErrorKind::NotFound, "no medium in the slot")
}

impl DiskBackend for NoMedium {
    fn size(&self) -> u64 {
        0
    }
    fn read_vectored_at(&self, _iovecs: &mut [libc::iovec], _offset: u64) -> io::Result<()> {
        Err(no_medium())
    }
    fn write_vectored_at(&self, _iovecs: &mut [libc::iovec], _offset: u64) -> io::Result<()> {
        Err(no_medium())
    }
    fn flush(&self) -> io::Result<()> {
        Err(no_medium())
    }
    fn discard(&self, _offset: u64, _len: u64) -> io::Result<()> {
        Err(no_medium())
    }
    fn write_zeroes(&self, _offset: u64, _len: u64, _unmap: bool) -> io::Result<()> {
        Err(no_medium())
    }
}
