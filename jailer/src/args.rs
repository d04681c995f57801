//! The jailer's command line (clap), validated before anything is touched. The flags are the
//! ones husk-host's jail module writes; their spellings are part of that contract.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use clap::Parser;

/// Default parent of every jail directory.
pub const DEFAULT_BASE: &str = "/run/husk/jail";

/// An rlimit to set before exec.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rlimit {
    /// RLIMIT_NOFILE.
    NoFile(u64),
    /// RLIMIT_FSIZE (bytes).
    FileSize(u64),
}

/// What to jail and how.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Jail {
    pub id: String,
    pub exec_file: PathBuf,
    pub uid: u32,
    pub gid: u32,
    pub base: PathBuf,
    pub cgroup: Vec<(String, String)>,
    pub netns: Option<PathBuf>,
    pub new_pid_ns: bool,
    pub rlimits: Vec<Rlimit>,
    pub keep_fds: Vec<i32>,
    pub env: Vec<(String, String)>,
    /// Files bind-mounted read-only at the same path inside the jail.
    pub files: Vec<PathBuf>,
    /// Directories bind-mounted read-write at the same path inside the jail.
    pub dirs: Vec<PathBuf>,
    pub vmm_args: Vec<OsString>,
}

/// What to do.
#[derive(Debug, PartialEq, Eq)]
pub enum Command {
    Run(Box<Jail>),
    Cleanup { id: String, base: PathBuf },
}

/// Why a value of one flag was refused (clap names the flag and the value).
#[derive(Debug, thiserror::Error)]
pub enum ValueError {
    #[error("expected an absolute path without '..'")]
    NotAbsolute,
    #[error("expected KEY=VALUE")]
    NotPair,
    #[error("expected a number")]
    NotNumber,
    #[error("not a file of the VM's own cgroup (such as memory.max)")]
    NotCgroupFile,
    #[error("unknown rlimit '{0}': use nofile or fsize")]
    UnknownRlimit(String),
    #[error("0, 1 and 2 are always kept")]
    StandardFd,
}

/// Why the command line was refused.
#[derive(Debug, thiserror::Error)]
pub enum ArgsError {
    /// Unknown flags, missing or malformed values; also `--help` (not an error: see
    /// [`ArgsError::is_help`]).
    #[error("{}", clap_message(.0))]
    Syntax(#[from] clap::Error),
    #[error("invalid --id '{0}': use 1 to 64 characters of A-Z a-z 0-9 _ -")]
    InvalidId(String),
    #[error("{0} is required")]
    Missing(&'static str),
    #[error("--uid and --gid must not be 0: the point is to drop root")]
    RootIds,
    #[error("--file and --dir cannot be /")]
    WholeRoot,
}

impl ArgsError {
    /// `--help` (or `--version`) was asked for: print this to stdout and exit 0.
    #[cfg(test)]
    pub fn is_help(&self) -> bool {
        matches!(self, Self::Syntax(e) if Self::is_help_kind(e.kind()))
    }

    /// Whether clap's error is really a request for help or the version.
    pub fn is_help_kind(kind: clap::error::ErrorKind) -> bool {
        matches!(
            kind,
            clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion
        )
    }
}

/// clap's message without its own "error: " prefix (the jailer adds its own) and trailing
/// newline.
fn clap_message(e: &clap::Error) -> String {
    let text = e.render().to_string();
    let text = text.trim_end();
    text.strip_prefix("error: ").unwrap_or(text).to_string()
}

/// Puts one husk-vmm in its own jail (mount/IPC/UTS namespaces, pivot_root, cgroup v2, rlimits,
/// no_new_privs, unprivileged uid) and execs it; or, with --cleanup, removes what a jail left.
#[derive(Debug, Parser)]
#[command(
    name = "husk-jailer",
    version,
    args_override_self = true,
    override_usage = "husk-jailer --id ID --exec-file PATH --uid N --gid N [OPTIONS] -- VMM-ARGS...\n       \
                      husk-jailer --cleanup --id ID [--chroot-base DIR]"
)]
struct Cli {
    /// The VM's id: 1-64 of [A-Za-z0-9_-]; names <base>/<ID> and the cgroup husk/<ID>
    #[arg(
        long,
        value_name = "ID",
        default_value = "",
        hide_default_value = true,
        allow_hyphen_values = true
    )]
    id: String,
    /// The VMM binary (exec'd as /husk-vmm inside the jail)
    #[arg(long, value_name = "PATH", value_parser = absolute, allow_hyphen_values = true)]
    exec_file: Option<PathBuf>,
    /// Who the VMM runs as (not 0); supplementary groups are dropped
    #[arg(long, value_name = "N", value_parser = number::<u32>, allow_hyphen_values = true)]
    uid: Option<u32>,
    /// The VMM's group (not 0)
    #[arg(long, value_name = "N", value_parser = number::<u32>, allow_hyphen_values = true)]
    gid: Option<u32>,
    /// Parent of the jail directories
    #[arg(long = "chroot-base", value_name = "DIR", default_value = DEFAULT_BASE, value_parser = absolute, allow_hyphen_values = true)]
    base: PathBuf,
    /// Written into the VM's cgroup v2 <cgroup2>/husk/<ID> (cpu.max, memory.max, pids.max,
    /// io.max, ...); the VMM runs in that cgroup in any case
    #[arg(long, value_name = "FILE=VALUE", value_parser = cgroup_setting, allow_hyphen_values = true)]
    cgroup: Vec<(String, String)>,
    /// Join this network namespace (e.g. /var/run/netns/NAME)
    #[arg(long, value_name = "PATH", value_parser = absolute, allow_hyphen_values = true)]
    netns: Option<PathBuf>,
    /// The VMM is pid 1 of a new PID namespace; the jailer stays as its parent, passes on
    /// SIGTERM/SIGINT/SIGHUP and exits with its status
    #[arg(long)]
    new_pid_ns: bool,
    /// nofile=N or fsize=N (bytes)
    #[arg(long = "rlimit", value_name = "R=N", value_parser = rlimit, allow_hyphen_values = true)]
    rlimits: Vec<Rlimit>,
    /// An inherited fd that stays open for the VMM (every other one is closed)
    #[arg(long = "keep-fd", value_name = "N", value_parser = keep_fd, allow_hyphen_values = true)]
    keep_fds: Vec<i32>,
    /// The VMM's environment (nothing else is passed on)
    #[arg(long, value_name = "K=V", value_parser = pair, allow_hyphen_values = true)]
    env: Vec<(String, String)>,
    /// Bind-mounted read-only at the same path inside the jail (kernel, initrd)
    #[arg(long = "file", value_name = "PATH", value_parser = absolute, allow_hyphen_values = true)]
    files: Vec<PathBuf>,
    /// Bind-mounted read-write at the same path inside the jail (a per-VM state directory for
    /// sockets, console and exit report); the jailed uid must be able to write there
    #[arg(long = "dir", value_name = "PATH", value_parser = absolute, allow_hyphen_values = true)]
    dirs: Vec<PathBuf>,
    /// Kill what is left in the VM's cgroup, remove it and the jail directory
    #[arg(long)]
    cleanup: bool,
    /// The VMM's arguments, after `--`
    #[arg(last = true, value_name = "VMM-ARGS")]
    vmm_args: Vec<OsString>,
}

