//! The machine-type registry: lookup by name or alias, listing, and the structural rules
//! every table must follow (checked when the registry is built).

use std::cmp::Ordering;
use std::collections::BTreeSet;
use std::sync::OnceLock;

use baton_qdev::{SchemaError, TypeKind};
use thiserror::Error;

use crate::machine::{version_name, MachineFamily, MachineInfo, MachineType};
use crate::microvm::MICROVM;

/// No machine type has the requested name.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("unknown machine type '{name}'; known machine types: {}", known.join(", "))]
pub struct UnknownMachine {
    /// The name asked for.
    pub name: String,
    /// Every accepted name; aliases say what they stand for.
    pub known: Vec<String>,
}

/// A machine table that breaks a structural rule.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum MachineTableError {
    /// A registry needs at least one family (the first is the default).
    #[error("a machine registry needs at least one machine family")]
    NoFamilies,
    /// A family without versions.
    #[error("machine family '{family}' has no versions")]
    NoVersions {
        /// The family.
        family: &'static str,
    },
    /// A version string that is not dotted numbers.
    #[error("machine family '{family}': version '{version}' is not of the form 1.0")]
    BadVersion {
        /// The family.
        family: &'static str,
        /// The version string.
        version: &'static str,
    },
    /// Versions out of order.
    #[error("machine family '{family}': versions must be listed oldest first, but {newer} comes before {older}")]
    VersionOrder {
        /// The family.
        family: &'static str,
        /// The version listed first.
        newer: &'static str,
        /// The version listed after it.
        older: &'static str,
    },
    /// The newest version has compat entries.
    #[error("{machine} is the newest version, so its compat array must be empty; an entry that restores old behaviour goes in the array of the last version that had it")]
    NewestHasCompat {
        /// The machine.
        machine: String,
    },
    /// A name used twice (a version name, or a family name doubling as alias).
    #[error("machine type name '{name}' is defined twice")]
    DuplicateName {
        /// The contested name.
        name: String,
    },
    /// A family whose property schema is not a machine schema, or is invalid.
    #[error("machine family '{family}': property schema '{schema}' is not valid: {reason}")]
    BadPropertySchema {
        /// The family.
        family: &'static str,
        /// The schema type name.
        schema: &'static str,
        /// Why.
        reason: String,
    },
}

/// The registered machine families.
#[derive(Debug, Clone)]
pub struct MachineRegistry {
    families: Vec<&'static MachineFamily>,
}

impl MachineRegistry {
    /// A registry of `families`; the first family's newest version is the default.
    /// Checks the structural rules of every table (not the entries against device
    /// schemas: that is [`crate::check_compat_tables`]).
    pub fn new(families: &[&'static MachineFamily]) -> Result<Self, MachineTableError> {
        if families.is_empty() {
            return Err(MachineTableError::NoFamilies);
        }
        let mut names = BTreeSet::new();
        for family in families {
            check_family(family)?;
            let family_names = std::iter::once(family.name.to_owned())
                .chain(family.versions.iter().map(|v| version_name(family, v)));
            for name in family_names {
                if !names.insert(name.clone()) {
                    return Err(MachineTableError::DuplicateName { name });
                }
            }
        }
        Ok(MachineRegistry {
            families: families.to_vec(),
        })
    }

    /// The machines baton ships (`microvm-*`).
    pub fn builtin() -> &'static MachineRegistry {
        static BUILTIN: OnceLock<MachineRegistry> = OnceLock::new();
        BUILTIN.get_or_init(|| {
            MachineRegistry::new(&[&MICROVM])
                .expect("the built-in machine tables follow the table rules (tested)")
        })
    }

    /// The registered families, default first.
    pub fn families(&self) -> &[&'static MachineFamily] {
        &self.families
    }

    /// The machine used when none is given: the first family's newest version.
    pub fn default_machine(&self) -> MachineType {
        // `new` guarantees a first family with at least one version.
        let family = self.families[0];
        MachineType::new(family, family.versions.len() - 1)
            .expect("a registered family has at least one version")
    }

