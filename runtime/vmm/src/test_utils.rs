//! Test helpers: the /dev/kvm availability gate and a capturing console sink.

use std::io::{self, Write};
use std::sync::{Arc, Mutex};

/// Whether host-KVM tests can run. Without /dev/kvm: fails the test when `HUSK_REQUIRE_KVM=1`,
/// otherwise prints a loud SKIPPED line and returns false.
pub fn kvm_available(test: &str) -> bool {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => true,
        Err(e) => {
            assert!(
                std::env::var("HUSK_REQUIRE_KVM").as_deref() != Ok("1"),
                "{test}: HUSK_REQUIRE_KVM=1 but /dev/kvm cannot be opened: {e}"
            );
            eprintln!("SKIPPED: /dev/kvm not available ({test}: {e})");
            false
        }
    }
}

/// Returns early from a test when KVM is unavailable (see [`kvm_available`]).
macro_rules! require_kvm {
    () => {
        if !$crate::test_utils::kvm_available(module_path!()) {
            return;
        }
    };
}
pub(crate) use require_kvm;

/// A console sink whose bytes the test can read back.
#[derive(Clone, Default)]
pub struct SharedBuf(pub Arc<Mutex<Vec<u8>>>);

impl SharedBuf {
    /// Everything written so far.
    pub fn contents(&self) -> Vec<u8> {
        self.0.lock().map(|b| b.clone()).unwrap_or_default()
    }
}

impl Write for SharedBuf {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        if let Ok(mut v) = self.0.lock() {
            v.extend_from_slice(b);
        }
        Ok(b.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A fresh directory under the system temp dir, removed when dropped.
pub struct ScratchDir(std::path::PathBuf);

impl ScratchDir {
    /// A new empty directory whose name starts with `name`.
    pub fn new(name: &str) -> Self {
        use std::sync::atomic::{AtomicU32, Ordering};
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let dir = std::env::temp_dir().join(format!("husk-{name}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        if let Err(e) = std::fs::create_dir_all(&dir) {
            panic!("cannot create {}: {e}", dir.display());
        }
        ScratchDir(dir)
    }

    /// Its path.
    pub fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A VmOutcome with only a stop reason and an exit code (exit-status and report tests).
pub fn outcome(reason: crate::stop::StopReason, exit_code: Option<u8>) -> crate::vmm::VmOutcome {
    crate::vmm::VmOutcome {
        reason,
        exit_code,
        init_time_us: None,
        unhandled_pio: (0, 0),
        unhandled_mmio: (0, 0),
        device_counters: Vec::new(),
    }
}