fn number<T: std::str::FromStr>(v: &str) -> Result<T, ValueError> {
    v.parse().map_err(|_| ValueError::NotNumber)
}

fn absolute(v: &str) -> Result<PathBuf, ValueError> {
    let p = PathBuf::from(v);
    // `..` could climb out of the jail tree while it is being built.
    if !p.is_absolute() || p.components().any(|c| c == std::path::Component::ParentDir) {
        return Err(ValueError::NotAbsolute);
    }
    Ok(p)
}

fn pair(v: &str) -> Result<(String, String), ValueError> {
    match v.split_once('=') {
        Some((k, val)) if !k.is_empty() => Ok((k.to_string(), val.to_string())),
        _ => Err(ValueError::NotPair),
    }
}

fn cgroup_setting(v: &str) -> Result<(String, String), ValueError> {
    let (file, value) = pair(v)?;
    // A file of the VM's own cgroup, never a path elsewhere.
    if file.contains('/') || file.starts_with('.') || !file.contains('.') {
        return Err(ValueError::NotCgroupFile);
    }
    Ok((file, value))
}

fn rlimit(v: &str) -> Result<Rlimit, ValueError> {
    let (name, n) = pair(v)?;
    let n = number::<u64>(&n)?;
    match name.as_str() {
        "nofile" => Ok(Rlimit::NoFile(n)),
        "fsize" => Ok(Rlimit::FileSize(n)),
        _ => Err(ValueError::UnknownRlimit(name)),
    }
}

fn keep_fd(v: &str) -> Result<i32, ValueError> {
    let fd = number::<i32>(v)?;
    if fd < 3 {
        return Err(ValueError::StandardFd);
    }
    Ok(fd)
}

/// Checks a VM id: it becomes a directory and a cgroup name.
pub fn valid_id(id: &str) -> Result<(), ArgsError> {
    let ok = (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(ArgsError::InvalidId(id.to_string()))
    }
}

