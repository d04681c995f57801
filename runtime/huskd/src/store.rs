//! What huskd keeps on disk, so that a restarted huskd finds its VMs again.
//!
//! `<state-dir>/vms/` (mode 0700, root's) holds a directory per VM (mode 0700, huskd's own):
//! - `vm.pb`: the `husk.v1.Vm` record (prost), replaced atomically on every change, mode 0600
//!   (it holds the application's environment);
//! - `vmm.pid`: `<pid> <start time in clock ticks>` of the running husk-vmm, so that a pid
//!   reused by another process is never mistaken for the VMM;
//! - `vmm.log`: the VMM's own diagnostics (its stdout and stderr), 0600;
//! - `console.log`: the guest console, 0600, and `exit.pb`, the VMM's exit report: huskd
//!   creates both and passes them to the VMM as open fds, so the VMM writes them without being
//!   able to replace them;
//! - `vmm/`: the only directory a jailed VMM can write to (bind-mounted into its jail, owned by
//!   the VM's own uid, 0700): `api.sock` and `vsock.sock` (control and vsock sockets) and a
//!   snapshot's staging directory. huskd treats everything in it as hostile: it is recreated
//!   empty at every start, sockets are checked for the answering uid (`wire::VmSocket`) and
//!   files are opened without following links (`husk_host::confined`).

use std::io;
use std::path::{Path, PathBuf};

use husk_host::confined::Dir;
use husk_proto::v1::Vm;
use prost::Message;

pub const RECORD: &str = "vm.pb";
pub const PID_FILE: &str = "vmm.pid";
pub const VMM_LOG: &str = "vmm.log";
pub const CONSOLE_LOG: &str = "console.log";
pub const EXIT_REPORT: &str = "exit.pb";
pub const VMM_DIR: &str = "vmm";
pub const API_SOCK: &str = "vmm/api.sock";
pub const VSOCK_SOCK: &str = "vmm/vsock.sock";
/// Mode of huskd's directories and files: only root reads VM records, consoles and logs.
pub const DIR_MODE: u32 = 0o700;
pub const FILE_MODE: u32 = 0o600;
/// Longest VM record huskd reads back (a spec with a large environment is a few KiB).
pub const MAX_RECORD: u64 = 1 << 20;
/// Longest exit report huskd reads (a VMM writes a few hundred bytes).
pub const MAX_EXIT_REPORT: u64 = 64 << 10;

/// The directory of every VM under `state_dir`.
pub fn vms_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("vms")
}

/// Creates `<state-dir>/vms` (0700) if needed and makes sure of its mode.
pub fn open_vms_dir(state_dir: &Path) -> io::Result<Dir> {
    std::fs::create_dir_all(state_dir)?;
    let state = Dir::open(state_dir)?;
    state.create_subdir("vms", DIR_MODE, false)
}

/// Saves a VM record into its directory (0600, atomically).
pub fn save(dir: &Path, vm: &Vm) -> io::Result<()> {
    Dir::open(dir)?.write_atomic(RECORD, &vm.encode_to_vec(), FILE_MODE)
}

/// A VM record that cannot be loaded.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("cannot read {}", path.display())]
    Read { path: PathBuf, source: io::Error },
    #[error("{} is not a VM record", path.display())]
    Decode {
        path: PathBuf,
        source: prost::DecodeError,
    },
}

/// Loads every VM record under `state_dir`; records that cannot be read are returned as
/// errors naming their directory (huskd logs them and goes on).
pub fn load_all(state_dir: &Path) -> io::Result<Vec<Result<Vm, RecordError>>> {
    let vms = match Dir::open(&vms_dir(state_dir)) {
        Ok(dir) => dir,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut records = Vec::new();
    for name in vms.entries()? {
        let record = vms_dir(state_dir).join(&name).join(RECORD);
        let bytes = vms
            .subdir(&name)
            .and_then(|dir| dir.read_bounded(RECORD, MAX_RECORD))
            .and_then(|b| b.ok_or_else(|| io::Error::from(io::ErrorKind::NotFound)));
        records.push(
            bytes
                .map_err(|source| RecordError::Read {
                    path: record.clone(),
                    source,
                })
                .and_then(|bytes| {
                    Vm::decode(&bytes[..]).map_err(|source| RecordError::Decode {
                        path: record.clone(),
                        source,
                    })
                }),
        );
    }
    Ok(records)
}

/// Records the running VMM's identity.
pub fn save_pid(dir: &Path, pid: u32, start_ticks: u64) -> io::Result<()> {
    Dir::open(dir)?.write_atomic(
        PID_FILE,
        format!("{pid} {start_ticks}\n").as_bytes(),
        FILE_MODE,
    )
}

/// The recorded VMM identity, if any.
pub fn load_pid(dir: &Path) -> Option<(u32, u64)> {
    let bytes = Dir::open(dir).ok()?.read_bounded(PID_FILE, 64).ok()??;
    let text = String::from_utf8(bytes).ok()?;
    let mut fields = text.split_whitespace();
    Some((fields.next()?.parse().ok()?, fields.next()?.parse().ok()?))
}

/// Start time of process `pid` (field 22 of /proc/PID/stat), in clock ticks since boot.
pub fn process_start_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: fields resume after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Removes the per-run files a finished VMM leaves: its pid file, and everything in `vmm/`
/// (its sockets, a snapshot's staging), which is recreated empty at the next start.
pub fn remove_run_files(dir: &Path) {
    if let Ok(vm_dir) = Dir::open(dir) {
        let _ = vm_dir.remove_file(PID_FILE);
        if let Ok(vmm) = vm_dir.subdir(VMM_DIR) {
            for name in vmm.entries().unwrap_or_default() {
                let _ = vmm.remove_tree(&name);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use husk_proto::v1::{VmSpec, VmState};
    use std::fs;

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
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(good.join(RECORD))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "records are for root's eyes only");
        loaded.sort_by_key(|r| r.is_err());
        assert_eq!(loaded[0].as_ref().unwrap(), &vm);
        assert!(loaded[1]
            .as_ref()
            .unwrap_err()
            .to_string()
            .contains("b/vm.pb"));
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
