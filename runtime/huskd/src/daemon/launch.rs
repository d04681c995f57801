//! The one launch sequence of a boot (StartVm) and a restore (RestoreVm), the monitor that
//! turns the VMM's end into STOPPED or FAILED, and what that end leaves to clean.

use std::net::Ipv4Addr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use husk_host::confined::Dir;
use husk_host::firewall::{NetworkPolicy, Protocol, VmRules};
use husk_host::net::{LinkKind, VmLink};
use husk_proto::v1::{event, network, port_mapping, Egress, PortMapping, Vm, VmSpec, VmState};
use husk_proto::vmm::ExitReport;
use prost::Message;
use tokio::sync::watch;
use tonic::Status;

use super::host::ExitWait;
use super::vm::{lock, now_ms, RunHandle, VmEntry};
use super::{policy_status, Daemon};
use crate::store;
use crate::validate;
use crate::vmm_process::{self, Launch, Restore, RunFiles};

/// Who finds out that a VM's guest agent is ready.
pub(super) enum ReadyWatch {
    /// A booted VM: its agent is polled, and the time to its answer observed as "boot".
    Boot,
    /// A VMM an earlier huskd started: polled, not timed.
    Adopted,
    /// A restore: `after_restore` marks it ready once the clone took its identity.
    ByRestore,
}

/// A restore to launch: the snapshot's files, and what the clone is told once it runs.
pub(super) struct RestoreLaunch {
    pub files: Restore,
    /// The clone's new host name; empty: the snapshot's.
    pub hostname: String,
    /// Hears whether the clone took its new identity (CreateVm from a template waits for it).
    pub identity_taken: Option<tokio::sync::oneshot::Sender<Result<(), String>>>,
}

/// The most `vmm.log` keeps across runs: past it, the log starts over at the next start (the
/// VMM caps what it writes in one run itself).
const VMM_LOG_KEEP: u64 = 1 << 20;

impl Daemon {
    /// Starts the VM's VMM: CREATED, STOPPED or FAILED -> STARTING -> RUNNING.
    pub async fn start(self: &Arc<Self>, entry: &Arc<VmEntry>) -> Result<Vm, Status> {
        let _op = entry.op.lock().await;
        if !matches!(
            entry.state(),
            VmState::Created | VmState::Stopped | VmState::Failed
        ) {
            return Err(entry.wrong_state("StartVm"));
        }
        let spec = entry.snapshot().spec.unwrap_or_default();
        self.launch(entry, &spec, None).await
    }

