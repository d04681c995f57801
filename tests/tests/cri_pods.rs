//! Kubernetes pods on containerd-shim-husk-v2, driven through CRI as kubelet drives them, with
//! Debian's real containerd (1.6, its CRI plugin on) and real guests (testbed).
//!
//! Each test starts its own containerd (temporary root, state and socket; the native
//! snapshotter, since the testbed's root is an overlay; a CNI bridge network of its own) with
//! the shim on its PATH and a huskd fixture behind `$HUSK_HOST`, imports a busybox image and a
//! pause image that it builds itself (no registry) into CRI's namespace `k8s.io`, and talks to
//! containerd's CRI services (runtime.v1) over its socket with the `k8s-cri` client.
//!
//! A pod is one VM: the sandbox (pause) container boots it, the pod's other containers run in
//! it with rootfs of their own, share its network (the pod's CNI namespace: 127.0.0.1 between
//! containers) and its emptyDir volumes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::future::Future;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use husk_proto::v1::ListVmsRequest;
use husk_tests::huskd::Huskd;
use husk_tests::{bin, require_guest_kvm, run_with_timeout, Finished};
use hyper_util::rt::TokioIo;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::{
    ContainerConfig, ContainerMetadata, ContainerState, ContainerStatusRequest,
    CreateContainerRequest, ExecSyncRequest, ExecSyncResponse, ImageSpec, ImageStatusRequest,
    KeyValue, LinuxContainerConfig, LinuxContainerResources, LinuxContainerSecurityContext,
    LinuxPodSandboxConfig, LinuxSandboxSecurityContext, ListContainersRequest,
    ListPodSandboxRequest, Mount, NamespaceMode, NamespaceOption, PodSandboxConfig,
    PodSandboxMetadata, PodSandboxState, PodSandboxStatusRequest, RemoveContainerRequest,
    RemovePodSandboxRequest, RunPodSandboxRequest, StartContainerRequest, StatusRequest,
    StopContainerRequest, StopPodSandboxRequest, VersionRequest,
};
use tonic::transport::{Channel, Endpoint, Uri};

const BUSYBOX: &str = "docker.io/library/husk-busybox:test";
const PAUSE: &str = "docker.io/library/husk-pause:test";
/// The CRI runtime handler (a RuntimeClass's `handler`) configured for the husk shim.
const HANDLER: &str = "husk";
const RUNTIME: &str = "io.containerd.husk.v2";
/// The pods' CNI network: its bridge on the node and its /24 (`SUBNET.0/24`, gateway `.1`).
const BRIDGE: &str = "huskcri0";
const SUBNET: &str = "10.99.40";
const CNI_PLUGINS: &str = "/usr/lib/cni";
const CNI_NETWORK: &str = "husk-cri";
/// Where containerd 1.6's CRI puts the pods' network namespaces (netns_mounts_under_state_dir
/// false, its default).
const NETNS_DIR: &str = "/var/run/netns";
/// CRI calls that may boot a guest (nested emulation: 5-15 s, sometimes much more).
const BOOT_LIMIT: Duration = Duration::from_secs(300);
/// Every other CRI call.
const CALL_LIMIT: Duration = Duration::from_secs(60);
const CTR_LIMIT: Duration = Duration::from_secs(240);

/// A containerd with the CRI plugin on, its CNI network, the huskd its shims use and a CRI
/// client. Dropping it ends everything it started, even after a failed assertion.
struct CriContainerd {
    dir: PathBuf,
    socket: PathBuf,
    child: Option<Child>,
    /// An Option so that Drop can end huskd (and its VMs) before it removes namespaces and
    /// links.
    huskd: Option<Huskd>,
    runtime: tokio::runtime::Runtime,
    channel: Channel,
    /// The pod network namespaces (`/var/run/netns/cni-*`) that existed before this fixture.
    netns_before: Vec<String>,
    /// Whether this fixture runs pods: only then does its drop remove new pod namespaces and
    /// the bridge (a fixture that runs none leaves those of a test beside it alone).
    runs_pods: std::cell::Cell<bool>,
}

