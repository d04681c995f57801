//! The command line containerd gives a shim, parsed with clap.
//!
//! containerd (1.6, runtime v2) writes Go `flag` syntax: single-dash long flags (`-namespace
//! ns`, `-id=c1`; booleans alone or as `-debug=false`), then one action word:
//!
//! ```text
//! start:  -namespace NS -address SOCK -publish-binary BIN -id ID [-debug] start
//! delete: -namespace NS -address SOCK -publish-binary BIN -id ID -bundle DIR [-debug] delete
//! ```
//!
//! Go's `flag` also takes the `--name` spellings. [`normalize`] rewrites each single-dash long
//! flag to its `--` form, so that clap sees one standard syntax; the values are left alone.

use std::ffi::OsString;
use std::path::PathBuf;

use clap::Parser;

/// What containerd told this shim.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ShimArgs {
    pub namespace: String,
    pub id: String,
    /// containerd's gRPC socket (`-address`).
    pub address: String,
    /// The containerd binary, for `containerd publish` (`-publish-binary`).
    pub publish_binary: String,
    /// The bundle directory; containerd runs `start` and `delete` inside it, so it defaults to
    /// the working directory.
    pub bundle: PathBuf,
    pub debug: bool,
    /// `start`, `delete`, `prune-bases`, or none (serve).
    pub action: Option<Action>,
}

/// What containerd asks of this run of the binary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Action {
    /// Spawn the long-lived shim, print its address, exit.
    Start,
    /// Clean up after a shim that is gone, print a DeleteResponse.
    Delete,
    /// Not containerd's: remove the shared base images that no live container uses (for an
    /// operator; safe while containers run).
    PruneBases,
}

/// Why the command line was refused.
#[derive(Debug, thiserror::Error)]
pub enum ArgsError {
    #[error(transparent)]
    Usage(#[from] clap::Error),
    #[error("working directory")]
    WorkingDirectory(#[source] std::io::Error),
}

/// containerd's runtime v2 shim for husk: each container in its own micro-VM, through huskd.
///
/// Run by containerd, not by people: `start` and `delete` as described in containerd's
/// runtime v2 documentation; no action: serve the task API on the socket inherited as fd 3.
#[derive(Debug, Parser)]
#[command(name = "containerd-shim-husk-v2", version, disable_version_flag = true)]
struct Raw {
    /// containerd namespace of the container
    #[arg(
        long,
        value_name = "NS",
        default_value = "",
        hide_default_value = true,
        allow_hyphen_values = true
    )]
    namespace: String,
    /// The container's id
    #[arg(
        long,
        value_name = "ID",
        default_value = "",
        hide_default_value = true,
        allow_hyphen_values = true
    )]
    id: String,
    /// containerd's gRPC socket
    #[arg(
        long,
        value_name = "SOCK",
        default_value = "",
        hide_default_value = true,
        allow_hyphen_values = true
    )]
    address: String,
    /// The containerd binary, for `containerd publish`
    #[arg(
        long,
        value_name = "BIN",
        default_value = "",
        hide_default_value = true,
        allow_hyphen_values = true
    )]
    publish_binary: String,
    /// The bundle directory [default: the working directory]
    #[arg(long, value_name = "DIR", allow_hyphen_values = true)]
    bundle: Option<PathBuf>,
    /// Debug logs (Go style: `-debug` or `-debug=false`)
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true",
          default_value_t = false, action = clap::ArgAction::Set)]
    debug: bool,
    /// Print the version
    #[arg(short = 'v', long = "version", action = clap::ArgAction::Version)]
    _version: Option<bool>,
    /// Given by newer containerd versions; this shim does not need it
    #[arg(long, value_name = "PATH", hide = true)]
    socket: Option<String>,
    /// Given by newer containerd versions; this shim does not need it
    #[arg(long, value_name = "ADDR", hide = true)]
    ttrpc_address: Option<String>,
    /// start, delete, prune-bases (an operator's: remove unused shared base images), or none (serve)
    #[arg(value_enum)]
    action: Option<Action>,
}

/// The flags that take a value (its next argument is copied as it is).
const VALUED: &[&str] = &[
    "namespace",
    "id",
    "address",
    "publish-binary",
    "bundle",
    "socket",
    "ttrpc-address",
];

/// Rewrites Go's single-dash long flags (`-namespace`, `-debug=false`) to `--namespace`, ...
/// One-letter flags (`-v`, `-h`), `--` forms, values and the action are kept.
pub fn normalize(args: impl IntoIterator<Item = OsString>) -> Vec<OsString> {
    let mut out = Vec::new();
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        let Some(text) = arg.to_str() else {
            out.push(arg);
            continue;
        };
        let name = text.split_once('=').map_or(text, |(n, _)| n);
        let bare = name.strip_prefix("--").or_else(|| name.strip_prefix('-'));
        let long = match text.strip_prefix('-') {
            Some(rest) if !rest.starts_with('-') && rest.len() > 1 => format!("--{rest}"),
            _ => text.to_string(),
        };
        out.push(OsString::from(long));
        // `-name value`: the value may itself start with a dash; never rewrite it.
        if bare.is_some_and(|b| VALUED.contains(&b)) && !text.contains('=') {
            if let Some(value) = args.next() {
                out.push(value);
            }
        }
    }
    out
}

