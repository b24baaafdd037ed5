//! GGUF metadata copied out of ggml's reader into owned values, with typed getters that
//! accept every integer width the writers use and name the key in every error.
use std::collections::BTreeMap;

use ggml::sys;
use sys::gguf_type as gt;

use crate::{Gguf, LoadError};

#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    /// Any integer type; `ty` is the GGUF type name as stored.
    Int { v: i128, ty: &'static str },
    Float { v: f64, ty: &'static str },
    Bool(bool),
    Str(String),
    IntArray { v: Vec<i128>, ty: &'static str },
    FloatArray { v: Vec<f64>, ty: &'static str },
    BoolArray(Vec<bool>),
    StrArray(Vec<String>),
}

impl Value {
    pub fn type_name(&self) -> String {
        match self {
            Value::Int { ty, .. } | Value::Float { ty, .. } => ty.to_string(),
            Value::Bool(_) => "bool".into(),
            Value::Str(_) => "string".into(),
            Value::IntArray { ty, .. } | Value::FloatArray { ty, .. } => format!("array of {ty}"),
            Value::BoolArray(_) => "array of bool".into(),
            Value::StrArray(_) => "array of string".into(),
        }
    }

    /// A short rendering for `inspect` (arrays abbreviated).
    pub fn summary(&self) -> String {
        fn list<T: std::fmt::Debug>(v: &[T]) -> String {
            if v.len() <= 8 {
                format!("{v:?}")
            } else {
                format!("[{:?}, {:?}, {:?}, … ({} items)]", v[0], v[1], v[2], v.len())
            }
        }
        match self {
            Value::Int { v, .. } => v.to_string(),
            Value::Float { v, .. } => v.to_string(),
            Value::Bool(b) => b.to_string(),
            Value::Str(s) if s.len() > 60 => format!("{:?}… ({} bytes)", s.chars().take(40).collect::<String>(), s.len()),
            Value::Str(s) => format!("{s:?}"),
            Value::IntArray { v, .. } => list(v),
            Value::FloatArray { v, .. } => list(v),
            Value::BoolArray(v) => list(v),
            Value::StrArray(v) => list(v),
        }
    }
}

fn type_name(t: gt::Type) -> &'static str {
    match t {
        gt::GGUF_TYPE_UINT8 => "u8",
        gt::GGUF_TYPE_INT8 => "i8",
        gt::GGUF_TYPE_UINT16 => "u16",
        gt::GGUF_TYPE_INT16 => "i16",
        gt::GGUF_TYPE_UINT32 => "u32",
        gt::GGUF_TYPE_INT32 => "i32",
        gt::GGUF_TYPE_UINT64 => "u64",
        gt::GGUF_TYPE_INT64 => "i64",
        gt::GGUF_TYPE_FLOAT32 => "f32",
        gt::GGUF_TYPE_FLOAT64 => "f64",
        gt::GGUF_TYPE_BOOL => "bool",
        gt::GGUF_TYPE_STRING => "string",
        _ => "unknown",
    }
}

/// Decode `n` little-endian elements of GGUF type `t` from raw bytes as integers.
fn ints(t: gt::Type, bytes: &[u8]) -> Option<Vec<i128>> {
    macro_rules! dec {
        ($ty:ty) => {
            bytes
                .chunks_exact(std::mem::size_of::<$ty>())
                .map(|c| <$ty>::from_le_bytes(c.try_into().unwrap()) as i128)
                .collect()
        };
    }
    Some(match t {
        gt::GGUF_TYPE_UINT8 => dec!(u8),
        gt::GGUF_TYPE_INT8 => dec!(i8),
        gt::GGUF_TYPE_UINT16 => dec!(u16),
        gt::GGUF_TYPE_INT16 => dec!(i16),
        gt::GGUF_TYPE_UINT32 => dec!(u32),
        gt::GGUF_TYPE_INT32 => dec!(i32),
        gt::GGUF_TYPE_UINT64 => dec!(u64),
        gt::GGUF_TYPE_INT64 => dec!(i64),
        _ => return None,
    })
}

fn floats(t: gt::Type, bytes: &[u8]) -> Option<Vec<f64>> {
    Some(match t {
        gt::GGUF_TYPE_FLOAT32 => bytes.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64).collect(),
        gt::GGUF_TYPE_FLOAT64 => bytes.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().unwrap())).collect(),
        _ => return None,
    })
}

