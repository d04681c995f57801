//! huskd: the husk daemon. Serves the husk.v1 gRPC API (plus gRPC health and server
//! reflection) on a Unix socket, and optionally on TCP, and runs every VM as its own husk-vmm
//! process, which it supervises. VMs outlive huskd: a restarted huskd adopts them again.

mod agent_client;
mod daemon;
mod service;
mod snapshot_files;
mod store;
mod vmm_process;
mod wire;

// Request validation lives in the library (fuzzed there); `crate::validate` stays its name.
use huskd::validate;

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use husk_proto::v1::husk_server::HuskServer;
use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;

use daemon::{Daemon, DaemonConfig};
use husk_host::policy::PathPolicy;
use service::HuskService;

const DEFAULT_SOCKET: &str = "/run/husk/huskd.sock";
const DEFAULT_STATE_DIR: &str = "/run/husk";
const DEFAULT_MAX_VMS: usize = 1024;
/// Jailed VMMs' uids: above every system and regular user range, below the 2^31 of idmaps.
const DEFAULT_UID_RANGE: (u32, u32) = (100_000, 65_536);

const USAGE: &str = "\
usage: huskd [--socket PATH] [--state-dir DIR] [--tcp 127.0.0.1:PORT] [--max-vms N]
             [--kernel PATH] [--initrd PATH] [--vmm PATH] [--no-jail]
             [--allow-path DIR]... [--allow-file PATH]... [--uid-range FIRST:COUNT]

  --socket PATH     Unix socket to serve on, mode 0660 (default /run/husk/huskd.sock)
  --state-dir DIR   where VM records, consoles and VMM sockets live (default /run/husk)
  --tcp ADDR:PORT   also serve on TCP, without authentication: loopback addresses only
  --max-vms N       VMs huskd holds at most, created or running (default 1024)
  --kernel PATH     default guest kernel (default $HUSK_HOME/kernel/vmlinux)
  --initrd PATH     default initramfs (default $HUSK_HOME/images/default.cpio.gz)
  --vmm PATH        husk-vmm binary (default: $HUSK_VMM, next to huskd, or on PATH)
  --allow-path DIR  callers may name files (kernels, initrds, rootfs, disks) and snapshot
                    directories below DIR; repeatable. Always allowed: $HUSK_HOME,
                    /var/lib/husk and <state-dir>/snapshots. Nothing else is opened.
  --allow-file PATH one more file callers may name, by this exact path (a block device as a
                    disk, say); repeatable. The default kernel and initrd always are.
  --uid-range F:N   jailed VMMs run each as its own uid (and gid) from F..F+N, held by a VM
                    from create to delete (default 100000:65536)
  --no-jail         as root, start husk-vmm directly instead of through husk-jailer (for
                    development); husk-jailer is $HUSK_JAILER, next to huskd, or on PATH

Serves husk.v1.Husk, grpc.health.v1.Health and gRPC server reflection.
SIGINT/SIGTERM stop the daemon; running VMs keep running and are adopted by the next huskd.";

#[derive(Debug)]
struct Args {
    socket: PathBuf,
    tcp: Option<SocketAddr>,
    config: DaemonConfig,
}

