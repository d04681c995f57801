//! `husk image` on the host (no VM): images it creates and imports are what qemu-img expects,
//! and rm refuses what it must. Needs qemu-img (Debian's qemu-utils, which scripts/setup
//! installs).
// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use husk_tests::{bin, run_with_timeout, Finished};

/// `husk ARGS` with `$HUSK_HOME` at `home`.
fn husk(home: &Path, args: &[&str]) -> Finished {
    run_with_timeout(
        Command::new(bin("husk")).env("HUSK_HOME", home).args(args),
        Duration::from_secs(60),
    )
}

/// `husk ARGS`, which must succeed; its stdout.
fn husk_ok(home: &Path, args: &[&str]) -> String {
    let run = husk(home, args);
    assert_eq!(run.code(), Some(0), "husk {args:?}: {}", run.stderr());
    run.stdout()
}

/// `husk ARGS`, which must fail as husk's own failures do (125); its stderr.
fn husk_fails(home: &Path, args: &[&str]) -> String {
    let run = husk(home, args);
    assert_eq!(
        run.code(),
        Some(125),
        "husk {args:?}: {}{}",
        run.stdout(),
        run.stderr()
    );
    assert!(
        run.stderr().starts_with("husk: error: "),
        "{}",
        run.stderr()
    );
    run.stderr()
}

/// `qemu-img ARGS`, which must succeed; its stdout.
fn qemu_img(args: &[&str]) -> String {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("qemu-img: {e} (apt-get install qemu-utils)"));
    assert!(
        out.status.success(),
        "qemu-img {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn qemu_info(path: &Path) -> serde_json::Value {
    serde_json::from_str(&qemu_img(&[
        "info",
        "--output=json",
        path.to_str().unwrap(),
    ]))
    .unwrap()
}

fn check_clean(path: &Path) {
    let out = qemu_img(&["check", "-f", "qcow2", path.to_str().unwrap()]);
    assert!(
        out.contains("No errors were found"),
        "{}: {out}",
        path.display()
    );
}

/// Bytes nobody would get by chance, with a zero hole in the middle.
fn known_bytes(len: usize) -> Vec<u8> {
    let mut b: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8 + 1).collect();
    b[len / 3..len / 2].fill(0);
    b
}

fn store(home: &Path) -> PathBuf {
    home.join("disk-images")
}

#[test]
fn created_images_and_overlays_are_clean_for_qemu_img() {
    let home = tempfile::tempdir().unwrap();
    let home = home.path();
    let out = husk_ok(home, &["image", "create", "dev", "--size", "64M"]);
    let dev = store(home).join("dev.qcow2");
    assert_eq!(out.trim(), dev.to_str().unwrap());
    check_clean(&dev);
    let info = qemu_info(&dev);
    assert_eq!(info["format"], "qcow2");
    assert_eq!(info["virtual-size"], 64u64 << 20);
    assert!(info.get("backing-filename").is_none());
    // Never overwritten.
    let e = husk_fails(home, &["image", "create", "dev", "--size", "1G"]);
    assert!(e.contains("already exists"), "{e}");
    assert_eq!(qemu_info(&dev)["virtual-size"], 64u64 << 20);

    // An overlay over a raw base outside the store: its size, its absolute path and format.
    let base = home.join("base.raw");
    std::fs::write(&base, known_bytes(2 << 20)).unwrap();
    husk_ok(
        home,
        &[
            "image",
            "create",
            "top",
            "--backing",
            base.to_str().unwrap(),
        ],
    );
    let top = store(home).join("top.qcow2");
    check_clean(&top);
    let info = qemu_info(&top);
    assert_eq!(info["virtual-size"], 2u64 << 20);
    let canonical = std::fs::canonicalize(&base).unwrap();
    assert_eq!(info["backing-filename"], canonical.to_str().unwrap());
    assert_eq!(info["backing-filename-format"], "raw");
    // Read through qemu-img, the overlay is its base.
    let flat = home.join("flat.raw");
    qemu_img(&[
        "convert",
        "-O",
        "raw",
        top.to_str().unwrap(),
        flat.to_str().unwrap(),
    ]);
    assert!(std::fs::read(&flat).unwrap() == std::fs::read(&base).unwrap());

    // An overlay over a store image by name, larger than its base.
    husk_ok(
        home,
        &[
            "image",
            "create",
            "dev-top",
            "--backing",
            "dev",
            "--size",
            "128M",
        ],
    );
    let dev_top = store(home).join("dev-top.qcow2");
    check_clean(&dev_top);
    let info = qemu_info(&dev_top);
    assert_eq!(info["virtual-size"], 128u64 << 20);
    assert_eq!(info["backing-filename-format"], "qcow2");

    // A base whose contents disagree with its stated format.
    let e = husk_fails(
        home,
        &[
            "image",
            "create",
            "bad",
            "--backing",
            dev.to_str().unwrap(),
            "--backing-format",
            "raw",
        ],
    );
    assert!(
        e.contains("looks like qcow2: pass --backing-format qcow2"),
        "{e}"
    );
    assert!(!store(home).join("bad.qcow2").exists());

    // info follows the chain.
    let info: serde_json::Value =
        serde_json::from_str(&husk_ok(home, &["image", "info", "--json", "top"])).unwrap();
    assert_eq!(info["virtual_size"], 2u64 << 20);
    assert_eq!(info["chain"][0]["path"], canonical.to_str().unwrap());
    assert_eq!(info["chain"][0]["format"], "raw");
}

