//! Host-KVM tests of snapshot and restore with a purpose-built guest program: every vCPU
//! counts in a register and stores the count in guest memory. A restored vCPU must go on
//! counting from the snapshot's value (register state kept), memory must hold what it held,
//! and a restored-then-resnapshotted vCPU must report exactly the state it was saved with.

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use husk_proto::frame;
use husk_proto::vmm::{
    info, vmm_request, vmm_response, Describe, Pause, Resume, Snapshot, SnapshotDone, Stop,
    VmmRequest, VmmResponse,
};
use kvm_bindings::{kvm_mp_state, kvm_regs, kvm_sregs, KVM_MP_STATE_RUNNABLE};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::state::{pod_from, SnapshotState, VcpuState};
use crate::api::socket::ApiSocket;
use crate::arch::x86_64::layout::MIB;
use crate::arch::x86_64::regs::{setup_boot_vcpu, write_boot_tables, BootEntry};
use crate::builder::{build_base_vm, restore_vm, BaseVmConfig};
use crate::stop::StopReason;
use crate::test_utils::{require_kvm, ScratchDir, SharedBuf};
use crate::vmm::{VmOutcome, Vmm};
use crate::vstate::kvm::open_kvm;

const CODE_ADDR: u64 = 0x10_0000;
const COUNTERS: u64 = 0x20_0000;
const SENTINEL_ADDR: u64 = 0x30_0000;
const SENTINEL: u64 = 0x5e47_1e1a_cafe_f00d;
const SEED: u64 = 0x5eed_0000_0000_0000;
const TIMEOUT: Duration = Duration::from_secs(20);

/// `rbx = COUNTERS; loop { rcx += 1; [rbx + rax*8] = rcx }` (rax = vCPU index, rcx = seed).
const COUNT: [u8; 14] = [
    0xbb, 0x00, 0x00, 0x20, 0x00, // mov ebx, 0x200000
    0x48, 0xff, 0xc1, //             inc rcx
    0x48, 0x89, 0x0c, 0xc3, //       mov [rbx + rax*8], rcx
    0xeb, 0xf7, //                   jmp inc
];

fn seed(index: u8) -> u64 {
    SEED + (u64::from(index) << 32)
}

fn counting_vm(vcpus: u8, mem_mib: u64) -> Vmm {
    let vmm = build_base_vm(
        open_kvm().expect("open /dev/kvm"),
        BaseVmConfig {
            mem_size: mem_mib * MIB,
            vcpus,
            console: Box::new(SharedBuf::default()),
            report_boot_time: false,
            vmm_start: Instant::now(),
            shared_memory: false,
        },
    )
    .expect("build VM");
    let mem = vmm.vm().memory();
    let entry = BootEntry::Linux64 { rip: CODE_ADDR };
    mem.write_slice(&COUNT, GuestAddress(CODE_ADDR)).unwrap();
    mem.write_obj(SENTINEL, GuestAddress(SENTINEL_ADDR))
        .unwrap();
    write_boot_tables(mem, entry).unwrap();
    for vcpu in vmm.vcpus() {
        setup_boot_vcpu(&vcpu.fd, entry).unwrap();
        let mut regs = vcpu.fd.get_regs().unwrap();
        regs.rax = u64::from(vcpu.index);
        regs.rcx = seed(vcpu.index);
        regs.r15 = 0xf15 + u64::from(vcpu.index);
        vcpu.fd.set_regs(&regs).unwrap();
        if vcpu.index > 0 {
            vcpu.fd
                .set_mp_state(kvm_mp_state {
                    mp_state: KVM_MP_STATE_RUNNABLE,
                })
                .unwrap();
        }
    }
    vmm
}

