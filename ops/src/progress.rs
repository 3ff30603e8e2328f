//! Progress bars for long replays. Shared by the offline commands, `inspect` and the jobs that
//! follow a node's replay online, so every replay looks the same on the operator's terminal.

use indicatif::{ProgressBar, ProgressStyle};

/// A progress bar over log entries, with rate and ETA.
pub(crate) fn replay_bar(total: u64, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template(&format!(
            "{{spinner}} {what} [{{bar:30}}] {{pos}}/{{len}} entries {{per_sec}} eta {{eta}}"
        ))
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar
}
