//! How the daemon verbs print VMs: aligned tables for people, JSON for scripts.

use std::collections::BTreeMap;

use husk_proto::v1::{
    event, network, port_mapping, Event, RateLimit, Vm, VmSpec, VmState, VmStatus,
};
use serde::Serialize;

pub fn state_name(state: i32) -> &'static str {
    match VmState::try_from(state).unwrap_or(VmState::Unspecified) {
        VmState::Unspecified => "unknown",
        VmState::Created => "created",
        VmState::Running => "running",
        VmState::Paused => "paused",
        VmState::Stopping => "stopping",
        VmState::Stopped => "stopped",
        VmState::Failed => "failed",
        VmState::Starting => "starting",
    }
}

pub fn event_name(kind: i32) -> &'static str {
    match event::Kind::try_from(kind).unwrap_or(event::Kind::Unspecified) {
        event::Kind::Unspecified => "unknown",
        event::Kind::Created => "created",
        event::Kind::Started => "started",
        event::Kind::AgentReady => "agent-ready",
        event::Kind::Paused => "paused",
        event::Kind::Resumed => "resumed",
        event::Kind::AppExited => "app-exited",
        event::Kind::Stopped => "stopped",
        event::Kind::Failed => "failed",
        event::Kind::Deleted => "deleted",
    }
}

/// Columns padded to their widest cell.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut out = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<w$}   "));
            }
        }
        out.trim_end().to_string() + "\n"
    };
    let mut out = line(header.to_vec());
    for row in rows {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out
}

/// `husk ps`.
pub fn vm_table(vms: &[Vm]) -> String {
    let rows: Vec<Vec<String>> = vms
        .iter()
        .map(|vm| {
            let spec = vm.spec.clone().unwrap_or_default();
            let status = vm.status.clone().unwrap_or_default();
            let exit = status
                .exit_code
                .map(|c| format!(" ({c})"))
                .unwrap_or_default();
            vec![
                vm.id.clone(),
                spec.name,
                format!("{}{exit}", state_name(vm.state)),
                spec.vcpus.to_string(),
                format!("{} MiB", spec.memory_mib),
                if status.guest_ip.is_empty() {
                    "-".into()
                } else {
                    status.guest_ip.clone()
                },
                if status.published_ports.is_empty() {
                    "-".into()
                } else {
                    published(&status).join(",")
                },
                {
                    let l = limits(&status);
                    if l.is_empty() {
                        "-".into()
                    } else {
                        l.join(" ")
                    }
                },
                if spec.command.is_empty() {
                    "(sandbox)".into()
                } else {
                    spec.command.join(" ")
                },
            ]
        })
        .collect();
    table(
        &[
            "ID", "NAME", "STATE", "CPUS", "MEMORY", "IP", "PORTS", "LIMITS", "COMMAND",
        ],
        &rows,
    )
}

/// The published ports of a VM as docker prints them: `[HOSTIP:]HOSTPORT->GUESTPORT/PROTO`.
fn published(status: &VmStatus) -> Vec<String> {
    status
        .published_ports
        .iter()
        .map(|p| {
            let ip = if p.host_ip.is_empty() {
                String::new()
            } else {
                format!("{}:", p.host_ip)
            };
            let proto = match port_mapping::Protocol::try_from(p.protocol) {
                Ok(port_mapping::Protocol::Udp) => "udp",
                _ => "tcp",
            };
            format!("{ip}{}->{}/{proto}", p.host_port, p.guest_port)
        })
        .collect()
}

/// A bucket as the flags spell it, in K, M or G where the numbers are whole multiples.
fn bucket_text(b: &husk_proto::v1::TokenBucket) -> String {
    fn number(n: u64) -> String {
        for (shift, unit) in [(30, "G"), (20, "M"), (10, "K")] {
            if n != 0 && n % (1 << shift) == 0 {
                return format!("{}{unit}", n >> shift);
            }
        }
        n.to_string()
    }
    if b.burst == 0 {
        number(b.rate)
    } else {
        format!("{}:{}", number(b.rate), number(b.burst))
    }
}

/// A rate limit as `--disk-limit` and `--net-rx-limit` take it: `bw=RATE[:BURST],ops=...`.
fn limit_text(l: &RateLimit) -> String {
    let parts: Vec<String> = [("bw", &l.bandwidth), ("ops", &l.ops)]
        .into_iter()
        .filter_map(|(name, b)| b.as_ref().map(|b| format!("{name}={}", bucket_text(b))))
        .collect();
    if parts.is_empty() {
        "none".into()
    } else {
        parts.join(",")
    }
}

