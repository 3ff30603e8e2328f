//! Generators of valid random event histories, for property tests, conformance suites, crash
//! tests and benchmarks. Deterministic per seed. Not part of the production surface: built for
//! tests and behind the `testkit` feature.
//!
//! The generator keeps a small model of what it generated (users, inbox tails, reads, group
//! membership) and, for derived values it cannot cheaply model (outbox positions), reads an
//! oracle store that it applies every event to.

#![allow(clippy::arithmetic_side_effects, clippy::as_conversions)]

use std::collections::BTreeMap;

use courier_proto::pb::events::event::Kind;
use courier_proto::pb::events::{self, EntryPayload, Event, ReceiptState};
use courier_proto::{ConversationId, FORMAT_VERSION, LogIndex, ShardId, UserId};

use crate::kv::{MemKv, Staged};
use crate::projection::{Projection, View, outbox};
use crate::shard::{Committed, ShardState};

mod adversary;
mod replay;
mod rng;

pub use self::adversary::Adversary;
pub use self::replay::{append_and_apply, apply, opaque_records, records};
pub use self::rng::Rng;

/// Shards the generated histories talk to (the generated shard is one of them).
pub const GEN_SHARDS: u16 = 3;

#[derive(Clone, Debug, Default)]
struct UserModel {
    tail: u64,
    delivered: u64,
    /// seq → (conversation peer, expired)
    messages: BTreeMap<u64, (u64, bool, Vec<u8>)>,
    /// The account was deleted and not registered again: deliveries store nothing.
    closed: bool,
}

/// Generates valid event histories for one shard.
#[derive(Debug)]
pub struct EventGen {
    rng: Rng,
    shard: ShardId,
    oracle: MemKv,
    oracle_state: ShardState,
    users: BTreeMap<u64, UserModel>,
    next_message: u64,
    now_ms: u64,
    inbound: BTreeMap<u32, u64>,
    sent: Vec<(Vec<u8>, u64, u64, ReceiptState)>,
    registered: BTreeMap<u64, u32>,
    next_user: u64,
    groups: BTreeMap<u64, Vec<u64>>,
    client_ids: u64,
    /// First sends of a client id not forgotten yet, oldest first: (sender, client id, sent at).
    first_sends: std::collections::VecDeque<(u64, u64, u64)>,
    /// Body size of generated messages, in bytes.
    pub body_bytes: usize,
}

impl EventGen {
    /// A generator for `shard`, seeded.
    pub fn new(shard: ShardId, seed: u64) -> Self {
        Self {
            rng: Rng::new(seed),
            shard,
            oracle: MemKv::default(),
            oracle_state: ShardState::empty(shard),
            users: (1..=4).map(|user| (user, UserModel::default())).collect(),
            next_message: 1,
            now_ms: 1_700_000_000_000,
            inbound: BTreeMap::new(),
            sent: Vec::new(),
            registered: BTreeMap::new(),
            next_user: 100,
            groups: BTreeMap::new(),
            first_sends: std::collections::VecDeque::new(),
            client_ids: 0,
            body_bytes: 16,
        }
    }

    fn message_id(&mut self) -> Vec<u8> {
        let mut id = [0_u8; 16];
        id[..8].copy_from_slice(&self.next_message.to_be_bytes());
        id[15] = 1;
        self.next_message += 1;
        id.to_vec()
    }

    fn pick_user(&mut self) -> u64 {
        let n = self.users.len() as u64;
        *self
            .users
            .keys()
            .nth(self.rng.below(n) as usize)
            .expect("users exist")
    }

    fn body(&mut self) -> Option<events::Content> {
        Some(events::Content {
            body: vec![b'm'; self.body_bytes],
            media: None,
        })
    }

    /// Returns the next valid event (and applies it to the oracle).
    pub fn next_event(&mut self) -> Event {
        self.now_ms += 1 + self.rng.below(1000);
        let kind = loop {
            if let Some(kind) = self.try_kind() {
                break kind;
            }
        };
        let event = Event { kind: Some(kind) };
        self.feed_oracle(&event);
        if let Some(Kind::MessageSent(sent)) = &event.kind {
            self.model_own_copy(sent);
        }
        event
    }

