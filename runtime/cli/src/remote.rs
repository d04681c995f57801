//! The docker-like verbs: `husk` as a gRPC client of huskd.
//!
//! The daemon address comes from `--host` or `$HUSK_HOST`: `unix:///path/to.sock` (default
//! unix:///run/husk/huskd.sock) or `http://HOST:PORT` for a TCP listener.

use std::io::Write;

use husk_proto::v1::husk_client::HuskClient;
use husk_proto::v1::{
    exec_request, exec_response, network, CreateVmRequest, DeleteVmRequest, Disk, ExecRequest,
    ExecStart, GetVmRequest, Limits, ListVmsRequest, Network, PauseVmRequest, ResumeVmRequest,
    StartVmRequest, StopVmRequest, StreamConsoleRequest, VmSpec, WatchEventsRequest, WindowSize,
};
use tokio::io::AsyncReadExt;
use tokio_stream::StreamExt;
use tonic::transport::Channel;

use crate::opts::{self, flag, value, Opt};
use crate::output;
use crate::tty;

pub const DEFAULT_HOST: &str = "unix:///run/husk/huskd.sock";
/// Exit code for a failed daemon call (the gRPC status message is printed).
pub const EXIT_API_ERROR: i32 = 1;

pub const USAGE: &str = "\
daemon commands (against huskd; --host ADDR or $HUSK_HOST, default unix:///run/husk/huskd.sock):
  create [OPTIONS] [-- CMD ARGS...]   record a VM (no CMD: a sandbox for exec); prints its id
         --name N --kernel P --initrd P --rootfs P --disk P[:ro] --net --mac M --cpus N
         --memory MIB --env K=V --workdir DIR --label K=V --cmdline STR --start
         --cpu-limit MILLICORES --memory-limit MIB --pids-limit N  (host limits of the VMM;
         default: from --cpus and --memory, see docs/security.md)
  start VM                           start a created or stopped VM
  stop [--timeout SECS] [--force] VM...   graceful stop (SIGTERM to the application), then kill
  rm [--force] VM...                 delete VMs (--force stops running ones first)
  ps [--label K=V]... [--json]       list VMs
  inspect [--json] VM                details of a VM
  exec [-i] [-t] [--env K=V] [--workdir DIR] VM CMD ARGS...   run CMD in a running VM
  logs [-f] VM                       the VM's console output (-f: follow)
  pause VM / resume VM               stop and restart a VM's vCPUs
  events [VM]                        lifecycle events as they happen
  snapshot [--leave-paused] [--diff] VM DIR   snapshot a running or paused VM into DIR
  restore [--name N] [--mac M] [--disk P[:ro]]... [--label K=V]... [--paused] DIR
                                     a new VM from DIR, going on where the snapshot was taken";

/// Connects to huskd.
pub async fn connect(host: &str) -> Result<HuskClient<Channel>, String> {
    use husk_proto::client::{channel, ConnectError};
    match channel(host).await {
        Ok(channel) => Ok(HuskClient::new(channel)),
        Err(ConnectError::BadAddress(_)) => Err(format!(
            "--host {host:?}: use unix:///path/to/huskd.sock or http://HOST:PORT"
        )),
        Err(e) => Err(e.to_string()),
    }
}

fn status_error(status: tonic::Status) -> String {
    format!("{} ({:?})", status.message(), status.code())
}

