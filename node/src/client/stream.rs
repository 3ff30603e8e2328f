//! Device streams: one bidirectional stream per connected device.
//!
//! ```text
//!  client ──Open{resume_after}──▶ pusher: backlog from the inbox, then new messages, in seq order
//!         ◀── InboxMessage / ReceiptUpdate (bounded channel: a slow device pauses the pusher,
//!                                           which later reads on from the inbox; memory stays flat)
//!         ──Ack / Read──▶ DeliveryAcked / ReadUpTo proposed on the user's shard
//! ```
//!
//! The pusher re-reads this node's replica of the user's shard when a batch applied on this node
//! touched the user's inbox or receipt feed (`ApplyWatch`): an idle stream costs no CPU. Two
//! exceptions wake it on a timer: a stream on a node without a replica of the user's shard reads
//! a replica elsewhere every [`REMOTE_STREAM_POLL`] (nothing applied here tells it of a change),
//! and a stream waiting for a group message's content to reach this replica looks again after
//! [`GROUP_CONTENT_RETRY`].

use std::pin::Pin;
use std::time::Duration;

use courier_proto::convert::messaging::StreamCommand;
use courier_proto::pb::client::{
    ClientFrame, InboxMessage, KeysLow, ReceiptUpdate, ServerFrame, server_frame,
};
use courier_proto::pb::events::{self, Event, event::Kind};
use courier_proto::pb::store::InboxEntry;
use courier_proto::{InboxSeq, LogIndex, ReceiptFeedPosition, UserId};
use courier_storage::projection::readstate::{self, ReadTarget};
use courier_storage::projection::{cursors, groups, inbox, receipts};
use tokio_stream::Stream;
use tonic::Status;
use tracing::Instrument as _;

use super::live::FrameSender;
use super::{CATCH_UP_WAIT, ClientApi, auth::Caller, now_ms};
use crate::bugs;
use crate::status::{ApiError, SHARD_INSTALLING};

/// How long a stream waits before looking again when a group message's stored copy has not
/// reached this replica of the group's shard yet (its apply does not touch the member's inbox,
/// so it wakes nobody).
pub const GROUP_CONTENT_RETRY: Duration = Duration::from_millis(20);
/// How often a stream on a node without a replica of its user's shard reads the replica again
/// (nothing applied here wakes it): the live delivery latency through such a node, at the cost
/// of one remote page read per stream per interval.
pub const REMOTE_STREAM_POLL: Duration = Duration::from_millis(200);
/// One page of a device stream: the inbox position it reaches, whether that is the tail, its
/// messages, and its receipt changes.
type Page = (
    InboxSeq,
    bool,
    Vec<(InboxSeq, InboxEntry)>,
    Vec<receipts::FeedItem>,
);

/// How long an open device stream waits for this replica's snapshot install of its user's
/// shard before it ends with `UNAVAILABLE` `COURIER:Shard:Installing` (the device reconnects,
/// perhaps to another node).
pub const INSTALL_WAIT_MAX: Duration = Duration::from_secs(30);
/// Messages read from the inbox per step.
pub const PAGE_MESSAGES: usize = 256;
/// Messages (and receipt changes) per page read from a replica on another node: small enough
/// that a page of messages at the content limit fits one `ReadShard` answer.
pub const REMOTE_PAGE_MESSAGES: usize = 16;
const _: () = assert!(
    REMOTE_PAGE_MESSAGES * inbox::ENTRY_BYTES_MAX <= crate::cluster::READ_ANSWER_BYTES_MAX,
    "a remote page fits one ReadShard answer"
);

/// How the replica a stream reads stands against a message an `Ack` or `Read` names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum CaughtUp {
    /// It is the shard's leader with every committed entry applied, or a settled follower: what
    /// it shows is the answer.
    Current,
    /// Its inbox has reached the message since the caller's read: read it again.
    Since,
}

/// How long the client has to send `Open`.
pub const OPEN_TIMEOUT: Duration = Duration::from_secs(10);

/// The server half of a device stream.
pub type ServerStream = Pin<Box<dyn Stream<Item = Result<ServerFrame, Status>> + Send>>;

