//! The host as a library: [`Server::start`] runs everything `hermes serve`
//! runs and hands back a [`RunningServer`] with its bound address;
//! [`RunningServer::shutdown`] stops it gracefully. The binary, the demo, the
//! benchmarks and the tests all use it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::config::{Config, ConfigError};
use crate::database::{Database, DatabaseError};
use crate::http::{self, AppState, Shared, router};
use crate::shutdown::Signals;
use crate::telemetry;
use crate::webhooks::{IngestPipeline, SourceRegistry};

/// How long the HTTP server may take, after the pipelines drained, to write
/// the last answers and close its connections.
const HTTP_CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// How often histogram buckets of the metrics recorder are maintained.
const METRICS_UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The database could not be reached or migrated.
    #[error(transparent)]
    Database(#[from] DatabaseError),
    /// A pipeline could not start.
    #[error("cannot start the {pipeline} pipeline: {source}")]
    Pipeline {
        /// Which pipeline.
        pipeline: &'static str,
        /// Why.
        source: hermes_pipeline::ConfigError,
    },
    /// The listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

/// Starts the host.
#[derive(Debug, Clone, Copy)]
pub struct Server;

/// What the listener does when the configured port is taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PortInUse {
    /// Fail to start ([`StartError::Bind`]).
    Fail,
    /// Listen on a free port of the configured address instead.
    TakeAFreeOne,
}

impl Server {
    /// Validates `config`, connects to (or starts) the database, applies the
    /// migrations, starts the pipelines and the HTTP listener. Returns once
    /// the listener is bound and accepting.
    pub async fn start(config: Config) -> Result<RunningServer, StartError> {
        Self::start_with(config, PortInUse::Fail).await
    }

    /// Like [`start`](Self::start), but if the configured port is taken the
    /// listener takes a free one instead (any other failure to listen is an
    /// error).
    pub(crate) async fn start_on_a_free_port_if_taken(
        config: Config,
    ) -> Result<RunningServer, StartError> {
        Self::start_with(config, PortInUse::TakeAFreeOne).await
    }

    async fn start_with(
        config: Config,
        port_in_use: PortInUse,
    ) -> Result<RunningServer, StartError> {
        let sources = Arc::new(config.validated_sources()?);
        let database = Database::connect(&config.database).await?;
        database.migrate().await?;
        // The recorder first: pipelines register their metrics when they start.
        let metrics = telemetry::metrics_handle();
        let retry = config.database.retry_policy();
        let ingest = IngestPipeline::start(&config.webhooks, database.pool().clone(), retry)
            .map_err(|source| StartError::Pipeline {
                pipeline: crate::webhooks::PIPELINE_NAME,
                source,
            })?;
        let keeper = database.local().cloned().map(crate::cluster_keeper::keep);
        let upkeep_handle = metrics.clone();
        let upkeep = tokio::spawn(async move {
            let mut interval = tokio::time::interval(METRICS_UPKEEP_INTERVAL);
            loop {
                interval.tick().await;
                upkeep_handle.run_upkeep();
            }
        });
        let state = AppState::new(Shared {
            sources: sources.clone(),
            ingest: ingest.clone(),
            pool: database.pool().clone(),
            metrics,
            retry_after_secs: config.webhooks.retry_after_secs,
            read_timeout: config.http.read_timeout(),
        });
        let listener = match bind(config.http.listen, port_in_use).await {
            Ok(listener) => listener,
            Err(error) => {
                upkeep.abort();
                if let Some(keeper) = &keeper {
                    keeper.abort();
                }
                ingest.pipeline().drain(Duration::ZERO).await;
                return Err(error);
            }
        };
        let local_addr = listener.local_addr().map_err(|source| StartError::Bind {
            addr: config.http.listen,
            source,
        })?;
        let (stop, stopped) = oneshot::channel::<()>();
        let serve =
            http::serve::serve(listener, router(state), config.http.read_timeout(), async {
                let _ = stopped.await;
            });
        let serve = tokio::spawn(serve);
        tracing::info!(
            addr = %local_addr,
            sources = ?sources.names(),
            "hermes is listening"
        );
        Ok(RunningServer {
            local_addr,
            database,
            sources,
            ingest,
            stop: Some(stop),
            serve,
            upkeep,
            keeper,
            drain_timeout: config.shutdown.drain_timeout(),
        })
    }
}