fn elem_size(t: gt::Type) -> usize {
    match t {
        gt::GGUF_TYPE_UINT8 | gt::GGUF_TYPE_INT8 | gt::GGUF_TYPE_BOOL => 1,
        gt::GGUF_TYPE_UINT16 | gt::GGUF_TYPE_INT16 => 2,
        gt::GGUF_TYPE_UINT32 | gt::GGUF_TYPE_INT32 | gt::GGUF_TYPE_FLOAT32 => 4,
        gt::GGUF_TYPE_UINT64 | gt::GGUF_TYPE_INT64 | gt::GGUF_TYPE_FLOAT64 => 8,
        _ => 0,
    }
}

#[derive(Clone, Debug, Default)]
pub struct Metadata {
    map: BTreeMap<String, Value>,
}

impl Metadata {
    pub fn read(gguf: &Gguf) -> Result<Metadata, LoadError> {
        let ctx = gguf.as_ptr();
        let mut map = BTreeMap::new();
        // SAFETY: every id is in [0, n_kv), and each getter is called only for the type
        // ggml reports for that key (ggml asserts otherwise).
        unsafe {
            for id in 0..sys::gguf_get_n_kv(ctx) {
                let key = Gguf::str_at(sys::gguf_get_key(ctx, id));
                let t = sys::gguf_get_kv_type(ctx, id);
                let value = if t == gt::GGUF_TYPE_ARRAY {
                    let at = sys::gguf_get_arr_type(ctx, id);
                    let n = sys::gguf_get_arr_n(ctx, id);
                    if at == gt::GGUF_TYPE_STRING {
                        Value::StrArray((0..n).map(|i| Gguf::str_at(sys::gguf_get_arr_str(ctx, id, i))).collect())
                    } else {
                        let size = elem_size(at);
                        let data = sys::gguf_get_arr_data(ctx, id) as *const u8;
                        let bytes = if n == 0 || data.is_null() { &[][..] } else { std::slice::from_raw_parts(data, n * size) };
                        if at == gt::GGUF_TYPE_BOOL {
                            Value::BoolArray(bytes.iter().map(|&b| b != 0).collect())
                        } else if let Some(v) = ints(at, bytes) {
                            Value::IntArray { v, ty: type_name(at) }
                        } else if let Some(v) = floats(at, bytes) {
                            Value::FloatArray { v, ty: type_name(at) }
                        } else {
                            return Err(LoadError::KeyType { key, expected: "a scalar or array of scalars", found: format!("array of type {at}") });
                        }
                    }
                } else if t == gt::GGUF_TYPE_STRING {
                    Value::Str(Gguf::str_at(sys::gguf_get_val_str(ctx, id)))
                } else {
                    let size = elem_size(t);
                    let data = sys::gguf_get_val_data(ctx, id) as *const u8;
                    if size == 0 || data.is_null() {
                        return Err(LoadError::KeyType { key, expected: "a known GGUF type", found: format!("type {t}") });
                    }
                    let bytes = std::slice::from_raw_parts(data, size);
                    if t == gt::GGUF_TYPE_BOOL {
                        Value::Bool(bytes[0] != 0)
                    } else if let Some(v) = ints(t, bytes) {
                        Value::Int { v: v[0], ty: type_name(t) }
                    } else if let Some(v) = floats(t, bytes) {
                        Value::Float { v: v[0], ty: type_name(t) }
                    } else {
                        return Err(LoadError::KeyType { key, expected: "a known GGUF type", found: format!("type {t}") });
                    }
                };
                map.insert(key, value);
            }
        }
        Ok(Metadata { map })
    }