    /// A send of a user with more than one active device stored the sender's own copy in their
    /// inbox (unless it was a retry): the model learns its sequence from the oracle.
    fn model_own_copy(&mut self, sent: &events::MessageSent) {
        if !self.users.contains_key(&sent.sender_user) {
            return;
        }
        let sender = UserId::new(sent.sender_user).expect("senders are users");
        let tail = self
            .read_oracle(Projection::Inbox, |view| {
                crate::projection::inbox::tail(view, sender)
            })
            .get();
        let model = self.users.get_mut(&sent.sender_user).expect("checked");
        if tail > model.tail {
            let recipient = match sent.to.as_ref().and_then(|to| to.with) {
                Some(events::conversation::With::User(recipient)) => recipient,
                _ => unreachable!("the generator sends 1:1 messages"),
            };
            assert_eq!(tail, model.tail + 1, "a send stores one own copy");
            model.tail = tail;
            model
                .messages
                .insert(tail, (recipient, false, sent.message_id.clone()));
        }
    }

    /// Returns `n` entries of 1..=`events_max` events each, as payloads.
    pub fn payloads(&mut self, n: usize, events_max: u64) -> Vec<EntryPayload> {
        (0..n)
            .map(|_| {
                let count = 1 + self.rng.below(events_max);
                EntryPayload {
                    format_version: FORMAT_VERSION,
                    events: (0..count).map(|_| self.next_event()).collect(),
                }
            })
            .collect()
    }

    fn feed_oracle(&mut self, event: &Event) {
        let at = self.oracle_state.applied.next();
        let payload = EntryPayload {
            format_version: FORMAT_VERSION,
            events: vec![event.clone()],
        };
        let batch = self
            .oracle_state
            .apply_batch(
                &self.oracle,
                &[Committed {
                    index: at,
                    payload: Some(&payload),
                }],
                Vec::new(),
            )
            .expect("memory never faults");
        self.oracle.write(batch.changes);
        self.oracle_state = batch.next;
    }

    fn try_kind(&mut self) -> Option<Kind> {
        match self.rng.below(100) {
            0..=19 => Some(self.message_sent()),
            20..=44 => Some(self.message_delivered()),
            45..=56 => self.delivery_acked(),
            57..=66 => self.read_up_to(),
            67..=70 => self.message_expired(),
            71..=72 => self.sends_forgotten(),
            73 => self.inbox_forgotten(),
            74 if self.rng.chance(50) => self.receipts_forgotten(),
            74 => Some(self.group_messages_forgotten()),
            75..=80 => self.receipt_recorded(),
            81..=86 => self.outbox_trimmed(),
            87..=92 => Some(self.registration()),
            93 => Some(self.code_event()),
            94 => Some(self.keys_event()),
            _ => self.group_change(),
        }
    }

    fn message_sent(&mut self) -> Kind {
        let sender = self.pick_user();
        let recipient_shard = self.rng.below(u64::from(GEN_SHARDS)) as u32;
        // A send within the shard stores the message in the recipient's inbox in the same entry;
        // those recipients (5..=8) are outside the modelled users (1..=4), whose inboxes the
        // generator tracks message by message.
        let recipient = if recipient_shard == u32::from(self.shard.get()) {
            5 + self.rng.below(4)
        } else {
            1 + self.rng.below(8)
        };
        // Now and then retry an earlier client id: the fold must treat it as a duplicate.
        let client = if self.client_ids > 0 && self.rng.chance(10) {
            self.rng.below(self.client_ids)
        } else {
            self.client_ids += 1;
            self.first_sends
                .push_back((sender, self.client_ids - 1, self.now_ms));
            self.client_ids - 1
        };
        let message_id = self.message_id();
        if recipient_shard != u32::from(self.shard.get()) {
            self.sent
                .push((message_id.clone(), sender, recipient, ReceiptState::Sent));
        }
        Kind::MessageSent(events::MessageSent {
            message_id,
            sender_user: sender,
            sender_device: 1,
            client_msg_id: format!("c-{client}"),
            to: Some(ConversationId::Direct(UserId::new(recipient).expect("nonzero")).into()),
            content: self.body(),
            sent_at_ms: self.now_ms,
            recipient_shard,
            group_epoch: 0,
            trace_parent: String::new(),
            own_copies: self.rng.chance(80),
        })
    }

