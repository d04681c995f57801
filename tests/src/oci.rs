//! A small OCI image made here (busybox-static), for the containerd and `husk run --image`
//! tests.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Writes `data` as a blob of the OCI layout under `dir`; returns (digest, size).
fn blob(dir: &Path, data: &[u8]) -> (String, usize) {
    let tmp = dir.join("blob.tmp");
    std::fs::write(&tmp, data).unwrap();
    let out = Command::new("sha256sum").arg(&tmp).output().unwrap();
    let hex = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();
    std::fs::rename(&tmp, dir.join("blobs/sha256").join(&hex)).unwrap();
    (format!("sha256:{hex}"), data.len())
}

/// The applet links of [`build_oci_image`]'s image.
pub const APPLETS: &[&str] = &[
    "sh", "echo", "cat", "sleep", "id", "pwd", "env", "ls", "true", "kill", "ip", "ping", "nc",
    "timeout",
];

/// A one-layer OCI image (busybox-static and the [`APPLETS`] links, config Cmd `["sh"]`) named
/// `name`: its layout is `dir/layout`; returns the OCI archive of it, `dir/image.tar`.
pub fn build_oci_image(dir: &Path, name: &str) -> PathBuf {
    build_oci_image_with(dir, name, &["sh"], APPLETS)
}

/// As [`build_oci_image`], with the image config's `Cmd` `cmd` and the links `/bin/APPLET` to
/// busybox for each of `applets` (busybox-static must have them).
pub fn build_oci_image_with(dir: &Path, name: &str, cmd: &[&str], applets: &[&str]) -> PathBuf {
    let rootfs = dir.join("rootfs");
    for d in ["bin", "tmp", "proc", "sys", "dev", "etc", "root"] {
        std::fs::create_dir_all(rootfs.join(d)).unwrap();
    }
    std::fs::copy("/bin/busybox", rootfs.join("bin/busybox"))
        .expect("/bin/busybox (busybox-static) is needed");
    for applet in applets {
        std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(applet)).unwrap();
    }
    std::fs::write(rootfs.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").unwrap();
    std::fs::create_dir_all(dir.join("layout/blobs/sha256")).unwrap();
    let layout = dir.join("layout");
    let layer_tar = dir.join("layer.tar");
    let status = Command::new("tar")
        .args(["--numeric-owner", "--owner=0", "--group=0", "-C"])
        .arg(&rootfs)
        .arg("-cf")
        .arg(&layer_tar)
        .arg(".")
        .status()
        .unwrap();
    assert!(status.success());
    let (layer, layer_size) = blob(&layout, &std::fs::read(&layer_tar).unwrap());
    let cmd = serde_json::to_string(cmd).unwrap();
    let config = format!(
        r#"{{"architecture":"amd64","os":"linux","config":{{"Env":["PATH=/bin"],"Cmd":{cmd},"WorkingDir":"/"}},"rootfs":{{"type":"layers","diff_ids":["{layer}"]}}}}"#
    );
    let (config_digest, config_size) = blob(&layout, config.as_bytes());
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{config_digest}","size":{config_size}}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{layer}","size":{layer_size}}}]}}"#
    );
    let (manifest_digest, manifest_size) = blob(&layout, manifest.as_bytes());
    let index = format!(
        r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{manifest_digest}","size":{manifest_size},"platform":{{"architecture":"amd64","os":"linux"}},"annotations":{{"io.containerd.image.name":"{name}","org.opencontainers.image.ref.name":"test"}}}}]}}"#
    );
    std::fs::write(layout.join("index.json"), index).unwrap();
    std::fs::write(
        layout.join("oci-layout"),
        r#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .unwrap();
    let tar = dir.join("image.tar");
    let status = Command::new("tar")
        .arg("-C")
        .arg(&layout)
        .arg("-cf")
        .arg(&tar)
        .args(["oci-layout", "index.json", "blobs"])
        .status()
        .unwrap();
    assert!(status.success());
    tar
}
