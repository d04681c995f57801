//! The docker-like verbs: `husk` as a gRPC client of huskd.
//!
//! The daemon address comes from `--host` or `$HUSK_HOST`: `unix:///path/to.sock` (default
//! unix:///run/husk/huskd.sock) or `http://HOST:PORT` for a TCP listener.

use std::io::Write;

use husk_proto::v1::husk_client::HuskClient;
use husk_proto::v1::{
    exec_request, exec_response, network, port_mapping, CreateVmRequest, DeleteVmRequest, Disk,
    Egress, ExecRequest, ExecStart, GetVmRequest, Limits, ListVmsRequest, Network, PauseVmRequest,
    PortMapping, ResumeVmRequest, StartVmRequest, StopVmRequest, StreamConsoleRequest, VmSpec,
    WatchEventsRequest, WindowSize,
};
use tokio::io::AsyncReadExt;
use tokio_stream::StreamExt;
use tonic::transport::Channel;

use crate::opts::{
    CreateArgs, EventsArgs, ExecArgs, InspectArgs, LogsArgs, PsArgs, RmArgs, StopArgs, Verb, VmList,
};
use crate::output;
use crate::tty;

pub const DEFAULT_HOST: &str = "unix:///run/husk/huskd.sock";
/// Exit code for a failed daemon call (the gRPC status message is printed).
pub const EXIT_API_ERROR: i32 = 1;

/// Why a daemon verb failed.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    #[error("--host {0:?}: use unix:///path/to/huskd.sock or http://HOST:PORT")]
    BadHost(String),
    #[error(transparent)]
    Unreachable(husk_proto::client::ConnectError),
    /// huskd refused: its message and the gRPC code (tests look for both).
    #[error("{} ({:?})", .0.message(), .0.code())]
    Api(#[from] tonic::Status),
    #[error("cannot start the async runtime")]
    Runtime(#[source] std::io::Error),
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        source: std::io::Error,
    },
    #[error("exec: the stream ended without an exit status")]
    NoExitStatus,
    /// A flag that cannot be sent as given.
    #[error("{0}")]
    Usage(String),
}

/// Connects to huskd.
pub async fn connect(host: &str) -> Result<HuskClient<Channel>, RemoteError> {
    use husk_proto::client::{channel, ConnectError};
    tracing::debug!(host, "connecting to huskd");
    match channel(host).await {
        Ok(channel) => Ok(HuskClient::new(channel)),
        Err(ConnectError::BadAddress(_)) => Err(RemoteError::BadHost(host.to_string())),
        Err(e) => Err(RemoteError::Unreachable(e)),
    }
}

/// Runs one daemon verb; returns the exit code.
pub fn run_verb(host: &str, verb: &Verb) -> Result<i32, RemoteError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(RemoteError::Runtime)?;
    runtime.block_on(async {
        let mut client = connect(host).await?;
        match verb {
            Verb::Create(args) => create(&mut client, args).await,
            Verb::Start(list) => {
                each_vm(list, |vm| {
                    let mut c = client.clone();
                    async move { c.start_vm(StartVmRequest { vm }).await.map(|_| ()) }
                })
                .await
            }
            Verb::Stop(args) => stop(&mut client, args).await,
            Verb::Rm(args) => rm(&mut client, args).await,
            Verb::Ps(args) => ps(&mut client, args).await,
            Verb::Inspect(args) => inspect(&mut client, args).await,
            Verb::Exec(args) => exec(&mut client, args).await,
            Verb::Logs(args) => logs(&mut client, args).await,
            Verb::Pause(list) => {
                each_vm(list, |vm| {
                    let mut c = client.clone();
                    async move { c.pause_vm(PauseVmRequest { vm }).await.map(|_| ()) }
                })
                .await
            }
            Verb::Resume(list) => {
                each_vm(list, |vm| {
                    let mut c = client.clone();
                    async move { c.resume_vm(ResumeVmRequest { vm }).await.map(|_| ()) }
                })
                .await
            }
            Verb::Update(args) => crate::rate_limit_cmd::update(&mut client, args).await,
            Verb::Disk(args) => crate::disk_cmd::run(&mut client, args).await,
            Verb::Memory(args) => crate::memory_cmd::run(&mut client, args).await,
            Verb::Top(args) => crate::top_cmd::run(&mut client, args).await,
            Verb::Capacity(args) => crate::capacity_cmd::run(&mut client, args).await,
            Verb::Events(args) => events(&mut client, args).await,
            Verb::Snapshot(args) => crate::snapshot_cmd::snapshot(&mut client, args).await,
            Verb::Restore(args) => crate::snapshot_cmd::restore(&mut client, args).await,
            Verb::Template(args) => crate::template_cmd::run(&mut client, args).await,
            // main runs the local verbs itself.
            Verb::Run(_) | Verb::Image(_) | Verb::Completions { .. } | Verb::Version => Ok(0),
        }
    })
}

