//! The boot spec: which program the guest runs, with which arguments, environment and working
//! directory, carried on the kernel command line as `husk.spec=<base64url>`.
//!
//! Wire format (version 1): the text `husk1`, then one field per entry, each field a one-byte
//! tag followed by its value (any bytes but NUL), fields separated by NUL; tags are `a` (argument),
//! `e` (environment entry `KEY=VALUE`), `w` (working directory) and `s` (sandbox: no
//! application, see below). The whole is base64url without padding, so it contains no space, quote
//! or NUL the kernel's parser would split on.
//!
//! Sandbox mode: a spec with no argument at all ([`BootSpec::sandbox`]) is encoded as `husk1`
//! followed by the single empty-valued field `s`. husk-init then starts no application and only
//! serves the guest agent until a `shutdown` request. The marker makes the intent explicit: a
//! spec without arguments and without `s` is still refused ([`SpecError::NoCommand`]), and an init
//! older than sandbox mode refuses `s` as an unknown field instead of misreading it.

/// Kernel command-line parameter name (with the `=`).
pub const PARAM: &str = "husk.spec=";
/// x86's COMMAND_LINE_SIZE is 2048 bytes; keep room for the VMM's own parameters.
pub const MAX_ENCODED_LEN: usize = 1536;
const MAGIC: &[u8] = b"husk1";

/// What the guest init runs.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BootSpec {
    /// Program and arguments; `argv[0]` is looked up in `PATH` when it has no `/`. Empty: sandbox
    /// mode (no application; only the guest agent runs).
    pub argv: Vec<Vec<u8>>,
    /// Extra environment entries, each `KEY=VALUE`.
    pub env: Vec<Vec<u8>>,
    /// Working directory; `/` when absent.
    pub cwd: Option<Vec<u8>>,
}

/// Why a boot spec could not be encoded or decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SpecError {
    /// The command is empty.
    NoCommand,
    /// A field contains a NUL byte, which cannot be passed to exec.
    NulInField,
    /// An environment entry is not `KEY=VALUE` with a non-empty key.
    BadEnv(String),
    /// The encoded spec does not fit on the kernel command line.
    TooLong(usize),
    /// The parameter is not valid base64url.
    BadEncoding,
    /// The decoded bytes are not a version-1 spec.
    BadFormat,
    /// A sandbox spec (no command) carries environment entries or a working directory, which
    /// only an application could use.
    SandboxWithSettings,
}

impl std::fmt::Display for SpecError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NoCommand => write!(f, "no command given"),
            Self::NulInField => write!(f, "arguments and environment must not contain NUL bytes"),
            Self::BadEnv(e) => write!(f, "environment entry {e:?} is not KEY=VALUE"),
            Self::TooLong(n) => write!(
                f,
                "command and environment are too long for the kernel command line \
                 ({n} bytes encoded, at most {MAX_ENCODED_LEN})"
            ),
            Self::BadEncoding => write!(f, "husk.spec is not valid base64url"),
            Self::BadFormat => write!(f, "husk.spec is not a version-1 boot spec"),
            Self::SandboxWithSettings => write!(
                f,
                "a sandbox spec (no command) cannot carry environment entries or a working directory"
            ),
        }
    }
}

impl std::error::Error for SpecError {}

impl BootSpec {
    /// The spec of sandbox mode: no application, the guest only runs its agent.
    pub fn sandbox() -> Self {
        Self::default()
    }

    /// True for a sandbox spec (no application).
    pub fn is_sandbox(&self) -> bool {
        self.argv.is_empty()
    }

