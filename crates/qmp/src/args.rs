//! Typed command arguments with QEMU's error messages.
//!
//! [`from_arguments`] deserialises a command's `arguments` object into any
//! `#[derive(Deserialize)]` type, the way QEMU's QObject input visitor checks them,
//! and names the parameter at fault with its full path:
//!
//! | problem                     | desc                                                          |
//! |-----------------------------|---------------------------------------------------------------|
//! | required member absent      | `Parameter 'uri' is missing`                                  |
//! | member not in the type      | `Parameter 'foo' is unexpected`                               |
//! | wrong JSON type             | `Invalid parameter type for 'uri', expected: string`          |
//! | number out of range         | `Parameter 'multifd-channels' expects uint8_t`                |
//! | enum value unknown          | `Parameter 'capabilities[0].capability' does not accept value 'x'` |
//!
//! Unknown members are refused for every struct, with or without
//! `#[serde(deny_unknown_fields)]`, as QEMU refuses them. An explicit `null` for an
//! `Option` member reads as absent. All errors are `GenericError`.

use std::fmt;

use serde::de::{
    self, DeserializeOwned, DeserializeSeed, IntoDeserializer, MapAccess, SeqAccess, Visitor,
};
use serde_json::{Map, Number, Value};

use crate::error::QmpError;

/// Deserialises a command's arguments. Absent `arguments` is an empty map.
pub fn from_arguments<T: DeserializeOwned>(args: Map<String, Value>) -> Result<T, ArgError> {
    T::deserialize(ValueDe {
        value: Value::Object(args),
        path: String::new(),
    })
}

/// A bad argument, naming the parameter by its full path (`capabilities[0].state`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArgError {
    path: Option<String>,
    kind: Kind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Kind {
    /// A struct member is missing (name relative to the struct).
    Missing(String),
    /// A struct member is not expected (name relative to the struct).
    Unexpected(String),
    /// The JSON type is wrong; QEMU's type name expected.
    InvalidType(&'static str),
    /// The value is of the right type but not acceptable (`uint8_t`).
    Expects(String),
    /// An enum does not have this value.
    UnknownValue(String),
    /// Anything a custom `Deserialize` impl reports.
    Custom(String),
}

impl ArgError {
    fn new(kind: Kind) -> Self {
        ArgError { path: None, kind }
    }

    /// Fills in the path of the value whose deserialiser saw the error, unless a deeper
    /// one already did.
    fn at(mut self, path: &str) -> Self {
        if self.path.is_none() {
            self.path = Some(match &self.kind {
                Kind::Missing(field) | Kind::Unexpected(field) => join(path, field),
                _ => path.to_owned(),
            });
        }
        self
    }

    /// The full path of the parameter at fault (empty for the arguments object itself).
    pub fn path(&self) -> &str {
        self.path.as_deref().unwrap_or("")
    }
}

fn join(path: &str, field: &str) -> String {
    if path.is_empty() {
        field.to_owned()
    } else {
        format!("{path}.{field}")
    }
}

impl fmt::Display for ArgError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let path = match self.path.as_deref() {
            None | Some("") => "arguments",
            Some(p) => p,
        };
        match &self.kind {
            Kind::Missing(_) => write!(f, "Parameter '{path}' is missing"),
            Kind::Unexpected(_) => write!(f, "Parameter '{path}' is unexpected"),
            Kind::InvalidType(t) => write!(f, "Invalid parameter type for '{path}', expected: {t}"),
            Kind::Expects(what) => write!(f, "Parameter '{path}' expects {what}"),
            Kind::UnknownValue(v) => write!(f, "Parameter '{path}' does not accept value '{v}'"),
            Kind::Custom(msg) => write!(f, "Invalid value for parameter '{path}': {msg}"),
        }
    }
}

impl std::error::Error for ArgError {}

impl de::Error for ArgError {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        ArgError::new(Kind::Custom(msg.to_string()))
    }
    fn invalid_type(_unexp: de::Unexpected<'_>, exp: &dyn de::Expected) -> Self {
        ArgError::new(Kind::Expects(exp.to_string()))
    }
    fn invalid_value(_unexp: de::Unexpected<'_>, exp: &dyn de::Expected) -> Self {
        ArgError::new(Kind::Expects(exp.to_string()))
    }
    fn invalid_length(len: usize, exp: &dyn de::Expected) -> Self {
        ArgError::new(Kind::Expects(format!("{exp} (got {len} elements)")))
    }
    fn unknown_variant(variant: &str, _expected: &'static [&'static str]) -> Self {
        ArgError::new(Kind::UnknownValue(variant.to_owned()))
    }
    fn unknown_field(field: &str, _expected: &'static [&'static str]) -> Self {
        ArgError::new(Kind::Unexpected(field.to_owned()))
    }
    fn missing_field(field: &'static str) -> Self {
        ArgError::new(Kind::Missing(field.to_owned()))
    }
}

