//! Virtio devices in a snapshot: their backend identity (disk path, tap, vsock CID and socket)
//! and the overrides a restore may apply. Each transport saves and restores its own state
//! (`husk_devices::virtio::mmio::persist`).

use std::path::PathBuf;

use super::state::{
    Backend, BalloonBackend, DeviceBackend, DiskBackend, DiskSlotBackend, NetBackend, RngBackend,
    VsockBackend,
};
use crate::config::{DiskConfig, NetConfig, TapSource, VsockConfig, MIN_MTU};

/// A virtio device to create: the same list drives a fresh boot and a restore.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeviceSpec {
    /// virtio-blk.
    Disk(DiskConfig),
    /// virtio-blk without a medium, filled at run time (`--disk-slots`).
    DiskSlot,
    /// virtio-net.
    Net(NetConfig),
    /// virtio-vsock.
    Vsock(VsockConfig),
    /// virtio-rng.
    Rng,
    /// virtio-balloon.
    Balloon(crate::config::BalloonConfig),
    /// virtio-fs (a shared host directory): never in a snapshot, see [`backend_of`].
    Fs(crate::config::FsConfig),
}

/// What a restore changes in the snapshot's devices, so that clones of one snapshot each get
/// their own identity.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RestoreOverrides {
    /// Replaces the vsock device's CID and host socket.
    pub vsock: Option<VsockConfig>,
    /// Replaces the net device's tap and MAC.
    pub net: Option<NetConfig>,
    /// Replaces the disks, in order (empty: keep them; otherwise one per disk).
    pub disks: Vec<DiskConfig>,
}

/// Why a snapshot's devices cannot be rebuilt.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DeviceStateError {
    /// A device without a known backend.
    #[error("device {0} has no backend in the snapshot")]
    NoBackend(String),
    /// An override for a device the snapshot does not have.
    #[error("the snapshot has no {0} device to override")]
    NothingToOverride(&'static str),
    /// Disk overrides must replace every disk.
    #[error("the snapshot has {snapshot} disks but {given} disk overrides were given")]
    DiskCount {
        /// Disks in the snapshot.
        snapshot: usize,
        /// Overrides.
        given: usize,
    },
    /// A damaged MAC.
    #[error("device {0} has an invalid MAC address")]
    Mac(String),
}

/// The backend identity of `spec`, as recorded in a snapshot.
pub fn backend_of(spec: &DeviceSpec) -> DeviceBackend {
    let backend = match spec {
        DeviceSpec::Disk(d) => Backend::Disk(DiskBackend {
            path: d.path.display().to_string(),
            read_only: d.read_only,
            format: d.format.to_string(),
            backing: d
                .backing
                .iter()
                .map(|(p, f)| format!("{f}:{}", p.display()))
                .collect(),
        }),
        DeviceSpec::Net(n) => Backend::Net(NetBackend {
            tap: match &n.tap {
                TapSource::Name(name) | TapSource::Fd(_, name) => name.clone(),
                // A stream to passt cannot be reopened by name: a restore needs a --net.
                TapSource::Stream(_) => String::new(),
            },
            mac: n.mac.to_vec(),
            mtu: n.mtu.map_or(0, u32::from),
        }),
        DeviceSpec::Vsock(v) => Backend::Vsock(VsockBackend {
            cid: v.cid,
            uds_path: v.uds_path.display().to_string(),
        }),
        DeviceSpec::Rng => Backend::Rng(RngBackend {}),
        DeviceSpec::Balloon(b) => Backend::Balloon(BalloonBackend {
            stats: b.stats,
            reporting: b.reporting,
            deflate_on_oom: b.deflate_on_oom,
        }),
        DeviceSpec::DiskSlot => Backend::DiskSlot(DiskSlotBackend {}),
        // A shared directory has no backend a snapshot could record: the files virtiofsd
        // holds open for the guest and the FUSE session cannot be saved. `snapshot::save`
        // refuses a VM with such a device.
        DeviceSpec::Fs(_) => return DeviceBackend { backend: None },
    };
    DeviceBackend {
        backend: Some(backend),
    }
}

