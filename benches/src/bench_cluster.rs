//! The benchmarks' private Postgres cluster, under `<target>/bench-pg`.

use std::path::PathBuf;

use anyhow::Context;
use hermes_adapters::postgres::local::{
    Durability, LocalPostgres, LocalPostgresConfig, cargo_target_dir,
};
use sqlx::{Connection, PgConnection};

/// Connections the cluster takes: the webhook benchmarks' host pool, load and
/// limit connections, with room to spare.
const MAX_CONNECTIONS: u32 = 200;

/// The directory of the benchmarks' files (cluster, host configs and logs).
pub(crate) fn bench_dir() -> PathBuf {
    cargo_target_dir()
        .unwrap_or_else(|| PathBuf::from("target"))
        .join("bench-pg")
}

/// Starts the cluster with `durability`, with database `database`. A cluster
/// left running with other settings (a `--relaxed` run before) is restarted,
/// since a running cluster is reused as it is.
pub(crate) async fn start(durability: Durability, database: &str) -> anyhow::Result<LocalPostgres> {
    let config = LocalPostgresConfig::new(bench_dir().join("cluster"), database)
        .durability(durability)
        .max_connections(MAX_CONNECTIONS);
    let wanted = (durability == Durability::Durable, MAX_CONNECTIONS);
    let pg = LocalPostgres::start_with(config.clone())
        .await
        .context("cannot start the benchmarks' Postgres")?;
    if settings_of(&pg).await? == wanted {
        return Ok(pg);
    }
    pg.stop().await?;
    let pg = LocalPostgres::start_with(config)
        .await
        .context("cannot restart the benchmarks' Postgres")?;
    if settings_of(&pg).await? != wanted {
        anyhow::bail!("the benchmarks' Postgres did not take its settings");
    }
    Ok(pg)
}

/// Whether `fsync` is on, and `max_connections`, as the server runs.
async fn settings_of(pg: &LocalPostgres) -> anyhow::Result<(bool, u32)> {
    let mut conn = PgConnection::connect_with(&pg.connect_options("postgres")).await?;
    let fsync: String = sqlx::query_scalar("SHOW fsync")
        .fetch_one(&mut conn)
        .await?;
    let max: String = sqlx::query_scalar("SHOW max_connections")
        .fetch_one(&mut conn)
        .await?;
    conn.close().await?;
    Ok((fsync == "on", max.parse()?))
}
