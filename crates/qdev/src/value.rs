//! Typed property values and their parsing from command-line text.
//!
//! Every value a user, a `--global` or a compat table gives is text; it becomes a
//! [`PropertyValue`] only through [`PropertyKind::parse`], so a bad value is rejected
//! with a message that says what was expected, never silently coerced.

use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;

use serde::{Serialize, Serializer};
use thiserror::Error;

use crate::spec::PropertyKind;

/// A resolved, typed property value.
///
/// Strings are `Cow<'static, str>` so that schema defaults can be written in `const`
/// context (`PropertyValue::Str(Cow::Borrowed("tap0"))`); an enum value is always one of
/// the schema's allowed `&'static str`s.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PropertyValue {
    /// A boolean; rendered as `on`/`off`.
    Bool(bool),
    /// A signed integer.
    Int(i64),
    /// A size in bytes; rendered with the largest exact suffix (`2M`).
    Size(u64),
    /// Free text.
    Str(Cow<'static, str>),
    /// One of the allowed values of an enum property.
    Enum(&'static str),
    /// A MAC address.
    Mac(MacAddress),
}

impl PropertyValue {
    /// A `const`-friendly string value, for schema defaults.
    pub const fn str(value: &'static str) -> Self {
        PropertyValue::Str(Cow::Borrowed(value))
    }

    /// The value as a bool, if it is one.
    pub fn as_bool(&self) -> Option<bool> {
        match self {
            PropertyValue::Bool(b) => Some(*b),
            _ => None,
        }
    }

    /// The value as an integer, if it is one.
    pub fn as_int(&self) -> Option<i64> {
        match self {
            PropertyValue::Int(i) => Some(*i),
            _ => None,
        }
    }

    /// The value as a size in bytes, if it is one.
    pub fn as_size(&self) -> Option<u64> {
        match self {
            PropertyValue::Size(s) => Some(*s),
            _ => None,
        }
    }

    /// The value as text, for string and enum values.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            PropertyValue::Str(s) => Some(s),
            PropertyValue::Enum(s) => Some(s),
            _ => None,
        }
    }

    /// The value as a MAC address, if it is one.
    pub fn as_mac(&self) -> Option<MacAddress> {
        match self {
            PropertyValue::Mac(m) => Some(*m),
            _ => None,
        }
    }
}

/// Renders the value the way the command line accepts it, so the output of `help` can
/// be pasted back.
impl fmt::Display for PropertyValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PropertyValue::Bool(true) => f.write_str("on"),
            PropertyValue::Bool(false) => f.write_str("off"),
            PropertyValue::Int(i) => write!(f, "{i}"),
            PropertyValue::Size(s) => fmt_size(*s, f),
            PropertyValue::Str(s) => f.write_str(s),
            PropertyValue::Enum(s) => f.write_str(s),
            PropertyValue::Mac(m) => write!(f, "{m}"),
        }
    }
}

/// JSON form: bools, integers and sizes (in bytes) as JSON numbers/booleans, everything
/// else as a string.
impl Serialize for PropertyValue {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            PropertyValue::Bool(b) => serializer.serialize_bool(*b),
            PropertyValue::Int(i) => serializer.serialize_i64(*i),
            PropertyValue::Size(s) => serializer.serialize_u64(*s),
            PropertyValue::Str(s) => serializer.serialize_str(s),
            PropertyValue::Enum(s) => serializer.serialize_str(s),
            PropertyValue::Mac(m) => serializer.collect_str(m),
        }
    }
}