    /// Finds a machine by full name (`microvm-1.0`) or alias (`microvm`, the newest).
    pub fn lookup(&self, name: &str) -> Result<MachineType, UnknownMachine> {
        for family in &self.families {
            if name == family.name {
                if let Some(latest) = MachineType::latest(family) {
                    return Ok(latest);
                }
            }
            for (index, version) in family.versions.iter().enumerate() {
                if name == version_name(family, version) {
                    if let Some(machine) = MachineType::new(family, index) {
                        return Ok(machine);
                    }
                }
            }
        }
        Err(UnknownMachine {
            name: name.to_owned(),
            known: self.known_names(),
        })
    }

    /// Every machine version, newest first within each family.
    pub fn machines(&self) -> Vec<MachineType> {
        self.families
            .iter()
            .flat_map(|family| {
                (0..family.versions.len())
                    .rev()
                    .filter_map(|index| MachineType::new(family, index))
            })
            .collect()
    }

    /// The listing for `-M help` and QMP `query-machines`.
    pub fn list(&self) -> Vec<MachineInfo> {
        let default = self.default_machine().name();
        self.machines()
            .into_iter()
            .map(|machine| MachineInfo {
                name: machine.name(),
                alias: machine
                    .is_latest()
                    .then(|| machine.family().name.to_owned()),
                is_default: machine.name() == default,
                deprecated: machine.is_deprecated(),
                doc: machine.family().doc,
            })
            .collect()
    }

    /// The listing for `-M help`, newest first within each family.
    pub fn render_list(&self) -> String {
        let list = self.list();
        let width = list.iter().map(|m| m.name.len()).max().unwrap_or(0);
        let mut out = String::from("Machine types:\n");
        for machine in list {
            let mut notes = Vec::new();
            if let Some(alias) = &machine.alias {
                notes.push(format!("alias {alias}"));
            }
            if machine.is_default {
                notes.push("default".to_owned());
            }
            if machine.deprecated {
                notes.push("deprecated".to_owned());
            }
            out.push_str(&format!("  {:<width$}  {}", machine.name, machine.doc));
            if !notes.is_empty() {
                out.push_str(&format!(" ({})", notes.join(", ")));
            }
            out.push('\n');
        }
        out
    }

    fn known_names(&self) -> Vec<String> {
        let mut known = Vec::new();
        for family in &self.families {
            if let Some(latest) = MachineType::latest(family) {
                known.push(format!("{} (alias of {})", family.name, latest.name()));
            }
            known.extend(family.versions.iter().map(|v| version_name(family, v)));
        }
        known
    }
}

fn check_family(family: &'static MachineFamily) -> Result<(), MachineTableError> {
    let schema = family.properties;
    let schema_problem = if schema.kind != TypeKind::Machine {
        Some("its kind must be TypeKind::Machine".to_owned())
    } else {
        schema.validate().err().map(|e: SchemaError| e.to_string())
    };
    if let Some(reason) = schema_problem {
        return Err(MachineTableError::BadPropertySchema {
            family: family.name,
            schema: schema.name,
            reason,
        });
    }
    let Some(newest) = family.versions.last() else {
        return Err(MachineTableError::NoVersions {
            family: family.name,
        });
    };
    let mut previous: Option<(&'static str, Vec<u64>)> = None;
    for version in family.versions {
        let parsed = parse_version(version.version).ok_or(MachineTableError::BadVersion {
            family: family.name,
            version: version.version,
        })?;
        if let Some((previous_name, previous_parsed)) = &previous {
            if compare_versions(previous_parsed, &parsed) != Ordering::Less {
                return Err(MachineTableError::VersionOrder {
                    family: family.name,
                    newer: previous_name,
                    older: version.version,
                });
            }
        }
        previous = Some((version.version, parsed));
    }
    if !newest.compat.is_empty() {
        return Err(MachineTableError::NewestHasCompat {
            machine: version_name(family, newest),
        });
    }
    Ok(())
}

fn parse_version(text: &str) -> Option<Vec<u64>> {
    text.split('.')
        .map(|part| {
            if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
                None
            } else {
                part.parse().ok()
            }
        })
        .collect()
}

/// Numeric comparison where `1.0` equals `1.0.0`.
fn compare_versions(a: &[u64], b: &[u64]) -> Ordering {
    let len = a.len().max(b.len());
    (0..len)
        .map(|i| {
            a.get(i)
                .copied()
                .unwrap_or(0)
                .cmp(&b.get(i).copied().unwrap_or(0))
        })
        .find(|o| o.is_ne())
        .unwrap_or(Ordering::Equal)
}
