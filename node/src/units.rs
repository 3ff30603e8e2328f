//! Human units in the config file: sizes like `"64KiB"` and durations like `"300ms"`.

use std::fmt;
use std::time::Duration;

use serde::Deserialize;
use serde::de::{self, Deserializer, Visitor};

/// A size in bytes, written `"512B"`, `"64KiB"`, `"4MiB"` or `"1GiB"` (or a bare integer).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

/// A duration, written `"250ms"`, `"2s"`, `"5m"`, `"1h"` or `"30d"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct HumanDuration(pub Duration);

fn split_unit(text: &str) -> Option<(u64, &str)> {
    let text = text.trim();
    let digits = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(digits);
    Some((number.parse().ok()?, unit.trim()))
}

impl ByteSize {
    /// Parses `"64KiB"`-style text.
    pub fn parse(text: &str) -> Option<Self> {
        let (n, unit) = split_unit(text)?;
        let scale: u64 = match unit {
            "" | "B" => 1,
            "KiB" => 1 << 10,
            "MiB" => 1 << 20,
            "GiB" => 1 << 30,
            _ => return None,
        };
        n.checked_mul(scale).map(Self)
    }

    /// The size in bytes, as `usize`.
    pub fn bytes(self) -> usize {
        usize::try_from(self.0).unwrap_or(usize::MAX)
    }
}

impl HumanDuration {
    /// Parses `"300ms"`-style text.
    pub fn parse(text: &str) -> Option<Self> {
        let (n, unit) = split_unit(text)?;
        let duration = match unit {
            "ms" => Duration::from_millis(n),
            "s" => Duration::from_secs(n),
            "m" => Duration::from_secs(n.checked_mul(60)?),
            "h" => Duration::from_secs(n.checked_mul(3600)?),
            "d" => Duration::from_secs(n.checked_mul(86_400)?),
            _ => return None,
        };
        Some(Self(duration))
    }
}

struct UnitVisitor<T>(fn(&str) -> Option<T>, &'static str);

impl<T> Visitor<'_> for UnitVisitor<T> {
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.1)
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<T, E> {
        (self.0)(v).ok_or_else(|| E::invalid_value(de::Unexpected::Str(v), &self.1))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<T, E> {
        self.visit_str(&v.to_string())
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<T, E> {
        self.visit_str(&v.to_string())
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(UnitVisitor(ByteSize::parse, "a size such as \"64KiB\""))
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_str(UnitVisitor(
            HumanDuration::parse,
            "a duration such as \"300ms\"",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units() {
        assert_eq!(ByteSize::parse("64KiB"), Some(ByteSize(65_536)));
        assert_eq!(ByteSize::parse("3"), Some(ByteSize(3)));
        assert_eq!(ByteSize::parse("1GiB"), Some(ByteSize(1 << 30)));
        assert_eq!(ByteSize::parse("5kb"), None);
        assert_eq!(
            HumanDuration::parse("300ms"),
            Some(HumanDuration(Duration::from_millis(300)))
        );
        assert_eq!(
            HumanDuration::parse("30d"),
            Some(HumanDuration(Duration::from_secs(2_592_000)))
        );
        assert_eq!(HumanDuration::parse("1 fortnight"), None);
    }
}
