//! Keeps the private cluster running: a host that started (or reused) it
//! starts it again when its server dies (killed, crashed), on the same port
//! while that is free, so the pool reconnects to the same URL and webhooks
//! are stored again without restarting the host. Meanwhile requests get 503
//! (the batch writer's circuit breaker).

use std::time::Duration;

use hermes_adapters::postgres::LocalPostgres;
use tokio::task::JoinHandle;

/// How often the server's process is checked.
pub const CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// Starts the task that checks `local`'s server every [`CHECK_INTERVAL`] and
/// starts it again when its process is gone. Abort the task to stop.
pub fn keep(mut local: LocalPostgres) -> JoinHandle<()> {
    tokio::spawn(async move {
        let port = local.port();
        let mut interval = tokio::time::interval(CHECK_INTERVAL);
        loop {
            interval.tick().await;
            let checked = local.clone();
            if tokio::task::spawn_blocking(move || checked.is_running())
                .await
                .unwrap_or(true)
            {
                continue;
            }
            tracing::warn!(
                pid = local.pid(),
                data_dir = %local.data_dir().display(),
                "the private PostgreSQL stopped: starting it again"
            );
            match local.start_again().await {
                Ok(started) if started.port() == port => {
                    tracing::info!(
                        pid = started.pid(),
                        port,
                        "the private PostgreSQL runs again"
                    );
                    local = started;
                }
                Ok(started) => {
                    tracing::error!(
                        port = started.port(),
                        previous_port = port,
                        "the private PostgreSQL runs again, but on another port (its own was \
                         taken): restart hermes to reconnect"
                    );
                    return;
                }
                Err(error) => tracing::error!(%error, "the private PostgreSQL did not start again"),
            }
        }
    })
}
