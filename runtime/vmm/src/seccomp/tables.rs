//! The system calls each husk-vmm thread may make: the one place to read (and extend) them.
//!
//! A thread installs its filter before it touches guest data, so everything here is what the
//! thread needs *after* set-up: opening files, creating sockets, mapping guest memory and
//! creating KVM objects all happen before. Anything not listed ends the process (`--seccomp
//! kill`, the default). Arguments are checked where a syscall is dangerous in general:
//!
//! - `ioctl`: only the listed request numbers (KVM_RUN for vCPUs, TUNSETOFFLOAD when the guest
//!   negotiates net features, FIONBIO for vsock sockets, the KVM_GET_* state reads of a
//!   snapshot; never a KVM_SET_*, which only restore makes, before the filters);
//! - `mmap`/`mprotect`: never `PROT_EXEC` (no new code can be mapped);
//! - `socket`: only non-blocking `AF_UNIX` stream sockets (vsock's guest-initiated connections);
//! - `tgkill`: only threads of this process (the tgid is fixed when the filter is built);
//! - no `clone`/`clone3`/`execve` anywhere, and no `open*` except `openat` on the control-socket
//!   thread, which writes snapshots: every thread exists and every other file is open before the
//!   filters go on (the exit report's temporary file is created early, see `host_files`).
//!
//! To extend (e.g. snapshot state ioctls from the control socket thread), add a [`Rule`] to
//! the thread's table; `husk-vmm --print-seccomp` shows the result.
//!
//! Sources: syscall semantics from the Linux man pages (seccomp(2), ioctl_list); ioctl numbers
//! computed in [`super::ioctls`] as linux/kvm.h and linux/if_tun.h define them.

/// Which thread a filter is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ThreadKind {
    /// The main thread after set-up: waits for a stop, joins the others, writes the exit report.
    Main,
    /// A "vcpu<N>" thread: KVM_RUN and the port/MMIO exits it handles.
    Vcpu,
    /// The "vmm-events" thread: virtio queues and device backends (disk, tap, vsock sockets).
    Events,
    /// The "vmm-api" thread: the control socket.
    Api,
}

impl ThreadKind {
    /// Every kind, in the order `--print-seccomp` lists them.
    pub const ALL: [ThreadKind; 4] = [
        ThreadKind::Main,
        ThreadKind::Vcpu,
        ThreadKind::Events,
        ThreadKind::Api,
    ];

    /// The thread's name as the VMM gives it (vCPU threads are "vcpu0", "vcpu1", ...).
    pub fn name(self) -> &'static str {
        match self {
            ThreadKind::Main => "main",
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::Events => "vmm-events",
            ThreadKind::Api => "vmm-api",
        }
    }
}

/// A condition on a syscall's arguments.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Args {
    /// Any arguments.
    Any,
    /// Argument 1 one of these (number, name): `ioctl`'s request, `fcntl`'s command.
    Arg1(&'static [(u32, &'static str)]),
    /// `mmap`/`mprotect` whose `prot` (argument 2) has no `PROT_EXEC`.
    NoExec,
    /// `socket(AF_UNIX, SOCK_STREAM | ..., 0)`.
    UnixStream,
    /// `tgkill(tgid, ...)` with `tgid` this process.
    OwnProcess,
    /// `sendto(fd, buf, len, flags, NULL, 0)`: on a connected socket only (std's write on a
    /// UnixStream), never to an address.
    Connected,
}

/// One allowed syscall.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rule {
    /// Its number (x86-64).
    pub nr: i64,
    /// Its name, for people.
    pub name: &'static str,
    /// What its arguments must be.
    pub args: Args,
}

const fn r(nr: i64, name: &'static str, args: Args) -> Rule {
    Rule { nr, name, args }
}

pub use super::ioctls::{FIONBIO, KVM_RUN, TUNSETOFFLOAD};
use super::ioctls::{
    KVM_GET_CLOCK, KVM_GET_DEBUGREGS, KVM_GET_FPU, KVM_GET_IRQCHIP, KVM_GET_LAPIC,
    KVM_GET_MP_STATE, KVM_GET_MSRS, KVM_GET_PIT2, KVM_GET_REGS, KVM_GET_SREGS, KVM_GET_TSC_KHZ,
    KVM_GET_VCPU_EVENTS, KVM_GET_XCRS, KVM_GET_XSAVE,
};

use libc as l;

