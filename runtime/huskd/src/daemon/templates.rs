//! Templates: a sandbox booted once, snapshotted as soon as its guest agent answers, and cloned
//! by CreateVm in milliseconds instead of booting Linux again (see docs/templates.md).
//!
//! On disk, under `<state-dir>/templates/` (0700, huskd's own like `vms/`):
//! `<name>/template.pb` (the `husk.v1.Template` record) and `<name>/<build>/`, one snapshot
//! directory per build (vm.state, vm.mem, the copy-on-write overlays). A rebuild
//! (CreateTemplate with replace) writes a new build beside the old one and switches the record
//! over when it is ready, so clones are served from the old build meanwhile; a build's
//! directory goes once neither the record nor any VM cloned from it names it ([`sweep`]).
//!
//! A clone is a RestoreVm of the build with a fresh identity (`after_restore`), and CreateVm
//! returns only once the clone has taken it. Its copy-on-write disks go on from the build's
//! copy of their overlay, which only that VM may open beyond huskd's path policy
//! ([`Daemon::policy_for`]).

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use husk_host::confined::Dir;
use husk_host::policy::PathPolicy;
use husk_proto::v1::{
    network, template, CreateTemplateRequest, Template, TemplateInput, Vm, VmSpec, VmState,
};
use prost::Message;
use tonic::Status;

use super::snapshots::{CloneOptions, SnapshotFiles};
use super::vm::{lock, now_ms, random_id, state_of, VmEntry};
use super::Daemon;
use crate::store;
use crate::validate::{self, Defaults};

/// Under the state directory.
const TEMPLATES_DIR: &str = "templates";
/// A template's record, in its directory.
const RECORD: &str = "template.pb";
/// The label of the VM a template is built from (its value: the template's name), for people
/// reading ListVms; huskd itself finds that VM by the id in [`BUILDER_FILE`].
pub const BUILDER_LABEL: &str = "husk.template.build";
/// In a build's directory while the build runs: the id of the VM it runs in, so that a huskd
/// that ended meanwhile deletes exactly that VM when it starts again (a label could be any VM's).
const BUILDER_FILE: &str = "builder.id";
/// How long a template's VM may take to boot to its agent.
const BUILD_READY_WAIT: Duration = Duration::from_secs(180);
/// How long a clone may take to answer with its new identity.
const CLONE_IDENTITY_WAIT: Duration = Duration::from_secs(30);

/// The templates huskd knows, and the builds in progress.
#[derive(Default)]
pub struct Templates {
    records: Mutex<BTreeMap<String, Template>>,
    /// Template name -> the build being made (a new template's, or a rebuild's).
    building: Mutex<BTreeMap<String, String>>,
}

/// `<state-dir>/templates`.
fn templates_dir(state_dir: &Path) -> PathBuf {
    state_dir.join(TEMPLATES_DIR)
}

/// The snapshot directory of a template's build.
fn build_dir(state_dir: &Path, name: &str, build: &str) -> PathBuf {
    templates_dir(state_dir).join(name).join(build)
}

/// Opens (creating it, 0700) `<state-dir>/templates`.
fn open_templates_dir(state_dir: &Path) -> std::io::Result<Dir> {
    std::fs::create_dir_all(state_dir)?;
    Dir::open(state_dir)?.create_subdir(TEMPLATES_DIR, store::DIR_MODE, false)
}

fn save_record(state_dir: &Path, record: &Template) -> std::io::Result<()> {
    open_templates_dir(state_dir)?
        .create_subdir(&record.name, store::DIR_MODE, false)?
        .write_atomic(RECORD, &record.encode_to_vec(), store::FILE_MODE)
}