    /// Encodes the spec as the value of `husk.spec=`.
    pub fn encode(&self) -> Result<String, SpecError> {
        if self.is_sandbox() {
            if !self.env.is_empty() || self.cwd.is_some() {
                return Err(SpecError::SandboxWithSettings);
            }
            return Ok(base64url_encode(&[MAGIC, b"\0s"].concat()));
        }
        if self.argv[0].is_empty() {
            return Err(SpecError::NoCommand);
        }
        for e in &self.env {
            match e.iter().position(|&b| b == b'=') {
                Some(i) if i > 0 => {}
                _ => return Err(SpecError::BadEnv(String::from_utf8_lossy(e).into_owned())),
            }
        }
        let fields = self.argv.iter().map(|a| (b'a', a));
        let fields = fields.chain(self.env.iter().map(|e| (b'e', e)));
        let fields = fields.chain(self.cwd.iter().map(|w| (b'w', w)));
        let mut raw = MAGIC.to_vec();
        for (tag, value) in fields {
            if value.contains(&0) {
                return Err(SpecError::NulInField);
            }
            raw.push(0);
            raw.push(tag);
            raw.extend_from_slice(value);
        }
        let encoded = base64url_encode(&raw);
        if encoded.len() > MAX_ENCODED_LEN {
            return Err(SpecError::TooLong(encoded.len()));
        }
        Ok(encoded)
    }

    /// Decodes the value of `husk.spec=`.
    pub fn decode(encoded: &str) -> Result<Self, SpecError> {
        let raw = base64url_decode(encoded).ok_or(SpecError::BadEncoding)?;
        let mut fields = raw.split(|&b| b == 0);
        if fields.next() != Some(MAGIC) {
            return Err(SpecError::BadFormat);
        }
        let mut spec = BootSpec::default();
        let mut sandbox = false;
        for field in fields {
            let (&tag, value) = field.split_first().ok_or(SpecError::BadFormat)?;
            match tag {
                b'a' => spec.argv.push(value.to_vec()),
                b'e' => spec.env.push(value.to_vec()),
                b'w' => spec.cwd = Some(value.to_vec()),
                b's' if value.is_empty() => sandbox = true,
                _ => return Err(SpecError::BadFormat),
            }
        }
        if sandbox {
            return if !spec.argv.is_empty() {
                Err(SpecError::BadFormat)
            } else if !spec.env.is_empty() || spec.cwd.is_some() {
                Err(SpecError::SandboxWithSettings)
            } else {
                Ok(spec)
            };
        }
        if spec.argv.first().is_none_or(|a| a.is_empty()) {
            return Err(SpecError::NoCommand);
        }
        Ok(spec)
    }

    /// Finds and decodes `husk.spec=` in a kernel command line; `None` when it is absent.
    pub fn from_cmdline(cmdline: &str) -> Option<Result<Self, SpecError>> {
        cmdline
            .split_ascii_whitespace()
            .find_map(|p| p.strip_prefix(PARAM))
            .map(Self::decode)
    }
}

const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

fn base64url_encode(data: &[u8]) -> String {
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..=chunk.len() {
            out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
        }
    }
    out
}

