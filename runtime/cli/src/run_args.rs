//! Arguments of `husk run`, parsed (clap) and checked before anything is started.

use std::path::PathBuf;

use husk_host::firewall::{Cidr, EgressPolicy, NetworkPolicy, PolicyError, PortMapping};
use husk_host::virtiofs::SharedDir;
use husk_host::vmm_args::{DiskLimit, RateLimit, MAX_SHARED_DIRS};

/// Boot a micro-VM, run CMD in it, stream its output and exit with its exit code.
///
/// Everything after `--` (or from the first argument that is not an option on) is CMD and its
/// arguments, passed to the guest untouched.
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
#[command(args_override_self = true)]
pub struct RunArgs {
    /// Guest kernel, ELF vmlinux or bzImage [default: $HUSK_HOME/kernel/vmlinux]
    #[arg(long, value_name = "PATH")]
    pub kernel: Option<PathBuf>,
    /// Initramfs [default: $HUSK_HOME/images/default.cpio.gz]
    #[arg(long, value_name = "PATH")]
    pub initrd: Option<PathBuf>,
    /// Run CMD with this ext4 image as its root filesystem (guest /dev/vda). The image is a
    /// read-only base: the VM writes to a throw-away copy-on-write overlay (docs/storage.md)
    #[arg(long, value_name = "PATH", conflicts_with = "image")]
    pub rootfs: Option<PathBuf>,
    /// Run CMD in an OCI image: oci-dir:PATH (an image layout directory) or oci-archive:PATH
    /// (a tar of one). Its layers become a cached read-only base (built once per image, as
    /// root), written through a throw-away overlay; without CMD the image's entrypoint and
    /// command run, and its environment and working directory apply (docs/storage.md)
    #[arg(long, value_name = "oci-dir:PATH|oci-archive:PATH")]
    pub image: Option<husk_host::oci_image::ImageSource>,
    /// The format of --rootfs [default: qcow2 for a .qcow2 name, else raw]
    #[arg(long, value_name = "FORMAT", requires = "rootfs")]
    pub rootfs_format: Option<husk_host::vmm_args::DiskFormat>,
    /// Keep the root filesystem's writes in this qcow2 overlay: created over --rootfs when
    /// missing, used again when it exists
    #[arg(
        long,
        value_name = "PATH",
        requires = "rootfs",
        conflicts_with = "write_rootfs"
    )]
    pub overlay: Option<PathBuf>,
    /// Write the --rootfs image itself instead of an overlay
    #[arg(long, requires = "rootfs")]
    pub write_rootfs: bool,
    /// Attach a disk image (repeatable; /dev/vdb, ... after --rootfs): PATH[:ro], raw or, for
    /// a .qcow2 name, qcow2 with its backing chain; written in place
    #[arg(long = "disk", value_name = "PATH[:ro]")]
    pub disks: Vec<String>,
    /// Give the guest an IPv4 network (docs/networking.md); CMD sees HUSK_HOST_IP and
    /// HUSK_GUEST_IP. MODE tap (the default): a link to the host over a tap (needs root and
    /// nftables), with NAT to the host's uplinks and DNS through the host's resolver. MODE
    /// user: rootless, user-mode networking through passt (no privilege; no egress policy)
    #[arg(
        long,
        value_name = "MODE",
        value_enum,
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "tap"
    )]
    pub net: Option<NetMode>,
    /// With --net: publish guest port GUESTPORT on the host's HOSTPORT (all of the host's
    /// addresses, or HOSTIP only); repeatable
    #[arg(
        short = 'p',
        long = "publish",
        value_name = "[HOSTIP:]HOSTPORT:GUESTPORT[/tcp|/udp]"
    )]
    pub publish: Vec<PortMapping>,
    /// With --net: let the guest reach only these networks (repeatable; allow-list mode; also
    /// opens the host's own addresses and 169.254.0.0/16, denied by default)
    #[arg(long = "egress-allow", value_name = "CIDR")]
    pub egress_allow: Vec<Cidr>,
    /// With --net: never let the guest reach these networks (repeatable; wins over
    /// --egress-allow)
    #[arg(long = "egress-deny", value_name = "CIDR")]
    pub egress_deny: Vec<Cidr>,
    /// With --net: let the guest connect to any port of the link's host end ($HUSK_HOST_IP);
    /// without it only ping answers there
    #[arg(long = "host-access")]
    pub host_access: bool,
    /// Rate limit of a disk: bw=RATE[:BURST] (bytes/s) and/or ops=RATE[:BURST] (requests/s),
    /// comma-separated; K, M, G (powers of 1024); a burst of 0 or none is one second's worth.
    /// N: the disk (0 = --rootfs if given, else the first --disk; 0 when left out); repeatable
    #[arg(long = "disk-limit", value_name = "[N:]LIMIT")]
    pub disk_limits: Vec<DiskLimit>,
    /// With --net: rate limit of the frames the guest receives (LIMIT as for --disk-limit)
    #[arg(long = "net-rx-limit", value_name = "LIMIT")]
    pub net_rx_limit: Option<RateLimit>,
    /// With --net: rate limit of the frames the guest sends (LIMIT as for --disk-limit)
    #[arg(long = "net-tx-limit", value_name = "LIMIT")]
    pub net_tx_limit: Option<RateLimit>,
    /// virtio-vsock, guest CID 3; host side on the Unix socket PATH (a client writes
    /// CONNECT <port> to reach a guest port; the guest's connections to host port P go to
    /// PATH_P)
    #[arg(long, value_name = "PATH")]
    pub vsock: Option<PathBuf>,
    /// Share a host directory with the guest over virtio-fs (repeatable, at most 8), mounted
    /// at GUEST (absolute) before CMD starts; HOST relative to the current directory. :ro makes
    /// it read-only, enforced on the host too. Needs root: one sandboxed virtiofsd
    /// (qemu-system-common) serves each; such a VM cannot be snapshotted (docs/volumes.md)
    #[arg(short = 'v', long = "volume", value_name = "HOST:GUEST[:ro]")]
    pub volumes: Vec<SharedDir>,
    /// vCPUs, 1..32
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub cpus: u32,
    /// Guest memory in MiB, 64..262144
    #[arg(long = "memory", value_name = "MIB", default_value_t = 256)]
    pub memory_mib: u64,
    /// Environment entry for CMD (repeatable)
    #[arg(short = 'e', long, value_name = "KEY=VALUE")]
    pub env: Vec<String>,
    /// Working directory of CMD in the guest [default: /]
    #[arg(short = 'w', long, value_name = "DIR")]
    pub workdir: Option<String>,
    /// Extra kernel command-line parameters
    #[arg(long, value_name = "STR")]
    pub cmdline: Option<String>,
    /// Print the time from VMM start to guest init on stderr
    #[arg(long = "boot-time")]
    pub report_boot_time: bool,
    /// No memory balloon: memory the guest frees is not given back to the host (see
    /// docs/balloon.md)
    #[arg(long = "no-balloon")]
    pub no_balloon: bool,
    /// As root, run husk-vmm directly instead of through husk-jailer (for development; see
    /// docs/security.md). The jailed VMM runs as HUSK_JAIL_UID:HUSK_JAIL_GID (default 65534),
    /// which must be able to create the --vsock socket in its directory
    #[arg(long = "no-jail")]
    pub no_jail: bool,
    /// A limit of the jail's cgroup v2 (repeatable), e.g. memory.max=512M,
    /// cpu.max="50000 100000", pids.max=64, io.max=...
    #[arg(long, value_name = "FILE=VALUE")]
    pub cgroup: Vec<String>,
    /// The command to run in the guest and its arguments
    #[arg(value_name = "CMD", trailing_var_arg = true)]
    pub command: Vec<String>,
}