impl ClientApi {
    /// Opens a device stream.
    ///
    /// # Errors
    /// `INVALID_ARGUMENT` `COURIER:Stream:OpenFirst` when the first frame is not `Open` or none
    /// came within [`OPEN_TIMEOUT`], and `COURIER:Wire:*` for a malformed `Open`;
    /// `RESOURCE_EXHAUSTED` `COURIER:Limits:StreamsPerDevice` past the device's streams. Once
    /// open, the stream can end with `UNAVAILABLE` when no replica of the user's shard can be
    /// read (`COURIER:Shard:NoReplica`) or this one stays installing a snapshot past
    /// [`INSTALL_WAIT_MAX`] (`COURIER:Shard:Installing`).
    pub async fn open_stream(
        &self,
        caller: Caller,
        mut frames: tonic::Streaming<ClientFrame>,
    ) -> Result<ServerStream, ApiError> {
        let first = tokio::time::timeout(OPEN_TIMEOUT, frames.message()).await;
        let (resume_after, hide_last_seen, receipts_cursor) = match first {
            Ok(Ok(Some(frame))) => match StreamCommand::try_from(frame)? {
                StreamCommand::Open {
                    resume_after,
                    hide_last_seen,
                    receipts_after,
                } => (resume_after, hide_last_seen, receipts_after),
                _ => return Err(open_first()),
            },
            _ => return Err(open_first()),
        };
        let (tx, rx) = super::live::buffer(
            self.limits.stream_buffer_frames,
            self.limits.stream_buffer_bytes,
        );
        // Ephemeral updates reach this stream while it is registered (until the pusher ends).
        let registration = self.live.register(
            caller.user.get(),
            caller.device.get(),
            self.limits.streams_per_device_max,
            tx.clone(),
        )?;
        let shard = self.shard_of(caller.user)?;
        // Receipts after the device's cursor are pushed (it resumes the feed where its last
        // stream left it, on any replica); without one, those that change from now on.
        let receipts_after = match receipts_cursor {
            Some(cursor) => cursor,
            None => ReceiptFeedPosition::after_entry(self.cluster.applied_index(shard).await?),
        };
        tracing::info!(
            user = caller.user.get(),
            device = caller.device.get(),
            resume_after = resume_after.get(),
            "device stream opened"
        );
        let pusher = self.clone();
        let pusher_tx = tx.clone();
        // Both tasks end at shutdown wherever they wait: a device that stops reading (its
        // HTTP/2 layer still answering pings) would otherwise hold its pusher in a send, and
        // with it the stream's registration and reads of the node's storage, past the drain.
        let shutdown = self.shutdown.clone();
        tokio::spawn(async move {
            let _registration = registration;
            let pushing = pusher.push(
                caller,
                resume_after,
                receipts_after,
                hide_last_seen,
                pusher_tx,
            );
            shutdown.run_until_cancelled(pushing).await
        });
        let reader = self.clone();
        let reading = self
            .shutdown
            .clone()
            .run_until_cancelled_owned(async move { reader.read_frames(caller, frames, tx).await });
        tokio::spawn(reading);
        Ok(Box::pin(rx))
    }

