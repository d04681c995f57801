//! The command line of `husk` (clap derive): the global options, every verb and its options.
//!
//! `main` turns the parse into an action; `remote` and `snapshot_cmd` turn a verb's options
//! into a huskd request.

use clap::{Args, Parser, Subcommand};

use crate::image_cmd::ImageArgs;
use crate::rate_limit_cmd::{LimitArgs, UpdateArgs};
use crate::remote::DEFAULT_HOST;
use crate::run_args::RunArgs;
use crate::snapshot_cmd::{RestoreArgs, SnapshotArgs};

/// husk: micro-VM sandboxes. `husk run` boots one directly (no daemon); the other verbs drive
/// huskd over gRPC.
#[derive(Debug, Parser)]
#[command(name = "husk", version)]
pub struct Cli {
    /// huskd's address: unix:///path/to.sock or http://HOST:PORT
    #[arg(long, value_name = "ADDR", env = "HUSK_HOST", default_value = DEFAULT_HOST)]
    pub host: String,
    #[command(subcommand)]
    pub command: Verb,
}

#[derive(Debug, Subcommand)]
pub enum Verb {
    /// Boot a micro-VM, run CMD, exit with its exit code (no daemon)
    ///
    /// Everything after `--`, or from the first argument that is not an option on, is CMD and
    /// its arguments, passed to the guest untouched. The exit code is CMD's (128+N when signal
    /// N killed it), 125 when husk itself failed, 130 after Ctrl-C.
    #[command(override_usage = "husk run [OPTIONS] [--] <CMD>...")]
    Run(RunArgs),
    /// Record a VM (no CMD: a sandbox for exec); prints its id
    Create(CreateArgs),
    /// Start created or stopped VMs
    Start(VmList),
    /// Stop VMs gracefully (SIGTERM to the application), then kill them
    Stop(StopArgs),
    /// Delete VMs
    Rm(RmArgs),
    /// List VMs
    Ps(PsArgs),
    /// Details of a VM
    Inspect(InspectArgs),
    /// Run CMD in a running VM
    #[command(override_usage = "husk exec [OPTIONS] <VM> [--] <CMD>...")]
    Exec(ExecArgs),
    /// The VM's console output
    Logs(LogsArgs),
    /// Stop VMs' vCPUs
    Pause(VmList),
    /// Change a running VM's rate limits (--disk-limit, --net-rx-limit, --net-tx-limit)
    Update(UpdateArgs),
    /// Restart paused VMs' vCPUs
    Resume(VmList),
    /// Attach a disk to, or detach one from, a running VM's disk slots (--disk-slots)
    Disk(crate::disk_cmd::DiskArgs),
    /// A running VM's memory and balloon; --target SIZE asks the guest to give SIZE back
    Memory(crate::memory_cmd::MemoryArgs),
    /// A live view of the host's VMs: CPU %, memory, I/O, uptime (--once --json for scripts)
    Top(crate::top_cmd::TopArgs),
    /// What the host has, what its VMs use, and how many more VMs of a shape fit
    Capacity(crate::capacity_cmd::CapacityArgs),
    /// Lifecycle events as they happen
    Events(EventsArgs),
    /// Snapshot a running or paused VM into DIR
    Snapshot(SnapshotArgs),
    /// A new VM from a snapshot in DIR, going on where the snapshot was taken
    Restore(RestoreArgs),
    /// Templates: sandboxes booted once that `husk create --template` clones in milliseconds
    Template(crate::template_cmd::TemplateArgs),
    /// Disk images: ls, create, rm, info, import (local, no daemon)
    Image(ImageArgs),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell)
    Completions {
        #[arg(value_name = "SHELL")]
        shell: clap_complete::Shell,
    },
    /// Print the version
    Version,
}

impl Verb {
    /// Whether the verb is a huskd client (its failures exit with `EXIT_API_ERROR`).
    pub fn is_remote(name: &str) -> bool {
        matches!(
            name,
            "create"
                | "start"
                | "stop"
                | "rm"
                | "ps"
                | "inspect"
                | "exec"
                | "logs"
                | "pause"
                | "update"
                | "disk"
                | "memory"
                | "top"
                | "capacity"
                | "resume"
                | "events"
                | "snapshot"
                | "restore"
                | "template"
        )
    }
}

/// One or more VMs, by id or name.
#[derive(Debug, Args)]
pub struct VmList {
    #[arg(value_name = "VM", required = true)]
    pub vms: Vec<String>,
}

