//! The accept loop: the router on hyper (HTTP/1.1, and HTTP/2 with prior
//! knowledge), with read deadlines, an idle timeout, `TCP_NODELAY`, and a
//! graceful shutdown. axum's own `serve` sets no hyper timer, so a client
//! could hold a connection open forever by never finishing its headers, by
//! never sending a byte, or by sending nothing after its last request.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use hyper::service::{Service, service_fn};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulConnection;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// How long to wait before accepting again after an error that would repeat
/// at once (say, out of file descriptors).
const ACCEPT_BACKOFF: Duration = Duration::from_secs(1);

/// Serves `router` on `listener` until `stop` completes; then stops
/// accepting, lets every connection finish its request in progress, and
/// returns once all are closed. Dropping the returned future (aborting its
/// task) ends every connection too.
///
/// `read_timeout` bounds every wait for a client, whatever the protocol:
/// a connection that sends no request (or too little to tell HTTP/1.1 from
/// HTTP/2) within it of opening is dropped; one whose HTTP/1.1 headers are
/// late, or that has no request in progress for that long after its last
/// one ended (HTTP/1.1 keep-alive, or an HTTP/2 connection with no open
/// stream), is closed.
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
    let stopping = CancellationToken::new();
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
        let activity = Arc::new(Activity::new());
        let (inner, tracked) = (TowerToHyperService::new(router.clone()), activity.clone());
        let service = service_fn(move |request| {
            let in_progress = tracked.request_started();
            let response = inner.call(request);
            async move {
                let _in_progress = in_progress;
                response.await
            }
        });
        let connection = builder
            .serve_connection(TokioIo::new(tcp), service)
            .into_owned();
        // A token of its own: each wake of the connection polls it, and
        // polling a shared one would take a lock all connections share.
        let stopping = stopping.child_token();
        connections.spawn(drive(connection, activity, read_timeout, stopping));
    }
    drop(listener);
    stopping.cancel();
    while connections.join_next().await.is_some() {}
}

/// Runs one connection until it ends. Without a request within
/// `read_timeout` of opening, it is dropped (which closes the socket); idle
/// for `read_timeout` after a request, it is shut down gracefully, and
/// dropped if that takes `read_timeout` more (a peer that never answers
/// HTTP/2's closing ping); once `stopping` is cancelled, it is shut down
/// gracefully, its requests in progress finishing first (the drain's
/// deadline bounds them).
async fn drive<C>(
    connection: C,
    activity: Arc<Activity>,
    read_timeout: Duration,
    stopping: CancellationToken,
) where
    C: GracefulConnection,
    C::Error: std::fmt::Display,
{
    tokio::pin!(connection);
    let mut closing = Closing::Open;
    loop {
        let deadline = match closing {
            Closing::Open => Some(activity.idle_until(read_timeout)),
            Closing::Draining => None,
            Closing::Idle { drop_at } => Some(drop_at),
        };
        let timer = async move {
            match deadline {
                Some(deadline) => tokio::time::sleep_until(deadline).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            ended = connection.as_mut() => {
                if let Err(error) = ended {
                    tracing::trace!(%error, "connection ended with an error");
                }
                return;
            }
            () = stopping.cancelled(), if matches!(closing, Closing::Open) => {
                connection.as_mut().graceful_shutdown();
                closing = Closing::Draining;
            }
            () = timer => {
                if let Closing::Idle { .. } = closing {
                    tracing::debug!("an idle connection did not close: dropped");
                    return;
                }
                if activity.idle_until(read_timeout) > Instant::now() {
                    // A request came meanwhile, or is in progress.
                    continue;
                }
                if !activity.had_a_request() {
                    tracing::debug!("no request within the read timeout: connection closed");
                    return;
                }
                tracing::debug!("idle for the read timeout: connection closed");
                connection.as_mut().graceful_shutdown();
                closing = Closing::Idle {
                    drop_at: Instant::now() + read_timeout,
                };
            }
        }
    }
}

/// How far a connection is in closing.
enum Closing {
    /// Serving; closed once idle.
    Open,
    /// Shut down gracefully as the server stops: its requests finish first.
    Draining,
    /// Shut down gracefully for being idle: dropped if not gone by `drop_at`.
    Idle { drop_at: Instant },
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

/// What a connection's requests have done, shared by its service and the
/// task that drives it.
struct Activity {
    opened: Instant,
    /// Requests in progress.
    in_flight: AtomicUsize,
    /// When the last request ended, in microseconds since `opened`, at least
    /// 1 (0: none has).
    last_end_us: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Self {
            opened: Instant::now(),
            in_flight: AtomicUsize::new(0),
            last_end_us: AtomicU64::new(0),
        }
    }

    /// When the connection will have been idle for `timeout`: that long after
    /// its last request ended (or it opened); while a request is in
    /// progress, no sooner than `timeout` from now.
    fn idle_until(&self, timeout: Duration) -> Instant {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return Instant::now() + timeout;
        }
        let last_end = Duration::from_micros(self.last_end_us.load(Ordering::Acquire));
        self.opened + last_end + timeout
    }

    /// Whether a request ever came: one is in progress, or one ended.
    fn had_a_request(&self) -> bool {
        self.in_flight.load(Ordering::Acquire) > 0 || self.last_end_us.load(Ordering::Acquire) > 0
    }

    /// A request started: in progress until the returned guard is dropped
    /// (when its response is ready, or when the connection drops it).
    fn request_started(self: &Arc<Self>) -> InProgress {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        InProgress(self.clone())
    }

    fn request_ended(&self) {
        let since_opened = u64::try_from(self.opened.elapsed().as_micros())
            .unwrap_or(u64::MAX)
            .max(1);
        // Stored before the count falls, so whoever sees no request in
        // progress sees when the last one ended.
        self.last_end_us.fetch_max(since_opened, Ordering::AcqRel);
        self.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A request in progress, until dropped.
struct InProgress(Arc<Activity>);

impl Drop for InProgress {
    fn drop(&mut self) {
        self.0.request_ended();
    }
}
