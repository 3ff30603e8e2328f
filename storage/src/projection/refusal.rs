//! Why a group event was refused at apply: one enum, with the stable code strings that travel in
//! `Applied::Rejected` and over the wire (`EventOutcome::Rejected { code, message }`).
//!
//! The node maps each [`GroupRefusalCode`] to a gRPC status in one place; it finds the code of
//! a wire refusal with [`GroupRefusalCode::from_code`] instead of matching strings itself.

use courier_proto::{GroupId, UserId};

use super::Applied;

/// A group event refused by the state at its log position. Refusals change nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GroupRefusal {
    /// `GroupCreated` for a group that exists.
    Exists {
        /// The group.
        group: GroupId,
    },
    /// A membership change or a send naming a group that does not exist.
    NotFound {
        /// The group.
        group: GroupId,
    },
    /// `MemberAdded` by someone who is not an admin.
    NotAdminToAdd,
    /// `MemberRemoved` of someone else by someone who is not an admin.
    NotAdminToRemove,
    /// `MemberAdded` for a member.
    AlreadyMember {
        /// The user.
        user: UserId,
    },
    /// `MemberAdded` to a group at `GROUP_MEMBERS_MAX`.
    Full {
        /// The group.
        group: GroupId,
    },
    /// `MemberRemoved` for someone who is not a member.
    NotMember {
        /// The user.
        user: UserId,
    },
    /// A send to a group by someone who is not a member.
    SenderNotMember,
    /// A send accepted under an older membership epoch than the one at this position.
    EpochChanged {
        /// The epoch the send was accepted under.
        sent: u64,
        /// The epoch at this position.
        current: u64,
    },
}

/// The kind of a [`GroupRefusal`], as the stable code names it (several refusals share one).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GroupRefusalCode {
    /// `COURIER:Group:Exists`.
    Exists,
    /// `COURIER:Group:NotFound`.
    NotFound,
    /// `COURIER:Group:NotAdmin`.
    NotAdmin,
    /// `COURIER:Group:AlreadyMember`.
    AlreadyMember,
    /// `COURIER:Group:Full`.
    Full,
    /// `COURIER:Group:NotMember`.
    NotMember,
    /// `COURIER:Group:EpochChanged`: a retry reads the new epoch.
    EpochChanged,
}

impl GroupRefusalCode {
    /// Every code.
    pub const ALL: [GroupRefusalCode; 7] = [
        Self::Exists,
        Self::NotFound,
        Self::NotAdmin,
        Self::AlreadyMember,
        Self::Full,
        Self::NotMember,
        Self::EpochChanged,
    ];

    /// The stable code string (docs/API.md).
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Exists => "COURIER:Group:Exists",
            Self::NotFound => "COURIER:Group:NotFound",
            Self::NotAdmin => "COURIER:Group:NotAdmin",
            Self::AlreadyMember => "COURIER:Group:AlreadyMember",
            Self::Full => "COURIER:Group:Full",
            Self::NotMember => "COURIER:Group:NotMember",
            Self::EpochChanged => "COURIER:Group:EpochChanged",
        }
    }

    /// Parses a code string as [`GroupRefusalCode::as_str`] prints it (`None` for any other).
    pub fn from_code(code: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|known| known.as_str() == code)
    }
}

impl GroupRefusal {
    /// The refusal's kind.
    pub const fn kind(self) -> GroupRefusalCode {
        match self {
            Self::Exists { .. } => GroupRefusalCode::Exists,
            Self::NotFound { .. } => GroupRefusalCode::NotFound,
            Self::NotAdminToAdd | Self::NotAdminToRemove => GroupRefusalCode::NotAdmin,
            Self::AlreadyMember { .. } => GroupRefusalCode::AlreadyMember,
            Self::Full { .. } => GroupRefusalCode::Full,
            Self::NotMember { .. } | Self::SenderNotMember => GroupRefusalCode::NotMember,
            Self::EpochChanged { .. } => GroupRefusalCode::EpochChanged,
        }
    }

    /// The stable code string (`COURIER:Group:*`).
    pub const fn code(self) -> &'static str {
        self.kind().as_str()
    }

    /// Why, for the client (ids only).
    pub fn message(self) -> String {
        match self {
            Self::Exists { group } => format!("group {} exists", group.get()),
            Self::NotFound { group } => format!("no group {}", group.get()),
            Self::NotAdminToAdd => "only admins add members".to_owned(),
            Self::NotAdminToRemove => "only admins remove others".to_owned(),
            Self::AlreadyMember { user } => format!("user {} is a member", user.get()),
            Self::Full { group } => format!("group {} is full", group.get()),
            Self::NotMember { user } => format!("user {} is not a member", user.get()),
            Self::SenderNotMember => "only members send to a group".to_owned(),
            Self::EpochChanged { sent, current } => {
                format!("the membership changed (epoch {sent} → {current}) while sending; retry")
            }
        }
    }
}

impl From<GroupRefusal> for Applied {
    fn from(refusal: GroupRefusal) -> Self {
        Applied::Rejected {
            code: refusal.code(),
            message: refusal.message(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every code string parses back to its kind, and nothing else parses.
    #[test]
    fn codes_round_trip() {
        for code in GroupRefusalCode::ALL {
            assert_eq!(GroupRefusalCode::from_code(code.as_str()), Some(code));
        }
        assert_eq!(GroupRefusalCode::from_code("COURIER:Group:Other"), None);
    }

    /// Code and message are what the wire carried before the enum existed.
    #[test]
    fn wire_form_is_stable() {
        let group = GroupId::new(7).unwrap();
        let refusal = GroupRefusal::EpochChanged {
            sent: 2,
            current: 3,
        };
        assert_eq!(refusal.code(), "COURIER:Group:EpochChanged");
        assert_eq!(
            refusal.message(),
            "the membership changed (epoch 2 → 3) while sending; retry"
        );
        assert_eq!(
            Applied::from(GroupRefusal::Exists { group }),
            Applied::Rejected {
                code: "COURIER:Group:Exists",
                message: "group 7 exists".to_owned()
            }
        );
    }
}
