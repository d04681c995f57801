//! `reidentify`: what makes a restored clone a machine of its own, in one request.
//!
//! Every clone of a snapshot wakes up with the same memory, so with the same state of the
//! kernel's random number generator: two clones would hand out the same "random" bytes (keys,
//! nonces, TCP sequence numbers) until something reseeded them. huskd sends fresh bytes from
//! its own random source; they are credited to the input pool (RNDADDENTROPY) and the CRNG is
//! reseeded from it at once (RNDRESEEDCRNG) instead of at its next timed reseed. Then the wall
//! clock, the host name and the network identity, each as its own request would set them.
//!
//! Applied in that order, entropy first: nothing after it can draw on the old state. Every
//! part is checked before any is applied, so a malformed request changes nothing.

use std::io;
use std::os::fd::AsRawFd;

use husk_proto::agent::Reidentify;

use super::net_config::{self, NetConfig};

/// Least entropy accepted: 256 bits, what the kernel's CRNG key holds.
pub const MIN_ENTROPY: usize = 32;
/// Most entropy accepted (the kernel takes any amount; this bounds the request).
pub const MAX_ENTROPY: usize = 512;

/// `_IOW('R', 0x03, int[2])`: add bytes to the input pool, crediting `entropy_count` bits.
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
/// `_IO('R', 0x07)`: reseed the CRNG from the input pool now (Linux 4.17+).
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;

/// A checked `reidentify` request.
#[derive(Debug, PartialEq, Eq)]
pub struct Identity {
    entropy: Vec<u8>,
    unix_ns: Option<i64>,
    hostname: Option<String>,
    network: Option<NetConfig>,
}

impl Identity {
    /// Checks a request; the error names the field that is wrong.
    pub fn parse(msg: &Reidentify) -> Result<Self, String> {
        if !msg.entropy.is_empty() && !(MIN_ENTROPY..=MAX_ENTROPY).contains(&msg.entropy.len()) {
            return Err(format!(
                "entropy: {} bytes, {MIN_ENTROPY}..={MAX_ENTROPY} are needed",
                msg.entropy.len()
            ));
        }
        let hostname = match msg.hostname.as_str() {
            "" => None,
            name if husk_init::hostname::valid_hostname(name) => Some(name.to_string()),
            name => return Err(format!("hostname: {name:?} is not a host name")),
        };
        let network = msg
            .network
            .as_ref()
            .map(NetConfig::parse)
            .transpose()
            .map_err(|e| format!("network: {e}"))?;
        Ok(Self {
            entropy: msg.entropy.clone(),
            unix_ns: (msg.unix_ns != 0).then_some(msg.unix_ns),
            hostname,
            network,
        })
    }

    /// Applies every part, entropy first; the error says which part failed (those before it
    /// are applied).
    pub fn apply(&self) -> Result<(), String> {
        if !self.entropy.is_empty() {
            reseed(&self.entropy).map_err(|e| format!("entropy: {e}"))?;
        }
        if let Some(ns) = self.unix_ns {
            super::set_time(ns).map_err(|e| format!("clock: {e}"))?;
        }
        if let Some(name) = &self.hostname {
            rustix::system::sethostname(name.as_bytes()).map_err(|e| format!("hostname: {e}"))?;
        }
        if let Some(net) = &self.network {
            net_config::apply(net).map_err(|e| format!("network: {e}"))?;
        }
        Ok(())
    }
}

/// The argument of RNDADDENTROPY: `struct rand_pool_info { int entropy_count; int buf_size;
/// __u32 buf[]; }` with `bytes` as the buffer, every bit credited.
fn rand_pool_info(bytes: &[u8]) -> Vec<u8> {
    let bits = (bytes.len() * 8) as i32;
    let len = bytes.len() as i32;
    let mut info = Vec::with_capacity(8 + bytes.len().next_multiple_of(4));
    info.extend_from_slice(&bits.to_ne_bytes());
    info.extend_from_slice(&len.to_ne_bytes());
    info.extend_from_slice(bytes);
    // buf is an array of __u32: the allocation covers whole words.
    info.resize(8 + bytes.len().next_multiple_of(4), 0);
    info
}

/// Credits `bytes` to the kernel's input pool and reseeds its CRNG from it.
fn reseed(bytes: &[u8]) -> io::Result<()> {
    let random = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/urandom")?;
    let info = rand_pool_info(bytes);
    // SAFETY: `info` is a rand_pool_info whose buf_size (bytes.len()) lies within the buffer,
    // which outlives the call; the kernel only reads it.
    let rc = unsafe { libc::ioctl(random.as_raw_fd(), RNDADDENTROPY as _, info.as_ptr()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: RNDRESEEDCRNG takes no argument.
    let rc = unsafe { libc::ioctl(random.as_raw_fd(), RNDRESEEDCRNG as _) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use husk_proto::agent::SetNetwork;

    #[test]
    fn a_full_request_is_parsed_and_empty_parts_are_left_alone() {
        let id = Identity::parse(&Reidentify {
            entropy: vec![7; 64],
            unix_ns: 1_700_000_000_000_000_000,
            hostname: "clone-1".into(),
            network: Some(SetNetwork {
                interface: String::new(),
                mac: vec![6, 0, 1, 2, 3, 4],
                address: "169.254.0.2".into(),
                prefix_len: 30,
                gateway: "169.254.0.1".into(),
            }),
        })
        .unwrap();
        assert_eq!(id.entropy.len(), 64);
        assert_eq!(id.unix_ns, Some(1_700_000_000_000_000_000));
        assert_eq!(id.hostname.as_deref(), Some("clone-1"));
        assert!(id.network.is_some());
        let empty = Identity::parse(&Reidentify::default()).unwrap();
        assert_eq!(
            empty,
            Identity {
                entropy: Vec::new(),
                unix_ns: None,
                hostname: None,
                network: None
            }
        );
        // Nothing to apply: succeeds without touching the system.
        empty.apply().unwrap();
    }

    #[test]
    fn malformed_parts_are_refused_by_name_before_anything_is_applied() {
        for (request, field) in [
            (
                Reidentify {
                    entropy: vec![1; 8],
                    ..Default::default()
                },
                "entropy",
            ),
            (
                Reidentify {
                    entropy: vec![1; MAX_ENTROPY + 1],
                    ..Default::default()
                },
                "entropy",
            ),
            (
                Reidentify {
                    hostname: "bad name".into(),
                    ..Default::default()
                },
                "hostname",
            ),
            (
                Reidentify {
                    network: Some(SetNetwork {
                        address: "not-an-ip".into(),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                "network",
            ),
        ] {
            let e = Identity::parse(&request).unwrap_err();
            assert!(e.starts_with(field), "{e}");
        }
    }

    #[test]
    fn the_pool_info_credits_every_bit_and_covers_whole_words() {
        let info = rand_pool_info(&[0xAB; 33]);
        assert_eq!(&info[0..4], &(33 * 8i32).to_ne_bytes());
        assert_eq!(&info[4..8], &33i32.to_ne_bytes());
        assert_eq!(info.len(), 8 + 36);
        assert!(info[8..41].iter().all(|&b| b == 0xAB));
        assert!(info[41..].iter().all(|&b| b == 0));
    }
}
