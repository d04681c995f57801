//! Snapshot benchmark on the host's /dev/kvm with a purpose-built guest (no Linux needed): a
//! vCPU that dirties `--touch-mib` of guest memory, then writes to the serial port in a loop.
//!
//! Per guest size: snapshot create time (pause to files on disk, fsync included), memory file
//! bytes written, and restore-to-running latency of a fresh `husk-vmm --restore-*` process
//! (spawn to the first byte the restored guest writes on its console), plus clones per second
//! (N restores started at once, until every one has written). Prints a Markdown table.
//!
//!   cargo run --release -p husk-vmm --example snapshot-bench -- \
//!       --vmm target/release/husk-vmm --dir /tmp/snapbench [--sizes 128,1024,4096] [--runs 10]
// A benchmark binary: a failed step aborts the run with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use husk_proto::frame;
use husk_proto::vmm::{vmm_request, vmm_response, Pause, Snapshot, Stop, VmmRequest, VmmResponse};
use husk_vmm::api::socket::ApiSocket;
use husk_vmm::arch::x86_64::layout::MIB;
use husk_vmm::arch::x86_64::regs::{setup_boot_vcpu, write_boot_tables, BootEntry};
use husk_vmm::builder::{build_base_vm, BaseVmConfig};
use husk_vmm::vstate::kvm::open_kvm;
use vm_memory::{Bytes, GuestAddress};

const CODE: u64 = 0x10_0000;
const TOUCH_START: u64 = 0x20_0000;

/// Dirties `rcx` pages from 2 MiB up (one byte per page), then `out 0x3f8, al` forever.
fn program(pages: u32) -> Vec<u8> {
    let mut code = vec![0xb9];
    code.extend_from_slice(&pages.to_le_bytes()); // mov ecx, pages
    code.extend_from_slice(&[
        0xbb, 0x00, 0x00, 0x20, 0x00, // mov ebx, 0x200000
        0xc6, 0x03, 0x01, //             touch: mov byte [rbx], 1
        0x48, 0x81, 0xc3, 0x00, 0x10, 0x00, 0x00, // add rbx, 4096
        0xe2, 0xf4, //                   loop touch
        0x66, 0xba, 0xf8, 0x03, //       mov dx, 0x3f8
        0xb0, b'.', //                   mov al, '.'
        0xee, //                         print: out dx, al
        0xeb, 0xfd, //                   jmp print
    ]);
    code
}

fn call(stream: &mut UnixStream, msg: vmm_request::Msg) -> vmm_response::Msg {
    frame::write(stream, &VmmRequest { msg: Some(msg) }).unwrap();
    let r: VmmResponse = frame::read(stream).unwrap().unwrap();
    match r.msg.unwrap() {
        vmm_response::Msg::Error(e) => panic!("husk-vmm: {e}"),
        m => m,
    }
}

/// Boots the program in-process, snapshots it; returns (create ms, bytes written).
fn take(dir: &Path, mib: u64, touch_mib: u64) -> (f64, u64) {
    let vmm = build_base_vm(
        open_kvm().unwrap(),
        BaseVmConfig {
            mem_size: mib * MIB,
            vcpus: 1,
            console: Box::new(std::io::sink()),
            report_boot_time: false,
            vmm_start: Instant::now(),
            shared_memory: false,
        },
    )
    .unwrap();
    let mem = vmm.vm().memory().clone();
    let entry = BootEntry::Linux64 { rip: CODE };
    let pages = ((touch_mib * MIB) / 4096) as u32;
    mem.write_slice(&program(pages), GuestAddress(CODE))
        .unwrap();
    write_boot_tables(&mem, entry).unwrap();
    setup_boot_vcpu(&vmm.vcpus()[0].fd, entry).unwrap();
    let sock = dir.join("origin.sock");
    let api = ApiSocket::bind(&sock).unwrap();
    let vm = std::thread::spawn(move || vmm.run_with_api(Some(api)).unwrap());
    let mut c = UnixStream::connect(&sock).unwrap();
    // Wait until the guest has touched its pages (the last one is written before printing).
    let last = TOUCH_START + u64::from(pages.max(1) - 1) * 4096;
    while mem.read_obj::<u8>(GuestAddress(last)).unwrap() != 1 {
        std::thread::sleep(Duration::from_millis(1));
    }
    call(&mut c, vmm_request::Msg::Pause(Pause {}));
    let t = Instant::now();
    let done = call(
        &mut c,
        vmm_request::Msg::Snapshot(Snapshot {
            state_path: dir.join("vm.state").display().to_string(),
            mem_path: dir.join("vm.mem").display().to_string(),
            diff: false,
        }),
    );
    let ms = t.elapsed().as_secs_f64() * 1e3;
    let vmm_response::Msg::Snapshot(done) = done else {
        panic!("no snapshot answer")
    };
    call(&mut c, vmm_request::Msg::Stop(Stop {}));
    vm.join().unwrap();
    (ms, done.memory_written)
}

