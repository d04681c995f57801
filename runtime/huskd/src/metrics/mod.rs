//! huskd's Prometheus metrics (`huskd --metrics ADDR`, off by default): the text exposition
//! format 0.0.4 over plain HTTP at `/metrics`. See docs/metrics.md for every series.
//!
//! What huskd observes as it goes (API request latencies, start-to-agent-ready latencies) is
//! kept here in fixed-bucket histograms; what a VM uses (CPU, memory, device counters) is read
//! when Prometheus scrapes (see `daemon::metrics`), so nothing is sampled in between.

pub mod api_layer;
pub mod http;

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;

/// Buckets (seconds) of API request latencies: most calls take microseconds to milliseconds,
/// a StartVm or a SnapshotVm seconds.
const API_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
/// Buckets (seconds) of a VM's start (or restore) until its guest agent answers.
const READY_BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0,
];

/// A cumulative histogram over fixed bucket bounds.
#[derive(Debug, Clone)]
pub struct Histogram {
    bounds: &'static [f64],
    /// Observations at or below each bound (not yet cumulative).
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            counts: vec![0; bounds.len()],
            sum: 0.0,
            count: 0,
        }
    }

    pub fn observe(&mut self, value: f64) {
        if let Some(i) = self.bounds.iter().position(|b| value <= *b) {
            self.counts[i] += 1;
        }
        self.sum += value;
        self.count += 1;
    }

    /// The `_bucket`, `_sum` and `_count` lines of series `name` with `labels` (already
    /// formatted, `k="v",...`, possibly empty).
    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cumulative = 0;
        for (bound, n) in self.bounds.iter().zip(&self.counts) {
            cumulative += n;
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels}{sep}le=\"{bound}\"}} {cumulative}"
            );
        }
        let _ = writeln!(
            out,
            "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {}",
            self.count
        );
        let braces = |s: &str| {
            if s.is_empty() {
                String::new()
            } else {
                format!("{{{s}}}")
            }
        };
        let _ = writeln!(out, "{name}_sum{} {}", braces(labels), self.sum);
        let _ = writeln!(out, "{name}_count{} {}", braces(labels), self.count);
    }
}

/// What huskd observes between scrapes.
#[derive(Debug, Default)]
pub struct Registry {
    /// By gRPC method (`/husk.v1.Husk/CreateVm`) and status code.
    api: Mutex<BTreeMap<(String, String), Histogram>>,
    /// By kind: "boot" or "restore".
    ready: Mutex<BTreeMap<&'static str, Histogram>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Registry {
    /// One API call to `method` that ended with gRPC status `code` after `seconds`.
    pub fn observe_api(&self, method: &str, code: &str, seconds: f64) {
        lock(&self.api)
            .entry((method.to_string(), code.to_string()))
            .or_insert_with(|| Histogram::new(API_BUCKETS))
            .observe(seconds);
    }

    /// A VM's start (`kind` "boot") or restore ("restore") reached its guest agent's first
    /// answer after `seconds`.
    pub fn observe_ready(&self, kind: &'static str, seconds: f64) {
        lock(&self.ready)
            .entry(kind)
            .or_insert_with(|| Histogram::new(READY_BUCKETS))
            .observe(seconds);
    }

    /// The histograms in the text format.
    pub fn render(&self, out: &mut String) {
        header(
            out,
            "husk_api_request_duration_seconds",
            "histogram",
            "Time huskd took to answer a gRPC call (streams: until the response started), by method and status code.",
        );
        for ((method, code), h) in lock(&self.api).iter() {
            let labels = format!("method=\"{}\",code=\"{}\"", escape(method), escape(code));
            h.render(out, "husk_api_request_duration_seconds", &labels);
        }
        header(
            out,
            "husk_vm_ready_seconds",
            "histogram",
            "Time from a VM's VMM start until its guest agent first answered, for boots and restores.",
        );
        for (kind, h) in lock(&self.ready).iter() {
            h.render(out, "husk_vm_ready_seconds", &format!("kind=\"{kind}\""));
        }
    }
}

/// The `# HELP` and `# TYPE` lines of a metric family.
pub fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(
        out,
        "# HELP {name} {}",
        help.replace('\\', "\\\\").replace('\n', "\\n")
    );
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// A label value escaped for the text format (backslash, double quote, newline).
pub fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_render_cumulative_buckets_sum_and_count() {
        let r = Registry::default();
        r.observe_ready("boot", 0.2);
        r.observe_ready("boot", 3.0);
        r.observe_ready("boot", 500.0);
        let mut out = String::new();
        r.render(&mut out);
        assert!(
            out.contains("# TYPE husk_vm_ready_seconds histogram\n"),
            "{out}"
        );
        assert!(out.contains("husk_vm_ready_seconds_bucket{kind=\"boot\",le=\"0.1\"} 0\n"));
        assert!(out.contains("husk_vm_ready_seconds_bucket{kind=\"boot\",le=\"0.25\"} 1\n"));
        assert!(out.contains("husk_vm_ready_seconds_bucket{kind=\"boot\",le=\"5\"} 2\n"));
        assert!(out.contains("husk_vm_ready_seconds_bucket{kind=\"boot\",le=\"80\"} 2\n"));
        assert!(out.contains("husk_vm_ready_seconds_bucket{kind=\"boot\",le=\"+Inf\"} 3\n"));
        assert!(out.contains("husk_vm_ready_seconds_sum{kind=\"boot\"} 503.2\n"));
        assert!(out.contains("husk_vm_ready_seconds_count{kind=\"boot\"} 3\n"));
    }

    #[test]
    fn api_calls_are_kept_apart_by_method_and_code_and_labels_are_escaped() {
        let r = Registry::default();
        r.observe_api("/husk.v1.Husk/GetVm", "0", 0.001);
        r.observe_api("/husk.v1.Husk/GetVm", "5", 0.001);
        let mut out = String::new();
        r.render(&mut out);
        assert!(out.contains(
            "husk_api_request_duration_seconds_count{method=\"/husk.v1.Husk/GetVm\",code=\"0\"} 1"
        ));
        assert!(out.contains(
            "husk_api_request_duration_seconds_count{method=\"/husk.v1.Husk/GetVm\",code=\"5\"} 1"
        ));
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
