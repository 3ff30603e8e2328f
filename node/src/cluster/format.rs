//! The cluster's event format (`Admin.RaiseEventFormat`): which `EntryPayload.format_version`
//! the shard leaders write. The metadata group's leader raises a format only once every member
//! answers `Forward.BuildInfo` with a build that reads it, records it in the metadata group (so
//! every node's leaders switch when their replica applies it), and never lowers it. Until then
//! the leaders of a cluster in a rolling upgrade write the format every build of it reads, and
//! replicas of the old and the new build apply every entry alike (docs/EVENTS.md, "Entries and
//! format version"). The leader holds one gate across a raise and across each change of the
//! metadata group's membership, whose adds check the new node's build the same way.
//!
//! ```text
//!   operator ─RaiseEventFormat─▶ any node ─(leader_only)─▶ metadata leader, under the gate:
//!                                  ├─ BuildInfo ─▶ every member: event_format_max ≥ format?
//!                                  └─ Proposal::EventFormat ─▶ applied on every node ─▶ proposers
//! ```

use std::time::Duration;

use courier_consensus::groups::GroupHandle;
use courier_consensus::types::NodeId;
use courier_proto::FORMAT_VERSION;
use courier_proto::pb::peer;
use tracing::info;

use super::{Cluster, invalid, unavailable};
use crate::status::ApiError;

/// How long a raise is tried again while the metadata group elects.
const RAISE_WAIT: Duration = Duration::from_secs(30);

/// The format a request asks for: 0 for this build's newest.
///
/// # Errors
/// `INVALID_ARGUMENT` `COURIER:Cluster:UnknownFormat` past what this build writes.
pub(super) fn wanted_format(requested: u32) -> Result<u32, ApiError> {
    match requested {
        0 => Ok(FORMAT_VERSION),
        format if format <= FORMAT_VERSION => Ok(format),
        format => Err(invalid(
            "COURIER:Cluster:UnknownFormat",
            format!(
                "event format {format}: this node's build writes formats 1 to {FORMAT_VERSION}"
            ),
        )),
    }
}

/// What one member's answer to `BuildInfo` says about `format`: `Ok` when its build reads it.
///
/// # Errors
/// `FAILED_PRECONDITION` `COURIER:Cluster:MemberTooOld` for an older build (one that answers an
/// `event_format_max` below `format`, or does not know the RPC, as builds before formats);
/// `UNAVAILABLE` `COURIER:Cluster:MemberUnreachable` for a member that did not answer.
fn member_reads(
    node: NodeId,
    format: u32,
    answer: Result<u32, tonic::Status>,
) -> Result<(), ApiError> {
    let too_old = |reads: &str| ApiError::FailedPrecondition {
        code: "COURIER:Cluster:MemberTooOld",
        message: format!(
            "node {node} {reads}, not event format {format}: upgrade it to this build first"
        ),
    };
    match answer {
        Ok(max) if max >= format => Ok(()),
        Ok(max) => Err(too_old(&format!(
            "reads event formats up to {}",
            max.max(1)
        ))),
        Err(status) if status.code() == tonic::Code::Unimplemented => Err(too_old(
            "runs a build before event formats (it reads format 1 only)",
        )),
        Err(status) => Err(member_unreachable(format!(
            "node {node} did not answer ({}); every member must answer before the event format \
             is raised or a node joins a cluster past format 1",
            status.message()
        ))),
    }
}

/// The code of a member that did not answer a check of its build.
pub(super) const MEMBER_UNREACHABLE: &str = "COURIER:Cluster:MemberUnreachable";

/// `UNAVAILABLE` [`MEMBER_UNREACHABLE`]: a member did not answer a check of its build.
pub(super) fn member_unreachable(message: String) -> ApiError {
    ApiError::Unavailable {
        code: MEMBER_UNREACHABLE,
        message,
        retry_after_ms: 1_000,
        leader: None,
    }
}

impl Cluster {
    /// Serves `Admin.RaiseEventFormat`: on the metadata group's leader (here or one hop away;
    /// `leader_only` is that hop, which goes no further), checks that every member reads the
    /// format and records it, tried again while the metadata group elects (up to 30 s). A
    /// format at or below the cluster's changes nothing and writes nothing. Returns the
    /// cluster's format.
    ///
    /// # Errors
    /// `INVALID_ARGUMENT` `COURIER:Cluster:UnknownFormat` past this build's newest format;
    /// `FAILED_PRECONDITION` `COURIER:Cluster:MemberTooOld` when a member's build does not read
    /// it; `UNAVAILABLE` `COURIER:Cluster:MemberUnreachable` when a member did not answer, and
    /// `COURIER:Shard:NoLeader` when the metadata group had no reachable leader in time.
    pub async fn raise_event_format(
        &self,
        request: peer::RaiseEventFormatRequest,
    ) -> Result<u32, ApiError> {
        let format = wanted_format(request.event_format)?;
        if request.leader_only {
            return self.raise_event_format_here(format).await;
        }
        let deadline = tokio::time::Instant::now() + RAISE_WAIT;
        loop {
            match self.raise_event_format_once(format).await {
                Err(ApiError::Unavailable {
                    code: "COURIER:Shard:NoLeader",
                    ..
                }) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                other => return other,
            }
        }
    }

    /// Checks that every node of `members` but this one runs a build that reads event format
    /// `format`.
    ///
    /// # Errors
    /// As [`member_reads`], for the first member that does not.
    pub(super) async fn members_read(
        &self,
        members: impl IntoIterator<Item = (NodeId, String)>,
        format: u32,
    ) -> Result<(), ApiError> {
        for (node, addr) in members {
            if node != self.groups.node_id() {
                self.node_reads(node, &addr, format).await?;
            }
        }
        Ok(())
    }

