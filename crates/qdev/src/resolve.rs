//! Layered property resolution with provenance.
//!
//! A property's value comes from four layers, later wins:
//! type default < machine-type compat < `--global` < explicit `--device` options.
//! Each resolved value keeps the layer that set it ([`Provenance`]), because "why is
//! backend-transfer off on net0?" must have an answer (`compat microvm-1.0`) that `help`
//! and QMP can show, and because migration compatibility depends on these values.
//!
//! An entry written for a parent type (`virtio-device.x=y`) applies to every subtype
//! that has property `x`; on a subtype without `x` it is skipped. An entry naming the
//! type itself and an unknown property is an error, unless it is an optional compat
//! entry.

use std::fmt;

use serde::Serialize;

use crate::cli::{DeviceSpec, GlobalProperty};
use crate::device_type::{DeviceType, TypeKind};
use crate::error::{DeviceLabel, InvalidValue, PropertyError, UnknownProperty};
use crate::registry::DeviceRegistry;
use crate::spec::{PropertyDefault, PropertySpec};
use crate::value::PropertyValue;

/// The layer that set a resolved value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "layer", rename_all = "kebab-case")]
pub enum Provenance {
    /// The type's schema default (or unset).
    Default,
    /// A compat entry of the machine type.
    Compat {
        /// The machine type in use, e.g. `microvm-1.0`.
        machine: String,
        /// The machine version whose compat array holds the entry (with cumulative
        /// arrays, `microvm-1.0` also applies the `microvm-1.1` array).
        table: String,
    },
    /// A `--global DRIVER.PROP=VALUE`.
    Global {
        /// The type the global named, which may be a parent of the device's type.
        driver: String,
    },
    /// An explicit `--device` option.
    Explicit,
}

/// `default`, `compat microvm-1.0`, `global`, `explicit`.
impl fmt::Display for Provenance {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Provenance::Default => f.write_str("default"),
            Provenance::Compat { machine, .. } => write!(f, "compat {machine}"),
            Provenance::Global { .. } => f.write_str("global"),
            Provenance::Explicit => f.write_str("explicit"),
        }
    }
}

/// One compat entry as applied by a machine type: the entry plus where it comes from.
/// Built by the machine-type registry; qdev only applies it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompatSetting {
    /// The machine type in use, e.g. `microvm-1.0`.
    pub machine: String,
    /// The machine version whose array holds the entry.
    pub table: String,
    /// Type name, concrete or abstract.
    pub driver: String,
    /// Property name.
    pub property: String,
    /// Value text.
    pub value: String,
    /// Skip silently when the driver is not registered or lacks the property.
    pub optional: bool,
}

impl CompatSetting {
    fn provenance(&self) -> Provenance {
        Provenance::Compat {
            machine: self.machine.clone(),
            table: self.table.clone(),
        }
    }
}

/// One property after resolution.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ResolvedProperty {
    /// The schema entry.
    #[serde(flatten)]
    pub spec: &'static PropertySpec,
    /// The value, `None` when unset.
    pub value: Option<PropertyValue>,
    /// The layer that set it.
    pub provenance: Provenance,
}

/// All properties of one device after resolution, in schema order (inherited first).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ResolvedProperties {
    /// The device type.
    #[serde(skip)]
    pub device_type: &'static DeviceType,
    /// The device type name.
    pub driver: &'static str,
    /// The device id, when resolving for a real device.
    pub id: Option<String>,
    /// Every property of the type, set or not.
    pub properties: Vec<ResolvedProperty>,
}

impl ResolvedProperties {
    /// Every property at its type default.
    pub fn defaults(device_type: &'static DeviceType, id: Option<&str>) -> Self {
        let properties = device_type
            .all_properties()
            .into_iter()
            .map(|spec| ResolvedProperty {
                spec,
                value: spec.default_as_value().cloned(),
                provenance: Provenance::Default,
            })
            .collect();
        ResolvedProperties {
            device_type,
            driver: device_type.name,
            id: id.map(str::to_owned),
            properties,
        }
    }

    /// The label used in messages about this device.
    pub fn label(&self) -> DeviceLabel {
        DeviceLabel::new(self.driver, self.id.as_deref())
    }

    /// The resolved property `name`.
    pub fn get(&self, name: &str) -> Option<&ResolvedProperty> {
        self.properties.iter().find(|p| p.spec.name == name)
    }

    /// The value of `name`, `None` when unset or not a property of this type.
    pub fn value(&self, name: &str) -> Option<&PropertyValue> {
        self.get(name).and_then(|p| p.value.as_ref())
    }

    /// Which layer set `name`.
    pub fn provenance(&self, name: &str) -> Option<&Provenance> {
        self.get(name).map(|p| &p.provenance)
    }

    /// Fails on the first required property that no layer set.
    pub fn check_required(&self) -> Result<(), PropertyError> {
        for property in &self.properties {
            if property.value.is_none() && property.spec.default == PropertyDefault::Required {
                return Err(PropertyError::MissingRequired {
                    target: self.label(),
                    property: property.spec.name,
                });
            }
        }
        Ok(())
    }

