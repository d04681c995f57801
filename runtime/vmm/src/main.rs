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

use anyhow::{bail, Context};
use husk_host::vmm_args::{Invocation, SeccompMode, VmmArgs};
use husk_proto::vmm::ExitReport;
use husk_vmm::api::socket::ApiSocket;
use husk_vmm::builder::{build_from_snapshot, build_microvm};
use husk_vmm::config::{VmConfig, DEFAULT_CMDLINE, DEFAULT_MEM_MIB, DEFAULT_VCPUS};
use husk_vmm::devices::rate_limits::RateLimits;
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
                [--disk PATH[:ro]]... [--disk-slots N] [--net tap=NAME|fd=N,name=NAME|stream=N[,mac=MAC]]
                [--vsock cid=N,path=PATH] [--no-rng] [--api-sock PATH] [--exit-report PATH]
                [--fs tag=TAG,fd=N]...
                [--disk-limit [N:]LIMIT]... [--net-rx-limit LIMIT] [--net-tx-limit LIMIT]
                [--seccomp kill|trap|log|off] [--no-seccomp] [--print-seccomp]
       husk-vmm --restore-state PATH --restore-mem PATH [--start-paused]
                [--console DEST] [--api-sock PATH] [--exit-report PATH]
                [--disk PATH[:ro]]... [--net SPEC] [--vsock cid=N,path=PATH]
                [--disk-limit [N:]LIMIT]... [--net-rx-limit LIMIT] [--net-tx-limit LIMIT]

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
  --disk-slots N        N (0..=8) empty virtio-blk slots after the disks, filled and emptied
                        at run time on the control socket (attach_disk, detach_disk)
  --net SPEC            virtio-net on a tap: tap=NAME opens (or creates) the tap NAME;
                        fd=N,name=NAME adopts an open tap fd inherited from the parent;
                        stream=N: no tap, an inherited connected stream socket to passt
                        (length-prefixed Ethernet frames; rootless --net=user), on which no
                        checksum offload or TSO is offered to the guest;
                        mac=XX:XX:XX:XX:XX:XX (default 06:00:ac:10:00:02)
  --vsock cid=N,path=PATH  virtio-vsock with guest CID N (>= 3); host side on the Unix socket
                        PATH (CONNECT <port> for guest ports; PATH_<port> for guest-initiated)
  --no-rng              no virtio-rng device (on by default)
  --fs tag=TAG,fd=N     virtio-fs: a host directory served by a vhost-user-fs backend
                        (virtiofsd) at the other end of the inherited connected socket N; the
                        guest mounts TAG (repeatable, at most 8). Guest memory is then a
                        shared memfd, and snapshots are refused
  --disk-limit [N:]LIMIT  rate limit of disk N (its place among the --disk flags, 0 when left
                        out; repeatable). LIMIT: bw=RATE[:BURST] (bytes/s) and/or
                        ops=RATE[:BURST] (requests/s), comma-separated, or none; K, M, G
                        (powers of 1024) after a number; a burst of 0 or none given is one
                        second's worth. Changeable at run time on the control socket
  --net-rx-limit LIMIT  rate limit of the frames the guest receives (frames wait in the tap)
  --net-tx-limit LIMIT  rate limit of the frames the guest sends
  --api-sock PATH       serve the control socket at PATH (protocol husk.vmm.v1: describe, pause,
                        resume, stop, snapshot, set_rate_limits, attach_disk, detach_disk; 4-byte big-endian length + protobuf message each way).
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
#[derive(Debug)]
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

/// The longest `--cmdline-file` read (x86 Linux takes 2 KiB of command line; room to spare).
const MAX_CMDLINE_FILE: u64 = 64 * 1024;

/// Reads `--cmdline-file`: one line, bounded; a trailing newline is dropped.
fn read_cmdline_file(path: &Path) -> anyhow::Result<String> {
    use std::io::Read;
    let what = || format!("--cmdline-file {}", path.display());
    let mut options = std::fs::OpenOptions::new();
    options.read(true);
    let file = husk_devices::host_files::open(path, &options, false).with_context(what)?;
    let mut text = String::new();
    file.take(MAX_CMDLINE_FILE + 1)
        .read_to_string(&mut text)
        .with_context(what)?;
    if text.len() as u64 > MAX_CMDLINE_FILE {
        bail!("{}: longer than {MAX_CMDLINE_FILE} bytes", what());
    }
    let line = text.strip_suffix('\n').unwrap_or(&text);
    if line.contains(['\n', '\0']) {
        bail!("{}: must be one line without NUL bytes", what());
    }
    Ok(line.to_string())
}

