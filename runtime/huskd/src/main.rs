//! huskd: the husk daemon. Serves the husk.v1 gRPC API (plus gRPC health and server
//! reflection) on a Unix socket, and optionally on TCP, and runs every VM as its own husk-vmm
//! process, which it supervises. VMs outlive huskd: a restarted huskd adopts them again.

mod agent_client;
mod daemon;
mod metrics;
mod service;
mod snapshot_files;
mod store;
mod vmm_process;
mod wire;

// Request validation lives in the library (fuzzed there); `crate::validate` stays its name.
use huskd::rate_limits;
use huskd::validate;

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Parser, ValueEnum};
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
const DEFAULT_UID_RANGE: &str = "100000:65536";

/// huskd: the husk daemon, serving the husk.v1 gRPC API and supervising one husk-vmm per VM.
#[derive(Debug, Parser)]
#[command(
    name = "huskd",
    version,
    // A flag given twice takes its last value, as huskd's options always have (scripts and
    // tests add a default first and an override after it).
    args_override_self = true,
    after_help = "Serves husk.v1.Husk, grpc.health.v1.Health and gRPC server reflection.\n\
                  SIGINT/SIGTERM stop the daemon; running VMs keep running and are adopted by \
                  the next huskd."
)]
struct Cli {
    /// Unix socket to serve on, mode 0660
    #[arg(long, value_name = "PATH", default_value = DEFAULT_SOCKET)]
    socket: PathBuf,
    /// Where VM records, consoles and VMM sockets live
    #[arg(long, value_name = "DIR", default_value = DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
    /// Also serve on TCP, without authentication: loopback addresses only
    #[arg(long, value_name = "ADDR:PORT", value_parser = parse_tcp)]
    tcp: Option<SocketAddr>,
    /// Serve Prometheus metrics on http://ADDR:PORT/metrics (off by default; anyone who can
    /// reach the address sees the VMs' names, ids and usage, nothing more)
    #[arg(long, value_name = "ADDR:PORT")]
    metrics: Option<SocketAddr>,
    /// VMs huskd holds at most, created or running
    #[arg(long, value_name = "N", default_value_t = DEFAULT_MAX_VMS, value_parser = parse_max_vms)]
    max_vms: usize,
    /// Refuse a start (RESOURCE_EXHAUSTED) when the guest memory of the live VMs and the new one
    /// would pass RATIO times the host's memory, e.g. 1.5 [default: no limit; see
    /// docs/capacity.md]
    #[arg(long, value_name = "RATIO", value_parser = parse_ratio)]
    memory_overcommit: Option<f64>,
    /// Default guest kernel [default: $HUSK_HOME/kernel/vmlinux]
    #[arg(long, value_name = "PATH")]
    kernel: Option<PathBuf>,
    /// Default initramfs [default: $HUSK_HOME/images/default.cpio.gz]
    #[arg(long, value_name = "PATH")]
    initrd: Option<PathBuf>,
    /// husk-vmm binary [default: $HUSK_VMM, next to huskd, or on PATH]
    #[arg(long, value_name = "PATH")]
    vmm: Option<PathBuf>,
    /// Callers may name files (kernels, initrds, rootfs, disks) and snapshot directories below
    /// DIR; repeatable. Always allowed: $HUSK_HOME, /var/lib/husk and <state-dir>/snapshots.
    /// Nothing else is opened.
    #[arg(long = "allow-path", value_name = "DIR")]
    allow_paths: Vec<PathBuf>,
    /// One more file callers may name, by this exact path (a block device as a disk, say);
    /// repeatable. The default kernel and initrd always are.
    #[arg(long = "allow-file", value_name = "PATH")]
    allow_files: Vec<PathBuf>,
    /// Jailed VMMs run each as its own uid (and gid) from FIRST..FIRST+COUNT, held by a VM
    /// from create to delete
    #[arg(long, value_name = "FIRST:COUNT", default_value = DEFAULT_UID_RANGE, value_parser = parse_uid_range)]
    uid_range: (u32, u32),
    /// As root, start husk-vmm directly instead of through husk-jailer (for development);
    /// husk-jailer is $HUSK_JAILER, next to huskd, or on PATH
    #[arg(long)]
    no_jail: bool,
    /// Log lines as text or as JSON objects (one per line)
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Which log events to show, as RUST_LOG takes them (`debug`, `huskd=debug,h2=info`...);
    /// RUST_LOG, when set, wins
    #[arg(long, value_name = "FILTER", default_value = "info")]
    log_level: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug)]