    /// The one launch sequence of a boot (StartVm) and a restore (RestoreVm): files opened by
    /// fd, the tap, STARTING recorded before the VMM exists (so that a huskd that dies in
    /// between finds and cleans what it left), the spawn, then RUNNING (or PAUSED). The caller
    /// holds the VM's operation lock.
    pub(super) async fn launch(
        self: &Arc<Self>,
        entry: &Arc<VmEntry>,
        spec: &VmSpec,
        restore: Option<RestoreLaunch>,
    ) -> Result<Vm, Status> {
        // Before anything is made for the VM: a refusal leaves nothing to clean up.
        let t0 = std::time::Instant::now();
        let admitted = self.admit_memory(entry, spec)?;
        let start_paused = restore.as_ref().is_some_and(|r| r.files.start_paused);
        let is_restore = restore.is_some();
        let (restore, follow_up) = match restore {
            Some(r) => (Some(r.files), Some((r.hostname, r.identity_taken))),
            None => (None, None),
        };
        let files = self.open_run_files(entry, spec, restore.is_none())?;
        let net_mode = spec
            .network
            .as_ref()
            .and_then(|n| network::Mode::try_from(n.mode).ok())
            .unwrap_or(network::Mode::None);
        let network = spec.network.clone().unwrap_or_default();
        let mut link = match net_mode {
            network::Mode::Tap => Some(
                self.host
                    .create_link()
                    .map_err(|e| Status::unavailable(e.to_string()))?,
            ),
            network::Mode::Netns => {
                // One VM per namespace: a second (a clone of the first, say) would take the
                // interface away from it.
                if let Some(other) = self.netns_user(&network.netns, &entry.id) {
                    return Err(Status::failed_precondition(format!(
                        "network.netns {}: VM {other} has joined it already",
                        network.netns
                    )));
                }
                Some(
                    self.host
                        .join_netns(Path::new(&network.netns), &network.netns_interface)
                        .map_err(|e| Status::failed_precondition(e.to_string()))?,
                )
            }
            network::Mode::None => None,
        };
        if let (Some(link), Some(mac)) = (
            link.as_mut(),
            spec.network
                .as_ref()
                .and_then(|n| validate::parse_mac(&n.mac)),
        ) {
            link.mac = mac;
        }
        // The link's firewall (NAT, DNS, published ports, egress policy), before the VMM
        // exists: a tap without its rules never carries traffic.
        // A joined namespace has its owner's rules, not husk's.
        let (policy, dns) = match &link {
            Some(link) if link.kind == LinkKind::Tap => self.install_firewall(entry, spec, link)?,
            _ => Default::default(),
        };
        let cid = entry.snapshot().status.as_ref().map_or(3, |s| s.vsock_cid);
        let t_net = t0.elapsed();
        entry.update(|vm| {
            vm.state = VmState::Starting as i32;
            VmEntry::status_mut(vm).failure_reason.clear();
        });
        // The VM counts itself from here on.
        drop(admitted);
        let launch = Launch {
            jail: self.config.jail.as_ref(),
            controllers: &self.config.controllers,
            uid: entry.vmm_uid(),
            id: &entry.id,
            vmm: &self.config.vmm,
            dir: &entry.dir,
            spec,
            limits: vmm_process::effective_limits(spec),
            vsock_cid: cid,
            link: link.as_ref(),
            dns: dns.is_some(),
            restore,
            files,
        };
        let pid = match self.spawn_vmm(entry, &launch) {
            Ok(pid) => pid,
            Err(e) => {
                let reason = e.to_string();
                tracing::warn!(vm_id = %entry.id, error = %reason, "cannot start husk-vmm");
                entry.update(|vm| {
                    vm.state = VmState::Failed as i32;
                    VmEntry::status_mut(vm).failure_reason = reason.clone();
                });
                drop(launch);
                drop(link);
                self.collect_firewall_garbage(entry);
                self.leave_netns(entry, spec);
                return Err(Status::internal(reason));
            }
        };
        tracing::debug!(
            vm_id = %entry.id,
            files_and_network_ms = t_net.as_millis() as u64,
            spawned_ms = t0.elapsed().as_millis() as u64,
            "launch steps"
        );
        let (tap, host_ip, guest_ip) = link_addresses(link.as_ref());
        // A restored guest kept the snapshot's MAC and addresses: it gets the new link's.
        let net_config = link
            .as_ref()
            .filter(|_| is_restore)
            .map(super::agent::net_config);
        let follow_up = follow_up.map(|(hostname, done)| {
            let identity = super::agent::CloneIdentity {
                network: net_config,
                hostname,
            };
            (identity, done)
        });
        // husk-vmm holds the tap and files now: with huskd's copies closed, they live as long
        // as the VMM. The shared directories' virtiofsd quit when the VMM's ends close; they
        // are kept to be reaped when the VMM's end is recorded.
        let mut launch = launch;
        let mut shares = std::mem::take(&mut launch.files.shares);
        shares.iter_mut().for_each(|s| s.close_vmm_end());
        *lock(&entry.shares) = shares;
        drop(launch);
        drop(link);
        let state = if start_paused {
            VmState::Paused
        } else {
            VmState::Running
        };
        let vm = entry.update(|vm| {
            vm.state = state as i32;
            let status = VmEntry::status_mut(vm);
            status.vmm_pid = pid;
            status.exit_code = None;
            status.failure_reason.clear();
            status.started_unix_ms = now_ms();
            status.stopped_unix_ms = 0;
            status.tap = tap;
            status.host_ip = host_ip;
            status.guest_ip = guest_ip;
            status.published_ports = published_ports(&policy);
            status.egress = egress(&policy);
            status.dns = dns.is_some();
            status.agent_ready = false;
            // A fresh VMM starts with its disk slots empty.
            status.attached_disks.clear();
            let spec = vm.spec.clone().unwrap_or_default();
            crate::rate_limits::set_status_at_start(VmEntry::status_mut(vm), &spec);
        });
        tracing::info!(vm_id = %entry.id, pid, restore = is_restore, "husk-vmm started");
        self.emit(entry, event::Kind::Started, None, String::new());
        match self.host.watch(pid) {
            Ok(Some(exited)) => {
                // A restored guest is ready once it took its new identity (after_restore); a
                // booted one when its agent first answers.
                let ready = if is_restore {
                    ReadyWatch::ByRestore
                } else {
                    ReadyWatch::Boot
                };
                let ended = self.watch_run(entry, pid, exited, ready);
                if let Some((identity, done)) = follow_up {
                    let daemon = self.clone();
                    let entry = entry.clone();
                    tokio::spawn(async move {
                        daemon.after_restore(&entry, ended, identity, done).await
                    });
                }
            }
            // Gone already (it could not start): record how it ended.
            _ => {
                self.record_end(entry, None, false);
                if let Some((_, Some(done))) = follow_up {
                    let _ = done.send(Err("the VMM ended at once".into()));
                }
            }
        }
        Ok(vm)
    }

