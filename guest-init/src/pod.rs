//! The rules for the containers of a pod inside one VM, shared by huskd (which checks an
//! AddContainer request), the containerd shim (which builds one) and the guest agent (which
//! carries it out), so the three cannot disagree.

/// Where the VM's pod share (the pod's kubelet directory, shared at boot) is mounted, inside
/// the VM's own root.
pub const POD_SHARE: &str = "/run/husk-pod";
/// Longest container id (containerd's are 64 hex digits).
pub const MAX_CONTAINER_ID: usize = 128;
/// Longest pod volume name (a Kubernetes volume name is a DNS label, at most 63).
pub const MAX_VOLUME_NAME: usize = 63;
/// Most files copied into one container.
pub const MAX_FILES: usize = 16;
/// Largest file copied into a container.
pub const MAX_FILE_BYTES: usize = 64 * 1024;

/// `[A-Za-z0-9_.-]{1,max}`, and not `.` or `..`: safe as one path component.
pub fn valid_name(name: &str, max: usize) -> bool {
    !name.is_empty()
        && name.len() <= max
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
}

/// Whether `path` is relative, non-empty and made of plain names only (no `.`, `..`, empty
/// parts, NUL): it stays below whatever it is joined to (links aside).
pub fn valid_relative_path(path: &str) -> bool {
    !path.is_empty()
        && !path.contains('\0')
        && path
            .split('/')
            .all(|c| !c.is_empty() && c != "." && c != "..")
}

/// Whether `path` is an absolute path in a container other than `/`, of plain names only.
pub fn valid_container_path(path: &str) -> bool {
    path.strip_prefix('/').is_some_and(valid_relative_path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_paths_stay_single_components_and_below_their_root() {
        assert!(valid_name("3f2a9c_web-1.0", MAX_CONTAINER_ID));
        for bad in [
            "",
            ".",
            "..",
            "a/b",
            "a b",
            "x\0",
            &"a".repeat(MAX_CONTAINER_ID + 1),
        ] {
            assert!(!valid_name(bad, MAX_CONTAINER_ID), "{bad:?}");
        }
        assert!(valid_container_path("/etc/config"));
        for bad in ["", "/", "rel", "/a/../b", "/a/./b", "/a//b", "/a/"] {
            assert!(!valid_container_path(bad), "{bad:?}");
        }
        assert!(valid_relative_path("volumes/kubernetes.io~configmap/cfg"));
        assert!(!valid_relative_path("/abs"));
        assert!(!valid_relative_path("a/../../b"));
    }
}
