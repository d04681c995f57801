//! What a user asks for: the VM configuration, its validation, and the kernel command line.

use std::path::PathBuf;

use crate::arch::x86_64::layout::{CMDLINE_MAX_LEN, MAX_MEM_MIB, MIN_MEM_MIB};

// The devices and defaults of a VM are the launch description's own types: what `husk run` and
// huskd write on husk-vmm's command line is what it reads (see husk_host::vmm_args).
pub use husk_host::vmm_args::{
    BalloonConfig, ConsoleConfig, DiskConfig, FsConfig, NetConfig, TapSource, VsockConfig,
    DEFAULT_MEM_MIB, DEFAULT_VCPUS, MIN_MTU,
};

/// Most vCPUs a husk VM may have (the MP table and topology are sized for this).
pub const MAX_VCPUS: u8 = 32;
/// Always passed first on the kernel command line:
/// - `console=ttyS0`: the console is the 8250 at 0x3f8;
/// - `reboot=k panic=-1`: reboot (and panic, at once) through the i8042 reset line, which the VMM
///   turns into "VM stopped";
/// - `i8042.noaux i8042.nomux i8042.nopnp`: the emulated i8042 has a keyboard port only, so the
///   driver must not probe mouse, multiplexer or PnP (each probe would wait for a timeout).
pub const DEFAULT_CMDLINE: &str =
    "console=ttyS0 reboot=k panic=-1 i8042.noaux i8042.nomux i8042.nopnp";

/// Errors in a VM configuration.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// vCPU count out of range.
    #[error("--cpus must be between 1 and {MAX_VCPUS}, got {0}")]
    VcpuCount(u64),
    /// Memory size out of range.
    #[error("--memory must be between {MIN_MEM_MIB} and {MAX_MEM_MIB} MiB, got {0}")]
    MemorySize(u64),
    /// Command line too long for the kernel.
    #[error("kernel command line is {0} bytes, the kernel accepts at most {CMDLINE_MAX_LEN}")]
    CmdlineTooLong(usize),
    /// Command line contains a character the boot protocol cannot carry.
    #[error("kernel command line contains a NUL or non-ASCII character")]
    CmdlineInvalid,
}

/// A micro-VM to boot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmConfig {
    /// Guest kernel: ELF vmlinux or bzImage.
    pub kernel: PathBuf,
    /// Optional initramfs.
    pub initrd: Option<PathBuf>,
    /// Extra kernel command line, appended to [`DEFAULT_CMDLINE`].
    pub cmdline: String,
    /// Number of vCPUs as given (validated to 1..=[`MAX_VCPUS`]).
    pub vcpus: u64,
    /// Guest memory in MiB.
    pub mem_mib: u64,
    /// Serial console destination.
    pub console: ConsoleConfig,
    /// Most bytes a `file:` console holds before it is truncated (0: unlimited).
    pub console_limit: u64,
    /// Print the guest-init time to stderr.
    pub report_boot_time: bool,
    /// Boot an ordinary kernel even on a PVM host.
    pub allow_pvm: bool,
    /// virtio-blk disks, in order (the guest sees vda, vdb, ...).
    pub disks: Vec<DiskConfig>,
    /// Empty disk slots after the disks (`--disk-slots`, at most 8), filled at run time.
    pub disk_slots: u32,
    /// virtio-net device.
    pub net: Option<NetConfig>,
    /// virtio-vsock device.
    pub vsock: Option<VsockConfig>,
    /// virtio-rng device (on by default).
    pub rng: bool,
    /// virtio-balloon device and what it offers (on by default, see docs/balloon.md).
    pub balloon: Option<BalloonConfig>,
    /// virtio-fs devices (shared host directories, served by vhost-user backends); with any,
    /// guest memory is a shared memfd and the VM cannot be snapshotted.
    pub fs: Vec<FsConfig>,
    /// Rate limits of the disks and the net device (none by default), set once the devices
    /// exist (see [`crate::vmm::Vmm::set_rate_limits`]).
    pub rate_limits: crate::devices::rate_limits::RateLimits,
}

