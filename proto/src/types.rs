//! Domain newtypes. Outside this module a user is a `UserId`, never a bare `u64`; sequences and
//! indexes advance through checked `next()`, never `+ 1`.

use std::fmt;

use crate::error::WireError;
use crate::limits::CLIENT_MSG_ID_BYTES_MAX;

macro_rules! nonzero_id {
    ($(#[$doc:meta])* $name:ident, $repr:ty, $field:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name($repr);

        impl $name {
            /// Returns the id, or `None` for zero (zero is never a valid id).
            pub const fn new(raw: $repr) -> Option<Self> {
                if raw == 0 { None } else { Some(Self(raw)) }
            }

            /// Returns the raw value, for keys and the wire.
            pub const fn get(self) -> $repr {
                self.0
            }

            /// Converts a wire value, rejecting zero.
            ///
            /// # Errors
            /// [`WireError::Zero`] when `raw` is zero.
            pub fn from_wire(raw: $repr, field: &'static str) -> Result<Self, WireError> {
                Self::new(raw).ok_or(WireError::Zero { field })
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}:{}", $field, self.0)
            }
        }
    };
}

nonzero_id!(
    /// A user. Users are hashed to shards by [`crate::shard_of`].
    UserId, u64, "user"
);
nonzero_id!(
    /// A device of one user; ids are 1, 2, 3, … per user in registration order.
    DeviceId, u32, "device"
);
nonzero_id!(
    /// A group conversation, hashed to shards by [`crate::shard_of_group`].
    GroupId, u64, "group"
);

macro_rules! counter {
    ($(#[$doc:meta])* $name:ident, $repr:ty, $what:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name($repr);

        impl $name {
            /// The value before the first one (nothing yet).
            pub const ZERO: Self = Self(0);

            /// Wraps a raw value.
            pub const fn new(raw: $repr) -> Self {
                Self(raw)
            }

            /// Returns the raw value.
            pub const fn get(self) -> $repr {
                self.0
            }

            /// Returns the following value.
            ///
            /// # Panics
            /// Panics on overflow, which would take 2^64 events and means a bug.
            pub fn next(self) -> Self {
                Self(self.0.checked_add(1).expect(concat!($what, " overflow")))
            }

            /// Returns `self + n`, or `None` on overflow.
            pub fn checked_add(self, n: $repr) -> Option<Self> {
                self.0.checked_add(n).map(Self)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }
    };
}

counter!(
    /// Position in one user's inbox: gap-free, starting at 1.
    InboxSeq, u64, "InboxSeq"
);
counter!(
    /// Index of an entry in one shard's raft log.
    LogIndex, u64, "LogIndex"
);

/// A shard: one raft group of R replicas. Shard ids are `0..shard_count`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ShardId(u16);

impl ShardId {
    /// Wraps a raw shard number.
    pub const fn new(raw: u16) -> Self {
        Self(raw)
    }

    /// Returns the raw shard number.
    pub const fn get(self) -> u16 {
        self.0
    }

    /// Converts a wire shard number, checking it against the cluster's shard count.
    ///
    /// # Errors
    /// [`WireError::OutOfRange`] when `raw >= shard_count`.
    pub fn from_wire(raw: u32, shard_count: u16) -> Result<Self, WireError> {
        match u16::try_from(raw) {
            Ok(shard) if shard < shard_count => Ok(Self(shard)),
            _ => Err(WireError::OutOfRange {
                field: "shard",
                value: u64::from(raw),
                min: 0,
                max: u64::from(shard_count).saturating_sub(1),
            }),
        }
    }
}

impl fmt::Display for ShardId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "shard:{}", self.0)
    }
}

/// A message, decided by the sender shard's leader (a uuid v7: time-ordered, unique).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MessageId([u8; 16]);

impl MessageId {
    /// Wraps 16 raw bytes.
    pub const fn from_bytes(bytes: [u8; 16]) -> Self {
        Self(bytes)
    }

