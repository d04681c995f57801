//! The VM state machine driven through a recording host: no root, KVM, tap or guest. The
//! stand-in VMM "runs" until a test (or a kill) makes it exit, and holds its copy of the tap
//! (a pipe's write end) until then, as husk-vmm holds the real one.

use std::collections::{BTreeMap, HashMap};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use husk_host::jail::JailConfig;
use husk_host::net::VmLink;
use husk_proto::v1::{event, network, Event, Network, RestoreVmRequest, Vm, VmSpec, VmState};
use husk_proto::vmm::ExitReport;
use prost::Message;
use tokio::sync::{broadcast, oneshot};
use tonic::Code;

use super::host::{ExitWait, HostError, VmmHost};
use super::vm::lock;
use super::{Daemon, DaemonConfig, VmEntry};
use crate::store;
use crate::vmm_process::Launch;
use husk_host::firewall::VmRules;
use husk_host::policy::PathPolicy;

/// First pid the stand-in hands out: above any real pid_max, so /proc knows none of them.
const FIRST_PID: u32 = 5_000_000;
/// Wait status of a process killed by SIGKILL.
const KILLED: i32 = 9;

/// One VMM start, as the daemon asked for it.
#[derive(Debug, Clone)]
struct Spawned {
    pid: u32,
    id: String,
    uid: u32,
    restore: bool,
    start_paused: bool,
    mac: Option<[u8; 6]>,
    /// Whether the guest was told to resolve through the host (`husk.dns=`).
    dns: bool,
}

#[derive(Default)]
struct Recorded {
    spawns: Vec<Spawned>,
    kills: Vec<u32>,
    released_jails: Vec<String>,
    /// Exits not yet delivered, by pid.
    exits: HashMap<u32, oneshot::Sender<Option<i32>>>,
    /// The VMM's copy of its tap, by pid, held until it exits.
    vmm_taps: HashMap<u32, OwnedFd>,
    /// The far end of every tap made, to see whether anything still holds the tap.
    tap_ends: Vec<OwnedFd>,
    fail_spawn: Option<String>,
    fail_link: Option<String>,
    /// The firewall: the rules in force, by tap.
    firewall: BTreeMap<String, VmRules>,
    /// Namespaces joined and left, as (path, interface).
    joined: Vec<(String, String)>,
    left: Vec<(String, String)>,
    /// How often the firewall's garbage was collected.
    firewall_collections: usize,
    /// The host's resolver for guests.
    dns: Option<std::net::Ipv4Addr>,
}

/// A host that records what it is asked and simulates VMMs.
#[derive(Default)]
struct FakeHost {
    recorded: Mutex<Recorded>,
}

impl FakeHost {
    fn spawns(&self) -> Vec<Spawned> {
        lock(&self.recorded).spawns.clone()
    }

    /// The VMM `pid` ends with `status` (None: no wait status, as for an adopted VMM).
    fn exit(&self, pid: u32, status: Option<i32>) {
        let mut recorded = lock(&self.recorded);
        recorded.vmm_taps.remove(&pid);
        if let Some(exit) = recorded.exits.remove(&pid) {
            let _ = exit.send(status);
        }
    }

    /// Whether anything (huskd or a VMM) still holds tap number `n`.
    fn tap_open(&self, n: usize) -> bool {
        end_open(&lock(&self.recorded).tap_ends[n])
    }

    /// The taps that have firewall rules.
    fn firewalled(&self) -> Vec<String> {
        lock(&self.recorded).firewall.keys().cloned().collect()
    }
}

/// Whether the write end of the pipe whose read end is `far_end` is still open.
fn end_open(far_end: &OwnedFd) -> bool {
    let mut byte = [0u8; 1];
    // Non-blocking: EAGAIN while a write end is open, 0 (EOF) once none is.
    !matches!(rustix::io::read(far_end, &mut byte), Ok(0))
}

