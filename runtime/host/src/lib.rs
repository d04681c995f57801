//! Host-side pieces that every front end of husk needs (`husk run`, huskd, the containerd shim):
//! the one typed description of a husk-vmm launch (`vmm_args`, which husk-vmm parses too), the
//! VM's network link and its firewall rules (`firewall`), a container's network namespace
//! joined to a VM (`netns`), where the VMM binary and default guest artifacts are, and the jail
//! VMMs run in when the front end runs as root.

pub mod confined;
pub mod disk_image;
pub mod ext4_tree;
pub mod firewall;
pub mod jail;
pub mod net;
pub mod netns;
pub mod oci_image;
pub mod passt;
pub mod paths;
pub mod policy;
pub mod process;
pub mod run_dirs;
pub mod virtiofs;
pub mod vmm_args;
