//! Machine families, their versions, and a selected machine type.
//!
//! A family (`microvm`) is a list of versions, oldest first. Each version owns one
//! compat array: the property values that make a newer build behave like that version
//! did. A version applies its own array plus the arrays of every newer version, so a
//! change made in release N only needs one entry, in the array of release N-1, to be
//! undone for every older version too (QEMU's cumulative scheme).

use baton_qdev::{CompatSetting, DeviceType, PropertyError, PropertyResolver, ResolvedProperties};
use serde::Serialize;

use crate::compat::CompatEntry;

/// A machine family: its versions and its machine-level property schema.
#[derive(Debug)]
pub struct MachineFamily {
    /// The family name; also the alias of its newest version (`microvm`).
    pub name: &'static str,
    /// One line that says what the machine is.
    pub doc: &'static str,
    /// Machine-level properties (a [`baton_qdev::TypeKind::Machine`] type such as
    /// `microvm-machine`). Compat entries naming it pin machine behaviour, including
    /// the stream features a version may use.
    pub properties: &'static DeviceType,
    /// The versions, oldest first. The newest one's compat array is empty.
    pub versions: &'static [MachineVersion],
}

/// One released version of a family.
#[derive(Debug)]
pub struct MachineVersion {
    /// The version, dotted numbers (`1.0`); the machine is named `FAMILY-VERSION`.
    pub version: &'static str,
    /// Deprecated versions still work but the VMM warns when one is chosen.
    pub deprecated: bool,
    /// What this version did differently from the next one.
    pub compat: &'static [CompatEntry],
}

/// A machine version selected from a registry, e.g. by `-M microvm-1.0` or `-M microvm`.
#[derive(Debug, Clone, Copy)]
pub struct MachineType {
    family: &'static MachineFamily,
    index: usize,
}

/// One compat entry in the order a machine applies it, with the version that owns it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AppliedCompat {
    /// The machine version whose array holds the entry (`microvm-1.1`).
    pub table: String,
    /// The entry.
    pub entry: CompatEntry,
}

/// A listing row (for `-M help` and QMP `query-machines`); JSON keys are kebab-case.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct MachineInfo {
    /// Full name, `microvm-1.1`.
    pub name: String,
    /// The alias that resolves to this machine (the family name, on the newest version).
    pub alias: Option<String>,
    /// The machine used when none is given.
    pub is_default: bool,
    /// Still works, but will be removed.
    pub deprecated: bool,
    /// What the machine is.
    pub doc: &'static str,
}

impl MachineType {
    /// The version at `index` of `family`, or `None` if there is no such version.
    pub fn new(family: &'static MachineFamily, index: usize) -> Option<Self> {
        (index < family.versions.len()).then_some(MachineType { family, index })
    }

    /// The newest version of `family`, or `None` if it has no versions.
    pub fn latest(family: &'static MachineFamily) -> Option<Self> {
        Self::new(family, family.versions.len().checked_sub(1)?)
    }

    /// The full name, `microvm-1.0` (never the alias).
    pub fn name(&self) -> String {
        version_name(self.family, &self.family.versions[self.index])
    }

    /// The family.
    pub fn family(&self) -> &'static MachineFamily {
        self.family
    }

    /// This version's entry in the family.
    pub fn version(&self) -> &'static MachineVersion {
        &self.family.versions[self.index]
    }

    /// True for the family's newest version.
    pub fn is_latest(&self) -> bool {
        self.index + 1 == self.family.versions.len()
    }

    /// True if this version is deprecated.
    pub fn is_deprecated(&self) -> bool {
        self.version().deprecated
    }

    /// A warning for the VMM to print when a deprecated version is chosen.
    pub fn deprecation_warning(&self) -> Option<String> {
        self.is_deprecated().then(|| {
            format!(
                "machine type '{}' is deprecated; use '{}' (currently {})",
                self.name(),
                self.family.name,
                MachineType::latest(self.family)
                    .map(|m| m.name())
                    .unwrap_or_default()
            )
        })
    }

    /// Every compat entry this version applies, in application order: the newest
    /// version's array first, this version's own array last, so that the entries
    /// closest to this version win.
    pub fn compat_entries(&self) -> Vec<AppliedCompat> {
        self.family.versions[self.index..]
            .iter()
            .rev()
            .flat_map(|version| {
                let table = version_name(self.family, version);
                version.compat.iter().map(move |entry| AppliedCompat {
                    table: table.clone(),
                    entry: *entry,
                })
            })
            .collect()
    }

    /// [`Self::compat_entries`] as settings for a [`PropertyResolver`]; provenance
    /// names this machine (`compat microvm-1.0`) and the array the entry came from.
    pub fn compat_settings(&self) -> Vec<CompatSetting> {
        let machine = self.name();
        self.compat_entries()
            .into_iter()
            .map(|applied| CompatSetting {
                machine: machine.clone(),
                table: applied.table,
                driver: applied.entry.driver.to_owned(),
                property: applied.entry.property.to_owned(),
                value: applied.entry.value.to_owned(),
                optional: applied.entry.optional,
            })
            .collect()
    }

    /// The machine-level property schema (register it in the VMM's device registry so
    /// `--global microvm-machine.x=y` works).
    pub fn properties_type(&self) -> &'static DeviceType {
        self.family.properties
    }

    /// Resolves the machine-level properties: schema defaults, this machine's compat
    /// entries and globals (both taken from `resolver`, which must hold this machine's
    /// compat settings), then `explicit` (the `-M NAME,key=value` options).
    pub fn resolve_properties(
        &self,
        resolver: &PropertyResolver<'_>,
        explicit: &[(String, String)],
    ) -> Result<ResolvedProperties, PropertyError> {
        let resolved = resolver.resolve_type(self.family.properties, None, explicit)?;
        resolved.check_required()?;
        Ok(resolved)
    }
}

pub(crate) fn version_name(family: &MachineFamily, version: &MachineVersion) -> String {
    format!("{}-{}", family.name, version.version)
}
