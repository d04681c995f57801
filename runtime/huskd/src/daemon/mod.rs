//! The daemon's state: every VM, its lifecycle operations and its events.
//!
//! Split by concern: [`vm`] (one VM's record and locks), [`launch`] (the one start/restore
//! sequence and the monitor of a VMM's end), [`snapshots`] (SnapshotVm, RestoreVm), [`agent`]
//! (what huskd asks of a guest agent on its own) and [`host`] (the seam around process
//! spawning and host networking, which lets `tests.rs` drive the state machine without root).
//!
//! Concurrency: each VM has an operation lock (a tokio mutex) that serializes its lifecycle
//! calls, so two StartVm on one VM run one after the other and the second finds the VM RUNNING
//! (FAILED_PRECONDITION). The record itself sits behind a short std mutex that is never held
//! across an await. A monitor task per running VMM turns its exit into STOPPED or FAILED.

mod admission;
mod agent;
mod containers;
mod disks;
mod host;
mod launch;
mod memory;
mod metrics;
mod rate_limits;
mod run_disks;
mod snapshots;
mod templates;
#[cfg(test)]
mod tests;
mod usage;
mod vm;

use std::collections::BTreeMap;
use std::io;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use husk_host::policy::{PathPolicy, PolicyError};
use husk_proto::v1::{event, Event, Vm, VmSpec, VmState, VmStatus};
use husk_proto::vmm::{vmm_request, vmm_response, ErrorKind, VmmRequest, VmmResponse};
use tokio::sync::broadcast;
use tonic::Status;

use crate::store;
use crate::validate::{self, Defaults};
pub use crate::vmm_process::LIMIT_CONTROLLERS;
use crate::wire::{self, VmSocket};
use host::{HostError, SystemHost, VmmHost};
pub use vm::VmEntry;
use vm::{allocate_uid, lock, now_ms, random_id, state_of};

/// Daemon-wide settings.
#[derive(Debug, Clone)]
pub struct DaemonConfig {
    pub state_dir: PathBuf,
    pub vmm: PathBuf,
    pub default_kernel: PathBuf,
    pub default_initrd: PathBuf,
    pub max_vms: usize,
    /// How VMMs are jailed (None: started directly).
    pub jail: Option<husk_host::jail::JailConfig>,
    /// The uids jailed VMMs run as: `(first, count)`, one per VM.
    pub uid_range: (u32, u32),
    /// Which host files callers may name.
    pub policy: PathPolicy,
    /// The cgroup v2 controllers the host offers for VM limits.
    pub controllers: Vec<String>,
    /// `--memory-overcommit RATIO`: the guest memory of live VMs may reach RATIO times the
    /// host's memory; a start beyond it is refused (None: no such check). See
    /// docs/capacity.md#overcommit-policy.
    pub memory_overcommit: Option<f64>,
}

/// How long a graceful stop waits when the request gives no timeout.
const DEFAULT_STOP_TIMEOUT: Duration = Duration::from_secs(10);

pub struct Daemon {
    config: DaemonConfig,
    /// Where VMMs are started and taps made (the real host but in unit tests).
    host: Arc<dyn VmmHost>,
    vms: Mutex<BTreeMap<String, Arc<VmEntry>>>,
    /// Guest memory (MiB) of starts admitted by `--memory-overcommit` that do not count as
    /// STARTING yet, so that two starts cannot both take the last room (see `admission.rs`).
    admitted_mib: Mutex<u64>,
    events: broadcast::Sender<Event>,
    /// Templates and their builds (see `templates.rs`).
    templates: templates::Templates,
    /// What `--metrics` serves beside the VMs' own numbers (see `metrics.rs`).
    pub metrics: Arc<crate::metrics::Registry>,
}

impl Daemon {
    /// Creates the daemon over `config.state_dir`, finding the VMs a previous huskd left: a VMM
    /// that still runs is adopted, one that ended meanwhile is recorded as such.
    pub fn open(config: DaemonConfig) -> Result<Arc<Self>, DaemonError> {
        Self::open_on(config, Arc::new(SystemHost))
    }

