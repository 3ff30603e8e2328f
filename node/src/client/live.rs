//! The device streams open on this node, by user: where ephemeral updates (typing) go. Nothing
//! here is durable: an update for a user with no stream on this node is dropped, and a stream
//! whose buffer is full misses it (bounded, like every queue).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use courier_proto::pb::client::{ServerFrame, TypingUpdate, server_frame};
use tokio::sync::mpsc;
use tonic::Status;

use crate::status::ApiError;

/// A registered stream's sender.
pub type FrameSender = mpsc::Sender<Result<ServerFrame, Status>>;

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
                    .filter(|open| open.sender.try_send(Ok(frame.clone())).is_ok())
                    .count()
            })
            .try_into()
            .unwrap_or(u32::MAX)
    }
}
