//! The device streams open on this node, by user: where ephemeral updates (typing) go. Nothing
//! here is durable: an update for a user with no stream on this node is dropped, and a stream
//! whose buffer is full misses it (bounded, like every queue).
//!
//! A stream's buffer (frames waiting for gRPC to take them) is bounded twice: in frames
//! (`limits.stream-buffer-frames`) and in their encoded bytes (`limits.stream-buffer-bytes`), so
//! that what a device that stops reading holds of the node's memory does not grow with the size
//! of its messages (its pusher's pages of the inbox end at the same bytes, `stream.rs`). A frame
//! larger than the byte bound waits for an empty buffer.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use courier_proto::pb::client::{ServerFrame, TypingUpdate, server_frame};
use prost::Message;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

use crate::status::ApiError;

/// What a stream's buffer carries: a frame, or the error that ends the stream.
pub type StreamItem = Result<ServerFrame, Status>;

/// An item in a stream's buffer, holding its bytes of the buffer until gRPC takes it.
struct Buffered {
    item: StreamItem,
    _bytes: Option<OwnedSemaphorePermit>,
}

/// The stream's buffer is gone: the device's stream ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamClosed;

/// The sending half of a stream's buffer.
#[derive(Clone, Debug)]
pub struct FrameSender {
    tx: mpsc::Sender<Buffered>,
    bytes: Arc<Semaphore>,
    bytes_max: u32,
}

impl std::fmt::Debug for Buffered {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Buffered").finish_non_exhaustive()
    }
}

/// The receiving half of a stream's buffer: what gRPC sends to the device.
#[derive(Debug)]
pub struct FrameStream(ReceiverStream<Buffered>);

impl Stream for FrameStream {
    type Item = StreamItem;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<StreamItem>> {
        // The item's bytes go back to the buffer as gRPC takes it.
        Pin::new(&mut self.0)
            .poll_next(cx)
            .map(|next| next.map(|buffered| buffered.item))
    }
}

/// A stream's buffer of at most `frames` frames and `bytes_max` encoded bytes.
pub fn buffer(frames: u32, bytes_max: u32) -> (FrameSender, FrameStream) {
    let (tx, rx) = mpsc::channel(usize::try_from(frames).unwrap_or(usize::MAX).max(1));
    let sender = FrameSender {
        tx,
        bytes: Arc::new(Semaphore::new(
            usize::try_from(bytes_max).unwrap_or(usize::MAX),
        )),
        bytes_max,
    };
    (sender, FrameStream(ReceiverStream::new(rx)))
}

impl FrameSender {
    /// The bytes `item` holds of the buffer: its encoded size, at most the whole buffer (an
    /// error frame ends the stream and holds none).
    fn cost(&self, item: &StreamItem) -> u32 {
        match item {
            Ok(frame) => u32::try_from(frame.encoded_len())
                .unwrap_or(u32::MAX)
                .min(self.bytes_max),
            Err(_) => 0,
        }
    }

    /// Buffers `item`, waiting for room in frames and bytes.
    ///
    /// # Errors
    /// [`StreamClosed`] when the stream ended.
    pub async fn send(&self, item: StreamItem) -> Result<(), StreamClosed> {
        let cost = self.cost(&item);
        let bytes = match cost {
            0 => None,
            cost => Some(
                self.bytes
                    .clone()
                    .acquire_many_owned(cost)
                    .await
                    .map_err(|_| StreamClosed)?,
            ),
        };
        self.tx
            .send(Buffered {
                item,
                _bytes: bytes,
            })
            .await
            .map_err(|_| StreamClosed)
    }

    /// Waits until the stream ends (the device's side is gone).
    pub async fn closed(&self) {
        self.tx.closed().await;
    }

    /// Buffers `item` if there is room now; returns whether it was.
    pub fn try_send(&self, item: StreamItem) -> bool {
        let bytes = match self.cost(&item) {
            0 => None,
            cost => match self.bytes.clone().try_acquire_many_owned(cost) {
                Ok(permit) => Some(permit),
                Err(_) => return false,
            },
        };
        self.tx
            .try_send(Buffered {
                item,
                _bytes: bytes,
            })
            .is_ok()
    }
}

/// One open stream.
#[derive(Debug)]
struct Open {
    id: u64,
    device: u32,
    sender: FrameSender,
}

/// Live streams by user.
#[derive(Debug, Default)]
pub struct LiveStreams {
    next_id: AtomicU64,
    streams: Mutex<BTreeMap<u64, Vec<Open>>>,
}

/// Removes its stream from the registry when dropped.
#[derive(Debug)]
pub struct Registration {
    live: Arc<LiveStreams>,
    user: u64,
    id: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut streams = self
            .live
            .streams
            .lock()
            .expect("live streams lock is never poisoned");
        if let Some(list) = streams.get_mut(&self.user) {
            list.retain(|open| open.id != self.id);
            if list.is_empty() {
                streams.remove(&self.user);
            }
        }
    }
}

