//! boot-bench: time from starting a VMM process to a marker on its console, and the VMM's own
//! memory at that moment, over repeated runs. Used by scripts/bench; not a test.
//!
//!   boot-bench --name NAME --runs N --marker TEXT --guest-mib M -- CMD [ARGS...]
//!
//! Prints one markdown table row: name, median / p90 / min milliseconds to the marker, and the
//! median resident memory of the VMM process excluding guest RAM (MiB). Guest RAM is recognised
//! as the mappings at least half the guest's size: a VMM maps its guest memory in one or two
//! large regions, and nothing else a VMM maps is that large.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

struct Args {
    name: String,
    runs: usize,
    marker: String,
    guest_mib: u64,
    command: Vec<String>,
}

fn parse_args() -> Result<Args, String> {
    let mut args = std::env::args().skip(1);
    let (mut name, mut runs, mut marker, mut guest_mib) = (None, 10, None, 0);
    while let Some(a) = args.next() {
        let mut value = || args.next().ok_or(format!("{a} needs a value"));
        match a.as_str() {
            "--name" => name = Some(value()?),
            "--runs" => runs = value()?.parse().map_err(|_| "--runs: not a number")?,
            "--marker" => marker = Some(value()?),
            "--guest-mib" => {
                guest_mib = value()?.parse().map_err(|_| "--guest-mib: not a number")?
            }
            "--" => break,
            other => return Err(format!("unknown argument {other}")),
        }
    }
    let command: Vec<String> = args.collect();
    if command.is_empty() || runs == 0 || guest_mib == 0 {
        return Err(
            "usage: boot-bench --name N --runs R --marker M --guest-mib G -- CMD...".into(),
        );
    }
    Ok(Args {
        name: name.ok_or("--name is required")?,
        runs,
        marker: marker.ok_or("--marker is required")?,
        guest_mib,
        command,
    })
}

/// Resident KiB of `pid` outside mappings of at least `big_kib`.
fn rss_excluding_big_mappings(pid: u32, big_kib: u64) -> Option<u64> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).ok()?;
    let (mut total, mut current_is_big) = (0, false);
    for line in smaps.lines() {
        let mut words = line.split_whitespace();
        match words.next() {
            Some("Size:") => {
                let size: u64 = words.next()?.parse().ok()?;
                current_is_big = size >= big_kib;
            }
            Some("Rss:") if !current_is_big => total += words.next()?.parse::<u64>().ok()?,
            _ => {}
        }
    }
    Some(total)
}

struct Sample {
    to_marker: Duration,
    own_rss_kib: u64,
}

fn one_run(args: &Args) -> Result<Sample, String> {
    let start = Instant::now();
    let mut child = Command::new(&args.command[0])
        .args(&args.command[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", args.command[0]))?;
    let mut stdout = child.stdout.take().expect("piped");
    let (tx, rx) = std::sync::mpsc::channel();
    let marker = args.marker.clone().into_bytes();
    let reader = std::thread::spawn(move || {
        let (mut seen, mut buf, mut sent) = (Vec::new(), [0u8; 4096], false);
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 {
                break;
            }
            seen.extend_from_slice(&buf[..n]);
            if !sent && seen.windows(marker.len()).any(|w| w == marker) {
                let _ = tx.send(Instant::now());
                sent = true;
            }
        }
        seen
    });
    let result = match rx.recv_timeout(Duration::from_secs(120)) {
        Ok(at) => {
            let own =
                rss_excluding_big_mappings(child.id(), args.guest_mib * 1024 / 2).unwrap_or(0);
            Ok(Sample {
                to_marker: at - start,
                own_rss_kib: own,
            })
        }
        Err(_) => Err("no marker within 120 s".to_string()),
    };
    // Let the guest finish on its own (it resets after the marker); kill a straggler.
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = child.kill();
    let _ = child.wait();
    let console = reader.join().unwrap_or_default();
    result.map_err(|e| format!("{e}; console:\n{}", String::from_utf8_lossy(&console)))
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let idx = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[idx]
}

fn main() {
    let args = parse_args().unwrap_or_else(|e| {
        eprintln!("boot-bench: {e}");
        std::process::exit(2);
    });
    let mut ms = Vec::new();
    let mut rss = Vec::new();
    for i in 0..args.runs {
        match one_run(&args) {
            Ok(s) => {
                ms.push(s.to_marker.as_secs_f64() * 1000.0);
                rss.push(s.own_rss_kib as f64 / 1024.0);
            }
            Err(e) => {
                eprintln!("boot-bench: {} run {i}: {e}", args.name);
                std::process::exit(1);
            }
        }
    }
    ms.sort_by(f64::total_cmp);
    rss.sort_by(f64::total_cmp);
    println!(
        "| {} | {} | {:.0} | {:.0} | {:.0} | {:.1} |",
        args.name,
        args.runs,
        percentile(&ms, 0.5),
        percentile(&ms, 0.9),
        ms[0],
        percentile(&rss, 0.5)
    );
}
