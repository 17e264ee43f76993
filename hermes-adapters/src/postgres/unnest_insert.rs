//! A ready-made [`BatchStatement`]: insert rows into one table in one round
//! trip, from one array parameter per column, idempotent by a unique key, and
//! tell inserted rows from duplicates.
//!
//! For a table `events (source text, event_id text, payload jsonb,
//! UNIQUE (source, event_id))` it sends
//!
//! ```sql
//! WITH ins AS (
//!     INSERT INTO "events" ("source", "event_id", "payload")
//!     SELECT * FROM UNNEST($1::text[], $2::text[], $3::jsonb[])
//!         AS input("source", "event_id", "payload")
//!     ON CONFLICT ("source", "event_id") DO NOTHING
//!     RETURNING "source", "event_id"
//! )
//! SELECT input.hermes_ord, true
//! FROM UNNEST($1::text[], $2::text[]) WITH ORDINALITY AS input("source", "event_id", hermes_ord)
//! JOIN ins USING ("source", "event_id")
//! ```
//!
//! with binary array binds (one parameter per column, the key arrays used
//! twice), and reads back the ordinals of the rows that were inserted; every
//! other row was a duplicate. The payload goes straight from its array into
//! the table; only the keys are joined. Rows are sent sorted by their Rust
//! key, so concurrent writers of overlapping keys lock them in the same order
//! and do not deadlock one another.

use std::collections::HashSet;
use std::hash::Hash;
use std::sync::Arc;

use futures::future::BoxFuture;
use sqlx::error::BoxDynError;
use sqlx::postgres::{PgArguments, PgHasArrayType};
use sqlx::{Arguments, Encode, PgConnection, Postgres, Type};

use super::binary_copy::BinaryCopy;
use super::optimistic_copy::{CopyFailure, OptimisticCopy};
use super::statement::{BatchStatement, Written};

/// Binds one column of a batch as one array parameter.
type Binder<R> = Box<dyn Fn(&[&R], &mut PgArguments) -> Result<(), BoxDynError> + Send + Sync>;

/// Appends one column of one row to binary COPY data.
type Encoder<R> = Box<dyn Fn(&R, &mut BinaryCopy) -> Result<(), BoxDynError> + Send + Sync>;

/// PostgreSQL's limit on the columns of a table.
const MAX_COLUMNS: usize = 1600;

/// The name of the ordinal column the statement adds to its input.
const ORDINAL: &str = "hermes_ord";

/// The statement's own column telling an upsert's inserted rows from its
/// updated ones: reserved too.
const INSERTED: &str = "hermes_inserted";

struct Column<R> {
    name: String,
    sql_type: String,
    bind: Binder<R>,
    encode: Encoder<R>,
}

/// What to do when a row's key is already stored.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum OnConflict {
    /// Keep the stored row; report the new one [`Written::Duplicate`].
    #[default]
    DoNothing,
    /// Overwrite `columns` of the stored row with the new row's values
    /// (`DO UPDATE SET c = EXCLUDED.c`), only where `condition` holds if one
    /// is given (an SQL boolean expression that may use the table name and
    /// `EXCLUDED`). Reported [`Written::Duplicate`] either way.
    Update {
        /// Columns to overwrite.
        columns: Vec<String>,
        /// Optional `WHERE` of the `DO UPDATE`.
        condition: Option<String>,
    },
}

/// Why an [`UnnestInsert`] could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UnnestInsertError {
    /// No column was declared with [`UnnestInsertBuilder::key_column`].
    #[error("an UnnestInsert needs at least one key column")]
    NoKeyColumn,
    /// Two columns share a name, or a column uses a reserved name
    /// (`hermes_ord`, `hermes_inserted`).
    #[error("column {0:?} is declared twice or uses a reserved name")]
    DuplicateColumn(String),
    /// An empty table or column name or SQL type.
    #[error("empty table name, column name or SQL type")]
    EmptyName,
    /// `ON CONFLICT DO UPDATE` names a column that is not declared, or a key column.
    #[error("cannot update column {0:?} on conflict: it is not a declared non-key column")]
    BadUpdateColumn(String),
    /// `ON CONFLICT DO UPDATE` with no column to update (use
    /// [`UnnestInsertBuilder::on_conflict_do_nothing`] to keep existing rows).
    #[error("ON CONFLICT DO UPDATE needs at least one column to update")]
    NoUpdateColumn,
    /// More columns than a PostgreSQL table can have.
    #[error("{0} columns declared; PostgreSQL tables have at most 1600")]
    TooManyColumns(usize),
}

