//! The husk-vmm binary: parses the command line, builds and runs one micro-VM, and exits with the
//! guest application's exit code.
//!
//! Exit status: the code the guest reported on port 0x601; 130/143 after SIGINT/SIGTERM; 143 after
//! a stop request on the control socket; 125 for any VMM error (one line `husk-vmm: error: ...` on
//! stderr) and for a guest that stopped without reporting an exit code.

use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::Instant;

use husk_proto::vmm::ExitReport;
use husk_vmm::api::socket::ApiSocket;
use husk_vmm::builder::{build_from_snapshot, build_microvm};
use husk_vmm::config::{
    ConsoleConfig, DiskConfig, NetConfig, TapSource, VmConfig, VsockConfig, DEFAULT_CMDLINE,
    DEFAULT_MEM_MIB, DEFAULT_VCPUS,
};
use husk_vmm::exit_report;
use husk_vmm::seccomp::{self, Filters, Mode};
use husk_vmm::signals;
use husk_vmm::snapshot::devices::RestoreOverrides;
use husk_vmm::stop::StopReason;
use husk_vmm::vmm::{VmOutcome, EXIT_VMM_ERROR};

fn usage() -> String {
    format!(
        "usage: husk-vmm --kernel PATH [--initrd PATH] [--cmdline STR] [--cpus N] [--memory MIB]
                [--console stdout|none|file:PATH|unix:PATH] [--console-limit BYTES]
                [--report-boot-time] [--allow-pvm]
                [--disk PATH[:ro]]... [--net tap=NAME|fd=N,name=NAME[,mac=MAC]]
                [--vsock cid=N,path=PATH] [--no-rng] [--api-sock PATH] [--exit-report PATH]
                [--seccomp kill|trap|log|off] [--no-seccomp] [--print-seccomp]
       husk-vmm --restore-state PATH --restore-mem PATH [--start-paused]
                [--console DEST] [--api-sock PATH] [--exit-report PATH]
                [--disk PATH[:ro]]... [--net SPEC] [--vsock cid=N,path=PATH]

  --kernel PATH         guest kernel: ELF vmlinux (PVH entry used when present) or bzImage
  --initrd PATH         initramfs
  --cmdline STR         appended to the default command line:
                        {DEFAULT_CMDLINE}
  --cmdline-file PATH   the same, read from a file or /proc/self/fd/N (a pipe the launcher
                        filled): keeps the application's argv and environment, which travel
                        on the guest command line, out of this process's own command line
  --cpus N              vCPUs, 1..=32 (default {DEFAULT_VCPUS})
  --memory MIB          guest memory in MiB, 64..=262144 (default {DEFAULT_MEM_MIB})
  --console DEST        serial console: stdout (default), none, file:PATH, or unix:PATH (a
                        connection to the Unix socket listening at PATH)
  --console-limit BYTES most bytes a file: console holds (default 16777216, 16 MiB; 0:
                        unlimited); past it the file is truncated to 0 and goes on after
                        the line '[husk: console truncated after N bytes]'
  --report-boot-time    print 'husk-vmm: guest init after <N> us' when the guest init starts
  --allow-pvm           on a PVM host, boot a kernel that does not look PVM-enabled anyway
  --disk PATH[:ro]      virtio-blk disk on a raw image (repeatable; vda, vdb, ... in order)
  --net SPEC            virtio-net on a tap: tap=NAME opens (or creates) the tap NAME;
                        fd=N,name=NAME adopts an open tap fd inherited from the parent;
                        mac=XX:XX:XX:XX:XX:XX (default 06:00:ac:10:00:02)
  --vsock cid=N,path=PATH  virtio-vsock with guest CID N (>= 3); host side on the Unix socket
                        PATH (CONNECT <port> for guest ports; PATH_<port> for guest-initiated)
  --no-rng              no virtio-rng device (on by default)
  --api-sock PATH       serve the control socket at PATH (protocol husk.vmm.v1: describe, pause,
                        resume, stop; 4-byte big-endian length + protobuf message each way).
                        Mode 0600; a stale socket at PATH is replaced, anything else there is
                        refused; PATH is removed when husk-vmm exits
  --exit-report PATH    when husk-vmm exits after starting (guest exit or reset, signal, stop
                        request, error), write a husk.vmm.v1.ExitReport (plain protobuf bytes,
                        not framed) to PATH.tmp and rename it to PATH
  --seccomp MODE        per-thread seccomp filters: kill (default: a syscall outside a thread's
                        list kills the VMM), trap (logged on stderr, counted, fails with
                        ENOSYS: for debugging), log (allowed, logged by the kernel), off
  --no-seccomp          same as --seccomp off
  --print-seccomp       print every thread's allowed syscalls and exit
  Files: PATH may be /proc/self/fd/N for an fd the parent passed (kernel, initrd, disks,
  console file, exit report, --cmdline-file, the --restore-* files)
  --restore-state PATH  restore the VM saved in this snapshot state file (written by the
                        control socket's snapshot request) instead of booting a kernel
  --restore-mem PATH    the snapshot's memory file (mapped copy-on-write: never modified)
  --restore-mem-name P  with --restore-mem /proc/self/fd/N: the memory file's host path, which
                        the restored VM's later diff snapshots record as their base
  --restore-base PATH   for a diff snapshot: open this base memory file (an fd) instead of
                        the path the state records (which is still recorded as the base)
  --start-paused        with --restore-*: keep the restored VM paused until a resume request
                        With --restore-*, --disk (all disks, in order), --net and --vsock
                        replace the snapshot's backends: a clone gets its own CID, tap, MAC
                        and disks; other boot options are refused
  -h, --help            this text

Exit status: the guest's exit code (port 0x601); 130/143 on SIGINT/SIGTERM; 143 after a stop
request on the control socket; 125 on a VMM error or when the guest stopped without reporting an
exit code.
Environment: HUSK_LOG=error|warn|info|debug (default warn) for VMM diagnostics on stderr.
Diagnostics a guest can trigger are limited to 10 lines per second per kind (then 'N similar
messages suppressed'), and all diagnostics to 4 MiB over the VMM's life."
    )
}

/// What to run, and the process-level options around it.
struct Options {
    vm: VmConfig,
    restore: Option<Restore>,
    api_sock: Option<PathBuf>,
    exit_report: Option<PathBuf>,
    seccomp: Mode,
}

/// `--restore-state` / `--restore-mem` / `--start-paused`.
#[derive(Debug, PartialEq)]
struct Restore {
    state: PathBuf,
    mem: PathBuf,
    /// `--restore-mem-name` / `--restore-base` (see snapshot::LoadNames).
    names: husk_vmm::snapshot::LoadNames,
    start_paused: bool,
}

enum Command {
    Run(Box<Options>),
    Help,
    PrintSeccomp,
}

/// The longest `--cmdline-file` read (x86 Linux takes 2 KiB of command line; room to spare).
const MAX_CMDLINE_FILE: u64 = 64 * 1024;

/// Reads `--cmdline-file`: one line, bounded; a trailing newline is dropped.
fn read_cmdline_file(path: &Path) -> Result<String, String> {
    use std::io::Read;
    let mut options = std::fs::OpenOptions::new();
    options.read(true);
    let file = husk_devices::host_files::open(path, &options, false)
        .map_err(|e| format!("--cmdline-file {}: {e}", path.display()))?;
    let mut text = String::new();
    file.take(MAX_CMDLINE_FILE + 1)
        .read_to_string(&mut text)
        .map_err(|e| format!("--cmdline-file {}: {e}", path.display()))?;
    if text.len() as u64 > MAX_CMDLINE_FILE {
        return Err(format!(
            "--cmdline-file {}: longer than {MAX_CMDLINE_FILE} bytes",
            path.display()
        ));
    }
    let line = text.strip_suffix('\n').unwrap_or(&text);
    if line.contains(['\n', '\0']) {
        return Err(format!(
            "--cmdline-file {}: must be one line without NUL bytes",
            path.display()
        ));
    }
    Ok(line.to_string())
}

fn parse_console(value: &str) -> Result<ConsoleConfig, String> {
    let path = |p: &str| (!p.is_empty()).then(|| PathBuf::from(p));
    match value {
        "stdout" => Ok(ConsoleConfig::Stdout),
        "none" => Ok(ConsoleConfig::None),
        v => match (v.strip_prefix("file:"), v.strip_prefix("unix:")) {
            (Some(p), _) if !p.is_empty() => Ok(ConsoleConfig::File(PathBuf::from(p))),
            (_, Some(p)) if path(p).is_some() => Ok(ConsoleConfig::Unix(PathBuf::from(p))),
            _ => Err(format!(
                "invalid --console '{v}': use stdout, none, file:PATH or unix:PATH"
            )),
        },
    }
}

fn parse_disk(value: &str) -> DiskConfig {
    match value.strip_suffix(":ro") {
        Some(path) => DiskConfig {
            path: PathBuf::from(path),
            read_only: true,
        },
        None => DiskConfig {
            path: PathBuf::from(value),
            read_only: false,
        },
    }
}

/// `key=value` pairs separated by commas.
fn parse_pairs<'a>(flag: &str, value: &'a str) -> Result<Vec<(&'a str, &'a str)>, String> {
    value
        .split(',')
        .map(|kv| {
            kv.split_once('=').ok_or(format!(
                "invalid {flag} '{value}': expected key=value pairs"
            ))
        })
        .collect()
}

fn parse_mac(text: &str) -> Result<[u8; 6], String> {
    let bytes: Vec<u8> = text
        .split(':')
        .filter_map(|b| u8::from_str_radix(b, 16).ok())
        .collect();
    <[u8; 6]>::try_from(bytes)
        .ok()
        .filter(|_| text.split(':').count() == 6)
        .ok_or(format!("invalid MAC address '{text}'"))
}

fn parse_net(value: &str) -> Result<NetConfig, String> {
    let (mut tap, mut fd, mut name, mut mac) = (None, None, None, [0x06, 0, 0xac, 0x10, 0, 2]);
    for (k, v) in parse_pairs("--net", value)? {
        match k {
            "tap" => tap = Some(v.to_string()),
            "fd" => {
                fd = Some(
                    v.parse::<i32>()
                        .map_err(|_| format!("invalid --net fd '{v}'"))?,
                )
            }
            "name" => name = Some(v.to_string()),
            "mac" => mac = parse_mac(v)?,
            _ => return Err(format!("unknown --net key '{k}'")),
        }
    }
    let tap = match (tap, fd) {
        (Some(tap), None) => TapSource::Name(tap),
        (None, Some(fd)) if fd > 2 => TapSource::Fd(fd, name.unwrap_or_else(|| format!("fd{fd}"))),
        _ => return Err("--net needs exactly one of tap=NAME or fd=N (N > 2)".into()),
    };
    Ok(NetConfig { tap, mac })
}

fn parse_vsock(value: &str) -> Result<VsockConfig, String> {
    let (mut cid, mut path) = (None, None);
    for (k, v) in parse_pairs("--vsock", value)? {
        match k {
            "cid" => {
                cid = Some(
                    v.parse::<u64>()
                        .map_err(|_| format!("invalid --vsock cid '{v}'"))?,
                )
            }
            "path" => path = Some(PathBuf::from(v)),
            _ => return Err(format!("unknown --vsock key '{k}'")),
        }
    }
    match (cid, path) {
        (Some(cid), Some(uds_path)) => Ok(VsockConfig { cid, uds_path }),
        _ => Err("--vsock needs cid=N,path=PATH".into()),
    }
}

fn parse_number(flag: &str, value: &str) -> Result<u64, String> {
    value
        .parse()
        .map_err(|_| format!("invalid value '{value}' for {flag}: expected a number"))
}

fn parse_args(args: impl IntoIterator<Item = String>) -> Result<Command, String> {
    let mut args = args.into_iter();
    let mut kernel = None;
    let mut config = VmConfig::new(PathBuf::new());
    let (mut api_sock, mut exit_report) = (None, None);
    let mut seccomp = Mode::default();
    let (mut restore_state, mut restore_mem, mut start_paused) = (None, None, false);
    let mut names = husk_vmm::snapshot::LoadNames::default();
    let mut boot_options = Vec::new();
    while let Some(arg) = args.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
            _ => (arg.clone(), None),
        };
        let takes_value = matches!(
            flag.as_str(),
            "--kernel"
                | "--initrd"
                | "--cmdline"
                | "--cmdline-file"
                | "--cpus"
                | "--memory"
                | "--console"
                | "--console-limit"
                | "--disk"
                | "--net"
                | "--vsock"
                | "--api-sock"
                | "--exit-report"
                | "--seccomp"
                | "--restore-state"
                | "--restore-mem"
                | "--restore-mem-name"
                | "--restore-base"
        );
        let value = if takes_value {
            match inline.or_else(|| args.next()) {
                Some(v) => v,
                None => return Err(format!("{flag} needs a value")),
            }
        } else if inline.is_some() {
            return Err(format!("{flag} takes no value"));
        } else {
            String::new()
        };
        if !matches!(
            flag.as_str(),
            "--console"
                | "--console-limit"
                | "--api-sock"
                | "--exit-report"
                | "--disk"
                | "--net"
                | "--vsock"
                | "--restore-state"
                | "--restore-mem"
                | "--restore-mem-name"
                | "--restore-base"
                | "--start-paused"
                | "-h"
                | "--help"
        ) {
            boot_options.push(flag.clone());
        }
        match flag.as_str() {
            "--restore-state" => restore_state = Some(PathBuf::from(value)),
            "--restore-mem-name" => names.mem_name = Some(PathBuf::from(value)),
            "--restore-base" => names.base = Some(PathBuf::from(value)),
            "--restore-mem" => restore_mem = Some(PathBuf::from(value)),
            "--start-paused" => start_paused = true,
            "--kernel" => kernel = Some(PathBuf::from(value)),
            "--initrd" => config.initrd = Some(PathBuf::from(value)),
            "--cmdline" => config.cmdline = value,
            "--cmdline-file" => config.cmdline = read_cmdline_file(Path::new(&value))?,
            "--cpus" => config.vcpus = parse_number("--cpus", &value)?,
            "--memory" => config.mem_mib = parse_number("--memory", &value)?,
            "--console" => config.console = parse_console(&value)?,
            "--console-limit" => config.console_limit = parse_number("--console-limit", &value)?,
            "--report-boot-time" => config.report_boot_time = true,
            "--allow-pvm" => config.allow_pvm = true,
            "--disk" => config.disks.push(parse_disk(&value)),
            "--net" => config.net = Some(parse_net(&value)?),
            "--vsock" => config.vsock = Some(parse_vsock(&value)?),
            "--no-rng" => config.rng = false,
            "--api-sock" => api_sock = Some(PathBuf::from(value)),
            "--exit-report" => exit_report = Some(PathBuf::from(value)),
            "--seccomp" => seccomp = value.parse().map_err(|e| format!("{e}"))?,
            "--no-seccomp" => seccomp = Mode::Off,
            "--print-seccomp" => return Ok(Command::PrintSeccomp),
            "-h" | "--help" => return Ok(Command::Help),
            other => return Err(format!("unknown argument '{other}' (see --help)")),
        }
    }
    let empty = |p: &Option<PathBuf>| p.as_ref().is_some_and(|p| p.as_os_str().is_empty());
    if empty(&api_sock) || empty(&exit_report) || empty(&restore_state) || empty(&restore_mem) {
        return Err("--api-sock, --exit-report and --restore-* need a non-empty path".into());
    }
    let restore = match (restore_state, restore_mem) {
        (Some(state), Some(mem)) => {
            // The machine comes from the snapshot: boot options would be silently ignored.
            if let Some(flag) = boot_options.first() {
                return Err(format!("{flag} cannot be combined with --restore-state"));
            }
            Some(Restore {
                state,
                mem,
                names,
                start_paused,
            })
        }
        (None, None) if start_paused => {
            return Err("--start-paused needs --restore-state and --restore-mem".into())
        }
        (None, None) => {
            config.kernel = kernel.ok_or("--kernel is required (see --help)")?;
            None
        }
        _ => return Err("--restore-state and --restore-mem go together".into()),
    };
    Ok(Command::Run(Box::new(Options {
        vm: config,
        restore,
        api_sock,
        exit_report,
        seccomp,
    })))
}