/// Applies a call to every VM named; prints each name done, the first error stops.
async fn each_vm<F, Fut>(list: &VmList, mut call: F) -> Result<i32, RemoteError>
where
    F: FnMut(String) -> Fut,
    Fut: std::future::Future<Output = Result<(), tonic::Status>>,
{
    for vm in &list.vms {
        call(vm.clone()).await?;
        println!("{vm}");
    }
    Ok(0)
}

/// A path as the daemon needs it: absolute (huskd does not share our working directory).
pub fn absolute(path: &str) -> String {
    std::path::absolute(path)
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| path.to_string())
}

/// A `--disk PATH[:ro|:cow]` value as the API's Disk, its path made absolute (the format is
/// left to huskd: by the file name).
pub fn disk_arg(value: &str) -> Disk {
    let (path, read_only, copy_on_write) = if let Some(p) = value.strip_suffix(":ro") {
        (p, true, false)
    } else if let Some(p) = value.strip_suffix(":cow") {
        (p, false, true)
    } else {
        (value, false, false)
    };
    Disk {
        path: absolute(path),
        read_only,
        copy_on_write,
        ..Default::default()
    }
}

/// A published port as the API carries it (huskd checks it again).
fn port_mapping(p: &husk_host::firewall::PortMapping) -> PortMapping {
    PortMapping {
        host_ip: p.host_ip.map(|ip| ip.to_string()).unwrap_or_default(),
        host_port: u32::from(p.host_port),
        guest_port: u32::from(p.guest_port),
        protocol: match p.protocol {
            husk_host::firewall::Protocol::Tcp => port_mapping::Protocol::Tcp,
            husk_host::firewall::Protocol::Udp => port_mapping::Protocol::Udp,
        } as i32,
    }
}

/// Builds the VmSpec of `husk create` and whether to start it (also used by tests).
pub fn create_spec(args: &CreateArgs) -> (VmSpec, bool) {
    let spec = VmSpec {
        name: args.name.clone().unwrap_or_default(),
        kernel: args.kernel.as_deref().map(absolute).unwrap_or_default(),
        initrd: args.initrd.as_deref().map(absolute).unwrap_or_default(),
        rootfs: args.rootfs.as_deref().map(absolute).unwrap_or_default(),
        rootfs_copy_on_write: args.rootfs.is_some() && !args.write_rootfs,
        rootfs_format: args
            .rootfs_format
            .map(|f| f.to_string())
            .unwrap_or_default(),
        disks: args.disks.iter().map(|d| disk_arg(d)).collect(),
        disk_slots: args.disk_slots,
        hostname: args.hostname.clone().unwrap_or_default(),
        balloon: (args.no_balloon || args.no_free_page_reporting).then_some(
            husk_proto::v1::BalloonSpec {
                disabled: args.no_balloon,
                no_free_page_reporting: args.no_free_page_reporting,
            },
        ),
        mounts: args
            .volumes
            .iter()
            .map(|v| husk_proto::v1::Mount {
                host_path: absolute(&v.host.display().to_string()),
                guest_path: v.guest.clone(),
                read_only: v.read_only,
            })
            .collect(),
        network: Some(Network {
            mode: if args.net {
                network::Mode::Tap
            } else {
                network::Mode::None
            } as i32,
            mac: args.mac.clone().unwrap_or_default(),
            ports: args.publish.iter().map(port_mapping).collect(),
            egress: (!args.egress_allow.is_empty()
                || !args.egress_deny.is_empty()
                || args.host_access)
                .then(|| Egress {
                    allow: args.egress_allow.iter().map(ToString::to_string).collect(),
                    deny: args.egress_deny.iter().map(ToString::to_string).collect(),
                    host_access: args.host_access,
                }),
            ..Default::default()
        }),
        // Range checks are the daemon's: it answers INVALID_ARGUMENT with the limits.
        vcpus: args.cpus,
        memory_mib: args.memory,
        command: args.command.clone(),
        env: args.env.iter().cloned().collect(),
        workdir: args.workdir.clone().unwrap_or_default(),
        labels: args.labels.iter().cloned().collect(),
        extra_cmdline: args.cmdline.clone().unwrap_or_default(),
        // 0: huskd's default, computed from the shape (see Limits in husk.proto).
        limits: Some(Limits {
            cpu_millis: args.cpu_limit,
            memory_max_mib: args.memory_limit,
            pids_max: args.pids_limit,
            open_files: 0,
        }),
    };
    (spec, args.start)
}

