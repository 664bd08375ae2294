//! Validation of compat tables against device property schemas.
//!
//! A compat entry is text until a device of its type is created on an old machine
//! version, which may be never in CI and always on some user's host. So every entry of
//! every version is checked in tests against the schemas of all baton devices: the
//! driver must exist (unless the entry is optional), the property must exist, and the
//! value must parse. `machine-types/tests/compat_tables.rs` runs this on the shipped
//! tables.

use std::collections::BTreeSet;
use std::fmt;

use baton_qdev::{DeviceRegistry, PropertyError, Provenance};
use thiserror::Error;

use crate::compat::CompatEntry;
use crate::machine::{version_name, MachineFamily};
use crate::registry::MachineRegistry;

/// One compat entry that does not fit the schemas.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompatProblem {
    /// The machine version whose array holds the entry.
    pub machine: String,
    /// The entry.
    pub entry: CompatEntry,
    /// What is wrong with it.
    pub reason: String,
}

/// `microvm-1.0: compat entry virtio-net-tap.queues=0: ...`
impl fmt::Display for CompatProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: compat entry {}: {}",
            self.machine, self.entry, self.reason
        )
    }
}

/// Every problem found in the machine tables.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub struct CompatCheckError {
    /// The problems, in table order.
    pub problems: Vec<CompatProblem>,
}

impl fmt::Display for CompatCheckError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let count = self.problems.len();
        let noun = if count == 1 { "entry" } else { "entries" };
        write!(f, "{count} compat {noun} do not match the device schemas:")?;
        for problem in &self.problems {
            write!(f, "\n  {problem}")?;
        }
        Ok(())
    }
}

/// Checks every entry of every version of every family in `machines` against the
/// types in `devices` (which should hold every baton device) and each family's
/// machine-level schema.
pub fn check_compat_tables(
    machines: &MachineRegistry,
    devices: &DeviceRegistry,
) -> Result<(), CompatCheckError> {
    let problems: Vec<CompatProblem> = machines
        .families()
        .iter()
        .flat_map(|family| check_family(family, devices))
        .collect();
    if problems.is_empty() {
        Ok(())
    } else {
        Err(CompatCheckError { problems })
    }
}

/// Checks each array of `family` once (not cumulatively), returning every problem.
pub fn check_family(
    family: &'static MachineFamily,
    devices: &DeviceRegistry,
) -> Vec<CompatProblem> {
    let mut registry = devices.clone();
    let mut problems = Vec::new();
    if let Err(error) = registry.register(family.properties) {
        problems.push(CompatProblem {
            machine: family.name.to_owned(),
            entry: CompatEntry::new(family.properties.name, "*", "*"),
            reason: format!("the machine property schema cannot be registered: {error}"),
        });
        return problems;
    }
    for version in family.versions {
        let machine = version_name(family, version);
        let mut seen = BTreeSet::new();
        for entry in version.compat {
            let problem = |reason: String| CompatProblem {
                machine: machine.clone(),
                entry: *entry,
                reason,
            };
            if !seen.insert((entry.driver, entry.property)) {
                problems.push(problem(
                    "the array sets this property twice; keep one entry".to_owned(),
                ));
                continue;
            }
            if entry.optional && !registry.contains(entry.driver) {
                continue;
            }
            let set_by = Provenance::Compat {
                machine: machine.clone(),
                table: machine.clone(),
            };
            if let Err(error) =
                registry.check_setting(entry.driver, entry.property, entry.value, &set_by)
            {
                problems.push(problem(reason(&error)));
            }
        }
    }
    problems
}

fn names<T: AsRef<str>>(names: &[T]) -> String {
    if names.is_empty() {
        return "none".to_owned();
    }
    names
        .iter()
        .map(AsRef::as_ref)
        .collect::<Vec<_>>()
        .join(", ")
}

fn reason(error: &PropertyError) -> String {
    match error {
        PropertyError::UnknownDeviceType { name, known } => format!(
            "no device type '{name}' is registered (known: {}); mark the entry optional \
             if a VMM may not link that device",
            names(known)
        ),
        PropertyError::UnknownProperty(detail) => format!(
            "'{}' has no property '{}' (known: {})",
            detail.target.driver,
            detail.property,
            names(&detail.known)
        ),
        PropertyError::InvalidValue(detail) => format!(
            "value '{}' is invalid for '{}.{}': {}",
            detail.value, detail.target.driver, detail.property, detail.source
        ),
        other => other.to_string(),
    }
}