fn base64url_decode(text: &str) -> Option<Vec<u8>> {
    let value = |c: u8| ALPHABET.iter().position(|&a| a == c).map(|v| v as u32);
    let bytes = text.as_bytes();
    if bytes.len() % 4 == 1 {
        return None;
    }
    let mut out = Vec::with_capacity(bytes.len() * 3 / 4);
    for chunk in bytes.chunks(4) {
        let mut n = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            n |= value(c)? << (18 - 6 * i);
        }
        let produced = chunk.len() - 1;
        out.extend_from_slice(&n.to_be_bytes()[1..1 + produced]);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(argv: &[&str], env: &[&str], cwd: Option<&str>) -> BootSpec {
        BootSpec {
            argv: argv.iter().map(|s| s.as_bytes().to_vec()).collect(),
            env: env.iter().map(|s| s.as_bytes().to_vec()).collect(),
            cwd: cwd.map(|s| s.as_bytes().to_vec()),
        }
    }

    #[test]
    fn round_trips_arguments_with_spaces_quotes_and_empty_strings() {
        let original = spec(
            &["/bin/sh", "-c", "echo 'hi there'; exit 7", "", "ünïcode"],
            &["A=1", "EMPTY=", "Q=\"x y\""],
            Some("/tmp"),
        );
        let encoded = original.encode().unwrap();
        assert!(encoded
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
        assert_eq!(BootSpec::decode(&encoded).unwrap(), original);
    }

    #[test]
    fn base64url_matches_known_vectors_for_every_tail_length() {
        for (plain, coded) in [
            ("", ""),
            ("f", "Zg"),
            ("fo", "Zm8"),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg"),
        ] {
            assert_eq!(base64url_encode(plain.as_bytes()), coded);
            assert_eq!(base64url_decode(coded).unwrap(), plain.as_bytes());
        }
        assert_eq!(base64url_encode(&[0xfb, 0xff]), "-_8");
    }

    #[test]
    fn finds_the_spec_among_other_kernel_parameters() {
        let encoded = spec(&["true"], &[], None).encode().unwrap();
        let cmdline = format!("console=ttyS0 reboot=k husk.spec={encoded} quiet\n");
        assert_eq!(
            BootSpec::from_cmdline(&cmdline).unwrap().unwrap().argv,
            vec![b"true".to_vec()]
        );
        assert!(BootSpec::from_cmdline("console=ttyS0 quiet").is_none());
    }

    #[test]
    fn sandbox_round_trips_with_an_explicit_marker() {
        let encoded = BootSpec::sandbox().encode().unwrap();
        assert_eq!(base64url_decode(&encoded).unwrap(), b"husk1\0s");
        let decoded = BootSpec::decode(&encoded).unwrap();
        assert!(decoded.is_sandbox());
        assert_eq!(decoded, BootSpec::sandbox());
        let cmdline = format!("console=ttyS0 husk.spec={encoded}");
        assert!(BootSpec::from_cmdline(&cmdline)
            .unwrap()
            .unwrap()
            .is_sandbox());
        assert!(!spec(&["true"], &[], None).is_sandbox());
    }

    #[test]
    fn sandbox_refuses_settings_and_mixed_specs() {
        assert_eq!(
            spec(&[], &["A=1"], None).encode(),
            Err(SpecError::SandboxWithSettings)
        );
        assert_eq!(
            spec(&[], &[], Some("/tmp")).encode(),
            Err(SpecError::SandboxWithSettings)
        );
        assert_eq!(
            BootSpec::decode(&base64url_encode(b"husk1\0s\0atrue")),
            Err(SpecError::BadFormat)
        );
        assert_eq!(
            BootSpec::decode(&base64url_encode(b"husk1\0s\0eA=1")),
            Err(SpecError::SandboxWithSettings)
        );
        assert_eq!(
            BootSpec::decode(&base64url_encode(b"husk1\0sx")),
            Err(SpecError::BadFormat)
        );
    }

    #[test]
    fn refuses_what_cannot_be_run_or_carried() {
        assert_eq!(spec(&[""], &[], None).encode(), Err(SpecError::NoCommand));
        assert_eq!(
            spec(&["a\0b"], &[], None).encode(),
            Err(SpecError::NulInField)
        );
        assert!(matches!(
            spec(&["x"], &["=v"], None).encode(),
            Err(SpecError::BadEnv(_))
        ));
        assert!(matches!(
            spec(&["x"], &["NOEQUALS"], None).encode(),
            Err(SpecError::BadEnv(_))
        ));
        let long = "x".repeat(MAX_ENCODED_LEN);
        assert!(matches!(
            spec(&[&long], &[], None).encode(),
            Err(SpecError::TooLong(_))
        ));
    }

    #[test]
    fn refuses_corrupt_or_foreign_input() {
        assert_eq!(BootSpec::decode("!!!!"), Err(SpecError::BadEncoding));
        assert_eq!(BootSpec::decode("Z"), Err(SpecError::BadEncoding));
        assert_eq!(
            BootSpec::decode(&base64url_encode(b"husk2\0atrue")),
            Err(SpecError::BadFormat)
        );
        assert_eq!(
            BootSpec::decode(&base64url_encode(b"husk1\0ztrue")),
            Err(SpecError::BadFormat)
        );
        assert_eq!(
            BootSpec::decode(&base64url_encode(b"husk1\0a")),
            Err(SpecError::NoCommand)
        );
        assert_eq!(
            BootSpec::decode(&base64url_encode(b"husk1")),
            Err(SpecError::NoCommand)
        );
    }
}
