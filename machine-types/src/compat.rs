//! Compat entries: one property default pinned for old machine versions.

use std::fmt;

use serde::Serialize;

/// `driver.property=value`, applied to every device of type `driver` (or of a subtype,
/// when `driver` is an abstract parent such as `virtio-device`) on machine versions
/// whose cumulative compat set holds this entry.
///
/// ```
/// use baton_machine_types::CompatEntry;
///
/// static MICROVM_1_0: &[CompatEntry] = &[
///     CompatEntry::new("virtio-net-tap", "backend-transfer", "off"),
///     // A device a VMM may not link: no error when it is absent.
///     CompatEntry::new("vfio-user-pci", "backend-transfer", "off").optional(),
/// ];
/// assert_eq!(MICROVM_1_0[0].to_string(), "virtio-net-tap.backend-transfer=off");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct CompatEntry {
    /// Type name, concrete or abstract.
    pub driver: &'static str,
    /// Property name.
    pub property: &'static str,
    /// Value text, as it would be written on the command line.
    pub value: &'static str,
    /// The driver may be absent from a VMM (it does not link that device). When the
    /// driver is registered the entry must still name a real property with a valid
    /// value; the compat-table test checks that against every baton device.
    pub optional: bool,
}

impl CompatEntry {
    /// A mandatory entry.
    pub const fn new(driver: &'static str, property: &'static str, value: &'static str) -> Self {
        CompatEntry {
            driver,
            property,
            value,
            optional: false,
        }
    }

    /// The same entry, marked optional.
    pub const fn optional(self) -> Self {
        CompatEntry {
            optional: true,
            ..self
        }
    }
}

/// `driver.property=value`, with ` (optional)` for optional entries.
impl fmt::Display for CompatEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}={}", self.driver, self.property, self.value)?;
        if self.optional {
            f.write_str(" (optional)")?;
        }
        Ok(())
    }
}
