//! The agent served over a socketpair on the host: the same sessions, processes and reaping as
//! in the guest, except that the reaper waits for registered pids only (this is not PID 1).

use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use husk_proto::agent::{
    guest_message::Msg as Reply, host_message::Msg as Request, Exec, GuestMessage, Hello,
    HostMessage, Shutdown, WindowSize,
};
use husk_proto::frame;
use rustix::process::Signal;

use super::*;

/// An agent with its own registry and a reaper thread for it.
struct Harness {
    agent: Arc<Agent>,
    shutdowns: mpsc::Receiver<i32>,
    stop: Arc<AtomicBool>,
    reaper: Option<JoinHandle<()>>,
}

impl Harness {
    fn new() -> Self {
        let children = Arc::new(Children::new());
        let (tx, shutdowns) = mpsc::channel();
        let tx = std::sync::Mutex::new(tx);
        let agent = Arc::new(Agent::new(
            Arc::clone(&children),
            None,
            Box::new(move |sig| {
                let _ = tx.lock().unwrap().send(sig);
            }),
        ));
        let stop = Arc::new(AtomicBool::new(false));
        let reaper_stop = Arc::clone(&stop);
        let reaper = std::thread::spawn(move || {
            while !reaper_stop.load(Ordering::SeqCst) {
                children.reap_registered();
                std::thread::sleep(Duration::from_millis(2));
            }
        });
        Self {
            agent,
            shutdowns,
            stop,
            reaper: Some(reaper),
        }
    }

    /// Serves one connection in a thread; returns the host's end and that thread.
    fn connect(&self) -> (UnixStream, JoinHandle<()>) {
        let (host, guest) = UnixStream::pair().unwrap();
        host.set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let agent = Arc::clone(&self.agent);
        let server = std::thread::spawn(move || {
            serve(File::from(OwnedFd::from(guest)), &agent);
        });
        (host, server)
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(reaper) = self.reaper.take() {
            let _ = reaper.join();
        }
    }
}

fn send(conn: &mut UnixStream, msg: Request) {
    frame::write(conn, &HostMessage { msg: Some(msg) }).unwrap();
}

fn recv(conn: &mut UnixStream) -> Option<Reply> {
    frame::read::<GuestMessage, _>(conn)
        .unwrap()
        .and_then(|m| m.msg)
}

fn exec(argv: &[&str]) -> Exec {
    Exec {
        argv: argv.iter().map(|s| s.to_string()).collect(),
        ..Exec::default()
    }
}

fn sh(script: &str) -> Exec {
    exec(&["/bin/sh", "-c", script])
}

/// Everything an exec connection sent until it closed.
#[derive(Debug, Default)]
struct Transcript {
    pid: Option<u32>,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    exit: Option<(i32, i32)>,
    error: Option<String>,
    largest_chunk: usize,
    /// Frames after exit or error (must stay empty).
    after_end: usize,
}

fn collect(conn: &mut UnixStream) -> Transcript {
    let mut t = Transcript::default();
    while let Some(reply) = recv(conn) {
        if t.exit.is_some() || t.error.is_some() {
            t.after_end += 1;
        }
        match reply {
            Reply::StartedPid(pid) => t.pid = Some(pid),
            Reply::Stdout(b) => {
                t.largest_chunk = t.largest_chunk.max(b.len());
                t.stdout.extend(b);
            }
            Reply::Stderr(b) => t.stderr.extend(b),
            Reply::Exit(e) => t.exit = Some((e.code, e.signal)),
            Reply::Error(e) => t.error = Some(e),
            other => panic!("unexpected frame {other:?}"),
        }
    }
    t
}

fn run_exec(h: &Harness, request: Exec) -> Transcript {
    let (mut conn, server) = h.connect();
    send(&mut conn, Request::Exec(request));
    let t = collect(&mut conn);
    server.join().unwrap();
    assert_eq!(t.after_end, 0, "frames after the last one: {t:?}");
    t
}