/// Why a text value does not fit a property's type. The message completes the sentence
/// "invalid value 'X' for property 'P': ...".
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ParseValueError {
    /// Not one of the boolean spellings.
    #[error("expected on/off, true/false or yes/no")]
    NotABool,
    /// Not a decimal or `0x` hexadecimal integer.
    #[error("expected an integer")]
    NotAnInteger,
    /// An integer outside the declared range.
    #[error("{value} is out of range {min}..={max}")]
    IntOutOfRange {
        /// The parsed value.
        value: i64,
        /// Smallest allowed value.
        min: i64,
        /// Largest allowed value.
        max: i64,
    },
    /// An integer that must be a power of two and is not.
    #[error("{value} is not a power of two")]
    NotAPowerOfTwo {
        /// The parsed value.
        value: i64,
    },
    /// Not a size.
    #[error("expected a size in bytes, optionally with a suffix k, M, G or T (e.g. 4k, 2M, 1G)")]
    NotASize,
    /// A size that does not fit in 64 bits.
    #[error("size does not fit in 64 bits")]
    SizeOverflow,
    /// A size outside the declared range.
    #[error("size {value} is out of range {min}..={max}", value = SizeDisplay(*value), min = SizeDisplay(*min), max = SizeDisplay(*max))]
    SizeOutOfRange {
        /// The parsed size in bytes.
        value: u64,
        /// Smallest allowed size in bytes.
        min: u64,
        /// Largest allowed size in bytes.
        max: u64,
    },
    /// Not one of an enum's allowed values.
    #[error("expected one of: {}", allowed.join(", "))]
    NotInEnum {
        /// The allowed values.
        allowed: &'static [&'static str],
    },
    /// Not six colon-separated hex octets.
    #[error("expected a MAC address such as 52:54:00:12:34:56")]
    NotAMac,
    /// A typed value (a schema default) of another kind than the property's.
    #[error("expected a value of type {expected}")]
    WrongKind {
        /// The property's kind, as `help` writes it.
        expected: String,
    },
}

/// Parses `on/off`, `true/false`, `yes/no` (ASCII case-insensitive).
pub fn parse_bool(text: &str) -> Result<bool, ParseValueError> {
    match text.to_ascii_lowercase().as_str() {
        "on" | "true" | "yes" => Ok(true),
        "off" | "false" | "no" => Ok(false),
        _ => Err(ParseValueError::NotABool),
    }
}

/// Parses a decimal integer or a `0x`-prefixed hexadecimal one, optionally negative.
pub fn parse_int(text: &str) -> Result<i64, ParseValueError> {
    let (negative, digits) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    let magnitude = if let Some(hex) = digits
        .strip_prefix("0x")
        .or_else(|| digits.strip_prefix("0X"))
    {
        if hex.is_empty() || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(ParseValueError::NotAnInteger);
        }
        i128::from_str_radix(hex, 16).map_err(|_| ParseValueError::NotAnInteger)?
    } else {
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(ParseValueError::NotAnInteger);
        }
        digits
            .parse::<i128>()
            .map_err(|_| ParseValueError::NotAnInteger)?
    };
    let signed = if negative { -magnitude } else { magnitude };
    i64::try_from(signed).map_err(|_| ParseValueError::NotAnInteger)
}

/// Parses a size: a decimal number of bytes with an optional binary suffix
/// `k`/`K` (KiB), `M`, `G` or `T` (case-insensitive), or a trailing `b`/`B` for bytes.
pub fn parse_size(text: &str) -> Result<u64, ParseValueError> {
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, suffix) = text.split_at(split);
    if digits.is_empty() {
        return Err(ParseValueError::NotASize);
    }
    let shift = match suffix.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" => 10,
        "m" => 20,
        "g" => 30,
        "t" => 40,
        _ => return Err(ParseValueError::NotASize),
    };
    let number: u64 = digits.parse().map_err(|_| ParseValueError::SizeOverflow)?;
    number
        .checked_mul(1u64 << shift)
        .ok_or(ParseValueError::SizeOverflow)
}

struct SizeDisplay(u64);

impl fmt::Display for SizeDisplay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt_size(self.0, f)
    }
}

fn fmt_size(bytes: u64, f: &mut fmt::Formatter<'_>) -> fmt::Result {
    const SUFFIXES: [(u32, &str); 4] = [(40, "T"), (30, "G"), (20, "M"), (10, "K")];
    if bytes != 0 {
        for (shift, suffix) in SUFFIXES {
            let unit = 1u64 << shift;
            if bytes % unit == 0 {
                return write!(f, "{}{suffix}", bytes / unit);
            }
        }
    }
    write!(f, "{bytes}")
}

/// A 48-bit Ethernet MAC address, written `52:54:00:12:34:56` (hex, `:` or `-`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MacAddress(pub [u8; 6]);