    /// Opens what one run of the VM's VMM needs, all by fd: kernel and initrd (for a boot),
    /// disks under the path policy, and the console, exit report and log in huskd's own VM
    /// directory. The `vmm/` directory is made anew, empty and owned by the VM's uid.
    fn open_run_files(
        &self,
        entry: &VmEntry,
        spec: &VmSpec,
        boot: bool,
    ) -> Result<RunFiles, Status> {
        let policy = &self.policy_for(entry);
        let open = |what: &str, path: &str, write: bool| {
            policy
                .open_file(what, Path::new(path), write)
                .map(|o| o.file)
                .map_err(|e| policy_status(e, |m: String| Status::failed_precondition(m)))
        };
        let (kernel, initrd) = if boot {
            (
                Some(open("kernel", &spec.kernel, false)?),
                Some(open("initrd", &spec.initrd, false)?),
            )
        } else {
            (None, None)
        };
        let internal = |what: &str| {
            let what = what.to_string();
            move |e: std::io::Error| Status::internal(format!("{what}: {e}"))
        };
        let dir = Dir::open(&entry.dir).map_err(internal("the VM's directory"))?;
        let disks = super::run_disks::open_all(policy, &dir, spec)?;
        let vmm_dir = dir
            .create_subdir(store::VMM_DIR, store::DIR_MODE, true)
            .map_err(internal("the VMM's directory"))?;
        self.host
            .give_dir(vmm_dir.fd(), entry.vmm_uid())
            .map_err(internal("the VMM's directory"))?;
        let console = dir
            .create_file(store::CONSOLE_LOG, store::FILE_MODE, true, None)
            .map_err(internal("the console log"))?;
        let exit_report = dir
            .create_file(store::EXIT_REPORT, store::FILE_MODE, false, None)
            .map_err(internal("the exit report"))?;
        let log = open_vmm_log(&dir).map_err(internal("vmm.log"))?;
        let shares = if boot {
            start_shares(policy, spec)?
        } else {
            Vec::new()
        };
        Ok(RunFiles {
            kernel,
            initrd,
            disks,
            console,
            exit_report,
            log,
            shares,
        })
    }

    /// Starts the VM's husk-vmm and records its pid (with its start time, against pid reuse).
    fn spawn_vmm(&self, entry: &VmEntry, launch: &Launch<'_>) -> Result<u32, super::HostError> {
        let pid = self.host.spawn(launch)?;
        let ticks = store::process_start_ticks(pid).unwrap_or(0);
        if let Err(e) = store::save_pid(&entry.dir, pid, ticks) {
            tracing::warn!(vm_id = %entry.id, error = %e, "cannot save the VMM's pid");
        }
        Ok(pid)
    }

