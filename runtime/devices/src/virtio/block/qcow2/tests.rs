//! qcow2 against a model of the disk (a plain byte vector) and against QEMU's own tools:
//! `qemu-img check` must find every image husk wrote clean, and `qemu-img convert` must read
//! back the bytes the model holds. qemu-img comes with scripts/setup (Debian's qemu-utils); a
//! test that needs it and cannot find it fails and says so.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::header::OFFSET_MASK;
use super::*;
use crate::virtio::block::format::{open_disk, DiskFormat};

fn qemu_img(args: &[&str]) -> std::process::Output {
    Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img is missing: these tests check husk's images with QEMU's tools (run scripts/setup, which installs qemu-utils)")
}

fn check_clean(path: &Path) {
    let out = qemu_img(&["check", "-f", "qcow2", path.to_str().unwrap()]);
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "qemu-img check {}: {text}",
        path.display()
    );
    assert!(text.contains("No errors were found"), "{text}");
}

/// The guest-visible bytes of `path` as qemu-img reads them.
fn qemu_bytes(path: &Path, dir: &Path) -> Vec<u8> {
    let out_path = dir.join("converted.raw");
    let _ = std::fs::remove_file(&out_path);
    let out = qemu_img(&[
        "convert",
        "-O",
        "raw",
        path.to_str().unwrap(),
        out_path.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::read(&out_path).unwrap()
}

fn read(disk: &dyn DiskBackend, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0xeeu8; len];
    let mut iov = [libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: len,
    }];
    disk.read_vectored_at(&mut iov, offset).unwrap();
    buf
}

fn write(disk: &dyn DiskBackend, offset: u64, data: &[u8]) {
    // Split into two iovecs to exercise slicing across buffers.
    let mut a = data[..data.len() / 3].to_vec();
    let mut b = data[data.len() / 3..].to_vec();
    let mut iov = [
        libc::iovec {
            iov_base: a.as_mut_ptr().cast(),
            iov_len: a.len(),
        },
        libc::iovec {
            iov_base: b.as_mut_ptr().cast(),
            iov_len: b.len(),
        },
    ];
    disk.write_vectored_at(&mut iov, offset).unwrap();
}

struct Fixture {
    dir: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
        }
    }
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
    fn raw_base(&self, name: &str, len: usize) -> (PathBuf, Vec<u8>) {
        let data: Vec<u8> = (0..len).map(|i| (i * 7 + i / 4096) as u8).collect();
        let p = self.path(name);
        std::fs::write(&p, &data).unwrap();
        (p, data)
    }
    fn overlay(&self, name: &str, base: &Path, fmt: DiskFormat, size: u64) -> PathBuf {
        let p = self.path(name);
        let f = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&p)
            .unwrap();
        create(&f, size, Some((base.to_str().unwrap(), fmt))).unwrap();
        p
    }
}

/// A small deterministic generator (no rand crate in the graph).
struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
}

#[test]
fn an_overlay_reads_its_base_and_keeps_writes_to_itself() {
    let fx = Fixture::new();
    let size = 3 << 20;
    let (base, mut model) = fx.raw_base("base.raw", size);
    let top = fx.overlay("top.qcow2", &base, DiskFormat::Raw, size as u64);
    {
        let disk = open_disk(
            &top,
            DiskFormat::Qcow2,
            false,
            &[(base.clone(), DiskFormat::Raw)],
        )
        .unwrap();
        assert_eq!(disk.size(), size as u64);
        assert_eq!(read(disk.as_ref(), 0, size), model);
        // A partial cluster (copy-on-write of the rest), one spanning two clusters, a whole one.
        for (off, len, fill) in [
            (1000u64, 100usize, 1u8),
            (65536 - 512, 1024, 2),
            (131072, 65536, 3),
        ] {
            write(disk.as_ref(), off, &vec![fill; len]);
            model[off as usize..off as usize + len].fill(fill);
        }
        assert_eq!(read(disk.as_ref(), 0, size), model);
        disk.flush().unwrap();
    }
    check_clean(&top);
    assert_eq!(qemu_bytes(&top, fx.dir.path()), model);
    // The base is untouched.
    let (_, original) = (0, fx.raw_base("again.raw", size).1);
    assert_eq!(std::fs::read(&base).unwrap(), original);
}