#[derive(Debug, Args)]
#[command(args_override_self = true)]
pub struct CreateArgs {
    /// The VM's name (unique)
    #[arg(long, value_name = "N")]
    pub name: Option<String>,
    /// Guest kernel [default: huskd's]
    #[arg(long, value_name = "PATH")]
    pub kernel: Option<String>,
    /// Initramfs [default: huskd's]
    #[arg(long, value_name = "PATH")]
    pub initrd: Option<String>,
    /// An ext4 image as the root filesystem (guest /dev/vda)
    #[arg(long, value_name = "PATH")]
    pub rootfs: Option<String>,
    /// The format of --rootfs [default: qcow2 for a .qcow2 name, else raw]
    #[arg(long, value_name = "FORMAT", requires = "rootfs")]
    pub rootfs_format: Option<husk_host::vmm_args::DiskFormat>,
    /// Write the --rootfs image itself (by default it is a read-only base and the VM writes to
    /// an overlay of its own, removed with the VM)
    #[arg(long, requires = "rootfs")]
    pub write_rootfs: bool,
    /// Attach a disk image (repeatable): PATH (written in place), PATH:ro, or PATH:cow (a
    /// read-only base under an overlay of the VM's own); raw, or qcow2 for a .qcow2 name
    #[arg(long = "disk", value_name = "PATH[:ro|:cow]")]
    pub disks: Vec<String>,
    /// N (0..=8) empty disk slots after the disks, for `husk disk attach` while the VM runs
    #[arg(
        long = "disk-slots",
        value_name = "N",
        default_value_t = 0,
        hide_default_value = true
    )]
    pub disk_slots: u32,
    /// No memory balloon: SetMemoryTarget (`husk memory --target`) is refused and memory the
    /// guest frees stays with the VM (see docs/balloon.md)
    #[arg(long = "no-balloon")]
    pub no_balloon: bool,
    /// A balloon without free page reporting: freed guest memory goes back to the host only
    /// through `husk memory --target`
    #[arg(long = "no-free-page-reporting")]
    pub no_free_page_reporting: bool,
    /// The guest's host name (a-z A-Z 0-9 - ., at most 64)
    #[arg(long, value_name = "NAME")]
    pub hostname: Option<String>,
    /// Share a host directory with the guest (virtio-fs; repeatable, at most 8): HOST:GUEST,
    /// or HOST:GUEST:ro (read-only, enforced on the host). HOST must lie below huskd's
    /// --allow-path roots; a VM with volumes cannot be snapshotted (docs/volumes.md)
    #[arg(short = 'v', long = "volume", value_name = "HOST:GUEST[:ro]")]
    pub volumes: Vec<husk_host::virtiofs::SharedDir>,
    /// Give the guest an IPv4 link to the host over a tap, with NAT and DNS
    /// (docs/networking.md)
    #[arg(long)]
    pub net: bool,
    /// The guest's MAC address
    #[arg(long, value_name = "M")]
    pub mac: Option<String>,
    /// With --net: publish guest port GUESTPORT on the host's HOSTPORT (all of the host's
    /// addresses, or HOSTIP only); repeatable
    #[arg(
        short = 'p',
        long = "publish",
        value_name = "[HOSTIP:]HOSTPORT:GUESTPORT[/tcp|/udp]"
    )]
    pub publish: Vec<husk_host::firewall::PortMapping>,
    /// With --net: let the guest reach only these networks (repeatable; allow-list mode)
    #[arg(long = "egress-allow", value_name = "CIDR")]
    pub egress_allow: Vec<husk_host::firewall::Cidr>,
    /// With --net: never let the guest reach these networks (repeatable; wins over
    /// --egress-allow)
    #[arg(long = "egress-deny", value_name = "CIDR")]
    pub egress_deny: Vec<husk_host::firewall::Cidr>,
    /// With --net: let the guest connect to any port of the link's host end (without it only
    /// ping answers there)
    #[arg(long = "host-access")]
    pub host_access: bool,
    /// vCPUs [default: huskd's]
    #[arg(long, value_name = "N", default_value_t = 0, hide_default_value = true)]
    pub cpus: u32,
    /// Guest memory in MiB [default: huskd's]
    #[arg(
        long,
        value_name = "MIB",
        default_value_t = 0,
        hide_default_value = true
    )]
    pub memory: u32,
    /// Environment entry for CMD (repeatable)
    #[arg(short = 'e', long, value_name = "K=V", value_parser = key_value)]
    pub env: Vec<(String, String)>,
    /// Working directory of CMD in the guest
    #[arg(short = 'w', long, value_name = "DIR")]
    pub workdir: Option<String>,
    /// A label (repeatable)
    #[arg(short = 'l', long = "label", value_name = "K=V", value_parser = key_value)]
    pub labels: Vec<(String, String)>,
    /// Extra kernel command-line parameters
    #[arg(long, value_name = "STR")]
    pub cmdline: Option<String>,
    /// Host CPU limit of the VMM in millicores [default: from --cpus, see docs/security.md]
    #[arg(
        long,
        value_name = "MILLICORES",
        default_value_t = 0,
        hide_default_value = true
    )]
    pub cpu_limit: u32,
    /// Host memory limit of the VMM in MiB [default: from --memory]
    #[arg(
        long,
        value_name = "MIB",
        default_value_t = 0,
        hide_default_value = true
    )]
    pub memory_limit: u32,
    /// Host limit on the VMM's processes and threads [default: huskd's]
    #[arg(long, value_name = "N", default_value_t = 0, hide_default_value = true)]
    pub pids_limit: u32,
    #[command(flatten)]
    pub limits: LimitArgs,
    /// Start the VM at once
    #[arg(long)]
    pub start: bool,
    /// Clone template NAME (`husk template create`) instead of booting: started at once, in
    /// milliseconds; only --name, --label and --hostname may be given with it
    #[arg(long, value_name = "NAME")]
    pub template: Option<String>,
    /// Clone a ready template of exactly this shape (the same VM options; name, labels and
    /// host name aside) if huskd has one, and boot as usual otherwise; implies --start
    #[arg(long = "match-template", conflicts_with = "template")]
    pub match_template: bool,
    /// The application and its arguments, after `--`
    #[arg(value_name = "CMD", last = true)]
    pub command: Vec<String>,
}

