//! A containerd with its CRI plugin on (Debian's containerd 1.6), a CNI bridge network of its
//! own and the huskd its containerd-shim-husk-v2 shims use, driven through CRI (runtime.v1)
//! as kubelet drives it, with the `k8s-cri` client: the fixture of tests/tests/cri_pods.rs.
//!
//! [`CriContainerd::start`] starts huskd and containerd in a temporary directory (root, state
//! and socket of their own; the native snapshotter, since the testbed's root is an overlay),
//! and imports a busybox image and a pause image that it builds itself (no registry) into
//! CRI's namespace `k8s.io`.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::{
    ContainerConfig, ContainerStatusRequest, CreateContainerRequest, ExecSyncRequest,
    ExecSyncResponse, ImageSpec, ImageStatusRequest, PodSandboxConfig, RunPodSandboxRequest,
    StartContainerRequest, VersionRequest, VersionResponse,
};
use tonic::transport::{Channel, Endpoint, Uri};

use crate::containerd::{self, CNI_PLUGINS, RUNTIME};
use crate::huskd::Huskd;
use crate::{bin, Finished};

/// The busybox image the fixture imports.
pub const BUSYBOX: &str = "docker.io/library/husk-busybox:test";
/// The pause image the fixture imports, CRI's sandbox image.
pub const PAUSE: &str = "docker.io/library/husk-pause:test";
/// The CRI runtime handler (a RuntimeClass's `handler`) configured for the husk shim.
pub const HANDLER: &str = "husk";
/// The pods' CNI network: its bridge on the node and its /24 (`SUBNET.0/24`, gateway `.1`).
pub const BRIDGE: &str = "huskcri0";
pub const SUBNET: &str = "10.99.40";
const CNI_NETWORK: &str = "husk-cri";
/// Where containerd 1.6's CRI puts the pods' network namespaces (netns_mounts_under_state_dir
/// false, its default).
const NETNS_DIR: &str = "/var/run/netns";
/// CRI calls that may boot a guest (nested emulation: 5-15 s, sometimes much more).
pub const BOOT_LIMIT: Duration = Duration::from_secs(300);
/// Every other CRI call.
pub const CALL_LIMIT: Duration = Duration::from_secs(60);

/// A containerd with the CRI plugin on, its CNI network, the huskd its shims use and a CRI
/// client. Dropping it ends everything it started, even after a failed assertion.
pub struct CriContainerd {
    /// The fixture's directory: containerd's root, state, socket and log, the shims' images,
    /// the CNI configuration; removed on drop.
    pub dir: PathBuf,
    /// containerd's socket.
    pub socket: PathBuf,
    child: Option<Child>,
    /// An Option so that Drop can end huskd (and its VMs) before it removes namespaces and
    /// links.
    huskd: Option<Huskd>,
    runtime: tokio::runtime::Runtime,
    channel: Channel,
    /// The pod network namespaces (`/var/run/netns/cni-*`) that existed before this fixture.
    netns_before: Vec<String>,
    /// Whether this fixture runs pods (see [`CriContainerd::will_run_pods`]).
    runs_pods: std::cell::Cell<bool>,
}

impl CriContainerd {
    /// Starts huskd and containerd in /tmp/husk-cri-TAG-PID (fresh), imports the busybox and the
    /// pause image into `k8s.io` and waits until CRI knows both.
    pub fn start(tag: &str) -> Self {
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
        let child =
            containerd::spawn_containerd(&dir, &format!("unix://{}", huskd.socket.display()));
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
        containerd::wait_for_containerd(&me.socket, "k8s.io", || me.logs());
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

    /// Marks this fixture as one that runs pods: only then does its drop remove new pod
    /// namespaces and the bridge (a fixture that runs none leaves those of a test beside it
    /// alone).
    pub fn will_run_pods(&self) {
        self.runs_pods.set(true);
    }

    /// The huskd behind the shims.
    pub fn huskd(&self) -> &Huskd {
        self.huskd.as_ref().expect("huskd runs until drop")
    }

    /// containerd's log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("containerd.log")).unwrap_or_default()
    }

    /// Both daemons' logs, for failure messages.
    pub fn logs(&self) -> String {
        format!(
            "containerd log (tail):\n{}\nhuskd log (tail):\n{}",
            containerd::tail(&self.log(), 80),
            containerd::tail(&self.huskd.as_ref().map(Huskd::log).unwrap_or_default(), 40)
        )
    }

    /// `ctr` in CRI's namespace `k8s.io`.
    pub fn ctr(&self, args: &[&str]) -> Finished {
        containerd::ctr(&self.socket, "k8s.io", args)
    }

