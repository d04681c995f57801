//! Host-side pieces that every front end of husk needs (`husk run`, huskd, the containerd shim):
//! the VM's network link and where the VMM binary and default guest artifacts are.

pub mod net;
pub mod paths;
pub mod process;
