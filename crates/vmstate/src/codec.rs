//! The wire codec.
//!
//! Layout of a state struct at version `v` (the top level's `v` travels outside the blob, in
//! the migration section header; a nested struct writes its own as a `u32`):
//!
//! ```text
//! fields with since <= v, in declaration order
//!   bool            1 byte, 0 or 1
//!   u8..u64/i8..i64 fixed width, little endian
//!   [T; N]          N elements
//!   Vec<T>, String  u32 length (checked against the declared maximum), elements / UTF-8
//!   struct          u32 version, then its fields and subsections
//!   unused = N      N zero bytes
//! subsections, each:  0x01, u8 name length, name, u32 version, u32 body length, body
//! end of subsections: 0x00
//! ```
//!
//! Every read is bounds-checked and every length is checked against its declared maximum
//! before anything is allocated, so arbitrary input yields an error, never a panic or an
//! allocation beyond the schema's bounds.

use crate::description::{FieldKind, SchemaRef, VmStateDescription};
use crate::error::{ErrorKind, VmStateError};

/// Marker byte before each subsection.
pub const SUBSECTION_MARKER: u8 = 0x01;
/// Marker byte that ends a struct's subsection list.
pub const END_MARKER: u8 = 0x00;

/// A bounds-checked cursor over untrusted bytes.
#[derive(Debug, Clone)]
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    base: usize,
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Reader {
            buf,
            pos: 0,
            base: 0,
        }
    }

    /// Bytes not yet consumed.
    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// Absolute offset of the cursor in the outermost input.
    pub fn offset(&self) -> usize {
        self.base + self.pos
    }

    fn err(&self, kind: ErrorKind) -> VmStateError {
        VmStateError::new(kind).at_offset(self.offset())
    }

    /// Take the next `n` bytes.
    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8], VmStateError> {
        if n > self.remaining() {
            return Err(self.err(ErrorKind::Truncated {
                needed: n as u64,
                available: self.remaining() as u64,
            }));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    /// A reader over the next `n` bytes, which this reader skips.
    pub fn sub_reader(&mut self, n: usize) -> Result<Reader<'a>, VmStateError> {
        let base = self.offset();
        let buf = self.bytes(n)?;
        Ok(Reader { buf, pos: 0, base })
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], VmStateError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.bytes(N)?);
        Ok(a)
    }

    pub fn u8(&mut self) -> Result<u8, VmStateError> {
        Ok(self.array::<1>()?[0])
    }
    pub fn u16(&mut self) -> Result<u16, VmStateError> {
        self.array().map(u16::from_le_bytes)
    }
    pub fn u32(&mut self) -> Result<u32, VmStateError> {
        self.array().map(u32::from_le_bytes)
    }
    pub fn u64(&mut self) -> Result<u64, VmStateError> {
        self.array().map(u64::from_le_bytes)
    }

    pub fn bool(&mut self) -> Result<bool, VmStateError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            b => Err(VmStateError::new(ErrorKind::InvalidBool(b)).at_offset(self.offset() - 1)),
        }
    }

    /// A `u32` length prefix, refused when above `max`.
    pub fn length(&mut self, max: u32) -> Result<usize, VmStateError> {
        let at = self.offset();
        let len = self.u32()?;
        if len > max {
            return Err(VmStateError::new(ErrorKind::LengthExceeds {
                len: len.into(),
                max: max.into(),
            })
            .at_offset(at));
        }
        Ok(len as usize)
    }

    /// A version number, refused when outside what `vmsd` loads.
    pub fn version(&mut self, vmsd: &VmStateDescription) -> Result<u32, VmStateError> {
        let at = self.offset();
        let v = self.u32()?;
        check_version(vmsd, v).map_err(|e| e.at_offset(at))?;
        Ok(v)
    }

    /// Fails when bytes are left over.
    pub fn finish(&self) -> Result<(), VmStateError> {
        match self.remaining() {
            0 => Ok(()),
            n => Err(self.err(ErrorKind::Trailing(n as u64))),
        }
    }

    /// Read the next subsection header: `None` at the end marker, else its name, version
    /// and a reader over its body.
    pub fn subsection(&mut self) -> Result<Option<(&'a str, u32, Reader<'a>)>, VmStateError> {
        let at = self.offset();
        match self.u8()? {
            END_MARKER => Ok(None),
            SUBSECTION_MARKER => {
                let name_len = self.u8()? as usize;
                let name = std::str::from_utf8(self.bytes(name_len)?)
                    .map_err(|_| self.err(ErrorKind::InvalidUtf8))?;
                let version = self.u32()?;
                let body_len = self.u32()? as usize;
                let body = self.sub_reader(body_len)?;
                Ok(Some((name, version, body)))
            }
            m => Err(VmStateError::new(ErrorKind::InvalidMarker(m)).at_offset(at)),
        }
    }
}

