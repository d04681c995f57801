//! OCI images (image-spec 1.x "image layout": `oci-layout`, `index.json`, `blobs/sha256/...`)
//! turned into a cached, read-only ext4 base per image manifest, for `husk run --image
//! oci-dir:PATH` and `--image oci-archive:PATH` (a tar of such a layout, as `skopeo copy
//! ... oci-archive:` or `buildah push` write it).
//!
//! **Trust.** Every blob is named by its digest, and every blob husk reads is checked against
//! it: a layout whose files were changed is refused, not misread. JSON documents are read with a
//! bound. Layer tars come from whoever made the image: each is unpacked by GNU tar into an
//! empty directory of its own (tar refuses `..` members and defers symbolic links to the end, so
//! a member cannot be written through a link of the same archive; no layer is unpacked over
//! another, so no link of one layer can redirect another's files), its whiteouts are turned into
//! overlayfs' form, and the layers are stacked by a read-only overlay mount while
//! `mkfs.ext4 -d` copies the merged tree (see [`crate::ext4_tree`]).
//!
//! **The cache** is `<cache>/<manifest hex>.ext4` (mode 0444), built once under an exclusive
//! lock on `<hex>.lock`, in `<hex>.build/`, and renamed into place only when complete. Root is
//! needed (overlay mount, device nodes for whiteouts, `trusted.` xattrs).

use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::str::FromStr;

use rustix::fs::{FlockOperation, Mode, OFlags};
use serde_json::Value;
use sha2::{Digest, Sha256};

/// Largest JSON document (index, manifest, config) read.
const MAX_JSON: u64 = 4 << 20;
/// Deepest nesting of image indexes followed.
const MAX_INDEX_DEPTH: usize = 3;

/// Where an image comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageSource {
    /// `oci-dir:PATH`: an image layout directory.
    Dir(PathBuf),
    /// `oci-archive:PATH`: a tar of an image layout.
    Archive(PathBuf),
}

impl FromStr for ImageSource {
    type Err = OciError;
    fn from_str(value: &str) -> Result<Self, OciError> {
        let path = |p: &str| (!p.is_empty()).then(|| PathBuf::from(p));
        if let Some(p) = value.strip_prefix("oci-dir:").and_then(path) {
            return Ok(Self::Dir(p));
        }
        if let Some(p) = value.strip_prefix("oci-archive:").and_then(path) {
            return Ok(Self::Archive(p));
        }
        Err(OciError::Source(value.into()))
    }
}

impl std::fmt::Display for ImageSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Dir(p) => write!(f, "oci-dir:{}", p.display()),
            Self::Archive(p) => write!(f, "oci-archive:{}", p.display()),
        }
    }
}

/// What the image's config says about running it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunConfig {
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub env: Vec<String>,
    pub workdir: String,
}

