//! husk-vmm: the virtual machine monitor behind every husk micro-VM (one process per VM).
//!
//! [`builder`] turns a [`config::VmConfig`] into a [`vmm::Vmm`]; [`vmm::Vmm::run`] runs it to
//! the end and says how it ended, optionally serving the control socket ([`api`]) meanwhile;
//! [`exit_report`] writes that outcome for a supervisor.

pub mod api;
pub mod arch;
pub mod builder;
pub mod config;
pub mod devices;
pub mod diag;
pub mod event_loop;
pub mod exit_report;
pub mod loader;
pub mod pause;
pub mod seccomp;
pub mod signals;
pub mod snapshot;
pub mod stop;
pub mod vmm;
pub mod vstate;

#[cfg(test)]
mod kvm_tests;
#[cfg(test)]
mod test_utils;