impl VmConfig {
    /// A configuration with defaults for everything but the kernel.
    pub fn new(kernel: PathBuf) -> Self {
        VmConfig {
            kernel,
            initrd: None,
            cmdline: String::new(),
            vcpus: u64::from(DEFAULT_VCPUS),
            mem_mib: DEFAULT_MEM_MIB,
            console: ConsoleConfig::Stdout,
            console_limit: crate::devices::legacy::console_file::DEFAULT_CONSOLE_LIMIT,
            report_boot_time: false,
            allow_pvm: false,
            disks: Vec::new(),
            disk_slots: 0,
            net: None,
            vsock: None,
            rng: true,
            balloon: Some(BalloonConfig::default()),
            fs: Vec::new(),
            rate_limits: Default::default(),
        }
    }

    /// Checks ranges and the command line; returns the vCPU count as a `u8`.
    pub fn validate(&self) -> Result<u8, ConfigError> {
        let vcpus = u8::try_from(self.vcpus)
            .ok()
            .filter(|n| (1..=MAX_VCPUS).contains(n))
            .ok_or(ConfigError::VcpuCount(self.vcpus))?;
        if !(MIN_MEM_MIB..=MAX_MEM_MIB).contains(&self.mem_mib) {
            return Err(ConfigError::MemorySize(self.mem_mib));
        }
        build_cmdline(&[], &self.cmdline)?;
        Ok(vcpus)
    }

    /// Guest memory in bytes.
    pub fn mem_bytes(&self) -> u64 {
        self.mem_mib << 20
    }
}

/// The full kernel command line: [`DEFAULT_CMDLINE`], the parameters announcing devices, then
/// the user's part.
pub fn build_cmdline(device_params: &[String], user: &str) -> Result<String, ConfigError> {
    let mut line = DEFAULT_CMDLINE.to_string();
    for part in device_params
        .iter()
        .map(String::as_str)
        .chain([user.trim()])
    {
        if !part.is_empty() {
            line.push(' ');
            line.push_str(part);
        }
    }
    if line.bytes().any(|b| b == 0 || !b.is_ascii()) {
        return Err(ConfigError::CmdlineInvalid);
    }
    if line.len() > CMDLINE_MAX_LEN {
        return Err(ConfigError::CmdlineTooLong(line.len()));
    }
    Ok(line)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> VmConfig {
        VmConfig::new(PathBuf::from("/k"))
    }

    #[test]
    fn defaults_are_valid() {
        let c = cfg();
        assert_eq!(
            (c.vcpus, c.mem_mib, c.console.clone()),
            (1, 256, ConsoleConfig::Stdout)
        );
        assert_eq!(c.validate(), Ok(1));
        assert_eq!(c.mem_bytes(), 256 << 20);
    }

    #[test]
    fn vcpu_count_must_be_in_range() {
        for (n, ok) in [(0, false), (1, true), (32, true), (33, false), (256, false)] {
            let c = VmConfig { vcpus: n, ..cfg() };
            assert_eq!(c.validate().is_ok(), ok, "{n} vcpus");
            if !ok {
                assert_eq!(c.validate(), Err(ConfigError::VcpuCount(n)));
            }
        }
    }

    #[test]
    fn memory_must_be_in_range() {
        for (m, ok) in [
            (63, false),
            (64, true),
            (16384, true),
            (MAX_MEM_MIB, true),
            (MAX_MEM_MIB + 1, false),
        ] {
            let c = VmConfig {
                mem_mib: m,
                ..cfg()
            };
            assert_eq!(c.validate().is_ok(), ok, "{m} MiB");
        }
        let c = VmConfig {
            mem_mib: 1,
            ..cfg()
        };
        assert_eq!(c.validate(), Err(ConfigError::MemorySize(1)));
    }

    #[test]
    fn cmdline_is_defaults_then_user_part() {
        assert_eq!(build_cmdline(&[], "").unwrap(), DEFAULT_CMDLINE);
        assert_eq!(
            build_cmdline(&[], "  quiet init=/bin/sh ").unwrap(),
            format!("{DEFAULT_CMDLINE} quiet init=/bin/sh")
        );
        assert!(DEFAULT_CMDLINE.starts_with("console=ttyS0 reboot=k panic=-1"));
    }

    #[test]
    fn cmdline_rejects_overlong_and_nul() {
        let long = "x".repeat(CMDLINE_MAX_LEN);
        assert!(matches!(
            build_cmdline(&[], &long),
            Err(ConfigError::CmdlineTooLong(_))
        ));
        assert_eq!(build_cmdline(&[], "a\0b"), Err(ConfigError::CmdlineInvalid));
        let c = VmConfig {
            cmdline: long,
            ..cfg()
        };
        assert!(c.validate().is_err());
    }
}
