//! Host-side pieces that every front end of husk needs (`husk run`, huskd, the containerd shim):
//! the VM's network link, where the VMM binary and default guest artifacts are, and the jail
//! VMMs run in when the front end runs as root.

pub mod confined;
pub mod jail;
pub mod net;
pub mod paths;
pub mod policy;
pub mod process;
