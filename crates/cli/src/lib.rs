//! What the binaries share: how they log.
//!
//! Log lines go to stderr as `PROGRAM: LEVEL: message`, the way the tools'
//! own errors read (`bhyve: ...`), so a journal, a log file or a pipe gets
//! one kind of line from them. Colour only on a terminal (and not with
//! `NO_COLOR`); plain text anywhere else. `RUST_LOG` sets what is shown:
//! a level (`debug`) or per-module directives (`rhyve_virtio=trace`);
//! without it, warnings and errors.

use std::fmt;
use std::io::IsTerminal;

use tracing::{Event, Level, Subscriber};
use tracing_subscriber::filter::{EnvFilter, LevelFilter};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// Formats events as `PROGRAM: LEVEL: message fields`; debug and trace
/// lines also name the module, which is what `RUST_LOG` filters on.
struct ProgramPrefix(&'static str);

impl<S, N> FormatEvent<S, N> for ProgramPrefix
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
        let meta = event.metadata();
        let (word, colour) = match *meta.level() {
            Level::ERROR => ("error", "31"),
            Level::WARN => ("warning", "33"),
            Level::INFO => ("info", "32"),
            Level::DEBUG => ("debug", "34"),
            Level::TRACE => ("trace", "35"),
        };
        write!(writer, "{}: ", self.0)?;
        if writer.has_ansi_escapes() {
            write!(writer, "\x1b[{colour}m{word}\x1b[0m: ")?;
        } else {
            write!(writer, "{word}: ")?;
        }
        if *meta.level() >= Level::DEBUG {
            write!(writer, "{}: ", meta.target())?;
        }
        ctx.field_format().format_fields(writer.by_ref(), event)?;
        writeln!(writer)
    }
}

/// Send `program`'s log lines to stderr, filtered by `RUST_LOG`.
pub fn init_logging(program: &'static str) {
    let colour = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let (filter, bad_spec) = match std::env::var("RUST_LOG") {
        Ok(spec) if !spec.trim().is_empty() => match EnvFilter::try_new(&spec) {
            Ok(f) => (f, None),
            Err(e) => (warnings_only(), Some(format!("{spec:?}: {e}"))),
        },
        _ => (warnings_only(), None),
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(colour)
        .event_format(ProgramPrefix(program))
        .with_env_filter(filter)
        .init();
    if let Some(why) = bad_spec {
        tracing::warn!("RUST_LOG {why}; showing warnings and errors");
    }
}

fn warnings_only() -> EnvFilter {
    EnvFilter::default().add_directive(LevelFilter::WARN.into())
}
