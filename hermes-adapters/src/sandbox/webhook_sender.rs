//! A webhook sender: drives signed webhooks at a Hermes host over many
//! connections, like a provider under load, and measures what it gets back.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use hdrhistogram::Histogram;
use http::header::{CONTENT_TYPE, HOST};
use http::{HeaderMap, HeaderValue, Method, Request, Uri};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use serde::Deserialize;

use crate::webhook::Verifier;

/// Makes the body of webhook number `n` and its delivery id.
pub type BodyFn = Arc<dyn Fn(u64) -> (String, Vec<u8>) + Send + Sync>;

/// What to send, where, and how hard.
#[derive(Clone)]
pub struct SenderConfig {
    /// The full URL of the webhook route, e.g. `http://127.0.0.1:8080/webhooks/sms`.
    pub url: String,
    /// Signs each request as the source expects.
    pub verifier: Arc<Verifier>,
    /// Concurrent connections.
    pub connections: usize,
    /// Requests in flight per connection: 1 speaks HTTP/1.1 (one request at
    /// a time per connection, as most providers do); more multiplexes that
    /// many streams per connection over HTTP/2 (cleartext, prior knowledge).
    pub streams_per_connection: usize,
    /// How long to send.
    pub duration: Duration,
    /// Total requests per second offered (open loop), or `None` to send as fast
    /// as responses come back (closed loop).
    pub rate_per_sec: Option<u64>,
    /// The body and delivery id of each request.
    pub body: BodyFn,
}

/// The 202 body of the webhook route.
#[derive(Deserialize)]
struct Accepted {
    id: i64,
    duplicate: bool,
}

/// A 202: the event id the host named, for the request sent with this
/// delivery id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AcceptedEvent {
    /// The stored event's id, from the 202's body.
    pub event_id: i64,
    /// The delivery id the request was built with (see [`BodyFn`]).
    pub delivery_id: String,
}

/// Live counters, readable while sending (for progress lines).
#[derive(Default)]
pub struct Stats {
    sent: AtomicU64,
    errors: AtomicU64,
    /// What the responses said, behind one lock taken once per response.
    responses: Mutex<Responses>,
}

/// The counters of responses.
#[derive(Default)]
struct Responses {
    statuses: BTreeMap<u16, u64>,
    latency_us: Option<Histogram<u64>>,
    longest_answer: Duration,
    accepted: Vec<AcceptedEvent>,
    duplicates: u64,
}

/// A snapshot of the counters.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Snapshot {
    /// Requests sent.
    pub sent: u64,
    /// Responses by HTTP status.
    pub statuses: BTreeMap<u16, u64>,
    /// Requests that got no usable HTTP response (connection errors,
    /// time-outs, a 202 without an event id).
    pub errors: u64,
    /// 202s that said the event was a duplicate.
    pub duplicates: u64,
    /// Median latency of 202s, in milliseconds.
    pub p50_ms: f64,
    /// 99th percentile latency of 202s, in milliseconds.
    pub p99_ms: f64,
    /// The longest a 202 took from the moment its request was sent, in
    /// milliseconds. Latency counts from when a request was due; beside a
    /// high p99, this tells whether the server held an answer that long or
    /// requests waited to be sent.
    pub longest_answer_ms: f64,
}

impl Stats {
    /// Empty counters.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// The counters now.
    pub fn snapshot(&self) -> Snapshot {
        let responses = lock(&self.responses);
        let quantile = |q: f64| {
            responses
                .latency_us
                .as_ref()
                .map_or(0.0, |h| h.value_at_quantile(q) as f64 / 1000.0)
        };
        Snapshot {
            sent: self.sent.load(Ordering::Relaxed),
            statuses: responses.statuses.clone(),
            errors: self.errors.load(Ordering::Relaxed),
            duplicates: responses.duplicates,
            p50_ms: quantile(0.5),
            p99_ms: quantile(0.99),
            longest_answer_ms: responses.longest_answer.as_secs_f64() * 1000.0,
        }
    }

    /// Every 202 so far: the event id it named and the delivery id sent.
    pub fn accepted(&self) -> Vec<AcceptedEvent> {
        lock(&self.responses).accepted.clone()
    }

    /// Clears the latency histogram (e.g. after a warm-up).
    pub fn reset_latency(&self) {
        let mut responses = lock(&self.responses);
        responses.latency_us = None;
        responses.longest_answer = Duration::ZERO;
    }

