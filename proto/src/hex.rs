//! Lower-case hex, for ids and keys in errors, logs and reports (never for bodies or phones).

use std::fmt::Write as _;

/// Returns `bytes` as lower-case hex, two digits per byte.
pub fn hex(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len().saturating_mul(2));
    for byte in bytes {
        // Writing into a `String` never fails.
        let _ = write!(out, "{byte:02x}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::hex;

    /// Two lower-case digits per byte, leading zeroes kept.
    #[test]
    fn two_digits_per_byte() {
        assert_eq!(hex(&[]), "");
        assert_eq!(hex(&[0x00, 0x0a, 0xff, 0x10]), "000aff10");
    }
}
