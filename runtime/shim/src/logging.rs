//! The shim's log lines: `husk-shim LEVEL: message key=value...` on stderr.
//!
//! For the long-lived shim stderr is the bundle's `log` FIFO that `start` opened, which
//! containerd copies into its own log (docs/containerd.md: the lines start with `husk-shim`);
//! for `start` and `delete` containerd reads stderr itself. containerd stamps the time.

use std::fmt;

use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// The line format: the shim's name, the level, the message and its fields.
struct ShimLine;

impl<S, N> FormatEvent<S, N> for ShimLine
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        write!(writer, "husk-shim {}: ", event.metadata().level())?;
        ctx.field_format().format_fields(writer.by_ref(), event)?;
        writeln!(writer)
    }
}

/// Installs the subscriber: debug lines with `-debug` (containerd passes it when it logs at
/// debug level), else info and above.
pub fn init(debug: bool) {
    let level = if debug {
        tracing::Level::DEBUG
    } else {
        tracing::Level::INFO
    };
    tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .event_format(ShimLine)
        .init();
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buffer {
        fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(data);
            Ok(data.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn lines_start_with_the_shim_name_and_level_and_carry_fields() {
        let buffer = Buffer::default();
        let sink = buffer.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::INFO)
            .with_writer(move || sink.clone())
            .with_ansi(false)
            .event_format(ShimLine)
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!(container = "c1", "serving the container");
            tracing::debug!("not shown without -debug");
            tracing::warn!("events: cannot connect");
        });
        let text = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
        assert_eq!(
            text,
            "husk-shim INFO: serving the container container=\"c1\"\n\
             husk-shim WARN: events: cannot connect\n"
        );
    }
}