struct Args {
    socket: PathBuf,
    tcp: Option<SocketAddr>,
    metrics: Option<SocketAddr>,
    config: DaemonConfig,
}

/// The daemon's settings from the command line: paths made absolute, defaults filled in from
/// $HUSK_HOME, and `<state-dir>/snapshots` created.
fn daemon_args(cli: Cli) -> anyhow::Result<Args> {
    let home = husk_host::paths::husk_home();
    let state_dir = absolute(cli.state_dir)?;
    let default_kernel = match cli.kernel {
        Some(k) => absolute(k)?,
        None => husk_host::paths::default_kernel(home.as_ref().map_err(clone_lookup)?),
    };
    let default_initrd = match cli.initrd {
        Some(i) => absolute(i)?,
        None => husk_host::paths::default_initrd(home.as_ref().map_err(clone_lookup)?),
    };
    let mut allow_paths = cli
        .allow_paths
        .into_iter()
        .map(absolute)
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut allow_files = cli
        .allow_files
        .into_iter()
        .map(absolute)
        .collect::<anyhow::Result<Vec<_>>>()?;
    let snapshots = state_dir.join("snapshots");
    std::fs::create_dir_all(&snapshots)
        .with_context(|| format!("cannot create {}", snapshots.display()))?;
    allow_paths.extend(home.ok());
    allow_paths.push(PathBuf::from("/var/lib/husk"));
    allow_paths.push(snapshots);
    allow_files.extend([default_kernel.clone(), default_initrd.clone()]);
    let jail = husk_host::jail::config(cli.no_jail)?;
    let controllers = if jail.is_some() {
        husk_host::jail::cgroup_controllers()
    } else {
        Vec::new()
    };
    let config = DaemonConfig {
        state_dir,
        vmm: match cli.vmm {
            Some(v) => absolute(v)?,
            None => husk_host::paths::vmm_binary()?,
        },
        default_kernel,
        default_initrd,
        max_vms: cli.max_vms,
        memory_overcommit: cli.memory_overcommit,
        jail,
        uid_range: cli.uid_range,
        controllers,
        policy: PathPolicy::new(&allow_paths, &allow_files),
    };
    Ok(Args {
        socket: cli.socket,
        tcp: cli.tcp,
        metrics: cli.metrics,
        config,
    })
}

/// $HUSK_HOME's lookup error, for a default that needs it.
fn clone_lookup<E: std::fmt::Display>(e: &E) -> anyhow::Error {
    anyhow::anyhow!("{e}")
}

/// A flag value clap refuses, with what was wrong.
#[derive(Debug, thiserror::Error)]
enum ArgError {
    #[error("{0:?}: not ADDR:PORT")]
    NotAddress(String),
    #[error(
        "{0}: not a loopback address; huskd's TCP listener has no authentication, so it serves \
         loopback only (127.0.0.1 or ::1)"
    )]
    NotLoopback(String),
    #[error("{0:?}: not a positive number")]
    NotPositive(String),
    #[error("{0:?}: expected FIRST:COUNT, FIRST >= 1000, COUNT >= 1")]
    UidRange(String),
}

/// `--tcp`: an address on this host only. The API can create VMs with any allowed file and
/// exec as root in every guest: without TLS and client certificates (not built yet), only
/// callers on this host may reach it.
fn parse_tcp(v: &str) -> Result<SocketAddr, ArgError> {
    let addr: SocketAddr = v.parse().map_err(|_| ArgError::NotAddress(v.into()))?;
    if !addr.ip().is_loopback() {
        return Err(ArgError::NotLoopback(v.into()));
    }
    Ok(addr)
}

fn parse_ratio(v: &str) -> Result<f64, ArgError> {
    v.parse::<f64>()
        .ok()
        .filter(|r| r.is_finite() && *r > 0.0)
        .ok_or_else(|| ArgError::NotPositive(v.into()))
}