    pub fn from_map(map: BTreeMap<String, Value>) -> Metadata {
        Metadata { map }
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.map.get(key)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&String, &Value)> {
        self.map.iter()
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    fn required(&self, key: &str) -> Result<&Value, LoadError> {
        self.map.get(key).ok_or_else(|| LoadError::MissingKey { key: key.to_string() })
    }

    fn type_err(key: &str, expected: &'static str, v: &Value) -> LoadError {
        LoadError::KeyType { key: key.to_string(), expected, found: v.type_name() }
    }

    /// An integer of any width, in `[min, max]`.
    pub fn int_in(&self, key: &str, min: i128, max: i128) -> Result<i128, LoadError> {
        match self.required(key)? {
            Value::Int { v, .. } => check_range(key, *v, min, max),
            other => Err(Self::type_err(key, "an integer", other)),
        }
    }

    pub fn opt_int_in(&self, key: &str, min: i128, max: i128) -> Result<Option<i128>, LoadError> {
        if self.map.contains_key(key) {
            self.int_in(key, min, max).map(Some)
        } else {
            Ok(None)
        }
    }

    pub fn u32(&self, key: &str) -> Result<u32, LoadError> {
        Ok(self.int_in(key, 0, u32::MAX as i128)? as u32)
    }

    /// A positive integer that fits u32.
    pub fn pos_u32(&self, key: &str) -> Result<u32, LoadError> {
        Ok(self.int_in(key, 1, u32::MAX as i128)? as u32)
    }

    /// A float (f32 or f64) that is finite.
    pub fn float(&self, key: &str) -> Result<f64, LoadError> {
        match self.required(key)? {
            Value::Float { v, .. } if v.is_finite() => Ok(*v),
            Value::Float { v, .. } => Err(LoadError::KeyValue { key: key.into(), expected: "a finite number".into(), found: v.to_string() }),
            other => Err(Self::type_err(key, "a float", other)),
        }
    }

    pub fn opt_float(&self, key: &str) -> Result<Option<f64>, LoadError> {
        if self.map.contains_key(key) {
            self.float(key).map(Some)
        } else {
            Ok(None)
        }
    }

    pub fn bool(&self, key: &str) -> Result<bool, LoadError> {
        match self.required(key)? {
            Value::Bool(b) => Ok(*b),
            other => Err(Self::type_err(key, "a bool", other)),
        }
    }

    pub fn str(&self, key: &str) -> Result<&str, LoadError> {
        match self.required(key)? {
            Value::Str(s) => Ok(s),
            other => Err(Self::type_err(key, "a string", other)),
        }
    }

    pub fn opt_str(&self, key: &str) -> Result<Option<&str>, LoadError> {
        if self.map.contains_key(key) {
            self.str(key).map(Some)
        } else {
            Ok(None)
        }
    }

    /// An integer array of any width with every element in `[min, max]`.
    pub fn int_array_in(&self, key: &str, min: i128, max: i128) -> Result<Vec<i128>, LoadError> {
        match self.required(key)? {
            Value::IntArray { v, .. } => {
                for (i, x) in v.iter().enumerate() {
                    check_range(&format!("{key}[{i}]"), *x, min, max)?;
                }
                Ok(v.clone())
            }
            other => Err(Self::type_err(key, "an integer array", other)),
        }
    }

    /// A float, or an array of floats with one value per layer (at least `n`): `n` values.
    pub fn float_or_array(&self, key: &str, n: usize) -> Result<Vec<f64>, LoadError> {
        match self.required(key)? {
            Value::Float { .. } => Ok(vec![self.float(key)?; n]),
            Value::FloatArray { v, .. } => {
                if v.len() < n {
                    return Err(LoadError::KeyValue {
                        key: key.into(),
                        expected: format!("at least {n} values (one per layer)"),
                        found: format!("{} values", v.len()),
                    });
                }
                if let Some(bad) = v.iter().find(|x| !x.is_finite()) {
                    return Err(LoadError::KeyValue { key: key.into(), expected: "finite numbers".into(), found: bad.to_string() });
                }
                Ok(v[..n].to_vec())
            }
            other => Err(Self::type_err(key, "a float or an array of floats", other)),
        }
    }

    /// An integer, or an integer array with one value per layer (at least `n`): `n` values.
    pub fn int_or_array_in(&self, key: &str, n: usize, min: i128, max: i128) -> Result<Vec<i128>, LoadError> {
        match self.required(key)? {
            Value::Int { .. } => Ok(vec![self.int_in(key, min, max)?; n]),
            Value::IntArray { v, .. } => {
                if v.len() < n {
                    return Err(LoadError::KeyValue {
                        key: key.into(),
                        expected: format!("at least {n} values (one per layer)"),
                        found: format!("{} values", v.len()),
                    });
                }
                self.int_array_in(key, min, max).map(|v| v[..n].to_vec())
            }
            other => Err(Self::type_err(key, "an integer or an integer array", other)),
        }
    }

    pub fn str_array(&self, key: &str) -> Result<&[String], LoadError> {
        match self.required(key)? {
            Value::StrArray(v) => Ok(v),
            other => Err(Self::type_err(key, "a string array", other)),
        }
    }
}

fn check_range(key: &str, v: i128, min: i128, max: i128) -> Result<i128, LoadError> {
    if v < min || v > max {
        let expected = if max == u32::MAX as i128 || max == i64::MAX as i128 {
            format!("an integer ≥ {min}")
        } else {
            format!("an integer in [{min}, {max}]")
        };
        return Err(LoadError::KeyValue { key: key.to_string(), expected, found: v.to_string() });
    }
    Ok(v)
}
