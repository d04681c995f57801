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

use husk_host::net::VmLink;
use husk_proto::agent::{self, host_message, HostMessage};
use husk_proto::v1::{event, network, Event, Vm, VmSpec, VmState, VmStatus};
use husk_proto::vmm::{vmm_request, vmm_response, ExitReport, VmmRequest, VmmResponse};
use prost::Message;
use tokio::sync::{broadcast, watch};
use tonic::Status;

use crate::agent_client;
use crate::store;
use crate::validate::{self, Defaults};
use crate::vmm_process::{self, Launch, ProcessHandle};
use crate::wire;

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
        std::fs::create_dir_all(&vms_dir)
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
        let was_live = matches!(
            state_of(&vm),
            VmState::Running | VmState::Paused | VmState::Stopping
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
                // A stop that was in progress when the previous huskd ended did not finish.
                entry.update(|vm| {
                    if state_of(vm) == VmState::Stopping {
                        vm.state = VmState::Running as i32;
                    }
                });
                self.watch_run(&entry, live_pid.map_or(0, |p| p.0), handle);
            }
            None => {
                // It ended while no huskd watched; a stop in progress counts as done.
                let stopping = entry.state() == VmState::Stopping;
                self.record_end(&entry, None, stopping);
            }
        }
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
        let mut spec = validate::normalize(spec, &defaults)?;
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
        let used: Vec<u32> = vms
            .values()
            .filter_map(|e| lock(&e.record).status.as_ref().map(|s| s.vsock_cid))
            .collect();
        let cid = (3u32..).find(|c| !used.contains(c)).unwrap_or(3);
        let dir = store::vms_dir(&self.config.state_dir).join(&id);
        std::fs::create_dir_all(&dir)
            .map_err(|e| Status::internal(format!("cannot create {}: {e}", dir.display())))?;
        let vm = Vm {
            id: id.clone(),
            spec: Some(spec),
            state: VmState::Created as i32,
            status: Some(VmStatus {
                created_unix_ms: now_ms(),
                vsock_cid: cid,
                console_log: dir.join(store::CONSOLE_LOG).display().to_string(),
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

    /// Starts the VM's VMM: CREATED, STOPPED or FAILED -> RUNNING.
    pub async fn start(self: &Arc<Self>, entry: &Arc<VmEntry>) -> Result<Vm, Status> {
        let _op = entry.op.lock().await;
        if !matches!(
            entry.state(),
            VmState::Created | VmState::Stopped | VmState::Failed
        ) {
            return Err(entry.wrong_state("StartVm"));
        }
        let record = entry.snapshot();
        let spec = record.spec.clone().unwrap_or_default();
        for (what, path) in [("kernel", &spec.kernel), ("initrd", &spec.initrd)] {
            husk_host::paths::require_file(Path::new(path), what, "")
                .map_err(Status::failed_precondition)?;
        }
        let net_mode = spec
            .network
            .as_ref()
            .and_then(|n| network::Mode::try_from(n.mode).ok())
            .unwrap_or(network::Mode::None);
        let link = match net_mode {
            network::Mode::Tap => Some(VmLink::create().map_err(Status::unavailable)?),
            network::Mode::None => None,
        };
        let link = match (link, spec.network.as_ref().map(|n| n.mac.as_str())) {
            (Some(mut link), Some(mac)) if !mac.is_empty() => {
                if let Some(mac) = validate::parse_mac(mac) {
                    link.mac = mac;
                }
                Some(link)
            }
            (link, _) => link,
        };
        let cid = record.status.as_ref().map_or(3, |s| s.vsock_cid);
        store::remove_run_files(&entry.dir);
        let _ = std::fs::remove_file(entry.dir.join(store::EXIT_REPORT));
        let owner = self.config.jail.as_ref().map(|j| (j.uid, j.gid));
        vmm_process::reset_console_log(&entry.dir, owner)
            .map_err(|e| Status::internal(format!("cannot create the console log: {e}")))?;
        let launch = Launch {
            jail: self.config.jail.as_ref(),
            id: &entry.id,
            vmm: &self.config.vmm,
            dir: &entry.dir,
            spec: &spec,
            vsock_cid: cid,
            link: link.as_ref(),
            restore: None,
        };
        let pid = self.spawn_vmm(entry, &launch).map_err(Status::internal)?;
        let (tap, host_ip, guest_ip) = link_addresses(link.as_ref());
        // husk-vmm holds the tap now: with huskd's copy closed, the tap lives as long as the VMM.
        drop(link);
        let vm = entry.update(|vm| {
            vm.state = VmState::Running as i32;
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
            Ok(Some(handle)) => self.watch_run(entry, pid, handle),
            _ => {
                // Gone already (it could not start): record how it ended.
                self.record_end(entry, None, false);
            }
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
        let socket = entry.dir.join(store::VSOCK_SOCK);
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
        let report = std::fs::read(entry.dir.join(store::EXIT_REPORT))
            .ok()
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
        let api = entry.dir.join(store::API_SOCK);
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
            let socket = entry.dir.join(store::VSOCK_SOCK);
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
        vmm_call(&entry.dir.join(store::API_SOCK), msg)
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
        if let Err(e) = std::fs::remove_dir_all(&entry.dir) {
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
    ) -> Result<PathBuf, Status> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let vm = entry.snapshot();
            if state_of(&vm) != VmState::Running {
                return Err(entry.wrong_state("Exec"));
            }
            if vm.status.as_ref().is_some_and(|s| s.agent_ready) {
                return Ok(entry.dir.join(store::VSOCK_SOCK));
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
    let text = std::fs::read(dir.join(store::VMM_LOG)).unwrap_or_default();
    let tail = &text[text.len().saturating_sub(4096)..];
    String::from_utf8_lossy(tail)
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .map(|l| format!(": {}", l.trim()))
        .unwrap_or_default()
}

/// One request to a VMM's control socket; an `error` reply becomes Err.
async fn vmm_call(api: &Path, msg: vmm_request::Msg) -> Result<(), String> {
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
