//! What huskd keeps on disk, so that a restarted huskd finds its VMs again.
//!
//! `<state-dir>/vms/<id>/` holds, per VM:
//! - `vm.pb`: the `husk.v1.Vm` record (prost), replaced atomically on every change;
//! - `vmm.pid`: `<pid> <start time in clock ticks>` of the running husk-vmm, so that a pid
//!   reused by another process is never mistaken for the VMM;
//! - `vmm.log`: the VMM's own diagnostics (its stdout and stderr);
//! - `vmm/`: what the VMM itself writes, the only directory a jailed VMM can write to (it is
//!   bind-mounted into its jail and owned by the jailed user): `console.log` (the guest
//!   console), `api.sock`, `vsock.sock` and `exit.pb` (control socket, vsock socket, exit
//!   report). The record and pid file stay out of the VMM's reach.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use husk_proto::v1::Vm;
use prost::Message;

pub const RECORD: &str = "vm.pb";
pub const PID_FILE: &str = "vmm.pid";
pub const VMM_LOG: &str = "vmm.log";
pub const VMM_DIR: &str = "vmm";
pub const CONSOLE_LOG: &str = "vmm/console.log";
pub const API_SOCK: &str = "vmm/api.sock";
pub const VSOCK_SOCK: &str = "vmm/vsock.sock";
pub const EXIT_REPORT: &str = "vmm/exit.pb";

/// The directory of every VM under `state_dir`.
pub fn vms_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("vms")
}

/// Writes `contents` to `path` atomically: a reader sees the old or the new file, never half.
pub fn write_atomic(path: &Path, contents: &[u8]) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut file = fs::File::create(&tmp)?;
    file.write_all(contents)?;
    file.sync_data()?;
    fs::rename(&tmp, path)
}

/// Saves a VM record into its directory.
pub fn save(dir: &Path, vm: &Vm) -> io::Result<()> {
    write_atomic(&dir.join(RECORD), &vm.encode_to_vec())
}

/// Loads every VM record under `state_dir`; records that cannot be read are returned as
/// errors naming their directory (huskd logs them and goes on).
pub fn load_all(state_dir: &Path) -> io::Result<Vec<Result<Vm, String>>> {
    let dir = vms_dir(state_dir);
    let entries = match fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut vms = Vec::new();
    for entry in entries {
        let path = entry?.path();
        let record = path.join(RECORD);
        vms.push(
            fs::read(&record)
                .map_err(|e| format!("{}: {e}", record.display()))
                .and_then(|bytes| {
                    Vm::decode(&bytes[..]).map_err(|e| format!("{}: {e}", record.display()))
                }),
        );
    }
    Ok(vms)
}

/// Records the running VMM's identity.
pub fn save_pid(dir: &Path, pid: u32, start_ticks: u64) -> io::Result<()> {
    write_atomic(
        &dir.join(PID_FILE),
        format!("{pid} {start_ticks}\n").as_bytes(),
    )
}

/// The recorded VMM identity, if any.
pub fn load_pid(dir: &Path) -> Option<(u32, u64)> {
    let text = fs::read_to_string(dir.join(PID_FILE)).ok()?;
    let mut fields = text.split_whitespace();
    Some((fields.next()?.parse().ok()?, fields.next()?.parse().ok()?))
}

/// Start time of process `pid` (field 22 of /proc/PID/stat), in clock ticks since boot.
pub fn process_start_ticks(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: fields resume after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Removes the per-run files a finished VMM leaves (its sockets and pid file).
pub fn remove_run_files(dir: &Path) {
    for name in [API_SOCK, VSOCK_SOCK, PID_FILE] {
        let _ = fs::remove_file(dir.join(name));
    }
    // Guest-initiated vsock connections listen on `vsock.sock_<port>` (the host's side).
    if let Ok(entries) = fs::read_dir(dir.join(VMM_DIR)) {
        for entry in entries.flatten() {
            if entry
                .file_name()
                .to_string_lossy()
                .starts_with("vsock.sock_")
            {
                let _ = fs::remove_file(entry.path());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use husk_proto::v1::{VmSpec, VmState};

    fn temp_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("huskd-store-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn records_round_trip_and_unreadable_ones_are_reported() {
        let state = temp_dir("records");
        let good = vms_dir(&state).join("a");
        let bad = vms_dir(&state).join("b");
        fs::create_dir_all(&good).unwrap();
        fs::create_dir_all(&bad).unwrap();
        let vm = Vm {
            id: "a".into(),
            spec: Some(VmSpec {
                name: "web".into(),
                ..Default::default()
            }),
            state: VmState::Running as i32,
            status: None,
        };
        save(&good, &vm).unwrap();
        fs::write(bad.join(RECORD), b"\xff\xff\xff").unwrap();
        let mut loaded = load_all(&state).unwrap();
        loaded.sort_by_key(|r| r.is_err());
        assert_eq!(loaded[0].as_ref().unwrap(), &vm);
        assert!(loaded[1].as_ref().unwrap_err().contains("b/vm.pb"));
        fs::remove_dir_all(&state).unwrap();
    }

    #[test]
    fn pid_files_identify_a_live_process() {
        let dir = temp_dir("pid");
        let me = std::process::id();
        let ticks = process_start_ticks(me).unwrap();
        save_pid(&dir, me, ticks).unwrap();
        assert_eq!(load_pid(&dir), Some((me, ticks)));
        assert_eq!(
            process_start_ticks(me),
            Some(ticks),
            "stable for a live process"
        );
        remove_run_files(&dir);
        assert_eq!(load_pid(&dir), None);
        fs::remove_dir_all(&dir).unwrap();
    }
}
