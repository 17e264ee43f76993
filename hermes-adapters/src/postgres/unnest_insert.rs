//! A ready-made [`BatchStatement`]: insert rows into one table in one round
//! trip, from one array parameter per column, idempotent by a unique key, and
//! tell inserted rows from duplicates.
//!
//! For a table `events (source text, event_id text, payload jsonb,
//! UNIQUE (source, event_id))` it sends
//!
//! ```sql
//! WITH input AS (
//!     SELECT * FROM UNNEST($1::text[], $2::text[], $3::jsonb[])
//!         WITH ORDINALITY AS input("source", "event_id", "payload", hermes_ord)
//! ), ins AS (
//!     INSERT INTO "events" ("source", "event_id", "payload")
//!     SELECT "source", "event_id", "payload" FROM input ORDER BY "source", "event_id"
//!     ON CONFLICT ("source", "event_id") DO NOTHING
//!     RETURNING "source", "event_id"
//! )
//! SELECT input.hermes_ord, true FROM input JOIN ins USING ("source", "event_id")
//! ```
//!
//! with binary array binds, and reads back the ordinals of the rows that were
//! inserted; every other row was a duplicate. Rows are inserted in key order,
//! so concurrent writers of overlapping keys take their locks in the same
//! order and do not deadlock one another.

use std::collections::HashSet;
use std::hash::Hash;

use futures::future::BoxFuture;
use sqlx::error::BoxDynError;
use sqlx::postgres::{PgArguments, PgHasArrayType};
use sqlx::{Arguments, Encode, PgConnection, Postgres, Type};

use super::statement::{BatchStatement, Written};

/// Binds one column of a batch as one array parameter.
type Binder<R> = Box<dyn Fn(&[&R], &mut PgArguments) -> Result<(), BoxDynError> + Send + Sync>;

/// The name of the ordinal column the statement adds to its input.
const ORDINAL: &str = "hermes_ord";

struct Column<R> {
    name: String,
    sql_type: String,
    bind: Binder<R>,
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
    /// Two columns share a name, or a column uses the reserved name `hermes_ord`.
    #[error("column {0:?} is declared twice or uses a reserved name")]
    DuplicateColumn(String),
    /// An empty table or column name or SQL type.
    #[error("empty table name, column name or SQL type")]
    EmptyName,
    /// `ON CONFLICT DO UPDATE` names a column that is not declared, or a key column.
    #[error("cannot update column {0:?} on conflict: it is not a declared non-key column")]
    BadUpdateColumn(String),
}

/// Inserts rows of type `R` into one table, idempotently by the key columns
/// (see the [module docs](self)). Build it with [`UnnestInsert::builder`].
///
/// The key columns must be `NOT NULL` and covered by a unique index or
/// constraint (the `ON CONFLICT` target), and the Rust key `K` must identify
/// rows the way that index does.
pub struct UnnestInsert<R, K> {
    key: Box<dyn Fn(&R) -> K + Send + Sync>,
    columns: Vec<Column<R>>,
    sql: String,
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
}

impl<R, K> UnnestInsert<R, K>
where
    R: Send + Sync + 'static,
    K: Eq + Hash + Send + 'static,
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
        }
    }

    /// The SQL this statement sends.
    pub fn sql(&self) -> &str {
        &self.sql
    }
}

impl<R, K> UnnestInsertBuilder<R, K>
where
    R: Send + Sync + 'static,
    K: Eq + Hash + Send + 'static,
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
        let bind: Binder<R> = Box::new(move |rows: &[&R], args: &mut PgArguments| {
            let values: Vec<T> = rows.iter().map(|row| get(row)).collect();
            args.add(values)
        });
        self.columns.push(Column {
            name: name.to_owned(),
            sql_type: sql_type.to_owned(),
            bind,
        });
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
            if column.name == ORDINAL || !names.insert(column.name.as_str()) {
                return Err(UnnestInsertError::DuplicateColumn(column.name.clone()));
            }
        }
        if let OnConflict::Update { columns, .. } = &self.on_conflict {
            for column in columns {
                if !names.contains(column.as_str()) || self.key_columns.contains(column) {
                    return Err(UnnestInsertError::BadUpdateColumn(column.clone()));
                }
            }
        }
        let sql = self.sql();
        Ok(UnnestInsert {
            key: self.key,
            columns: self.columns,
            sql,
        })
    }

    fn sql(&self) -> String {
        let table = self
            .table
            .split('.')
            .map(quote_ident)
            .collect::<Vec<_>>()
            .join(".");
        let list = |names: &mut dyn Iterator<Item = &str>| {
            names.map(quote_ident).collect::<Vec<_>>().join(", ")
        };
        let columns = list(&mut self.columns.iter().map(|c| c.name.as_str()));
        let keys = list(&mut self.key_columns.iter().map(String::as_str));
        let arrays = self
            .columns
            .iter()
            .enumerate()
            .map(|(i, c)| format!("${}::{}[]", i + 1, c.sql_type.trim()))
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
                    format!("{keys}, (xmax = 0) AS hermes_inserted"),
                    "ins.hermes_inserted".to_owned(),
                )
            }
        };
        format!(
            "WITH input AS (\
                SELECT * FROM UNNEST({arrays}) WITH ORDINALITY AS input({columns}, {ORDINAL})\
             ), ins AS (\
                INSERT INTO {table} ({columns}) \
                SELECT {columns} FROM input ORDER BY {keys} \
                ON CONFLICT ({keys}) {conflict} \
                RETURNING {returning}\
             ) \
             SELECT input.{ORDINAL}, {inserted} FROM input JOIN ins USING ({keys})"
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
    K: Eq + Hash + Send + 'static,
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
            let mut args = PgArguments::default();
            for column in &self.columns {
                (column.bind)(rows, &mut args).map_err(sqlx::Error::Encode)?;
            }
            let returned: Vec<(i64, bool)> = sqlx::query_as_with(&self.sql, args)
                .fetch_all(&mut *conn)
                .await?;
            let mut written = vec![Written::Duplicate; rows.len()];
            for (ordinal, inserted) in returned {
                let slot = usize::try_from(ordinal)
                    .ok()
                    .and_then(|o| o.checked_sub(1))
                    .and_then(|i| written.get_mut(i));
                match slot {
                    Some(slot) if inserted => *slot = Written::Inserted,
                    Some(_) => {}
                    None => {
                        return Err(sqlx::Error::Protocol(format!(
                            "batch insert returned ordinal {ordinal} for {} rows",
                            rows.len()
                        )));
                    }
                }
            }
            Ok(written)
        })
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
        assert!(sql.contains("UNNEST($1::text[], $2::text[], $3::jsonb[]) WITH ORDINALITY"));
        assert!(
            sql.contains("INSERT INTO \"app\".\"events\" (\"source\", \"event_id\", \"payload\")")
        );
        assert!(sql.contains("ON CONFLICT (\"source\", \"event_id\") DO NOTHING"));
        assert!(sql.contains("ORDER BY \"source\", \"event_id\""));
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
        let update_key = UnnestInsert::builder("t", |e: &Event| e.id.clone())
            .key_column("id", "text", |e: &Event| e.id.clone())
            .on_conflict_update(&["id"])
            .build();
        assert!(matches!(
            update_key,
            Err(UnnestInsertError::BadUpdateColumn(_))
        ));
    }
}