/// A listener on `addr`, or on a free port of its IP if its port is taken
/// and `port_in_use` says to take one.
async fn bind(addr: SocketAddr, port_in_use: PortInUse) -> Result<TcpListener, StartError> {
    let bind = |addr| async move {
        TcpListener::bind(addr)
            .await
            .map_err(|source| StartError::Bind { addr, source })
    };
    match bind(addr).await {
        Err(StartError::Bind { source, .. })
            if port_in_use == PortInUse::TakeAFreeOne
                && source.kind() == std::io::ErrorKind::AddrInUse =>
        {
            bind(SocketAddr::new(addr.ip(), 0)).await
        }
        bound => bound,
    }
}

/// A running host.
#[derive(Debug)]
pub struct RunningServer {
    local_addr: SocketAddr,
    database: Database,
    sources: Arc<SourceRegistry>,
    ingest: IngestPipeline,
    stop: Option<oneshot::Sender<()>>,
    serve: JoinHandle<()>,
    upkeep: JoinHandle<()>,
    /// Restarts the private cluster if its server dies (none with
    /// `DATABASE_URL`).
    keeper: Option<JoinHandle<()>>,
    drain_timeout: Duration,
}

/// How a shutdown went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShutdownReport {
    /// Whether the drain deadline passed: events still in flight then were
    /// answered 503 (a write cut off mid-way may still have committed: a
    /// redelivery then gets its 202 as a duplicate).
    pub forced: bool,
}

impl RunningServer {
    /// The address the listener is bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// `http://` + [`local_addr`](Self::local_addr).
    pub fn url(&self) -> String {
        format!("http://{}", self.local_addr)
    }

    /// The webhook sources (their verifiers can sign requests).
    pub fn sources(&self) -> &SourceRegistry {
        &self.sources
    }

    /// The database in use.
    pub fn database(&self) -> &Database {
        &self.database
    }

    /// The webhook ingest pipeline.
    pub fn ingest(&self) -> &IngestPipeline {
        &self.ingest
    }

    /// Runs until SIGTERM or SIGINT, then shuts down gracefully; another
    /// signal meanwhile ends the process at once.
    pub async fn run_until_signal(self, mut signals: Signals) -> ShutdownReport {
        signals.received().await;
        signals.exit_on_another();
        self.shutdown().await
    }

    /// Graceful shutdown: stop accepting connections, drain the pipelines
    /// (everything accepted is committed and answered, within the drain
    /// deadline; what remains after it is answered 503, as not known to be
    /// stored), let the HTTP server write the last answers, close the pool.
    pub async fn shutdown(mut self) -> ShutdownReport {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let drained = self.ingest.pipeline().drain(self.drain_timeout).await;
        if drained.forced {
            tracing::warn!(
                "drain deadline passed: some events were answered 503, not known to be stored"
            );
        }
        match tokio::time::timeout(HTTP_CLOSE_TIMEOUT, &mut self.serve).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => tracing::error!(%error, "the HTTP server task failed"),
            Err(_) => {
                tracing::warn!("HTTP connections still open after the drain: closing them");
                self.serve.abort();
            }
        }
        self.upkeep.abort();
        if let Some(keeper) = &self.keeper {
            keeper.abort();
        }
        self.database.close().await;
        tracing::info!(forced = drained.forced, "hermes stopped");
        ShutdownReport {
            forced: drained.forced,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_taken_port_fails_the_bind_or_is_traded_for_a_free_one() {
        let taken = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = taken.local_addr().unwrap();
        match bind(addr, PortInUse::Fail).await {
            Err(StartError::Bind {
                addr: failed,
                source,
            }) => {
                assert_eq!(failed, addr);
                assert_eq!(source.kind(), std::io::ErrorKind::AddrInUse);
            }
            other => panic!("bound a taken port: {other:?}"),
        }
        let free = bind(addr, PortInUse::TakeAFreeOne).await.unwrap();
        let free = free.local_addr().unwrap();
        assert_eq!(free.ip(), addr.ip());
        assert_ne!(free.port(), addr.port());
    }
}