    async fn push(
        &self,
        caller: Caller,
        mut cursor: InboxSeq,
        mut receipts_after: ReceiptFeedPosition,
        hide_last_seen: bool,
        tx: FrameSender,
    ) {
        let Ok(shard) = self.shard_of(caller.user) else {
            return;
        };
        let _open = self.metrics.stream_opened();
        let _online = self.cluster.edge().reporter.opened(
            caller.user.get(),
            caller.device.get(),
            hide_last_seen,
        );
        let watch = self.cluster.groups().watch().user(caller.user);
        // The first pass sends the backlog; what later passes find arrived while the device was
        // connected, and its send-to-push time is the live delivery latency.
        let mut live = false;
        // Checked on the first pass too: a revocation may have been applied between the
        // stream's authentication and now (no devices epoch is ever u64::MAX).
        let mut device_checked_at = u64::MAX;
        // When reads of the shard started to find a snapshot install under way.
        let mut installing_since = None;
        // The keys epoch the device's prekey stock was last checked at, and the stock it was
        // last told about (`KeysLow`).
        let mut keys = KeysCheck::default();
        loop {
            // Registered before reading, so an apply between the read and the wait still wakes us.
            let applied = watch.notified();
            tokio::pin!(applied);
            applied.as_mut().enable();
            self.cluster.passes().pusher();
            if !self
                .still_active(shard, caller, &mut device_checked_at, &tx)
                .await
            {
                return;
            }
            if !self.tell_keys_low(shard, caller, &mut keys, &tx).await {
                return;
            }
            let limit = self.page_limit(shard);
            let page = self.page(shard, caller.user, cursor, &receipts_after, limit);
            let (up_to, caught_up, messages, feed) = match page.await {
                Ok(page) => page,
                Err(error) if self.waited_out(&error, &mut installing_since, &tx).await => {
                    continue;
                }
                Err(_) => return,
            };
            installing_since = None;
            // A full page of receipt changes may be one part of a log entry's changes (an ack of
            // many messages): the next pass reads on from the last change pushed, at once.
            let feed_caught_up = feed.len() < limit;
            let mut pushed_up_to = cursor;
            let mut stalled = false;
            for (seq, mut entry) in messages {
                if entry.trimmed {
                    // Every device acked it and its body left; a device new since has no use
                    // for the stub.
                    pushed_up_to = seq;
                    continue;
                }
                if entry.content.is_none() && entry.group_index > 0 {
                    match self.group_content(&entry).await {
                        GroupCopy::Stored(content) => entry.content = Some(content),
                        GroupCopy::Forgotten => {
                            // Older than the retention windows (API.md): this device missed it.
                            pushed_up_to = seq;
                            continue;
                        }
                        GroupCopy::NotYet => {
                            // The group's shard lags on this replica: push it on a later pass.
                            stalled = true;
                            break;
                        }
                    }
                }
                if live {
                    self.metrics
                        .pushed_live(now_ms().saturating_sub(entry.sent_at_ms));
                }
                let trace_parent = std::mem::take(&mut entry.trace_parent);
                let frame = message_frame(seq, entry);
                // Backpressure: a slow device holds the pusher here; nothing else buffers.
                let span = tracing::info_span!(
                    "stream.push",
                    user = caller.user.get(),
                    device = caller.device.get(),
                    seq = seq.get()
                );
                crate::telemetry::adopt_traceparent(&span, &trace_parent);
                if tx.send(Ok(frame)).instrument(span).await.is_err() {
                    return;
                }
                pushed_up_to = seq;
            }
            cursor = if stalled {
                pushed_up_to
            } else {
                cursor.max(up_to)
            };
            if !push_receipts(feed, &mut receipts_after, &tx).await {
                return;
            }
            live |= caught_up;
            let more_waiting = !(caught_up && feed_caught_up);
            if more_waiting && !stalled {
                continue; // read the next page now
            }
            tokio::select! {
                () = self.shutdown.cancelled() => return,
                () = tx.closed() => return,
                () = applied => {}
                () = tokio::time::sleep(GROUP_CONTENT_RETRY), if stalled => {}
                // No replica here, so no apply wakes this stream: it reads the replica again.
                () = tokio::time::sleep(REMOTE_STREAM_POLL), if !self.cluster.holds(shard) => {}
            }
        }
    }

    /// Messages per page of `shard`: fewer when read from a replica elsewhere.
    fn page_limit(&self, shard: courier_proto::ShardId) -> usize {
        if self.cluster.holds(shard) {
            PAGE_MESSAGES
        } else {
            REMOTE_PAGE_MESSAGES
        }
    }

    /// The next page of `user`'s stream after `cursor` and `receipts_after`: the inbox position
    /// it reaches, whether that is the tail, its messages and its receipt changes.
    async fn page(
        &self,
        shard: courier_proto::ShardId,
        user: UserId,
        cursor: InboxSeq,
        receipts_after: &ReceiptFeedPosition,
        limit: usize,
    ) -> Result<Page, ApiError> {
        let span = u64::try_from(limit).unwrap_or(u64::MAX);
        let bytes_max = usize::try_from(self.limits.stream_buffer_bytes).unwrap_or(usize::MAX);
        // A replica elsewhere answers every round all the reads asked before: a remote page
        // (at most `REMOTE_PAGE_MESSAGES`, which fit one answer) is read in one scan.
        let stepped = self.cluster.holds(shard);
        self.read(shard, |view| {
            let tail = inbox::tail(view, user)?;
            let up_to = InboxSeq::new(tail.get().min(cursor.get().saturating_add(span)));
            // What the pusher reads, and holds while it waits for room in the stream's buffer,
            // is bounded like the buffer: a page of large messages ends early and the next one
            // reads on.
            let (messages, reached) =
                inbox::entries_within(view, user, (cursor, up_to), bytes_max, stepped)?;
            let feed = receipts::feed(view, user, receipts_after, limit)?;
            Ok((reached, reached == tail, messages, feed))
        })
        .await
    }

