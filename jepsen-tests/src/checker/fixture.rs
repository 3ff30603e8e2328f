//! Hand-made histories for the checker's tests. Each test plants exactly one bug (plus the
//! anomalies that bug necessarily causes) into one of these and asserts the kind and class the
//! checker names.

use super::{AnomalyKind, Report, check};
use crate::history::{
    Acked, Complete, Delivered, Fault, History, Invoke, Outcome, Receipt, ReceiptState, Record,
    Replica, Retention, SendOp, SessionStart, Verify,
};

const NODES: [u32; 3] = [1, 2, 3];
const DEVICES: [u32; 2] = [1, 2];
const SHARDS: [u32; 2] = [0, 1];

/// One inbox entry as a session receives it.
#[derive(Clone)]
pub(crate) struct Msg {
    seq: u64,
    message_id: String,
    from_user: u64,
    client_id: String,
}

pub(crate) fn msg(seq: u64, message_id: &str, from_user: u64, client_id: &str) -> Msg {
    Msg {
        seq,
        message_id: message_id.to_owned(),
        from_user,
        client_id: client_id.to_owned(),
    }
}

/// Builds histories record by record; every record gets a later time than the previous.
#[derive(Default)]
pub(crate) struct Builder {
    records: Vec<Record>,
    time_ms: u64,
    next_op: u64,
    next_session: u64,
}

impl Builder {
    fn tick(&mut self) -> u64 {
        self.time_ms += 10;
        self.time_ms
    }

    pub(crate) fn invoke(&mut self, from_user: u64, to_user: u64, client_id: &str) -> u64 {
        self.next_op += 1;
        let (op_id, time_ms) = (self.next_op, self.tick());
        let op = SendOp {
            from_user,
            to_user,
            client_id: client_id.to_owned(),
        };
        self.records.push(Record::Invoke(Invoke {
            process: 0,
            op_id,
            time_ms,
            op,
        }));
        op_id
    }

    pub(crate) fn complete(&mut self, op_id: u64, outcome: Outcome) {
        let time_ms = self.tick();
        self.records.push(Record::Complete(Complete {
            process: 0,
            op_id,
            time_ms,
            outcome,
        }));
    }

    pub(crate) fn ok(&mut self, op_id: u64, message_id: &str) {
        let message_id = message_id.to_owned();
        self.complete(op_id, Outcome::Ok { message_id });
    }

    pub(crate) fn fail(&mut self, op_id: u64) {
        let error = "rejected".to_owned();
        self.complete(op_id, Outcome::Fail { error });
    }

    pub(crate) fn info(&mut self, op_id: u64) {
        let error = "timeout".to_owned();
        self.complete(op_id, Outcome::Info { error });
    }

    pub(crate) fn send_ok(
        &mut self,
        from_user: u64,
        to_user: u64,
        client_id: &str,
        message_id: &str,
    ) {
        let op_id = self.invoke(from_user, to_user, client_id);
        self.ok(op_id, message_id);
    }

    /// Starts a session and delivers `msgs` in order; returns the session id.
    pub(crate) fn stream(
        &mut self,
        at: (u64, u32, u32),
        resume: u64,
        drain: bool,
        msgs: &[Msg],
    ) -> u64 {
        let (user, device, node) = at;
        self.next_session += 1;
        let (session, time_ms) = (self.next_session, self.tick());
        self.records.push(Record::SessionStart(SessionStart {
            session,
            user,
            device,
            node,
            resume_after_seq: resume,
            time_ms,
            drain,
        }));
        for m in msgs {
            let time_ms = self.tick();
            self.records.push(Record::Delivered(Delivered {
                session,
                seq: m.seq,
                message_id: m.message_id.clone(),
                from_user: m.from_user,
                client_id: m.client_id.clone(),
                time_ms,
            }));
        }
        session
    }

    /// A live (not drain) session of `user` on device 1 of `node`.
    pub(crate) fn live(&mut self, user: u64, node: u32, resume: u64, msgs: &[Msg]) {
        self.stream((user, 1, node), resume, false, msgs);
    }

    /// Drains `user` on every device of every node, each seeing `inbox(device, node)`.
    pub(crate) fn drain_by(&mut self, user: u64, inbox: impl Fn(u32, u32) -> Vec<Msg>) {
        for node in NODES {
            for device in DEVICES {
                self.stream((user, device, node), 0, true, &inbox(device, node));
            }
        }
    }

    pub(crate) fn drain(&mut self, user: u64, inbox: &[Msg]) {
        self.drain_by(user, |_, _| inbox.to_vec());
    }

    pub(crate) fn receipt(
        &mut self,
        observer: u64,
        message_id: &str,
        recipient: u64,
        s: ReceiptState,
    ) {
        let time_ms = self.tick();
        self.records.push(Record::Receipt(Receipt {
            observer_user: observer,
            message_id: message_id.to_owned(),
            recipient_user: recipient,
            state: s,
            time_ms,
        }));
    }

    pub(crate) fn replica(
        &mut self,
        node: u32,
        shard: u32,
        applied_index: u64,
        digests: [&str; 2],
    ) {
        let digests = [("inbox", digests[0]), ("receipts", digests[1])]
            .into_iter()
            .map(|(name, digest)| (name.to_owned(), digest.to_owned()))
            .collect();
        self.records.push(Record::Replica(Replica {
            node,
            shard,
            applied_index,
            digests,
        }));
    }