fn parse_max_vms(v: &str) -> Result<usize, ArgError> {
    v.parse()
        .ok()
        .filter(|n| *n > 0)
        .ok_or_else(|| ArgError::NotPositive(v.into()))
}

/// `FIRST:COUNT`: a range of uids above the system's own, with room for at least one VM.
fn parse_uid_range(v: &str) -> Result<(u32, u32), ArgError> {
    let bad = || ArgError::UidRange(v.into());
    let (first, count) = v.split_once(':').ok_or_else(bad)?;
    let first: u32 = first.parse().map_err(|_| bad())?;
    let count: u32 = count.parse().map_err(|_| bad())?;
    if first < 1000 || count == 0 || first.checked_add(count).is_none() {
        return Err(bad());
    }
    Ok((first, count))
}

fn absolute(path: PathBuf) -> anyhow::Result<PathBuf> {
    std::path::absolute(&path).with_context(|| path.display().to_string())
}

/// Logs to stderr as text or JSON; RUST_LOG (else `--log-level`) picks the events, tonic's and
/// h2's included.
fn init_logging(format: LogFormat, level: &str) -> anyhow::Result<()> {
    use tracing_subscriber::EnvFilter;
    let filter = match std::env::var("RUST_LOG") {
        Ok(env) if !env.is_empty() => EnvFilter::try_new(env).context("RUST_LOG")?,
        _ => EnvFilter::try_new(level).context("--log-level")?,
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        // Colours only on a terminal: a log file or journal gets plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    Ok(())
}

/// Binds the Unix socket: refuses when another huskd answers on it, replaces a stale one.
fn bind_socket(path: &Path) -> anyhow::Result<UnixListener> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("cannot create {}", parent.display()))?;
    }
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        anyhow::bail!("{} is in use: another huskd runs", path.display());
    }
    let _ = std::fs::remove_file(path);
    let listener =
        UnixListener::bind(path).with_context(|| format!("cannot listen on {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
        .with_context(|| format!("cannot set the mode of {}", path.display()))?;
    Ok(listener)
}

/// Says loudly which of the default VM limits this host cannot enforce.
fn warn_about_missing_limits(config: &DaemonConfig) {
    if config.jail.is_none() {
        tracing::warn!(
            "VMMs are not jailed (--no-jail or not root): no per-VM uid, cgroup limits or rlimits"
        );
        return;
    }
    for controller in daemon::LIMIT_CONTROLLERS {
        if !config.controllers.iter().any(|c| c == controller) {
            tracing::warn!(
                controller,
                "this host's cgroup v2 offers no {controller} controller: VMs run without their \
                 {controller} limit (is it bound to cgroup v1?)"
            );
        }
    }
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {},
                _ = term.recv() => {},
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "no SIGTERM handler: only SIGINT stops huskd");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

async fn serve(args: Args) -> anyhow::Result<()> {
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
        .context("reflection")?;
    let reflection_alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(husk_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .context("reflection")?;
    if let Some(addr) = args.metrics {
        let listener = metrics::http::bind(addr)
            .await
            .with_context(|| format!("--metrics: cannot listen on {addr}"))?;
        tracing::info!(%addr, "serving Prometheus metrics at /metrics");
        let daemon = daemon.clone();
        tokio::spawn(metrics::http::serve(listener, move || {
            let daemon = daemon.clone();
            async move { daemon.render_metrics().await }
        }));
    }
    let api_timer = metrics::api_layer::ApiTimerLayer::new(daemon.metrics.clone());
    let husk = HuskServer::new(HuskService::new(daemon));
    let router = tonic::transport::Server::builder()
        .layer(api_timer)
        .add_service(health)
        .add_service(reflection)
        .add_service(reflection_alpha)
        .add_service(husk);
    tracing::info!(
        socket = %args.socket.display(),
        state_dir = %args.config.state_dir.display(),
        "serving"
    );
    let result = match args.tcp {
        Some(addr) => {
            let tcp = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen on {addr}"))?;
            tracing::info!(%addr, "also serving on tcp");
            let incoming_tcp = tokio_stream::wrappers::TcpListenerStream::new(tcp);
            let unix = router
                .clone()
                .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown_signal());
            tokio::select! {
                r = unix => r,
                r = router.serve_with_incoming(incoming_tcp) => r,
            }
        }
        None => {
            router
                .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown_signal())
                .await
        }
    };
    let _ = std::fs::remove_file(&args.socket);
    result.context("server")
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let args = daemon_args(cli)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(serve(args))
}

