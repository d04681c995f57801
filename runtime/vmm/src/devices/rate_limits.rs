//! Rate limits of the virtio devices, from the command line (at start, boot or restore alike)
//! and from the control socket (at run time): one path for both. The limits go to the devices
//! under their transport's lock, which the event loop holds only for one bounded turn, so the
//! control thread never waits long; each queue of a changed device is then notified, so a
//! queue parked under the old limit runs under the new one at once.

use husk_devices::rate_limiter::{BucketConfig, RateLimitConfig};
use husk_devices::virtio::device_id;
use husk_host::vmm_args::{DiskLimit, RateLimit};
use husk_proto::vmm as pb;

use crate::devices::virtio::VirtioSlot;

/// net's queue numbers (virtio 1.2 §5.1.2).
const NET_RX: usize = 0;
const NET_TX: usize = 1;

/// Why limits were refused; nothing was changed then.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RateLimitError {
    #[error("the VM has no disk {0}")]
    NoSuchDisk(u32),
    #[error("the VM has no network device")]
    NoNet,
    #[error("a rate limit needs a rate above zero")]
    ZeroRate,
    #[error("the {0} device cannot be rate limited (no timer)")]
    Unsupported(String),
}

/// Limits to set: each entry replaces one queue's; what is not named keeps its limit.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RateLimits {
    pub disks: Vec<(u32, RateLimitConfig)>,
    pub net_rx: Option<RateLimitConfig>,
    pub net_tx: Option<RateLimitConfig>,
}

fn bucket(b: &husk_host::vmm_args::Bucket) -> BucketConfig {
    BucketConfig {
        rate: b.rate,
        burst: b.burst,
    }
}

fn from_arg(limit: &RateLimit) -> RateLimitConfig {
    RateLimitConfig {
        bandwidth: limit.bandwidth.as_ref().map(bucket),
        ops: limit.ops.as_ref().map(bucket),
    }
}

fn from_proto(limit: &pb::RateLimit) -> Result<RateLimitConfig, RateLimitError> {
    let bucket = |b: &Option<pb::TokenBucket>| {
        b.as_ref()
            .map(|b| match b.rate {
                0 => Err(RateLimitError::ZeroRate),
                rate => Ok(BucketConfig {
                    rate,
                    burst: b.burst,
                }),
            })
            .transpose()
    };
    Ok(RateLimitConfig {
        bandwidth: bucket(&limit.bandwidth)?,
        ops: bucket(&limit.ops)?,
    })
}

impl RateLimits {
    /// The limits of `--disk-limit`, `--net-rx-limit` and `--net-tx-limit` (checked by their
    /// parser: no zero rate).
    pub fn from_args(
        disks: &[DiskLimit],
        net_rx: Option<&RateLimit>,
        net_tx: Option<&RateLimit>,
    ) -> Self {
        Self {
            disks: disks.iter().map(|d| (d.disk, from_arg(&d.limit))).collect(),
            net_rx: net_rx.map(from_arg),
            net_tx: net_tx.map(from_arg),
        }
    }

    /// The limits of a control request.
    pub fn from_request(request: &pb::SetRateLimits) -> Result<Self, RateLimitError> {
        let disks = request
            .disks
            .iter()
            .map(|d| {
                let limit = d.limit.as_ref().map(from_proto).transpose()?;
                Ok((d.disk, limit.unwrap_or_default()))
            })
            .collect::<Result<_, RateLimitError>>()?;
        Ok(Self {
            disks,
            net_rx: request.net_rx.as_ref().map(from_proto).transpose()?,
            net_tx: request.net_tx.as_ref().map(from_proto).transpose()?,
        })
    }

    pub fn is_empty(&self) -> bool {
        self.disks.is_empty() && self.net_rx.is_none() && self.net_tx.is_none()
    }
}

/// One change: slot, queue, limit.
type Change = (usize, usize, RateLimitConfig);

