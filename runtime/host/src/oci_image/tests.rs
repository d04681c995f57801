use std::os::unix::fs::symlink;

use super::*;

fn sha(bytes: &[u8]) -> String {
    format!("sha256:{}", hex(&Sha256::digest(bytes)))
}

/// Writes `bytes` as a blob of `layout`; returns its digest.
fn blob(layout: &Path, bytes: &[u8]) -> String {
    let digest = sha(bytes);
    let path = blob_path(layout, &digest).unwrap();
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, bytes).unwrap();
    digest
}

/// A tar (gzip-compressed with `gzip`) of the tree at `dir`.
fn layer_tar(dir: &Path, gzip: bool) -> Vec<u8> {
    let mut cmd = Command::new("tar");
    cmd.arg(if gzip { "-cz" } else { "-c" })
        .args(["--numeric-owner", "-f", "-", "-C"])
        .arg(dir)
        .arg(".");
    let out = cmd.output().unwrap();
    assert!(out.status.success());
    out.stdout
}

/// An image layout of two layers: the base has /etc/hello, /old, /dir/{a,b}; the top one
/// removes /old (whiteout), makes /dir opaque with only /dir/c, and adds /bin/tool.
fn layout(root: &Path) -> PathBuf {
    let layout = root.join("layout");
    let l0 = root.join("l0");
    let l1 = root.join("l1");
    for d in [
        l0.join("etc"),
        l0.join("dir"),
        l1.join("dir"),
        l1.join("bin"),
    ] {
        std::fs::create_dir_all(d).unwrap();
    }
    std::fs::write(l0.join("etc/hello"), "hello from layer 0\n").unwrap();
    std::fs::write(l0.join("old"), "gone later\n").unwrap();
    std::fs::write(l0.join("dir/a"), "a").unwrap();
    std::fs::write(l0.join("dir/b"), "b").unwrap();
    std::fs::write(l1.join(".wh.old"), "").unwrap();
    std::fs::write(l1.join("dir/.wh..wh..opq"), "").unwrap();
    std::fs::write(l1.join("dir/c"), "c").unwrap();
    std::fs::write(l1.join("bin/tool"), "#!/bin/sh\n").unwrap();
    symlink("/etc/hello", l1.join("link")).unwrap();
    std::fs::create_dir_all(&layout).unwrap();
    std::fs::write(
        layout.join("oci-layout"),
        r#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .unwrap();
    let layers = [
        (
            blob(&layout, &layer_tar(&l0, true)),
            "application/vnd.oci.image.layer.v1.tar+gzip",
        ),
        (
            blob(&layout, &layer_tar(&l1, false)),
            "application/vnd.oci.image.layer.v1.tar",
        ),
    ];
    let config = serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "config": {"Entrypoint": ["/bin/tool"], "Cmd": ["--flag"], "Env": ["PATH=/bin", "A=b"],
                   "WorkingDir": "/dir"},
        "rootfs": {"type": "layers", "diff_ids": []}
    });
    let config = serde_json::to_vec(&config).unwrap();
    let config_digest = blob(&layout, &config);
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": config_digest, "size": config.len()},
        "layers": layers.iter().map(|(d, m)| serde_json::json!({"mediaType": m, "digest": d, "size": 0}))
            .collect::<Vec<_>>()
    });
    let manifest = serde_json::to_vec(&manifest).unwrap();
    let manifest_digest = blob(&layout, &manifest);
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                       "digest": manifest_digest, "size": manifest.len()}]
    });
    std::fs::write(
        layout.join("index.json"),
        serde_json::to_vec(&index).unwrap(),
    )
    .unwrap();
    layout
}

/// `path` read out of the ext4 `image` without mounting it (None: not there).
fn cat(image: &Path, path: &str) -> Option<String> {
    let out = Command::new("debugfs")
        .args(["-R", &format!("cat {path}")])
        .arg(image)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    (!err.contains("not found")).then(|| String::from_utf8_lossy(&out.stdout).into())
}