/// Why a spec cannot become a template (INVALID_ARGUMENT), or None.
pub fn template_spec_problem(spec: &VmSpec) -> Option<String> {
    if !spec.command.is_empty() {
        return Some(
            "spec.command: a template is a sandbox (no command); run processes in its clones \
             with Exec"
                .into(),
        );
    }
    if !spec.mounts.is_empty() {
        return Some(
            "spec.mounts: a VM sharing host directories cannot be snapshotted, so it cannot \
             be a template"
                .into(),
        );
    }
    if spec
        .network
        .as_ref()
        .is_some_and(|n| n.mode == network::Mode::Netns as i32)
    {
        return Some(
            "spec.network: MODE_NETNS joins one namespace, which clones cannot share".into(),
        );
    }
    if !spec.rootfs.is_empty() && !spec.rootfs_copy_on_write {
        return Some(
            "spec.rootfs: clones would all write the same image; set rootfs_copy_on_write".into(),
        );
    }
    if let Some(i) = spec
        .disks
        .iter()
        .position(|d| !d.read_only && !d.copy_on_write)
    {
        return Some(format!(
            "spec.disks[{i}]: clones would all write the same image; make it read_only or \
             copy_on_write"
        ));
    }
    None
}

/// What CreateVm with a template may still say about the clone: its name, labels (empty: the
/// template's) and host name (empty: the template's). Anything else is the template's
/// (INVALID_ARGUMENT).
pub fn clone_spec(template: &VmSpec, request: &VmSpec) -> Result<VmSpec, Status> {
    let mut rest = request.clone();
    rest.name.clear();
    rest.labels.clear();
    rest.hostname.clear();
    if rest != VmSpec::default() {
        return Err(Status::invalid_argument(
            "spec: with a template only name, labels and hostname may be given; everything \
             else is the template's",
        ));
    }
    if !request.hostname.is_empty() && !husk_init::hostname::valid_hostname(&request.hostname) {
        return Err(Status::invalid_argument(format!(
            "spec.hostname: {:?} is not a host name",
            request.hostname
        )));
    }
    let mut spec = template.clone();
    spec.name = request.name.clone();
    if !request.labels.is_empty() {
        spec.labels = request.labels.clone();
    }
    if !request.hostname.is_empty() {
        spec.hostname = request.hostname.clone();
    }
    Ok(spec)
}

/// A spec without what clones of one template may differ in, for matching.
fn shape(spec: &VmSpec) -> VmSpec {
    let mut spec = spec.clone();
    spec.name.clear();
    spec.labels.clear();
    spec.hostname.clear();
    spec
}

/// The host files a spec is built from: kernel, initrd and every disk image.
fn input_paths(spec: &VmSpec) -> Vec<&str> {
    [
        spec.kernel.as_str(),
        spec.initrd.as_str(),
        spec.rootfs.as_str(),
    ]
    .into_iter()
    .chain(spec.disks.iter().map(|d| d.path.as_str()))
    .filter(|p| !p.is_empty())
    .collect()
}

/// The identity of the file at `path` as it is now (only its metadata is read).
fn input_of(path: &str) -> std::io::Result<TemplateInput> {
    let meta = std::fs::metadata(path)?;
    Ok(TemplateInput {
        path: path.to_string(),
        device: meta.dev(),
        inode: meta.ino(),
        size: meta.size(),
        mtime_ns: meta.mtime() * 1_000_000_000 + meta.mtime_nsec(),
        ctime_ns: meta.ctime() * 1_000_000_000 + meta.ctime_nsec(),
    })
}

/// The inputs of `spec` now.
fn inputs_of(spec: &VmSpec) -> Result<Vec<TemplateInput>, Status> {
    input_paths(spec)
        .into_iter()
        .map(|p| {
            input_of(p)
                .map_err(|e| Status::failed_precondition(format!("{p}: cannot read it: {e}")))
        })
        .collect()
}

/// Which recorded input is no longer the same file, if one is.
pub fn changed_input(inputs: &[TemplateInput]) -> Option<String> {
    inputs.iter().find_map(|was| match input_of(&was.path) {
        Ok(now) if now == *was => None,
        Ok(_) => Some(format!("{} changed since the template was built", was.path)),
        Err(e) => Some(format!("{}: {e}", was.path)),
    })
}

/// Whether the template may be cloned now; a changed input makes it STALE (recorded).
fn check_ready(record: &Template) -> Result<(), Status> {
    match template::State::try_from(record.state) {
        Ok(template::State::Ready) => Ok(()),
        Ok(template::State::Building) => Err(Status::failed_precondition(format!(
            "template {}: still being built",
            record.name
        ))),
        _ => Err(Status::failed_precondition(format!(
            "template {} is {}: {} (rebuild it: husk template create --replace)",
            record.name,
            state_name(record.state),
            record.reason
        ))),
    }
}