    /// Records an answer: `latency` since the request was due, `answered_in`
    /// since it was sent.
    fn record(
        &self,
        status: u16,
        latency: Duration,
        answered_in: Duration,
        accepted: Option<(Accepted, &str)>,
    ) {
        let mut responses = lock(&self.responses);
        *responses.statuses.entry(status).or_default() += 1;
        if let Some((accepted, delivery_id)) = accepted {
            responses.longest_answer = responses.longest_answer.max(answered_in);
            let micros = u64::try_from(latency.as_micros())
                .unwrap_or(u64::MAX)
                .max(1);
            // The histogram resizes itself, so recording cannot run out of range.
            let _ = responses
                .latency_us
                .get_or_insert_with(new_histogram)
                .record(micros);
            responses.accepted.push(AcceptedEvent {
                event_id: accepted.id,
                delivery_id: delivery_id.to_owned(),
            });
            if accepted.duplicate {
                responses.duplicates += 1;
            }
        }
    }
}

fn new_histogram() -> Histogram<u64> {
    // Three significant figures is always a valid precision.
    Histogram::new(3).expect("3 significant figures is a valid precision")
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Why [`run`] failed.
#[derive(Debug, thiserror::Error)]
pub enum SenderError {
    /// An HTTP client could not be built.
    #[error("cannot build an HTTP client: {0}")]
    Client(#[from] reqwest::Error),
    /// A worker (one request stream) panicked or was cancelled; the others
    /// were stopped, so the load did not go on with fewer of them.
    #[error("a sender worker failed: {0}")]
    Worker(#[from] tokio::task::JoinError),
}

/// Sends webhooks as configured until `config.duration` passes or `stop` is set,
/// recording into `stats`.
///
/// HTTP/1.1 to an `http://` URL runs on a lean hyper connection per worker
/// (keep-alive, reconnecting when the server closes it), so the sender spends
/// little CPU of its own; HTTP/2 and other URLs go through reqwest.
///
/// If a worker panics, the others are stopped and the panic is returned as
/// [`SenderError::Worker`].
pub async fn run(
    config: SenderConfig,
    stats: Arc<Stats>,
    stop: Arc<AtomicBool>,
) -> Result<(), SenderError> {
    let connections = config.connections.max(1);
    let streams = config.streams_per_connection.max(1);
    let http1 = if streams == 1 {
        Http1Target::parse(&config.url)
    } else {
        None
    };
    // One client per connection, so the connection count is exact.
    let clients = match http1 {
        Some(_) => Vec::new(),
        None => (0..connections)
            .map(|_| {
                let builder = reqwest::Client::builder().timeout(REQUEST_TIMEOUT);
                let builder = if streams > 1 {
                    builder.http2_prior_knowledge()
                } else {
                    builder.http1_only().pool_max_idle_per_host(1)
                };
                builder.build()
            })
            .collect::<Result<Vec<_>, _>>()?,
    };
    let http1 = http1.map(Arc::new);
    let next = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + config.duration;
    let workers = connections * streams;
    // Open loop: each worker sends on its own schedule, so the offered rate
    // does not drop when the host slows down. A worker that falls behind (it
    // waits for each answer) sends what it missed at once, and latency counts
    // from when a request was due, not when it went out: no coordinated
    // omission.
    let interval = config
        .rate_per_sec
        .map(|rate| Duration::from_secs_f64(workers as f64 / rate.max(1) as f64));
    let mut tasks = tokio::task::JoinSet::new();
    for worker in 0..workers {
        let mut transport = match &http1 {
            Some(target) => Transport::Http1 {
                target: target.clone(),
                connection: None,
            },
            None => Transport::Reqwest(clients[worker / streams].clone()),
        };
        let (config, stats, next, stop) =
            (config.clone(), stats.clone(), next.clone(), stop.clone());
        tasks.spawn(async move {
            let mut ticker = interval.map(|interval| {
                let offset = interval.mul_f64(worker as f64 / (connections * streams) as f64);
                tokio::time::interval_at(tokio::time::Instant::now() + offset, interval)
            });
            loop {
                let due = match &mut ticker {
                    Some(ticker) => Some(ticker.tick().await.into_std()),
                    None => None,
                };
                // Checked after the tick: its wait may have outlasted the run.
                if Instant::now() >= deadline || stop.load(Ordering::Relaxed) {
                    break;
                }
                let n = next.fetch_add(1, Ordering::Relaxed);
                send_one(&mut transport, &config, &stats, n, due).await;
            }
        });
    }
    while let Some(finished) = tasks.join_next().await {
        // Returning drops `tasks`, which aborts the workers still running.
        finished?;
    }
    Ok(())
}

/// How long one request may take before it counts as an error.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Where HTTP/1.1 requests go: a plain `http://` URL taken apart once.
struct Http1Target {
    /// `host:port` to connect to.
    address: String,
    /// The `Host` header.
    host: HeaderValue,
    /// The request target (path and query).
    path: Uri,
}

impl Http1Target {
    fn parse(url: &str) -> Option<Self> {
        let uri: Uri = url.parse().ok()?;
        if uri.scheme_str() != Some("http") {
            return None;
        }
        let authority = uri.authority()?;
        let address = format!(
            "{}:{}",
            authority.host(),
            authority.port_u16().unwrap_or(80)
        );
        let host = HeaderValue::from_str(authority.as_str()).ok()?;
        let path = uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .parse()
            .ok()?;
        Some(Self {
            address,
            host,
            path,
        })
    }

    async fn connect(&self) -> Result<http1::SendRequest<Full<Bytes>>, BoxError> {
        let stream = tokio::net::TcpStream::connect(&self.address).await?;
        stream.set_nodelay(true)?;
        let (sender, connection) = http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            // Ends when the sender is dropped or the server closes it.
            let _ = connection.await;
        });
        Ok(sender)
    }
}

/// How a worker sends its requests.
enum Transport {
    /// Its own keep-alive HTTP/1.1 connection, opened on first use and
    /// reopened after an error.
    Http1 {
        target: Arc<Http1Target>,
        connection: Option<http1::SendRequest<Full<Bytes>>>,
    },
    /// A reqwest client (HTTP/2 streams, or a URL hyper is not used for).
    Reqwest(reqwest::Client),
}

impl Transport {
    /// Sends one request: its status and body, or `None` if no response came.
    async fn send(&mut self, url: &str, headers: HeaderMap, body: Vec<u8>) -> Option<(u16, Bytes)> {
        match self {
            Transport::Http1 { target, connection } => {
                let result = tokio::time::timeout(
                    REQUEST_TIMEOUT,
                    exchange(target, connection, headers, body),
                )
                .await;
                match result {
                    Ok(Ok(response)) => Some(response),
                    _ => {
                        // A fresh connection for the next request.
                        *connection = None;
                        None
                    }
                }
            }
            Transport::Reqwest(client) => {
                let response = client
                    .post(url)
                    .headers(headers)
                    .body(body)
                    .send()
                    .await
                    .ok()?;
                let status = response.status().as_u16();
                let body = response.bytes().await.unwrap_or_default();
                Some((status, body))
            }
        }
    }
}

/// One request on the worker's HTTP/1.1 connection, (re)connecting first if
/// it has none or the server closed it.
async fn exchange(
    target: &Http1Target,
    connection: &mut Option<http1::SendRequest<Full<Bytes>>>,
    headers: HeaderMap,
    body: Vec<u8>,
) -> Result<(u16, Bytes), BoxError> {
    if connection.as_ref().is_none_or(|sender| sender.is_closed()) {
        *connection = Some(target.connect().await?);
    }
    let mut sender = connection.take().ok_or("no connection")?;
    if sender.ready().await.is_err() {
        // Closed by the server before this request was sent: a new one.
        sender = target.connect().await?;
        sender.ready().await?;
    }
    let sender = connection.insert(sender);
    let mut request = Request::new(Full::new(Bytes::from(body)));
    *request.method_mut() = Method::POST;
    *request.uri_mut() = target.path.clone();
    *request.headers_mut() = headers;
    let request_headers = request.headers_mut();
    request_headers.insert(HOST, target.host.clone());
    let response = sender.send_request(request).await?;
    let status = response.status().as_u16();
    let body = response.into_body().collect().await?.to_bytes();
    Ok((status, body))
}

/// Sends request `n` and records its answer, with its latency from when it
/// was `due` (open loop), else from when it was sent.
async fn send_one(
    transport: &mut Transport,
    config: &SenderConfig,
    stats: &Stats,
    n: u64,
    due: Option<Instant>,
) {
    let (id, body) = (config.body)(n);
    let mut headers = config
        .verifier
        .sign(&body, &config.url, &id, SystemTime::now());
    // JSON unless the signed headers say otherwise (Twilio's form, say).
    headers
        .entry(CONTENT_TYPE)
        .or_insert(HeaderValue::from_static("application/json"));
    stats.sent.fetch_add(1, Ordering::Relaxed);
    let sent = Instant::now();
    let answer = transport.send(&config.url, headers, body).await;
    let (latency, answered_in) = (due.unwrap_or(sent).elapsed(), sent.elapsed());
    match answer {
        Some((202, body)) => match serde_json::from_slice::<Accepted>(&body) {
            Ok(accepted) => stats.record(202, latency, answered_in, Some((accepted, &id))),
            // A 202 that names no event cannot be checked: not an answer.
            Err(_) => {
                stats.errors.fetch_add(1, Ordering::Relaxed);
            }
        },
        Some((status, _)) => stats.record(status, latency, answered_in, None),
        None => {
            stats.errors.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// A 1 KB-ish SMS webhook body between a few dozen numbers, unique per `n`.
pub fn sms_body(n: u64, run: &str) -> (String, Vec<u8>) {
    static FILLER: OnceLock<String> = OnceLock::new();
    let filler = FILLER.get_or_init(|| "lorem ipsum dolor sit amet ".repeat(32));
    let id = format!("{run}-{n}");
    // Written directly rather than through a JSON tree: the load generator's
    // CPU is taken from the host it measures. Only the id needs escaping.
    let quoted_id = serde_json::Value::from(id.as_str()).to_string();
    let timestamp = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let body = format!(
        r#"{{"from":"+1555{:07}","to":"+1666{:07}","body":"message {n} {filler}","timestamp":"{timestamp}","provider_message_id":{quoted_id}}}"#,
        n % 37,
        n % 11,
    );
    (id, body.into_bytes())
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use hyper::Response;
    use hyper::body::Incoming;
    use hyper::service::service_fn;

    use super::*;
    use crate::webhook::{Encoding, Scheme, Secret};

    /// A server that answers every 4th request 503 and the others 202, and
    /// closes the connection after every 5th request.
    async fn server() -> (String, Arc<AtomicU64>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/webhooks/sms", listener.local_addr().unwrap());
        let seen = Arc::new(AtomicU64::new(0));
        let counter = seen.clone();
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                let counter = counter.clone();
                tokio::spawn(async move {
                    let served = Arc::new(AtomicU64::new(0));
                    let service = service_fn(move |request: Request<Incoming>| {
                        let (counter, served) = (counter.clone(), served.clone());
                        async move {
                            assert_eq!(request.method(), Method::POST);
                            assert_eq!(request.uri().path(), "/webhooks/sms");
                            assert!(request.headers().contains_key("x-signature"));
                            let body = request.into_body().collect().await.unwrap().to_bytes();
                            assert!(!body.is_empty());
                            let n = counter.fetch_add(1, Ordering::Relaxed);
                            let close = served.fetch_add(1, Ordering::Relaxed) % 5 == 4;
                            let mut response = if n % 4 == 3 {
                                let mut r = Response::new(Full::new(Bytes::from_static(b"{}")));
                                *r.status_mut() = http::StatusCode::SERVICE_UNAVAILABLE;
                                r
                            } else {
                                let body = format!(r#"{{"id":{n},"duplicate":false}}"#);
                                let mut r = Response::new(Full::new(Bytes::from(body)));
                                *r.status_mut() = http::StatusCode::ACCEPTED;
                                r
                            };
                            if close {
                                response
                                    .headers_mut()
                                    .insert("connection", HeaderValue::from_static("close"));
                            }
                            Ok::<_, Infallible>(response)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        (url, seen)
    }

    /// A closed loop over 4 connections to `url`, signing with a test secret.
    fn closed_loop(url: String, duration: Duration, body: BodyFn) -> SenderConfig {
        let scheme = Scheme::hmac_sha256("x-signature", None, Encoding::Hex).unwrap();
        let verifier = Verifier::new(scheme, vec![Secret::new("s")]).unwrap();
        SenderConfig {
            url,
            verifier: Arc::new(verifier),
            connections: 4,
            streams_per_connection: 1,
            duration,
            rate_per_sec: None,
            body,
        }
    }

    #[tokio::test]
    async fn http1_sender_keeps_alive_reconnects_and_counts() {
        let (url, seen) = server().await;
        let config = closed_loop(
            url,
            Duration::from_millis(300),
            Arc::new(|n| sms_body(n, "test")),
        );
        let stats = Stats::new();
        run(config, stats.clone(), Arc::new(AtomicBool::new(false)))
            .await
            .unwrap();
        let snapshot = stats.snapshot();
        let served = seen.load(Ordering::Relaxed);
        assert!(served >= 20, "{snapshot:?}");
        assert_eq!(snapshot.errors, 0, "{snapshot:?}");
        assert_eq!(snapshot.sent, served, "{snapshot:?}");
        let accepted = snapshot.statuses[&202];
        assert_eq!(accepted + snapshot.statuses[&503], served, "{snapshot:?}");
        assert_eq!(stats.accepted().len() as u64, accepted);
        assert!(snapshot.p50_ms > 0.0);
    }

    #[tokio::test]
    async fn a_panicking_worker_fails_the_run_and_stops_the_others() {
        let (url, seen) = server().await;
        let config = closed_loop(
            url,
            Duration::from_secs(60),
            Arc::new(|n| {
                assert_ne!(n, 7, "body 7 cannot be made");
                sms_body(n, "test")
            }),
        );
        let started = Instant::now();
        let result = run(config, Stats::new(), Arc::new(AtomicBool::new(false))).await;
        let Err(SenderError::Worker(error)) = result else {
            panic!("expected a worker failure, got {result:?}");
        };
        assert!(error.is_panic());
        assert!(started.elapsed() < Duration::from_secs(30));
        // The other workers were stopped: nothing more reaches the server.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let served = seen.load(Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(seen.load(Ordering::Relaxed), served);
    }
}