fn parse_args(args: &[String]) -> Result<Option<Args>, String> {
    let home = husk_host::paths::husk_home();
    let mut socket = PathBuf::from(DEFAULT_SOCKET);
    let mut state_dir = PathBuf::from(DEFAULT_STATE_DIR);
    let mut tcp = None;
    let mut max_vms = DEFAULT_MAX_VMS;
    let mut kernel = None;
    let mut initrd = None;
    let mut vmm = None;
    let mut no_jail = false;
    let mut allow_paths = Vec::new();
    let mut allow_files = Vec::new();
    let mut uid_range = DEFAULT_UID_RANGE;
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        if flag == "--no-jail" {
            no_jail = true;
            continue;
        }
        if flag == "-h" || flag == "--help" {
            return Ok(None);
        }
        let mut value = || {
            it.next()
                .cloned()
                .ok_or_else(|| format!("{flag} needs a value"))
        };
        match flag.as_str() {
            "--socket" => socket = value()?.into(),
            "--state-dir" => state_dir = value()?.into(),
            "--tcp" => {
                let v = value()?;
                let addr: SocketAddr = v
                    .parse()
                    .map_err(|_| format!("--tcp {v:?}: not ADDR:PORT"))?;
                // The API can create VMs with any allowed file and exec as root in every
                // guest: without TLS and client certificates (not built yet), only callers on
                // this host may reach it.
                if !addr.ip().is_loopback() {
                    return Err(format!(
                        "--tcp {v}: not a loopback address; huskd's TCP listener has no \
                         authentication, so it serves loopback only (127.0.0.1 or ::1)"
                    ));
                }
                tcp = Some(addr);
            }
            "--allow-path" => allow_paths.push(absolute(value()?.into())?),
            "--allow-file" => allow_files.push(absolute(value()?.into())?),
            "--uid-range" => {
                let v = value()?;
                uid_range = parse_uid_range(&v)?;
            }
            "--max-vms" => {
                let v = value()?;
                max_vms = v
                    .parse()
                    .ok()
                    .filter(|n| *n > 0)
                    .ok_or_else(|| format!("--max-vms {v:?}: not a positive number"))?;
            }
            "--kernel" => kernel = Some(PathBuf::from(value()?)),
            "--initrd" => initrd = Some(PathBuf::from(value()?)),
            "--vmm" => vmm = Some(PathBuf::from(value()?)),
            other => return Err(format!("unknown option {other:?}\n{USAGE}")),
        }
    }
    let default_from_home = |f: fn(&Path) -> PathBuf| home.as_ref().map(|h| f(h));
    let state_dir = absolute(state_dir)?;
    let default_kernel = match kernel {
        Some(k) => absolute(k)?,
        None => default_from_home(husk_host::paths::default_kernel)?,
    };
    let default_initrd = match initrd {
        Some(i) => absolute(i)?,
        None => default_from_home(husk_host::paths::default_initrd)?,
    };
    let snapshots = state_dir.join("snapshots");
    std::fs::create_dir_all(&snapshots)
        .map_err(|e| format!("cannot create {}: {e}", snapshots.display()))?;
    allow_paths.extend(home.ok());
    allow_paths.push(PathBuf::from("/var/lib/husk"));
    allow_paths.push(snapshots);
    allow_files.extend([default_kernel.clone(), default_initrd.clone()]);
    let jail = husk_host::jail::config(no_jail)?;
    let controllers = if jail.is_some() {
        husk_host::jail::cgroup_controllers()
    } else {
        Vec::new()
    };
    let config = DaemonConfig {
        state_dir,
        vmm: match vmm {
            Some(v) => absolute(v)?,
            None => husk_host::paths::vmm_binary()?,
        },
        default_kernel,
        default_initrd,
        max_vms,
        jail,
        uid_range,
        controllers,
        policy: PathPolicy::new(&allow_paths, &allow_files),
    };
    Ok(Some(Args {
        socket,
        tcp,
        config,
    }))
}

/// `FIRST:COUNT`: a range of uids above the system's own, with room for at least one VM.
fn parse_uid_range(v: &str) -> Result<(u32, u32), String> {
    let bad = || format!("--uid-range {v:?}: expected FIRST:COUNT, FIRST >= 1000, COUNT >= 1");
    let (first, count) = v.split_once(':').ok_or_else(bad)?;
    let first: u32 = first.parse().map_err(|_| bad())?;
    let count: u32 = count.parse().map_err(|_| bad())?;
    if first < 1000 || count == 0 || first.checked_add(count).is_none() {
        return Err(bad());
    }
    Ok((first, count))
}

fn absolute(path: PathBuf) -> Result<PathBuf, String> {
    std::path::absolute(&path).map_err(|e| format!("{}: {e}", path.display()))
}