    pub(crate) fn verify(&mut self, node: u32, shard: u32, ok: bool) {
        let detail = if ok { "match" } else { "inbox differs" }.to_owned();
        self.records.push(Record::Verify(Verify {
            node,
            shard,
            ok,
            detail,
        }));
    }

    /// Device `device` of `user` acked up to `up_to_seq`.
    pub(crate) fn acked(&mut self, user: u64, device: u32, up_to_seq: u64) {
        let time_ms = self.tick();
        self.records.push(Record::Acked(Acked {
            session: self.next_session,
            user,
            device,
            up_to_seq,
            time_ms,
        }));
    }

    /// The run's nodes keep delivered bodies, or trim them.
    pub(crate) fn retention(&mut self, keep_delivered: bool) {
        self.records.push(Record::Retention(Retention {
            keep_delivered,
            own_copies: false,
        }));
    }

    /// The run's users have a second device: every send is stored for its sender too.
    pub(crate) fn own_copies(&mut self) {
        self.records.push(Record::Retention(Retention {
            keep_delivered: true,
            own_copies: true,
        }));
    }

    pub(crate) fn fault(&mut self, description: &str) {
        let time_ms = self.tick();
        let description = description.to_owned();
        self.records.push(Record::Fault(Fault {
            time_ms,
            description,
        }));
    }

    /// Every node reports every shard identically, and every verification passes.
    pub(crate) fn healthy_status(&mut self) {
        self.status_where(|_, _| Some((100, ["aa", "bb"])), |_, _| Some(true));
    }

    /// Status per (node, shard): `replica` gives (applied index, digests) or no report,
    /// `verify` gives the verification result or none.
    pub(crate) fn status_where(
        &mut self,
        replica: impl Fn(u32, u32) -> Option<(u64, [&'static str; 2])>,
        verify: impl Fn(u32, u32) -> Option<bool>,
    ) {
        for node in NODES {
            for shard in SHARDS {
                if let Some((applied, digests)) = replica(node, shard) {
                    self.replica(node, shard, applied, digests);
                }
                if let Some(ok) = verify(node, shard) {
                    self.verify(node, shard, ok);
                }
            }
        }
    }

    pub(crate) fn history(self) -> History {
        History::from(self.records)
    }
}

/// User 2's inbox in [`traffic`].
pub(crate) fn inbox_of_2() -> Vec<Msg> {
    vec![
        msg(1, "m01", 1, "0-1"),
        msg(2, "m02", 1, "0-2"),
        msg(3, "m05", 1, "0-5"),
    ]
}

/// User 1's inbox in [`traffic`].
pub(crate) fn inbox_of_1() -> Vec<Msg> {
    vec![msg(1, "m11", 2, "1-1")]
}

/// A healthy run before the drain: acked sends both ways, a retry (info, then ok), a failed
/// send and an info send that never appear, an info send that appears once, live sessions
/// (one resuming), receipts and faults.
pub(crate) fn traffic() -> Builder {
    let mut b = Builder::default();
    b.fault("partition isolate node 3");
    b.send_ok(1, 2, "0-1", "m01");
    let first = b.invoke(1, 2, "0-2");
    b.info(first);
    let retry = b.invoke(1, 2, "0-2");
    b.ok(retry, "m02");
    let failed = b.invoke(1, 2, "0-3");
    b.fail(failed);
    let unknown = b.invoke(1, 2, "0-4");
    b.info(unknown);
    let appears = b.invoke(1, 2, "0-5");
    b.info(appears);
    b.send_ok(2, 1, "1-1", "m11");
    let inbox = inbox_of_2();
    b.live(2, 1, 0, &inbox[..2]);
    b.live(2, 2, 2, &inbox[2..]);
    b.receipt(1, "m01", 2, ReceiptState::Sent);
    b.receipt(1, "m01", 2, ReceiptState::Delivered);
    b.receipt(1, "m01", 2, ReceiptState::Read);
    b.receipt(1, "m01", 2, ReceiptState::Read);
    b.fault("heal");
    b
}

/// [`traffic`] with complete drains of both users.
pub(crate) fn drained() -> Builder {
    let mut b = traffic();
    b.drain(2, &inbox_of_2());
    b.drain(1, &inbox_of_1());
    b
}

/// [`drained`] with healthy replica status: a history that must pass.
pub(crate) fn clean() -> Builder {
    let mut b = drained();
    b.healthy_status();
    b
}

/// Asserts that the report holds exactly `expected` anomalies, all of `kind` and `class`.
pub(crate) fn assert_only(report: &Report, kind: AnomalyKind, class: &str, expected: usize) {
    assert_eq!(report.class_count(kind, class), expected, "{report}");
    assert_eq!(report.anomaly_total(), expected, "{report}");
}

/// Four acked sends 1→2; the drains of user 2 hold all but `lost`, at dense seqs.
pub(crate) fn lost_report(lost: &[&str]) -> Report {
    let mut b = Builder::default();
    for n in 1..=4 {
        b.send_ok(1, 2, &format!("0-{n}"), &format!("m{n}"));
    }
    let kept: Vec<Msg> = (1..=4)
        .map(|n| format!("0-{n}"))
        .filter(|client_id| !lost.contains(&client_id.as_str()))
        .zip(1..)
        .map(|(client_id, seq)| msg(seq, &client_id.replace("0-", "m"), 1, &client_id))
        .collect();
    b.drain(2, &kept);
    b.healthy_status();
    check(&b.history())
}