/// Minimal stderr logger for VMM diagnostics.
struct StderrLogger;

impl log::Log for StderrLogger {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        metadata.level() <= log::max_level()
    }
    fn log(&self, record: &log::Record) {
        if self.enabled(record.metadata()) {
            let level = record.level().as_str().to_lowercase();
            husk_vmm::diag::stderr_line(&format!("husk-vmm: {level}: {}", record.args()));
        }
    }
    fn flush(&self) {}
}

fn init_logging() {
    let level = match std::env::var("HUSK_LOG").as_deref() {
        Ok("error") => log::LevelFilter::Error,
        Ok("info") => log::LevelFilter::Info,
        Ok("debug") => log::LevelFilter::Debug,
        Ok("off") => log::LevelFilter::Off,
        _ => log::LevelFilter::Warn,
    };
    static LOGGER: StderrLogger = StderrLogger;
    if log::set_logger(&LOGGER).is_ok() {
        log::set_max_level(level);
    }
}

/// `error: cause: cause...` on one line.
fn one_line(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        source = cause.source();
    }
    s.replace('\n', " ")
}

fn print_error(msg: &str) {
    let _ = std::io::stdout().flush();
    eprintln!("husk-vmm: error: {msg}");
}

fn fail(msg: &str) -> ! {
    print_error(msg);
    std::process::exit(EXIT_VMM_ERROR)
}