    /// Starts the monitor and agent-readiness tasks of a running VMM; the receiver turns true
    /// once its end is recorded.
    pub(super) fn watch_run(
        self: &Arc<Self>,
        entry: &Arc<VmEntry>,
        pid: u32,
        exited: ExitWait,
        ready: ReadyWatch,
    ) -> watch::Receiver<bool> {
        let (ended_tx, ended_rx) = watch::channel(false);
        let stop_requested = Arc::new(AtomicBool::new(false));
        *lock(&entry.run) = Some(RunHandle {
            pid,
            ended: ended_rx.clone(),
            stop_requested: stop_requested.clone(),
        });
        let daemon = self.clone();
        let monitored = entry.clone();
        tokio::spawn(async move {
            let status = exited.await;
            let stopped = stop_requested.load(Ordering::SeqCst);
            daemon.record_end(&monitored, status, stopped);
            let _ = ended_tx.send(true);
        });
        let daemon = self.clone();
        let ready_entry = entry.clone();
        let ended = ended_rx.clone();
        let timed = match ready {
            ReadyWatch::Boot => Some(Some("boot")),
            ReadyWatch::Adopted => Some(None),
            ReadyWatch::ByRestore => None,
        };
        if let Some(kind) = timed {
            tokio::spawn(async move { daemon.await_agent(&ready_entry, ended, kind).await });
        }
        ended_rx
    }

    /// Records how a VMM ended, from its exit report and wait status, and cleans its run files
    /// and jail.
    pub(super) fn record_end(
        &self,
        entry: &Arc<VmEntry>,
        wait_status: Option<i32>,
        stop_requested: bool,
    ) {
        // Written by the VMM into the file huskd gave it; empty when the VMM was killed first.
        // Bounded and never through a link, like everything huskd reads of a VMM's.
        let report = Dir::open(&entry.dir)
            .and_then(|dir| dir.read_bounded(store::EXIT_REPORT, store::MAX_EXIT_REPORT))
            .ok()
            .flatten()
            .filter(|bytes| !bytes.is_empty())
            .and_then(|bytes| ExitReport::decode(&bytes[..]).ok());
        store::remove_run_files(&entry.dir);
        // The VMM is gone, and with it the shared directories' connections: reap virtiofsd.
        lock(&entry.shares).clear();
        // The VM's tap went with its VMM: its firewall rules are garbage now.
        if !lock(&entry.record)
            .status
            .as_ref()
            .is_none_or(|s| s.tap.is_empty())
        {
            self.collect_firewall_garbage(entry);
        }
        if let Some(spec) = lock(&entry.record).spec.clone() {
            self.leave_netns(entry, &spec);
        }
        // The jail's cgroup (and anything left in it) and directory, also after a kill -9 or
        // when the VMM ended while no huskd watched.
        if let Some(jail) = &self.config.jail {
            if let Err(e) = self.host.release_jail(jail, &entry.id) {
                tracing::warn!(vm_id = %entry.id, error = %e, "cannot clean up the VM's jail");
            }
        }
        *lock(&entry.run) = None;
        let has_app = lock(&entry.record)
            .spec
            .as_ref()
            .is_some_and(|s| !s.command.is_empty());
        let guest_code = report.as_ref().and_then(|r| r.guest_exit_code);
        let failure = match (&report, wait_status) {
            _ if stop_requested => None,
            (Some(r), _) if guest_code.is_some() || r.exit_status == 0 => None,
            (Some(r), _) => Some(format!(
                "husk-vmm ended: {} (status {})",
                r.reason, r.exit_status
            )),
            (None, Some(status)) => Some(format!(
                "husk-vmm {} without an exit report{}",
                vmm_process::describe_wait_status(status),
                last_log_line(&entry.dir)
            )),
            (None, None) => Some(format!(
                "husk-vmm ended without an exit report (killed?){}",
                last_log_line(&entry.dir)
            )),
        };
        entry.update(|vm| {
            vm.state = if failure.is_some() {
                VmState::Failed as i32
            } else {
                VmState::Stopped as i32
            };
            let status = VmEntry::status_mut(vm);
            status.vmm_pid = 0;
            status.exit_code = guest_code;
            status.stopped_unix_ms = now_ms();
            status.agent_ready = false;
            status.failure_reason = failure.clone().unwrap_or_else(|| {
                report
                    .as_ref()
                    .map(|r| r.reason.clone())
                    .unwrap_or_default()
            });
        });
        if has_app && guest_code.is_some() {
            self.emit(entry, event::Kind::AppExited, guest_code, String::new());
        }
        match failure {
            Some(reason) => {
                tracing::warn!(vm_id = %entry.id, %reason, "VM failed");
                self.emit(entry, event::Kind::Failed, None, reason)
            }
            None => {
                tracing::info!(vm_id = %entry.id, exit_code = ?guest_code, "VM stopped");
                self.emit(entry, event::Kind::Stopped, guest_code, String::new())
            }
        }
    }
}

