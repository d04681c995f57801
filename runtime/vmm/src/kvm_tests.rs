//! Host-KVM tests: tiny hand-assembled guest programs run on the real /dev/kvm (PVM here runs
//! them like hardware KVM). Each checks /dev/kvm first (see `test_utils::kvm_available`).
//!
//! Programs run in the boot states the VMM gives a kernel (64-bit long mode with the identity
//! map, or PVH 32-bit protected mode), so these tests also exercise GDT, page tables and
//! registers from `arch::x86_64::regs`.

use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use husk_proto::frame;
use husk_proto::vmm::{info, vmm_request, vmm_response, VmmRequest, VmmResponse};
use kvm_bindings::{kvm_mp_state, KVM_MP_STATE_RUNNABLE};
use vm_memory::{Bytes, GuestAddress};

use crate::api::socket::ApiSocket;
use crate::arch::x86_64::layout::{
    GIB, MIB, MMIO_GAP_END, MMIO_GAP_START, PDPTE_START, PVH_INFO_START,
};
use crate::arch::x86_64::regs::{setup_boot_vcpu, write_boot_tables, BootEntry};
use crate::builder::{build_base_vm, BaseVmConfig};
use crate::config::MAX_VCPUS;
use crate::devices::bus::BusDevice;
use crate::stop::{StopReason, StopState};
use crate::test_utils::{require_kvm, ScratchDir, SharedBuf};
use crate::vmm::{VmOutcome, Vmm};
use crate::vstate::kvm::open_kvm;

const CODE_ADDR: u64 = 0x10_0000;
const TIMEOUT: Duration = Duration::from_secs(20);

/// `mov al, 0xfe; out 0x64, al; hlt`: the i8042 reset every program ends with.
const RESET: [u8; 5] = [0xb0, 0xfe, 0xe6, 0x64, 0xf4];

fn vmm(vcpus: u8, console: SharedBuf) -> Vmm {
    vmm_with_memory(vcpus, 64 * MIB, console)
}

