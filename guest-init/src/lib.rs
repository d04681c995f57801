//! The contract between the host and husk-init.
//!
//! The host (the `husk` CLI, later huskd) tells the guest which application to run through one
//! kernel command-line parameter, `husk.spec=`, that [`spec::BootSpec`] encodes and husk-init
//! decodes. Keeping both sides in this one small library means they cannot drift apart.
pub mod hostname;
pub mod page_reporting;
pub mod pod;
pub mod procfs;
pub mod shares;
pub mod spec;

/// I/O port the guest init writes [`CONTROL_INIT_STARTED`] to when it starts (boot timer).
pub const CONTROL_PORT_BOOT: u16 = 0x600;
/// Value written to [`CONTROL_PORT_BOOT`] once PID 1 runs.
pub const CONTROL_INIT_STARTED: u8 = 0x01;
/// I/O port the guest init writes the application's exit code (one byte) to before reset.
pub const CONTROL_PORT_EXIT_CODE: u16 = 0x601;