/// A base ready to boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Base {
    /// The ext4 image (read-only; the VM writes an overlay over it).
    pub image: PathBuf,
    /// `sha256:<hex>` of the manifest.
    pub manifest: String,
    pub config: RunConfig,
    /// Whether this call built it (false: it was in the cache).
    pub built: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum OciError {
    #[error("{0:?}: use oci-dir:PATH or oci-archive:PATH")]
    Source(String),
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("{0}: not an OCI image layout ({1})")]
    Layout(String, String),
    #[error("blob {0} does not match its digest: the image was changed or damaged")]
    Digest(String),
    #[error("layer {digest}: media type {media_type} is not supported (tar or tar+gzip)")]
    MediaType { digest: String, media_type: String },
    #[error("unpacking layer {0}: {1}")]
    Unpack(String, String),
    #[error("building the base: {0}")]
    Build(#[from] crate::ext4_tree::TreeError),
    #[error("--image needs root: layers are stacked with an overlay mount and whiteouts are device nodes")]
    NotRoot,
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> OciError + '_ {
    move |source| OciError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// A `sha256:<64 hex>` digest, checked (it names a file: nothing else may pass).
fn blob_path(layout: &Path, digest: &str) -> Result<PathBuf, OciError> {
    let hex = digest
        .strip_prefix("sha256:")
        .filter(|h| {
            h.len() == 64
                && h.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        })
        .ok_or_else(|| {
            OciError::Layout(
                layout.display().to_string(),
                format!("digest {digest:?} is not sha256:<64 hex digits>"),
            )
        })?;
    Ok(layout.join("blobs/sha256").join(hex))
}

/// The sha256 of a file, streamed.
fn file_sha256(path: &Path) -> Result<String, OciError> {
    let mut file = File::open(path).map_err(io_at(path))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(io_at(path))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex(&hasher.finalize()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Reads a JSON blob, bounded, checked against its digest.
fn read_json_blob(layout: &Path, digest: &str) -> Result<Value, OciError> {
    let path = blob_path(layout, digest)?;
    let mut bytes = Vec::new();
    File::open(&path)
        .map_err(io_at(&path))?
        .take(MAX_JSON + 1)
        .read_to_end(&mut bytes)
        .map_err(io_at(&path))?;
    if bytes.len() as u64 > MAX_JSON || format!("sha256:{}", hex(&Sha256::digest(&bytes))) != digest
    {
        return Err(OciError::Digest(digest.into()));
    }
    serde_json::from_slice(&bytes)
        .map_err(|e| OciError::Layout(layout.display().to_string(), format!("blob {digest}: {e}")))
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

/// The manifest to use among an index's: the only one, else linux/amd64.
fn pick_manifest(layout: &Path, index: &Value) -> Result<Value, OciError> {
    let bad = |why: &str| OciError::Layout(layout.display().to_string(), why.into());
    let manifests = index
        .get("manifests")
        .and_then(Value::as_array)
        .ok_or_else(|| bad("no manifests in the index"))?;
    let chosen = match manifests.as_slice() {
        [] => return Err(bad("no manifests in the index")),
        [only] => only,
        many => many
            .iter()
            .find(|m| {
                let p = m.get("platform");
                p.and_then(|p| p.get("os")).and_then(Value::as_str) == Some("linux")
                    && p.and_then(|p| p.get("architecture"))
                        .and_then(Value::as_str)
                        == Some("amd64")
            })
            .ok_or_else(|| bad("several manifests and none for linux/amd64"))?,
    };
    Ok(chosen.clone())
}

/// The manifest descriptor's digest and the manifest, following nested indexes.
fn resolve_manifest(layout: &Path) -> Result<(String, Value), OciError> {
    let index_path = layout.join("index.json");
    let mut text = Vec::new();
    File::open(&index_path)
        .map_err(|e| OciError::Layout(layout.display().to_string(), format!("index.json: {e}")))?
        .take(MAX_JSON)
        .read_to_end(&mut text)
        .map_err(io_at(&index_path))?;
    let mut index: Value = serde_json::from_slice(&text)
        .map_err(|e| OciError::Layout(layout.display().to_string(), format!("index.json: {e}")))?;
    for _ in 0..MAX_INDEX_DEPTH {
        let descriptor = pick_manifest(layout, &index)?;
        let digest = descriptor
            .get("digest")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        let doc = read_json_blob(layout, &digest)?;
        if doc.get("manifests").is_some() {
            index = doc;
            continue;
        }
        return Ok((digest, doc));
    }
    Err(OciError::Layout(
        layout.display().to_string(),
        "image indexes nested too deep".into(),
    ))
}

/// The layers (bottom first) and the run config of a manifest.
fn read_manifest(layout: &Path, manifest: &Value) -> Result<(Vec<String>, RunConfig), OciError> {
    let bad = |why: String| OciError::Layout(layout.display().to_string(), why);
    let config_digest = manifest
        .pointer("/config/digest")
        .and_then(Value::as_str)
        .ok_or_else(|| bad("the manifest has no config".into()))?;
    let config = read_json_blob(layout, config_digest)?;
    let c = config.get("config").cloned().unwrap_or(Value::Null);
    let run = RunConfig {
        entrypoint: strings(&c["Entrypoint"]),
        cmd: strings(&c["Cmd"]),
        env: strings(&c["Env"]),
        workdir: c["WorkingDir"].as_str().unwrap_or_default().to_string(),
    };
    let mut layers = Vec::new();
    for layer in manifest
        .get("layers")
        .and_then(Value::as_array)
        .ok_or_else(|| bad("the manifest has no layers".into()))?
    {
        let digest = layer["digest"].as_str().unwrap_or_default().to_string();
        let media_type = layer["mediaType"].as_str().unwrap_or_default();
        let supported = [
            "application/vnd.oci.image.layer.v1.tar",
            "application/vnd.oci.image.layer.v1.tar+gzip",
            "application/vnd.docker.image.rootfs.diff.tar.gzip",
            "application/vnd.docker.image.rootfs.diff.tar",
        ];
        if !supported.contains(&media_type) {
            return Err(OciError::MediaType {
                digest,
                media_type: media_type.into(),
            });
        }
        blob_path(layout, &digest)?;
        layers.push(digest);
    }
    Ok((layers, run))
}

/// The base of `source` in `cache`: found there, or built now. `progress` gets one line per
/// step of a build.
pub fn prepare(
    source: &ImageSource,
    cache: &Path,
    progress: &mut dyn FnMut(&str),
) -> Result<Base, OciError> {
    if !rustix::process::geteuid().is_root() {
        return Err(OciError::NotRoot);
    }
    std::fs::create_dir_all(cache).map_err(io_at(cache))?;
    let unpacked;
    let layout = match source {
        ImageSource::Dir(dir) => dir.clone(),
        ImageSource::Archive(archive) => {
            unpacked = Scratch::new(cache, "archive")?;
            let out = Command::new("tar")
                .args(["-x", "--no-same-owner", "--no-same-permissions", "-f"])
                .arg(archive)
                .arg("-C")
                .arg(&unpacked.0)
                .output()
                .map_err(io_at(archive))?;
            if !out.status.success() {
                return Err(OciError::Layout(
                    archive.display().to_string(),
                    String::from_utf8_lossy(&out.stderr).trim().to_string(),
                ));
            }
            unpacked.0.clone()
        }
    };
    let (manifest_digest, manifest) = resolve_manifest(&layout)?;
    let (layers, config) = read_manifest(&layout, &manifest)?;
    let hex = manifest_digest.trim_start_matches("sha256:").to_string();
    let image = cache.join(format!("{hex}.ext4"));
    let base = |built| Base {
        image: image.clone(),
        manifest: manifest_digest.clone(),
        config: config.clone(),
        built,
    };
    if image.exists() {
        return Ok(base(false));
    }
    let lock_path = cache.join(format!("{hex}.lock"));
    let lock = rustix::fs::open(
        &lock_path,
        OFlags::CREATE | OFlags::RDWR | OFlags::CLOEXEC | OFlags::NOFOLLOW,
        Mode::from_raw_mode(0o600),
    )
    .map_err(|e| io_at(&lock_path)(e.into()))?;
    rustix::fs::flock(&lock, FlockOperation::LockExclusive)
        .map_err(|e| io_at(&lock_path)(e.into()))?;
    if image.exists() {
        return Ok(base(false)); // another husk built it while this one waited
    }
    let build = Scratch::at(cache.join(format!("{hex}.build")))?;
    let mut dirs = Vec::with_capacity(layers.len());
    for (i, digest) in layers.iter().enumerate() {
        let blob = blob_path(&layout, digest)?;
        let size = std::fs::metadata(&blob).map_err(io_at(&blob))?.len();
        progress(&format!(
            "layer {}/{} {} ({:.1} MiB): checking and unpacking",
            i + 1,
            layers.len(),
            &digest[..19.min(digest.len())],
            size as f64 / (1 << 20) as f64
        ));
        if format!("sha256:{}", file_sha256(&blob)?) != *digest {
            return Err(OciError::Digest(digest.clone()));
        }
        let dir = build.0.join(format!("layer{i}"));
        std::fs::create_dir(&dir).map_err(io_at(&dir))?;
        unpack_layer(&blob, &dir).map_err(|e| OciError::Unpack(digest.clone(), e))?;
        convert_whiteouts(&dir).map_err(|e| OciError::Unpack(digest.clone(), e.to_string()))?;
        dirs.push(dir);
    }
    progress("making the base image (mkfs.ext4)");
    dirs.reverse(); // overlayfs lists the top layer first
    let tmp = cache.join(format!("{hex}.ext4.tmp"));
    let merged = build.0.join("merged");
    let result = crate::ext4_tree::make_image_from_layers(&dirs, &[], &merged, &tmp);
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(e.into());
    }
    std::fs::set_permissions(&tmp, std::os::unix::fs::PermissionsExt::from_mode(0o444))
        .and_then(|()| std::fs::rename(&tmp, &image))
        .map_err(io_at(&image))?;
    drop(lock);
    Ok(base(true))
}

/// GNU tar into the empty `dir`: numeric owners, permissions and special files as the image
/// says (the tree only ever becomes an image's files).
fn unpack_layer(blob: &Path, dir: &Path) -> Result<(), String> {
    let out = Command::new("tar")
        .args(["-x", "--numeric-owner", "--same-owner", "-p", "-f"])
        .arg(blob)
        .arg("-C")
        .arg(dir)
        .output()
        .map_err(|e| format!("cannot run tar: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

/// The OCI whiteouts of one unpacked layer in overlayfs' form: `.wh.NAME` becomes a 0/0
/// character device `NAME`; `.wh..wh..opq` marks its directory opaque
/// (`trusted.overlay.opaque=y`). Symbolic links are never followed.
fn convert_whiteouts(dir: &Path) -> io::Result<()> {
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d)? {
            let entry = entry?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            let kind = entry.file_type()?;
            if name == ".wh..wh..opq" {
                std::fs::remove_file(entry.path())?;
                rustix::fs::lsetxattr(
                    &d,
                    "trusted.overlay.opaque",
                    b"y",
                    rustix::fs::XattrFlags::empty(),
                )?;
            } else if let Some(hidden) = name.strip_prefix(".wh.") {
                std::fs::remove_file(entry.path())?;
                let target = d.join(hidden);
                let _ = std::fs::remove_file(&target);
                rustix::fs::mknodat(
                    rustix::fs::CWD,
                    &target,
                    rustix::fs::FileType::CharacterDevice,
                    Mode::empty(),
                    rustix::fs::makedev(0, 0),
                )?;
            } else if kind.is_dir() {
                stack.push(entry.path());
            }
        }
    }
    Ok(())
}

/// A directory removed (with everything in it) when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(parent: &Path, what: &str) -> Result<Self, OciError> {
        Self::at(parent.join(format!("{what}-{}.tmp", std::process::id())))
    }

    fn at(path: PathBuf) -> Result<Self, OciError> {
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir(&path).map_err(io_at(&path))?;
        Ok(Self(path))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        crate::ext4_tree::unmount(&self.0.join("merged"));
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests;
