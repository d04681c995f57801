//! A huskd for one test: its own socket and state directory, a gRPC client, and the `husk`
//! CLI pointed at it. Dropping it deletes every VM (forced) and stops the daemon.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use husk_proto::v1::husk_client::HuskClient;
use husk_proto::v1::{DeleteVmRequest, GetVmRequest, ListVmsRequest, Vm, VmState};
use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::{bin, run_with_timeout, Finished};

pub struct Huskd {
    pub dir: PathBuf,
    pub socket: PathBuf,
    pub extra_args: Vec<String>,
    child: Option<Child>,
    pub runtime: tokio::runtime::Runtime,
}

impl Huskd {
    /// Starts huskd with a fresh state directory under /tmp, named after `tag`. The daemon may
    /// open files below that directory (`--allow-path`): tests put their disks, kernels and
    /// snapshots there.
    pub fn start(tag: &str, extra_args: &[&str]) -> Self {
        let dir = PathBuf::from(format!("/tmp/husk-test-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let mut daemon = Self {
            socket: dir.join("huskd.sock"),
            dir,
            extra_args: extra_args.iter().map(|s| s.to_string()).collect(),
            child: None,
            runtime,
        };
        daemon.restart();
        daemon
    }

    /// A daemon whose default kernel is plain text, so that every VMM it starts fails at once,
    /// after huskd has done all its own work around it: for tests of huskd that need no guest.
    /// The kernel and initrd lie in a directory of their own, outside the fixture's.
    pub fn start_with_broken_kernel(tag: &str, extra_args: &[&str]) -> Self {
        let files = PathBuf::from(format!("/tmp/husk-test-files-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&files).unwrap();
        std::fs::write(files.join("not-a-kernel"), b"plain text, not a kernel").unwrap();
        std::fs::write(files.join("initrd"), b"").unwrap();
        let kernel = files.join("not-a-kernel").display().to_string();
        let initrd = files.join("initrd").display().to_string();
        let vmm = bin("husk-vmm").display().to_string();
        let mut args = vec!["--kernel", &kernel, "--initrd", &initrd, "--vmm", &vmm];
        args.extend_from_slice(extra_args);
        Self::start(tag, &args)
    }

    /// (Re)starts the daemon process on the same state directory and waits for its socket.
    pub fn restart(&mut self) {
        self.kill_daemon();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("huskd.log"))
            .unwrap();
        let child = Command::new(bin("huskd"))
            .arg("--socket")
            .arg(&self.socket)
            .arg("--state-dir")
            .arg(self.dir.join("state"))
            .arg("--allow-path")
            .arg(&self.dir)
            .args(&self.extra_args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::os::unix::net::UnixStream::connect(&self.socket).is_err() {
            assert!(
                Instant::now() < deadline,
                "huskd did not listen within 20 s; its log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the daemon process only (its VMs keep running).
    pub fn kill_daemon(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("huskd.log")).unwrap_or_default()
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.join("state")
    }

    /// A new gRPC client connected over the Unix socket.
    pub fn client(&self) -> HuskClient<Channel> {
        HuskClient::new(self.channel())
    }

    /// A new gRPC channel to the daemon (for other services: health, reflection).
    pub fn channel(&self) -> Channel {
        let path = self.socket.clone();
        let channel = self
            .runtime
            .block_on(
                Endpoint::from_static("http://huskd.test").connect_with_connector(
                    tower::service_fn(move |_: Uri| {
                        let path = path.clone();
                        async move {
                            let stream = tokio::net::UnixStream::connect(&path).await?;
                            Ok::<_, std::io::Error>(TokioIo::new(stream))
                        }
                    }),
                ),
            )
            .unwrap();
        channel
    }

    /// Runs a future on this fixture's runtime.
    pub fn block_on<F: std::future::Future>(&self, future: F) -> F::Output {
        self.runtime.block_on(future)
    }

    /// Runs the `husk` CLI against this daemon.
    pub fn husk(&self, args: &[&str]) -> Finished {
        run_with_timeout(
            Command::new(bin("husk"))
                .arg("--host")
                .arg(format!("unix://{}", self.socket.display()))
                .args(args),
            Duration::from_secs(120),
        )
    }

    /// Runs `sh -c script` in the VM through `husk exec`; its stdout (panics unless it exits 0).
    pub fn sh(&self, vm: &str, script: &str) -> String {
        let out = self.husk(&["exec", vm, "sh", "-c", script]);
        assert_eq!(
            out.code(),
            Some(0),
            "{script}: {}{}",
            out.stdout(),
            out.stderr()
        );
        out.stdout()
    }

    pub fn get(&self, vm: &str) -> Vm {
        let mut client = self.client();
        self.block_on(client.get_vm(GetVmRequest { vm: vm.into() }))
            .unwrap()
            .into_inner()
    }

    /// Waits until the VM reaches `state` (panics with the VM and the log after `limit`).
    pub fn wait_state(&self, vm: &str, state: VmState, limit: Duration) -> Vm {
        let deadline = Instant::now() + limit;
        loop {
            let got = self.get(vm);
            if got.state == state as i32 {
                return got;
            }
            assert!(
                Instant::now() < deadline,
                "VM {vm} not {state:?} within {limit:?}: {got:?}\nhuskd log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until the VM's guest agent answered.
    pub fn wait_agent(&self, vm: &str, limit: Duration) -> Vm {
        let deadline = Instant::now() + limit;
        loop {
            let got = self.get(vm);
            if got.status.as_ref().is_some_and(|s| s.agent_ready) {
                return got;
            }
            assert!(
                Instant::now() < deadline && got.state == VmState::Running as i32,
                "agent of VM {vm} not ready within {limit:?}: {got:?}\nconsole:\n{}\nhuskd log:\n{}",
                self.console(&got),
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn console(&self, vm: &Vm) -> String {
        vm.status
            .as_ref()
            .map(|s| std::fs::read_to_string(&s.console_log).unwrap_or_default())
            .unwrap_or_default()
    }

    /// The per-VM directory of huskd's state.
    pub fn vm_dir(&self, id: &str) -> PathBuf {
        self.state_dir().join("vms").join(id)
    }
}

impl Drop for Huskd {
    fn drop(&mut self) {
        if self.child.is_some() {
            let mut client = self.client();
            let vms = self
                .block_on(client.list_vms(ListVmsRequest::default()))
                .map(|r| r.into_inner().vms)
                .unwrap_or_default();
            for vm in vms {
                let request = DeleteVmRequest {
                    vm: vm.id,
                    force: true,
                };
                let _ = self.block_on(client.delete_vm(request));
            }
        }
        self.kill_daemon();
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Whether a network interface exists.
pub fn interface_exists(name: &str) -> bool {
    !name.is_empty() && Path::new("/sys/class/net").join(name).exists()
}