/// Fails when a subsection body has bytes left over.
pub fn finish_subsection(body: &Reader<'_>) -> Result<(), VmStateError> {
    match body.remaining() {
        0 => Ok(()),
        n => Err(body.err(ErrorKind::SubsectionTrailing(n as u64))),
    }
}

/// The error for a subsection the loader does not know (`body` is its body).
pub fn unknown_subsection(name: &str, body: &Reader<'_>) -> VmStateError {
    VmStateError::new(ErrorKind::UnknownSubsection(name.to_owned())).at_offset(body.offset())
}

/// The error for a subsection seen twice (`body` is the second one's body).
pub fn duplicate_subsection(name: &str, body: &Reader<'_>) -> VmStateError {
    VmStateError::new(ErrorKind::DuplicateSubsection(name.to_owned())).at_offset(body.offset())
}

/// Refuse a version outside `[minimum_version_id, version_id]` of `vmsd`.
pub fn check_version(vmsd: &VmStateDescription, v: u32) -> Result<(), VmStateError> {
    if v > vmsd.version_id {
        Err(VmStateError::new(ErrorKind::VersionTooNew {
            name: vmsd.name.to_string(),
            got: v,
            max: vmsd.version_id,
        }))
    } else if v < vmsd.minimum_version_id {
        Err(VmStateError::new(ErrorKind::VersionTooOld {
            name: vmsd.name.to_string(),
            got: v,
            min: vmsd.minimum_version_id,
        }))
    } else {
        Ok(())
    }
}