impl Daemon {
    /// Applies the firewall rules of the VM on `link`; its network policy and the resolver its
    /// DNS goes to (None: the host has none a guest can use, and the guest gets no DNS).
    fn install_firewall(
        &self,
        entry: &VmEntry,
        spec: &VmSpec,
        link: &VmLink,
    ) -> Result<(NetworkPolicy, Option<Ipv4Addr>), Status> {
        let policy = spec
            .network
            .as_ref()
            .map(validate::network_policy)
            .transpose()?
            .unwrap_or_default();
        let dns = self.host.dns_upstream();
        if dns.is_none() {
            tracing::warn!(
                vm_id = %entry.id,
                "the host has no usable IPv4 nameserver (only loopback ones): the guest gets no \
                 DNS, addresses still work"
            );
        }
        self.host
            .apply_firewall(&VmRules::new(link, &policy, dns))
            .map_err(|e| Status::unavailable(e.to_string()))?;
        Ok((policy, dns))
    }

    /// Applies again, from its record, the firewall rules of a VM whose VMM a restarted huskd
    /// adopted: the table is rebuilt from records (after an `nft flush ruleset`, say). Logged,
    /// never fatal: the VM runs on with whatever rules it has.
    pub(super) fn reinstall_firewall(&self, entry: &VmEntry) {
        let vm = entry.snapshot();
        let (Some(spec), Some(status)) = (&vm.spec, &vm.status) else {
            return;
        };
        let husk_link = spec
            .network
            .as_ref()
            .is_some_and(|n| n.mode == network::Mode::Tap as i32);
        if status.tap.is_empty() || !husk_link {
            return;
        }
        let rules = (|| {
            let host_ip: Ipv4Addr = status.host_ip.parse().ok()?;
            let guest_ip: Ipv4Addr = status.guest_ip.parse().ok()?;
            let network = spec.network.as_ref();
            // As the link was made: the spec's MAC, or the one derived from the guest address.
            let o = guest_ip.octets();
            let mac = network
                .and_then(|n| validate::parse_mac(&n.mac))
                .unwrap_or([0x06, 0x00, o[0], o[1], o[2], o[3]]);
            let policy = network
                .map(validate::network_policy)
                .transpose()
                .ok()?
                .unwrap_or_default();
            Some(VmRules {
                tap: status.tap.clone(),
                mac,
                host_ip,
                guest_ip,
                dns: self.host.dns_upstream().filter(|_| status.dns),
                published: policy.published,
                egress: policy.egress,
            })
        })();
        let result = match rules {
            Some(rules) => self.host.apply_firewall(&rules).map_err(|e| e.to_string()),
            None => Err("its record does not describe its link".into()),
        };
        if let Err(e) = result {
            tracing::warn!(vm_id = %entry.id, error = %e, "cannot apply the adopted VM's firewall rules");
        }
    }

    /// The name of a VM other than `except` that is in the namespace at `netns` (starting,
    /// running or paused), if any.
    fn netns_user(&self, netns: &str, except: &str) -> Option<String> {
        let entries: Vec<Arc<VmEntry>> = lock(&self.vms).values().cloned().collect();
        entries.into_iter().find_map(|e| {
            let live = matches!(
                e.state(),
                VmState::Starting | VmState::Running | VmState::Paused
            );
            let vm = e.snapshot();
            let joined = vm
                .spec
                .as_ref()
                .and_then(|s| s.network.as_ref())
                .is_some_and(|n| n.mode == network::Mode::Netns as i32 && n.netns == netns);
            (e.id != except && live && joined).then(|| e.name())
        })
    }

    /// Gives a joined namespace's interface back to the namespace (MODE_NETNS; logged, never
    /// fatal: the redirect only ever points at the VM's vanished tap).
    fn leave_netns(&self, entry: &VmEntry, spec: &VmSpec) {
        let Some(n) = &spec.network else { return };
        if n.mode != network::Mode::Netns as i32 {
            return;
        }
        if let Err(e) = self
            .host
            .leave_netns(Path::new(&n.netns), &n.netns_interface)
        {
            tracing::warn!(vm_id = %entry.id, error = %e, "cannot give the namespace's interface back");
        }
    }