    /// Whether a stream whose read failed with `error` reads again: after a wait when this
    /// replica is installing a snapshot of the shard (the stream stays open), for at most
    /// [`INSTALL_WAIT_MAX`] since the first such failure (`since`); never for any other error
    /// (the stream ends with it) or once the stream closed.
    async fn waited_out(
        &self,
        error: &ApiError,
        since: &mut Option<tokio::time::Instant>,
        tx: &FrameSender,
    ) -> bool {
        if let ApiError::Unavailable {
            code: SHARD_INSTALLING,
            retry_after_ms,
            ..
        } = error
            && since
                .get_or_insert_with(tokio::time::Instant::now)
                .elapsed()
                < INSTALL_WAIT_MAX
        {
            return tokio::select! {
                () = self.shutdown.cancelled() => false,
                () = tx.closed() => false,
                () = tokio::time::sleep(Duration::from_millis(*retry_after_ms)) => true,
            };
        }
        let _ = tx.send(Err(error.clone().into())).await;
        false
    }

    /// Whether the stream of `caller` goes on. A device change applied here since the last
    /// check (`checked_at`: a revocation, a re-registration of the number) may have revoked this
    /// device: then the stream ends with `UNAUTHENTICATED` `COURIER:Auth:Revoked`. The change
    /// touches the user, so it wakes the stream.
    async fn still_active(
        &self,
        shard: courier_proto::ShardId,
        caller: Caller,
        checked_at: &mut u64,
        tx: &FrameSender,
    ) -> bool {
        let epoch = self.cluster.groups().watch().devices_epoch();
        // Nothing applied here moves the epoch of a shard held elsewhere: check on every pass.
        if epoch == *checked_at && self.cluster.holds(shard) {
            return true;
        }
        if self.device_active(shard, caller).await {
            *checked_at = epoch;
            return true;
        }
        tracing::info!(
            user = caller.user.get(),
            device = caller.device.get(),
            "device revoked: its stream closes"
        );
        let _ = tx.send(Err(revoked().into())).await;
        false
    }

    /// Tells the device when its stock of one-time prekeys is below `PREKEYS_LOW`: when the
    /// stream opens with a low stock, and each time it falls further (a fetch took one): checked
    /// once a change to some device's keys was applied here since the last check, or on every
    /// pass when the user's `shard` is read from another node (nothing applied here tells of a
    /// change there), as the device check does. A device that never published keys is told
    /// nothing. `false` when the stream closed.
    async fn tell_keys_low(
        &self,
        shard: courier_proto::ShardId,
        caller: Caller,
        check: &mut KeysCheck,
        tx: &FrameSender,
    ) -> bool {
        let epoch = self.cluster.groups().watch().keys_epoch();
        if check.at == Some(epoch) && self.cluster.holds(shard) {
            return true;
        }
        let stock = match self.key_stock(caller).await {
            Ok(Some(stock)) => stock,
            Ok(None) => {
                check.at = Some(epoch);
                return true;
            }
            // Checked again on the next pass.
            Err(_) => return true,
        };
        check.at = Some(epoch);
        if stock >= courier_proto::limits::PREKEYS_LOW {
            check.told = None;
            return true;
        }
        if check.told.is_some_and(|told| told <= stock) {
            return true;
        }
        check.told = Some(stock);
        let frame = ServerFrame {
            frame: Some(server_frame::Frame::KeysLow(KeysLow {
                one_time_prekeys: stock,
            })),
        };
        tx.send(Ok(frame)).await.is_ok()
    }

    /// Whether `caller`'s device is registered and not revoked on this replica (a read fault
    /// counts as active: the stream's next read fails and closes it anyway).
    async fn device_active(&self, shard: courier_proto::ShardId, caller: Caller) -> bool {
        self.read(shard, |view| active(view, caller))
            .await
            .unwrap_or(true)
    }

    /// The one stored copy of a group message an inbox entry points at (on the group's shard,
    /// which every node replicates), or why there is none.
    async fn group_content(&self, entry: &InboxEntry) -> GroupCopy {
        let Ok(shard) = u16::try_from(entry.source_shard).map(courier_proto::ShardId::new) else {
            return GroupCopy::NotYet;
        };
        let index = LogIndex::new(entry.group_index);
        let stored = self
            .read(shard, |view| {
                Ok((
                    groups::message_at(view, index)?,
                    groups::messages_forgotten_up_to(view)?,
                ))
            })
            .await;
        match stored {
            Ok((Some(message), _)) if message.message_id == entry.message_id => {
                message.content.map_or(GroupCopy::NotYet, GroupCopy::Stored)
            }
            Ok((None, forgotten)) if index <= forgotten => GroupCopy::Forgotten,
            _ => {
                tracing::debug!(
                    %shard,
                    index = entry.group_index,
                    "a group message's stored copy is not on this replica yet"
                );
                GroupCopy::NotYet
            }
        }
    }

