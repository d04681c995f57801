//! Rate limits between the API's messages (husk.v1), husk-vmm's command line
//! (`husk_host::vmm_args`) and its control protocol (husk.vmm.v1): the same buckets in three
//! spellings. Values are checked by `validate` before they get here.

use husk_host::vmm_args::{Bucket, DiskLimit, RateLimit as ArgLimit};
use husk_proto::v1::{
    DiskRateLimit, RateLimit, TokenBucket, UpdateRateLimitsRequest, VmSpec, VmStatus,
};
use husk_proto::vmm as pb;

fn arg_bucket(b: &TokenBucket) -> Bucket {
    Bucket {
        rate: b.rate,
        burst: b.burst,
    }
}

/// A limit for husk-vmm's command line.
pub fn to_arg(limit: &RateLimit) -> ArgLimit {
    ArgLimit {
        bandwidth: limit.bandwidth.as_ref().map(arg_bucket),
        ops: limit.ops.as_ref().map(arg_bucket),
    }
}

/// The `--disk-limit` flags of a spec, numbered as the VMM numbers its disks (the rootfs
/// first, when there is one); unlimited disks get none.
pub fn disk_limits(spec: &VmSpec) -> Vec<DiskLimit> {
    let first = u32::from(!spec.rootfs.is_empty());
    spec.disks
        .iter()
        .zip(first..)
        .filter_map(|(disk, n)| {
            let limit = to_arg(disk.rate_limit.as_ref()?);
            (!limit.is_unlimited()).then_some(DiskLimit { disk: n, limit })
        })
        .collect()
}

fn vmm_limit(limit: &RateLimit) -> pb::RateLimit {
    let bucket = |b: &TokenBucket| pb::TokenBucket {
        rate: b.rate,
        burst: b.burst,
    };
    pb::RateLimit {
        bandwidth: limit.bandwidth.as_ref().map(bucket),
        ops: limit.ops.as_ref().map(bucket),
    }
}

/// The control request for an UpdateRateLimits call.
pub fn to_vmm_request(request: &UpdateRateLimitsRequest) -> pb::SetRateLimits {
    pb::SetRateLimits {
        disks: request
            .disks
            .iter()
            .map(|d| pb::DiskRateLimit {
                disk: d.disk,
                limit: d.limit.as_ref().map(vmm_limit),
            })
            .collect(),
        net_rx: request.net_rx.as_ref().map(vmm_limit),
        net_tx: request.net_tx.as_ref().map(vmm_limit),
    }
}

/// Records the new limits in the spec (disk numbers as in [`disk_limits`]; the rootfs has no
/// `Disk` entry, so its limit lives only as long as the VMM).
pub fn apply_to_spec(spec: &mut VmSpec, request: &UpdateRateLimitsRequest) {
    let first = u32::from(!spec.rootfs.is_empty());
    for d in &request.disks {
        let index = d.disk.checked_sub(first).map(|i| i as usize);
        if let Some(disk) = index.and_then(|i| spec.disks.get_mut(i)) {
            disk.rate_limit = d.limit.filter(|l| !is_unlimited(l));
        }
    }
    let network = spec.network.get_or_insert_with(Default::default);
    if let Some(rx) = &request.net_rx {
        network.rx_rate_limit = Some(*rx).filter(|l| !is_unlimited(l));
    }
    if let Some(tx) = &request.net_tx {
        network.tx_rate_limit = Some(*tx).filter(|l| !is_unlimited(l));
    }
}

/// Reports the limits a start gives the VMM (those of `spec`) in `status`.
pub fn set_status_at_start(status: &mut VmStatus, spec: &VmSpec) {
    let first = u32::from(!spec.rootfs.is_empty());
    status.disk_rate_limits = spec
        .disks
        .iter()
        .zip(first..)
        .filter_map(|(disk, n)| {
            let limit = disk.rate_limit.filter(|l| !is_unlimited(l))?;
            Some(DiskRateLimit {
                disk: n,
                limit: Some(limit),
            })
        })
        .collect();
    let network = spec.network.clone().unwrap_or_default();
    let mode_none = network.mode == husk_proto::v1::network::Mode::None as i32;
    let limited = |l: Option<RateLimit>| l.filter(|l| !mode_none && !is_unlimited(l));
    status.net_rx_rate_limit = limited(network.rx_rate_limit);
    status.net_tx_rate_limit = limited(network.tx_rate_limit);
}