impl MacAddress {
    /// The six octets.
    pub const fn octets(&self) -> [u8; 6] {
        self.0
    }

    /// True for a multicast (group) address, which a NIC must not use as its own.
    pub const fn is_multicast(&self) -> bool {
        self.0[0] & 1 == 1
    }
}

impl FromStr for MacAddress {
    type Err = ParseValueError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let separator = if text.contains('-') { '-' } else { ':' };
        let mut octets = [0u8; 6];
        let mut parts = text.split(separator);
        for octet in octets.iter_mut() {
            let part = parts.next().ok_or(ParseValueError::NotAMac)?;
            if part.len() != 2 || !part.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(ParseValueError::NotAMac);
            }
            *octet = u8::from_str_radix(part, 16).map_err(|_| ParseValueError::NotAMac)?;
        }
        if parts.next().is_some() {
            return Err(ParseValueError::NotAMac);
        }
        Ok(MacAddress(octets))
    }
}

impl fmt::Display for MacAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

impl PropertyKind {
    /// Parses `text` as a value of this kind, checking ranges and allowed values.
    pub fn parse(&self, text: &str) -> Result<PropertyValue, ParseValueError> {
        match *self {
            PropertyKind::Bool => parse_bool(text).map(PropertyValue::Bool),
            PropertyKind::Int {
                min,
                max,
                power_of_two,
            } => {
                let value = parse_int(text)?;
                self.check_int(value, min, max, power_of_two)?;
                Ok(PropertyValue::Int(value))
            }
            PropertyKind::Size { min, max } => {
                let value = parse_size(text)?;
                if value < min || value > max {
                    return Err(ParseValueError::SizeOutOfRange { value, min, max });
                }
                Ok(PropertyValue::Size(value))
            }
            PropertyKind::Str => Ok(PropertyValue::Str(Cow::Owned(text.to_owned()))),
            PropertyKind::Enum { allowed } => allowed
                .iter()
                .find(|candidate| **candidate == text)
                .map(|candidate| PropertyValue::Enum(candidate))
                .ok_or(ParseValueError::NotInEnum { allowed }),
            PropertyKind::Mac => text.parse().map(PropertyValue::Mac),
        }
    }

    /// Checks that an already-typed value (a schema default) fits this kind.
    pub fn check(&self, value: &PropertyValue) -> Result<(), ParseValueError> {
        match (*self, value) {
            (PropertyKind::Bool, PropertyValue::Bool(_)) => Ok(()),
            (
                PropertyKind::Int {
                    min,
                    max,
                    power_of_two,
                },
                PropertyValue::Int(v),
            ) => self.check_int(*v, min, max, power_of_two),
            (PropertyKind::Size { min, max }, PropertyValue::Size(v)) => {
                if *v < min || *v > max {
                    Err(ParseValueError::SizeOutOfRange {
                        value: *v,
                        min,
                        max,
                    })
                } else {
                    Ok(())
                }
            }
            (PropertyKind::Str, PropertyValue::Str(_)) => Ok(()),
            (PropertyKind::Enum { allowed }, PropertyValue::Enum(v)) => {
                if allowed.contains(v) {
                    Ok(())
                } else {
                    Err(ParseValueError::NotInEnum { allowed })
                }
            }
            (PropertyKind::Mac, PropertyValue::Mac(_)) => Ok(()),
            (kind, _) => Err(ParseValueError::WrongKind {
                expected: kind.notation(),
            }),
        }
    }

