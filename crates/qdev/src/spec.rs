//! Declarative property schemas.
//!
//! A device's properties are data, written once as a `static` array of
//! [`PropertySpec`]s next to the device (its `props.rs`), in the spirit of QEMU's
//! `DEFINE_PROP_*` tables. Being data, the same array drives parsing, `help`,
//! QMP introspection and the test that validates every machine type's compat table.

use serde::ser::SerializeMap;
use serde::{Serialize, Serializer};

use crate::value::PropertyValue;

/// The type of a property, with the constraints a value must meet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PropertyKind {
    /// `on/off`, `true/false`, `yes/no`.
    Bool,
    /// An integer in `min..=max`, optionally restricted to powers of two.
    Int {
        /// Smallest allowed value.
        min: i64,
        /// Largest allowed value.
        max: i64,
        /// Only powers of two are allowed (virtqueue sizes).
        power_of_two: bool,
    },
    /// A byte count in `min..=max`, written `4096`, `4k`, `2M`, `1G`.
    Size {
        /// Smallest allowed size in bytes.
        min: u64,
        /// Largest allowed size in bytes.
        max: u64,
    },
    /// Free text.
    Str,
    /// One of a fixed set of words.
    Enum {
        /// The allowed values, in the order `help` lists them.
        allowed: &'static [&'static str],
    },
    /// A MAC address.
    Mac,
}

impl PropertyKind {
    /// An integer property with an inclusive range.
    pub const fn int(min: i64, max: i64) -> Self {
        PropertyKind::Int {
            min,
            max,
            power_of_two: false,
        }
    }

    /// An integer property with no range beyond `i64`.
    pub const fn any_int() -> Self {
        PropertyKind::int(i64::MIN, i64::MAX)
    }

    /// A size property with an inclusive range in bytes.
    pub const fn size(min: u64, max: u64) -> Self {
        PropertyKind::Size { min, max }
    }

    /// The same integer kind, restricted to powers of two. Other kinds are unchanged.
    pub const fn power_of_two(self) -> Self {
        match self {
            PropertyKind::Int { min, max, .. } => PropertyKind::Int {
                min,
                max,
                power_of_two: true,
            },
            other => other,
        }
    }

    /// A short notation for `help`: `bool`, `int 1..=16`, `one of: a|b`, ...
    pub fn notation(&self) -> String {
        match *self {
            PropertyKind::Bool => "bool".to_owned(),
            PropertyKind::Int {
                min,
                max,
                power_of_two,
            } => {
                let mut text = if min == i64::MIN && max == i64::MAX {
                    "int".to_owned()
                } else {
                    format!("int {min}..={max}")
                };
                if power_of_two {
                    text.push_str(", power of two");
                }
                text
            }
            PropertyKind::Size { min, max } => {
                if min == 0 && max == u64::MAX {
                    "size".to_owned()
                } else {
                    format!(
                        "size {}..={}",
                        PropertyValue::Size(min),
                        PropertyValue::Size(max)
                    )
                }
            }
            PropertyKind::Str => "string".to_owned(),
            PropertyKind::Enum { allowed } => format!("one of: {}", allowed.join("|")),
            PropertyKind::Mac => "mac".to_owned(),
        }
    }
}

/// What a property is when no layer sets it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PropertyDefault {
    /// This value.
    Value(PropertyValue),
    /// No value; the device decides what absence means (say so in the doc line).
    Unset,
    /// No value, and creating a device without one is an error.
    Required,
}

/// One property of a device type: name, type, default, and a doc line.
///
/// ```
/// use baton_qdev::{PropertyKind, PropertySpec};
///
/// static PROPS: &[PropertySpec] = &[
///     PropertySpec::new("queues", PropertyKind::int(1, 16), "Number of queue pairs.")
///         .default_int(1),
///     PropertySpec::new("ifname", PropertyKind::Str, "Host interface name.").required(),
/// ];
/// # assert_eq!(PROPS.len(), 2);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PropertySpec {
    /// The name used on the command line (`kebab-case`).
    pub name: &'static str,
    /// Type and constraints.
    pub kind: PropertyKind,
    /// The type default, the lowest layer.
    pub default: PropertyDefault,
    /// One line that says what the property does.
    pub doc: &'static str,
}

impl PropertySpec {
    /// A property with no default value ([`PropertyDefault::Unset`]).
    pub const fn new(name: &'static str, kind: PropertyKind, doc: &'static str) -> Self {
        PropertySpec {
            name,
            kind,
            default: PropertyDefault::Unset,
            doc,
        }
    }

    /// Sets the default to a typed value.
    pub const fn default_value(self, value: PropertyValue) -> Self {
        self.with_default(PropertyDefault::Value(value))
    }