/// The state's name for messages.
pub fn state_name(state: i32) -> &'static str {
    match template::State::try_from(state) {
        Ok(template::State::Building) => "BUILDING",
        Ok(template::State::Ready) => "READY",
        Ok(template::State::Stale) => "STALE",
        Ok(template::State::Failed) => "FAILED",
        _ => "UNSPECIFIED",
    }
}

impl Daemon {
    /// The path policy for what `entry`'s VMM opens: huskd's, plus the template build it was
    /// cloned from (its disks go on from the build's overlays).
    pub(super) fn policy_for(&self, entry: &VmEntry) -> PathPolicy {
        let vm = lock(&entry.record);
        match vm.status.as_ref() {
            Some(s) if !s.template.is_empty() && !s.template_build.is_empty() => {
                let dir = build_dir(&self.config.state_dir, &s.template, &s.template_build);
                self.config.policy.with_root(&dir)
            }
            _ => self.config.policy.clone(),
        }
    }

    /// Loads the template records a previous huskd left (at start). A build that huskd did
    /// not finish is recorded FAILED and its VM deleted.
    pub(super) fn load_templates(self: &Arc<Self>) {
        let state_dir = &self.config.state_dir;
        let dir = match open_templates_dir(state_dir) {
            Ok(dir) => dir,
            Err(e) => {
                tracing::warn!(error = %e, "cannot open the templates directory");
                return;
            }
        };
        let mut records = BTreeMap::new();
        let mut builders: Vec<String> = Vec::new();
        for name in dir.entries().unwrap_or_default() {
            // Builds in progress when the previous huskd ended: their VMs go.
            if let Ok(template_dir) = dir.subdir(&name) {
                for build in template_dir.entries().unwrap_or_default() {
                    let id = template_dir
                        .subdir(&build)
                        .and_then(|b| b.read_bounded(BUILDER_FILE, 64));
                    if let Ok(Some(id)) = id {
                        builders.push(String::from_utf8_lossy(&id).trim().to_string());
                    }
                }
            }
            let read = dir
                .subdir(&name)
                .and_then(|d| d.read_bounded(RECORD, store::MAX_RECORD));
            let record = match read {
                Ok(Some(bytes)) => Template::decode(&bytes[..]).ok(),
                _ => None,
            };
            let Some(mut record) = record else {
                tracing::warn!(template = %name, "skipping a template without a readable record");
                continue;
            };
            if record.state == template::State::Building as i32 {
                record.state = template::State::Failed as i32;
                record.reason = "huskd ended while building it".into();
                let _ = save_record(state_dir, &record);
            }
            records.insert(name, record);
        }
        *lock(&self.templates.records) = records;
        let builders: Vec<Arc<VmEntry>> = {
            let vms = lock(&self.vms);
            builders
                .iter()
                .filter_map(|id| vms.get(id).cloned())
                .collect()
        };
        let daemon = self.clone();
        tokio::spawn(async move {
            for entry in builders {
                let _ = daemon.delete(&entry, true).await;
            }
            daemon.sweep_templates();
        });
    }