/// How `husk run --net` connects the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum NetMode {
    /// A tap with husk's firewall (root).
    Tap,
    /// User-mode networking through passt (rootless).
    User,
}

/// A `husk run` request that parsed but cannot be run.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RunArgsError {
    #[error("no command given (husk run [OPTIONS] -- CMD [ARGS...])")]
    NoCommand,
    #[error("--cpus {0} is out of range (1..32)")]
    Cpus(u32),
    #[error("--memory {0} MiB is out of range (64..262144)")]
    Memory(u64),
    #[error("--env {0:?} is not KEY=VALUE")]
    Env(String),
    #[error("--cgroup {0:?} is not FILE=VALUE")]
    Cgroup(String),
    #[error("{0} needs --net")]
    NeedsNet(&'static str),
    #[error(
        "{0} is not available with --net=user: passt has no egress filter (use --net, which \
         needs root)"
    )]
    NotWithUserNet(&'static str),
    #[error("--publish: {0}")]
    Publish(PolicyError),
    #[error("--disk-limit {0}: there is no such disk ({1} given with --rootfs and --disk)")]
    NoSuchDisk(u32, usize),
    #[error("--volume: {0} shared directories given, at most {MAX_SHARED_DIRS}")]
    TooManyVolumes(usize),
    #[error("--volume: two shared directories at guest path {0}")]
    VolumeTwice(String),
}