    fn message_delivered(&mut self) -> Kind {
        let user = self.pick_user();
        let peer = 1 + self.rng.below(8);
        let own = u32::from(self.shard.get());
        let source_shard = self.rng.below(u64::from(GEN_SHARDS)) as u32;
        let forwarded = source_shard != own;
        let mut source_pos = 0;
        if forwarded {
            let applied = self.inbound.get(&source_shard).copied().unwrap_or(0);
            if applied > 0 && self.rng.chance(10) {
                // A retried forward: a duplicate, applied as a no-op. Reuse any content.
                source_pos = 1 + self.rng.below(applied);
                return Kind::MessageDelivered(events::MessageDelivered {
                    message_id: self.message_id(),
                    recipient_user: user,
                    sender_user: peer,
                    sender_device: 1,
                    conversation: Some(
                        ConversationId::Direct(UserId::new(peer).expect("nonzero")).into(),
                    ),
                    content: self.body(),
                    sent_at_ms: self.now_ms,
                    stored_at_ms: self.now_ms,
                    source_shard,
                    source_pos,
                    group_index: 0,
                    trace_parent: String::new(),
                    origin_shard: None,
                    addressed_to: 0,
                    receipts_sent: 0,
                });
            }
            source_pos = applied + 1;
            self.inbound.insert(source_shard, source_pos);
        }
        let message_id = self.message_id();
        let model = self.users.get_mut(&user).expect("picked");
        if !model.closed {
            model.tail += 1;
            model
                .messages
                .insert(model.tail, (peer, false, message_id.clone()));
        }
        Kind::MessageDelivered(events::MessageDelivered {
            message_id,
            recipient_user: user,
            sender_user: peer,
            sender_device: 1,
            conversation: Some(ConversationId::Direct(UserId::new(peer).expect("nonzero")).into()),
            content: self.body(),
            sent_at_ms: self.now_ms.saturating_sub(5),
            stored_at_ms: self.now_ms,
            source_shard: if forwarded { source_shard } else { own },
            source_pos,
            group_index: 0,
            trace_parent: String::new(),
            origin_shard: None,
            addressed_to: 0,
            receipts_sent: 0,
        })
    }

    fn delivery_acked(&mut self) -> Option<Kind> {
        let user = self.pick_user();
        let tail = self.users[&user].tail;
        if tail == 0 {
            return None;
        }
        let up_to = 1 + self.rng.below(tail);
        let model = self.users.get_mut(&user).expect("picked");
        model.delivered = model.delivered.max(up_to);
        // Any of the user's devices (at least two ids), so that every one of them acks now and
        // then and trims happen.
        let devices = self.registered.get(&user).copied().unwrap_or(0).max(2);
        Some(Kind::DeliveryAcked(events::DeliveryAcked {
            user,
            device: 1 + self.rng.below(u64::from(devices)) as u32,
            up_to_seq: up_to,
            acked_at_ms: self.now_ms,
            trim_delivered: self.rng.chance(50),
            keep_recent: if self.rng.chance(50) {
                0
            } else {
                self.rng.below(4) as u32
            },
            // Bounded trims (1 or 2 bodies an entry) and unbounded ones (0), without another
            // draw: the generated histories stay what they were otherwise.
            trim_max: (up_to % 3) as u32,
        }))
    }

    fn read_up_to(&mut self) -> Option<Kind> {
        let user = self.pick_user();
        let model = &self.users[&user];
        if model.messages.is_empty() {
            return None;
        }
        let n = model.messages.len() as u64;
        let (&seq, &(peer, _, _)) = model.messages.iter().nth(self.rng.below(n) as usize)?;
        Some(Kind::ReadUpTo(events::ReadUpTo {
            user,
            conversation: Some(ConversationId::Direct(UserId::new(peer).expect("nonzero")).into()),
            up_to_seq: seq,
            read_at_ms: self.now_ms,
        }))
    }

