//! The guest console written to a file (`--console file:PATH`), capped in size: a guest that
//! prints forever must not fill the host's disk. When the next write would pass the cap, the
//! file is truncated to 0 (ftruncate on the fd: the parent may have opened it O_APPEND and
//! passed it as /proc/self/fd/N, and may be reading it) and goes on with the line
//! `[husk: console truncated after N bytes]`, N counting every console byte written so far.

use std::fs::File;
use std::io::{self, Seek, SeekFrom, Write};

/// Default cap of the console file (`--console-limit`): 16 MiB.
pub const DEFAULT_CONSOLE_LIMIT: u64 = 16 * 1024 * 1024;

/// A console file that never grows past `limit` bytes (0: unlimited).
pub struct CappedFile {
    file: File,
    limit: u64,
    /// Bytes in the file now (since the last truncation).
    in_file: u64,
    /// Console bytes written in all.
    total: u64,
}

impl CappedFile {
    /// Caps `file` at `limit` bytes. A file that is not a regular file (a pipe, /dev/null)
    /// cannot fill a disk and cannot be truncated: it is left uncapped.
    pub fn new(file: File, limit: u64) -> Self {
        let regular = file.metadata().map(|m| m.is_file()).unwrap_or(false);
        let in_file = file.metadata().map(|m| m.len()).unwrap_or(0);
        Self {
            file,
            limit: if regular { limit } else { 0 },
            in_file,
            total: 0,
        }
    }

    /// Empties the file and starts it with the truncation marker.
    fn truncate(&mut self) -> io::Result<()> {
        self.file.set_len(0)?;
        // Without O_APPEND the offset would stay past the end and leave a hole.
        self.file.seek(SeekFrom::Start(0))?;
        let marker = format!("[husk: console truncated after {} bytes]\n", self.total);
        self.file.write_all(marker.as_bytes())?;
        self.in_file = marker.len() as u64;
        Ok(())
    }
}

impl Write for CappedFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut data = buf;
        if self.limit != 0 && self.in_file.saturating_add(data.len() as u64) > self.limit {
            self.truncate()?;
            // A chunk larger than what is left keeps its end (serial output is byte by byte).
            let room = self.limit.saturating_sub(self.in_file);
            let room = usize::try_from(room).unwrap_or(usize::MAX);
            data = &data[data.len().saturating_sub(room)..];
        }
        self.file.write_all(data)?;
        self.in_file += data.len() as u64;
        self.total += buf.len() as u64;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::OpenOptions;
    use std::path::PathBuf;

    struct TempFile(PathBuf);

    impl TempFile {
        fn new(name: &str) -> Self {
            let path =
                std::env::temp_dir().join(format!("husk-console-{}-{name}", std::process::id()));
            let _ = std::fs::remove_file(&path);
            Self(path)
        }
        fn contents(&self) -> String {
            String::from_utf8(std::fs::read(&self.0).unwrap()).unwrap()
        }
    }

    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn write_bytes(out: &mut CappedFile, bytes: &[u8]) {
        for b in bytes {
            out.write_all(&[*b]).unwrap();
        }
    }

    #[test]
    fn the_file_is_truncated_with_a_marker_when_the_cap_is_reached() {
        let tmp = TempFile::new("cap");
        let file = File::create(&tmp.0).unwrap();
        let mut out = CappedFile::new(file, 64);
        write_bytes(&mut out, &[b'a'; 64]);
        assert_eq!(tmp.contents(), "a".repeat(64));
        write_bytes(&mut out, b"tail");
        let marker = "[husk: console truncated after 64 bytes]\n";
        assert_eq!(tmp.contents(), format!("{marker}tail"));
    }

    #[test]
    fn an_append_mode_fd_keeps_working_after_truncation() {
        let tmp = TempFile::new("append");
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&tmp.0)
            .unwrap();
        let mut out = CappedFile::new(file, 100);
        write_bytes(&mut out, &[b'x'; 80]);
        write_bytes(&mut out, &[b'y'; 40]);
        let marker = "[husk: console truncated after 100 bytes]\n";
        assert_eq!(tmp.contents(), format!("{marker}{}", "y".repeat(20)));
    }

    #[test]
    fn the_file_never_passes_the_cap_even_with_large_chunks() {
        let tmp = TempFile::new("chunks");
        let mut out = CappedFile::new(File::create(&tmp.0).unwrap(), 100);
        for i in 0..20u8 {
            out.write_all(&[b'a' + i; 70]).unwrap();
            assert!(std::fs::metadata(&tmp.0).unwrap().len() <= 100);
        }
        assert!(tmp.contents().ends_with(&"t".repeat(10)));
    }

    #[test]
    fn a_zero_limit_means_unlimited() {
        let tmp = TempFile::new("unlimited");
        let mut out = CappedFile::new(File::create(&tmp.0).unwrap(), 0);
        out.write_all(&[b'z'; 10_000]).unwrap();
        assert_eq!(std::fs::metadata(&tmp.0).unwrap().len(), 10_000);
    }
}
