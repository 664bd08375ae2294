//! The set of device types a VMM knows.
//!
//! The VMM builds one registry at start-up from the device crates it links (each exposes
//! `device_type()`), so which devices exist is decided by the VMM builder, not by this
//! crate. Registering validates the schema, so an inconsistent `props.rs` is caught on
//! the first run or test rather than when a user trips over it.

use std::collections::{BTreeMap, BTreeSet};

use crate::device_type::{DeviceType, SchemaError, TypeKind};
use crate::error::{DeviceLabel, InvalidValue, PropertyError, UnknownProperty};
use crate::resolve::Provenance;

/// Registered device types by name.
#[derive(Debug, Default, Clone)]
pub struct DeviceRegistry {
    types: BTreeMap<&'static str, &'static DeviceType>,
}

impl DeviceRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// A registry holding `types` (and their ancestors).
    pub fn with_types(
        types: impl IntoIterator<Item = &'static DeviceType>,
    ) -> Result<Self, SchemaError> {
        let mut registry = Self::new();
        for ty in types {
            registry.register(ty)?;
        }
        Ok(registry)
    }

    /// Registers `ty` and every ancestor, after validating its schema. Registering the
    /// same `static` again is a no-op; a different type under a taken name is an error.
    pub fn register(&mut self, ty: &'static DeviceType) -> Result<(), SchemaError> {
        ty.validate()?;
        for t in ty.ancestry() {
            match self.types.get(t.name) {
                Some(existing) if std::ptr::eq(*existing, t) => {}
                Some(_) => return Err(SchemaError::DuplicateType { type_name: t.name }),
                None => {
                    self.types.insert(t.name, t);
                }
            }
        }
        Ok(())
    }

    /// The type named `name`, or an error listing the known names.
    pub fn get(&self, name: &str) -> Result<&'static DeviceType, PropertyError> {
        self.types
            .get(name)
            .copied()
            .ok_or_else(|| PropertyError::UnknownDeviceType {
                name: name.to_owned(),
                known: self.known_names(),
            })
    }

    /// True if a type named `name` is registered.
    pub fn contains(&self, name: &str) -> bool {
        self.types.contains_key(name)
    }

    /// All registered types, by name.
    pub fn iter(&self) -> impl Iterator<Item = &'static DeviceType> + '_ {
        self.types.values().copied()
    }

    /// Every registered type that is `name` or descends from it.
    pub fn types_matching(&self, name: &str) -> Vec<&'static DeviceType> {
        self.types
            .values()
            .copied()
            .filter(|t| t.is_a(name))
            .collect()
    }

    /// Names for error messages; abstract and machine types are marked.
    pub fn known_names(&self) -> Vec<String> {
        self.types
            .values()
            .map(|t| match t.kind {
                TypeKind::Device => t.name.to_owned(),
                TypeKind::Abstract => format!("{} (abstract)", t.name),
                TypeKind::Machine => format!("{} (machine)", t.name),
            })
            .collect()
    }

    /// Checks one `driver.property=value` setting (a `--global` or a compat entry)
    /// without a device: the driver must be registered; it or one of its registered
    /// subtypes must have the property; and the value must parse for every registered
    /// type that has it. `set_by` only labels the error.
    pub fn check_setting(
        &self,
        driver: &str,
        property: &str,
        value: &str,
        set_by: &Provenance,
    ) -> Result<(), PropertyError> {
        self.get(driver)?;
        let target = DeviceLabel::new(driver, None);
        let mut found = false;
        let mut known = BTreeSet::new();
        for ty in self.types_matching(driver) {
            known.extend(ty.property_names());
            let Some(spec) = ty.property(property) else {
                continue;
            };
            found = true;
            spec.kind.parse(value).map_err(|source| {
                PropertyError::from(InvalidValue {
                    target: target.clone(),
                    property: property.to_owned(),
                    value: value.to_owned(),
                    set_by: set_by.clone(),
                    source,
                })
            })?;
        }
        if found {
            Ok(())
        } else {
            Err(PropertyError::from(UnknownProperty {
                target,
                property: property.to_owned(),
                value: value.to_owned(),
                set_by: set_by.clone(),
                known: known.into_iter().collect(),
            }))
        }
    }
}