impl VmmHost for FakeHost {
    fn create_link(&self) -> Result<VmLink, HostError> {
        let mut recorded = lock(&self.recorded);
        if let Some(e) = &recorded.fail_link {
            return Err(HostError::Link(e.clone()));
        }
        let (far_end, tap_fd) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::NONBLOCK)
            .map_err(|e| HostError::Link(e.to_string()))?;
        let n = recorded.tap_ends.len() as u8;
        recorded.tap_ends.push(far_end);
        let guest = [169, 254, 128, n * 4 + 2];
        Ok(VmLink {
            tap_fd,
            tap_name: format!("husk{n}"),
            host_ip: [169, 254, 128, n * 4 + 1].into(),
            guest_ip: guest.into(),
            mac: [6, 0, guest[0], guest[1], guest[2], guest[3]],
            prefix_len: husk_host::net::LINK_PREFIX_LEN,
            mtu: None,
            kind: husk_host::net::LinkKind::Tap,
        })
    }

    fn join_netns(&self, netns: &Path, interface: &str) -> Result<VmLink, HostError> {
        let (far_end, tap_fd) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::NONBLOCK)
            .map_err(|e| HostError::Link(e.to_string()))?;
        let mut recorded = lock(&self.recorded);
        recorded.tap_ends.push(far_end);
        recorded
            .joined
            .push((netns.display().to_string(), interface.into()));
        Ok(VmLink {
            tap_fd,
            tap_name: "husktap0".into(),
            host_ip: [10, 88, 0, 1].into(),
            guest_ip: [10, 88, 0, 7].into(),
            mac: [2, 0x42, 10, 88, 0, 7],
            prefix_len: 16,
            mtu: Some(1450),
            kind: husk_host::net::LinkKind::Netns {
                path: netns.into(),
                interface: interface.into(),
            },
        })
    }

    fn leave_netns(&self, netns: &Path, interface: &str) -> Result<(), HostError> {
        lock(&self.recorded)
            .left
            .push((netns.display().to_string(), interface.into()));
        Ok(())
    }

    fn dns_upstream(&self) -> Option<std::net::Ipv4Addr> {
        lock(&self.recorded).dns
    }

    fn apply_firewall(&self, rules: &VmRules) -> Result<(), HostError> {
        let mut recorded = lock(&self.recorded);
        recorded.firewall.insert(rules.tap.clone(), rules.clone());
        Ok(())
    }

    /// As the real one: the rules of every tap that nothing holds any more go.
    fn collect_firewall_garbage(&self) -> Result<(), HostError> {
        let mut recorded = lock(&self.recorded);
        recorded.firewall_collections += 1;
        let Recorded {
            firewall, tap_ends, ..
        } = &mut *recorded;
        firewall.retain(|tap, _| {
            tap.strip_prefix("husk")
                .and_then(|n| n.parse::<usize>().ok())
                .and_then(|n| tap_ends.get(n))
                .is_some_and(end_open)
        });
        Ok(())
    }

    fn give_dir(&self, _dir: BorrowedFd<'_>, _uid: u32) -> std::io::Result<()> {
        Ok(())
    }

    fn spawn(&self, launch: &Launch<'_>) -> Result<u32, HostError> {
        let mut recorded = lock(&self.recorded);
        if let Some(e) = &recorded.fail_spawn {
            return Err(HostError::Spawn(e.clone()));
        }
        let pid = FIRST_PID + recorded.spawns.len() as u32;
        if let Some(link) = launch.link {
            let copy = link
                .tap_fd
                .as_fd()
                .try_clone_to_owned()
                .map_err(|e| HostError::Spawn(e.to_string()))?;
            recorded.vmm_taps.insert(pid, copy);
        }
        recorded.spawns.push(Spawned {
            pid,
            id: launch.id.to_string(),
            uid: launch.uid,
            restore: launch.restore.is_some(),
            start_paused: launch.restore.as_ref().is_some_and(|r| r.start_paused),
            mac: launch.link.map(|l| l.mac),
            dns: launch
                .kernel_cmdline()
                .is_ok_and(|c| c.contains(" husk.dns=169.254.")),
        });
        Ok(pid)
    }

    fn watch(&self, pid: u32) -> std::io::Result<Option<ExitWait>> {
        let (tx, rx) = oneshot::channel();
        lock(&self.recorded).exits.insert(pid, tx);
        Ok(Some(Box::pin(async move { rx.await.unwrap_or(None) })))
    }

    fn kill(&self, pid: u32) {
        lock(&self.recorded).kills.push(pid);
        self.exit(pid, Some(KILLED));
    }

    fn release_jail(&self, _jail: &JailConfig, id: &str) -> Result<(), HostError> {
        lock(&self.recorded).released_jails.push(id.to_string());
        Ok(())
    }
}

struct Fixture {
    config: DaemonConfig,
    daemon: Arc<Daemon>,
    host: Arc<FakeHost>,
    events: broadcast::Receiver<Event>,
    /// Allowed to callers (kernel, initrd, snapshots live here).
    files: PathBuf,
    _dir: tempfile::TempDir,
}

/// A daemon over a scratch state directory; `jailed`: with a jail and a two-uid range.
fn fixture(jailed: bool) -> Fixture {
    fixture_with(jailed, None)
}

/// [`fixture`] with `--memory-overcommit`.
fn fixture_with(jailed: bool, memory_overcommit: Option<f64>) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let files = dir.path().join("files");
    std::fs::create_dir_all(&files).unwrap();
    let kernel = files.join("vmlinux");
    let initrd = files.join("initrd.cpio.gz");
    std::fs::write(&kernel, b"kernel").unwrap();
    std::fs::write(&initrd, b"initrd").unwrap();
    let config = DaemonConfig {
        state_dir: dir.path().join("state"),
        vmm: PathBuf::from("/nonexistent/husk-vmm"),
        default_kernel: kernel,
        default_initrd: initrd,
        max_vms: 8,
        jail: jailed.then(|| JailConfig {
            jailer: PathBuf::from("/nonexistent/husk-jailer"),
            uid: 0,
            gid: 0,
        }),
        uid_range: (100_000, 2),
        policy: PathPolicy::new(std::slice::from_ref(&files), &[]),
        controllers: Vec::new(),
        memory_overcommit,
    };
    let host = Arc::new(FakeHost::default());
    let daemon = Daemon::open_on(config.clone(), host.clone()).unwrap();
    let events = daemon.subscribe();
    Fixture {
        config,
        daemon,
        host,
        events,
        files,
        _dir: dir,
    }
}