fn main() {
    let vmm_start = Instant::now();
    init_logging();
    let options = match parse_args(std::env::args().skip(1)) {
        Ok(Command::Run(options)) => options,
        Ok(Command::Help) => {
            println!("{}", usage());
            return;
        }
        Ok(Command::PrintSeccomp) => {
            print!("{}", seccomp::describe());
            return;
        }
        Err(msg) => fail(&msg),
    };
    // Created now: once the filters are on, no file can be opened.
    let pending = match options
        .exit_report
        .as_deref()
        .map(exit_report::Pending::create)
    {
        Some(Err(e)) => fail(&format!(
            "cannot create the exit report's temporary file: {e}"
        )),
        Some(Ok(p)) => Some(p),
        None => None,
    };
    let report = run(&options, vmm_start);
    let _ = std::io::stdout().flush();
    if options.seccomp == Mode::Trap {
        eprintln!(
            "husk-vmm: seccomp: {} syscalls trapped",
            seccomp::trapped_count()
        );
    }
    if let Some(pending) = pending {
        let path = pending.path().to_path_buf();
        if let Err(e) = pending.finish(&report) {
            eprintln!(
                "husk-vmm: error: cannot write the exit report {}: {e}",
                path.display()
            );
        }
    }
    std::process::exit(report.exit_status);
}

