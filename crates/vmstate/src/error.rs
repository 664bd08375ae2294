//! Load errors that say where in the state they happened.
//!
//! Decoding builds no path while it succeeds; a failure records its reason and the byte
//! offset, and each enclosing level prepends its own segment as the error travels up. The
//! result reads like `queues[3].next_avail: 70000 exceeds size 256`.

use std::fmt;

/// One step of the path to the failing value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PathSegment {
    Field(String),
    Index(u64),
    Subsection(String),
}

/// Why a load failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ErrorKind {
    #[error("truncated: needs {needed} more bytes, {available} left")]
    Truncated { needed: u64, available: u64 },
    #[error("version {got} is newer than the newest supported version {max} of {name:?}")]
    VersionTooNew { name: String, got: u32, max: u32 },
    #[error("version {got} is older than the oldest supported version {min} of {name:?}")]
    VersionTooOld { name: String, got: u32, min: u32 },
    #[error("length {len} exceeds the maximum {max}")]
    LengthExceeds { len: u64, max: u64 },
    #[error("invalid bool byte {0:#04x}")]
    InvalidBool(u8),
    #[error("invalid UTF-8 in string")]
    InvalidUtf8,
    #[error("unknown subsection {0:?}")]
    UnknownSubsection(String),
    #[error("subsection {0:?} appears twice")]
    DuplicateSubsection(String),
    #[error("invalid subsection marker {0:#04x}")]
    InvalidMarker(u8),
    #[error("subsection body has {0} bytes left over")]
    SubsectionTrailing(u64),
    #[error("{0} bytes left over after the state")]
    Trailing(u64),
    #[error("{0}")]
    Invalid(String),
}

/// A failed load: the path to the value, the reason, and the byte offset in the input.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmStateError {
    path: Vec<PathSegment>,
    kind: ErrorKind,
    offset: Option<u64>,
}

impl VmStateError {
    /// An error at the current position, with no path yet.
    pub fn new(kind: ErrorKind) -> Self {
        VmStateError {
            path: Vec::new(),
            kind,
            offset: None,
        }
    }

    /// A failed semantic check; `path` is relative to the struct being validated
    /// (`"next_avail"`, `"queues[3].next_avail"`, or empty).
    pub fn invalid(path: &str, reason: impl Into<String>) -> Self {
        let mut e = Self::new(ErrorKind::Invalid(reason.into()));
        e.path = parse_path(path);
        e
    }

    pub(crate) fn at_offset(mut self, offset: usize) -> Self {
        self.offset.get_or_insert(offset as u64);
        self
    }

    /// Prepend a field name (called by enclosing structs as the error travels up).
    pub fn in_field(mut self, name: &str) -> Self {
        self.path.insert(0, PathSegment::Field(name.to_owned()));
        self
    }

    /// Prepend an element index.
    pub fn in_index(mut self, index: usize) -> Self {
        self.path.insert(0, PathSegment::Index(index as u64));
        self
    }

    /// Prepend a subsection name.
    pub fn in_subsection(mut self, name: &str) -> Self {
        self.path
            .insert(0, PathSegment::Subsection(name.to_owned()));
        self
    }

    pub fn kind(&self) -> &ErrorKind {
        &self.kind
    }

    pub fn path(&self) -> &[PathSegment] {
        &self.path
    }

    /// Byte offset in the input where decoding stopped, when known.
    pub fn offset(&self) -> Option<u64> {
        self.offset
    }

    /// The path alone, as displayed (`queues[3].next_avail`).
    pub fn path_string(&self) -> String {
        let mut s = String::new();
        for seg in &self.path {
            match seg {
                PathSegment::Field(n) | PathSegment::Subsection(n) => {
                    if !s.is_empty() {
                        s.push('.');
                    }
                    s.push_str(n);
                }
                PathSegment::Index(i) => {
                    s.push('[');
                    s.push_str(&i.to_string());
                    s.push(']');
                }
            }
        }
        s
    }
}

impl fmt::Display for VmStateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let path = self.path_string();
        if path.is_empty() {
            write!(f, "{}", self.kind)?;
        } else {
            write!(f, "{}: {}", path, self.kind)?;
        }
        match (&self.kind, self.offset) {
            (ErrorKind::Invalid(_), _) | (_, None) => Ok(()),
            (_, Some(off)) => write!(f, " (at byte {off})"),
        }
    }
}

impl std::error::Error for VmStateError {}

fn parse_path(path: &str) -> Vec<PathSegment> {
    let mut out = Vec::new();
    for part in path.split('.').filter(|p| !p.is_empty()) {
        let mut rest = part;
        if let Some(b) = rest.find('[') {
            if b > 0 {
                out.push(PathSegment::Field(rest[..b].to_owned()));
            }
            rest = &rest[b..];
            while let Some(stripped) = rest.strip_prefix('[') {
                let end = stripped.find(']').unwrap_or(stripped.len());
                match stripped[..end].parse() {
                    Ok(i) => out.push(PathSegment::Index(i)),
                    Err(_) => out.push(PathSegment::Field(format!("[{}]", &stripped[..end]))),
                }
                rest = stripped.get(end + 1..).unwrap_or("");
            }
        } else {
            out.push(PathSegment::Field(rest.to_owned()));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_display() {
        let e = VmStateError::invalid("next_avail", "70000 exceeds size 256")
            .in_index(3)
            .in_field("queues");
        assert_eq!(
            e.to_string(),
            "queues[3].next_avail: 70000 exceeds size 256"
        );
        let e = VmStateError::invalid("queues[3].next_avail", "x");
        assert_eq!(e.path_string(), "queues[3].next_avail");
        let e = VmStateError::new(ErrorKind::InvalidBool(7))
            .at_offset(12)
            .in_field("link_up");
        assert_eq!(
            e.to_string(),
            "link_up: invalid bool byte 0x07 (at byte 12)"
        );
    }
}
