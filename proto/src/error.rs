//! Why a wire message was rejected. Every variant is a client error: it changes nothing and
//! maps to `INVALID_ARGUMENT` at the gRPC edge.

/// Metadata key of the stable error code every courier status carries (docs/API.md).
pub const CODE_KEY: &str = "courier-code";

/// A wire value that does not convert into a domain value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// A required field is absent.
    #[error("missing field `{field}`")]
    Missing {
        /// The field's name in the `.proto` file.
        field: &'static str,
    },
    /// An id that must be non-zero is zero.
    #[error("field `{field}` must not be zero")]
    Zero {
        /// The field's name in the `.proto` file.
        field: &'static str,
    },
    /// A field is longer than its protocol limit.
    #[error("field `{field}` is {len} bytes, limit {max}")]
    TooLong {
        /// The field's name in the `.proto` file.
        field: &'static str,
        /// The length received, in bytes.
        len: usize,
        /// The limit, in bytes.
        max: usize,
    },
    /// A field does not have the required shape (for example a message id that is not 16 bytes).
    #[error("field `{field}` is malformed: {reason}")]
    Malformed {
        /// The field's name in the `.proto` file.
        field: &'static str,
        /// What is wrong, without echoing the value.
        reason: &'static str,
    },
    /// A numeric field is outside its allowed range.
    #[error("field `{field}` is {value}, allowed {min}..={max}")]
    OutOfRange {
        /// The field's name in the `.proto` file.
        field: &'static str,
        /// The value received.
        value: u64,
        /// The smallest allowed value.
        min: u64,
        /// The largest allowed value.
        max: u64,
    },
}

impl WireError {
    /// A stable, documented code string for this rejection (docs/API.md).
    pub fn code(&self) -> &'static str {
        match self {
            Self::Missing { .. } => "COURIER:Wire:Missing",
            Self::Zero { .. } => "COURIER:Wire:Zero",
            Self::TooLong { .. } => "COURIER:Wire:TooLong",
            Self::Malformed { .. } => "COURIER:Wire:Malformed",
            Self::OutOfRange { .. } => "COURIER:Wire:OutOfRange",
        }
    }
}