/// Reports an applied UpdateRateLimits in `status` (the rootfs's limit included, which the
/// spec cannot hold).
pub fn apply_to_status(status: &mut VmStatus, request: &UpdateRateLimitsRequest) {
    for d in &request.disks {
        status
            .disk_rate_limits
            .retain(|in_force| in_force.disk != d.disk);
        if let Some(limit) = d.limit.filter(|l| !is_unlimited(l)) {
            status.disk_rate_limits.push(DiskRateLimit {
                disk: d.disk,
                limit: Some(limit),
            });
        }
    }
    status.disk_rate_limits.sort_by_key(|d| d.disk);
    if let Some(rx) = &request.net_rx {
        status.net_rx_rate_limit = Some(*rx).filter(|l| !is_unlimited(l));
    }
    if let Some(tx) = &request.net_tx {
        status.net_tx_rate_limit = Some(*tx).filter(|l| !is_unlimited(l));
    }
}

pub fn is_unlimited(limit: &RateLimit) -> bool {
    limit.bandwidth.is_none() && limit.ops.is_none()
}

#[cfg(test)]
mod tests {
    use super::*;
    use husk_proto::v1::{Disk, DiskRateLimit};

    fn bw(rate: u64) -> RateLimit {
        RateLimit {
            bandwidth: Some(TokenBucket { rate, burst: 0 }),
            ops: None,
        }
    }

    fn disk(limit: Option<RateLimit>) -> Disk {
        Disk {
            path: "/d.img".into(),
            read_only: false,
            rate_limit: limit,
            ..Default::default()
        }
    }

    #[test]
    fn the_status_reports_the_limits_of_a_start_and_of_every_update_rootfs_included() {
        let spec = VmSpec {
            rootfs: "/root.ext4".into(),
            disks: vec![disk(None), disk(Some(bw(100)))],
            network: Some(husk_proto::v1::Network {
                mode: husk_proto::v1::network::Mode::Tap as i32,
                rx_rate_limit: Some(bw(7)),
                ..Default::default()
            }),
            ..Default::default()
        };
        let mut status = VmStatus::default();
        set_status_at_start(&mut status, &spec);
        assert_eq!(status.disk_rate_limits.len(), 1);
        assert_eq!(status.disk_rate_limits[0].disk, 2);
        assert_eq!(status.net_rx_rate_limit, Some(bw(7)));
        assert_eq!(status.net_tx_rate_limit, None);
        let request = UpdateRateLimitsRequest {
            vm: "a".into(),
            disks: vec![
                DiskRateLimit {
                    disk: 0,
                    limit: Some(bw(5)),
                },
                DiskRateLimit {
                    disk: 2,
                    limit: Some(RateLimit::default()),
                },
            ],
            net_rx: None,
            net_tx: Some(bw(9)),
        };
        apply_to_status(&mut status, &request);
        let disks: Vec<u32> = status.disk_rate_limits.iter().map(|d| d.disk).collect();
        assert_eq!(disks, [0]);
        assert_eq!(status.net_rx_rate_limit, Some(bw(7)), "left as it was");
        assert_eq!(status.net_tx_rate_limit, Some(bw(9)));
    }

    #[test]
    fn disk_flags_count_the_rootfs_first_and_skip_unlimited_disks() {
        let mut spec = VmSpec {
            rootfs: "/root.ext4".into(),
            disks: vec![disk(None), disk(Some(bw(100)))],
            ..Default::default()
        };
        let flags = disk_limits(&spec);
        assert_eq!(flags.len(), 1);
        assert_eq!(flags[0].to_string(), "2:bw=100");
        spec.rootfs.clear();
        assert_eq!(disk_limits(&spec)[0].disk, 1);
    }