#[test]
fn random_writes_discards_and_reopens_match_the_model_and_qemu() {
    let fx = Fixture::new();
    // Small clusters (qemu-img made) so that many L2 tables and refcount blocks get allocated.
    let size: u64 = 8 << 20;
    let (base, base_data) = fx.raw_base("base.raw", size as usize);
    let top = fx.path("top.qcow2");
    let out = qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4096",
        "-b",
        base.to_str().unwrap(),
        "-F",
        "raw",
        top.to_str().unwrap(),
        &size.to_string(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut model = base_data;
    let mut rng = Lcg(42);
    for round in 0..4 {
        let disk = open_disk(
            &top,
            DiskFormat::Qcow2,
            false,
            &[(base.clone(), DiskFormat::Raw)],
        )
        .unwrap();
        for i in 0..300 {
            let sector = rng.next() % (size / 512 - 64);
            let len = ((rng.next() % 40) + 1) as usize * 512;
            let off = sector * 512;
            match rng.next() % 10 {
                0 => {
                    disk.write_zeroes(off, len as u64, rng.next() % 2 == 0)
                        .unwrap();
                    model[off as usize..off as usize + len].fill(0);
                }
                1 => {
                    // Discard is a hint: whole clusters read as zeros, partial ones keep bytes.
                    disk.discard(off, len as u64).unwrap();
                    let first = off.div_ceil(4096) * 4096;
                    let end = (off + len as u64) / 4096 * 4096;
                    if end > first {
                        model[first as usize..end as usize].fill(0);
                    }
                }
                _ => {
                    let fill = (round * 50 + i % 200 + 1) as u8;
                    write(disk.as_ref(), off, &vec![fill; len]);
                    model[off as usize..off as usize + len].fill(fill);
                }
            }
            if i % 97 == 0 {
                disk.flush().unwrap();
            }
        }
        assert_eq!(
            read(disk.as_ref(), 0, size as usize),
            model,
            "round {round}"
        );
    }
    check_clean(&top);
    assert_eq!(qemu_bytes(&top, fx.dir.path()), model);
}

#[test]
fn a_qcow2_chain_reads_through_every_layer() {
    let fx = Fixture::new();
    let size = 1 << 20;
    let (base, mut model) = fx.raw_base("base.raw", size);
    let mid = fx.overlay("mid.qcow2", &base, DiskFormat::Raw, size as u64);
    {
        let d = open_disk(
            &mid,
            DiskFormat::Qcow2,
            false,
            &[(base.clone(), DiskFormat::Raw)],
        )
        .unwrap();
        write(d.as_ref(), 4096, &[9u8; 8192]);
        model[4096..4096 + 8192].fill(9);
    }
    let top = fx.overlay("top.qcow2", &mid, DiskFormat::Qcow2, size as u64);
    let chain = [
        (mid.clone(), DiskFormat::Qcow2),
        (base.clone(), DiskFormat::Raw),
    ];
    {
        let d = open_disk(&top, DiskFormat::Qcow2, false, &chain).unwrap();
        assert_eq!(read(d.as_ref(), 0, size), model);
        write(d.as_ref(), 8192, &[5u8; 512]);
        model[8192..8192 + 512].fill(5);
        assert_eq!(read(d.as_ref(), 0, size), model);
    }
    check_clean(&top);
    check_clean(&mid);
    assert_eq!(qemu_bytes(&top, fx.dir.path()), model);
    // The middle layer is opened read-only: still what it was.
    let d = open_disk(&mid, DiskFormat::Qcow2, true, &[(base, DiskFormat::Raw)]).unwrap();
    assert_eq!(read(d.as_ref(), 8192, 512), vec![9u8; 512]);
}

#[test]
fn an_image_qemu_wrote_reads_the_same_in_husk() {
    let fx = Fixture::new();
    let img = fx.path("q.qcow2");
    let out = qemu_img(&["create", "-q", "-f", "qcow2", img.to_str().unwrap(), "4M"]);
    assert!(out.status.success());
    let out = Command::new("qemu-io")
        .args([
            "-f",
            "qcow2",
            "-c",
            "write -P 0x5a 65536 131072",
            "-c",
            "write -z 0 4096",
        ])
        .arg(&img)
        .output();
    let Ok(out) = out else {
        panic!("qemu-io is missing (Debian's qemu-utils ships it; run scripts/setup)");
    };
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let d = open_disk(&img, DiskFormat::Qcow2, true, &[]).unwrap();
    assert_eq!(read(d.as_ref(), 65536, 131072), vec![0x5a; 131072]);
    assert_eq!(read(d.as_ref(), 0, 4096), vec![0; 4096]);
}

#[test]
fn a_killed_writer_leaves_at_most_leaks() {
    let fx = Fixture::new();
    let img = fx.path("k.qcow2");
    let f = File::options()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&img)
        .unwrap();
    create(&f, 16 << 20, None).unwrap();
    drop(f);
    let d = open_disk(&img, DiskFormat::Qcow2, false, &[]).unwrap();
    write(d.as_ref(), 0, &[1u8; 300_000]);
    d.flush().unwrap();
    write(d.as_ref(), 1 << 20, &[2u8; 70_000]);
    // A quiesced image is clean as it stands (a copy taken now needs no repair), and takes
    // writes again after.
    d.quiesce().unwrap();
    check_clean(&img);
    write(d.as_ref(), 2 << 20, &[3u8; 70_000]);
    // No clean close: the process is "killed" here.
    std::mem::forget(d);
    let out = qemu_img(&["check", "-f", "qcow2", img.to_str().unwrap()]);
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    // 0: clean; 3: leaked clusters only. Never 2 (corruption).
    assert!(matches!(out.status.code(), Some(0) | Some(3)), "{text}");
    assert!(!text.contains("ERROR"), "{text}");
    // The forgotten writer still holds its lock: read the file without one.
    let d = Qcow2::open(File::open(&img).unwrap(), true, None).unwrap();
    assert_eq!(read(&d, 0, 300_000), vec![1u8; 300_000]);
}