    fn message_expired(&mut self) -> Option<Kind> {
        let user = self.pick_user();
        let model = self.users.get_mut(&user).expect("picked");
        let delivered = model.delivered;
        let (&seq, entry) = model
            .messages
            .iter_mut()
            .find(|(seq, (_, expired, _))| **seq > delivered && !expired)?;
        entry.1 = true;
        Some(Kind::MessageExpired(events::MessageExpired {
            user,
            seq,
            message_id: entry.2.clone(),
            at_ms: self.now_ms,
        }))
    }

    /// Forgets the oldest 1..=3 first sends (a retry of their client ids is then a new send).
    fn sends_forgotten(&mut self) -> Option<Kind> {
        if self.first_sends.is_empty() {
            return None;
        }
        let count = usize::try_from(1 + self.rng.below(3)).unwrap_or(1);
        let sends = (0..count)
            .map_while(|_| self.first_sends.pop_front())
            .map(|(sender, client, sent_at_ms)| events::ForgottenSend {
                sender_user: sender,
                sender_device: 1,
                client_msg_id: format!("c-{client}"),
                sent_at_ms,
            })
            .collect();
        Some(Kind::SendsForgotten(events::SendsForgotten {
            sends,
            at_ms: self.now_ms,
        }))
    }

    /// Reads the oracle's `projection` at what the generator has generated so far.
    fn read_oracle<T>(
        &self,
        projection: Projection,
        read: impl FnOnce(&View<'_, '_>) -> crate::Result<T>,
    ) -> T {
        let mut staged = Staged::new(&self.oracle, BTreeMap::new());
        let view = View::new(
            &mut staged,
            self.shard,
            self.oracle_state.applied,
            projection,
        );
        read(&view).expect("memory never faults")
    }

    /// Forgets the oldest 1..=3 trimmed inbox stubs, read from the oracle's stub index (reads
    /// of their sequences stay valid: no-ops once read).
    fn inbox_forgotten(&mut self) -> Option<Kind> {
        let count = usize::try_from(1 + self.rng.below(3)).unwrap_or(1);
        let messages = self.read_oracle(Projection::Inbox, |view| {
            crate::projection::inbox::stubs_before(view, u64::MAX, count)
        });
        (!messages.is_empty()).then_some(Kind::InboxForgotten(events::InboxForgotten {
            messages,
            at_ms: self.now_ms,
        }))
    }

    /// Forgets the oldest 1..=3 receipts, read from the oracle's receipt time index (the
    /// generator's later receipts for them still move forward from where they were).
    fn receipts_forgotten(&mut self) -> Option<Kind> {
        let count = usize::try_from(1 + self.rng.below(3)).unwrap_or(1);
        let receipts = self.read_oracle(Projection::Receipts, |view| {
            crate::projection::receipts::set_before(view, u64::MAX, count)
        });
        (!receipts.is_empty()).then_some(Kind::ReceiptsForgotten(events::ReceiptsForgotten {
            receipts,
            at_ms: self.now_ms,
        }))
    }

    /// Forgets the stored group message copies sent before now, up to the oracle's newest such
    /// copy (or, with none, up to the last applied index: a no-op the fold must take too).
    fn group_messages_forgotten(&mut self) -> Kind {
        let before_ms = self.now_ms;
        let last = self.read_oracle(Projection::Groups, |view| {
            crate::projection::groups::messages_sent_before(view, before_ms, 3)
        });
        Kind::GroupMessagesForgotten(events::GroupMessagesForgotten {
            up_to_index: last.unwrap_or(self.oracle_state.applied).get(),
            before_ms,
        })
    }

    fn receipt_recorded(&mut self) -> Option<Kind> {
        if self.sent.is_empty() {
            return None;
        }
        let i = self.rng.below(self.sent.len() as u64) as usize;
        let (message_id, sender, recipient, state) = self.sent[i].clone();
        let next = match state {
            ReceiptState::Sent | ReceiptState::Unspecified => ReceiptState::Delivered,
            ReceiptState::Delivered => ReceiptState::Read,
            ReceiptState::Read => return None,
        };
        self.sent[i].3 = next;
        let source_shard = (u32::from(self.shard.get()) + 1) % u32::from(GEN_SHARDS);
        let pos = self.inbound.get(&source_shard).copied().unwrap_or(0) + 1;
        self.inbound.insert(source_shard, pos);
        Some(Kind::ReceiptRecorded(events::ReceiptRecorded {
            message_id,
            sender_user: sender,
            recipient_user: recipient,
            state: next.into(),
            at_ms: self.now_ms,
            source_shard,
            source_pos: pos,
        }))
    }