impl RunArgs {
    /// The checks that need the whole command line, with the messages `husk run` has always
    /// given (tests/tests/cli_errors.rs holds them).
    pub fn check(&self) -> Result<(), RunArgsError> {
        if self.command.is_empty() && self.image.is_none() {
            return Err(RunArgsError::NoCommand);
        }
        if !(1..=32).contains(&self.cpus) {
            return Err(RunArgsError::Cpus(self.cpus));
        }
        if !(64..=262_144).contains(&self.memory_mib) {
            return Err(RunArgsError::Memory(self.memory_mib));
        }
        if let Some(bad) = self
            .env
            .iter()
            .find(|e| e.split_once('=').is_none_or(|(k, _)| k.is_empty()))
        {
            return Err(RunArgsError::Env(bad.clone()));
        }
        if let Some(bad) = self.cgroup.iter().find(|c| !c.contains('=')) {
            return Err(RunArgsError::Cgroup(bad.clone()));
        }
        if self.net == Some(NetMode::User) {
            for (flag, given) in [
                ("--egress-allow", !self.egress_allow.is_empty()),
                ("--egress-deny", !self.egress_deny.is_empty()),
            ] {
                if given {
                    return Err(RunArgsError::NotWithUserNet(flag));
                }
            }
        }
        if self.net.is_none() {
            for (flag, given) in [
                ("--publish", !self.publish.is_empty()),
                ("--egress-allow", !self.egress_allow.is_empty()),
                ("--egress-deny", !self.egress_deny.is_empty()),
                ("--host-access", self.host_access),
                ("--net-rx-limit", self.net_rx_limit.is_some()),
                ("--net-tx-limit", self.net_tx_limit.is_some()),
            ] {
                if given {
                    return Err(RunArgsError::NeedsNet(flag));
                }
            }
        }
        let disks = self.disks.len() + usize::from(self.rootfs.is_some());
        if let Some(bad) = self.disk_limits.iter().find(|l| l.disk as usize >= disks) {
            return Err(RunArgsError::NoSuchDisk(bad.disk, disks));
        }
        if self.volumes.len() > MAX_SHARED_DIRS {
            return Err(RunArgsError::TooManyVolumes(self.volumes.len()));
        }
        for (i, v) in self.volumes.iter().enumerate() {
            if self.volumes[..i].iter().any(|w| w.guest == v.guest) {
                return Err(RunArgsError::VolumeTwice(v.guest.clone()));
            }
        }
        self.network_policy()
            .check()
            .map_err(RunArgsError::Publish)?;
        Ok(())
    }

