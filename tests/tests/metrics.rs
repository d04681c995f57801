//! huskd's Prometheus metrics scraped by a real Prometheus (Debian's `prometheus`) and read
//! back through its query API (testbed: a real guest makes the numbers). Prometheus refuses a
//! page that breaks the text format (its `up` series is 0 then), so `up == 1` is the format's
//! test; the queries prove the series and their values.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use husk_tests::huskd::Huskd;
use husk_tests::{bin, require_guest_kvm};

const BOOT: Duration = Duration::from_secs(120);

/// A Prometheus scraping `target` every second, killed on drop.
struct Prometheus {
    child: Child,
    port: u16,
}

impl Prometheus {
    fn start(dir: &Path, target: &str, port: u16) -> Self {
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 900ms\nscrape_configs:\n  \
                 - job_name: husk\n    static_configs:\n      - targets: ['{target}']\n"
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("tsdb").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("prometheus (Debian package prometheus) must be installed: scripts/setup");
        Self { child, port }
    }

    /// The value of the first series `query` returns, if any.
    fn query(&self, query: &str) -> Option<f64> {
        let encoded: String = query
            .bytes()
            .map(|b| {
                if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                    (b as char).to_string()
                } else {
                    format!("%{b:02X}")
                }
            })
            .collect();
        let body = http_get(self.port, &format!("/api/v1/query?query={encoded}"))?;
        let json: serde_json::Value = serde_json::from_str(&body).ok()?;
        json["data"]["result"][0]["value"][1].as_str()?.parse().ok()
    }

    /// Waits until `query` returns a value that `ok` accepts; the last value seen otherwise.
    fn wait_for(&self, query: &str, ok: impl Fn(f64) -> bool) -> Result<f64, Option<f64>> {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut last = None;
        while Instant::now() < deadline {
            last = self.query(query);
            if let Some(v) = last.filter(|v| ok(*v)) {
                return Ok(v);
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        Err(last)
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The body of `GET path` from 127.0.0.1:`port` (HTTP/1.0, read to the end).
fn http_get(port: u16, path: &str) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let (head, body) = out.split_once("\r\n\r\n")?;
    let status = head.split(' ').nth(1);
    (head.starts_with("HTTP/1.") && status == Some("200")).then(|| body.to_string())
}

#[test]
#[ignore = "needs a hardware-style KVM: run through scripts/testbed (scripts/test does)"]
fn prometheus_scrapes_huskd_and_sees_the_vms_numbers() {
    require_guest_kvm();
    let port = 19000 + (std::process::id() % 1000) as u16;
    let metrics = format!("127.0.0.1:{port}");
    let vmm = bin("husk-vmm").display().to_string();
    let huskd = Huskd::start("metrics", &["--vmm", &vmm, "--metrics", &metrics]);
    // The page as huskd serves it, before any VM.
    // (huskd's API socket is up slightly before its metrics listener.)
    let deadline = Instant::now() + Duration::from_secs(10);
    let page = loop {
        match http_get(port, "/metrics") {
            Some(page) => break page,
            None if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(100)),
            None => panic!("huskd --metrics does not serve /metrics:\n{}", huskd.log()),
        }
    };
    assert!(page.contains("husk_vms{state=\"running\"} 0\n"), "{page}");

    let created = huskd.husk(&["create", "--name", "m1", "--memory", "128", "--start"]);
    assert_eq!(created.code(), Some(0), "{}", created.stderr());
    huskd.wait_agent("m1", BOOT);
    // Some guest work: vsock traffic (the agent) and CPU.
    let out = huskd.husk(&[
        "exec",
        "m1",
        "sh",
        "-c",
        "i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done; echo done",
    ]);
    assert_eq!(out.code(), Some(0), "{}", out.stderr());

    let prom_dir = huskd.dir.join("prometheus");
    std::fs::create_dir_all(&prom_dir).unwrap();
    let prometheus = Prometheus::start(&prom_dir, &metrics, port + 1000);
    let log = || std::fs::read_to_string(prom_dir.join("prometheus.log")).unwrap_or_default();
    let expect = |query: &str, ok: &dyn Fn(f64) -> bool, what: &str| {
        prometheus.wait_for(query, ok).unwrap_or_else(|last| {
            panic!("{what}: {query} gave {last:?}\nprometheus log:\n{}", log())
        })
    };
    // The page parsed: Prometheus's own health series for the target.
    expect(
        "up{job=\"husk\"}",
        &|v| v == 1.0,
        "the scrape of huskd is healthy",
    );
    expect(
        "husk_vms{state=\"running\"}",
        &|v| v == 1.0,
        "one running VM",
    );
    expect("husk_vms_max", &|v| v >= 1.0, "the VM limit");
    expect(
        "husk_vm_cpu_seconds_total{vm=\"m1\"}",
        &|v| v > 0.0,
        "the VM used CPU",
    );
    expect(
        "husk_vm_memory_rss_bytes{vm=\"m1\"}",
        &|v| v > 4.0 * 1024.0 * 1024.0 && v < 512.0 * 1024.0 * 1024.0,
        "the VMM's resident memory (the guest's touched RAM in it)",
    );
    expect(
        "husk_vm_guest_memory_bytes{vm=\"m1\"}",
        &|v| v == 128.0 * 1024.0 * 1024.0,
        "the guest's RAM",
    );
    expect(
        "sum(husk_vm_device_requests_total{vm=\"m1\",device=\"vsock\"})",
        &|v| v > 0.0,
        "vsock packets of the agent's exec",
    );
    expect(
        "husk_vm_boot_to_init_seconds{vm=\"m1\"}",
        &|v| v > 0.0,
        "the boot time the VMM measured",
    );
    expect(
        "husk_vm_ready_seconds_count{kind=\"boot\"}",
        &|v| v == 1.0,
        "one boot timed to agent ready",
    );
    expect(
        "sum(husk_api_request_duration_seconds_count{method=\"/husk.v1.Husk/CreateVm\"})",
        &|v| v >= 1.0,
        "the CreateVm call timed",
    );
    // The series follow the VM's life: once stopped it is counted as such and its own series
    // go away.
    let stopped = huskd.husk(&["stop", "m1"]);
    assert_eq!(stopped.code(), Some(0), "{}", stopped.stderr());
    expect(
        "husk_vms{state=\"stopped\"}",
        &|v| v == 1.0,
        "the stopped VM",
    );
    expect(
        "count(husk_vm_cpu_seconds_total) or vector(0)",
        &|v| v == 0.0,
        "no series of a VM that does not run",
    );
}