/// The limits in force, as `husk ps` prints them: `rx:LIMIT`, `tx:LIMIT`, `diskN:LIMIT`.
fn limits(status: &VmStatus) -> Vec<String> {
    let net = [
        ("rx", &status.net_rx_rate_limit),
        ("tx", &status.net_tx_rate_limit),
    ];
    net.into_iter()
        .filter_map(|(name, l)| l.as_ref().map(|l| format!("{name}:{}", limit_text(l))))
        .chain(status.disk_rate_limits.iter().filter_map(|d| {
            let l = d.limit.as_ref()?;
            Some(format!("disk{}:{}", d.disk, limit_text(l)))
        }))
        .collect()
}

/// One VM as `--json` prints it: stable field names, as in husk.proto; enums as names.
#[derive(Debug, Serialize)]
struct VmJson<'a> {
    id: &'a str,
    name: &'a str,
    state: &'static str,
    spec: SpecJson<'a>,
    status: StatusJson<'a>,
}

#[derive(Debug, Serialize)]
struct SpecJson<'a> {
    kernel: &'a str,
    initrd: &'a str,
    rootfs: &'a str,
    disks: Vec<DiskJson<'a>>,
    network: &'static str,
    vcpus: u32,
    memory_mib: u32,
    command: &'a [String],
    /// Sorted, so that the output is stable.
    env: BTreeMap<&'a str, &'a str>,
    workdir: &'a str,
    labels: BTreeMap<&'a str, &'a str>,
}

#[derive(Debug, Serialize)]
struct DiskJson<'a> {
    path: &'a str,
    read_only: bool,
}

#[derive(Debug, Serialize)]
struct StatusJson<'a> {
    vmm_pid: u32,
    exit_code: Option<i32>,
    failure_reason: &'a str,
    created_unix_ms: i64,
    started_unix_ms: i64,
    stopped_unix_ms: i64,
    tap: &'a str,
    host_ip: &'a str,
    guest_ip: &'a str,
    vsock_cid: u32,
    console_log: &'a str,
    agent_ready: bool,
    /// `[HOSTIP:]HOSTPORT->GUESTPORT/PROTO`, as `husk ps` prints them.
    published_ports: Vec<String>,
    egress_allow: &'a [String],
    egress_deny: &'a [String],
    host_access: bool,
    dns: bool,
    /// The limits in force, `N:LIMIT` per disk and `LIMIT` per direction, spelled as the
    /// flags take them (`bw=1M:2M,ops=100`).
    disk_rate_limits: Vec<String>,
    net_rx_rate_limit: Option<String>,
    net_tx_rate_limit: Option<String>,
    /// The template the VM was cloned from (docs/templates.md); empty otherwise.
    template: &'a str,
}

impl<'a> VmJson<'a> {
    fn new(vm: &'a Vm, spec: &'a VmSpec, status: &'a VmStatus) -> Self {
        let mode = match spec
            .network
            .as_ref()
            .map(|n| network::Mode::try_from(n.mode))
        {
            Some(Ok(network::Mode::Tap)) => "tap",
            _ => "none",
        };
        let map = |m: &'a std::collections::HashMap<String, String>| {
            m.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
        };
        Self {
            id: &vm.id,
            name: &spec.name,
            state: state_name(vm.state),
            spec: SpecJson {
                kernel: &spec.kernel,
                initrd: &spec.initrd,
                rootfs: &spec.rootfs,
                disks: spec
                    .disks
                    .iter()
                    .map(|d| DiskJson {
                        path: &d.path,
                        read_only: d.read_only,
                    })
                    .collect(),
                network: mode,
                vcpus: spec.vcpus,
                memory_mib: spec.memory_mib,
                command: &spec.command,
                env: map(&spec.env),
                workdir: &spec.workdir,
                labels: map(&spec.labels),
            },
            status: StatusJson {
                vmm_pid: status.vmm_pid,
                exit_code: status.exit_code,
                failure_reason: &status.failure_reason,
                created_unix_ms: status.created_unix_ms,
                started_unix_ms: status.started_unix_ms,
                stopped_unix_ms: status.stopped_unix_ms,
                tap: &status.tap,
                host_ip: &status.host_ip,
                guest_ip: &status.guest_ip,
                vsock_cid: status.vsock_cid,
                console_log: &status.console_log,
                agent_ready: status.agent_ready,
                published_ports: published(status),
                egress_allow: status.egress.as_ref().map_or(&[], |e| &e.allow),
                egress_deny: status.egress.as_ref().map_or(&[], |e| &e.deny),
                host_access: status.egress.as_ref().is_some_and(|e| e.host_access),
                dns: status.dns,
                disk_rate_limits: status
                    .disk_rate_limits
                    .iter()
                    .filter_map(|d| Some(format!("{}:{}", d.disk, limit_text(d.limit.as_ref()?))))
                    .collect(),
                net_rx_rate_limit: status.net_rx_rate_limit.as_ref().map(limit_text),
                net_tx_rate_limit: status.net_tx_rate_limit.as_ref().map(limit_text),
                template: &status.template,
            },
        }
    }
}