    fn outbox_trimmed(&mut self) -> Option<Kind> {
        let dest = ShardId::new(self.rng.below(u64::from(GEN_SHARDS)) as u16);
        let mut staged = Staged::new(&self.oracle, BTreeMap::new());
        let view = View::new(&mut staged, self.shard, LogIndex::ZERO, Projection::Outbox);
        let state = outbox::state(&view, dest).expect("memory never faults");
        if state.last_pos == 0 {
            return None;
        }
        // Mostly forward trims; sometimes a retried (stale) one.
        let up_to = if state.last_pos > state.trimmed_up_to && !self.rng.chance(15) {
            state.trimmed_up_to + 1 + self.rng.below(state.last_pos - state.trimmed_up_to)
        } else {
            self.rng.below(state.trimmed_up_to + 1)
        };
        Some(Kind::OutboxTrimmed(events::OutboxTrimmed {
            dest_shard: u32::from(dest.get()),
            up_to,
        }))
    }

    /// A registration-code event for one of three numbers: issues, right and wrong attempts (the
    /// buckets and attempts decide at apply, so any order is valid), withdrawals, forgetting.
    fn code_event(&mut self) -> Kind {
        let phone = self.rng.below(3) as u8;
        let phone_hash = vec![phone; 16];
        let code = |c: u64| vec![c as u8; 32];
        let limit = Some(events::RateLimit {
            per_hour: 10,
            burst: 3,
        });
        match self.rng.below(10) {
            0..=2 => Kind::CodeIssued(events::CodeIssued {
                phone_hash,
                code_hash: code(self.rng.below(4)),
                expires_at_ms: self.now_ms + 600_000,
                attempts: 5,
                limit,
                at_ms: self.now_ms,
            }),
            3..=7 => Kind::CodeAttempted(events::CodeAttempted {
                phone_hash,
                code_hash: code(self.rng.below(4)),
                limit,
                at_ms: self.now_ms,
            }),
            8 => Kind::CodeWithdrawn(events::CodeWithdrawn {
                phone_hash,
                code_hash: code(self.rng.below(4)),
                at_ms: self.now_ms,
            }),
            _ => Kind::RegistrationsForgotten(events::RegistrationsForgotten {
                before_ms: self.now_ms,
            }),
        }
    }

    /// A key upload for a registered device (refused at apply when it was revoked or the stock
    /// would overflow) or a bundle fetch of a registered user.
    fn keys_event(&mut self) -> Kind {
        let known: Vec<(u64, u32)> = self
            .registered
            .iter()
            .filter(|(_, devices)| **devices > 0)
            .map(|(user, devices)| (*user, *devices))
            .collect();
        let Some(&(user, devices)) = known.get(self.rng.below(known.len().max(1) as u64) as usize)
        else {
            return Kind::PrekeysClaimed(events::PreKeysClaimed {
                user: 1,
                by_user: 2,
                at_ms: self.now_ms,
            });
        };
        if self.rng.chance(40) {
            let device = 1 + self.rng.below(u64::from(devices)) as u32;
            let first = self.rng.below(20) as u32;
            let key = |id: u32, signature: Vec<u8>| events::PreKey {
                key_id: id,
                public_key: vec![id as u8; 33],
                signature,
            };
            return Kind::KeysUploaded(events::KeysUploaded {
                user,
                device,
                identity_key: vec![device as u8; 33],
                signed_prekey: Some(key(first, vec![7; 64])),
                one_time_prekeys: (first..first + 1 + self.rng.below(5) as u32)
                    .map(|id| key(id, Vec::new()))
                    .collect(),
                at_ms: self.now_ms,
            });
        }
        Kind::PrekeysClaimed(events::PreKeysClaimed {
            user,
            by_user: 1,
            at_ms: self.now_ms,
        })
    }

