//! Private directories under /tmp for the helpers a launcher starts beside a VM (passt,
//! virtiofsd): `/tmp/<prefix><pid>-<n>`, made by this process with a mode of the caller's, and
//! swept once their process is gone (a husk killed before it could clean up).

use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

/// A new directory `/tmp/<prefix><this pid>-<hex>` with `mode`, after sweeping the dead ones of
/// `prefix`.
pub fn private_dir(prefix: &str, mode: u32) -> io::Result<PathBuf> {
    private_dir_in(Path::new("/tmp"), prefix, mode)
}

fn private_dir_in(parent: &Path, prefix: &str, mode: u32) -> io::Result<PathBuf> {
    sweep_dead_dirs(parent, prefix);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    for attempt in 0..100u32 {
        let dir = parent.join(format!(
            "{prefix}{}-{:x}",
            std::process::id(),
            nanos.wrapping_add(attempt.wrapping_mul(7919))
        ));
        match std::fs::DirBuilder::new().mode(mode).create(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
    Err(io::Error::new(
        io::ErrorKind::AlreadyExists,
        format!("no free {}/{prefix}* name", parent.display()),
    ))
}

/// Removes the directories of `prefix` whose process is gone, among those this user owns
/// (never following a link).
fn sweep_dead_dirs(parent: &Path, prefix: &str) {
    use std::os::unix::fs::MetadataExt;
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    let me = rustix::process::geteuid().as_raw();
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(prefix))
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<i32>().ok())
        else {
            continue;
        };
        let owned =
            std::fs::symlink_metadata(entry.path()).is_ok_and(|m| m.is_dir() && m.uid() == me);
        let gone = rustix::process::Pid::from_raw(pid).is_some_and(|pid| {
            rustix::process::test_kill_process(pid) == Err(rustix::io::Errno::SRCH)
        });
        if owned && gone {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// The first `limit` bytes of the file at `path`, as text (a helper's pid file or stderr).
pub fn read_bounded(path: &Path, limit: u64) -> io::Result<String> {
    use std::io::Read;
    let mut text = String::new();
    std::fs::File::open(path)?
        .take(limit)
        .read_to_string(&mut text)?;
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directories_of_live_processes_stay_and_dead_ones_go() {
        let parent = tempfile::tempdir().unwrap();
        let mine = private_dir_in(parent.path(), "t-", 0o700).unwrap();
        assert!(mine
            .file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .starts_with(&format!("t-{}-", std::process::id())));
        let mode = std::fs::metadata(&mine).unwrap();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777,
            0o700
        );
        // A pid that cannot exist (above pid_max): its directory is swept by the next one.
        let dead = parent.path().join("t-4194305-1");
        std::fs::create_dir(&dead).unwrap();
        let other = parent.path().join("u-4194305-1");
        std::fs::create_dir(&other).unwrap();
        let second = private_dir_in(parent.path(), "t-", 0o711).unwrap();
        assert!(!dead.exists(), "a dead process's directory stayed");
        assert!(mine.exists() && second.exists() && other.exists());
        assert_ne!(mine, second);
    }
}