/// Inserts rows of type `R` into one table, idempotently by the key columns
/// (see the [module docs](self)). Build it with [`UnnestInsert::builder`].
///
/// The key columns must be `NOT NULL` and covered by a unique index or
/// constraint (the `ON CONFLICT` target), and the Rust key `K` must identify
/// rows the way that index does. A key is stored as sent: each key column's
/// `sql_type` must be the column's exact type (a `numeric(12,2)` declared as
/// `numeric` rounds `1.005` on the way in), and no trigger may rewrite a
/// key, or an inserted row would be reported a duplicate (rows are matched
/// back to their outcomes by key).
pub struct UnnestInsert<R, K> {
    key: Box<dyn Fn(&R) -> K + Send + Sync>,
    columns: Vec<Column<R>>,
    sql: String,
    copy: Option<CopyFastPath>,
}

/// The optimistic COPY of [`UnnestInsertBuilder::optimistic_copy`].
struct CopyFastPath {
    copy: OptimisticCopy,
    fields: u16,
}

impl<R, K> std::fmt::Debug for UnnestInsert<R, K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UnnestInsert")
            .field("sql", &self.sql)
            .finish_non_exhaustive()
    }
}

/// Declares the table, columns and conflict handling of an [`UnnestInsert`].
pub struct UnnestInsertBuilder<R, K> {
    table: String,
    key: Box<dyn Fn(&R) -> K + Send + Sync>,
    columns: Vec<Column<R>>,
    key_columns: Vec<String>,
    on_conflict: OnConflict,
    optimistic_copy: bool,
}

impl<R, K> UnnestInsert<R, K>
where
    R: Send + Sync + 'static,
    K: Ord + Hash + Send + 'static,
{
    /// Starts an insert into `table` (optionally schema-qualified, e.g.
    /// `hermes.events`; each part is quoted as an identifier) whose rows are
    /// identified in Rust by `key`.
    pub fn builder(
        table: impl Into<String>,
        key: impl Fn(&R) -> K + Send + Sync + 'static,
    ) -> UnnestInsertBuilder<R, K> {
        UnnestInsertBuilder {
            table: table.into(),
            key: Box::new(key),
            columns: Vec::new(),
            key_columns: Vec::new(),
            on_conflict: OnConflict::DoNothing,
            optimistic_copy: false,
        }
    }

    /// The SQL this statement sends.
    pub fn sql(&self) -> &str {
        &self.sql
    }

    /// Whether batches try the optimistic `COPY` first: configured with
    /// [`UnnestInsertBuilder::optimistic_copy`] and not switched off since.
    pub fn copy_enabled(&self) -> bool {
        self.copy
            .as_ref()
            .is_some_and(|fast| fast.copy.is_enabled())
    }
}

