//! Typed reads of resolved properties, for device code.
//!
//! A device turns its [`ResolvedProperties`] into its own config struct once, at
//! creation. A name typo or a type mismatch there is a bug in the device crate, but it
//! is still reported as an error (naming the device and property) rather than a panic.

use thiserror::Error;

use crate::error::DeviceLabel;
use crate::resolve::ResolvedProperties;
use crate::value::{MacAddress, PropertyValue};

/// A device read a property that is absent, unset, or of another type.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{target}: property '{property}' {problem}")]
pub struct PropertyAccessError {
    /// The device.
    pub target: DeviceLabel,
    /// The property read.
    pub property: String,
    /// `does not exist`, `is unset`, `is not a bool`, ...
    pub problem: String,
}

/// Conversion from a resolved value to a Rust type.
pub trait FromPropertyValue: Sized {
    /// What the conversion expects, for errors (`a bool`).
    const EXPECTED: &'static str;

    /// The converted value, or `None` if `value` has another type or does not fit.
    fn from_property_value(value: &PropertyValue) -> Option<Self>;
}

impl FromPropertyValue for bool {
    const EXPECTED: &'static str = "a bool";
    fn from_property_value(value: &PropertyValue) -> Option<Self> {
        value.as_bool()
    }
}

impl FromPropertyValue for i64 {
    const EXPECTED: &'static str = "an integer";
    fn from_property_value(value: &PropertyValue) -> Option<Self> {
        value.as_int()
    }
}

macro_rules! unsigned_from_int {
    ($($t:ty),*) => {$(
        impl FromPropertyValue for $t {
            const EXPECTED: &'static str = concat!("an integer that fits ", stringify!($t));
            fn from_property_value(value: &PropertyValue) -> Option<Self> {
                match value {
                    PropertyValue::Int(i) => <$t>::try_from(*i).ok(),
                    PropertyValue::Size(s) => <$t>::try_from(*s).ok(),
                    _ => None,
                }
            }
        }
    )*};
}
unsigned_from_int!(u8, u16, u32, u64, usize);

impl FromPropertyValue for String {
    const EXPECTED: &'static str = "a string";
    fn from_property_value(value: &PropertyValue) -> Option<Self> {
        value.as_str().map(str::to_owned)
    }
}

impl FromPropertyValue for MacAddress {
    const EXPECTED: &'static str = "a MAC address";
    fn from_property_value(value: &PropertyValue) -> Option<Self> {
        value.as_mac()
    }
}

impl ResolvedProperties {
    /// The value of `name` as `T`, `Ok(None)` when unset.
    ///
    /// ```
    /// # use baton_qdev::*;
    /// # static T: DeviceType = DeviceType { name: "t", parent: None, kind: TypeKind::Device,
    /// #     doc: "", properties: &[PropertySpec::new("queues", PropertyKind::int(1, 16), "").default_int(2),
    /// #                            PropertySpec::new("mac", PropertyKind::Mac, "")] };
    /// let props = ResolvedProperties::defaults(&T, Some("net0"));
    /// let queues: u16 = props.require("queues")?;
    /// let mac: Option<MacAddress> = props.optional("mac")?;
    /// assert_eq!((queues, mac), (2, None));
    /// # Ok::<(), PropertyAccessError>(())
    /// ```
    pub fn optional<T: FromPropertyValue>(
        &self,
        name: &str,
    ) -> Result<Option<T>, PropertyAccessError> {
        let error = |problem: String| PropertyAccessError {
            target: self.label(),
            property: name.to_owned(),
            problem,
        };
        let property = self
            .get(name)
            .ok_or_else(|| error("does not exist".to_owned()))?;
        match &property.value {
            None => Ok(None),
            Some(value) => T::from_property_value(value)
                .map(Some)
                .ok_or_else(|| error(format!("is '{value}', not {}", T::EXPECTED))),
        }
    }

    /// The value of `name` as `T`; unset is an error.
    pub fn require<T: FromPropertyValue>(&self, name: &str) -> Result<T, PropertyAccessError> {
        self.optional(name)?.ok_or_else(|| PropertyAccessError {
            target: self.label(),
            property: name.to_owned(),
            problem: "is unset".to_owned(),
        })
    }
}
