//! The one mapping from courier errors to gRPC statuses. Every status carries a stable code
//! string in the `courier-code` metadata entry (listed in docs/API.md); `UNAVAILABLE` also
//! carries `retry-after-ms` and, when known, `leader-node`.

use courier_storage::projection::GroupRefusalCode;
use tonic::Status;
use tonic::metadata::MetadataValue;

/// Metadata key of the stable error code.
pub use courier_proto::CODE_KEY;
/// Metadata key of the retry hint, in milliseconds.
pub const RETRY_AFTER_KEY: &str = "retry-after-ms";
/// Metadata key of the current leader's node id, when known.
pub const LEADER_KEY: &str = "leader-node";

/// A rejection or an unavailability, mapped exhaustively to a status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    /// A malformed request (from the wire conversions).
    #[error("{0}")]
    Wire(#[from] courier_proto::WireError),
    /// A request that is well-formed but not allowed in this state.
    #[error("{message}")]
    Invalid {
        /// Stable code.
        code: &'static str,
        /// What is wrong.
        message: String,
    },
    /// The cluster is already set up differently.
    #[error("{message}")]
    FailedPrecondition {
        /// Stable code.
        code: &'static str,
        /// What is wrong.
        message: String,
    },
    /// No valid credential.
    #[error("{message}")]
    Unauthenticated {
        /// Stable code.
        code: &'static str,
        /// What is wrong (never the token).
        message: String,
    },
    /// A valid credential acting beyond its rights.
    #[error("{message}")]
    PermissionDenied {
        /// Stable code.
        code: &'static str,
        /// What is not allowed.
        message: String,
    },
    /// A limit was reached.
    #[error("{message}")]
    ResourceExhausted {
        /// Stable code.
        code: &'static str,
        /// Which limit.
        message: String,
    },
    /// A rate limit was hit: retry after `retry_after_ms`.
    #[error("{message}")]
    RateLimited {
        /// Stable code (`COURIER:Limits:RateLimited` unless the limit has its own).
        code: &'static str,
        /// Which limit.
        message: String,
        /// When a retry may succeed, ms.
        retry_after_ms: u64,
    },
    /// Something named does not exist.
    #[error("{message}")]
    NotFound {
        /// Stable code.
        code: &'static str,
        /// What is missing.
        message: String,
    },
    /// No leader, no quorum, or a peer did not answer in time: retry later.
    #[error("{message}")]
    Unavailable {
        /// Stable code.
        code: &'static str,
        /// What happened.
        message: String,
        /// Suggested wait before retrying, ms.
        retry_after_ms: u64,
        /// The leader, when known.
        leader: Option<u64>,
    },
    /// A fault inside this node (storage, raft fatal): the operation may or may not have happened.
    #[error("{message}")]
    Internal {
        /// Stable code.
        code: &'static str,
        /// What happened (no bodies, phone numbers or tokens).
        message: String,
    },
}

/// The code of [`ApiError::installing`].
pub const SHARD_INSTALLING: &str = "COURIER:Shard:Installing";
/// Code of [`ApiError::unknown_shard`].
pub const UNKNOWN_SHARD: &str = "COURIER:Cluster:UnknownShard";

impl ApiError {
    /// Maps a group event refused at apply (`EventOutcome::Rejected`) by its stable code: the one
    /// place a [`GroupRefusalCode`] becomes a status. A code no refusal has is an internal error.
    pub fn group_refusal(code: &str, message: String) -> ApiError {
        let Some(kind) = GroupRefusalCode::from_code(code) else {
            return ApiError::Internal {
                code: "COURIER:Node:Outcome",
                message: format!("unknown refusal {code}: {message}"),
            };
        };
        let code = kind.as_str();
        match kind {
            GroupRefusalCode::NotFound => ApiError::NotFound { code, message },
            GroupRefusalCode::NotAdmin | GroupRefusalCode::NotMember => {
                ApiError::PermissionDenied { code, message }
            }
            GroupRefusalCode::AlreadyMember | GroupRefusalCode::Exists => {
                ApiError::FailedPrecondition { code, message }
            }
            GroupRefusalCode::Full => ApiError::ResourceExhausted { code, message },
            // The replica read an older epoch than the leader applied: a retry reads the new one.
            GroupRefusalCode::EpochChanged => ApiError::Unavailable {
                code,
                message,
                retry_after_ms: 50,
                leader: None,
            },
        }
    }
}