/// Runs one daemon verb; returns the exit code.
pub fn run_verb(host: &str, verb: &str, args: &[String]) -> Result<i32, String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))?;
    runtime.block_on(async {
        let mut client = connect(host).await?;
        match verb {
            "create" => create(&mut client, args).await,
            "start" => {
                each_vm(args, "start", |vm| {
                    let mut c = client.clone();
                    async move { c.start_vm(StartVmRequest { vm }).await.map(|_| ()) }
                })
                .await
            }
            "stop" => stop(&mut client, args).await,
            "rm" => rm(&mut client, args).await,
            "ps" => ps(&mut client, args).await,
            "inspect" => inspect(&mut client, args).await,
            "exec" => exec(&mut client, args).await,
            "logs" => logs(&mut client, args).await,
            "pause" => {
                each_vm(args, "pause", |vm| {
                    let mut c = client.clone();
                    async move { c.pause_vm(PauseVmRequest { vm }).await.map(|_| ()) }
                })
                .await
            }
            "resume" => {
                each_vm(args, "resume", |vm| {
                    let mut c = client.clone();
                    async move { c.resume_vm(ResumeVmRequest { vm }).await.map(|_| ()) }
                })
                .await
            }
            "events" => events(&mut client, args).await,
            "snapshot" => crate::snapshot_cmd::snapshot(&mut client, args).await,
            "restore" => crate::snapshot_cmd::restore(&mut client, args).await,
            other => Err(format!("unknown command {other:?}")),
        }
    })
}

/// Applies a call to every VM named; prints each name done, the first error stops.
async fn each_vm<F, Fut>(args: &[String], verb: &str, mut call: F) -> Result<i32, String>
where
    F: FnMut(String) -> Fut,
    Fut: std::future::Future<Output = Result<(), tonic::Status>>,
{
    let parsed = opts::parse(args, &[], None)?;
    if parsed.positional.is_empty() {
        return Err(format!("{verb}: name at least one VM"));
    }
    for vm in parsed.positional {
        call(vm.clone()).await.map_err(status_error)?;
        println!("{vm}");
    }
    Ok(0)
}

const CREATE_OPTS: &[Opt] = &[
    value(&["--name"]),
    value(&["--kernel"]),
    value(&["--initrd"]),
    value(&["--rootfs"]),
    value(&["--disk"]),
    flag(&["--net"]),
    value(&["--mac"]),
    value(&["--cpus"]),
    value(&["--memory"]),
    value(&["--env", "-e"]),
    value(&["--workdir", "-w"]),
    value(&["--label", "-l"]),
    value(&["--cmdline"]),
    value(&["--cpu-limit"]),
    value(&["--memory-limit"]),
    value(&["--pids-limit"]),
    flag(&["--start"]),
];

/// A path as the daemon needs it: absolute (huskd does not share our working directory).
pub fn absolute(path: &str) -> String {
    std::path::absolute(path)
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| path.to_string())
}

/// A `--disk PATH[:ro]` value as the API's Disk, its path made absolute.
pub fn disk_arg(value: &str) -> Disk {
    match value.strip_suffix(":ro") {
        Some(path) => Disk {
            path: absolute(path),
            read_only: true,
        },
        None => Disk {
            path: absolute(value),
            read_only: false,
        },
    }
}

/// Builds the VmSpec of `husk create` (also used by tests of the parser).
pub fn create_spec(args: &[String]) -> Result<(VmSpec, bool), String> {
    let p = opts::parse(args, CREATE_OPTS, None)?;
    if let Some(extra) = p.positional.first() {
        return Err(format!(
            "unexpected argument {extra:?} (put the command after --)"
        ));
    }
    let disks = p.values("--disk").iter().map(|d| disk_arg(d)).collect();
    let spec = VmSpec {
        name: p.value("--name").unwrap_or_default().to_string(),
        kernel: p.value("--kernel").map(absolute).unwrap_or_default(),
        initrd: p.value("--initrd").map(absolute).unwrap_or_default(),
        rootfs: p.value("--rootfs").map(absolute).unwrap_or_default(),
        disks,
        network: Some(Network {
            mode: if p.has("--net") {
                network::Mode::Tap
            } else {
                network::Mode::None
            } as i32,
            mac: p.value("--mac").unwrap_or_default().to_string(),
        }),
        // Range checks are the daemon's: it answers INVALID_ARGUMENT with the limits.
        vcpus: p.number("--cpus", 0, 0..=u32::MAX)?,
        memory_mib: p.number("--memory", 0, 0..=u32::MAX)?,
        command: p.command.clone(),
        env: p.pairs("--env")?.into_iter().collect(),
        workdir: p.value("--workdir").unwrap_or_default().to_string(),
        labels: p.pairs("--label")?.into_iter().collect(),
        extra_cmdline: p.value("--cmdline").unwrap_or_default().to_string(),
        // 0: huskd's default, computed from the shape (see Limits in husk.proto).
        limits: Some(Limits {
            cpu_millis: p.number("--cpu-limit", 0, 0..=u32::MAX)?,
            memory_max_mib: p.number("--memory-limit", 0, 0..=u32::MAX)?,
            pids_max: p.number("--pids-limit", 0, 0..=u32::MAX)?,
            open_files: 0,
        }),
    };
    Ok((spec, p.has("--start")))
}

