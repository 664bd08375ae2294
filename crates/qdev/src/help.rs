//! Human-readable property listing for `--device TYPE,help`.
//!
//! Shows, for each property, its type, its resolved value and the layer that set it, so
//! a user sees the effect of the machine type and their `--global`s before creating
//! anything. The JSON equivalent is the serde form of [`ResolvedProperties`].

use std::fmt::Write as _;

use crate::device_type::TypeKind;
use crate::registry::DeviceRegistry;
use crate::resolve::ResolvedProperties;
use crate::spec::PropertyDefault;

impl ResolvedProperties {
    /// Renders the listing. Example (`--device virtio-net-tap,help -M microvm-1.0`):
    ///
    /// ```text
    /// virtio-net-tap: virtio-net device backed by a host TAP interface (a virtio-device)
    ///   backend-transfer=<bool>  = off          (compat microvm-1.0)
    ///       Hand the open TAP fds to the new VMM on local migration.
    ///   ifname=<string>          = <required>   (default)
    ///       ...
    /// ```
    pub fn render_help(&self) -> String {
        let ty = self.device_type;
        let mut out = String::new();
        let _ = write!(out, "{}", ty.name);
        if !ty.doc.is_empty() {
            let _ = write!(out, ": {}", ty.doc);
        }
        let mut notes = Vec::new();
        if let Some(parent) = ty.parent {
            notes.push(format!("a {}", parent.name));
        }
        match ty.kind {
            TypeKind::Device => {}
            TypeKind::Abstract => notes.push("abstract".to_owned()),
            TypeKind::Machine => notes.push("machine properties".to_owned()),
        }
        if !notes.is_empty() {
            let _ = write!(out, " ({})", notes.join(", "));
        }
        out.push('\n');
        if self.properties.is_empty() {
            out.push_str("  (no properties)\n");
            return out;
        }

        let rows: Vec<(String, String, String, &str)> = self
            .properties
            .iter()
            .map(|p| {
                let left = format!("{}=<{}>", p.spec.name, p.spec.kind.notation());
                let value = match (&p.value, &p.spec.default) {
                    (Some(v), _) => v.to_string(),
                    (None, PropertyDefault::Required) => "<required>".to_owned(),
                    (None, _) => "<unset>".to_owned(),
                };
                (left, value, p.provenance.to_string(), p.spec.doc)
            })
            .collect();
        let left_width = rows.iter().map(|r| r.0.len()).max().unwrap_or(0);
        let value_width = rows.iter().map(|r| r.1.len()).max().unwrap_or(0);
        for (left, value, provenance, doc) in rows {
            let _ = writeln!(
                out,
                "  {left:<left_width$}  = {value:<value_width$}  ({provenance})"
            );
            if !doc.is_empty() {
                let _ = writeln!(out, "      {doc}");
            }
        }
        out
    }
}

impl DeviceRegistry {
    /// The listing for `--device help`: every creatable type with its doc line.
    pub fn render_type_list(&self) -> String {
        let devices: Vec<_> = self.iter().filter(|t| t.kind == TypeKind::Device).collect();
        let width = devices.iter().map(|t| t.name.len()).max().unwrap_or(0);
        let mut out = String::from("Device types:\n");
        for ty in devices {
            let _ = write!(out, "  {:<width$}  {}", ty.name, ty.doc);
            if let Some(parent) = ty.parent {
                let _ = write!(out, " (a {})", parent.name);
            }
            out.push('\n');
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use crate::{DeviceRegistry, DeviceType, TypeKind, VIRTIO_DEVICE};

    #[test]
    fn type_list() {
        static A: DeviceType = DeviceType {
            name: "virtio-a",
            parent: Some(&VIRTIO_DEVICE),
            kind: TypeKind::Device,
            doc: "First",
            properties: &[],
        };
        static LONGER: DeviceType = DeviceType {
            name: "serial-longer",
            parent: None,
            kind: TypeKind::Device,
            doc: "Second",
            properties: &[],
        };
        let registry = DeviceRegistry::with_types([&A, &LONGER]).unwrap();
        assert_eq!(
            registry.render_type_list(),
            "Device types:\n  serial-longer  Second\n  virtio-a       First (a virtio-device)\n"
        );
    }
}
