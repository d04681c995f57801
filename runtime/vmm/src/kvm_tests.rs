//! Host-KVM tests: tiny hand-assembled guest programs run on the real /dev/kvm (PVM here runs
//! them like hardware KVM). Each checks /dev/kvm first (see `test_utils::kvm_available`).
//!
//! Programs run in the boot states the VMM gives a kernel (64-bit long mode with the identity
//! map, or PVH 32-bit protected mode), so these tests also exercise GDT, page tables and
//! registers from `arch::x86_64::regs`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_mp_state, KVM_MP_STATE_RUNNABLE};
use vm_memory::{Bytes, GuestAddress};

use crate::arch::x86_64::layout::{MIB, PVH_INFO_START};
use crate::arch::x86_64::regs::{setup_boot_vcpu, write_boot_tables, BootEntry};
use crate::builder::{build_base_vm, BaseVmConfig};
use crate::devices::bus::BusDevice;
use crate::stop::{StopReason, StopState};
use crate::test_utils::{require_kvm, SharedBuf};
use crate::vmm::{VmOutcome, Vmm};
use crate::vstate::kvm::open_kvm;

const CODE_ADDR: u64 = 0x10_0000;
const TIMEOUT: Duration = Duration::from_secs(20);

/// `mov al, 0xfe; out 0x64, al; hlt`: the i8042 reset every program ends with.
const RESET: [u8; 5] = [0xb0, 0xfe, 0xe6, 0x64, 0xf4];

fn vmm(vcpus: u8, console: SharedBuf) -> Vmm {
    let kvm = open_kvm().expect("open /dev/kvm");
    build_base_vm(
        kvm,
        BaseVmConfig {
            mem_size: 64 * MIB,
            vcpus,
            console: Box::new(console),
            report_boot_time: false,
            vmm_start: Instant::now(),
        },
    )
    .expect("build VM")
}

/// Loads `code` and puts every vCPU at its start in `entry`'s mode, with rax = vCPU index.
fn load(vmm: &Vmm, code: &[u8], entry: BootEntry) {
    let mem = vmm.vm().memory();
    mem.write_slice(code, GuestAddress(CODE_ADDR)).unwrap();
    write_boot_tables(mem, entry).unwrap();
    for vcpu in vmm.vcpus() {
        setup_boot_vcpu(&vcpu.fd, entry).unwrap();
        let mut regs = vcpu.fd.get_regs().unwrap();
        regs.rax = u64::from(vcpu.index);
        vcpu.fd.set_regs(&regs).unwrap();
        if vcpu.index > 0 {
            // With the in-kernel LAPIC, APs wait for INIT/SIPI; start them directly.
            vcpu.fd
                .set_mp_state(kvm_mp_state {
                    mp_state: KVM_MP_STATE_RUNNABLE,
                })
                .unwrap();
        }
    }
}

fn long_mode() -> BootEntry {
    BootEntry::Linux64 { rip: CODE_ADDR }
}

/// Runs with a watchdog that stops the VM (as an error) after [`TIMEOUT`].
fn run(vmm: Vmm) -> VmOutcome {
    let stop = vmm.stop_state();
    let (done_tx, done_rx) = mpsc::channel::<()>();
    let watchdog = std::thread::spawn(move || {
        if done_rx.recv_timeout(TIMEOUT).is_err() {
            stop.request(StopReason::Error("test timed out".into()));
        }
    });
    let outcome = vmm.run().expect("run VM");
    let _ = done_tx.send(());
    watchdog.join().unwrap();
    outcome
}

#[test]
fn run_loop_serial_output_and_exit_code() {
    require_kvm!();
    let console = SharedBuf::default();
    let vmm = vmm(1, console.clone());
    let mut code = vec![
        0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
        0xb0, b'H', //             mov al, 'H'
        0xee, //                   out dx, al
        0xb0, b'i', //             mov al, 'i'
        0xee, //                   out dx, al
        0x66, 0xba, 0x01, 0x06, // mov dx, 0x601
        0xb0, 42,   //               mov al, 42
        0xee, //                   out dx, al
    ];
    code.extend_from_slice(&RESET);
    load(&vmm, &code, long_mode());
    let out = run(vmm);
    assert_eq!(console.contents(), b"Hi");
    assert_eq!(out.reason, StopReason::GuestReset);
    assert_eq!(out.exit_code, Some(42));
    assert_eq!(out.exit_status(), 42);
}

#[test]
fn unknown_ports_read_all_ones_and_are_counted() {
    require_kvm!();
    let vmm = vmm(1, SharedBuf::default());
    let mut code = vec![
        0x66, 0xba, 0x34, 0x12, // mov dx, 0x1234
        0xec, //                   in al, dx
        0x66, 0xba, 0x01, 0x06, // mov dx, 0x601
        0xee, //                   out dx, al      (exit code = what was read)
        0x66, 0xba, 0x35, 0x12, // mov dx, 0x1235
        0xee, //                   out dx, al      (unclaimed write)
    ];
    code.extend_from_slice(&RESET);
    load(&vmm, &code, long_mode());
    let out = run(vmm);
    assert_eq!(out.exit_code, Some(0xff));
    assert_eq!(out.unhandled_pio, (1, 1));
}