#[test]
fn an_imported_vmdk_reads_back_the_same_bytes() {
    let home = tempfile::tempdir().unwrap();
    let home = home.path();
    let raw = home.join("source.raw");
    let bytes = known_bytes(3 << 20);
    std::fs::write(&raw, &bytes).unwrap();
    let vmdk = home.join("disk.vmdk");
    qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "vmdk",
        raw.to_str().unwrap(),
        vmdk.to_str().unwrap(),
    ]);

    let out = husk_ok(home, &["image", "import", vmdk.to_str().unwrap()]);
    let imported = store(home).join("disk.qcow2");
    assert!(out.contains(imported.to_str().unwrap()), "{out}");
    assert!(out.contains("(vmdk)"), "{out}");
    check_clean(&imported);
    assert_eq!(qemu_info(&imported)["virtual-size"], 3u64 << 20);
    let back = home.join("back.raw");
    qemu_img(&[
        "convert",
        "-f",
        "qcow2",
        "-O",
        "raw",
        imported.to_str().unwrap(),
        back.to_str().unwrap(),
    ]);
    assert!(std::fs::read(&back).unwrap() == bytes, "the bytes differ");

    // Stated source format, raw in the store.
    husk_ok(
        home,
        &[
            "image",
            "import",
            "--source-format",
            "vmdk",
            "--format",
            "raw",
            vmdk.to_str().unwrap(),
            "plain",
        ],
    );
    assert!(std::fs::read(store(home).join("plain.raw")).unwrap() == bytes);

    // Refused: an existing name, a detected image with a backing file, no qemu-img.
    let e = husk_fails(home, &["image", "import", vmdk.to_str().unwrap()]);
    assert!(e.contains("already exists"), "{e}");
    let overlay = home.join("overlay.qcow2");
    qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-F",
        "raw",
        "-b",
        raw.to_str().unwrap(),
        overlay.to_str().unwrap(),
    ]);
    let e = husk_fails(home, &["image", "import", overlay.to_str().unwrap(), "o"]);
    assert!(
        e.contains("backing file") && e.contains("--source-format qcow2"),
        "{e}"
    );
    let run = run_with_timeout(
        Command::new(bin("husk"))
            .env("HUSK_HOME", home)
            .env("PATH", "/nonexistent")
            .args(["image", "import", vmdk.to_str().unwrap(), "other"]),
        Duration::from_secs(30),
    );
    assert_eq!(run.code(), Some(125));
    assert!(
        run.stderr()
            .contains("qemu-img not found: apt-get install qemu-utils"),
        "{}",
        run.stderr()
    );
    // Nothing half-written is left behind.
    let mut names: Vec<String> = std::fs::read_dir(store(home))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["disk.qcow2", "plain.raw"]);
}

#[test]
fn ls_lists_the_store_and_rm_refuses_what_it_must() {
    let home = tempfile::tempdir().unwrap();
    let home = home.path();
    let ls = || -> serde_json::Value {
        serde_json::from_str(&husk_ok(home, &["image", "ls", "--json"])).unwrap()
    };
    assert_eq!(ls(), serde_json::json!([]));
    husk_ok(home, &["image", "create", "base", "--size", "16M"]);
    husk_ok(home, &["image", "create", "top", "--backing", "base"]);
    let list = ls();
    let list = list.as_array().unwrap();
    assert_eq!(list.len(), 2);
    assert_eq!(list[0]["name"], "base.qcow2");
    assert_eq!(list[0]["format"], "qcow2");
    assert_eq!(list[0]["virtual_size"], 16u64 << 20);
    assert!(list[0]["used_bytes"].as_u64().unwrap() > 0);
    assert_eq!(list[1]["name"], "top.qcow2");
    let base = std::fs::canonicalize(store(home).join("base.qcow2")).unwrap();
    assert_eq!(list[1]["backing_file"], base.to_str().unwrap());
    let table = husk_ok(home, &["image", "ls"]);
    assert!(
        table.starts_with("NAME") && table.contains("top.qcow2"),
        "{table}"
    );

    // A base in use by an overlay, a path outside the store, an image a VM holds.
    let e = husk_fails(home, &["image", "rm", "base"]);
    assert!(e.contains("backing file of top.qcow2"), "{e}");
    let outside = home.join("outside.qcow2");
    std::fs::copy(store(home).join("base.qcow2"), &outside).unwrap();
    let e = husk_fails(home, &["image", "rm", outside.to_str().unwrap()]);
    assert!(e.contains("not in the image store"), "{e}");
    assert!(outside.exists());
    let held = std::fs::File::open(store(home).join("top.qcow2")).unwrap();
    rustix::fs::flock(&held, rustix::fs::FlockOperation::LockExclusive).unwrap();
    let e = husk_fails(home, &["image", "rm", "top"]);
    assert!(e.contains("in use by a running VM"), "{e}");
    drop(held);
    assert_eq!(ls().as_array().unwrap().len(), 2);

    // Together, in either order.
    husk_ok(home, &["image", "rm", "base", "top.qcow2"]);
    assert_eq!(ls(), serde_json::json!([]));
}