impl CriContainerd {
    /// Starts huskd and containerd in /tmp/husk-cri-TAG-PID (fresh), imports the busybox and the
    /// pause image into `k8s.io` and waits until CRI knows both.
    fn start(tag: &str) -> Self {
        assert!(
            Path::new(CNI_PLUGINS).join("bridge").exists()
                && Path::new(CNI_PLUGINS).join("loopback").exists(),
            "{CNI_PLUGINS}/bridge and loopback are missing (Debian package \
             containernetworking-plugins): scripts/setup"
        );
        let netns_before = pod_netns();
        let dir = PathBuf::from(format!("/tmp/husk-cri-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let vmm = bin("husk-vmm").display().to_string();
        // The shims' rootfs images (HUSK_SHIM_STATE_DIR), CRI's sandbox files (/etc/hosts,
        // /etc/resolv.conf, /etc/hostname) and the pods' volumes lie below the fixture's
        // directory.
        let allowed = dir.display().to_string();
        let huskd = Huskd::start(
            &format!("cri-{tag}"),
            &["--vmm", &vmm, "--allow-path", &allowed],
        );
        let socket = dir.join("c.sock");
        write_cni_config(&dir);
        std::fs::write(dir.join("config.toml"), containerd_config(&dir, &socket)).unwrap();
        // containerd finds `containerd-shim-husk-v2` on its PATH; shims inherit its environment
        // (HUSK_HOST, HUSK_SHIM_STATE_DIR).
        let shim_dir = bin("containerd-shim-husk-v2")
            .parent()
            .unwrap()
            .to_path_buf();
        let path = format!(
            "{}:{}",
            shim_dir.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let log = std::fs::File::create(dir.join("containerd.log")).unwrap();
        let child = Command::new("containerd")
            .arg("--config")
            .arg(dir.join("config.toml"))
            .arg("--log-level")
            .arg("debug")
            .env("PATH", path)
            .env("HUSK_HOST", format!("unix://{}", huskd.socket.display()))
            .env("HUSK_SHIM_STATE_DIR", dir.join("images"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("containerd (Debian package containerd) must be installed: scripts/setup");
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        // Connects lazily: the socket appears once containerd is up.
        let channel = {
            let _guard = runtime.enter();
            let path = socket.clone();
            Endpoint::from_static("http://containerd.cri").connect_with_connector_lazy(
                tower::service_fn(move |_: Uri| {
                    let path = path.clone();
                    async move {
                        let stream = tokio::net::UnixStream::connect(&path).await?;
                        Ok::<_, std::io::Error>(TokioIo::new(stream))
                    }
                }),
            )
        };
        let me = Self {
            dir,
            socket,
            child: Some(child),
            huskd: Some(huskd),
            runtime,
            channel,
            netns_before,
            runs_pods: std::cell::Cell::new(false),
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if me.ctr(&["version"]).code() == Some(0) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "containerd did not answer within 60 s:\n{}",
                me.logs()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        me.import_image("busybox-image", BUSYBOX, &["sh"], &busybox_applets());
        me.import_image("pause-image", PAUSE, &["sleep", "2147483647"], &["sleep"]);
        // CRI learns of imported images from containerd's events: wait until it knows both.
        for image in [BUSYBOX, PAUSE] {
            let deadline = Instant::now() + Duration::from_secs(30);
            while me.image_status(image).is_none() {
                assert!(
                    Instant::now() < deadline,
                    "CRI does not know the imported image {image} after 30 s\n{}",
                    me.logs()
                );
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        me
    }

    /// Marks this fixture as one that runs pods (see [`Self::runs_pods`]).
    fn will_run_pods(&self) {
        self.runs_pods.set(true);
    }

    fn huskd(&self) -> &Huskd {
        self.huskd.as_ref().expect("huskd runs until drop")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("containerd.log")).unwrap_or_default()
    }

    /// Both daemons' logs, for failure messages.
    fn logs(&self) -> String {
        format!(
            "containerd log (tail):\n{}\nhuskd log (tail):\n{}",
            tail(&self.log(), 80),
            tail(&self.huskd.as_ref().map(Huskd::log).unwrap_or_default(), 40)
        )
    }

    /// `ctr` in CRI's namespace `k8s.io`.
    fn ctr(&self, args: &[&str]) -> Finished {
        run_with_timeout(
            Command::new("ctr")
                .arg("--address")
                .arg(&self.socket)
                .arg("--namespace")
                .arg("k8s.io")
                .args(args),
            CTR_LIMIT,
        )
    }

    /// Builds the image `name` (config Cmd `cmd`, busybox `applets`) in `DIR/subdir` and imports
    /// it with the native snapshotter.
    fn import_image(&self, subdir: &str, name: &str, cmd: &[&str], applets: &[&str]) {
        let tar = husk_tests::oci::build_oci_image_with(&self.dir.join(subdir), name, cmd, applets);
        let out = self.ctr(&[
            "image",
            "import",
            "--snapshotter",
            "native",
            tar.to_str().unwrap(),
        ]);
        assert_eq!(
            out.code(),
            Some(0),
            "ctr image import {name}: {}\n{}\n{}",
            out.stdout(),
            out.stderr(),
            self.logs()
        );
    }

    fn runtime_client(&self) -> RuntimeServiceClient<Channel> {
        RuntimeServiceClient::new(self.channel.clone())
    }

    fn image_client(&self) -> ImageServiceClient<Channel> {
        ImageServiceClient::new(self.channel.clone())
    }

    /// Runs one CRI call within `limit`; its answer, or a panic that names the call and shows
    /// both daemons' logs.
    fn call<T>(
        &self,
        what: &str,
        limit: Duration,
        call: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    ) -> T {
        // The timer is the runtime's: made inside it.
        match self
            .runtime
            .block_on(async { tokio::time::timeout(limit, call).await })
        {
            Ok(Ok(answer)) => answer.into_inner(),
            Ok(Err(status)) => panic!(
                "CRI {what} failed: {:?}: {}\n{}",
                status.code(),
                status.message(),
                self.logs()
            ),
            Err(_) => panic!(
                "CRI {what} did not answer within {limit:?}\n{}",
                self.logs()
            ),
        }
    }

    /// CRI ImageStatus: the image, if CRI has it.
    fn image_status(&self, image: &str) -> Option<k8s_cri::v1::Image> {
        let mut images = self.image_client();
        self.call(
            &format!("ImageStatus({image})"),
            CALL_LIMIT,
            images.image_status(ImageStatusRequest {
                image: Some(image_spec(image)),
                verbose: false,
            }),
        )
        .image
    }

    /// CRI ExecSync in `container` (the runtime's own limit 60 s).
    fn exec_sync(&self, container: &str, cmd: &[&str]) -> ExecSyncResponse {
        let mut rs = self.runtime_client();
        self.call(
            &format!("ExecSync({container}, {cmd:?})"),
            CALL_LIMIT + Duration::from_secs(30),
            rs.exec_sync(ExecSyncRequest {
                container_id: container.into(),
                cmd: cmd.iter().map(|s| s.to_string()).collect(),
                timeout: 60,
            }),
        )
    }

    fn container_state(&self, container: &str) -> i32 {
        let mut rs = self.runtime_client();
        self.call(
            &format!("ContainerStatus({container})"),
            CALL_LIMIT,
            rs.container_status(ContainerStatusRequest {
                container_id: container.into(),
                verbose: false,
            }),
        )
        .status
        .expect("ContainerStatus without a status")
        .state
    }

    fn vm_count(&self) -> usize {
        let huskd = self.huskd();
        let mut c = huskd.client();
        huskd
            .block_on(c.list_vms(ListVmsRequest::default()))
            .unwrap()
            .into_inner()
            .vms
            .len()
    }

    /// PIDs of the live shims of this containerd (found by their -address flag).
    fn shims(&self) -> Vec<i32> {
        let mut pids = Vec::new();
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
            let text = String::from_utf8_lossy(&cmdline);
            if text.contains("containerd-shim-husk-v2")
                && text.contains(&*self.socket.to_string_lossy())
            {
                if let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() {
                    if process_alive(pid) {
                        pids.push(pid as i32);
                    }
                }
            }
        }
        pids
    }

    /// Live husk-vmm processes of this fixture's huskd (their command lines name its
    /// directory).
    fn vmms(&self) -> Vec<u32> {
        let Some(huskd) = self.huskd.as_ref() else {
            return Vec::new();
        };
        let mut pids = Vec::new();
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
            let text = String::from_utf8_lossy(&cmdline);
            // The VMM itself (argv[0]), not huskd, whose `--vmm` argument names it too.
            let argv0 = text.split('\0').next().unwrap_or_default();
            if argv0.ends_with("husk-vmm") && text.contains(&*huskd.dir.to_string_lossy()) {
                if let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() {
                    if process_alive(pid) {
                        pids.push(pid);
                    }
                }
            }
        }
        pids
    }

    /// Mount points below the fixture's directory.
    fn mounts(&self) -> Vec<String> {
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
        mounts
            .lines()
            .filter_map(|l| l.split_whitespace().nth(1))
            .filter(|target| target.starts_with(&*self.dir.to_string_lossy()))
            .map(str::to_string)
            .collect()
    }

    /// Pod network namespaces that this fixture's CRI created (not there before it started).
    fn new_pod_netns(&self) -> Vec<String> {
        pod_netns()
            .into_iter()
            .filter(|n| !self.netns_before.contains(n))
            .collect()
    }

    /// host-local's directory of the pods' network: a file per address in use.
    fn ipam_dir(&self) -> PathBuf {
        self.dir.join("cni/ipam").join(CNI_NETWORK)
    }

    /// Per-container image files the shims left under HUSK_SHIM_STATE_DIR (the shared bases
    /// in `_bases/` stay by design).
    fn leftover_images(&self) -> Vec<PathBuf> {
        let bases = self.dir.join("images/_bases");
        let mut found = Vec::new();
        let mut stack = vec![self.dir.join("images")];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
                if e.path() == bases {
                    continue;
                }
                if e.path().is_dir() {
                    stack.push(e.path());
                } else {
                    found.push(e.path());
                }
            }
        }
        found
    }
}

impl Drop for CriContainerd {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        // Shims of pods a failed test left behind: end them (only this containerd's).
        for pid in self.shims() {
            // A process this test's containerd started.
            let _ = husk_tests::signal(pid, rustix::process::Signal::KILL);
        }
        // huskd's fixture deletes every VM it still has and stops the daemon.
        drop(self.huskd.take());
        if self.runs_pods.get() {
            // The pod namespaces CRI created and did not remove (their VMMs are gone: the
            // namespaces go with the mounts), and the pods' bridge.
            for name in self.new_pod_netns() {
                let _ = Command::new("ip")
                    .args(["netns", "del", &name])
                    .stderr(Stdio::null())
                    .status();
            }
            let _ = Command::new("ip")
                .args(["link", "del", BRIDGE])
                .stderr(Stdio::null())
                .status();
        }
        // Unmount whatever containerd left (the sandboxes' /dev/shm tmpfs, ...).
        for target in self.mounts().into_iter().rev() {
            let _ = Command::new("umount").arg("-l").arg(target).status();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The busybox test image's applets, with what the pod test needs besides.
fn busybox_applets() -> Vec<&'static str> {
    let mut applets = husk_tests::oci::APPLETS.to_vec();
    for extra in ["wget", "httpd", "mkdir", "hostname"] {
        if !applets.contains(&extra) {
            applets.push(extra);
        }
    }
    applets
}

/// containerd's configuration (version 2, containerd 1.6 key names): CRI on, the native
/// snapshotter, the husk runtime as CRI's default and as handler `husk`, the CNI network in
/// `DIR/cni/net.d`.
fn containerd_config(dir: &Path, socket: &Path) -> String {
    format!(
        r#"version = 2
root = "{root}"
state = "{state}"
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs"]

[grpc]
  address = "{sock}"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE}"
  disable_cgroup = true
  disable_apparmor = true
  restrict_oom_score_adj = true
  enable_selinux = false
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"

  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "native"
    default_runtime_name = "{HANDLER}"

    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.{HANDLER}]
      runtime_type = "{RUNTIME}"

  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{CNI_PLUGINS}"
    conf_dir = "{conf}"
    max_conf_num = 1
"#,
        root = dir.join("root").display(),
        state = dir.join("state").display(),
        sock = socket.display(),
        conf = dir.join("cni/net.d").display(),
    )
}

/// The pods' network: a bridge of this test's own (the gateway `SUBNET.1` on the node) and
/// host-local addresses from `SUBNET.0/24`, recorded under `DIR/cni/ipam`. (CRI adds the
/// loopback network itself.)
fn write_cni_config(dir: &Path) {
    let conf_dir = dir.join("cni/net.d");
    std::fs::create_dir_all(&conf_dir).unwrap();
    let conflist = format!(
        r#"{{
  "cniVersion": "0.4.0",
  "name": "{CNI_NETWORK}",
  "plugins": [
    {{
      "type": "bridge",
      "bridge": "{BRIDGE}",
      "isGateway": true,
      "ipMasq": false,
      "ipam": {{
        "type": "host-local",
        "subnet": "{SUBNET}.0/24",
        "dataDir": "{data}",
        "routes": [{{"dst": "0.0.0.0/0"}}]
      }}
    }}
  ]
}}
"#,
        data = dir.join("cni/ipam").display()
    );
    std::fs::write(conf_dir.join("10-husk-cri.conflist"), conflist).unwrap();
}