async fn create(client: &mut HuskClient<Channel>, args: &[String]) -> Result<i32, String> {
    let (spec, start) = create_spec(args)?;
    let vm = client
        .create_vm(CreateVmRequest {
            spec: Some(spec),
            start,
        })
        .await
        .map_err(status_error)?
        .into_inner();
    println!("{}", vm.id);
    Ok(0)
}

async fn stop(client: &mut HuskClient<Channel>, args: &[String]) -> Result<i32, String> {
    let p = opts::parse(
        args,
        &[value(&["--timeout", "-t"]), flag(&["--force", "-f"])],
        None,
    )?;
    let timeout_ms = p.number("--timeout", 10, 0..=3600)? * 1000;
    if p.positional.is_empty() {
        return Err("stop: name at least one VM".into());
    }
    for vm in &p.positional {
        let request = StopVmRequest {
            vm: vm.clone(),
            timeout_ms,
            force: p.has("--force"),
        };
        client.stop_vm(request).await.map_err(status_error)?;
        println!("{vm}");
    }
    Ok(0)
}

async fn rm(client: &mut HuskClient<Channel>, args: &[String]) -> Result<i32, String> {
    let p = opts::parse(args, &[flag(&["--force", "-f"])], None)?;
    if p.positional.is_empty() {
        return Err("rm: name at least one VM".into());
    }
    for vm in &p.positional {
        let request = DeleteVmRequest {
            vm: vm.clone(),
            force: p.has("--force"),
        };
        client.delete_vm(request).await.map_err(status_error)?;
        println!("{vm}");
    }
    Ok(0)
}

async fn ps(client: &mut HuskClient<Channel>, args: &[String]) -> Result<i32, String> {
    let p = opts::parse(args, &[value(&["--label", "-l"]), flag(&["--json"])], None)?;
    let request = ListVmsRequest {
        label_selector: p.pairs("--label")?.into_iter().collect(),
    };
    let mut vms = client
        .list_vms(request)
        .await
        .map_err(status_error)?
        .into_inner()
        .vms;
    vms.sort_by_key(|vm| vm.status.as_ref().map_or(0, |s| s.created_unix_ms));
    if p.has("--json") {
        let items: Vec<String> = vms.iter().map(output::vm_json).collect();
        println!("[{}]", items.join(",\n "));
    } else {
        print!("{}", output::vm_table(&vms));
    }
    Ok(0)
}

async fn inspect(client: &mut HuskClient<Channel>, args: &[String]) -> Result<i32, String> {
    let p = opts::parse(args, &[flag(&["--json"])], None)?;
    let [vm] = &p.positional[..] else {
        return Err("inspect: name one VM".into());
    };
    let vm = client
        .get_vm(GetVmRequest { vm: vm.clone() })
        .await
        .map_err(status_error)?
        .into_inner();
    if p.has("--json") {
        println!("{}", output::vm_json(&vm));
    } else {
        print!("{}", output::vm_details(&vm));
    }
    Ok(0)
}

async fn logs(client: &mut HuskClient<Channel>, args: &[String]) -> Result<i32, String> {
    let p = opts::parse(args, &[flag(&["--follow", "-f"])], None)?;
    let [vm] = &p.positional[..] else {
        return Err("logs: name one VM".into());
    };
    let request = StreamConsoleRequest {
        vm: vm.clone(),
        follow: p.has("--follow"),
    };
    let mut stream = client
        .stream_console(request)
        .await
        .map_err(status_error)?
        .into_inner();
    let mut out = std::io::stdout().lock();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(status_error)?;
        out.write_all(&chunk.data)
            .map_err(|e| format!("stdout: {e}"))?;
        out.flush().map_err(|e| format!("stdout: {e}"))?;
    }
    Ok(0)
}