/// Needed by every thread: logging to stderr and the stop signal handler (`write`), locks
/// (`futex`), the allocator (`mmap`, `munmap`, `mprotect`, `madvise`, `brk`), signal handlers
/// returning (`rt_sigreturn`), dropping fds (`close`; std's debug builds check the fd with
/// `fcntl(F_GETFD)` first).
const COMMON: &[Rule] = &[
    r(l::SYS_close, "close", Args::Any),
    r(
        l::SYS_fcntl,
        "fcntl",
        Args::Arg1(&[(l::F_GETFD as u32, "F_GETFD")]),
    ),
    r(l::SYS_write, "write", Args::Any),
    r(l::SYS_futex, "futex", Args::Any),
    r(l::SYS_mmap, "mmap", Args::NoExec),
    r(l::SYS_mprotect, "mprotect", Args::NoExec),
    r(l::SYS_munmap, "munmap", Args::Any),
    r(l::SYS_madvise, "madvise", Args::Any),
    r(l::SYS_brk, "brk", Args::Any),
    r(l::SYS_rt_sigreturn, "rt_sigreturn", Args::Any),
    // Instant::now(): the vDSO answers it without a syscall unless the clocksource cannot be
    // read from user space (e.g. in a nested guest), where it falls back to the syscall.
    r(l::SYS_clock_gettime, "clock_gettime", Args::Any),
];

/// Thread exit (std's alternate signal stack is taken down, then the thread ends).
const THREAD_EXIT: &[Rule] = &[
    r(l::SYS_sigaltstack, "sigaltstack", Args::Any),
    r(l::SYS_rt_sigprocmask, "rt_sigprocmask", Args::Any),
    r(l::SYS_exit, "exit", Args::Any),
];

/// Kicking vCPU threads (pthread_kill: getpid + tgkill to this process only, with signals
/// blocked around it).
const KICK: &[Rule] = &[
    r(l::SYS_rt_sigprocmask, "rt_sigprocmask", Args::Any),
    r(l::SYS_getpid, "getpid", Args::Any),
    r(l::SYS_tgkill, "tgkill", Args::OwnProcess),
];

const MAIN: &[Rule] = &[
    // Waiting for a stop, and waiting between kicks.
    r(l::SYS_poll, "poll", Args::Any),
    r(l::SYS_read, "read", Args::Any),
    r(l::SYS_clock_nanosleep, "clock_nanosleep", Args::Any),
    // The serial console's last flush to a `--console unix:PATH` socket.
    r(l::SYS_sendto, "sendto", Args::Connected),
    // Tearing down: closing the VM's fds, removing the sockets it created, the exit report
    // (written into the file created before the filter, synced, renamed into place).
    r(l::SYS_statx, "statx", Args::Any),
    r(l::SYS_unlink, "unlink", Args::Any),
    r(l::SYS_fsync, "fsync", Args::Any),
    r(l::SYS_rename, "rename", Args::Any),
    // Closing the disks (VirtioDevice::sync_backend): a qcow2 image writes back its tables,
    // returns its reservation (refcounts, then the file shortened) and syncs.
    r(l::SYS_pread64, "pread64", Args::Any),
    r(l::SYS_pwrite64, "pwrite64", Args::Any),
    r(l::SYS_fdatasync, "fdatasync", Args::Any),
    r(l::SYS_ftruncate, "ftruncate", Args::Any),
    // std::process::exit takes down the main thread's alternate signal stack first.
    r(l::SYS_sigaltstack, "sigaltstack", Args::Any),
    r(l::SYS_exit_group, "exit_group", Args::Any),
];