    /// CreateTemplate (see husk.proto).
    pub async fn create_template(
        self: &Arc<Self>,
        request: CreateTemplateRequest,
    ) -> Result<Template, Status> {
        validate::check_name(&request.name)?;
        let spec = request
            .spec
            .ok_or_else(|| Status::invalid_argument("spec: missing"))?;
        if let Some(problem) = template_spec_problem(&spec) {
            return Err(Status::invalid_argument(problem));
        }
        let defaults = Defaults {
            kernel: &self.config.default_kernel,
            initrd: &self.config.default_initrd,
        };
        let mut spec = validate::normalize(spec, &defaults, &self.config.policy)?;
        spec.name.clear();
        let name = request.name;
        let build = random_id();
        {
            let records = lock(&self.templates.records);
            let mut building = lock(&self.templates.building);
            if building.contains_key(&name) {
                return Err(Status::failed_precondition(format!(
                    "template {name}: being built already"
                )));
            }
            if records.contains_key(&name) && !request.replace {
                return Err(Status::already_exists(format!(
                    "template {name} exists (replace it with replace / --replace)"
                )));
            }
            building.insert(name.clone(), build.clone());
        }
        let inputs = inputs_of(&spec);
        let mut record = Template {
            name: name.clone(),
            spec: Some(spec.clone()),
            state: template::State::Building as i32,
            created_unix_ms: now_ms(),
            inputs: inputs.clone().unwrap_or_default(),
            build: build.clone(),
            ..Default::default()
        };
        let fresh = !lock(&self.templates.records).contains_key(&name);
        if fresh {
            // A new template is listed while it builds; a rebuild keeps serving the old one.
            self.store_template(&record);
        }
        let started = Instant::now();
        let built = match inputs {
            Ok(_) => self.build_template(&name, &build, spec).await,
            Err(status) => Err(status),
        };
        lock(&self.templates.building).remove(&name);
        let result = match built {
            Ok(done) => {
                record.state = template::State::Ready as i32;
                record.build_ms = started.elapsed().as_millis() as u64;
                record.memory_bytes = done.memory_bytes;
                record.memory_written = done.memory_written;
                self.store_template(&record);
                tracing::info!(template = %name, build = %build, ms = record.build_ms, "template ready");
                Ok(self.with_clone_count(record))
            }
            Err(status) => {
                if fresh {
                    record.state = template::State::Failed as i32;
                    record.reason = status.message().to_string();
                    self.store_template(&record);
                }
                tracing::warn!(template = %name, error = %status.message(), "template build failed");
                Err(status)
            }
        };
        self.sweep_templates();
        result
    }

    /// Records `record` in memory and on disk (a failure to save is logged: the template works
    /// until huskd restarts).
    fn store_template(&self, record: &Template) {
        if let Err(e) = save_record(&self.config.state_dir, record) {
            tracing::warn!(template = %record.name, error = %e, "cannot save the template record");
        }
        lock(&self.templates.records).insert(record.name.clone(), record.clone());
    }

    /// Boots `spec` as the template's VM, waits for its agent, snapshots it into the build's
    /// directory and deletes the VM.
    async fn build_template(
        self: &Arc<Self>,
        name: &str,
        build: &str,
        mut spec: VmSpec,
    ) -> Result<husk_proto::vmm::SnapshotDone, Status> {
        spec.labels = [(BUILDER_LABEL.to_string(), name.to_string())].into();
        let target = open_templates_dir(&self.config.state_dir)
            .and_then(|d| d.create_subdir(name, store::DIR_MODE, false))
            .and_then(|d| d.create_subdir(build, store::DIR_MODE, true))
            .map_err(|e| Status::internal(format!("template {name}: its directory: {e}")))?;
        let entry = match self.create(spec) {
            Ok(entry) => entry,
            Err(status) => {
                self.remove_build(name, build);
                return Err(status);
            }
        };
        let result = match target.write_atomic(BUILDER_FILE, entry.id.as_bytes(), store::FILE_MODE)
        {
            Ok(()) => self.boot_and_snapshot(&entry, name, target).await,
            Err(e) => Err(Status::internal(format!(
                "template {name}: its directory: {e}"
            ))),
        };
        if let Err(e) = self.delete(&entry, true).await {
            tracing::warn!(template = %name, error = %e.message(), "cannot delete the template's VM");
        }
        if result.is_err() {
            self.remove_build(name, build);
        } else if let Ok(dir) = self.build_dir(name, build) {
            let _ = dir.remove_file(BUILDER_FILE);
        }
        result
    }

    fn build_dir(&self, name: &str, build: &str) -> std::io::Result<Dir> {
        open_templates_dir(&self.config.state_dir)?
            .subdir(name)?
            .subdir(build)
    }

    fn remove_build(&self, name: &str, build: &str) {
        if let Ok(dir) = open_templates_dir(&self.config.state_dir).and_then(|d| d.subdir(name)) {
            let _ = dir.remove_tree(build);
        }
    }

