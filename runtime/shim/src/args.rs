//! The command line containerd gives a shim: Go `flag` syntax (`-name value`, `-name=value`,
//! `--name value`; booleans without a value), then one optional action word.

use std::path::PathBuf;

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
    /// `start`, `delete`, or none (serve).
    pub action: Option<String>,
}

impl ShimArgs {
    pub fn parse(args: impl IntoIterator<Item = String>) -> Result<Self, String> {
        let mut out = ShimArgs::default();
        let mut args = args.into_iter();
        let mut bundle = None;
        while let Some(arg) = args.next() {
            let Some(flag) = arg.strip_prefix("--").or_else(|| arg.strip_prefix('-')) else {
                if out.action.is_some() {
                    return Err(format!("unexpected argument {arg:?}"));
                }
                out.action = Some(arg);
                continue;
            };
            let (name, inline) = match flag.split_once('=') {
                Some((n, v)) => (n, Some(v.to_string())),
                None => (flag, None),
            };
            if matches!(name, "debug" | "v") {
                out.debug = inline.as_deref() != Some("false");
                if name == "v" {
                    println!("containerd-shim-husk-v2 {}", env!("CARGO_PKG_VERSION"));
                    std::process::exit(0);
                }
                continue;
            }
            let value = match inline {
                Some(v) => v,
                None => args
                    .next()
                    .ok_or_else(|| format!("flag -{name} needs a value"))?,
            };
            match name {
                "namespace" => out.namespace = value,
                "id" => out.id = value,
                "address" => out.address = value,
                "publish-binary" => out.publish_binary = value,
                "bundle" => bundle = Some(PathBuf::from(value)),
                // Flags of newer containerd versions that this shim does not need.
                "socket" | "ttrpc-address" => {}
                other => return Err(format!("unknown flag -{other}")),
            }
        }
        out.bundle = match bundle {
            Some(b) => b,
            None => std::env::current_dir().map_err(|e| format!("working directory: {e}"))?,
        };
        Ok(out)
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

    fn parse(s: &[&str]) -> Result<ShimArgs, String> {
        ShimArgs::parse(s.iter().map(|s| s.to_string()))
    }

    #[test]
    fn containerd_1_6_start_line_is_understood() {
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
        assert_eq!(a.action.as_deref(), Some("start"));
        // The long-lived shim gets the same flags and no action.
        let again = ShimArgs::parse(a.serve_args()).unwrap();
        assert_eq!(again, ShimArgs { action: None, ..a });
    }

    #[test]
    fn equals_form_bundle_and_errors() {
        let a = parse(&["--id=x", "-bundle=/b", "-debug=false", "delete"]).unwrap();
        assert_eq!(a.id, "x");
        assert_eq!(a.bundle, PathBuf::from("/b"));
        assert!(!a.debug);
        assert!(parse(&["-id"]).unwrap_err().contains("needs a value"));
        assert!(parse(&["-bogus", "1"])
            .unwrap_err()
            .contains("unknown flag"));
        assert!(parse(&["start", "delete"]).is_err());
    }
}