#[derive(Debug, Args)]
#[command(args_override_self = true)]
pub struct StopArgs {
    /// Seconds to wait for the application before the kill
    #[arg(short = 't', long, value_name = "SECS", default_value_t = 10,
          value_parser = clap::value_parser!(u32).range(0..=3600))]
    pub timeout: u32,
    /// Kill at once
    #[arg(short = 'f', long)]
    pub force: bool,
    #[arg(value_name = "VM", required = true)]
    pub vms: Vec<String>,
}

#[derive(Debug, Args)]
#[command(args_override_self = true)]
pub struct RmArgs {
    /// Stop running VMs first
    #[arg(short = 'f', long)]
    pub force: bool,
    #[arg(value_name = "VM", required = true)]
    pub vms: Vec<String>,
}

#[derive(Debug, Args)]
#[command(args_override_self = true)]
pub struct PsArgs {
    /// Only VMs with this label (repeatable)
    #[arg(short = 'l', long = "label", value_name = "K=V", value_parser = key_value)]
    pub labels: Vec<(String, String)>,
    /// JSON instead of a table
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
#[command(args_override_self = true)]
pub struct InspectArgs {
    /// JSON instead of text
    #[arg(long)]
    pub json: bool,
    #[arg(value_name = "VM")]
    pub vm: String,
}

#[derive(Debug, Args)]
#[command(args_override_self = true)]
pub struct ExecArgs {
    /// Keep stdin open and send it to CMD
    #[arg(short = 'i', long)]
    pub interactive: bool,
    /// Run CMD on a pseudo-terminal
    #[arg(short = 't', long)]
    pub tty: bool,
    /// Environment entry for CMD (repeatable)
    #[arg(short = 'e', long, value_name = "K=V", value_parser = key_value)]
    pub env: Vec<(String, String)>,
    /// Working directory of CMD
    #[arg(short = 'w', long, value_name = "DIR")]
    pub workdir: Option<String>,
    /// The VM, then the command and its arguments: everything after VM is the command's,
    /// options included (as with `docker exec`)
    #[arg(value_names = ["VM", "CMD"], required = true, num_args = 2.., trailing_var_arg = true)]
    argv: Vec<String>,
}

impl ExecArgs {
    pub fn vm(&self) -> &str {
        self.argv.first().map_or("", String::as_str)
    }

