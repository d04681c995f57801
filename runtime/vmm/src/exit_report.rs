//! The exit report (`--exit-report PATH`): how the VM ended, written just before husk-vmm exits
//! so that a supervisor that is not its parent (a restarted huskd) still learns it.
//!
//! The file holds one `husk.vmm.v1.ExitReport` message, protobuf-encoded, not framed (the file's
//! length is the message's). It is written to `PATH.tmp` and renamed to `PATH`, so a reader sees
//! the whole report or none; no file means the VMM was killed before it could write one.

use std::io::{self, Write};
use std::path::{Path, PathBuf};

use husk_proto::vmm::ExitReport;
use prost::Message;

use crate::stop::StopReason;
use crate::vmm::VmOutcome;

/// The report for a VM that ran and stopped.
pub fn from_outcome(outcome: &VmOutcome) -> ExitReport {
    ExitReport {
        guest_exit_code: outcome.exit_code.map(i32::from),
        exit_status: outcome.exit_status(),
        reason: reason_text(&outcome.reason, outcome.exit_code.is_some()),
    }
}

/// The report for a VMM that failed (before or while running) with `message`.
pub fn from_error(exit_status: i32, message: &str) -> ExitReport {
    ExitReport {
        guest_exit_code: None,
        exit_status,
        reason: format!("error: {message}"),
    }
}

/// How the VM ended, for humans.
pub fn reason_text(reason: &StopReason, guest_reported: bool) -> String {
    match reason {
        StopReason::GuestReset if guest_reported => "guest exited".into(),
        StopReason::GuestReset => "reset by guest".into(),
        StopReason::GuestShutdown => "guest shut down (triple fault)".into(),
        StopReason::GuestCrash => "guest crashed".into(),
        StopReason::AllVcpusHalted => "every vCPU halted".into(),
        StopReason::Signal(libc::SIGINT) => "SIGINT".into(),
        StopReason::Signal(libc::SIGTERM) => "SIGTERM".into(),
        StopReason::Signal(sig) => format!("signal {sig}"),
        StopReason::Requested => "stopped by request".into(),
        StopReason::Error(message) => format!("error: {message}"),
    }
}

