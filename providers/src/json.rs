//! Small serde helpers for reading providers' streamed messages into typed structs in one pass,
//! without a `serde_json::Value` tree or a `Vec` for arrays of which only the first element is
//! used (Deepgram's `alternatives`, the LLM's `choices`): these messages come many times a
//! second per call, and a tree costs an allocation per field.

use std::fmt;
use std::marker::PhantomData;

use serde::de::value::MapAccessDeserializer;
use serde::de::{Deserialize, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

/// The first element of a JSON array, the rest skipped unread; `None` for an empty array.
#[derive(Debug)]
pub(crate) struct First<T>(pub Option<T>);

impl<T> Default for First<T> {
    fn default() -> Self {
        First(None)
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for First<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Elements<T>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for Elements<T> {
            type Value = First<T>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an array")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<First<T>, A::Error> {
                let first = seq.next_element()?;
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(First(first))
            }
        }
        deserializer.deserialize_seq(Elements(PhantomData))
    }
}

/// An object read as `T`; anything else (an array, a number, a string, `null`) read as `None`.
/// Deepgram's `channel` is an object in `Results` and an array (`[0,1]`) in other messages.
#[derive(Debug)]
pub(crate) struct IfObject<T>(pub Option<T>);

impl<T> Default for IfObject<T> {
    fn default() -> Self {
        IfObject(None)
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for IfObject<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Any<T>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for Any<T> {
            type Value = IfObject<T>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<IfObject<T>, A::Error> {
                T::deserialize(MapAccessDeserializer::new(map)).map(|t| IfObject(Some(t)))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<IfObject<T>, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(IfObject(None))
            }
            fn visit_bool<E>(self, _: bool) -> Result<IfObject<T>, E> {
                Ok(IfObject(None))
            }
            fn visit_i64<E>(self, _: i64) -> Result<IfObject<T>, E> {
                Ok(IfObject(None))
            }
            fn visit_u64<E>(self, _: u64) -> Result<IfObject<T>, E> {
                Ok(IfObject(None))
            }
            fn visit_f64<E>(self, _: f64) -> Result<IfObject<T>, E> {
                Ok(IfObject(None))
            }
            fn visit_str<E>(self, _: &str) -> Result<IfObject<T>, E> {
                Ok(IfObject(None))
            }
            fn visit_unit<E>(self) -> Result<IfObject<T>, E> {
                Ok(IfObject(None))
            }
        }
        deserializer.deserialize_any(Any(PhantomData))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    struct Named {
        name: String,
    }

    #[test]
    fn first_element_and_objects_only() {
        let first: First<u32> = serde_json::from_str("[3, {\"x\": [1]}, \"y\"]").expect("array");
        assert_eq!(first.0, Some(3));
        let empty: First<u32> = serde_json::from_str("[]").expect("array");
        assert_eq!(empty.0, None);
        assert!(serde_json::from_str::<First<u32>>("{}").is_err());
        let object: IfObject<Named> = serde_json::from_str(r#"{"name":"a"}"#).expect("object");
        assert_eq!(object.0.map(|n| n.name), Some("a".into()));
        for other in ["[0,1]", "7", "\"s\"", "null", "true", "-1.5"] {
            let skipped: IfObject<Named> = serde_json::from_str(other).expect(other);
            assert!(skipped.0.is_none(), "{other}");
        }
    }
}
