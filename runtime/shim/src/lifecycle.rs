//! The three ways containerd runs the shim binary: `start`, `delete`, and serve.
//!
//! `start` (containerd 1.6, runtime v2): binds the ttrpc socket, spawns the long-lived shim
//! (this binary, no action, the listening socket as fd 3, its own session so that it outlives
//! containerd restarts), writes the address to `address` in the bundle, prints it, and exits.
//! A second `start` for the same container finds the socket answering and prints it again.

use std::io::Write;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;

use containerd_shim_protos::api::DeleteResponse;
use containerd_shim_protos::protobuf::Message;
use containerd_shim_protos::shim_async::{create_task, Task};
use containerd_shim_protos::ttrpc::asynchronous::Server;
use rustix::fs::OFlags;

use crate::args::ShimArgs;
use crate::events::{timestamp, Publisher};
use crate::huskd;
use crate::rootfs;
use crate::service::{Service, RECORD_FILE};

/// The fd on which the long-lived shim inherits its listening socket.
const LISTENER_FD: i32 = 3;

/// Why `start`, `delete` or serving failed (containerd shows the message).
#[derive(Debug, thiserror::Error)]
pub enum LifecycleError {
    #[error("creating {path}")]
    SocketDir {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot listen on {path}")]
    Listen {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("own executable")]
    OwnExe(#[source] std::io::Error),
    #[error("cannot spawn the shim")]
    Spawn(#[source] std::io::Error),
    #[error("writing the address file")]
    AddressFile(#[source] std::io::Error),
    #[error("writing to containerd (stdout)")]
    Stdout(#[source] std::io::Error),
    #[error("async runtime")]
    Runtime(#[source] std::io::Error),
    #[error("encoding the DeleteResponse")]
    Encode(#[source] containerd_shim_protos::protobuf::Error),
    #[error("ttrpc {what}")]
    Ttrpc {
        what: &'static str,
        #[source]
        source: containerd_shim_protos::ttrpc::Error,
    },
    #[error("SIGTERM handler")]
    Signal(#[source] std::io::Error),
    #[error("pruning the base images in {path}")]
    Prune {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// The container whose shim serves this one: the pod's sandbox for the containers of a
/// Kubernetes pod (CRI annotations in the bundle's config.json), so that one shim (and one VM)
/// serves the whole pod; the container itself otherwise, or when its config cannot be read.
pub fn group_id(args: &ShimArgs) -> String {
    match crate::oci::Spec::load(&args.bundle).map(|s| s.pod_role(&args.id)) {
        Ok(crate::oci::PodRole::Member { sandbox }) => sandbox,
        _ => args.id.clone(),
    }
}

/// The shim's socket: `<containerd's socket dir>/s/husk-<hash>.sock`, where containerd keeps
/// its own shims' sockets (`/run/containerd/s` by default); short enough for sun_path. One
/// per [`group_id`].
pub fn socket_path(args: &ShimArgs) -> PathBuf {
    socket_path_for(args, &group_id(args))
}

fn socket_path_for(args: &ShimArgs, group: &str) -> PathBuf {
    let dir = Path::new(&args.address)
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("/run/containerd"))
        .join("s");
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in format!("{}\0{}\0{group}", args.address, args.namespace).bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    dir.join(format!("husk-{h:016x}.sock"))
}

pub fn start(args: &ShimArgs) -> Result<(), LifecycleError> {
    let path = socket_path(args);
    let address = format!("unix://{}", path.display());
    if std::os::unix::net::UnixStream::connect(&path).is_ok() {
        // A shim for this container already serves (containerd retried start), or this is a
        // container of a pod whose sandbox's shim serves the pod.
        std::fs::write(args.bundle.join("address"), &address)
            .map_err(LifecycleError::AddressFile)?;
        print!("{address}");
        return std::io::stdout().flush().map_err(LifecycleError::Stdout);
    }
    let _ = std::fs::remove_file(&path);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|source| LifecycleError::SocketDir {
            path: dir.display().to_string(),
            source,
        })?;
    }
    let listener =
        std::os::unix::net::UnixListener::bind(&path).map_err(|source| LifecycleError::Listen {
            path: path.display().to_string(),
            source,
        })?;
    let exe = std::env::current_exe().map_err(LifecycleError::OwnExe)?;
    // containerd 1.6 reads the shim's log from the `log` FIFO in the bundle; read-write so the
    // open never blocks.
    let log = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(OFlags::NONBLOCK.bits() as i32)
        .open(args.bundle.join("log"))
        .ok()
        .map(|f| {
            // Clear O_NONBLOCK so that the shim's log writes wait, not fail.
            let _ = rustix::fs::fcntl_setfl(&f, OFlags::empty());
            Stdio::from(f)
        })
        .unwrap_or_else(Stdio::null);
    let fd = listener.as_raw_fd();
    let mut cmd = Command::new(exe);
    cmd.args(args.serve_args())
        .current_dir(&args.bundle)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log);
    // SAFETY: runs in the child between fork and exec; fcntl, dup2 and setsid are
    // async-signal-safe and use only the fd number copied before the fork, which is still
    // open there (FD_CLOEXEC acts at exec).
    unsafe {
        cmd.pre_exec(move || {
            // SAFETY: `fd` is the listener, open in the child until exec (see above).
            let listener = BorrowedFd::borrow_raw(fd);
            if fd == LISTENER_FD {
                // dup2 onto itself keeps FD_CLOEXEC: clear it by hand in that case.
                rustix::io::fcntl_setfd(listener, rustix::io::FdFlags::empty())?;
            } else if libc::dup2(fd, LISTENER_FD) < 0 {
                // rustix's dup2 wants the target as an OwnedFd, and fd 3 is not ours (it may
                // not even be open): this one call stays raw.
                return Err(std::io::Error::last_os_error());
            }
            let _ = rustix::process::setsid();
            Ok(())
        });
    }
    let child = cmd.spawn().map_err(LifecycleError::Spawn)?;
    drop(listener);
    std::fs::write(args.bundle.join("address"), &address).map_err(LifecycleError::AddressFile)?;
    // The child is not waited for: it is the long-lived shim (reparented once we exit).
    let _ = child.id();
    print!("{address}");
    std::io::stdout().flush().map_err(LifecycleError::Stdout)
}

/// `delete`: containerd cleans up after a shim that is gone. Removes the VM and the rootfs
/// image named in the bundle's record (the container's own copy; a shared base stays for the
/// image's other containers), and prints a DeleteResponse (status 137, as a killed process).
pub fn delete(args: &ShimArgs) -> Result<(), LifecycleError> {
    let record = std::fs::read_to_string(args.bundle.join(RECORD_FILE)).unwrap_or_default();
    let mut lines = record.lines();
    let vm = lines.next().map(str::to_string);
    let image = lines.next().filter(|l| !l.is_empty()).map(PathBuf::from);
    let _shared_base = lines.next();
    // A container of a pod leaves its pod's VM; any other container takes its VM with it.
    let in_pod = lines.next().filter(|l| !l.is_empty()).map(str::to_string);
    if let Some(vm) = vm {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(LifecycleError::Runtime)?;
        runtime.block_on(async {
            match huskd::connect(&huskd::host()).await {
                Ok(mut c) => match &in_pod {
                    Some(id) => {
                        if let Err(e) = crate::service::remove_from_pod(&mut c, &vm, id).await {
                            tracing::warn!(vm, "delete: removing container {id} from the VM: {e}");
                        }
                    }
                    None => {
                        if let Err(e) = huskd::delete_vm(&mut c, &vm).await {
                            tracing::warn!(vm, "delete: removing the VM: {e}");
                        }
                    }
                },
                Err(e) => tracing::warn!(vm, "delete: {e}"),
            }
        });
    }
    rootfs::cleanup(&args.bundle, image.as_deref());
    if let Some(dir) = image.as_deref().and_then(Path::parent) {
        let _ = std::fs::remove_dir(dir);
    }
    let _ = std::fs::remove_file(args.bundle.join(RECORD_FILE));
    if in_pod.is_none() {
        // A pod container's socket is its sandbox's shim's.
        let _ = std::fs::remove_file(socket_path(args));
    }
    let mut r = DeleteResponse::new();
    r.exit_status = 128 + rustix::process::Signal::KILL.as_raw() as u32;
    r.exited_at = timestamp(std::time::SystemTime::now());
    let bytes = r.write_to_bytes().map_err(LifecycleError::Encode)?;
    std::io::stdout()
        .write_all(&bytes)
        .and_then(|()| std::io::stdout().flush())
        .map_err(LifecycleError::Stdout)
}

/// `prune-bases` (run by an operator, never by containerd): removes the shared base images that
/// no live container uses (see [`crate::base::prune`]); prints each removed path.
pub fn prune_bases() -> Result<(), LifecycleError> {
    let cache = crate::base::cache_dir(&crate::service::state_dir());
    let removed = crate::base::prune(&cache).map_err(|source| LifecycleError::Prune {
        path: cache.display().to_string(),
        source,
    })?;
    let mut out = std::io::stdout().lock();
    for path in removed {
        writeln!(out, "removed {}", path.display()).map_err(LifecycleError::Stdout)?;
    }
    out.flush().map_err(LifecycleError::Stdout)
}

/// The long-lived shim: serves the task API on the inherited socket until Shutdown.
pub fn serve(args: &ShimArgs) -> Result<(), LifecycleError> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(LifecycleError::Runtime)?;
    runtime.block_on(async {
        let events = Publisher::start(
            args.namespace.clone(),
            args.address.clone(),
            args.publish_binary.clone(),
        );
        let service = Service::new(args.clone(), events);
        let shutdown = Arc::clone(&service.shutdown);
        let boxed: Box<dyn Task + Send + Sync> = Box::new(service);
        let mut server = Server::new()
            .add_listener(LISTENER_FD)
            .map_err(|source| LifecycleError::Ttrpc {
                what: "listener",
                source,
            })?
            .set_domain_unix()
            .register_service(create_task(Arc::new(boxed)));
        server
            .start()
            .await
            .map_err(|source| LifecycleError::Ttrpc {
                what: "server",
                source,
            })?;
        tracing::info!(
            container = %args.id,
            namespace = %args.namespace,
            "serving the container"
        );
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .map_err(LifecycleError::Signal)?;
        tokio::select! {
            _ = shutdown.notified() => {}
            _ = term.recv() => {}
        }
        // Let the Shutdown reply leave before the socket closes.
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        let _ = server.shutdown().await;
        let _ = std::fs::remove_file(socket_path(args));
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sockets_live_beside_containerds_and_differ_per_container() {
        let args = ShimArgs {
            namespace: "default".into(),
            id: "c1".into(),
            address: "/run/containerd/containerd.sock".into(),
            ..Default::default()
        };
        let a = socket_path(&args);
        assert!(a.starts_with("/run/containerd/s/"), "{}", a.display());
        assert!(a.as_os_str().len() < 100);
        let b = socket_path(&ShimArgs {
            id: "c2".into(),
            ..args.clone()
        });
        assert_ne!(a, b);
        assert_eq!(a, socket_path(&args));
    }

    #[test]
    fn the_containers_of_a_pod_share_their_sandboxs_socket() {
        let dir = tempfile::tempdir().unwrap();
        let bundle = |id: &str, kind: &str| {
            let b = dir.path().join(id);
            std::fs::create_dir_all(&b).unwrap();
            std::fs::write(
                b.join("config.json"),
                format!(
                    r#"{{"ociVersion": "1.0.2", "annotations": {{
                        "io.kubernetes.cri.container-type": "{kind}",
                        "io.kubernetes.cri.sandbox-id": "s1"}}}}"#
                ),
            )
            .unwrap();
            ShimArgs {
                namespace: "k8s.io".into(),
                id: id.into(),
                address: "/run/containerd/containerd.sock".into(),
                bundle: b,
                ..Default::default()
            }
        };
        let sandbox = bundle("s1", "sandbox");
        let member = bundle("c1", "container");
        assert_eq!(group_id(&member), "s1");
        assert_eq!(socket_path(&sandbox), socket_path(&member));
        let plain = ShimArgs {
            id: "c1".into(),
            bundle: dir.path().join("missing"),
            ..member.clone()
        };
        assert_ne!(socket_path(&plain), socket_path(&sandbox));
    }
}