    async fn boot_and_snapshot(
        self: &Arc<Self>,
        entry: &Arc<VmEntry>,
        name: &str,
        target: Dir,
    ) -> Result<husk_proto::vmm::SnapshotDone, Status> {
        self.start(entry).await?;
        let deadline = tokio::time::Instant::now() + BUILD_READY_WAIT;
        loop {
            let vm = entry.snapshot();
            if vm.status.as_ref().is_some_and(|s| s.agent_ready) {
                break;
            }
            if !matches!(state_of(&vm), VmState::Running | VmState::Starting) {
                let reason = vm.status.map(|s| s.failure_reason).unwrap_or_default();
                return Err(Status::failed_precondition(format!(
                    "template {name}: its VM ended before its agent answered: {reason}"
                )));
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(Status::deadline_exceeded(format!(
                    "template {name}: its VM's agent did not answer within {} s",
                    BUILD_READY_WAIT.as_secs()
                )));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let _op = entry.op.lock().await;
        let (done, _) = self.snapshot_into(entry, target, true, false).await?;
        Ok(done)
    }

    /// The template with its clone count filled in.
    fn with_clone_count(&self, mut record: Template) -> Template {
        record.clones = lock(&self.vms)
            .values()
            .filter(|e| {
                lock(&e.record)
                    .status
                    .as_ref()
                    .is_some_and(|s| s.template == record.name && s.template_build == record.build)
            })
            .count() as u32;
        record
    }

    /// ListTemplates.
    pub fn list_templates(&self) -> Vec<Template> {
        let records: Vec<Template> = lock(&self.templates.records).values().cloned().collect();
        records
            .into_iter()
            .map(|r| self.with_clone_count(r))
            .collect()
    }

    /// GetTemplate.
    pub fn get_template(&self, name: &str) -> Result<Template, Status> {
        let record = lock(&self.templates.records)
            .get(name)
            .cloned()
            .ok_or_else(|| Status::not_found(format!("no template named {name:?}")))?;
        Ok(self.with_clone_count(record))
    }

    /// DeleteTemplate: the record goes now, the build's files with its last clone.
    pub fn delete_template(&self, name: &str) -> Result<(), Status> {
        if lock(&self.templates.building).contains_key(name) {
            return Err(Status::failed_precondition(format!(
                "template {name}: being built; delete it once the build ended"
            )));
        }
        if lock(&self.templates.records).remove(name).is_none() {
            return Err(Status::not_found(format!("no template named {name:?}")));
        }
        if let Ok(dir) = open_templates_dir(&self.config.state_dir).and_then(|d| d.subdir(name)) {
            if let Err(e) = dir.remove_file(RECORD) {
                tracing::warn!(template = %name, error = %e, "cannot remove the template record");
            }
        }
        tracing::info!(template = %name, "template deleted");
        self.sweep_templates();
        Ok(())
    }

    /// CreateVm from a template: a clone, started, with its own identity.
    pub async fn clone_template(
        self: &Arc<Self>,
        name: &str,
        request: &VmSpec,
    ) -> Result<Vm, Status> {
        let record = lock(&self.templates.records)
            .get(name)
            .cloned()
            .ok_or_else(|| Status::not_found(format!("template: no template named {name:?}")))?;
        check_ready(&record)?;
        if let Some(reason) = changed_input(&record.inputs) {
            self.mark_stale(name, &record.build, &reason);
            return Err(Status::failed_precondition(format!(
                "template {name} is STALE: {reason} (rebuild it: husk template create --replace)"
            )));
        }
        let spec = clone_spec(record.spec.as_ref().unwrap_or(&VmSpec::default()), request)?;
        let path = build_dir(&self.config.state_dir, name, &record.build);
        let dir = Dir::open(&path).map_err(|e| {
            Status::failed_precondition(format!("template {name}: its build is unreadable: {e}"))
        })?;
        let files = SnapshotFiles::open_full(dir, &path)?;
        let (taken_tx, taken_rx) = tokio::sync::oneshot::channel();
        let options = CloneOptions {
            keep_disks: true,
            start_paused: false,
            hostname: request.hostname.clone(),
            template: Some((name.to_string(), record.build.clone())),
            identity_taken: Some(taken_tx),
        };
        let started = Instant::now();
        let vm = self.restore_snapshot(files, spec, options).await?;
        let launched = started.elapsed();
        let failure = match tokio::time::timeout(CLONE_IDENTITY_WAIT, taken_rx).await {
            Ok(Ok(Ok(()))) => {
                tracing::info!(
                    template = %name,
                    vm_id = %vm.id,
                    launch_ms = launched.as_millis() as u64,
                    ready_ms = started.elapsed().as_millis() as u64,
                    "clone ready"
                );
                return self.get(&vm.id);
            }
            Ok(Ok(Err(e))) => Status::unavailable(format!(
                "template {name}: the clone did not take its identity: {e}"
            )),
            Ok(Err(_)) => Status::internal("the clone's identity task ended without a word"),
            Err(_) => Status::deadline_exceeded(format!(
                "template {name}: the clone's agent did not answer within {} s",
                CLONE_IDENTITY_WAIT.as_secs()
            )),
        };
        // Never hand out a clone that may still carry the template's identity.
        if let Ok(entry) = self.resolve(&vm.id) {
            let _ = self.delete(&entry, true).await;
        }
        Err(failure)
    }

    /// The READY template whose spec is `spec` but for name, labels and host name, if any
    /// (CreateVm with match_template).
    pub fn matching_template(&self, spec: &VmSpec) -> Option<String> {
        let defaults = Defaults {
            kernel: &self.config.default_kernel,
            initrd: &self.config.default_initrd,
        };
        let wanted =
            shape(&validate::normalize(spec.clone(), &defaults, &self.config.policy).ok()?);
        let candidates: Vec<Template> = lock(&self.templates.records)
            .values()
            .filter(|t| {
                t.state == template::State::Ready as i32
                    && t.spec.as_ref().is_some_and(|s| shape(s) == wanted)
            })
            .cloned()
            .collect();
        // The inputs are stat'ed outside the records' lock.
        candidates
            .into_iter()
            .find(|t| changed_input(&t.inputs).is_none())
            .map(|t| t.name)
    }

    fn mark_stale(&self, name: &str, build: &str, reason: &str) {
        let mut records = lock(&self.templates.records);
        let Some(record) = records.get_mut(name).filter(|r| r.build == build) else {
            return;
        };
        record.state = template::State::Stale as i32;
        record.reason = reason.to_string();
        let record = record.clone();
        drop(records);
        tracing::warn!(template = %name, reason, "template is stale");
        self.store_template(&record);
    }

    /// Removes every build directory that neither a template record, a build in progress nor
    /// a VM names, and the directories of deleted templates once they are empty.
    pub(super) fn sweep_templates(&self) {
        let Ok(root) = open_templates_dir(&self.config.state_dir) else {
            return;
        };
        // A FAILED template's build never finished: nothing of it is kept.
        let mut keep: Vec<(String, String)> = lock(&self.templates.records)
            .values()
            .filter(|t| {
                t.state == template::State::Ready as i32 || t.state == template::State::Stale as i32
            })
            .map(|t| (t.name.clone(), t.build.clone()))
            .collect();
        keep.extend(
            lock(&self.templates.building)
                .iter()
                .map(|(n, b)| (n.clone(), b.clone())),
        );
        keep.extend(lock(&self.vms).values().filter_map(|e| {
            let vm = lock(&e.record);
            let s = vm.status.as_ref()?;
            (!s.template.is_empty()).then(|| (s.template.clone(), s.template_build.clone()))
        }));
        for name in root.entries().unwrap_or_default() {
            let Ok(dir) = root.subdir(&name) else {
                continue;
            };
            let mut left = 0;
            for entry in dir.entries().unwrap_or_default() {
                if entry == RECORD || keep.iter().any(|(n, b)| *n == name && *b == entry) {
                    left += 1;
                    continue;
                }
                match dir.remove_tree(&entry) {
                    Ok(()) => {
                        tracing::info!(template = %name, build = %entry, "template build removed")
                    }
                    Err(e) => {
                        left += 1;
                        tracing::warn!(template = %name, build = %entry, error = %e, "cannot remove a template build");
                    }
                }
            }
            if left == 0 {
                let _ = root.remove_tree(&name);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use husk_proto::v1::{Disk, Mount, Network};

    #[test]
    fn only_sandboxes_whose_writable_disks_are_copy_on_write_can_be_templates() {
        assert_eq!(template_spec_problem(&VmSpec::default()), None);
        let ok = VmSpec {
            rootfs: "/img/base.ext4".into(),
            rootfs_copy_on_write: true,
            disks: vec![
                Disk {
                    path: "/img/ro.raw".into(),
                    read_only: true,
                    ..Default::default()
                },
                Disk {
                    path: "/img/cow.raw".into(),
                    copy_on_write: true,
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        assert_eq!(template_spec_problem(&ok), None);
        let cases: [(VmSpec, &str); 5] = [
            (
                VmSpec {
                    command: vec!["true".into()],
                    ..Default::default()
                },
                "spec.command",
            ),
            (
                VmSpec {
                    mounts: vec![Mount::default()],
                    ..Default::default()
                },
                "spec.mounts",
            ),
            (
                VmSpec {
                    network: Some(Network {
                        mode: network::Mode::Netns as i32,
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                "spec.network",
            ),
            (
                VmSpec {
                    rootfs: "/img/base.ext4".into(),
                    ..Default::default()
                },
                "spec.rootfs",
            ),
            (
                VmSpec {
                    disks: vec![Disk {
                        path: "/img/rw.raw".into(),
                        ..Default::default()
                    }],
                    ..Default::default()
                },
                "spec.disks[0]",
            ),
        ];
        for (spec, field) in cases {
            let problem = template_spec_problem(&spec).unwrap();
            assert!(problem.starts_with(field), "{problem}");
        }
    }

    #[test]
    fn a_clone_takes_name_labels_and_host_name_and_nothing_else() {
        let template = VmSpec {
            kernel: "/k".into(),
            memory_mib: 256,
            hostname: "tpl".into(),
            ..Default::default()
        };
        let request = VmSpec {
            name: "c1".into(),
            labels: [("app".to_string(), "x".to_string())].into(),
            ..Default::default()
        };
        let spec = clone_spec(&template, &request).unwrap();
        assert_eq!(spec.name, "c1");
        assert_eq!(spec.memory_mib, 256);
        assert_eq!(spec.hostname, "tpl", "no host name asked: the template's");
        assert_eq!(spec.labels["app"], "x");
        let labelled = VmSpec {
            labels: [("team".to_string(), "a".to_string())].into(),
            ..template.clone()
        };
        let inherited = clone_spec(&labelled, &VmSpec::default()).unwrap();
        assert_eq!(
            inherited.labels["team"], "a",
            "no labels asked: the template's"
        );
        let renamed = VmSpec {
            hostname: "clone-1".into(),
            ..Default::default()
        };
        assert_eq!(clone_spec(&template, &renamed).unwrap().hostname, "clone-1");
        let bad = VmSpec {
            hostname: "bad name".into(),
            ..Default::default()
        };
        assert_eq!(
            clone_spec(&template, &bad).unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
        let more = VmSpec {
            memory_mib: 512,
            ..Default::default()
        };
        let e = clone_spec(&template, &more).unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(
            e.message().contains("only name, labels and hostname"),
            "{}",
            e.message()
        );
    }

    #[test]
    fn an_input_file_that_changes_or_goes_is_noticed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kernel");
        std::fs::write(&path, b"one").unwrap();
        let p = path.to_str().unwrap();
        let inputs = vec![input_of(p).unwrap()];
        assert_eq!(changed_input(&inputs), None);
        // Replaced by another file (new inode), as a package update does.
        let new = dir.path().join("kernel.new");
        std::fs::write(&new, b"two").unwrap();
        std::fs::rename(&new, &path).unwrap();
        assert!(changed_input(&inputs).unwrap().contains("changed"));
        let inputs = vec![input_of(p).unwrap()];
        // Written in place: size and times change.
        std::fs::write(&path, b"three!").unwrap();
        assert!(changed_input(&inputs).is_some());
        let inputs = vec![input_of(p).unwrap()];
        std::fs::remove_file(&path).unwrap();
        assert!(changed_input(&inputs).is_some());
    }

    #[test]
    fn a_spec_names_its_kernel_initrd_and_disk_images_as_inputs() {
        let spec = VmSpec {
            kernel: "/k".into(),
            initrd: "/i".into(),
            rootfs: "/r".into(),
            disks: vec![Disk {
                path: "/d".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        assert_eq!(input_paths(&spec), vec!["/k", "/i", "/r", "/d"]);
    }
}