/// serde_json's compact output with a space after each `,` and `:`: the one-line layout
/// `husk` has always printed (scripts may grep it, e.g. for `"state": "stopped"`).
struct OneLine;

impl serde_json::ser::Formatter for OneLine {
    fn begin_array_value<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        if first {
            Ok(())
        } else {
            writer.write_all(b", ")
        }
    }

    fn begin_object_key<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        if first {
            Ok(())
        } else {
            writer.write_all(b", ")
        }
    }

    fn begin_object_value<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
    ) -> std::io::Result<()> {
        writer.write_all(b": ")
    }
}

fn one_line<T: Serialize>(value: &T) -> String {
    let mut out = Vec::new();
    let mut ser = serde_json::Serializer::with_formatter(&mut out, OneLine);
    // Serializing plain structs of strings and numbers into memory cannot fail.
    if value.serialize(&mut ser).is_err() {
        return "null".into();
    }
    String::from_utf8(out).unwrap_or_default()
}

/// One VM as a JSON object (`husk inspect --json`).
pub fn vm_json(vm: &Vm) -> String {
    let spec = vm.spec.clone().unwrap_or_default();
    let status = vm.status.clone().unwrap_or_default();
    one_line(&VmJson::new(vm, &spec, &status))
}

/// VMs as a JSON array, one VM a line (`husk ps --json`).
pub fn vms_json(vms: &[Vm]) -> String {
    let items: Vec<String> = vms.iter().map(vm_json).collect();
    format!("[{}]", items.join(",\n "))
}

/// `husk inspect` for people.
pub fn vm_details(vm: &Vm) -> String {
    let spec = vm.spec.clone().unwrap_or_default();
    let status = vm.status.clone().unwrap_or_default();
    let mut rows = vec![
        ("id", vm.id.clone()),
        ("name", spec.name.clone()),
        ("state", state_name(vm.state).to_string()),
        (
            "command",
            if spec.command.is_empty() {
                "(sandbox)".into()
            } else {
                spec.command.join(" ")
            },
        ),
        ("vcpus", spec.vcpus.to_string()),
        ("memory", format!("{} MiB", spec.memory_mib)),
        ("kernel", spec.kernel.clone()),
        ("initrd", spec.initrd.clone()),
    ];
    if !spec.rootfs.is_empty() {
        rows.push(("rootfs", spec.rootfs.clone()));
    }
    for d in &spec.disks {
        rows.push((
            "disk",
            format!("{}{}", d.path, if d.read_only { " (ro)" } else { "" }),
        ));
    }
    if status.vmm_pid != 0 {
        rows.push(("vmm pid", status.vmm_pid.to_string()));
    }
    if let Some(code) = status.exit_code {
        rows.push(("exit code", code.to_string()));
    }
    if !status.failure_reason.is_empty() {
        rows.push(("reason", status.failure_reason.clone()));
    }
    if !status.tap.is_empty() {
        rows.push((
            "network",
            format!(
                "{} host {} guest {}",
                status.tap, status.host_ip, status.guest_ip
            ),
        ));
        rows.push((
            "dns",
            if status.dns {
                "through the host"
            } else {
                "none"
            }
            .into(),
        ));
    }
    for p in published(&status) {
        rows.push(("published", p));
    }
    if let Some(e) = &status.egress {
        for c in &e.deny {
            rows.push(("egress deny", c.clone()));
        }
        for c in &e.allow {
            rows.push(("egress allow", c.clone()));
        }
        if e.host_access {
            rows.push(("host access", "any port of the link's host end".into()));
        }
    }
    for l in limits(&status) {
        rows.push(("rate limit", l));
    }
    rows.push(("vsock cid", status.vsock_cid.to_string()));
    rows.push(("agent ready", status.agent_ready.to_string()));
    if !status.template.is_empty() {
        rows.push(("template", status.template.clone()));
    }
    rows.push(("console log", status.console_log.clone()));
    let mut labels: Vec<_> = spec.labels.iter().collect();
    labels.sort();
    for (k, v) in labels {
        rows.push(("label", format!("{k}={v}")));
    }
    rows.iter().map(|(k, v)| format!("{k:<12} {v}\n")).collect()
}

