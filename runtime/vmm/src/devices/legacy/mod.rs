//! PC legacy devices: serial console, i8042 (reset line), husk control port.

pub mod console_file;
pub mod control_port;
pub mod i8042;
pub mod serial;