impl From<courier_storage::StorageError> for ApiError {
    /// A storage fault met while serving a request: the node's own fault, never the caller's.
    fn from(error: courier_storage::StorageError) -> Self {
        ApiError::Internal {
            code: "COURIER:Node:Storage",
            message: error.to_string(),
        }
    }
}

fn with_code(mut status: Status, code: &'static str) -> Status {
    status
        .metadata_mut()
        .insert(CODE_KEY, MetadataValue::from_static(code));
    status
}

impl From<ApiError> for Status {
    fn from(error: ApiError) -> Status {
        let message = error.to_string();
        match error {
            ApiError::Wire(wire) => with_code(Status::invalid_argument(message), wire.code()),
            ApiError::Invalid { code, .. } => with_code(Status::invalid_argument(message), code),
            ApiError::FailedPrecondition { code, .. } => {
                with_code(Status::failed_precondition(message), code)
            }
            ApiError::NotFound { code, .. } => with_code(Status::not_found(message), code),
            ApiError::Unauthenticated { code, .. } => {
                with_code(Status::unauthenticated(message), code)
            }
            ApiError::PermissionDenied { code, .. } => {
                with_code(Status::permission_denied(message), code)
            }
            ApiError::ResourceExhausted { code, .. } => {
                with_code(Status::resource_exhausted(message), code)
            }
            ApiError::RateLimited {
                code,
                retry_after_ms,
                ..
            } => {
                let mut status = with_code(Status::resource_exhausted(message), code);
                if let Ok(value) = retry_after_ms.to_string().parse() {
                    status.metadata_mut().insert(RETRY_AFTER_KEY, value);
                }
                status
            }
            ApiError::Unavailable {
                code,
                retry_after_ms,
                leader,
                ..
            } => {
                let mut status = with_code(Status::unavailable(message), code);
                if let Ok(value) = retry_after_ms.to_string().parse() {
                    status.metadata_mut().insert(RETRY_AFTER_KEY, value);
                }
                if let Some(leader) = leader
                    && let Ok(value) = leader.to_string().parse()
                {
                    status.metadata_mut().insert(LEADER_KEY, value);
                }
                status
            }
            ApiError::Internal { code, .. } => with_code(Status::internal(message), code),
        }
    }
}

/// Answers of a shard leader to a forwarded proposal that the forwarding node hands to its
/// client as they are: the leader is alive and said when to retry, so waiting there for another
/// leader would only delay the client.
const LEADER_ANSWERS_PASSED_ON: [&str; 2] = ["COURIER:Send:InFlight", "COURIER:Shard:Overloaded"];

/// The `UNAVAILABLE` answers of a replica that took a proposal for a node without a replica of
/// the shard, which that node passes on: the leader's, and the replica's own when it found no
/// leader in time or was installing a snapshot.
const REPLICA_ANSWERS_PASSED_ON: [&str; 4] = [
    "COURIER:Send:InFlight",
    "COURIER:Shard:Overloaded",
    "COURIER:Shard:NoLeader",
    SHARD_INSTALLING,
];

/// The `INVALID_ARGUMENT` refusals of a proposal a replica passes back (the proposal itself was
/// refused: nothing was written).
const REPLICA_REFUSALS_PASSED_ON: [&str; 2] = [
    "COURIER:Shard:ProposalTooLarge",
    "COURIER:Propose:UnknownEvent",
];

/// The `INVALID_ARGUMENT` refusals of a forwarded batch a destination's leader gives the node
/// that handed it the batch, which that node passes back to the forwarder: a refusal of the
/// batch itself, not a leader it cannot reach.
const FORWARD_REFUSALS_PASSED_ON: [&str; 4] = [
    "COURIER:Forward:BatchSize",
    "COURIER:Forward:EventKind",
    "COURIER:Forward:Gap",
    "COURIER:Forward:Position",
];

impl ApiError {
    /// `INTERNAL` `COURIER:Node:Fault`: a fault inside this node; the operation may or may not
    /// have happened.
    pub fn fault(message: String) -> ApiError {
        ApiError::Internal {
            code: "COURIER:Node:Fault",
            message,
        }
    }

