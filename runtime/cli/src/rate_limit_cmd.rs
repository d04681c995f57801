//! Rate limits against huskd: `husk create` puts them in the VmSpec, `husk update` changes
//! them on a running VM (UpdateRateLimits). The flags are `husk run`'s, parsed by the same
//! types as husk-vmm's own (`husk_host::vmm_args`).

use husk_host::vmm_args::{Bucket, DiskLimit, RateLimit as ArgLimit};
use husk_proto::v1::husk_client::HuskClient;
use husk_proto::v1::{DiskRateLimit, RateLimit, TokenBucket, UpdateRateLimitsRequest, VmSpec};
use tonic::transport::Channel;

use crate::remote::RemoteError;

/// The rate-limit flags of `husk create` and `husk update`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct LimitArgs {
    /// Rate limit of a disk: bw=RATE[:BURST] (bytes/s) and/or ops=RATE[:BURST] (requests/s),
    /// comma-separated, or none; K, M, G (powers of 1024); a burst of 0 or none is one
    /// second's worth. N: the disk (0 = --rootfs if given, else the first --disk; 0 when left
    /// out); repeatable
    #[arg(long = "disk-limit", value_name = "[N:]LIMIT")]
    pub disk_limits: Vec<DiskLimit>,
    /// Rate limit of the frames the guest receives (LIMIT as for --disk-limit)
    #[arg(long = "net-rx-limit", value_name = "LIMIT")]
    pub net_rx_limit: Option<ArgLimit>,
    /// Rate limit of the frames the guest sends (LIMIT as for --disk-limit)
    #[arg(long = "net-tx-limit", value_name = "LIMIT")]
    pub net_tx_limit: Option<ArgLimit>,
}

/// `husk update VM`: new limits for a running or paused VM.
#[derive(Debug, clap::Args)]
pub struct UpdateArgs {
    #[arg(value_name = "VM")]
    pub vm: String,
    #[command(flatten)]
    pub limits: LimitArgs,
}

fn bucket(b: &Bucket) -> TokenBucket {
    TokenBucket {
        rate: b.rate,
        burst: b.burst,
    }
}

/// A flag's limit as the API's (`none`: a RateLimit without buckets).
pub fn to_api(limit: &ArgLimit) -> RateLimit {
    RateLimit {
        bandwidth: limit.bandwidth.as_ref().map(bucket),
        ops: limit.ops.as_ref().map(bucket),
    }
}

/// Puts `limits` into a spec being created (disk numbers as huskd counts them: the rootfs
/// first). A disk the spec lacks is refused, and so is the rootfs, which has no `Disk` entry
/// to hold a limit (`husk update` can limit it once the VM runs).
pub fn apply_to_spec(spec: &mut VmSpec, limits: &LimitArgs) -> Result<(), RemoteError> {
    let first = u32::from(!spec.rootfs.is_empty());
    for l in &limits.disk_limits {
        let disk = l
            .disk
            .checked_sub(first)
            .and_then(|i| spec.disks.get_mut(i as usize))
            .ok_or_else(|| {
                RemoteError::Usage(format!(
                    "--disk-limit {}: no such --disk (the rootfs, disk 0, can only be limited \
                     with husk update)",
                    l.disk
                ))
            })?;
        disk.rate_limit = Some(to_api(&l.limit));
    }
    let network = spec.network.get_or_insert_with(Default::default);
    let given = limits.net_rx_limit.is_some() || limits.net_tx_limit.is_some();
    if given && network.mode == husk_proto::v1::network::Mode::None as i32 {
        return Err(RemoteError::Usage(
            "--net-rx-limit, --net-tx-limit: need --net".into(),
        ));
    }
    network.rx_rate_limit = limits.net_rx_limit.as_ref().map(to_api);
    network.tx_rate_limit = limits.net_tx_limit.as_ref().map(to_api);
    Ok(())
}

/// The UpdateRateLimits request of `husk update`.
pub fn update_request(args: &UpdateArgs) -> UpdateRateLimitsRequest {
    UpdateRateLimitsRequest {
        vm: args.vm.clone(),
        disks: args
            .limits
            .disk_limits
            .iter()
            .map(|l| DiskRateLimit {
                disk: l.disk,
                limit: Some(to_api(&l.limit)),
            })
            .collect(),
        net_rx: args.limits.net_rx_limit.as_ref().map(to_api),
        net_tx: args.limits.net_tx_limit.as_ref().map(to_api),
    }
}

pub async fn update(
    client: &mut HuskClient<Channel>,
    args: &UpdateArgs,
) -> Result<i32, RemoteError> {
    client.update_rate_limits(update_request(args)).await?;
    println!("{}", args.vm);
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Harness {
        #[command(flatten)]
        update: UpdateArgs,
    }

    #[test]
    fn update_flags_become_one_request_and_none_lifts_a_limit() {
        let h = Harness::try_parse_from([
            "update",
            "web",
            "--disk-limit",
            "1:bw=4M",
            "--net-tx-limit",
            "none",
        ])
        .unwrap();
        let r = update_request(&h.update);
        assert_eq!(r.vm, "web");
        assert_eq!(r.disks[0].disk, 1);
        assert_eq!(
            r.disks[0].limit.as_ref().unwrap().bandwidth,
            Some(TokenBucket {
                rate: 4 << 20,
                burst: 0
            })
        );
        assert_eq!(r.net_rx, None, "not given: unchanged");
        assert_eq!(r.net_tx, Some(RateLimit::default()), "none: lifted");
    }

    #[test]
    fn create_limits_go_to_the_disks_they_name() {
        let mut spec = VmSpec {
            rootfs: "/r".into(),
            disks: vec![Default::default()],
            network: Some(husk_proto::v1::Network {
                mode: husk_proto::v1::network::Mode::Tap as i32,
                ..Default::default()
            }),
            ..Default::default()
        };
        let limits = LimitArgs {
            disk_limits: vec!["1:ops=10".parse().unwrap()],
            net_rx_limit: Some("bw=1M".parse().unwrap()),
            net_tx_limit: None,
        };
        apply_to_spec(&mut spec, &limits).unwrap();
        assert_eq!(
            spec.disks[0].rate_limit.as_ref().unwrap().ops.unwrap().rate,
            10
        );
        assert!(spec.network.unwrap().rx_rate_limit.is_some());
        let rootfs = LimitArgs {
            disk_limits: vec!["0:ops=10".parse().unwrap()],
            ..Default::default()
        };
        let mut spec = VmSpec {
            rootfs: "/r".into(),
            ..Default::default()
        };
        assert!(apply_to_spec(&mut spec, &rootfs).is_err());
        let no_net = LimitArgs {
            net_tx_limit: Some("bw=1M".parse().unwrap()),
            ..Default::default()
        };
        let err = apply_to_spec(&mut VmSpec::default(), &no_net)
            .unwrap_err()
            .to_string();
        assert!(err.contains("need --net"), "{err}");
    }
}