/// A value that can be one field (or one element of an array or vector) of a state struct.
///
/// Implemented for `bool`, the fixed-width integers, `[T; N]`, and every
/// `#[derive(VmState)]` struct. `Vec<T>` and `String` need a declared maximum and are
/// handled by [`encode_vec`]/[`decode_vec`] and [`encode_string`]/[`decode_string`].
pub trait VmStateField: Sized {
    const KIND: FieldKind;
    fn encode(&self, out: &mut Vec<u8>);
    fn decode(r: &mut Reader<'_>) -> Result<Self, VmStateError>;

    /// Encode a sequence (a `Vec` field's elements); bytes override it with one copy.
    fn encode_seq(items: &[Self], out: &mut Vec<u8>) {
        for x in items {
            x.encode(out);
        }
    }

    /// Decode `len` elements; bytes override it with one bounds check and one copy.
    fn decode_seq(r: &mut Reader<'_>, len: usize) -> Result<Vec<Self>, VmStateError> {
        let mut v = Vec::with_capacity(len.min(r.remaining()));
        for i in 0..len {
            v.push(Self::decode(r).map_err(|e| e.in_index(i))?);
        }
        Ok(v)
    }
}

macro_rules! int_field {
    ($($t:ty => $kind:ident),*) => {$(
        impl VmStateField for $t {
            const KIND: FieldKind = FieldKind::$kind;
            #[inline]
            fn encode(&self, out: &mut Vec<u8>) {
                out.extend_from_slice(&self.to_le_bytes());
            }
            #[inline]
            fn decode(r: &mut Reader<'_>) -> Result<Self, VmStateError> {
                let mut a = [0u8; std::mem::size_of::<$t>()];
                a.copy_from_slice(r.bytes(std::mem::size_of::<$t>())?);
                Ok(<$t>::from_le_bytes(a))
            }
        }
    )*};
}

int_field!(u16 => U16, u32 => U32, u64 => U64, i8 => I8, i16 => I16, i32 => I32, i64 => I64);

impl VmStateField for u8 {
    const KIND: FieldKind = FieldKind::U8;
    #[inline]
    fn encode(&self, out: &mut Vec<u8>) {
        out.push(*self);
    }
    #[inline]
    fn decode(r: &mut Reader<'_>) -> Result<Self, VmStateError> {
        r.u8()
    }
    fn encode_seq(items: &[Self], out: &mut Vec<u8>) {
        out.extend_from_slice(items);
    }
    fn decode_seq(r: &mut Reader<'_>, len: usize) -> Result<Vec<Self>, VmStateError> {
        r.bytes(len).map(<[u8]>::to_vec)
    }
}

impl VmStateField for bool {
    const KIND: FieldKind = FieldKind::Bool;
    #[inline]
    fn encode(&self, out: &mut Vec<u8>) {
        out.push(*self as u8);
    }
    #[inline]
    fn decode(r: &mut Reader<'_>) -> Result<Self, VmStateError> {
        r.bool()
    }
}

impl<T: VmStateField, const N: usize> VmStateField for [T; N] {
    const KIND: FieldKind = FieldKind::Array {
        len: N as u32,
        elem: SchemaRef::Static(&T::KIND),
    };
    fn encode(&self, out: &mut Vec<u8>) {
        for x in self {
            x.encode(out);
        }
    }
    fn decode(r: &mut Reader<'_>) -> Result<Self, VmStateError> {
        let mut v = Vec::with_capacity(N.min(r.remaining()));
        for i in 0..N {
            v.push(T::decode(r).map_err(|e| e.in_index(i))?);
        }
        // Exactly N elements were pushed.
        v.try_into()
            .map_err(|_| VmStateError::new(ErrorKind::Invalid("array length".into())))
    }
}

/// Write a vector with its `u32` length prefix.
pub fn encode_vec<T: VmStateField>(v: &[T], out: &mut Vec<u8>) {
    (v.len() as u32).encode(out);
    T::encode_seq(v, out);
}

/// Read a vector of at most `max` elements; capacity never exceeds `max` nor the input.
pub fn decode_vec<T: VmStateField>(r: &mut Reader<'_>, max: u32) -> Result<Vec<T>, VmStateError> {
    let len = r.length(max)?;
    T::decode_seq(r, len)
}

/// Write a string with its `u32` byte-length prefix.
pub fn encode_string(s: &str, out: &mut Vec<u8>) {
    (s.len() as u32).encode(out);
    out.extend_from_slice(s.as_bytes());
}

/// Read a UTF-8 string of at most `max` bytes.
pub fn decode_string(r: &mut Reader<'_>, max: u32) -> Result<String, VmStateError> {
    let len = r.length(max)?;
    let at = r.offset();
    let bytes = r.bytes(len)?;
    std::str::from_utf8(bytes)
        .map(str::to_owned)
        .map_err(|_| VmStateError::new(ErrorKind::InvalidUtf8).at_offset(at))
}

/// Write `n` zero bytes for a removed field.
pub fn encode_unused(n: usize, out: &mut Vec<u8>) {
    out.resize(out.len() + n, 0);
}

/// Write one subsection: marker, name, version, body length, body.
pub fn encode_subsection(
    name: &str,
    version: u32,
    out: &mut Vec<u8>,
    body: impl FnOnce(&mut Vec<u8>),
) {
    debug_assert!(name.len() <= u8::MAX as usize);
    out.push(SUBSECTION_MARKER);
    out.push(name.len() as u8);
    out.extend_from_slice(name.as_bytes());
    version.encode(out);
    let len_at = out.len();
    0u32.encode(out);
    body(out);
    let len = (out.len() - len_at - 4) as u32;
    out[len_at..len_at + 4].copy_from_slice(&len.to_le_bytes());
}

/// A state struct with a schema: what `#[derive(VmState)]` implements.
///
/// The blob a top-level [`VmState::save`] produces carries no version; the caller stores
/// [`VmStateDescription::version_id`] beside it (the migration engine puts it in the section
/// header) and passes it back to [`VmState::load`].
pub trait VmState: Sized {
    /// The schema, as a compile-time constant.
    const VMSD: VmStateDescription;

    /// The schema, as a `'static` reference (for engines that hold `dyn` devices).
    fn vmsd() -> &'static VmStateDescription;

    /// Append the fields and subsections (no version) to `out`.
    fn save_into(&self, out: &mut Vec<u8>);

    /// Read fields and subsections written at `version_id`, then run validation. The
    /// caller has already checked the version range.
    fn load_from(r: &mut Reader<'_>, version_id: u32) -> Result<Self, VmStateError>;

    /// Encode at the current version.
    fn save(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.save_into(&mut out);
        out
    }

    /// Decode a blob written at `version_id`; refuses versions outside
    /// `[minimum_version_id, version_id]` and trailing bytes.
    fn load(bytes: &[u8], version_id: u32) -> Result<Self, VmStateError> {
        check_version(&Self::VMSD, version_id)?;
        let mut r = Reader::new(bytes);
        let s = Self::load_from(&mut r, version_id)?;
        r.finish()?;
        Ok(s)
    }
}