    /// Removes the firewall rules of every VM whose tap is gone (logged, never fatal: the next
    /// collection retries).
    pub(super) fn collect_firewall_garbage(&self, entry: &VmEntry) {
        if let Err(e) = self.host.collect_firewall_garbage() {
            tracing::warn!(vm_id = %entry.id, error = %e, "cannot remove ended VMs' firewall rules");
        }
    }
}

/// The published ports of `policy`, as VmStatus reports them.
fn published_ports(policy: &NetworkPolicy) -> Vec<PortMapping> {
    policy
        .published
        .iter()
        .map(|p| PortMapping {
            host_ip: p.host_ip.map(|ip| ip.to_string()).unwrap_or_default(),
            host_port: u32::from(p.host_port),
            guest_port: u32::from(p.guest_port),
            protocol: match p.protocol {
                Protocol::Tcp => port_mapping::Protocol::Tcp as i32,
                Protocol::Udp => port_mapping::Protocol::Udp as i32,
            },
        })
        .collect()
}

/// The egress policy of `policy`, as VmStatus reports it (None when there is none).
fn egress(policy: &NetworkPolicy) -> Option<Egress> {
    let e = &policy.egress;
    (!e.allow.is_empty() || !e.deny.is_empty() || e.host_access).then(|| Egress {
        allow: e.allow.iter().map(ToString::to_string).collect(),
        deny: e.deny.iter().map(ToString::to_string).collect(),
        host_access: e.host_access,
    })
}

/// The tap's name and the link's host and guest addresses, for a VM's status (empty without).
fn link_addresses(link: Option<&VmLink>) -> (String, String, String) {
    link.map(|l| {
        (
            l.tap_name.clone(),
            l.host_ip.to_string(),
            l.guest_ip.to_string(),
        )
    })
    .unwrap_or_default()
}

/// ": <last line of vmm.log>", or nothing: the VMM's own words on why it ended.
fn last_log_line(dir: &Path) -> String {
    let tail = Dir::open(dir)
        .and_then(|d| d.read_tail(store::VMM_LOG, 4096))
        .unwrap_or_default();
    String::from_utf8_lossy(&tail)
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .map(|l| format!(": {}", l.trim()))
        .unwrap_or_default()
}

/// Opens `vmm.log` for a new run (0600, appending; emptied first when it grew past
/// [`VMM_LOG_KEEP`]).
fn open_vmm_log(dir: &Dir) -> std::io::Result<std::fs::File> {
    use rustix::fs::OFlags;
    let log = dir.open_file(
        store::VMM_LOG,
        OFlags::WRONLY | OFlags::CREATE | OFlags::APPEND,
        store::FILE_MODE,
    )?;
    if log.metadata()?.len() > VMM_LOG_KEEP {
        log.set_len(0)?;
    }
    Ok(log)
}

/// Starts one virtiofsd per shared directory of `spec`, each serving the directory huskd opened
/// under its path policy (never its path again: see `Virtiofsd::start_dir`).
fn start_shares(
    policy: &husk_host::policy::PathPolicy,
    spec: &VmSpec,
) -> Result<Vec<husk_host::virtiofs::Virtiofsd>, Status> {
    let mut shares = Vec::with_capacity(spec.mounts.len());
    for (i, mount) in spec.mounts.iter().enumerate() {
        let what = format!("mounts[{i}].host_path");
        let path = Path::new(&mount.host_path);
        let dir = policy
            .open_dir(&what, path)
            .map_err(|e| policy_status(e, |m: String| Status::failed_precondition(m)))?;
        let fd = dir
            .fd()
            .try_clone_to_owned()
            .map_err(|e| Status::internal(format!("{what}: {e}")))?;
        let tag = husk_host::virtiofs::tag_for(i);
        let share = husk_host::virtiofs::Virtiofsd::start_dir(fd, path, mount.read_only, &tag)
            .map_err(|e| Status::failed_precondition(format!("{what}: {e}")))?;
        shares.push(share);
    }
    Ok(shares)
}