    fn check_int(
        &self,
        value: i64,
        min: i64,
        max: i64,
        power_of_two: bool,
    ) -> Result<(), ParseValueError> {
        if value < min || value > max {
            return Err(ParseValueError::IntOutOfRange { value, min, max });
        }
        if power_of_two && (value <= 0 || value & (value - 1) != 0) {
            return Err(ParseValueError::NotAPowerOfTwo { value });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bools() {
        for t in ["on", "true", "yes", "ON", "Yes"] {
            assert_eq!(parse_bool(t), Ok(true), "{t}");
        }
        for t in ["off", "false", "no", "OFF"] {
            assert_eq!(parse_bool(t), Ok(false), "{t}");
        }
        assert_eq!(parse_bool("1"), Err(ParseValueError::NotABool));
        assert_eq!(parse_bool(""), Err(ParseValueError::NotABool));
    }

    #[test]
    fn integers() {
        assert_eq!(parse_int("42"), Ok(42));
        assert_eq!(parse_int("-7"), Ok(-7));
        assert_eq!(parse_int("0x10"), Ok(16));
        assert_eq!(parse_int("9223372036854775807"), Ok(i64::MAX));
        assert_eq!(parse_int("-9223372036854775808"), Ok(i64::MIN));
        for bad in ["", "-", "0x", "4k", "1.5", "+3", "99999999999999999999"] {
            assert_eq!(parse_int(bad), Err(ParseValueError::NotAnInteger), "{bad}");
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("4k"), Ok(4096));
        assert_eq!(parse_size("4K"), Ok(4096));
        assert_eq!(parse_size("2M"), Ok(2 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("1t"), Ok(1 << 40));
        assert_eq!(parse_size("512b"), Ok(512));
        assert_eq!(parse_size("16777216T"), Err(ParseValueError::SizeOverflow));
        for bad in ["", "k", "4kb", "1.5G", "-1", "4 k", "2X"] {
            assert_eq!(parse_size(bad), Err(ParseValueError::NotASize), "{bad}");
        }
        assert_eq!(PropertyValue::Size(2 << 20).to_string(), "2M");
        assert_eq!(PropertyValue::Size(1536).to_string(), "1536");
        assert_eq!(PropertyValue::Size(0).to_string(), "0");
    }

    #[test]
    fn macs() {
        let mac: MacAddress = "52:54:00:AB:cd:0f".parse().unwrap();
        assert_eq!(mac.octets(), [0x52, 0x54, 0, 0xab, 0xcd, 0x0f]);
        assert_eq!(mac.to_string(), "52:54:00:ab:cd:0f");
        assert_eq!("52-54-00-ab-cd-0f".parse::<MacAddress>(), Ok(mac));
        assert!(!mac.is_multicast());
        assert!("01:00:5e:00:00:01"
            .parse::<MacAddress>()
            .unwrap()
            .is_multicast());
        for bad in [
            "",
            "52:54:00:ab:cd",
            "52:54:00:ab:cd:0f:00",
            "5:54:00:ab:cd:0f",
            "zz:54:00:ab:cd:0f",
        ] {
            assert_eq!(
                bad.parse::<MacAddress>(),
                Err(ParseValueError::NotAMac),
                "{bad}"
            );
        }
    }

    #[test]
    fn kinds() {
        let queues = PropertyKind::int(1, 16);
        assert_eq!(queues.parse("4"), Ok(PropertyValue::Int(4)));
        assert_eq!(
            queues.parse("17").unwrap_err().to_string(),
            "17 is out of range 1..=16"
        );
        let ring = PropertyKind::int(64, 1024).power_of_two();
        assert_eq!(
            ring.parse("100").unwrap_err().to_string(),
            "100 is not a power of two"
        );
        let mode = PropertyKind::Enum {
            allowed: &["auto", "split", "packed"],
        };
        assert_eq!(mode.parse("split"), Ok(PropertyValue::Enum("split")));
        assert_eq!(
            mode.parse("ring").unwrap_err().to_string(),
            "expected one of: auto, split, packed"
        );
        let mem = PropertyKind::size(4096, 1 << 30);
        assert_eq!(
            mem.parse("2G").unwrap_err().to_string(),
            "size 2G is out of range 4K..=1G"
        );
        assert_eq!(
            PropertyKind::size(0, u64::MAX)
                .check(&PropertyValue::Int(4096))
                .unwrap_err()
                .to_string(),
            "expected a value of type size"
        );
    }

    #[test]
    fn json() {
        let values = [
            PropertyValue::Bool(true),
            PropertyValue::Int(-3),
            PropertyValue::Size(4096),
            PropertyValue::str("tap0"),
            PropertyValue::Enum("split"),
            PropertyValue::Mac(MacAddress([0x52, 0x54, 0, 0, 0, 1])),
        ];
        let json = serde_json::to_string(&values).unwrap();
        assert_eq!(json, r#"[true,-3,4096,"tap0","split","52:54:00:00:00:01"]"#);
    }
}