/// Which slot and queue each limit goes to; every target must exist before anything changes.
fn resolve(device_types: &[u32], limits: &RateLimits) -> Result<Vec<Change>, RateLimitError> {
    let slots_of = |kind: u32| {
        device_types
            .iter()
            .enumerate()
            .filter(move |(_, t)| **t == kind)
            .map(|(slot, _)| slot)
    };
    let mut changes = Vec::new();
    for (disk, config) in &limits.disks {
        let slot = usize::try_from(*disk)
            .ok()
            .and_then(|n| slots_of(device_id::BLOCK).nth(n))
            .ok_or(RateLimitError::NoSuchDisk(*disk))?;
        changes.push((slot, 0, *config));
    }
    for (queue, config) in [(NET_RX, limits.net_rx), (NET_TX, limits.net_tx)] {
        if let Some(config) = config {
            let slot = slots_of(device_id::NET)
                .next()
                .ok_or(RateLimitError::NoNet)?;
            changes.push((slot, queue, config));
        }
    }
    Ok(changes)
}

/// Sets `limits` on `devices`.
pub fn apply(devices: &[VirtioSlot], limits: &RateLimits) -> Result<(), RateLimitError> {
    if limits.is_empty() {
        return Ok(());
    }
    let types: Vec<u32> = devices.iter().map(VirtioSlot::device_type).collect();
    for (slot, queue, config) in resolve(&types, limits)? {
        let Some(device) = devices.get(slot) else {
            continue;
        };
        if !device.set_rate_limit(queue, config) {
            return Err(RateLimitError::Unsupported(device.name.clone()));
        }
        log::info!("{} queue {queue}: rate limit {config:?}", device.name);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const TYPES: [u32; 4] = [
        device_id::BLOCK,
        device_id::BLOCK,
        device_id::NET,
        device_id::VSOCK,
    ];

    fn limit(rate: u64) -> RateLimitConfig {
        RateLimitConfig {
            bandwidth: Some(BucketConfig { rate, burst: 0 }),
            ops: None,
        }
    }

    #[test]
    fn disks_are_counted_among_block_devices_and_net_queues_are_rx_then_tx() {
        let limits = RateLimits {
            disks: vec![(1, limit(5))],
            net_rx: Some(limit(6)),
            net_tx: Some(RateLimitConfig::default()),
        };
        let changes = resolve(&TYPES, &limits).unwrap();
        assert_eq!(
            changes,
            [
                (1, 0, limit(5)),
                (2, NET_RX, limit(6)),
                (2, NET_TX, RateLimitConfig::default())
            ]
        );
    }

    #[test]
    fn a_missing_device_refuses_the_whole_request() {
        let limits = RateLimits {
            disks: vec![(0, limit(5)), (2, limit(5))],
            ..Default::default()
        };
        assert_eq!(resolve(&TYPES, &limits), Err(RateLimitError::NoSuchDisk(2)));
        let no_net = RateLimits {
            net_tx: Some(limit(1)),
            ..Default::default()
        };
        assert_eq!(
            resolve(&[device_id::BLOCK], &no_net),
            Err(RateLimitError::NoNet)
        );
    }

    #[test]
    fn requests_with_a_zero_rate_are_refused_and_empty_limits_mean_unlimited() {
        let zero = pb::SetRateLimits {
            net_rx: Some(pb::RateLimit {
                bandwidth: Some(pb::TokenBucket { rate: 0, burst: 5 }),
                ops: None,
            }),
            ..Default::default()
        };
        assert_eq!(
            RateLimits::from_request(&zero),
            Err(RateLimitError::ZeroRate)
        );
        let lift = pb::SetRateLimits {
            disks: vec![pb::DiskRateLimit {
                disk: 0,
                limit: None,
            }],
            ..Default::default()
        };
        let limits = RateLimits::from_request(&lift).unwrap();
        assert_eq!(limits.disks, [(0, RateLimitConfig::default())]);
        assert_eq!(limits.net_rx, None, "left out: unchanged");
    }

    #[test]
    fn command_line_limits_keep_their_rates_and_bursts() {
        let disk: DiskLimit = "1:bw=1M:2M,ops=10".parse().unwrap();
        let limits = RateLimits::from_args(&[disk], None, None);
        let (n, config) = limits.disks[0];
        assert_eq!(n, 1);
        assert_eq!(
            config.bandwidth,
            Some(BucketConfig {
                rate: 1 << 20,
                burst: 2 << 20
            })
        );
        assert_eq!(config.ops, Some(BucketConfig { rate: 10, burst: 0 }));
    }
}