    async fn read_frames(
        &self,
        caller: Caller,
        mut frames: tonic::Streaming<ClientFrame>,
        tx: FrameSender,
    ) {
        loop {
            let frame = tokio::select! {
                () = self.shutdown.cancelled() => return,
                frame = frames.message() => frame,
            };
            let frame = match frame {
                Ok(Some(frame)) => frame,
                Ok(None) | Err(_) => return,
            };
            if let Err(error) = self.handle_frame(caller, frame).await {
                let _ = tx.send(Err(error.into())).await;
                return;
            }
        }
    }

    async fn handle_frame(&self, caller: Caller, frame: ClientFrame) -> Result<(), ApiError> {
        let shard = self.shard_of(caller.user)?;
        match StreamCommand::try_from(frame)? {
            StreamCommand::Open { .. } => Err(ApiError::Invalid {
                code: "COURIER:Stream:Reopen",
                message: "the stream is already open".to_owned(),
            }),
            StreamCommand::Typing {
                conversation,
                typing,
            } => {
                self.typing(caller, conversation, typing);
                Ok(())
            }
            StreamCommand::Ack { up_to } => self.ack(shard, caller, up_to).await,
            StreamCommand::Read {
                conversation,
                up_to,
            } => self.read_up_to(shard, caller, conversation, up_to).await,
        }
    }
}

/// What an `Ack` frame asks for, as this node's replica shows the inbox.
struct AckPlan {
    /// The device's cursor.
    acked: InboxSeq,
    /// Bodies the ack lets go past the inbox's `trimmed_up_to`.
    trim_backlog: u64,
    /// The ack, up to where the frame asked.
    event: events::DeliveryAcked,
}

impl ClientApi {
    /// Proposes what an `Ack` frame up to `up_to` asks: nothing when it would change nothing;
    /// otherwise `DeliveryAcked` entries in order, each moving the device's cursor by at most
    /// `limits.ack-span-max` messages and clearing at most that many bodies (`trim_max`), so
    /// that no entry's apply (its receipts, the bodies it trims) grows with how long the device
    /// was away or how long another device held trimming back. As many entries as the longer
    /// of the two needs, as this node's replica shows them.
    async fn ack(
        &self,
        shard: courier_proto::ShardId,
        caller: Caller,
        up_to: InboxSeq,
    ) -> Result<(), ApiError> {
        let Some(ack) = self.ack_event(shard, caller, up_to).await? else {
            return Ok(());
        };
        let span = u64::from(self.limits.ack_span_max.max(1));
        let target = ack.event.up_to_seq;
        let steps = |length: u64| length.div_ceil(span);
        let entries = steps(target.saturating_sub(ack.acked.get()))
            .max(steps(ack.trim_backlog))
            .max(1);
        let mut at = ack.acked.get();
        for _ in 0..entries {
            at = if target > at {
                target.min(at.saturating_add(span))
            } else {
                target
            };
            let entry = Kind::DeliveryAcked(events::DeliveryAcked {
                up_to_seq: at,
                trim_max: u32::try_from(span).unwrap_or(u32::MAX),
                ..ack.event
            });
            self.cluster
                .propose(shard, vec![Event { kind: Some(entry) }])
                .await?;
        }
        Ok(())
    }