/// Builds and runs the VM, prints what went wrong if anything did, and says how it ended.
fn run(options: &Options, vmm_start: Instant) -> ExitReport {
    match build_and_run(options, vmm_start) {
        Err(msg) => {
            print_error(&msg);
            exit_report::from_error(EXIT_VMM_ERROR, &msg)
        }
        Ok(outcome) => {
            let _ = std::io::stdout().flush();
            log::info!("VM stopped: {outcome:?}");
            match &outcome.reason {
                StopReason::Error(msg) => print_error(msg),
                StopReason::Signal(_) | StopReason::Requested => {}
                _ if outcome.exit_code.is_none() => {
                    eprintln!("husk-vmm: guest stopped without reporting an exit code");
                }
                _ => {}
            }
            exit_report::from_outcome(&outcome)
        }
    }
}

fn build_and_run(options: &Options, vmm_start: Instant) -> Result<VmOutcome, String> {
    let mut vmm = match &options.restore {
        None => build_microvm(&options.vm, vmm_start),
        Some(r) => {
            let overrides = RestoreOverrides {
                vsock: options.vm.vsock.clone(),
                net: options.vm.net.clone(),
                disks: options.vm.disks.clone(),
            };
            let console = &options.vm.console;
            let limit = options.vm.console_limit;
            let (state, mem) = (&r.state, &r.mem);
            build_from_snapshot(state, mem, &r.names, console, limit, &overrides, vmm_start).map(
                |mut vmm| {
                    vmm.set_start_paused(r.start_paused);
                    vmm
                },
            )
        }
    }
    .map_err(|e| one_line(&e))?;
    vmm.set_seccomp(Filters::new(options.seccomp).map_err(|e| one_line(&e))?);
    signals::install_stop_handlers(vmm.stop_state().wake_fd().as_raw_fd())
        .map_err(|e| one_line(&e))?;
    // Bound while this is the only thread (see ApiSocket::bind), just before the VM runs.
    let api = options
        .api_sock
        .as_deref()
        .map(ApiSocket::bind)
        .transpose()
        .map_err(|e| one_line(&e))?;
    vmm.run_with_api(api).map_err(|e| one_line(&e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Command, String> {
        parse_args(args.iter().map(|s| s.to_string()))
    }

    #[test]
    fn parses_every_option() {
        let Ok(Command::Run(o)) = parse(&[
            "--kernel",
            "/k",
            "--api-sock",
            "/run/a.sock",
            "--exit-report=/run/exit",
            "--initrd=/i",
            "--cmdline",
            "quiet",
            "--cpus",
            "4",
            "--memory",
            "4096",
            "--console",
            "file:/tmp/c",
            "--report-boot-time",
            "--allow-pvm",
            "--seccomp",
            "trap",
        ]) else {
            panic!("did not parse");
        };
        assert_eq!(o.api_sock, Some(PathBuf::from("/run/a.sock")));
        assert_eq!(o.exit_report, Some(PathBuf::from("/run/exit")));
        assert_eq!(o.seccomp, Mode::Trap);
        let c = o.vm;
        assert_eq!(c.kernel, PathBuf::from("/k"));
        assert_eq!(c.initrd, Some(PathBuf::from("/i")));
        assert_eq!((c.cmdline.as_str(), c.vcpus, c.mem_mib), ("quiet", 4, 4096));
        assert_eq!(c.console, ConsoleConfig::File(PathBuf::from("/tmp/c")));
        assert!(c.report_boot_time && c.allow_pvm);
    }

    #[test]
    fn reports_usage_errors() {
        assert!(parse(&[]).is_err());
        assert!(parse(&["--kernel"]).is_err());
        assert!(parse(&["--kernel", "/k", "--cpus", "many"]).is_err());
        assert!(parse(&["--kernel", "/k", "--console", "tty"]).is_err());
        assert!(parse(&["--kernel", "/k", "--console", "unix:"]).is_err());
        let Ok(Command::Run(o)) = parse(&["--kernel", "/k", "--console", "unix:/run/c.sock"])
        else {
            panic!("unix console did not parse");
        };
        assert_eq!((o.api_sock, o.exit_report), (None, None));
        assert_eq!(
            o.vm.console,
            ConsoleConfig::Unix(PathBuf::from("/run/c.sock"))
        );
        let file = std::env::temp_dir().join(format!("husk-cmdline-{}", std::process::id()));
        std::fs::write(&file, "quiet husk.spec=abc\n").unwrap();
        let Ok(Command::Run(o)) =
            parse(&["--kernel", "/k", "--cmdline-file", file.to_str().unwrap()])
        else {
            panic!("--cmdline-file did not parse");
        };
        assert_eq!(o.vm.cmdline, "quiet husk.spec=abc");
        std::fs::write(&file, "two\nlines").unwrap();
        assert!(parse(&["--kernel", "/k", "--cmdline-file", file.to_str().unwrap()]).is_err());
        std::fs::remove_file(&file).unwrap();
        assert!(parse(&["--kernel", "/k", "--bogus"]).is_err());
        assert!(parse(&["--kernel", "/k", "--report-boot-time=1"]).is_err());
        assert!(matches!(parse(&["--help"]), Ok(Command::Help)));
        assert!(matches!(
            parse(&["--print-seccomp"]),
            Ok(Command::PrintSeccomp)
        ));
        assert!(parse(&["--kernel", "/k", "--seccomp", "lax"]).is_err());
        assert!(parse(&["--kernel", "/k", "--net", "tap=a,fd=4"]).is_err());
        assert!(parse(&["--kernel", "/k", "--net", "fd=1"]).is_err());
        assert!(parse(&["--kernel", "/k", "--net", "tap=a,mac=01:02"]).is_err());
        assert!(parse(&["--kernel", "/k", "--net", "tap"]).is_err());
        assert!(parse(&["--kernel", "/k", "--vsock", "cid=3"]).is_err());
        assert!(parse(&["--kernel", "/k", "--api-sock"]).is_err());
        assert!(parse(&["--kernel", "/k", "--api-sock="]).is_err());
        assert!(parse(&["--kernel", "/k", "--exit-report", ""]).is_err());
    }

    #[test]
    fn parses_restore_and_refuses_boot_options_with_it() {
        let Ok(Command::Run(o)) = parse(&[
            "--restore-state",
            "/s/vm.state",
            "--restore-mem=/s/vm.mem",
            "--restore-mem-name",
            "/snaps/a/vm.mem",
            "--restore-base",
            "/proc/self/fd/9",
            "--start-paused",
            "--api-sock",
            "/run/a.sock",
            "--console",
            "none",
        ]) else {
            panic!("did not parse");
        };
        assert_eq!(
            o.restore,
            Some(Restore {
                state: "/s/vm.state".into(),
                mem: "/s/vm.mem".into(),
                names: husk_vmm::snapshot::LoadNames {
                    mem_name: Some("/snaps/a/vm.mem".into()),
                    base: Some("/proc/self/fd/9".into()),
                },
                start_paused: true
            })
        );
        assert_eq!(o.vm.console, ConsoleConfig::None);
        let e = parse(&[
            "--restore-state",
            "/s",
            "--restore-mem",
            "/m",
            "--cpus",
            "2",
        ])
        .err()
        .unwrap();
        assert!(e.contains("--cpus cannot be combined"), "{e}");
        assert!(parse(&["--restore-state", "/s"]).is_err());
        assert!(parse(&["--kernel", "/k", "--start-paused"]).is_err());
        assert!(parse(&["--restore-state", "", "--restore-mem", "/m"]).is_err());
    }

    #[test]
    fn parses_devices() {
        let Ok(Command::Run(o)) = parse(&[
            "--kernel",
            "/k",
            "--disk",
            "/a.img",
            "--disk",
            "/b.img:ro",
            "--net",
            "fd=7,name=husk0,mac=06:00:00:00:00:09",
            "--vsock",
            "cid=3,path=/run/v.sock",
            "--no-rng",
            "--no-seccomp",
        ]) else {
            panic!("did not parse");
        };
        assert_eq!(o.seccomp, Mode::Off);
        let c = o.vm;
        assert_eq!(
            c.disks,
            vec![
                DiskConfig {
                    path: "/a.img".into(),
                    read_only: false
                },
                DiskConfig {
                    path: "/b.img".into(),
                    read_only: true
                },
            ]
        );
        let net = c.net.unwrap();
        assert_eq!(net.tap, TapSource::Fd(7, "husk0".into()));
        assert_eq!(net.mac, [6, 0, 0, 0, 0, 9]);
        assert_eq!(
            c.vsock,
            Some(VsockConfig {
                cid: 3,
                uds_path: "/run/v.sock".into()
            })
        );
        assert!(!c.rng);
    }

    #[test]
    fn the_console_limit_defaults_to_16_mib_and_is_set_by_its_flag() {
        let Ok(Command::Run(o)) = parse(&["--kernel", "/k"]) else {
            panic!("did not parse");
        };
        assert_eq!(o.vm.console_limit, 16 * 1024 * 1024);
        let Ok(Command::Run(o)) = parse(&["--kernel", "/k", "--console-limit", "0"]) else {
            panic!("did not parse");
        };
        assert_eq!(o.vm.console_limit, 0);
        assert!(parse(&["--kernel", "/k", "--console-limit", "lots"]).is_err());
    }
}