/// One event line for `husk events`.
pub fn event_line(e: &Event) -> String {
    let mut line = format!(
        "{} {} {} {}",
        e.unix_ms,
        event_name(e.kind),
        e.vm_id,
        e.vm_name
    );
    if let Some(code) = e.exit_code {
        line.push_str(&format!(" exit_code={code}"));
    }
    if !e.message.is_empty() {
        line.push_str(&format!(" {}", e.message));
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;
    use husk_proto::v1::{Disk, Network};
    use serde_json::{json, Value};

    #[test]
    fn tables_align() {
        let t = table(&["A", "LONGER"], &[vec!["xxxx".into(), "y".into()]]);
        assert_eq!(t, "A      LONGER\nxxxx   y\n");
    }

    fn stopped_vm() -> Vm {
        Vm {
            id: "0123".into(),
            spec: Some(VmSpec {
                name: "web\"1\n\u{1}".into(),
                command: vec!["sh".into(), "-c".into(), "exit 3".into()],
                vcpus: 2,
                memory_mib: 128,
                disks: vec![Disk {
                    path: "/d.img".into(),
                    read_only: true,
                    rate_limit: None,
                    ..Default::default()
                }],
                network: Some(Network {
                    mode: network::Mode::Tap as i32,
                    mac: String::new(),
                    ..Default::default()
                }),
                env: [("B".to_string(), "2".to_string()), ("A".into(), "1".into())].into(),
                labels: [("tier".to_string(), "front".to_string())].into(),
                ..Default::default()
            }),
            state: VmState::Stopped as i32,
            status: Some(VmStatus {
                exit_code: Some(3),
                vmm_pid: 42,
                agent_ready: true,
                ..Default::default()
            }),
        }
    }

    #[test]
    fn a_vm_prints_as_json_with_every_field_and_as_a_row() {
        let vm = stopped_vm();
        let text = vm_json(&vm);
        assert!(!text.contains('\n'), "one line: {text}");
        let parsed: Value = serde_json::from_str(&text).unwrap();
        let expected = json!({
            "id": "0123", "name": "web\"1\n\u{1}", "state": "stopped",
            "spec": {"kernel": "", "initrd": "", "rootfs": "",
                     "disks": [{"path": "/d.img", "read_only": true}], "network": "tap",
                     "vcpus": 2, "memory_mib": 128, "command": ["sh", "-c", "exit 3"],
                     "env": {"A": "1", "B": "2"}, "workdir": "", "labels": {"tier": "front"}},
            "status": {"vmm_pid": 42, "exit_code": 3, "failure_reason": "",
                       "created_unix_ms": 0, "started_unix_ms": 0, "stopped_unix_ms": 0,
                       "tap": "", "host_ip": "", "guest_ip": "", "vsock_cid": 0,
                       "console_log": "", "agent_ready": true, "published_ports": [],
                       "egress_allow": [], "egress_deny": [], "host_access": false,
                       "dns": false, "disk_rate_limits": [], "net_rx_rate_limit": null,
                       "net_tx_rate_limit": null, "template": ""}
        });
        assert_eq!(parsed, expected);
        // The layout scripts and tests grep for: `"key": value`, fields in proto order.
        assert!(
            text.starts_with(
                "{\"id\": \"0123\", \"name\": \"web\\\"1\\n\\u0001\", \"state\": \"stopped\""
            ),
            "{text}"
        );
        assert!(
            text.contains("\"command\": [\"sh\", \"-c\", \"exit 3\"]"),
            "{text}"
        );
        assert!(
            text.contains("\"env\": {\"A\": \"1\", \"B\": \"2\"}"),
            "{text}"
        );
        let row = vm_table(&[vm]);
        assert!(
            row.contains("stopped (3)") && row.contains("sh -c exit 3"),
            "{row}"
        );
    }

    #[test]
    fn published_ports_and_the_egress_policy_show_in_ps_and_inspect() {
        let mut vm = stopped_vm();
        let status = vm.status.as_mut().unwrap();
        status.tap = "husk0".into();
        status.dns = true;
        status.published_ports = vec![
            husk_proto::v1::PortMapping {
                host_ip: String::new(),
                host_port: 8080,
                guest_port: 80,
                protocol: port_mapping::Protocol::Tcp as i32,
            },
            husk_proto::v1::PortMapping {
                host_ip: "127.0.0.1".into(),
                host_port: 5353,
                guest_port: 53,
                protocol: port_mapping::Protocol::Udp as i32,
            },
        ];
        status.egress = Some(husk_proto::v1::Egress {
            allow: vec!["10.0.0.0/8".into()],
            deny: vec!["10.9.0.0/16".into()],
            host_access: true,
        });
        let row = vm_table(std::slice::from_ref(&vm));
        assert!(row.contains(" PORTS "), "{row}");
        assert!(row.contains("8080->80/tcp,127.0.0.1:5353->53/udp"), "{row}");
        let parsed: Value = serde_json::from_str(&vm_json(&vm)).unwrap();
        assert_eq!(
            parsed["status"]["published_ports"],
            json!(["8080->80/tcp", "127.0.0.1:5353->53/udp"])
        );
        assert_eq!(parsed["status"]["egress_allow"], json!(["10.0.0.0/8"]));
        assert_eq!(parsed["status"]["egress_deny"], json!(["10.9.0.0/16"]));
        assert_eq!(parsed["status"]["host_access"], json!(true));
        assert_eq!(parsed["status"]["dns"], json!(true));
        let details = vm_details(&vm);
        assert!(details.contains("published    8080->80/tcp\n"), "{details}");
        assert!(details.contains("egress deny  10.9.0.0/16\n"), "{details}");
        assert!(details.contains("egress allow 10.0.0.0/8\n"), "{details}");
        assert!(details.contains("host access  any port"), "{details}");
        assert!(
            details.contains("dns          through the host\n"),
            "{details}"
        );
    }

    #[test]
    fn the_limits_in_force_show_in_ps_inspect_and_json_as_the_flags_spell_them() {
        use husk_proto::v1::{DiskRateLimit, TokenBucket};
        let mut vm = stopped_vm();
        let status = vm.status.as_mut().unwrap();
        let bucket = |rate, burst| Some(TokenBucket { rate, burst });
        status.net_rx_rate_limit = Some(RateLimit {
            bandwidth: bucket(1 << 20, 2 << 20),
            ops: None,
        });
        status.disk_rate_limits = vec![DiskRateLimit {
            disk: 0,
            limit: Some(RateLimit {
                bandwidth: bucket(1000, 0),
                ops: bucket(10, 0),
            }),
        }];
        let row = vm_table(std::slice::from_ref(&vm));
        assert!(row.contains(" LIMITS "), "{row}");
        assert!(row.contains("rx:bw=1M:2M disk0:bw=1000,ops=10"), "{row}");
        let parsed: Value = serde_json::from_str(&vm_json(&vm)).unwrap();
        assert_eq!(parsed["status"]["net_rx_rate_limit"], json!("bw=1M:2M"));
        assert_eq!(parsed["status"]["net_tx_rate_limit"], Value::Null);
        assert_eq!(
            parsed["status"]["disk_rate_limits"],
            json!(["0:bw=1000,ops=10"])
        );
        // What ps prints, --disk-limit takes back.
        let flag: husk_host::vmm_args::DiskLimit = "0:bw=1000,ops=10".parse().unwrap();
        assert_eq!(flag.limit.ops.unwrap().rate, 10);
        let details = vm_details(&vm);
        assert!(details.contains("rate limit   rx:bw=1M:2M\n"), "{details}");
    }

    #[test]
    fn a_vm_without_spec_or_status_prints_defaults_and_null_exit() {
        let vm = Vm {
            id: "x".into(),
            ..Default::default()
        };
        let parsed: Value = serde_json::from_str(&vm_json(&vm)).unwrap();
        assert_eq!(parsed["state"], "unknown");
        assert_eq!(parsed["spec"]["network"], "none");
        assert_eq!(parsed["spec"]["disks"], json!([]));
        assert_eq!(parsed["status"]["exit_code"], Value::Null);
    }

    #[test]
    fn a_list_is_a_json_array_of_the_same_objects() {
        let vms = [stopped_vm(), stopped_vm()];
        let parsed: Value = serde_json::from_str(&vms_json(&vms)).unwrap();
        let single: Value = serde_json::from_str(&vm_json(&vms[0])).unwrap();
        assert_eq!(parsed, json!([single.clone(), single]));
        assert_eq!(vms_json(&[]), "[]");
    }
}