    #[test]
    fn an_update_is_recorded_in_the_spec_and_an_empty_limit_lifts_one() {
        let mut spec = VmSpec {
            disks: vec![disk(Some(bw(100)))],
            ..Default::default()
        };
        let request = UpdateRateLimitsRequest {
            vm: "a".into(),
            disks: vec![DiskRateLimit {
                disk: 0,
                limit: Some(RateLimit::default()),
            }],
            net_rx: Some(bw(5)),
            net_tx: None,
        };
        apply_to_spec(&mut spec, &request);
        assert_eq!(spec.disks[0].rate_limit, None);
        let network = spec.network.unwrap();
        assert_eq!(network.rx_rate_limit, Some(bw(5)));
        assert_eq!(network.tx_rate_limit, None);
        let vmm = to_vmm_request(&request);
        assert_eq!(vmm.disks[0].disk, 0);
        assert_eq!(vmm.net_rx.unwrap().bandwidth.unwrap().rate, 5);
        assert!(vmm.net_tx.is_none(), "left out: unchanged");
    }

    fn update(disks: &[u32], rx: Option<RateLimit>) -> UpdateRateLimitsRequest {
        UpdateRateLimitsRequest {
            vm: "a".into(),
            disks: disks
                .iter()
                .map(|&disk| DiskRateLimit {
                    disk,
                    limit: Some(bw(1)),
                })
                .collect(),
            net_rx: rx,
            net_tx: None,
        }
    }

    #[test]
    fn bad_update_values_are_invalid_argument_naming_the_field() {
        use crate::validate::rate_limit_values;
        let zero = RateLimit {
            bandwidth: None,
            ops: Some(TokenBucket { rate: 0, burst: 9 }),
        };
        let err = rate_limit_values(&update(&[], Some(zero))).unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(
            err.message().contains("net_rx.ops.rate"),
            "{}",
            err.message()
        );
        let err = rate_limit_values(&update(&[], None)).unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(rate_limit_values(&update(&[0], None)).is_ok());
    }

    #[test]
    fn updates_must_name_disks_and_a_network_the_vm_has() {
        use crate::validate::rate_limit_targets;
        let spec = VmSpec {
            rootfs: "/root.ext4".into(),
            disks: vec![disk(None)],
            ..Default::default()
        };
        assert!(rate_limit_targets(&update(&[0, 1], None), &spec).is_ok());
        let err = rate_limit_targets(&update(&[2], None), &spec).unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(err.message().contains("disks[0].disk"), "{}", err.message());
        let err = rate_limit_targets(&update(&[], Some(bw(1))), &spec).unwrap_err();
        assert!(err.message().contains("no network"), "{}", err.message());
        let tap = VmSpec {
            network: Some(husk_proto::v1::Network {
                mode: husk_proto::v1::network::Mode::Tap as i32,
                ..Default::default()
            }),
            ..Default::default()
        };
        assert!(rate_limit_targets(&update(&[], Some(bw(1))), &tap).is_ok());
    }

    #[test]
    fn a_spec_with_a_zero_rate_is_refused_at_create() {
        let root = tempfile::tempdir().unwrap();
        let image = root.path().join("d.img");
        std::fs::write(&image, b"").unwrap();
        let mut limited = disk(Some(RateLimit {
            bandwidth: Some(TokenBucket { rate: 0, burst: 0 }),
            ops: None,
        }));
        limited.path = image.display().to_string();
        let spec = VmSpec {
            disks: vec![limited],
            ..Default::default()
        };
        let (kernel, initrd) = (root.path().join("k"), root.path().join("i"));
        std::fs::write(&kernel, b"k").unwrap();
        std::fs::write(&initrd, b"i").unwrap();
        let defaults = crate::validate::Defaults {
            kernel: &kernel,
            initrd: &initrd,
        };
        let policy = husk_host::policy::PathPolicy::new(&[root.path().to_path_buf()], &[]);
        let err = crate::validate::normalize(spec, &defaults, &policy).unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        // The disk's path is checked first; either way the call is refused before anything.
        assert!(err.message().contains("disks[0]"), "{}", err.message());
    }
}