fn counters(mem: &GuestMemoryMmap, n: u64) -> Vec<u64> {
    (0..n)
        .map(|i| mem.read_obj(GuestAddress(COUNTERS + 8 * i)).unwrap())
        .collect()
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + TIMEOUT;
    while !done() {
        assert!(Instant::now() < deadline, "timed out: {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// A VM running on its own thread with its control socket.
struct Running {
    client: UnixStream,
    thread: std::thread::JoinHandle<VmOutcome>,
    mem: GuestMemoryMmap,
}

fn start(vmm: Vmm, dir: &Path, name: &str) -> Running {
    let mem = vmm.vm().memory().clone();
    let path = dir.join(format!("{name}.sock"));
    let socket = ApiSocket::bind(&path).unwrap();
    let stop = vmm.stop_state();
    let thread = std::thread::spawn(move || {
        let (done_tx, done_rx) = mpsc::channel::<()>();
        let watchdog = std::thread::spawn(move || {
            if done_rx.recv_timeout(TIMEOUT * 3).is_err() {
                stop.request(StopReason::Error("test timed out".into()));
            }
        });
        let out = vmm.run_with_api(Some(socket)).expect("run VM");
        let _ = done_tx.send(());
        watchdog.join().unwrap();
        out
    });
    let client = UnixStream::connect(&path).unwrap();
    client.set_read_timeout(Some(TIMEOUT)).unwrap();
    Running {
        client,
        thread,
        mem,
    }
}

fn call(stream: &mut UnixStream, msg: vmm_request::Msg) -> Result<vmm_response::Msg, String> {
    frame::write(stream, &VmmRequest { msg: Some(msg) }).unwrap();
    match frame::read::<VmmResponse, _>(stream)
        .unwrap()
        .and_then(|r| r.msg)
    {
        Some(vmm_response::Msg::Error(e)) => Err(e),
        Some(other) => Ok(other),
        None => panic!("no response"),
    }
}

fn state_of(r: &mut Running) -> info::State {
    match call(&mut r.client, vmm_request::Msg::Describe(Describe {})) {
        Ok(vmm_response::Msg::Info(i)) => i.state(),
        other => panic!("describe: {other:?}"),
    }
}

fn snapshot(r: &mut Running, state: &Path, mem: &Path) -> Result<SnapshotDone, String> {
    snapshot_with(r, state, mem, false)
}

fn snapshot_with(
    r: &mut Running,
    state: &Path,
    mem: &Path,
    diff: bool,
) -> Result<SnapshotDone, String> {
    let msg = vmm_request::Msg::Snapshot(Snapshot {
        state_path: state.display().to_string(),
        mem_path: mem.display().to_string(),
        diff,
    });
    call(&mut r.client, msg).map(|m| match m {
        vmm_response::Msg::Snapshot(done) => done,
        other => panic!("snapshot answered {other:?}"),
    })
}

fn stop(mut r: Running) -> VmOutcome {
    call(&mut r.client, vmm_request::Msg::Stop(Stop {})).unwrap();
    r.thread.join().unwrap()
}

fn paths(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    (
        dir.join(format!("{name}.state")),
        dir.join(format!("{name}.mem")),
    )
}

fn restore(state: &Path, mem: &Path, paused: bool) -> Vmm {
    restore_with(state, mem, &Default::default(), paused)
}

/// Restores with `names` (fds the launcher opened, see super::LoadNames).
fn restore_with(state: &Path, mem: &Path, names: &super::LoadNames, paused: bool) -> Vmm {
    let loaded = super::load(state, mem, names).expect("load snapshot");
    let mut vmm = restore_vm(
        open_kvm().unwrap(),
        loaded,
        Box::new(SharedBuf::default()),
        &Default::default(),
        Instant::now(),
    )
    .expect("restore");
    vmm.set_start_paused(paused);
    vmm
}

fn read_state(path: &Path) -> SnapshotState {
    SnapshotState::from_bytes(&super::file::read(path).unwrap()).unwrap()
}

/// The parts of a vCPU's state that must be identical after restore (MSRs that count time,
/// such as the TSC, move on by design).
fn assert_same_vcpu(a: &VcpuState, b: &VcpuState) {
    let i = a.index;
    let ra: kvm_regs = pod_from("regs", &a.regs).unwrap();
    let rb: kvm_regs = pod_from("regs", &b.regs).unwrap();
    assert_eq!(format!("{ra:?}"), format!("{rb:?}"), "vCPU {i} regs");
    let sa: kvm_sregs = pod_from("sregs", &a.sregs).unwrap();
    let sb: kvm_sregs = pod_from("sregs", &b.sregs).unwrap();
    assert_eq!(format!("{sa:?}"), format!("{sb:?}"), "vCPU {i} sregs");
    assert_eq!(a.cpuid, b.cpuid, "vCPU {i} CPUID");
    assert_eq!(a.xcrs, b.xcrs, "vCPU {i} XCRs");
    assert_eq!(a.xsave, b.xsave, "vCPU {i} XSAVE");
    assert_eq!(a.fpu, b.fpu, "vCPU {i} FPU");
    assert_eq!(a.debug_regs, b.debug_regs, "vCPU {i} debug regs");
    assert_eq!(a.vcpu_events, b.vcpu_events, "vCPU {i} events");
    assert_eq!(a.mp_state, b.mp_state, "vCPU {i} MP state");
    assert_eq!(a.lapic, b.lapic, "vCPU {i} LAPIC");
    assert_eq!(a.msr_indices, b.msr_indices, "vCPU {i} MSR list");
    const TIME_MSRS: [u32; 3] = [0x10, 0x6e0, 0x3b]; // TSC, TSC deadline, TSC adjust
    for ((idx, va), vb) in a.msr_indices.iter().zip(&a.msr_values).zip(&b.msr_values) {
        if !TIME_MSRS.contains(idx) {
            assert_eq!(va, vb, "vCPU {i} MSR {idx:#x}");
        }
    }
}

#[test]
fn a_restored_vm_continues_exactly_and_clones_run_side_by_side() {
    require_kvm!();
    let dir = ScratchDir::new("snap-kvm");
    let (state_path, mem_path) = paths(dir.path(), "base");

    // Run, refuse a snapshot while running, pause, snapshot, stop.
    let mut vm = start(counting_vm(2, 64), dir.path(), "origin");
    wait_until("both vCPUs count", || {
        counters(&vm.mem, 2)
            .iter()
            .enumerate()
            .all(|(i, &c)| c > seed(i as u8))
    });
    let e = snapshot(&mut vm, &state_path, &mem_path).unwrap_err();
    assert!(e.contains("not paused"), "{e}");
    assert!(!state_path.exists() && !mem_path.exists());
    call(&mut vm.client, vmm_request::Msg::Pause(Pause {})).unwrap();
    let saved = counters(&vm.mem, 2);
    let done = snapshot(&mut vm, &state_path, &mem_path).unwrap();
    assert_eq!(
        state_of(&mut vm),
        info::State::Paused,
        "a snapshot must not resume the VM"
    );
    assert_eq!(done.memory_bytes, 64 * MIB);
    // Code, counters, sentinel and boot tables: a few pages, not 64 MiB.
    assert!(
        done.memory_written > 0 && done.memory_written < MIB,
        "{done:?}"
    );
    assert_eq!(counters(&vm.mem, 2), saved, "the snapshot let a vCPU run");
    // The origin runs on after the snapshot, unaffected.
    call(&mut vm.client, vmm_request::Msg::Resume(Resume {})).unwrap();
    wait_until("the origin counts on", || {
        counters(&vm.mem, 2)
            .iter()
            .zip(&saved)
            .all(|(now, then)| now > then)
    });
    stop(vm);
    let original = read_state(&state_path);

    // Restored paused: its state, read again, is exactly the saved state.
    let mut paused = start(restore(&state_path, &mem_path, true), dir.path(), "paused");
    assert_eq!(state_of(&mut paused), info::State::Paused);
    assert_eq!(counters(&paused.mem, 2), saved, "memory was not restored");
    let (again_state, again_mem) = paths(dir.path(), "again");
    snapshot(&mut paused, &again_state, &again_mem).unwrap();
    let again = read_state(&again_state);
    for (a, b) in original.vcpus.iter().zip(&again.vcpus) {
        assert_same_vcpu(a, b);
    }
    assert_eq!(original.serial, again.serial);
    assert_eq!(counters(&paused.mem, 2), saved, "a paused restore ran");
    stop(paused);

    // Three clones of one snapshot at once: each continues from the saved counts (a vCPU that
    // lost its registers would restart near 0 and never reach the seed), sees the memory of the
    // snapshot, and writes only its own private copy.
    let mut clones: Vec<Running> = (0..3)
        .map(|i| {
            start(
                restore(&state_path, &mem_path, false),
                dir.path(),
                &format!("clone{i}"),
            )
        })
        .collect();
    for (i, clone) in clones.iter().enumerate() {
        clone
            .mem
            .write_obj(i as u64 + 1, GuestAddress(SENTINEL_ADDR + 8))
            .unwrap();
    }
    for clone in &clones {
        wait_until("a clone counts on", || {
            counters(&clone.mem, 2)
                .iter()
                .zip(&saved)
                .all(|(now, then)| now > then)
        });
        for (i, c) in counters(&clone.mem, 2).iter().enumerate() {
            assert!(
                *c > saved[i] && *c < seed(i as u8) + (1 << 32),
                "counter {i} = {c:#x}"
            );
        }
    }
    for (i, clone) in clones.iter_mut().enumerate() {
        assert_eq!(state_of(clone), info::State::Running);
        let sentinel: u64 = clone.mem.read_obj(GuestAddress(SENTINEL_ADDR)).unwrap();
        assert_eq!(sentinel, SENTINEL);
        let own: u64 = clone.mem.read_obj(GuestAddress(SENTINEL_ADDR + 8)).unwrap();
        assert_eq!(own, i as u64 + 1, "clones share written memory");
    }
    for clone in clones {
        assert_eq!(stop(clone).reason, StopReason::Requested);
    }
    // The memory file itself never changed.
    let fresh = super::load(&state_path, &mem_path, &Default::default()).unwrap();
    assert_eq!(counters(&fresh.memory, 2), saved);
    let own: u64 = fresh
        .memory
        .read_obj(GuestAddress(SENTINEL_ADDR + 8))
        .unwrap();
    assert_eq!(own, 0);
}

#[test]
fn damaged_or_mismatched_snapshots_are_refused_and_left_untouched() {
    require_kvm!();
    let dir = ScratchDir::new("snap-kvm-bad");
    let snap = |name: &str| {
        let (state, mem) = paths(dir.path(), name);
        let mut vm = start(counting_vm(1, 64), dir.path(), name);
        call(&mut vm.client, vmm_request::Msg::Pause(Pause {})).unwrap();
        snapshot(&mut vm, &state, &mem).unwrap();
        stop(vm);
        (state, mem)
    };
    let (a_state, a_mem) = snap("a");
    let (_, b_mem) = snap("b");
    let err = |state: &Path, mem: &Path| match super::load(state, mem, &Default::default()) {
        Ok(_) => panic!("{} + {} was accepted", state.display(), mem.display()),
        Err(e) => crate::api::error_chain(&e),
    };

    let e = err(&a_state, &b_mem);
    assert!(e.contains("another snapshot"), "{e}");

    let bytes = std::fs::read(&a_state).unwrap();
    let bad = dir.path().join("bad.state");
    let mut flipped = bytes.clone();
    flipped[bytes.len() / 2] ^= 0x40;
    std::fs::write(&bad, &flipped).unwrap();
    let e = err(&bad, &a_mem);
    assert!(e.contains("corrupted"), "{e}");
    assert_eq!(
        std::fs::read(&bad).unwrap(),
        flipped,
        "a refused file was modified"
    );

    std::fs::write(&bad, &bytes[..bytes.len() - 10]).unwrap();
    let e = err(&bad, &a_mem);
    assert!(e.contains("truncated"), "{e}");

    let short = dir.path().join("short.mem");
    std::fs::copy(&a_mem, &short).unwrap();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&short)
        .unwrap();
    f.set_len(f.metadata().unwrap().len() - 4096).unwrap();
    let e = err(&a_state, &short);
    assert!(e.contains("truncated"), "{e}");

    // The originals still restore.
    let vmm = restore(&a_state, &a_mem, true);
    assert_eq!(vmm.vcpu_count(), 1);
}

/// Pauses `r`, takes a diff snapshot into `name`, returns the counters then and what it wrote.
fn diff_of(r: &mut Running, dir: &Path, name: &str) -> (Vec<u64>, SnapshotDone) {
    call(&mut r.client, vmm_request::Msg::Pause(Pause {})).unwrap();
    let counts = counters(&r.mem, 2);
    let (state, mem) = paths(dir, name);
    let done = snapshot_with(r, &state, &mem, true).unwrap();
    call(&mut r.client, vmm_request::Msg::Resume(Resume {})).unwrap();
    (counts, done)
}

#[test]
fn diff_snapshots_write_only_changed_pages_and_restore_layered() {
    require_kvm!();
    let dir = ScratchDir::new("snap-kvm-diff");
    let (base_state, base_mem) = paths(dir.path(), "base");
    let mut vm = start(counting_vm(2, 64), dir.path(), "origin");
    wait_until("both vCPUs count", || {
        counters(&vm.mem, 2)
            .iter()
            .enumerate()
            .all(|(i, &c)| c > seed(i as u8))
    });
    // No base yet: refused.
    call(&mut vm.client, vmm_request::Msg::Pause(Pause {})).unwrap();
    let (s, m) = paths(dir.path(), "nobase");
    let e = snapshot_with(&mut vm, &s, &m, true).unwrap_err();
    assert!(e.contains("needs a base"), "{e}");
    let at_full = counters(&vm.mem, 2);
    let full = snapshot(&mut vm, &base_state, &base_mem).unwrap();
    call(&mut vm.client, vmm_request::Msg::Resume(Resume {})).unwrap();
    wait_until("the VM counts after the full snapshot", || {
        counters(&vm.mem, 2)
            .iter()
            .zip(&at_full)
            .all(|(now, then)| now > then)
    });

    // Anonymous RAM: compared with the base file. Only the counters' page changed, plus a page
    // the host writes meanwhile (as a device would).
    vm.mem
        .write_obj(0xd1ff_u64, GuestAddress(SENTINEL_ADDR + 0x10_0000))
        .unwrap();
    let (at_diff1, diff1) = diff_of(&mut vm, dir.path(), "diff1");
    assert_eq!(diff1.memory_written, 2 * 4096, "{diff1:?} (full: {full:?})");
    stop(vm);

    // Restored from the diff: the base plus the diff's pages, exactly the memory at diff time.
    let (d1_state, d1_mem) = paths(dir.path(), "diff1");
    let mut restored = start(restore(&d1_state, &d1_mem, true), dir.path(), "r1");
    assert_eq!(counters(&restored.mem, 2), at_diff1);
    let host_write: u64 = restored
        .mem
        .read_obj(GuestAddress(SENTINEL_ADDR + 0x10_0000))
        .unwrap();
    assert_eq!(
        host_write, 0xd1ff,
        "a page written outside KVM is missing from the diff"
    );
    call(&mut restored.client, vmm_request::Msg::Resume(Resume {})).unwrap();
    wait_until("the restored VM counts on", || {
        counters(&restored.mem, 2)
            .iter()
            .zip(&at_diff1)
            .all(|(now, then)| now > then)
    });

    // RAM mapped from the base: pagemap finds the changed pages (the layered diff's two, plus
    // whatever ran since: the counters' page again).
    let (at_diff2, diff2) = diff_of(&mut restored, dir.path(), "diff2");
    assert_eq!(diff2.memory_written, 2 * 4096, "{diff2:?}");
    stop(restored);
    let (d2_state, d2_mem) = paths(dir.path(), "diff2");
    let mut again = start(restore(&d2_state, &d2_mem, false), dir.path(), "r2");
    wait_until("the second restore counts on", || {
        counters(&again.mem, 2)
            .iter()
            .zip(&at_diff2)
            .all(|(now, then)| now > then)
    });
    assert_eq!(state_of(&mut again), info::State::Running);
    stop(again);

    // A diff whose base changed is refused.
    let loaded = read_state(&d2_state);
    assert_eq!(
        loaded.memory.as_ref().unwrap().base_path,
        std::fs::canonicalize(&base_mem)
            .unwrap()
            .display()
            .to_string()
    );
    std::fs::remove_file(&base_mem).unwrap();
    assert!(super::load(&d2_state, &d2_mem, &Default::default()).is_err());
}

fn fd_path(file: &std::fs::File) -> PathBuf {
    use std::os::fd::AsRawFd;
    PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()))
}