/// Writes `report` to `path` atomically (`path` + ".tmp", synced, then renamed).
pub fn write(path: &Path, report: &ExitReport) -> io::Result<()> {
    let mut tmp = PathBuf::from(path);
    tmp.as_mut_os_string().push(".tmp");
    let result = (|| {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(&report.encode_to_vec())?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// An exit report whose temporary file exists already: created before the seccomp filters go
/// on (they allow no open), filled and renamed into place at exit.
#[derive(Debug)]
pub struct Pending {
    file: std::fs::File,
    /// None: the launcher's file, written in place.
    tmp: Option<PathBuf>,
    path: PathBuf,
}

impl Pending {
    /// Creates `path` + ".tmp" (truncated) for the report to come. `/proc/self/fd/N` names a
    /// file the launcher opened and owns instead (huskd keeps it in a directory the VMM cannot
    /// write): the report is written into that file in place, with no rename.
    pub fn create(path: &Path) -> io::Result<Self> {
        if husk_devices::host_files::inherited_fd(path).is_some() {
            let mut options = std::fs::OpenOptions::new();
            options.write(true);
            let file = husk_devices::host_files::open(path, &options, true)?;
            return Ok(Pending {
                file,
                tmp: None,
                path: path.to_path_buf(),
            });
        }
        let mut tmp = PathBuf::from(path);
        tmp.as_mut_os_string().push(".tmp");
        let file = std::fs::File::create(&tmp)?;
        Ok(Pending {
            file,
            tmp: Some(tmp),
            path: path.to_path_buf(),
        })
    }

    /// Where the report goes.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes `report`, syncs it and renames the file into place (removed again on failure);
    /// an inherited file (empty, from the launcher) is written in place instead.
    pub fn finish(mut self, report: &ExitReport) -> io::Result<()> {
        let bytes = report.encode_to_vec();
        let Some(tmp) = self.tmp.take() else {
            // The launcher hands over an empty file: plain writes (the main thread's seccomp
            // list has write and fsync, not ftruncate) fill it from its start.
            return self
                .file
                .write_all(&bytes)
                .and_then(|()| self.file.sync_all());
        };
        let result = self
            .file
            .write_all(&bytes)
            .and_then(|()| self.file.sync_all())
            .and_then(|()| std::fs::rename(&tmp, &self.path));
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result
    }
}

/// Reads a report written by [`write`].
pub fn read(path: &Path) -> io::Result<ExitReport> {
    let bytes = std::fs::read(path)?;
    ExitReport::decode(bytes.as_slice()).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_utils::ScratchDir;

    use crate::test_utils::outcome;

    #[test]
    fn outcomes_map_to_reports() {
        let r = from_outcome(&outcome(StopReason::GuestReset, Some(7)));
        assert_eq!(
            (r.guest_exit_code, r.exit_status, r.reason.as_str()),
            (Some(7), 7, "guest exited")
        );
        let r = from_outcome(&outcome(StopReason::GuestReset, None));
        assert_eq!(
            (r.guest_exit_code, r.exit_status, r.reason.as_str()),
            (None, 125, "reset by guest")
        );
        let r = from_outcome(&outcome(StopReason::Signal(libc::SIGTERM), Some(0)));
        assert_eq!(
            (r.guest_exit_code, r.exit_status, r.reason.as_str()),
            (Some(0), 143, "SIGTERM")
        );
        let r = from_outcome(&outcome(StopReason::Requested, None));
        assert_eq!(
            (r.exit_status, r.reason.as_str()),
            (143, "stopped by request")
        );
        let r = from_outcome(&outcome(StopReason::Error("vcpu0: boom".into()), None));
        assert_eq!(
            (r.exit_status, r.reason.as_str()),
            (125, "error: vcpu0: boom")
        );
        let r = from_error(125, "cannot open kernel");
        assert_eq!(r.reason, "error: cannot open kernel");
    }

    #[test]
    fn written_atomically_and_read_back() {
        let dir = ScratchDir::new("exit-report");
        let path = dir.path().join("exit");
        std::fs::write(&path, b"old").unwrap();
        let report = from_outcome(&outcome(StopReason::GuestReset, Some(3)));
        write(&path, &report).unwrap();
        assert_eq!(read(&path).unwrap(), report);
        assert!(!dir.path().join("exit.tmp").exists());
        // Plain protobuf bytes, not framed.
        assert_eq!(std::fs::read(&path).unwrap(), report.encode_to_vec());
    }

    #[test]
    fn a_pending_report_is_created_early_and_renamed_at_the_end() {
        let dir = ScratchDir::new("exit-report-pending");
        let path = dir.path().join("exit");
        let pending = Pending::create(&path).unwrap();
        assert!(dir.path().join("exit.tmp").exists() && !path.exists());
        let report = from_error(125, "late");
        pending.finish(&report).unwrap();
        assert_eq!(read(&path).unwrap(), report);
        assert!(!dir.path().join("exit.tmp").exists());
    }

    #[test]
    fn a_report_into_an_inherited_fd_is_written_in_place_without_a_temporary_file() {
        use std::os::fd::AsRawFd;
        let dir = ScratchDir::new("exit-report-fd");
        let path = dir.path().join("exit.pb");
        let launcher_file = std::fs::File::create(&path).unwrap();
        let named = PathBuf::from(format!("/proc/self/fd/{}", launcher_file.as_raw_fd()));
        let pending = Pending::create(&named).unwrap();
        let report = from_error(125, "in place");
        pending.finish(&report).unwrap();
        assert_eq!(read(&path).unwrap(), report);
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            1,
            "no .tmp file"
        );
    }

    #[test]
    fn an_unwritable_path_is_an_error_and_leaves_nothing() {
        let dir = ScratchDir::new("exit-report-bad");
        let path = dir.path().join("missing-dir/exit");
        assert!(write(&path, &from_error(125, "x")).is_err());
        assert!(!path.exists());
    }
}
