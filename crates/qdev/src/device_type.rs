//! Device types: a name, an optional parent, and a property schema.
//!
//! Types form a single-inheritance tree through `&'static` parent links, so a type knows
//! its ancestors without any registry. That tree is what lets a compat entry or a
//! `--global` written for an abstract parent (`virtio-device.x=y`) reach every subtype
//! that has the property, as in QEMU.

use std::collections::BTreeSet;
use std::fmt;

use serde::Serialize;
use thiserror::Error;

use crate::spec::{PropertyDefault, PropertySpec};
use crate::value::ParseValueError;

/// What a type is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum TypeKind {
    /// A device users create with `--device`.
    Device,
    /// A parent that only exists to be matched and inherited from (`virtio-device`).
    Abstract,
    /// The property schema of a machine family (`microvm-machine`); set with `-M` and
    /// compat entries, never created with `--device`.
    Machine,
}

/// A device type.
///
/// Written as a `static` in the device crate's `props.rs`:
///
/// ```
/// use baton_qdev::{DeviceType, PropertyKind, PropertySpec, TypeKind, VIRTIO_DEVICE};
///
/// pub static VIRTIO_RNG: DeviceType = DeviceType {
///     name: "virtio-rng",
///     parent: Some(&VIRTIO_DEVICE),
///     kind: TypeKind::Device,
///     doc: "Entropy source.",
///     properties: &[
///         PropertySpec::new("max-bytes", PropertyKind::any_int(), "Rate limit per period.")
///             .default_int(i64::MAX),
///     ],
/// };
/// assert!(VIRTIO_RNG.is_a("virtio-device"));
/// assert!(VIRTIO_RNG.validate().is_ok());
/// ```
#[derive(Debug)]
pub struct DeviceType {
    /// The type name used by `--device`, `--global` and compat entries.
    pub name: &'static str,
    /// The parent type, usually abstract.
    pub parent: Option<&'static DeviceType>,
    /// Device, abstract parent, or machine schema.
    pub kind: TypeKind,
    /// One line that says what the type is.
    pub doc: &'static str,
    /// This type's own properties; inherited ones come from `parent`.
    pub properties: &'static [PropertySpec],
}

/// The abstract parent of every virtio device. It declares no property of its own; it
/// is what compat entries and globals meant for all virtio devices name.
pub static VIRTIO_DEVICE: DeviceType = DeviceType {
    name: "virtio-device",
    parent: None,
    kind: TypeKind::Abstract,
    doc: "Abstract parent of all virtio devices",
    properties: &[],
};

/// A device type whose schema is inconsistent; found when it is registered, so a broken
/// `props.rs` fails the first test that registers it.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SchemaError {
    /// Two properties (own or inherited) share a name.
    #[error("device type {type_name}: property '{property}' is declared twice")]
    DuplicateProperty {
        /// The type being checked.
        type_name: &'static str,
        /// The repeated property name.
        property: &'static str,
    },
    /// A property name that the command-line syntax cannot carry.
    #[error("device type {type_name}: property name '{property}' is invalid: {reason}")]
    BadPropertyName {
        /// The type being checked.
        type_name: &'static str,
        /// The offending name.
        property: &'static str,
        /// Why it is invalid.
        reason: &'static str,
    },
    /// A type name that the command-line syntax cannot carry.
    #[error("device type name '{type_name}' is invalid: {reason}")]
    BadTypeName {
        /// The offending name.
        type_name: &'static str,
        /// Why it is invalid.
        reason: &'static str,
    },
    /// A default value that does not fit the property's own kind.
    #[error("device type {type_name}: default '{default}' of property '{property}' is invalid: {source}")]
    BadDefault {
        /// The type being checked.
        type_name: &'static str,
        /// The property.
        property: &'static str,
        /// The default, as text.
        default: String,
        /// Why it does not fit.
        source: ParseValueError,
    },
    /// A range whose minimum exceeds its maximum, or an empty enum.
    #[error("device type {type_name}: property '{property}' allows no value")]
    EmptyDomain {
        /// The type being checked.
        type_name: &'static str,
        /// The property.
        property: &'static str,
    },
    /// Two different types with the same name were registered.
    #[error("device type '{type_name}' is registered twice by different definitions")]
    DuplicateType {
        /// The contested name.
        type_name: &'static str,
    },
    /// A parent that is itself a device or machine schema, or a parent chain that loops.
    #[error("device type {type_name}: parent '{parent}' is not an abstract type")]
    BadParent {
        /// The type being checked.
        type_name: &'static str,
        /// Its parent.
        parent: &'static str,
    },
}

