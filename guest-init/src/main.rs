//! husk-init: PID 1 of a husk guest.
//!
//! Mounts the standard filesystems, puts the console on stdio, tells the VMM it started (boot
//! timer), runs the application named by `husk.spec=` on the kernel command line (see
//! [`husk_init::spec`]), forwards signals to it and reaps zombies, then stops everything else,
//! reports the application's exit code to the VMM and resets the VM, which ends the VMM.
//! Without `husk.spec=` it runs `/bin/sh` on the console (debugging).
//!
//! With a vsock device, the guest agent (see [`agent`]) serves the host from threads of this
//! process, from before the application starts. In sandbox mode (a spec without a command) there
//! is no application: the agent alone runs until its `shutdown` request ends the VM.

mod agent;
mod children;
mod control_port;
mod dns;
mod launch;
mod mounts;
mod rootfs;
mod signals;
mod supervisor;
mod vsock;
mod vsock_tool;

use std::sync::Arc;
use std::time::Duration;

use husk_init::spec::BootSpec;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let Some(code) = vsock_tool::run(&args) {
        std::process::exit(code);
    }
    if std::process::id() != 1 {
        eprintln!("husk-init: must run as PID 1 (it is the init of a husk guest)");
        std::process::exit(2);
    }
    supervisor::block_all_signals();
    let warnings = mounts::mount_standard_filesystems();
    mounts::ensure_console_stdio();
    for w in warnings {
        eprintln!("husk-init: warning: {w}");
    }
    let control = match control_port::ControlPort::open() {
        Ok(port) => Some(port),
        Err(e) => {
            eprintln!("husk-init: warning: no control port (ioperm: {e}); exit code not reported");
            None
        }
    };
    if let Some(port) = &control {
        port.report_init_started();
    }
    bring_up_loopback();

    let children = Arc::new(children::Children::new());
    let exit = match read_spec() {
        Ok((spec, root)) => run(&spec, root.as_deref(), &children),
        Err(e) => {
            eprintln!("husk-init: {}", chain(&e));
            supervisor::AppExit::NotStarted(125)
        }
    };

    supervisor::stop_everything_else(Duration::from_secs(2), &children);
    // tcdrain waits until the console has sent what the application wrote, so no output is
    // lost to the reset.
    rustix::fs::sync();
    let _ = rustix::termios::tcdrain(rustix::stdio::stdout());
    if let Some(port) = &control {
        port.report_exit_code(exit.code());
    }
    // The application's output is complete: keep the kernel's shutdown lines ("reboot:
    // Restarting system") out of it by silencing the console now (console_loglevel 0).
    let _ = std::fs::write("/proc/sys/kernel/printk", "0");
    // RB_AUTOBOOT: the VMM turns the reset into the end of the VM.
    let _ = rustix::system::reboot(rustix::system::RebootCommand::Restart);
    // Only reached if reboot failed: halt here rather than return (PID 1 exiting panics the kernel).
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// Starts the guest agent, then the application (or, in sandbox mode, only the agent), and
/// returns how the application ended.
fn run(
    spec: &BootSpec,
    root: Option<&str>,
    children: &Arc<children::Children>,
) -> supervisor::AppExit {
    let shutdown: Box<dyn Fn(i32) + Send + Sync> = if spec.is_sandbox() {
        Box::new(|_| supervisor::request_sandbox_end())
    } else {
        let children = Arc::clone(children);
        Box::new(move |sig| {
            children.signal_app(sig);
        })
    };
    let agent = agent::Agent::new(
        Arc::clone(children),
        root.map(|r| r.as_bytes().to_vec()),
        shutdown,
    );
    let agent = agent::start(Arc::new(agent));
    if spec.is_sandbox() {
        return match agent {
            Ok(()) => supervisor::run_sandbox(children),
            Err(e) => {
                eprintln!("husk-init: sandbox mode needs the guest agent, but {e}");
                supervisor::AppExit::NotStarted(125)
            }
        };
    }
    if let Err(agent::AgentOff::Failed(e)) = &agent {
        eprintln!("husk-init: warning: guest agent off: cannot listen on vsock: {e}");
    }
    supervisor::run(spec, root, children)
}

/// Why PID 1 has no application to run.
#[derive(Debug, thiserror::Error)]
enum StartError {
    #[error("cannot read /proc/cmdline")]
    Cmdline(#[source] std::io::Error),
    #[error(transparent)]
    Spec(#[from] husk_init::spec::SpecError),
    #[error(transparent)]
    Root(#[from] rootfs::RootError),
    #[error(transparent)]
    Share(#[from] husk_init::shares::ShareError),
    #[error("cannot mount shared directory {tag} at {path}")]
    ShareMount {
        tag: String,
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// `e` and its sources, "outer: inner: ...".
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(&format!(": {s}"));
        source = s.source();
    }
    text
}

/// The application to run and, with `husk.root=`, the root it runs in (mounted here).
fn read_spec() -> Result<(BootSpec, Option<String>), StartError> {
    let cmdline = std::fs::read_to_string("/proc/cmdline").map_err(StartError::Cmdline)?;
    let spec = match BootSpec::from_cmdline(&cmdline) {
        Some(Ok(spec)) => spec,
        Some(Err(e)) => return Err(e.into()),
        None => BootSpec {
            argv: vec![b"/bin/sh".to_vec()],
            ..BootSpec::default()
        },
    };
    let root = match rootfs::root_device(&cmdline) {
        Some(device) => {
            rootfs::mount_root(device)?;
            Some(rootfs::ROOT_MOUNT.to_string())
        }
        None => None,
    };
    for share in husk_init::shares::SharedMount::all_from_cmdline(&cmdline)? {
        rootfs::mount_share(&share, root.as_deref()).map_err(|source| StartError::ShareMount {
            tag: share.tag.clone(),
            path: share.guest_path.clone(),
            source,
        })?;
    }
    if let Some(name) = husk_init::hostname::from_cmdline(&cmdline) {
        if let Err(e) = rustix::system::sethostname(name.as_bytes()) {
            eprintln!("husk-init: warning: husk.hostname: cannot set the host name: {e}");
        }
    }
    if let Err(e) = husk_init::page_reporting::apply(&cmdline) {
        eprintln!("husk-init: warning: cannot set the page reporting order: {e}");
    }
    if let Some(ip) = dns::nameserver(&cmdline) {
        if let Err(e) = dns::configure(ip, root.as_deref()) {
            eprintln!("husk-init: warning: husk.dns: cannot write /etc/resolv.conf: {e}");
        }
    }
    Ok((spec, root))
}

/// Sets `lo` up, as every application expects 127.0.0.1 to work.
fn bring_up_loopback() {
    use rustix::net::{AddressFamily, SocketFlags, SocketType};
    use std::os::fd::AsRawFd;
    // A datagram socket only for the interface ioctls (rustix wraps neither of them).
    let Ok(sock) = rustix::net::socket_with(
        AddressFamily::INET,
        SocketType::DGRAM,
        SocketFlags::CLOEXEC,
        None,
    ) else {
        return;
    };
    // SAFETY: ifreq is plain data (all-zero is valid); its name is NUL-terminated ("lo" and
    // zeros); both ioctls read or write one ifreq that outlives them, on a socket we own.
    unsafe {
        let mut req: libc::ifreq = std::mem::zeroed();
        for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
            *dst = *src as libc::c_char;
        }
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS as _, &mut req) == 0 {
            req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
            libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS as _, &req);
        }
    }
}
