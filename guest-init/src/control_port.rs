//! The husk control port: how husk-init tells the VMM "init started" and the application's exit
//! code. Plain port I/O (the VMM traps it); needs ioperm, so CONFIG_X86_IOPL_IOPERM in the guest
//! kernel. Under another VMM (QEMU in benchmarks) the writes go nowhere, which is harmless.

use husk_init::{CONTROL_INIT_STARTED, CONTROL_PORT_BOOT, CONTROL_PORT_EXIT_CODE};

/// Access to the two control ports; `None` when the kernel refused ioperm.
pub struct ControlPort {
    _private: (),
}

impl ControlPort {
    /// Asks the kernel for access to the control ports.
    pub fn open() -> std::io::Result<Self> {
        // Both ports, from the one definition the VMM uses too (husk_init's constants).
        let ports = u64::from(CONTROL_PORT_EXIT_CODE - CONTROL_PORT_BOOT) + 1;
        // SAFETY: ioperm only changes this process's I/O permission bitmap.
        let rc = unsafe { libc::ioperm(u64::from(CONTROL_PORT_BOOT), ports, 1) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Self { _private: () })
    }

    /// Reports that PID 1 is running (the VMM's boot timer stops here).
    pub fn report_init_started(&self) {
        outb(CONTROL_PORT_BOOT, CONTROL_INIT_STARTED);
    }

    /// Reports the application's exit code before the VM resets.
    pub fn report_exit_code(&self, code: u8) {
        outb(CONTROL_PORT_EXIT_CODE, code);
    }
}

fn outb(port: u16, value: u8) {
    // SAFETY: ControlPort::open granted access to exactly these ports; `out` has no memory
    // effects in this process.
    unsafe {
        std::arch::asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack))
    };
}
