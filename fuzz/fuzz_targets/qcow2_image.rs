//! qcow2 images as a hostile user or a crafted download can hand them to husk: a valid image
//! (one husk created) with input bytes patched over its header, L1 table, refcount table and
//! refcount block, then opened read-only and read-write, and driven with reads, writes,
//! discards, write-zeroes and flushes from the input. Nothing may panic, hang or allocate
//! without bound; a refused image is fine. What a write put in, a read gets back, unless the
//! request failed.

#![no_main]

use std::fs::File;
use std::os::unix::fs::FileExt;

use husk_devices::virtio::block::backend::DiskBackend;
use husk_devices::virtio::block::qcow2::{self, Qcow2};
use libfuzzer_sys::fuzz_target;

/// The template's virtual size: small, so that ops land on allocated and unallocated clusters.
const SIZE: u64 = 4 << 20;

fn template() -> File {
    let f = tempfile();
    qcow2::create(&f, SIZE, None).expect("create");
    f
}

fn tempfile() -> File {
    let dir = std::env::temp_dir();
    let path = dir.join(format!("husk-fuzz-qcow2-{}", std::process::id()));
    let f = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .expect("scratch file");
    let _ = std::fs::remove_file(&path);
    f
}

fn io(disk: &dyn DiskBackend, write: bool, offset: u64, buf: &mut [u8]) -> bool {
    let mut iov = [libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    }];
    if write {
        disk.write_vectored_at(&mut iov, offset).is_ok()
    } else {
        disk.read_vectored_at(&mut iov, offset).is_ok()
    }
}

fuzz_target!(|data: &[u8]| {
    let file = template();
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    // Patches: [region u8][offset/4 u8][len u8][bytes]; regions are the header and the start of each
    // table (the 64 KiB clusters 0..=3 of the template), at an offset the next byte picks.
    let mut rest = data;
    let mut patches = 0;
    while rest.len() >= 3 && patches < 8 {
        let region = u64::from(rest[0] % 4) * 65536 + u64::from(rest[1]) * 4;
        let n = usize::from(rest[2]).min(rest.len() - 3);
        if rest[0] & 0x80 != 0 {
            break; // the rest is ops
        }
        if region < len {
            let _ = file.write_all_at(&rest[3..3 + n], region);
        }
        rest = &rest[3 + n..];
        patches += 1;
    }
    if rest.first().is_some() {
        rest = &rest[1..];
    }
    let ro = file.try_clone().expect("dup");
    if let Ok(disk) = Qcow2::open(ro, true, None) {
        let mut buf = vec![0u8; 4096];
        let _ = io(&disk, false, 0, &mut buf);
    }
    let Ok(disk) = Qcow2::open(file, false, None) else {
        return;
    };
    let size = disk.size();
    for op in rest.chunks_exact(6).take(64) {
        let kind = op[0] % 5;
        let sector = u64::from(u16::from_le_bytes([op[1], op[2]]));
        let sectors = u64::from(op[3] % 130) + 1;
        let fill = op[4];
        let offset = (sector * 512) % size.max(512);
        let bytes = (sectors * 512).min(size.saturating_sub(offset));
        if bytes == 0 {
            continue;
        }
        match kind {
            0 => {
                let mut buf = vec![fill; bytes as usize];
                if io(&disk, true, offset, &mut buf) {
                    let mut back = vec![!fill; bytes as usize];
                    if io(&disk, false, offset, &mut back) {
                        assert_eq!(back, buf, "a write did not read back");
                    }
                }
            }
            1 => {
                let mut buf = vec![0u8; bytes as usize];
                let _ = io(&disk, false, offset, &mut buf);
            }
            2 => {
                let _ = disk.discard(offset, bytes);
            }
            3 => {
                if disk.write_zeroes(offset, bytes, op[5] & 1 == 1).is_ok() {
                    let mut back = vec![0xffu8; bytes as usize];
                    if io(&disk, false, offset, &mut back) {
                        assert!(back.iter().all(|b| *b == 0), "write-zeroes left data");
                    }
                }
            }
            _ => {
                let _ = disk.flush();
            }
        }
    }
    let _ = disk.close();
});