async fn create(client: &mut HuskClient<Channel>, args: &CreateArgs) -> Result<i32, RemoteError> {
    let request = match &args.template {
        Some(template) => CreateVmRequest {
            spec: Some(clone_spec(args)?),
            start: true,
            template: template.clone(),
            match_template: false,
        },
        None => create_request(args)?,
    };
    let vm = client.create_vm(request).await?.into_inner();
    println!("{}", vm.id);
    Ok(0)
}

/// The request of `husk create` without --template.
fn create_request(args: &CreateArgs) -> Result<CreateVmRequest, RemoteError> {
    let (mut spec, start) = create_spec(args);
    crate::rate_limit_cmd::apply_to_spec(&mut spec, &args.limits)?;
    Ok(CreateVmRequest {
        spec: Some(spec),
        start: start || args.match_template,
        template: String::new(),
        match_template: args.match_template,
    })
}

/// The spec of `husk create --template`: what a clone may differ in. Any other VM option is
/// the template's, and refused here rather than silently dropped.
fn clone_spec(args: &CreateArgs) -> Result<VmSpec, RemoteError> {
    let (mut given, _) = create_spec(args);
    given.name.clear();
    given.labels.clear();
    given.hostname.clear();
    use clap::Parser;
    let bare = match crate::opts::Cli::try_parse_from(["husk", "create"]).map(|c| c.command) {
        Ok(Verb::Create(bare)) => create_spec(&bare).0,
        _ => VmSpec::default(),
    };
    let limits = !args.limits.disk_limits.is_empty()
        || args.limits.net_rx_limit.is_some()
        || args.limits.net_tx_limit.is_some();
    if given != bare || limits {
        return Err(RemoteError::Usage(
            "husk create --template: only --name, --label and --hostname may be given; the \
             rest is the template's"
                .into(),
        ));
    }
    Ok(VmSpec {
        name: args.name.clone().unwrap_or_default(),
        labels: args.labels.iter().cloned().collect(),
        hostname: args.hostname.clone().unwrap_or_default(),
        ..Default::default()
    })
}

async fn stop(client: &mut HuskClient<Channel>, args: &StopArgs) -> Result<i32, RemoteError> {
    for vm in &args.vms {
        let request = StopVmRequest {
            vm: vm.clone(),
            timeout_ms: args.timeout * 1000,
            force: args.force,
        };
        client.stop_vm(request).await?;
        println!("{vm}");
    }
    Ok(0)
}

async fn rm(client: &mut HuskClient<Channel>, args: &RmArgs) -> Result<i32, RemoteError> {
    for vm in &args.vms {
        let request = DeleteVmRequest {
            vm: vm.clone(),
            force: args.force,
        };
        client.delete_vm(request).await?;
        println!("{vm}");
    }
    Ok(0)
}

