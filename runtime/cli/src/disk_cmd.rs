//! `husk disk attach VM SLOT PATH[:ro]` and `husk disk detach VM SLOT`: a raw image into (or
//! out of) one of a running VM's disk slots (`husk create --disk-slots N`), through huskd's
//! AttachDisk and DetachDisk.

use clap::{Args, Subcommand};
use husk_proto::v1::husk_client::HuskClient;
use husk_proto::v1::{AttachDiskRequest, DetachDiskRequest};
use tonic::transport::Channel;

use crate::remote::{disk_arg, RemoteError};

/// `husk disk ...`.
#[derive(Debug, Args)]
pub struct DiskArgs {
    #[command(subcommand)]
    pub command: DiskVerb,
}

#[derive(Debug, Subcommand)]
pub enum DiskVerb {
    /// Put a disk image into an empty slot of a running VM (the guest sees the slot's /dev/vdX
    /// grow from 0 to the image's size): raw, or qcow2 for a .qcow2 name (with its backing
    /// chain); :ro makes the guest's writes fail; :cow keeps the image read-only under a
    /// qcow2 overlay of the VM's own, removed at the detach
    Attach {
        #[arg(value_name = "VM")]
        vm: String,
        /// The slot's index among the VM's --disk-slots (0: the first)
        #[arg(value_name = "SLOT")]
        slot: u32,
        #[arg(value_name = "PATH[:ro|:cow]")]
        disk: String,
    },
    /// Empty a slot again (the guest sees size 0)
    Detach {
        #[arg(value_name = "VM")]
        vm: String,
        #[arg(value_name = "SLOT")]
        slot: u32,
    },
}

/// Runs `husk disk ...`; prints the VM's name or id on success.
pub async fn run(client: &mut HuskClient<Channel>, args: &DiskArgs) -> Result<i32, RemoteError> {
    match &args.command {
        DiskVerb::Attach { vm, slot, disk } => {
            client
                .attach_disk(AttachDiskRequest {
                    vm: vm.clone(),
                    slot: *slot,
                    disk: Some(disk_arg(disk)),
                })
                .await?;
            println!("{vm}");
        }
        DiskVerb::Detach { vm, slot } => {
            client
                .detach_disk(DetachDiskRequest {
                    vm: vm.clone(),
                    slot: *slot,
                })
                .await?;
            println!("{vm}");
        }
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::opts::{Cli, Verb};
    use clap::Parser;

    fn parse(args: &[&str]) -> DiskVerb {
        let argv = ["husk", "disk"].iter().chain(args).copied();
        match Cli::try_parse_from(argv).unwrap().command {
            Verb::Disk(d) => d.command,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn attach_and_detach_name_the_vm_the_slot_and_the_image() {
        match parse(&["attach", "web", "1", "/img/data.raw:ro"]) {
            DiskVerb::Attach { vm, slot, disk } => {
                assert_eq!((vm.as_str(), slot), ("web", 1));
                let d = disk_arg(&disk);
                assert_eq!((d.path.as_str(), d.read_only), ("/img/data.raw", true));
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            parse(&["detach", "web", "0"]),
            DiskVerb::Detach { slot: 0, .. }
        ));
        let argv = ["husk", "disk", "attach", "web", "x", "/a"];
        assert!(Cli::try_parse_from(argv).is_err(), "a slot is a number");
    }
}