impl From<ArgError> for QmpError {
    fn from(e: ArgError) -> Self {
        QmpError::generic(e.to_string())
    }
}

/// Deserialiser over one JSON value at a known path.
struct ValueDe {
    value: Value,
    path: String,
}

impl ValueDe {
    fn type_error(&self, expected: &'static str) -> ArgError {
        ArgError::new(Kind::InvalidType(expected)).at(&self.path)
    }

    fn expects(&self, what: &str) -> ArgError {
        ArgError::new(Kind::Expects(what.to_owned())).at(&self.path)
    }

    fn signed(&self, min: i64, max: i64, name: &str) -> Result<i64, ArgError> {
        match &self.value {
            Value::Number(n) if is_integer(n) => n
                .as_i64()
                .filter(|v| (min..=max).contains(v))
                .ok_or_else(|| self.expects(name)),
            _ => Err(self.type_error("integer")),
        }
    }

    fn unsigned(&self, max: u64, name: &str) -> Result<u64, ArgError> {
        match &self.value {
            Value::Number(n) if is_integer(n) => n
                .as_u64()
                .filter(|v| *v <= max)
                .ok_or_else(|| self.expects(name)),
            _ => Err(self.type_error("integer")),
        }
    }
}

fn is_integer(n: &Number) -> bool {
    n.is_i64() || n.is_u64()
}

macro_rules! signed {
    ($method:ident, $visit:ident, $t:ty, $name:expr) => {
        fn $method<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ArgError> {
            let v = self.signed(<$t>::MIN as i64, <$t>::MAX as i64, $name)?;
            // In range by the check above.
            visitor
                .$visit(v as $t)
                .map_err(|e: ArgError| e.at(&self.path))
        }
    };
}

macro_rules! unsigned {
    ($method:ident, $visit:ident, $t:ty, $name:expr) => {
        fn $method<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ArgError> {
            let v = self.unsigned(<$t>::MAX as u64, $name)?;
            // In range by the check above.
            visitor
                .$visit(v as $t)
                .map_err(|e: ArgError| e.at(&self.path))
        }
    };
}

impl<'de> de::Deserializer<'de> for ValueDe {
    type Error = ArgError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ArgError> {
        let path = self.path;
        let result = match self.value {
            Value::Null => visitor.visit_unit(),
            Value::Bool(b) => visitor.visit_bool(b),
            Value::Number(n) => {
                if let Some(u) = n.as_u64() {
                    visitor.visit_u64(u)
                } else if let Some(i) = n.as_i64() {
                    visitor.visit_i64(i)
                } else {
                    visitor.visit_f64(n.as_f64().unwrap_or(f64::NAN))
                }
            }
            Value::String(s) => visitor.visit_string(s),
            Value::Array(items) => visit_array(items, &path, visitor),
            Value::Object(map) => visitor.visit_map(MapDe::new(map, &path)),
        };
        result.map_err(|e: ArgError| e.at(&path))
    }

    fn deserialize_bool<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ArgError> {
        match self.value {
            Value::Bool(b) => visitor
                .visit_bool(b)
                .map_err(|e: ArgError| e.at(&self.path)),
            _ => Err(self.type_error("boolean")),
        }
    }

    signed!(deserialize_i8, visit_i8, i8, "int8_t");
    signed!(deserialize_i16, visit_i16, i16, "int16_t");
    signed!(deserialize_i32, visit_i32, i32, "int32_t");
    signed!(deserialize_i64, visit_i64, i64, "int64");
    unsigned!(deserialize_u8, visit_u8, u8, "uint8_t");
    unsigned!(deserialize_u16, visit_u16, u16, "uint16_t");
    unsigned!(deserialize_u32, visit_u32, u32, "uint32_t");
    unsigned!(deserialize_u64, visit_u64, u64, "uint64");

    fn deserialize_f32<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ArgError> {
        self.deserialize_f64(visitor)
    }

    fn deserialize_f64<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ArgError> {
        match &self.value {
            Value::Number(n) => {
                let v = n.as_f64().unwrap_or(f64::NAN);
                visitor.visit_f64(v).map_err(|e: ArgError| e.at(&self.path))
            }
            _ => Err(self.type_error("number")),
        }
    }

    fn deserialize_char<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ArgError> {
        self.deserialize_string(visitor)
    }

    fn deserialize_str<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ArgError> {
        self.deserialize_string(visitor)
    }

    fn deserialize_string<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ArgError> {
        match self.value {
            Value::String(s) => visitor
                .visit_string(s)
                .map_err(|e: ArgError| e.at(&self.path)),
            _ => Err(self.type_error("string")),
        }
    }

    fn deserialize_bytes<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ArgError> {
        self.deserialize_string(visitor)
    }

