//! The ttrpc task service (`containerd.task.v2.Task`): one container in one husk VM, or the
//! containers of one Kubernetes pod in the pod's VM.
//!
//! Create builds the rootfs image and boots the VM (a huskd sandbox: no boot command); Start
//! runs the OCI process through the guest agent (huskd Exec); execs are further Exec streams.
//! In a pod (CRI annotations, see [`oci::PodRole`]) the sandbox container creates the VM and
//! containerd sends every later container of the pod to this same shim (see
//! `lifecycle::socket_path`): each gets its root as a disk added to the running VM (huskd
//! AddContainer) and its processes run chrooted into it.
//! A container's init process is reported with the VMM's host PID (what `ctr task ls` and
//! host tools can look at); exec'd processes with their guest PIDs.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use containerd_shim_protos::api::{
    CloseIORequest, ConnectRequest, ConnectResponse, CreateTaskRequest, CreateTaskResponse,
    DeleteRequest, DeleteResponse, Empty, ExecProcessRequest, KillRequest, PauseRequest,
    PidsRequest, PidsResponse, ResizePtyRequest, ResumeRequest, ShutdownRequest, StartRequest,
    StartResponse, StateRequest, StateResponse, StatsRequest, StatsResponse, UpdateTaskRequest,
    WaitRequest, WaitResponse,
};
use containerd_shim_protos::events::task::{
    TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskIO, TaskPaused,
    TaskResumed, TaskStart,
};
use containerd_shim_protos::protobuf::{EnumOrUnknown, MessageField};
use containerd_shim_protos::shim_async::Task;
use containerd_shim_protos::ttrpc::{self, r#async::TtrpcContext, Code};
use containerd_shim_protos::types::task::{ProcessInfo, Status as TaskStatus};
use husk_proto::v1::{
    AddContainerRequest, GetContainerStatsRequest, PauseVmRequest, RemoveContainerRequest,
    ResumeVmRequest,
};
use tokio::sync::{Mutex, Notify};

use crate::args::ShimArgs;
use crate::base;
use crate::events::{timestamp, Publisher};
use crate::huskd::{self, HuskdError, VmPlan};
use crate::oci;
use crate::process::{Ended, Process, ProcessError, Status, Stdio};
use crate::rootfs;
use crate::stats;

/// The file in the bundle that tells `delete` (run after a shim died) what to clean up:
/// line 1 the VM name, line 2 the container's own rootfs image (empty when its VM uses a
/// shared base), line 3 the shared base (for people; never removed by `delete`), line 4 the
/// container's id when it lives in its pod's VM (then only the container leaves the VM).
pub const RECORD_FILE: &str = "husk-vm";

fn err(code: Code, msg: impl Into<String>) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, msg.into()))
}

fn huskd_err(e: HuskdError) -> ttrpc::Error {
    let code = match &e {
        HuskdError::Unreachable { .. } => Code::UNAVAILABLE,
        HuskdError::BadAddress(_) => Code::INVALID_ARGUMENT,
        HuskdError::NoCopyOnWrite => Code::FAILED_PRECONDITION,
        HuskdError::Call(s) => match s.code() {
            tonic::Code::NotFound => Code::NOT_FOUND,
            tonic::Code::InvalidArgument => Code::INVALID_ARGUMENT,
            tonic::Code::FailedPrecondition => Code::FAILED_PRECONDITION,
            tonic::Code::AlreadyExists => Code::ALREADY_EXISTS,
            tonic::Code::ResourceExhausted => Code::RESOURCE_EXHAUSTED,
            tonic::Code::Unavailable => Code::UNAVAILABLE,
            _ => Code::INTERNAL,
        },
    };
    err(code, e.to_string())
}

fn process_err(e: ProcessError) -> ttrpc::Error {
    let code = match &e {
        ProcessError::Finished => Code::NOT_FOUND,
        ProcessError::AlreadyStarted | ProcessError::NotStarted => Code::FAILED_PRECONDITION,
        ProcessError::Exec(s) if s.code() == tonic::Code::InvalidArgument => Code::INVALID_ARGUMENT,
        ProcessError::Exec(_) | ProcessError::NoStart => Code::UNAVAILABLE,
    };
    err(code, e.to_string())
}

/// Where a container runs.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Place {
    /// In a VM of its own (a plain container, or a pod's sandbox with room for the pod's
    /// containers); its init's end stops the VM.
    OwnVm,
    /// Inside the VM of its pod's sandbox container `sandbox`.
    InPod { sandbox: String },
}

/// Disk slots of a pod's VM: how many containers it can hold besides its sandbox at once
/// (`$HUSK_SHIM_POD_SLOTS`, default 8; an exited container's slot is freed at its delete).
fn pod_slots() -> u32 {
    std::env::var("HUSK_SHIM_POD_SLOTS")
        .ok()
        .and_then(|v| v.parse::<u32>().ok())
        .unwrap_or(8)
        .min(husk_host::vmm_args::MAX_DISK_SLOTS)
}

/// The kubelet's root directory, whose `pods/<uid>` a pod's VM shares
/// (`$HUSK_SHIM_KUBELET_ROOT`, default /var/lib/kubelet).
fn kubelet_root() -> PathBuf {
    std::env::var_os("HUSK_SHIM_KUBELET_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/lib/kubelet"))
}

