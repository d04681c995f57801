//! The VMM's diagnostics on stderr, bounded over its lifetime: a supervisor keeps stderr in a
//! log file, and a guest that triggers warnings for days (each call site is also rate-limited,
//! see [`husk_devices::ratelimit`]) must not fill it. After [`DEFAULT_STDERR_LIMIT`] bytes one
//! last line says further diagnostics are dropped.

use std::io::Write;
use std::sync::{Mutex, PoisonError};

/// Most diagnostic bytes the VMM writes to stderr: 4 MiB.
pub const DEFAULT_STDERR_LIMIT: u64 = 4 * 1024 * 1024;

/// Counts what went out and refuses lines past the limit.
pub struct StderrBudget {
    limit: u64,
    used: Mutex<Option<u64>>,
}

impl StderrBudget {
    pub const fn new(limit: u64) -> Self {
        Self {
            limit,
            used: Mutex::new(Some(0)),
        }
    }

    /// Writes `line` (and a newline) to `out` if the budget allows; the first line refused is
    /// replaced by the final notice, later ones are dropped.
    pub fn write_line(&self, out: &mut dyn Write, line: &str) {
        let mut used = self.used.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(so_far) = *used else {
            return;
        };
        let len = line.len() as u64 + 1;
        if so_far.saturating_add(len) > self.limit {
            *used = None;
            let _ = writeln!(
                out,
                "husk-vmm: stderr limit of {} bytes reached; further diagnostics are dropped",
                self.limit
            );
            return;
        }
        *used = Some(so_far + len);
        let _ = writeln!(out, "{line}");
    }
}

/// The process's budget.
static STDERR: StderrBudget = StderrBudget::new(DEFAULT_STDERR_LIMIT);

/// Writes one diagnostic line to stderr within the process's budget.
pub fn stderr_line(line: &str) {
    STDERR.write_line(&mut std::io::stderr().lock(), line);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_pass_until_the_limit_then_one_notice_then_nothing() {
        let budget = StderrBudget::new(20);
        let mut out = Vec::new();
        budget.write_line(&mut out, "0123456789"); // 11 bytes with the newline
        budget.write_line(&mut out, "0123456789"); // would make 22: refused
        budget.write_line(&mut out, "x");
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0], "0123456789");
        assert!(lines[1].contains("further diagnostics are dropped"));
    }

    #[test]
    fn lines_that_fit_exactly_are_written() {
        let budget = StderrBudget::new(4);
        let mut out = Vec::new();
        budget.write_line(&mut out, "abc");
        assert_eq!(out, b"abc\n");
    }
}
