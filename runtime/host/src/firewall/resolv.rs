//! Which resolver the guest's DNS goes to: the host's first IPv4 nameserver that is not a
//! loopback address (a guest's packets cannot be sent to the host's 127.0.0.0/8).

use std::io::Read;
use std::net::Ipv4Addr;
use std::path::Path;

/// Where the host's resolvers are listed, in order: the usual file, then systemd-resolved's
/// list of its upstream servers (used when the first only names its local stub).
pub const RESOLV_CONF: &str = "/etc/resolv.conf";
pub const RESOLVED_UPSTREAM: &str = "/run/systemd/resolve/resolv.conf";

/// resolv.conf files are small; a larger one is read only this far.
const MAX_BYTES: u64 = 64 * 1024;

/// The first IPv4 `nameserver` of a resolv.conf text that a guest can use (not loopback, not
/// unspecified).
pub fn first_usable_nameserver(text: &str) -> Option<Ipv4Addr> {
    text.lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            (words.next() == Some("nameserver")).then(|| words.next())?
        })
        .filter_map(|addr| addr.parse::<Ipv4Addr>().ok())
        .find(|ip| !ip.is_loopback() && !ip.is_unspecified())
}

/// The host's upstream resolver for guests, from `files` in order (missing files are skipped).
pub fn upstream_in(files: &[&Path]) -> Option<Ipv4Addr> {
    files.iter().find_map(|path| {
        let mut text = String::new();
        std::fs::File::open(path)
            .ok()?
            .take(MAX_BYTES)
            .read_to_string(&mut text)
            .ok()?;
        first_usable_nameserver(&text)
    })
}

/// The host's upstream resolver for guests; None when the host only has loopback resolvers.
pub fn upstream() -> Option<Ipv4Addr> {
    upstream_in(&[Path::new(RESOLV_CONF), Path::new(RESOLVED_UPSTREAM)])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_ipv4_nameserver_that_is_not_loopback_is_used() {
        let text = "# generated\nsearch example.org\nnameserver 127.0.0.53\n\
                    nameserver fd00::1\nnameserver   192.0.2.53  # comment\nnameserver 8.8.8.8\n";
        assert_eq!(
            first_usable_nameserver(text),
            Some(Ipv4Addr::new(192, 0, 2, 53))
        );
    }

    #[test]
    fn a_host_with_only_loopback_resolvers_has_none_for_guests() {
        assert_eq!(
            first_usable_nameserver("nameserver 127.0.0.53\noptions edns0\n"),
            None
        );
        assert_eq!(first_usable_nameserver("nameserver 0.0.0.0\n"), None);
        assert_eq!(first_usable_nameserver(""), None);
        assert_eq!(
            first_usable_nameserver("nameserver\nnameservers 1.1.1.1\n"),
            None
        );
    }

    #[test]
    fn systemd_resolveds_upstream_list_is_used_when_the_first_file_has_only_its_stub() {
        let dir = tempfile::tempdir().unwrap();
        let stub = dir.path().join("resolv.conf");
        let upstream = dir.path().join("upstream.conf");
        std::fs::write(&stub, "nameserver 127.0.0.53\n").unwrap();
        std::fs::write(&upstream, "nameserver 10.0.0.2\n").unwrap();
        let missing = dir.path().join("missing");
        assert_eq!(
            upstream_in(&[&missing, &stub, &upstream]),
            Some(Ipv4Addr::new(10, 0, 0, 2))
        );
        assert_eq!(upstream_in(&[&stub, &missing]), None);
    }
}