    /// [`ApiError::fault`] for a task that ended (panicked or was cancelled) before answering.
    pub fn task_ended(task: &str, error: &tokio::task::JoinError) -> ApiError {
        ApiError::fault(format!("the {task} task ended without an answer: {error}"))
    }

    /// `UNAVAILABLE`: this node has not applied the cluster settings yet.
    pub fn not_initialized() -> ApiError {
        ApiError::Unavailable {
            code: "COURIER:Cluster:NotInitialized",
            message: "the cluster is not initialized yet".to_owned(),
            retry_after_ms: 1000,
            leader: None,
        }
    }

    /// `NOT_FOUND` `COURIER:Cluster:UnknownShard`: this node holds no replica of `shard`.
    pub fn unknown_shard(shard: courier_proto::ShardId) -> ApiError {
        ApiError::NotFound {
            code: UNKNOWN_SHARD,
            message: format!("{shard} is not replicated on this node"),
        }
    }

    /// `UNAVAILABLE` `COURIER:Shard:Lagging`: this node's replica has not shown a write that
    /// committed yet (`what` says which); retry, here or elsewhere.
    pub fn lagging(what: String) -> ApiError {
        ApiError::Unavailable {
            code: "COURIER:Shard:Lagging",
            message: format!("this replica has not caught up: {what}; retry"),
            retry_after_ms: 100,
            leader: None,
        }
    }

    /// `UNAVAILABLE`: this node's replica of `shard` is installing a snapshot (it was far
    /// behind), so its projections are half written until the install ends.
    pub fn installing(shard: courier_proto::ShardId) -> ApiError {
        ApiError::Unavailable {
            code: SHARD_INSTALLING,
            message: format!(
                "this node's replica of shard {} is installing a snapshot; retry",
                shard.get()
            ),
            retry_after_ms: 500,
            leader: None,
        }
    }

    /// The `UNAVAILABLE` answer a shard leader gave to a forwarded proposal, when it is one the
    /// forwarding node passes on to its client unchanged (`COURIER:Send:InFlight`,
    /// `COURIER:Shard:Overloaded`); `None` for anything else (no answer, a transport failure, a
    /// deadline, a leader that stepped down), which the forwarding node treats as a leader it
    /// cannot reach.
    pub fn passed_on_from_leader(status: &Status) -> Option<ApiError> {
        Self::coded_unavailable(status, &LEADER_ANSWERS_PASSED_ON)
    }

    /// The answer a replica gave to a proposal a node without a replica of the shard handed it
    /// (`Cluster::propose`): its "retry later" answers and its refusals of the proposal itself,
    /// passed on to the client unchanged; `None` for anything else (a transport failure, a
    /// deadline, a node that holds no replica).
    pub fn passed_on_from_replica(status: &Status) -> Option<ApiError> {
        Self::coded_invalid(status, &REPLICA_REFUSALS_PASSED_ON)
            .or_else(|| Self::coded_unavailable(status, &REPLICA_ANSWERS_PASSED_ON))
    }

    /// The answer a destination's leader gave to a forwarded batch handed to it: its refusals of
    /// the batch and its "retry later" answers, passed on unchanged; `None` for anything else,
    /// which the forwarding node treats as a leader it cannot reach.
    pub fn passed_on_from_forward(status: &Status) -> Option<ApiError> {
        Self::coded_invalid(status, &FORWARD_REFUSALS_PASSED_ON)
            .or_else(|| Self::coded_unavailable(status, &LEADER_ANSWERS_PASSED_ON))
    }

