//! The daemon's state: every VM, its lifecycle operations and its events.
//!
//! Concurrency: each VM has an operation lock (a tokio mutex) that serializes its lifecycle
//! calls, so two StartVm on one VM run one after the other and the second finds the VM RUNNING
//! (FAILED_PRECONDITION). The record itself sits behind a short std mutex that is never held
//! across an await. A monitor task per running VMM turns its exit into STOPPED or FAILED.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use husk_host::confined::Dir;
use husk_host::net::VmLink;
use husk_host::policy::{PathPolicy, PolicyError};
use husk_proto::agent::{self, host_message, HostMessage};
use husk_proto::v1::{event, network, Event, Vm, VmSpec, VmState, VmStatus};
use husk_proto::vmm::{vmm_request, vmm_response, ExitReport, VmmRequest, VmmResponse};
use prost::Message;
use tokio::sync::{broadcast, watch};
use tonic::Status;

use crate::agent_client;
use crate::store;
use crate::validate::{self, Defaults};
pub use crate::vmm_process::LIMIT_CONTROLLERS;
use crate::vmm_process::{self, Launch, ProcessHandle, RunFiles};
use crate::wire::{self, VmSocket};

#[path = "snapshots.rs"]
pub mod snapshots;

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
}

/// How long a graceful stop waits when the request gives no timeout.
const DEFAULT_STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long huskd keeps trying to reach the guest agent after a start.
const AGENT_WAIT: Duration = Duration::from_secs(120);

pub struct Daemon {
    config: DaemonConfig,
    vms: Mutex<BTreeMap<String, Arc<VmEntry>>>,
    events: broadcast::Sender<Event>,
}

/// One VM.
pub struct VmEntry {
    pub id: String,
    pub dir: PathBuf,
    op: tokio::sync::Mutex<()>,
    record: Mutex<Vm>,
    run: Mutex<Option<RunHandle>>,
}

/// The VMM process of a running VM.
#[derive(Clone)]
struct RunHandle {
    pid: u32,
    /// Becomes true once the monitor has recorded the VMM's end.
    ended: watch::Receiver<bool>,
    /// Set by StopVm: the end that follows is a stop, not a failure.
    stop_requested: Arc<AtomicBool>,
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn state_of(vm: &Vm) -> VmState {
    VmState::try_from(vm.state).unwrap_or(VmState::Unspecified)
}

fn state_name(state: VmState) -> &'static str {
    match state {
        VmState::Unspecified => "UNSPECIFIED",
        VmState::Created => "CREATED",
        VmState::Running => "RUNNING",
        VmState::Paused => "PAUSED",
        VmState::Stopping => "STOPPING",
        VmState::Stopped => "STOPPED",
        VmState::Failed => "FAILED",
        VmState::Starting => "STARTING",
    }
}