fn seccomp_mode(mode: SeccompMode) -> Mode {
    match mode {
        SeccompMode::Kill => Mode::Kill,
        SeccompMode::Trap => Mode::Trap,
        SeccompMode::Log => Mode::Log,
        SeccompMode::Off => Mode::Off,
    }
}

/// The VM and process options a parsed command line asks for (the `--cmdline-file` is read
/// here, before anything else is opened).
fn options(args: VmmArgs) -> anyhow::Result<Options> {
    let seccomp = seccomp_mode(args.seccomp_mode());
    let mut vm = VmConfig::new(args.kernel.unwrap_or_default());
    vm.initrd = args.initrd;
    vm.cmdline = match (args.cmdline, args.cmdline_file) {
        (_, Some(file)) => read_cmdline_file(&file)?,
        (Some(text), None) => text,
        (None, None) => String::new(),
    };
    vm.vcpus = args.cpus.unwrap_or(vm.vcpus);
    vm.mem_mib = args.memory.unwrap_or(vm.mem_mib);
    vm.console = args.console.unwrap_or(vm.console);
    vm.console_limit = args.console_limit.unwrap_or(vm.console_limit);
    vm.report_boot_time = args.report_boot_time;
    vm.allow_pvm = args.allow_pvm;
    vm.disks = args.disks;
    vm.disk_slots = args.disk_slots;
    vm.net = args.net;
    vm.vsock = args.vsock;
    vm.rng = !args.no_rng;
    vm.balloon = (!args.no_balloon).then(|| args.balloon.unwrap_or_default());
    vm.fs = args.fs;
    vm.rate_limits = RateLimits::from_args(
        &args.disk_limits,
        args.net_rx_limit.as_ref(),
        args.net_tx_limit.as_ref(),
    );
    let restore = args.restore.map(|r| Restore {
        state: r.state,
        mem: r.mem,
        names: husk_vmm::snapshot::LoadNames {
            mem_name: r.mem_name,
            base: r.base,
        },
        start_paused: r.start_paused,
    });
    Ok(Options {
        vm,
        restore,
        api_sock: args.api_sock,
        exit_report: args.exit_report,
        seccomp,
    })
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

/// One malloc arena for every thread. glibc gives threads arenas of their own, and when a
/// thread frees enough of one it shrinks it, which reads /proc/sys/vm/overcommit_memory the
/// first time: an `openat` no thread's seccomp filter allows (a qcow2 image's cluster buffers
/// and tables are large enough to trigger it). The main arena trims with brk instead.
fn single_malloc_arena() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets an allocator parameter; it is called before any other thread
    // exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

fn main() {
    let vmm_start = Instant::now();
    single_malloc_arena();
    init_logging();
    let args = match VmmArgs::parse(std::env::args_os().skip(1)) {
        Ok(Invocation::Run(args)) => *args,
        Ok(Invocation::Help) => {
            println!("{}", usage());
            return;
        }
        Err(e) => fail(&e.to_string()),
    };
    if args.print_seccomp {
        print!("{}", seccomp::describe());
        return;
    }
    let options = match options(args) {
        Ok(options) => options,
        Err(e) => fail(&one_line(e.as_ref())),
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
        Err(e) => {
            let msg = one_line(e.as_ref());
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

fn build_and_run(options: &Options, vmm_start: Instant) -> anyhow::Result<VmOutcome> {
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
                    vmm.notify_all_queues();
                    vmm
                },
            )
        }
    }?;
    vmm.set_rate_limits(&options.vm.rate_limits)?;
    vmm.set_seccomp(Filters::new(options.seccomp)?);
    signals::install_stop_handlers(vmm.stop_state().wake_fd().as_raw_fd())?;
    // Bound while this is the only thread (see ApiSocket::bind), just before the VM runs.
    let api = options
        .api_sock
        .as_deref()
        .map(ApiSocket::bind)
        .transpose()?;
    Ok(vmm.run_with_api(api)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use husk_vmm::config::{ConsoleConfig, DiskConfig, TapSource, VsockConfig};

    /// Parses as main does: the command line, then the options it asks for.
    fn parse(args: &[&str]) -> Result<Options, String> {
        match VmmArgs::parse(args.iter().copied()) {
            Ok(Invocation::Run(args)) => options(*args).map_err(|e| one_line(e.as_ref())),
            Ok(Invocation::Help) => Err("help".into()),
            Err(e) => Err(e.to_string()),
        }
    }

    #[test]
    fn parses_every_option() {
        let o = parse(&[
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
        ])
        .expect("did not parse");
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
        let o = parse(&["--kernel", "/k", "--console", "unix:/run/c.sock"])
            .expect("unix console did not parse");
        assert_eq!((o.api_sock, o.exit_report), (None, None));
        assert_eq!(
            o.vm.console,
            ConsoleConfig::Unix(PathBuf::from("/run/c.sock"))
        );
        let file = std::env::temp_dir().join(format!("husk-cmdline-{}", std::process::id()));
        std::fs::write(&file, "quiet husk.spec=abc\n").unwrap();
        let o = parse(&["--kernel", "/k", "--cmdline-file", file.to_str().unwrap()])
            .expect("--cmdline-file did not parse");
        assert_eq!(o.vm.cmdline, "quiet husk.spec=abc");
        std::fs::write(&file, "two\nlines").unwrap();
        assert!(parse(&["--kernel", "/k", "--cmdline-file", file.to_str().unwrap()]).is_err());
        std::fs::remove_file(&file).unwrap();
        assert!(parse(&["--kernel", "/k", "--bogus"]).is_err());
        assert!(parse(&["--kernel", "/k", "--report-boot-time=1"]).is_err());
        assert_eq!(VmmArgs::parse(["--help"]), Ok(Invocation::Help));
        assert!(usage().contains("--restore-state"));
        let Ok(Invocation::Run(print)) = VmmArgs::parse(["--print-seccomp"]) else {
            panic!("--print-seccomp did not parse");
        };
        assert!(print.print_seccomp);
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
    fn a_usage_error_is_one_line_naming_the_flag() {
        let e = parse(&["--kernel", "/k", "--cpus", "many"]).unwrap_err();
        assert!(!e.contains('\n') && e.contains("--cpus"), "{e}");
        let e = parse(&[]).unwrap_err();
        assert_eq!(e, "--kernel is required (see --help)");
    }

    #[test]
    fn parses_restore_and_refuses_boot_options_with_it() {
        let o = parse(&[
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
        ])
        .expect("did not parse");
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
        let o = parse(&[
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
        ])
        .expect("did not parse");
        assert_eq!(o.seccomp, Mode::Off);
        let c = o.vm;
        assert_eq!(
            c.disks,
            vec![
                DiskConfig::raw("/a.img", false),
                DiskConfig::raw("/b.img", true),
            ]
        );
        let net = c.net.unwrap();
        assert_eq!(net.tap, TapSource::Fd(7, "husk0".into()));
        assert_eq!(net.mac, [6, 0, 0, 0, 0, 9]);
        let o = parse(&["--kernel", "/k", "--net", "stream=5,mac=06:00:0a:00:02:0f"])
            .expect("did not parse");
        assert_eq!(o.vm.net.unwrap().tap, TapSource::Stream(5));
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
        let o = parse(&["--kernel", "/k"]).expect("did not parse");
        assert_eq!(o.vm.console_limit, 16 * 1024 * 1024);
        let o = parse(&["--kernel", "/k", "--console-limit", "0"]).expect("did not parse");
        assert_eq!(o.vm.console_limit, 0);
        assert!(parse(&["--kernel", "/k", "--console-limit", "lots"]).is_err());
    }

    #[test]
    fn defaults_match_the_vm_configuration() {
        let o = parse(&["--kernel", "/k"]).expect("did not parse");
        assert_eq!(o.vm, VmConfig::new("/k".into()));
        assert_eq!((o.restore, o.seccomp), (None, Mode::Kill));
    }
}
