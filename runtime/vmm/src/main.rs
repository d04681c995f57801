//! The husk-vmm binary: parses the command line, builds and runs one micro-VM, and exits with the
//! guest application's exit code.
//!
//! Exit status: the code the guest reported on port 0x601; 130/143 after SIGINT/SIGTERM; 125 for
//! any VMM error (one line `husk-vmm: error: ...` on stderr) and for a guest that stopped without
//! reporting an exit code.

use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::time::Instant;

use husk_vmm::builder::build_microvm;
use husk_vmm::config::{
    ConsoleConfig, DiskConfig, NetConfig, TapSource, VmConfig, VsockConfig, DEFAULT_CMDLINE,
    DEFAULT_MEM_MIB, DEFAULT_VCPUS,
};
use husk_vmm::signals;
use husk_vmm::stop::StopReason;
use husk_vmm::vmm::EXIT_VMM_ERROR;

fn usage() -> String {
    format!(
        "usage: husk-vmm --kernel PATH [--initrd PATH] [--cmdline STR] [--cpus N] [--memory MIB]
                [--console stdout|none|file:PATH|unix:PATH] [--report-boot-time] [--allow-pvm]
                [--disk PATH[:ro]]... [--net tap=NAME|fd=N,name=NAME[,mac=MAC]]
                [--vsock cid=N,path=PATH] [--no-rng]

  --kernel PATH         guest kernel: ELF vmlinux (PVH entry used when present) or bzImage
  --initrd PATH         initramfs
  --cmdline STR         appended to the default command line:
                        {DEFAULT_CMDLINE}
  --cpus N              vCPUs, 1..=32 (default {DEFAULT_VCPUS})
  --memory MIB          guest memory in MiB, 64..=262144 (default {DEFAULT_MEM_MIB})
  --console DEST        serial console: stdout (default), none, file:PATH, or unix:PATH (a
                        connection to the Unix socket listening at PATH)
  --report-boot-time    print 'husk-vmm: guest init after <N> us' when the guest init starts
  --allow-pvm           on a PVM host, boot a kernel that does not look PVM-enabled anyway
  --disk PATH[:ro]      virtio-blk disk on a raw image (repeatable; vda, vdb, ... in order)
  --net SPEC            virtio-net on a tap: tap=NAME opens (or creates) the tap NAME;
                        fd=N,name=NAME adopts an open tap fd inherited from the parent;
                        mac=XX:XX:XX:XX:XX:XX (default 06:00:ac:10:00:02)
  --vsock cid=N,path=PATH  virtio-vsock with guest CID N (>= 3); host side on the Unix socket
                        PATH (CONNECT <port> for guest ports; PATH_<port> for guest-initiated)
  --no-rng              no virtio-rng device (on by default)
  -h, --help            this text

Exit status: the guest's exit code (port 0x601); 130/143 on SIGINT/SIGTERM; 125 on a VMM error
or when the guest stopped without reporting an exit code.
Environment: HUSK_LOG=error|warn|info|debug (default warn) for VMM diagnostics on stderr."
    )
}

enum Command {
    Run(Box<VmConfig>),
    Help,
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
                | "--cpus"
                | "--memory"
                | "--console"
                | "--disk"
                | "--net"
                | "--vsock"
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
        match flag.as_str() {
            "--kernel" => kernel = Some(PathBuf::from(value)),
            "--initrd" => config.initrd = Some(PathBuf::from(value)),
            "--cmdline" => config.cmdline = value,
            "--cpus" => config.vcpus = parse_number("--cpus", &value)?,
            "--memory" => config.mem_mib = parse_number("--memory", &value)?,
            "--console" => config.console = parse_console(&value)?,
            "--report-boot-time" => config.report_boot_time = true,
            "--allow-pvm" => config.allow_pvm = true,
            "--disk" => config.disks.push(parse_disk(&value)),
            "--net" => config.net = Some(parse_net(&value)?),
            "--vsock" => config.vsock = Some(parse_vsock(&value)?),
            "--no-rng" => config.rng = false,
            "-h" | "--help" => return Ok(Command::Help),
            other => return Err(format!("unknown argument '{other}' (see --help)")),
        }
    }
    config.kernel = kernel.ok_or("--kernel is required (see --help)")?;
    Ok(Command::Run(Box::new(config)))
}

/// Minimal stderr logger for VMM diagnostics.
struct StderrLogger;

impl log::Log for StderrLogger {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        metadata.level() <= log::max_level()
    }
    fn log(&self, record: &log::Record) {
        if self.enabled(record.metadata()) {
            eprintln!(
                "husk-vmm: {}: {}",
                record.level().as_str().to_lowercase(),
                record.args()
            );
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

fn fail(msg: &str) -> ! {
    let _ = std::io::stdout().flush();
    eprintln!("husk-vmm: error: {msg}");
    std::process::exit(EXIT_VMM_ERROR)
}

fn main() {
    let vmm_start = Instant::now();
    init_logging();
    let config = match parse_args(std::env::args().skip(1)) {
        Ok(Command::Run(c)) => c,
        Ok(Command::Help) => {
            println!("{}", usage());
            return;
        }
        Err(msg) => fail(&msg),
    };
    let vmm = build_microvm(&config, vmm_start).unwrap_or_else(|e| fail(&one_line(&e)));
    if let Err(e) = signals::install_stop_handlers(vmm.stop_state().wake_fd().as_raw_fd()) {
        fail(&one_line(&e));
    }
    let outcome = vmm.run().unwrap_or_else(|e| fail(&one_line(&e)));
    let _ = std::io::stdout().flush();
    log::info!("VM stopped: {outcome:?}");
    match &outcome.reason {
        StopReason::Error(msg) => fail(msg),
        StopReason::Signal(_) => {}
        _ if outcome.exit_code.is_none() => {
            eprintln!("husk-vmm: guest stopped without reporting an exit code");
        }
        _ => {}
    }
    std::process::exit(outcome.exit_status());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Command, String> {
        parse_args(args.iter().map(|s| s.to_string()))
    }

    #[test]
    fn parses_every_option() {
        let Ok(Command::Run(c)) = parse(&[
            "--kernel",
            "/k",
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
        ]) else {
            panic!("did not parse");
        };
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
        let Ok(Command::Run(c)) = parse(&["--kernel", "/k", "--console", "unix:/run/c.sock"])
        else {
            panic!("unix console did not parse");
        };
        assert_eq!(c.console, ConsoleConfig::Unix(PathBuf::from("/run/c.sock")));
        assert!(parse(&["--kernel", "/k", "--bogus"]).is_err());
        assert!(parse(&["--kernel", "/k", "--report-boot-time=1"]).is_err());
        assert!(matches!(parse(&["--help"]), Ok(Command::Help)));
        assert!(parse(&["--kernel", "/k", "--net", "tap=a,fd=4"]).is_err());
        assert!(parse(&["--kernel", "/k", "--net", "fd=1"]).is_err());
        assert!(parse(&["--kernel", "/k", "--net", "tap=a,mac=01:02"]).is_err());
        assert!(parse(&["--kernel", "/k", "--net", "tap"]).is_err());
        assert!(parse(&["--kernel", "/k", "--vsock", "cid=3"]).is_err());
    }

    #[test]
    fn parses_devices() {
        let Ok(Command::Run(c)) = parse(&[
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
        ]) else {
            panic!("did not parse");
        };
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
}
