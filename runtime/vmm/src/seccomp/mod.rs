//! Per-thread seccomp filters (`--seccomp kill|trap|log|off`).
//!
//! Each thread kind has its own allow list ([`tables`]); [`Filters::new`] compiles them once
//! (seccompiler, classic BPF) and every thread installs its own with [`Filters::install`] as the
//! first thing it does, before it touches guest data. The main thread installs its filter once
//! every other thread runs. Filters are per thread (no TSYNC): a vCPU thread cannot make the
//! calls only the event loop needs, and the other way round.
//!
//! What a call outside the list gets:
//! - `kill` (default): the whole process dies with SIGSYS (a half-dead VMM helps nobody);
//! - `trap`: SIGSYS to the thread; the handler logs the syscall number on stderr, counts it
//!   ([`trapped_count`]) and makes the call fail with ENOSYS: for finding what a list misses;
//! - `log`: allowed, but the kernel logs it (audit log / dmesg);
//! - `off`: no filters.

mod ioctls;
pub mod tables;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

pub use tables::{Args, Rule, ThreadKind};

/// Errors building or installing filters.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// A table could not be compiled (a bug in the tables).
    #[error("cannot compile the seccomp filter of thread kind {0}")]
    Compile(&'static str, #[source] seccompiler::BackendError),
    /// The kernel refused the filter.
    #[error("cannot install the seccomp filter of thread kind {0}")]
    Install(&'static str, #[source] seccompiler::Error),
    /// The SIGSYS handler for trap mode could not be installed.
    #[error("cannot install the SIGSYS handler")]
    Handler(#[source] std::io::Error),
    /// Not one of kill, trap, log, off.
    #[error("invalid --seccomp '{0}': use kill, trap, log or off")]
    Mode(String),
}

/// What happens to a syscall outside a thread's list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// The process is killed (SIGSYS).
    #[default]
    Kill,
    /// SIGSYS handler: logged, counted, fails with ENOSYS.
    Trap,
    /// Allowed and logged by the kernel.
    Log,
    /// No filter at all.
    Off,
}

impl std::str::FromStr for Mode {
    type Err = SeccompError;
    fn from_str(s: &str) -> Result<Self, SeccompError> {
        match s {
            "kill" => Ok(Mode::Kill),
            "trap" => Ok(Mode::Trap),
            "log" => Ok(Mode::Log),
            "off" => Ok(Mode::Off),
            other => Err(SeccompError::Mode(other.to_string())),
        }
    }
}

/// The compiled filter of every thread kind.
#[derive(Debug)]
pub struct Filters {
    mode: Mode,
    programs: Vec<(ThreadKind, BpfProgram)>,
}

fn cond(arg: u8, len: SeccompCmpArgLen, op: SeccompCmpOp, value: u64) -> SeccompCondition {
    // Only fails for an argument index above 5, which the tables never use.
    SeccompCondition::new(arg, len, op, value).unwrap_or_else(|_| unreachable!("arg index"))
}

/// The seccompiler rules (OR-ed) for one table entry; empty means "any arguments".
fn arg_rules(rule: &Rule, pid: u32) -> Result<Vec<SeccompRule>, seccompiler::BackendError> {
    use SeccompCmpArgLen::{Dword, Qword};
    let one = |c: SeccompCondition| SeccompRule::new(vec![c]);
    Ok(match rule.args {
        Args::Any => Vec::new(),
        Args::Arg1(numbers) => numbers
            .iter()
            .map(|(n, _)| one(cond(1, Dword, SeccompCmpOp::Eq, u64::from(*n))))
            .collect::<Result<_, _>>()?,
        Args::NoExec => vec![one(cond(
            2,
            Qword,
            SeccompCmpOp::MaskedEq(libc::PROT_EXEC as u64),
            0,
        ))?],
        Args::UnixStream => vec![SeccompRule::new(vec![
            cond(0, Dword, SeccompCmpOp::Eq, libc::AF_UNIX as u64),
            // The type without SOCK_NONBLOCK / SOCK_CLOEXEC.
            cond(
                1,
                Dword,
                SeccompCmpOp::MaskedEq(0xf),
                libc::SOCK_STREAM as u64,
            ),
        ])?],
        Args::OwnProcess => vec![one(cond(0, Dword, SeccompCmpOp::Eq, u64::from(pid)))?],
        Args::Connected => vec![one(cond(4, Qword, SeccompCmpOp::Eq, 0))?],
    })
}

impl Filters {
    /// Compiles every thread kind's filter for `mode` (nothing for [`Mode::Off`]).
    pub fn new(mode: Mode) -> Result<Self, SeccompError> {
        let mismatch = match mode {
            Mode::Off => {
                return Ok(Filters {
                    mode,
                    programs: Vec::new(),
                })
            }
            Mode::Kill => SeccompAction::KillProcess,
            Mode::Trap => SeccompAction::Trap,
            Mode::Log => SeccompAction::Log,
        };
        let pid = std::process::id();
        let mut programs = Vec::new();
        for kind in ThreadKind::ALL {
            let failed = |e| SeccompError::Compile(kind.name(), e);
            let mut map = BTreeMap::new();
            for rule in tables::rules(kind) {
                map.insert(rule.nr, arg_rules(&rule, pid).map_err(failed)?);
            }
            let filter = SeccompFilter::new(
                map,
                mismatch.clone(),
                SeccompAction::Allow,
                TargetArch::x86_64,
            )
            .map_err(failed)?;
            programs.push((kind, BpfProgram::try_from(filter).map_err(failed)?));
        }
        if mode == Mode::Trap {
            install_trap_handler()?;
        }
        Ok(Filters { mode, programs })
    }

    /// No filters (tests, `--seccomp off`).
    pub fn off() -> Self {
        Filters {
            mode: Mode::Off,
            programs: Vec::new(),
        }
    }

    /// The mode these filters were built for.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Installs `kind`'s filter on the calling thread (a no-op when off). Also sets
    /// no_new_privs, which an unprivileged seccomp filter requires.
    pub fn install(&self, kind: ThreadKind) -> Result<(), SeccompError> {
        match self.programs.iter().find(|(k, _)| *k == kind) {
            Some((_, program)) => seccompiler::apply_filter(program)
                .map_err(|e| SeccompError::Install(kind.name(), e)),
            None => Ok(()),
        }
    }
}

/// Syscalls trapped so far (`--seccomp trap`).
static TRAPPED: AtomicU64 = AtomicU64::new(0);

/// How many syscalls the trap handler has seen.
pub fn trapped_count() -> u64 {
    TRAPPED.load(Ordering::Relaxed)
}

/// Where the syscall number sits in a SIGSYS siginfo (`si_syscall` of `_sigsys`, after the
/// 16-byte header and the 8-byte `_call_addr`; asm-generic/siginfo.h).
const SI_SYSCALL_OFFSET: usize = 24;

extern "C" fn sigsys_handler(_: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    TRAPPED.fetch_add(1, Ordering::Relaxed);
    // SAFETY: the kernel passes a valid siginfo for SIGSYS, whose _sigsys member holds the
    // syscall number at SI_SYSCALL_OFFSET.
    let nr = unsafe {
        info.cast::<u8>()
            .add(SI_SYSCALL_OFFSET)
            .cast::<i32>()
            .read()
    };
    // Formatted by hand into a stack buffer: nothing here may allocate or lock.
    let mut buf = *b"husk-vmm: seccomp: trapped syscall           \n";
    let mut n = nr.unsigned_abs();
    let mut i = buf.len() - 2;
    loop {
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 || i == 37 {
            break;
        }
        i -= 1;
    }
    // SAFETY: write(2) is async-signal-safe; buf is a valid buffer of that length.
    unsafe { libc::write(2, buf.as_ptr().cast(), buf.len()) };
    // The call fails with ENOSYS instead of running (rax is its return value).
    // SAFETY: ctx is the ucontext_t the kernel passed to this SA_SIGINFO handler.
    unsafe {
        let uc = ctx.cast::<libc::ucontext_t>();
        (*uc).uc_mcontext.gregs[libc::REG_RAX as usize] = -(libc::ENOSYS as i64);
    }
}

fn install_trap_handler() -> Result<(), SeccompError> {
    // SAFETY: a zeroed sigaction is valid; handler, flags and an empty mask are set in place.
    let ret = unsafe {
        let mut act: libc::sigaction = std::mem::zeroed();
        act.sa_sigaction = sigsys_handler as *const () as usize;
        act.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut act.sa_mask);
        libc::sigaction(libc::SIGSYS, &act, std::ptr::null_mut())
    };
    if ret != 0 {
        return Err(SeccompError::Handler(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Every thread kind's list, for `--print-seccomp`.
pub fn describe() -> String {
    let mut out = String::new();
    for kind in ThreadKind::ALL {
        let rules = tables::rules(kind);
        let _ = writeln!(out, "{} ({} syscalls):", kind.name(), rules.len());
        for rule in rules {
            let detail = match rule.args {
                Args::Any => String::new(),
                Args::Arg1(numbers) => {
                    let names: Vec<String> = numbers
                        .iter()
                        .map(|(n, name)| format!("{name} ({n:#x})"))
                        .collect();
                    format!("  arg 1 in [{}]", names.join(", "))
                }
                Args::NoExec => String::from("  prot without PROT_EXEC"),
                Args::UnixStream => String::from("  AF_UNIX, SOCK_STREAM only"),
                Args::OwnProcess => String::from("  this process's threads only"),
                Args::Connected => String::from("  connected sockets only (no address)"),
            };
            let _ = writeln!(out, "  {:<16}{detail}", rule.name);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_parse_and_every_filter_compiles() {
        assert_eq!("kill".parse::<Mode>().unwrap(), Mode::Kill);
        assert_eq!("off".parse::<Mode>().unwrap(), Mode::Off);
        assert!("strict".parse::<Mode>().is_err());
        let filters = Filters::new(Mode::Kill).unwrap();
        assert_eq!(filters.programs.len(), ThreadKind::ALL.len());
        assert!(filters.programs.iter().all(|(_, p)| !p.is_empty()));
        assert!(Filters::new(Mode::Off).unwrap().programs.is_empty());
    }

    #[test]
    fn the_listing_names_every_kind_and_its_count() {
        let text = describe();
        for kind in ThreadKind::ALL {
            let count = tables::rules(kind).len();
            assert!(text.contains(&format!("{} ({count} syscalls)", kind.name())));
        }
        assert!(text.contains("KVM_RUN (0xae80)"), "{text}");
    }

    /// Runs `body` in a forked child with `kind`'s filter (kill mode) on; returns the signal
    /// that ended the child (0 when it exited normally with status 0).
    fn in_filtered_child(kind: ThreadKind, body: fn()) -> i32 {
        let filters = Filters::new(Mode::Kill).unwrap();
        // SAFETY: the child only installs a prebuilt filter (prctl/seccomp), runs `body` (raw
        // syscalls, no locks or allocation) and _exits; the parent waits for it.
        unsafe {
            let pid = libc::fork();
            assert!(pid >= 0);
            if pid == 0 {
                if filters.install(kind).is_err() {
                    libc::_exit(3);
                }
                body();
                // exit(2), not exit_group: only the former is on the threads' lists.
                libc::syscall(libc::SYS_exit, 0);
            }
            let mut status = 0;
            assert_eq!(libc::waitpid(pid, &mut status, 0), pid);
            if libc::WIFSIGNALED(status) {
                libc::WTERMSIG(status)
            } else {
                assert_eq!(libc::WEXITSTATUS(status), 0, "child exited with a status");
                0
            }
        }
    }

    #[test]
    fn a_vcpu_thread_that_opens_a_file_is_killed() {
        let sig = in_filtered_child(ThreadKind::Vcpu, || {
            // SAFETY: a plain syscall with a static NUL-terminated path.
            unsafe { libc::syscall(libc::SYS_openat, libc::AT_FDCWD, c"/etc/passwd".as_ptr(), 0) };
        });
        assert_eq!(sig, libc::SIGSYS);
    }

    #[test]
    fn a_vcpu_thread_may_not_map_executable_memory_or_use_other_ioctls() {
        let sig = in_filtered_child(ThreadKind::Vcpu, || {
            // SAFETY: an anonymous mapping request; the filter ends the process first.
            unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    4096,
                    libc::PROT_READ | libc::PROT_EXEC,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
        });
        assert_eq!(sig, libc::SIGSYS);
        let sig = in_filtered_child(ThreadKind::Vcpu, || {
            // SAFETY: FIONBIO on stdin with a valid int; the filter ends the process first.
            unsafe { libc::ioctl(0, libc::FIONBIO, &0i32) };
        });
        assert_eq!(sig, libc::SIGSYS);
        // What the list allows goes through: a non-executable mapping and a write.
        let sig = in_filtered_child(ThreadKind::Vcpu, || {
            // SAFETY: an anonymous mapping and an empty write to stderr.
            unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    4096,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                );
                libc::write(2, std::ptr::null(), 0);
            }
        });
        assert_eq!(sig, 0);
    }

    #[test]
    fn a_vcpu_thread_may_take_fds_off_an_epoll_but_not_add_them() {
        // The filter decides on the syscall number and op before the kernel looks at the fds,
        // so -1 (the call then fails with EBADF) is enough to see what gets through.
        let sig = in_filtered_child(ThreadKind::Vcpu, || {
            // SAFETY: epoll_ctl on an invalid fd; DEL takes no event.
            unsafe { libc::epoll_ctl(-1, libc::EPOLL_CTL_DEL, 0, std::ptr::null_mut()) };
        });
        assert_eq!(sig, 0, "a vsock reset on a vCPU thread calls EPOLL_CTL_DEL");
        let sig = in_filtered_child(ThreadKind::Vcpu, || {
            let mut ev = libc::epoll_event { events: 0, u64: 0 };
            // SAFETY: epoll_ctl on an invalid fd with a valid event; the filter kills first.
            unsafe { libc::epoll_ctl(-1, libc::EPOLL_CTL_ADD, 0, &mut ev) };
        });
        assert_eq!(sig, libc::SIGSYS);
    }

    #[test]
    fn the_event_loop_may_only_create_unix_sockets() {
        let sig = in_filtered_child(ThreadKind::Events, || {
            // SAFETY: plain syscall; the fd (if any) is left to the exiting child.
            unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_NONBLOCK, 0) };
        });
        assert_eq!(sig, 0);
        let sig = in_filtered_child(ThreadKind::Events, || {
            // SAFETY: as above.
            unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
        });
        assert_eq!(sig, libc::SIGSYS);
    }
}
