//! Pods through CRI, husk beside runc under the same containerd (its CRI plugin, the same CNI
//! bridge, images and snapshotter): what kubelet waits for. Not a test: it prints a table
//! (scripts/bench-containerd runs it inside the testbed).
//!
//! Per round and runtime handler, alternating: RunPodSandbox, then CreateContainer +
//! StartContainer of a first container (`sleep`), then of a second one in the same pod. Times:
//! RunPodSandbox alone, pod start (RunPodSandbox until the first container runs) and the second
//! container's create+start. Memory: the proportional set size (PSS, /proc/PID/smaps_rollup)
//! summed over every process that appeared on the host for the pod (husk: shim, VMM and
//! virtiofsd; runc: shim, pause and the containers' processes), with both containers running.
//! Then StopPodSandbox + RemovePodSandbox.
//!
//!     cri-bench [--runs N] [--handlers husk,runc]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use husk_tests::cri::{image_spec, CriContainerd, BOOT_LIMIT, BUSYBOX, CALL_LIMIT};
use k8s_cri::v1::{
    ContainerConfig, ContainerMetadata, LinuxContainerConfig, LinuxContainerResources,
    PodSandboxConfig, PodSandboxMetadata, RemovePodSandboxRequest, StopPodSandboxRequest,
};

/// One pod's numbers.
struct Sample {
    run_pod_sandbox: Duration,
    pod_start: Duration,
    second_container: Duration,
    pss_kib: u64,
}

fn pids() -> HashSet<u32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect()
}

/// PSS of a process in KiB (0 when it is gone or unreadable).
fn pss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("Pss:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// The program name of a process (its `comm`).
fn process_name(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|c| c.trim().to_string())
        .unwrap_or_default()
}

fn one_pod(cri: &CriContainerd, handler: &str, round: usize) -> Sample {
    let uid = format!("bench-{handler}-{round}-{}", std::process::id());
    let log_dir = cri.dir.join("pod-logs").join(&uid);
    std::fs::create_dir_all(&log_dir).unwrap();
    let pod_config = PodSandboxConfig {
        metadata: Some(PodSandboxMetadata {
            name: format!("bench-{handler}-{round}"),
            uid: uid.clone(),
            namespace: "default".into(),
            attempt: 0,
        }),
        hostname: format!("bench-{round}"),
        log_directory: log_dir.display().to_string(),
        ..Default::default()
    };
    let container = |name: &str| ContainerConfig {
        metadata: Some(ContainerMetadata {
            name: name.into(),
            attempt: 0,
        }),
        image: Some(image_spec(BUSYBOX)),
        command: vec!["sleep".into(), "3600".into()],
        log_path: format!("{name}.log"),
        linux: Some(LinuxContainerConfig {
            resources: Some(LinuxContainerResources::default()),
            ..Default::default()
        }),
        ..Default::default()
    };
    let before = pids();
    let start = Instant::now();
    let pod = cri.run_pod(&pod_config, handler);
    let run_pod_sandbox = start.elapsed();
    let start_container = |name: &str| cri.create_and_start(&pod, &pod_config, container(name));
    start_container("first");
    let pod_start = start.elapsed();
    let second = Instant::now();
    start_container("second");
    let second_container = second.elapsed();
    // Let the guest settle (page cache, agent) before reading memory.
    std::thread::sleep(Duration::from_secs(2));
    let me = std::process::id();
    let added: Vec<(String, u64)> = pids()
        .difference(&before)
        .filter(|&&p| p != me)
        .map(|&p| (process_name(p), pss_kib(p)))
        .collect();
    let pss_kib = added.iter().map(|(_, kib)| kib).sum();
    if round == 0 {
        // Where a pod's memory goes, once per runtime, on stderr.
        let mut by_name: HashMap<String, u64> = HashMap::new();
        for (name, kib) in added {
            *by_name.entry(name).or_default() += kib;
        }
        let mut parts: Vec<_> = by_name.into_iter().filter(|(_, kib)| *kib > 0).collect();
        parts.sort_by_key(|p| std::cmp::Reverse(p.1));
        let text: Vec<String> = parts
            .iter()
            .map(|(n, kib)| format!("{n} {:.1} MiB", *kib as f64 / 1024.0))
            .collect();
        eprintln!("{handler} pod memory by process: {}", text.join(", "));
    }
    let mut rs = cri.runtime_client();
    cri.call(
        "StopPodSandbox",
        BOOT_LIMIT,
        rs.stop_pod_sandbox(StopPodSandboxRequest {
            pod_sandbox_id: pod.clone(),
        }),
    );
    cri.call(
        "RemovePodSandbox",
        CALL_LIMIT,
        rs.remove_pod_sandbox(RemovePodSandboxRequest {
            pod_sandbox_id: pod,
        }),
    );
    Sample {
        run_pod_sandbox,
        pod_start,
        second_container,
        pss_kib,
    }
}

fn median_p90(mut v: Vec<f64>) -> (f64, f64) {
    v.sort_by(f64::total_cmp);
    let at = |q: f64| v[((v.len() as f64 - 1.0) * q).round() as usize];
    (at(0.5), at(0.9))
}

fn main() {
    let mut runs = 5usize;
    let mut handlers = vec!["husk".to_string(), "runc".to_string()];
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--runs" => runs = args.next().and_then(|v| v.parse().ok()).expect("--runs N"),
            "--handlers" => {
                handlers = args
                    .next()
                    .expect("--handlers A,B")
                    .split(',')
                    .map(str::to_string)
                    .collect()
            }
            other => panic!(
                "unknown argument {other} (usage: cri-bench [--runs N] [--handlers husk,runc])"
            ),
        }
    }
    let cri = CriContainerd::start("bench");
    cri.will_run_pods();
    let mut samples: HashMap<String, Vec<Sample>> = HashMap::new();
    for round in 0..runs {
        for handler in &handlers {
            let s = one_pod(&cri, handler, round);
            samples.entry(handler.clone()).or_default().push(s);
        }
    }
    println!(
        "| runtime | pods | RunPodSandbox ms (median / p90) | pod start: RunPodSandbox to first container running, ms | second container create+start, ms | host memory per pod (PSS of its processes), MiB |"
    );
    println!("|---|---|---|---|---|---|");
    for handler in &handlers {
        let s = &samples[handler];
        let ms = |f: &dyn Fn(&Sample) -> Duration| {
            median_p90(s.iter().map(|x| f(x).as_secs_f64() * 1000.0).collect())
        };
        let (r50, r90) = ms(&|x| x.run_pod_sandbox);
        let (p50, p90) = ms(&|x| x.pod_start);
        let (c50, c90) = ms(&|x| x.second_container);
        let (m50, m90) = median_p90(s.iter().map(|x| x.pss_kib as f64 / 1024.0).collect());
        println!(
            "| {handler} | {} | {r50:.0} / {r90:.0} | {p50:.0} / {p90:.0} | {c50:.0} / {c90:.0} | {m50:.1} / {m90:.1} |",
            s.len()
        );
    }
}
