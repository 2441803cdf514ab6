//! A walk over a value's `Serialize` that finds non-finite floats, which
//! serde_json writes as `null` (so `+inf`, `-inf`, NaN and `null` would be
//! one input).

use std::fmt;

use serde::ser::{self, Serialize};

/// What the walk found.
#[derive(Debug)]
pub(crate) enum Walk {
    /// A NaN or infinite float.
    NonFinite,
    /// The value's own `Serialize` failed: left for serde_json to report.
    Other,
}

impl fmt::Display for Walk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Walk::NonFinite => "a NaN or infinite number",
            Walk::Other => "a value that does not serialise",
        })
    }
}

impl std::error::Error for Walk {}

impl ser::Error for Walk {
    fn custom<T: fmt::Display>(_: T) -> Self {
        Walk::Other
    }
}

/// Whether `value` holds a NaN or infinite float anywhere.
pub(crate) fn has_non_finite<T: Serialize + ?Sized>(value: &T) -> bool {
    matches!(value.serialize(Finite), Err(Walk::NonFinite))
}

#[derive(Clone, Copy)]
struct Finite;

type Done = Result<(), Walk>;

fn float(v: f64) -> Done {
    if v.is_finite() {
        Ok(())
    } else {
        Err(Walk::NonFinite)
    }
}

macro_rules! fine {
    ($($name:ident: $ty:ty),* $(,)?) => {
        $(fn $name(self, _: $ty) -> Done { Ok(()) })*
    };
}

impl ser::Serializer for Finite {
    type Ok = ();
    type Error = Walk;
    type SerializeSeq = Finite;
    type SerializeTuple = Finite;
    type SerializeTupleStruct = Finite;
    type SerializeTupleVariant = Finite;
    type SerializeMap = Finite;
    type SerializeStruct = Finite;
    type SerializeStructVariant = Finite;

    fine!(
        serialize_bool: bool,
        serialize_i8: i8,
        serialize_i16: i16,
        serialize_i32: i32,
        serialize_i64: i64,
        serialize_i128: i128,
        serialize_u8: u8,
        serialize_u16: u16,
        serialize_u32: u32,
        serialize_u64: u64,
        serialize_u128: u128,
        serialize_char: char,
        serialize_str: &str,
        serialize_bytes: &[u8],
        serialize_unit_struct: &'static str,
    );

    fn serialize_f32(self, v: f32) -> Done {
        float(f64::from(v))
    }

    fn serialize_f64(self, v: f64) -> Done {
        float(v)
    }

    fn serialize_none(self) -> Done {
        Ok(())
    }

    fn serialize_some<T: Serialize + ?Sized>(self, value: &T) -> Done {
        value.serialize(self)
    }

    fn serialize_unit(self) -> Done {
        Ok(())
    }

    fn serialize_unit_variant(self, _: &'static str, _: u32, _: &'static str) -> Done {
        Ok(())
    }

    fn serialize_newtype_struct<T: Serialize + ?Sized>(self, _: &'static str, value: &T) -> Done {
        value.serialize(self)
    }

    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        value: &T,
    ) -> Done {
        value.serialize(self)
    }

    fn serialize_seq(self, _: Option<usize>) -> Result<Finite, Walk> {
        Ok(self)
    }

    fn serialize_tuple(self, _: usize) -> Result<Finite, Walk> {
        Ok(self)
    }

    fn serialize_tuple_struct(self, _: &'static str, _: usize) -> Result<Finite, Walk> {
        Ok(self)
    }

    fn serialize_tuple_variant(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: usize,
    ) -> Result<Finite, Walk> {
        Ok(self)
    }

    fn serialize_map(self, _: Option<usize>) -> Result<Finite, Walk> {
        Ok(self)
    }

    fn serialize_struct(self, _: &'static str, _: usize) -> Result<Finite, Walk> {
        Ok(self)
    }

    fn serialize_struct_variant(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: usize,
    ) -> Result<Finite, Walk> {
        Ok(self)
    }
}

/// The compound parts: each element, key, value or field is walked in
/// turn.
macro_rules! walk_each {
    ($($trait:ident::$method:ident($($skip:ty),*);)*) => {
        $(
            impl ser::$trait for Finite {
                type Ok = ();
                type Error = Walk;
                fn $method<T: Serialize + ?Sized>(&mut self, $(_: $skip,)* value: &T) -> Done {
                    value.serialize(Finite)
                }
                fn end(self) -> Done {
                    Ok(())
                }
            }
        )*
    };
}

walk_each! {
    SerializeSeq::serialize_element();
    SerializeTuple::serialize_element();
    SerializeTupleStruct::serialize_field();
    SerializeTupleVariant::serialize_field();
    SerializeStruct::serialize_field(&'static str);
    SerializeStructVariant::serialize_field(&'static str);
}

impl ser::SerializeMap for Finite {
    type Ok = ();
    type Error = Walk;
    fn serialize_key<T: Serialize + ?Sized>(&mut self, key: &T) -> Done {
        key.serialize(Finite)
    }
    fn serialize_value<T: Serialize + ?Sized>(&mut self, value: &T) -> Done {
        value.serialize(Finite)
    }
    fn end(self) -> Done {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_finite_floats_are_found_wherever_they_are() {
        #[derive(serde::Serialize)]
        struct Pay {
            amount: Option<f64>,
            lines: Vec<(String, f32)>,
        }
        let finite = Pay {
            amount: Some(12.5),
            lines: vec![("a".into(), 1.0)],
        };
        assert!(!has_non_finite(&finite));
        assert!(!has_non_finite(
            &serde_json::json!({"a": [1.5, null, {"b": 2}]})
        ));
        for bad in [
            Pay {
                amount: Some(f64::INFINITY),
                lines: vec![],
            },
            Pay {
                amount: None,
                lines: vec![("x".into(), f32::NAN)],
            },
        ] {
            assert!(has_non_finite(&bad));
        }
        let mut map = std::collections::BTreeMap::new();
        map.insert("k", f64::NEG_INFINITY);
        assert!(has_non_finite(&map));
    }
}