#[test]
fn a_restore_from_fds_takes_diffs_through_its_open_base_and_records_the_given_name() {
    require_kvm!();
    let dir = ScratchDir::new("snap-kvm-fds");
    let (full_state, full_mem) = paths(dir.path(), "full");
    let mut vm = start(counting_vm(1, 64), dir.path(), "origin");
    wait_until("the vCPU counts", || counters(&vm.mem, 1)[0] > seed(0));
    call(&mut vm.client, vmm_request::Msg::Pause(Pause {})).unwrap();
    snapshot(&mut vm, &full_state, &full_mem).unwrap();
    stop(vm);

    // What huskd does: it opens the files and passes fds, naming the memory file as it is on
    // the host. The path the VMM was given is then gone (a jail has no such path): diffs must
    // read the base through the open file.
    let state_file = std::fs::File::open(&full_state).unwrap();
    let mem_file = std::fs::File::open(&full_mem).unwrap();
    let moved = dir.path().join("moved.mem");
    std::fs::rename(&full_mem, &moved).unwrap();
    let names = super::LoadNames {
        mem_name: Some(moved.clone()),
        base: None,
    };
    let mut restored = start(
        restore_with(&fd_path(&state_file), &fd_path(&mem_file), &names, true),
        dir.path(),
        "fromfds",
    );
    let at_restore = counters(&restored.mem, 1);
    call(&mut restored.client, vmm_request::Msg::Resume(Resume {})).unwrap();
    wait_until("the restored VM counts on", || {
        counters(&restored.mem, 1)[0] > at_restore[0]
    });
    let (at_diff, diff) = diff_of(&mut restored, dir.path(), "diff");
    assert!(diff.memory_written > 0, "{diff:?}");
    stop(restored);
    let (diff_state, diff_mem) = paths(dir.path(), "diff");
    assert_eq!(
        read_state(&diff_state).memory.unwrap().base_path,
        moved.display().to_string(),
        "the diff records the name it was given for its base"
    );

    // The diff restored with its base passed as an fd too.
    let base_file = std::fs::File::open(&moved).unwrap();
    let diff_state_file = std::fs::File::open(&diff_state).unwrap();
    let diff_mem_file = std::fs::File::open(&diff_mem).unwrap();
    let names = super::LoadNames {
        mem_name: None,
        base: Some(fd_path(&base_file)),
    };
    let mut again = start(
        restore_with(
            &fd_path(&diff_state_file),
            &fd_path(&diff_mem_file),
            &names,
            true,
        ),
        dir.path(),
        "again",
    );
    assert_eq!(counters(&again.mem, 2), at_diff);
    call(&mut again.client, vmm_request::Msg::Resume(Resume {})).unwrap();
    assert_eq!(state_of(&mut again), info::State::Running);
    stop(again);
}
