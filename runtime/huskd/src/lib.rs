//! huskd's library: the parts that stand alone and that tests and fuzz targets reach directly.
//! The daemon itself is the `huskd` binary (src/main.rs).

pub mod rate_limits;
pub mod validate;