fn started_pid(conn: &mut UnixStream) -> u32 {
    match recv(conn) {
        Some(Reply::StartedPid(pid)) => pid,
        other => panic!("expected started_pid, got {other:?}"),
    }
}

fn alive(pid: u32) -> bool {
    // A zombie still answers kill(0); the registry reaps it within milliseconds.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s.contains(") Z "))
        .unwrap_or(false)
}

#[test]
fn hello_reports_version_and_uptime() {
    let h = Harness::new();
    let (mut conn, server) = h.connect();
    send(&mut conn, Request::Hello(Hello::default()));
    match recv(&mut conn) {
        Some(Reply::Hello(hello)) => {
            assert_eq!(hello.version, PROTOCOL_VERSION);
            assert!(hello.uptime_ms > 0);
        }
        other => panic!("expected hello, got {other:?}"),
    }
    assert_eq!(recv(&mut conn), None, "one request per connection");
    server.join().unwrap();
}

#[test]
fn exec_streams_both_outputs_then_the_exit_code() {
    let h = Harness::new();
    let t = run_exec(&h, sh("echo hi; echo err >&2; exit 3"));
    assert!(t.pid.is_some());
    assert_eq!(t.stdout, b"hi\n");
    assert_eq!(t.stderr, b"err\n");
    assert_eq!(t.exit, Some((3, 0)));
    assert_eq!(h.agent.children.registered(), 0);
}

#[test]
fn output_arrives_whole_in_bounded_chunks_before_the_exit() {
    let h = Harness::new();
    let t = run_exec(&h, sh("head -c 200000 /dev/zero | tr '\\0' x"));
    assert_eq!(t.stdout.len(), 200_000);
    assert!(t.stdout.iter().all(|&b| b == b'x'));
    assert!(t.largest_chunk <= stdio::CHUNK, "{}", t.largest_chunk);
    assert_eq!(t.exit, Some((0, 0)));
}

#[test]
fn the_environment_and_workdir_are_the_documented_ones() {
    let h = Harness::new();
    let mut request = sh("pwd; env");
    request.env = vec!["A=1".into(), "HOME=/override".into()];
    request.workdir = "/tmp".into();
    let t = run_exec(&h, request);
    let out = String::from_utf8(t.stdout).unwrap();
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "/tmp");
    assert!(lines.contains(&"A=1"), "{out}");
    assert!(lines.contains(&"HOME=/override"), "request env wins: {out}");
    assert!(
        lines.contains(&"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"),
        "{out}"
    );
    assert!(
        !lines.iter().any(|l| l.starts_with("TERM=")),
        "no TERM without tty: {out}"
    );
}

#[test]
fn commands_that_cannot_start_get_a_clear_error() {
    let h = Harness::new();
    let t = run_exec(&h, exec(&["husk-no-such-command"]));
    assert_eq!(
        t.error.as_deref(),
        Some("exec: no such file: husk-no-such-command")
    );
    assert!(t.pid.is_none() && t.exit.is_none());

    let t = run_exec(&h, exec(&["/dev/null"]));
    assert_eq!(
        t.error.as_deref(),
        Some("exec: permission denied: /dev/null")
    );

    let mut request = exec(&["true"]);
    request.workdir = "/nonexistent-husk".into();
    let t = run_exec(&h, request);
    assert_eq!(
        t.error.as_deref(),
        Some("exec: no such directory: /nonexistent-husk")
    );

    let mut request = exec(&["true"]);
    request.env = vec!["NOEQUALS".into()];
    assert!(run_exec(&h, request).error.unwrap().contains("KEY=VALUE"));
    assert!(run_exec(&h, exec(&[]))
        .error
        .unwrap()
        .contains("argv is empty"));
    assert_eq!(h.agent.children.registered(), 0);
}