/// The devices to create for a restore: the snapshot's, with `overrides` applied. A tap given
/// by fd at boot is reopened by name unless the override hands over a new one.
pub fn specs_for_restore(
    saved: &[(String, Option<DeviceBackend>)],
    overrides: &RestoreOverrides,
) -> Result<Vec<DeviceSpec>, DeviceStateError> {
    let disk_count = saved
        .iter()
        .filter(|(_, b)| {
            matches!(
                b.as_ref().and_then(|b| b.backend.as_ref()),
                Some(Backend::Disk(_))
            )
        })
        .count();
    if !overrides.disks.is_empty() && overrides.disks.len() != disk_count {
        return Err(DeviceStateError::DiskCount {
            snapshot: disk_count,
            given: overrides.disks.len(),
        });
    }
    let (mut disk_index, mut had_net, mut had_vsock) = (0, false, false);
    let mut specs = Vec::with_capacity(saved.len());
    for (name, backend) in saved {
        let backend = backend
            .as_ref()
            .and_then(|b| b.backend.as_ref())
            .ok_or_else(|| DeviceStateError::NoBackend(name.clone()))?;
        specs.push(match backend {
            Backend::Disk(d) => {
                let spec = overrides
                    .disks
                    .get(disk_index)
                    .cloned()
                    .unwrap_or_else(|| DiskConfig {
                        path: PathBuf::from(&d.path),
                        read_only: d.read_only,
                        format: d.format.parse().unwrap_or_default(),
                        backing: d
                            .backing
                            .iter()
                            .filter_map(|b| {
                                let (f, p) = b.split_once(':')?;
                                Some((PathBuf::from(p), f.parse().ok()?))
                            })
                            .collect(),
                    });
                disk_index += 1;
                DeviceSpec::Disk(spec)
            }
            Backend::Net(n) => {
                had_net = true;
                match &overrides.net {
                    Some(net) => DeviceSpec::Net(net.clone()),
                    None => DeviceSpec::Net(NetConfig {
                        tap: TapSource::Name(n.tap.clone()),
                        mac: <[u8; 6]>::try_from(n.mac.as_slice())
                            .map_err(|_| DeviceStateError::Mac(name.clone()))?,
                        mtu: u16::try_from(n.mtu).ok().filter(|m| *m >= MIN_MTU),
                    }),
                }
            }
            Backend::Vsock(v) => {
                had_vsock = true;
                DeviceSpec::Vsock(overrides.vsock.clone().unwrap_or(VsockConfig {
                    cid: v.cid,
                    uds_path: PathBuf::from(&v.uds_path),
                }))
            }
            Backend::Rng(_) => DeviceSpec::Rng,
            Backend::DiskSlot(_) => DeviceSpec::DiskSlot,
            Backend::Balloon(b) => DeviceSpec::Balloon(crate::config::BalloonConfig {
                stats: b.stats,
                reporting: b.reporting,
                deflate_on_oom: b.deflate_on_oom,
            }),
        });
    }
    if overrides.net.is_some() && !had_net {
        return Err(DeviceStateError::NothingToOverride("net"));
    }
    if overrides.vsock.is_some() && !had_vsock {
        return Err(DeviceStateError::NothingToOverride("vsock"));
    }
    Ok(specs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn saved(specs: &[DeviceSpec]) -> Vec<(String, Option<DeviceBackend>)> {
        specs
            .iter()
            .enumerate()
            .map(|(i, s)| (format!("dev{i}"), Some(backend_of(s))))
            .collect()
    }

    fn boot_specs() -> Vec<DeviceSpec> {
        vec![
            DeviceSpec::Disk(DiskConfig::raw("/img/root.ext4", false)),
            DeviceSpec::Net(NetConfig {
                tap: TapSource::Fd(5, "husk7".into()),
                mac: [6, 0, 0, 0, 0, 7],
                mtu: Some(1400),
            }),
            DeviceSpec::Vsock(VsockConfig {
                cid: 3,
                uds_path: "/run/a.vsock".into(),
            }),
            DeviceSpec::Rng,
            DeviceSpec::Balloon(crate::config::BalloonConfig {
                stats: true,
                reporting: false,
                deflate_on_oom: true,
            }),
        ]
    }

    #[test]
    fn without_overrides_the_snapshot_devices_come_back() {
        let specs = specs_for_restore(&saved(&boot_specs()), &RestoreOverrides::default()).unwrap();
        let mut expect = boot_specs();
        // A tap handed over by fd is reopened by its name.
        expect[1] = DeviceSpec::Net(NetConfig {
            tap: TapSource::Name("husk7".into()),
            mac: [6, 0, 0, 0, 0, 7],
            mtu: Some(1400),
        });
        assert_eq!(specs, expect);
    }

    #[test]
    fn overrides_replace_identities_and_must_fit() {
        let vsock = VsockConfig {
            cid: 42,
            uds_path: "/run/clone.vsock".into(),
        };
        let net = NetConfig {
            tap: TapSource::Name("clone0".into()),
            mac: [6, 0, 0, 0, 0, 42],
            mtu: None,
        };
        let disk = DiskConfig::raw("/img/clone.ext4", true);
        let o = RestoreOverrides {
            vsock: Some(vsock.clone()),
            net: Some(net.clone()),
            disks: vec![disk.clone()],
        };
        let specs = specs_for_restore(&saved(&boot_specs()), &o).unwrap();
        assert_eq!(
            specs,
            vec![
                DeviceSpec::Disk(disk.clone()),
                DeviceSpec::Net(net),
                DeviceSpec::Vsock(vsock.clone()),
                DeviceSpec::Rng,
                boot_specs()[4].clone(),
            ]
        );
        let two_disks = RestoreOverrides {
            disks: vec![disk.clone(), disk],
            ..Default::default()
        };
        assert!(matches!(
            specs_for_restore(&saved(&boot_specs()), &two_disks),
            Err(DeviceStateError::DiskCount {
                snapshot: 1,
                given: 2
            })
        ));
        let vsock_only = RestoreOverrides {
            vsock: Some(vsock),
            ..Default::default()
        };
        assert_eq!(
            specs_for_restore(&saved(&[DeviceSpec::Rng]), &vsock_only),
            Err(DeviceStateError::NothingToOverride("vsock"))
        );
        assert!(specs_for_restore(&[("x".into(), None)], &RestoreOverrides::default()).is_err());
    }
}