#[test]
fn writes_never_land_on_metadata_even_when_tables_say_so() {
    let fx = Fixture::new();
    let img = fx.path("evil.qcow2");
    let f = File::options()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&img)
        .unwrap();
    create(&f, 1 << 20, None).unwrap();
    // Allocate one L2 table through a write, then point guest cluster 1 at the header.
    drop(f);
    {
        let d = open_disk(&img, DiskFormat::Qcow2, false, &[]).unwrap();
        write(d.as_ref(), 0, &[1u8; 512]);
    }
    let f = File::options().read(true).write(true).open(&img).unwrap();
    let h = Header::read(&f, f.metadata().unwrap().len()).unwrap();
    let mut l1 = [0u8; 8];
    f.read_exact_at(&mut l1, h.l1_offset).unwrap();
    let l2 = u64::from_be_bytes(l1) & OFFSET_MASK;
    f.write_all_at(&(1u64 << 63).to_be_bytes(), l2 + 8).unwrap(); // COPIED, offset 0: unallocated
    f.write_all_at(&((1u64 << 63) | h.l1_offset).to_be_bytes(), l2 + 16)
        .unwrap();
    drop(f);
    let d = open_disk(&img, DiskFormat::Qcow2, false, &[]).unwrap();
    let mut buf = vec![7u8; 512];
    let mut iov = [libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: 512,
    }];
    let err = d.write_vectored_at(&mut iov, 2 * 65536).unwrap_err();
    assert!(err.to_string().contains("overlaps metadata"), "{err}");
    drop(d);
    let f = File::open(&img).unwrap();
    assert!(Header::read(&f, f.metadata().unwrap().len()).is_ok());
}

#[test]
fn unsupported_and_mismatched_images_are_refused_with_reasons() {
    let fx = Fixture::new();
    let (base, _) = fx.raw_base("b.raw", 65536);
    let top = fx.overlay("t.qcow2", &base, DiskFormat::Raw, 65536);
    let err = open_disk(&top, DiskFormat::Qcow2, false, &[])
        .err()
        .unwrap();
    assert!(err.to_string().contains("needs its backing file"), "{err}");
    let err = open_disk(&base, DiskFormat::Qcow2, false, &[])
        .err()
        .unwrap();
    assert!(err.to_string().contains("not a qcow2 image"), "{err}");
    // Internal snapshots: readable, not writable.
    let snap = fx.path("s.qcow2");
    assert!(
        qemu_img(&["create", "-q", "-f", "qcow2", snap.to_str().unwrap(), "1M"])
            .status
            .success()
    );
    assert!(qemu_img(&["snapshot", "-c", "s1", snap.to_str().unwrap()])
        .status
        .success());
    let err = open_disk(&snap, DiskFormat::Qcow2, false, &[])
        .err()
        .unwrap();
    assert!(err.to_string().contains("internal snapshots"), "{err}");
    assert!(open_disk(&snap, DiskFormat::Qcow2, true, &[]).is_ok());
    // 64-bit refcounts: readable, not writable.
    let wide = fx.path("w.qcow2");
    assert!(qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "refcount_bits=64",
        wide.to_str().unwrap(),
        "1M"
    ])
    .status
    .success());
    let err = open_disk(&wide, DiskFormat::Qcow2, false, &[])
        .err()
        .unwrap();
    assert!(err.to_string().contains("refcount"), "{err}");
}

#[test]
fn info_reports_size_and_backing() {
    let fx = Fixture::new();
    let (base, _) = fx.raw_base("b.raw", 65536);
    let top = fx.overlay("t.qcow2", &base, DiskFormat::Raw, 1 << 30);
    let i = info(&File::open(&top).unwrap()).unwrap();
    assert_eq!(i.virtual_size, 1 << 30);
    assert_eq!(i.backing.unwrap().name, base.to_str().unwrap());
    let out = qemu_img(&["info", "--output=json", top.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("\"virtual-size\": 1073741824"), "{text}");
    assert!(
        text.contains("\"backing-filename-format\": \"raw\""),
        "{text}"
    );
}
