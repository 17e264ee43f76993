//! A webhook sender: drives signed webhooks at a Hermes host over many
//! connections, like a provider under load, and measures what it gets back.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use hdrhistogram::Histogram;
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

/// Live counters, readable while sending (for progress lines).
#[derive(Default)]
pub struct Stats {
    sent: AtomicU64,
    statuses: Mutex<BTreeMap<u16, u64>>,
    latency_us: Mutex<Option<Histogram<u64>>>,
    accepted: Mutex<Vec<i64>>,
    duplicates: AtomicU64,
    errors: AtomicU64,
}

/// A snapshot of the counters.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Snapshot {
    /// Requests sent.
    pub sent: u64,
    /// Responses by HTTP status.
    pub statuses: BTreeMap<u16, u64>,
    /// Requests that got no HTTP response (connection errors, time-outs).
    pub errors: u64,
    /// 202s that said the event was a duplicate.
    pub duplicates: u64,
    /// Median latency of 202s, in milliseconds.
    pub p50_ms: f64,
    /// 99th percentile latency of 202s, in milliseconds.
    pub p99_ms: f64,
}

impl Stats {
    /// Empty counters.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// The counters now.
    pub fn snapshot(&self) -> Snapshot {
        let histogram = lock(&self.latency_us);
        let quantile = |q: f64| {
            histogram
                .as_ref()
                .map_or(0.0, |h| h.value_at_quantile(q) as f64 / 1000.0)
        };
        Snapshot {
            sent: self.sent.load(Ordering::Relaxed),
            statuses: lock(&self.statuses).clone(),
            errors: self.errors.load(Ordering::Relaxed),
            duplicates: self.duplicates.load(Ordering::Relaxed),
            p50_ms: quantile(0.5),
            p99_ms: quantile(0.99),
        }
    }

    /// Event ids of every 202 so far.
    pub fn accepted_ids(&self) -> Vec<i64> {
        lock(&self.accepted).clone()
    }

    /// Clears the latency histogram (e.g. after a warm-up).
    pub fn reset_latency(&self) {
        *lock(&self.latency_us) = None;
    }

    fn record(&self, status: u16, latency: Duration, accepted: Option<Accepted>) {
        *lock(&self.statuses).entry(status).or_default() += 1;
        if let Some(accepted) = accepted {
            let micros = u64::try_from(latency.as_micros())
                .unwrap_or(u64::MAX)
                .max(1);
            let mut histogram = lock(&self.latency_us);
            // The histogram resizes itself, so recording cannot run out of range.
            let _ = histogram.get_or_insert_with(new_histogram).record(micros);
            lock(&self.accepted).push(accepted.id);
            if accepted.duplicate {
                self.duplicates.fetch_add(1, Ordering::Relaxed);
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

/// Sends webhooks as configured until `config.duration` passes or `stop` is set,
/// recording into `stats`.
pub async fn run(
    config: SenderConfig,
    stats: Arc<Stats>,
    stop: Arc<AtomicBool>,
) -> Result<(), reqwest::Error> {
    let connections = config.connections.max(1);
    let streams = config.streams_per_connection.max(1);
    // One client per connection, so the connection count is exact.
    let clients = (0..connections)
        .map(|_| {
            let builder = reqwest::Client::builder().timeout(Duration::from_secs(30));
            let builder = if streams > 1 {
                builder.http2_prior_knowledge()
            } else {
                builder.http1_only().pool_max_idle_per_host(1)
            };
            builder.build()
        })
        .collect::<Result<Vec<_>, _>>()?;
    let next = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + config.duration;
    let workers = connections * streams;
    // Open loop: each worker sends on its own schedule, so the offered rate
    // does not drop when the host slows down.
    let interval = config
        .rate_per_sec
        .map(|rate| Duration::from_secs_f64(workers as f64 / rate.max(1) as f64));
    let workers = (0..workers).map(|worker| {
        let (client, config, stats, next, stop) = (
            clients[worker / streams].clone(),
            config.clone(),
            stats.clone(),
            next.clone(),
            stop.clone(),
        );
        tokio::spawn(async move {
            let mut ticker = interval.map(|interval| {
                let offset = interval.mul_f64(worker as f64 / (connections * streams) as f64);
                let mut ticker =
                    tokio::time::interval_at(tokio::time::Instant::now() + offset, interval);
                ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
                ticker
            });
            while Instant::now() < deadline && !stop.load(Ordering::Relaxed) {
                if let Some(ticker) = &mut ticker {
                    ticker.tick().await;
                }
                let n = next.fetch_add(1, Ordering::Relaxed);
                send_one(&client, &config, &stats, n).await;
            }
        })
    });
    futures::future::join_all(workers).await;
    Ok(())
}

async fn send_one(client: &reqwest::Client, config: &SenderConfig, stats: &Stats, n: u64) {
    let (id, body) = (config.body)(n);
    let headers = config
        .verifier
        .sign(&body, &config.url, &id, SystemTime::now());
    stats.sent.fetch_add(1, Ordering::Relaxed);
    let started = Instant::now();
    let response = client
        .post(&config.url)
        .headers(headers)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(body)
        .send()
        .await;
    match response {
        Ok(response) => {
            let status = response.status().as_u16();
            let accepted = if status == 202 {
                response.json::<Accepted>().await.ok()
            } else {
                None
            };
            stats.record(status, started.elapsed(), accepted);
        }
        Err(_) => {
            stats.errors.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// A 1 KB-ish SMS webhook body between a few dozen numbers, unique per `n`.
pub fn sms_body(n: u64, run: &str) -> (String, Vec<u8>) {
    let id = format!("{run}-{n}");
    let body = serde_json::json!({
        "from": format!("+1555{:07}", n % 37),
        "to": format!("+1666{:07}", n % 11),
        "body": format!("message {n} {}", "lorem ipsum dolor sit amet ".repeat(32)),
        "timestamp": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        "provider_message_id": id,
    });
    (id, body.to_string().into_bytes())
}