    /// Proposes what a `Read` frame of `conversation` up to `up_to` asks: nothing when it was
    /// read that far; otherwise `ReadUpTo` entries in order, each reading at most
    /// `limits.ack-span-max` messages of the conversation (each a READ receipt, a DELIVERED one
    /// too when no device acked it), the intermediate ones at messages of the conversation as
    /// this node's replica shows them.
    async fn read_up_to(
        &self,
        shard: courier_proto::ShardId,
        caller: Caller,
        conversation: courier_proto::ConversationId,
        up_to: InboxSeq,
    ) -> Result<(), ApiError> {
        let wire = events::Conversation::from(conversation);
        let span = usize::try_from(self.limits.ack_span_max.max(1)).unwrap_or(usize::MAX);
        let read = |view: &courier_storage::projection::View<'_, '_>| {
            let state = readstate::get(view, caller.user, conversation)?;
            let target = readstate::read_target(view, caller.user, up_to)?;
            // Only for a read that moves: `up_to` is then a message of this conversation
            // (at most the inbox tail), never the client's raw number.
            let steps: Vec<u64> = match &target {
                ReadTarget::Position(position)
                    if position.conversation == Some(wire) && position.pos > state.read_pos =>
                {
                    readstate::positions_between(
                        view,
                        caller.user,
                        conversation,
                        InboxSeq::new(state.read_seq),
                        up_to,
                    )?
                    .iter()
                    .skip(span.saturating_sub(1))
                    .step_by(span)
                    .map(|(seq, _)| seq.get())
                    .filter(|seq| *seq < up_to.get())
                    .collect()
                }
                _ => Vec::new(),
            };
            Ok((target, state, active(view, caller)?, steps))
        };
        let mut read_state = self.read(shard, read).await?;
        if read_state.0 == ReadTarget::Unknown
            && self.caught_up(shard, caller.user, up_to).await? == CaughtUp::Since
        {
            read_state = self.read(shard, read).await?;
        }
        let (target, state, active, steps) = read_state;
        if !active {
            return Err(revoked());
        }
        match target {
            // Read that far already (`read_pos` only moves forward): the event would change
            // nothing, so no log entry is written for it.
            ReadTarget::Position(position)
                if position.conversation == Some(wire) && position.pos <= state.read_pos =>
            {
                return Ok(());
            }
            ReadTarget::Position(position) if position.conversation == Some(wire) => {}
            // A message's position leaves only after it was read (and its stub forgotten after
            // the retention window): read already, nothing to do.
            ReadTarget::ReadAlready => return Ok(()),
            ReadTarget::Position(_) | ReadTarget::Unknown => {
                return Err(ApiError::Invalid {
                    code: "COURIER:Stream:ReadUnknown",
                    message: format!("seq {up_to} is not a message of that conversation"),
                });
            }
        }
        let read_at_ms = now_ms();
        for step in steps.into_iter().chain(std::iter::once(up_to.get())) {
            let entry = Kind::ReadUpTo(events::ReadUpTo {
                user: caller.user.get(),
                conversation: Some(wire),
                up_to_seq: step,
                read_at_ms,
            });
            self.cluster
                .propose(shard, vec![Event { kind: Some(entry) }])
                .await?;
        }
        Ok(())
    }

    /// What an `Ack` frame up to `up_to` asks for, checked on this node's replica: `None` when
    /// it would change nothing.
    async fn ack_event(
        &self,
        shard: courier_proto::ShardId,
        caller: Caller,
        up_to: InboxSeq,
    ) -> Result<Option<AckPlan>, ApiError> {
        let (trim_delivered, keep_recent) = (
            !self.trimming.keep_delivered,
            self.trimming.companion_history,
        );
        let read = |view: &courier_storage::projection::View<'_, '_>| {
            let state = inbox::state(view, caller.user)?;
            let acked = cursors::acked(view, caller.user, caller.device)?;
            // The bodies this ack lets go: a repeated ack (at or below the cursor) still
            // clears some when another device was revoked since, or companion history
            // shrank; an ack that moves the cursor may clear a backlog longer than its own
            // step.
            let trim_backlog = if trim_delivered {
                inbox::trimmable_up_to(
                    view,
                    caller.user,
                    (caller.device, up_to),
                    keep_recent,
                    &state,
                )?
                .saturating_sub(state.trimmed_up_to)
            } else {
                0
            };
            Ok((
                InboxSeq::new(state.tail_seq),
                acked,
                active(view, caller)?,
                trim_backlog,
            ))
        };
        let mut state = self.read(shard, read).await?;
        if up_to > state.0 && self.caught_up(shard, caller.user, up_to).await? == CaughtUp::Since {
            state = self.read(shard, read).await?;
        }
        let (tail, acked, active, trim_backlog) = state;
        if !active {
            return Err(revoked());
        }
        if up_to > tail {
            return Err(ApiError::Invalid {
                code: "COURIER:Stream:AckPastTail",
                message: format!("ack {up_to} is past the inbox tail {tail}"),
            });
        }
        if up_to <= acked && trim_backlog == 0 {
            // This device acked that far already (a cursor only moves forward) and no
            // body would be cleared: the event would change nothing, so no log entry is
            // written for it.
            return Ok(None);
        }
        Ok(Some(AckPlan {
            acked,
            trim_backlog,
            event: events::DeliveryAcked {
                user: caller.user.get(),
                device: caller.device.get(),
                up_to_seq: up_to.get(),
                acked_at_ms: now_ms(),
                trim_delivered,
                keep_recent,
                trim_max: 0,
            },
        }))
    }