impl LiveStreams {
    /// Registers a stream of `device` of `user` until the returned guard drops, unless the
    /// device already has `per_device_max` streams open here.
    ///
    /// # Errors
    /// `RESOURCE_EXHAUSTED` `COURIER:Limits:StreamsPerDevice` at the cap.
    pub fn register(
        self: &Arc<Self>,
        user: u64,
        device: u32,
        per_device_max: u32,
        sender: FrameSender,
    ) -> Result<Registration, ApiError> {
        let mut streams = self
            .streams
            .lock()
            .expect("live streams lock is never poisoned");
        let list = streams.entry(user).or_default();
        let open = list.iter().filter(|open| open.device == device).count();
        if open >= usize::try_from(per_device_max).unwrap_or(usize::MAX) {
            if list.is_empty() {
                streams.remove(&user);
            }
            return Err(ApiError::ResourceExhausted {
                code: "COURIER:Limits:StreamsPerDevice",
                message: format!(
                    "this device has {open} streams open on this node (limits.streams-per-device-max)"
                ),
            });
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        list.push(Open { id, device, sender });
        Ok(Registration {
            live: self.clone(),
            user,
            id,
        })
    }

    /// Hands a typing update to every stream of `user` here; returns how many took it.
    pub fn typing(&self, user: u64, update: &TypingUpdate) -> u32 {
        let streams = self
            .streams
            .lock()
            .expect("live streams lock is never poisoned");
        let frame = ServerFrame {
            frame: Some(server_frame::Frame::Typing(*update)),
        };
        streams
            .get(&user)
            .map_or(0, |list| {
                list.iter()
                    .filter(|open| open.sender.try_send(Ok(frame.clone())))
                    .count()
            })
            .try_into()
            .unwrap_or(u32::MAX)
    }
}

#[cfg(test)]
mod tests {
    use courier_proto::pb::client::InboxMessage;
    use tokio_stream::StreamExt as _;

    use super::*;

    /// A message frame of about `bytes` encoded bytes.
    fn message(bytes: usize) -> StreamItem {
        Ok(ServerFrame {
            frame: Some(server_frame::Frame::Message(InboxMessage {
                message_id: vec![7; bytes],
                ..InboxMessage::default()
            })),
        })
    }

    /// The buffer holds at most its bytes: a frame that does not fit waits until gRPC takes an
    /// earlier one, and the frame count bounds small frames.
    #[tokio::test]
    async fn a_streams_buffer_is_bounded_in_bytes_and_frames() {
        let (tx, mut rx) = buffer(3, 1000);
        assert!(tx.try_send(message(600)), "the first frame fits");
        assert!(
            !tx.try_send(message(600)),
            "a second one is past 1000 bytes"
        );
        let waiting = tokio::spawn({
            let tx = tx.clone();
            async move { tx.send(message(600)).await }
        });
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(!waiting.is_finished(), "send waits for room");
        assert!(rx.next().await.expect("first").is_ok());
        assert_eq!(waiting.await.expect("task"), Ok(()), "taken: room again");
        assert!(rx.next().await.expect("second").is_ok());

        // Small frames: the frame count binds first.
        for _ in 0..3 {
            assert!(tx.try_send(message(10)));
        }
        assert!(!tx.try_send(message(10)), "three frames at most");
    }

    /// A frame larger than the whole buffer is let through once the buffer is empty, and holds
    /// all of it until taken.
    #[tokio::test]
    async fn a_frame_larger_than_the_buffer_waits_for_an_empty_one() {
        let (tx, mut rx) = buffer(8, 100);
        assert!(tx.try_send(message(10)));
        assert!(
            !tx.try_send(message(500)),
            "not while another frame is buffered"
        );
        assert!(rx.next().await.expect("small").is_ok());
        assert!(tx.try_send(message(500)), "alone in an empty buffer");
        assert!(!tx.try_send(message(10)), "it holds the whole buffer");
        assert!(rx.next().await.expect("large").is_ok());
        assert!(tx.try_send(message(10)));
        drop(rx);
        assert_eq!(tx.send(message(10)).await, Err(StreamClosed));
    }

    /// A pusher waiting for room in bytes learns that the stream ended: the frames the stream
    /// held are dropped with it and give their bytes back.
    #[tokio::test]
    async fn a_send_waiting_for_bytes_ends_with_the_stream() {
        let (tx, rx) = buffer(8, 1000);
        assert!(tx.try_send(message(600)));
        let waiting = tokio::spawn({
            let tx = tx.clone();
            async move { tx.send(message(600)).await }
        });
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(!waiting.is_finished(), "send waits for room");
        drop(rx);
        let ended = tokio::time::timeout(std::time::Duration::from_secs(5), waiting)
            .await
            .expect("the waiting send ends")
            .expect("task");
        assert_eq!(ended, Err(StreamClosed));
    }
}
