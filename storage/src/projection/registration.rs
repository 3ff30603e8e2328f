//! Registration records (part of the devices projection): per phone-number hash, the live code
//! (its hash, expiry and attempts left) and two token buckets, for code requests and for
//! attempts, so that codes and the per-number limits hold on every node and survive restarts.
//!
//! Every decision is taken here, at apply, from the record and the event (whose `at_ms` is the
//! proposing node's clock, and whose limits are its configuration), so every replica decides
//! the same. A record's time never moves backwards (`seen_at_ms`): an event from a node whose
//! clock is behind counts as happening at the latest time the record saw, so clock skew between
//! nodes can neither refill a bucket twice nor stretch a code's life. A record leaves once nothing in it matters any more (no live code, both buckets
//! full): its time-index key says when, and a `RegistrationsForgotten` removes it after that.
//!
//! Invariants (asserted by the tests): a code is consumed at most once; a code takes at most
//! `attempts` wrong tries; no event is admitted without a token from its bucket.

use courier_proto::LogIndex;
use courier_proto::pb::events::RateLimit;
use courier_proto::pb::store::{RegistrationRecord, TokenBucket};

use super::decode::CodeEvent;
use super::{Projection, View};
use crate::error::Result;
use crate::keys;

/// Units of a bucket per token: a bucket of `per_hour` tokens an hour gains `per_hour` units a
/// millisecond, so refills are exact integers.
pub const UNITS_PER_TOKEN: u64 = 3_600_000;

/// Records removed by one `RegistrationsForgotten` at most.
pub const FORGET_PER_EVENT_MAX: usize = 1_024;

/// What a registration-code event did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CodeOutcome {
    /// `CodeIssued`: the code is the number's code now.
    Issued,
    /// `CodeAttempted` with the right, live code: it is consumed.
    Accepted,
    /// `CodeAttempted` with a wrong code: `attempts_left` remain (0: the code is void).
    Wrong {
        /// Wrong tries left before the code is void.
        attempts_left: u32,
    },
    /// `CodeAttempted` when the number has no live code (never asked, expired, used, voided).
    NoCode,
    /// The number's bucket was empty: nothing changed; a token comes back after this wait.
    RateLimited {
        /// Milliseconds until the next token.
        retry_after_ms: u64,
    },
    /// `CodeWithdrawn`: the code is void (`false`: it was no longer the number's code).
    Withdrawn(bool),
    /// `RegistrationsForgotten`: how many records left.
    Forgotten(usize),
}

/// A bucket's units at `now` (an absent bucket is full).
fn refilled(bucket: Option<&TokenBucket>, limit: &RateLimit, now: u64) -> u64 {
    let cap = u64::from(limit.burst) * UNITS_PER_TOKEN;
    bucket.map_or(cap, |b| {
        let gained = now
            .saturating_sub(b.at_ms)
            .saturating_mul(u64::from(limit.per_hour));
        b.units.saturating_add(gained).min(cap)
    })
}

/// Takes a token: the bucket after it, or the wait until one is there.
fn take(
    bucket: Option<&TokenBucket>,
    limit: &RateLimit,
    now: u64,
) -> std::result::Result<TokenBucket, u64> {
    let units = refilled(bucket, limit, now);
    let Some(left) = units.checked_sub(UNITS_PER_TOKEN) else {
        let per_ms = u64::from(limit.per_hour).max(1);
        return Err(UNITS_PER_TOKEN.saturating_sub(units).div_ceil(per_ms));
    };
    Ok(TokenBucket {
        units: left,
        at_ms: now,
        per_hour: limit.per_hour,
        burst: limit.burst,
    })
}

/// When a bucket is full again (0 for an absent one).
fn full_at(bucket: Option<&TokenBucket>) -> u64 {
    bucket.map_or(0, |b| {
        let cap = u64::from(b.burst) * UNITS_PER_TOKEN;
        let per_ms = u64::from(b.per_hour).max(1);
        b.at_ms
            .saturating_add(cap.saturating_sub(b.units).div_ceil(per_ms))
    })
}

/// When nothing in `record` matters any more: its live code expired and both buckets refilled.
fn forget_at(record: &RegistrationRecord) -> u64 {
    let code = if record.code_hash.is_empty() {
        0
    } else {
        record.code_expires_at_ms
    };
    code.max(full_at(record.requests.as_ref()))
        .max(full_at(record.attempts.as_ref()))
}

fn void_code(record: &mut RegistrationRecord) {
    record.code_hash.clear();
    record.code_expires_at_ms = 0;
    record.attempts_left = 0;
}

/// Reads a number's registration record.
///
/// # Errors
/// A storage fault.
pub fn record(view: &View<'_, '_>, phone_hash: &[u8]) -> Result<Option<RegistrationRecord>> {
    view.get(
        Projection::Devices,
        &keys::registration(view.shard(), phone_hash),
    )
}

