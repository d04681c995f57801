//! Shared host directories: `husk.fs=TAG:GUEST_PATH[:ro]` on the kernel command line, one per
//! virtio-fs device, asks husk-init to mount the file system tagged `TAG` at `GUEST_PATH` (inside
//! the application's root when it has one) before the application starts.
//!
//! The host writes the parameter ([`SharedMount::to_param`]) and husk-init reads it back
//! ([`SharedMount::all_from_cmdline`]): one codec, so the two cannot drift apart. The kernel's
//! parser splits the command line on spaces and knows no quoting, so a guest path is limited to
//! what travels there unchanged: absolute, no whitespace, no `:`, no `.`/`..` components.

/// Kernel command-line parameter name (with the `=`).
pub const PARAM: &str = "husk.fs=";
/// Longest guest path accepted.
pub const MAX_GUEST_PATH: usize = 256;

/// One shared directory as the guest mounts it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedMount {
    /// The virtio-fs tag (the device's config space names it).
    pub tag: String,
    /// Absolute path in the guest (in the application's root).
    pub guest_path: String,
    /// Mounted read-only (the host enforces it too: see `husk_host::virtiofs`).
    pub read_only: bool,
}

/// Why a shared mount was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShareError {
    #[error("tag {0:?}: use 1 to 36 of A-Z a-z 0-9 - _")]
    Tag(String),
    #[error("guest path {0:?}: must be absolute, at most 256 bytes, without whitespace, ':' or '.'/'..' parts, and not /")]
    GuestPath(String),
    #[error("{PARAM}{0}: expected TAG:GUEST_PATH or TAG:GUEST_PATH:ro")]
    Form(String),
}

/// Whether `tag` can name a virtio-fs device (the same rule as husk-vmm's `--fs`).
pub fn valid_tag(tag: &str) -> bool {
    (1..=36).contains(&tag.len())
        && tag
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Whether `path` can be a mount point given on the kernel command line.
pub fn valid_guest_path(path: &str) -> bool {
    path.starts_with('/')
        && path.len() > 1
        && path.len() <= MAX_GUEST_PATH
        && !path
            .bytes()
            .any(|b| b.is_ascii_whitespace() || b == b':' || b == 0 || !b.is_ascii_graphic())
        && path
            .split('/')
            .skip(1)
            .all(|part| !part.is_empty() && part != "." && part != "..")
}

impl SharedMount {
    /// A checked mount.
    pub fn new(tag: &str, guest_path: &str, read_only: bool) -> Result<Self, ShareError> {
        if !valid_tag(tag) {
            return Err(ShareError::Tag(tag.into()));
        }
        if !valid_guest_path(guest_path) {
            return Err(ShareError::GuestPath(guest_path.into()));
        }
        Ok(Self {
            tag: tag.into(),
            guest_path: guest_path.into(),
            read_only,
        })
    }

    /// The kernel command-line parameter for this mount.
    pub fn to_param(&self) -> String {
        let ro = if self.read_only { ":ro" } else { "" };
        format!("{PARAM}{}:{}{ro}", self.tag, self.guest_path)
    }

    /// Parses one parameter's value (after `husk.fs=`).
    pub fn parse_value(value: &str) -> Result<Self, ShareError> {
        let mut parts = value.split(':');
        let (Some(tag), Some(path)) = (parts.next(), parts.next()) else {
            return Err(ShareError::Form(value.into()));
        };
        let read_only = match (parts.next(), parts.next()) {
            (None, _) => false,
            (Some("ro"), None) => true,
            _ => return Err(ShareError::Form(value.into())),
        };
        Self::new(tag, path, read_only)
    }

    /// Every `husk.fs=` parameter of `cmdline`, in order; the first bad one is an error (the
    /// application must not start without a volume it was promised).
    pub fn all_from_cmdline(cmdline: &str) -> Result<Vec<Self>, ShareError> {
        cmdline
            .split_ascii_whitespace()
            .filter_map(|p| p.strip_prefix(PARAM))
            .map(Self::parse_value)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mount_round_trips_through_the_command_line() {
        let mounts = [
            SharedMount::new("husk-fs0", "/data", false).unwrap(),
            SharedMount::new("husk-fs1", "/srv/conf_1", true).unwrap(),
        ];
        let cmdline = format!(
            "console=ttyS0 {} quiet {}",
            mounts[0].to_param(),
            mounts[1].to_param()
        );
        assert_eq!(SharedMount::all_from_cmdline(&cmdline).unwrap(), mounts);
        assert_eq!(SharedMount::all_from_cmdline("console=ttyS0").unwrap(), []);
    }

    #[test]
    fn paths_and_tags_that_cannot_travel_or_escape_are_refused() {
        for path in [
            "data", "/", "/a b", "/a:b", "/a/../b", "/a/./b", "/a//b", "/a/", "/\u{e9}", "",
        ] {
            assert!(
                matches!(
                    SharedMount::new("t", path, false),
                    Err(ShareError::GuestPath(_))
                ),
                "{path:?}"
            );
        }
        assert!(SharedMount::new(&"x".repeat(257), "/a", false).is_err());
        for tag in ["", "a b", "a:b", "a,b", &"t".repeat(37)] {
            assert!(SharedMount::new(tag, "/a", false).is_err(), "{tag:?}");
        }
    }

    #[test]
    fn a_malformed_parameter_is_an_error_not_a_skipped_mount() {
        for bad in [
            "husk.fs=t",
            "husk.fs=t:/a:rw",
            "husk.fs=t:/a:ro:x",
            "husk.fs=:/a",
        ] {
            assert!(SharedMount::all_from_cmdline(bad).is_err(), "{bad}");
        }
    }
}
