//! Running Debian's nft: always by absolute path (never through PATH, which a caller may
//! set), scripts on stdin, and the table read back as JSON.

use std::io::Write;
use std::os::fd::AsFd;
use std::path::Path;
use std::process::{Command, Stdio};

use super::render::{self, Existing, Role};
use super::FirewallError;

const NFT: &str = "/usr/sbin/nft";

/// Serialises husk's changes of its table between processes (huskd, several `husk run`):
/// each change reads the table, then rewrites the base chains from what it read.
const LOCK: &str = "/run/husk-firewall.lock";

/// nft's error output is short; more is cut.
const MAX_ERROR: usize = 4096;

pub(super) fn require() -> Result<(), FirewallError> {
    if Path::new(NFT).is_file() {
        Ok(())
    } else {
        Err(FirewallError::NoNft)
    }
}

/// Under the lock: reads the table and applies the script `render` makes of it.
pub(super) fn change(render: impl FnOnce(&Existing) -> String) -> Result<(), FirewallError> {
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(LOCK)
        .map_err(|cause| FirewallError::Lock { path: LOCK, cause })?;
    rustix::fs::flock(lock.as_fd(), rustix::fs::FlockOperation::LockExclusive).map_err(|e| {
        FirewallError::Lock {
            path: LOCK,
            cause: e.into(),
        }
    })?;
    let existing = existing()?;
    run_script(&render(&existing))
    // The lock goes with `lock`.
}

fn run_script(script: &str) -> Result<(), FirewallError> {
    let mut child = Command::new(NFT)
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(FirewallError::Run)?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(script.as_bytes())
            .map_err(FirewallError::Run)?;
    }
    let out = child.wait_with_output().map_err(FirewallError::Run)?;
    if out.status.success() {
        Ok(())
    } else {
        Err(FirewallError::Refused(short(&out.stderr)))
    }
}

/// The per-VM chains of husk's table now; empty when there is no table yet.
pub(super) fn existing() -> Result<Existing, FirewallError> {
    let out = Command::new(NFT)
        .args(["-j", "list", "table"])
        .args(render::TABLE.split(' '))
        .stdin(Stdio::null())
        .output()
        .map_err(FirewallError::Run)?;
    if !out.status.success() {
        let err = short(&out.stderr);
        if err.contains("No such file or directory") {
            return Ok(Existing::new());
        }
        return Err(FirewallError::List(err));
    }
    parse_listing(&out.stdout)
}

/// The per-VM chains in `nft -j list table` output.
pub(super) fn parse_listing(json: &[u8]) -> Result<Existing, FirewallError> {
    let value: serde_json::Value =
        serde_json::from_slice(json).map_err(|e| FirewallError::List(e.to_string()))?;
    let mut existing = Existing::new();
    let items = value
        .get("nftables")
        .and_then(|v| v.as_array())
        .ok_or_else(|| FirewallError::List("no \"nftables\" array".into()))?;
    for name in items
        .iter()
        .filter_map(|item| item.get("chain")?.get("name")?.as_str())
    {
        if let Some((tap, role)) = Role::parse_chain(name) {
            existing.entry(tap.to_string()).or_default().insert(role);
        }
    }
    Ok(existing)
}

fn short(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(&bytes[..bytes.len().min(MAX_ERROR)]);
    text.trim().replace('\n', "; ")
}
