//! `husk.dns=IP`: the guest resolves names through the host (its end of the link, where the
//! host's firewall forwards port 53 to its own resolver), so husk-init puts `nameserver IP`
//! into the application's /etc/resolv.conf: in the initramfs, or, with `husk.root=`, in the
//! mounted root, and only where /etc exists.
//!
//! An existing resolv.conf (a regular file) is covered with a bind mount of the generated one,
//! so a root disk image is never changed; a missing one is created (the disk then keeps it).
//! A symbolic link (resolvconf, systemd-resolved layouts) is left alone: it would be followed
//! from husk-init's root, not the application's.

use std::io;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

const PARAM: &str = "husk.dns=";

/// Where the generated file lives (the initramfs, which is memory) before it is bound.
const GENERATED: &str = "/run/husk-resolv.conf";

/// The nameserver named on the kernel command line, if any (an IPv4 address).
pub fn nameserver(cmdline: &str) -> Option<Ipv4Addr> {
    cmdline
        .split_ascii_whitespace()
        .find_map(|p| p.strip_prefix(PARAM))
        .and_then(|ip| ip.parse().ok())
}

/// The text of the generated resolv.conf.
pub fn resolv_conf(ip: Ipv4Addr) -> String {
    format!("# written by husk-init (husk.dns=)\nnameserver {ip}\n")
}

/// What to do with `root`'s /etc/resolv.conf.
#[derive(Debug, PartialEq, Eq)]
enum Plan {
    NoEtc,
    Symlink,
    Cover(PathBuf),
    Create(PathBuf),
}

fn plan(root: &Path) -> Plan {
    let etc = root.join("etc");
    if !etc.is_dir() {
        return Plan::NoEtc;
    }
    let file = etc.join("resolv.conf");
    match std::fs::symlink_metadata(&file) {
        Ok(m) if m.file_type().is_symlink() => Plan::Symlink,
        Ok(_) => Plan::Cover(file),
        Err(_) => Plan::Create(file),
    }
}

/// Writes the nameserver into the application's root (`/` or the mounted `husk.root=`).
pub fn configure(ip: Ipv4Addr, root: Option<&str>) -> io::Result<()> {
    let root = Path::new(root.unwrap_or("/"));
    let text = resolv_conf(ip);
    match plan(root) {
        Plan::NoEtc => {
            eprintln!(
                "husk-init: husk.dns: no /etc in the application's root; resolv.conf not written"
            );
            Ok(())
        }
        Plan::Symlink => {
            eprintln!("husk-init: husk.dns: /etc/resolv.conf is a symbolic link; left alone");
            Ok(())
        }
        Plan::Create(file) => std::fs::write(file, text),
        Plan::Cover(file) if root == Path::new("/") => std::fs::write(file, text),
        Plan::Cover(file) => {
            std::fs::write(GENERATED, text)?;
            rustix::mount::mount_bind(GENERATED, &file)?;
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A directory of its own under the temporary directory, removed on drop.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new() -> Self {
            let dir = std::env::temp_dir().join(format!("husk-init-dns-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir(&dir).unwrap();
            Scratch(dir)
        }

        fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn the_nameserver_is_read_from_the_kernel_command_line() {
        assert_eq!(
            nameserver("quiet ip=a::b husk.dns=169.254.128.1 husk.spec=x"),
            Some(Ipv4Addr::new(169, 254, 128, 1))
        );
        assert_eq!(nameserver("quiet husk.dns= x"), None);
        assert_eq!(nameserver("husk.dns=not-an-ip"), None);
        assert_eq!(nameserver("quiet"), None);
    }

    #[test]
    fn the_generated_file_names_only_the_host() {
        assert_eq!(
            resolv_conf(Ipv4Addr::new(169, 254, 128, 1)),
            "# written by husk-init (husk.dns=)\nnameserver 169.254.128.1\n"
        );
    }

    #[test]
    fn a_root_without_etc_is_left_alone_and_a_symlink_is_never_followed() {
        let dir = Scratch::new();
        assert_eq!(plan(dir.path()), Plan::NoEtc);
        std::fs::create_dir(dir.path().join("etc")).unwrap();
        let file = dir.path().join("etc/resolv.conf");
        assert_eq!(plan(dir.path()), Plan::Create(file.clone()));
        configure(Ipv4Addr::new(10, 0, 0, 1), dir.path().to_str()).unwrap();
        assert_eq!(
            std::fs::read_to_string(&file).unwrap(),
            resolv_conf(Ipv4Addr::new(10, 0, 0, 1))
        );
        assert_eq!(plan(dir.path()), Plan::Cover(file.clone()));
        std::fs::remove_file(&file).unwrap();
        std::os::unix::fs::symlink("/run/elsewhere", &file).unwrap();
        assert_eq!(plan(dir.path()), Plan::Symlink);
    }
}