/// Binds the Unix socket: refuses when another huskd answers on it, replaces a stale one.
fn bind_socket(path: &Path) -> Result<UnixListener, String> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
    }
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(format!("{} is in use: another huskd runs", path.display()));
    }
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path)
        .map_err(|e| format!("cannot listen on {}: {e}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
        .map_err(|e| format!("cannot set the mode of {}: {e}", path.display()))?;
    Ok(listener)
}

/// Says loudly which of the default VM limits this host cannot enforce.
fn warn_about_missing_limits(config: &DaemonConfig) {
    if config.jail.is_none() {
        eprintln!(
            "huskd: warning: VMMs are not jailed (--no-jail or not root): no per-VM uid, cgroup \
             limits or rlimits"
        );
        return;
    }
    for controller in daemon::LIMIT_CONTROLLERS {
        if !config.controllers.iter().any(|c| c == controller) {
            eprintln!(
                "huskd: warning: this host's cgroup v2 offers no {controller} controller: VMs run \
                 without their {controller} limit (is it bound to cgroup v1?)"
            );
        }
    }
}

async fn serve(args: Args) -> Result<(), String> {
    warn_about_missing_limits(&args.config);
    let daemon = Daemon::open(args.config.clone())?;
    let listener = bind_socket(&args.socket)?;
    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<HuskServer<HuskService>>()
        .await;
    // Both reflection versions (grpcurl and grpcio's tools still ask v1alpha), each describing
    // every service served: husk.v1.Husk and grpc.health.v1.Health.
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(husk_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| format!("reflection: {e}"))?;
    let reflection_alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(husk_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .map_err(|e| format!("reflection: {e}"))?;
    let husk = HuskServer::new(HuskService::new(daemon));
    let router = tonic::transport::Server::builder()
        .add_service(health)
        .add_service(reflection)
        .add_service(reflection_alpha)
        .add_service(husk);
    eprintln!(
        "huskd: serving on {} (state in {})",
        args.socket.display(),
        args.config.state_dir.display()
    );
    let shutdown = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .map_err(|e| format!("signal handler: {e}"));
        match term.as_mut() {
            Ok(term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {},
                    _ = term.recv() => {},
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    };
    let result = match args.tcp {
        Some(addr) => {
            let tcp = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
            eprintln!("huskd: also serving on tcp {addr}");
            let incoming_tcp = tokio_stream::wrappers::TcpListenerStream::new(tcp);
            let unix = router
                .clone()
                .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown);
            tokio::select! {
                r = unix => r,
                r = router.serve_with_incoming(incoming_tcp) => r,
            }
        }
        None => {
            router
                .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown)
                .await
        }
    };
    let _ = std::fs::remove_file(&args.socket);
    result.map_err(|e| format!("server: {e}"))
}

fn main() {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let args = match parse_args(&argv) {
        Ok(Some(args)) => args,
        Ok(None) => {
            println!("{USAGE}");
            return;
        }
        Err(e) => {
            eprintln!("huskd: error: {e}");
            std::process::exit(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("huskd: error: cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = runtime.block_on(serve(args)) {
        eprintln!("huskd: error: {e}");
        std::process::exit(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(args: &[&str]) -> Vec<String> {
        args.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn options_parse_and_mistakes_are_named() {
        let args = parse_args(&strings(&[
            "--socket",
            "/tmp/h.sock",
            "--state-dir",
            "/tmp/hs",
            "--tcp",
            "127.0.0.1:7000",
            "--max-vms",
            "3",
            "--kernel",
            "/k",
            "--initrd",
            "/i",
            "--vmm",
            "/v",
            "--no-jail",
            "--uid-range",
            "200000:10",
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(args.config.jail, None);
        assert_eq!(args.socket, PathBuf::from("/tmp/h.sock"));
        assert_eq!(args.tcp, Some("127.0.0.1:7000".parse().unwrap()));
        assert_eq!(args.config.max_vms, 3);
        assert_eq!(args.config.vmm, PathBuf::from("/v"));
        assert_eq!(args.config.uid_range, (200_000, 10));
        assert!(parse_args(&strings(&["--help"])).unwrap().is_none());
        for (bad, needle) in [
            (&["--max-vms", "0"][..], "--max-vms"),
            (&["--tcp", "nope"][..], "--tcp"),
            (&["--tcp", "0.0.0.0:7000"][..], "loopback"),
            (&["--tcp", "[::]:7000"][..], "loopback"),
            (&["--uid-range", "0:10"][..], "--uid-range"),
            (&["--uid-range", "100000:0"][..], "--uid-range"),
            (&["--uid-range", "4294967295:2"][..], "--uid-range"),
            (&["--socket"][..], "needs a value"),
            (&["--frobnicate"][..], "unknown option"),
        ] {
            let err = parse_args(&strings(bad)).unwrap_err();
            assert!(err.contains(needle), "{err}");
        }
    }
}
