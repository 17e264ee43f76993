//! The accept loop: the router on hyper (HTTP/1.1, and HTTP/2 with prior
//! knowledge), with read deadlines, `TCP_NODELAY`, and a graceful shutdown.
//! axum's own `serve` sets no hyper timer, so a client could hold a
//! connection open forever by never finishing its headers, or by never
//! sending a byte.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use hyper::service::Service;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::task::JoinSet;

/// How long to wait before accepting again after an error that would repeat
/// at once (say, out of file descriptors).
const ACCEPT_BACKOFF: Duration = Duration::from_secs(1);

/// Serves `router` on `listener` until `stop` completes; then stops
/// accepting, lets every connection finish its request in progress, and
/// returns once all are closed. Dropping the returned future (aborting its
/// task) ends every connection too.
///
/// `read_timeout` bounds the wait for a request's headers (an HTTP/1.1
/// connection whose headers are late, or that sits idle between requests as
/// long, is closed) and for a connection's first request, whatever its
/// protocol: a client that connects and sends nothing, or too little to
/// tell HTTP/1.1 from HTTP/2, is disconnected.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    read_timeout: Duration,
    stop: impl Future<Output = ()>,
) {
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(read_timeout);
    let graceful = GracefulShutdown::new();
    let mut connections = JoinSet::new();
    tokio::pin!(stop);
    loop {
        let tcp = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => tcp,
                Err(error) if only_that_connection_failed(&error) => continue,
                Err(error) => {
                    tracing::error!(%error, "cannot accept connections; trying again in 1 s");
                    tokio::select! {
                        () = tokio::time::sleep(ACCEPT_BACKOFF) => continue,
                        () = &mut stop => break,
                    }
                }
            },
            // Finished connections leave the set, so it does not grow.
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            () = &mut stop => break,
        };
        // Small responses go out at once, not after the client's delayed ACK.
        if let Err(error) = tcp.set_nodelay(true) {
            tracing::debug!(%error, "cannot set TCP_NODELAY");
        }
        let service = FirstRequest {
            inner: TowerToHyperService::new(router.clone()),
            seen: Arc::default(),
        };
        let seen = service.seen.clone();
        let connection = builder
            .serve_connection(TokioIo::new(tcp), service)
            .into_owned();
        let connection = graceful.watch(connection);
        connections.spawn(async move {
            tokio::pin!(connection);
            let ended = tokio::select! {
                ended = &mut connection => ended,
                () = tokio::time::sleep(read_timeout) => {
                    if !seen.load(Ordering::Relaxed) {
                        // Dropping it closes the socket.
                        tracing::debug!("no request within the read timeout: connection closed");
                        return;
                    }
                    connection.await
                }
            };
            if let Err(error) = ended {
                tracing::trace!(%error, "connection ended with an error");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

/// Whether a failed `accept` was about that one connection only (reset or
/// aborted before it was taken): accept the next at once.
fn only_that_connection_failed(error: &std::io::Error) -> bool {
    use std::io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
    matches!(
        error.kind(),
        ConnectionAborted | ConnectionRefused | ConnectionReset
    )
}

/// A connection's service that notes its first request.
struct FirstRequest<S> {
    inner: S,
    seen: Arc<AtomicBool>,
}

impl<S: Service<R>, R> Service<R> for FirstRequest<S> {
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn call(&self, request: R) -> Self::Future {
        self.seen.store(true, Ordering::Relaxed);
        self.inner.call(request)
    }
}
