//! virtio devices driven by the real Linux guest's own drivers: virtio-blk (durability across a
//! killed VMM, read-only disks), virtio-rng, virtio-net (ping, a checksummed TCP transfer, tap
//! cleanup after kill -9).
// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Read;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use husk_tests::{
    husk_run_child_pid as vmm_pid, spawn_husk, vsock_exchange, wait_for_line, Scratch,
};

const LIMIT: Duration = Duration::from_secs(240);

use husk_tests::husk_run_sh as husk_run;

fn wait_exit(child: &mut Child) -> std::process::ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(Instant::now() < deadline, "husk run did not exit");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn debugfs_cat(image: &Path, file: &str) -> String {
    let out = Command::new("debugfs")
        .arg("-R")
        .arg(format!("cat {file}"))
        .arg(image)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
#[ignore = "needs a hardware-style KVM: run through scripts/testbed (scripts/test does)"]
fn a_synced_write_is_on_the_host_image_after_the_vmm_is_killed() {
    let scratch = Scratch::new("durable");
    let image = scratch.ext4("data.img", 32);
    let disk = format!("{}", image.display());
    let mut husk = spawn_husk(
        &["--disk", &disk],
        "mount /dev/vda /mnt && echo durable-data-42 > /mnt/proof && sync && echo SYNCED; sleep 600",
    );
    wait_for_line(&mut husk, "SYNCED", LIMIT);
    // The VMM process the test started (through husk).
    let _ = husk_tests::signal(vmm_pid(husk.id()) as i32, rustix::process::Signal::KILL);
    let status = wait_exit(&mut husk);
    assert_eq!(
        status.code(),
        Some(137),
        "husk passes on the VMM's death by SIGKILL"
    );
    assert!(
        debugfs_cat(&image, "/proof").contains("durable-data-42"),
        "file missing on the host image"
    );
}

#[test]
#[ignore = "needs a hardware-style KVM: run through scripts/testbed (scripts/test does)"]
fn a_read_only_disk_refuses_writes_in_the_guest() {
    let scratch = Scratch::new("ro");
    let image = scratch.ext4("ro.img", 16);
    let before = std::fs::read(&image).unwrap();
    let disk = format!("{}:ro", image.display());
    let run = husk_run(
        &["--disk", &disk],
        "cat /sys/block/vda/ro; dd if=/dev/zero of=/dev/vda bs=4096 count=1 conv=fsync 2>/dev/null; \
         echo dd=$?; mount /dev/vda /mnt 2>/dev/null; touch /mnt/x 2>/dev/null; echo touch=$?",
    );
    let out = run.stdout();
    assert_eq!(run.code(), Some(0), "{out}\n{}", run.stderr());
    assert!(
        out.lines().any(|l| l.trim() == "1"),
        "vda is not read-only in the guest:\n{out}"
    );
    assert!(out.contains("dd=1"), "a raw write succeeded:\n{out}");
    assert!(out.contains("touch=1"), "a file write succeeded:\n{out}");
    assert!(
        std::fs::read(&image).unwrap() == before,
        "the read-only image changed"
    );
}

#[test]
#[ignore = "needs a hardware-style KVM: run through scripts/testbed (scripts/test does)"]
fn hwrng_gives_bytes_from_virtio_rng() {
    let run = husk_run(&[], "cat /sys/class/misc/hw_random/rng_current; head -c 4096 /dev/hwrng | od -An -tx1 | tr -s ' ' '\\n' | sort -u | wc -l");
    let out = run.stdout();
    assert_eq!(run.code(), Some(0), "{out}");
    assert!(
        out.contains("virtio_rng"),
        "hwrng is not virtio-rng:\n{out}"
    );
    let distinct: usize = out
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .next_back()
        .unwrap_or(0);
    assert!(
        distinct > 200,
        "4 KiB of entropy has only {distinct} distinct byte values:\n{out}"
    );
}

fn sha256_hex(data: &[u8]) -> String {
    let mut child = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let data = data.to_vec();
    let writer = std::thread::spawn(move || std::io::Write::write_all(&mut stdin, &data));
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

#[test]
#[ignore = "needs a hardware-style KVM: run through scripts/testbed (scripts/test does)"]
fn the_guest_pings_the_host_and_64_mib_cross_tcp_intact() {
    const BYTES: usize = 64 << 20;
    let listener = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let receiver = std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        let mut data = Vec::with_capacity(BYTES);
        conn.by_ref()
            .take(BYTES as u64)
            .read_to_end(&mut data)
            .unwrap();
        data
    });
    let script = format!(
        "ping -c 1 -W 5 $HUSK_HOST_IP >/dev/null && echo PING-OK; \
         head -c {BYTES} /dev/urandom > /tmp/blob && sha256sum /tmp/blob && \
         nc $HUSK_HOST_IP {port} < /tmp/blob && echo SENT"
    );
    let start = Instant::now();
    // --host-access: the sink listens on the host, behind the link's host end.
    let run = husk_run(&["--net", "--host-access", "--memory", "512"], &script);
    let out = run.stdout();
    assert!(
        out.contains("PING-OK"),
        "ping failed:\n{out}\n{}",
        run.stderr()
    );
    let data = receiver.join().unwrap();
    assert_eq!(data.len(), BYTES);
    let guest_sum = out
        .lines()
        .find(|l| l.ends_with("/tmp/blob"))
        .and_then(|l| l.split_whitespace().next());
    assert_eq!(
        guest_sum,
        Some(sha256_hex(&data).as_str()),
        "data changed in transit:\n{out}"
    );
    eprintln!(
        "64 MiB guest-to-host over virtio-net in {:?} (including boot, in the testbed)",
        start.elapsed()
    );
}

