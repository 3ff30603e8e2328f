//! The device streams open on this node, by user: where ephemeral updates (typing) go. Nothing
//! here is durable: an update for a user with no stream on this node is dropped, and a stream
//! whose buffer is full misses it (bounded, like every queue).

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use courier_proto::pb::client::{ServerFrame, TypingUpdate, server_frame};
use tokio::sync::mpsc;
use tonic::Status;

/// A registered stream's sender.
pub type FrameSender = mpsc::Sender<Result<ServerFrame, Status>>;

/// Live streams by user.
#[derive(Debug, Default)]
pub struct LiveStreams {
    next_id: AtomicU64,
    streams: Mutex<BTreeMap<u64, Vec<(u64, FrameSender)>>>,
}

/// Removes its stream from the registry when dropped.
#[derive(Debug)]
pub struct Registration<'a> {
    live: &'a LiveStreams,
    user: u64,
    id: u64,
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        let mut streams = self
            .live
            .streams
            .lock()
            .expect("live streams lock is never poisoned");
        if let Some(list) = streams.get_mut(&self.user) {
            list.retain(|(id, _)| *id != self.id);
            if list.is_empty() {
                streams.remove(&self.user);
            }
        }
    }
}

impl LiveStreams {
    /// Registers a stream of `user` until the returned guard drops.
    pub fn register(&self, user: u64, sender: FrameSender) -> Registration<'_> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.streams
            .lock()
            .expect("live streams lock is never poisoned")
            .entry(user)
            .or_default()
            .push((id, sender));
        Registration {
            live: self,
            user,
            id,
        }
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
                    .filter(|(_, tx)| tx.try_send(Ok(frame.clone())).is_ok())
                    .count()
            })
            .try_into()
            .unwrap_or(u32::MAX)
    }
}
