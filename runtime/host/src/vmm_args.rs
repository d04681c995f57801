//! One husk-vmm invocation as a typed value: what `husk run` and huskd build, and what husk-vmm
//! parses its own command line into. Producer and consumer share this type, so a flag cannot be
//! spelt one way on one side and another way on the other.
//!
//! [`VmmArgs::to_args`] writes the argv; [`VmmArgs::parse`] reads it back. The device values
//! (`--disk`, `--net`, `--vsock`, `--console`, the rate limits) are types of their own with
//! `FromStr` and `Display` that are each other's inverse.
//!
//! The parser is written by hand rather than with clap: husk-vmm is started once per VM and
//! clap measured at about 2 ms of start-up and 0.6 MiB of RSS there (docs/benchmarks.md).

use std::ffi::{OsStr, OsString};
use std::fmt;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::str::FromStr;

pub use husk_devices::virtio::block::format::{DiskFormat, MAX_CHAIN};

/// Default number of vCPUs.
pub const DEFAULT_VCPUS: u8 = 1;
/// Default guest memory in MiB.
pub const DEFAULT_MEM_MIB: u64 = 256;
/// Most empty disk slots (`--disk-slots`) a VM may declare.
pub const MAX_DISK_SLOTS: u32 = 8;
/// The MAC of a `--net` device that names none.
pub const DEFAULT_MAC: [u8; 6] = [0x06, 0x00, 0xac, 0x10, 0x00, 0x02];

/// Why a `--console`, `--disk`, `--net`, `--vsock`, `--seccomp` value or a MAC was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValueError {
    #[error("'{0}': use stdout, none, file:PATH or unix:PATH")]
    Console(String),
    #[error("'{0}': expected key=value pairs separated by commas")]
    Pairs(String),
    #[error("unknown key '{0}'")]
    UnknownKey(String),
    #[error("'{0}' is not a number")]
    Number(String),
    #[error("needs exactly one of tap=NAME, fd=N or stream=N (N > 2)")]
    TapSource,
    #[error("needs cid=N,path=PATH")]
    Vsock,
    #[error("'{0}' is not a unicast MAC address xx:xx:xx:xx:xx:xx")]
    Mac(String),
    #[error("'{0}': use kill, trap, log or off")]
    Seccomp(String),
    #[error("an empty path")]
    EmptyPath,
    #[error("not valid UTF-8")]
    NotUtf8,
    #[error("'{0}': use bw=RATE[:BURST] and/or ops=RATE[:BURST] (K, M, G suffixes), or none")]
    RateLimit(String),
    #[error("a rate must be above zero")]
    ZeroRate,
    #[error("'{0}': unknown disk format (use raw or qcow2)")]
    Format(String),
    #[error("mtu {0} is below {MIN_MTU}")]
    Mtu(u16),
    #[error("{0} disk slots: at most {MAX_DISK_SLOTS}")]
    DiskSlots(u64),
    #[error("needs tag=TAG,fd=N (N > 2; TAG 1..={MAX_FS_TAG_LEN} of A-Z a-z 0-9 - _)")]
    Fs,
    #[error("'{0}': use on or off")]
    OnOff(String),
}

/// Where the guest's serial console goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConsoleConfig {
    /// The VMM's standard output.
    Stdout,
    /// Discarded.
    None,
    /// Written to (created or truncated) this file.
    File(PathBuf),
    /// Written to a stream connection to the Unix socket listening at this path (a supervisor
    /// that collects consoles, or `socat UNIX-LISTEN:PATH -`).
    Unix(PathBuf),
}

impl FromStr for ConsoleConfig {
    type Err = ValueError;
    fn from_str(value: &str) -> Result<Self, ValueError> {
        match value {
            "stdout" => return Ok(Self::Stdout),
            "none" => return Ok(Self::None),
            _ => {}
        }
        let path = |p: &str| (!p.is_empty()).then(|| PathBuf::from(p));
        if let Some(p) = value.strip_prefix("file:").and_then(path) {
            return Ok(Self::File(p));
        }
        if let Some(p) = value.strip_prefix("unix:").and_then(path) {
            return Ok(Self::Unix(p));
        }
        Err(ValueError::Console(value.into()))
    }
}

impl fmt::Display for ConsoleConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Stdout => f.write_str("stdout"),
            Self::None => f.write_str("none"),
            Self::File(p) => write!(f, "file:{}", p.display()),
            Self::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// A virtio-blk disk: `PATH` or `PATH:ro` for a raw image; for a qcow2 image (or any disk with
/// a backing chain) the keyed form `file=PATH,format=qcow2[,ro][,backing=FMT:PATH]...`, with
/// the backing chain from the top down (paths in the keyed form cannot hold a comma).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskConfig {
    /// The image file.
    pub path: PathBuf,
    /// The guest may not write it.
    pub read_only: bool,
    /// Its format (never guessed from the contents).
    pub format: DiskFormat,
    /// The images below it, from the top down, each opened read-only (resolved and checked by
    /// the launcher, see `disk_image`).
    pub backing: Vec<(PathBuf, DiskFormat)>,
}

impl DiskConfig {
    /// A raw image, as `PATH[:ro]` says.
    pub fn raw(path: impl Into<PathBuf>, read_only: bool) -> Self {
        Self {
            path: path.into(),
            read_only,
            format: DiskFormat::Raw,
            backing: Vec::new(),
        }
    }

    fn keyed(&self) -> bool {
        self.format != DiskFormat::Raw || !self.backing.is_empty()
    }
}

impl FromStr for DiskConfig {
    type Err = ValueError;
    fn from_str(value: &str) -> Result<Self, ValueError> {
        if value.starts_with("file=") {
            return parse_keyed_disk(value);
        }
        let (path, read_only) = match value.strip_suffix(":ro") {
            Some(path) => (path, true),
            None => (value, false),
        };
        if path.is_empty() {
            return Err(ValueError::EmptyPath);
        }
        Ok(Self::raw(path, read_only))
    }
}

fn parse_keyed_disk(value: &str) -> Result<DiskConfig, ValueError> {
    let mut disk = DiskConfig::raw(PathBuf::new(), false);
    let format = |f: &str| {
        f.parse::<DiskFormat>()
            .map_err(|_| ValueError::Format(f.to_string()))
    };
    for part in value.split(',') {
        match part.split_once('=') {
            Some(("file", p)) if !p.is_empty() => disk.path = p.into(),
            Some(("format", f)) => disk.format = format(f)?,
            Some(("backing", b)) => {
                let (f, p) = b
                    .split_once(':')
                    .filter(|(_, p)| !p.is_empty())
                    .ok_or_else(|| ValueError::Pairs(value.into()))?;
                disk.backing.push((p.into(), format(f)?));
            }
            None if part == "ro" => disk.read_only = true,
            Some((k, _)) if !matches!(k, "file") => return Err(ValueError::UnknownKey(k.into())),
            _ => return Err(ValueError::Pairs(value.into())),
        }
    }
    if disk.path.as_os_str().is_empty() {
        return Err(ValueError::EmptyPath);
    }
    if disk.backing.len() >= MAX_CHAIN {
        return Err(ValueError::Pairs(value.into()));
    }
    Ok(disk)
}

impl fmt::Display for DiskConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !self.keyed() {
            let ro = if self.read_only { ":ro" } else { "" };
            return write!(f, "{}{ro}", self.path.display());
        }
        write!(f, "file={},format={}", self.path.display(), self.format)?;
        if self.read_only {
            f.write_str(",ro")?;
        }
        for (path, format) in &self.backing {
            write!(f, ",backing={format}:{}", path.display())?;
        }
        Ok(())
    }
}

/// Where the virtio-net device's tap comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TapSource {
    /// Create (or attach to) the tap with this name.
    Name(String),
    /// An already-open tap fd inherited from the parent (which created and addressed it), with
    /// the interface name for logs.
    Fd(i32, String),
    /// No tap: an inherited connected stream socket speaking passt's protocol (each Ethernet
    /// frame preceded by its length, 32-bit big-endian), for rootless networking
    /// (`husk run --net=user`, see `passt`).
    Stream(i32),
}

