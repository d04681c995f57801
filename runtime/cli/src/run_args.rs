//! Arguments of `husk run`, parsed and checked before anything is started.

use std::path::PathBuf;

/// What `husk run` was asked to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunArgs {
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    pub rootfs: Option<PathBuf>,
    pub disks: Vec<String>,
    pub net: bool,
    pub vsock: Option<PathBuf>,
    pub cpus: u32,
    pub memory_mib: u64,
    pub env: Vec<String>,
    pub workdir: Option<String>,
    pub cmdline: Option<String>,
    pub report_boot_time: bool,
    pub no_jail: bool,
    pub cgroup: Vec<String>,
    pub command: Vec<String>,
}

pub const USAGE: &str = "\
usage: husk run [OPTIONS] -- CMD [ARGS...]

Boots a micro-VM, runs CMD in it, streams its output and exits with its exit code.

options:
  --kernel PATH        guest kernel, ELF vmlinux or bzImage (default: $HUSK_HOME/kernel/vmlinux)
  --initrd PATH        initramfs (default: $HUSK_HOME/images/default.cpio.gz)
  --rootfs PATH        run CMD with this ext4 image as its root filesystem (guest /dev/vda)
  --disk PATH[:ro]     attach a raw disk image (repeatable; /dev/vdb, ... after --rootfs)
  --net                give the guest an IPv4 link to the host over a tap (needs root);
                       CMD sees HUSK_HOST_IP and HUSK_GUEST_IP
  --vsock PATH         virtio-vsock, guest CID 3; host side on the Unix socket PATH
                       (a client writes CONNECT <port> to reach a guest port; the guest's
                       connections to host port P go to PATH_P)
  --cpus N             vCPUs, 1..32 (default 1)
  --memory MIB         guest memory in MiB, 64..262144 (default 256)
  --env KEY=VALUE      environment entry for CMD (repeatable)
  --workdir DIR        working directory of CMD in the guest (default /)
  --cmdline STR        extra kernel command-line parameters
  --boot-time          print the time from VMM start to guest init on stderr
  --no-jail            as root, run husk-vmm directly instead of through husk-jailer (for
                       development; see docs/security.md). The jailed VMM runs as
                       HUSK_JAIL_UID:HUSK_JAIL_GID (default 65534), which must be able to
                       create the --vsock socket in its directory
  --cgroup FILE=VALUE  a limit of the jail's cgroup v2 (repeatable), e.g. memory.max=512M,
                       cpu.max=\"50000 100000\", pids.max=64, io.max=...
";

impl RunArgs {
    /// Parses the arguments that follow `husk run`.
    pub fn parse(args: &[String]) -> Result<Self, String> {
        let mut out = RunArgs {
            kernel: None,
            initrd: None,
            rootfs: None,
            disks: Vec::new(),
            net: false,
            vsock: None,
            cpus: 1,
            memory_mib: 256,
            env: Vec::new(),
            workdir: None,
            cmdline: None,
            report_boot_time: false,
            no_jail: false,
            cgroup: Vec::new(),
            command: Vec::new(),
        };
        let mut it = args.iter();
        while let Some(arg) = it.next() {
            let (name, inline) = match arg.split_once('=') {
                Some((n, v)) if n.starts_with("--") => (n, Some(v.to_string())),
                _ => (arg.as_str(), None),
            };
            let mut value = || -> Result<String, String> {
                inline
                    .clone()
                    .or_else(|| it.next().cloned())
                    .ok_or(format!("{name} needs a value"))
            };
            match name {
                "--" => {
                    out.command = it.by_ref().cloned().collect();
                    break;
                }
                "--kernel" => out.kernel = Some(value()?.into()),
                "--initrd" => out.initrd = Some(value()?.into()),
                "--rootfs" => out.rootfs = Some(value()?.into()),
                "--disk" => out.disks.push(value()?),
                "--net" => out.net = true,
                "--vsock" => out.vsock = Some(value()?.into()),
                "--cpus" => out.cpus = parse_number(name, &value()?)?,
                "--memory" => out.memory_mib = parse_number(name, &value()?)?,
                "--env" | "-e" => out.env.push(value()?),
                "--workdir" | "-w" => out.workdir = Some(value()?),
                "--cmdline" => out.cmdline = Some(value()?),
                "--boot-time" => out.report_boot_time = true,
                "--no-jail" => out.no_jail = true,
                "--cgroup" => {
                    let v = value()?;
                    if !v.contains('=') {
                        return Err(format!("--cgroup {v:?} is not FILE=VALUE"));
                    }
                    out.cgroup.push(v);
                }
                other if other.starts_with('-') => return Err(format!("unknown option {other}")),
                _ => {
                    // The command may also come without `--`, docker style.
                    out.command.push(arg.clone());
                    out.command.extend(it.by_ref().cloned());
                    break;
                }
            }
        }
        if out.command.is_empty() {
            return Err("no command given (husk run [OPTIONS] -- CMD [ARGS...])".into());
        }
        if !(1..=32).contains(&out.cpus) {
            return Err(format!("--cpus {} is out of range (1..32)", out.cpus));
        }
        if !(64..=262_144).contains(&out.memory_mib) {
            return Err(format!(
                "--memory {} MiB is out of range (64..262144)",
                out.memory_mib
            ));
        }
        if let Some(bad) = out
            .env
            .iter()
            .find(|e| e.split_once('=').is_none_or(|(k, _)| k.is_empty()))
        {
            return Err(format!("--env {bad:?} is not KEY=VALUE"));
        }
        Ok(out)
    }
}

fn parse_number<T: std::str::FromStr>(name: &str, text: &str) -> Result<T, String> {
    text.parse()
        .map_err(|_| format!("{name} {text:?} is not a number"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<RunArgs, String> {
        RunArgs::parse(&args.iter().map(|s| s.to_string()).collect::<Vec<_>>())
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
    }

    #[test]
    fn refuses_bad_values_with_a_precise_message() {
        assert!(parse(&["--",]).unwrap_err().contains("no command"));
        assert!(parse(&["--cpus", "0", "true"])
            .unwrap_err()
            .contains("--cpus 0 is out of range"));
        assert!(parse(&["--cpus", "33", "true"])
            .unwrap_err()
            .contains("out of range"));
        assert!(parse(&["--memory", "32", "true"])
            .unwrap_err()
            .contains("--memory 32 MiB"));
        assert!(parse(&["--memory", "262145", "true"])
            .unwrap_err()
            .contains("out of range (64..262144)"));
        assert_eq!(
            parse(&["--memory", "262144", "true"]).map(|a| a.memory_mib),
            Ok(262_144)
        );
        assert!(parse(&["--memory", "lots", "true"])
            .unwrap_err()
            .contains("not a number"));
        assert!(parse(&["--env", "NOVALUE", "true"])
            .unwrap_err()
            .contains("not KEY=VALUE"));
        assert!(parse(&["--frobnicate", "true"])
            .unwrap_err()
            .contains("unknown option"));
        assert!(parse(&["--kernel"]).unwrap_err().contains("needs a value"));
    }
}
