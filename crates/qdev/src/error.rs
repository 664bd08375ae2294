//! Errors a user or a table author can cause.
//!
//! Each message names the device, the property, the offending text and the layer that
//! supplied it, so that `--global virtio-device.queues=0` failing on `net0` reads as
//! exactly that rather than as a generic parse error.

use std::fmt;

use serde::Serialize;
use thiserror::Error;

use crate::resolve::Provenance;
use crate::value::ParseValueError;

/// Which device (or type) a message is about.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeviceLabel {
    /// The device type.
    pub driver: String,
    /// The device id, when there is one (a global or compat entry has none).
    pub id: Option<String>,
}

impl DeviceLabel {
    /// A label for device `id` of type `driver`.
    pub fn new(driver: impl Into<String>, id: Option<&str>) -> Self {
        DeviceLabel {
            driver: driver.into(),
            id: id.map(str::to_owned),
        }
    }
}

/// `device 'net0' (virtio-net-tap)`, or just the type name without an id.
impl fmt::Display for DeviceLabel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.id {
            Some(id) => write!(f, "device '{id}' ({})", self.driver),
            None => f.write_str(&self.driver),
        }
    }
}

/// A list for a message: `a, b, c`, or `(none)`.
pub(crate) struct NameList<'a, T>(pub &'a [T]);

impl<T: fmt::Display> fmt::Display for NameList<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str("(none)");
        }
        for (i, name) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{name}")?;
        }
        Ok(())
    }
}

/// Errors from parsing `--device`/`--global` and from resolving properties.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum PropertyError {
    /// The option text is malformed.
    #[error("invalid {option} '{input}': {reason}")]
    Syntax {
        /// `--device` or `--global`.
        option: &'static str,
        /// The whole option text.
        input: String,
        /// What is wrong with it.
        reason: String,
    },
    /// No registered type has this name.
    #[error("unknown device type '{name}'; known types: {}", NameList(known))]
    UnknownDeviceType {
        /// The name asked for.
        name: String,
        /// The registered names.
        known: Vec<String>,
    },
    /// An abstract parent or a machine schema given to `--device`.
    #[error("device type '{name}' cannot be created with --device: it is {what}")]
    NotCreatable {
        /// The type name.
        name: String,
        /// `an abstract type` or `a machine property schema`.
        what: &'static str,
    },
    /// A property the type does not have.
    #[error(transparent)]
    UnknownProperty(Box<UnknownProperty>),
    /// A value that does not parse as the property's type.
    #[error(transparent)]
    InvalidValue(Box<InvalidValue>),
    /// A required property no layer set.
    #[error("{target}: property '{property}' is required")]
    MissingRequired {
        /// The device.
        target: DeviceLabel,
        /// The property.
        property: &'static str,
    },
    /// The same property twice in one `--device`.
    #[error("{target}: property '{property}' is given twice")]
    DuplicateProperty {
        /// The device.
        target: DeviceLabel,
        /// The property.
        property: String,
    },
}

/// A setting names a property the type (or, for a parent, any subtype) does not have.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error(
    "{target}: unknown property '{property}={value}' ({set_by}); known properties: {}",
    NameList(known)
)]
pub struct UnknownProperty {
    /// The device or type.
    pub target: DeviceLabel,
    /// The unknown name.
    pub property: String,
    /// The value it was given.
    pub value: String,
    /// The layer that gave it.
    pub set_by: Provenance,
    /// The properties that do exist.
    pub known: Vec<&'static str>,
}

/// A setting's value does not parse as the property's type.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{target}: invalid value '{value}' for property '{property}' ({set_by}): {source}")]
pub struct InvalidValue {
    /// The device or type.
    pub target: DeviceLabel,
    /// The property.
    pub property: String,
    /// The offending text.
    pub value: String,
    /// The layer that gave it.
    pub set_by: Provenance,
    /// Why it does not parse.
    pub source: ParseValueError,
}

impl From<UnknownProperty> for PropertyError {
    fn from(error: UnknownProperty) -> Self {
        PropertyError::UnknownProperty(Box::new(error))
    }
}

impl From<InvalidValue> for PropertyError {
    fn from(error: InvalidValue) -> Self {
        PropertyError::InvalidValue(Box::new(error))
    }
}