#[test]
fn stdin_reaches_the_process_and_close_stdin_ends_it() {
    let h = Harness::new();
    let (mut conn, server) = h.connect();
    send(&mut conn, Request::Exec(exec(&["cat"])));
    send(&mut conn, Request::Stdin(b"round ".to_vec()));
    send(&mut conn, Request::Stdin(b"trip".to_vec()));
    send(&mut conn, Request::CloseStdin(true));
    let t = collect(&mut conn);
    server.join().unwrap();
    assert_eq!(t.stdout, b"round trip");
    assert_eq!(t.exit, Some((0, 0)));
}

#[test]
fn a_signal_frame_reaches_the_process() {
    let h = Harness::new();
    let (mut conn, server) = h.connect();
    send(&mut conn, Request::Exec(exec(&["sleep", "30"])));
    let pid = started_pid(&mut conn);
    send(&mut conn, Request::Signal(Signal::TERM.as_raw()));
    let t = collect(&mut conn);
    server.join().unwrap();
    assert_eq!(
        t.exit,
        Some((128 + Signal::TERM.as_raw(), Signal::TERM.as_raw()))
    );
    assert!(!alive(pid));
}

#[test]
fn a_dropped_connection_kills_the_process_and_its_group() {
    let h = Harness::new();
    let (mut conn, server) = h.connect();
    // The shell's background child is in the same process group: it must die too.
    send(&mut conn, Request::Exec(sh("sleep 31 & echo $!; wait")));
    let pid = started_pid(&mut conn);
    let child: u32 = match recv(&mut conn) {
        Some(Reply::Stdout(b)) => String::from_utf8(b).unwrap().trim().parse().unwrap(),
        other => panic!("expected the child's pid, got {other:?}"),
    };
    drop(conn);
    server.join().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while alive(pid) || alive(child) {
        assert!(
            Instant::now() < deadline,
            "process {pid} or {child} outlived the host"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(h.agent.children.registered(), 0);
}

#[test]
fn a_process_that_ignores_stdin_does_not_block_signals() {
    let h = Harness::new();
    let (mut conn, server) = h.connect();
    send(&mut conn, Request::Exec(exec(&["sleep", "30"])));
    started_pid(&mut conn);
    // Far more than a pipe holds; the input loop buffers (up to its bound) and reads on.
    for _ in 0..4 {
        send(&mut conn, Request::Stdin(vec![b'z'; 256 * 1024]));
    }
    send(&mut conn, Request::Signal(Signal::KILL.as_raw()));
    let t = collect(&mut conn);
    server.join().unwrap();
    assert_eq!(
        t.exit,
        Some((128 + Signal::KILL.as_raw(), Signal::KILL.as_raw()))
    );
}

#[test]
fn a_tty_exec_runs_on_a_terminal_of_the_given_size_and_follows_resizes() {
    let h = Harness::new();
    let (mut conn, server) = h.connect();
    let mut request = sh("tty; stty size; echo TERM=$TERM; read line; stty size");
    request.tty = true;
    request.window = Some(WindowSize {
        rows: 30,
        cols: 100,
    });
    send(&mut conn, Request::Exec(request));
    started_pid(&mut conn);
    // Resize, then let the shell go on (the line also travels the terminal's echo).
    let mut seen = Vec::new();
    while !String::from_utf8_lossy(&seen).contains("TERM=xterm") {
        match recv(&mut conn) {
            Some(Reply::Stdout(b)) => seen.extend(b),
            other => panic!("expected output, got {other:?}; so far {seen:?}"),
        }
    }
    send(
        &mut conn,
        Request::Resize(WindowSize {
            rows: 40,
            cols: 120,
        }),
    );
    send(&mut conn, Request::Stdin(b"go\n".to_vec()));
    let t = collect(&mut conn);
    server.join().unwrap();
    seen.extend(t.stdout);
    let out = String::from_utf8_lossy(&seen);
    assert!(out.contains("/dev/pts/"), "not a terminal:\n{out}");
    assert!(out.contains("30 100"), "initial size missing:\n{out}");
    assert!(out.contains("40 120"), "resize missing:\n{out}");
    assert!(t.stderr.is_empty(), "a tty sends no stderr frames");
    assert_eq!(t.exit, Some((0, 0)));
}

#[test]
fn close_stdin_on_a_tty_sends_end_of_file() {
    let h = Harness::new();
    let (mut conn, server) = h.connect();
    let mut request = exec(&["cat"]);
    request.tty = true;
    send(&mut conn, Request::Exec(request));
    send(&mut conn, Request::Stdin(b"line\n".to_vec()));
    send(&mut conn, Request::CloseStdin(true));
    let t = collect(&mut conn);
    server.join().unwrap();
    assert_eq!(t.exit, Some((0, 0)), "{t:?}");
    // Echo and cat's copy, both with the terminal's CRLF.
    assert_eq!(
        String::from_utf8_lossy(&t.stdout).matches("line").count(),
        2
    );
}

#[test]
fn concurrent_execs_keep_their_own_output_and_status() {
    let h = Harness::new();
    let runs: Vec<_> = (0..3)
        .map(|i| {
            let (mut conn, server) = h.connect();
            send(
                &mut conn,
                Request::Exec(sh(&format!("sleep 0.2; echo run{i}; exit {i}"))),
            );
            (conn, server)
        })
        .collect();
    for (i, (mut conn, server)) in runs.into_iter().enumerate() {
        let t = collect(&mut conn);
        server.join().unwrap();
        assert_eq!(t.stdout, format!("run{i}\n").as_bytes());
        assert_eq!(t.exit, Some((i as i32, 0)));
    }
}

#[test]
fn malformed_input_gets_an_error_and_never_a_panic() {
    let h = Harness::new();
    // Garbage instead of a frame.
    let (mut conn, server) = h.connect();
    std::io::Write::write_all(&mut conn, &[0, 0, 0, 2, 0xff, 0xff]).unwrap();
    assert!(matches!(recv(&mut conn), Some(Reply::Error(e)) if e.starts_with("bad request")));
    server.join().unwrap();
    // A length prefix over the limit.
    let (mut conn, server) = h.connect();
    std::io::Write::write_all(&mut conn, &u32::MAX.to_be_bytes()).unwrap();
    assert!(matches!(recv(&mut conn), Some(Reply::Error(_))));
    server.join().unwrap();
    // An exec-only frame as the request.
    let (mut conn, server) = h.connect();
    send(&mut conn, Request::Stdin(b"x".to_vec()));
    assert!(matches!(recv(&mut conn), Some(Reply::Error(e)) if e.contains("got stdin")),);
    server.join().unwrap();
    // An empty message.
    let (mut conn, server) = h.connect();
    frame::write(&mut conn, &HostMessage { msg: None }).unwrap();
    assert!(matches!(recv(&mut conn), Some(Reply::Error(_))));
    server.join().unwrap();
    // A request inside an exec: error, and the process is killed.
    let (mut conn, server) = h.connect();
    send(&mut conn, Request::Exec(exec(&["sleep", "30"])));
    let pid = started_pid(&mut conn);
    send(&mut conn, Request::Hello(Hello::default()));
    let t = collect(&mut conn);
    server.join().unwrap();
    assert!(t.error.unwrap().contains("hello is not allowed"));
    assert!(t.exit.is_none(), "the error is the last frame");
    let deadline = Instant::now() + Duration::from_secs(10);
    while alive(pid) {
        assert!(
            Instant::now() < deadline,
            "process {pid} survived a broken session"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // A bad signal number on an exec connection.
    let (mut conn, server) = h.connect();
    send(&mut conn, Request::Exec(exec(&["sleep", "30"])));
    started_pid(&mut conn);
    send(&mut conn, Request::Signal(1000));
    assert!(collect(&mut conn).error.unwrap().contains("1000"));
    server.join().unwrap();
}

#[test]
fn shutdown_is_acknowledged_before_it_is_carried_out() {
    let h = Harness::new();
    let (mut conn, server) = h.connect();
    send(&mut conn, Request::Shutdown(Shutdown { signal: 0 }));
    assert_eq!(recv(&mut conn), Some(Reply::Ack(true)));
    assert!(
        h.shutdowns.try_recv().is_err(),
        "carried out before the host closed the connection"
    );
    drop(conn);
    server.join().unwrap();
    assert_eq!(h.shutdowns.try_recv(), Ok(Signal::TERM.as_raw()));

    let (mut conn, server) = h.connect();
    send(&mut conn, Request::Shutdown(Shutdown { signal: 99 }));
    assert!(matches!(recv(&mut conn), Some(Reply::Error(_))));
    server.join().unwrap();
    assert!(h.shutdowns.try_recv().is_err());
}

#[test]
fn connections_beyond_the_cap_are_refused_with_an_error() {
    let h = Harness::new();
    h.agent.active.store(MAX_CONNECTIONS, Ordering::SeqCst);
    let (mut host, guest) = UnixStream::pair().unwrap();
    admit(File::from(OwnedFd::from(guest)), &h.agent);
    assert!(matches!(recv(&mut host), Some(Reply::Error(e)) if e.contains("too many")));
    assert_eq!(recv(&mut host), None);
    assert_eq!(h.agent.active.load(Ordering::SeqCst), MAX_CONNECTIONS);

    h.agent.active.store(0, Ordering::SeqCst);
    let (mut host, guest) = UnixStream::pair().unwrap();
    admit(File::from(OwnedFd::from(guest)), &h.agent);
    send(&mut host, Request::Hello(Hello::default()));
    assert!(matches!(recv(&mut host), Some(Reply::Hello(_))));
    assert_eq!(recv(&mut host), None);
    let deadline = Instant::now() + Duration::from_secs(5);
    while h.agent.active.load(Ordering::SeqCst) != 0 {
        assert!(Instant::now() < deadline, "the slot was not released");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn set_time_splits_instants_before_and_after_the_epoch() {
    // set_time itself would change this machine's clock; its conversion is what can go wrong.
    let ts = timespec_of(1_700_000_000_123_456_789);
    assert_eq!((ts.tv_sec, ts.tv_nsec), (1_700_000_000, 123_456_789));
    let ts = timespec_of(-1);
    assert_eq!((ts.tv_sec, ts.tv_nsec), (-1, 999_999_999));
}

#[test]
fn a_host_gone_while_stdin_is_backed_up_still_kills_the_process() {
    let h = Harness::new();
    let (mut conn, server) = h.connect();
    send(&mut conn, Request::Exec(exec(&["sleep", "30"])));
    let pid = started_pid(&mut conn);
    // More than the input loop buffers: it stops reading, and the writer blocks.
    let mut writer = conn.try_clone().unwrap();
    let flood = std::thread::spawn(move || {
        for _ in 0..16 {
            let chunk = HostMessage {
                msg: Some(Request::Stdin(vec![b'z'; 256 * 1024])),
            };
            if frame::write(&mut writer, &chunk).is_err() {
                return;
            }
        }
    });
    std::thread::sleep(Duration::from_millis(300));
    assert!(alive(pid));
    conn.shutdown(std::net::Shutdown::Both).unwrap();
    flood.join().unwrap();
    drop(conn);
    server.join().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while alive(pid) {
        assert!(Instant::now() < deadline, "process {pid} outlived the host");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn a_set_network_the_agent_cannot_parse_is_refused_naming_the_field() {
    // A well-formed one would reconfigure this machine's eth0; parsing is net_config's test.
    let h = Harness::new();
    let (mut conn, server) = h.connect();
    let bad = husk_proto::agent::SetNetwork {
        address: "not-an-address".into(),
        prefix_len: 30,
        ..Default::default()
    };
    send(&mut conn, Request::SetNetwork(bad));
    match recv(&mut conn) {
        Some(Reply::Error(e)) => assert!(e.starts_with("set_network: address"), "{e}"),
        other => panic!("expected an error, got {other:?}"),
    }
    server.join().unwrap();
}
