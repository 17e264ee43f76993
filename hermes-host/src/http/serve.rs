//! The accept loop: the router on hyper (HTTP/1.1 and HTTP/2), with a
//! deadline for each request's headers, `TCP_NODELAY`, and a graceful
//! shutdown. axum's own `serve` sets no hyper timer, so a client could hold
//! a connection open forever by never finishing its headers.

use std::future::Future;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;

/// Serves `router` on `listener` until `stop` completes; then stops
/// accepting, lets every connection finish its request in progress, and
/// returns once all are closed. A connection whose request headers do not
/// arrive within `header_timeout` is closed.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    header_timeout: Duration,
    stop: impl Future<Output = ()>,
) {
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout);
    let graceful = GracefulShutdown::new();
    tokio::pin!(stop);
    loop {
        let tcp = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => tcp,
                Err(error) => {
                    backoff_after(error).await;
                    continue;
                }
            },
            () = &mut stop => break,
        };
        // Small responses go out at once, not after the client's delayed ACK.
        if let Err(error) = tcp.set_nodelay(true) {
            tracing::debug!(%error, "cannot set TCP_NODELAY");
        }
        let service = TowerToHyperService::new(router.clone());
        let connection = builder
            .serve_connection(TokioIo::new(tcp), service)
            .into_owned();
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::trace!(%error, "connection ended with an error");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

/// Waits after a failed `accept`: not at all when only that connection
/// failed (reset or aborted before it was taken), else a while, since the
/// error (say, out of file descriptors) would repeat at once.
async fn backoff_after(error: std::io::Error) {
    use std::io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
    if matches!(
        error.kind(),
        ConnectionAborted | ConnectionRefused | ConnectionReset
    ) {
        return;
    }
    tracing::error!(%error, "cannot accept connections; trying again in 1 s");
    tokio::time::sleep(Duration::from_secs(1)).await;
}