fn spec(name: &str, tap: bool) -> VmSpec {
    VmSpec {
        name: name.into(),
        network: tap.then(|| Network {
            mode: network::Mode::Tap as i32,
            mac: String::new(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn state(vm: &Vm) -> VmState {
    VmState::try_from(vm.state).unwrap()
}

fn status_of(entry: &VmEntry) -> husk_proto::v1::VmStatus {
    entry.snapshot().status.unwrap_or_default()
}

/// Waits (in the test's paused time) until the VM is in `want`.
async fn wait_for_state(entry: &VmEntry, want: VmState) {
    for _ in 0..1000 {
        if entry.state() == want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("VM {} never became {want:?}: {:?}", entry.id, entry.state());
}

/// The kinds of the events sent so far.
fn kinds(events: &mut broadcast::Receiver<Event>) -> Vec<event::Kind> {
    let mut kinds = Vec::new();
    while let Ok(e) = events.try_recv() {
        kinds.push(event::Kind::try_from(e.kind).unwrap());
    }
    kinds
}

#[tokio::test(start_paused = true)]
async fn a_created_vm_starts_and_runs_its_vmm() {
    let mut f = fixture(false);
    let entry = f.daemon.create(spec("alpha", false)).unwrap();
    assert_eq!(entry.state(), VmState::Created);

    let vm = f.daemon.start(&entry).await.unwrap();

    assert_eq!(state(&vm), VmState::Running);
    let spawns = f.host.spawns();
    assert_eq!(spawns.len(), 1);
    assert_eq!(spawns[0].id, entry.id);
    assert!(!spawns[0].restore);
    assert_eq!(status_of(&entry).vmm_pid, spawns[0].pid);
    assert!(f.daemon.is_live(&entry));
    assert_eq!(
        kinds(&mut f.events),
        [event::Kind::Created, event::Kind::Started]
    );
}

#[tokio::test(start_paused = true)]
async fn a_running_vm_refuses_a_second_start() {
    let f = fixture(false);
    let entry = f.daemon.create(spec("alpha", false)).unwrap();
    f.daemon.start(&entry).await.unwrap();

    let err = f.daemon.start(&entry).await.unwrap_err();

    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("RUNNING"), "{}", err.message());
    assert_eq!(f.host.spawns().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn starts_past_the_memory_overcommit_ratio_are_refused_until_room_is_made() {
    // A ratio that leaves room for 400 MiB of guest memory on this host.
    let host_mib = std::fs::read_to_string("/proc/meminfo")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap()
        / 1024;
    let f = fixture_with(false, Some(400.0 / host_mib as f64));
    let first = f.daemon.create(spec("alpha", false)).unwrap();
    let second = f.daemon.create(spec("beta", false)).unwrap();
    f.daemon.start(&first).await.unwrap();

    let err = f.daemon.start(&second).await.unwrap_err();

    assert_eq!(err.code(), Code::ResourceExhausted);
    assert!(
        err.message().contains("--memory-overcommit"),
        "{}",
        err.message()
    );
    assert_eq!(
        second.state(),
        VmState::Created,
        "a refused start changes nothing"
    );
    assert_eq!(f.host.spawns().len(), 1);
    f.daemon
        .stop(&first, Duration::from_millis(10), true)
        .await
        .unwrap();
    assert_eq!(
        state(&f.daemon.start(&second).await.unwrap()),
        VmState::Running
    );
}

#[tokio::test(start_paused = true)]
async fn a_vmm_that_cannot_start_leaves_the_vm_failed_with_the_reason() {
    let f = fixture(false);
    let entry = f.daemon.create(spec("alpha", false)).unwrap();
    lock(&f.host.recorded).fail_spawn = Some("cannot start husk-vmm: no such file".into());

    let err = f.daemon.start(&entry).await.unwrap_err();

    assert_eq!(err.code(), Code::Internal);
    assert_eq!(entry.state(), VmState::Failed);
    assert_eq!(
        status_of(&entry).failure_reason,
        "cannot start husk-vmm: no such file"
    );
    assert!(!f.daemon.is_live(&entry));
    // A failed VM may be started again.
    lock(&f.host.recorded).fail_spawn = None;
    assert_eq!(
        state(&f.daemon.start(&entry).await.unwrap()),
        VmState::Running
    );
}

#[tokio::test(start_paused = true)]
async fn a_tap_that_cannot_be_made_leaves_the_vm_as_it_was() {
    let f = fixture(false);
    let entry = f.daemon.create(spec("alpha", true)).unwrap();
    lock(&f.host.recorded).fail_link = Some("--net needs root".into());

    let err = f.daemon.start(&entry).await.unwrap_err();

    assert_eq!(err.code(), Code::Unavailable);
    assert!(err.message().contains("needs root"));
    assert_eq!(entry.state(), VmState::Created);
    assert!(f.host.spawns().is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_vmm_that_dies_while_running_fails_the_vm_with_its_last_words() {
    let mut f = fixture(false);
    let entry = f.daemon.create(spec("alpha", false)).unwrap();
    f.daemon.start(&entry).await.unwrap();
    let pid = f.host.spawns()[0].pid;
    std::fs::write(
        entry.dir.join(store::VMM_LOG),
        "starting\nvcpu 0: KVM_RUN failed\n",
    )
    .unwrap();

    f.host.exit(pid, Some(1 << 8)); // exited with status 1
    wait_for_state(&entry, VmState::Failed).await;

    let reason = status_of(&entry).failure_reason;
    assert!(reason.contains("exited with status 1"), "{reason}");
    assert!(reason.ends_with(": vcpu 0: KVM_RUN failed"), "{reason}");
    assert_eq!(status_of(&entry).vmm_pid, 0);
    assert!(!f.daemon.is_live(&entry));
    assert_eq!(kinds(&mut f.events).last(), Some(&event::Kind::Failed));
}

#[tokio::test(start_paused = true)]
async fn a_vmm_that_reports_the_guests_exit_code_stops_the_vm_with_it() {
    let mut f = fixture(false);
    let mut with_app = spec("alpha", false);
    with_app.command = vec!["/bin/true".into()];
    let entry = f.daemon.create(with_app).unwrap();
    f.daemon.start(&entry).await.unwrap();
    let report = ExitReport {
        guest_exit_code: Some(3),
        exit_status: 0,
        reason: "guest exited".into(),
    };
    std::fs::write(entry.dir.join(store::EXIT_REPORT), report.encode_to_vec()).unwrap();

    f.host.exit(f.host.spawns()[0].pid, Some(0));
    wait_for_state(&entry, VmState::Stopped).await;

    assert_eq!(status_of(&entry).exit_code, Some(3));
    assert_eq!(status_of(&entry).failure_reason, "guest exited");
    let kinds = kinds(&mut f.events);
    assert_eq!(
        kinds[kinds.len() - 2..],
        [event::Kind::AppExited, event::Kind::Stopped]
    );
}

#[tokio::test(start_paused = true)]
async fn a_stop_kills_a_vmm_whose_guest_does_not_answer_and_records_a_stop() {
    let f = fixture(false);
    let entry = f.daemon.create(spec("alpha", false)).unwrap();
    f.daemon.start(&entry).await.unwrap();
    let pid = f.host.spawns()[0].pid;

    let vm = f.daemon.stop(&entry, Duration::ZERO, false).await.unwrap();

    assert_eq!(state(&vm), VmState::Stopped);
    assert_eq!(status_of(&entry).failure_reason, "");
    assert_eq!(lock(&f.host.recorded).kills, [pid]);
}

#[tokio::test(start_paused = true)]
async fn a_stop_that_arrives_while_the_vm_starts_waits_for_the_start_and_then_stops_it() {
    let f = fixture(false);
    let entry = f.daemon.create(spec("alpha", false)).unwrap();
    // Hold the VM's operation lock as a start in progress does, and queue a start and a stop.
    let op = entry.op.lock().await;
    let start = tokio::spawn({
        let (daemon, entry) = (f.daemon.clone(), entry.clone());
        async move { daemon.start(&entry).await }
    });
    tokio::task::yield_now().await;
    let stop = tokio::spawn({
        let (daemon, entry) = (f.daemon.clone(), entry.clone());
        async move { daemon.stop(&entry, Duration::ZERO, true).await }
    });
    tokio::task::yield_now().await;
    assert!(f.host.spawns().is_empty());

    drop(op);
    let started = start.await.unwrap().unwrap();
    let stopped = stop.await.unwrap().unwrap();

    assert_eq!(state(&started), VmState::Running);
    assert_eq!(state(&stopped), VmState::Stopped);
    assert_eq!(f.host.spawns().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_stop_of_a_vm_that_is_not_running_is_refused() {
    let f = fixture(false);
    let entry = f.daemon.create(spec("alpha", false)).unwrap();

    let err = f
        .daemon
        .stop(&entry, Duration::ZERO, true)
        .await
        .unwrap_err();

    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("CREATED"), "{}", err.message());
}

#[tokio::test(start_paused = true)]
async fn a_running_vm_is_deleted_only_with_force_which_kills_its_vmm() {
    let mut f = fixture(false);
    let entry = f.daemon.create(spec("alpha", false)).unwrap();
    f.daemon.start(&entry).await.unwrap();
    let pid = f.host.spawns()[0].pid;

    let refused = f.daemon.delete(&entry, false).await.unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert_eq!(entry.state(), VmState::Running);

    f.daemon.delete(&entry, true).await.unwrap();

    assert_eq!(lock(&f.host.recorded).kills, [pid]);
    assert!(!entry.dir.exists());
    assert_eq!(f.daemon.get("alpha").unwrap_err().code(), Code::NotFound);
    assert_eq!(kinds(&mut f.events).last(), Some(&event::Kind::Deleted));
}

#[tokio::test(start_paused = true)]
async fn a_vms_uid_is_held_from_create_to_delete_and_then_free_again() {
    let f = fixture(true);
    let a = f.daemon.create(spec("a", false)).unwrap();
    let b = f.daemon.create(spec("b", false)).unwrap();
    assert_eq!(status_of(&a).jail_uid, 100_000);
    assert_eq!(status_of(&b).jail_uid, 100_001);
    // The range (two uids) is used up, running or not.
    let full = f.daemon.create(spec("c", false)).unwrap_err();
    assert_eq!(full.code(), Code::ResourceExhausted);
    f.daemon.start(&a).await.unwrap();
    assert_eq!(f.host.spawns()[0].uid, 100_000);
    f.daemon.stop(&a, Duration::ZERO, true).await.unwrap();
    assert_eq!(
        f.daemon.create(spec("c", false)).unwrap_err().code(),
        Code::ResourceExhausted
    );

    f.daemon.delete(&a, false).await.unwrap();

    let c = f.daemon.create(spec("c", false)).unwrap();
    assert_eq!(status_of(&c).jail_uid, 100_000);
}

#[tokio::test(start_paused = true)]
async fn a_crashed_vmms_tap_and_jail_are_released() {
    let f = fixture(true);
    let entry = f.daemon.create(spec("alpha", true)).unwrap();
    f.daemon.start(&entry).await.unwrap();
    let pid = f.host.spawns()[0].pid;
    assert_eq!(status_of(&entry).tap, "husk0");
    // huskd closed its copy: only the VMM holds the tap now.
    assert!(f.host.tap_open(0));

    f.host.exit(pid, Some(KILLED));
    wait_for_state(&entry, VmState::Failed).await;

    assert!(!f.host.tap_open(0), "the tap outlived its VMM");
    assert_eq!(
        lock(&f.host.recorded).released_jails,
        vec![entry.id.clone()]
    );
    assert!(status_of(&entry)
        .failure_reason
        .contains("killed by signal 9"));
    assert!(!entry.dir.join(store::PID_FILE).exists());
    assert!(!f.daemon.is_live(&entry));
}

/// Writes a snapshot directory of a VM with `spec` (its state and memory are opaque here).
fn write_snapshot(dir: &Path, spec: VmSpec) {
    std::fs::create_dir_all(dir).unwrap();
    let record = Vm {
        id: "0123456789abcdef".into(),
        spec: Some(spec),
        state: VmState::Running as i32,
        status: None,
    };
    std::fs::write(dir.join("vm.pb"), record.encode_to_vec()).unwrap();
    std::fs::write(dir.join("vm.state"), b"state").unwrap();
    std::fs::write(dir.join("vm.mem"), b"mem").unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_restore_goes_through_the_same_launch_with_a_link_of_its_own() {
    let f = fixture(true);
    let source = f.daemon.create(spec("source", true)).unwrap();
    let source_spec = source.snapshot().spec.unwrap();
    let snapshot = f.files.join("snap");
    write_snapshot(&snapshot, source_spec);

    let vm = f
        .daemon
        .restore_vm(RestoreVmRequest {
            dir: snapshot.display().to_string(),
            name: "clone".into(),
            start_paused: true,
            ..Default::default()
        })
        .await
        .unwrap();

    assert_eq!(state(&vm), VmState::Paused);
    let spawns = f.host.spawns();
    assert_eq!(spawns.len(), 1);
    assert!(spawns[0].restore && spawns[0].start_paused);
    assert_eq!(spawns[0].id, vm.id);
    assert_eq!(spawns[0].uid, 100_001);
    // The clone's own link, which the guest is told about once its agent answers.
    assert_eq!(spawns[0].mac, Some([6, 0, 169, 254, 128, 2]));
    assert_eq!(vm.status.unwrap().guest_ip, "169.254.128.2");
}

#[tokio::test(start_paused = true)]
async fn a_restore_whose_vmm_cannot_start_leaves_no_vm_behind() {
    let f = fixture(false);
    let snapshot = f.files.join("snap");
    write_snapshot(
        &snapshot,
        f.daemon
            .create(spec("source", false))
            .unwrap()
            .snapshot()
            .spec
            .unwrap(),
    );
    lock(&f.host.recorded).fail_spawn = Some("no husk-vmm".into());

    let err = f
        .daemon
        .restore_vm(RestoreVmRequest {
            dir: snapshot.display().to_string(),
            name: "clone".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();

    assert_eq!(err.code(), Code::Internal);
    assert_eq!(f.daemon.get("clone").unwrap_err().code(), Code::NotFound);
}

#[tokio::test(start_paused = true)]
async fn a_restarted_daemon_adopts_a_vmm_that_still_runs_and_records_the_end_of_one_that_died() {
    let f = fixture(false);
    let alive = f.daemon.create(spec("alive", false)).unwrap();
    let dead = f.daemon.create(spec("dead", false)).unwrap();
    let starting = f.daemon.create(spec("starting", false)).unwrap();
    f.daemon.start(&alive).await.unwrap();
    f.daemon.start(&dead).await.unwrap();
    starting.update(|vm| vm.state = VmState::Starting as i32);
    // "alive" is this test process (pid and start time), "dead" a pid that no longer exists.
    let me = std::process::id();
    let ticks = store::process_start_ticks(me).unwrap();
    store::save_pid(&alive.dir, me, ticks).unwrap();
    drop(f.daemon);

    let host = Arc::new(FakeHost::default());
    let daemon = Daemon::open_on(f.config.clone(), host.clone()).unwrap();

    let get = |name: &str| daemon.get(name).unwrap();
    assert_eq!(state(&get("alive")), VmState::Running);
    assert!(
        lock(&host.recorded).exits.contains_key(&me),
        "the adopted VMM is watched"
    );
    assert_eq!(state(&get("dead")), VmState::Failed);
    let reason = get("dead").status.unwrap().failure_reason;
    assert!(reason.contains("without an exit report"), "{reason}");
    assert_eq!(state(&get("starting")), VmState::Failed);
    let reason = get("starting").status.unwrap().failure_reason;
    assert!(
        reason.starts_with("huskd ended while starting the VM"),
        "{reason}"
    );
    assert!(host.spawns().is_empty(), "adoption starts nothing");
    // The adopted VMM's end is recorded like any other.
    host.exit(me, None);
    wait_for_state(&daemon.resolve("alive").unwrap(), VmState::Failed).await;
}

fn published(spec: &mut VmSpec, host_port: u32, guest_port: u32) {
    let network = spec.network.get_or_insert_with(Default::default);
    network.ports.push(husk_proto::v1::PortMapping {
        host_port,
        guest_port,
        ..Default::default()
    });
    network.egress = Some(husk_proto::v1::Egress {
        allow: Vec::new(),
        deny: vec!["10.0.0.0/8".into()],
        host_access: false,
    });
}

#[tokio::test(start_paused = true)]
async fn a_vms_firewall_rules_are_applied_at_start_and_removed_when_its_vmm_ends() {
    let f = fixture(false);
    lock(&f.host.recorded).dns = Some([192, 0, 2, 53].into());
    let mut with_ports = spec("alpha", true);
    published(&mut with_ports, 8080, 80);
    let entry = f.daemon.create(with_ports).unwrap();

    f.daemon.start(&entry).await.unwrap();

    let rules = lock(&f.host.recorded).firewall["husk0"].clone();
    assert_eq!(rules.guest_ip.to_string(), "169.254.128.2");
    assert_eq!(rules.dns, Some([192, 0, 2, 53].into()));
    assert_eq!(rules.published[0].to_string(), "8080:80/tcp");
    assert_eq!(rules.egress.deny[0].to_string(), "10.0.0.0/8");
    assert!(
        f.host.spawns()[0].dns,
        "the guest is told to resolve through the host"
    );
    let status = status_of(&entry);
    assert_eq!(status.published_ports.len(), 1);
    assert_eq!(status.published_ports[0].host_port, 8080);
    assert_eq!(status.egress.unwrap().deny, ["10.0.0.0/8"]);
    assert!(status.dns);

    // The VMM is killed (kill -9): its tap goes with it, and so do its rules.
    f.host.exit(f.host.spawns()[0].pid, Some(KILLED));
    wait_for_state(&entry, VmState::Failed).await;
    assert!(f.host.firewalled().is_empty(), "{:?}", f.host.firewalled());
}

#[tokio::test(start_paused = true)]
async fn a_host_without_a_usable_resolver_gives_the_guest_no_dns_but_its_link_still_works() {
    let f = fixture(false);
    let entry = f.daemon.create(spec("alpha", true)).unwrap();

    f.daemon.start(&entry).await.unwrap();

    assert_eq!(lock(&f.host.recorded).firewall["husk0"].dns, None);
    assert!(!f.host.spawns()[0].dns);
    assert!(!status_of(&entry).dns);
}

#[tokio::test(start_paused = true)]
async fn a_vm_without_a_tap_gets_no_firewall_rules() {
    let f = fixture(false);
    let entry = f.daemon.create(spec("alpha", false)).unwrap();
    f.daemon.start(&entry).await.unwrap();
    assert!(f.host.firewalled().is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_vm_in_a_joined_namespace_takes_its_interfaces_identity_and_gives_it_back() {
    let f = fixture(false);
    let mut netns = spec("pod", false);
    netns.network = Some(Network {
        mode: network::Mode::Netns as i32,
        netns: "/var/run/netns/cni-1".into(),
        ..Default::default()
    });
    let entry = f.daemon.create(netns).unwrap();
    f.daemon.start(&entry).await.unwrap();
    let joined = vec![("/var/run/netns/cni-1".to_string(), "eth0".to_string())];
    assert_eq!(lock(&f.host.recorded).joined, joined);
    // The namespace's owner keeps its rules: husk adds none.
    assert!(f.host.firewalled().is_empty());
    let status = status_of(&entry);
    assert_eq!(
        (status.guest_ip.as_str(), status.host_ip.as_str()),
        ("10.88.0.7", "10.88.0.1")
    );
    assert!(!status.dns);
    let spawned = &f.host.spawns()[0];
    assert_eq!(
        spawned.mac,
        Some([2, 0x42, 10, 88, 0, 7]),
        "the interface's MAC"
    );
    assert!(lock(&f.host.recorded).left.is_empty());

    // A second VM in the same namespace would take eth0 from the first: refused.
    let mut second = spec("pod2", false);
    second.network = entry.snapshot().spec.unwrap().network;
    let second = f.daemon.create(second).unwrap();
    let refused = f.daemon.start(&second).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
    assert!(
        refused.message().contains("pod has joined it"),
        "{}",
        refused.message()
    );
    assert_eq!(lock(&f.host.recorded).joined.len(), 1);

    f.host.exit(spawned.pid, Some(KILLED));
    wait_for_state(&entry, VmState::Failed).await;
    assert_eq!(lock(&f.host.recorded).left, joined);
    // Once the first has ended, the namespace is free.
    f.daemon.start(&second).await.unwrap();
    assert_eq!(lock(&f.host.recorded).joined.len(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_restarted_daemon_removes_the_rules_of_vms_that_ended_while_it_was_away() {
    let f = fixture(false);
    let entry = f.daemon.create(spec("alpha", true)).unwrap();
    f.daemon.start(&entry).await.unwrap();
    assert_eq!(f.host.firewalled(), ["husk0"]);
    let collections = lock(&f.host.recorded).firewall_collections;
    // huskd is killed; then its VMM dies too, unwatched (its tap goes, its rules stay).
    drop(f.daemon);
    lock(&f.host.recorded).vmm_taps.clear();
    assert_eq!(f.host.firewalled(), ["husk0"]);

    let _daemon = Daemon::open_on(f.config.clone(), f.host.clone()).unwrap();

    assert!(lock(&f.host.recorded).firewall_collections > collections);
    assert!(f.host.firewalled().is_empty());
}

fn rate_update(disk: Option<u32>, rate: u64) -> husk_proto::v1::UpdateRateLimitsRequest {
    use husk_proto::v1::{DiskRateLimit, RateLimit, TokenBucket};
    let limit = RateLimit {
        bandwidth: Some(TokenBucket { rate, burst: 0 }),
        ops: None,
    };
    husk_proto::v1::UpdateRateLimitsRequest {
        vm: "alpha".into(),
        disks: disk
            .map(|disk| DiskRateLimit {
                disk,
                limit: Some(limit),
            })
            .into_iter()
            .collect(),
        net_rx: disk.is_none().then_some(limit),
        net_tx: None,
    }
}

#[tokio::test(start_paused = true)]
async fn rate_limits_of_a_missing_vm_are_not_found_and_of_a_stopped_vm_a_failed_precondition() {
    let f = fixture(false);
    assert_eq!(f.daemon.resolve("nope").unwrap_err().code(), Code::NotFound);
    let entry = f.daemon.create(spec("alpha", true)).unwrap();
    let err = f
        .daemon
        .update_rate_limits(&entry, &rate_update(None, 1000))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
}

#[tokio::test(start_paused = true)]
async fn bad_rate_limits_are_invalid_argument_before_the_vmm_is_asked() {
    let f = fixture(false);
    let entry = f.daemon.create(spec("alpha", false)).unwrap();
    let err = f
        .daemon
        .update_rate_limits(&entry, &rate_update(None, 0))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    f.daemon.start(&entry).await.unwrap();
    // No network and no disk 0 on this VM: refused without a control-socket call.
    for request in [rate_update(None, 10), rate_update(Some(0), 10)] {
        let err = f
            .daemon
            .update_rate_limits(&entry, &request)
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_restarted_daemon_applies_again_the_rules_of_a_vm_it_adopts() {
    let f = fixture(false);
    lock(&f.host.recorded).dns = Some([192, 0, 2, 53].into());
    let mut with_ports = spec("alive", true);
    published(&mut with_ports, 8080, 80);
    let entry = f.daemon.create(with_ports).unwrap();
    f.daemon.start(&entry).await.unwrap();
    let before = lock(&f.host.recorded).firewall["husk0"].clone();
    // Its VMM is this test process (pid and start time); huskd is killed.
    let me = std::process::id();
    store::save_pid(&entry.dir, me, store::process_start_ticks(me).unwrap()).unwrap();
    drop(f.daemon);

    // A fresh host whose table is empty (flushed), where the VM's tap still exists.
    let host = Arc::new(FakeHost::default());
    lock(&host.recorded).dns = Some([192, 0, 2, 53].into());
    let _tap = host.create_link().unwrap();
    let _daemon = Daemon::open_on(f.config.clone(), host.clone()).unwrap();

    assert_eq!(host.firewalled(), ["husk0"]);
    assert_eq!(lock(&host.recorded).firewall["husk0"], before);
}

/// A template whose VM never gets an agent (the fake host runs no guest): the build fails
/// with DEADLINE_EXCEEDED, leaves the template FAILED with the reason, and neither its VM nor a
/// build directory behind.
#[tokio::test(start_paused = true)]
async fn a_template_build_that_never_gets_an_agent_fails_and_leaves_nothing() {
    use husk_proto::v1::{template, CreateTemplateRequest};
    let f = fixture(false);
    let e = f
        .daemon
        .create_template(CreateTemplateRequest {
            name: "t".into(),
            spec: Some(VmSpec::default()),
            replace: false,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::DeadlineExceeded, "{e:?}");
    let t = f.daemon.get_template("t").unwrap();
    assert_eq!(t.state, template::State::Failed as i32);
    assert!(t.reason.contains("did not answer"), "{}", t.reason);
    assert!(
        f.daemon.list(&HashMap::new()).is_empty(),
        "the template's VM is gone"
    );
    let build_dir = f.config.state_dir.join("templates/t").join(&t.build);
    assert!(!build_dir.exists());
    // A clone of a failed template is refused with the reason; an unknown one is NOT_FOUND.
    let e = f
        .daemon
        .clone_template("t", &VmSpec::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    let e = f
        .daemon
        .clone_template("nope", &VmSpec::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    // Deleting it removes the record and its directory.
    f.daemon.delete_template("t").unwrap();
    assert_eq!(
        f.daemon.delete_template("t").unwrap_err().code(),
        Code::NotFound
    );
    assert!(!f.config.state_dir.join("templates/t").exists());
}

/// A template spec that clones could not share is refused before anything is made.
#[tokio::test(start_paused = true)]
async fn a_template_with_a_command_or_a_shared_writable_disk_is_refused() {
    use husk_proto::v1::{CreateTemplateRequest, Disk};
    let f = fixture(false);
    let disk = f.files.join("d.raw");
    std::fs::write(&disk, b"disk").unwrap();
    for spec in [
        VmSpec {
            command: vec!["true".into()],
            ..Default::default()
        },
        VmSpec {
            disks: vec![Disk {
                path: disk.display().to_string(),
                ..Default::default()
            }],
            ..Default::default()
        },
    ] {
        let e = f
            .daemon
            .create_template(CreateTemplateRequest {
                name: "t".into(),
                spec: Some(spec),
                replace: false,
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    }
    let bad_name = f
        .daemon
        .create_template(CreateTemplateRequest {
            name: "../x".into(),
            spec: Some(VmSpec::default()),
            replace: false,
        })
        .await
        .unwrap_err();
    assert_eq!(bad_name.code(), Code::InvalidArgument);
    assert!(f.daemon.list_templates().is_empty());
}

/// A huskd that ended during a build finds the template FAILED when it starts again, and an
/// orphaned build directory is removed.
#[tokio::test(start_paused = true)]
async fn a_build_interrupted_by_a_restart_is_recorded_failed() {
    use husk_proto::v1::{template, Template};
    let f = fixture(false);
    let dir = f.config.state_dir.join("templates/t");
    std::fs::create_dir_all(dir.join("orphan")).unwrap();
    // The VM the interrupted build ran in is named in its directory; another VM that merely
    // carries the same label is a user's and stays.
    let labelled = |name: &str| VmSpec {
        labels: [(super::templates::BUILDER_LABEL.to_string(), "t".to_string())].into(),
        ..spec(name, false)
    };
    let builder = f.daemon.create(labelled("builder")).unwrap();
    let users = f.daemon.create(labelled("users")).unwrap();
    std::fs::write(dir.join("orphan/builder.id"), &builder.id).unwrap();
    let record = Template {
        name: "t".into(),
        state: template::State::Building as i32,
        build: "current".into(),
        ..Default::default()
    };
    std::fs::write(dir.join("template.pb"), record.encode_to_vec()).unwrap();
    let daemon = Daemon::open_on(f.config.clone(), f.host.clone()).unwrap();
    let t = daemon.get_template("t").unwrap();
    assert_eq!(t.state, template::State::Failed as i32);
    assert!(t.reason.contains("huskd ended"), "{}", t.reason);
    for _ in 0..100 {
        if !dir.join("orphan").exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(!dir.join("orphan").exists(), "the orphaned build is swept");
    assert!(dir.join("template.pb").exists());
    assert_eq!(
        daemon.get(&builder.id).unwrap_err().code(),
        Code::NotFound,
        "the interrupted build's VM is deleted"
    );
    assert!(
        daemon.get(&users.id).is_ok(),
        "a user's VM with the label stays"
    );
}
