//! The one place where a configuration becomes a VM ready to run: memory, KVM VM, devices,
//! vCPUs, and (for a real boot) kernel, initramfs, command line and boot structures.

use std::fs::{File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use kvm_bindings::{CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Cap, Kvm};
use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::arch::x86_64::boot_params::{self, BootParamsInput};
use crate::arch::x86_64::cpuid::{add_tsc_deadline_timer, normalize, CpuTopology};
use crate::arch::x86_64::layout::{e820_map, low_ram_end, ram_ranges, CMDLINE_START};
use crate::arch::x86_64::regs::{self, BootEntry};
use crate::arch::x86_64::{mptable, pvh};
use crate::config::{build_cmdline, ConfigError, ConsoleConfig, NetConfig, TapSource, VmConfig};
use crate::devices::bus::{Bus, BusError};
use crate::devices::legacy::console_file::CappedFile;
use crate::devices::legacy::control_port::{
    ControlPort, ControlState, CONTROL_PORT_BASE, CONTROL_PORT_LEN,
};
use crate::devices::legacy::i8042::{I8042, I8042_DATA_PORT, I8042_PORT_LEN, KBD_IRQ};
use crate::devices::legacy::serial::{
    ConsoleOut, SerialDevice, SERIAL_IRQ, SERIAL_PORT_BASE, SERIAL_PORT_LEN,
};
use crate::devices::virtio::{self as virtio_slots, VirtioAttachError, VirtioSlot};
use crate::loader::{self, KernelEntry, LoaderError};
use crate::snapshot::devices::{specs_for_restore, DeviceSpec, RestoreOverrides};
use crate::snapshot::state::SerialState;
use crate::snapshot::vcpu_state::cpuid_entries;
use crate::snapshot::{self, cpu_check, vcpu_state, vm_state, LoadedSnapshot};
use crate::stop::{StopError, StopState};
use crate::vmm::Vmm;
use crate::vstate::kvm::{is_pvm_host, open_kvm, KvmError};
use crate::vstate::vcpu::{Vcpu, VcpuError};
use crate::vstate::vm::{create_guest_memory, create_shared_guest_memory, Vm, VmError};

/// Errors while building a VM.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// Invalid configuration.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// KVM unavailable.
    #[error(transparent)]
    Kvm(#[from] KvmError),
    /// Kernel or initramfs problem.
    #[error(transparent)]
    Loader(#[from] LoaderError),
    /// Ordinary kernel on a PVM host.
    #[error("this host's /dev/kvm is PVM, which cannot run an ordinary Linux kernel; run it inside scripts/testbed, or use a PVM guest kernel (--allow-pvm to try anyway)")]
    PvmHost,
    /// The console file could not be opened.
    #[error("cannot open the console {0}")]
    Console(PathBuf, #[source] io::Error),
    /// VM creation failed.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// vCPU creation or setup failed.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// KVM_GET_SUPPORTED_CPUID failed.
    #[error("cannot read the CPUID KVM supports")]
    SupportedCpuid(#[source] kvm_ioctls::Error),
    /// An interrupt EventFd could not be created.
    #[error("cannot create an interrupt event")]
    EventFd(#[source] io::Error),
    /// Device placement failed.
    #[error("cannot place a device on the bus")]
    Bus(#[from] BusError),
    /// Stop machinery.
    #[error(transparent)]
    Stop(#[from] StopError),
    /// Writing the command line into guest memory failed.
    #[error("cannot write the kernel command line into guest memory")]
    Cmdline(#[source] vm_memory::GuestMemoryError),
    /// Boot structures.
    #[error(transparent)]
    BootParams(#[from] boot_params::BootParamsError),
    /// PVH start info.
    #[error(transparent)]
    Pvh(#[from] pvh::PvhError),
    /// MP table.
    #[error(transparent)]
    Mptable(#[from] mptable::MptableError),
    /// Boot registers.
    #[error(transparent)]
    Regs(#[from] regs::RegsError),
    /// A disk image could not be opened.
    #[error("cannot open disk {0}")]
    Disk(PathBuf, #[source] io::Error),
    /// A shared directory's virtio-fs device could not be set up.
    #[error("cannot set up shared directory {0}")]
    SharedDir(String, #[source] husk_devices::virtio::fs::FsError),
    /// The tap device could not be opened or configured.
    #[error("cannot set up the network tap {0}")]
    Tap(String, #[source] io::Error),
    /// The vsock device could not be created.
    #[error("cannot set up vsock")]
    Vsock(#[from] husk_devices::virtio::vsock::VsockError),
    /// A virtio device could not be attached.
    #[error(transparent)]
    Attach(#[from] VirtioAttachError),
    /// The snapshot files could not be loaded.
    #[error(transparent)]
    LoadSnapshot(#[from] snapshot::SnapshotError),
    /// The snapshot's contents do not make a VM.
    #[error("cannot restore: {0}")]
    Snapshot(&'static str),
    /// A saved structure does not fit this KVM.
    #[error("cannot restore")]
    SnapshotState(#[source] snapshot::state::StateError),
    /// The host CPU lacks features the snapshot used.
    #[error("cannot restore here")]
    CpuFeatures(#[from] cpu_check::MissingFeatures),
    /// A vCPU's saved state was refused by KVM.
    #[error("cannot restore")]
    VcpuState(#[from] vcpu_state::VcpuStateError),
    /// The VM's saved state was refused by KVM.
    #[error("cannot restore the VM state")]
    VmState(#[from] vm_state::VmStateError),
    /// The snapshot's devices cannot be rebuilt as asked.
    #[error("cannot restore the devices")]
    Devices(#[from] snapshot::devices::DeviceStateError),
    /// A device's transport state was refused.
    #[error("cannot restore device {0}")]
    DeviceState(
        String,
        #[source] husk_devices::virtio::mmio::persist::TransportStateError,
    ),
    /// The saved UART state is invalid.
    #[error("cannot restore the serial port")]
    SerialState(#[from] crate::devices::legacy::serial::persist::SerialStateError),
}

/// What the machine without a kernel needs.
pub struct BaseVmConfig {
    /// Guest memory in bytes.
    pub mem_size: u64,
    /// Number of vCPUs (1..=32).
    pub vcpus: u8,
    /// Serial console sink.
    pub console: ConsoleOut,
    /// Print the guest-init time to stderr.
    pub report_boot_time: bool,
    /// When the VMM process started (boot times are measured from here).
    pub vmm_start: Instant,
    /// Guest RAM as a shared memfd (for vhost-user backends) instead of private memory.
    pub shared_memory: bool,
}

/// Builds the machine: memory, VM with irqchip and PIT, legacy devices on the port-I/O bus,
/// and configured vCPUs. Nothing is loaded into memory and no vCPU has boot registers yet.
pub fn build_base_vm(kvm: Kvm, cfg: BaseVmConfig) -> Result<Vmm, BuildError> {
    let memory = if cfg.shared_memory {
        create_shared_guest_memory(cfg.mem_size)?
    } else {
        create_guest_memory(cfg.mem_size)?
    };
    let supported = supported_cpuid(&kvm)?;
    let num_cpus = cfg.vcpus;
    build_machine(kvm, memory, cfg, None, |vcpu| {
        vcpu.configure(&supported, num_cpus).map_err(Into::into)
    })
}

/// What this host's KVM can give a guest: KVM_GET_SUPPORTED_CPUID plus the features KVM
/// reports as capabilities instead (the TSC-deadline timer).
fn supported_cpuid(kvm: &Kvm) -> Result<CpuId, BuildError> {
    let mut supported = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(BuildError::SupportedCpuid)?;
    if kvm.check_extension(Cap::TscDeadlineTimer) {
        add_tsc_deadline_timer(supported.as_mut_slice());
    }
    Ok(supported)
}

/// What a fresh boot and a restore share: the VM over `memory`, the legacy devices (the UART
/// in `serial` state when given), and `cfg.vcpus` vCPUs, each set up by `setup_vcpu`.
fn build_machine(
    kvm: Kvm,
    memory: GuestMemoryMmap,
    cfg: BaseVmConfig,
    serial: Option<&SerialState>,
    mut setup_vcpu: impl FnMut(&mut Vcpu) -> Result<(), BuildError>,
) -> Result<Vmm, BuildError> {
    let stop = Arc::new(StopState::new()?);
    let vm = Vm::new(&kvm, memory)?;

    let irq_event = |gsi: u32| -> Result<EventFd, BuildError> {
        let evt = EventFd::new(EFD_NONBLOCK).map_err(BuildError::EventFd)?;
        vm.register_irqfd(&evt, gsi)?;
        Ok(evt)
    };
    let serial = Arc::new(Mutex::new(match serial {
        None => SerialDevice::new(irq_event(SERIAL_IRQ)?, cfg.console),
        Some(state) => SerialDevice::from_state(irq_event(SERIAL_IRQ)?, cfg.console, state)?,
    }));
    let i8042 = Arc::new(Mutex::new(I8042::new(irq_event(KBD_IRQ)?, stop.clone())));
    let control = Arc::new(ControlState::default());
    let control_port = Arc::new(Mutex::new(ControlPort::new(
        control.clone(),
        cfg.vmm_start,
        cfg.report_boot_time,
    )));
    let mut io_bus = Bus::new();
    io_bus.insert(serial.clone(), SERIAL_PORT_BASE, SERIAL_PORT_LEN)?;
    io_bus.insert(i8042, I8042_DATA_PORT, I8042_PORT_LEN)?;
    io_bus.insert(control_port, CONTROL_PORT_BASE, CONTROL_PORT_LEN)?;

    let mut vcpus = Vec::with_capacity(usize::from(cfg.vcpus));
    for index in 0..cfg.vcpus {
        let mut vcpu = Vcpu::new(&vm, index)?;
        setup_vcpu(&mut vcpu)?;
        vcpus.push(vcpu);
    }
    let mut vmm = Vmm::new(kvm, vm, vcpus, io_bus, Bus::new(), serial, control, stop);
    vmm.set_mem_size(cfg.mem_size);
    Ok(vmm)
}

/// Builds a VM from a loaded snapshot: the same machine as a fresh boot over the snapshot's
/// (privately mapped) memory, every vCPU and the VM put back in the saved state. Refuses a
/// host whose CPU lacks features the guest used. The VM continues where it was paused once it
/// runs (see [`Vmm::set_start_paused`] to keep it paused).
pub fn restore_vm(
    kvm: Kvm,
    snapshot: LoadedSnapshot,
    console: ConsoleOut,
    overrides: &RestoreOverrides,
    vmm_start: Instant,
) -> Result<Vmm, BuildError> {
    let LoadedSnapshot {
        state,
        memory,
        base,
    } = snapshot;
    let saved_devices: Vec<(String, Option<snapshot::state::DeviceBackend>)> = state
        .devices
        .iter()
        .map(|d| (d.name.clone(), d.backend.clone()))
        .collect();
    let specs = specs_for_restore(&saved_devices, overrides)?;
    let machine = state.machine.as_ref().ok_or(BuildError::Snapshot(
        "the snapshot has no machine description",
    ))?;
    let vcpu_count = u8::try_from(machine.vcpus)
        .ok()
        .filter(|n| (1..=32).contains(n) && usize::from(*n) == state.vcpus.len())
        .ok_or(BuildError::Snapshot("the snapshot's vCPU count is invalid"))?;
    // RAM must lie where this machine puts it for that size (never over the MMIO window).
    let layout: Vec<(u64, u64)> = memory
        .iter()
        .map(|r| (r.start_addr().raw_value(), r.len()))
        .collect();
    if layout != ram_ranges(machine.mem_size) {
        return Err(BuildError::Snapshot(
            "the snapshot's memory layout does not match its memory size",
        ));
    }
    let supported = supported_cpuid(&kvm)?;
    for (i, saved) in state.vcpus.iter().enumerate() {
        if saved.index as usize != i {
            return Err(BuildError::Snapshot(
                "the snapshot's vCPUs are out of order",
            ));
        }
        let mut host = supported.as_slice().to_vec();
        normalize(
            &mut host,
            CpuTopology {
                apic_id: i as u8,
                num_cpus: vcpu_count,
            },
        );
        let entries = cpuid_entries(saved).map_err(BuildError::SnapshotState)?;
        cpu_check::check(&entries, &host)?;
    }
    let vm_state = state
        .vm
        .as_ref()
        .ok_or(BuildError::Snapshot("the snapshot has no VM state"))?;
    log::debug!(
        "restore: CPU checked at {} us",
        vmm_start.elapsed().as_micros()
    );
    let vmm = build_machine(
        kvm,
        memory,
        BaseVmConfig {
            mem_size: machine.mem_size,
            vcpus: vcpu_count,
            console,
            report_boot_time: false,
            vmm_start,
            shared_memory: false,
        },
        state.serial.as_ref(),
        |vcpu| {
            let saved = &state.vcpus[usize::from(vcpu.index)];
            vcpu.cpuid = vcpu_state::restore(&vcpu.fd, saved)?;
            Ok(())
        },
    )?;
    let mut vmm = vmm;
    vmm.set_memory_base(base);
    // The irqchip first: a device that interrupts while it is restored (vsock's
    // TRANSPORT_RESET) must reach the restored IOAPIC, not one about to be overwritten.
    vm_state::restore(vmm.vm().fd(), vm_state)?;
    let slots = attach_devices(&mut vmm, &specs)?;
    for (slot, saved) in slots.iter().zip(&state.devices) {
        let transport = saved
            .transport
            .as_ref()
            .ok_or(BuildError::Snapshot("a device has no transport state"))?;
        slot.restore_state(transport)
            .map_err(|e| BuildError::DeviceState(slot.name.clone(), e))?;
    }
    vmm.set_devices(slots);
    Ok(vmm)
}

/// Restores the snapshot in `state_path` + `mem_path` with the console `console` (the husk-vmm
/// `--restore-state` path).
pub fn build_from_snapshot(
    state_path: &Path,
    mem_path: &Path,
    names: &snapshot::LoadNames,
    console: &ConsoleConfig,
    console_limit: u64,
    overrides: &RestoreOverrides,
    vmm_start: Instant,
) -> Result<Vmm, BuildError> {
    let snapshot = snapshot::load(state_path, mem_path, names)?;
    log::debug!(
        "restore: snapshot loaded at {} us",
        vmm_start.elapsed().as_micros()
    );
    let kvm = open_kvm()?;
    let (console, created) = open_console(console, console_limit)?;
    let result = restore_vm(kvm, snapshot, console, overrides, vmm_start);
    log::debug!(
        "restore: VM rebuilt at {} us",
        vmm_start.elapsed().as_micros()
    );
    if result.is_err() {
        if let Some(path) = created {
            let _ = std::fs::remove_file(path);
        }
    }
    result
}

/// Opens the console sink (a file capped at `limit` bytes, see [`CappedFile`]); returns it
/// and, for a file the VMM created, its path (to remove it again if the build fails).
fn open_console(
    console: &ConsoleConfig,
    limit: u64,
) -> Result<(ConsoleOut, Option<PathBuf>), BuildError> {
    match console {
        ConsoleConfig::Stdout => Ok((Box::new(io::stdout()), None)),
        ConsoleConfig::None => Ok((Box::new(io::sink()), None)),
        ConsoleConfig::File(path) => {
            let existed = path.exists();
            let mut options = OpenOptions::new();
            options.write(true).create(true).truncate(true);
            let file: File = husk_devices::host_files::open(path, &options, true)
                .map_err(|e| BuildError::Console(path.clone(), e))?;
            let file = CappedFile::new(file, limit);
            Ok((Box::new(file), (!existed).then(|| path.clone())))
        }
        ConsoleConfig::Unix(path) => {
            let stream = std::os::unix::net::UnixStream::connect(path)
                .map_err(|e| BuildError::Console(path.clone(), e))?;
            Ok((Box::new(stream), None))
        }
    }
}

/// Builds a VM that boots `config`'s kernel. `vmm_start` is when the process started.
pub fn build_microvm(config: &VmConfig, vmm_start: Instant) -> Result<Vmm, BuildError> {
    let vcpus = config.validate()?;
    let mut kernel = loader::open_kernel(&config.kernel)?;
    let mut initrd = config
        .initrd
        .as_deref()
        .map(loader::open_initrd)
        .transpose()?;
    let kvm = open_kvm()?;
    if is_pvm_host() && !config.allow_pvm && !kernel.is_pvm_guest()? {
        return Err(BuildError::PvmHost);
    }
    let (console, created) = open_console(&config.console, config.console_limit)?;
    let result = (|| {
        let mut vmm = build_base_vm(
            kvm,
            BaseVmConfig {
                mem_size: config.mem_bytes(),
                vcpus,
                console,
                report_boot_time: config.report_boot_time,
                vmm_start,
                shared_memory: !config.fs.is_empty(),
            },
        )?;
        let devices = attach_devices(&mut vmm, &device_specs(config))?;
        let params: Vec<String> = devices.iter().map(|d| d.cmdline.clone()).collect();
        let cmdline = build_cmdline(&params, &config.cmdline)?;
        vmm.set_devices(devices);
        load_and_setup_boot(
            &vmm,
            &mut kernel,
            initrd.as_mut(),
            &cmdline,
            config.mem_bytes(),
        )?;
        Ok(vmm)
    })();
    if result.is_err() {
        if let Some(path) = created {
            let _ = std::fs::remove_file(Path::new(&path));
        }
    }
    result
}

/// The virtio devices `config` asks for, in slot order: disks first (so the first disk is
/// vda), then net, vsock, rng, the balloon and the shared directories.
fn device_specs(config: &VmConfig) -> Vec<DeviceSpec> {
    let mut specs: Vec<DeviceSpec> = config.disks.iter().cloned().map(DeviceSpec::Disk).collect();
    specs.extend((0..config.disk_slots).map(|_| DeviceSpec::DiskSlot));
    specs.extend(config.net.clone().map(DeviceSpec::Net));
    specs.extend(config.vsock.clone().map(DeviceSpec::Vsock));
    if config.rng {
        specs.push(DeviceSpec::Rng);
    }
    specs.extend(config.balloon.map(DeviceSpec::Balloon));
    specs.extend(config.fs.iter().cloned().map(DeviceSpec::Fs));
    specs
}

/// Creates the virtio devices of `specs` and puts them in their slots, in order; records each
/// one's backend identity for snapshots.
fn attach_devices(vmm: &mut Vmm, specs: &[DeviceSpec]) -> Result<Vec<VirtioSlot>, BuildError> {
    use husk_devices::virtio::block::{format::open_disk, Block};
    use husk_devices::virtio::{balloon, net::Net, rng, vsock::Vsock, VirtioDevice};

    let (mut disks, mut wanted) = (0, Vec::<(String, Box<dyn VirtioDevice>)>::new());
    for spec in specs {
        wanted.push(match spec {
            DeviceSpec::Disk(disk) => {
                let i = disks;
                disks += 1;
                let serial = format!("husk-disk{i}");
                let image = open_disk(&disk.path, disk.format, disk.read_only, &disk.backing)
                    .map_err(|e| BuildError::Disk(disk.path.clone(), e))?;
                let block = Block::new(image, disk.read_only, &serial);
                (format!("block{i}"), Box::new(block))
            }
            DeviceSpec::DiskSlot => {
                // Numbered with the disks: the guest sees vdX in the same order.
                let i = disks;
                disks += 1;
                let block = Block::empty_slot(&format!("husk-disk{i}"));
                (format!("block{i}"), Box::new(block))
            }
            DeviceSpec::Net(net) => (
                "net0".into(),
                Box::new(match net.mtu {
                    Some(mtu) => Net::new(open_net_backend(net)?, net.mac).with_mtu(mtu),
                    None => Net::new(open_net_backend(net)?, net.mac),
                }),
            ),
            DeviceSpec::Vsock(vsock) => (
                "vsock0".into(),
                Box::new(Vsock::new(vsock.cid, &vsock.uds_path)?),
            ),
            DeviceSpec::Rng => (
                "rng0".into(),
                Box::new(rng::Rng::new(Box::new(rng::HostRandom))),
            ),
            DeviceSpec::Balloon(config) => (
                "balloon0".into(),
                Box::new(balloon::Balloon::new(
                    balloon::BalloonFeatures {
                        stats: config.stats,
                        free_page_reporting: config.reporting,
                        deflate_on_oom: config.deflate_on_oom,
                    },
                    Box::new(balloon::discard::HostDiscard),
                )),
            ),
            DeviceSpec::Fs(fs) => {
                // SAFETY: the parent handed this socket over for exactly this use (see --fs
                // fd=) and nothing else in this process knows it.
                let socket =
                    unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fs.fd) };
                let device = husk_devices::virtio::fs::Fs::new(&fs.tag, socket)
                    .map_err(|e| BuildError::SharedDir(fs.tag.clone(), e))?;
                (format!("fs-{}", fs.tag), Box::new(device))
            }
        });
    }
    let mut slots = Vec::with_capacity(wanted.len());
    for (index, (name, device)) in wanted.into_iter().enumerate() {
        let (vm, bus) = vmm.vm_and_mmio_bus();
        slots.push(virtio_slots::attach(vm, bus, index, name, device)?);
    }
    vmm.set_device_backends(specs.iter().map(snapshot::devices::backend_of).collect());
    Ok(slots)
}

/// The backend of the net device: a tap, or a stream socket to passt (`stream=FD`).
fn open_net_backend(
    net: &NetConfig,
) -> Result<Box<dyn husk_devices::virtio::net::tap::NetBackend>, BuildError> {
    use husk_devices::virtio::net::stream::StreamBackend;
    use husk_devices::virtio::net::tap::Tap;
    use husk_devices::virtio::net::MAX_ETHERNET_FRAME;
    Ok(match &net.tap {
        TapSource::Name(name) => {
            Box::new(Tap::open(name).map_err(|e| BuildError::Tap(name.clone(), e))?)
        }
        TapSource::Fd(fd, name) => Box::new(
            // SAFETY: the parent handed this fd over for exactly this use (see --net fd=) and
            // nothing else in this process knows it.
            unsafe { Tap::from_raw_fd(*fd, name.clone()) }
                .map_err(|e| BuildError::Tap(name.clone(), e))?,
        ),
        TapSource::Stream(fd) => Box::new(
            // SAFETY: the parent handed this socket over for exactly this use (see --net
            // stream=) and nothing else in this process knows it.
            unsafe { StreamBackend::from_raw_fd(*fd, MAX_ETHERNET_FRAME) }
                .map_err(|e| BuildError::Tap(format!("stream={fd}"), e))?,
        ),
    })
}

fn load_and_setup_boot(
    vmm: &Vmm,
    kernel: &mut loader::KernelFile,
    initrd: Option<&mut (File, u64)>,
    cmdline: &str,
    mem_size: u64,
) -> Result<(), BuildError> {
    let mem = vmm.vm().memory();
    let loaded = kernel.load(mem)?;
    let initrd = match initrd {
        Some((file, size)) => {
            let limit = low_ram_end(mem_size).min(loaded.initrd_limit);
            let addr = loader::initrd_address(*size, loaded.free_from, limit)?;
            loader::load_initrd(mem, file, *size, addr)?;
            Some((addr, *size))
        }
        None => None,
    };
    let mut bytes = cmdline.as_bytes().to_vec();
    bytes.push(0);
    mem.write_slice(&bytes, GuestAddress(CMDLINE_START))
        .map_err(BuildError::Cmdline)?;

    let e820 = e820_map(mem_size);
    let entry = match loaded.entry {
        KernelEntry::Pvh(rip) => BootEntry::Pvh {
            rip,
            start_info: pvh::write_start_info(mem, CMDLINE_START, initrd, &e820)?,
        },
        KernelEntry::Linux64(rip) => {
            boot_params::write_boot_params(
                mem,
                &BootParamsInput {
                    header: loaded.header,
                    cmdline_addr: CMDLINE_START,
                    cmdline_len: cmdline.len(),
                    initrd,
                    e820: &e820,
                },
            )?;
            BootEntry::Linux64 { rip }
        }
    };
    log::info!("boot entry {entry:x?}, initrd {initrd:x?}");
    mptable::write_mptable(mem, vmm.vcpu_count())?;
    regs::write_boot_tables(mem, entry)?;
    regs::setup_boot_vcpu(&vmm.vcpus()[0].fd, entry)?;
    Ok(())
}