fn image_spec(image: &str) -> ImageSpec {
    ImageSpec {
        image: image.into(),
        ..Default::default()
    }
}

/// The names in /var/run/netns that CRI gives pods (`cni-*`).
fn pod_netns() -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(NETNS_DIR)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("cni-"))
        .collect();
    v.sort();
    v
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn interfaces() -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir("/sys/class/net")
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn process_alive(pid: u32) -> bool {
    // Zombies count as gone: their parent reaps them.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s.contains(") Z "))
        .unwrap_or(false)
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Waits up to `limit` for `done`; whether it came.
fn wait_until(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// An HTTP/1.0 GET of `/` at `addr` from this process (the node); the whole answer.
fn http_get(addr: std::net::SocketAddr) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(b"GET / HTTP/1.0\r\n\r\n").ok()?;
    let mut page = String::new();
    let _ = s.read_to_string(&mut page);
    Some(page)
}

/// The CRI plugin of the fixture's containerd is up and serves runtime.v1: Version names
/// containerd and the v1 API, both imported images are known without any registry, the
/// runtime and the pods' CNI network are ready, and there is no pod yet. (No guest is booted:
/// runs on any host with containerd and the CNI plugins.)
#[test]
fn the_cri_plugin_serves_v1_with_the_images_and_the_network_ready() {
    let cri = CriContainerd::start("svc");
    let mut rs = cri.runtime_client();
    let version = cri.call(
        "Version",
        CALL_LIMIT,
        rs.version(VersionRequest {
            version: "v1".into(),
        }),
    );
    assert_eq!(version.runtime_name, "containerd", "{version:?}");
    assert_eq!(version.runtime_api_version, "v1", "{version:?}");
    for image in [BUSYBOX, PAUSE] {
        let found = cri.image_status(image).expect("imported image");
        assert!(found.repo_tags.iter().any(|t| t == image), "{found:?}");
    }
    // NetworkReady comes once CRI has loaded the CNI configuration.
    let mut conditions = Vec::new();
    let ready = wait_until(Duration::from_secs(30), || {
        let status = cri.call(
            "Status",
            CALL_LIMIT,
            rs.status(StatusRequest { verbose: true }),
        );
        conditions = status.status.map(|s| s.conditions).unwrap_or_default();
        ["RuntimeReady", "NetworkReady"]
            .iter()
            .all(|want| conditions.iter().any(|c| c.r#type == *want && c.status))
    });
    assert!(ready, "CRI not ready: {conditions:?}\n{}", cri.logs());
    let pods = cri.call(
        "ListPodSandbox",
        CALL_LIMIT,
        rs.list_pod_sandbox(ListPodSandboxRequest { filter: None }),
    );
    assert!(pods.items.is_empty(), "{:?}", pods.items);
    assert_eq!(cri.vm_count(), 0);
}

/// What kubelet does for a pod of two containers (`web` serving HTTP on 8080, `client`
/// sleeping) that share an emptyDir volume: the pod is one VM; its containers reach each other
/// over 127.0.0.1, see each other's writes to the emptyDir but not each other's rootfs;
/// ExecSync reports exit codes; the node reaches the pod at its CNI address; a stopped
/// container leaves the pod running; stopping and removing the pod leaves nothing behind (VM,
/// shims, mounts, interfaces, network namespace, CNI address). Prints the timings a benchmark
/// scrapes (`CRI pod timings: ...`).
#[test]
#[ignore = "needs a guest-capable KVM: run through scripts/testbed"]
fn a_pod_is_one_vm_and_its_containers_share_localhost_and_an_empty_dir() {
    require_guest_kvm();
    let cri = CriContainerd::start("pod");
    cri.will_run_pods();
    let nets_before = interfaces();
    let mut rs = cri.runtime_client();

    // 1. Kubelet's start: the runtime's version, then whether the image is there (it would
    //    pull it otherwise; there is no registry here).
    let version = cri.call(
        "Version",
        CALL_LIMIT,
        rs.version(VersionRequest {
            version: "v1".into(),
        }),
    );
    assert_eq!(version.runtime_api_version, "v1", "{version:?}");
    assert!(
        cri.image_status(BUSYBOX).is_some(),
        "ImageStatus: no {BUSYBOX}\n{}",
        cri.logs()
    );

    // 2. The pod sandbox: its VM boots here.
    let uid = format!("0c3d5e7a-husk-cri-{}", std::process::id());
    let pod_name = "husk-pod";
    let namespace = "default";
    let log_dir = cri
        .dir
        .join("pod-logs")
        .join(format!("{namespace}_{pod_name}_{uid}"));
    std::fs::create_dir_all(&log_dir).unwrap();
    let labels: HashMap<String, String> = [
        ("io.kubernetes.pod.name", pod_name),
        ("io.kubernetes.pod.namespace", namespace),
        ("io.kubernetes.pod.uid", uid.as_str()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let pod_config = PodSandboxConfig {
        metadata: Some(PodSandboxMetadata {
            name: pod_name.into(),
            uid: uid.clone(),
            namespace: namespace.into(),
            attempt: 0,
        }),
        hostname: pod_name.into(),
        log_directory: log_dir.display().to_string(),
        labels: labels.clone(),
        linux: Some(LinuxPodSandboxConfig {
            security_context: Some(LinuxSandboxSecurityContext {
                namespace_options: Some(NamespaceOption {
                    network: NamespaceMode::Pod as i32,
                    pid: NamespaceMode::Container as i32,
                    ipc: NamespaceMode::Pod as i32,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    let t_pod = Instant::now();
    let pod = cri
        .call(
            "RunPodSandbox",
            BOOT_LIMIT,
            rs.run_pod_sandbox(RunPodSandboxRequest {
                config: Some(pod_config.clone()),
                runtime_handler: HANDLER.into(),
            }),
        )
        .pod_sandbox_id;
    let run_pod_sandbox = t_pod.elapsed();

    // 3. The emptyDir, where kubelet makes it.
    let empty_dir = cri
        .dir
        .join("kubelet/pods")
        .join(&uid)
        .join("volumes/kubernetes.io~empty-dir/shared");
    std::fs::create_dir_all(&empty_dir).unwrap();

    // A container as kubelet asks for one: its log directory made, the pod's config along.
    let container_config = |name: &str, command: &[&str]| {
        std::fs::create_dir_all(log_dir.join(name)).unwrap();
        let mut labels = labels.clone();
        labels.insert("io.kubernetes.container.name".into(), name.into());
        ContainerConfig {
            metadata: Some(ContainerMetadata {
                name: name.into(),
                attempt: 0,
            }),
            image: Some(image_spec(BUSYBOX)),
            command: command.iter().map(|s| s.to_string()).collect(),
            envs: vec![KeyValue {
                key: "POD_NAME".into(),
                value: pod_name.into(),
            }],
            mounts: vec![Mount {
                container_path: "/shared".into(),
                host_path: empty_dir.display().to_string(),
                ..Default::default()
            }],
            labels,
            log_path: format!("{name}/0.log"),
            linux: Some(LinuxContainerConfig {
                resources: Some(LinuxContainerResources::default()),
                security_context: Some(LinuxContainerSecurityContext {
                    namespace_options: Some(NamespaceOption {
                        network: NamespaceMode::Pod as i32,
                        pid: NamespaceMode::Container as i32,
                        ipc: NamespaceMode::Pod as i32,
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
            }),
            ..Default::default()
        }
    };
    // Create and start: the container's id.
    let create_and_start = |rs: &mut RuntimeServiceClient<Channel>, config: ContainerConfig| {
        let name = config.metadata.as_ref().unwrap().name.clone();
        let id = cri
            .call(
                &format!("CreateContainer({name})"),
                BOOT_LIMIT,
                rs.create_container(CreateContainerRequest {
                    pod_sandbox_id: pod.clone(),
                    config: Some(config),
                    sandbox_config: Some(pod_config.clone()),
                }),
            )
            .container_id;
        cri.call(
            &format!("StartContainer({name})"),
            BOOT_LIMIT,
            rs.start_container(StartContainerRequest {
                container_id: id.clone(),
            }),
        );
        id
    };

    // 4. "web": writes the emptyDir and its own page, then serves the page on 8080.
    let t_web = Instant::now();
    let web = create_and_start(
        &mut rs,
        container_config(
            "web",
            &[
                "sh",
                "-c",
                "mkdir -p /www && echo pod-http-ok > /www/index.html && \
                 echo from-web > /shared/hello && echo web-started && \
                 exec httpd -f -p 8080 -h /www",
            ],
        ),
    );
    let web_start = t_web.elapsed();
    let pod_start = t_pod.elapsed();

    // 5. "client": the pod's second container.
    let t_client = Instant::now();
    let client = create_and_start(&mut rs, container_config("client", &["sleep", "3600"]));
    let second_container = t_client.elapsed();
    // Straight to stderr, past the test harness's capture: a benchmark scrapes this line.
    {
        use std::io::Write;
        let _ = writeln!(
            std::io::stderr(),
            "CRI pod timings: run_pod_sandbox={}ms pod_start(first container running)={}ms \
             first_container={}ms second_container={}ms",
            run_pod_sandbox.as_millis(),
            pod_start.as_millis(),
            web_start.as_millis(),
            second_container.as_millis()
        );
    }

    // 6. The pod is one VM.
    let vms = {
        let huskd = cri.huskd();
        let mut c = huskd.client();
        huskd
            .block_on(c.list_vms(ListVmsRequest::default()))
            .unwrap()
            .into_inner()
            .vms
    };
    assert_eq!(
        vms.len(),
        1,
        "a pod of a sandbox and two containers must be one VM: {:?}\n{}",
        vms.iter().map(|v| &v.id).collect::<Vec<_>>(),
        cri.logs()
    );

    // 7. Container to container over localhost (httpd may still be starting).
    let mut last = None;
    let served = wait_until(Duration::from_secs(30), || {
        let r = cri.exec_sync(&client, &["wget", "-qO-", "http://127.0.0.1:8080/"]);
        let ok = r.exit_code == 0 && text(&r.stdout).contains("pod-http-ok");
        last = Some(r);
        ok
    });
    assert!(
        served,
        "client did not get web's page over 127.0.0.1:8080: {last:?}\n{}",
        cri.logs()
    );
    // The emptyDir is the pod's: web's write is in client's view of it.
    let r = cri.exec_sync(&client, &["cat", "/shared/hello"]);
    assert_eq!(
        (r.exit_code, text(&r.stdout).trim()),
        (0, "from-web"),
        "emptyDir not shared: stderr {}\n{}",
        text(&r.stderr),
        cri.logs()
    );
    // Each container has its own rootfs: web's /www is not client's.
    let r = cri.exec_sync(&client, &["cat", "/www/index.html"]);
    assert_ne!(
        r.exit_code,
        0,
        "client sees web's rootfs: {}",
        text(&r.stdout)
    );
    // For the record (not asserted): the pod's hostname as its containers see it.
    let h = cri.exec_sync(&client, &["hostname"]);
    let e = cri.exec_sync(&client, &["cat", "/etc/hostname"]);
    eprintln!(
        "client: hostname {:?} (exit {}), /etc/hostname {:?} (exit {})",
        text(&h.stdout).trim(),
        h.exit_code,
        text(&e.stdout).trim(),
        e.exit_code
    );
    // web's stdout reached its CRI log file.
    let web_log = log_dir.join("web/0.log");
    assert!(
        wait_until(Duration::from_secs(10), || std::fs::read_to_string(
            &web_log
        )
        .unwrap_or_default()
        .contains("web-started")),
        "web's output is not in {}: {:?}\n{}",
        web_log.display(),
        std::fs::read_to_string(&web_log),
        cri.logs()
    );

    // 8. ExecSync reports the exit code.
    let r = cri.exec_sync(&client, &["sh", "-c", "exit 3"]);
    assert_eq!(r.exit_code, 3, "{r:?}\n{}", cri.logs());

    // 9. Status as kubelet reads it; the node reaches the pod at its CNI address.
    assert_eq!(
        cri.container_state(&web),
        ContainerState::ContainerRunning as i32,
        "{}",
        cri.logs()
    );
    let status = cri
        .call(
            "PodSandboxStatus",
            CALL_LIMIT,
            rs.pod_sandbox_status(PodSandboxStatusRequest {
                pod_sandbox_id: pod.clone(),
                verbose: false,
            }),
        )
        .status
        .expect("PodSandboxStatus without a status");
    assert_eq!(
        status.state,
        PodSandboxState::SandboxReady as i32,
        "{status:?}"
    );
    let ip: Ipv4Addr = status
        .network
        .as_ref()
        .map(|n| n.ip.clone())
        .unwrap_or_default()
        .parse()
        .unwrap_or_else(|e| panic!("the pod has no IPv4 address ({e}): {status:?}"));
    assert!(
        ip.to_string().starts_with(&format!("{SUBNET}.")),
        "the pod's address {ip} is not in {SUBNET}.0/24"
    );
    let mut page = None;
    let reached = wait_until(Duration::from_secs(30), || {
        page = http_get((ip, 8080).into());
        page.as_deref().is_some_and(|p| p.contains("pod-http-ok"))
    });
    assert!(
        reached,
        "the node did not get the page from {ip}:8080: {page:?}\n{}",
        cri.logs()
    );

    // 10. A container stops; the pod goes on.
    cri.call(
        "StopContainer(client)",
        CALL_LIMIT,
        rs.stop_container(StopContainerRequest {
            container_id: client.clone(),
            timeout: 10,
        }),
    );
    assert_eq!(
        cri.container_state(&client),
        ContainerState::ContainerExited as i32,
        "{}",
        cri.logs()
    );
    let r = cri.exec_sync(&web, &["cat", "/shared/hello"]);
    assert_eq!(
        (r.exit_code, text(&r.stdout).trim()),
        (0, "from-web"),
        "the pod after client's stop: stderr {}\n{}",
        text(&r.stderr),
        cri.logs()
    );
    assert_eq!(cri.vm_count(), 1, "{}", cri.logs());
    cri.call(
        "RemoveContainer(client)",
        CALL_LIMIT,
        rs.remove_container(RemoveContainerRequest {
            container_id: client.clone(),
        }),
    );

    // 11. The pod goes: StopPodSandbox stops web, RemovePodSandbox removes it.
    cri.call(
        "StopPodSandbox",
        BOOT_LIMIT,
        rs.stop_pod_sandbox(StopPodSandboxRequest {
            pod_sandbox_id: pod.clone(),
        }),
    );
    cri.call(
        "RemovePodSandbox",
        BOOT_LIMIT,
        rs.remove_pod_sandbox(RemovePodSandboxRequest {
            pod_sandbox_id: pod.clone(),
        }),
    );
    let containers = cri.call(
        "ListContainers",
        CALL_LIMIT,
        rs.list_containers(ListContainersRequest { filter: None }),
    );
    assert!(
        containers.containers.is_empty(),
        "containers left: {:?}",
        containers.containers
    );
    let pods = cri.call(
        "ListPodSandbox",
        CALL_LIMIT,
        rs.list_pod_sandbox(ListPodSandboxRequest { filter: None }),
    );
    assert!(pods.items.is_empty(), "pods left: {:?}", pods.items);

    // Nothing is left.
    assert!(
        wait_until(Duration::from_secs(20), || cri.vm_count() == 0),
        "VMs left: {}\n{}",
        cri.vm_count(),
        cri.logs()
    );
    assert!(
        wait_until(Duration::from_secs(20), || cri.shims().is_empty()),
        "shims still running: {:?}\n{}",
        cri.shims(),
        cri.logs()
    );
    assert!(
        wait_until(Duration::from_secs(20), || cri.vmms().is_empty()),
        "VMMs still running: {:?}",
        cri.vmms()
    );
    assert_eq!(cri.mounts(), Vec::<String>::new(), "mounts left");
    assert_eq!(cri.new_pod_netns(), Vec::<String>::new(), "netns left");
    // The veth's host end goes with the namespace (a moment after the VMM's end); the bridge
    // stays, as the CNI bridge plugin leaves it.
    let new_interfaces = || -> Vec<String> {
        interfaces()
            .into_iter()
            .filter(|i| !nets_before.contains(i) && i != BRIDGE)
            .collect()
    };
    assert!(
        wait_until(Duration::from_secs(20), || new_interfaces().is_empty()),
        "interfaces left: {:?}",
        new_interfaces()
    );
    let addresses: Vec<String> = std::fs::read_dir(cri.ipam_dir())
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        !addresses.contains(&ip.to_string()),
        "the pod's address {ip} is still allocated: {addresses:?}"
    );
    assert_eq!(cri.leftover_images(), Vec::<PathBuf>::new());
}