#[test]
#[ignore = "needs a hardware-style KVM: run through scripts/testbed (scripts/test does)"]
fn no_tap_is_left_after_the_vmm_is_killed() {
    let mut husk = spawn_husk(&["--net"], "echo UP; sleep 600");
    wait_for_line(&mut husk, "UP", LIMIT);
    let taps: Vec<String> = std::fs::read_dir("/sys/class/net")
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .filter(|n| n.starts_with("husk"))
        .collect();
    assert_eq!(taps.len(), 1, "one tap while the VM runs: {taps:?}");
    // The VMM process the test started (through husk).
    let _ = husk_tests::signal(vmm_pid(husk.id()) as i32, rustix::process::Signal::KILL);
    wait_exit(&mut husk);
    let gone = Instant::now() + Duration::from_secs(5);
    while Path::new("/sys/class/net").join(&taps[0]).exists() {
        assert!(Instant::now() < gone, "tap {} outlived its VMM", taps[0]);
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
#[ignore = "needs a hardware-style KVM: run through scripts/testbed (scripts/test does)"]
fn vsock_carries_data_both_ways() {
    use std::io::Write;
    use std::os::unix::net::UnixListener;

    use std::os::unix::fs::PermissionsExt;
    let scratch = Scratch::new("vsock");
    // Run as root, husk jails the VMM as an unprivileged user: it creates its socket in this
    // directory and connects to the host port's socket.
    std::fs::set_permissions(&scratch.0, PermissionsExt::from_mode(0o1777)).unwrap();
    let uds = scratch.0.join("v.sock");
    // Guest to host: the guest connects to host port 5000, which lands on <uds>_5000.
    let port_path = format!("{}_5000", uds.display());
    let host_port = UnixListener::bind(&port_path).unwrap();
    std::fs::set_permissions(&port_path, PermissionsExt::from_mode(0o777)).unwrap();
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let (mut conn, _) = host_port.accept().unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        let mut got = Vec::new();
        conn.read_to_end(&mut got).unwrap();
        conn.write_all(&got.to_ascii_uppercase()).unwrap();
        let _ = done_tx.send(got);
    });
    let uds_arg = uds.display().to_string();
    let mut husk = spawn_husk(
        &["--vsock", &uds_arg],
        "echo from-guest | husk-init vsock-cat 2 5000; echo; husk-init vsock-echo 6000",
    );
    wait_for_line(&mut husk, "listening on port 6000", LIMIT);
    let got = done_rx
        .recv_timeout(Duration::from_secs(60))
        .expect("the guest never connected to host port 5000");
    assert_eq!(got, b"from-guest\n");

    // Host to guest: CONNECT to the guest's port 6000 through the device's socket.
    assert_eq!(
        vsock_exchange(&uds, 6000, b"ping over vsock"),
        b"ping over vsock"
    );
    let status = wait_exit(&mut husk);
    assert_eq!(status.code(), Some(0));
}
