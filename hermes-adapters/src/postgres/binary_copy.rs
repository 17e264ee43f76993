//! Rows in PostgreSQL's binary `COPY` format, with each field encoded by
//! sqlx's [`Encode`], ready for [`PgCopyIn::send`](sqlx::postgres::PgCopyIn::send)
//! after `COPY table (columns) FROM STDIN (FORMAT binary)`, whole or in
//! chunks: [`BinaryCopy::pending`] is what was written since the last
//! [`BinaryCopy::clear`].
//!
//! In binary `COPY` every field must be in the exact binary format of its
//! column's type (a `String` suits `text`, not `jsonb`; use
//! `sqlx::types::Json` for `jsonb`). Built-in scalar types work; types whose
//! encoding needs type OIDs resolved by sqlx at bind time (arrays of custom
//! types) do not.

use sqlx::encode::IsNull;
use sqlx::error::BoxDynError;
use sqlx::postgres::PgArgumentBuffer;
use sqlx::{Encode, Postgres};

/// The signature, flags and header extension length that open binary COPY data.
const HEADER: &[u8] = b"PGCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\0";

/// A buffer of rows in binary `COPY` format (header, rows, trailer), which
/// can be sent and cleared as it fills.
pub struct BinaryCopy {
    buf: PgArgumentBuffer,
    rows: usize,
}

impl std::fmt::Debug for BinaryCopy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BinaryCopy")
            .field("rows", &self.rows)
            .field("bytes", &self.buf.len())
            .finish()
    }
}

impl BinaryCopy {
    /// An empty buffer (just the header) with room for about `capacity` bytes.
    pub fn with_capacity(capacity: usize) -> Self {
        let mut buf = PgArgumentBuffer::default();
        buf.reserve(capacity.max(HEADER.len() + 2));
        buf.extend_from_slice(HEADER);
        Self { buf, rows: 0 }
    }

    /// Starts a row of `fields` fields; exactly that many [`BinaryCopy::field`]
    /// calls must follow.
    pub fn row(&mut self, fields: u16) {
        self.buf.extend_from_slice(&fields.to_be_bytes());
        self.rows += 1;
    }

    /// Appends one field of the current row.
    pub fn field<'q, T>(&mut self, value: &T) -> Result<(), BoxDynError>
    where
        T: Encode<'q, Postgres>,
    {
        let start = self.buf.len();
        self.buf.extend_from_slice(&[0; 4]);
        let length = match value.encode_by_ref(&mut self.buf)? {
            IsNull::Yes => {
                self.buf.truncate(start + 4);
                -1
            }
            IsNull::No => i32::try_from(self.buf.len() - start - 4)
                .map_err(|_| "a field longer than 2 GiB cannot be copied")?,
        };
        self.buf[start..start + 4].copy_from_slice(&length.to_be_bytes());
        Ok(())
    }

    /// Rows started so far, cleared ones included.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// The bytes written since the buffer was made or last cleared.
    pub fn pending(&self) -> &[u8] {
        &self.buf
    }

    /// Drops the pending bytes (once sent), keeping the buffer's room and
    /// the count of rows.
    pub fn clear(&mut self) {
        self.buf.clear();
    }

    /// Appends the trailer that ends the data: no row may follow.
    pub fn end(&mut self) {
        self.buf.extend_from_slice(&(-1i16).to_be_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_header_rows_nulls_and_trailer() {
        let mut copy = BinaryCopy::with_capacity(64);
        copy.row(2);
        copy.field(&"ab").expect("text");
        copy.field(&Option::<i32>::None).expect("null");
        copy.row(2);
        copy.field(&"").expect("empty");
        copy.field(&7i32).expect("int");
        copy.end();
        assert_eq!(copy.rows(), 2);
        let mut expected = HEADER.to_vec();
        expected.extend_from_slice(&[0, 2, 0, 0, 0, 2, b'a', b'b', 0xff, 0xff, 0xff, 0xff]);
        expected.extend_from_slice(&[0, 2, 0, 0, 0, 0, 0, 0, 0, 4, 0, 0, 0, 7]);
        expected.extend_from_slice(&[0xff, 0xff]);
        assert_eq!(copy.pending(), expected);
    }

    #[test]
    fn cleared_bytes_leave_the_rest_and_the_row_count() {
        let mut copy = BinaryCopy::with_capacity(64);
        copy.row(1);
        copy.field(&1i32).expect("int");
        let mut sent = copy.pending().to_vec();
        copy.clear();
        copy.row(1);
        copy.field(&2i32).expect("int");
        copy.end();
        sent.extend_from_slice(copy.pending());
        assert_eq!(copy.rows(), 2);
        let mut whole = BinaryCopy::with_capacity(64);
        for value in [1i32, 2] {
            whole.row(1);
            whole.field(&value).expect("int");
        }
        whole.end();
        assert_eq!(sent, whole.pending());
    }
}