    /// Sets a boolean default.
    pub const fn default_bool(self, value: bool) -> Self {
        self.default_value(PropertyValue::Bool(value))
    }

    /// Sets an integer default.
    pub const fn default_int(self, value: i64) -> Self {
        self.default_value(PropertyValue::Int(value))
    }

    /// Sets a size default, in bytes.
    pub const fn default_size(self, bytes: u64) -> Self {
        self.default_value(PropertyValue::Size(bytes))
    }

    /// Sets a string default.
    pub const fn default_str(self, value: &'static str) -> Self {
        self.default_value(PropertyValue::str(value))
    }

    /// Sets an enum default; it must be one of the kind's allowed values (checked when
    /// the type is registered).
    pub const fn default_enum(self, value: &'static str) -> Self {
        self.default_value(PropertyValue::Enum(value))
    }

    /// Makes the property mandatory.
    pub const fn required(self) -> Self {
        self.with_default(PropertyDefault::Required)
    }

    const fn with_default(self, default: PropertyDefault) -> Self {
        let (name, kind, doc) = (self.name, self.kind, self.doc);
        // A const fn cannot run a destructor; the replaced default is `Unset` or holds
        // only borrowed data when built through these methods, so nothing leaks.
        std::mem::forget(self);
        PropertySpec {
            name,
            kind,
            default,
            doc,
        }
    }

    /// The default value, if there is one.
    pub fn default_as_value(&self) -> Option<&PropertyValue> {
        match &self.default {
            PropertyDefault::Value(v) => Some(v),
            _ => None,
        }
    }
}

/// JSON form (QMP `device-list-properties` style):
/// `{"name":"queues","type":"int","min":1,"max":16,"default":1,"doc":"..."}`; a required
/// property has `"required":true`, an unset default has no `"default"`.
impl Serialize for PropertySpec {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(None)?;
        map.serialize_entry("name", self.name)?;
        serialize_kind_fields(&self.kind, &mut map)?;
        match &self.default {
            PropertyDefault::Value(v) => map.serialize_entry("default", v)?,
            PropertyDefault::Unset => {}
            PropertyDefault::Required => map.serialize_entry("required", &true)?,
        }
        map.serialize_entry("doc", self.doc)?;
        map.end()
    }
}

/// JSON form: `{"type":"int","min":1,"max":16}`, `{"type":"enum","allowed":[...]}`, ...
impl Serialize for PropertyKind {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(None)?;
        serialize_kind_fields(self, &mut map)?;
        map.end()
    }
}

fn serialize_kind_fields<M: SerializeMap>(
    kind: &PropertyKind,
    map: &mut M,
) -> Result<(), M::Error> {
    match *kind {
        PropertyKind::Bool => map.serialize_entry("type", "bool"),
        PropertyKind::Int {
            min,
            max,
            power_of_two,
        } => {
            map.serialize_entry("type", "int")?;
            map.serialize_entry("min", &min)?;
            map.serialize_entry("max", &max)?;
            if power_of_two {
                map.serialize_entry("power-of-two", &true)?;
            }
            Ok(())
        }
        PropertyKind::Size { min, max } => {
            map.serialize_entry("type", "size")?;
            map.serialize_entry("min", &min)?;
            map.serialize_entry("max", &max)
        }
        PropertyKind::Str => map.serialize_entry("type", "string"),
        PropertyKind::Enum { allowed } => {
            map.serialize_entry("type", "enum")?;
            map.serialize_entry("allowed", allowed)
        }
        PropertyKind::Mac => map.serialize_entry("type", "mac"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_json() {
        let spec = PropertySpec::new(
            "queue-size",
            PropertyKind::int(64, 1024).power_of_two(),
            "Ring size.",
        )
        .default_int(256);
        assert_eq!(
            serde_json::to_string(&spec).unwrap(),
            r#"{"name":"queue-size","type":"int","min":64,"max":1024,"power-of-two":true,"default":256,"doc":"Ring size."}"#
        );
        let spec = PropertySpec::new("socket", PropertyKind::Str, "Path.").required();
        assert_eq!(
            serde_json::to_string(&spec).unwrap(),
            r#"{"name":"socket","type":"string","required":true,"doc":"Path."}"#
        );
    }

    #[test]
    fn notation() {
        assert_eq!(PropertyKind::int(1, 16).notation(), "int 1..=16");
        assert_eq!(
            PropertyKind::int(64, 1024).power_of_two().notation(),
            "int 64..=1024, power of two"
        );
        assert_eq!(PropertyKind::size(4096, 1 << 30).notation(), "size 4K..=1G");
        assert_eq!(
            PropertyKind::Enum {
                allowed: &["a", "b"]
            }
            .notation(),
            "one of: a|b"
        );
    }
}
