//! Structured logging and the panic hook. Logs carry ids, sizes and hashes only: never message
//! bodies, phone numbers or tokens.

use tracing_subscriber::EnvFilter;

use crate::config::{LogFormat, LogRaw};

/// Installs the global subscriber (once per process; later calls are ignored).
pub fn init(log: &LogRaw) {
    let filter = EnvFilter::try_new(&log.level).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(true);
    let _ = match log.format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

/// Logs a panic with thread and location before the process dies (release builds abort on
/// panic; a half-alive replica is worse than a dead one).
pub fn set_panic_hook() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let thread = std::thread::current();
        let location = info.location().map(ToString::to_string).unwrap_or_default();
        let payload = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_default();
        tracing::error!(
            thread = thread.name().unwrap_or("unnamed"),
            location = %location,
            panic = %payload,
            backtrace = %std::backtrace::Backtrace::force_capture(),
            "panic: the node stops"
        );
        default(info);
    }));
}