async fn ps(client: &mut HuskClient<Channel>, args: &PsArgs) -> Result<i32, RemoteError> {
    let request = ListVmsRequest {
        label_selector: args.labels.iter().cloned().collect(),
    };
    let mut vms = client.list_vms(request).await?.into_inner().vms;
    vms.sort_by_key(|vm| vm.status.as_ref().map_or(0, |s| s.created_unix_ms));
    if args.json {
        println!("{}", output::vms_json(&vms));
    } else {
        print!("{}", output::vm_table(&vms));
    }
    Ok(0)
}

async fn inspect(client: &mut HuskClient<Channel>, args: &InspectArgs) -> Result<i32, RemoteError> {
    let vm = client
        .get_vm(GetVmRequest {
            vm: args.vm.clone(),
        })
        .await?
        .into_inner();
    if args.json {
        println!("{}", output::vm_json(&vm));
    } else {
        print!("{}", output::vm_details(&vm));
    }
    Ok(0)
}

async fn logs(client: &mut HuskClient<Channel>, args: &LogsArgs) -> Result<i32, RemoteError> {
    let request = StreamConsoleRequest {
        vm: args.vm.clone(),
        follow: args.follow,
    };
    let mut stream = client.stream_console(request).await?.into_inner();
    let mut out = std::io::stdout().lock();
    while let Some(chunk) = stream.next().await {
        write_out(&mut out, "stdout", &chunk?.data)?;
    }
    Ok(0)
}

async fn events(client: &mut HuskClient<Channel>, args: &EventsArgs) -> Result<i32, RemoteError> {
    let vm = args.vm.clone().unwrap_or_default();
    let mut stream = client
        .watch_events(WatchEventsRequest { vm })
        .await?
        .into_inner();
    while let Some(event) = stream.next().await {
        println!("{}", output::event_line(&event?));
    }
    Ok(0)
}

