//! A VM's disks as huskd opens them for a run: every image under the path policy, backing
//! chains resolved here (each backing file through the same policy), copy-on-write disks on an
//! overlay of the VM's own in its directory.
//!
//! A copy-on-write disk's overlay is `disk<N>.qcow2` in the VM's directory (N: the disk's
//! position, the rootfs first): made over the image on the VM's first start, used again on
//! later starts, removed with the VM. The image itself and its chain are only ever read.

use std::fs::File;
use std::path::Path;

use husk_host::confined::Dir;
use husk_host::disk_image::{self, FormatSource, OpenedDisk};
use husk_host::policy::{PathPolicy, PolicyError};
use husk_host::vmm_args::DiskFormat;
use husk_proto::v1::VmSpec;
use rustix::fs::OFlags;
use tonic::Status;

use super::policy_status;

/// One disk of a spec, as launching needs it.
pub struct DiskRequest<'a> {
    /// "rootfs" or "disks[i]", for messages.
    pub what: String,
    pub path: &'a str,
    pub format: &'a str,
    pub read_only: bool,
    pub copy_on_write: bool,
}

/// The spec's disks in device order: the rootfs first.
pub fn requests(spec: &VmSpec) -> Vec<DiskRequest<'_>> {
    let mut out = Vec::new();
    if !spec.rootfs.is_empty() {
        out.push(DiskRequest {
            what: "rootfs".into(),
            path: &spec.rootfs,
            format: &spec.rootfs_format,
            read_only: false,
            copy_on_write: spec.rootfs_copy_on_write,
        });
    }
    for (i, d) in spec.disks.iter().enumerate() {
        out.push(DiskRequest {
            what: format!("disks[{i}]"),
            path: &d.path,
            format: &d.format,
            read_only: d.read_only,
            copy_on_write: d.copy_on_write,
        });
    }
    out
}

/// The overlay file of the disk at `index`.
pub fn overlay_name(index: usize) -> String {
    format!("disk{index}.qcow2")
}

/// The overlay file of a copy-on-write disk attached to slot `slot` (made at the attach,
/// removed at the detach; one left by a VM that stopped with it attached is replaced).
pub fn slot_overlay_name(slot: u32) -> String {
    format!("slot{slot}.qcow2")
}

fn denied(e: PolicyError) -> Status {
    policy_status(e, Status::failed_precondition)
}

/// Opens every disk of `spec` for a run of the VM whose directory is `vm_dir`.
pub fn open_all(
    policy: &PathPolicy,
    vm_dir: &Dir,
    spec: &VmSpec,
) -> Result<Vec<OpenedDisk>, Status> {
    requests(spec)
        .iter()
        .enumerate()
        .map(|(i, r)| open_one(policy, vm_dir, &overlay_name(i), r))
        .collect()
}

/// Opens one disk: the image and its chain, or (copy-on-write) the overlay `overlay` in
/// `vm_dir`, made over the image when missing, and the chain below it.
pub fn open_one(
    policy: &PathPolicy,
    vm_dir: &Dir,
    overlay: &str,
    r: &DiskRequest<'_>,
) -> Result<OpenedDisk, Status> {
    let format = FormatSource::parse(r.format)
        .map_err(|e| Status::invalid_argument(format!("{}.format: {e}", r.what)))?;
    let what = r.what.clone();
    let backing = |p: &Path| {
        policy
            .open_file(&format!("{what}: backing file"), p, false)
            .map(|o| o.file)
    };
    let chain_status = |e: disk_image::ChainError<PolicyError>| match e {
        disk_image::ChainError::Open(e) => denied(e),
        other => Status::failed_precondition(format!("{}: {other}", r.what)),
    };
    let path = Path::new(r.path);
    if !r.copy_on_write {
        let top = policy
            .open_file(&r.what, path, !r.read_only)
            .map_err(denied)?
            .file;
        return disk_image::open_chain(path, top, format, r.read_only, backing)
            .map_err(chain_status);
    }
    let name = overlay.to_string();
    let internal = |m: String| Status::internal(format!("{}: the overlay {name}: {m}", r.what));
    let overlay = match vm_dir.open_file(&name, OFlags::RDWR, 0) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            create_overlay(policy, vm_dir, &name, &r.what, path, format.resolve(path))?
        }
        Err(e) => return Err(internal(e.to_string())),
    };
    let overlay_path = Path::new(&name);
    disk_image::open_chain(
        overlay_path,
        overlay,
        FormatSource::Stated(DiskFormat::Qcow2),
        false,
        backing,
    )
    .map_err(chain_status)
}

/// Makes the overlay `name` in `vm_dir` over the image at `base` (checked by the policy, read
/// only); nothing is left when it fails.
pub fn create_overlay(
    policy: &PathPolicy,
    vm_dir: &Dir,
    name: &str,
    what: &str,
    base: &Path,
    base_format: DiskFormat,
) -> Result<File, Status> {
    let base_file = policy.open_file(what, base, false).map_err(denied)?.file;
    let file = vm_dir
        .open_file(name, OFlags::RDWR | OFlags::CREATE | OFlags::EXCL, 0o600)
        .map_err(|e| Status::internal(format!("{what}: creating the overlay {name}: {e}")))?;
    if let Err(e) = disk_image::create_overlay(&file, base, &base_file, base_format, None) {
        let _ = vm_dir.remove_file(name);
        return Err(Status::failed_precondition(format!(
            "{what}: {}: {e}",
            base.display()
        )));
    }
    Ok(file)
}
