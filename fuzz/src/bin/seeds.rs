//! Writes the committed seed corpus (fuzz/corpus/TARGET/NAME): a few valid inputs per target,
//! built with the project's own encoders, so that fuzzing starts from requests, frames and
//! states that get past the first checks. Run by hand after a format change:
//! `cargo run --manifest-path fuzz/Cargo.toml --bin seeds -- fuzz/corpus`.

use std::path::Path;

// Linked for the coverage hooks the instrumented dependencies call (its `main` is not used).
extern crate libfuzzer_sys;

use husk_init::spec::BootSpec;
use husk_proto::agent::{
    guest_message, host_message, Exec, Exit, GuestMessage, Hello, HostMessage,
};
use husk_proto::frame;
use husk_proto::vmm::{vmm_request, Describe, Pause, Resume, Snapshot, Stop, VmmRequest};
use husk_vmm::snapshot::{file, state};
use prost::Message;

fn main() {
    let Some(out) = std::env::args().nth(1) else {
        eprintln!("usage: seeds DIR");
        std::process::exit(2);
    };
    let out = Path::new(&out);
    let write = |target: &str, name: &str, bytes: Vec<u8>| {
        let dir = out.join(target);
        std::fs::create_dir_all(&dir)
            .and_then(|()| std::fs::write(dir.join(name), bytes))
            .unwrap_or_else(|e| panic!("cannot write {target}/{name}: {e}"));
    };

    for (kind, name) in [(0u8, "blk"), (1, "net"), (2, "vsock"), (3, "rng")] {
        // Start the device, notify every queue, let the backend run, read config.
        let mut ops = vec![kind, 6];
        ops.extend(0x3000_0000u64.to_le_bytes());
        ops.extend([4, 0, 4, 1, 4, 2, 5, 8, 0, 4, 1, 0x70]);
        write("virtio_mmio", name, ops);
    }
    // qcow2_image: the template as created, then ops (a byte with the high bit set ends the
    // patches); one seed patches the L1 table's first entry, one the header's cluster_bits.
    let ops: Vec<u8> = [
        [0u8, 0, 0, 7, 0x11, 0],
        [0, 130, 0, 200, 0x22, 0],
        [1, 0, 0, 129, 0, 0],
        [2, 0, 0, 128, 0, 0],
        [3, 1, 0, 3, 0, 1],
        [4, 0, 0, 0, 0, 0],
    ]
    .concat();
    write("qcow2_image", "ops", [vec![0x80], ops.clone()].concat());
    let mut l1 = vec![1u8, 0, 8];
    l1.extend((3u64 << 16 | 1 << 63).to_be_bytes());
    write("qcow2_image", "l1", [l1, vec![0x80], ops.clone()].concat());
    let mut bits = vec![0u8, 5, 4];
    bits.extend(12u32.to_be_bytes());
    write("qcow2_image", "cluster-bits", [bits, vec![0x80], ops].concat());
    for (name, bytes) in queue_seeds() {
        write("virtio_queue", name, bytes);
    }

    let payload = snapshot().encode_to_vec();
    write("snapshot_state", "payload", payload.clone());
    write("snapshot_state", "file", file::encode(&payload));
    write("snapshot_state", "many-vcpus", [0x12, 0].repeat(40));

    let request = |msg| VmmRequest { msg: Some(msg) };
    let mut stream = vec![0u8];
    for msg in [
        vmm_request::Msg::Describe(Describe {}),
        vmm_request::Msg::Pause(Pause {}),
        vmm_request::Msg::Snapshot(Snapshot {
            state_path: "/tmp/vm.state".into(),
            mem_path: "/tmp/vm.mem".into(),
            diff: true,
        }),
        vmm_request::Msg::Resume(Resume {}),
        vmm_request::Msg::Stop(Stop {}),
    ] {
        stream.extend(frame::encode(&request(msg)).unwrap_or_default());
    }
    write("vmm_control", "session", stream.clone());
    let mut cut = vec![4, 1, 0, 3, 7];
    cut.extend(&stream[1..]);
    write("vmm_control", "cut", cut);
    write("vmm_control", "empty-frame", vec![0, 0, 0, 0, 0]);

    let specs = [
        BootSpec {
            argv: vec![b"/bin/sh".to_vec(), b"-c".to_vec(), b"echo hi".to_vec()],
            env: vec![b"A=1".to_vec()],
            cwd: Some(b"/tmp".to_vec()),
        },
        BootSpec::sandbox(),
    ];
    for (i, spec) in specs.iter().enumerate() {
        let encoded = spec.encode().unwrap_or_default();
        write(
            "boot_spec",
            &format!("cmdline{i}"),
            [&[0][..], b"husk.spec=", encoded.as_bytes()].concat(),
        );
    }
    write(
        "boot_spec",
        "host",
        b"\x01a/bin/ls\xffa-l\xffeK=V\xffw/".to_vec(),
    );

    let host = |msg| HostMessage { msg: Some(msg) };
    let mut wire = vec![0u8];
    for msg in [
        host_message::Msg::Hello(Hello {
            version: 1,
            uptime_ms: 0,
        }),
        host_message::Msg::Exec(Exec {
            argv: vec!["ls".into(), "-l".into()],
            env: vec!["A=1".into()],
            workdir: "/".into(),
            tty: true,
            ..Default::default()
        }),
        host_message::Msg::Stdin(b"input".to_vec()),
        host_message::Msg::CloseStdin(true),
        host_message::Msg::Signal(15),
    ] {
        wire.extend(frame::encode(&host(msg)).unwrap_or_default());
    }
    write("agent_messages", "host", wire);
    let guest = |msg| GuestMessage { msg: Some(msg) };
    let mut wire = vec![1u8];
    for msg in [
        guest_message::Msg::StartedPid(42),
        guest_message::Msg::Stdout(b"out".to_vec()),
        guest_message::Msg::Exit(Exit { code: 1, signal: 0 }),
    ] {
        wire.extend(frame::encode(&guest(msg)).unwrap_or_default());
    }
    write("agent_messages", "guest", wire);
}

