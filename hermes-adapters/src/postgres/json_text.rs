//! JSON text bound as `jsonb` without parsing it in Rust.

use sqlx::encode::IsNull;
use sqlx::error::BoxDynError;
use sqlx::postgres::{PgArgumentBuffer, PgHasArrayType, PgTypeInfo};
use sqlx::{Encode, Postgres, Type};

/// JSON text (a webhook body, a serialized event) bound as `jsonb` as it is:
/// not parsed or re-serialized on the client; the server parses and
/// validates it, and rejects invalid JSON with SQLSTATE `22P02`.
///
/// Unlike `String`, it has `jsonb`'s binary format, so it also works in
/// binary `COPY` (see [`UnnestInsertBuilder::optimistic_copy`](super::UnnestInsertBuilder::optimistic_copy)).
/// The text may be owned (`JsonText<String>`, the default) or borrowed
/// (`JsonText<&str>`, to encode a field without copying it).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct JsonText<S = String>(pub S);

impl From<String> for JsonText {
    fn from(text: String) -> Self {
        JsonText(text)
    }
}

impl From<&str> for JsonText {
    fn from(text: &str) -> Self {
        JsonText(text.to_owned())
    }
}

impl<S> Type<Postgres> for JsonText<S> {
    fn type_info() -> PgTypeInfo {
        <serde_json::Value as Type<Postgres>>::type_info()
    }

    fn compatible(ty: &PgTypeInfo) -> bool {
        <serde_json::Value as Type<Postgres>>::compatible(ty)
    }
}

impl<S> PgHasArrayType for JsonText<S> {
    fn array_type_info() -> PgTypeInfo {
        <serde_json::Value as PgHasArrayType>::array_type_info()
    }
}

impl<S: AsRef<str>> Encode<'_, Postgres> for JsonText<S> {
    fn encode_by_ref(&self, buf: &mut PgArgumentBuffer) -> Result<IsNull, BoxDynError> {
        // jsonb's binary format: a version byte (1), then the JSON text.
        buf.push(1);
        buf.extend_from_slice(self.0.as_ref().as_bytes());
        Ok(IsNull::No)
    }

    fn size_hint(&self) -> usize {
        self.0.as_ref().len() + 1
    }
}