    /// An `INVALID_ARGUMENT` status whose code is one of `codes`.
    fn coded_invalid(status: &Status, codes: &[&'static str]) -> Option<ApiError> {
        if status.code() != tonic::Code::InvalidArgument {
            return None;
        }
        let sent = status.metadata().get(CODE_KEY)?.to_str().ok()?;
        let code = codes.iter().copied().find(|known| *known == sent)?;
        Some(ApiError::Invalid {
            code,
            message: status.message().to_owned(),
        })
    }

    /// An `UNAVAILABLE` status whose code is one of `codes`, with its retry hint and leader.
    fn coded_unavailable(status: &Status, codes: &[&'static str]) -> Option<ApiError> {
        if status.code() != tonic::Code::Unavailable {
            return None;
        }
        let sent = status.metadata().get(CODE_KEY)?.to_str().ok()?;
        let code = codes.iter().copied().find(|known| *known == sent)?;
        let number = |key: &str| {
            status
                .metadata()
                .get(key)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok())
        };
        Some(ApiError::Unavailable {
            code,
            message: status.message().to_owned(),
            retry_after_ms: number(RETRY_AFTER_KEY)?,
            leader: number(LEADER_KEY),
        })
    }
}

#[cfg(test)]
mod tests {
    use courier_storage::projection::GroupRefusalCode;
    use tonic::Code;

    use super::*;

    /// A leader's "retry later" answers come back from its status as they were; a deadline,
    /// a leader that stepped down or an uncoded failure do not.
    #[test]
    fn leader_answers_pass_on_and_failures_do_not() {
        let in_flight = ApiError::Unavailable {
            code: "COURIER:Send:InFlight",
            message: "still in flight".to_owned(),
            retry_after_ms: 2000,
            leader: Some(2),
        };
        let back = ApiError::passed_on_from_leader(&Status::from(in_flight));
        assert!(
            matches!(
                back,
                Some(ApiError::Unavailable {
                    code: "COURIER:Send:InFlight",
                    retry_after_ms: 2000,
                    leader: Some(2),
                    ..
                })
            ),
            "{back:?}"
        );
        let stepped_down = ApiError::Unavailable {
            code: "COURIER:Shard:NoLeader",
            message: "moved".to_owned(),
            retry_after_ms: 100,
            leader: None,
        };
        for status in [
            Status::from(stepped_down),
            Status::deadline_exceeded("timed out"),
            Status::unavailable("connection refused"),
        ] {
            assert!(
                ApiError::passed_on_from_leader(&status).is_none(),
                "{status:?}"
            );
        }
    }

    /// A destination leader's refusal of a forwarded batch comes back as that refusal, not as a
    /// leader the node cannot reach; other refusals and failures do not.
    #[test]
    fn forward_refusals_pass_on() {
        let gap = ApiError::Invalid {
            code: "COURIER:Forward:Gap",
            message: "starts past the watermark".to_owned(),
        };
        let back = ApiError::passed_on_from_forward(&Status::from(gap));
        assert!(
            matches!(
                back,
                Some(ApiError::Invalid {
                    code: "COURIER:Forward:Gap",
                    ..
                })
            ),
            "{back:?}"
        );
        let other = ApiError::Invalid {
            code: "COURIER:Wire:Zero",
            message: "zero".to_owned(),
        };
        for status in [
            Status::from(other),
            Status::unavailable("connection refused"),
        ] {
            assert!(
                ApiError::passed_on_from_forward(&status).is_none(),
                "{status:?}"
            );
        }
    }

    /// Every group refusal code maps to its status and keeps its code string; an unknown code is
    /// internal.
    #[test]
    fn group_refusals_map_to_statuses() {
        let expected = [
            (GroupRefusalCode::Exists, Code::FailedPrecondition),
            (GroupRefusalCode::NotFound, Code::NotFound),
            (GroupRefusalCode::NotAdmin, Code::PermissionDenied),
            (GroupRefusalCode::AlreadyMember, Code::FailedPrecondition),
            (GroupRefusalCode::Full, Code::ResourceExhausted),
            (GroupRefusalCode::NotMember, Code::PermissionDenied),
            (GroupRefusalCode::EpochChanged, Code::Unavailable),
        ];
        assert_eq!(expected.len(), GroupRefusalCode::ALL.len());
        for (kind, code) in expected {
            let status = Status::from(ApiError::group_refusal(kind.as_str(), "why".to_owned()));
            assert_eq!(status.code(), code, "{kind:?}");
            assert_eq!(
                status
                    .metadata()
                    .get(CODE_KEY)
                    .and_then(|v| v.to_str().ok()),
                Some(kind.as_str())
            );
        }
        let unknown = ApiError::group_refusal("COURIER:Group:Other", "why".to_owned());
        assert_eq!(Status::from(unknown).code(), Code::Internal);
    }
}