    /// [`Daemon::open`] over another host (a recording one, in unit tests).
    fn open_on(config: DaemonConfig, host: Arc<dyn VmmHost>) -> Result<Arc<Self>, DaemonError> {
        let vms_dir = store::vms_dir(&config.state_dir);
        store::open_vms_dir(&config.state_dir).map_err(|source| DaemonError::CreateStateDir {
            path: vms_dir.clone(),
            source,
        })?;
        let (events, _) = broadcast::channel(1024);
        let daemon = Arc::new(Self {
            config,
            host,
            vms: Mutex::new(BTreeMap::new()),
            admitted_mib: Mutex::new(0),
            events,
            templates: Default::default(),
            metrics: Arc::new(crate::metrics::Registry::default()),
        });
        let records = store::load_all(&daemon.config.state_dir).map_err(|source| {
            DaemonError::ReadStateDir {
                path: vms_dir.clone(),
                source,
            }
        })?;
        for record in records {
            match record {
                Ok(vm) => daemon.adopt(vm),
                Err(e) => tracing::warn!(error = %chain(&e), "skipping an unreadable VM record"),
            }
        }
        daemon.load_templates();
        // Rules of VMs that ended while no huskd ran (a killed huskd, a killed `husk run`):
        // their taps are gone, so their chains go.
        if let Err(e) = daemon.host.collect_firewall_garbage() {
            tracing::warn!(error = %e, "cannot remove ended VMs' firewall rules");
        }
        Ok(daemon)
    }

    fn adopt(self: &Arc<Self>, vm: Vm) {
        let id = vm.id.clone();
        let dir = store::vms_dir(&self.config.state_dir).join(&id);
        let was = state_of(&vm);
        let was_live = matches!(
            was,
            VmState::Running | VmState::Paused | VmState::Stopping | VmState::Starting
        );
        let entry = Arc::new(VmEntry::new(id.clone(), dir.clone(), vm));
        lock(&self.vms).insert(id, entry.clone());
        if !was_live {
            return;
        }
        let live_pid = host::recorded_pid_alive(&dir);
        let exited = live_pid.and_then(|pid| self.host.watch(pid).ok().flatten());
        match exited {
            Some(exited) => {
                let pid = live_pid.unwrap_or(0);
                tracing::info!(vm_id = %entry.id, pid, "husk-vmm still runs: adopted");
                // A stop that was in progress when the previous huskd ended did not finish; a
                // start that was recorded before its pid counts as done.
                entry.update(|vm| {
                    if matches!(state_of(vm), VmState::Stopping | VmState::Starting) {
                        vm.state = VmState::Running as i32;
                    }
                });
                // A snapshot the previous huskd did not finish: its staging goes, and the
                // VMM's own word says whether the VM was left paused.
                crate::snapshot_files::remove_staging(&entry.dir);
                self.reinstall_firewall(&entry);
                self.watch_run(&entry, pid, exited, launch::ReadyWatch::Adopted);
                let daemon = self.clone();
                let entry = entry.clone();
                tokio::spawn(async move { daemon.sync_pause_state(&entry).await });
            }
            None => {
                // It ended while no huskd watched; a stop in progress counts as done. A VM
                // left STARTING may have a VMM whose pid was never recorded: its jail's cgroup
                // holds it, and record_end's cleanup kills it.
                let stopping = entry.state() == VmState::Stopping;
                self.record_end(&entry, None, stopping);
                if was == VmState::Starting {
                    entry.update(|vm| {
                        let status = VmEntry::status_mut(vm);
                        status.failure_reason = format!(
                            "huskd ended while starting the VM ({})",
                            status.failure_reason
                        );
                    });
                }
            }
        }
    }

