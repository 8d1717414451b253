//! Typed ids: a call's id cannot be passed where a user's is meant, and the compiler says so.
//!
//! Each is its inner value on the wire (`#[serde(transparent)]`), so events, answers and rows
//! keep their shape. The domain does no I/O, so these carry no database encoding: a query binds
//! `id.uuid()` (or `id.as_str()`), and a row struct reads one through its inner value
//! (`#[sqlx(try_from = "Uuid")]`, or `"String"` where the column holds it as text).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

macro_rules! uuid_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(
            Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
        )]
        #[serde(transparent)]
        pub struct $name(Uuid);

        impl $name {
            /// A new id (UUID v7: ordered by creation time).
            pub fn generate() -> Self {
                $name(Uuid::now_v7())
            }

            pub const fn from_uuid(id: Uuid) -> Self {
                $name(id)
            }

            pub const fn uuid(self) -> Uuid {
                self.0
            }
        }

        impl From<Uuid> for $name {
            fn from(id: Uuid) -> Self {
                $name(id)
            }
        }

        impl From<$name> for Uuid {
            fn from(id: $name) -> Self {
                id.0
            }
        }

        impl FromStr for $name {
            type Err = uuid::Error;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Uuid::parse_str(s).map($name)
            }
        }

        impl TryFrom<String> for $name {
            type Error = uuid::Error;
            /// A column or field that holds the id as text.
            fn try_from(s: String) -> Result<Self, Self::Error> {
                s.parse()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }
    };
}

uuid_id!(
    /// A user's id (their `user` aggregate's, and their wallet's, billing's and budget's).
    UserId
);
uuid_id!(
    /// A call's id (its `call` aggregate's; also the name of its hold).
    CallId
);

macro_rules! text_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            pub fn new(id: impl Into<String>) -> Self {
                $name(id.into())
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl From<String> for $name {
            fn from(id: String) -> Self {
                $name(id)
            }
        }

        impl From<&str> for $name {
            fn from(id: &str) -> Self {
                $name(id.to_string())
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> Self {
                id.0
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

text_id!(
    /// A persona's id: a system persona's name (`brad_001`) or a user's persona's UUID.
    PersonaId
);
text_id!(
    /// A knowledge document's id within its persona: a UUID for a user's upload, `<slug>-<hash>`
    /// for a system persona's shipped document.
    DocumentId
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_their_inner_value_on_the_wire() {
        let uuid = Uuid::now_v7();
        let call = CallId::from(uuid);
        assert_eq!(serde_json::to_value(call).unwrap(), serde_json::json!(uuid));
        assert_eq!(
            serde_json::from_value::<CallId>(serde_json::json!(uuid)).unwrap(),
            call
        );
        assert_eq!(call.to_string(), uuid.to_string());
        assert_eq!(uuid.to_string().parse::<CallId>().unwrap(), call);
        assert!("brad_001".parse::<UserId>().is_err());
        assert_eq!(CallId::try_from(uuid.to_string()).unwrap(), call);
        assert!(CallId::try_from("brad_001".to_string()).is_err());
        let persona = PersonaId::new("brad_001");
        assert_eq!(
            serde_json::to_value(&persona).unwrap(),
            serde_json::json!("brad_001")
        );
        assert_eq!(persona.to_string(), "brad_001");
        let document = DocumentId::new("faq-0123456789ab");
        assert_eq!(
            serde_json::to_value(&document).unwrap(),
            serde_json::json!("faq-0123456789ab")
        );
    }
}