const VCPU: &[Rule] = &[
    // A guest's net driver activating the device (an MMIO write on this thread) sets the tap's
    // offloads (TUNSETOFFLOAD) and takes the frames already waiting on it (read).
    r(l::SYS_read, "read", Args::Any),
    // ... and, with an rx rate limit, may find the bucket empty and arm the device's timer.
    r(l::SYS_timerfd_settime, "timerfd_settime", Args::Any),
    // Serial output to a `--console unix:PATH` socket.
    r(l::SYS_sendto, "sendto", Args::Connected),
    // A guest activating (or resetting) a virtio-fs device: the vhost-user messages that hand
    // the rings, memory table and events to virtiofsd (fds as SCM_RIGHTS), on the connected
    // socket the launcher passed; replies are read with `read`.
    r(l::SYS_sendmsg, "sendmsg", Args::Any),
    // A `--console file:PATH` at its size limit is truncated and rewound (console_file.rs).
    r(l::SYS_ftruncate, "ftruncate", Args::Any),
    r(l::SYS_lseek, "lseek", Args::Any),
    // A guest resetting its vsock device (an MMIO status write on this thread, e.g. as it shuts
    // down) closes the device's host connections and takes them off the backend's epoll fd.
    // Only EPOLL_CTL_DEL: adding fds stays with the event loop.
    r(
        l::SYS_epoll_ctl,
        "epoll_ctl",
        Args::Arg1(&[(l::EPOLL_CTL_DEL as u32, "EPOLL_CTL_DEL")]),
    ),
    // KVM_RUN; the tap's offloads; a snapshot's state reads, made while the thread is parked.
    r(
        l::SYS_ioctl,
        "ioctl",
        Args::Arg1(&[
            (KVM_RUN, "KVM_RUN"),
            (TUNSETOFFLOAD, "TUNSETOFFLOAD"),
            (KVM_GET_REGS, "KVM_GET_REGS"),
            (KVM_GET_SREGS, "KVM_GET_SREGS"),
            (KVM_GET_MSRS, "KVM_GET_MSRS"),
            (KVM_GET_FPU, "KVM_GET_FPU"),
            (KVM_GET_LAPIC, "KVM_GET_LAPIC"),
            (KVM_GET_MP_STATE, "KVM_GET_MP_STATE"),
            (KVM_GET_VCPU_EVENTS, "KVM_GET_VCPU_EVENTS"),
            (KVM_GET_DEBUGREGS, "KVM_GET_DEBUGREGS"),
            (KVM_GET_TSC_KHZ, "KVM_GET_TSC_KHZ"),
            (KVM_GET_XSAVE, "KVM_GET_XSAVE"),
            (KVM_GET_XCRS, "KVM_GET_XCRS"),
        ]),
    ),
];

const EVENTS: &[Rule] = &[
    r(l::SYS_epoll_wait, "epoll_wait", Args::Any),
    r(l::SYS_epoll_ctl, "epoll_ctl", Args::Any),
    r(l::SYS_read, "read", Args::Any),
    // Disks: scatter-gather I/O, flush, discard/write-zeroes; qcow2 images also read and write
    // their tables (pread64/pwrite64), order data before tables (fdatasync) and extend the
    // file for new clusters (ftruncate).
    r(l::SYS_preadv, "preadv", Args::Any),
    r(l::SYS_pwritev, "pwritev", Args::Any),
    r(l::SYS_fsync, "fsync", Args::Any),
    r(l::SYS_fallocate, "fallocate", Args::Any),
    r(l::SYS_pread64, "pread64", Args::Any),
    r(l::SYS_pwrite64, "pwrite64", Args::Any),
    r(l::SYS_fdatasync, "fdatasync", Args::Any),
    r(l::SYS_ftruncate, "ftruncate", Args::Any),
    // virtio-rng.
    r(l::SYS_getrandom, "getrandom", Args::Any),
    // vsock: host-initiated connections are accepted, guest-initiated ones connect out.
    r(l::SYS_accept4, "accept4", Args::Any),
    r(l::SYS_socket, "socket", Args::UnixStream),
    r(l::SYS_connect, "connect", Args::Any),
    r(l::SYS_recvfrom, "recvfrom", Args::Any),
    r(l::SYS_sendto, "sendto", Args::Connected),
    r(l::SYS_shutdown, "shutdown", Args::Any),
    r(l::SYS_ioctl, "ioctl", Args::Arg1(&[(FIONBIO, "FIONBIO")])),
    // Rate limiters: a queue out of tokens arms its device's timer (read when it fires).
    r(l::SYS_timerfd_settime, "timerfd_settime", Args::Any),
];

const API: &[Rule] = &[
    r(l::SYS_poll, "poll", Args::Any),
    r(l::SYS_accept4, "accept4", Args::Any),
    // std reads a UnixStream with recvfrom and writes it with sendto (MSG_NOSIGNAL).
    r(l::SYS_read, "read", Args::Any),
    r(l::SYS_recvfrom, "recvfrom", Args::Any),
    r(l::SYS_sendto, "sendto", Args::Connected),
    // Requests are read with recvmsg: attach_disk carries the disk image's fd (SCM_RIGHTS).
    r(l::SYS_recvmsg, "recvmsg", Args::Any),
    // attach_disk takes the image over (fcntl F_GETFL, F_DUPFD_CLOEXEC: API_FCNTL), locks it
    // as a --disk is locked, and reads its size (statx, fstat below).
    r(l::SYS_flock, "flock", Args::Any),
    // Snapshots (docs/snapshots.md): the VM-wide state reads, then the state and memory files.
    // The only thread that opens files after set-up: it creates `PATH.tmp` files and reads
    // /proc/self/pagemap and a diff's base. Under husk-jailer it sees only its jail (the VM's
    // own directory), which is what bounds these paths; seccomp cannot check a path.
    r(
        l::SYS_ioctl,
        "ioctl",
        Args::Arg1(&[
            (KVM_GET_CLOCK, "KVM_GET_CLOCK"),
            (KVM_GET_IRQCHIP, "KVM_GET_IRQCHIP"),
            (KVM_GET_PIT2, "KVM_GET_PIT2"),
        ]),
    ),
    r(l::SYS_openat, "openat", Args::Any),
    r(l::SYS_pread64, "pread64", Args::Any),
    r(l::SYS_pwrite64, "pwrite64", Args::Any),
    r(l::SYS_lseek, "lseek", Args::Any),
    r(l::SYS_ftruncate, "ftruncate", Args::Any),
    r(l::SYS_fsync, "fsync", Args::Any),
    // Disks are flushed before a snapshot (a qcow2 image's tables written back).
    r(l::SYS_fdatasync, "fdatasync", Args::Any),
    r(l::SYS_rename, "rename", Args::Any),
    r(l::SYS_unlink, "unlink", Args::Any),
    r(l::SYS_statx, "statx", Args::Any),
    r(l::SYS_newfstatat, "newfstatat", Args::Any),
    r(l::SYS_fstat, "fstat", Args::Any),
    r(l::SYS_getcwd, "getcwd", Args::Any),
    r(l::SYS_readlink, "readlink", Args::Any),
    r(l::SYS_getrandom, "getrandom", Args::Any),
];