/// Parses the arguments after the program name.
pub fn parse(args: impl IntoIterator<Item = OsString>) -> Result<Command, ArgsError> {
    let cli = Cli::try_parse_from(std::iter::once(OsString::from("husk-jailer")).chain(args))?;
    valid_id(&cli.id)?;
    if cli.cleanup {
        return Ok(Command::Cleanup {
            id: cli.id,
            base: cli.base,
        });
    }
    let exec_file = cli.exec_file.ok_or(ArgsError::Missing("--exec-file"))?;
    let uid = cli.uid.ok_or(ArgsError::Missing("--uid"))?;
    let gid = cli.gid.ok_or(ArgsError::Missing("--gid"))?;
    if uid == 0 || gid == 0 {
        return Err(ArgsError::RootIds);
    }
    if cli
        .files
        .iter()
        .chain(&cli.dirs)
        .any(|p| p == Path::new("/"))
    {
        return Err(ArgsError::WholeRoot);
    }
    Ok(Command::Run(Box::new(Jail {
        id: cli.id,
        exec_file,
        uid,
        gid,
        base: cli.base,
        cgroup: cli.cgroup,
        netns: cli.netns,
        new_pid_ns: cli.new_pid_ns,
        rlimits: cli.rlimits,
        keep_fds: cli.keep_fds,
        env: cli.env,
        files: cli.files,
        dirs: cli.dirs,
        vmm_args: cli.vmm_args,
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(args: &[&str]) -> Result<Command, ArgsError> {
        parse(args.iter().map(OsString::from))
    }

    #[test]
    fn a_full_command_line_parses() {
        let Ok(Command::Run(j)) = p(&[
            "--id",
            "vm-1",
            "--exec-file",
            "/usr/bin/husk-vmm",
            "--uid",
            "1000",
            "--gid",
            "1000",
            "--cgroup",
            "memory.max=256M",
            "--netns",
            "/var/run/netns/x",
            "--new-pid-ns",
            "--rlimit",
            "nofile=128",
            "--keep-fd",
            "5",
            "--env",
            "HUSK_LOG=info",
            "--file",
            "/k/vmlinux",
            "--dir",
            "/var/lib/husk/vm-1",
            "--",
            "--kernel",
            "/k/vmlinux",
        ]) else {
            panic!("did not parse")
        };
        assert_eq!((j.id.as_str(), j.uid, j.gid), ("vm-1", 1000, 1000));
        assert_eq!(j.base, PathBuf::from(DEFAULT_BASE));
        assert_eq!(j.cgroup, vec![("memory.max".into(), "256M".into())]);
        assert_eq!(j.rlimits, vec![Rlimit::NoFile(128)]);
        assert_eq!(j.keep_fds, vec![5]);
        assert!(j.new_pid_ns);
        assert_eq!(
            j.vmm_args,
            vec![OsString::from("--kernel"), "/k/vmlinux".into()]
        );
    }

    #[test]
    fn bad_arguments_are_refused_with_the_flag_named() {
        let base = ["--exec-file", "/v", "--uid", "5", "--gid", "5"];
        let with = |extra: &[&str]| {
            let mut a = vec!["--id", "x"];
            a.extend(base);
            a.extend(extra);
            p(&a)
        };
        assert!(with(&[]).is_ok());
        for id in ["", "../x", "a/b", "a b", &"x".repeat(65)] {
            assert!(p(&["--id", id, "--exec-file", "/v", "--uid", "5", "--gid", "5"]).is_err());
        }
        assert!(with(&["--cgroup", "../../cgroup.procs=1"]).is_err());
        assert!(with(&["--cgroup", "memory.max"]).is_err());
        assert!(with(&["--rlimit", "core=0"]).is_err());
        assert!(with(&["--keep-fd", "2"]).is_err());
        assert!(with(&["--file", "relative"]).is_err());
        assert!(with(&["--dir", "/a/../etc"]).is_err());
        assert!(with(&["--dir", "/"]).is_err());
        assert!(
            p(&["--id", "x", "--exec-file", "/v", "--uid", "0", "--gid", "5"])
                .unwrap_err()
                .to_string()
                .contains("not be 0")
        );
        assert!(p(&["--id", "x", "--uid", "5", "--gid", "5"]).is_err());
        assert_eq!(
            p(&["--cleanup", "--id", "x"]).unwrap(),
            Command::Cleanup {
                id: "x".into(),
                base: DEFAULT_BASE.into()
            }
        );
    }

    #[test]
    fn refusals_name_the_flag_and_help_is_not_an_error() {
        let with = |extra: &[&str]| {
            let mut a = vec!["--id", "x", "--exec-file", "/v", "--uid", "5", "--gid", "5"];
            a.extend(extra);
            p(&a).unwrap_err().to_string()
        };
        assert!(with(&["--file", "relative"]).contains("--file"));
        assert!(with(&["--keep-fd", "2"]).contains("--keep-fd"));
        assert!(with(&["--bogus"]).contains("--bogus"));
        assert!(!with(&["--rlimit", "core=0"]).starts_with("error:"));
        assert!(p(&["--id", "../x"])
            .unwrap_err()
            .to_string()
            .starts_with("invalid --id '../x'"));
        assert!(p(&["--help"]).unwrap_err().is_help());
        assert!(!p(&["--id", "x"]).unwrap_err().is_help());
        // Everything after `--` is the VMM's, flags included.
        let Ok(Command::Run(j)) = p(&[
            "--id",
            "x",
            "--exec-file",
            "/v",
            "--uid",
            "5",
            "--gid",
            "5",
            "--",
            "--help",
        ]) else {
            panic!("did not parse")
        };
        assert_eq!(j.vmm_args, vec![OsString::from("--help")]);
    }
}
