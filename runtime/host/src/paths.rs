//! Where husk's binaries and default guest artifacts are.

use std::io;
use std::path::{Path, PathBuf};

/// A binary or directory that could not be found.
#[derive(Debug, thiserror::Error)]
pub enum LookupError {
    #[error("neither HUSK_HOME nor HOME is set")]
    NoHome,
    #[error("{name} not found next to this program or on PATH (set {env_var})")]
    Binary { name: String, env_var: String },
}

/// A file the user named (or a default one) that is not there or not a file.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("{what} {} is not a file", .path.display())]
    NotAFile { what: String, path: PathBuf },
    /// `hint` says how to make the file (empty: no hint).
    #[error("{what} {}: {cause}{}", .path.display(), hint_text(.hint))]
    Unusable {
        what: String,
        path: PathBuf,
        cause: io::Error,
        hint: String,
    },
}

fn hint_text(hint: &str) -> String {
    if hint.is_empty() {
        String::new()
    } else {
        format!(" ({hint})")
    }
}

/// `$HUSK_HOME`, default `~/.local/share/husk`: the guest kernel and images scripts/setup builds.
pub fn husk_home() -> Result<PathBuf, LookupError> {
    if let Some(home) = std::env::var_os("HUSK_HOME") {
        return Ok(home.into());
    }
    let home = std::env::var_os("HOME").ok_or(LookupError::NoHome)?;
    Ok(PathBuf::from(home).join(".local/share/husk"))
}

/// The default guest kernel under `home`.
pub fn default_kernel(home: &Path) -> PathBuf {
    home.join("kernel/vmlinux")
}

/// The default initramfs (busybox + husk-init) under `home`.
pub fn default_initrd(home: &Path) -> PathBuf {
    home.join("images/default.cpio.gz")
}

/// A husk binary (`husk-vmm`, `husk-jailer`): `$env_var` if set, else next to the running
/// executable, else on `PATH`.
pub fn sibling_binary(name: &str, env_var: &str) -> Result<PathBuf, LookupError> {
    if let Some(path) = std::env::var_os(env_var) {
        return Ok(path.into());
    }
    let beside = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|d| d.join(name)));
    if let Some(path) = beside.filter(|p| p.is_file()) {
        return Ok(path);
    }
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
        .ok_or_else(|| LookupError::Binary {
            name: name.into(),
            env_var: env_var.into(),
        })
}

/// husk-vmm: `$HUSK_VMM`, else next to this executable, else on `PATH`.
pub fn vmm_binary() -> Result<PathBuf, LookupError> {
    sibling_binary("husk-vmm", "HUSK_VMM")
}

/// Checks that `path` is a regular file; the error names `what` and, when given, how to make it.
pub fn require_file(path: &Path, what: &str, hint: &str) -> Result<(), FileError> {
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() => Ok(()),
        Ok(_) => Err(FileError::NotAFile {
            what: what.into(),
            path: path.into(),
        }),
        Err(cause) => Err(FileError::Unusable {
            what: what.into(),
            path: path.into(),
            cause,
            hint: hint.into(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn require_file_names_what_is_missing_and_refuses_directories() {
        let err = require_file(Path::new("/nonexistent/k"), "kernel", "build it")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("kernel /nonexistent/k") && err.contains("build it"),
            "{err}"
        );
        let err = require_file(Path::new("/"), "rootfs", "").unwrap_err();
        assert_eq!(err.to_string(), "rootfs / is not a file");
        let err = require_file(Path::new("/nonexistent/r"), "rootfs", "").unwrap_err();
        assert!(err.to_string().ends_with("(os error 2)"), "{err}");
        require_file(Path::new("/proc/self/status"), "file", "").unwrap();
    }
}