    /// Builds the image `name` (config Cmd `cmd`, busybox `applets`) in `DIR/subdir` and imports
    /// it with the native snapshotter.
    fn import_image(&self, subdir: &str, name: &str, cmd: &[&str], applets: &[&str]) {
        let tar = crate::oci::build_oci_image_with(&self.dir.join(subdir), name, cmd, applets);
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

    /// A client of CRI's RuntimeService.
    pub fn runtime_client(&self) -> RuntimeServiceClient<Channel> {
        RuntimeServiceClient::new(self.channel.clone())
    }

    /// A client of CRI's ImageService.
    pub fn image_client(&self) -> ImageServiceClient<Channel> {
        ImageServiceClient::new(self.channel.clone())
    }

    /// Runs one CRI call within `limit`; its answer, or a panic that names the call and shows
    /// both daemons' logs.
    pub fn call<T>(
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

    /// CRI Version, asked as kubelet asks (API version v1).
    pub fn version(&self) -> VersionResponse {
        let mut rs = self.runtime_client();
        self.call(
            "Version",
            CALL_LIMIT,
            rs.version(VersionRequest {
                version: "v1".into(),
            }),
        )
    }

    /// CRI ImageStatus: the image, if CRI has it.
    pub fn image_status(&self, image: &str) -> Option<k8s_cri::v1::Image> {
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
    /// RunPodSandbox of `config` with runtime handler `handler` (a RuntimeClass's); the pod's
    /// id.
    pub fn run_pod(&self, config: &PodSandboxConfig, handler: &str) -> String {
        let mut rs = self.runtime_client();
        self.call(
            "RunPodSandbox",
            BOOT_LIMIT,
            rs.run_pod_sandbox(RunPodSandboxRequest {
                config: Some(config.clone()),
                runtime_handler: handler.into(),
            }),
        )
        .pod_sandbox_id
    }

    /// CreateContainer then StartContainer of `config` in pod `pod` (created from
    /// `pod_config`), as kubelet does; the container's id.
    pub fn create_and_start(
        &self,
        pod: &str,
        pod_config: &PodSandboxConfig,
        config: ContainerConfig,
    ) -> String {
        let mut rs = self.runtime_client();
        let name = config
            .metadata
            .as_ref()
            .map(|m| m.name.clone())
            .unwrap_or_default();
        let id = self
            .call(
                &format!("CreateContainer({name})"),
                BOOT_LIMIT,
                rs.create_container(CreateContainerRequest {
                    pod_sandbox_id: pod.into(),
                    config: Some(config),
                    sandbox_config: Some(pod_config.clone()),
                }),
            )
            .container_id;
        self.call(
            &format!("StartContainer({name})"),
            BOOT_LIMIT,
            rs.start_container(StartContainerRequest {
                container_id: id.clone(),
            }),
        );
        id
    }

    pub fn exec_sync(&self, container: &str, cmd: &[&str]) -> ExecSyncResponse {
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

    /// A container's state (a [`k8s_cri::v1::ContainerState`]) as ContainerStatus reports it.
    pub fn container_state(&self, container: &str) -> i32 {
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

    /// How many VMs the fixture's huskd has.
    pub fn vm_count(&self) -> usize {
        containerd::vm_count(self.huskd())
    }

    /// PIDs of the live shims of this containerd.
    pub fn shims(&self) -> Vec<i32> {
        containerd::shim_pids(&self.socket)
    }

    /// Live husk-vmm processes of this fixture's huskd (their command lines name its
    /// directory).
    pub fn vmms(&self) -> Vec<u32> {
        let Some(huskd) = self.huskd.as_ref() else {
            return Vec::new();
        };
        let huskd_dir = huskd.dir.to_string_lossy();
        containerd::live_pids_where(|cmdline| {
            // The VMM itself (argv[0]), not huskd, whose `--vmm` argument names it too.
            let argv0 = cmdline.split('\0').next().unwrap_or_default();
            argv0.ends_with("husk-vmm") && cmdline.contains(&*huskd_dir)
        })
    }

    /// Mount points below the fixture's directory.
    pub fn mounts(&self) -> Vec<String> {
        containerd::mounts_below(&self.dir)
    }

    /// Pod network namespaces that this fixture's CRI created (not there before it started).
    pub fn new_pod_netns(&self) -> Vec<String> {
        pod_netns()
            .into_iter()
            .filter(|n| !self.netns_before.contains(n))
            .collect()
    }

    /// host-local's directory of the pods' network: a file per address in use.
    pub fn ipam_dir(&self) -> PathBuf {
        self.dir.join("cni/ipam").join(CNI_NETWORK)
    }

    /// Per-container image files the shims left under HUSK_SHIM_STATE_DIR (the shared bases
    /// stay by design).
    pub fn leftover_images(&self) -> Vec<PathBuf> {
        containerd::leftover_images(&self.dir.join("images"))
    }
}

impl Drop for CriContainerd {
    fn drop(&mut self) {
        // With the shims of pods a failed test left behind (only this containerd's).
        containerd::stop_containerd(self.child.take(), &self.socket);
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
        containerd::unmount_below(&self.dir);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The busybox test image's applets, with what the pod test needs besides.
fn busybox_applets() -> Vec<&'static str> {
    let mut applets = crate::oci::APPLETS.to_vec();
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

    # runc beside it: the peer of the pods benchmark (scripts/bench-containerd).
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"

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

/// A CRI image reference to `image`.
pub fn image_spec(image: &str) -> ImageSpec {
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

/// Bytes as text (lossy), as CRI answers carry output.
pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// An HTTP/1.0 GET of `/` at `addr` from this process (the node); the whole answer.
pub fn http_get(addr: std::net::SocketAddr) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(b"GET / HTTP/1.0\r\n\r\n").ok()?;
    let mut page = String::new();
    let _ = s.read_to_string(&mut page);
    Some(page)
}
