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
use husk_vmm::config::{ConsoleConfig, VmConfig, DEFAULT_CMDLINE, DEFAULT_MEM_MIB, DEFAULT_VCPUS};
use husk_vmm::signals;
use husk_vmm::stop::StopReason;
use husk_vmm::vmm::EXIT_VMM_ERROR;

fn usage() -> String {
    format!(
        "usage: husk-vmm --kernel PATH [--initrd PATH] [--cmdline STR] [--cpus N] [--memory MIB]
                [--console stdout|none|file:PATH] [--report-boot-time] [--allow-pvm]

  --kernel PATH         guest kernel: ELF vmlinux (PVH entry used when present) or bzImage
  --initrd PATH         initramfs
  --cmdline STR         appended to the default command line:
                        {DEFAULT_CMDLINE}
  --cpus N              vCPUs, 1..=32 (default {DEFAULT_VCPUS})
  --memory MIB          guest memory in MiB, 64..=262144 (default {DEFAULT_MEM_MIB})
  --console DEST        serial console: stdout (default), none, or file:PATH
  --report-boot-time    print 'husk-vmm: guest init after <N> us' when the guest init starts
  --allow-pvm           on a PVM host, boot a kernel that does not look PVM-enabled anyway
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
    match value {
        "stdout" => Ok(ConsoleConfig::Stdout),
        "none" => Ok(ConsoleConfig::None),
        v => match v.strip_prefix("file:") {
            Some(path) if !path.is_empty() => Ok(ConsoleConfig::File(PathBuf::from(path))),
            _ => Err(format!(
                "invalid --console '{v}': use stdout, none or file:PATH"
            )),
        },
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
            "--kernel" | "--initrd" | "--cmdline" | "--cpus" | "--memory" | "--console"
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
        assert!(parse(&["--kernel", "/k", "--bogus"]).is_err());
        assert!(parse(&["--kernel", "/k", "--report-boot-time=1"]).is_err());
        assert!(matches!(parse(&["--help"]), Ok(Command::Help)));
    }
}