    /// Checks that `node` at peer address `addr` runs a build that reads event format `format`.
    ///
    /// # Errors
    /// As [`member_reads`].
    pub(super) async fn node_reads(
        &self,
        node: NodeId,
        addr: &str,
        format: u32,
    ) -> Result<(), ApiError> {
        let answer = match self.peers.forward(addr) {
            None => Err(tonic::Status::unavailable(format!("bad address {addr}"))),
            Some(mut client) => client
                .build_info(self.peers.request(peer::BuildInfoRequest::default()))
                .await
                .map(|response| response.into_inner().event_format_max),
        };
        member_reads(node, format, answer)
    }

    async fn raise_event_format_once(&self, format: u32) -> Result<u32, ApiError> {
        let Some((mut client, leader)) = self.metadata_leader_elsewhere().await? else {
            return self.raise_event_format_here(format).await;
        };
        // The leader asks every member's build, each within the RPC timeout.
        let request = self.peers.request_within(
            peer::RaiseEventFormatRequest {
                event_format: format,
                leader_only: true,
            },
            RAISE_WAIT,
        );
        let response = client.raise_event_format(request).await.map_err(|status| {
            // The leader's refusal stands (not retried as if it had not answered).
            match status.code() {
                tonic::Code::InvalidArgument => {
                    invalid("COURIER:Cluster:UnknownFormat", status.message().to_owned())
                }
                tonic::Code::FailedPrecondition => ApiError::FailedPrecondition {
                    code: "COURIER:Cluster:MemberTooOld",
                    message: status.message().to_owned(),
                },
                // A metadata leader of a build before formats.
                tonic::Code::Unimplemented => ApiError::FailedPrecondition {
                    code: "COURIER:Cluster:MemberTooOld",
                    message: format!(
                        "the metadata leader runs a build before event formats ({})",
                        status.message()
                    ),
                },
                _ if super::code_is(&status, MEMBER_UNREACHABLE) => {
                    member_unreachable(status.message().to_owned())
                }
                _ => unavailable(status.message().to_owned(), leader),
            }
        })?;
        Ok(response.into_inner().event_format)
    }

    /// On the metadata group's leader: checks every member (as the leader knows them, changes
    /// not yet committed included) and records the format, under the format gate.
    async fn raise_event_format_here(&self, format: u32) -> Result<u32, ApiError> {
        let metadata = self.leading_metadata().await?;
        let _gate = self.format_gate.lock().await;
        let current = self.applied_event_format(&metadata).await?;
        if format <= current {
            return Ok(current);
        }
        self.members_read(metadata.state().members, format).await?;
        metadata
            .write_event_format(format)
            .await
            .map_err(|e| unavailable(e.to_string(), e.leader))?;
        let now = self.groups.event_format();
        info!(
            requested = format,
            event_format = now,
            "event format raised"
        );
        Ok(now)
    }

    /// On the metadata group's leader (`metadata`), holding the format gate, about to add
    /// `node` at `addr` to it: once the cluster's format is past 1, checks that the node's build
    /// reads it. The format is read after this leader applied everything committed before its
    /// term, so a raise its predecessor committed counts.
    ///
    /// # Errors
    /// As [`member_reads`]; `UNAVAILABLE` `COURIER:Shard:NoLeader` when this node no longer
    /// leads.
    pub(super) async fn admit_to_format(
        &self,
        metadata: &GroupHandle,
        node: NodeId,
        addr: &str,
    ) -> Result<(), ApiError> {
        let format = self.applied_event_format(metadata).await?;
        if format > 1 {
            self.node_reads(node, addr, format).await?;
        }
        Ok(())
    }

    /// The cluster's event format as the metadata leader `metadata` knows it once it applied
    /// every entry committed before it answers (a new leader may not have yet).
    async fn applied_event_format(&self, metadata: &GroupHandle) -> Result<u32, ApiError> {
        metadata
            .ensure_linearizable()
            .await
            .map_err(|e| unavailable(e.to_string(), e.leader))?;
        Ok(self.groups.event_format())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(error: &ApiError) -> &'static str {
        match error {
            ApiError::FailedPrecondition { code, .. }
            | ApiError::Unavailable { code, .. }
            | ApiError::Invalid { code, .. } => code,
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn a_format_past_this_build_is_refused() {
        assert_eq!(wanted_format(0).expect("newest"), FORMAT_VERSION);
        assert_eq!(wanted_format(1).expect("first"), 1);
        let error = wanted_format(FORMAT_VERSION + 1).expect_err("unknown");
        assert_eq!(code(&error), "COURIER:Cluster:UnknownFormat");
    }

    /// Only a member that answers with a build reading the format lets it be raised: an older
    /// build (an answer below the format, or no `BuildInfo` at all) and a member that does not
    /// answer stop the raise.
    #[test]
    fn every_member_must_read_the_format() {
        assert!(member_reads(2, 2, Ok(2)).is_ok());
        assert!(member_reads(2, 2, Ok(3)).is_ok());
        for old in [
            Ok(0),
            Ok(1),
            Err(tonic::Status::unimplemented("no such method")),
        ] {
            let error = member_reads(2, 2, old).expect_err("too old");
            assert_eq!(code(&error), "COURIER:Cluster:MemberTooOld");
            assert!(error.to_string().contains("node 2"), "{error}");
        }
        let error = member_reads(3, 2, Err(tonic::Status::unavailable("connection refused")))
            .expect_err("");
        assert_eq!(code(&error), "COURIER:Cluster:MemberUnreachable");
    }
}