    /// Applies one `driver.property=value` from `set_by`, if `driver` matches this type.
    ///
    /// `optional` skips a missing property even when `driver` names this very type.
    pub fn apply(
        &mut self,
        driver: &str,
        property: &str,
        value: &str,
        set_by: Provenance,
        optional: bool,
    ) -> Result<(), PropertyError> {
        if !self.device_type.is_a(driver) {
            return Ok(());
        }
        let label = self.label();
        let Some(slot) = self.properties.iter_mut().find(|p| p.spec.name == property) else {
            if driver == self.driver && !optional {
                return Err(PropertyError::from(UnknownProperty {
                    target: label,
                    property: property.to_owned(),
                    value: value.to_owned(),
                    set_by,
                    known: self.device_type.property_names(),
                }));
            }
            return Ok(());
        };
        let parsed = slot.spec.kind.parse(value).map_err(|source| {
            PropertyError::from(InvalidValue {
                target: label,
                property: property.to_owned(),
                value: value.to_owned(),
                set_by: set_by.clone(),
                source,
            })
        })?;
        slot.value = Some(parsed);
        slot.provenance = set_by;
        Ok(())
    }
}

/// Resolves device properties against a registry, a machine type's compat settings and
/// the `--global`s. Build one per VM, then resolve every `--device` through it.
///
/// ```
/// use baton_qdev::*;
///
/// static NIC: DeviceType = DeviceType {
///     name: "test-nic",
///     parent: Some(&VIRTIO_DEVICE),
///     kind: TypeKind::Device,
///     doc: "A test NIC.",
///     properties: &[
///         PropertySpec::new("queues", PropertyKind::int(1, 16), "Queue pairs.").default_int(1),
///     ],
/// };
/// let registry = DeviceRegistry::with_types([&NIC])?;
/// let mut resolver = PropertyResolver::new(&registry);
/// resolver.add_global(GlobalProperty::parse("virtio-device.queues=2")?)?;
///
/// let props = resolver.resolve(&DeviceSpec::parse("test-nic,id=net0")?)?;
/// assert_eq!(props.value("queues"), Some(&PropertyValue::Int(2)));
/// assert_eq!(props.provenance("queues").unwrap().to_string(), "global");
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone)]
pub struct PropertyResolver<'r> {
    registry: &'r DeviceRegistry,
    compat: Vec<CompatSetting>,
    globals: Vec<GlobalProperty>,
}

impl<'r> PropertyResolver<'r> {
    /// A resolver with no compat settings and no globals.
    pub fn new(registry: &'r DeviceRegistry) -> Self {
        PropertyResolver {
            registry,
            compat: Vec::new(),
            globals: Vec::new(),
        }
    }

    /// The registry types are looked up in.
    pub fn registry(&self) -> &'r DeviceRegistry {
        self.registry
    }

    /// Adds a machine type's compat settings, in the order they apply (later wins).
    pub fn with_compat(mut self, settings: impl IntoIterator<Item = CompatSetting>) -> Self {
        self.compat.extend(settings);
        self
    }

    /// Adds a `--global`, after checking that its driver exists, that the driver or a
    /// registered subtype has the property, and that the value parses for each type
    /// that has it. Later globals win over earlier ones.
    pub fn add_global(&mut self, global: GlobalProperty) -> Result<(), PropertyError> {
        self.registry.check_setting(
            &global.driver,
            &global.property,
            &global.value,
            &Provenance::Global {
                driver: global.driver.clone(),
            },
        )?;
        self.globals.push(global);
        Ok(())
    }

    /// Resolves a `--device`: the type must be a creatable device, and every required
    /// property must end up set.
    pub fn resolve(&self, spec: &DeviceSpec) -> Result<ResolvedProperties, PropertyError> {
        let device_type = self.registry.get(&spec.driver)?;
        let what = match device_type.kind {
            TypeKind::Device => None,
            TypeKind::Abstract => Some("an abstract type"),
            TypeKind::Machine => Some("a machine property schema"),
        };
        if let Some(what) = what {
            return Err(PropertyError::NotCreatable {
                name: spec.driver.clone(),
                what,
            });
        }
        let resolved = self.resolve_type(device_type, spec.id.as_deref(), &spec.properties)?;
        resolved.check_required()?;
        Ok(resolved)
    }

    /// Resolves a type's properties without explicit options and without requiring
    /// anything: what `--device TYPE,help` and QMP `device-list-properties` show.
    pub fn describe(&self, driver: &str) -> Result<ResolvedProperties, PropertyError> {
        self.resolve_type(self.registry.get(driver)?, None, &[])
    }

    /// Resolves any type (including machine schemas) with the given explicit options.
    /// Does not check required properties; see [`ResolvedProperties::check_required`].
    pub fn resolve_type(
        &self,
        device_type: &'static DeviceType,
        id: Option<&str>,
        explicit: &[(String, String)],
    ) -> Result<ResolvedProperties, PropertyError> {
        let mut resolved = ResolvedProperties::defaults(device_type, id);
        for setting in &self.compat {
            resolved.apply(
                &setting.driver,
                &setting.property,
                &setting.value,
                setting.provenance(),
                setting.optional,
            )?;
        }
        for global in &self.globals {
            resolved.apply(
                &global.driver,
                &global.property,
                &global.value,
                Provenance::Global {
                    driver: global.driver.clone(),
                },
                false,
            )?;
        }
        for (i, (key, value)) in explicit.iter().enumerate() {
            if explicit[..i].iter().any(|(earlier, _)| earlier == key) {
                return Err(PropertyError::DuplicateProperty {
                    target: resolved.label(),
                    property: key.clone(),
                });
            }
            resolved.apply(device_type.name, key, value, Provenance::Explicit, false)?;
        }
        Ok(resolved)
    }
}
