//! Arbitrary and adversarial events: what a forged peer call or a buggy proposer could put in a
//! shard's log. Ids come from small domains (so events collide with each other and with the
//! state they build: acks of stored messages, reads of other conversations, receipts going
//! backwards, forwarded positions with gaps), with zero ids, out-of-range shards, malformed
//! message ids and unknown enum values mixed in. Deterministic per seed.

use courier_proto::pb::events::conversation::With;
use courier_proto::pb::events::event::Kind;
use courier_proto::pb::events::{self, Conversation, EntryPayload, Event};
use courier_proto::{FORMAT_VERSION, ShardId};

use super::Rng;

/// Generates adversarial events for one shard.
#[derive(Debug)]
pub struct Adversary {
    rng: Rng,
    shard: ShardId,
}

impl Adversary {
    /// An adversary writing into `shard`'s log, from `seed`.
    pub fn new(shard: ShardId, seed: u64) -> Self {
        Self {
            rng: Rng::new(seed),
            shard,
        }
    }

    /// `n` entries of 1..=`events_max` events each.
    pub fn payloads(&mut self, n: usize, events_max: u64) -> Vec<EntryPayload> {
        (0..n)
            .map(|_| {
                let count = 1 + self.rng.below(events_max);
                EntryPayload {
                    format_version: FORMAT_VERSION,
                    events: (0..count)
                        .map(|_| Event {
                            kind: Some(self.kind()),
                        })
                        .collect(),
                }
            })
            .collect()
    }

    /// A user id: mostly 1..=4, sometimes zero.
    fn user(&mut self) -> u64 {
        if self.rng.chance(5) {
            0
        } else {
            1 + self.rng.below(4)
        }
    }

    /// A device id: 0..=3.
    fn device(&mut self) -> u32 {
        self.small(4)
    }

    /// A value in `0..n` as `u32`.
    fn small(&mut self, n: u32) -> u32 {
        u32::try_from(self.rng.below(u64::from(n))).unwrap_or(0)
    }

    /// A shard id: mostly this one or a neighbour, sometimes one past `u16`.
    fn shard(&mut self) -> u32 {
        match self.rng.below(10) {
            0 => 70_000,
            1..=4 => u32::from(self.shard.get()),
            _ => self.small(3),
        }
    }

    /// A message id: mostly 16 bytes from five values, sometimes another length.
    fn message_id(&mut self) -> Vec<u8> {
        let byte = u8::try_from(self.rng.below(5)).unwrap_or(0);
        if self.rng.chance(5) {
            let len = usize::try_from(self.rng.below(20)).unwrap_or(0);
            vec![byte; len]
        } else {
            vec![byte; 16]
        }
    }

    /// A sequence or position: 0..=6.
    fn seq(&mut self) -> u64 {
        self.rng.below(7)
    }

    fn conversation(&mut self) -> Option<Conversation> {
        match self.rng.below(6) {
            0 => None,
            1 => Some(Conversation { with: None }),
            2 => Some(Conversation {
                with: Some(With::Group(self.rng.below(3))),
            }),
            _ => Some(Conversation {
                with: Some(With::User(self.user())),
            }),
        }
    }

    fn content(&mut self) -> Option<events::Content> {
        self.rng.chance(80).then(|| events::Content {
            body: vec![b'x'; usize::try_from(self.rng.below(8)).unwrap_or(0)],
            media: None,
        })
    }

    /// Forgets 0..=2 sends, known or not, under any sent time.
    fn sends_forgotten(&mut self) -> Kind {
        Kind::SendsForgotten(events::SendsForgotten {
            sends: (0..self.rng.below(3))
                .map(|_| events::ForgottenSend {
                    sender_user: self.user(),
                    sender_device: self.device(),
                    client_msg_id: format!("c{}", self.rng.below(6)),
                    sent_at_ms: self.rng.below(100),
                })
                .collect(),
            at_ms: self.rng.below(100),
        })
    }

    /// Forgets 0..=2 inbox stubs, stored or not, under any id and stored time.
    fn inbox_forgotten(&mut self) -> Kind {
        Kind::InboxForgotten(events::InboxForgotten {
            messages: (0..self.rng.below(3))
                .map(|_| events::ForgottenMessage {
                    user: self.user(),
                    seq: self.seq(),
                    message_id: self.message_id(),
                    stored_at_ms: self.rng.below(100),
                })
                .collect(),
            at_ms: self.rng.below(100),
        })
    }

    /// Forgets 0..=2 receipts, recorded or not, under any set time.
    fn receipts_forgotten(&mut self) -> Kind {
        Kind::ReceiptsForgotten(events::ReceiptsForgotten {
            receipts: (0..self.rng.below(3))
                .map(|_| events::ForgottenReceipt {
                    sender_user: self.user(),
                    message_id: self.message_id(),
                    recipient_user: self.user(),
                    set_at_ms: self.rng.below(100),
                })
                .collect(),
            at_ms: self.rng.below(100),
        })
    }

    /// One of the retention forgets (sends, inbox stubs, receipts, group message copies).
    fn forgotten(&mut self) -> Kind {
        match self.rng.below(4) {
            0 => self.sends_forgotten(),
            1 => self.inbox_forgotten(),
            2 => self.receipts_forgotten(),
            _ => Kind::GroupMessagesForgotten(events::GroupMessagesForgotten {
                up_to_index: self.rng.below(200),
                before_ms: self.rng.below(100),
            }),
        }
    }

