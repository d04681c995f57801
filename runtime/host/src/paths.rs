//! Where husk's binaries and default guest artifacts are.

use std::path::{Path, PathBuf};

/// `$HUSK_HOME`, default `~/.local/share/husk`: the guest kernel and images scripts/setup builds.
pub fn husk_home() -> Result<PathBuf, String> {
    if let Some(home) = std::env::var_os("HUSK_HOME") {
        return Ok(home.into());
    }
    let home = std::env::var_os("HOME").ok_or("neither HUSK_HOME nor HOME is set")?;
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
pub fn sibling_binary(name: &str, env_var: &str) -> Result<PathBuf, String> {
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
        .ok_or_else(|| format!("{name} not found next to this program or on PATH (set {env_var})"))
}

/// husk-vmm: `$HUSK_VMM`, else next to this executable, else on `PATH`.
pub fn vmm_binary() -> Result<PathBuf, String> {
    sibling_binary("husk-vmm", "HUSK_VMM")
}

/// Checks that `path` is a regular file; the error names `what` and, when given, how to make it.
pub fn require_file(path: &Path, what: &str, hint: &str) -> Result<(), String> {
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() => Ok(()),
        Ok(_) => Err(format!("{what} {} is not a file", path.display())),
        Err(e) if hint.is_empty() => Err(format!("{what} {}: {e}", path.display())),
        Err(e) => Err(format!("{what} {}: {e} ({hint})", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn require_file_names_what_is_missing_and_refuses_directories() {
        let err = require_file(Path::new("/nonexistent/k"), "kernel", "build it").unwrap_err();
        assert!(
            err.contains("kernel /nonexistent/k") && err.contains("build it"),
            "{err}"
        );
        let err = require_file(Path::new("/"), "rootfs", "").unwrap_err();
        assert_eq!(err, "rootfs / is not a file");
        require_file(Path::new("/proc/self/status"), "file", "").unwrap();
    }
}
