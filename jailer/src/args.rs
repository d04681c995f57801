//! The jailer's command line, validated before anything is touched.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

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
    Help,
}

pub const USAGE: &str = "usage: husk-jailer --id ID --exec-file PATH --uid N --gid N
                   [--chroot-base DIR] [--cgroup FILE=VALUE]... [--netns PATH] [--new-pid-ns]
                   [--rlimit nofile=N|fsize=N]... [--keep-fd N]... [--env K=V]...
                   [--file PATH]... [--dir PATH]... -- VMM-ARGS...
       husk-jailer --cleanup --id ID [--chroot-base DIR]

  --id ID            the VM's id: 1-64 of [A-Za-z0-9_-]; names <base>/<ID> and the cgroup husk/<ID>
  --exec-file PATH   the VMM binary (exec'd as /husk-vmm inside the jail)
  --uid N, --gid N   who the VMM runs as (not 0); supplementary groups are dropped
  --chroot-base DIR  parent of the jail directories (default /run/husk/jail)
  --cgroup FILE=VAL  written into the VM's cgroup v2 <cgroup2>/husk/<ID> (cpu.max, memory.max,
                     pids.max, io.max, ...); the VMM runs in that cgroup in any case
  --netns PATH       join this network namespace (e.g. /var/run/netns/NAME)
  --new-pid-ns       the VMM is pid 1 of a new PID namespace; the jailer stays as its parent,
                     passes on SIGTERM/SIGINT/SIGHUP and exits with its status
  --rlimit R=N       nofile or fsize (bytes)
  --keep-fd N        an inherited fd that stays open for the VMM (every other one is closed)
  --env K=V          the VMM's environment (nothing else is passed on)
  --file PATH        bind-mounted read-only at the same path inside the jail (kernel, initrd)
  --dir PATH         bind-mounted read-write at the same path inside the jail (a per-VM state
                     directory for sockets, console and exit report); the jailed uid must be
                     able to write there
  --cleanup          kill what is left in the VM's cgroup, remove it and the jail directory";

fn number<T: std::str::FromStr>(flag: &str, v: &str) -> Result<T, String> {
    v.parse()
        .map_err(|_| format!("invalid {flag} '{v}': expected a number"))
}

fn absolute(flag: &str, v: &str) -> Result<PathBuf, String> {
    let p = PathBuf::from(v);
    // `..` could climb out of the jail tree while it is being built.
    if !p.is_absolute() || p.components().any(|c| c == std::path::Component::ParentDir) {
        return Err(format!(
            "{flag} '{v}': expected an absolute path without '..'"
        ));
    }
    Ok(p)
}

/// Checks a VM id: it becomes a directory and a cgroup name.
pub fn valid_id(id: &str) -> Result<(), String> {
    let ok = (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid --id '{id}': use 1 to 64 characters of A-Z a-z 0-9 _ -"
        ))
    }
}

fn pair(flag: &str, v: &str) -> Result<(String, String), String> {
    match v.split_once('=') {
        Some((k, val)) if !k.is_empty() => Ok((k.to_string(), val.to_string())),
        _ => Err(format!("invalid {flag} '{v}': expected KEY=VALUE")),
    }
}

/// Parses the arguments after the program name.
pub fn parse(args: impl IntoIterator<Item = OsString>) -> Result<Command, String> {
    let mut it = args.into_iter();
    let mut j = Jail {
        base: PathBuf::from(DEFAULT_BASE),
        ..Jail::default()
    };
    let (mut uid, mut gid, mut cleanup) = (None, None, false);
    while let Some(arg) = it.next() {
        let arg = arg
            .into_string()
            .map_err(|a| format!("argument {a:?} is not UTF-8"))?;
        if arg == "--" {
            j.vmm_args = it.collect();
            break;
        }
        let flag = arg.as_str();
        match flag {
            "-h" | "--help" => return Ok(Command::Help),
            "--cleanup" => {
                cleanup = true;
                continue;
            }
            "--new-pid-ns" => {
                j.new_pid_ns = true;
                continue;
            }
            _ => {}
        }
        let v = it
            .next()
            .and_then(|v| v.into_string().ok())
            .ok_or(format!("{flag} needs a (UTF-8) value"))?;
        match flag {
            "--id" => j.id = v,
            "--exec-file" => j.exec_file = absolute(flag, &v)?,
            "--uid" => uid = Some(number::<u32>(flag, &v)?),
            "--gid" => gid = Some(number::<u32>(flag, &v)?),
            "--chroot-base" => j.base = absolute(flag, &v)?,
            "--cgroup" => {
                let (file, value) = pair(flag, &v)?;
                // A file of the VM's own cgroup, never a path elsewhere.
                if file.contains('/') || file.starts_with('.') || !file.contains('.') {
                    return Err(format!("invalid --cgroup file '{file}'"));
                }
                j.cgroup.push((file, value));
            }
            "--netns" => j.netns = Some(absolute(flag, &v)?),
            "--rlimit" => {
                let (name, n) = pair(flag, &v)?;
                let n = number::<u64>(flag, &n)?;
                j.rlimits.push(match name.as_str() {
                    "nofile" => Rlimit::NoFile(n),
                    "fsize" => Rlimit::FileSize(n),
                    _ => return Err(format!("unknown --rlimit '{name}': use nofile or fsize")),
                });
            }
            "--keep-fd" => {
                let fd = number::<i32>(flag, &v)?;
                if fd < 3 {
                    return Err(format!("--keep-fd {fd}: 0, 1 and 2 are always kept"));
                }
                j.keep_fds.push(fd);
            }
            "--env" => j.env.push(pair(flag, &v)?),
            "--file" => j.files.push(absolute(flag, &v)?),
            "--dir" => j.dirs.push(absolute(flag, &v)?),
            other => return Err(format!("unknown argument '{other}' (see --help)")),
        }
    }
    valid_id(&j.id)?;
    if cleanup {
        return Ok(Command::Cleanup {
            id: j.id,
            base: j.base,
        });
    }
    if j.exec_file.as_os_str().is_empty() {
        return Err("--exec-file is required".into());
    }
    j.uid = uid.ok_or("--uid is required")?;
    j.gid = gid.ok_or("--gid is required")?;
    if j.uid == 0 || j.gid == 0 {
        return Err("--uid and --gid must not be 0: the point is to drop root".into());
    }
    if j.files.iter().chain(&j.dirs).any(|p| p == Path::new("/")) {
        return Err("--file and --dir cannot be /".into());
    }
    Ok(Command::Run(Box::new(j)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(args: &[&str]) -> Result<Command, String> {
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
                .contains("not be 0")
        );
        assert!(p(&["--id", "x", "--uid", "5", "--gid", "5"]).is_err());
        assert_eq!(
            p(&["--cleanup", "--id", "x"]),
            Ok(Command::Cleanup {
                id: "x".into(),
                base: DEFAULT_BASE.into()
            })
        );
    }
}