async fn exec(client: &mut HuskClient<Channel>, args: &ExecArgs) -> Result<i32, RemoteError> {
    let (tty, interactive) = (args.tty, args.interactive);
    let window = tty::window_size().map(|(rows, cols)| WindowSize { rows, cols });
    let start = ExecStart {
        vm: args.vm().to_string(),
        command: args.command().to_vec(),
        env: args.env.iter().cloned().collect(),
        workdir: args.workdir.clone().unwrap_or_default(),
        tty,
        window,
        user: None,
        container: String::new(),
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<ExecRequest>(16);
    let msg = |m| ExecRequest { msg: Some(m) };
    let _ = tx.send(msg(exec_request::Msg::Start(start))).await;
    if !interactive {
        let _ = tx.send(msg(exec_request::Msg::CloseStdin(true))).await;
    }
    let mut stream = client
        .exec(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    let _raw = if tty && interactive {
        tty::RawMode::enable().map_err(|source| RemoteError::Io {
            what: "terminal",
            source,
        })?
    } else {
        None
    };
    let mut pumps = Vec::new();
    if interactive {
        let stdin_tx = tx.clone();
        pumps.push(tokio::spawn(async move {
            let mut stdin = tokio::io::stdin();
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                match stdin.read(&mut buf).await {
                    Ok(0) | Err(_) => {
                        let _ = stdin_tx
                            .send(msg(exec_request::Msg::CloseStdin(true)))
                            .await;
                        return;
                    }
                    Ok(n) => {
                        let data = buf[..n].to_vec();
                        if stdin_tx
                            .send(msg(exec_request::Msg::Stdin(data)))
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                }
            }
        }));
    }
    if tty {
        let resize_tx = tx.clone();
        if let Ok(mut winch) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::window_change())
        {
            pumps.push(tokio::spawn(async move {
                while winch.recv().await.is_some() {
                    if let Some((rows, cols)) = tty::window_size() {
                        let resize = exec_request::Msg::Resize(WindowSize { rows, cols });
                        if resize_tx.send(msg(resize)).await.is_err() {
                            return;
                        }
                    }
                }
            }));
        }
    }
    let mut code = None;
    let mut failure = None;
    while let Some(reply) = stream.next().await {
        match reply {
            Ok(reply) => match reply.msg {
                Some(exec_response::Msg::Stdout(d)) => {
                    write_out(&mut std::io::stdout(), "output", &d)?
                }
                Some(exec_response::Msg::Stderr(d)) => {
                    write_out(&mut std::io::stderr(), "output", &d)?
                }
                Some(exec_response::Msg::Exit(exit)) => {
                    code = Some(exit.code);
                    break;
                }
                _ => {}
            },
            Err(status) => {
                failure = Some(RemoteError::Api(status));
                break;
            }
        }
    }
    for pump in pumps {
        pump.abort();
    }
    drop(tx);
    match (code, failure) {
        (Some(code), _) => Ok(code),
        (None, Some(e)) => Err(e),
        (None, None) => Err(RemoteError::NoExitStatus),
    }
}

fn write_out(out: &mut dyn Write, what: &'static str, data: &[u8]) -> Result<(), RemoteError> {
    out.write_all(data)
        .and_then(|()| out.flush())
        .map_err(|source| RemoteError::Io { what, source })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::opts::Cli;
    use clap::Parser;

    fn create_spec_of(args: &[&str]) -> Result<(VmSpec, bool), clap::Error> {
        let cli = Cli::try_parse_from(["husk", "create"].into_iter().chain(args.iter().copied()))?;
        let Verb::Create(create) = cli.command else {
            panic!("not create");
        };
        Ok(create_spec(&create))
    }

    fn clone_spec_of(args: &[&str]) -> Result<VmSpec, RemoteError> {
        let cli = Cli::try_parse_from(["husk", "create"].into_iter().chain(args.iter().copied()))
            .unwrap();
        let Verb::Create(create) = cli.command else {
            panic!("not create");
        };
        clone_spec(&create)
    }

    #[test]
    fn a_clone_names_only_name_labels_and_host_name() {
        let spec = clone_spec_of(&[
            "--template",
            "py",
            "--name",
            "c1",
            "-l",
            "a=b",
            "--hostname",
            "h1",
        ])
        .unwrap();
        assert_eq!(spec.name, "c1");
        assert_eq!(spec.labels["a"], "b");
        assert_eq!(spec.hostname, "h1");
        assert_eq!(spec.network, None, "nothing else is sent");
        for other in [
            &["--template", "py", "--memory", "512"][..],
            &["--template", "py", "--net"],
            &["--template", "py", "--net-rx-limit", "bw=1M"],
        ] {
            let e = clone_spec_of(other).unwrap_err().to_string();
            assert!(
                e.contains("only --name, --label and --hostname"),
                "{other:?}: {e}"
            );
        }
    }

    #[test]
    fn match_template_asks_for_a_started_vm_of_the_full_shape() {
        let cli =
            Cli::try_parse_from(["husk", "create", "--match-template", "--memory", "512"]).unwrap();
        let Verb::Create(create) = cli.command else {
            panic!("not create");
        };
        let request = create_request(&create).unwrap();
        assert!(request.match_template && request.start);
        assert_eq!(request.spec.unwrap().memory_mib, 512);
        assert!(
            Cli::try_parse_from(["husk", "create", "--match-template", "--template", "t"]).is_err()
        );
    }

    #[test]
    fn volumes_become_mounts_with_absolute_host_paths() {
        let (spec, _) =
            create_spec_of(&["-v", "/srv/site:/var/www:ro", "--volume", "data:/data"]).unwrap();
        let cwd = std::env::current_dir().unwrap();
        assert_eq!(
            spec.mounts,
            [
                husk_proto::v1::Mount {
                    host_path: "/srv/site".into(),
                    guest_path: "/var/www".into(),
                    read_only: true,
                },
                husk_proto::v1::Mount {
                    host_path: cwd.join("data").display().to_string(),
                    guest_path: "/data".into(),
                    read_only: false,
                },
            ]
        );
        assert!(create_spec_of(&["-v", "/srv:relative"]).is_err());
        assert!(create_spec_of(&["-v", "/srv"]).is_err());
    }

    #[test]
    fn create_options_become_a_spec() {
        let (spec, start) = create_spec_of(&[
            "--name",
            "web",
            "--cpus",
            "2",
            "--memory",
            "512",
            "--net",
            "--disk",
            "/d.img:ro",
            "-e",
            "A=1",
            "--label",
            "tier=front",
            "--start",
            "--",
            "sh",
            "-c",
            "echo hi",
        ])
        .unwrap();
        assert!(start);
        assert_eq!(spec.name, "web");
        assert_eq!((spec.vcpus, spec.memory_mib), (2, 512));
        assert_eq!(spec.network.unwrap().mode, network::Mode::Tap as i32);
        assert_eq!(
            spec.disks,
            vec![Disk {
                path: "/d.img".into(),
                read_only: true,
                rate_limit: None,
                ..Default::default()
            }]
        );
        assert_eq!(spec.env.get("A").map(String::as_str), Some("1"));
        assert_eq!(spec.labels.get("tier").map(String::as_str), Some("front"));
        assert_eq!(spec.command, vec!["sh", "-c", "echo hi"]);
        let (sandbox, start) = create_spec_of(&[]).unwrap();
        assert!(sandbox.command.is_empty() && !start);
        assert_eq!(
            (sandbox.vcpus, sandbox.memory_mib),
            (0, 0),
            "huskd's defaults"
        );
        let limits = sandbox.limits.unwrap();
        assert_eq!(
            (limits.cpu_millis, limits.memory_max_mib, limits.pids_max),
            (0, 0, 0)
        );
        let stray = create_spec_of(&["stray"]).unwrap_err().to_string();
        // The usage line shows where a command goes.
        assert!(
            stray.contains("'stray'") && stray.contains("[-- <CMD>...]"),
            "{stray}"
        );
    }

    #[test]
    fn published_ports_and_the_egress_policy_reach_the_spec() {
        let (spec, _) = create_spec_of(&[
            "--net",
            "-p",
            "8080:80",
            "--publish",
            "127.0.0.1:5353:53/udp",
            "--egress-allow",
            "10.1.2.3/8",
            "--egress-deny",
            "10.9.9.9",
        ])
        .unwrap();
        let network = spec.network.unwrap();
        assert_eq!(
            network.ports,
            [
                PortMapping {
                    host_ip: String::new(),
                    host_port: 8080,
                    guest_port: 80,
                    protocol: port_mapping::Protocol::Tcp as i32,
                },
                PortMapping {
                    host_ip: "127.0.0.1".into(),
                    host_port: 5353,
                    guest_port: 53,
                    protocol: port_mapping::Protocol::Udp as i32,
                },
            ]
        );
        let egress = network.egress.unwrap();
        assert_eq!(egress.allow, ["10.0.0.0/8"]);
        assert_eq!(egress.deny, ["10.9.9.9/32"]);
        assert!(create_spec_of(&["--net", "-p", "80"]).is_err());
        let (plain, _) = create_spec_of(&["--net"]).unwrap();
        assert_eq!(plain.network.unwrap().egress, None);
    }

    #[test]
    fn limits_mac_and_paths_reach_the_spec() {
        let (spec, _) = create_spec_of(&[
            "--cpu-limit",
            "500",
            "--memory-limit",
            "300",
            "--pids-limit",
            "64",
            "--mac",
            "06:00:00:00:00:02",
            "--kernel",
            "/k",
            "-w",
            "/srv",
            "--cmdline",
            "x=1",
        ])
        .unwrap();
        let limits = spec.limits.unwrap();
        assert_eq!(
            (limits.cpu_millis, limits.memory_max_mib, limits.pids_max),
            (500, 300, 64)
        );
        assert_eq!(spec.network.unwrap().mac, "06:00:00:00:00:02");
        assert_eq!(spec.kernel, "/k");
        assert_eq!(spec.workdir, "/srv");
        assert_eq!(spec.extra_cmdline, "x=1");
    }

    #[test]
    fn api_errors_name_the_message_and_the_code() {
        let e = RemoteError::from(tonic::Status::not_found("no VM ghost"));
        assert_eq!(e.to_string(), "no VM ghost (NotFound)");
    }
}