    /// Returns the 16 raw bytes.
    pub const fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }

    /// Converts a wire value.
    ///
    /// # Errors
    /// [`WireError::Malformed`] unless `raw` is exactly 16 bytes; [`WireError::Zero`] for the
    /// nil id.
    pub fn from_wire(raw: &[u8], field: &'static str) -> Result<Self, WireError> {
        let bytes: [u8; 16] = raw.try_into().map_err(|_| WireError::Malformed {
            field,
            reason: "expected 16 bytes",
        })?;
        if bytes == [0; 16] {
            return Err(WireError::Zero { field });
        }
        Ok(Self(bytes))
    }
}

impl fmt::Debug for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MessageId({self})")
    }
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for byte in self.0 {
            write!(f, "{byte:02x}")?;
        }
        Ok(())
    }
}

/// A sending device's idempotency key: 1..=64 bytes of UTF-8, unique per device.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ClientMsgId(String);

impl ClientMsgId {
    /// Converts a wire value.
    ///
    /// # Errors
    /// [`WireError::Missing`] when empty, [`WireError::TooLong`] past
    /// [`CLIENT_MSG_ID_BYTES_MAX`].
    pub fn from_wire(raw: String, field: &'static str) -> Result<Self, WireError> {
        if raw.is_empty() {
            return Err(WireError::Missing { field });
        }
        if raw.len() > CLIENT_MSG_ID_BYTES_MAX {
            return Err(WireError::TooLong {
                field,
                len: raw.len(),
                max: CLIENT_MSG_ID_BYTES_MAX,
            });
        }
        Ok(Self(raw))
    }

    /// Returns the id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// One change in a sender's receipt feed, as a device resumes after it: the log index that set the
/// change, then the message and the recipient whose copy moved. Feed positions order like the
/// feed (by index, then message id, then recipient) and are the same on every replica, so a
/// device that saw part of one log entry's changes resumes in the middle of that entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ReceiptFeedPosition {
    /// The log index that set the change.
    pub set_at: LogIndex,
    /// The message (all ones for "after the whole entry").
    pub message: [u8; 16],
    /// The recipient, raw (`u64::MAX` for "after the whole entry").
    pub recipient: u64,
}

impl ReceiptFeedPosition {
    /// Bytes of a position on the wire (`feed_position`, `receipts_after_position`).
    pub const WIRE_BYTES: usize = 8 + 16 + 8;

    /// The position after every change set by log index `index` (0: before the whole feed).
    pub const fn after_entry(index: LogIndex) -> Self {
        Self {
            set_at: index,
            message: [0xff; 16],
            recipient: u64::MAX,
        }
    }

    /// The position of one change.
    pub const fn of_change(set_at: LogIndex, message: MessageId, recipient: UserId) -> Self {
        Self {
            set_at,
            message: *message.as_bytes(),
            recipient: recipient.get(),
        }
    }

    /// The wire form: index, message id and recipient, big-endian, 32 bytes.
    pub fn to_wire(&self) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(Self::WIRE_BYTES);
        bytes.extend_from_slice(&self.set_at.get().to_be_bytes());
        bytes.extend_from_slice(&self.message);
        bytes.extend_from_slice(&self.recipient.to_be_bytes());
        bytes
    }

    /// Converts a wire value.
    ///
    /// # Errors
    /// [`WireError::Malformed`] unless `raw` is exactly [`Self::WIRE_BYTES`] bytes.
    pub fn from_wire(raw: &[u8], field: &'static str) -> Result<Self, WireError> {
        let malformed = WireError::Malformed {
            field,
            reason: "expected the 32 bytes of a ReceiptUpdate's feed_position",
        };
        if raw.len() != Self::WIRE_BYTES {
            return Err(malformed);
        }
        let (index, rest) = raw.split_at(8);
        let (message, recipient) = rest.split_at(16);
        Ok(Self {
            set_at: LogIndex::new(u64::from_be_bytes(
                index.try_into().map_err(|_| malformed.clone())?,
            )),
            message: message.try_into().map_err(|_| malformed.clone())?,
            recipient: u64::from_be_bytes(recipient.try_into().map_err(|_| malformed)?),
        })
    }
}

/// Who a conversation is with, from one user's point of view.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ConversationId {
    /// A 1:1 conversation with this user.
    Direct(UserId),
    /// A group conversation.
    Group(GroupId),
}