    /// The command, without a `--` that separated it from the VM.
    pub fn command(&self) -> &[String] {
        let rest = self.argv.get(1..).unwrap_or_default();
        match rest.split_first() {
            Some((first, command)) if first == "--" => command,
            _ => rest,
        }
    }
}

#[derive(Debug, Args)]
#[command(args_override_self = true)]
pub struct LogsArgs {
    /// Keep printing what the VM writes
    #[arg(short = 'f', long)]
    pub follow: bool,
    #[arg(value_name = "VM")]
    pub vm: String,
}

#[derive(Debug, Args)]
pub struct EventsArgs {
    /// Only this VM's events [default: every VM's]
    #[arg(value_name = "VM")]
    pub vm: Option<String>,
}

/// An option value that should have been `KEY=VALUE`.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0:?} is not KEY=VALUE")]
pub struct NotKeyValue(pub String);

/// A `KEY=VALUE` option value with a non-empty key.
pub fn key_value(kv: &str) -> Result<(String, String), NotKeyValue> {
    match kv.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(NotKeyValue(kv.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("husk").chain(args.iter().copied()))
    }

    #[test]
    fn the_command_line_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn exec_takes_combined_short_flags_and_the_command_after_the_vm() {
        let Verb::Exec(e) = parse(&[
            "exec",
            "-it",
            "--env=A=1",
            "-e",
            "B=2",
            "vm1",
            "sh",
            "-c",
            "x",
        ])
        .unwrap()
        .command
        else {
            panic!("not exec");
        };
        assert!(e.interactive && e.tty);
        assert_eq!(e.env, [("A".into(), "1".into()), ("B".into(), "2".into())]);
        assert_eq!(e.vm(), "vm1");
        assert_eq!(e.command(), ["sh", "-c", "x"]);
        // After the VM, everything is the command's, options and `--` included.
        let Verb::Exec(e) = parse(&["exec", "vm1", "-i", "ls", "--", "-l"])
            .unwrap()
            .command
        else {
            panic!("not exec");
        };
        assert!(!e.interactive);
        assert_eq!(e.command(), ["-i", "ls", "--", "-l"]);
        let Verb::Exec(e) = parse(&["exec", "vm1", "--", "ls", "-l"]).unwrap().command else {
            panic!("not exec");
        };
        assert_eq!(e.command(), ["ls", "-l"]);
        assert!(parse(&["exec", "vm1"]).is_err(), "no command");
        assert!(parse(&["exec"]).is_err(), "no VM");
    }

    #[test]
    fn the_host_comes_before_the_verb() {
        let cli = parse(&["--host", "unix:///x.sock", "ps", "--json", "-l", "a=b"]).unwrap();
        assert_eq!(cli.host, "unix:///x.sock");
        let Verb::Ps(ps) = cli.command else {
            panic!("not ps");
        };
        assert!(ps.json);
        assert_eq!(ps.labels, [("a".into(), "b".into())]);
        let cli = parse(&["--host=http://h:1", "version"]).unwrap();
        assert_eq!(cli.host, "http://h:1");
    }

    #[test]
    fn stop_rm_and_the_vm_lists_take_their_short_forms() {
        let Verb::Stop(s) = parse(&["stop", "-t", "3", "-f", "a", "b"]).unwrap().command else {
            panic!("not stop");
        };
        assert_eq!((s.timeout, s.force), (3, true));
        assert_eq!(s.vms, ["a", "b"]);
        let Verb::Stop(s) = parse(&["stop", "a"]).unwrap().command else {
            panic!("not stop");
        };
        assert_eq!((s.timeout, s.force), (10, false));
        assert!(parse(&["stop", "-t", "3601", "a"]).is_err());
        assert!(parse(&["stop"]).is_err(), "at least one VM");
        let Verb::Rm(r) = parse(&["rm", "-f", "a"]).unwrap().command else {
            panic!("not rm");
        };
        assert!(r.force);
        for verb in ["start", "pause", "resume"] {
            assert!(parse(&[verb]).is_err(), "{verb} needs a VM");
            assert!(parse(&[verb, "--nope", "a"]).is_err());
        }
        let Verb::Logs(l) = parse(&["logs", "-f", "a"]).unwrap().command else {
            panic!("not logs");
        };
        assert!(l.follow && l.vm == "a");
        assert!(parse(&["inspect", "a", "b"]).is_err(), "one VM");
    }

    #[test]
    fn mistakes_are_named() {
        let e = parse(&["ps", "--nope"]).unwrap_err();
        assert!(e.to_string().contains("--nope"), "{e}");
        let e = parse(&["create", "--cpus"]).unwrap_err();
        assert!(e.to_string().contains("--cpus"), "{e}");
        let e = parse(&["create", "--cpus", "many"]).unwrap_err();
        assert!(e.to_string().contains("many"), "{e}");
        let e = parse(&["exec", "-ie", "vm", "sh"]).unwrap_err();
        assert!(e.to_string().contains("vm"), "{e}");
        let e = parse(&["ps", "--json=1"]).unwrap_err();
        assert!(e.to_string().contains("--json"), "{e}");
        let e = parse(&["create", "-e", "novalue"]).unwrap_err();
        assert!(e.to_string().contains("not KEY=VALUE"), "{e}");
        assert!(key_value("=v").is_err());
        assert_eq!(key_value("k=a=b"), Ok(("k".into(), "a=b".into())));
    }

    #[test]
    fn completions_are_offered_for_the_common_shells() {
        for shell in ["bash", "zsh", "fish"] {
            let Verb::Completions { shell: parsed } =
                parse(&["completions", shell]).unwrap().command
            else {
                panic!("not completions");
            };
            let mut script = Vec::new();
            clap_complete::generate(parsed, &mut Cli::command(), "husk", &mut script);
            let script = String::from_utf8(script).unwrap();
            assert!(
                script.contains("snapshot") && script.contains("kernel"),
                "{shell}"
            );
        }
        assert!(parse(&["completions", "tcsh"]).is_err());
    }
}
