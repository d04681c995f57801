//! husk's wire formats, generated from the .proto files in this crate.
//!
//! - [`v1`]: the public gRPC API of huskd (`husk.v1`); client and server with feature `grpc`.
//! - [`agent`]: the guest agent protocol (`husk.agent.v1`), framed with [`frame`] over vsock.
//! - `client` (feature `grpc`): connecting to huskd over `unix://` or `http://`.
//! - [`vmm`]: the control protocol of one husk-vmm process (`husk.vmm.v1`), framed with
//!   [`frame`] over a Unix socket.

/// The public API, package `husk.v1`.
pub mod v1 {
    #![allow(clippy::all, missing_docs)]
    include!(concat!(env!("OUT_DIR"), "/husk.v1.rs"));
}

/// The guest agent protocol, package `husk.agent.v1`.
pub mod agent {
    #![allow(clippy::all, missing_docs)]
    include!(concat!(env!("OUT_DIR"), "/husk.agent.v1.rs"));

    /// The vsock port the guest agent listens on.
    pub const AGENT_PORT: u32 = 1024;
    /// The protocol version of this crate's agent.proto.
    pub const PROTOCOL_VERSION: u32 = 1;
}

/// The VMM control protocol, package `husk.vmm.v1`.
pub mod vmm {
    #![allow(clippy::all, missing_docs)]
    include!(concat!(env!("OUT_DIR"), "/husk.vmm.v1.rs"));
}

/// The encoded `FileDescriptorSet` of every package, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/husk_descriptor.bin"));

pub mod frame;

#[cfg(feature = "grpc")]
pub mod client;
