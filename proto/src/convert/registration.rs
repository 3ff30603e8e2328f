//! Registration requests. Phone numbers are validated here and never echoed in errors.

use crate::error::WireError;
use crate::limits::{
    DEVICE_NAME_BYTES_MAX, PHONE_NUMBER_BYTES_MAX, PHONE_NUMBER_BYTES_MIN, REGISTRATION_CODE_DIGITS,
};
use crate::pb::client as pb;
use crate::types::DeviceId;

/// An E.164 phone number: `+` and 7 to 15 digits. `Debug` does not print it.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct PhoneNumber(String);

impl PhoneNumber {
    /// Returns the number, for the SMS sender and the keyed hash only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for PhoneNumber {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PhoneNumber(<redacted>)")
    }
}

impl TryFrom<String> for PhoneNumber {
    type Error = WireError;

    fn try_from(raw: String) -> Result<Self, WireError> {
        const FIELD: &str = "phone_number";
        if raw.is_empty() {
            return Err(WireError::Missing { field: FIELD });
        }
        if raw.len() > PHONE_NUMBER_BYTES_MAX {
            return Err(WireError::TooLong {
                field: FIELD,
                len: raw.len(),
                max: PHONE_NUMBER_BYTES_MAX,
            });
        }
        let digits = raw.strip_prefix('+').ok_or(WireError::Malformed {
            field: FIELD,
            reason: "must start with + (E.164)",
        })?;
        if raw.len() < PHONE_NUMBER_BYTES_MIN || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(WireError::Malformed {
                field: FIELD,
                reason: "expected + and 7-15 digits",
            });
        }
        Ok(Self(raw))
    }
}

/// A validated registration: number, the 6-digit code, and a device name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegisterCommand {
    /// The number being registered.
    pub phone: PhoneNumber,
    /// The one-time code as sent by SMS.
    pub code: String,
    /// A label chosen by the user, at most 64 bytes.
    pub device_name: String,
}

/// Validates a device name (may be empty).
///
/// # Errors
/// [`WireError::TooLong`] past [`DEVICE_NAME_BYTES_MAX`].
pub fn device_name(raw: String) -> Result<String, WireError> {
    if raw.len() > DEVICE_NAME_BYTES_MAX {
        return Err(WireError::TooLong {
            field: "device_name",
            len: raw.len(),
            max: DEVICE_NAME_BYTES_MAX,
        });
    }
    Ok(raw)
}

impl TryFrom<pb::RegisterRequest> for RegisterCommand {
    type Error = WireError;

    fn try_from(wire: pb::RegisterRequest) -> Result<Self, WireError> {
        let phone = PhoneNumber::try_from(wire.phone_number)?;
        if wire.code.is_empty() {
            return Err(WireError::Missing { field: "code" });
        }
        if wire.code.len() != REGISTRATION_CODE_DIGITS
            || !wire.code.bytes().all(|b| b.is_ascii_digit())
        {
            return Err(WireError::Malformed {
                field: "code",
                reason: "expected 6 digits",
            });
        }
        Ok(Self {
            phone,
            code: wire.code,
            device_name: device_name(wire.device_name)?,
        })
    }
}

impl TryFrom<pb::RevokeDeviceRequest> for DeviceId {
    type Error = WireError;

    fn try_from(wire: pb::RevokeDeviceRequest) -> Result<Self, WireError> {
        DeviceId::from_wire(wire.device_id, "device_id")
    }
}
