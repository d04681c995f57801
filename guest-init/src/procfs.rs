//! Reading a process's CPU time and resident memory from /proc, the same way in the guest
//! agent (per container) and on the host (the containerd shim, per VMM process).

/// `(utime, stime)` in clock ticks from the text of `/proc/<pid>/stat`.
pub fn cpu_ticks(stat: &str) -> Option<(u64, u64)> {
    // Fields after the command name (which may contain spaces and parentheses).
    let rest = stat.get(stat.rfind(')')? + 2..)?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 11 and 12 after the name.
    Some((fields.get(11)?.parse().ok()?, fields.get(12)?.parse().ok()?))
}

/// Clock ticks as nanoseconds.
pub fn ticks_to_ns(ticks: u64, ticks_per_second: u64) -> u64 {
    ticks.saturating_mul(1_000_000_000) / ticks_per_second.max(1)
}

/// Resident memory in bytes from the text of `/proc/<pid>/status` (`VmRSS`; none for kernel
/// threads).
pub fn rss_bytes(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_files_are_parsed() {
        let stat = "1234 (husk vmm (x)) S 1 1234 1234 0 -1 4194560 500 0 0 0 250 100 0 0 20 0 3 0";
        assert_eq!(cpu_ticks(stat), Some((250, 100)));
        assert_eq!(ticks_to_ns(250, 100), 2_500_000_000);
        assert_eq!(cpu_ticks("garbage"), None);
        assert_eq!(cpu_ticks("1 (x)"), None);
        assert_eq!(rss_bytes("Name:\tx\nVmRSS:\t  2048 kB\n"), Some(2 << 20));
        assert_eq!(rss_bytes("Name:\tkthreadd\n"), None);
    }
}