/// A small but complete snapshot state: one vCPU, a virtio-rng transport with a live queue.
fn snapshot() -> state::SnapshotState {
    state::SnapshotState {
        machine: Some(state::MachineState {
            mem_size: 256 << 20,
            vcpus: 1,
        }),
        vcpus: vec![state::VcpuState {
            regs: vec![0; std::mem::size_of::<kvm_bindings::kvm_regs>()],
            cpuid: vec![0; 40],
            msr_indices: vec![0x10, 0xc000_0100],
            msr_values: vec![1, 2],
            ..Default::default()
        }],
        vm: Some(state::VmState {
            clock_ns: 1,
            ..Default::default()
        }),
        memory: Some(state::MemoryState {
            id: vec![1; 16],
            regions: vec![state::MemoryRegionState {
                guest_addr: 0,
                len: 256 << 20,
                file_offset: 4096,
            }],
            ..Default::default()
        }),
        serial: Some(state::SerialState::default()),
        devices: vec![state::DeviceState {
            name: "rng0".into(),
            backend: Some(state::DeviceBackend {
                backend: Some(state::Backend::Rng(state::RngBackend {})),
            }),
            transport: Some(state::TransportState {
                queues: vec![state::QueueState {
                    max_size: 256,
                    size: 16,
                    ready: true,
                    desc_table: 0x1000,
                    avail_ring: 0x1400,
                    used_ring: 0x1800,
                    ..Default::default()
                }],
                status: 15,
                lifecycle: 1,
                acked_features: 1 << 32,
                ..Default::default()
            }),
        }],
    }
}

/// One virtio_queue descriptor: (address selector, length, flags, next).
type Desc = (u16, u16, u8, u8);

/// A virtio_queue input: device, features, host frames, per queue its descriptors and heads,
/// the notify schedule, then the buffer contents.
fn queue_input(
    kind: u8,
    frames: &[Vec<u8>],
    queues: &[(&[Desc], &[u8])],
    schedule: [u8; 8],
    buffers: &[u8],
) -> Vec<u8> {
    let mut v = vec![kind];
    v.extend(0u64.to_le_bytes());
    v.push(frames.len() as u8);
    for f in frames {
        v.extend((f.len() as u16).to_le_bytes());
        v.extend(f);
    }
    for (descs, heads) in queues {
        for i in 0..16 {
            let (sel, len, flags, next) = descs.get(i).copied().unwrap_or_default();
            v.extend(sel.to_le_bytes());
            v.extend(len.to_le_bytes());
            v.extend([flags, next]);
        }
        v.extend([heads.len() as u8, 0]);
        v.extend(*heads);
    }
    v.extend(schedule);
    v.extend(buffers);
    v
}

fn queue_seeds() -> Vec<(&'static str, Vec<u8>)> {
    const NEXT: u8 = 1;
    const WRITE: u8 = 2;
    // virtio-blk: header (type, reserved, sector), data at +512, status at +1600.
    let blk = |kind: u32, data_flags: u8| {
        let mut header = kind.to_le_bytes().to_vec();
        header.extend([0; 12]);
        let descs = [
            (0, 16, NEXT, 1),
            (64, 512, NEXT | data_flags, 2),
            (200, 1, WRITE, 0),
        ];
        queue_input(0, &[], &[(&descs, &[0])], [0; 8], &header)
    };
    // virtio-vsock: a REQUEST from guest port 1234 to host port 1024.
    let mut hdr = Vec::new();
    hdr.extend(3u64.to_le_bytes());
    hdr.extend(2u64.to_le_bytes());
    hdr.extend(1234u32.to_le_bytes());
    hdr.extend(1024u32.to_le_bytes());
    hdr.extend(0u32.to_le_bytes());
    hdr.extend(1u16.to_le_bytes());
    hdr.extend(1u16.to_le_bytes());
    hdr.extend(0u32.to_le_bytes());
    hdr.extend(65536u32.to_le_bytes());
    hdr.extend(0u32.to_le_bytes());
    let rx: &[Desc] = &[(0x200, 4096, WRITE, 0)];
    let tx: &[Desc] = &[(0, 44, 0, 0)];
    vec![
        ("blk-read", blk(0, WRITE)),
        ("blk-write", blk(1, 0)),
        ("blk-get-id", blk(8, WRITE)),
        (
            "net",
            queue_input(
                1,
                &[vec![0; 72]],
                &[(rx, &[0]), (&[(0, 72, 0, 0)], &[0])],
                [1, 0, 6, 0, 0, 0, 0, 0],
                &[0; 72],
            ),
        ),
        (
            "vsock",
            queue_input(
                2,
                &[],
                &[(rx, &[0]), (tx, &[0]), (&[], &[])],
                [1, 0, 6, 1, 0, 0, 0, 0],
                &hdr,
            ),
        ),
        (
            "rng",
            queue_input(3, &[], &[(&[(0, 64, WRITE, 0)], &[0])], [0; 8], &[]),
        ),
    ]
}