/// What [`Service::create_own_vm`] made.
struct OwnVm {
    vm: String,
    vmm_pid: u32,
    disk: Disk,
    pod_share: Option<PathBuf>,
}

/// A container this shim serves.
#[derive(Debug)]
struct Container {
    place: Place,
    /// For a pod's sandbox: the pod's kubelet directory, shared with its VM at
    /// [`husk_init::pod::POD_SHARE`] (None: not there, or huskd's path policy refused it).
    pod_share: Option<PathBuf>,
    bundle: PathBuf,
    vm: String,
    vmm_pid: u32,
    disk: Disk,
    init: Arc<Process>,
    execs: HashMap<String, Arc<Process>>,
    paused: bool,
}

/// The VM's root disk.
#[derive(Debug)]
enum Disk {
    /// A shared read-only base (the VM writes to its own overlay in huskd); the lease keeps
    /// `prune-bases` away from it until the container is deleted.
    Base(base::Lease),
    /// The container's own copy, removed with the container.
    Copy(PathBuf),
}

impl Disk {
    fn path(&self) -> &std::path::Path {
        match self {
            Disk::Base(lease) => &lease.path,
            Disk::Copy(image) => image,
        }
    }

    fn own_image(&self) -> Option<&std::path::Path> {
        match self {
            Disk::Base(_) => None,
            Disk::Copy(image) => Some(image),
        }
    }

