//! The guest side of free page reporting (docs/balloon.md): the order of the free blocks Linux
//! reports to the balloon.
//!
//! Linux reports only blocks of `page_reporting_order` and larger, and only while a zone has
//! 32 such blocks free above its low watermark. The virtio-balloon driver sets the order to
//! `pageblock_order` (9: 2 MiB blocks, so 64 MiB free per zone) when it registers, overriding
//! `page_reporting.page_reporting_order=` from the command line; a 128 MiB sandbox never has
//! that much free in one zone, and reported nothing (measured: scripts/bench --only density).
//! husk-init therefore writes the order once the driver is up: the command line's value when
//! one is given, else [`DEFAULT_ORDER`] (512 KiB blocks: 16 MiB free per zone starts a report).
//! The host maps guest RAM without huge pages, so smaller reports split nothing there.

/// The order written when the command line names none.
pub const DEFAULT_ORDER: u32 = 7;
/// Where the kernel exposes it (0644, root).
pub const PARAM_PATH: &str = "/sys/module/page_reporting/parameters/page_reporting_order";
const CMDLINE_PARAM: &str = "page_reporting.page_reporting_order=";

/// The order the command line asks for, if a sane one (1..=10).
pub fn order_from_cmdline(cmdline: &str) -> Option<u32> {
    cmdline
        .split_ascii_whitespace()
        .filter_map(|word| word.strip_prefix(CMDLINE_PARAM))
        .next_back()
        .and_then(|v| v.parse().ok())
        .filter(|order| (1..=10).contains(order))
}

/// Writes the order; nothing to do (Ok) on a kernel without page reporting.
pub fn apply(cmdline: &str) -> std::io::Result<()> {
    if !std::path::Path::new(PARAM_PATH).exists() {
        return Ok(());
    }
    let order = order_from_cmdline(cmdline).unwrap_or(DEFAULT_ORDER);
    std::fs::write(PARAM_PATH, order.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_sane_order_on_the_command_line_wins() {
        assert_eq!(order_from_cmdline("quiet"), None);
        assert_eq!(
            order_from_cmdline("page_reporting.page_reporting_order=5 quiet"),
            Some(5)
        );
        assert_eq!(
            order_from_cmdline(
                "page_reporting.page_reporting_order=5 page_reporting.page_reporting_order=9"
            ),
            Some(9)
        );
        assert_eq!(
            order_from_cmdline("page_reporting.page_reporting_order=0"),
            None
        );
        assert_eq!(
            order_from_cmdline("page_reporting.page_reporting_order=x"),
            None
        );
        assert_eq!(
            order_from_cmdline("xpage_reporting.page_reporting_order=5"),
            None
        );
    }
}