async fn events(client: &mut HuskClient<Channel>, args: &[String]) -> Result<i32, String> {
    let p = opts::parse(args, &[], None)?;
    let vm = p.positional.first().cloned().unwrap_or_default();
    let mut stream = client
        .watch_events(WatchEventsRequest { vm })
        .await
        .map_err(status_error)?
        .into_inner();
    while let Some(event) = stream.next().await {
        println!("{}", output::event_line(&event.map_err(status_error)?));
    }
    Ok(0)
}

const EXEC_OPTS: &[Opt] = &[
    flag(&["--interactive", "-i"]),
    flag(&["--tty", "-t"]),
    value(&["--env", "-e"]),
    value(&["--workdir", "-w"]),
];

async fn exec(client: &mut HuskClient<Channel>, args: &[String]) -> Result<i32, String> {
    let p = opts::parse(args, EXEC_OPTS, Some(1))?;
    let (Some(vm), false) = (p.positional.first(), p.command.is_empty()) else {
        return Err("exec: usage: husk exec [-i] [-t] VM CMD [ARGS...]".into());
    };
    let tty = p.has("--tty");
    let interactive = p.has("--interactive");
    let window = tty::window_size().map(|(rows, cols)| WindowSize { rows, cols });
    let start = ExecStart {
        vm: vm.clone(),
        command: p.command.clone(),
        env: p.pairs("--env")?.into_iter().collect(),
        workdir: p.value("--workdir").unwrap_or_default().to_string(),
        tty,
        window,
        user: None,
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<ExecRequest>(16);
    let msg = |m| ExecRequest { msg: Some(m) };
    let _ = tx.send(msg(exec_request::Msg::Start(start))).await;
    if !interactive {
        let _ = tx.send(msg(exec_request::Msg::CloseStdin(true))).await;
    }
    let mut stream = client
        .exec(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .map_err(status_error)?
        .into_inner();
    let _raw = if tty && interactive {
        tty::RawMode::enable().map_err(|e| format!("terminal: {e}"))?
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
                Some(exec_response::Msg::Stdout(d)) => write_out(&mut std::io::stdout(), &d)?,
                Some(exec_response::Msg::Stderr(d)) => write_out(&mut std::io::stderr(), &d)?,
                Some(exec_response::Msg::Exit(exit)) => {
                    code = Some(exit.code);
                    break;
                }
                _ => {}
            },
            Err(status) => {
                failure = Some(status_error(status));
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
        (None, None) => Err("exec: the stream ended without an exit status".into()),
    }
}

fn write_out(out: &mut dyn Write, data: &[u8]) -> Result<(), String> {
    out.write_all(data)
        .and_then(|()| out.flush())
        .map_err(|e| format!("output: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(args: &[&str]) -> Vec<String> {
        args.iter().map(|a| a.to_string()).collect()
    }

    #[test]
    fn create_options_become_a_spec() {
        let (spec, start) = create_spec(&s(&[
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
        ]))
        .unwrap();
        assert!(start);
        assert_eq!(spec.name, "web");
        assert_eq!((spec.vcpus, spec.memory_mib), (2, 512));
        assert_eq!(spec.network.unwrap().mode, network::Mode::Tap as i32);
        assert_eq!(
            spec.disks,
            vec![Disk {
                path: "/d.img".into(),
                read_only: true
            }]
        );
        assert_eq!(spec.env.get("A").map(String::as_str), Some("1"));
        assert_eq!(spec.labels.get("tier").map(String::as_str), Some("front"));
        assert_eq!(spec.command, vec!["sh", "-c", "echo hi"]);
        let (sandbox, _) = create_spec(&[]).unwrap();
        assert!(sandbox.command.is_empty());
        assert!(create_spec(&s(&["stray"]))
            .unwrap_err()
            .contains("after --"));
    }
}