fn main() {
    // Usage mistakes exit 2 (clap's own); everything after, 1.
    let cli = Cli::parse();
    if let Err(e) = init_logging(cli.log_format, &cli.log_level) {
        eprintln!("huskd: error: {e:#}");
        std::process::exit(2);
    }
    if let Err(e) = run(cli) {
        tracing::error!("{e:#}");
        std::process::exit(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("huskd").chain(args.iter().copied()))
    }

    #[test]
    fn options_parse_and_mistakes_are_named() {
        let state_dir = tempfile::tempdir().unwrap();
        let state = state_dir.path().to_str().unwrap();
        let cli = parse(&[
            "--socket",
            "/tmp/h.sock",
            "--state-dir",
            state,
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
        ])
        .unwrap();
        let args = daemon_args(cli).unwrap();
        assert_eq!(args.config.jail, None);
        assert_eq!(args.socket, PathBuf::from("/tmp/h.sock"));
        assert_eq!(args.tcp, Some("127.0.0.1:7000".parse().unwrap()));
        assert_eq!(args.config.max_vms, 3);
        assert_eq!(args.config.vmm, PathBuf::from("/v"));
        assert_eq!(args.config.uid_range, (200_000, 10));
        assert!(state_dir.path().join("snapshots").is_dir());
        let help = parse(&["--help"]).unwrap_err();
        assert_eq!(help.kind(), clap::error::ErrorKind::DisplayHelp);
        for (bad, needle) in [
            (&["--max-vms", "0"][..], "--max-vms"),
            (&["--tcp", "nope"][..], "--tcp"),
            (&["--tcp", "0.0.0.0:7000"][..], "loopback"),
            (&["--tcp", "[::]:7000"][..], "loopback"),
            (&["--uid-range", "0:10"][..], "--uid-range"),
            (&["--uid-range", "100000:0"][..], "--uid-range"),
            (&["--uid-range", "4294967295:2"][..], "--uid-range"),
            (&["--socket"][..], "a value is required"),
            (&["--frobnicate"][..], "unexpected argument"),
            (&["--log-format", "xml"][..], "--log-format"),
        ] {
            let err = parse(bad).unwrap_err().to_string();
            assert!(err.contains(needle), "{bad:?}: {err}");
        }
    }

    #[test]
    fn a_flag_given_twice_takes_its_last_value_and_repeatable_ones_add_up() {
        let cli = parse(&[
            "--vmm",
            "/a",
            "--vmm",
            "/b",
            "--allow-path",
            "/p1",
            "--allow-path",
            "/p2",
            "--allow-file",
            "/f1",
            "--allow-file",
            "/f2",
        ])
        .unwrap();
        assert_eq!(cli.vmm, Some(PathBuf::from("/b")));
        assert_eq!(
            cli.allow_paths,
            [PathBuf::from("/p1"), PathBuf::from("/p2")]
        );
        assert_eq!(
            cli.allow_files,
            [PathBuf::from("/f1"), PathBuf::from("/f2")]
        );
    }

    #[test]
    fn defaults_are_the_documented_ones() {
        let cli = parse(&[]).unwrap();
        assert_eq!(cli.socket, PathBuf::from(DEFAULT_SOCKET));
        assert_eq!(cli.state_dir, PathBuf::from(DEFAULT_STATE_DIR));
        assert_eq!(cli.max_vms, DEFAULT_MAX_VMS);
        assert_eq!(cli.uid_range, (100_000, 65_536));
        assert_eq!(cli.log_format, LogFormat::Text);
        assert_eq!(cli.log_level, "info");
        assert!(!cli.no_jail && cli.tcp.is_none());
    }

    #[test]
    fn the_command_line_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
