//! The husk-vmm binary.
fn main() {}
