//! How the daemon verbs print VMs: aligned tables for people, JSON for scripts.

use husk_proto::v1::{event, network, Event, Vm, VmState};

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
                    status.guest_ip
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
        &["ID", "NAME", "STATE", "CPUS", "MEMORY", "IP", "COMMAND"],
        &rows,
    )
}

/// A JSON string literal.
pub fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn json_map(map: &std::collections::HashMap<String, String>) -> String {
    let mut keys: Vec<&String> = map.keys().collect();
    keys.sort();
    let items: Vec<String> = keys
        .iter()
        .map(|k| format!("{}: {}", json_string(k), json_string(&map[*k])))
        .collect();
    format!("{{{}}}", items.join(", "))
}

fn json_list(items: &[String]) -> String {
    let items: Vec<String> = items.iter().map(|s| json_string(s)).collect();
    format!("[{}]", items.join(", "))
}

/// One VM as a JSON object (stable field names, as in husk.proto).
pub fn vm_json(vm: &Vm) -> String {
    let spec = vm.spec.clone().unwrap_or_default();
    let status = vm.status.clone().unwrap_or_default();
    let net = spec.network.clone().unwrap_or_default();
    let mode = match network::Mode::try_from(net.mode) {
        Ok(network::Mode::Tap) => "tap",
        _ => "none",
    };
    let disks: Vec<String> = spec
        .disks
        .iter()
        .map(|d| {
            format!(
                "{{\"path\": {}, \"read_only\": {}}}",
                json_string(&d.path),
                d.read_only
            )
        })
        .collect();
    let exit = status
        .exit_code
        .map_or("null".to_string(), |c| c.to_string());
    format!(
        concat!(
            "{{\"id\": {}, \"name\": {}, \"state\": {}, \"spec\": {{\"kernel\": {}, ",
            "\"initrd\": {}, \"rootfs\": {}, \"disks\": [{}], \"network\": {}, \"vcpus\": {}, ",
            "\"memory_mib\": {}, \"command\": {}, \"env\": {}, \"workdir\": {}, \"labels\": {}}}, ",
            "\"status\": {{\"vmm_pid\": {}, \"exit_code\": {}, \"failure_reason\": {}, ",
            "\"created_unix_ms\": {}, \"started_unix_ms\": {}, \"stopped_unix_ms\": {}, ",
            "\"tap\": {}, \"host_ip\": {}, \"guest_ip\": {}, \"vsock_cid\": {}, ",
            "\"console_log\": {}, \"agent_ready\": {}}}}}"
        ),
        json_string(&vm.id),
        json_string(&spec.name),
        json_string(state_name(vm.state)),
        json_string(&spec.kernel),
        json_string(&spec.initrd),
        json_string(&spec.rootfs),
        disks.join(", "),
        json_string(mode),
        spec.vcpus,
        spec.memory_mib,
        json_list(&spec.command),
        json_map(&spec.env),
        json_string(&spec.workdir),
        json_map(&spec.labels),
        status.vmm_pid,
        exit,
        json_string(&status.failure_reason),
        status.created_unix_ms,
        status.started_unix_ms,
        status.stopped_unix_ms,
        json_string(&status.tap),
        json_string(&status.host_ip),
        json_string(&status.guest_ip),
        status.vsock_cid,
        json_string(&status.console_log),
        status.agent_ready,
    )
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
    }
    rows.push(("vsock cid", status.vsock_cid.to_string()));
    rows.push(("agent ready", status.agent_ready.to_string()));
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
    use husk_proto::v1::{VmSpec, VmStatus};

    #[test]
    fn json_escapes_and_tables_align() {
        assert_eq!(json_string("a\"b\\c\n\u{1}"), "\"a\\\"b\\\\c\\n\\u0001\"");
        let t = table(&["A", "LONGER"], &[vec!["xxxx".into(), "y".into()]]);
        assert_eq!(t, "A      LONGER\nxxxx   y\n");
    }

    #[test]
    fn a_vm_prints_as_json_and_as_a_row() {
        let vm = Vm {
            id: "0123".into(),
            spec: Some(VmSpec {
                name: "web\"1".into(),
                command: vec!["sh".into(), "-c".into(), "exit 3".into()],
                vcpus: 2,
                memory_mib: 128,
                ..Default::default()
            }),
            state: VmState::Stopped as i32,
            status: Some(VmStatus {
                exit_code: Some(3),
                ..Default::default()
            }),
        };
        let json = vm_json(&vm);
        assert!(
            json.starts_with("{\"id\": \"0123\", \"name\": \"web\\\"1\", \"state\": \"stopped\""),
            "{json}"
        );
        assert!(
            json.contains("\"exit_code\": 3")
                && json.contains("\"command\": [\"sh\", \"-c\", \"exit 3\"]")
        );
        let row = vm_table(&[vm]);
        assert!(row.lines().nth(1).unwrap().contains("stopped (3)"), "{row}");
    }
}