fn random_id() -> String {
    let mut bytes = [0u8; 8];
    if std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes))
        .is_err()
    {
        // Not secret, only unique: fall back to time and pid.
        let t = now_ms() as u64 ^ (u64::from(std::process::id()) << 40);
        bytes = t.to_be_bytes();
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl VmEntry {
    fn snapshot(&self) -> Vm {
        lock(&self.record).clone()
    }

    fn state(&self) -> VmState {
        state_of(&lock(&self.record))
    }

    fn name(&self) -> String {
        lock(&self.record)
            .spec
            .as_ref()
            .map(|s| s.name.clone())
            .unwrap_or_default()
    }

    /// Changes the record and persists it.
    fn update(&self, change: impl FnOnce(&mut Vm)) -> Vm {
        let mut record = lock(&self.record);
        change(&mut record);
        if let Err(e) = store::save(&self.dir, &record) {
            eprintln!("huskd: warning: cannot save VM {}: {e}", self.id);
        }
        record.clone()
    }

    /// The uid the VM's VMM runs as (huskd's own when VMMs are not jailed).
    fn vmm_uid(&self) -> u32 {
        match lock(&self.record).status.as_ref().map(|s| s.jail_uid) {
            Some(uid) if uid != 0 => uid,
            _ => rustix::process::geteuid().as_raw(),
        }
    }

    /// The VMM's control socket.
    fn api_socket(&self) -> VmSocket {
        VmSocket {
            path: self.dir.join(store::API_SOCK),
            peer_uid: self.vmm_uid(),
        }
    }

    /// The VMM's vsock socket (the guest agent's way in).
    pub fn vsock_socket(&self) -> VmSocket {
        VmSocket {
            path: self.dir.join(store::VSOCK_SOCK),
            peer_uid: self.vmm_uid(),
        }
    }

    fn status_mut(vm: &mut Vm) -> &mut VmStatus {
        vm.status.get_or_insert_with(Default::default)
    }

    fn wrong_state(&self, call: &str) -> Status {
        Status::failed_precondition(format!(
            "{call}: VM {} is {}",
            self.name(),
            state_name(self.state())
        ))
    }
}

impl Daemon {
    /// Creates the daemon over `config.state_dir`, finding the VMs a previous huskd left: a VMM
    /// that still runs is adopted, one that ended meanwhile is recorded as such.
    pub fn open(config: DaemonConfig) -> Result<Arc<Self>, String> {
        let vms_dir = store::vms_dir(&config.state_dir);
        store::open_vms_dir(&config.state_dir)
            .map_err(|e| format!("cannot create {}: {e}", vms_dir.display()))?;
        let (events, _) = broadcast::channel(1024);
        let daemon = Arc::new(Self {
            config,
            vms: Mutex::new(BTreeMap::new()),
            events,
        });
        let records = store::load_all(&daemon.config.state_dir)
            .map_err(|e| format!("cannot read {}: {e}", vms_dir.display()))?;
        for record in records {
            match record {
                Ok(vm) => daemon.adopt(vm),
                Err(e) => eprintln!("huskd: warning: skipping unreadable VM record {e}"),
            }
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
        let entry = Arc::new(VmEntry {
            id: id.clone(),
            dir: dir.clone(),
            op: tokio::sync::Mutex::new(()),
            record: Mutex::new(vm),
            run: Mutex::new(None),
        });
        lock(&self.vms).insert(id, entry.clone());
        if !was_live {
            return;
        }
        let live_pid = store::load_pid(&dir)
            .filter(|&(pid, ticks)| store::process_start_ticks(pid) == Some(ticks));
        let handle = live_pid.and_then(|(pid, _)| ProcessHandle::open(pid).ok().flatten());
        match handle {
            Some(handle) => {
                eprintln!(
                    "huskd: VM {} (husk-vmm pid {}) still runs: adopted",
                    entry.id,
                    live_pid.map_or(0, |p| p.0)
                );
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
                self.watch_run(&entry, live_pid.map_or(0, |p| p.0), handle);
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
        let entry = Arc::new(VmEntry {
            id: id.clone(),
            dir,
            op: tokio::sync::Mutex::new(()),
            record: Mutex::new(vm),
            run: Mutex::new(None),
        });
        vms.insert(id, entry.clone());
        drop(vms);
        self.emit(&entry, event::Kind::Created, None, String::new());
        Ok(entry)
    }

    /// Opens what one run of the VM's VMM needs, all by fd: kernel and initrd (for a boot),
    /// disks under the path policy, and the console, exit report and log in huskd's own VM
    /// directory. The `vmm/` directory is made anew, empty and owned by the VM's uid.
    fn open_run_files(
        &self,
        entry: &VmEntry,
        spec: &VmSpec,
        boot: bool,
    ) -> Result<RunFiles, Status> {
        let policy = &self.config.policy;
        let open = |what: &str, path: &str, write: bool| {
            policy
                .open_file(what, Path::new(path), write)
                .map(|o| o.file)
                .map_err(|e| policy_status(e, |m: String| Status::failed_precondition(m)))
        };
        let (kernel, initrd) = if boot {
            (
                Some(open("kernel", &spec.kernel, false)?),
                Some(open("initrd", &spec.initrd, false)?),
            )
        } else {
            (None, None)
        };
        let mut disks = Vec::new();
        if !spec.rootfs.is_empty() {
            disks.push((open("rootfs", &spec.rootfs, true)?, false));
        }
        for (i, disk) in spec.disks.iter().enumerate() {
            let file = open(&format!("disks[{i}]"), &disk.path, !disk.read_only)?;
            disks.push((file, disk.read_only));
        }
        let internal = |what: &str| {
            let what = what.to_string();
            move |e: std::io::Error| Status::internal(format!("{what}: {e}"))
        };
        let dir = Dir::open(&entry.dir).map_err(internal("the VM's directory"))?;
        let vmm_dir = dir
            .create_subdir(store::VMM_DIR, store::DIR_MODE, true)
            .map_err(internal("the VMM's directory"))?;
        let uid = entry.vmm_uid();
        husk_host::confined::chown_fd(vmm_dir.fd(), uid, uid)
            .map_err(internal("the VMM's directory"))?;
        let console = dir
            .create_file(store::CONSOLE_LOG, store::FILE_MODE, true, None)
            .map_err(internal("the console log"))?;
        let exit_report = dir
            .create_file(store::EXIT_REPORT, store::FILE_MODE, false, None)
            .map_err(internal("the exit report"))?;
        let log = open_vmm_log(&dir).map_err(internal("vmm.log"))?;
        Ok(RunFiles {
            kernel,
            initrd,
            disks,
            console,
            exit_report,
            log,
        })
    }

    /// Starts the VM's husk-vmm and records its pid (with its start time, against pid reuse).
    fn spawn_vmm(&self, entry: &VmEntry, launch: &Launch<'_>) -> Result<u32, String> {
        let pid = launch.spawn()?;
        let ticks = store::process_start_ticks(pid).unwrap_or(0);
        if let Err(e) = store::save_pid(&entry.dir, pid, ticks) {
            eprintln!(
                "huskd: warning: cannot save the pid of VM {}: {e}",
                entry.id
            );
        }
        Ok(pid)
    }

    /// Starts the VM's VMM: CREATED, STOPPED or FAILED -> STARTING -> RUNNING.
    pub async fn start(self: &Arc<Self>, entry: &Arc<VmEntry>) -> Result<Vm, Status> {
        let _op = entry.op.lock().await;
        if !matches!(
            entry.state(),
            VmState::Created | VmState::Stopped | VmState::Failed
        ) {
            return Err(entry.wrong_state("StartVm"));
        }
        let spec = entry.snapshot().spec.unwrap_or_default();
        self.launch(entry, &spec, None).await
    }

    /// The one launch sequence of a boot (StartVm) and a restore (RestoreVm): files opened by
    /// fd, the tap, STARTING recorded before the VMM exists (so that a huskd that dies in
    /// between finds and cleans what it left), the spawn, then RUNNING (or PAUSED).
    pub(crate) async fn launch(
        self: &Arc<Self>,
        entry: &Arc<VmEntry>,
        spec: &VmSpec,
        restore: Option<vmm_process::Restore>,
    ) -> Result<Vm, Status> {
        let start_paused = restore.as_ref().is_some_and(|r| r.start_paused);
        let is_restore = restore.is_some();
        let files = self.open_run_files(entry, spec, restore.is_none())?;
        let net_mode = spec
            .network
            .as_ref()
            .and_then(|n| network::Mode::try_from(n.mode).ok())
            .unwrap_or(network::Mode::None);
        let mut link = match net_mode {
            network::Mode::Tap => Some(VmLink::create().map_err(Status::unavailable)?),
            network::Mode::None => None,
        };
        if let (Some(link), Some(mac)) = (
            link.as_mut(),
            spec.network
                .as_ref()
                .and_then(|n| validate::parse_mac(&n.mac)),
        ) {
            link.mac = mac;
        }
        let cid = entry.snapshot().status.as_ref().map_or(3, |s| s.vsock_cid);
        entry.update(|vm| {
            vm.state = VmState::Starting as i32;
            VmEntry::status_mut(vm).failure_reason.clear();
        });
        let launch = Launch {
            jail: self.config.jail.as_ref(),
            controllers: &self.config.controllers,
            uid: entry.vmm_uid(),
            id: &entry.id,
            vmm: &self.config.vmm,
            dir: &entry.dir,
            spec,
            limits: vmm_process::effective_limits(spec),
            vsock_cid: cid,
            link: link.as_ref(),
            restore,
            files,
        };
        let pid = match self.spawn_vmm(entry, &launch) {
            Ok(pid) => pid,
            Err(e) => {
                entry.update(|vm| {
                    vm.state = VmState::Failed as i32;
                    VmEntry::status_mut(vm).failure_reason = e.clone();
                });
                return Err(Status::internal(e));
            }
        };
        let (tap, host_ip, guest_ip) = link_addresses(link.as_ref());
        // A restored guest kept the snapshot's MAC and addresses: it gets the new link's.
        let net_script = link
            .as_ref()
            .filter(|_| is_restore)
            .map(snapshots::net_script);
        // husk-vmm holds the tap and files now: with huskd's copies closed, they live as long
        // as the VMM.
        drop(launch);
        drop(link);
        let state = if start_paused {
            VmState::Paused
        } else {
            VmState::Running
        };
        let vm = entry.update(|vm| {
            vm.state = state as i32;
            let status = VmEntry::status_mut(vm);
            status.vmm_pid = pid;
            status.exit_code = None;
            status.failure_reason.clear();
            status.started_unix_ms = now_ms();
            status.stopped_unix_ms = 0;
            status.tap = tap;
            status.host_ip = host_ip;
            status.guest_ip = guest_ip;
            status.agent_ready = false;
        });
        self.emit(entry, event::Kind::Started, None, String::new());
        match ProcessHandle::open(pid) {
            Ok(Some(handle)) => {
                self.watch_run(entry, pid, handle);
                if is_restore {
                    let ended = lock(&entry.run).as_ref().map(|r| r.ended.clone());
                    if let Some(ended) = ended {
                        let daemon = self.clone();
                        let entry = entry.clone();
                        tokio::spawn(async move {
                            daemon.after_restore(&entry, ended, net_script).await
                        });
                    }
                }
            }
            // Gone already (it could not start): record how it ended.
            _ => self.record_end(entry, None, false),
        }
        Ok(vm)
    }

    /// Starts the monitor and agent-readiness tasks of a running VMM.
    fn watch_run(self: &Arc<Self>, entry: &Arc<VmEntry>, pid: u32, handle: ProcessHandle) {
        let (ended_tx, ended_rx) = watch::channel(false);
        let stop_requested = Arc::new(AtomicBool::new(false));
        *lock(&entry.run) = Some(RunHandle {
            pid,
            ended: ended_rx.clone(),
            stop_requested: stop_requested.clone(),
        });
        let daemon = self.clone();
        let monitored = entry.clone();
        tokio::spawn(async move {
            let status = handle.exited().await;
            let stopped = stop_requested.load(Ordering::SeqCst);
            daemon.record_end(&monitored, status, stopped);
            let _ = ended_tx.send(true);
        });
        let daemon = self.clone();
        let entry = entry.clone();
        tokio::spawn(async move { daemon.await_agent(&entry, ended_rx).await });
    }

    /// Tries the guest agent until it answers (AGENT_READY) or the VM ends.
    async fn await_agent(&self, entry: &Arc<VmEntry>, ended: watch::Receiver<bool>) {
        let socket = entry.vsock_socket();
        let deadline = tokio::time::Instant::now() + AGENT_WAIT;
        while tokio::time::Instant::now() < deadline && !*ended.borrow() {
            if agent_client::hello(&socket, Duration::from_secs(2))
                .await
                .is_ok()
            {
                entry.update(|vm| VmEntry::status_mut(vm).agent_ready = true);
                self.emit(entry, event::Kind::AgentReady, None, String::new());
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Records how a VMM ended, from its exit report and wait status, and cleans its run files.
    fn record_end(&self, entry: &Arc<VmEntry>, wait_status: Option<i32>, stop_requested: bool) {
        // Written by the VMM into the file huskd gave it; empty when the VMM was killed first.
        // Bounded and never through a link, like everything huskd reads of a VMM's.
        let report = Dir::open(&entry.dir)
            .and_then(|dir| dir.read_bounded(store::EXIT_REPORT, store::MAX_EXIT_REPORT))
            .ok()
            .flatten()
            .filter(|bytes| !bytes.is_empty())
            .and_then(|bytes| ExitReport::decode(&bytes[..]).ok());
        store::remove_run_files(&entry.dir);
        // The jail's cgroup (and anything left in it) and directory, also after a kill -9 or
        // when the VMM ended while no huskd watched.
        if let Some(jail) = &self.config.jail {
            if let Err(e) = husk_host::jail::cleanup(&jail.jailer, &entry.id) {
                eprintln!(
                    "huskd: warning: cleaning up the jail of VM {}: {e}",
                    entry.id
                );
            }
        }
        *lock(&entry.run) = None;
        let has_app = lock(&entry.record)
            .spec
            .as_ref()
            .is_some_and(|s| !s.command.is_empty());
        let guest_code = report.as_ref().and_then(|r| r.guest_exit_code);
        let failure = match (&report, wait_status) {
            _ if stop_requested => None,
            (Some(r), _) if guest_code.is_some() || r.exit_status == 0 => None,
            (Some(r), _) => Some(format!(
                "husk-vmm ended: {} (status {})",
                r.reason, r.exit_status
            )),
            (None, Some(status)) => Some(format!(
                "husk-vmm {} without an exit report{}",
                vmm_process::describe_wait_status(status),
                last_log_line(&entry.dir)
            )),
            (None, None) => Some(format!(
                "husk-vmm ended without an exit report (killed?){}",
                last_log_line(&entry.dir)
            )),
        };
        entry.update(|vm| {
            vm.state = if failure.is_some() {
                VmState::Failed as i32
            } else {
                VmState::Stopped as i32
            };
            let status = VmEntry::status_mut(vm);
            status.vmm_pid = 0;
            status.exit_code = guest_code;
            status.stopped_unix_ms = now_ms();
            status.agent_ready = false;
            status.failure_reason = failure.clone().unwrap_or_else(|| {
                report
                    .as_ref()
                    .map(|r| r.reason.clone())
                    .unwrap_or_default()
            });
        });
        if has_app && guest_code.is_some() {
            self.emit(entry, event::Kind::AppExited, guest_code, String::new());
        }
        match failure {
            Some(reason) => self.emit(entry, event::Kind::Failed, None, reason),
            None => self.emit(entry, event::Kind::Stopped, guest_code, String::new()),
        }
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
            let shutdown = HostMessage {
                msg: Some(host_message::Msg::Shutdown(agent::Shutdown { signal: 0 })),
            };
            let socket = entry.vsock_socket();
            if agent_client::request(&socket, &shutdown, Duration::from_secs(2))
                .await
                .is_ok()
            {
                let _ = tokio::time::timeout(timeout, ended.wait_for(|e| *e)).await;
            }
        }
        if !*ended.borrow() {
            let _ = vmm_call(&api, vmm_request::Msg::Stop(Default::default())).await;
            let _ = tokio::time::timeout(Duration::from_secs(2), ended.wait_for(|e| *e)).await;
        }
        if !*ended.borrow() {
            vmm_process::signal(run.pid, libc::SIGKILL);
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
            eprintln!("huskd: warning: cannot remove {}: {e}", entry.dir.display());
        }
        self.emit(entry, event::Kind::Deleted, None, String::new());
        Ok(())
    }

    /// The vsock socket of a RUNNING VM, for Exec; waits for the agent up to `limit`.
    pub async fn agent_socket(
        &self,
        entry: &Arc<VmEntry>,
        limit: Duration,
    ) -> Result<VmSocket, Status> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let vm = entry.snapshot();
            if state_of(&vm) != VmState::Running {
                return Err(entry.wrong_state("Exec"));
            }
            if vm.status.as_ref().is_some_and(|s| s.agent_ready) {
                return Ok(entry.vsock_socket());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(Status::unavailable(format!(
                    "Exec: the guest agent of VM {} did not answer within {} s",
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

/// ": <last line of vmm.log>", or nothing: the VMM's own words on why it ended.
/// The tap's name and the link's host and guest addresses, for a VM's status (empty without).
fn link_addresses(link: Option<&VmLink>) -> (String, String, String) {
    link.map(|l| {
        (
            l.tap_name.clone(),
            l.host_ip.to_string(),
            l.guest_ip.to_string(),
        )
    })
    .unwrap_or_default()
}

fn last_log_line(dir: &Path) -> String {
    let tail = Dir::open(dir)
        .and_then(|d| d.read_tail(store::VMM_LOG, 4096))
        .unwrap_or_default();
    String::from_utf8_lossy(&tail)
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .map(|l| format!(": {}", l.trim()))
        .unwrap_or_default()
}

/// The most `vmm.log` keeps across runs: past it, the log starts over at the next start (the
/// VMM caps what it writes in one run itself).
const VMM_LOG_KEEP: u64 = 1 << 20;

/// Opens `vmm.log` for a new run (0600, appending; emptied first when it grew past
/// [`VMM_LOG_KEEP`]).
fn open_vmm_log(dir: &Dir) -> std::io::Result<std::fs::File> {
    use rustix::fs::OFlags;
    let log = dir.open_file(
        store::VMM_LOG,
        OFlags::WRONLY | OFlags::CREATE | OFlags::APPEND,
        store::FILE_MODE,
    )?;
    if log.metadata()?.len() > VMM_LOG_KEEP {
        log.set_len(0)?;
    }
    Ok(log)
}

/// The lowest uid of `range` (first, count) that no VM uses.
pub fn allocate_uid(range: (u32, u32), used: &[u32]) -> Option<u32> {
    let (first, count) = range;
    (0..count)
        .filter_map(|i| first.checked_add(i))
        .find(|uid| !used.contains(uid))
}

/// The gRPC status for a path the policy refused: PERMISSION_DENIED for a path outside the
/// allowed roots or through a link out of them, INVALID_ARGUMENT for a relative path or a file
/// of the wrong kind, `missing` for a file that is not there.
pub fn policy_status(e: PolicyError, missing: fn(String) -> Status) -> Status {
    if e.is_denied() {
        Status::permission_denied(e.to_string())
    } else if e.is_not_found() {
        missing(e.to_string())
    } else {
        Status::invalid_argument(e.to_string())
    }
}

/// One request to a VMM's control socket; an `error` reply becomes Err.
async fn vmm_call(api: &VmSocket, msg: vmm_request::Msg) -> Result<(), String> {
    let reply: VmmResponse =
        wire::request_reply(api, &VmmRequest { msg: Some(msg) }, Duration::from_secs(5))
            .await
            .map_err(|e| e.to_string())?;
    match reply.msg {
        Some(vmm_response::Msg::Error(e)) => Err(e),
        Some(vmm_response::Msg::Info(_) | vmm_response::Msg::Snapshot(_)) => Ok(()),
        None => Err("empty reply".into()),
    }
}
