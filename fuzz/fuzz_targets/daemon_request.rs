//! huskd's request validation: a VmSpec as any caller of CreateVm can send it (prost-decoded
//! from the input), checked against a path policy over a scratch directory. Validation must
//! never panic, and whatever it accepts must be in range and name only files the policy
//! allows, by absolute paths.

#![no_main]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use husk_host::policy::PathPolicy;
use husk_proto::v1::VmSpec;
use huskd::validate::{self, Defaults};
use libfuzzer_sys::fuzz_target;
use prost::Message;

/// The allowed root: a kernel, an initrd and a disk image, made once per process.
fn fixture() -> &'static (PathBuf, PathBuf, PathBuf, PathBuf, PathBuf) {
    static FIXTURE: OnceLock<(PathBuf, PathBuf, PathBuf, PathBuf, PathBuf)> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let root = std::env::temp_dir().join(format!("husk-fuzz-huskd-{}", std::process::id()));
        let _ = std::fs::create_dir_all(root.join("images"));
        let (kernel, initrd, disk) = (
            root.join("vmlinux"),
            root.join("initrd"),
            root.join("images/disk.img"),
        );
        for file in [&kernel, &initrd, &disk] {
            let _ = std::fs::write(file, b"x");
        }
        let outside = std::env::temp_dir().join("husk-fuzz-outside");
        (root, kernel, initrd, disk, outside)
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(spec) = VmSpec::decode(data) else {
        return;
    };
    let (root, kernel, initrd, _, _) = fixture();
    let policy = PathPolicy::new(std::slice::from_ref(root), &[]);
    let defaults = Defaults { kernel, initrd };
    let Ok(valid) = validate::normalize(spec, &defaults, &policy) else {
        return;
    };
    assert!(validate::VCPUS.contains(&valid.vcpus));
    assert!(validate::MEMORY_MIB.contains(&valid.memory_mib));
    assert!(valid.disks.len() <= validate::MAX_DISKS);
    let paths = [&valid.kernel, &valid.initrd]
        .into_iter()
        .chain((!valid.rootfs.is_empty()).then_some(&valid.rootfs))
        .chain(valid.disks.iter().map(|d| &d.path));
    for path in paths {
        let path = Path::new(path);
        assert!(path.is_absolute(), "{path:?}");
        // Accepted files open again under the same policy (nothing escaped it).
        assert!(policy.check_file("fuzz", path, false).is_ok(), "{path:?}");
    }
});