fn root_or_skip() -> bool {
    let root = rustix::process::geteuid().is_root();
    if !root {
        eprintln!("!!! SKIPPED: building an OCI base needs root (overlay mount) !!!");
    }
    root
}

#[test]
fn an_image_layout_becomes_a_cached_base_with_its_layers_merged() {
    if !root_or_skip() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let layout = layout(tmp.path());
    let cache = tmp.path().join("cache");
    let mut lines = Vec::new();
    let base = prepare(&ImageSource::Dir(layout.clone()), &cache, &mut |l| {
        lines.push(l.to_string())
    })
    .unwrap();
    assert!(base.built);
    assert_eq!(lines.len(), 3, "{lines:?}");
    assert_eq!(
        cat(&base.image, "/etc/hello").as_deref(),
        Some("hello from layer 0\n")
    );
    assert_eq!(cat(&base.image, "/old"), None, "the whiteout removed /old");
    assert_eq!(
        cat(&base.image, "/dir/a"),
        None,
        "the opaque /dir hides layer 0's files"
    );
    assert_eq!(cat(&base.image, "/dir/c").as_deref(), Some("c"));
    assert_eq!(
        cat(&base.image, "/bin/tool").as_deref(),
        Some("#!/bin/sh\n")
    );
    assert_eq!(
        base.config,
        RunConfig {
            entrypoint: vec!["/bin/tool".into()],
            cmd: vec!["--flag".into()],
            env: vec!["PATH=/bin".into(), "A=b".into()],
            workdir: "/dir".into(),
        }
    );
    let mode = std::fs::metadata(&base.image).unwrap().permissions();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
        0o444
    );
    // The second time: the cache, no build; the archive of the same layout is the same image.
    let again = prepare(&ImageSource::Dir(layout.clone()), &cache, &mut |_| {}).unwrap();
    assert!(!again.built && again.image == base.image);
    let archive = tmp.path().join("image.tar");
    let out = Command::new("tar")
        .arg("-cf")
        .arg(&archive)
        .arg("-C")
        .arg(&layout)
        .arg(".")
        .output()
        .unwrap();
    assert!(out.status.success());
    let from_archive = prepare(&ImageSource::Archive(archive), &cache, &mut |_| {}).unwrap();
    assert_eq!(from_archive.image, base.image);
    assert!(!from_archive.built);
    // Nothing but the base and its lock is left in the cache.
    let mut left: Vec<String> = std::fs::read_dir(&cache)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(left.len(), 2, "{left:?}");
}

#[test]
fn a_changed_blob_or_a_digest_naming_another_path_is_refused() {
    if !root_or_skip() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let layout = layout(tmp.path());
    let cache = tmp.path().join("cache");
    // Damage the top layer: its digest no longer matches.
    let index: Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    let manifest_digest = index["manifests"][0]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let manifest = read_json_blob(&layout, &manifest_digest).unwrap();
    let top = manifest["layers"][1]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let top_path = blob_path(&layout, &top).unwrap();
    let mut bytes = std::fs::read(&top_path).unwrap();
    bytes[600] ^= 1;
    std::fs::write(&top_path, bytes).unwrap();
    let err = prepare(&ImageSource::Dir(layout.clone()), &cache, &mut |_| {}).unwrap_err();
    assert!(matches!(err, OciError::Digest(ref d) if *d == top), "{err}");
    assert!(!cache
        .join(format!("{}.ext4", &manifest_digest[7..]))
        .exists());
    // A digest that would name a path outside blobs/.
    for bad in ["sha256:../../etc/passwd", "sha512:00", "sha256:ABC"] {
        assert!(blob_path(&layout, bad).is_err(), "{bad}");
    }
    assert!("docker:x".parse::<ImageSource>().is_err());
    assert_eq!(
        "oci-dir:/a".parse::<ImageSource>().unwrap(),
        ImageSource::Dir("/a".into())
    );
}