impl<R, K> UnnestInsertBuilder<R, K>
where
    R: Send + Sync + 'static,
    K: Ord + Hash + Send + 'static,
{
    /// Adds a column that is part of the unique key (the `ON CONFLICT` target).
    /// `sql_type` is the column's SQL type as written in SQL (e.g. `text`,
    /// `bigint`, `timestamptz`); the array parameter is cast to `sql_type[]`,
    /// so `get` may also return a type that converts to it (e.g. a `String`
    /// holding JSON for a `jsonb` column).
    pub fn key_column<T, F>(mut self, name: &str, sql_type: &str, get: F) -> Self
    where
        T: for<'q> Encode<'q, Postgres> + Type<Postgres> + PgHasArrayType + Send + 'static,
        F: Fn(&R) -> T + Send + Sync + 'static,
    {
        self.key_columns.push(name.to_owned());
        self.column(name, sql_type, get)
    }

    /// Adds a column that is not part of the key (see
    /// [`UnnestInsertBuilder::key_column`] for `sql_type`). Use `Option<T>`
    /// for nullable columns.
    pub fn column<T, F>(mut self, name: &str, sql_type: &str, get: F) -> Self
    where
        T: for<'q> Encode<'q, Postgres> + Type<Postgres> + PgHasArrayType + Send + 'static,
        F: Fn(&R) -> T + Send + Sync + 'static,
    {
        let get = Arc::new(get);
        let get_all = get.clone();
        let bind: Binder<R> = Box::new(move |rows: &[&R], args: &mut PgArguments| {
            let values: Vec<T> = rows.iter().map(|row| get_all(row)).collect();
            args.add(values)
        });
        let encode: Encoder<R> =
            Box::new(move |row: &R, copy: &mut BinaryCopy| copy.field(&get(row)));
        self.columns.push(Column {
            name: name.to_owned(),
            sql_type: sql_type.to_owned(),
            bind,
            encode,
        });
        self
    }

    /// Tries each batch first as a binary `COPY` straight into the table,
    /// inside a savepoint: `COPY` stores rows faster than any `INSERT`, and
    /// when it succeeds every row was new ([`Written::Inserted`]). If it fails
    /// (a key already exists, a constraint, anything), the batch rolls back to
    /// the savepoint and the regular statement runs and decides, so outcomes
    /// and errors are the same as without it, but for one case: a `COPY` that
    /// stores fewer rows than it was given (a trigger skipped some)
    /// fails the batch, since it cannot tell which rows are missing. After a
    /// `COPY` meets an existing
    /// key, the next 1, 2, 4... up to 64 batches skip it, so streams of
    /// redeliveries or upserts do not pay twice.
    ///
    /// Each column's Rust type must have the binary format of the column's SQL
    /// type (e.g. [`JsonText`](super::JsonText) or `sqlx::types::Json<_>`, not
    /// `String`, for `jsonb`; `i64` for `bigint`). If the `COPY` fails because
    /// its data is not in a column's binary format (SQLSTATE 22P03, 42804,
    /// 08P01 or XX000), it is switched off for this statement with a warning;
    /// any other failure is backed off like a conflict, and a transient one
    /// retried. `COPY` fires the table's triggers but ignores its rules.
    pub fn optimistic_copy(mut self, enabled: bool) -> Self {
        self.optimistic_copy = enabled;
        self
    }

    /// Keeps stored rows as they are on conflict (the default).
    pub fn on_conflict_do_nothing(mut self) -> Self {
        self.on_conflict = OnConflict::DoNothing;
        self
    }

    /// Overwrites `columns` of a stored row with the new values on conflict.
    pub fn on_conflict_update(mut self, columns: &[&str]) -> Self {
        self.on_conflict = OnConflict::Update {
            columns: columns.iter().map(|c| (*c).to_owned()).collect(),
            condition: None,
        };
        self
    }

    /// Like [`UnnestInsertBuilder::on_conflict_update`], only where
    /// `condition` (an SQL boolean expression over the table and `EXCLUDED`)
    /// holds, e.g. `orders.updated_at < EXCLUDED.updated_at`.
    pub fn on_conflict_update_where(mut self, columns: &[&str], condition: &str) -> Self {
        self.on_conflict = OnConflict::Update {
            columns: columns.iter().map(|c| (*c).to_owned()).collect(),
            condition: Some(condition.to_owned()),
        };
        self
    }

    /// Checks the declaration and generates the SQL.
    pub fn build(self) -> Result<UnnestInsert<R, K>, UnnestInsertError> {
        if self.key_columns.is_empty() {
            return Err(UnnestInsertError::NoKeyColumn);
        }
        if self.table.trim().is_empty()
            || self
                .columns
                .iter()
                .any(|c| c.name.is_empty() || c.sql_type.trim().is_empty())
        {
            return Err(UnnestInsertError::EmptyName);
        }
        let mut names = HashSet::new();
        for column in &self.columns {
            if [ORDINAL, INSERTED].contains(&column.name.as_str())
                || !names.insert(column.name.as_str())
            {
                return Err(UnnestInsertError::DuplicateColumn(column.name.clone()));
            }
        }
        if let OnConflict::Update { columns, .. } = &self.on_conflict {
            if columns.is_empty() {
                return Err(UnnestInsertError::NoUpdateColumn);
            }
            for column in columns {
                if !names.contains(column.as_str()) || self.key_columns.contains(column) {
                    return Err(UnnestInsertError::BadUpdateColumn(column.clone()));
                }
            }
        }
        let fields = match u16::try_from(self.columns.len()) {
            Ok(fields) if self.columns.len() <= MAX_COLUMNS => fields,
            _ => return Err(UnnestInsertError::TooManyColumns(self.columns.len())),
        };
        let sql = self.sql();
        let copy = self.optimistic_copy.then(|| CopyFastPath {
            copy: OptimisticCopy::new(format!(
                "COPY {} ({}) FROM STDIN (FORMAT binary)",
                self.quoted_table(),
                self.columns
                    .iter()
                    .map(|c| quote_ident(&c.name))
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
            fields,
        });
        Ok(UnnestInsert {
            key: self.key,
            columns: self.columns,
            sql,
            copy,
        })
    }

    fn quoted_table(&self) -> String {
        self.table
            .split('.')
            .map(quote_ident)
            .collect::<Vec<_>>()
            .join(".")
    }

    fn sql(&self) -> String {
        let table = self.quoted_table();
        let list = |names: &mut dyn Iterator<Item = &str>| {
            names.map(quote_ident).collect::<Vec<_>>().join(", ")
        };
        let columns = list(&mut self.columns.iter().map(|c| c.name.as_str()));
        let array = |(i, c): (usize, &Column<R>)| format!("${}::{}[]", i + 1, c.sql_type.trim());
        let arrays = self
            .columns
            .iter()
            .enumerate()
            .map(array)
            .collect::<Vec<_>>()
            .join(", ");
        // The key columns, in declaration order, and their array parameters.
        let is_key = |c: &&(usize, &Column<R>)| self.key_columns.contains(&c.1.name);
        let indexed: Vec<(usize, &Column<R>)> = self.columns.iter().enumerate().collect();
        let keys = list(&mut indexed.iter().filter(is_key).map(|(_, c)| c.name.as_str()));
        let key_arrays = indexed
            .iter()
            .filter(is_key)
            .map(|&c| array(c))
            .collect::<Vec<_>>()
            .join(", ");
        let (conflict, returning, inserted) = match &self.on_conflict {
            OnConflict::DoNothing => ("DO NOTHING".to_owned(), keys.clone(), "true".to_owned()),
            OnConflict::Update { columns, condition } => {
                let set = columns
                    .iter()
                    .map(|c| format!("{0} = EXCLUDED.{0}", quote_ident(c)))
                    .collect::<Vec<_>>()
                    .join(", ");
                let condition = condition
                    .as_deref()
                    .map(|c| format!(" WHERE {c}"))
                    .unwrap_or_default();
                (
                    format!("DO UPDATE SET {set}{condition}"),
                    format!("{keys}, (xmax = 0) AS {INSERTED}"),
                    format!("ins.{INSERTED}"),
                )
            }
        };
        format!(
            "WITH ins AS (\
                INSERT INTO {table} ({columns}) \
                SELECT * FROM UNNEST({arrays}) AS input({columns}) \
                ON CONFLICT ({keys}) {conflict} \
                RETURNING {returning}\
             ) \
             SELECT input.{ORDINAL}, {inserted} \
             FROM UNNEST({key_arrays}) WITH ORDINALITY AS input({keys}, {ORDINAL}) \
             JOIN ins USING ({keys})"
        )
    }
}

/// Quotes an SQL identifier.
fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

impl<R, K> BatchStatement for UnnestInsert<R, K>
where
    R: Send + Sync + 'static,
    K: Ord + Hash + Send + 'static,
{
    type Row = R;
    type Key = K;

    fn key(&self, row: &R) -> K {
        (self.key)(row)
    }

    fn execute<'c>(
        &'c self,
        conn: &'c mut PgConnection,
        rows: &'c [&'c R],
    ) -> BoxFuture<'c, Result<Vec<Written>, sqlx::Error>> {
        Box::pin(async move {
            // Insert in key order, so that concurrent writers of overlapping
            // keys lock them in the same order instead of deadlocking.
            let mut order: Vec<usize> = (0..rows.len()).collect();
            order.sort_by_cached_key(|&i| (self.key)(rows[i]));
            let sorted: Vec<&R> = order.iter().map(|&i| rows[i]).collect();

            let insert = async |conn: &mut PgConnection| self.insert(conn, &sorted, &order).await;
            match &self.copy {
                Some(fast) => {
                    let copy = async |conn: &mut PgConnection| {
                        self.copy_rows(conn, fast, &sorted).await?;
                        Ok(vec![Written::Inserted; rows.len()])
                    };
                    fast.copy.write(conn, copy, insert).await
                }
                None => insert(conn).await,
            }
        })
    }
}

