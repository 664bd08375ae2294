//! Reading a captured stream or snapshot file without the code that wrote it.
//!
//! Every section is framed and the stream ends with a SCHEMA trailer holding the JSON
//! description of every device's state, so any stream decodes to JSON from its own bytes:
//! `baton-migrate analyze FILE`.

use std::io::{BufReader, Read};
use std::path::Path;

use baton_vmstate::{decode_to_json, VmState};
use serde_json::{json, Value};

use crate::error::{MigrationError, StreamError};
use crate::payload::{BackendBlob, DeviceBlob, EarlyFinal, SchemaTrailer};
use crate::protocol::{encode_section_header, footer, SectionType};
use crate::transport::{Channel, Section, Transport};

/// Decode the stream in `path` (a snapshot file or a captured main channel) to JSON.
pub fn analyze_file(path: &Path) -> Result<Value, MigrationError> {
    let f = std::fs::File::open(path)
        .map_err(|e| MigrationError::Config(format!("opening {}: {e}", path.display())))?;
    analyze(BufReader::new(f))
}

/// Decode a stream read from `r`.
pub fn analyze(r: BufReader<std::fs::File>) -> Result<Value, MigrationError> {
    let mut ch = Channel::new("stream", Transport::FileReader(r));
    let header = ch.read_header()?;
    let mut sections: Vec<Section> = Vec::new();
    let trailer: SchemaTrailer = loop {
        let s = ch.recv()?;
        if s.ty == SectionType::Schema {
            break serde_json::from_slice(&s.payload)
                .map_err(|e| ch.bad_payload(&s, format!("invalid JSON: {e}")))?;
        }
        sections.push(s);
    };
    let mut out = Vec::new();
    let (mut ram_sections, mut ram_pages) = (0u64, 0u64);
    for s in &sections {
        let v = match s.ty {
            SectionType::Handshake => serde_json::from_slice::<Value>(&s.payload)
                .map_err(|e| ch.bad_payload(s, format!("invalid JSON: {e}")))?,
            SectionType::EarlyState | SectionType::DeviceState => {
                let b = DeviceBlob::load(&s.payload, 1).map_err(|e| ch.bad_state(s, e))?;
                let d = trailer.devices.iter().find(|d| d.id == b.device);
                let schema = match (s.ty, d) {
                    (SectionType::EarlyState, Some(d)) => d.early_setup.as_ref(),
                    (_, Some(d)) => Some(&d.vmsd),
                    _ => None,
                };
                let state = match schema {
                    Some(sch) => decode_to_json(sch, &b.data, b.version_id)
                        .map_err(|e| ch.bad_payload(s, format!("device {}: {e}", b.device)))?,
                    None => json!({ "undecoded_bytes": b.data.len() }),
                };
                json!({ "device": b.device, "version_id": b.version_id, "state": state })
            }
            SectionType::EarlyFinal => {
                let f = EarlyFinal::load(&s.payload, 1).map_err(|e| ch.bad_state(s, e))?;
                json!({ "device": f.device, "unchanged": f.unchanged, "bytes": f.data.len() })
            }
            SectionType::Backend => {
                let b = BackendBlob::load(&s.payload, 1).map_err(|e| ch.bad_state(s, e))?;
                let roles: Vec<&str> = b.roles.iter().map(|r| r.role.as_str()).collect();
                json!({ "device": b.device, "roles": roles, "metadata_bytes": b.metadata.len() })
            }
            SectionType::RamPages => {
                ram_sections += 1;
                ram_pages += u64::from(u16::from_le_bytes([
                    *s.payload.get(4).unwrap_or(&0),
                    *s.payload.get(5).unwrap_or(&0),
                ]));
                continue;
            }
            _ => Value::Null,
        };
        out.push(json!({ "section": s.seq, "type": s.ty.name(), "content": v }));
    }
    let mut trailing = Vec::new();
    // A main channel captured from a live migration ends with the source's GO.
    let mut ch = ch;
    let mut buf = [0u8; 1];
    let extra = match ch_transport(&mut ch) {
        Some(r) => r.read(&mut buf).unwrap_or(0),
        None => 0,
    };
    if extra > 0 {
        let go = buf[0] == SectionType::Go as u8;
        let rest_is_go = go && {
            let mut rest = Vec::new();
            ch_transport(&mut ch).map(|r| r.read_to_end(&mut rest));
            let seq = ch.last_recv_seq().wrapping_add(1);
            let mut go = encode_section_header(SectionType::Go, seq, 0)[1..].to_vec();
            go.extend_from_slice(&footer(seq));
            rest == go
        };
        if !rest_is_go {
            trailing.push("bytes after the SCHEMA trailer");
        }
    }
    Ok(json!({
        "session": header.session.iter().map(|b| format!("{b:02x}")).collect::<String>(),
        "sections": out,
        "ram": { "sections": ram_sections, "pages": ram_pages },
        "schema": trailer,
        "warnings": trailing,
    }))
}

fn ch_transport(ch: &mut Channel) -> Option<&mut BufReader<std::fs::File>> {
    match ch.transport_mut() {
        Transport::FileReader(r) => Some(r),
        _ => None,
    }
}

impl From<std::io::Error> for StreamError {
    fn from(e: std::io::Error) -> Self {
        StreamError::Io {
            channel: "stream".into(),
            context: "reading".into(),
            source: e,
        }
    }
}