/// The virtio-net device: `tap=NAME`, `fd=N,name=NAME` or `stream=N`, then `,mac=MAC`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetConfig {
    pub tap: TapSource,
    pub mac: [u8; 6],
    /// The MTU the device announces to the guest (VIRTIO_NET_F_MTU), `mtu=N`, 68..=65535:
    /// that of the interface the VM stands in for (a CNI network's); `None`: the guest's
    /// default (1500).
    pub mtu: Option<u16>,
}

/// `key=value` pairs separated by commas.
fn pairs(value: &str) -> Result<Vec<(&str, &str)>, ValueError> {
    value
        .split(',')
        .map(|kv| kv.split_once('=').ok_or(ValueError::Pairs(value.into())))
        .collect()
}

fn number<T: FromStr>(text: &str) -> Result<T, ValueError> {
    text.parse().map_err(|_| ValueError::Number(text.into()))
}

impl FromStr for NetConfig {
    type Err = ValueError;
    fn from_str(value: &str) -> Result<Self, ValueError> {
        let (mut tap, mut fd, mut name, mut mac) = (None, None, None, DEFAULT_MAC);
        let (mut stream, mut mtu) = (None, None);
        for (k, v) in pairs(value)? {
            match k {
                "tap" => tap = Some(v.to_string()),
                "fd" => fd = Some(number::<i32>(v)?),
                "stream" => stream = Some(number::<i32>(v)?),
                "name" => name = Some(v.to_string()),
                "mac" => mac = parse_mac(v)?,
                "mtu" => {
                    let n = number::<u16>(v)?;
                    if n < MIN_MTU {
                        return Err(ValueError::Mtu(n));
                    }
                    mtu = Some(n);
                }
                _ => return Err(ValueError::UnknownKey(k.into())),
            }
        }
        let tap = match (tap, fd, stream) {
            (Some(tap), None, None) => TapSource::Name(tap),
            (None, Some(fd), None) if fd > 2 => {
                TapSource::Fd(fd, name.unwrap_or_else(|| format!("fd{fd}")))
            }
            // A stream has no interface name.
            (None, None, Some(fd)) if fd > 2 && name.is_none() => TapSource::Stream(fd),
            _ => return Err(ValueError::TapSource),
        };
        Ok(Self { tap, mac, mtu })
    }
}

impl fmt::Display for NetConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.tap {
            TapSource::Name(name) => write!(f, "tap={name}")?,
            TapSource::Fd(fd, name) => write!(f, "fd={fd},name={name}")?,
            TapSource::Stream(fd) => write!(f, "stream={fd}")?,
        }
        write!(f, ",mac={}", format_mac(&self.mac))?;
        if let Some(mtu) = self.mtu {
            write!(f, ",mtu={mtu}")?;
        }
        Ok(())
    }
}

/// The smallest MTU an IPv4 interface may have (RFC 791).
pub const MIN_MTU: u16 = 68;

/// One token bucket of a rate limiter: `RATE[:BURST]` per second, with K, M or G (powers of
/// 1024) allowed after each number. A burst of 0 (or none given) is one second's worth.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Bucket {
    pub rate: u64,
    pub burst: u64,
}

/// A count with an optional K, M or G suffix (powers of 1024).
pub fn parse_size(text: &str) -> Result<u64, ValueError> {
    let (digits, shift) = match text.as_bytes().last() {
        Some(b'K' | b'k') => (&text[..text.len() - 1], 10),
        Some(b'M' | b'm') => (&text[..text.len() - 1], 20),
        Some(b'G' | b'g') => (&text[..text.len() - 1], 30),
        _ => (text, 0),
    };
    let n: u64 = number(digits)?;
    n.checked_mul(1 << shift)
        .ok_or_else(|| ValueError::Number(text.into()))
}

impl FromStr for Bucket {
    type Err = ValueError;
    fn from_str(value: &str) -> Result<Self, ValueError> {
        let (rate, burst) = match value.split_once(':') {
            Some((rate, burst)) => (parse_size(rate)?, parse_size(burst)?),
            None => (parse_size(value)?, 0),
        };
        if rate == 0 {
            return Err(ValueError::ZeroRate);
        }
        Ok(Self { rate, burst })
    }
}

impl fmt::Display for Bucket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.rate)?;
        if self.burst != 0 {
            write!(f, ":{}", self.burst)?;
        }
        Ok(())
    }
}

/// A queue's rate limit: `bw=RATE[:BURST]` (bytes) and/or `ops=RATE[:BURST]` (requests or
/// frames), comma-separated; `none` is no limit (to lift one at run time).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RateLimit {
    pub bandwidth: Option<Bucket>,
    pub ops: Option<Bucket>,
}

impl RateLimit {
    pub fn is_unlimited(&self) -> bool {
        self.bandwidth.is_none() && self.ops.is_none()
    }
}

impl FromStr for RateLimit {
    type Err = ValueError;
    fn from_str(value: &str) -> Result<Self, ValueError> {
        if value == "none" {
            return Ok(Self::default());
        }
        let refused = || ValueError::RateLimit(value.into());
        let mut limit = Self::default();
        for (k, v) in pairs(value).map_err(|_| refused())? {
            let slot = match k {
                "bw" => &mut limit.bandwidth,
                "ops" => &mut limit.ops,
                _ => return Err(ValueError::UnknownKey(k.into())),
            };
            *slot = Some(v.parse()?);
        }
        Ok(limit)
    }
}

impl fmt::Display for RateLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.bandwidth, &self.ops) {
            (None, None) => f.write_str("none"),
            (Some(bw), None) => write!(f, "bw={bw}"),
            (None, Some(ops)) => write!(f, "ops={ops}"),
            (Some(bw), Some(ops)) => write!(f, "bw={bw},ops={ops}"),
        }
    }
}

/// `--disk-limit [N:]LIMIT`: the rate limit of disk N (0, the first `--disk`, when left out).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DiskLimit {
    pub disk: u32,
    pub limit: RateLimit,
}

impl FromStr for DiskLimit {
    type Err = ValueError;
    fn from_str(value: &str) -> Result<Self, ValueError> {
        let (disk, limit) = match value.split_once(':') {
            Some((n, rest)) if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) => {
                (number(n)?, rest)
            }
            _ => (0, value),
        };
        Ok(Self {
            disk,
            limit: limit.parse()?,
        })
    }
}

impl fmt::Display for DiskLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.disk, self.limit)
    }
}

/// The virtio-vsock device: `cid=N,path=PATH`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VsockConfig {
    /// Guest context ID (>= 3).
    pub cid: u64,
    /// Host-side Unix socket path (connections to guest ports; `<path>_<port>` for guest-initiated).
    pub uds_path: PathBuf,
}

impl FromStr for VsockConfig {
    type Err = ValueError;
    fn from_str(value: &str) -> Result<Self, ValueError> {
        let (mut cid, mut path) = (None, None);
        for (k, v) in pairs(value)? {
            match k {
                "cid" => cid = Some(number::<u64>(v)?),
                "path" => path = Some(PathBuf::from(v)),
                _ => return Err(ValueError::UnknownKey(k.into())),
            }
        }
        match (cid, path) {
            (Some(cid), Some(uds_path)) => Ok(Self { cid, uds_path }),
            _ => Err(ValueError::Vsock),
        }
    }
}

impl fmt::Display for VsockConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "cid={},path={}", self.cid, self.uds_path.display())
    }
}

/// What the virtio-balloon device offers the guest (`--balloon stats=on,reporting=on,
/// deflate_on_oom=on`; each part on unless turned off). The device itself is on by default
/// (`--no-balloon` removes it): see docs/balloon.md.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BalloonConfig {
    /// Memory statistics from the guest.
    pub stats: bool,
    /// Free page reporting: the guest gives back the pages it frees.
    pub reporting: bool,
    /// The guest deflates the balloon under memory pressure instead of killing processes.
    pub deflate_on_oom: bool,
}