    fn registration(&mut self) -> Kind {
        let known: Vec<u64> = self.registered.keys().copied().collect();
        if !known.is_empty() && self.rng.chance(60) {
            let user = known[self.rng.below(known.len() as u64) as usize];
            let devices = self.registered[&user];
            let primary = self.read_oracle(Projection::Devices, |view| {
                let user = UserId::new(user).expect("registered users are non-zero");
                Ok(crate::projection::devices::devices_of(view, user)?
                    .into_iter()
                    .find(|(_, device)| device.primary && !device.revoked))
            });
            if let Some((device, record)) = primary.filter(|_| self.rng.chance(8)) {
                // The account leaves, asked by its active primary; a modelled user registers
                // again later (below).
                self.registered.remove(&user);
                if let Some(model) = self.users.get_mut(&user) {
                    *model = UserModel {
                        closed: true,
                        ..UserModel::default()
                    };
                }
                // Half of them are changes of number: what the device had not acked, and
                // later deliveries, are re-queued to a user on another shard.
                let moves = self.rng.chance(50);
                return Kind::AccountDeleted(events::AccountDeleted {
                    user,
                    at_ms: self.now_ms,
                    device,
                    token_hash: record.token_hash,
                    moved_to: if moves { 100_000 + user } else { 0 },
                    moved_to_shard: if moves {
                        (u32::from(self.shard.get()) + 1) % u32::from(GEN_SHARDS)
                    } else {
                        0
                    },
                });
            }
            if devices > 0 && self.rng.chance(30) {
                return Kind::DeviceRevoked(events::DeviceRevoked {
                    user,
                    device: 1 + self.rng.below(u64::from(devices)) as u32,
                    at_ms: self.now_ms,
                    redeemed_phone_hash: Vec::new(),
                });
            }
            let device = devices + 1;
            self.registered.insert(user, device);
            return Kind::DeviceRegistered(events::DeviceRegistered {
                user,
                device,
                token_hash: vec![device as u8; 32],
                primary: device == 1,
                at_ms: self.now_ms,
                redeemed_phone_hash: Vec::new(),
                companions_max: 0,
                approver_token_hash: Vec::new(),
                revokes_companions: false,
            });
        }
        // The modelled users (who get messages) register first, so that their devices' acks
        // can trim their inboxes; then new users.
        let user = match self.users.keys().find(|u| !self.registered.contains_key(u)) {
            Some(&modelled) => modelled,
            None => {
                self.next_user += 1;
                self.next_user - 1
            }
        };
        self.registered.insert(user, 0);
        if let Some(model) = self.users.get_mut(&user) {
            model.closed = false;
        }
        let mut phone_hash = vec![0_u8; 16];
        phone_hash[..8].copy_from_slice(&user.to_be_bytes());
        Kind::UserRegistered(events::UserRegistered {
            user,
            phone_hash,
            at_ms: self.now_ms,
            redeemed_phone_hash: Vec::new(),
        })
    }

    fn group_change(&mut self) -> Option<Kind> {
        if self.groups.is_empty() || self.rng.chance(20) {
            let group = 1_000 + self.groups.len() as u64;
            let creator = self.pick_user();
            self.groups.insert(group, vec![creator]);
            return Some(Kind::GroupCreated(events::GroupCreated {
                group,
                creator,
                name: format!("g{group}"),
                at_ms: self.now_ms,
                creator_shard: u32::from(self.shard.get()),
            }));
        }
        let group = *self
            .groups
            .keys()
            .nth(self.rng.below(self.groups.len() as u64) as usize)?;
        let members = self.groups.get_mut(&group)?;
        let candidate = 1 + self.rng.below(8);
        if let Some(i) = members.iter().position(|m| *m == candidate) {
            members.remove(i);
            Some(Kind::MemberRemoved(events::MemberRemoved {
                group,
                user: candidate,
                by: candidate,
                at_ms: self.now_ms,
            }))
        } else {
            members.push(candidate);
            Some(Kind::MemberAdded(events::MemberAdded {
                group,
                user: candidate,
                by: members[0],
                admin: false,
                at_ms: self.now_ms,
                user_shard: u32::from(self.shard.get()),
                replaces: 0,
            }))
        }
    }
}