#[test]
fn unmapped_mmio_reads_all_ones_and_writes_are_counted() {
    require_kvm!();
    let vmm = vmm(1, SharedBuf::default());
    let mut code = vec![
        0xbb, 0x00, 0x00, 0x00, 0xd0, // mov ebx, 0xd000_0000  (virtio-mmio window, no RAM)
        0x8b, 0x03, //                   mov eax, [rbx]
        0x66, 0xba, 0x01, 0x06, //       mov dx, 0x601
        0xee, //                         out dx, al
        0x89, 0x43, 0x04, //             mov [rbx + 4], eax
    ];
    code.extend_from_slice(&RESET);
    load(&vmm, &code, long_mode());
    let out = run(vmm);
    assert_eq!(out.reason, StopReason::GuestReset);
    assert_eq!(out.exit_code, Some(0xff));
    assert_eq!(out.unhandled_mmio, (1, 1));
}

#[test]
fn i8042_reset_stops_the_vm_without_exit_code() {
    require_kvm!();
    let vmm = vmm(1, SharedBuf::default());
    load(&vmm, &RESET, long_mode());
    let out = run(vmm);
    assert_eq!(out.reason, StopReason::GuestReset);
    assert_eq!(out.exit_code, None);
    assert_eq!(out.exit_status(), 125);
}

#[test]
fn long_mode_entry_passes_the_zero_page_in_rsi() {
    require_kvm!();
    let vmm = vmm(1, SharedBuf::default());
    let mut code = vec![
        0x48, 0x89, 0xf0, //       mov rax, rsi
        0x48, 0xc1, 0xe8, 0x08, // shr rax, 8
        0x66, 0xba, 0x01, 0x06, // mov dx, 0x601
        0xee, //                   out dx, al      (0x7000 >> 8 = 0x70)
    ];
    code.extend_from_slice(&RESET);
    load(&vmm, &code, long_mode());
    assert_eq!(run(vmm).exit_code, Some(0x70));
}

#[test]
fn pvh_entry_is_protected_mode_with_start_info_in_ebx() {
    require_kvm!();
    let vmm = vmm(1, SharedBuf::default());
    let mut code = vec![
        0x66, 0xba, 0x01, 0x06, // mov dx, 0x601   (32-bit code: 0x66 selects 16-bit)
        0x89, 0xd8, //             mov eax, ebx
        0xc1, 0xe8, 0x08, //       shr eax, 8
        0xee, //                   out dx, al      (0x6000 >> 8 = 0x60)
    ];
    code.extend_from_slice(&RESET);
    let entry = BootEntry::Pvh {
        rip: CODE_ADDR,
        start_info: PVH_INFO_START,
    };
    load(&vmm, &code, entry);
    assert_eq!(run(vmm).exit_code, Some(0x60));
}

/// Records which vCPU thread reported which value; stops the VM once all have reported.
struct Rollcall {
    seen: Vec<(u8, String)>,
    expected: usize,
    stop: Arc<StopState>,
}

impl BusDevice for Rollcall {
    fn read(&mut self, _: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write(&mut self, _: u64, data: &[u8]) {
        let name = std::thread::current().name().unwrap_or("?").to_string();
        self.seen.push((data[0], name));
        if self.seen.len() == self.expected {
            self.stop.request(StopReason::GuestReset);
        }
    }
}

#[test]
fn smp_every_vcpu_runs_on_its_own_thread() {
    require_kvm!();
    let mut vmm = vmm(4, SharedBuf::default());
    let rollcall = Arc::new(Mutex::new(Rollcall {
        seen: Vec::new(),
        expected: 4,
        stop: vmm.stop_state(),
    }));
    vmm.io_bus_mut().insert(rollcall.clone(), 0x700, 1).unwrap();
    let code = [
        0x66, 0xba, 0x00, 0x07, // mov dx, 0x700
        0xee, //                   out dx, al   (al = vCPU index)
        0xfa, //                   cli
        0xf4, //                   hlt          (in-kernel irqchip: sleeps in KVM until kicked)
        0xeb, 0xfd, //             jmp hlt
    ];
    load(&vmm, &code, long_mode());
    let out = run(vmm);
    assert_eq!(out.reason, StopReason::GuestReset);
    let mut seen = rollcall.lock().unwrap().seen.clone();
    seen.sort();
    let expect: Vec<(u8, String)> = (0..4).map(|i| (i, format!("vcpu{i}"))).collect();
    assert_eq!(seen, expect);
}

#[test]
fn stop_request_kicks_spinning_vcpus_out_of_kvm_run() {
    require_kvm!();
    let vmm = vmm(2, SharedBuf::default());
    load(&vmm, &[0xeb, 0xfe], long_mode()); // jmp $  (never exits on its own)
    let stop = vmm.stop_state();
    let requested = Arc::new(AtomicBool::new(false));
    let flag = requested.clone();
    let t = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(200));
        flag.store(true, Ordering::SeqCst);
        stop.request(StopReason::Signal(libc::SIGTERM));
    });
    let started = Instant::now();
    let out = run(vmm);
    t.join().unwrap();
    assert!(requested.load(Ordering::SeqCst));
    assert_eq!(out.reason, StopReason::Signal(libc::SIGTERM));
    assert_eq!(out.exit_status(), 143);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
}