    /// Whether the replica a stream reads has caught up with message `seq` of `user`, which an
    /// `Ack` or `Read` named and the replica's first read did not show: `Since` once its inbox
    /// reaches `seq` (at the first look too: the caller reads again), within [`CATCH_UP_WAIT`]
    /// (or the election timeout, if longer); `Current` when it is the shard's leader with every
    /// committed entry applied (raft's read index), or after the wait a settled follower
    /// ([`ClientApi::settled_follower`]): what it shows is then the answer.
    ///
    /// # Errors
    /// `UNAVAILABLE` `COURIER:Shard:Lagging` when none of that holds: the device reconnects and
    /// sends the frame again (`Ack` and `Read` are idempotent).
    async fn caught_up(
        &self,
        shard: courier_proto::ShardId,
        user: UserId,
        seq: InboxSeq,
    ) -> Result<CaughtUp, ApiError> {
        let reached = |view: &courier_storage::projection::View<'_, '_>| {
            Ok((inbox::tail(view, user)? >= seq).then_some(()))
        };
        let holds = self.cluster.holds(shard);
        let barrier = self
            .cluster
            .read_barrier(shard, crate::cluster::ReadConsistency::Linearizable);
        if holds
            && matches!(
                tokio::time::timeout(CATCH_UP_WAIT, barrier).await,
                Ok(Ok(()))
            )
        {
            return Ok(if self.read(shard, reached).await?.is_some() {
                CaughtUp::Since
            } else {
                CaughtUp::Current
            });
        }
        // A replica elsewhere is read over the network: not as often.
        let poll = if holds {
            Duration::from_millis(10)
        } else {
            REMOTE_STREAM_POLL / 2
        };
        // At least an election timeout: a voter still following then has heard from its leader.
        let wait = CATCH_UP_WAIT.max(self.cluster.groups().election_timeout_max());
        if self
            .read_until(shard, (wait, poll), reached)
            .await?
            .is_some()
        {
            return Ok(CaughtUp::Since);
        }
        if holds && self.settled_follower(shard).await {
            return Ok(CaughtUp::Current);
        }
        Err(ApiError::lagging(format!(
            "{shard} has not reached message {seq}; send the frame again"
        )))
    }

    /// Whether this node's replica of `shard` follows a leader, applied every entry it holds,
    /// and received none over two heartbeats: a follower catching up a backlog receives its
    /// leader's appends one after another (between two of them it has applied all it holds),
    /// while one that is caught up receives only what is new. Asked after the catch-up wait (at
    /// least an election timeout: a voter still following then has heard from its leader), its
    /// inbox is then the answer, as on the leader.
    async fn settled_follower(&self, shard: courier_proto::ShardId) -> bool {
        let groups = self.cluster.groups();
        let Some(handle) = groups.get(courier_consensus::types::GroupId::Shard(shard)) else {
            return false;
        };
        let before = handle.state().last_log_index;
        tokio::time::sleep(groups.heartbeat() * 2).await;
        handle.follows_and_applied_all() && handle.state().last_log_index == before
    }

    /// Hands a typing update to the other side's live streams on every node, best effort: never
    /// logged, dropped where nobody is connected. In a 1:1 conversation only once it exists (one
    /// of the two received a message from the other). In a group it goes to every other current
    /// member (read from this replica of the group's shard); a caller who is not a member is
    /// ignored. At most `limits.typing-broadcasts-max` are handled at once on a node.
    fn typing(&self, caller: Caller, conversation: courier_proto::ConversationId, typing: bool) {
        if self
            .limiters
            .typing
            .take(&(caller.user.get(), caller.device.get()))
            .is_err()
        {
            return; // over the typing rate: dropped, like any ephemeral update
        }
        // Bounded node-wide: with every permit taken (a peer that does not answer holds each
        // broadcast for an RPC timeout), the update is dropped. The checks below read replicas
        // (another node's, for a shard this node does not hold), so they run in the task, not in
        // the stream's frame reader, where they would hold up its acks and reads.
        let Ok(permit) = self.typing_broadcasts.clone().try_acquire_owned() else {
            return;
        };
        let api = self.clone();
        tokio::spawn(async move {
            if let Some((to_users, update)) = api.typing_update(caller, conversation, typing).await
            {
                for user in &to_users {
                    api.live.typing(*user, &update);
                }
                api.cluster.broadcast_typing(to_users, update).await;
            }
            drop(permit);
        });
    }