/// Names reserved by the `--device` syntax.
const RESERVED_NAMES: [&str; 3] = ["id", "driver", "help"];

impl DeviceType {
    /// This type, then its parent, grandparent, ...
    pub fn ancestry(&'static self) -> impl Iterator<Item = &'static DeviceType> {
        std::iter::successors(Some(self), |t| t.parent)
    }

    /// True if this type is `name` or descends from it.
    pub fn is_a(&'static self, name: &str) -> bool {
        self.ancestry().any(|t| t.name == name)
    }

    /// All properties, inherited ones first (the root's), then this type's own.
    pub fn all_properties(&'static self) -> Vec<&'static PropertySpec> {
        let mut chain: Vec<&'static DeviceType> = self.ancestry().collect();
        chain.reverse();
        chain.iter().flat_map(|t| t.properties.iter()).collect()
    }

    /// The property named `name`, own or inherited.
    pub fn property(&'static self, name: &str) -> Option<&'static PropertySpec> {
        self.ancestry()
            .flat_map(|t| t.properties.iter())
            .find(|p| p.name == name)
    }

    /// The names of all properties, sorted, for error messages.
    pub fn property_names(&'static self) -> Vec<&'static str> {
        let names: BTreeSet<&'static str> = self.all_properties().iter().map(|p| p.name).collect();
        names.into_iter().collect()
    }

    /// Checks the schema: names, unique properties, non-empty domains, defaults that
    /// fit their kinds, an abstract parent chain.
    pub fn validate(&'static self) -> Result<(), SchemaError> {
        check_name(self.name).map_err(|reason| SchemaError::BadTypeName {
            type_name: self.name,
            reason,
        })?;
        let mut depth = 0;
        for ancestor in self.ancestry().skip(1) {
            depth += 1;
            if ancestor.kind != TypeKind::Abstract || depth > 32 {
                return Err(SchemaError::BadParent {
                    type_name: self.name,
                    parent: ancestor.name,
                });
            }
        }
        let mut seen = BTreeSet::new();
        for spec in self.all_properties() {
            if !seen.insert(spec.name) {
                return Err(SchemaError::DuplicateProperty {
                    type_name: self.name,
                    property: spec.name,
                });
            }
            self.validate_property(spec)?;
        }
        Ok(())
    }

    fn validate_property(&'static self, spec: &'static PropertySpec) -> Result<(), SchemaError> {
        use crate::spec::PropertyKind;

        check_name(spec.name).map_err(|reason| SchemaError::BadPropertyName {
            type_name: self.name,
            property: spec.name,
            reason,
        })?;
        if RESERVED_NAMES.contains(&spec.name) {
            return Err(SchemaError::BadPropertyName {
                type_name: self.name,
                property: spec.name,
                reason: "reserved by the --device syntax",
            });
        }
        let empty = match spec.kind {
            PropertyKind::Int { min, max, .. } => min > max,
            PropertyKind::Size { min, max } => min > max,
            PropertyKind::Enum { allowed } => allowed.is_empty(),
            _ => false,
        };
        if empty {
            return Err(SchemaError::EmptyDomain {
                type_name: self.name,
                property: spec.name,
            });
        }
        if let PropertyDefault::Value(value) = &spec.default {
            spec.kind
                .check(value)
                .map_err(|source| SchemaError::BadDefault {
                    type_name: self.name,
                    property: spec.name,
                    default: value.to_string(),
                    source,
                })?;
        }
        Ok(())
    }
}

fn check_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("empty");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
    {
        return Err("use lowercase letters, digits, '-' and '_'");
    }
    Ok(())
}

/// Types are identified by their `static`: two types are equal only if they are the same
/// definition.
impl PartialEq for DeviceType {
    fn eq(&self, other: &Self) -> bool {
        std::ptr::eq(self, other)
    }
}

impl Eq for DeviceType {}

impl fmt::Display for DeviceType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::PropertyKind;
    use crate::value::PropertyValue;

    static BASE: DeviceType = DeviceType {
        name: "test-base",
        parent: Some(&VIRTIO_DEVICE),
        kind: TypeKind::Abstract,
        doc: "",
        properties: &[PropertySpec::new("a", PropertyKind::Bool, "").default_bool(true)],
    };
    static CHILD: DeviceType = DeviceType {
        name: "test-child",
        parent: Some(&BASE),
        kind: TypeKind::Device,
        doc: "",
        properties: &[PropertySpec::new("b", PropertyKind::int(0, 3), "").default_int(2)],
    };

    #[test]
    fn inheritance() {
        assert!(CHILD.is_a("test-child") && CHILD.is_a("test-base") && CHILD.is_a("virtio-device"));
        assert!(!BASE.is_a("test-child"));
        let names: Vec<_> = CHILD.all_properties().iter().map(|p| p.name).collect();
        assert_eq!(names, ["a", "b"]);
        assert!(CHILD.property("a").is_some());
        assert!(BASE.property("b").is_none());
        assert_eq!(CHILD.validate(), Ok(()));
    }

    #[test]
    fn schema_errors() {
        static DUP: DeviceType = DeviceType {
            name: "dup",
            parent: Some(&BASE),
            kind: TypeKind::Device,
            doc: "",
            properties: &[PropertySpec::new("a", PropertyKind::Bool, "")],
        };
        assert_eq!(
            DUP.validate().unwrap_err().to_string(),
            "device type dup: property 'a' is declared twice"
        );
        static BAD_DEFAULT: DeviceType = DeviceType {
            name: "bad-default",
            parent: None,
            kind: TypeKind::Device,
            doc: "",
            properties: &[PropertySpec::new("q", PropertyKind::int(1, 4), "").default_int(8)],
        };
        assert_eq!(
            BAD_DEFAULT.validate().unwrap_err().to_string(),
            "device type bad-default: default '8' of property 'q' is invalid: 8 is out of range 1..=4"
        );
        static BAD_ENUM: DeviceType = DeviceType {
            name: "bad-enum",
            parent: None,
            kind: TypeKind::Device,
            doc: "",
            properties: &[
                PropertySpec::new("m", PropertyKind::Enum { allowed: &["x"] }, "")
                    .default_value(PropertyValue::Enum("y")),
            ],
        };
        assert!(matches!(
            BAD_ENUM.validate(),
            Err(SchemaError::BadDefault { .. })
        ));
        static RESERVED: DeviceType = DeviceType {
            name: "reserved",
            parent: None,
            kind: TypeKind::Device,
            doc: "",
            properties: &[PropertySpec::new("id", PropertyKind::Str, "")],
        };
        assert!(matches!(
            RESERVED.validate(),
            Err(SchemaError::BadPropertyName { .. })
        ));
        static DEVICE_PARENT: DeviceType = DeviceType {
            name: "grandchild",
            parent: Some(&CHILD),
            kind: TypeKind::Device,
            doc: "",
            properties: &[],
        };
        assert_eq!(
            DEVICE_PARENT.validate().unwrap_err().to_string(),
            "device type grandchild: parent 'test-child' is not an abstract type"
        );
    }
}