impl Default for BalloonConfig {
    fn default() -> Self {
        Self {
            stats: true,
            reporting: true,
            deflate_on_oom: true,
        }
    }
}

fn on_off(value: &str) -> Result<bool, ValueError> {
    match value {
        "on" => Ok(true),
        "off" => Ok(false),
        other => Err(ValueError::OnOff(other.into())),
    }
}

impl FromStr for BalloonConfig {
    type Err = ValueError;
    fn from_str(value: &str) -> Result<Self, ValueError> {
        let mut config = Self::default();
        for (k, v) in pairs(value)? {
            match k {
                "stats" => config.stats = on_off(v)?,
                "reporting" => config.reporting = on_off(v)?,
                "deflate_on_oom" => config.deflate_on_oom = on_off(v)?,
                _ => return Err(ValueError::UnknownKey(k.into())),
            }
        }
        Ok(config)
    }
}

impl fmt::Display for BalloonConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let word = |on: bool| if on { "on" } else { "off" };
        write!(
            f,
            "stats={},reporting={},deflate_on_oom={}",
            word(self.stats),
            word(self.reporting),
            word(self.deflate_on_oom)
        )
    }
}

/// Longest virtio-fs tag (the device's `tag` field is 36 bytes, NUL-padded; virtio 1.2 §5.11.4).
pub const MAX_FS_TAG_LEN: usize = 36;
/// Most shared directories (`--fs`) a VM may have.
pub const MAX_SHARED_DIRS: usize = 8;

/// A virtio-fs device (`--fs tag=TAG,fd=N`): a host directory served by a vhost-user-fs backend
/// (virtiofsd) the launcher started; `fd` is an inherited stream socket already connected to
/// it. The guest mounts the file system by `tag`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FsConfig {
    /// The name the guest mounts (`mount -t virtiofs TAG DIR`).
    pub tag: String,
    /// The connected vhost-user socket (> 2).
    pub fd: i32,
}

/// Whether `tag` is a virtio-fs tag husk accepts: 1..=36 ASCII letters, digits, `-` or `_`
/// (it also travels on the guest's kernel command line, so no spaces or separators).
pub fn valid_fs_tag(tag: &str) -> bool {
    (1..=MAX_FS_TAG_LEN).contains(&tag.len())
        && tag
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

impl FromStr for FsConfig {
    type Err = ValueError;
    fn from_str(value: &str) -> Result<Self, ValueError> {
        let (mut tag, mut fd) = (None, None);
        for (k, v) in pairs(value)? {
            match k {
                "tag" => tag = Some(v.to_string()),
                "fd" => fd = Some(number::<i32>(v)?),
                _ => return Err(ValueError::UnknownKey(k.into())),
            }
        }
        match (tag, fd) {
            (Some(tag), Some(fd)) if fd > 2 && valid_fs_tag(&tag) => Ok(Self { tag, fd }),
            _ => Err(ValueError::Fs),
        }
    }
}

impl fmt::Display for FsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "tag={},fd={}", self.tag, self.fd)
    }
}

/// Parses `xx:xx:xx:xx:xx:xx` (two hex digits each); a multicast address is refused, as no NIC
/// may have one. The one MAC parser of husk: huskd's API and husk-vmm's `--net` both use it.
pub fn parse_mac(text: &str) -> Result<[u8; 6], ValueError> {
    let refused = || ValueError::Mac(text.into());
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut mac {
        let part = parts.next().ok_or_else(refused)?;
        if part.len() != 2 || !part.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(refused());
        }
        *byte = u8::from_str_radix(part, 16).map_err(|_| refused())?;
    }
    if parts.next().is_some() || mac[0] & 1 != 0 {
        return Err(refused());
    }
    Ok(mac)
}

/// `xx:xx:xx:xx:xx:xx`, lower case: what [`parse_mac`] reads.
pub fn format_mac(m: &[u8; 6]) -> String {
    format!(
        "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        m[0], m[1], m[2], m[3], m[4], m[5]
    )
}

/// `--seccomp MODE`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SeccompMode {
    /// A syscall outside a thread's list kills the VMM (the default).
    Kill,
    /// Logged on stderr, counted, fails with ENOSYS (for debugging).
    Trap,
    /// Allowed, logged by the kernel.
    Log,
    /// No filters.
    Off,
}

impl FromStr for SeccompMode {
    type Err = ValueError;
    fn from_str(value: &str) -> Result<Self, ValueError> {
        match value {
            "kill" => Ok(Self::Kill),
            "trap" => Ok(Self::Trap),
            "log" => Ok(Self::Log),
            "off" => Ok(Self::Off),
            other => Err(ValueError::Seccomp(other.into())),
        }
    }
}

impl fmt::Display for SeccompMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Kill => "kill",
            Self::Trap => "trap",
            Self::Log => "log",
            Self::Off => "off",
        })
    }
}