impl ShimArgs {
    /// Parses the arguments after the program name.
    pub fn parse(args: impl IntoIterator<Item = OsString>) -> Result<Self, ArgsError> {
        let argv =
            std::iter::once(OsString::from("containerd-shim-husk-v2")).chain(normalize(args));
        let raw = Raw::try_parse_from(argv)?;
        let bundle = match raw.bundle {
            Some(b) => b,
            None => std::env::current_dir().map_err(ArgsError::WorkingDirectory)?,
        };
        Ok(Self {
            namespace: raw.namespace,
            id: raw.id,
            address: raw.address,
            publish_binary: raw.publish_binary,
            bundle,
            debug: raw.debug,
            action: raw.action,
        })
    }

    /// The arguments for the long-lived shim that `start` spawns: the same flags, no action.
    pub fn serve_args(&self) -> Vec<String> {
        let mut v = vec![
            "-namespace".to_string(),
            self.namespace.clone(),
            "-id".into(),
            self.id.clone(),
            "-address".into(),
            self.address.clone(),
            "-publish-binary".into(),
            self.publish_binary.clone(),
            "-bundle".into(),
            self.bundle.display().to_string(),
        ];
        if self.debug {
            v.push("-debug".into());
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::error::ErrorKind;

    fn parse(s: &[&str]) -> Result<ShimArgs, ArgsError> {
        ShimArgs::parse(s.iter().map(OsString::from))
    }

    fn usage_kind(s: &[&str]) -> ErrorKind {
        match parse(s) {
            Err(ArgsError::Usage(e)) => e.kind(),
            other => panic!("{s:?}: {other:?}"),
        }
    }

    #[test]
    fn containerd_1_6_start_line_is_understood() {
        // runtime/v2/shim/util.go Command() and binary.go Start() of containerd 1.6.
        let a = parse(&[
            "-namespace",
            "default",
            "-address",
            "/run/containerd/containerd.sock",
            "-publish-binary",
            "/usr/bin/containerd",
            "-id",
            "c1",
            "-debug",
            "start",
        ])
        .unwrap();
        assert_eq!(a.namespace, "default");
        assert_eq!(a.id, "c1");
        assert_eq!(a.address, "/run/containerd/containerd.sock");
        assert_eq!(a.publish_binary, "/usr/bin/containerd");
        assert!(a.debug);
        assert_eq!(a.action, Some(Action::Start));
        assert_eq!(a.bundle, std::env::current_dir().unwrap());
        // The long-lived shim gets the same flags and no action.
        let again = ShimArgs::parse(a.serve_args().into_iter().map(OsString::from)).unwrap();
        assert_eq!(again, ShimArgs { action: None, ..a });
    }

    #[test]
    fn containerd_1_6_delete_line_is_understood() {
        // binary.go Delete(): the bundle is named, no -debug unless containerd logs debug.
        let a = parse(&[
            "-namespace",
            "k8s.io",
            "-address",
            "/run/containerd/containerd.sock",
            "-publish-binary",
            "/usr/bin/containerd",
            "-id",
            "c2",
            "-bundle",
            "/run/containerd/io.containerd.runtime.v2.task/k8s.io/c2",
            "delete",
        ])
        .unwrap();
        assert_eq!((a.namespace.as_str(), a.id.as_str()), ("k8s.io", "c2"));
        assert_eq!(
            a.bundle,
            PathBuf::from("/run/containerd/io.containerd.runtime.v2.task/k8s.io/c2")
        );
        assert!(!a.debug);
        assert_eq!(a.action, Some(Action::Delete));
    }

    #[test]
    fn equals_form_bundle_and_errors() {
        let a = parse(&["--id=x", "-bundle=/b", "-debug=false", "delete"]).unwrap();
        assert_eq!(a.id, "x");
        assert_eq!(a.bundle, PathBuf::from("/b"));
        assert!(!a.debug);
        let a = parse(&[
            "--namespace",
            "n",
            "-debug=true",
            "--socket",
            "/s",
            "-ttrpc-address=/t",
        ])
        .unwrap();
        assert!(a.debug && a.namespace == "n" && a.action.is_none());
        // An operator's action, with no flags at all.
        assert_eq!(
            parse(&["prune-bases"]).unwrap().action,
            Some(Action::PruneBases)
        );
        assert_eq!(usage_kind(&["-id"]), ErrorKind::InvalidValue);
        assert_eq!(usage_kind(&["-bogus", "1"]), ErrorKind::UnknownArgument);
        assert_eq!(usage_kind(&["start", "delete"]), ErrorKind::UnknownArgument);
        assert_eq!(usage_kind(&["stop"]), ErrorKind::InvalidValue);
        assert_eq!(usage_kind(&["-v"]), ErrorKind::DisplayVersion);
        assert_eq!(usage_kind(&["-h"]), ErrorKind::DisplayHelp);
    }

    #[test]
    fn only_single_dash_long_flags_are_rewritten_never_values() {
        let n = normalize(
            [
                "-id",
                "-odd-id",
                "-debug",
                "-v",
                "--bundle",
                "-b",
                "-namespace=-x",
                "start",
            ]
            .map(OsString::from),
        );
        assert_eq!(
            n,
            [
                "--id",
                "-odd-id",
                "--debug",
                "-v",
                "--bundle",
                "-b",
                "--namespace=-x",
                "start"
            ]
            .map(OsString::from)
        );
        let a = parse(&["-id", "-odd-id", "-namespace=-x"]).unwrap();
        assert_eq!((a.id.as_str(), a.namespace.as_str()), ("-odd-id", "-x"));
    }
}
