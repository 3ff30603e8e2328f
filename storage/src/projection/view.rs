//! The [`View`] one projection folds through: reads of any family and staged writes to its own,
//! with every value framed by the log index that set it.

use courier_proto::{LogIndex, ShardId};
use prost::Message;

use super::{Projection, hex};
use crate::cf::Cf;
use crate::error::{Result, StorageError};
use crate::keys;
use crate::kv::{Pair, Staged};

const SET_AT_BYTES: usize = 8;

/// Frames a projection value: the log index that set it, then the encoded message.
pub fn frame(at: LogIndex, body: &[u8]) -> Vec<u8> {
    let mut value = Vec::with_capacity(SET_AT_BYTES.saturating_add(body.len()));
    value.extend_from_slice(&at.get().to_be_bytes());
    value.extend_from_slice(body);
    value
}

/// Splits a framed value into the index that set it and the message bytes.
pub fn unframe(value: &[u8]) -> Option<(LogIndex, &[u8])> {
    let (head, body) = value.split_at_checked(SET_AT_BYTES)?;
    Some((
        LogIndex::new(u64::from_be_bytes(head.try_into().ok()?)),
        body,
    ))
}

/// What one projection sees while applying one event at one log index.
pub struct View<'s, 'a> {
    staged: &'s mut Staged<'a>,
    shard: ShardId,
    at: LogIndex,
    projection: Projection,
}

impl<'s, 'a> View<'s, 'a> {
    /// A view for `projection` of `shard`, applying the entry at `at`.
    pub fn new(
        staged: &'s mut Staged<'a>,
        shard: ShardId,
        at: LogIndex,
        projection: Projection,
    ) -> Self {
        Self {
            staged,
            shard,
            at,
            projection,
        }
    }

    /// The shard being applied.
    pub fn shard(&self) -> ShardId {
        self.shard
    }

    /// The log index being applied.
    pub fn at(&self) -> LogIndex {
        self.at
    }

    fn decode_err(&self, projection: Projection, key: &[u8], reason: String) -> StorageError {
        StorageError::Decode {
            cf: projection.name(),
            shard: self.shard,
            what: format!("key {}", hex(key)),
            reason,
        }
    }

    /// Reads and decodes a value of any projection.
    ///
    /// # Errors
    /// A storage fault or an undecodable value.
    pub fn get<M: Message + Default>(
        &self,
        projection: Projection,
        key: &[u8],
    ) -> Result<Option<M>> {
        let Some(value) = self.staged.get(Cf::Projection(projection), key)? else {
            return Ok(None);
        };
        self.decode(projection, key, &value).map(Some)
    }

    /// Reads and decodes a value of any projection with the log index that last set it.
    ///
    /// # Errors
    /// A storage fault or an undecodable value.
    pub fn get_with_index<M: Message + Default>(
        &self,
        projection: Projection,
        key: &[u8],
    ) -> Result<Option<(LogIndex, M)>> {
        let Some(value) = self.staged.get(Cf::Projection(projection), key)? else {
            return Ok(None);
        };
        let set_at = unframe(&value).map(|(at, _)| at).unwrap_or_default();
        Ok(Some((set_at, self.decode(projection, key, &value)?)))
    }

    fn decode<M: Message + Default>(
        &self,
        projection: Projection,
        key: &[u8],
        value: &[u8],
    ) -> Result<M> {
        let (_, body) = unframe(value)
            .ok_or_else(|| self.decode_err(projection, key, "shorter than its frame".to_owned()))?;
        M::decode(body).map_err(|error| self.decode_err(projection, key, error.to_string()))
    }

    /// Reads a raw `u64` value of any projection.
    ///
    /// # Errors
    /// A storage fault or a value that is not 8 bytes.
    pub fn get_u64(&self, projection: Projection, key: &[u8]) -> Result<Option<u64>> {
        let Some(value) = self.staged.get(Cf::Projection(projection), key)? else {
            return Ok(None);
        };
        let body = unframe(&value).map(|(_, body)| body).unwrap_or_default();
        let bytes: [u8; 8] = body.try_into().map_err(|_| {
            self.decode_err(projection, key, format!("{} bytes, not 8", body.len()))
        })?;
        Ok(Some(u64::from_be_bytes(bytes)))
    }

    /// Scans and decodes up to `limit` values of any projection in `[from, to)`.
    ///
    /// # Errors
    /// A storage fault or an undecodable value.
    pub fn scan<M: Message + Default>(
        &self,
        projection: Projection,
        from: &[u8],
        to: &[u8],
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, M)>> {
        let pairs: Vec<Pair> = self
            .staged
            .scan(Cf::Projection(projection), from, to, limit)?;
        pairs
            .into_iter()
            .map(|(key, value)| {
                let message = self.decode(projection, &key, &value)?;
                Ok((key, message))
            })
            .collect()
    }

    /// Writes a message into this view's own projection, framed with the current index.
    ///
    /// # Errors
    /// A storage fault.
    pub fn put<M: Message>(&mut self, key: Vec<u8>, message: &M) -> Result<()> {
        let value = frame(self.at, &message.encode_to_vec());
        self.staged.put(self.projection, key, value)
    }

    /// [`View::put`] for a key the caller knows is new (no read of an old value; see
    /// `Staged::put_new`).
    pub fn put_new<M: Message>(&mut self, key: Vec<u8>, message: &M) {
        let value = frame(self.at, &message.encode_to_vec());
        self.staged.put_new(self.projection, key, value);
    }

    /// [`View::put_u64`] for a key the caller knows is new.
    pub fn put_u64_new(&mut self, key: Vec<u8>, value: u64) {
        let value = frame(self.at, &value.to_be_bytes());
        self.staged.put_new(self.projection, key, value);
    }

    /// Writes a raw `u64` into this view's own projection.
    ///
    /// # Errors
    /// A storage fault.
    pub fn put_u64(&mut self, key: Vec<u8>, value: u64) -> Result<()> {
        let value = frame(self.at, &value.to_be_bytes());
        self.staged.put(self.projection, key, value)
    }

    /// Deletes a key of this view's own projection.
    ///
    /// # Errors
    /// A storage fault.
    pub fn delete(&mut self, key: Vec<u8>) -> Result<()> {
        self.staged.delete(self.projection, key)
    }

    /// Deletes every record of this view's own projection whose key starts with `prefix`.
    ///
    /// # Errors
    /// A storage fault.
    pub fn delete_prefix(&mut self, prefix: &[u8]) -> Result<()> {
        let end = keys::prefix_end(prefix).expect("record prefixes end below 0xff..");
        let found = self
            .staged
            .scan(Cf::Projection(self.projection), prefix, &end, usize::MAX)?;
        for (key, _) in found {
            self.staged.delete(self.projection, key)?;
        }
        Ok(())
    }
}