    fn deserialize_byte_buf<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ArgError> {
        self.deserialize_string(visitor)
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ArgError> {
        match self.value {
            Value::Null => visitor.visit_none().map_err(|e: ArgError| e.at(&self.path)),
            _ => visitor.visit_some(self),
        }
    }

    fn deserialize_unit<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ArgError> {
        match self.value {
            Value::Null => visitor.visit_unit().map_err(|e: ArgError| e.at(&self.path)),
            // `()` as a command's arguments: accepts `{}` only.
            Value::Object(map) => match map.keys().next() {
                None => visitor.visit_unit().map_err(|e: ArgError| e.at(&self.path)),
                Some(key) => Err(ArgError::new(Kind::Unexpected(key.clone())).at(&self.path)),
            },
            _ => Err(self.type_error("null")),
        }
    }

    fn deserialize_unit_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, ArgError> {
        self.deserialize_unit(visitor)
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, ArgError> {
        let path = self.path.clone();
        visitor
            .visit_newtype_struct(self)
            .map_err(|e: ArgError| e.at(&path))
    }

    fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ArgError> {
        match self.value {
            Value::Array(items) => {
                visit_array(items, &self.path, visitor).map_err(|e: ArgError| e.at(&self.path))
            }
            _ => Err(self.type_error("array")),
        }
    }

    fn deserialize_tuple<V: Visitor<'de>>(
        self,
        _len: usize,
        visitor: V,
    ) -> Result<V::Value, ArgError> {
        self.deserialize_seq(visitor)
    }

    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _len: usize,
        visitor: V,
    ) -> Result<V::Value, ArgError> {
        self.deserialize_seq(visitor)
    }

    fn deserialize_map<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ArgError> {
        match self.value {
            Value::Object(map) => visitor
                .visit_map(MapDe::new(map, &self.path))
                .map_err(|e: ArgError| e.at(&self.path)),
            _ => Err(self.type_error("object")),
        }
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, ArgError> {
        let Value::Object(map) = self.value else {
            return Err(ArgError::new(Kind::InvalidType("object")).at(&self.path));
        };
        // QEMU checks members in schema order and reports extra ones last.
        let unexpected = map.keys().find(|k| !fields.contains(&k.as_str())).cloned();
        let value = visitor
            .visit_map(MapDe::new(map, &self.path))
            .map_err(|e: ArgError| e.at(&self.path))?;
        match unexpected {
            Some(key) => Err(ArgError::new(Kind::Unexpected(key)).at(&self.path)),
            None => Ok(value),
        }
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, ArgError> {
        match self.value {
            Value::String(s) => visitor
                .visit_enum(s.into_deserializer())
                .map_err(|e: ArgError| e.at(&self.path)),
            _ => Err(self.type_error("string")),
        }
    }

    fn deserialize_identifier<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ArgError> {
        self.deserialize_string(visitor)
    }

    fn deserialize_ignored_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ArgError> {
        visitor.visit_unit()
    }
}

fn visit_array<'de, V: Visitor<'de>>(
    items: Vec<Value>,
    path: &str,
    visitor: V,
) -> Result<V::Value, ArgError> {
    let len = items.len();
    let mut seq = SeqDe {
        iter: items.into_iter(),
        path,
        index: 0,
    };
    let value = visitor.visit_seq(&mut seq)?;
    if seq.iter.len() == 0 {
        Ok(value)
    } else {
        Err(ArgError::new(Kind::Expects(format!(
            "at most {} elements (got {len})",
            seq.index
        )))
        .at(path))
    }
}

struct SeqDe<'p> {
    iter: std::vec::IntoIter<Value>,
    path: &'p str,
    index: usize,
}

impl<'de> SeqAccess<'de> for SeqDe<'_> {
    type Error = ArgError;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, ArgError> {
        let Some(value) = self.iter.next() else {
            return Ok(None);
        };
        let path = format!("{}[{}]", self.path, self.index);
        self.index += 1;
        seed.deserialize(ValueDe { value, path }).map(Some)
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.iter.len())
    }
}

struct MapDe<'p> {
    iter: serde_json::map::IntoIter,
    next: Option<(String, Value)>,
    path: &'p str,
}

impl<'p> MapDe<'p> {
    fn new(map: Map<String, Value>, path: &'p str) -> Self {
        MapDe {
            iter: map.into_iter(),
            next: None,
            path,
        }
    }
}

impl<'de> MapAccess<'de> for MapDe<'_> {
    type Error = ArgError;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, ArgError> {
        let Some((key, value)) = self.iter.next() else {
            return Ok(None);
        };
        let result = seed
            .deserialize(key.clone().into_deserializer())
            .map_err(|e: ArgError| e.at(self.path));
        self.next = Some((key, value));
        result.map(Some)
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, ArgError> {
        let Some((key, value)) = self.next.take() else {
            return Err(ArgError::new(Kind::Custom(
                "value requested before key".into(),
            )));
        };
        seed.deserialize(ValueDe {
            value,
            path: join(self.path, &key),
        })
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.iter.len())
    }
}