    /// Removes what belongs to this container alone (its copy, mounts left in the bundle).
    fn cleanup(&self, bundle: &std::path::Path) {
        rootfs::cleanup(bundle, self.own_image());
        if let Some(dir) = self.own_image().and_then(|i| i.parent()) {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

pub struct Service {
    args: ShimArgs,
    host: String,
    events: Publisher,
    containers: Arc<Mutex<HashMap<String, Container>>>,
    pub shutdown: Arc<Notify>,
}

/// Where rootfs images go: `$HUSK_SHIM_STATE_DIR` or /var/lib/husk/containerd. Not in the
/// bundle: that is on containerd's tmpfs (/run).
pub fn state_dir() -> PathBuf {
    std::env::var_os("HUSK_SHIM_STATE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/lib/husk/containerd"))
}

/// A container's own rootfs copy: `<state dir>/<namespace>/<id>/rootfs.ext4`. (Shared bases
/// are in `<state dir>/_bases/`, see [`base`].)
pub fn image_path(namespace: &str, id: &str) -> PathBuf {
    state_dir().join(namespace).join(id).join("rootfs.ext4")
}

/// Writes the bundle's [`RECORD_FILE`]; `in_pod` is the container's id when it lives in its
/// pod's VM `vm`.
fn write_record(
    bundle: &std::path::Path,
    vm: &str,
    disk: &Disk,
    in_pod: Option<&str>,
) -> std::io::Result<()> {
    let own = disk.own_image().map(|p| p.display().to_string());
    let shared = match disk {
        Disk::Base(lease) => lease.path.display().to_string(),
        Disk::Copy(_) => String::new(),
    };
    std::fs::write(
        bundle.join(RECORD_FILE),
        format!(
            "{vm}\n{}\n{shared}\n{}\n",
            own.unwrap_or_default(),
            in_pod.unwrap_or_default()
        ),
    )
}

/// How long Start waits for a booting VM's guest agent: `$HUSK_SHIM_BOOT_TIMEOUT` seconds,
/// default 300.
fn boot_timeout() -> std::time::Duration {
    let secs = std::env::var("HUSK_SHIM_BOOT_TIMEOUT")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(300);
    std::time::Duration::from_secs(secs)
}

async fn vm_running(
    client: &mut husk_proto::v1::husk_client::HuskClient<tonic::transport::Channel>,
    vm: &str,
) -> bool {
    huskd::get_vm(client, vm)
        .await
        .is_ok_and(|v| v.state == husk_proto::v1::VmState::Running as i32)
}

impl Service {
    pub fn new(args: ShimArgs, events: Publisher) -> Self {
        Self {
            args,
            host: huskd::host(),
            events,
            containers: Arc::new(Mutex::new(HashMap::new())),
            shutdown: Arc::new(Notify::new()),
        }
    }

    /// The container's root disk: the shared base of its image (built now if this is the
    /// image's first container) when `shared` and the rootfs is an image's overlay layers,
    /// else its own copy.
    async fn prepare_disk(
        &self,
        id: &str,
        bundle: &std::path::Path,
        mounts: &[containerd_shim_protos::api::Mount],
        root_path: String,
        shared: bool,
    ) -> ttrpc::Result<Disk> {
        let start = std::time::Instant::now();
        let plan = if shared {
            base::plan(mounts)
        } else {
            base::Plan::Copy {
                why: "huskd cannot give the VM an overlay".into(),
            }
        };
        let internal = |e: String| err(Code::INTERNAL, e);
        match plan {
            base::Plan::Shared { key, layers } => {
                let cache = base::cache_dir(&state_dir());
                let (b, id2) = (bundle.to_path_buf(), id.to_string());
                let lease = tokio::task::spawn_blocking(move || {
                    base::acquire(&cache, &key, |tmp| {
                        tracing::info!(
                            "container {id2}: building the shared base image {} from {} image \
                             layer(s) (the first container of this image; later ones reuse it)",
                            tmp.with_extension("").display(),
                            layers.lowerdirs.len()
                        );
                        rootfs::build_base(&b, &layers, tmp)
                    })
                })
                .await
                .map_err(|e| internal(e.to_string()))?
                .map_err(|e| internal(e.to_string()))?;
                match lease.built {
                    Some((bytes, took)) => tracing::info!(
                        "container {id}: rootfs image {} ({bytes} bytes of files) in {took:?}; \
                         a new shared base: this VM and later ones write to their own overlays",
                        lease.path.display()
                    ),
                    None => tracing::info!(
                        "container {id}: rootfs image {} (cached shared base: no copy) in \
                         {:?}; the VM writes to its own overlay",
                        lease.path.display(),
                        start.elapsed()
                    ),
                }
                Ok(Disk::Base(lease))
            }
            base::Plan::Copy { why } => {
                tracing::debug!("container {id}: rootfs copied for this container alone: {why}");
                let image = image_path(&self.args.namespace, id);
                let (b, mounts, img) = (bundle.to_path_buf(), mounts.to_vec(), image.clone());
                let built = tokio::task::spawn_blocking(move || {
                    rootfs::build(&b, &mounts, &root_path, &img)
                })
                .await
                .map_err(|e| internal(e.to_string()))?
                .map_err(|e| internal(e.to_string()))?;
                tracing::info!(
                    "container {id}: rootfs image {} ({} bytes of files) in {:?}",
                    built.image.display(),
                    built.bytes_copied,
                    built.took
                );
                Ok(Disk::Copy(image))
            }
        }
    }

    async fn client(
        &self,
    ) -> ttrpc::Result<husk_proto::v1::husk_client::HuskClient<tonic::transport::Channel>> {
        huskd::connect(&self.host).await.map_err(huskd_err)
    }

    /// The process named by `exec_id` (empty: init), with the container's VM name.
    async fn process(&self, id: &str, exec_id: &str) -> ttrpc::Result<(Arc<Process>, String)> {
        let guard = self.containers.lock().await;
        let c = guard
            .get(id)
            .ok_or_else(|| err(Code::NOT_FOUND, format!("container {id} not found")))?;
        let p = if exec_id.is_empty() {
            Arc::clone(&c.init)
        } else {
            Arc::clone(
                c.execs
                    .get(exec_id)
                    .ok_or_else(|| err(Code::NOT_FOUND, format!("exec {exec_id} not found")))?,
            )
        };
        Ok((p, c.vm.clone()))
    }

    /// The PID containerd sees for a process of container `id`: the VMM's for init (in a pod
    /// too: the host process that holds the container), the guest's for execs.
    async fn pid_of(&self, id: &str, p: &Process) -> u32 {
        if p.exec_id.is_empty() {
            return self
                .containers
                .lock()
                .await
                .get(id)
                .map_or(0, |c| c.vmm_pid);
        }
        match p.status() {
            Status::Running { pid } => pid,
            _ => 0,
        }
    }

    /// What happens when a process ended: the TaskExit event; for init also the end of the
    /// container's other processes (as a PID namespace's end would): the VM's stop for a
    /// container with a VM of its own, SIGKILL to its execs for a container in a pod's VM.
    async fn on_exit(
        &self,
        id: &str,
        exec_id: &str,
        pid: u32,
        vm: &str,
    ) -> impl FnOnce(Ended) + Send {
        let in_pod = self
            .containers
            .lock()
            .await
            .get(id)
            .is_some_and(|c| c.place != Place::OwnVm);
        let containers = Arc::clone(&self.containers);
        let events = self.events.clone();
        let host = self.host.clone();
        let (id, exec_id, vm) = (id.to_string(), exec_id.to_string(), vm.to_string());
        move |ended: Ended| {
            if let Some(reason) = ended.lost.clone() {
                let (host, vm, id, exec_id) =
                    (host.clone(), vm.clone(), id.clone(), exec_id.clone());
                let status = ended.status;
                tokio::spawn(async move {
                    // huskd knows why the VM ended (e.g. the VMM was killed).
                    let why = match huskd::connect(&host).await {
                        Ok(mut c) => huskd::get_vm(&mut c, &vm)
                            .await
                            .ok()
                            .and_then(|v| v.status)
                            .map(|s| s.failure_reason)
                            .unwrap_or_default(),
                        Err(_) => String::new(),
                    };
                    tracing::error!(
                        "container {id} process {exec_id:?} lost ({reason}; VM: {why}); \
                         reported as exited with status {status}"
                    );
                });
            }
            let mut e = TaskExit::new();
            e.container_id = id.clone();
            e.id = if exec_id.is_empty() {
                id.clone()
            } else {
                exec_id.clone()
            };
            // init: the VMM's pid; an exec: its guest pid.
            e.pid = if exec_id.is_empty() { pid } else { ended.pid };
            e.exit_status = ended.status;
            e.exited_at = timestamp(ended.at);
            events.publish(&e);
            if exec_id.is_empty() && in_pod {
                tokio::spawn(async move {
                    if let Some(c) = containers.lock().await.get(&id) {
                        for p in c.execs.values() {
                            let _ = p.signal(rustix::process::Signal::KILL.as_raw() as u32);
                        }
                    }
                });
            } else if exec_id.is_empty() {
                tokio::spawn(async move {
                    // Exec'd processes end with the VM (their streams report them).
                    if let Ok(mut c) = huskd::connect(&host).await {
                        let _ = huskd::stop_vm(&mut c, &vm).await;
                    }
                });
            }
        }
    }

    /// The VM, VMM pid and pod share of the pod whose sandbox container is `sandbox`.
    async fn pod_vm(&self, sandbox: &str) -> ttrpc::Result<(String, u32, Option<PathBuf>)> {
        let guard = self.containers.lock().await;
        let c = guard.get(sandbox).ok_or_else(|| {
            err(
                Code::NOT_FOUND,
                format!("the pod's sandbox {sandbox} is not served by this shim"),
            )
        })?;
        if matches!(c.init.status(), Status::Exited { .. }) {
            return Err(err(
                Code::FAILED_PRECONDITION,
                format!("the pod's sandbox {sandbox} has stopped"),
            ));
        }
        Ok((c.vm.clone(), c.vmm_pid, c.pod_share.clone()))
    }

    /// Creates a container of a pod inside the pod's running VM `vm`: its root as a disk of
    /// the VM (copy-on-write over its image's shared base when it has one), its volumes from
    /// the VM's pod share (or emptyDirs in the guest) and its small files copied in.
    async fn create_in_pod(
        &self,
        req: &CreateTaskRequest,
        bundle: &std::path::Path,
        spec: &oci::Spec,
        vm: &str,
        pod_share: Option<&std::path::Path>,
    ) -> ttrpc::Result<Disk> {
        let mut client = self.client().await?;
        let disk = self
            .prepare_disk(&req.id, bundle, &req.rootfs, spec.root_path(), true)
            .await?;
        let mounts = spec.pod_mounts(pod_share);
        for why in &mounts.skipped {
            tracing::warn!(container = %req.id, "mount not shared with the pod's VM: {why}");
        }
        if let Err(e) = write_record(bundle, vm, &disk, Some(&req.id)) {
            disk.cleanup(bundle);
            return Err(err(Code::INTERNAL, format!("writing {RECORD_FILE}: {e}")));
        }
        let request = AddContainerRequest {
            vm: vm.to_string(),
            container: req.id.clone(),
            rootfs: Some(husk_proto::v1::Disk {
                path: disk.path().display().to_string(),
                copy_on_write: matches!(disk, Disk::Base(_)),
                ..Default::default()
            }),
            volumes: mounts.volumes,
            files: mounts.files,
        };
        let started = std::time::Instant::now();
        if let Err(s) = client.add_container(request).await {
            disk.cleanup(bundle);
            let _ = std::fs::remove_file(bundle.join(RECORD_FILE));
            return Err(huskd_err(s.into()));
        }
        tracing::info!(
            "container {}: added to the pod's VM {vm} in {:?}",
            req.id,
            started.elapsed()
        );
        Ok(disk)
    }

    /// Creates the VM of a container that has one of its own (`pod`: a pod's sandbox, with
    /// disk slots for the pod's containers and the pod's kubelet directory shared).
    async fn create_own_vm(
        &self,
        req: &CreateTaskRequest,
        bundle: &std::path::Path,
        spec: &oci::Spec,
        pod: bool,
    ) -> ttrpc::Result<OwnVm> {
        let mut client = self.client().await?;
        let root_path = spec.root_path();
        let mut disk = self
            .prepare_disk(&req.id, bundle, &req.rootfs, root_path.clone(), true)
            .await?;
        let vm_name = huskd::vm_name(&self.args.namespace, &req.id);
        // A VM of that name is a leftover of an earlier shim of this container id.
        let _ = huskd::delete_vm(&mut client, &vm_name).await;
        let (mounts, skipped) = if pod {
            // A sandbox (pause) shares nothing of its own; what its spec binds (/dev/shm...) is
            // the guest's own.
            (Vec::new(), Vec::new())
        } else {
            spec.bind_mounts()
        };
        for why in skipped {
            tracing::warn!(container = %req.id, "mount not shared with the VM: {why}");
        }
        // The pod's kubelet directory (volumes, etc-hosts, termination logs) as it is when the
        // sandbox starts: kubelet has mounted the pod's volumes by then.
        let mut pod_share = pod
            .then(|| spec.pod_uid())
            .flatten()
            .map(|uid| kubelet_root().join("pods").join(uid))
            .filter(|dir| dir.is_dir());
        let mut plan = VmPlan {
            mounts,
            name: vm_name.clone(),
            rootfs_image: disk.path().display().to_string(),
            rootfs_copy_on_write: matches!(disk, Disk::Base(_)),
            // A pod's VM holds all its containers: sized by their limits, when kubelet gives
            // them, not by the pause container's.
            memory_mib: if pod {
                spec.pod_memory_mib()
            } else {
                spec.memory_mib()
            },
            vcpus: if pod { spec.pod_vcpus() } else { spec.vcpus() },
            netns: spec.network_namespace(),
            disk_slots: if pod { pod_slots() } else { 0 },
            hostname: spec.hostname(),
            labels: vec![
                (
                    "io.containerd.namespace".into(),
                    self.args.namespace.clone(),
                ),
                ("io.containerd.id".into(), req.id.clone()),
            ],
        };
        if pod {
            plan.labels.push(("io.husk.pod".into(), "sandbox".into()));
        }
        if let Some(share) = &pod_share {
            plan.mounts.push(oci::BindMount {
                source: share.display().to_string(),
                destination: husk_init::pod::POD_SHARE.into(),
                read_only: false,
            });
        }
        let result = loop {
            if let Err(e) = write_record(bundle, &vm_name, &disk, None) {
                disk.cleanup(bundle);
                return Err(err(Code::INTERNAL, format!("writing {RECORD_FILE}: {e}")));
            }
            let result = huskd::create_vm(&mut client, &plan).await;
            match &result {
                Err(HuskdError::NoCopyOnWrite) if plan.rootfs_copy_on_write => {
                    tracing::warn!(
                        "container {}: huskd does not support copy-on-write rootfs (an older \
                         huskd): copying the rootfs for this container instead",
                        req.id
                    );
                    disk = self
                        .prepare_disk(&req.id, bundle, &req.rootfs, root_path.clone(), false)
                        .await?;
                    plan.rootfs_image = disk.path().display().to_string();
                    plan.rootfs_copy_on_write = false;
                }
                Err(HuskdError::Call(s))
                    if s.code() == tonic::Code::PermissionDenied && pod_share.take().is_some() =>
                {
                    tracing::warn!(
                        "pod {}: huskd may not share the pod's kubelet directory ({}): its \
                         configMap, secret and projected volumes do not reach the pod's \
                         containers (allow it with huskd --allow-path {}/pods)",
                        req.id,
                        s.message(),
                        kubelet_root().display()
                    );
                    plan.mounts
                        .retain(|m| m.destination != husk_init::pod::POD_SHARE);
                }
                _ => break result,
            }
        };
        match result {
            Ok(vm) => Ok(OwnVm {
                vm: vm_name,
                vmm_pid: vm.status.as_ref().map_or(0, |s| s.vmm_pid),
                disk,
                pod_share,
            }),
            Err(e) => {
                disk.cleanup(bundle);
                Err(huskd_err(e))
            }
        }
    }

    /// Pause and resume act on a whole VM: a container in a pod's VM cannot have them alone.
    async fn refuse_in_pod(&self, id: &str, what: &str) -> ttrpc::Result<()> {
        let guard = self.containers.lock().await;
        match guard.get(id).map(|c| &c.place) {
            Some(Place::InPod { sandbox }) => Err(err(
                Code::FAILED_PRECONDITION,
                format!(
                    "{what}: container {id} shares its pod's VM; {what} the pod's sandbox \
                     {sandbox} instead"
                ),
            )),
            _ => Ok(()),
        }
    }

    fn state_of(
        &self,
        id: &str,
        bundle: &str,
        p: &Process,
        pid: u32,
        paused: bool,
    ) -> StateResponse {
        let mut r = StateResponse::new();
        r.id = if p.exec_id.is_empty() {
            id.to_string()
        } else {
            p.exec_id.clone()
        };
        r.exec_id = p.exec_id.clone();
        r.bundle = bundle.to_string();
        r.pid = pid;
        r.stdin = p.stdio.stdin.clone();
        r.stdout = p.stdio.stdout.clone();
        r.stderr = p.stdio.stderr.clone();
        r.terminal = p.stdio.terminal;
        let status = match p.status() {
            Status::Created => TaskStatus::CREATED,
            Status::Running { .. } if paused => TaskStatus::PAUSED,
            Status::Running { .. } => TaskStatus::RUNNING,
            Status::Exited { status, at } => {
                r.exit_status = status;
                r.exited_at = timestamp(at);
                TaskStatus::STOPPED
            }
        };
        r.status = EnumOrUnknown::new(status);
        r
    }
}

#[async_trait]
impl Task for Service {
    async fn create(
        &self,
        _ctx: &TtrpcContext,
        req: CreateTaskRequest,
    ) -> ttrpc::Result<CreateTaskResponse> {
        if self.containers.lock().await.contains_key(&req.id) {
            return Err(err(
                Code::ALREADY_EXISTS,
                format!("container {} exists already", req.id),
            ));
        }
        if !req.checkpoint.is_empty() {
            return Err(err(Code::UNIMPLEMENTED, "create from a checkpoint"));
        }
        let bundle = PathBuf::from(&req.bundle);
        let spec =
            oci::Spec::load(&bundle).map_err(|e| err(Code::INVALID_ARGUMENT, e.to_string()))?;
        let process = spec
            .process()
            .filter(|p| p.args.first().is_some_and(|a| !a.is_empty()))
            .ok_or_else(|| err(Code::INVALID_ARGUMENT, "config.json: process.args is empty"))?;
        let (vm, vmm_pid, disk, place, pod_share) = match spec.pod_role(&req.id) {
            oci::PodRole::Member { sandbox } => {
                let (vm, vmm_pid, share) = self.pod_vm(&sandbox).await?;
                let disk = self
                    .create_in_pod(&req, &bundle, &spec, &vm, share.as_deref())
                    .await?;
                (vm, vmm_pid, disk, Place::InPod { sandbox }, None)
            }
            role => {
                let pod = role == oci::PodRole::Sandbox;
                let own = self.create_own_vm(&req, &bundle, &spec, pod).await?;
                (own.vm, own.vmm_pid, own.disk, Place::OwnVm, own.pod_share)
            }
        };
        let stdio = Stdio {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        let in_container = match &place {
            Place::InPod { .. } => req.id.as_str(),
            Place::OwnVm => "",
        };
        let init = Process::new("", in_container, process, stdio);
        self.containers.lock().await.insert(
            req.id.clone(),
            Container {
                place,
                pod_share,
                bundle: bundle.clone(),
                vm,
                vmm_pid,
                disk,
                init,
                execs: HashMap::new(),
                paused: false,
            },
        );
        let mut e = TaskCreate::new();
        e.container_id = req.id.clone();
        e.bundle = req.bundle.clone();
        e.rootfs = req.rootfs.clone();
        let mut io = TaskIO::new();
        io.stdin = req.stdin;
        io.stdout = req.stdout;
        io.stderr = req.stderr;
        io.terminal = req.terminal;
        e.io = MessageField::some(io);
        e.pid = vmm_pid;
        self.events.publish(&e);
        let mut r = CreateTaskResponse::new();
        r.pid = vmm_pid;
        Ok(r)
    }

    async fn start(&self, _ctx: &TtrpcContext, req: StartRequest) -> ttrpc::Result<StartResponse> {
        let (p, vm) = self.process(&req.id, &req.exec_id).await?;
        let mut client = self.client().await?;
        let host_pid = self.pid_of(&req.id, &p).await;
        // huskd waits up to a minute for a booting guest's agent; a loaded host (or nested
        // emulation) can take longer, so the shim keeps asking while the VM runs.
        let deadline = std::time::Instant::now() + boot_timeout();
        let pid = loop {
            let on_exit = self.on_exit(&req.id, &req.exec_id, host_pid, &vm).await;
            match p.start(&mut client, &vm, on_exit).await {
                Ok(pid) => break pid,
                Err(ProcessError::Exec(s))
                    if s.code() == tonic::Code::Unavailable
                        && std::time::Instant::now() < deadline
                        && vm_running(&mut client, &vm).await =>
                {
                    tracing::info!(
                        "container {}: the guest agent is not up yet ({}); still waiting",
                        req.id,
                        s.message()
                    );
                }
                Err(e) => {
                    // The guest's console says why a boot or an agent failed.
                    let console = huskd::console_tail(&mut client, &vm, 30).await;
                    // A VMM that died before the guest wrote anything: huskd's reason (the
                    // VMM's exit and the last line of its log) says why.
                    let reason = huskd::get_vm(&mut client, &vm)
                        .await
                        .ok()
                        .and_then(|v| v.status)
                        .map(|s| s.failure_reason)
                        .unwrap_or_default();
                    tracing::error!(
                        "container {}: start failed: {e}; VM failure: {reason}; VM console:\n{console}",
                        req.id
                    );
                    return Err(process_err(e));
                }
            }
        };
        let mut r = StartResponse::new();
        if req.exec_id.is_empty() {
            let mut e = TaskStart::new();
            e.container_id = req.id.clone();
            e.pid = host_pid;
            self.events.publish(&e);
            r.pid = host_pid;
        } else {
            let mut e = TaskExecStarted::new();
            e.container_id = req.id.clone();
            e.exec_id = req.exec_id.clone();
            e.pid = pid;
            self.events.publish(&e);
            r.pid = pid;
        }
        Ok(r)
    }

    async fn state(&self, _ctx: &TtrpcContext, req: StateRequest) -> ttrpc::Result<StateResponse> {
        let (p, _) = self.process(&req.id, &req.exec_id).await?;
        let pid = self.pid_of(&req.id, &p).await;
        let guard = self.containers.lock().await;
        let (bundle, paused) = guard
            .get(&req.id)
            .map(|c| (c.bundle.display().to_string(), c.paused))
            .unwrap_or_default();
        Ok(self.state_of(&req.id, &bundle, &p, pid, paused))
    }

    async fn wait(&self, _ctx: &TtrpcContext, req: WaitRequest) -> ttrpc::Result<WaitResponse> {
        let (p, _) = self.process(&req.id, &req.exec_id).await?;
        let (status, at) = p.wait().await;
        let mut r = WaitResponse::new();
        r.exit_status = status;
        r.exited_at = timestamp(at);
        Ok(r)
    }

    async fn kill(&self, _ctx: &TtrpcContext, req: KillRequest) -> ttrpc::Result<Empty> {
        let (p, vm) = self.process(&req.id, &req.exec_id).await?;
        if p.exec_id.is_empty() && p.status() == Status::Created {
            // Never started: nothing runs in the VM yet; the process ends as if killed.
            let pid = self.pid_of(&req.id, &p).await;
            if p.mark_exited(128 + req.signal) {
                self.on_exit(&req.id, "", pid, &vm).await(Ended {
                    pid,
                    status: 128 + req.signal,
                    at: std::time::SystemTime::now(),
                    lost: None,
                });
            }
            return Ok(Empty::new());
        }
        p.signal(req.signal).map_err(process_err)?;
        if req.all && p.exec_id.is_empty() {
            let execs: Vec<Arc<Process>> = self
                .containers
                .lock()
                .await
                .get(&req.id)
                .map(|c| c.execs.values().cloned().collect())
                .unwrap_or_default();
            for e in execs {
                let _ = e.signal(req.signal);
            }
        }
        Ok(Empty::new())
    }

    async fn exec(&self, _ctx: &TtrpcContext, req: ExecProcessRequest) -> ttrpc::Result<Empty> {
        let spec = oci::Process::from_json(&req.spec.value)
            .map_err(|e| err(Code::INVALID_ARGUMENT, e.to_string()))?;
        let mut guard = self.containers.lock().await;
        let c = guard
            .get_mut(&req.id)
            .ok_or_else(|| err(Code::NOT_FOUND, format!("container {} not found", req.id)))?;
        if matches!(c.init.status(), Status::Exited { .. }) {
            return Err(err(Code::FAILED_PRECONDITION, "container is stopped"));
        }
        if c.execs.contains_key(&req.exec_id) {
            return Err(err(
                Code::ALREADY_EXISTS,
                format!("exec {} already exists", req.exec_id),
            ));
        }
        let stdio = Stdio {
            stdin: req.stdin,
            stdout: req.stdout,
            stderr: req.stderr,
            terminal: req.terminal,
        };
        let process = Process::new(&req.exec_id, &c.init.container, spec, stdio);
        c.execs.insert(req.exec_id.clone(), process);
        drop(guard);
        let mut e = TaskExecAdded::new();
        e.container_id = req.id;
        e.exec_id = req.exec_id;
        self.events.publish(&e);
        Ok(Empty::new())
    }

    async fn resize_pty(&self, _ctx: &TtrpcContext, req: ResizePtyRequest) -> ttrpc::Result<Empty> {
        let (p, _) = self.process(&req.id, &req.exec_id).await?;
        p.resize(req.width, req.height).map_err(process_err)?;
        Ok(Empty::new())
    }

    async fn close_io(&self, _ctx: &TtrpcContext, req: CloseIORequest) -> ttrpc::Result<Empty> {
        let (p, _) = self.process(&req.id, &req.exec_id).await?;
        if req.stdin {
            // A process that already ended has nothing to close.
            let _ = p.close_stdin();
        }
        Ok(Empty::new())
    }

    async fn pids(&self, _ctx: &TtrpcContext, req: PidsRequest) -> ttrpc::Result<PidsResponse> {
        let guard = self.containers.lock().await;
        let c = guard
            .get(&req.id)
            .ok_or_else(|| err(Code::NOT_FOUND, format!("container {} not found", req.id)))?;
        let mut r = PidsResponse::new();
        if matches!(c.init.status(), Status::Running { .. }) {
            let mut info = ProcessInfo::new();
            info.pid = c.vmm_pid;
            r.processes.push(info);
        }
        for p in c.execs.values() {
            if let Status::Running { pid } = p.status() {
                let mut info = ProcessInfo::new();
                info.pid = pid;
                r.processes.push(info);
            }
        }
        Ok(r)
    }

    async fn pause(&self, _ctx: &TtrpcContext, req: PauseRequest) -> ttrpc::Result<Empty> {
        let (_, vm) = self.process(&req.id, "").await?;
        self.refuse_in_pod(&req.id, "pause").await?;
        let mut client = self.client().await?;
        client
            .pause_vm(PauseVmRequest { vm })
            .await
            .map_err(|s| huskd_err(s.into()))?;
        if let Some(c) = self.containers.lock().await.get_mut(&req.id) {
            c.paused = true;
        }
        let mut e = TaskPaused::new();
        e.container_id = req.id;
        self.events.publish(&e);
        Ok(Empty::new())
    }

    async fn resume(&self, _ctx: &TtrpcContext, req: ResumeRequest) -> ttrpc::Result<Empty> {
        let (_, vm) = self.process(&req.id, "").await?;
        self.refuse_in_pod(&req.id, "resume").await?;
        let mut client = self.client().await?;
        client
            .resume_vm(ResumeVmRequest { vm })
            .await
            .map_err(|s| huskd_err(s.into()))?;
        if let Some(c) = self.containers.lock().await.get_mut(&req.id) {
            c.paused = false;
        }
        let mut e = TaskResumed::new();
        e.container_id = req.id;
        self.events.publish(&e);
        Ok(Empty::new())
    }

    async fn delete(
        &self,
        _ctx: &TtrpcContext,
        req: DeleteRequest,
    ) -> ttrpc::Result<DeleteResponse> {
        let (p, vm) = self.process(&req.id, &req.exec_id).await?;
        let pid = self.pid_of(&req.id, &p).await;
        let (status, at) = match p.status() {
            Status::Exited { status, at } => (status, at),
            Status::Created => (0, std::time::SystemTime::now()),
            Status::Running { .. } => {
                return Err(err(
                    Code::FAILED_PRECONDITION,
                    "the process is running: kill it first",
                ))
            }
        };
        let mut r = DeleteResponse::new();
        r.pid = pid;
        r.exit_status = status;
        r.exited_at = timestamp(at);
        if !req.exec_id.is_empty() {
            if let Some(c) = self.containers.lock().await.get_mut(&req.id) {
                c.execs.remove(&req.exec_id);
            }
            return Ok(r);
        }
        let place = self
            .containers
            .lock()
            .await
            .get(&req.id)
            .map(|c| c.place.clone());
        let mut client = self.client().await?;
        if matches!(place, Some(Place::InPod { .. })) {
            remove_from_pod(&mut client, &vm, &req.id)
                .await
                .map_err(huskd_err)?;
        } else {
            huskd::delete_vm(&mut client, &vm)
                .await
                .map_err(huskd_err)?;
        }
        let taken = self.containers.lock().await.remove(&req.id);
        if let Some(c) = taken {
            c.disk.cleanup(&c.bundle);
            let _ = std::fs::remove_file(c.bundle.join(RECORD_FILE));
            // Dropping `c` ends its lease on a shared base: the VM that used it is gone.
        }
        let mut e = TaskDelete::new();
        e.container_id = req.id.clone();
        e.id = req.id;
        e.pid = pid;
        e.exit_status = status;
        e.exited_at = timestamp(at);
        self.events.publish(&e);
        Ok(r)
    }

    async fn connect(
        &self,
        _ctx: &TtrpcContext,
        req: ConnectRequest,
    ) -> ttrpc::Result<ConnectResponse> {
        let guard = self.containers.lock().await;
        let mut r = ConnectResponse::new();
        r.shim_pid = std::process::id();
        r.task_pid = guard.get(&req.id).map_or(0, |c| c.vmm_pid);
        r.version = env!("CARGO_PKG_VERSION").into();
        Ok(r)
    }

    async fn shutdown(&self, _ctx: &TtrpcContext, req: ShutdownRequest) -> ttrpc::Result<Empty> {
        // A shim with a live container stays (unless told `now`): its VM would be orphaned.
        // containerd asks after each task's delete; a pod's shim serves until its last one.
        if !self.containers.lock().await.is_empty() && !req.now {
            return Ok(Empty::new());
        }
        self.shutdown.notify_one();
        Ok(Empty::new())
    }

    async fn stats(&self, _ctx: &TtrpcContext, req: StatsRequest) -> ttrpc::Result<StatsResponse> {
        let (pid, processes, in_pod) = {
            let guard = self.containers.lock().await;
            let c = guard
                .get(&req.id)
                .ok_or_else(|| err(Code::NOT_FOUND, format!("container {} not found", req.id)))?;
            let running = std::iter::once(&c.init)
                .chain(c.execs.values())
                .filter(|p| matches!(p.status(), Status::Running { .. }))
                .count();
            let in_pod = matches!(c.place, Place::InPod { .. }).then(|| c.vm.clone());
            (c.vmm_pid, running as u64, in_pod)
        };
        let any = match in_pod {
            // A container in a pod's VM: its own processes, measured in the guest.
            Some(vm) => {
                let mut client = self.client().await?;
                let stats = client
                    .get_container_stats(GetContainerStatsRequest {
                        vm,
                        container: req.id.clone(),
                    })
                    .await
                    .map_err(|s| huskd_err(s.into()))?
                    .into_inner();
                stats::container_metrics(&stats)
            }
            None => stats::vmm_metrics(pid, processes),
        }
        .map_err(|e| err(Code::FAILED_PRECONDITION, e.to_string()))?;
        let mut r = StatsResponse::new();
        r.stats = MessageField::some(any);
        Ok(r)
    }

    async fn update(&self, _ctx: &TtrpcContext, _req: UpdateTaskRequest) -> ttrpc::Result<Empty> {
        Err(err(
            Code::UNIMPLEMENTED,
            "update: resources of a running husk VM are fixed",
        ))
    }

    async fn checkpoint(
        &self,
        _ctx: &TtrpcContext,
        _req: containerd_shim_protos::api::CheckpointTaskRequest,
    ) -> ttrpc::Result<Empty> {
        Err(err(
            Code::UNIMPLEMENTED,
            "checkpoint: not implemented by the husk shim",
        ))
    }
}

/// Takes a pod container out of its pod's VM (its processes, root mount and disk slot); a VM
/// or container already gone counts as removed.
pub async fn remove_from_pod(
    client: &mut husk_proto::v1::husk_client::HuskClient<tonic::transport::Channel>,
    vm: &str,
    id: &str,
) -> Result<(), HuskdError> {
    match client
        .remove_container(RemoveContainerRequest {
            vm: vm.to_string(),
            container: id.to_string(),
        })
        .await
    {
        Ok(_) => Ok(()),
        Err(s) if s.code() == tonic::Code::NotFound => Ok(()),
        // The pod's VM stopped (its sandbox ended): the container went with it.
        Err(s) if s.code() == tonic::Code::FailedPrecondition && !vm_is_live(client, vm).await => {
            Ok(())
        }
        Err(s) => Err(s.into()),
    }
}

async fn vm_is_live(
    client: &mut husk_proto::v1::husk_client::HuskClient<tonic::transport::Channel>,
    vm: &str,
) -> bool {
    huskd::get_vm(client, vm).await.is_ok_and(|v| {
        v.state == husk_proto::v1::VmState::Running as i32
            || v.state == husk_proto::v1::VmState::Paused as i32
    })
}