/// The control thread's fcntl: COMMON's F_GETFD, and what taking over an attached disk's fd
/// needs (`husk_devices::host_files::open`: its access mode, then a close-on-exec duplicate).
const API_FCNTL: &[Rule] = &[r(
    l::SYS_fcntl,
    "fcntl",
    Args::Arg1(&[
        (l::F_GETFD as u32, "F_GETFD"),
        (l::F_GETFL as u32, "F_GETFL"),
        (l::F_DUPFD_CLOEXEC as u32, "F_DUPFD_CLOEXEC"),
    ]),
)];

/// The rules of `kind`'s filter, each syscall once (a syscall in two parts keeps the first).
pub fn rules(kind: ThreadKind) -> Vec<Rule> {
    let parts: &[&[Rule]] = match kind {
        ThreadKind::Main => &[COMMON, KICK, MAIN],
        ThreadKind::Vcpu => &[COMMON, THREAD_EXIT, VCPU],
        ThreadKind::Events => &[COMMON, THREAD_EXIT, EVENTS],
        // API_FCNTL first: of a syscall in two parts the first wins, and it extends COMMON's.
        ThreadKind::Api => &[API_FCNTL, COMMON, THREAD_EXIT, KICK, API],
    };
    let mut out: Vec<Rule> = Vec::new();
    for rule in parts.iter().flat_map(|p| p.iter()) {
        if !out.iter().any(|r| r.nr == rule.nr) {
            out.push(*rule);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_thread_may_create_processes_open_files_or_exec() {
        // The one exception: the control-socket thread opens snapshot files (see API).
        let forbidden = [
            l::SYS_clone,
            l::SYS_clone3,
            l::SYS_fork,
            l::SYS_vfork,
            l::SYS_execve,
            l::SYS_execveat,
            l::SYS_open,
            l::SYS_openat,
            l::SYS_openat2,
            l::SYS_ptrace,
            l::SYS_kill,
            l::SYS_mount,
            l::SYS_setuid,
        ];
        for kind in ThreadKind::ALL {
            for rule in rules(kind) {
                if kind == ThreadKind::Api && rule.nr == l::SYS_openat {
                    continue;
                }
                assert!(
                    !forbidden.contains(&rule.nr),
                    "{} allows {}",
                    kind.name(),
                    rule.name
                );
            }
        }
    }

    #[test]
    fn each_syscall_appears_once_and_ioctls_are_always_checked() {
        for kind in ThreadKind::ALL {
            let rules = rules(kind);
            for (i, a) in rules.iter().enumerate() {
                assert!(rules[i + 1..].iter().all(|b| b.nr != a.nr));
                if a.nr == l::SYS_ioctl || a.nr == l::SYS_fcntl {
                    assert!(matches!(a.args, Args::Arg1(_)), "{}", kind.name());
                }
                if a.nr == l::SYS_mmap || a.nr == l::SYS_mprotect {
                    assert_eq!(a.args, Args::NoExec);
                }
            }
        }
        // Only vCPU threads may run a vCPU.
        let runs = |k| {
            rules(k)
                .iter()
                .any(|r| matches!(r.args, Args::Arg1(l) if l.iter().any(|(n, _)| *n == KVM_RUN)))
        };
        assert!(runs(ThreadKind::Vcpu));
        assert!(!runs(ThreadKind::Events) && !runs(ThreadKind::Api) && !runs(ThreadKind::Main));
    }
}