    fn kind(&mut self) -> Kind {
        match self.rng.below(14) {
            0 => Kind::MessageSent(events::MessageSent {
                message_id: self.message_id(),
                sender_user: self.user(),
                sender_device: self.device(),
                client_msg_id: format!("c{}", self.rng.below(6)),
                to: self.conversation(),
                content: self.content(),
                sent_at_ms: self.rng.below(100),
                recipient_shard: self.shard(),
                group_epoch: self.rng.below(4),
                trace_parent: String::new(),
                own_copies: self.rng.chance(50),
            }),
            1 => Kind::MessageDelivered(events::MessageDelivered {
                message_id: self.message_id(),
                recipient_user: self.user(),
                sender_user: self.user(),
                sender_device: self.device(),
                conversation: self.conversation(),
                content: self.content(),
                sent_at_ms: self.rng.below(100),
                stored_at_ms: self.rng.below(100),
                source_shard: self.shard(),
                source_pos: self.seq(),
                group_index: self.rng.below(3),
                trace_parent: String::new(),
                // A re-queued copy's fields (a change of number), 4 a state no build knows.
                origin_shard: self.rng.chance(20).then(|| self.shard()),
                addressed_to: if self.rng.chance(20) { self.user() } else { 0 },
                receipts_sent: i32::try_from(self.rng.below(5)).unwrap_or(0),
            }),
            2 => Kind::DeliveryAcked(events::DeliveryAcked {
                user: self.user(),
                device: self.device(),
                up_to_seq: self.seq(),
                acked_at_ms: self.rng.below(100),
                trim_delivered: self.rng.chance(50),
                keep_recent: self.rng.below(4) as u32,
                trim_max: self.rng.below(3) as u32,
            }),
            3 => Kind::ReadUpTo(events::ReadUpTo {
                user: self.user(),
                conversation: self.conversation(),
                up_to_seq: self.seq(),
                read_at_ms: self.rng.below(100),
            }),
            4 => Kind::ReceiptRecorded(events::ReceiptRecorded {
                message_id: self.message_id(),
                sender_user: self.user(),
                recipient_user: self.user(),
                // 4 and 5 are states no build knows.
                state: i32::try_from(self.rng.below(6)).unwrap_or(0),
                at_ms: self.rng.below(100),
                source_shard: self.shard(),
                source_pos: self.seq(),
            }),
            5 => Kind::OutboxTrimmed(events::OutboxTrimmed {
                dest_shard: self.shard(),
                up_to: self.seq(),
            }),
            pick @ 6..=8 => self.registration(pick),
            9 => Kind::GroupCreated(events::GroupCreated {
                group: self.rng.below(3),
                creator: self.user(),
                name: "g".to_owned(),
                at_ms: self.rng.below(100),
                creator_shard: self.shard(),
            }),
            10 => Kind::MemberAdded(events::MemberAdded {
                group: self.rng.below(3),
                user: self.user(),
                by: self.user(),
                admin: self.rng.chance(30),
                at_ms: self.rng.below(100),
                user_shard: self.shard(),
                replaces: if self.rng.chance(30) { self.user() } else { 0 },
            }),
            11 => Kind::MemberRemoved(events::MemberRemoved {
                group: self.rng.below(3),
                user: self.user(),
                by: self.user(),
                at_ms: self.rng.below(100),
            }),
            12 => self.forgotten(),
            _ => Kind::MessageExpired(events::MessageExpired {
                user: self.user(),
                seq: self.seq(),
                message_id: self.message_id(),
                at_ms: self.rng.below(100),
            }),
        }
    }

    /// A registration event (a user, a device, a revocation), sometimes depending on a code no
    /// entry of the adversary used (refused: `NotRedeemed`).
    fn registration(&mut self, pick: u64) -> Kind {
        let redeemed_phone_hash = if self.rng.chance(30) {
            vec![u8::try_from(self.rng.below(3)).unwrap_or(0); 16]
        } else {
            Vec::new()
        };
        match pick {
            6 => Kind::UserRegistered(events::UserRegistered {
                user: self.user(),
                phone_hash: vec![u8::try_from(self.rng.below(3)).unwrap_or(0); 8],
                at_ms: self.rng.below(100),
                redeemed_phone_hash,
            }),
            7 => Kind::DeviceRegistered(events::DeviceRegistered {
                user: self.user(),
                device: self.device(),
                token_hash: vec![7; 32],
                primary: self.rng.chance(50),
                at_ms: self.rng.below(100),
                redeemed_phone_hash,
                companions_max: u32::try_from(self.rng.below(3)).unwrap_or(0),
                // The primaries' token (accepted), another one (refused), or none.
                approver_token_hash: match self.rng.below(3) {
                    0 => vec![7; 32],
                    1 => vec![8; 32],
                    _ => Vec::new(),
                },
                revokes_companions: self.rng.chance(50),
            }),
            _ if self.rng.chance(20) => Kind::AccountDeleted(events::AccountDeleted {
                user: self.user(),
                at_ms: self.rng.below(100),
                device: self.device(),
                token_hash: vec![7; 32],
                moved_to: if self.rng.chance(50) { self.user() } else { 0 },
                moved_to_shard: self.shard(),
            }),
            _ => Kind::DeviceRevoked(events::DeviceRevoked {
                user: self.user(),
                device: self.device(),
                at_ms: self.rng.below(100),
                redeemed_phone_hash,
            }),
        }
    }
}