fn spawn_restore(vmm: &Path, dir: &Path) -> Child {
    Command::new(vmm)
        .arg("--restore-state")
        .arg(dir.join("vm.state"))
        .arg("--restore-mem")
        .arg(dir.join("vm.mem"))
        // Unbuffered: std's stdout is line-buffered and the guest prints no newline.
        .arg("--console")
        .arg("file:/proc/self/fd/1")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap()
}

/// Waits for the first console byte of `child`, then kills it.
fn first_byte(mut child: Child) {
    let mut b = [0u8; 1];
    child.stdout.as_mut().unwrap().read_exact(&mut b).unwrap();
    let _ = child.kill();
    let _ = child.wait();
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn main() {
    let mut args = std::env::args().skip(1);
    let (mut vmm, mut dir, mut sizes, mut runs, mut clones) =
        (None, None, vec![128, 1024, 4096], 10, 8);
    while let Some(a) = args.next() {
        let mut v = || args.next().expect("a value");
        match a.as_str() {
            "--vmm" => vmm = Some(PathBuf::from(v())),
            "--dir" => dir = Some(PathBuf::from(v())),
            "--sizes" => sizes = v().split(',').map(|s| s.parse().unwrap()).collect(),
            "--runs" => runs = v().parse().unwrap(),
            "--clones" => clones = v().parse().unwrap(),
            other => panic!("unknown argument {other}"),
        }
    }
    let vmm = vmm.expect("--vmm PATH");
    let dir = dir.expect("--dir DIR");
    println!("| guest MiB | touched MiB | create ms | memory file written MiB | restore-to-running median ms | p90 ms | {clones} clones at once: clones/s |");
    println!("|---|---|---|---|---|---|---|");
    for mib in sizes {
        let d = dir.join(format!("{mib}"));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        let touch = 64.min(mib / 2);
        let (create_ms, written) = take(&d, mib, touch);
        let mut times: Vec<f64> = (0..runs)
            .map(|_| {
                let t = Instant::now();
                first_byte(spawn_restore(&vmm, &d));
                t.elapsed().as_secs_f64() * 1e3
            })
            .collect();
        times.sort_by(f64::total_cmp);
        let t = Instant::now();
        let children: Vec<Child> = (0..clones).map(|_| spawn_restore(&vmm, &d)).collect();
        children.into_iter().for_each(first_byte);
        let per_s = f64::from(clones) / t.elapsed().as_secs_f64();
        println!(
            "| {mib} | {touch} | {create_ms:.1} | {:.1} | {:.2} | {:.2} | {per_s:.0} |",
            written as f64 / MIB as f64,
            percentile(&times, 0.5),
            percentile(&times, 0.9),
        );
        if std::env::var_os("SNAPBENCH_KEEP").is_none() {
            let _ = std::fs::remove_dir_all(&d);
        }
    }
}