impl<R, K> UnnestInsert<R, K>
where
    R: Send + Sync + 'static,
    K: Ord + Hash + Send + 'static,
{
    /// The regular statement: `sorted` are the rows in key order, `order[i]`
    /// the input index of `sorted[i]`.
    fn insert<'a>(
        &'a self,
        conn: &'a mut PgConnection,
        sorted: &'a [&'a R],
        order: &'a [usize],
    ) -> BoxFuture<'a, Result<Vec<Written>, sqlx::Error>> {
        Box::pin(async move {
            let mut args = PgArguments::default();
            for column in &self.columns {
                (column.bind)(sorted, &mut args).map_err(sqlx::Error::Encode)?;
            }
            let returned: Vec<(i64, bool)> = sqlx::query_as_with(&self.sql, args)
                .fetch_all(&mut *conn)
                .await?;
            let mut written = vec![Written::Duplicate; sorted.len()];
            for (ordinal, inserted) in returned {
                let slot = usize::try_from(ordinal)
                    .ok()
                    .and_then(|o| o.checked_sub(1))
                    .and_then(|i| order.get(i))
                    .and_then(|&i| written.get_mut(i));
                match slot {
                    Some(slot) if inserted => *slot = Written::Inserted,
                    Some(_) => {}
                    None => {
                        return Err(sqlx::Error::Protocol(format!(
                            "batch insert returned ordinal {ordinal} for {} rows",
                            sorted.len()
                        )));
                    }
                }
            }
            Ok(written)
        })
    }

    /// The optimistic COPY of the rows, in key order.
    fn copy_rows<'a>(
        &'a self,
        conn: &'a mut PgConnection,
        fast: &'a CopyFastPath,
        sorted: &'a [&'a R],
    ) -> BoxFuture<'a, Result<(), CopyFailure>> {
        Box::pin(fast.copy.run(conn, sorted, |row, data| {
            data.row(fast.fields);
            self.columns
                .iter()
                .try_for_each(|column| (column.encode)(row, data))
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Event {
        source: String,
        id: String,
        payload: String,
    }

    #[test]
    fn generates_one_statement_with_array_binds() {
        let insert =
            UnnestInsert::builder("app.events", |e: &Event| (e.source.clone(), e.id.clone()))
                .key_column("source", "text", |e: &Event| e.source.clone())
                .key_column("event_id", "text", |e: &Event| e.id.clone())
                .column("payload", "jsonb", |e: &Event| e.payload.clone())
                .build()
                .expect("valid");
        let sql = insert.sql();
        assert!(sql.contains(
            "INSERT INTO \"app\".\"events\" (\"source\", \"event_id\", \"payload\") \
             SELECT * FROM UNNEST($1::text[], $2::text[], $3::jsonb[])"
        ));
        assert!(sql.contains("ON CONFLICT (\"source\", \"event_id\") DO NOTHING"));
        assert!(sql.contains(
            "FROM UNNEST($1::text[], $2::text[]) WITH ORDINALITY \
             AS input(\"source\", \"event_id\", hermes_ord)"
        ));
    }

    #[test]
    fn upserts_report_inserted_by_xmax() {
        let insert = UnnestInsert::builder("t", |e: &Event| e.id.clone())
            .key_column("id", "text", |e: &Event| e.id.clone())
            .column("payload", "jsonb", |e: &Event| e.payload.clone())
            .on_conflict_update_where(&["payload"], "t.payload <> EXCLUDED.payload")
            .build()
            .expect("valid");
        assert!(insert.sql().contains(
            "DO UPDATE SET \"payload\" = EXCLUDED.\"payload\" WHERE t.payload <> EXCLUDED.payload"
        ));
        assert!(insert.sql().contains("(xmax = 0) AS hermes_inserted"));
    }

    #[test]
    fn rejects_bad_declarations() {
        let no_key = UnnestInsert::builder("t", |e: &Event| e.id.clone())
            .column("id", "text", |e: &Event| e.id.clone())
            .build();
        assert_eq!(no_key.err(), Some(UnnestInsertError::NoKeyColumn));
        let twice = UnnestInsert::builder("t", |e: &Event| e.id.clone())
            .key_column("id", "text", |e: &Event| e.id.clone())
            .column("id", "text", |e: &Event| e.id.clone())
            .build();
        assert!(matches!(twice, Err(UnnestInsertError::DuplicateColumn(_))));
        for reserved in ["hermes_ord", "hermes_inserted"] {
            let built = UnnestInsert::builder("t", |e: &Event| e.id.clone())
                .key_column(reserved, "text", |e: &Event| e.id.clone())
                .build();
            assert!(
                matches!(built, Err(UnnestInsertError::DuplicateColumn(_))),
                "{reserved}"
            );
        }
        let update_key = UnnestInsert::builder("t", |e: &Event| e.id.clone())
            .key_column("id", "text", |e: &Event| e.id.clone())
            .on_conflict_update(&["id"])
            .build();
        assert!(matches!(
            update_key,
            Err(UnnestInsertError::BadUpdateColumn(_))
        ));
        let update_nothing = UnnestInsert::builder("t", |e: &Event| e.id.clone())
            .key_column("id", "text", |e: &Event| e.id.clone())
            .column("body", "text", |e: &Event| e.id.clone())
            .on_conflict_update(&[])
            .build();
        assert_eq!(
            update_nothing.err(),
            Some(UnnestInsertError::NoUpdateColumn)
        );
    }
}