    /// Records PAUSED or RUNNING as the VMM reports it (after an adoption).
    async fn sync_pause_state(&self, entry: &Arc<VmEntry>) {
        let request = VmmRequest {
            msg: Some(vmm_request::Msg::Describe(Default::default())),
        };
        let reply: Result<VmmResponse, _> =
            wire::request_reply(&entry.api_socket(), &request, Duration::from_secs(5)).await;
        let Ok(VmmResponse {
            msg: Some(vmm_response::Msg::Info(info)),
            ..
        }) = reply
        else {
            return;
        };
        let paused = info.state == husk_proto::vmm::info::State::Paused as i32;
        let _op = entry.op.lock().await;
        entry.update(|vm| match (state_of(vm), paused) {
            (VmState::Running, true) => vm.state = VmState::Paused as i32,
            (VmState::Paused, false) => vm.state = VmState::Running as i32,
            _ => {}
        });
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    fn emit(&self, entry: &VmEntry, kind: event::Kind, exit_code: Option<i32>, message: String) {
        let _ = self.events.send(Event {
            kind: kind as i32,
            vm_id: entry.id.clone(),
            vm_name: entry.name(),
            unix_ms: now_ms(),
            exit_code,
            message,
        });
    }

    /// Finds a VM by id or name.
    pub fn resolve(&self, vm: &str) -> Result<Arc<VmEntry>, Status> {
        if vm.is_empty() {
            return Err(Status::invalid_argument("vm: give a VM id or name"));
        }
        let vms = lock(&self.vms);
        if let Some(entry) = vms.get(vm) {
            return Ok(entry.clone());
        }
        vms.values()
            .find(|e| e.name() == vm)
            .cloned()
            .ok_or_else(|| Status::not_found(format!("no VM with id or name {vm:?}")))
    }

    pub fn list(&self, selector: &std::collections::HashMap<String, String>) -> Vec<Vm> {
        let entries: Vec<Arc<VmEntry>> = lock(&self.vms).values().cloned().collect();
        entries
            .iter()
            .map(|e| e.snapshot())
            .filter(|vm| {
                let labels = vm.spec.as_ref().map(|s| &s.labels);
                selector
                    .iter()
                    .all(|(k, v)| labels.and_then(|l| l.get(k)) == Some(v))
            })
            .collect()
    }

    pub fn get(&self, vm: &str) -> Result<Vm, Status> {
        Ok(self.resolve(vm)?.snapshot())
    }

    /// Records a new VM (CREATED).
    pub fn create(self: &Arc<Self>, spec: VmSpec) -> Result<Arc<VmEntry>, Status> {
        let defaults = Defaults {
            kernel: &self.config.default_kernel,
            initrd: &self.config.default_initrd,
        };
        let mut spec = validate::normalize(spec, &defaults, &self.config.policy)?;
        let mut vms = lock(&self.vms);
        if vms.len() >= self.config.max_vms {
            return Err(Status::resource_exhausted(format!(
                "huskd holds {} VMs, its limit (--max-vms); delete some first",
                vms.len()
            )));
        }
        let id = loop {
            let id = random_id();
            if !vms.contains_key(&id) {
                break id;
            }
        };
        if spec.name.is_empty() {
            spec.name = id.clone();
        }
        // Names and ids share one namespace, so that a name never shadows another VM's id.
        if vms.contains_key(&spec.name) || vms.values().any(|e| e.name() == spec.name) {
            return Err(Status::already_exists(format!(
                "name: a VM named {:?} exists already",
                spec.name
            )));
        }
        let statuses: Vec<VmStatus> = vms
            .values()
            .filter_map(|e| lock(&e.record).status.clone())
            .collect();
        let used_cids: Vec<u32> = statuses.iter().map(|s| s.vsock_cid).collect();
        let cid = (3u32..).find(|c| !used_cids.contains(c)).unwrap_or(3);
        let jail_uid = match self.config.jail {
            Some(_) => {
                let used: Vec<u32> = statuses.iter().map(|s| s.jail_uid).collect();
                allocate_uid(self.config.uid_range, &used).ok_or_else(|| {
                    Status::resource_exhausted(format!(
                        "every uid of huskd's --uid-range {}:{} belongs to a VM; delete some \
                         or widen the range",
                        self.config.uid_range.0, self.config.uid_range.1
                    ))
                })?
            }
            None => 0,
        };
        let dir = store::vms_dir(&self.config.state_dir).join(&id);
        store::open_vms_dir(&self.config.state_dir)
            .and_then(|vms_dir| vms_dir.create_subdir(&id, store::DIR_MODE, false))
            .map_err(|e| Status::internal(format!("cannot create {}: {e}", dir.display())))?;
        let vm = Vm {
            id: id.clone(),
            spec: Some(spec),
            state: VmState::Created as i32,
            status: Some(VmStatus {
                created_unix_ms: now_ms(),
                vsock_cid: cid,
                console_log: dir.join(store::CONSOLE_LOG).display().to_string(),
                jail_uid,
                ..Default::default()
            }),
        };
        store::save(&dir, &vm)
            .map_err(|e| Status::internal(format!("cannot save the VM record: {e}")))?;
        let entry = Arc::new(VmEntry::new(id.clone(), dir, vm));
        vms.insert(id, entry.clone());
        drop(vms);
        tracing::info!(vm_id = %entry.id, name = %entry.name(), "VM created");
        self.emit(&entry, event::Kind::Created, None, String::new());
        Ok(entry)
    }

    /// Stops a running or paused VM (see StopVm in husk.proto).
    pub async fn stop(
        &self,
        entry: &Arc<VmEntry>,
        timeout: Duration,
        force: bool,
    ) -> Result<Vm, Status> {
        let _op = entry.op.lock().await;
        self.stop_locked(entry, timeout, force).await
    }

    async fn stop_locked(
        &self,
        entry: &Arc<VmEntry>,
        timeout: Duration,
        force: bool,
    ) -> Result<Vm, Status> {
        let was = entry.state();
        let run = lock(&entry.run).clone();
        let Some(run) = run.filter(|_| matches!(was, VmState::Running | VmState::Paused)) else {
            return Err(entry.wrong_state("StopVm"));
        };
        run.stop_requested.store(true, Ordering::SeqCst);
        entry.update(|vm| vm.state = VmState::Stopping as i32);
        let api = entry.api_socket();
        let mut ended = run.ended.clone();
        let timeout = if timeout.is_zero() {
            DEFAULT_STOP_TIMEOUT
        } else {
            timeout
        };
        if !force {
            if was == VmState::Paused {
                // A paused guest cannot shut down: let it run again first.
                let _ = vmm_call(&api, vmm_request::Msg::Resume(Default::default())).await;
            }
            if self.request_guest_shutdown(entry).await {
                let _ = tokio::time::timeout(timeout, ended.wait_for(|e| *e)).await;
            }
        }
        if !*ended.borrow() {
            let _ = vmm_call(&api, vmm_request::Msg::Stop(Default::default())).await;
            let _ = tokio::time::timeout(Duration::from_secs(2), ended.wait_for(|e| *e)).await;
        }
        if !*ended.borrow() {
            tracing::warn!(vm_id = %entry.id, pid = run.pid, "husk-vmm did not stop: SIGKILL");
            self.host.kill(run.pid);
            let _ = tokio::time::timeout(Duration::from_secs(10), ended.wait_for(|e| *e)).await;
        }
        if !*ended.borrow() {
            return Err(Status::internal(format!(
                "husk-vmm pid {} did not end after SIGKILL",
                run.pid
            )));
        }
        Ok(entry.snapshot())
    }

    /// Pauses or resumes the vCPUs of a VM through its VMM.
    pub async fn set_paused(&self, entry: &Arc<VmEntry>, pause: bool) -> Result<Vm, Status> {
        let _op = entry.op.lock().await;
        let (need, call, msg, next, kind) = if pause {
            (
                VmState::Running,
                "PauseVm",
                vmm_request::Msg::Pause(Default::default()),
                VmState::Paused,
                event::Kind::Paused,
            )
        } else {
            (
                VmState::Paused,
                "ResumeVm",
                vmm_request::Msg::Resume(Default::default()),
                VmState::Running,
                event::Kind::Resumed,
            )
        };
        if entry.state() != need {
            return Err(entry.wrong_state(call));
        }
        vmm_call(&entry.api_socket(), msg)
            .await
            .map_err(|e| Status::internal(format!("{call}: husk-vmm: {e}")))?;
        let vm = entry.update(|vm| vm.state = next as i32);
        self.emit(entry, kind, None, String::new());
        Ok(vm)
    }

    /// Deletes a VM that is not running (or, with force, stops it first).
    pub async fn delete(&self, entry: &Arc<VmEntry>, force: bool) -> Result<(), Status> {
        let _op = entry.op.lock().await;
        match entry.state() {
            VmState::Running | VmState::Paused | VmState::Stopping if !force => {
                return Err(entry.wrong_state("DeleteVm (stop it first, or force)"));
            }
            VmState::Running | VmState::Paused => {
                self.stop_locked(entry, Duration::ZERO, true).await?;
            }
            _ => {}
        }
        lock(&self.vms).remove(&entry.id);
        // Never through a link, and never deeper than a VMM's directory can honestly be.
        let removed =
            store::open_vms_dir(&self.config.state_dir).and_then(|vms| vms.remove_tree(&entry.id));
        if let Err(e) = removed {
            tracing::warn!(vm_id = %entry.id, error = %e, "cannot remove the VM's directory");
        }
        tracing::info!(vm_id = %entry.id, "VM deleted");
        self.emit(entry, event::Kind::Deleted, None, String::new());
        // The last clone of a template build takes the build's files with it.
        if entry
            .snapshot()
            .status
            .is_some_and(|s| !s.template.is_empty())
        {
            self.sweep_templates();
        }
        Ok(())
    }

    /// The vsock socket of a RUNNING VM, for `call` (Exec, AddContainer...); waits for the
    /// agent up to `limit`.
    pub async fn agent_socket(
        &self,
        entry: &Arc<VmEntry>,
        call: &str,
        limit: Duration,
    ) -> Result<VmSocket, Status> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let vm = entry.snapshot();
            if state_of(&vm) != VmState::Running {
                return Err(entry.wrong_state(call));
            }
            if vm.status.as_ref().is_some_and(|s| s.agent_ready) {
                return Ok(entry.vsock_socket());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(Status::unavailable(format!(
                    "{call}: the guest agent of VM {} did not answer within {} s",
                    entry.name(),
                    limit.as_secs()
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Whether the VM's current run is still live (for console following).
    pub fn is_live(&self, entry: &VmEntry) -> bool {
        lock(&entry.run).is_some()
    }
}

/// The gRPC status for a path the policy refused: PERMISSION_DENIED for a path outside the
/// allowed roots or through a link out of them, INVALID_ARGUMENT for a relative path or a file
/// of the wrong kind, `missing` for a file that is not there.
fn policy_status(e: PolicyError, missing: fn(String) -> Status) -> Status {
    if e.is_denied() {
        Status::permission_denied(e.to_string())
    } else if e.is_not_found() {
        missing(e.to_string())
    } else {
        Status::invalid_argument(e.to_string())
    }
}

/// An error with its sources, for a log line: "what failed: why: why".
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(&format!(": {s}"));
        source = s.source();
    }
    text
}

/// Why the daemon could not open its state.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("cannot create {}", path.display())]
    CreateStateDir { path: PathBuf, source: io::Error },
    #[error("cannot read {}", path.display())]
    ReadStateDir { path: PathBuf, source: io::Error },
}

/// Why a request to a VMM's control socket failed.
#[derive(Debug, thiserror::Error)]
enum VmmCallError {
    /// The socket could not be reached or the exchange broke.
    #[error(transparent)]
    Io(#[from] io::Error),
    /// The VMM answered with an error; `kind` says which, where a caller acts on it.
    #[error("{message}")]
    Refused { message: String, kind: ErrorKind },
    #[error("empty reply")]
    Empty,
    #[error("unexpected reply")]
    Unexpected,
}

/// One request to a VMM's control socket; an `error` reply becomes [`VmmCallError::Refused`].
/// The VMM's description of the VM comes back when the reply carries one.
async fn vmm_call(
    api: &VmSocket,
    msg: vmm_request::Msg,
) -> Result<Option<husk_proto::vmm::Info>, VmmCallError> {
    let reply: VmmResponse =
        wire::request_reply(api, &VmmRequest { msg: Some(msg) }, Duration::from_secs(5)).await?;
    let kind = reply.error_kind();
    match reply.msg {
        Some(vmm_response::Msg::Error(message)) => Err(VmmCallError::Refused { message, kind }),
        Some(vmm_response::Msg::Info(info)) => Ok(Some(info)),
        Some(vmm_response::Msg::Snapshot(_)) => Ok(None),
        None => Err(VmmCallError::Empty),
    }
}
