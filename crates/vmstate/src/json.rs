//! Decoding a blob with nothing but its description.
//!
//! The stream analyzer reads state written by another build, possibly of another version,
//! using the schema carried in the stream's trailer. This walks a [`VmStateDescription`] with
//! exactly the rules of the typed codec (same versions, bounds and subsection handling), so
//! what loads in a device also decodes here, and what is refused there is refused here with
//! the same path.

use serde_json::{Map, Value};

use crate::codec::{check_version, duplicate_subsection, unknown_subsection, Reader};
use crate::description::{FieldKind, VmStateDescription};
use crate::error::VmStateError;

/// Decode a top-level blob written at `version_id` into JSON, keyed by field name.
/// Subsections appear as objects under their names; unused bytes are left out.
pub fn decode_to_json(
    vmsd: &VmStateDescription,
    bytes: &[u8],
    version_id: u32,
) -> Result<Value, VmStateError> {
    check_version(vmsd, version_id)?;
    let mut r = Reader::new(bytes);
    let v = decode_struct(vmsd, &mut r, version_id)?;
    r.finish()?;
    Ok(v)
}

fn decode_struct(
    vmsd: &VmStateDescription,
    r: &mut Reader<'_>,
    version_id: u32,
) -> Result<Value, VmStateError> {
    let mut obj = Map::new();
    for f in vmsd.fields.iter().filter(|f| f.since <= version_id) {
        let v = decode_kind(&f.kind, r).map_err(|e| e.in_field(&f.name))?;
        if !matches!(f.kind, FieldKind::Unused { .. }) {
            obj.insert(f.name.to_string(), v);
        }
    }
    let mut seen: Vec<&str> = Vec::new();
    while let Some((name, version, mut body)) = r.subsection()? {
        let sub = vmsd
            .subsections
            .iter()
            .find(|s| s.name == name)
            .ok_or_else(|| unknown_subsection(name, &body))?;
        if seen.contains(&name) {
            return Err(duplicate_subsection(name, &body));
        }
        seen.push(name);
        let v = (|| {
            check_version(&sub.vmsd, version)?;
            let v = decode_struct(&sub.vmsd, &mut body, version)?;
            crate::codec::finish_subsection(&body)?;
            Ok(v)
        })()
        .map_err(|e: VmStateError| e.in_subsection(name))?;
        obj.insert(name.to_owned(), v);
    }
    Ok(Value::Object(obj))
}

fn decode_kind(kind: &FieldKind, r: &mut Reader<'_>) -> Result<Value, VmStateError> {
    Ok(match kind {
        FieldKind::Bool => Value::Bool(r.bool()?),
        FieldKind::U8 => r.u8()?.into(),
        FieldKind::U16 => r.u16()?.into(),
        FieldKind::U32 => r.u32()?.into(),
        FieldKind::U64 => r.u64()?.into(),
        FieldKind::I8 => (r.u8()? as i8).into(),
        FieldKind::I16 => (r.u16()? as i16).into(),
        FieldKind::I32 => (r.u32()? as i32).into(),
        FieldKind::I64 => (r.u64()? as i64).into(),
        FieldKind::Array { len, elem } => decode_elems(elem, *len as usize, r)?,
        FieldKind::Vec { max_len, elem } => {
            let len = r.length(*max_len)?;
            if **elem == FieldKind::U8 {
                // Same bulk read as the typed codec, hence the same errors.
                Value::Array(r.bytes(len)?.iter().map(|b| Value::from(*b)).collect())
            } else {
                decode_elems(elem, len, r)?
            }
        }
        FieldKind::String { max_len } => Value::String(crate::codec::decode_string(r, *max_len)?),
        FieldKind::Struct { vmsd } => {
            let v = r.version(vmsd)?;
            decode_struct(vmsd, r, v)?
        }
        FieldKind::Unused { size } => {
            r.bytes(*size as usize)?;
            Value::Null
        }
    })
}

fn decode_elems(elem: &FieldKind, len: usize, r: &mut Reader<'_>) -> Result<Value, VmStateError> {
    let mut out = Vec::with_capacity(len.min(r.remaining()));
    for i in 0..len {
        out.push(decode_kind(elem, r).map_err(|e| e.in_index(i))?);
    }
    Ok(Value::Array(out))
}
