//! Deliberate bugs, for proving that the history checker catches the classes of bug it exists
//! for. Compiled only with the cargo feature `bugs` (the `courier-node-bugs` binary); without it
//! [`active`] is a constant `false` and every branch on it folds away. Selected at startup by the
//! environment variable `COURIER_BUG`:
//!
//! * `ack-before-commit`: `Send` answers "sent" at once and proposes [`WRITE_BACK_DELAY`] later,
//!   as a write-back buffer would (lost when the node is killed or cut off within that window);
//! * `skip-dedup`: a retried `Send` is stored again instead of answering the first result;
//! * `receipt-regress`: a device stream repeats a READ receipt as DELIVERED afterwards.

/// A deliberate bug.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bug {
    /// Acknowledge a send before commit.
    AckBeforeCommit,
    /// Skip the idempotency check on retries.
    SkipDedup,
    /// Push a receipt state older than one already pushed.
    ReceiptRegress,
}

impl Bug {
    /// The name `COURIER_BUG` uses.
    pub const fn name(self) -> &'static str {
        match self {
            Self::AckBeforeCommit => "ack-before-commit",
            Self::SkipDedup => "skip-dedup",
            Self::ReceiptRegress => "receipt-regress",
        }
    }
}

/// Whether `bug` is switched on in this process.
#[cfg(feature = "bugs")]
pub fn active(bug: Bug) -> bool {
    static SELECTED: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    SELECTED
        .get_or_init(|| std::env::var("COURIER_BUG").ok())
        .as_deref()
        == Some(bug.name())
}

/// Whether `bug` is switched on in this process: never, without the `bugs` feature.
#[cfg(not(feature = "bugs"))]
pub const fn active(_bug: Bug) -> bool {
    false
}

/// How long `ack-before-commit` holds an acknowledged send before proposing it. Wide on purpose:
/// with the proposal made at once, the window between ack and commit is a few milliseconds, and
/// whether a kill lands inside it was up to chance (a run could find only duplicates). Held this
/// long, every kill of a node that took sends in its last second loses some.
pub const WRITE_BACK_DELAY: std::time::Duration = std::time::Duration::from_secs(1);

/// The hook of a client send about to be proposed on `shard`: `skip-dedup` gives `sent` a fresh
/// idempotency key (a retry is stored again); `ack-before-commit` proposes it in the background
/// after [`WRITE_BACK_DELAY`] and returns the answer to give at once. `None`, and `sent`
/// untouched, without these bugs.
pub(crate) fn on_send(
    cluster: &crate::cluster::Cluster,
    shard: courier_proto::ShardId,
    sent: &mut courier_proto::pb::events::MessageSent,
) -> Option<courier_proto::pb::client::SendResponse> {
    use courier_proto::pb::events::{Event, event::Kind};
    if active(Bug::SkipDedup) {
        sent.client_msg_id = format!(
            "{}#{:08x}",
            sent.client_msg_id,
            crate::env::random_range(0..=u64::from(u32::MAX))
        );
    }
    if !active(Bug::AckBeforeCommit) {
        return None;
    }
    let answer = courier_proto::pb::client::SendResponse {
        message_id: sent.message_id.clone(),
        sent_at_ms: sent.sent_at_ms,
        duplicate: false,
    };
    let cluster = cluster.clone();
    let events = vec![Event {
        kind: Some(Kind::MessageSent(sent.clone())),
    }];
    tokio::spawn(async move {
        tokio::time::sleep(WRITE_BACK_DELAY).await;
        cluster.propose(shard, events).await
    });
    Some(answer)
}

/// The hook of a receipt pushed to a device stream: `receipt-regress` repeats a READ receipt as
/// DELIVERED right after it. `None` without that bug.
pub(crate) fn regressed_receipt(
    update: &courier_proto::pb::client::ReceiptUpdate,
) -> Option<courier_proto::pb::client::ReceiptUpdate> {
    use courier_proto::pb::events::ReceiptState;
    (active(Bug::ReceiptRegress) && update.state == i32::from(ReceiptState::Read)).then(|| {
        courier_proto::pb::client::ReceiptUpdate {
            state: ReceiptState::Delivered.into(),
            ..update.clone()
        }
    })
}

/// Logs loudly which bug is on, if any.
pub fn announce() {
    for bug in [Bug::AckBeforeCommit, Bug::SkipDedup, Bug::ReceiptRegress] {
        if active(bug) {
            tracing::warn!(bug = bug.name(), "DELIBERATE BUG ACTIVE: test builds only");
        }
    }
}