    /// The published ports and egress policy of `--net`.
    pub fn network_policy(&self) -> NetworkPolicy {
        NetworkPolicy {
            published: self.publish.clone(),
            egress: EgressPolicy {
                allow: self.egress_allow.clone(),
                deny: self.egress_deny.clone(),
                host_access: self.host_access,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::error::ErrorKind;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Harness {
        #[command(flatten)]
        run: RunArgs,
    }

    /// Parses and checks as `husk run` does.
    fn parse(args: &[&str]) -> anyhow::Result<RunArgs> {
        let h = Harness::try_parse_from(std::iter::once("run").chain(args.iter().copied()))?;
        h.run.check()?;
        Ok(h.run)
    }

    /// The message of a refused command line.
    fn refusal(args: &[&str]) -> String {
        match parse(args) {
            Ok(a) => panic!("{args:?} accepted: {a:?}"),
            Err(e) => e.to_string(),
        }
    }

    fn clap_error(args: &[&str]) -> ErrorKind {
        Harness::try_parse_from(std::iter::once("run").chain(args.iter().copied()))
            .map(|_| ())
            .unwrap_err()
            .kind()
    }

    #[test]
    fn parses_options_and_the_command_after_the_separator() {
        let a = parse(&[
            "--cpus",
            "4",
            "--memory=2048",
            "-e",
            "A=1",
            "--",
            "sh",
            "-c",
            "--x",
        ])
        .unwrap();
        assert_eq!((a.cpus, a.memory_mib), (4, 2048));
        assert_eq!(a.env, vec!["A=1"]);
        assert_eq!(a.command, vec!["sh", "-c", "--x"]);
    }

    #[test]
    fn takes_the_command_without_a_separator_and_keeps_its_flags() {
        let a = parse(&["--boot-time", "ls", "-la", "/"]).unwrap();
        assert!(a.report_boot_time);
        assert_eq!(a.command, vec!["ls", "-la", "/"]);
        // Options that husk knows are the command's once the command began.
        let a = parse(&["sh", "--cpus", "9", "--help", "-e", "--", "x"]).unwrap();
        assert_eq!(a.cpus, 1);
        assert_eq!(a.command, ["sh", "--cpus", "9", "--help", "-e", "--", "x"]);
    }

    #[test]
    fn defaults_repeats_and_every_option_land_in_their_fields() {
        let a = parse(&[
            "--kernel=/k",
            "--initrd",
            "/i",
            "--rootfs",
            "/r.ext4",
            "--disk",
            "/a:ro",
            "--disk=/b",
            "--net",
            "--vsock",
            "/v.sock",
            "--cpus",
            "2",
            "--cpus",
            "3",
            "-w",
            "/tmp",
            "--cmdline",
            "a=b c",
            "--no-jail",
            "--cgroup",
            "pids.max=64",
            "true",
        ])
        .unwrap();
        assert_eq!(a.kernel, Some(PathBuf::from("/k")));
        assert_eq!(a.initrd, Some(PathBuf::from("/i")));
        assert_eq!(a.rootfs, Some(PathBuf::from("/r.ext4")));
        assert_eq!(a.disks, ["/a:ro", "/b"]);
        assert!(a.net == Some(NetMode::Tap) && a.no_jail && !a.report_boot_time);
        assert_eq!(a.vsock, Some(PathBuf::from("/v.sock")));
        assert_eq!(a.cpus, 3, "the last value wins");
        assert_eq!(a.memory_mib, 256);
        assert_eq!(a.workdir.as_deref(), Some("/tmp"));
        assert_eq!(a.cmdline.as_deref(), Some("a=b c"));
        assert_eq!(a.cgroup, ["pids.max=64"]);
        assert_eq!(a.command, ["true"]);
    }

    #[test]
    fn published_ports_and_egress_cidrs_are_repeatable_and_parsed() {
        let a = parse(&[
            "--net",
            "-p",
            "8080:80",
            "--publish=127.0.0.1:5353:53/udp",
            "--egress-allow",
            "10.0.0.0/8",
            "--egress-allow=192.0.2.1",
            "--egress-deny",
            "10.9.0.0/16",
            "true",
        ])
        .unwrap();
        let policy = a.network_policy();
        let ports: Vec<String> = policy.published.iter().map(ToString::to_string).collect();
        assert_eq!(ports, ["8080:80/tcp", "127.0.0.1:5353:53/udp"]);
        let allow: Vec<String> = policy
            .egress
            .allow
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(allow, ["10.0.0.0/8", "192.0.2.1/32"]);
        assert_eq!(policy.egress.deny[0].to_string(), "10.9.0.0/16");
    }

    #[test]
    fn refuses_bad_values_with_a_precise_message() {
        assert!(refusal(&["--",]).contains("no command"));
        assert!(refusal(&[]).contains("no command"));
        assert!(refusal(&["--cpus", "0", "true"]).contains("--cpus 0 is out of range"));
        assert!(refusal(&["--cpus", "33", "true"]).contains("out of range"));
        assert!(refusal(&["--memory", "32", "true"]).contains("--memory 32 MiB"));
        assert!(refusal(&["--memory", "262145", "true"]).contains("out of range (64..262144)"));
        assert_eq!(
            parse(&["--memory", "262144", "true"]).unwrap().memory_mib,
            262_144
        );
        let lots = refusal(&["--memory", "lots", "true"]);
        assert!(lots.contains("lots") && lots.contains("--memory"), "{lots}");
        assert_eq!(
            clap_error(&["--memory", "lots", "true"]),
            ErrorKind::ValueValidation
        );
        assert!(refusal(&["--env", "NOVALUE", "true"]).contains("not KEY=VALUE"));
        assert!(refusal(&["--env", "=v", "true"]).contains("not KEY=VALUE"));
        assert!(refusal(&["--cgroup", "nofile", "true"]).contains("not FILE=VALUE"));
        assert!(refusal(&["--frobnicate", "true"]).contains("--frobnicate"));
        assert_eq!(
            clap_error(&["--frobnicate", "true"]),
            ErrorKind::UnknownArgument
        );
        assert!(refusal(&["-p", "8080:80", "true"]).contains("--publish needs --net"));
        assert!(refusal(&["--egress-deny", "10.0.0.0/8", "true"]).contains("needs --net"));
        let twice = refusal(&["--net", "-p", "80:80", "--publish=80:81", "true"]);
        assert!(
            twice.contains("host port 80/tcp is published twice"),
            "{twice}"
        );
        let port = refusal(&["--net", "-p", "0:80", "true"]);
        assert!(port.contains("\"0\" is not a port"), "{port}");
        assert_eq!(
            clap_error(&["--net", "-p", "x", "true"]),
            ErrorKind::ValueValidation
        );
        let cidr = refusal(&["--net", "--egress-allow", "10.0.0.0/40", "true"]);
        assert!(cidr.contains("expected an IPv4 address"), "{cidr}");
        assert!(refusal(&["--kernel"]).contains("--kernel"));
        assert_eq!(clap_error(&["--kernel"]), ErrorKind::InvalidValue);
    }

    #[test]
    fn net_takes_an_optional_mode_after_an_equals_sign() {
        assert_eq!(parse(&["true"]).unwrap().net, None);
        assert_eq!(parse(&["--net", "true"]).unwrap().net, Some(NetMode::Tap));
        assert_eq!(
            parse(&["--net=tap", "true"]).unwrap().net,
            Some(NetMode::Tap)
        );
        let a = parse(&["--net=user", "--", "sh", "-c", "x"]).unwrap();
        assert_eq!(a.net, Some(NetMode::User));
        assert_eq!(a.command, ["sh", "-c", "x"]);
        // Without '=' the next word is the command, as it always was.
        let a = parse(&["--net", "sh", "-c", "x"]).unwrap();
        assert_eq!((a.net, a.command.len()), (Some(NetMode::Tap), 3));
        let a = parse(&["--net", "user"]).unwrap();
        assert_eq!(
            (a.net, a.command),
            (Some(NetMode::Tap), vec!["user".into()])
        );
        assert_eq!(clap_error(&["--net=wifi", "true"]), ErrorKind::InvalidValue);
    }

    #[test]
    fn user_networking_takes_ports_host_access_and_limits_but_no_egress_policy() {
        let a = parse(&[
            "--net=user",
            "-p",
            "8080:80",
            "--publish=127.0.0.1:5353:53/udp",
            "--host-access",
            "--net-rx-limit",
            "bw=1M",
            "--net-tx-limit=ops=100",
            "true",
        ])
        .unwrap();
        assert_eq!(a.publish.len(), 2);
        assert!(a.host_access && a.net_rx_limit.is_some() && a.net_tx_limit.is_some());
        let allow = refusal(&["--net=user", "--egress-allow", "10.0.0.0/8", "true"]);
        assert!(
            allow.contains("--egress-allow is not available with --net=user")
                && allow.contains("passt has no egress filter"),
            "{allow}"
        );
        let deny = refusal(&["--net=user", "--egress-deny", "10.0.0.0/8", "true"]);
        assert!(deny.contains("--egress-deny is not available"), "{deny}");
        let twice = refusal(&["--net=user", "-p", "80:80", "-p", "80:81", "true"]);
        assert!(twice.contains("published twice"), "{twice}");
    }

    #[test]
    fn volumes_are_repeatable_with_their_mode_and_checked() {
        let a = parse(&[
            "-v",
            "/srv/data:/data",
            "--volume=rel/conf:/etc/app:ro",
            "-v",
            "/x:/y:rw",
            "--",
            "ls",
            "-v",
        ])
        .unwrap();
        let v: Vec<String> = a.volumes.iter().map(ToString::to_string).collect();
        assert_eq!(v, ["/srv/data:/data", "rel/conf:/etc/app:ro", "/x:/y"]);
        assert!(a.volumes[1].read_only && !a.volumes[2].read_only);
        assert_eq!(
            a.command,
            ["ls", "-v"],
            "-v after the command is the command's"
        );
        assert!(parse(&["true"]).unwrap().volumes.is_empty());
        let form = refusal(&["-v", "/only-host", "true"]);
        assert!(
            form.contains("/only-host") && form.contains("expected HOST:GUEST"),
            "{form}"
        );
        assert_eq!(
            clap_error(&["-v", "/a:/b:rx", "true"]),
            ErrorKind::ValueValidation
        );
        let guest = refusal(&["-v", "/a:relative", "true"]);
        assert!(guest.contains("guest path \"relative\""), "{guest}");
        assert!(refusal(&["-v", "/a:/x/../y", "true"]).contains("guest path"));
        let twice = refusal(&["-v", "/a:/d", "-v", "/b:/d:ro", "true"]);
        assert_eq!(twice, "--volume: two shared directories at guest path /d");
        let nine: Vec<String> = (0..9).map(|i| format!("--volume=/h:/g{i}")).collect();
        let mut argv: Vec<&str> = nine.iter().map(String::as_str).collect();
        argv.push("true");
        assert_eq!(
            refusal(&argv),
            "--volume: 9 shared directories given, at most 8"
        );
        argv.remove(0);
        assert_eq!(parse(&argv).unwrap().volumes.len(), 8);
    }

    #[test]
    fn rate_limits_parse_and_need_their_device() {
        let a = parse(&[
            "--rootfs",
            "/r.ext4",
            "--disk",
            "/d.img",
            "--disk-limit",
            "bw=10M",
            "--disk-limit=1:ops=100:200",
            "--net",
            "--net-rx-limit",
            "bw=1G:2G,ops=10k",
            "true",
        ])
        .unwrap();
        assert_eq!(a.disk_limits.len(), 2);
        assert_eq!(a.disk_limits[0].disk, 0);
        assert_eq!(a.disk_limits[0].limit.bandwidth.unwrap().rate, 10 << 20);
        assert_eq!(a.disk_limits[1].limit.ops.unwrap().burst, 200);
        assert_eq!(a.net_rx_limit.unwrap().ops.unwrap().rate, 10 << 10);
        assert!(
            refusal(&["--net-tx-limit", "bw=1M", "true"]).contains("--net-tx-limit needs --net")
        );
        let no_disk = refusal(&["--disk", "/d", "--disk-limit", "1:bw=1M", "true"]);
        assert!(
            no_disk.contains("--disk-limit 1: there is no such disk"),
            "{no_disk}"
        );
        assert_eq!(
            clap_error(&["--disk-limit", "bw=0", "true"]),
            ErrorKind::ValueValidation
        );
    }
}