/// Why a husk-vmm command line was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ArgsError {
    #[error("{0} needs a value")]
    MissingValue(&'static str),
    #[error("{0} takes no value")]
    UnexpectedValue(&'static str),
    #[error("unknown argument '{0}' (see --help)")]
    Unknown(String),
    #[error("invalid {flag} '{value}': {reason}")]
    Value {
        flag: &'static str,
        value: String,
        reason: ValueError,
    },
    #[error("{0} needs a non-empty path")]
    EmptyPath(&'static str),
    #[error("{0} cannot be combined with --restore-state")]
    WithRestore(&'static str),
    #[error("{0} needs --restore-state and --restore-mem")]
    WithoutRestore(&'static str),
    #[error("--restore-state and --restore-mem go together")]
    RestorePair,
    #[error("--kernel is required (see --help)")]
    NoKernel,
}

/// What a husk-vmm command line asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Invocation {
    /// `-h` / `--help`.
    Help,
    /// Run (or, with `print_seccomp`, describe the filters).
    Run(Box<VmmArgs>),
}

/// One flag husk-vmm knows.
struct Flag {
    name: &'static str,
    /// Takes a value (`--flag VALUE` or `--flag=VALUE`).
    value: bool,
    /// Describes the machine to boot: refused with a restore, where it comes from the snapshot.
    boot: bool,
}

const fn flag_def(name: &'static str, value: bool, boot: bool) -> Flag {
    Flag { name, value, boot }
}

const FLAGS: &[Flag] = &[
    flag_def("--kernel", true, true),
    flag_def("--initrd", true, true),
    flag_def("--cmdline", true, true),
    flag_def("--cmdline-file", true, true),
    flag_def("--cpus", true, true),
    flag_def("--memory", true, true),
    flag_def("--console", true, false),
    flag_def("--console-limit", true, false),
    flag_def("--report-boot-time", false, true),
    flag_def("--allow-pvm", false, true),
    flag_def("--disk", true, false),
    // The slots are part of the machine: a restore takes them from the snapshot.
    flag_def("--disk-slots", true, true),
    flag_def("--net", true, false),
    flag_def("--vsock", true, false),
    // Shared directories are refused by snapshots, so a restore never has one.
    flag_def("--fs", true, true),
    flag_def("--disk-limit", true, false),
    flag_def("--net-rx-limit", true, false),
    flag_def("--net-tx-limit", true, false),
    flag_def("--no-rng", false, true),
    flag_def("--balloon", true, true),
    flag_def("--no-balloon", false, true),
    flag_def("--api-sock", true, false),
    flag_def("--exit-report", true, false),
    flag_def("--seccomp", true, true),
    flag_def("--no-seccomp", false, true),
    flag_def("--print-seccomp", false, false),
    flag_def("--restore-state", true, false),
    flag_def("--restore-mem", true, false),
    flag_def("--restore-mem-name", true, false),
    flag_def("--restore-base", true, false),
    flag_def("--start-paused", false, false),
    flag_def("-h", false, false),
    flag_def("--help", false, false),
];

/// A value that must be text (a number, a device description).
fn text(flag: &'static str, value: OsString) -> Result<String, ArgsError> {
    value.into_string().map_err(|v| ArgsError::Value {
        flag,
        value: v.to_string_lossy().into_owned(),
        reason: ValueError::NotUtf8,
    })
}

/// A value parsed by its type's `FromStr`.
fn typed<T: FromStr<Err = ValueError>>(
    flag: &'static str,
    value: OsString,
) -> Result<T, ArgsError> {
    let value = text(flag, value)?;
    value.parse().map_err(|reason| ArgsError::Value {
        flag,
        value,
        reason,
    })
}

fn count(flag: &'static str, value: OsString) -> Result<u64, ArgsError> {
    let value = text(flag, value)?;
    number(&value).map_err(|reason| ArgsError::Value {
        flag,
        value,
        reason,
    })
}

fn disk_slots(flag: &'static str, value: OsString) -> Result<u32, ArgsError> {
    let n = count(flag, value)?;
    u32::try_from(n)
        .ok()
        .filter(|n| *n <= MAX_DISK_SLOTS)
        .ok_or(ArgsError::Value {
            flag,
            value: n.to_string(),
            reason: ValueError::DiskSlots(n),
        })
}

fn non_empty(flag: &'static str, value: OsString) -> Result<PathBuf, ArgsError> {
    if value.is_empty() {
        return Err(ArgsError::EmptyPath(flag));
    }
    Ok(value.into())
}

/// `--restore-*` as given, before they are checked to go together.
#[derive(Default)]
struct RestoreFlags {
    state: Option<PathBuf>,
    mem: Option<PathBuf>,
    mem_name: Option<PathBuf>,
    base: Option<PathBuf>,
    start_paused: bool,
}

impl RestoreFlags {
    /// The restore, if asked for; `first_boot` is the first boot option given, if any.
    fn finish(self, first_boot: Option<&'static str>) -> Result<Option<RestoreArgs>, ArgsError> {
        match (self.state, self.mem) {
            (Some(state), Some(mem)) => match first_boot {
                // The machine comes from the snapshot: boot options would be silently ignored.
                Some(flag) => Err(ArgsError::WithRestore(flag)),
                None => Ok(Some(RestoreArgs {
                    state,
                    mem,
                    mem_name: self.mem_name,
                    base: self.base,
                    start_paused: self.start_paused,
                })),
            },
            (None, None) => {
                let lone = [
                    (self.start_paused, "--start-paused"),
                    (self.mem_name.is_some(), "--restore-mem-name"),
                    (self.base.is_some(), "--restore-base"),
                ];
                match lone.into_iter().find(|(given, _)| *given) {
                    Some((_, flag)) => Err(ArgsError::WithoutRestore(flag)),
                    None => Ok(None),
                }
            }
            _ => Err(ArgsError::RestorePair),
        }
    }
}

/// A restore instead of a boot (`--restore-*`, `--start-paused`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RestoreArgs {
    /// Restore the VM saved in this snapshot state file (written by the control socket's
    /// snapshot request) instead of booting a kernel
    pub state: PathBuf,
    /// The snapshot's memory file (mapped copy-on-write: never modified)
    pub mem: PathBuf,
    /// With --restore-mem /proc/self/fd/N: the memory file's host path, which the restored
    /// VM's later diff snapshots record as their base
    pub mem_name: Option<PathBuf>,
    /// For a diff snapshot: open this base memory file (an fd) instead of the path the state
    /// records (which is still recorded as the base)
    pub base: Option<PathBuf>,
    /// Keep the restored VM paused until a resume request
    pub start_paused: bool,
}

/// One husk-vmm command line. Every field is a flag of husk-vmm; `None`, `false` and an empty
/// list leave the flag out (husk-vmm's default applies).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VmmArgs {
    /// Guest kernel: ELF vmlinux (PVH entry used when present) or bzImage
    pub kernel: Option<PathBuf>,
    /// Initramfs
    pub initrd: Option<PathBuf>,
    /// Appended to the default kernel command line (console, reboot and i8042 settings)
    pub cmdline: Option<String>,
    /// The same, read from a file or /proc/self/fd/N (a pipe the launcher filled): keeps the
    /// application's argv and environment, which travel on the guest command line, out of this
    /// process's own command line
    pub cmdline_file: Option<PathBuf>,
    /// vCPUs, 1..=32 [default: 1]
    pub cpus: Option<u64>,
    /// Guest memory in MiB, 64..=262144 [default: 256]
    pub memory: Option<u64>,
    /// Serial console: stdout (default), none, file:PATH, or unix:PATH (a connection to the Unix
    /// socket listening at PATH)
    pub console: Option<ConsoleConfig>,
    /// Most bytes a file: console holds (default 16777216, 16 MiB; 0: unlimited); past it the
    /// file is truncated to 0 and goes on after the line '[husk: console truncated after N
    /// bytes]'
    pub console_limit: Option<u64>,
    /// Print 'husk-vmm: guest init after <N> us' when the guest init starts
    pub report_boot_time: bool,
    /// On a PVM host, boot a kernel that does not look PVM-enabled anyway
    pub allow_pvm: bool,
    /// virtio-blk disk on a raw image (repeatable; vda, vdb, ... in order)
    pub disks: Vec<DiskConfig>,
    /// Empty virtio-blk slots after the disks, 0..=8 [default: 0]: disks attached and detached
    /// at run time through the control socket (attach_disk, detach_disk)
    pub disk_slots: u32,
    /// virtio-net on a tap: tap=NAME opens (or creates) the tap NAME; fd=N,name=NAME adopts an
    /// open tap fd inherited from the parent; mac=XX:XX:XX:XX:XX:XX (default 06:00:ac:10:00:02)
    pub net: Option<NetConfig>,
    /// virtio-vsock with guest CID N (>= 3); host side on the Unix socket PATH (CONNECT <port>
    /// for guest ports; PATH_<port> for guest-initiated)
    pub vsock: Option<VsockConfig>,
    /// virtio-fs device: tag=TAG,fd=N, N an inherited stream socket connected to the
    /// vhost-user-fs backend (virtiofsd) serving the shared directory; the guest mounts TAG
    /// (repeatable, at most 8; guest memory is then shared memory, and the VM cannot be
    /// snapshotted)
    pub fs: Vec<FsConfig>,
    /// Rate limit of a disk: [N:]bw=RATE[:BURST],ops=RATE[:BURST] (N: the disk's position among
    /// the --disk flags, 0 when left out; K, M, G suffixes; a burst of 0 is one second's
    /// worth; repeatable)
    pub disk_limits: Vec<DiskLimit>,
    /// Rate limit of the frames the guest receives (bw=...,ops=..., as --disk-limit)
    pub net_rx_limit: Option<RateLimit>,
    /// Rate limit of the frames the guest sends (bw=...,ops=..., as --disk-limit)
    pub net_tx_limit: Option<RateLimit>,
    /// No virtio-rng device (on by default)
    pub no_rng: bool,
    /// What the virtio-balloon device offers: stats=on|off,reporting=on|off,
    /// deflate_on_oom=on|off [default: all on]. The balloon's target is set at run time through
    /// the control socket (set_balloon)
    pub balloon: Option<BalloonConfig>,
    /// No virtio-balloon device (on by default)
    pub no_balloon: bool,
    /// Serve the control socket at PATH (protocol husk.vmm.v1: describe, pause, resume, stop,
    /// snapshot, set_rate_limits; 4-byte big-endian length + protobuf message each way). Mode
    /// 0600; a stale socket at PATH is replaced, anything else there is refused; PATH is removed
    /// when husk-vmm exits
    pub api_sock: Option<PathBuf>,
    /// When husk-vmm exits after starting (guest exit or reset, signal, stop request, error),
    /// write a husk.vmm.v1.ExitReport (plain protobuf bytes, not framed) to PATH.tmp and rename
    /// it to PATH
    pub exit_report: Option<PathBuf>,
    /// Per-thread seccomp filters: kill (default: a syscall outside a thread's list kills the
    /// VMM), trap (logged on stderr, counted, fails with ENOSYS: for debugging), log (allowed,
    /// logged by the kernel), off
    pub seccomp: Option<SeccompMode>,
    /// Same as --seccomp off
    pub no_seccomp: bool,
    /// Print every thread's allowed syscalls and exit
    pub print_seccomp: bool,
    pub restore: Option<RestoreArgs>,
}

fn flag(args: &mut Vec<OsString>, name: &str, value: impl Into<OsString>) {
    args.push(name.into());
    args.push(value.into());
}

impl VmmArgs {
    /// The arguments (without the program name) that husk-vmm parses back into `self`.
    pub fn to_args(&self) -> Vec<OsString> {
        let mut a = Vec::new();
        if let Some(r) = &self.restore {
            flag(&mut a, "--restore-state", &r.state);
            flag(&mut a, "--restore-mem", &r.mem);
            if let Some(name) = &r.mem_name {
                flag(&mut a, "--restore-mem-name", name);
            }
            if let Some(base) = &r.base {
                flag(&mut a, "--restore-base", base);
            }
            if r.start_paused {
                a.push("--start-paused".into());
            }
        }
        if let Some(kernel) = &self.kernel {
            flag(&mut a, "--kernel", kernel);
        }
        if let Some(initrd) = &self.initrd {
            flag(&mut a, "--initrd", initrd);
        }
        if let Some(cmdline) = &self.cmdline {
            flag(&mut a, "--cmdline", cmdline);
        }
        if let Some(file) = &self.cmdline_file {
            flag(&mut a, "--cmdline-file", file);
        }
        if let Some(cpus) = self.cpus {
            flag(&mut a, "--cpus", cpus.to_string());
        }
        if let Some(memory) = self.memory {
            flag(&mut a, "--memory", memory.to_string());
        }
        for disk in &self.disks {
            flag(&mut a, "--disk", disk.to_string());
        }
        if self.disk_slots > 0 {
            flag(&mut a, "--disk-slots", self.disk_slots.to_string());
        }
        if let Some(net) = &self.net {
            flag(&mut a, "--net", net.to_string());
        }
        if let Some(vsock) = &self.vsock {
            flag(&mut a, "--vsock", vsock.to_string());
        }
        for fs in &self.fs {
            flag(&mut a, "--fs", fs.to_string());
        }
        for limit in &self.disk_limits {
            flag(&mut a, "--disk-limit", limit.to_string());
        }
        if let Some(limit) = &self.net_rx_limit {
            flag(&mut a, "--net-rx-limit", limit.to_string());
        }
        if let Some(limit) = &self.net_tx_limit {
            flag(&mut a, "--net-tx-limit", limit.to_string());
        }
        if let Some(console) = &self.console {
            flag(&mut a, "--console", console.to_string());
        }
        if let Some(limit) = self.console_limit {
            flag(&mut a, "--console-limit", limit.to_string());
        }
        if let Some(path) = &self.api_sock {
            flag(&mut a, "--api-sock", path);
        }
        if let Some(path) = &self.exit_report {
            flag(&mut a, "--exit-report", path);
        }
        if let Some(mode) = self.seccomp {
            flag(&mut a, "--seccomp", mode.to_string());
        }
        if let Some(balloon) = &self.balloon {
            flag(&mut a, "--balloon", balloon.to_string());
        }
        let switches = [
            (self.report_boot_time, "--report-boot-time"),
            (self.allow_pvm, "--allow-pvm"),
            (self.no_rng, "--no-rng"),
            (self.no_balloon, "--no-balloon"),
            (self.no_seccomp, "--no-seccomp"),
            (self.print_seccomp, "--print-seccomp"),
        ];
        a.extend(
            switches
                .into_iter()
                .filter(|(on, _)| *on)
                .map(|(_, f)| f.into()),
        );
        a
    }

    /// Parses husk-vmm's arguments (without the program name): `--flag VALUE` or
    /// `--flag=VALUE`; a repeated flag takes its last value (`--disk` adds up), and of
    /// `--cmdline`/`--cmdline-file` and of `--seccomp`/`--no-seccomp` the last one given wins.
    /// `--help` and `--print-seccomp` end the parse where they stand.
    pub fn parse<I>(args: I) -> Result<Invocation, ArgsError>
    where
        I: IntoIterator,
        I::Item: Into<OsString>,
    {
        let mut args = args.into_iter().map(Into::into);
        let mut out = VmmArgs::default();
        let mut restore = RestoreFlags::default();
        let mut first_boot = None;
        while let Some(arg) = args.next() {
            let bytes = arg.as_bytes();
            let (name, inline) = match bytes.iter().position(|b| *b == b'=') {
                Some(at) if bytes.starts_with(b"--") => (
                    &bytes[..at],
                    Some(OsStr::from_bytes(&bytes[at + 1..]).to_os_string()),
                ),
                _ => (bytes, None),
            };
            let Some(def) = FLAGS.iter().find(|f| f.name.as_bytes() == name) else {
                let name = String::from_utf8_lossy(name).into_owned();
                return Err(ArgsError::Unknown(name));
            };
            let flag = def.name;
            let value = match (def.value, inline) {
                (true, Some(v)) => v,
                (true, None) => args.next().ok_or(ArgsError::MissingValue(flag))?,
                (false, Some(_)) => return Err(ArgsError::UnexpectedValue(flag)),
                (false, None) => OsString::new(),
            };
            if def.boot {
                first_boot.get_or_insert(flag);
            }
            match flag {
                "-h" | "--help" => return Ok(Invocation::Help),
                "--print-seccomp" => {
                    out.print_seccomp = true;
                    return Ok(Invocation::Run(Box::new(out)));
                }
                "--kernel" => out.kernel = Some(value.into()),
                "--initrd" => out.initrd = Some(value.into()),
                "--cmdline" => {
                    out.cmdline = Some(text(flag, value)?);
                    out.cmdline_file = None;
                }
                "--cmdline-file" => {
                    out.cmdline_file = Some(value.into());
                    out.cmdline = None;
                }
                "--cpus" => out.cpus = Some(count(flag, value)?),
                "--memory" => out.memory = Some(count(flag, value)?),
                "--console" => out.console = Some(typed(flag, value)?),
                "--console-limit" => out.console_limit = Some(count(flag, value)?),
                "--report-boot-time" => out.report_boot_time = true,
                "--allow-pvm" => out.allow_pvm = true,
                "--disk" => out.disks.push(typed(flag, value)?),
                "--disk-slots" => out.disk_slots = disk_slots(flag, value)?,
                "--net" => out.net = Some(typed(flag, value)?),
                "--vsock" => out.vsock = Some(typed(flag, value)?),
                "--fs" => {
                    let fs: FsConfig = typed(flag, value)?;
                    if out.fs.len() >= MAX_SHARED_DIRS || out.fs.iter().any(|f| f.tag == fs.tag) {
                        return Err(ArgsError::Value {
                            flag,
                            value: fs.to_string(),
                            reason: ValueError::Fs,
                        });
                    }
                    out.fs.push(fs);
                }
                "--disk-limit" => out.disk_limits.push(typed(flag, value)?),
                "--net-rx-limit" => out.net_rx_limit = Some(typed(flag, value)?),
                "--net-tx-limit" => out.net_tx_limit = Some(typed(flag, value)?),
                "--no-rng" => out.no_rng = true,
                "--balloon" => {
                    out.balloon = Some(typed(flag, value)?);
                    out.no_balloon = false;
                }
                "--no-balloon" => {
                    out.no_balloon = true;
                    out.balloon = None;
                }
                "--api-sock" => out.api_sock = Some(non_empty(flag, value)?),
                "--exit-report" => out.exit_report = Some(non_empty(flag, value)?),
                "--seccomp" => {
                    out.seccomp = Some(typed(flag, value)?);
                    out.no_seccomp = false;
                }
                "--no-seccomp" => {
                    out.no_seccomp = true;
                    out.seccomp = None;
                }
                "--restore-state" => restore.state = Some(non_empty(flag, value)?),
                "--restore-mem" => restore.mem = Some(non_empty(flag, value)?),
                "--restore-mem-name" => restore.mem_name = Some(value.into()),
                "--restore-base" => restore.base = Some(value.into()),
                "--start-paused" => restore.start_paused = true,
                other => return Err(ArgsError::Unknown(other.into())),
            }
        }
        out.restore = restore.finish(first_boot)?;
        if out.restore.is_none() && out.kernel.is_none() {
            return Err(ArgsError::NoKernel);
        }
        Ok(Invocation::Run(Box::new(out)))
    }

    /// The command that runs the husk-vmm binary `vmm` with these arguments.
    pub fn to_command(&self, vmm: &Path) -> Command {
        let mut cmd = Command::new(vmm);
        cmd.args(self.to_args());
        cmd
    }

    /// The seccomp mode asked for (`--no-seccomp` is `off`; the default is `kill`).
    pub fn seccomp_mode(&self) -> SeccompMode {
        match (self.no_seccomp, self.seccomp) {
            (true, _) => SeccompMode::Off,
            (false, Some(mode)) => mode,
            (false, None) => SeccompMode::Kill,
        }
    }
}

/// `/proc/self/fd/N`: how a file the launcher opened reaches husk-vmm (see
/// `husk_devices::host_files`).
pub fn fd_path(fd: std::os::fd::RawFd) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{fd}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(args: &VmmArgs) -> VmmArgs {
        match VmmArgs::parse(args.to_args()) {
            Ok(Invocation::Run(parsed)) => *parsed,
            other => panic!("{:?} did not parse back: {other:?}", args.to_args()),
        }
    }

    fn parse(args: &[&str]) -> Result<VmmArgs, ArgsError> {
        match VmmArgs::parse(args.iter().copied())? {
            Invocation::Run(args) => Ok(*args),
            Invocation::Help => panic!("{args:?} asked for help"),
        }
    }

    #[test]
    fn a_boot_with_every_option_parses_back_to_the_same_value() {
        let args = VmmArgs {
            kernel: Some("/k".into()),
            initrd: Some("/i".into()),
            cmdline: Some("quiet init=/bin/sh".into()),
            cpus: Some(4),
            memory: Some(4096),
            console: Some(ConsoleConfig::File("/tmp/c".into())),
            console_limit: Some(0),
            report_boot_time: true,
            allow_pvm: true,
            disks: vec!["/a.img".parse().unwrap(), "/b.img:ro".parse().unwrap()],
            disk_slots: 3,
            net: Some(NetConfig {
                tap: TapSource::Name("tap0".into()),
                mac: [6, 0, 0xac, 0x10, 0, 9],
                mtu: Some(1450),
            }),
            vsock: Some(VsockConfig {
                cid: 3,
                uds_path: "/run/v.sock".into(),
            }),
            disk_limits: vec![
                "bw=10M:20M,ops=1000".parse().unwrap(),
                "1:ops=50:100".parse().unwrap(),
            ],
            net_rx_limit: Some("bw=1G".parse().unwrap()),
            net_tx_limit: Some("none".parse().unwrap()),
            no_rng: true,
            balloon: Some("reporting=off,deflate_on_oom=off".parse().unwrap()),
            api_sock: Some("/run/a.sock".into()),
            exit_report: Some("/run/exit".into()),
            seccomp: Some(SeccompMode::Trap),
            ..Default::default()
        };
        assert_eq!(round_trip(&args), args);
        let minimal = VmmArgs {
            kernel: Some("/k".into()),
            ..Default::default()
        };
        assert_eq!(round_trip(&minimal), minimal);
        assert_eq!(minimal.to_args(), ["--kernel", "/k"]);
    }

    #[test]
    fn a_launch_over_inherited_fds_parses_back_to_the_same_value() {
        let args = VmmArgs {
            kernel: Some(fd_path(3)),
            initrd: Some(fd_path(4)),
            cmdline_file: Some(fd_path(11)),
            cpus: Some(2),
            memory: Some(512),
            disks: vec![
                DiskConfig::raw(fd_path(5), false),
                DiskConfig {
                    path: fd_path(6),
                    read_only: true,
                    format: DiskFormat::Qcow2,
                    backing: vec![
                        (fd_path(7), DiskFormat::Qcow2),
                        (fd_path(8), DiskFormat::Raw),
                    ],
                },
            ],
            net: Some(NetConfig {
                tap: TapSource::Fd(7, "husk0".into()),
                mac: [6, 0, 169, 254, 128, 2],
                mtu: None,
            }),
            vsock: Some(VsockConfig {
                cid: 7,
                uds_path: "/run/husk/vms/abc/vmm/vsock.sock".into(),
            }),
            console: Some(ConsoleConfig::File(fd_path(8))),
            exit_report: Some(fd_path(9)),
            api_sock: Some("/run/husk/vms/abc/vmm/api.sock".into()),
            ..Default::default()
        };
        assert_eq!(round_trip(&args), args);
        let argv: Vec<_> = args.to_args();
        let joined = argv.join(OsString::from(" ").as_os_str());
        let joined = joined.to_string_lossy();
        assert!(
            joined.contains(
                "--disk /proc/self/fd/5 --disk file=/proc/self/fd/6,format=qcow2,ro,\
                 backing=qcow2:/proc/self/fd/7,backing=raw:/proc/self/fd/8"
            ),
            "{joined}"
        );
        assert!(
            joined.contains("--net fd=7,name=husk0,mac=06:00:a9:fe:80:02"),
            "{joined}"
        );
    }

    #[test]
    fn qcow2_disks_and_their_chains_use_the_keyed_form() {
        let d: DiskConfig = "file=/o.qcow2,format=qcow2,backing=raw:/b.img"
            .parse()
            .unwrap();
        assert_eq!(d.format, DiskFormat::Qcow2);
        assert_eq!(d.backing, vec![("/b.img".into(), DiskFormat::Raw)]);
        assert!(!d.read_only);
        assert_eq!(d.to_string().parse::<DiskConfig>().unwrap(), d);
        // A raw disk without a chain keeps the short form (and a path that starts "file=" in
        // the short form would need ./file=...; the launchers pass absolute paths).
        assert_eq!(DiskConfig::raw("/x.img", true).to_string(), "/x.img:ro");
        let err = |v: &str| v.parse::<DiskConfig>().unwrap_err();
        assert_eq!(
            err("file=/a,format=vmdk"),
            ValueError::Format("vmdk".into())
        );
        assert!(matches!(
            err("file=/a,format=qcow2,backing=/b"),
            ValueError::Pairs(_)
        ));
        assert_eq!(
            err("file=,format=qcow2"),
            ValueError::Pairs("file=,format=qcow2".into())
        );
        assert_eq!(
            err("file=/a,bogus=1"),
            ValueError::UnknownKey("bogus".into())
        );
        let deep = format!(
            "file=/a,format=qcow2{}",
            ",backing=qcow2:/b".repeat(MAX_CHAIN)
        );
        assert!(matches!(err(&deep), ValueError::Pairs(_)));
    }

    #[test]
    fn a_restore_parses_back_to_the_same_value() {
        let args = VmmArgs {
            restore: Some(RestoreArgs {
                state: fd_path(3),
                mem: fd_path(4),
                mem_name: Some("/snaps/a/vm.mem".into()),
                base: Some(fd_path(5)),
                start_paused: true,
            }),
            disks: vec!["/proc/self/fd/6".parse().unwrap()],
            vsock: Some(VsockConfig {
                cid: 9,
                uds_path: "/run/v.sock".into(),
            }),
            console: Some(ConsoleConfig::None),
            api_sock: Some("/run/a.sock".into()),
            ..Default::default()
        };
        assert_eq!(round_trip(&args), args);
        let bare = VmmArgs {
            restore: Some(RestoreArgs {
                state: "/s/vm.state".into(),
                mem: "/s/vm.mem".into(),
                mem_name: None,
                base: None,
                start_paused: false,
            }),
            ..Default::default()
        };
        assert_eq!(round_trip(&bare), bare);
    }

    #[test]
    fn the_seccomp_flags_parse_back_and_the_last_one_wins() {
        for mode in [
            SeccompMode::Kill,
            SeccompMode::Trap,
            SeccompMode::Log,
            SeccompMode::Off,
        ] {
            let args = VmmArgs {
                kernel: Some("/k".into()),
                seccomp: Some(mode),
                ..Default::default()
            };
            assert_eq!(round_trip(&args).seccomp_mode(), mode);
        }
        let off = VmmArgs {
            kernel: Some("/k".into()),
            no_seccomp: true,
            ..Default::default()
        };
        assert_eq!(round_trip(&off), off);
        let last = |a: &[&str]| parse(a).unwrap().seccomp_mode();
        assert_eq!(
            last(&["--kernel", "/k", "--seccomp", "trap", "--no-seccomp"]),
            SeccompMode::Off
        );
        assert_eq!(
            last(&["--kernel", "/k", "--no-seccomp", "--seccomp", "trap"]),
            SeccompMode::Trap
        );
        assert_eq!(last(&["--kernel", "/k"]), SeccompMode::Kill);
        assert!(parse(&["--kernel", "/k", "--seccomp", "lax"]).is_err());
    }

    #[test]
    fn a_repeated_flag_takes_its_last_value_and_disks_add_up() {
        let a = parse(&[
            "--kernel",
            "/k",
            "--cpus",
            "2",
            "--cpus",
            "3",
            "--disk",
            "/a",
            "--disk=/b",
        ])
        .unwrap();
        assert_eq!(a.cpus, Some(3));
        assert_eq!(a.disks.len(), 2);
        let a = parse(&["--kernel", "/k", "--cmdline", "a", "--cmdline-file", "/f"]).unwrap();
        assert_eq!((a.cmdline, a.cmdline_file), (None, Some("/f".into())));
    }

    #[test]
    fn boot_options_are_refused_with_a_restore_and_a_restore_needs_both_files() {
        let restore = ["--restore-state", "/s", "--restore-mem", "/m"];
        for boot in [
            &["--cpus", "2"][..],
            &["--kernel", "/k"],
            &["--memory", "512"],
            &["--cmdline-file", "/f"],
            &["--report-boot-time"],
            &["--no-rng"],
            &["--seccomp", "off"],
            &["--disk-slots", "1"],
        ] {
            let argv: Vec<&str> = restore.iter().chain(boot).copied().collect();
            let e = parse(&argv).unwrap_err();
            assert_eq!(
                e,
                ArgsError::WithRestore(FLAGS.iter().find(|f| f.name == boot[0]).unwrap().name)
            );
            assert!(
                e.to_string()
                    .ends_with("cannot be combined with --restore-state"),
                "{e}"
            );
        }
        assert_eq!(
            parse(&["--restore-state", "/s"]),
            Err(ArgsError::RestorePair)
        );
        assert_eq!(parse(&["--restore-mem", "/m"]), Err(ArgsError::RestorePair));
        assert_eq!(
            parse(&["--kernel", "/k", "--start-paused"]),
            Err(ArgsError::WithoutRestore("--start-paused"))
        );
        assert_eq!(
            parse(&["--kernel", "/k", "--restore-base", "/b"]),
            Err(ArgsError::WithoutRestore("--restore-base"))
        );
        assert!(parse(&["--restore-state", "", "--restore-mem", "/m"]).is_err());
        assert_eq!(
            parse(&[]),
            Err(ArgsError::NoKernel),
            "a boot needs --kernel"
        );
        assert!(parse(&["--print-seccomp"]).unwrap().print_seccomp);
    }

    #[test]
    fn bad_values_are_refused() {
        for bad in [
            &["--kernel"][..],
            &["--kernel", "/k", "--cpus", "many"],
            &["--kernel", "/k", "--console", "tty"],
            &["--kernel", "/k", "--console", "unix:"],
            &["--kernel", "/k", "--console", "file:"],
            &["--kernel", "/k", "--bogus"],
            &["--kernel", "/k", "--report-boot-time=1"],
            &["--kernel", "/k", "--net", "tap=a,fd=4"],
            &["--kernel", "/k", "--net", "stream=4,fd=5"],
            &["--kernel", "/k", "--net", "stream=4,tap=a"],
            &["--kernel", "/k", "--net", "stream=2"],
            &["--kernel", "/k", "--net", "stream=x"],
            &["--kernel", "/k", "--net", "stream=4,name=n"],
            &["--kernel", "/k", "--net", "fd=1"],
            &["--kernel", "/k", "--net", "tap=a,mac=01:02"],
            &["--kernel", "/k", "--net", "tap"],
            &["--kernel", "/k", "--net", "tap=a,speed=9"],
            &["--kernel", "/k", "--vsock", "cid=3"],
            &["--kernel", "/k", "--vsock", "cid=x,path=/v"],
            &["--kernel", "/k", "--api-sock"],
            &["--kernel", "/k", "--api-sock="],
            &["--kernel", "/k", "--exit-report", ""],
            &["--kernel", "/k", "--disk", ":ro"],
            &["--kernel", "/k", "--console-limit", "lots"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn a_net_device_without_a_mac_or_name_gets_the_defaults() {
        let net: NetConfig = "fd=7".parse().unwrap();
        assert_eq!(net.tap, TapSource::Fd(7, "fd7".into()));
        assert_eq!(net.mac, DEFAULT_MAC);
        assert_eq!(net.to_string().parse::<NetConfig>(), Ok(net));
    }

    #[test]
    fn an_mtu_is_announced_only_when_given_and_never_below_68() {
        let net: NetConfig = "fd=7,name=t,mtu=1450".parse().unwrap();
        assert_eq!(net.mtu, Some(1450));
        assert_eq!(
            net.to_string(),
            "fd=7,name=t,mac=06:00:ac:10:00:02,mtu=1450"
        );
        assert_eq!("fd=7".parse::<NetConfig>().unwrap().mtu, None);
        assert_eq!("fd=7,mtu=67".parse::<NetConfig>(), Err(ValueError::Mtu(67)));
        assert!("fd=7,mtu=65536".parse::<NetConfig>().is_err());
    }

    #[test]
    fn a_stream_net_device_round_trips() {
        let net: NetConfig = "stream=9,mac=06:00:0a:00:02:0f".parse().unwrap();
        assert_eq!(net.tap, TapSource::Stream(9));
        assert_eq!(net.mac, [6, 0, 10, 0, 2, 15]);
        assert_eq!(net.to_string(), "stream=9,mac=06:00:0a:00:02:0f");
        assert_eq!(net.to_string().parse::<NetConfig>(), Ok(net.clone()));
        let args = VmmArgs {
            kernel: Some("/k".into()),
            net: Some(net),
            net_rx_limit: Some("bw=1M".parse().unwrap()),
            ..Default::default()
        };
        assert_eq!(round_trip(&args), args);
        let fd7: NetConfig = "stream=7".parse().unwrap();
        assert_eq!((fd7.tap, fd7.mac), (TapSource::Stream(7), DEFAULT_MAC));
    }

    #[test]
    fn macs_are_two_hex_digits_six_times_and_unicast() {
        assert_eq!(parse_mac("06:00:0a:0B:0c:0d"), Ok([6, 0, 10, 11, 12, 13]));
        for bad in [
            "06:00:0a:0b:0c",
            "06:00:0a:0b:0c:0d:0e",
            "6:00:0a:0b:0c:0d",
            "07:00:0a:0b:0c:0d",
            "06:00:0a:0b:0c:+d",
            "06:00:0a:0b:0c:0g",
            "",
        ] {
            assert!(parse_mac(bad).is_err(), "{bad} was accepted");
        }
        assert_eq!(format_mac(&[6, 0, 0xab, 1, 2, 0xff]), "06:00:ab:01:02:ff");
    }

    #[test]
    fn consoles_print_as_they_parse() {
        for text in ["stdout", "none", "file:/proc/self/fd/8", "unix:/run/c.sock"] {
            let console: ConsoleConfig = text.parse().unwrap();
            assert_eq!(console.to_string(), text);
        }
    }

    #[test]
    fn help_and_print_seccomp_end_the_parse_where_they_stand() {
        for help in ["-h", "--help"] {
            assert_eq!(
                VmmArgs::parse(["--kernel", "/k", help, "--bogus"]),
                Ok(Invocation::Help)
            );
        }
        let print = parse(&["--print-seccomp", "--bogus"]).unwrap();
        assert!(print.print_seccomp && print.kernel.is_none());
    }

    #[test]
    fn every_flag_the_writer_uses_is_one_the_parser_knows() {
        let everything = VmmArgs {
            kernel: Some("/k".into()),
            initrd: Some("/i".into()),
            cmdline_file: Some("/c".into()),
            cpus: Some(1),
            memory: Some(64),
            console: Some(ConsoleConfig::Stdout),
            console_limit: Some(1),
            report_boot_time: true,
            allow_pvm: true,
            disks: vec!["/d".parse().unwrap()],
            net: Some("tap=t".parse().unwrap()),
            vsock: Some("cid=3,path=/v".parse().unwrap()),
            no_rng: true,
            balloon: Some(BalloonConfig::default()),
            no_balloon: true,
            api_sock: Some("/a".into()),
            exit_report: Some("/e".into()),
            no_seccomp: true,
            print_seccomp: true,
            restore: Some(RestoreArgs {
                state: "/s".into(),
                mem: "/m".into(),
                mem_name: Some("/n".into()),
                base: Some("/b".into()),
                start_paused: true,
            }),
            ..Default::default()
        };
        let written = everything.to_args();
        for arg in written.iter().filter_map(|a| a.to_str()) {
            if arg.starts_with("--") {
                assert!(FLAGS.iter().any(|f| f.name == arg), "{arg} is not parsed");
            }
        }
    }

    #[test]
    fn balloon_parts_are_on_unless_turned_off_and_the_last_flag_wins() {
        assert_eq!(
            "".parse::<BalloonConfig>(),
            Err(ValueError::Pairs("".into()))
        );
        let c: BalloonConfig = "stats=off".parse().unwrap();
        assert_eq!(
            (c.stats, c.reporting, c.deflate_on_oom),
            (false, true, true)
        );
        assert_eq!(c.to_string().parse::<BalloonConfig>(), Ok(c));
        assert_eq!(
            "stats=maybe".parse::<BalloonConfig>(),
            Err(ValueError::OnOff("maybe".into()))
        );
        assert_eq!(
            "size=3".parse::<BalloonConfig>(),
            Err(ValueError::UnknownKey("size".into()))
        );
        let off = parse(&["--kernel", "/k", "--balloon", "stats=off", "--no-balloon"]).unwrap();
        assert!(off.no_balloon && off.balloon.is_none());
        let on = parse(&["--kernel", "/k", "--no-balloon", "--balloon=reporting=off"]).unwrap();
        assert!(!on.no_balloon && on.balloon.is_some_and(|b| !b.reporting));
    }

    #[test]
    fn paths_need_not_be_utf8_but_device_values_must_be() {
        let odd = OsStr::from_bytes(b"/images/k\xff").to_os_string();
        let args = VmmArgs {
            kernel: Some(odd.clone().into()),
            ..Default::default()
        };
        assert_eq!(round_trip(&args), args);
        let mut disk = OsString::from("--disk=");
        disk.push(&odd);
        assert!(matches!(
            VmmArgs::parse([OsString::from("--kernel=/k"), disk]),
            Err(ArgsError::Value {
                reason: ValueError::NotUtf8,
                ..
            })
        ));
    }

    #[test]
    fn shared_directories_parse_back_and_bad_ones_are_refused() {
        let a = parse(&[
            "--kernel",
            "/k",
            "--fs",
            "tag=husk-fs0,fd=7",
            "--fs",
            "tag=b,fd=8",
        ])
        .unwrap();
        assert_eq!(
            a.fs,
            [
                FsConfig {
                    tag: "husk-fs0".into(),
                    fd: 7
                },
                FsConfig {
                    tag: "b".into(),
                    fd: 8
                }
            ]
        );
        assert_eq!(round_trip(&a), a);
        for bad in [
            "tag=a b,fd=7",
            "tag=a,fd=2",
            "tag=,fd=7",
            "fd=7",
            "tag=a",
            "tag=a,fd=7,x=1",
            &format!("tag={},fd=7", "t".repeat(37)),
        ] {
            assert!(parse(&["--kernel", "/k", "--fs", bad]).is_err(), "{bad}");
        }
        let twice = parse(&["--kernel", "/k", "--fs", "tag=a,fd=7", "--fs", "tag=a,fd=8"]);
        assert!(twice.is_err(), "one tag twice");
        let mut many = vec!["--kernel", "/k"];
        let specs: Vec<String> = (0..9).map(|i| format!("tag=t{i},fd={}", i + 3)).collect();
        for s in &specs {
            many.extend(["--fs", s.as_str()]);
        }
        assert!(parse(&many).is_err(), "nine shared directories");
    }

    #[test]
    fn disk_slots_are_counted_up_to_eight_and_zero_leaves_the_flag_out() {
        let a = parse(&["--kernel", "/k", "--disk-slots", "8"]).unwrap();
        assert_eq!(a.disk_slots, 8);
        assert_eq!(round_trip(&a), a);
        let none = parse(&["--kernel", "/k", "--disk-slots=0"]).unwrap();
        assert_eq!(none.disk_slots, 0);
        assert!(!none.to_args().iter().any(|a| a == "--disk-slots"));
        for bad in ["9", "4294967297", "-1", "two"] {
            let e = parse(&["--kernel", "/k", "--disk-slots", bad]).unwrap_err();
            assert!(e.to_string().contains("--disk-slots"), "{bad}: {e}");
        }
    }

    #[test]
    fn rate_limits_read_sizes_bursts_and_disk_numbers() {
        let l: DiskLimit = "2:bw=10M:20M,ops=1k".parse().unwrap();
        assert_eq!(l.disk, 2);
        assert_eq!(
            l.limit.bandwidth,
            Some(Bucket {
                rate: 10 << 20,
                burst: 20 << 20
            })
        );
        assert_eq!(
            l.limit.ops,
            Some(Bucket {
                rate: 1024,
                burst: 0
            })
        );
        assert_eq!(l.to_string(), "2:bw=10485760:20971520,ops=1024");
        let first: DiskLimit = "bw=1M".parse().unwrap();
        assert_eq!(first.disk, 0);
        assert!("none".parse::<RateLimit>().unwrap().is_unlimited());
        assert_eq!(RateLimit::default().to_string(), "none");
    }

    #[test]
    fn bad_rate_limits_are_refused() {
        for bad in [
            "bw=0",
            "bw=",
            "bw=10X",
            "speed=1",
            "bw",
            "bw=1:2:3",
            "bw=99999999999G",
            "",
            "x:bw=1",
        ] {
            assert!(bad.parse::<DiskLimit>().is_err(), "{bad} was accepted");
        }
        assert!(parse(&["--kernel", "/k", "--net-rx-limit", "ops=0"]).is_err());
        assert!(parse(&["--kernel", "/k", "--disk-limit", "bw=1M"]).is_ok());
    }

    #[test]
    fn rate_limits_are_allowed_with_a_restore() {
        let args = parse(&[
            "--restore-state",
            "/s",
            "--restore-mem",
            "/m",
            "--net-tx-limit",
            "bw=1M",
        ])
        .unwrap();
        assert_eq!(args.net_tx_limit.unwrap().bandwidth.unwrap().rate, 1 << 20);
    }
}
