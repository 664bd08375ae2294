//! The schema of a piece of device state, as plain data.
//!
//! A [`VmStateDescription`] is what a device promises to put on the wire. It is built as a
//! `const` by `#[derive(VmState)]` (so it costs nothing at run time and can be inspected
//! without an instance), serialised to JSON for `--dump-vmstate` and for the trailer of every
//! migration stream, and deserialised again by tools that decode a stream they did not write
//! ([`crate::decode_to_json`]). The same type serves both uses: nested descriptions are held
//! by [`SchemaRef`], which is a `&'static` in the const form and a `Box` once parsed.

use std::borrow::Cow;
use std::fmt;
use std::ops::Deref;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A nested schema part: borrowed from a `const` description, or owned after parsing JSON.
#[derive(Clone)]
pub enum SchemaRef<T: 'static> {
    /// Part of a compile-time description.
    Static(&'static T),
    /// Part of a description read at run time (for example from a stream's trailer).
    Owned(Box<T>),
}

impl<T> Deref for SchemaRef<T> {
    type Target = T;
    fn deref(&self) -> &T {
        match self {
            SchemaRef::Static(t) => t,
            SchemaRef::Owned(t) => t,
        }
    }
}

impl<T: fmt::Debug> fmt::Debug for SchemaRef<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        (**self).fmt(f)
    }
}

impl<T: PartialEq> PartialEq for SchemaRef<T> {
    fn eq(&self, other: &Self) -> bool {
        **self == **other
    }
}

impl<T: Eq> Eq for SchemaRef<T> {}

impl<T: Serialize> Serialize for SchemaRef<T> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        (**self).serialize(s)
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for SchemaRef<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        T::deserialize(d).map(|t| SchemaRef::Owned(Box::new(t)))
    }
}

/// The wire type of one field.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum FieldKind {
    /// One byte, 0 or 1; any other value is refused.
    Bool,
    U8,
    U16,
    U32,
    U64,
    I8,
    I16,
    I32,
    I64,
    /// `len` elements, no length prefix.
    Array {
        len: u32,
        elem: SchemaRef<FieldKind>,
    },
    /// A `u32` length prefix, at most `max_len`, then the elements.
    Vec {
        max_len: u32,
        elem: SchemaRef<FieldKind>,
    },
    /// A `u32` byte-length prefix, at most `max_len`, then UTF-8 bytes.
    String {
        max_len: u32,
    },
    /// A nested state struct: its own `u32` version, its fields, its subsections.
    Struct {
        vmsd: SchemaRef<VmStateDescription>,
    },
    /// `size` bytes kept in place of a removed field; written as zeros, skipped on load.
    Unused {
        size: u32,
    },
}

impl FieldKind {
    /// Encoded size when it does not depend on the value.
    pub fn fixed_size(&self) -> Option<usize> {
        Some(match self {
            FieldKind::Bool | FieldKind::U8 | FieldKind::I8 => 1,
            FieldKind::U16 | FieldKind::I16 => 2,
            FieldKind::U32 | FieldKind::I32 => 4,
            FieldKind::U64 | FieldKind::I64 => 8,
            FieldKind::Unused { size } => *size as usize,
            FieldKind::Array { len, elem } => (*len as usize).checked_mul(elem.fixed_size()?)?,
            FieldKind::Vec { .. } | FieldKind::String { .. } | FieldKind::Struct { .. } => {
                return None
            }
        })
    }
}

/// One field of a description, in wire order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Field {
    pub name: Cow<'static, str>,
    #[serde(flatten)]
    pub kind: FieldKind,
    /// First version of the description that carries this field. Streams of an older
    /// version lack it and the loader keeps the field's default.
    pub since: u32,
}

/// An optional, named part of a description, present on the wire only when needed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Subsection {
    pub name: Cow<'static, str>,
    /// When the saver emits it, in words (the predicate itself is code).
    pub needed: Cow<'static, str>,
    pub vmsd: SchemaRef<VmStateDescription>,
}

/// A versioned description of a state struct.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmStateDescription {
    pub name: Cow<'static, str>,
    /// The version this build writes.
    pub version_id: u32,
    /// The oldest version this build still loads.
    pub minimum_version_id: u32,
    /// Sent during the setup phase while the source still runs.
    #[serde(default)]
    pub early_setup: bool,
    pub fields: Cow<'static, [Field]>,
    #[serde(default)]
    pub subsections: Cow<'static, [Subsection]>,
}

impl VmStateDescription {
    /// Whether a stream written at `version_id` can be loaded by this description.
    pub fn accepts_version(&self, version_id: u32) -> bool {
        (self.minimum_version_id..=self.version_id).contains(&version_id)
    }

    /// Pretty JSON of this description (what `--dump-vmstate` prints).
    pub fn to_json_pretty(&self) -> String {
        // Serialising plain data with string keys cannot fail.
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    /// Parse a description from JSON (for example a stream's trailing schema).
    pub fn from_json(json: &str) -> Result<Self, serde_json::Error> {
        serde_json::from_str(json)
    }
}