fn vmm_with_memory(vcpus: u8, mem_size: u64, console: SharedBuf) -> Vmm {
    let kvm = open_kvm().expect("open /dev/kvm");
    build_base_vm(
        kvm,
        BaseVmConfig {
            mem_size,
            vcpus,
            console: Box::new(console),
            report_boot_time: false,
            vmm_start: Instant::now(),
            shared_memory: false,
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
    run_with_api(vmm, None)
}

/// [`run`], serving the control socket `api`.
fn run_with_api(vmm: Vmm, api: Option<ApiSocket>) -> VmOutcome {
    let stop = vmm.stop_state();
    let (done_tx, done_rx) = mpsc::channel::<()>();
    let watchdog = std::thread::spawn(move || {
        if done_rx.recv_timeout(TIMEOUT).is_err() {
            stop.request(StopReason::Error("test timed out".into()));
        }
    });
    let outcome = vmm.run_with_api(api).expect("run VM");
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
    smp_rollcall(4);
}

#[test]
fn smp_the_largest_vm_runs_all_32_vcpus() {
    smp_rollcall(MAX_VCPUS);
}

/// Every one of `vcpus` vCPUs reports its index from its own thread, named after it.
fn smp_rollcall(vcpus: u8) {
    require_kvm!();
    let mut vmm = vmm(vcpus, SharedBuf::default());
    let rollcall = Arc::new(Mutex::new(Rollcall {
        seen: Vec::new(),
        expected: usize::from(vcpus),
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
    let expect: Vec<(u8, String)> = (0..vcpus).map(|i| (i, format!("vcpu{i}"))).collect();
    assert_eq!(seen, expect);
}

#[test]
fn a_16_gib_guest_reaches_its_last_byte_above_the_mmio_gap() {
    require_kvm!();
    // 16 GiB of RAM: 3 GiB below the MMIO gap, the other 13 GiB from 4 GiB up to 17 GiB.
    let mem_size = 16 * GIB;
    let top = mem_size + (MMIO_GAP_END - MMIO_GAP_START);
    let vmm = vmm_with_memory(1, mem_size, SharedBuf::default());
    let last = top - 8;
    let mut code = vec![0x48, 0xbb]; //        mov rbx, imm64 (the last 8 bytes of RAM)
    code.extend_from_slice(&last.to_le_bytes());
    code.extend_from_slice(&[
        0xc6, 0x03, 0x5a, //       mov byte [rbx], 0x5a
        0x8a, 0x03, //             mov al, [rbx]
        0x66, 0xba, 0x01, 0x06, // mov dx, 0x601
        0xee, //                   out dx, al      (exit code = what was read back)
    ]);
    code.extend_from_slice(&RESET);
    load(&vmm, &code, long_mode());
    // The boot identity map covers 4 GiB; map the GiB holding `last` with 2 MiB pages.
    let mem = vmm.vm().memory();
    let (gib, pd) = (last / GIB, 0x3_0000u64);
    mem.write_obj(pd | 0x3, GuestAddress(PDPTE_START + gib * 8))
        .unwrap();
    for i in 0..512u64 {
        mem.write_obj((gib * GIB + i * 2 * MIB) | 0x83, GuestAddress(pd + i * 8))
            .unwrap();
    }
    let check = vmm.vm().memory().clone();
    let out = run(vmm);
    assert_eq!(out.reason, StopReason::GuestReset);
    assert_eq!(out.exit_code, Some(0x5a));
    assert_eq!(check.read_obj::<u8>(GuestAddress(last)).unwrap(), 0x5a);
    assert!(
        check.read_obj::<u8>(GuestAddress(top)).is_err(),
        "RAM ends at {top:#x}"
    );
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

/// One request and its response over the control socket.
fn call(stream: &mut UnixStream, msg: vmm_request::Msg) -> Result<info::State, String> {
    frame::write(stream, &VmmRequest { msg: Some(msg) }).unwrap();
    match frame::read::<VmmResponse, _>(stream)
        .unwrap()
        .and_then(|r| r.msg)
    {
        Some(vmm_response::Msg::Info(i)) => Ok(i.state()),
        Some(vmm_response::Msg::Error(e)) => Err(e),
        Some(other) => panic!("unexpected response {other:?}"),
        None => panic!("no response"),
    }
}

/// Waits until `done` holds, failing the test after [`TIMEOUT`].
fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + TIMEOUT;
    while !done() {
        assert!(Instant::now() < deadline, "timed out: {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn pause_freezes_every_vcpu_resume_continues_and_stop_ends_a_paused_vm() {
    use vmm_request::Msg::{Describe, Pause, Resume, Stop};
    require_kvm!();
    const COUNTERS: u64 = 0x20_0000;
    let vmm = vmm(2, SharedBuf::default());
    let code = [
        0xbb, 0x00, 0x00, 0x20, 0x00, // mov ebx, 0x200000
        0x48, 0xff, 0x04, 0xc3, //       inc qword [rbx + rax*8]   (rax = vCPU index)
        0xeb, 0xfa, //                   jmp inc
    ];
    load(&vmm, &code, long_mode());
    let mem = vmm.vm().memory().clone();
    let counters = move || -> [u64; 2] {
        [0, 1].map(|i| mem.read_obj(GuestAddress(COUNTERS + 8 * i)).unwrap())
    };
    let dir = ScratchDir::new("kvm-pause");
    let path = dir.path().join("api.sock");
    let socket = ApiSocket::bind(&path).unwrap();
    let vm_thread = std::thread::spawn(move || run_with_api(vmm, Some(socket)));
    wait_until("both vCPUs count", || counters().iter().all(|&c| c > 0));

    let mut client = UnixStream::connect(&path).unwrap();
    client.set_read_timeout(Some(TIMEOUT)).unwrap();
    assert_eq!(
        call(&mut client, Describe(Default::default())),
        Ok(info::State::Running)
    );
    let e = call(&mut client, Resume(Default::default())).unwrap_err();
    assert!(e.contains("not paused"), "{e}");

    let (mut pause_us, mut resume_us, mut running_again_us) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..5 {
        let t = Instant::now();
        assert_eq!(
            call(&mut client, Pause(Default::default())),
            Ok(info::State::Paused)
        );
        pause_us.push(t.elapsed().as_micros());
        let frozen = counters();
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(counters(), frozen, "a vCPU ran while paused");
        let e = call(&mut client, Pause(Default::default())).unwrap_err();
        assert!(e.contains("already paused"), "{e}");
        assert_eq!(
            call(&mut client, Describe(Default::default())),
            Ok(info::State::Paused)
        );

        let t = Instant::now();
        assert_eq!(
            call(&mut client, Resume(Default::default())),
            Ok(info::State::Running)
        );
        resume_us.push(t.elapsed().as_micros());
        wait_until("every vCPU counts again", || {
            counters().iter().zip(frozen).all(|(&now, then)| now > then)
        });
        running_again_us.push(t.elapsed().as_micros());
    }
    eprintln!(
        "pause round trip (us): {pause_us:?}; resume round trip (us): {resume_us:?}; \
         resume sent to every vCPU counting (us): {running_again_us:?}"
    );

    assert_eq!(
        call(&mut client, Pause(Default::default())),
        Ok(info::State::Paused)
    );
    assert_eq!(
        call(&mut client, Stop(Default::default())),
        Ok(info::State::Stopping)
    );
    let out = vm_thread.join().unwrap();
    assert_eq!(out.reason, StopReason::Requested);
    assert_eq!(out.exit_status(), 143);
    assert!(!path.exists(), "the control socket was not removed");
}

/// Runs `vmm` with every thread under its seccomp filter (kill mode) on a thread of its own,
/// serving `api`. The main filter allows no thread exit, so that thread parks for good after
/// handing over the outcome (a test-only leak); a missing syscall kills the test process.
fn run_filtered(mut vmm: Vmm, api: Option<ApiSocket>) -> mpsc::Receiver<VmOutcome> {
    use crate::seccomp::{Filters, Mode};
    vmm.set_seccomp(Filters::new(Mode::Kill).expect("compile filters"));
    let stop = vmm.stop_state();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        if let Ok(outcome) = vmm.run_with_api(api) {
            let _ = tx.send(outcome);
        }
        loop {
            std::thread::park();
        }
    });
    let (done_tx, done_rx) = mpsc::channel::<()>();
    std::thread::spawn(move || {
        if done_rx.recv_timeout(TIMEOUT).is_err() {
            stop.request(StopReason::Error("test timed out".into()));
        }
    });
    let (out_tx, out_rx) = mpsc::channel();
    std::thread::spawn(move || {
        if let Ok(outcome) = rx.recv() {
            let _ = done_tx.send(());
            let _ = out_tx.send(outcome);
        }
    });
    out_rx
}

#[test]
fn a_guest_runs_to_its_exit_code_with_every_thread_under_its_filter() {
    require_kvm!();
    let console = SharedBuf::default();
    let vmm = vmm(2, console.clone());
    let mut code = vec![
        0x48, 0x85, 0xc0, //       test rax, rax  (only vCPU 0 goes on; the others halt)
        0x74, 0x02, //             jz +2
        0xfa, 0xf4, //             cli; hlt
        0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
        0xb0, b'o', //             mov al, 'o'
        0xee, //                   out dx, al
        0xb0, b'k', //             mov al, 'k'
        0xee, //                   out dx, al
        0x66, 0xba, 0x01, 0x06, // mov dx, 0x601
        0xb0, 7,    //                mov al, 7
        0xee, //                   out dx, al
    ];
    code.extend_from_slice(&RESET);
    load(&vmm, &code, long_mode());
    let out = run_filtered(vmm, None).recv_timeout(TIMEOUT * 2).unwrap();
    assert_eq!(console.contents(), b"ok");
    assert_eq!(
        (out.reason, out.exit_code),
        (StopReason::GuestReset, Some(7))
    );
}

#[test]
fn the_control_socket_pauses_resumes_and_stops_a_filtered_vm() {
    use vmm_request::Msg::{Describe, Pause, Resume, Stop};
    require_kvm!();
    let vmm = vmm(2, SharedBuf::default());
    load(&vmm, &[0xeb, 0xfe], long_mode()); // jmp $
    let dir = ScratchDir::new("kvm-seccomp-api");
    let path = dir.path().join("api.sock");
    let socket = ApiSocket::bind(&path).unwrap();
    let outcome = run_filtered(vmm, Some(socket));
    let mut client = UnixStream::connect(&path).unwrap();
    client.set_read_timeout(Some(TIMEOUT)).unwrap();
    let describe = || Describe(Default::default());
    assert_eq!(call(&mut client, describe()), Ok(info::State::Running));
    assert_eq!(
        call(&mut client, Pause(Default::default())),
        Ok(info::State::Paused)
    );
    assert_eq!(
        call(&mut client, Resume(Default::default())),
        Ok(info::State::Running)
    );
    assert_eq!(
        call(&mut client, Stop(Default::default())),
        Ok(info::State::Stopping)
    );
    let out = outcome.recv_timeout(TIMEOUT * 2).unwrap();
    assert_eq!(out.reason, StopReason::Requested);
    assert!(!path.exists(), "the control socket was not removed");
}