/// Decides what `event` does to the number's record `old`: the outcome and the record to store
/// (`None`: unchanged). Pure.
fn decide(
    old: Option<&RegistrationRecord>,
    event: CodeEvent<'_>,
    at: LogIndex,
) -> (CodeOutcome, Option<RegistrationRecord>) {
    let mut record = old.cloned().unwrap_or_default();
    // Time never moves backwards for a record: proposers' clocks may disagree.
    let now = |at_ms: u64| at_ms.max(record.seen_at_ms);
    let outcome = match event {
        CodeEvent::Issued(issued) => {
            let (limit, now) = (issued.limit.unwrap_or_default(), now(issued.at_ms));
            match take(record.requests.as_ref(), &limit, now) {
                Err(retry_after_ms) => return (CodeOutcome::RateLimited { retry_after_ms }, None),
                Ok(bucket) => record.requests = Some(bucket),
            }
            record.code_hash.clone_from(&issued.code_hash);
            record.code_expires_at_ms = issued.expires_at_ms;
            record.attempts_left = issued.attempts;
            record.seen_at_ms = now;
            CodeOutcome::Issued
        }
        CodeEvent::Attempted(attempted) => {
            let (limit, now) = (attempted.limit.unwrap_or_default(), now(attempted.at_ms));
            match take(record.attempts.as_ref(), &limit, now) {
                Err(retry_after_ms) => return (CodeOutcome::RateLimited { retry_after_ms }, None),
                Ok(bucket) => record.attempts = Some(bucket),
            }
            record.seen_at_ms = now;
            if record.code_hash.is_empty() || record.code_expires_at_ms <= now {
                void_code(&mut record);
                CodeOutcome::NoCode
            } else if record.code_hash == attempted.code_hash {
                void_code(&mut record);
                record.redeemed_at = at.get();
                CodeOutcome::Accepted
            } else {
                record.attempts_left = record.attempts_left.saturating_sub(1);
                let attempts_left = record.attempts_left;
                if attempts_left == 0 {
                    void_code(&mut record);
                }
                CodeOutcome::Wrong { attempts_left }
            }
        }
        CodeEvent::Withdrawn(withdrawn) => {
            if record.code_hash.is_empty() || record.code_hash != withdrawn.code_hash {
                return (CodeOutcome::Withdrawn(false), None);
            }
            void_code(&mut record);
            CodeOutcome::Withdrawn(true)
        }
        CodeEvent::Forgotten { .. } => unreachable!("forgetting names no single record"),
    };
    record.forget_at_ms = forget_at(&record);
    (outcome, Some(record))
}

fn phone_of(event: CodeEvent<'_>) -> Option<&[u8]> {
    match event {
        CodeEvent::Issued(e) => Some(&e.phone_hash),
        CodeEvent::Attempted(e) => Some(&e.phone_hash),
        CodeEvent::Withdrawn(e) => Some(&e.phone_hash),
        CodeEvent::Forgotten { .. } => None,
    }
}

/// What `event` will do, without doing it (for the proposer's answer; `admit`).
///
/// # Errors
/// A storage fault.
pub fn outcome(view: &View<'_, '_>, event: CodeEvent<'_>) -> Result<CodeOutcome> {
    match (event, phone_of(event)) {
        (CodeEvent::Forgotten { before_ms }, _) => {
            Ok(CodeOutcome::Forgotten(forgettable(view, before_ms)?.len()))
        }
        (_, Some(phone)) => Ok(decide(record(view, phone)?.as_ref(), event, view.at()).0),
        (_, None) => unreachable!("every other code event names a number"),
    }
}

/// Whether the entry at `view.at()` used the live code of `phone_hash` (a `CodeAttempted` that
/// was accepted earlier in the same entry): the registration events that name the number apply
/// only then.
///
/// # Errors
/// A storage fault.
pub fn redeemed_here(view: &View<'_, '_>, phone_hash: &[u8]) -> Result<bool> {
    Ok(record(view, phone_hash)?.is_some_and(|r| r.redeemed_at == view.at().get()))
}

/// The refusal of a registration event whose entry did not use the number's code.
pub const NOT_REDEEMED: &str = "COURIER:Registration:NotRedeemed";

/// The time-index keys of records with nothing left to remember before `before_ms`, oldest
/// first, at most [`FORGET_PER_EVENT_MAX`].
///
/// # Errors
/// A storage fault.
pub fn forgettable(view: &View<'_, '_>, before_ms: u64) -> Result<Vec<Vec<u8>>> {
    let from = keys::registration_by_time_start(view.shard());
    let to = keys::registration_by_time_end(view.shard(), before_ms);
    Ok(view
        .scan::<()>(Projection::Devices, &from, &to, FORGET_PER_EVENT_MAX)?
        .into_iter()
        .map(|(key, ())| key)
        .collect())
}

/// Removes a number's registration record and its time index entry, if it has one
/// (`AccountDeleted`: no hash of the number stays).
///
/// # Errors
/// A storage fault.
pub fn forget_number(view: &mut View<'_, '_>, phone: &[u8]) -> Result<()> {
    let shard = view.shard();
    if let Some(old) = record(view, phone)? {
        view.delete(keys::registration_by_time(shard, old.forget_at_ms, phone))?;
        view.delete(keys::registration(shard, phone))?;
    }
    Ok(())
}

/// Folds one registration-code event into the devices projection.
///
/// # Errors
/// A storage fault.
pub fn apply(view: &mut View<'_, '_>, event: CodeEvent<'_>) -> Result<()> {
    let shard = view.shard();
    if let CodeEvent::Forgotten { before_ms } = event {
        for index_key in forgettable(view, before_ms)? {
            let phone = keys::registration_by_time_phone(&index_key)
                .expect("time-index keys end with the phone hash")
                .to_vec();
            view.delete(index_key)?;
            view.delete(keys::registration(shard, &phone))?;
        }
        return Ok(());
    }
    let phone = phone_of(event).expect("every other code event names a number");
    let old = record(view, phone)?;
    let (_, new) = decide(old.as_ref(), event, view.at());
    let Some(new) = new else {
        return Ok(());
    };
    if let Some(old) = &old
        && old.forget_at_ms != new.forget_at_ms
    {
        view.delete(keys::registration_by_time(shard, old.forget_at_ms, phone))?;
    }
    if old
        .as_ref()
        .is_none_or(|old| old.forget_at_ms != new.forget_at_ms)
    {
        view.put_new(
            keys::registration_by_time(shard, new.forget_at_ms, phone),
            &(),
        );
    }
    view.put(keys::registration(shard, phone), &new)
}
