//! `husk.hostname=NAME`: the guest's host name (UTS), set by husk-init before anything runs. A
//! Kubernetes pod's containers share it, as they share its VM (the pod's hostname).
//!
//! One codec for both sides, like [`crate::shares`]: the host writes [`to_param`], husk-init
//! reads [`from_cmdline`].

/// Kernel command-line parameter name (with the `=`).
pub const PARAM: &str = "husk.hostname=";
/// Longest host name (HOST_NAME_MAX on Linux).
pub const MAX_HOSTNAME: usize = 64;

/// Whether `name` is a host name: 1..=64 of `a-z A-Z 0-9 - .`, not starting or ending with
/// `-` or `.` (RFC 1123 labels, dots between them).
pub fn valid_hostname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_HOSTNAME
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
        && !name.starts_with(['-', '.'])
        && !name.ends_with(['-', '.'])
}

/// The parameter that asks for host name `name` (checked with [`valid_hostname`] first).
pub fn to_param(name: &str) -> String {
    format!("{PARAM}{name}")
}

/// The host name the command line asks for; `None` when it names none or a malformed one.
pub fn from_cmdline(cmdline: &str) -> Option<&str> {
    cmdline
        .split_ascii_whitespace()
        .find_map(|p| p.strip_prefix(PARAM))
        .filter(|n| valid_hostname(n))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_names_round_trip_and_bad_ones_are_ignored() {
        assert_eq!(
            from_cmdline(&format!("quiet {} husk.spec=x", to_param("web-0.pods"))),
            Some("web-0.pods")
        );
        assert_eq!(from_cmdline("quiet"), None);
        for bad in ["", "-a", "a.", "a b", "a_b", &"a".repeat(65)] {
            assert!(!valid_hostname(bad), "{bad:?}");
        }
        assert_eq!(from_cmdline("husk.hostname=a_b"), None);
    }
}