    /// Who a typing frame reaches and what they are shown; `None` when nobody: a 1:1
    /// conversation that does not exist yet, a group the caller is not a member of.
    async fn typing_update(
        &self,
        caller: Caller,
        conversation: courier_proto::ConversationId,
        typing: bool,
    ) -> Option<(Vec<u64>, courier_proto::pb::client::TypingUpdate)> {
        let (to_users, shown_as) = match conversation {
            courier_proto::ConversationId::Direct(to) => {
                // Only into a conversation that exists (either received a message from the
                // other): a stranger's typing reaches nobody, as a stranger's presence is not told.
                let exists = matches!(self.received(to, caller.user).await, Ok(true))
                    || matches!(self.received(caller.user, to).await, Ok(true));
                if !exists {
                    return None;
                }
                (
                    vec![to.get()],
                    courier_proto::ConversationId::Direct(caller.user),
                )
            }
            courier_proto::ConversationId::Group(group) => {
                let shard = self.group_shard(group).ok()?;
                let members = self
                    .read(shard, |view| groups::members(view, group))
                    .await
                    .ok()?;
                if !members.iter().any(|(user, _)| *user == caller.user) {
                    return None;
                }
                let others = members
                    .into_iter()
                    .map(|(user, _)| user.get())
                    .filter(|user| *user != caller.user.get())
                    .collect();
                (others, conversation)
            }
        };
        let update = courier_proto::pb::client::TypingUpdate {
            user: caller.user.get(),
            conversation: Some(shown_as.into()),
            typing,
        };
        Some((to_users, update))
    }
}

/// Whether `caller`'s device is registered, not revoked and still holds the token it
/// authenticated with, as `view`'s replica holds it (after the number was deleted and registered
/// again, a new device may have the same ids).
fn active(
    view: &courier_storage::projection::View<'_, '_>,
    caller: Caller,
) -> courier_storage::Result<bool> {
    Ok(
        courier_storage::projection::devices::devices_of(view, caller.user)?
            .into_iter()
            .any(|(id, record)| id == caller.device.get() && caller.holds(&record)),
    )
}

/// `UNAUTHENTICATED` `COURIER:Auth:Revoked`: the stream's device was revoked (an ack or read it
/// sends after that is refused, and its stream ends).
fn revoked() -> ApiError {
    ApiError::Unauthenticated {
        code: "COURIER:Auth:Revoked",
        message: "this device was revoked".to_owned(),
    }
}

/// What the group shard's replica on this node holds for a group message an inbox entry points at.
enum GroupCopy {
    /// Its content.
    Stored(events::Content),
    /// It left with the retention windows (`GroupMessagesForgotten`): skipped.
    Forgotten,
    /// Not applied here yet: retry on a later pass.
    NotYet,
}

/// A stream's last look at its device's prekey stock.
#[derive(Debug, Default)]
struct KeysCheck {
    /// The keys epoch of the last check (`None`: not checked yet).
    at: Option<u64>,
    /// The stock the device was last told about, while it is low.
    told: Option<u32>,
}

/// The frame that pushes inbox entry `seq`.
fn message_frame(seq: InboxSeq, entry: InboxEntry) -> ServerFrame {
    ServerFrame {
        frame: Some(server_frame::Frame::Message(InboxMessage {
            seq: seq.get(),
            message_id: entry.message_id,
            sender_user: entry.sender_user,
            sender_device: entry.sender_device,
            conversation: entry.conversation,
            content: entry.content,
            sent_at_ms: entry.sent_at_ms,
            stored_at_ms: entry.stored_at_ms,
        })),
    }
}

fn open_first() -> ApiError {
    ApiError::Invalid {
        code: "COURIER:Stream:OpenFirst",
        message: "the first frame of a stream must be Open".to_owned(),
    }
}

/// Pushes a page of receipt changes, moving `receipts_after` past each one pushed. Returns
/// `false` when the stream closed.
async fn push_receipts(
    feed: Vec<receipts::FeedItem>,
    receipts_after: &mut ReceiptFeedPosition,
    tx: &FrameSender,
) -> bool {
    for item in feed {
        *receipts_after = item.position();
        let update = ReceiptUpdate {
            message_id: item.message.as_bytes().to_vec(),
            recipient_user: item.recipient.get(),
            state: item.receipt.state,
            at_ms: item.receipt.at_ms,
            feed_index: item.set_at.get(),
            feed_position: receipts_after.to_wire(),
        };
        let regressed = bugs::regressed_receipt(&update);
        for update in std::iter::once(update).chain(regressed) {
            let frame = ServerFrame {
                frame: Some(server_frame::Frame::Receipt(update)),
            };
            if tx.send(Ok(frame)).await.is_err() {
                return false;
            }
        }
    }
    true
}
